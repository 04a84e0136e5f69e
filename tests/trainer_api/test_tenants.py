"""Each API key is a tenant: with two keys, every way of reaching the other key's sessions, runs,
samplers, checkpoints and futures is refused with the 404 a nonexistent id gets, through the tinker
SDK and raw HTTP, while the owner's own operations keep working; ownership survives a restart."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import tinker
from fastapi.testclient import TestClient
from tinker import types

from tests.trainer_api.sdk_helpers import TEXTS, sft_datum
from trainer_api.process import ServiceProcess, start_service

ALICE, BOB = "tml-alice-0123456789", "tml-bob-9876543210"
PROMPT = [2, 282, 17]
GREEDY = types.SamplingParams(max_tokens=4, temperature=0.0, stop=[])


def start_two_key_service(model_dir: Path, root: Path, log: Path) -> ServiceProcess:
    keys = root.parent / "api-keys"
    keys.write_text(f"# two researchers\n{ALICE} alice\n\n{BOB} bob\n")
    return start_service(model_dir, root, log, extra_args=("--api-keys-file", str(keys)), sampler="torch")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tenants") / "checkpoints"


@pytest.fixture(scope="module")
def server(tiny_model_dir, root):
    srv = start_two_key_service(tiny_model_dir, root, root.parent / "server.log")
    yield srv
    srv.stop()


def http_for(server: ServiceProcess, key: str) -> httpx.Client:
    return httpx.Client(base_url=server.base_url, headers={"X-API-Key": key}, timeout=60)


@pytest.fixture(scope="module")
def alice_http(server):
    with http_for(server, ALICE) as client:
        yield client


@pytest.fixture(scope="module")
def bob_http(server):
    with http_for(server, BOB) as client:
        yield client


@pytest.fixture(scope="module")
def alice(server, tiny_model_dir) -> SimpleNamespace:
    """Alice's world: a trained adapter, a training and a sampler checkpoint, an export, a sampler, a session."""
    client = tinker.ServiceClient(base_url=server.base_url, api_key=ALICE)
    tc = client.create_lora_training_client(base_model=str(tiny_model_dir), rank=2, seed=0).result()
    batch = [sft_datum(tc.get_tokenizer(), TEXTS[0])]
    tc.forward_backward(batch, "cross_entropy").result()
    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    sampler = tc.save_weights_and_get_sampling_client().result()
    rest = tinker.RestClient(base_url=server.base_url, api_key=ALICE)
    session_id = tc.model_id.split(":")[0]
    [sampler_id] = rest.get_session(session_id).result().sampler_ids
    return SimpleNamespace(
        client=client, tc=tc, batch=batch, model_id=tc.model_id, session_id=session_id, rest=rest,
        weights=tc.save_state("a-weights").result().path,
        sampler_path=tc.save_weights_for_sampler("a-sampler").result().path,
        export=tc.save_weights_external("a-export").result().path,
        sampler=sampler, sampler_id=sampler_id,
    )


@pytest.fixture(scope="module")
def bob(server, tiny_model_dir) -> SimpleNamespace:
    client = tinker.ServiceClient(base_url=server.base_url, api_key=BOB)
    tc = client.create_lora_training_client(base_model=str(tiny_model_dir), rank=2, seed=1).result()
    return SimpleNamespace(client=client, tc=tc, weights=tc.save_state("b-weights").result().path,
                           rest=tinker.RestClient(base_url=server.base_url, api_key=BOB))


