"""Storage safety: a SIGKILL during an overwrite leaves the old or the new checkpoint loadable, a damaged
metadata file affects only its own entry, interrupted saves are cleaned up at start-up, the per-key quota
is a 413 that says what to do, and no symlink inside the checkpoint root is followed."""

from __future__ import annotations

import json
import logging
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from fastapi.testclient import TestClient

from trainer_api import checkpoints
from trainer_api.checkpoints import (
    CheckpointError,
    CheckpointNotFound,
    CheckpointStore,
    DamagedCheckpoint,
    QuotaExceeded,
    StorageQuota,
    checkpoint_ref,
)
from trainer_api.errors import classify

REPO = Path(__file__).resolve().parents[2]
REF = checkpoint_ref("run-1", "weights", "ckpt")
N = 1 << 20  # 4 MiB of float32 per version: each save takes long enough to be killed in the middle

# A child that overwrites REF with version argv[2] (or, with argv[2] == "loop", versions 2, 3, ... forever),
# optionally SIGKILLing itself at one named step of the save.
CHILD = """
import os, signal, sys, torch
from trainer_api import checkpoints as c
root, version, point, exchange = sys.argv[1:]
if exchange == "off":
    c._exchange_supported = False
if point != "none":
    c._fault_hook = lambda p: os.kill(os.getpid(), signal.SIGKILL) if p == point else None
store = c.CheckpointStore(root)
ref = c.checkpoint_ref("run-1", "weights", "ckpt")
def save(v):
    store.save(ref, {"w": torch.full((N_ELEMS,), float(v))}, {"version": v}, {"version": torch.tensor(v)}, overwrite=True)
if version == "loop":
    v = 2
    while True:
        save(v)
        print(v, flush=True)
        v += 1
save(int(version))
""".replace("N_ELEMS", str(N))


def save_version(store: CheckpointStore, version: int, **kw) -> None:
    store.save(REF, {"w": torch.full((N,), float(version))}, {"version": version}, {"version": torch.tensor(version)}, **kw)


def loaded_version(store: CheckpointStore) -> int:
    """The version the checkpoint holds, checking that its metadata, adapter and optimizer state agree."""
    loaded = store.load(REF, with_optimizer=True)
    version = loaded.meta["version"]
    assert torch.equal(loaded.adapter["w"], torch.full((N,), float(version))), "adapter and metadata disagree"
    assert int(loaded.optimizer["version"]) == version, "optimizer state and metadata disagree"
    return version


def hidden_entries(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*"))


def run_child(root: Path, version: str, point: str = "none", exchange: str = "on") -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(root), version, point, exchange],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


@pytest.fixture()
def root(tmp_path) -> Path:
    return tmp_path / "ckpt"


# ------------------------------------------------------------------ SIGKILL during an overwrite
@pytest.mark.parametrize(
    ("exchange", "point", "expected"),
    [
        ("on", "partial-written", 1),
        ("on", "new-in-place", 2),
        ("off", "partial-written", 1),
        ("off", "old-aside", 1),  # the moment neither is at its path: recover() puts the old one back
        ("off", "new-in-place", 2),
    ],
)
def test_sigkill_at_each_step_of_an_overwrite_leaves_old_or_new(root, exchange, point, expected):
    save_version(CheckpointStore(root), 1)
    child = run_child(root, "2", point, exchange)
    _, err = child.communicate(timeout=120)
    assert child.returncode == -signal.SIGKILL, err

    if exchange == "on" and checkpoints._exchange_supported is not False:
        # with an atomic exchange the checkpoint is loadable at every instant, even before any clean-up
        assert loaded_version(CheckpointStore(root)) == expected
    assert hidden_entries(root), "the killed save left its work behind"
    store = CheckpointStore(root)
    store.recover()  # what the service does at start-up
    assert loaded_version(store) == expected
    assert hidden_entries(root) == []
    assert [c["checkpoint_id"] for c in store.list("run-1")] == ["weights/ckpt"]


