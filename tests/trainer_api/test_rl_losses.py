"""The RL losses on data shaped as tinker-cookbook sends it, and the SDK's losses this service lacks,
driven through the tinker SDK against a real service process on the tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import tinker
from tinker import types

PROMPT = "You are a careful assistant. Answer with one SQL query. Question: how many users are older than thirty?"
RL_LOSSES = ["importance_sampling", "ppo", "cispo", "dro"]


@pytest.fixture(scope="module")
def training(service_client, tiny_model_dir):
    return service_client.create_lora_training_client(base_model=str(tiny_model_dir), rank=8, seed=1).result()


@pytest.fixture(scope="module")
def cookbook_batch(training) -> list[types.Datum]:
    """As tinker-cookbook's RL data reaches the service: a long prompt padded with sampler logprob 0 and
    advantage 0 (its ``mask`` is stripped before sending), then on-policy samples with +-1 advantages."""
    prompt = training.get_tokenizer().encode(PROMPT)
    sampler = training.save_weights_and_get_sampling_client().result()
    params = types.SamplingParams(max_tokens=12, seed=0, stop=[])
    sequences = sampler.sample(types.ModelInput.from_ints(prompt), 4, params).result().sequences
    pad = [0.0] * (len(prompt) - 1)
    return [
        types.Datum(
            model_input=types.ModelInput.from_ints((prompt + seq.tokens)[:-1]),
            loss_fn_inputs={
                "target_tokens": (prompt + seq.tokens)[1:],
                "logprobs": pad + list(seq.logprobs),
                "advantages": pad + [(-1.0) ** i] * len(seq.tokens),
            },
        )
        for i, seq in enumerate(sequences)
    ]


def gradient_norm(training, data: list[types.Datum], loss_fn: str) -> float:
    """The norm of one forward_backward's gradient, as optim_step reports it (a 1e-12 step leaves the adapter)."""
    training.forward_backward(data, loss_fn).result()
    return training.optim_step(types.AdamParams(learning_rate=1e-12)).result().metrics["grad_norm:mean"]


def test_dro_puts_no_gradient_on_prompt_positions(training, cookbook_batch):
    prompt_only = [
        types.Datum(
            model_input=d.model_input,
            loss_fn_inputs={**d.loss_fn_inputs, "logprobs": [0.0] * d.model_input.length,
                            "advantages": [0.0] * d.model_input.length},
        )
        for d in cookbook_batch
    ]
    assert gradient_norm(training, prompt_only, "dro") == 0.0


def test_dro_gradient_on_cookbook_data_is_in_the_range_of_the_other_losses(training, cookbook_batch):
    norms = {loss_fn: gradient_norm(training, cookbook_batch, loss_fn) for loss_fn in RL_LOSSES}
    # On-policy data: the log-ratio is 0 at every sampled token, so dro's penalty adds no gradient and
    # all four losses give the policy gradient (the penalty on the prompt made dro's about 2x here, 50x on Gemma).
    assert all(n > 0 for n in norms.values()), norms
    assert norms["dro"] == pytest.approx(norms["importance_sampling"], rel=0.02), norms


def test_stable_reinforce_is_refused_at_the_first_sample(service_client, training):
    sampler = service_client.create_sampling_client(base_model=training.get_info().model_data.model_name,
                                                    record_stability_info=True).result()
    prompt = types.ModelInput.from_ints([2, 10, 11])
    with pytest.raises(tinker.BadRequestError, match="record_stability_info.*unsupported loss_fn 'stable_reinforce'"):
        sampler.sample(prompt, 1, types.SamplingParams(max_tokens=2)).result()


def test_stable_reinforce_is_refused_at_forward_backward_naming_the_losses_the_service_has(training, cookbook_batch):
    with pytest.raises(tinker.BadRequestError, match="unsupported loss_fn 'stable_reinforce': .*supported: cispo, "
                                                     "cross_entropy, dro, gspo, importance_sampling, ppo"):
        training.forward_backward(cookbook_batch, "stable_reinforce").result()


