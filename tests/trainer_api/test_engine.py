"""The engine in-process: merging of queued requests, backpressure and unload."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from trainer_api.checkpoints import CheckpointStore, checkpoint_ref, parse_path  # noqa: E402
from trainer_api.engine import AdamStep, Busy, Engine, EngineLimits, LoraSpec, NotFound, UserError  # noqa: E402
from trainer_api.service import Service, SessionState  # noqa: E402
from trainer_api.sampling import SampleTask, SamplingSpec  # noqa: E402
from trainer_api.wire import DatumIn, ForwardBackwardIn  # noqa: E402


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tmp_path_factory):
    eng = Engine(str(tiny_model_dir), CheckpointStore(tmp_path_factory.mktemp("engine-ckpt")), EngineLimits(max_queue=8, max_snapshots=2, max_sampler_slots=2))
    yield eng
    eng.close()


def _req(model_id: str, tokens: list[int], forward_only: bool = False) -> ForwardBackwardIn:
    ids = np.asarray(tokens, dtype=np.int64)
    datum = DatumIn(ids[:-1], {"target_tokens": ids[1:], "weights": np.ones(len(ids) - 1, np.float32)})
    return ForwardBackwardIn(model_id, 0, "cross_entropy", {}, forward_only, [datum])


def _hold_worker(engine: Engine) -> threading.Event:
    """Occupy the worker so that what is submitted next queues up and is drained together."""
    release = threading.Event()
    engine._call("hold", lambda: release.wait(10))
    return release


def test_queued_requests_of_one_adapter_share_a_forward_pass(engine):
    engine.create_model("merge", "s", LoraSpec(rank=4, seed=0), {}).result()
    sequences = [[2, 10, 11, 12], [2, 20, 21], [2, 30, 31, 32, 33, 34]]
    alone = [engine.forward_backward(_req("merge", s, forward_only=True)).result() for s in sequences]
    passes = engine.forward_passes
    release = _hold_worker(engine)
    futures = [engine.forward_backward(_req("merge", s, forward_only=True)) for s in sequences]
    release.set()
    merged = [f.result() for f in futures]
    assert engine.forward_passes == passes + 1
    for a, m in zip(alone, merged):
        np.testing.assert_allclose(m.outputs[0]["logprobs"], a.outputs[0]["logprobs"], atol=1e-5)
        assert m.metrics["loss:sum"] == pytest.approx(a.metrics["loss:sum"], rel=1e-5)


def test_merged_gradients_equal_sequential_gradients(engine):
    sequences = [[2, 10, 11, 12], [2, 20, 21, 22, 23]]
    for name in ("seq", "merged"):
        engine.create_model(name, "s", LoraSpec(rank=4, seed=1), {}).result()
    for s in sequences:
        engine.forward_backward(_req("seq", s)).result()
    release = _hold_worker(engine)
    futures = [engine.forward_backward(_req("merged", s)) for s in sequences]
    release.set()
    [f.result() for f in futures]
    step = AdamStep(learning_rate=1e-2)
    a = engine.optim_step("seq", step).result()
    b = engine.optim_step("merged", step).result()
    assert a["grad_norm:mean"] == pytest.approx(b["grad_norm:mean"], rel=1e-4)
    probe = _req("seq", [2, 10, 11, 12, 13], forward_only=True)
    out_a = engine.forward_backward(probe).result()
    out_b = engine.forward_backward(ForwardBackwardIn("merged", 0, "cross_entropy", {}, True, probe.data)).result()
    np.testing.assert_allclose(out_a.outputs[0]["logprobs"], out_b.outputs[0]["logprobs"], atol=1e-5)


def test_a_full_queue_refuses_with_busy(engine):
    engine.create_model("busy", "s", LoraSpec(rank=2, seed=0), {}).result()
    release = _hold_worker(engine)
    accepted = []
    try:
        with pytest.raises(Busy, match="queue is full"):
            for _ in range(20):
                accepted.append(engine.forward_backward(_req("busy", [2, 3, 4])))
        # A refused create leaves nothing half-registered, so the SDK's retry can succeed.
        with pytest.raises(Busy):
            engine.create_model("late", "s", LoraSpec(rank=2, seed=0), {})
        with pytest.raises(NotFound):
            engine.tenant("late")
    finally:
        release.set()
    assert 0 < len(accepted) <= 8
    assert all(f.result().metrics["loss:sum"] > 0 for f in accepted)
    assert engine.create_model("late", "s", LoraSpec(rank=2, seed=0), {}).result() == "late"


def test_unload_deletes_the_adapter(engine):
    engine.create_model("gone", "s", LoraSpec(rank=2, seed=0), {}).result()
    adapter = engine.tenant("gone").adapter
    assert adapter in engine.peft.peft_config
    engine.unload("gone").result()
    assert adapter not in engine.peft.peft_config
    assert not any(f".{adapter}." in n for n, _ in engine.peft.named_parameters())


def _train_step(engine: Engine, model_id: str) -> None:
    engine.forward_backward(_req(model_id, [2, 10, 11, 12, 13])).result()
    engine.optim_step(model_id, AdamStep(learning_rate=5e-2)).result()


def _sample(engine: Engine, key: str):
    """Seeded samples of ``key``'s weights with their logprobs, which differ between any two sets of weights."""
    out = engine.sample(engine.snapshot(key), SampleTask((2, 3, 4), 2, SamplingSpec(max_tokens=4, seed=0))).result()
    return [(s.tokens, s.logprobs) for s in out.sequences]