def test_sigkill_after_random_delays_never_loses_the_checkpoint(root):
    """Kill a child that keeps overwriting the checkpoint, at random moments, over and over."""
    rng = random.Random(12)
    save_version(CheckpointStore(root), 1)
    for attempt in range(6):
        child = run_child(root, "loop", exchange="on" if attempt % 2 == 0 else "off")
        first = child.stdout.readline().strip()
        assert first == "2", child.stderr.read()  # it is saving: version 2 is complete
        time.sleep(rng.uniform(0.0, 0.4))
        child.send_signal(signal.SIGKILL)
        rest, _ = child.communicate(timeout=30)
        assert child.returncode == -signal.SIGKILL
        last_complete = int(([first] + rest.split())[-1])
        store = CheckpointStore(root)
        store.recover()
        # the last save that completed, or the one it was killed in: never neither, never a mix of the two
        assert loaded_version(store) in (last_complete, last_complete + 1)
        assert hidden_entries(root) == []


def test_an_overwrite_that_fails_keeps_the_old_checkpoint(root, monkeypatch):
    store = CheckpointStore(root)
    save_version(store, 1)

    def disk_full(point: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints, "_fault_hook", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_version(store, 2, overwrite=True)
    monkeypatch.setattr(checkpoints, "_fault_hook", None)
    assert loaded_version(store) == 1 and hidden_entries(root) == []


def test_metadata_is_replaced_atomically(root, monkeypatch):
    """A write of owner.json or meta.json that dies before its rename leaves the old file whole."""
    store = CheckpointStore(root)
    save_version(store, 1, ttl_seconds=3600)
    store.write_owner("run-1", "tenant-a")
    owner_before = (root / "run-1" / "owner.json").read_bytes()
    meta_before = (root / "run-1" / "weights" / "ckpt" / "meta.json").read_bytes()

    def crash(src, dst):
        raise OSError(5, "I/O error")

    monkeypatch.setattr(checkpoints.os, "replace", crash)
    with pytest.raises(OSError):
        store.write_owner("run-1", "tenant-b")
    with pytest.raises(OSError):
        store.set_ttl(REF, None)
    monkeypatch.undo()
    assert (root / "run-1" / "owner.json").read_bytes() == owner_before
    assert (root / "run-1" / "weights" / "ckpt" / "meta.json").read_bytes() == meta_before
    assert CheckpointStore(root).read_owner("run-1") == "tenant-a" and hidden_entries(root) == []


# ------------------------------------------------------------------ damaged entries
def test_a_damaged_metadata_file_affects_only_its_own_entry(root, caplog):
    store = CheckpointStore(root)
    for name in ("good", "bad", "truncated", "far"):
        store.save(checkpoint_ref("run-1", "weights", name), {"w": torch.ones(4)}, {"base_model": "m"}, None)
    store.write_run("run-1", {"training_run_id": "run-1", "created_at": 1.0})
    store.write_run("run-2", {"training_run_id": "run-2", "created_at": 2.0})
    (root / "run-1" / "weights" / "bad" / "meta.json").write_text('{"created_at": 1.0, "exp')
    (root / "run-1" / "weights" / "truncated" / "adapter.safetensors").write_bytes(b"\x08\x00")
    far = root / "run-1" / "weights" / "far" / "meta.json"  # a TTL of 2**70 s, stored before TTLs were capped
    far.write_text(json.dumps({**json.loads(far.read_text()), "expires_at": 2.0**70}))
    (root / "run-2" / "run.json").write_text("[not json")
    (root / "run-2" / "owner.json").write_text("\x00\x01")

    with caplog.at_level(logging.WARNING, logger="trainer_api.checkpoints"):
        listed = [c["checkpoint_id"] for c in store.list("run-1")]
        runs = [r["training_run_id"] for r in store.list_runs()]
    assert listed == ["weights/good", "weights/truncated"]  # its metadata is fine; its payload is not
    assert runs == ["run-1"] and store.read_owner("run-2") is None
    assert any("damaged checkpoint skipped" in r.getMessage() for r in caplog.records)
    assert any("damaged run record skipped" in r.getMessage() for r in caplog.records)

    assert store.load(checkpoint_ref("run-1", "weights", "good"), with_optimizer=False).adapter["w"].sum() == 4
    for name in ("bad", "truncated", "far"):
        with pytest.raises(DamagedCheckpoint, match="is damaged") as info:
            store.load(checkpoint_ref("run-1", "weights", name), with_optimizer=False)
        assert classify(info.value)[:2] == (400, "user")
    store.delete(checkpoint_ref("run-1", "weights", "bad"))  # a damaged checkpoint can still be deleted
    assert not (root / "run-1" / "weights" / "bad").exists()


# ------------------------------------------------------------------ start-up clean-up
def plant_leftovers(root: Path, store: CheckpointStore) -> None:
    """What interrupted saves leave behind, in every form this store (or an older one) can leave it."""
    tag = uuid.uuid4().hex
    weights = root / "run-1" / "weights"
    save_version(store, 7)
    (weights / "ckpt").rename(weights / f".old-ckpt-{tag}")  # killed between its two renames
    (weights / f".partial-ckpt-{tag}").mkdir()
    (weights / f".partial-ckpt-{tag}" / "adapter.safetensors").write_bytes(b"half")
    (weights / f".partial-other-{uuid.uuid4().hex}").mkdir()
    (weights / f".deleting-gone-{uuid.uuid4().hex}").mkdir()
    (weights / "no-meta").mkdir()  # an old-style save killed before its meta.json
    (weights / "no-meta" / "adapter.safetensors").write_bytes(b"half")
    (root / "run-1" / f".tmp-owner.json-{uuid.uuid4().hex}").write_text('{"ten')


def test_interrupted_saves_are_cleaned_up_at_start_up(root):
    from trainer_api.service import Service

    store = CheckpointStore(root)
    store.write_owner("run-1", "tenant-a")
    plant_leftovers(root, store)
    assert len(hidden_entries(root)) == 5

    class FakeEngine:  # Service's start-up only needs the store
        model_name = "m"

    engine = FakeEngine()
    engine.store = CheckpointStore(root)
    Service(engine)
    assert hidden_entries(root) == []
    assert sorted(p.name for p in (root / "run-1" / "weights").iterdir()) == ["ckpt"]
    assert loaded_version(engine.store) == 7  # the copy set aside is back in place
    assert engine.store.read_owner("run-1") == "tenant-a"


# ------------------------------------------------------------------ symlinks
def test_a_symlink_in_the_root_is_not_followed(root, tmp_path):
    store = CheckpointStore(root)
    outside = CheckpointStore(tmp_path / "outside")
    for s in (store, outside):
        s.write_owner("run-1", "tenant-a")
        s.write_run("run-1", {"training_run_id": "run-1", "base_model": "m", "lora": {"rank": 2}, "created_at": 1.0})
        save_version(s, 1)
        s.save(checkpoint_ref("run-1", "weights", "mine"), {"w": torch.ones(2)}, {}, None)
    secret = tmp_path / "outside" / "run-1" / "weights" / "ckpt"

    (root / "evil-run").symlink_to(tmp_path / "outside" / "run-1", target_is_directory=True)
    (root / "run-1" / "weights" / "linked").symlink_to(secret, target_is_directory=True)
    mine = root / "run-1" / "weights" / "mine"
    (mine / "adapter.safetensors").unlink()
    (mine / "adapter.safetensors").symlink_to(secret / "adapter.safetensors")
    (root / "run-1" / "sampler_weights").symlink_to(tmp_path / "outside" / "run-1" / "weights", target_is_directory=True)

    # not listed
    assert [r["training_run_id"] for r in store.list_runs()] == ["run-1"]
    assert [c["checkpoint_id"] for c in store.list("run-1")] == ["weights/ckpt", "weights/mine"]
    assert store.read_owner("evil-run") is None and store.list("evil-run") == []
    assert "adapter.safetensors" not in store.files(checkpoint_ref("run-1", "weights", "mine"))
    # not read through
    with pytest.raises(CheckpointNotFound):
        store.load(checkpoint_ref("evil-run", "weights", "ckpt"), with_optimizer=False)
    with pytest.raises(CheckpointNotFound):
        store.load(checkpoint_ref("run-1", "weights", "linked"), with_optimizer=False)
    with pytest.raises(CheckpointNotFound):
        store.load(checkpoint_ref("run-1", "sampler_weights", "ckpt"), with_optimizer=False)
    with pytest.raises(DamagedCheckpoint):
        store.load(checkpoint_ref("run-1", "weights", "mine"), with_optimizer=False)
    # not deleted or written through
    for ref in (checkpoint_ref("evil-run", "weights", "ckpt"), checkpoint_ref("run-1", "weights", "linked"),
                checkpoint_ref("run-1", "sampler_weights", "ckpt")):
        with pytest.raises(CheckpointNotFound):
            store.delete(ref)
    with pytest.raises(CheckpointError, match="symlink"):
        store.save(checkpoint_ref("run-1", "sampler_weights", "new"), {"w": torch.ones(2)}, {}, None)
    with pytest.raises(CheckpointError, match="symlink"):
        store.write_run("evil-run", {"training_run_id": "evil-run"})
    store.recover()
    assert store.usage("tenant-a")[0] == 2
    assert loaded_version(outside) == 1 and secret.is_dir() and (secret / "meta.json").is_file()
    assert (tmp_path / "outside" / "run-1" / "run.json").read_text().startswith('{"training_run_id": "run-1"')
    assert sorted(p.name for p in (tmp_path / "outside" / "run-1" / "weights").iterdir()) == ["ckpt", "mine"]


# ------------------------------------------------------------------ the quota
def test_the_quota_counts_checkpoints_and_bytes_per_owner(root):
    store = CheckpointStore(root, StorageQuota(max_checkpoints=2, max_bytes=None))
    for run, owner in (("run-a", "tenant-a"), ("run-b", "tenant-b")):
        store.write_owner(run, owner)
    small = {"w": torch.ones(4)}
    store.save(checkpoint_ref("run-a", "weights", "one"), small, {}, None)
    store.save(checkpoint_ref("run-a", "sampler_weights", "two"), small, {}, None)
    with pytest.raises(QuotaExceeded) as info:
        store.save(checkpoint_ref("run-a", "weights", "three"), small, {}, None)
    message = str(info.value)
    assert classify(info.value)[:2] == (413, "user")
    assert "quota" in message and "2 checkpoints" in message and "delete" in message and "TTL" in message
    store.save(checkpoint_ref("run-a", "weights", "one"), small, {}, None, overwrite=True)  # replacing adds nothing
    store.save(checkpoint_ref("run-b", "weights", "one"), small, {}, None)  # another key has its own quota
    store.delete(checkpoint_ref("run-a", "weights", "one"))
    store.save(checkpoint_ref("run-a", "weights", "three"), small, {}, None, ttl_seconds=1)
    time.sleep(1.1)  # an expired checkpoint no longer counts
    store.save(checkpoint_ref("run-a", "weights", "four"), small, {}, None)
    assert store.usage("tenant-a")[0] == 2

    by_bytes = CheckpointStore(root, StorageQuota(max_checkpoints=None, max_bytes=store.usage("tenant-a")[1] + 100))
    with pytest.raises(QuotaExceeded, match="this API key may keep") as info:
        by_bytes.save(checkpoint_ref("run-a", "weights", "big"), {"w": torch.ones(1000)}, {}, None)
    assert "KiB" in str(info.value) or "bytes" in str(info.value)
    assert [c["checkpoint_id"] for c in by_bytes.list("run-a")] == ["sampler_weights/two", "weights/four"]


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tmp_path_factory):
    from trainer_api.engine import Engine

    eng = Engine(str(tiny_model_dir), CheckpointStore(tmp_path_factory.mktemp("unused")))
    yield eng
    eng.close()


