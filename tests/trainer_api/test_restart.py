"""Checkpoints survive a restart: save, stop the service, start a new one on the same
checkpoint root, load, and continue with identical weights and optimizer state."""

from __future__ import annotations

import numpy as np
import pytest
import tinker
from tinker import types


def _batch(tokenizer) -> list[types.Datum]:
    out = []
    for text in ["SELECT id FROM flights WHERE origin = 'SFO';", "What is the average salary?"]:
        ids = tokenizer.encode(text)
        out.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(ids[:-1]),
                loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)},
            )
        )
    return out


def _step(tc, batch, lr=1e-2) -> float:
    fb = tc.forward_backward(batch, "cross_entropy")
    tc.optim_step(types.AdamParams(learning_rate=lr)).result()
    return fb.result().metrics["loss:sum"]


def _logprobs(tc, batch) -> list[np.ndarray]:
    return [o["logprobs"].to_numpy() for o in tc.forward(batch, "cross_entropy").result().loss_fn_outputs]


@pytest.mark.slow
def test_save_restart_load_and_continue_identically(tiny_model_dir, tmp_path, server_factory):
    root = tmp_path / "checkpoints"
    first = server_factory(tiny_model_dir, root, tmp_path / "first.log")
    try:
        client = tinker.ServiceClient(base_url=first.base_url, api_key=first.api_key)
        tc = client.create_lora_training_client(base_model=str(tiny_model_dir), rank=8, seed=0).result()
        batch = _batch(tc.get_tokenizer())
        for _ in range(3):
            _step(tc, batch)
        path = tc.save_state("resume-here").result().path
        sampler_path = tc.save_weights_for_sampler("resume-sampler").result().path
        saved_logprobs = _logprobs(tc, batch)
        continued_loss = _step(tc, batch)
        continued_logprobs = _logprobs(tc, batch)
        sampled = tc.create_sampling_client(sampler_path).result().sample(
            types.ModelInput.from_ints([2, 282]), 1, types.SamplingParams(max_tokens=5, seed=1, stop=[])
        ).result().sequences[0]
    finally:
        first.stop()

    second = server_factory(tiny_model_dir, root, tmp_path / "second.log")
    try:
        client = tinker.ServiceClient(base_url=second.base_url, api_key=second.api_key)
        rest = tinker.RestClient(base_url=second.base_url, api_key=second.api_key)
        assert {c.checkpoint_id for c in rest.list_checkpoints(path.split("/")[2]).result().checkpoints} == {
            "weights/resume-here", "sampler_weights/resume-sampler"
        }
        resumed = client.create_training_client_from_state_with_optimizer(path).result()
        for got, want in zip(_logprobs(resumed, batch), saved_logprobs):
            np.testing.assert_allclose(got, want, atol=1e-6)
        # The optimizer's moments came back too: the next step is the one the first service took.
        assert _step(resumed, batch) == pytest.approx(continued_loss, rel=1e-6)
        for got, want in zip(_logprobs(resumed, batch), continued_logprobs):
            np.testing.assert_allclose(got, want, atol=1e-5)

        # Weights only: same weights, fresh optimizer, so the next step differs.
        weights_only = client.create_training_client_from_state(path).result()
        for got, want in zip(_logprobs(weights_only, batch), saved_logprobs):
            np.testing.assert_allclose(got, want, atol=1e-6)
        _step(weights_only, batch)
        assert not np.allclose(_logprobs(weights_only, batch)[0], continued_logprobs[0], atol=1e-4)

        # A sampler checkpoint written before the restart serves the same weights after it.
        again = client.create_sampling_client(model_path=sampler_path).result().sample(
            types.ModelInput.from_ints([2, 282]), 1, types.SamplingParams(max_tokens=5, seed=1, stop=[])
        ).result().sequences[0]
        assert again.tokens == sampled.tokens
        np.testing.assert_allclose(again.logprobs, sampled.logprobs, atol=1e-6)

        # The deprecated in-place load onto an existing training client restores the weights too.
        other = client.create_lora_training_client(base_model=str(tiny_model_dir), rank=8, seed=5).result()
        with pytest.warns(FutureWarning):
            other.load_state(path).result()
        for got, want in zip(_logprobs(other, batch), saved_logprobs):
            np.testing.assert_allclose(got, want, atol=1e-6)
    finally:
        second.stop()
