"""Training, sampling and multi-tenancy, driven only through the official tinker SDK
against a real ``python -m trainer_api serve`` process on the tiny model."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import unquote, urlparse

import httpx
import numpy as np
import pytest
import tinker
from tinker import types

from tests.trainer_api.sdk_helpers import TEXTS, forward_logprobs, rl_batch, sft_datum, train


def test_supervised_steps_lower_the_cross_entropy_loss(service_client, base_model, tokenizer):
    tc = service_client.create_lora_training_client(base_model=base_model, rank=8, seed=0).result()
    batch = [sft_datum(tokenizer, t) for t in TEXTS]
    losses = train(tc, batch, steps=5, lr=5e-3)
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.8 * losses[0]
    out = tc.forward_backward(batch, "cross_entropy").result()
    # loss:sum is the negative sum of the returned per-token log-probabilities (all weights 1).
    total = -sum(float(o["logprobs"].to_numpy().sum()) for o in out.loss_fn_outputs)
    assert out.metrics["loss:sum"] == pytest.approx(total, rel=1e-5)
    assert [o["logprobs"].shape[0] for o in out.loss_fn_outputs] == [len(tokenizer.encode(t)) - 1 for t in TEXTS]


@pytest.mark.parametrize(
    "loss_fn, config",
    [
        ("ppo", {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}),
        ("cispo", {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}),
        ("importance_sampling", None),
        ("dro", {"beta": 0.05}),
    ],
)
def test_rl_step_with_positive_advantages_raises_sampled_logprobs(service_client, base_model, tokenizer, loss_fn, config):
    tc = service_client.create_lora_training_client(base_model=base_model, rank=8, seed=1).result()
    sampler = tc.save_weights_and_get_sampling_client().result()
    prompt = tokenizer.encode("SELECT name FROM")
    res = sampler.sample(
        types.ModelInput.from_ints(prompt), 4, types.SamplingParams(max_tokens=6, seed=0, stop=[])
    ).result()
    data, sampled = rl_batch(prompt, res.sequences)
    before = [lp[s].sum() for lp, s in zip(forward_logprobs(tc, data), sampled)]
    out = tc.forward_backward(data, loss_fn, config).result()
    # On-policy data: the sampler's log-probabilities equal the learner's, so the ratio is 1.
    assert out.metrics["importance_ratio:mean"] == pytest.approx(1.0, abs=1e-3)
    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    after = [lp[s].sum() for lp, s in zip(forward_logprobs(tc, data), sampled)]
    assert sum(after) > sum(before) + 0.1, (before, after)


def test_four_concurrent_tenants_keep_their_adapters_apart(service_client, base_model, tokenizer):
    data = [[sft_datum(tokenizer, TEXTS[i % 3] + " " * i)] for i in range(4)]
    reference = service_client.create_lora_training_client(base_model=base_model, rank=4, seed=20).result()
    ref_losses = train(reference, data[0], steps=4, lr=1e-2)
    ref_logprobs = forward_logprobs(reference, data[0])

    clients = [
        service_client.create_lora_training_client(base_model=base_model, rank=4, seed=20 + i * (i > 0)).result()
        for i in range(4)
    ]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: train(clients[i], data[i], 4, [1e-2, 2e-2, 1.5e-2, 5e-3][i]), range(4)))
    # Tenant 0 repeats the reference run while three others train on other data at other
    # learning rates at the same time: its trajectory must be exactly the reference one.
    assert results[0] == pytest.approx(ref_losses, rel=1e-5)
    np.testing.assert_allclose(forward_logprobs(clients[0], data[0])[0], ref_logprobs[0], atol=1e-5)
    for losses in results:
        assert losses[-1] < losses[0]
    infos = {c.get_info().model_id for c in clients}
    assert len(infos) == 4


def test_unload_frees_the_adapter(server, service_client, base_model, tokenizer):
    tc = service_client.create_lora_training_client(base_model=base_model, rank=2, seed=4).result()
    headers = {"X-API-Key": server.api_key}
    with httpx.Client(base_url=server.base_url, headers=headers, timeout=30) as http:
        rid = http.post("/api/v1/unload_model", json={"model_id": tc.model_id}).json()["request_id"]
        result = http.post("/api/v1/retrieve_future", json={"request_id": rid}).json()
        assert result == {"type": "unload_model", "model_id": tc.model_id}
        info = http.post("/api/v1/get_info", json={"model_id": tc.model_id})
        assert info.status_code == 404 and "unknown model_id" in info.json()["error"]
        metrics = http.get("/metrics").text
    assert f'model_id="{tc.model_id}"' not in metrics


def test_legacy_json_forward_backward_still_works(server, service_client, base_model, tokenizer):
    tc = service_client.create_lora_training_client(base_model=base_model, rank=2, seed=5).result()
    ids = tokenizer.encode(TEXTS[0])
    datum = {
        "model_input": {"chunks": [{"type": "encoded_text", "tokens": ids[:-1]}]},
        "loss_fn_inputs": {"target_tokens": {"data": ids[1:], "dtype": "int64", "shape": [len(ids) - 1]}},
    }
    body = {"model_id": tc.model_id, "seq_id": 1, "forward_backward_input": {"data": [datum], "loss_fn": "cross_entropy"}}
    with httpx.Client(base_url=server.base_url, headers={"X-API-Key": server.api_key}, timeout=30) as http:
        rid = http.post("/api/v1/forward", json=body).json()["request_id"]
        out = http.post("/api/v1/retrieve_future", json={"request_id": rid}).json()
    assert out["loss_fn_output_type"] == "ArrayRecord"
    lp = out["loss_fn_outputs"][0]["logprobs"]["data"]
    assert len(lp) == len(ids) - 1
    assert out["metrics"]["loss:sum"] == pytest.approx(-sum(lp), rel=1e-5)


def test_rest_client_lists_and_deletes_checkpoints_and_runs(server, service_client, base_model, tokenizer):
    tc = service_client.create_lora_training_client(base_model=base_model, rank=4, seed=6, user_metadata={"trial": "7"}).result()
    rest = tinker.RestClient(base_url=server.base_url, api_key=server.api_key)
    weights = tc.save_state("ckpt-a", user_metadata={"note": "x"}).result().path
    sampler = tc.save_weights_for_sampler("ckpt-b").result().path
    listed = rest.list_checkpoints(tc.model_id).result().checkpoints
    assert {c.checkpoint_id for c in listed} == {"weights/ckpt-a", "sampler_weights/ckpt-b"}
    assert {c.checkpoint_type for c in listed} == {"training", "sampler"}
    run = rest.get_training_run(tc.model_id).result()
    assert (run.lora_rank, run.base_model, run.user_metadata) == (4, base_model, {"trial": "7"})
    assert run.last_checkpoint.tinker_path == weights
    assert tc.model_id in {r.training_run_id for r in rest.list_training_runs(limit=100).result().training_runs}
    info = rest.get_weights_info_by_tinker_path(sampler).result()
    assert (info.lora_rank, info.is_lora) == (4, True)
    rest.delete_checkpoint_from_tinker_path(weights).result()
    assert [c.checkpoint_id for c in rest.list_checkpoints(tc.model_id).result().checkpoints] == ["sampler_weights/ckpt-b"]
    caps = rest.get_server_capabilities().result()
    assert caps.supported_models[0].model_name == base_model


def test_metrics_report_queue_throughput_and_steps(server, service_client, base_model, tokenizer):
    tc = service_client.create_lora_training_client(base_model=base_model, rank=2, seed=8).result()
    train(tc, [sft_datum(tokenizer, TEXTS[1])], steps=2, lr=1e-3)
    text = httpx.get(f"{server.base_url}/metrics", headers={"X-API-Key": server.api_key}, timeout=10).text
    assert "# TYPE trainer_queue_depth gauge" in text
    assert int(next(l.split()[1] for l in text.splitlines() if l.startswith("trainer_sessions_active"))) >= 1
    assert f'trainer_tenant_steps_total{{model_id="{tc.model_id}"}} 2' in text
    tps = float(next(line.split()[1] for line in text.splitlines() if line.startswith("trainer_tokens_per_second")))
    assert tps > 0
    assert 'trainer_http_requests_total{route="/api/v1/forward_backward",status="200"}' in text


def test_legacy_json_sample_result(server, service_client, base_model, tokenizer):
    prompt = tokenizer.encode("SELECT")
    body = {
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": prompt}]},
        "sampling_params": {"max_tokens": 3, "seed": 1, "stop": []},
        "num_samples": 2,
        "base_model": base_model,
        "prompt_logprobs": True,
    }
    with httpx.Client(base_url=server.base_url, headers={"X-API-Key": server.api_key}, timeout=30) as http:
        submitted = http.post("/api/v1/asample", json=body).json()
        out = http.post("/api/v1/retrieve_future", json={"request_id": submitted["request_id"]}).json()
    assert len(submitted["sample_sequence_ids"]) == 2
    assert [len(s["tokens"]) for s in out["sequences"]] == [3, 3]
    assert all(s["stop_reason"] == "length" and len(s["logprobs"]) == 3 for s in out["sequences"])
    assert out["prompt_logprobs"][0] is None and len(out["prompt_logprobs"]) == len(prompt)


def test_external_export_loads_in_peft_and_matches_the_service(server, service_client, base_model, tokenizer):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tc = service_client.create_lora_training_client(base_model=base_model, rank=4, seed=9).result()
    batch = [sft_datum(tokenizer, TEXTS[2])]
    train(tc, batch, steps=2, lr=1e-2)
    path = tc.save_weights_external("peft-export").result().path
    assert path == f"tinker://{tc.model_id}/external_weights/peft-export"
    rest = tinker.RestClient(base_url=server.base_url, api_key=server.api_key)
    urls = rest.get_external_weights_urls(path).result().urls
    assert set(urls) == {"adapter_config.json", "adapter_model.safetensors"}
    export_dir = Path(unquote(urlparse(urls["adapter_model.safetensors"]).path)).parent
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model), export_dir).eval()
    ids = tokenizer.encode(TEXTS[2])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids[:-1]])).logits[0].float()
    local = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1).numpy()
    np.testing.assert_allclose(local, forward_logprobs(tc, batch)[0], atol=1e-4)


def test_checkpoint_ttl_expires_and_storage_usage_counts(server, service_client, base_model):
    tc = service_client.create_lora_training_client(base_model=base_model, rank=2, seed=10).result()
    rest = tinker.RestClient(base_url=server.base_url, api_key=server.api_key)
    keep = tc.save_state("keep").result().path
    short = tc.save_state("short", ttl_seconds=3600).result().path
    listed = {c.tinker_path: c for c in rest.list_checkpoints(tc.model_id).result().checkpoints}
    assert listed[keep].expires_at is None and listed[short].expires_at is not None
    with httpx.Client(base_url=server.base_url, headers={"X-API-Key": server.api_key}, timeout=30) as http:
        # The SDK only accepts TTLs of an hour or more; one second shows the expiry itself.
        run, kind, name = short.removeprefix("tinker://").split("/")
        assert http.put(f"/api/v1/training_runs/{run}/checkpoints/{kind}/{name}/ttl", json={"ttl_seconds": 1}).status_code == 200
    time.sleep(1.2)
    assert [c.tinker_path for c in rest.list_checkpoints(tc.model_id).result().checkpoints] == [keep]
    with pytest.raises(tinker.NotFoundError, match="expired"):
        service_client.create_training_client_from_state(short).result()
    rest.set_checkpoint_ttl_from_tinker_path(keep, 7200).result()
    assert rest.list_checkpoints(tc.model_id).result().checkpoints[0].expires_at is not None
    admin = tinker.AdminClient(base_url=server.base_url, api_key=server.api_key)
    usage = admin.get_current_checkpoint_storage_usage().result().data[0]
    assert usage.checkpoint_count >= 1 and usage.size_bytes > 0


def test_closing_a_session_unloads_its_adapters(server, base_model):
    client = tinker.ServiceClient(base_url=server.base_url, api_key=server.api_key)
    tc = client.create_lora_training_client(base_model=base_model, rank=2, seed=11).result()
    client.close("success").result()
    with httpx.Client(base_url=server.base_url, headers={"X-API-Key": server.api_key}, timeout=30) as http:
        deadline = time.time() + 10
        while http.post("/api/v1/get_info", json={"model_id": tc.model_id}).status_code != 404:
            assert time.time() < deadline, "the closed session's adapter was not unloaded"
            time.sleep(0.1)
        session_id = tc.model_id.split(":")[0]
        assert http.post("/api/v1/session_heartbeat", json={"session_id": session_id}).status_code == 410
        late = http.post("/api/v1/create_model", json={"session_id": session_id, "model_seq_id": 5, "base_model": base_model})
        assert late.status_code == 400 and "has finished" in late.json()["error"]


def test_zstd_compressed_protobuf_body_is_accepted(server, service_client, base_model, tokenizer):
    import zstandard
    from tinker.proto.request_conv import forward_backward_request_to_proto
    from tinker.proto.response_conv import deserialize_forward_backward_output

    tc = service_client.create_lora_training_client(base_model=base_model, rank=2, seed=12).result()
    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=[sft_datum(tokenizer, TEXTS[0])], loss_fn="cross_entropy"),
        model_id=tc.model_id, seq_id=1,
    )
    body = zstandard.ZstdCompressor().compress(forward_backward_request_to_proto(request).SerializeToString())
    headers = {"X-API-Key": server.api_key, "Content-Type": "application/x-protobuf", "Content-Encoding": "zstd"}
    with httpx.Client(base_url=server.base_url, timeout=30) as http:
        rid = http.post("/api/v1/forward_backward", content=body, headers=headers).json()["request_id"]
        out = http.post(
            "/api/v1/retrieve_future", json={"request_id": rid},
            headers={"X-API-Key": server.api_key, "Accept": "application/x-protobuf"},
        )
    decoded = deserialize_forward_backward_output(out.content)
    assert decoded.metrics["loss:sum"] > 0 and len(decoded.loss_fn_outputs) == 1