def client_on(engine, root: Path, quota: StorageQuota) -> TestClient:
    """The service's routes, in process, over ``root`` with ``quota``."""
    from trainer_api.app import create_app
    from trainer_api.service import Service
    from trainer_api.tenants import load_keyring

    engine.store = CheckpointStore(root, quota)
    app = create_app(Service(engine), load_keyring(None, {"TRAINER_API_KEY": "tml-quota"}), session_timeout=None)
    return TestClient(app, headers={"X-API-Key": "tml-quota"})


def retrieve(http: TestClient, response) -> dict:
    assert response.status_code == 200, response.text
    request_id = response.json()["request_id"]
    while True:
        out = http.post("/api/v1/retrieve_future", json={"request_id": request_id}).json()
        if out.get("type") != "try_again":
            return out


def new_model(http: TestClient, tiny_model_dir: Path) -> str:
    """A session with one rank-2 adapter on the in-process service; the adapter's model id."""
    session = http.post("/api/v1/create_session", json={}).json()["session_id"]
    return retrieve(http, http.post("/api/v1/create_model", json={
        "session_id": session, "model_seq_id": 0, "base_model": str(tiny_model_dir), "lora_config": {"rank": 2}}))["model_id"]


def adapter_bytes(engine, model_id: str) -> int:
    return sum(p.numel() * p.element_size() for p in engine.tenant(model_id).params)


