"""Bad requests get a clear 4xx (or a user-category failure) and never disturb other tenants."""

from __future__ import annotations

import httpx
import pytest
import tinker
from tinker import types
from tinker.proto.request_conv import forward_backward_request_to_proto


@pytest.fixture(scope="module")
def healthy(service_client, tiny_model_dir):
    """A tenant created before any bad request; it must keep training at the end."""
    return service_client.create_lora_training_client(base_model=str(tiny_model_dir), rank=4, seed=0).result()


@pytest.fixture()
def http(server):
    with httpx.Client(base_url=server.base_url, headers={"X-API-Key": server.api_key}, timeout=30) as client:
        yield client


def _datum(tokens: list[int], targets: list[int] | None = None) -> types.Datum:
    targets = targets if targets is not None else tokens[1:] + [1]
    return types.Datum(model_input=types.ModelInput.from_ints(tokens), loss_fn_inputs={"target_tokens": targets})


def _proto_body(model_id: str, data: list[types.Datum]) -> bytes:
    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=data, loss_fn="cross_entropy"), model_id=model_id, seq_id=1
    )
    return forward_backward_request_to_proto(request).SerializeToString()


def _assert_error(response: httpx.Response, status: int, fragment: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["category"] == "user"
    assert fragment in body["error"]


def test_missing_or_wrong_api_key_is_rejected(server, tiny_model_dir):
    _assert_error(httpx.post(f"{server.base_url}/api/v1/create_session", json={}), 401, "missing X-API-Key")
    wrong = httpx.post(f"{server.base_url}/api/v1/create_session", json={}, headers={"X-API-Key": "tml-nope"})
    _assert_error(wrong, 401, "wrong X-API-Key")
    with pytest.raises(tinker.AuthenticationError, match="X-API-Key"):
        tinker.ServiceClient(base_url=server.base_url, api_key="tml-wrong").create_lora_training_client(
            base_model=str(tiny_model_dir), rank=2
        ).result()
    assert httpx.get(f"{server.base_url}/api/v1/healthz").json() == {"status": "ok"}


def test_wrong_types_name_the_field(http, service_client):
    bad_rank = http.post(
        "/api/v1/create_model",
        json={"session_id": "s", "model_seq_id": 0, "base_model": "m", "lora_config": {"rank": "big"}},
    )
    _assert_error(bad_rank, 400, "lora_config.rank")
    bad_lr = http.post("/api/v1/optim_step", json={"model_id": "m", "adam_params": {"learning_rate": "fast"}})
    _assert_error(bad_lr, 400, "adam_params.learning_rate")
    not_json = http.post("/api/v1/forward_backward", content=b"{not json", headers={"Content-Type": "application/json"})
    _assert_error(not_json, 400, "neither protobuf nor JSON")
    not_proto = http.post("/api/v1/forward_backward", content=b"\xff\x00garbage", headers={"Content-Type": "application/x-protobuf"})
    _assert_error(not_proto, 400, "not a valid ForwardBackwardRequest")


def test_unknown_model_ids_and_paths_are_404(http, service_client, tiny_model_dir):
    fb = http.post(
        "/api/v1/forward_backward", content=_proto_body("no-such-model", [_datum([2, 3, 4])]),
        headers={"Content-Type": "application/x-protobuf"},
    )
    _assert_error(fb, 404, "unknown model_id 'no-such-model'")
    _assert_error(http.post("/api/v1/get_info", json={"model_id": "nope"}), 404, "unknown model_id")
    with pytest.raises(tinker.NotFoundError, match="does not exist"):
        service_client.create_sampling_client(model_path="tinker://nope/sampler_weights/x").result()
    with pytest.raises(tinker.BadRequestError, match="serves base model"):
        service_client.create_lora_training_client(base_model="google/gemma-3-1b-it", rank=2).result()
    with pytest.raises(tinker.NotFoundError, match="does not exist"):
        service_client.create_training_client_from_state("tinker://ghost/weights/x").result()
    _assert_error(http.post("/api/v1/retrieve_future", json={"request_id": "nope"}), 404, "unknown request_id")


def test_token_ids_out_of_range_are_rejected(service_client, tiny_model_dir, healthy):
    with pytest.raises(tinker.BadRequestError, match=r"token ids outside \[0, 512\)"):
        healthy.forward_backward([_datum([2, 3, 100_000])], "cross_entropy").result()
    with pytest.raises(tinker.BadRequestError, match="target_tokens'\\] has ids outside"):
        healthy.forward_backward([_datum([2, 3, 4], [3, 4, -1])], "cross_entropy").result()
    sampler = service_client.create_sampling_client(base_model=str(tiny_model_dir)).result()
    with pytest.raises(tinker.BadRequestError, match="prompt has token ids outside"):
        sampler.sample(types.ModelInput.from_ints([2, 9999]), 1, types.SamplingParams(max_tokens=2)).result()


def test_empty_batches_and_inputs_are_rejected(http, healthy):
    with pytest.raises(ValueError, match="No data provided"):  # the SDK refuses before sending
        healthy.forward_backward([], "cross_entropy")
    empty = http.post(
        "/api/v1/forward_backward", content=_proto_body(healthy.model_id, []),
        headers={"Content-Type": "application/x-protobuf"},
    )
    _assert_error(empty, 400, "the batch is empty")
    with pytest.raises(tinker.BadRequestError, match=r"data\[0\].model_input is empty"):
        healthy.forward_backward([_datum([], [])], "cross_entropy").result()


def test_oversized_requests_are_413(healthy):
    too_long = list(range(2, 500)) * 5  # 2490 tokens > the 2048-token sequence limit
    with pytest.raises(tinker.APIStatusError, match="maximum sequence length is 2048") as info:
        healthy.forward_backward([_datum(too_long)], "cross_entropy").result()
    assert info.value.status_code == 413
    many = [_datum(list(range(2, 500)) * 4)] * 40  # 40 x 1992 tokens > 65536
    with pytest.raises(tinker.APIStatusError, match="the limit is 65536"):
        healthy.forward_backward(many, "cross_entropy").result()


def test_bad_loss_requests_say_what_is_wrong(healthy):
    with pytest.raises(tinker.BadRequestError, match="'clip_eps' is not used by 'ppo'"):
        healthy.forward_backward([_datum([2, 3, 4])], "ppo", {"clip_eps": 0.2}).result()
    with pytest.raises(tinker.BadRequestError, match="unsupported loss_fn 'stable_reinforce'"):
        healthy.forward_backward([_datum([2, 3, 4])], "stable_reinforce").result()
    with pytest.raises(tinker.BadRequestError, match="lacks 'logprobs', which ppo needs"):
        healthy.forward_backward([_datum([2, 3, 4])], "ppo").result()
    wrong_shape = types.Datum(
        model_input=types.ModelInput.from_ints([2, 3, 4]), loss_fn_inputs={"target_tokens": [3, 4]}
    )
    with pytest.raises(tinker.BadRequestError, match=r"has shape \[2\]; expected \[3\]"):
        healthy.forward_backward([wrong_shape], "cross_entropy").result()


def test_failures_inside_a_request_are_user_category(service_client, tiny_model_dir):
    tc = service_client.create_lora_training_client(base_model=str(tiny_model_dir), rank=2, seed=1).result()
    tc.save_state("twice").result()
    with pytest.raises(tinker.RequestFailedError, match="already exists") as info:
        tc.save_state("twice").result()
    assert info.value.category == tinker.types.RequestErrorCategory.User
    with pytest.raises(tinker.BadRequestError, match="must be 1-128 characters"):
        tc.save_state("../escape").result()


def test_an_unexpected_error_is_a_json_500_the_sdk_reads_without_a_traceback():
    """A service whose engine lacks its checkpoint store: listing runs fails with an AttributeError (a bug)."""
    from types import SimpleNamespace

    from fastapi.testclient import TestClient

    from trainer_api.app import create_app
    from trainer_api.service import Service
    from trainer_api.tenants import load_keyring

    app = create_app(Service(SimpleNamespace(model_name="m")), load_keyring(None, {"TRAINER_API_KEY": "tml-bug"}))
    with TestClient(app, raise_server_exceptions=False, headers={"X-API-Key": "tml-bug"}) as client:
        response = client.get("/api/v1/training_runs")
    assert response.status_code == 500 and response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["category"] == "server" and body["error"].startswith("internal error: AttributeError")
    assert "Traceback" not in response.text and 'File "' not in response.text


def test_the_service_keeps_serving_everyone_after_bad_requests(server, healthy):
    ids = list(range(2, 20))
    batch = [_datum(ids)]
    losses = []
    for _ in range(3):
        fb = healthy.forward_backward(batch, "cross_entropy")
        healthy.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        losses.append(fb.result().metrics["loss:sum"])
    assert losses[-1] < losses[0]
    assert httpx.get(f"{server.base_url}/api/v1/healthz").status_code == 200
