"""Device seconds per training run: measured on the worker, kept apart per tenant, readable after unload."""

from __future__ import annotations

import time

import httpx
import pytest
from tinker import types

from tests.trainer_api.sdk_helpers import TEXTS, sft_datum, train


@pytest.fixture(scope="module")
def base_model(tiny_model_dir) -> str:
    return str(tiny_model_dir)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, headers={"X-API-Key": server.api_key}, timeout=30) as client:
        yield client


def usage(http: httpx.Client, model_id: str) -> dict:
    response = http.get(f"/api/v1/training_runs/{model_id}/device_usage")
    assert response.status_code == 200, response.text
    return response.json()


def test_each_tenant_is_charged_for_its_own_training_and_sampling(http, service_client, base_model):
    busy = service_client.create_lora_training_client(base_model=base_model, rank=2, seed=11).result()
    idle = service_client.create_lora_training_client(base_model=base_model, rank=2, seed=12).result()
    tokenizer = busy.get_tokenizer()
    train(busy, [sft_datum(tokenizer, TEXTS[0])], steps=2, lr=1e-3)
    trained = usage(http, busy.model_id)
    assert trained["device"] in {"cpu", "cuda", "mps"} and trained["device_seconds"] > 0
    assert usage(http, idle.model_id)["device_seconds"] == 0.0

    sampler = busy.save_weights_and_get_sampling_client().result()
    prompt = types.ModelInput.from_ints(tokenizer.encode(TEXTS[2]))
    sampler.sample(prompt, 2, types.SamplingParams(max_tokens=8, temperature=1.0, seed=1)).result()
    sampled = usage(http, busy.model_id)["device_seconds"]
    assert sampled > trained["device_seconds"]  # sampling its weights is its cost too
    assert usage(http, idle.model_id)["device_seconds"] == 0.0

    train(idle, [sft_datum(tokenizer, TEXTS[1])], steps=1, lr=1e-3)
    assert usage(http, idle.model_id)["device_seconds"] > 0
    assert usage(http, busy.model_id)["device_seconds"] == sampled
    metrics = http.get("/metrics").text
    assert f'trainer_tenant_device_seconds_total{{model_id="{idle.model_id}"}}' in metrics

    rid = http.post("/api/v1/unload_model", json={"model_id": busy.model_id}).json()["request_id"]
    deadline = time.monotonic() + 60
    while http.post("/api/v1/retrieve_future", json={"request_id": rid}).json().get("type") == "try_again":
        assert time.monotonic() < deadline, "unload_model never finished"
    assert usage(http, busy.model_id)["device_seconds"] == sampled  # a finished trial reads its cost after unload


def test_an_unknown_run_has_no_usage(http):
    response = http.get("/api/v1/training_runs/no-such-run/device_usage")
    assert response.status_code == 404 and "unknown training run 'no-such-run'" in response.json()["error"]