@pytest.mark.parametrize(
    "route, kind", [("save_weights", "weights"), ("save_weights_for_sampler", "sampler_weights"),
                    ("save_weights_external", "external_weights")],
)
def test_a_save_that_cannot_fit_is_a_413_on_its_request(engine, tiny_model_dir, tmp_path, route, kind):
    """The adapter's tensors alone pass the byte quota: refused before anything is queued or written."""
    root = tmp_path / "ckpt"
    http = client_on(engine, root, StorageQuota(max_checkpoints=None, max_bytes=None))
    model_id = new_model(http, tiny_model_dir)
    engine.store.quota = StorageQuota(max_checkpoints=None, max_bytes=adapter_bytes(engine, model_id) - 1)
    answer = http.post(f"/api/v1/{route}", json={"model_id": model_id, "path": "big"})
    assert answer.status_code == 413, answer.text
    error = answer.json()
    assert error["category"] == "user" and "quota exceeded" in error["error"] and "(at least " in error["error"]
    assert not (root / model_id / kind).exists() and hidden_entries(root) == []


def test_the_write_checks_the_quota_again(engine, tiny_model_dir, tmp_path):
    """What the request cannot know is refused when the save is written: the optimizer state and metadata on
    top of the adapter's tensors, and a save that landed after the request was checked."""
    root = tmp_path / "ckpt"
    http = client_on(engine, root, StorageQuota(max_checkpoints=None, max_bytes=None))
    model_id = new_model(http, tiny_model_dir)
    engine.store.quota = StorageQuota(max_checkpoints=None, max_bytes=adapter_bytes(engine, model_id) + 100)
    queued = http.post("/api/v1/save_weights", json={"model_id": model_id, "path": "full"})
    refused = retrieve(http, queued)  # passed the request's check (a 200 with a request id), failed on the worker
    assert refused["category"] == "user" and "quota exceeded" in refused["error"] and "at least" not in refused["error"]
    assert not (root / model_id / "weights" / "full").exists()

    engine.store.quota = StorageQuota(max_checkpoints=1, max_bytes=None)
    with engine.store._lock:  # the worker cannot write until both requests have passed their check
        first = http.post("/api/v1/save_weights", json={"model_id": model_id, "path": "first"})
        second = http.post("/api/v1/save_weights", json={"model_id": model_id, "path": "second"})
    assert retrieve(http, first)["path"].endswith("/weights/first")
    late = retrieve(http, second)
    assert late["category"] == "user" and "1 checkpoints" in late["error"]
    assert sorted(p.name for p in (root / model_id / "weights").iterdir()) == ["first"]


