"""Lifetimes: the caps on loaded training runs (per key, in all), and what the reaper forgets (finished
sessions, unclaimed results). The routes run in process over a real engine on the tiny model, through raw HTTP."""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("torch")

from fastapi.testclient import TestClient  # noqa: E402

from trainer_api.app import create_app, sweep  # noqa: E402
from trainer_api.checkpoints import CheckpointStore  # noqa: E402
from trainer_api.ownership import RunCaps  # noqa: E402
from trainer_api.service import Service  # noqa: E402
from trainer_api.tenants import load_keyring  # noqa: E402

ALICE, BOB = "tml-alice-lifetimes", "tml-bob-lifetimes"


@pytest.fixture(scope="module")
def service(tiny_model_dir, tmp_path_factory):
    from trainer_api.engine import Engine

    engine = Engine(str(tiny_model_dir), CheckpointStore(tmp_path_factory.mktemp("lifetimes")))
    yield Service(engine)
    engine.close()


@pytest.fixture(scope="module")
def app(service, tmp_path_factory):
    keys = Path(tmp_path_factory.mktemp("keys")) / "keys"
    keys.write_text(f"{ALICE} alice\n{BOB} bob\n")
    return create_app(service, load_keyring(keys, {}), session_timeout=None, run_caps=RunCaps(per_key=2, total=3))


def client(app, key: str) -> TestClient:
    return TestClient(app, headers={"X-API-Key": key})


def result(http: TestClient, response) -> dict:
    """Poll ``retrieve_future`` for the queued work ``response`` names."""
    assert response.status_code == 200, response.text
    body = {"request_id": response.json()["request_id"]}
    while (out := http.post("/api/v1/retrieve_future", json=body).json()).get("type") == "try_again":
        pass
    return out


def create_model(http: TestClient, service: Service, session_id: str, seq: int):
    body = {"session_id": session_id, "model_seq_id": seq, "base_model": service.model_name, "lora_config": {"rank": 2}}
    return http.post("/api/v1/create_model", json=body)


def new_session(http: TestClient) -> str:
    return http.post("/api/v1/create_session", json={}).json()["session_id"]


def test_runs_loaded_at_once_are_capped_per_key_and_in_all(app, service):
    """Caps of 2 per key and 3 in all: a key's third run, then anyone's fourth, is a 429 that says which."""
    alice, bob = client(app, ALICE), client(app, BOB)
    mine, theirs = new_session(alice), new_session(bob)
    first, _ = (result(alice, create_model(alice, service, mine, i))["model_id"] for i in range(2))
    refused = create_model(alice, service, mine, 2)
    assert refused.status_code == 429 and refused.json()["category"] == "user", refused.text
    assert "this API key has 2 training runs loaded" in refused.json()["error"]
    assert "--max-runs-per-key 2" in refused.json()["error"]
    assert "model_id" in result(bob, create_model(bob, service, theirs, 0))  # alice's cap is not bob's
    full = create_model(bob, service, theirs, 1)
    assert full.status_code == 429 and "the service holds 3 training runs" in full.json()["error"], full.text
    assert "--max-loaded-runs 3" in full.json()["error"]
    result(alice, alice.post("/api/v1/unload_model", json={"model_id": first}))
    assert "model_id" in result(bob, create_model(bob, service, theirs, 2))  # the place alice freed


def test_concurrent_creations_cannot_pass_the_cap(service, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("tml-carol-lifetimes carol\n")
    app = create_app(service, load_keyring(keys, {}), session_timeout=None, run_caps=RunCaps(per_key=2, total=None))
    carol = client(app, "tml-carol-lifetimes")
    session = new_session(carol)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: create_model(carol, service, session, i), range(8)))
    assert sorted(a.status_code for a in answers) == [200, 200] + [429] * 6


def test_finished_sessions_are_forgotten_after_the_retention_and_live_ones_kept(app, service):
    alice = client(app, ALICE)
    finished, live = new_session(alice), new_session(alice)
    assert alice.post(f"/api/v1/sessions/{finished}/finish", json={}).status_code == 200
    sweep(service, None, retention=3600.0)
    assert alice.get(f"/api/v1/sessions/{finished}").status_code == 200  # within the retention
    sweep(service, None, retention=3600.0, now=time.time() + 3601.0)
    assert alice.get(f"/api/v1/sessions/{finished}").status_code == 404
    assert alice.get(f"/api/v1/sessions/{live}").status_code == 200


def test_a_forgotten_sessions_unnamed_sampler_weights_leave_memory_and_disk(service, tmp_path):
    """Without this, a long-lived service would keep every session's snapshots until the spill cap pushed
    them out. The snapshot is first pushed out of memory to its spill file, so both places are checked."""
    from trainer_api.exceptions import NotFound

    keys = tmp_path / "keys"
    keys.write_text("tml-dave-lifetimes dave\n")
    app = create_app(service, load_keyring(keys, {}), session_timeout=None, run_caps=RunCaps(per_key=None, total=None))
    dave = client(app, "tml-dave-lifetimes")
    session = new_session(dave)
    model_id = result(dave, create_model(dave, service, session, 0))["model_id"]
    saved = dave.post("/api/v1/save_weights_for_sampler", json={"model_id": model_id, "sampling_session_seq_id": 0})
    key = service.samplers[result(dave, saved)["sampling_session_id"]].snapshot_key
    engine, spill = service.engine, service.engine._spill_dir
    file = f"{engine.snapshot(key).snapshot_id}.safetensors"
    for _ in range(engine.limits.max_snapshots):  # other weights push it out of memory, into its spill file
        engine.save_for_sampler(model_id, None, None, None).result()
    assert file in {path.name for path in spill.iterdir()}
    assert f"{engine.snapshot(key).snapshot_id}.safetensors" == file  # read back while a sampler can reach it
    result(dave, dave.post("/api/v1/unload_model", json={"model_id": model_id}))
    assert dave.post(f"/api/v1/sessions/{session}/finish", json={}).status_code == 200
    sweep(service, None, retention=3600.0, now=time.time() + 3601.0)
    with pytest.raises(NotFound):
        engine.snapshot(key)
    assert file not in {path.name for path in spill.iterdir()}


def test_unclaimed_results_expire_on_an_idle_service(service):
    done: Future = Future()
    done.set_result(None)
    old, recent = (service.futures.add(done, lambda out: out, "test", owner="nobody") for _ in range(2))
    service.futures.get(old).created_at -= service.futures.ttl_seconds + 1  # nothing else is queued after it
    sweep(service, None, retention=3600.0)
    assert service.futures.get(old) is None and service.futures.get(recent) is not None


@pytest.mark.parametrize("flags", [["--resident-snapshots", "0"], ["--torch-sampler-slots", "0"],
                                   ["--snapshot-spill-gib", "-1"], ["--snapshot-spill-gib", "inf"]])
def test_bounds_on_resident_sampler_weights_are_checked_before_the_model_loads(tmp_path, capsys, flags):
    from trainer_api.__main__ import main

    code = main(["serve", "--base-model", str(tmp_path / "no-model"), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--resident-snapshots and --torch-sampler-slots" in err[0]
