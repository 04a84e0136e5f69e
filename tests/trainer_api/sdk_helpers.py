"""Data builders the SDK tests share: supervised datums, RL datums from samples, a training loop."""

from __future__ import annotations

import numpy as np
from tinker import types

TEXTS = [
    "SELECT name FROM users WHERE age > 30;",
    "SELECT COUNT(*) FROM orders GROUP BY customer_id;",
    "How many users are older than thirty?",
]

def sft_datum(tokenizer, text: str) -> types.Datum:
    ids = tokenizer.encode(text)
    return types.Datum(
        model_input=types.ModelInput.from_ints(ids[:-1]),
        loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)},
    )

def forward_logprobs(tc, data) -> list[np.ndarray]:
    out = tc.forward(data, "cross_entropy").result()
    return [o["logprobs"].to_numpy() for o in out.loss_fn_outputs]

def train(tc, data, steps: int, lr: float) -> list[float]:
    losses = []
    for _ in range(steps):
        fb = tc.forward_backward(data, "cross_entropy")
        opt = tc.optim_step(types.AdamParams(learning_rate=lr))
        losses.append(fb.result().metrics["loss:sum"])
        opt.result()
    return losses

def rl_batch(prompt: list[int], sequences) -> tuple[list[types.Datum], list[slice]]:
    data, sampled = [], []
    for seq in sequences:
        tokens = prompt + seq.tokens
        n_prompt = len(prompt) - 1
        data.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={
                    "target_tokens": tokens[1:],
                    "logprobs": [0.0] * n_prompt + list(seq.logprobs),
                    "advantages": [0.0] * n_prompt + [1.0] * len(seq.tokens),
                },
            )
        )
        sampled.append(slice(n_prompt, None))
    return data, sampled