def test_the_service_refuses_a_save_over_quota_and_lists_past_damage(engine, tiny_model_dir, tmp_path):
    root = tmp_path / "ckpt"
    http = client_on(engine, root, StorageQuota(max_checkpoints=2, max_bytes=None))
    model_id = new_model(http, tiny_model_dir)

    def save(name: str) -> dict:
        return retrieve(http, http.post("/api/v1/save_weights", json={"model_id": model_id, "path": name}))

    assert save("a")["path"] == f"tinker://{model_id}/weights/a"
    assert save("b")["path"] == f"tinker://{model_id}/weights/b"
    refused = http.post("/api/v1/save_weights", json={"model_id": model_id, "path": "c"})  # on the request itself
    assert refused.status_code == 413, refused.text
    error = refused.json()
    assert error["category"] == "user" and "quota" in error["error"] and "2 checkpoints" in error["error"]
    assert "delete" in error["error"] and not (root / model_id / "weights" / "c").exists()
    usage = http.get("/api/v1/billing/usage/checkpoints/current").json()["data"][0]
    assert usage["checkpoint_count"] == 2

    # a damaged entry: the listings still answer, without it; loading it is a 400 of its own
    (root / model_id / "weights" / "b" / "meta.json").write_text("{garbage")
    listed = http.get(f"/api/v1/training_runs/{model_id}/checkpoints")
    assert listed.status_code == 200 and [c["checkpoint_id"] for c in listed.json()["checkpoints"]] == ["weights/a"]
    assert http.get("/api/v1/checkpoints").status_code == 200
    assert http.get("/api/v1/training_runs").json()["training_runs"][0]["training_run_id"] == model_id
    info = http.post("/api/v1/weights_info", json={"tinker_path": f"tinker://{model_id}/weights/b"})
    assert info.status_code == 400 and "damaged" in info.json()["error"]
    assert http.post("/api/v1/weights_info", json={"tinker_path": f"tinker://{model_id}/weights/a"}).status_code == 200

    # deleting frees the space
    assert http.delete(f"/api/v1/training_runs/{model_id}/checkpoints/weights/b").status_code == 200
    assert save("c")["path"].endswith("/weights/c")
    loaded = retrieve(http, http.post("/api/v1/load_weights", json={"model_id": model_id, "path": f"tinker://{model_id}/weights/c"}))
    assert loaded["path"].endswith("/weights/c")
    assert json.loads((root / model_id / "owner.json").read_text())["tenant"]
    assert hidden_entries(root) == []