def test_snapshots_are_bounded_in_memory_and_evicted_ones_reload_with_the_same_weights(engine):
    engine.create_model("snaps", "s", LoraSpec(rank=2, seed=0), {}).result()
    keys, seen = [], []
    for name in ("kept", None, None, None):  # one named snapshot, then unnamed ones, each after a training step
        _train_step(engine, "snaps")
        keys.append(engine.save_for_sampler("snaps", name, None).result())
        seen.append(_sample(engine, keys[-1]))
    assert keys[0] == "tinker://snaps/sampler_weights/kept" and keys[1].startswith("ephemeral:")
    assert len({str(s) for s in seen}) == 4  # four different sets of weights
    assert len(engine._snapshots) == 2  # max_snapshots: the two oldest were pushed out of memory
    assert keys[0] not in engine._snapshots and keys[1] in engine._spilled
    # Each comes back on demand (the named one from its checkpoint, the unnamed one from its spill file)
    # with the weights it was created with, pushing others out in turn.
    for key, expected in reversed(list(zip(keys, seen))):
        assert _sample(engine, key) == expected
    for key, expected in zip(keys, seen):
        assert _sample(engine, key) == expected
    assert len(engine._snapshots) == 2


def test_spilled_snapshots_are_bounded_on_disk(engine):
    engine.create_model("spill", "s", LoraSpec(rank=2, seed=0), {}).result()
    keys = [engine.save_for_sampler("spill", None, None).result() for _ in range(3)]
    one = engine._spilled[keys[0]].size
    limits = engine.limits
    engine.limits = replace(limits, max_spill_bytes=2 * one)  # room for two spill files of this shape
    try:
        more = [engine.save_for_sampler("spill", None, None).result() for _ in range(3)]  # spills 3 more
        for key in keys[:2]:  # the two least recently spilled
            with pytest.raises(NotFound, match="were evicted: unnamed snapshots .* GiB"):
                engine.snapshot(key)
    finally:
        engine.limits = limits
    assert list(engine._spilled) == [keys[2], more[0]]
    assert sorted(p.name for p in engine._spill_dir.iterdir()) == sorted(e.path.name for e in engine._spilled.values())
    assert engine.snapshot(more[0]).lora.rank == 2  # spilled more recently: still there


def test_torch_sampling_adapters_resident_in_the_model_are_bounded(engine):
    """One sampling slot per LoRA shape, at most max_sampler_slots (2 here); a replaced one reloads."""
    keys, seen = [], []
    for rank in (3, 5, 6):
        engine.create_model(f"slots{rank}", "s", LoraSpec(rank=rank, seed=rank), {}).result()
        keys.append(engine.save_for_sampler(f"slots{rank}", None, None).result())
        seen.append(_sample(engine, keys[-1]))
    slots = [name for name in engine.peft.peft_config if name.startswith("sampler")]
    assert len(slots) == 2 and len(engine._slots) == 2
    assert _sample(engine, keys[0]) == seen[0]  # its slot had been replaced: it was loaded again