def _off_policy(batch: list[types.Datum], shifts: list[float], mask_first: int | None = None) -> list[types.Datum]:
    """``batch`` with each datum's sampler logprobs moved by its shift at the sampled positions, so its
    sequence ratio is about exp(-shift). ``mask_first``: a sequence_ratio_mask marking that many sampled
    tokens, the others moved 3 more (so a mask the service ignored would give other ratios)."""
    out = []
    for datum, shift in zip(batch, shifts):
        sampler_lp = datum.loss_fn_inputs["logprobs"].to_numpy()
        sampled = datum.loss_fn_inputs["advantages"].to_numpy() != 0
        moved = np.where(sampled, sampler_lp + shift, 0.0)
        inputs = {**datum.loss_fn_inputs}
        if mask_first is not None:
            mask = np.zeros(len(sampled), np.float32)
            mask[np.flatnonzero(sampled)[:mask_first]] = 1.0
            moved = np.where(sampled & (mask == 0), moved + 3.0, moved)
            inputs["sequence_ratio_mask"] = mask
        inputs["logprobs"] = moved.astype(np.float32)
        out.append(types.Datum(model_input=datum.model_input, loss_fn_inputs=inputs))
    return out


def _gspo_loss(data: list[types.Datum], learner_lp: list[np.ndarray], low: float = 0.8, high: float = 1.2) -> float:
    """GSPO's loss from its definition, in float64: one ratio per sequence, PPO's clipped surrogate on it."""
    total = 0.0
    for datum, lp in zip(data, learner_lp):
        q = datum.loss_fn_inputs["logprobs"].to_numpy().astype(np.float64)
        adv = datum.loss_fn_inputs["advantages"].to_numpy().astype(np.float64)
        given = datum.loss_fn_inputs.get("sequence_ratio_mask")
        marked = (adv != 0) | (q != 0) if given is None else given.to_numpy() != 0
        s = np.exp(np.mean(lp.astype(np.float64)[marked] - q[marked]))
        total += float(np.sum(-np.minimum(s * adv, np.clip(s, low, high) * adv)))
    return total


def test_gspo_through_the_sdk_follows_its_definition(training, cookbook_batch):
    # On-policy the sequence ratio is 1: gspo's gradient is the plain policy gradient.
    assert gradient_norm(training, cookbook_batch, "gspo") == pytest.approx(
        gradient_norm(training, cookbook_batch, "importance_sampling"), rel=1e-3)
    # Off-policy, advantages +1, -1, +1, -1: sequence ratios about 1.11 and 0.90 (inside [0.8, 1.2], kept),
    # 1.65 and 0.61 (outside, on the side where clipping drops them).
    shifts = [-0.1, 0.1, -0.5, 0.5]
    for mask_first in (None, 3):
        data = _off_policy(cookbook_batch, shifts, mask_first)
        out = training.forward(data, "gspo").result()
        learner_lp = [o["logprobs"].to_numpy() for o in out.loss_fn_outputs]
        assert out.metrics["loss:sum"] == pytest.approx(_gspo_loss(data, learner_lp), rel=1e-4)
        if mask_first is not None:  # the mask decides: without it the ratios, and so the loss, differ
            unmasked = [types.Datum(model_input=d.model_input, loss_fn_inputs={
                k: v for k, v in d.loss_fn_inputs.items() if k != "sequence_ratio_mask"}) for d in data]
            assert out.metrics["loss:sum"] != pytest.approx(_gspo_loss(unmasked, learner_lp), rel=1e-2)
        # Prompt positions (sampler logprob 0, advantage 0) have no loss.
        prompt = cookbook_batch[0].loss_fn_inputs["advantages"].to_numpy() == 0
        assert np.all(out.loss_fn_outputs[0]["elementwise_loss"].to_numpy()[prompt] == 0.0)
    clipped = _off_policy(cookbook_batch, shifts)[2:]
    assert gradient_norm(training, clipped, "gspo") == 0.0
    assert gradient_norm(training, _off_policy(cookbook_batch, shifts)[:2], "gspo") > 0


def test_a_sequence_ratio_mask_that_marks_nothing_is_refused(training, cookbook_batch):
    datum = cookbook_batch[0]
    empty = types.Datum(model_input=datum.model_input,
                        loss_fn_inputs={**datum.loss_fn_inputs, "sequence_ratio_mask": [0.0] * datum.model_input.length})
    with pytest.raises(tinker.BadRequestError, match="sequence_ratio_mask'\\] marks no token"):
        training.forward_backward([empty], "gspo").result()