def test_the_sdk_raises_the_quota_error_instead_of_retrying(engine, tiny_model_dir, tmp_path):
    """The official SDK against the routes (served in process, with a quota of one checkpoint)."""
    import socket
    import threading

    import tinker
    import uvicorn

    from trainer_api.app import create_app
    from trainer_api.service import Service
    from trainer_api.tenants import load_keyring

    engine.store = CheckpointStore(tmp_path / "ckpt", StorageQuota(max_checkpoints=1, max_bytes=None))
    app = create_app(Service(engine), load_keyring(None, {"TRAINER_API_KEY": "tml-quota"}), session_timeout=None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        client = tinker.ServiceClient(base_url=f"http://127.0.0.1:{port}", api_key="tml-quota")
        tc = client.create_lora_training_client(base_model=str(tiny_model_dir), rank=2, seed=0).result(timeout=60)
        tc.save_state("first").result(timeout=60)
        started = time.monotonic()
        with pytest.raises(tinker.APIStatusError, match="quota exceeded") as info:  # the save request's 413
            tc.save_state("second").result(timeout=60)
        assert time.monotonic() - started < 30, "the SDK retried a quota refusal"
        assert info.value.status_code == 413 and info.value.body["category"] == "user"
        assert "1 checkpoints" in str(info.value) and "delete" in str(info.value)
        rest = tinker.RestClient(base_url=f"http://127.0.0.1:{port}", api_key="tml-quota")
        rest.delete_checkpoint_from_tinker_path(f"tinker://{tc.model_id}/weights/first").result(timeout=60)
        assert tc.save_state("second").result(timeout=60).path.endswith("/weights/second")
        client.close("success").result(timeout=60)  # stops its heartbeats before the server goes
    finally:
        server.should_exit = True
        thread.join(timeout=30)