def logprobs(tc, batch) -> np.ndarray:
    return tc.forward(batch, "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()


def assert_like_a_missing_id(foreign: httpx.Response, missing: httpx.Response, foreign_id: str, missing_id: str) -> None:
    """Another tenant's id gets exactly what an id that never existed gets: the status and the message."""
    assert foreign.status_code == 404, foreign.text
    assert missing.status_code == 404, missing.text
    assert foreign.json()["error"].replace(foreign_id, "ID") == missing.json()["error"].replace(missing_id, "ID")


def fake(real_id: str) -> str:
    """An id of the same shape that nobody created."""
    return real_id.replace("session-", "session-0000")


def forward_body(model_id: str, tokens: list[int]) -> dict:
    datum = {"model_input": {"chunks": [{"type": "encoded_text", "tokens": tokens[:-1]}]},
             "loss_fn_inputs": {"target_tokens": {"data": tokens[1:], "dtype": "int64", "shape": [len(tokens) - 1]}}}
    return {"model_id": model_id, "seq_id": 1, "forward_backward_input": {"data": [datum], "loss_fn": "cross_entropy"}}


def retrieve(http: httpx.Client, request_id: str) -> dict:
    deadline = time.monotonic() + 60
    while True:
        out = http.post("/api/v1/retrieve_future", json={"request_id": request_id}).json()
        if out.get("type") != "try_again":
            return out
        assert time.monotonic() < deadline, "the request never finished"


# ------------------------------------------------------------------ listings
def test_listings_show_only_the_callers_own(alice, bob, alice_http, bob_http):
    assert alice.session_id in alice.rest.list_sessions(limit=100).result().sessions
    bob_sessions = bob.rest.list_sessions(limit=100).result().sessions
    assert alice.session_id not in bob_sessions and bob.tc.model_id.split(":")[0] in bob_sessions

    assert {r.training_run_id for r in alice.rest.list_training_runs(limit=100).result().training_runs} == {alice.model_id}
    bob_runs = bob.rest.list_training_runs(limit=100).result()
    assert {r.training_run_id for r in bob_runs.training_runs} == {bob.tc.model_id}
    assert bob_runs.cursor.total_count == 1
    assert bob.rest.get_training_run(bob.tc.model_id).result().model_owner == "bob"

    alice_paths = {c.tinker_path for c in alice.rest.list_user_checkpoints(limit=100).result().checkpoints}
    assert alice_paths == {alice.weights, alice.sampler_path, alice.export}
    assert {c.tinker_path for c in bob.rest.list_user_checkpoints(limit=100).result().checkpoints} == {bob.weights}
    raw = bob_http.get("/api/v1/checkpoints").json()
    assert [c["tinker_path"] for c in raw["checkpoints"]] == [bob.weights] and raw["cursor"]["total_count"] == 1

    usage = bob_http.get("/api/v1/billing/usage/checkpoints/current").json()["data"][0]
    assert usage["checkpoint_count"] == 1


def test_another_tenants_session_run_and_checkpoint_list_are_404(alice, bob, bob_http):
    for path in ("/api/v1/sessions/{}", "/api/v1/training_runs/{}", "/api/v1/training_runs/{}/checkpoints",
                 "/api/v1/training_runs/{}/device_usage"):
        real = alice.session_id if "sessions" in path else alice.model_id
        assert_like_a_missing_id(bob_http.get(path.format(real)), bob_http.get(path.format(fake(real))), real, fake(real))
    with pytest.raises(tinker.NotFoundError):
        bob.rest.get_training_run(alice.model_id).result()
    with pytest.raises(tinker.NotFoundError):
        bob.rest.list_checkpoints(alice.model_id).result()
    with pytest.raises(tinker.NotFoundError):
        bob.rest.get_session(alice.session_id).result()


# ------------------------------------------------------------------ sampling
def test_another_tenants_weights_cannot_be_sampled(alice, bob, alice_http, bob_http, tiny_model_dir):
    sampler_id = alice.sampler_id
    body = {"prompt": {"chunks": [{"type": "encoded_text", "tokens": PROMPT}]},
            "sampling_params": {"max_tokens": 2, "stop": []}, "num_samples": 1}
    by_sampler = bob_http.post("/api/v1/asample", json={**body, "sampling_session_id": sampler_id})
    missing = bob_http.post("/api/v1/asample", json={**body, "sampling_session_id": fake(sampler_id)})
    assert_like_a_missing_id(by_sampler, missing, sampler_id, fake(sampler_id))
    by_path = bob_http.post("/api/v1/asample", json={**body, "model_path": alice.sampler_path})
    missing = bob_http.post("/api/v1/asample", json={**body, "model_path": fake(alice.sampler_path)})
    assert_like_a_missing_id(by_path, missing, alice.sampler_path, fake(alice.sampler_path))
    assert_like_a_missing_id(bob_http.get(f"/api/v1/samplers/{sampler_id}"),
                             bob_http.get(f"/api/v1/samplers/{fake(sampler_id)}"), sampler_id, fake(sampler_id))
    join = "/api/v1/join_sampling_session"
    assert_like_a_missing_id(bob_http.post(join, json={"sampling_session_id": sampler_id}),
                             bob_http.post(join, json={"sampling_session_id": fake(sampler_id)}), sampler_id, fake(sampler_id))
    with pytest.raises(tinker.NotFoundError):
        bob.client.create_sampling_client(model_path=alice.sampler_path).result()
    with pytest.raises(tinker.NotFoundError):
        bob.client.create_sampling_client(model_path=alice.weights).result()

    # Alice samples her own weights, by sampler and by path, and both serve the same adapter.
    prompt = types.ModelInput.from_ints(PROMPT)
    mine = alice.sampler.sample(prompt, 1, GREEDY).result().sequences[0].tokens
    from_path = alice.client.create_sampling_client(model_path=alice.sampler_path).result()
    assert from_path.sample(prompt, 1, GREEDY).result().sequences[0].tokens == mine
    assert alice_http.get(f"/api/v1/samplers/{sampler_id}").json()["sampler_id"] == sampler_id


# ------------------------------------------------------------------ training and saving into another's model
def test_another_tenants_adapter_cannot_be_trained_saved_or_unloaded(alice, bob_http, alice_http):
    before = logprobs(alice.tc, alice.batch)
    model_id, missing_id = alice.model_id, fake(alice.model_id)
    for route, body in [
        ("/api/v1/forward_backward", forward_body(model_id, PROMPT)),
        ("/api/v1/forward", forward_body(model_id, PROMPT)),
        ("/api/v1/optim_step", {"model_id": model_id, "adam_params": {"learning_rate": 1.0}}),
        ("/api/v1/get_info", {"model_id": model_id}),
        ("/api/v1/save_weights", {"model_id": model_id, "path": "a-weights", "overwrite": True}),
        ("/api/v1/save_weights_for_sampler", {"model_id": model_id, "path": "a-sampler"}),
        ("/api/v1/save_weights_external", {"model_id": model_id, "path": "stolen"}),
        ("/api/v1/unload_model", {"model_id": model_id}),
    ]:
        foreign = bob_http.post(route, json=body)
        missing = bob_http.post(route, json={**body, "model_id": missing_id})
        assert_like_a_missing_id(foreign, missing, model_id, missing_id)
    # Nothing reached Alice's adapter or checkpoints, and it still trains.
    np.testing.assert_array_equal(logprobs(alice.tc, alice.batch), before)
    info = alice_http.post("/api/v1/get_info", json={"model_id": model_id})
    assert info.status_code == 200 and info.json()["model_id"] == model_id
    assert {c.checkpoint_id for c in alice.rest.list_checkpoints(model_id).result().checkpoints} == {
        "weights/a-weights", "sampler_weights/a-sampler", "external_weights/a-export"}


# ------------------------------------------------------------------ loading weights across tenants
def test_weights_cannot_be_loaded_from_or_into_another_tenant(alice, bob, bob_http, tiny_model_dir):
    with pytest.raises(tinker.NotFoundError):
        bob.client.create_training_client_from_state(alice.weights).result()
    with pytest.raises(tinker.NotFoundError):
        bob.rest.get_weights_info_by_tinker_path(alice.weights).result()
    into_own = bob_http.post("/api/v1/load_weights", json={"model_id": bob.tc.model_id, "path": alice.weights})
    missing = bob_http.post("/api/v1/load_weights", json={"model_id": bob.tc.model_id, "path": fake(alice.weights)})
    assert_like_a_missing_id(into_own, missing, alice.weights, fake(alice.weights))
    bob_session = bob.tc.model_id.split(":")[0]
    new_model = bob_http.post("/api/v1/load_weights", json={"session_id": bob_session, "model_seq_id": 90,
                                                             "path": alice.weights, "base_model": str(tiny_model_dir)})
    assert new_model.status_code == 404
    into_alices = bob_http.post("/api/v1/load_weights", json={"model_id": alice.model_id, "path": bob.weights})
    missing = bob_http.post("/api/v1/load_weights", json={"model_id": fake(alice.model_id), "path": bob.weights})
    assert_like_a_missing_id(into_alices, missing, alice.model_id, fake(alice.model_id))
    # A model in Alice's session is not Bob's to create either.
    in_alices_session = bob_http.post("/api/v1/load_weights", json={"session_id": alice.session_id, "model_seq_id": 91,
                                                                    "path": bob.weights})
    assert in_alices_session.status_code == 404

    # Alice loads her own checkpoint into a new adapter: the weights she saved.
    resumed = alice.client.create_training_client_from_state(alice.weights).result()
    assert resumed.get_info().model_data.model_name == str(tiny_model_dir)
    assert bob.client.create_training_client_from_state(bob.weights).result().get_info() is not None


# ------------------------------------------------------------------ deleting, TTLs, exports
def test_another_tenants_checkpoints_cannot_be_deleted_expired_or_downloaded(alice, bob, bob_http):
    run, kind, name = alice.weights.removeprefix("tinker://").split("/")
    other = fake(run)
    ttl = f"/api/v1/training_runs/{{}}/checkpoints/{kind}/{name}/ttl"
    assert_like_a_missing_id(bob_http.put(ttl.format(run), json={"ttl_seconds": 1}),
                             bob_http.put(ttl.format(other), json={"ttl_seconds": 1}), run, other)
    delete = f"/api/v1/training_runs/{{}}/checkpoints/{kind}/{name}"
    assert_like_a_missing_id(bob_http.delete(delete.format(run)), bob_http.delete(delete.format(other)), run, other)
    erun, ekind, ename = alice.export.removeprefix("tinker://").split("/")
    urls = f"/api/v1/training_runs/{{}}/checkpoints/{ekind}/{ename}/external_weights_urls"
    assert_like_a_missing_id(bob_http.get(urls.format(erun)), bob_http.get(urls.format(fake(erun))), erun, fake(erun))
    with pytest.raises(tinker.NotFoundError):
        bob.rest.delete_checkpoint_from_tinker_path(alice.sampler_path).result()
    with pytest.raises(tinker.NotFoundError):
        bob.rest.set_checkpoint_ttl_from_tinker_path(alice.sampler_path, 3600).result()
    with pytest.raises(tinker.NotFoundError):
        bob.rest.get_external_weights_urls(alice.export).result()
    time.sleep(1.2)  # had the one-second TTL landed, the checkpoint would be gone now

    listed = {c.tinker_path: c for c in alice.rest.list_checkpoints(alice.model_id).result().checkpoints}
    assert set(listed) == {alice.weights, alice.sampler_path, alice.export}
    assert all(c.expires_at is None for c in listed.values())
    # Alice's own TTL, export URLs and delete work.
    alice.rest.set_checkpoint_ttl_from_tinker_path(alice.export, 7200).result()
    assert set(alice.rest.get_external_weights_urls(alice.export).result().urls) == {
        "adapter_config.json", "adapter_model.safetensors"}
    alice.rest.delete_checkpoint_from_tinker_path(alice.export).result()
    assert alice.export not in {c.tinker_path for c in alice.rest.list_checkpoints(alice.model_id).result().checkpoints}


# ------------------------------------------------------------------ sessions and futures
def test_another_tenants_session_cannot_be_finished_or_kept_alive(alice, bob_http, alice_http):
    session, missing = alice.session_id, fake(alice.session_id)
    assert_like_a_missing_id(bob_http.post(f"/api/v1/sessions/{session}/finish", json={}),
                             bob_http.post(f"/api/v1/sessions/{missing}/finish", json={}), session, missing)
    assert_like_a_missing_id(bob_http.post("/api/v1/session_heartbeat", json={"session_id": session}),
                             bob_http.post("/api/v1/session_heartbeat", json={"session_id": missing}), session, missing)
    sampling = bob_http.post("/api/v1/create_sampling_session",
                             json={"session_id": session, "sampling_session_seq_id": 7, "base_model": alice.tc.get_info().model_data.model_name})
    assert sampling.status_code == 404
    assert alice_http.post("/api/v1/session_heartbeat", json={"session_id": session}).status_code == 200
    assert alice_http.post("/api/v1/get_info", json={"model_id": alice.model_id}).status_code == 200


def test_another_tenants_future_cannot_be_retrieved_or_cancelled(alice, bob_http, alice_http):
    # A long generation holds the worker, so the forwards queued behind it are still pending when cancelled.
    # 64 x 1,000 tokens: seconds, even for the vectorised sampler on the tiny model.
    busy = {"prompt": {"chunks": [{"type": "encoded_text", "tokens": PROMPT}]}, "num_samples": 64,
            "sampling_params": {"max_tokens": 1000, "temperature": 1.0, "seed": 1, "stop": []}}
    hold = alice_http.post("/api/v1/asample", json={**busy, "sampling_session_id": alice.sampler_id})
    # Once the worker has taken the generation off its queue, what comes next waits (jobs drained together
    # with it could no longer be cancelled).
    deadline = time.monotonic() + 30
    while "\ntrainer_queue_depth 0\n" not in alice_http.get("/metrics").text and time.monotonic() < deadline:
        time.sleep(0.05)
    theirs = alice_http.post("/api/v1/forward", json=forward_body(alice.model_id, PROMPT)).json()["request_id"]
    mine = alice_http.post("/api/v1/forward", json=forward_body(alice.model_id, PROMPT)).json()["request_id"]
    missing_id = theirs[:-4] + "0000"
    assert_like_a_missing_id(bob_http.post("/api/v1/retrieve_future", json={"request_id": theirs}),
                             bob_http.post("/api/v1/retrieve_future", json={"request_id": missing_id}), theirs, missing_id)
    assert bob_http.post("/api/v1/cancel_future", json={"request_id": theirs}).json() == {}
    assert alice_http.post("/api/v1/cancel_future", json={"request_id": mine}).json() == {}
    assert retrieve(alice_http, theirs)["loss_fn_output_type"] == "ArrayRecord"  # Bob's cancel did nothing
    assert retrieve(alice_http, mine) == {"error": "the request was cancelled", "category": "user"}  # Alice's did
    assert len(retrieve(alice_http, hold.json()["request_id"])["sequences"]) == busy["num_samples"]


# ------------------------------------------------------------------ metrics, docs, keys
def test_metrics_need_a_key_and_show_only_the_callers_runs(server, alice, bob, alice_http, bob_http):
    anonymous = httpx.get(f"{server.base_url}/metrics", timeout=10)
    assert anonymous.status_code == 401 and "missing X-API-Key" in anonymous.json()["error"]
    mine, theirs = alice_http.get("/metrics").text, bob_http.get("/metrics").text
    assert f'trainer_tenant_steps_total{{model_id="{alice.model_id}"}} 1' in mine
    assert alice.model_id not in theirs and f'model_id="{bob.tc.model_id}"' in theirs
    assert "trainer_queue_depth" in theirs  # the service-wide aggregates are everyone's


def test_docs_and_openapi_are_off_unless_asked(server, bob_http):
    assert httpx.get(f"{server.base_url}/openapi.json", timeout=10).status_code == 401
    for path in ("/docs", "/openapi.json", "/redoc"):
        assert bob_http.get(path).status_code == 404

    from trainer_api.app import create_app
    from trainer_api.service import Service
    from trainer_api.tenants import load_keyring

    service = Service(SimpleNamespace(model_name="m"))
    with_docs = TestClient(create_app(service, load_keyring(None, {"TRAINER_API_KEY": ALICE}), docs=True))
    schema = with_docs.get("/openapi.json")
    assert schema.status_code == 200 and "/api/v1/forward_backward" in schema.json()["paths"]
    assert with_docs.get("/docs").status_code == 200
    assert with_docs.get("/api/v1/sessions").status_code == 401  # the docs are public, nothing else is


def test_an_unknown_key_is_no_tenant(server):
    wrong = httpx.get(f"{server.base_url}/api/v1/training_runs", headers={"X-API-Key": "tml-carol"}, timeout=10)
    assert wrong.status_code == 401 and "wrong X-API-Key" in wrong.json()["error"]


# ------------------------------------------------------------------ after a restart
@pytest.mark.slow
def test_ownership_survives_a_restart(server, alice, bob, tiny_model_dir, root):
    server.stop()
    second = start_two_key_service(tiny_model_dir, root, root.parent / "second.log")
    try:
        alice_client = tinker.ServiceClient(base_url=second.base_url, api_key=ALICE)
        bob_client = tinker.ServiceClient(base_url=second.base_url, api_key=BOB)
        bob_rest = tinker.RestClient(base_url=second.base_url, api_key=BOB)
        with pytest.raises(tinker.NotFoundError):
            bob_client.create_training_client_from_state(alice.weights).result()
        with pytest.raises(tinker.NotFoundError):
            bob_rest.delete_checkpoint_from_tinker_path(alice.weights).result()
        bob_runs = {r.training_run_id for r in bob_rest.list_training_runs(limit=100).result().training_runs}
        assert bob.tc.model_id in bob_runs and not any(r.startswith(alice.session_id) for r in bob_runs)
        resumed = alice_client.create_training_client_from_state(alice.weights).result()
        sampler = alice_client.create_sampling_client(model_path=alice.sampler_path).result()
        assert len(sampler.sample(types.ModelInput.from_ints(PROMPT), 1, GREEDY).result().sequences[0].tokens) == 4
        assert resumed.model_id != alice.model_id
    finally:
        second.stop()
