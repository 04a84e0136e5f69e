"""The RL losses on data shaped as tinker-cookbook sends it, and the SDK's losses this service lacks,
driven through the tinker SDK against a real service process on the tiny model."""

from __future__ import annotations

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


@pytest.mark.parametrize("loss_fn", ["stable_reinforce", "gspo"])
def test_losses_the_service_lacks_are_refused_at_forward_backward_naming_those_it_has(training, cookbook_batch, loss_fn):
    with pytest.raises(tinker.BadRequestError, match=f"unsupported loss_fn '{loss_fn}': .*supported: cispo, "
                                                     "cross_entropy, dro, importance_sampling, ppo"):
        training.forward_backward(cookbook_batch, loss_fn).result()