def test_sessions_without_heartbeats_are_reaped(engine):
    service = Service(engine)
    service.sessions["quiet"] = SessionState("quiet", "tenant", None, None, last_heartbeat=time.time() - 1000)
    service.sessions["alive"] = SessionState("alive", "tenant", None, None)
    engine.create_model("quiet:train:0", "quiet", LoraSpec(rank=2, seed=0), {}).result()
    service.sessions["quiet"].training_run_ids.append("quiet:train:0")
    assert service.reap_expired(timeout_seconds=300) == ["quiet"]
    assert service.sessions["quiet"].finished == "expired" and service.sessions["alive"].finished is None
    with pytest.raises(NotFound):
        for _ in range(100):  # the unload is queued on the worker
            engine.tenant("quiet:train:0")
            time.sleep(0.02)


def test_queued_sample_requests_are_batched_without_changing_results(engine):
    from trainer_api.engine import BASE_SNAPSHOT

    base = engine.snapshot(BASE_SNAPSHOT)
    tasks = [
        SampleTask((2, 10, 11, 12, 13, 14), 2, SamplingSpec(max_tokens=6, seed=1, temperature=0.8), True),
        SampleTask((2, 20), 1, SamplingSpec(max_tokens=3, seed=2, top_k=5)),
        SampleTask((2, 30, 31), 3, SamplingSpec(max_tokens=5, temperature=0.0, stop_token_ids=frozenset({7}))),
    ]
    alone = [engine.sample(base, t).result() for t in tasks]
    batches_before = engine.sample_batches
    release = _hold_worker(engine)
    futures = [engine.sample(base, t) for t in tasks]
    release.set()
    together = [f.result() for f in futures]
    assert engine.sample_batches == batches_before + 1
    for a, b in zip(alone, together):
        assert [s.tokens for s in a.sequences] == [s.tokens for s in b.sequences]
        assert [s.stop_reason for s in a.sequences] == [s.stop_reason for s in b.sequences]
        for sa, sb in zip(a.sequences, b.sequences):
            np.testing.assert_allclose(sa.logprobs, sb.logprobs, atol=1e-5)
    np.testing.assert_allclose(alone[0].prompt_logprobs[1:], together[0].prompt_logprobs[1:], atol=1e-5)
    assert together[0].prompt_logprobs[0] is None and together[1].prompt_logprobs is None


def test_a_request_cancelled_while_queued_is_skipped_and_the_worker_survives(engine):
    engine.create_model("cancel", "s", LoraSpec(rank=2, seed=0), {}).result()
    release = _hold_worker(engine)
    doomed = engine.forward_backward(_req("cancel", [2, 3, 4]))
    kept = engine.forward_backward(_req("cancel", [2, 3, 4, 5]))
    assert doomed.cancel()
    passes = engine.forward_passes
    release.set()
    assert kept.result().metrics["loss:sum"] > 0
    assert engine.forward_passes == passes + 1  # the kept request ran; the cancelled one did not
    assert engine.forward_backward(_req("cancel", [2, 3])).result().metrics["loss:sum"] > 0


def test_the_unembedding_is_never_trained_and_checkpoints_that_train_it_are_refused(engine):
    engine.create_model("heads", "s", LoraSpec(rank=2, seed=0, train_unembed=True), {}).result()
    tenant = engine.tenant("heads")
    assert tenant.lora.train_unembed is False
    assert not any("lm_head" in n for n, p in engine.peft.named_parameters() if f".{tenant.adapter}." in n)
    path = engine.save_state("heads", "no-head", overwrite=False, user_metadata=None).result()
    # A checkpoint written when the unembedding was still a LoRA target says so in its metadata.
    meta = engine.store.load(parse_path(path), with_optimizer=False).meta
    ref = checkpoint_ref("heads", "weights", "old-head")
    engine.store.save(ref, {"lm_head.lora_A.weight": torch.zeros(2, 64)}, {**meta, "lora": {**meta["lora"], "train_unembed": True}}, None)
    with pytest.raises(UserError, match="LoRA on the unembedding"):
        engine.load_state("heads", "tinker://heads/weights/old-head", with_optimizer=False)
