"""Hostile numbers and sampling requests: refused with a clear user error, adapters left as they were.

Engine-level tests show the guarantees precisely (the adapter's tensors before and
after); tests through the tinker SDK and raw HTTP show what a caller sees.
"""

from __future__ import annotations

import copy
import json
import math
import threading
import time

import httpx
import numpy as np
import pytest

pytest.importorskip("peft")
tinker = pytest.importorskip("tinker")
torch = pytest.importorskip("torch")

from tinker import types  # noqa: E402

from trainer_api.checkpoints import CheckpointStore  # noqa: E402
from trainer_api.engine import BASE_SNAPSHOT, AdamStep, Engine, EngineLimits, LoraSpec, TooLarge, UserError  # noqa: E402
from trainer_api.losses import LossConfigError  # noqa: E402
from trainer_api.sampling import SampleTask, SamplingSpec  # noqa: E402
from trainer_api.wire import DatumIn, ForwardBackwardIn  # noqa: E402

NON_FINITE = [math.nan, math.inf, -math.inf]
IDS = np.asarray([2, 10, 11, 12, 13, 14], dtype=np.int64)
PROBE = ForwardBackwardIn("", 0, "cross_entropy", {}, True, [DatumIn(IDS[:-1], {"target_tokens": IDS[1:]})])


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tmp_path_factory):
    eng = Engine(str(tiny_model_dir), CheckpointStore(tmp_path_factory.mktemp("hostile-ckpt")), EngineLimits(max_queue=16))
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def trained(engine):
    """A tenant with one real step behind it, so its optimizer state is not empty."""
    engine.create_model("victim", "s", LoraSpec(rank=4, seed=0), {}).result()
    engine.forward_backward(_fb("victim", "cross_entropy", {"weights": np.ones(5, np.float32)})).result()
    engine.optim_step("victim", AdamStep(learning_rate=1e-2)).result()
    return "victim"


def _fb(model_id: str, loss_fn: str, inputs: dict[str, np.ndarray], config: dict | None = None) -> ForwardBackwardIn:
    datum = DatumIn(IDS[:-1], {"target_tokens": IDS[1:], **inputs})
    return ForwardBackwardIn(model_id, 0, loss_fn, config or {}, False, [datum])


def _rl_inputs(**override: float) -> dict[str, np.ndarray]:
    inputs = {"logprobs": np.full(5, -1.0, np.float32), "advantages": np.ones(5, np.float32)}
    inputs.update({k: np.full(5, v, np.float32) for k, v in override.items()})
    return inputs


def _state(engine: Engine, model_id: str) -> tuple[dict[str, torch.Tensor], dict, list]:
    """Everything a step may change: adapter weights, optimizer state and accumulated gradients."""
    tenant = engine.tenant(model_id)
    optimizer = engine._call(model_id, lambda: copy.deepcopy(tenant.optimizer.state_dict())).result()
    grads = [None if p.grad is None else p.grad.clone() for p in tenant.params]
    return engine._call(model_id, lambda: engine._adapter_state(tenant)).result(), optimizer, grads


def _assert_same_state(before, after, *, grads: bool = True) -> None:
    """Adapter weights (finite) and optimizer state bit for bit, and the accumulated gradients unless ``grads`` is False."""
    (adapter_a, optim_a, grads_a), (adapter_b, optim_b, grads_b) = before, after
    assert adapter_a.keys() == adapter_b.keys()
    assert all(torch.equal(adapter_a[k], adapter_b[k]) and torch.isfinite(adapter_b[k]).all() for k in adapter_a)
    assert optim_a["param_groups"] == optim_b["param_groups"]
    assert optim_a["state"].keys() == optim_b["state"].keys()
    for index, entry in optim_a["state"].items():
        assert all(torch.equal(v, optim_b["state"][index][k]) for k, v in entry.items())
    assert len(grads_a) == len(grads_b)
    assert not grads or all((a is None and b is None) or torch.equal(a, b) for a, b in zip(grads_a, grads_b))


def _logprobs(engine: Engine, model_id: str) -> np.ndarray:
    probe = ForwardBackwardIn(model_id, 0, PROBE.loss_fn, {}, True, PROBE.data)
    return engine.forward_backward(probe).result().outputs[0]["logprobs"]


def _hold_worker(engine: Engine) -> threading.Event:
    """Occupy the worker so that what is submitted next queues up and is merged."""
    release = threading.Event()
    engine._call("hold", lambda: release.wait(10))
    return release


def _spy(engine: Engine, name: str, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record how many requests each call of the engine's batch method ``name`` received."""
    sizes: list[int] = []
    real = getattr(engine, name)

    def spy(*args):
        sizes.append(len(args[-1]))
        return real(*args)

    monkeypatch.setattr(engine, name, spy)
    return sizes


# ----------------------------------------------------------------------- training, in the engine
@pytest.mark.parametrize("field", ["learning_rate", "beta1", "beta2", "eps", "weight_decay", "grad_clip_norm"])
@pytest.mark.parametrize("value", NON_FINITE, ids=["nan", "inf", "-inf"])
def test_non_finite_adam_params_are_refused_and_the_adapter_is_unchanged(engine, trained, field, value):
    before, lp_before = _state(engine, trained), _logprobs(engine, trained)
    with pytest.raises(UserError, match=rf"adam_params\.{field} must be finite"):
        engine.optim_step(trained, AdamStep(**{field: value}))
    _assert_same_state(before, _state(engine, trained))
    np.testing.assert_array_equal(_logprobs(engine, trained), lp_before)


@pytest.mark.parametrize(
    "step, message",
    [(AdamStep(learning_rate=-1e-4), "learning_rate must be finite and >= 0"),
     (AdamStep(beta1=1.0), r"beta1 must be finite and >= 0 and < 1"),
     (AdamStep(eps=0.0), "eps must be finite and > 0")],
)
def test_adam_params_out_of_range_are_refused(engine, trained, step, message):
    with pytest.raises(UserError, match=message):
        engine.optim_step(trained, step)


@pytest.mark.parametrize(
    "loss_fn, inputs, config, message",
    [("cross_entropy", {"weights": np.full(5, v, np.float32)}, {}, "'weights'.* non-finite") for v in NON_FINITE]
    + [(loss, _rl_inputs(**{name: v}), {}, f"'{name}'.* non-finite")
       for loss in ("importance_sampling", "ppo", "dro") for name in ("logprobs", "advantages") for v in NON_FINITE]
    + [("dro", _rl_inputs(), {"beta": v}, "beta.* must be finite") for v in NON_FINITE]
    + [("ppo", _rl_inputs(), {key: v}, f"{key}.* must be finite")
       for key in ("clip_low_threshold", "clip_high_threshold") for v in NON_FINITE]
    + [("dro", _rl_inputs(), {"beta": -0.5}, "beta.* must be finite and >= 0")],
)
def test_non_finite_loss_inputs_and_config_are_refused(engine, trained, loss_fn, inputs, config, message):
    before = _state(engine, trained)
    with pytest.raises((UserError, LossConfigError), match=message):
        engine.forward_backward(_fb(trained, loss_fn, inputs, config))
    _assert_same_state(before, _state(engine, trained))


@pytest.mark.parametrize("weight", [1e36, 3e38])
def test_a_forward_backward_whose_loss_overflows_is_refused_and_leaves_no_gradient(engine, trained, weight):
    """Finite inputs whose loss or gradients overflow float32: refused, nothing accumulated."""
    engine.forward_backward(_fb(trained, "cross_entropy", {"weights": np.ones(5, np.float32)})).result()
    before, lp_before = _state(engine, trained), _logprobs(engine, trained)
    assert any(g is not None for g in before[2])  # there are accumulated gradients to keep
    with pytest.raises(UserError, match="forward_backward refused: its loss or gradients are not finite"):
        engine.forward_backward(_fb(trained, "cross_entropy", {"weights": np.full(5, weight, np.float32)})).result()
    _assert_same_state(before, _state(engine, trained))
    np.testing.assert_array_equal(_logprobs(engine, trained), lp_before)
    assert np.isfinite(engine.optim_step(trained, AdamStep(learning_rate=1e-3)).result()["grad_norm:mean"])


def test_a_step_that_would_overflow_the_optimizer_is_refused_and_the_adapter_restored(engine, trained):
    """Weights of 1e30 give finite losses and gradients whose squares overflow Adam's second moment."""
    out = engine.forward_backward(_fb(trained, "cross_entropy", {"weights": np.full(5, 1e30, np.float32)})).result()
    assert math.isfinite(out.metrics["loss:sum"])
    before, lp_before = _state(engine, trained), _logprobs(engine, trained)
    with pytest.raises(UserError, match="optim_step refused: it would make the adapter non-finite"):
        engine.optim_step(trained, AdamStep(learning_rate=1e-3)).result()
    after = _state(engine, trained)
    _assert_same_state(before, after, grads=False)
    assert all(g is None for g in after[2])  # the overflowing gradients were discarded, so training can go on
    np.testing.assert_array_equal(_logprobs(engine, trained), lp_before)
    engine.forward_backward(_fb(trained, "cross_entropy", {"weights": np.ones(5, np.float32)})).result()
    metrics = engine.optim_step(trained, AdamStep(learning_rate=1e-3)).result()
    assert np.isfinite(metrics["grad_norm:mean"]) and not np.array_equal(_logprobs(engine, trained), lp_before)


def test_a_huge_learning_rate_that_would_overflow_the_weights_is_refused(engine, trained):
    engine.forward_backward(_fb(trained, "cross_entropy", {"weights": np.ones(5, np.float32)})).result()
    before = _state(engine, trained)
    with pytest.raises(UserError, match="optim_step refused"):
        engine.optim_step(trained, AdamStep(learning_rate=3e38, weight_decay=10.0)).result()
    _assert_same_state(before, _state(engine, trained), grads=False)


def test_an_overflowing_request_merged_with_a_good_one_fails_alone(engine, monkeypatch):
    engine.create_model("merged-fb", "s", LoraSpec(rank=4, seed=3), {}).result()
    engine.create_model("alone-fb", "s", LoraSpec(rank=4, seed=3), {}).result()
    good = _fb("merged-fb", "cross_entropy", {"weights": np.ones(5, np.float32)})
    bad = _fb("merged-fb", "cross_entropy", {"weights": np.full(5, 3e38, np.float32)})
    expected = engine.forward_backward(ForwardBackwardIn("alone-fb", 0, "cross_entropy", {}, False, good.data)).result()
    sizes = _spy(engine, "_forward_backward", monkeypatch)
    release = _hold_worker(engine)
    futures = [engine.forward_backward(good), engine.forward_backward(bad), engine.forward_backward(good)]
    release.set()
    with pytest.raises(UserError, match="not finite"):
        futures[1].result()
    assert sizes == [3, 1, 1, 1]  # merged into one pass, which failed, then each request on its own
    for future in (futures[0], futures[2]):
        out = future.result()
        np.testing.assert_allclose(out.outputs[0]["logprobs"], expected.outputs[0]["logprobs"], atol=1e-5)
        assert out.metrics["loss:sum"] == pytest.approx(expected.metrics["loss:sum"], rel=1e-5)
    # Exactly the two good requests' gradients were accumulated: the same step as two sequential good requests.
    engine.forward_backward(ForwardBackwardIn("alone-fb", 0, "cross_entropy", {}, False, good.data)).result()
    a = engine.optim_step("merged-fb", AdamStep(learning_rate=1e-2)).result()
    b = engine.optim_step("alone-fb", AdamStep(learning_rate=1e-2)).result()
    assert a["grad_norm:mean"] == pytest.approx(b["grad_norm:mean"], rel=1e-4)


# ----------------------------------------------------------------------- sampling, in the engine
def _task(prompt=(2, 10, 11), n=1, logprobs=False, **spec) -> SampleTask:
    return SampleTask(tuple(prompt), n, SamplingSpec(**{"max_tokens": 4, "seed": 0, **spec}), logprobs)


@pytest.mark.parametrize(
    "spec, message",
    [({"temperature": v}, "temperature must be finite") for v in NON_FINITE]
    + [({"top_p": v}, "top_p must be finite") for v in NON_FINITE]
    + [({"temperature": -1.0}, "temperature must be finite and >= 0"), ({"top_p": 0.0}, "top_p must be finite and > 0")]
    + [({"seed": s}, r"seed must be an integer in \[-9223372036854775808, 9223372036854775807\]")
       for s in (2**63, -(2**63) - 1, 2**70)]
    + [({"max_tokens": -1}, "max_tokens must be an integer in")],
)
def test_bad_sampling_numbers_are_refused(engine, spec, message):
    with pytest.raises(UserError, match=message):
        engine.sample(engine.snapshot(BASE_SNAPSHOT), _task(**spec))


def test_stop_sequences_are_bounded_and_refused_at_once(engine):
    base = engine.snapshot(BASE_SNAPSHOT)
    started = time.perf_counter()
    with pytest.raises(UserError, match="has 1000 stop strings; at most 16 are accepted"):
        engine.sample(base, _task(stop_strings=tuple(f"stop{i}" for i in range(1000))))
    with pytest.raises(UserError, match="has 1000 stop token ids; at most 16"):
        engine.sample(base, _task(stop_token_ids=frozenset(range(1000))))
    with pytest.raises(UserError, match="257-character stop string; at most 256"):
        engine.sample(base, _task(stop_strings=("x" * 257,)))
    assert time.perf_counter() - started < 1.0
    sixteen = tuple(f"never-{i}-" + "y" * 200 for i in range(16))
    out = engine.sample(base, _task(stop_strings=sixteen, max_tokens=8)).result()
    assert len(out.sequences[0].tokens) == 8 and out.sequences[0].stop_reason == "length"


def test_an_oversized_prompt_is_refused_whatever_max_tokens_says(engine):
    base = engine.snapshot(BASE_SNAPSHOT)
    prompt = [2] + [10] * (4 * engine.max_seq_len - 1)
    # The SDK's default (no max_tokens) resolves to context minus prompt: negative here.
    for max_tokens in (engine.max_seq_len - len(prompt), 0, 1):
        with pytest.raises(TooLarge, match=f"the prompt has {len(prompt)} tokens; the context, prompt included, is 2048"):
            engine.sample(base, _task(prompt, max_tokens=max_tokens))
    with pytest.raises(TooLarge, match="plus max_tokens"):
        engine.sample(base, _task([2] * 2040, max_tokens=9))
    assert len(engine.sample(base, _task([2] * 2040, max_tokens=8)).result().sequences[0].tokens) == 8


def test_requests_that_used_to_break_a_merged_batch_now_succeed_on_their_own_terms(engine, monkeypatch):
    """A seed of 2**62 overflowed the generator and a one-token prompt broke prompt_logprobs, failing the batch."""
    base = engine.snapshot(BASE_SNAPSHOT)
    tasks = [_task(seed=2**62, temperature=1.0), _task(prompt=(2,), logprobs=True), _task((2, 20, 21), n=2, seed=7)]
    alone = [engine.sample(base, t).result() for t in tasks]
    sizes = _spy(engine, "_sample", monkeypatch)
    release = _hold_worker(engine)
    futures = [engine.sample(base, t) for t in tasks]
    release.set()
    together = [f.result() for f in futures]
    assert sizes == [3]  # one merged batch
    for a, b in zip(alone, together):
        assert [s.tokens for s in a.sequences] == [s.tokens for s in b.sequences]
    assert together[1].prompt_logprobs == [None]


def test_a_sample_request_that_fails_inside_a_merged_batch_fails_alone(engine, monkeypatch):
    """Whatever makes one request fail inside the batch, the others merged with it still get their result."""
    base = engine.snapshot(BASE_SNAPSHOT)
    innocent, doomed = _task((2, 30, 31), seed=5), _task((2, 40), seed=6)
    expected = engine.sample(base, innocent).result()
    real = engine._sample

    def fail_on_doomed(snap, tasks):
        if doomed in tasks:
            raise UserError("this request is broken")
        return real(snap, tasks)

    monkeypatch.setattr(engine, "_sample", fail_on_doomed)
    release = _hold_worker(engine)
    futures = [engine.sample(base, innocent), engine.sample(base, doomed)]
    release.set()
    assert [s.tokens for s in futures[0].result().sequences] == [s.tokens for s in expected.sequences]
    with pytest.raises(UserError, match="this request is broken"):
        futures[1].result()


def test_non_finite_weights_give_a_user_error_not_an_unencodable_result(engine):
    engine.create_model("poisoned", "s", LoraSpec(rank=2, seed=0), {}).result()
    tenant = engine.tenant("poisoned")

    def poison() -> str:
        with torch.no_grad():
            for p in tenant.params:
                p.fill_(math.nan)
        return engine.save_for_sampler("poisoned", None, None)

    key = engine._call("poisoned", poison).result().result()
    with pytest.raises(UserError, match="non-finite logits"):
        engine.sample(engine.snapshot(key), _task()).result()
    with pytest.raises(UserError, match="not finite"):
        engine.forward_backward(ForwardBackwardIn("poisoned", 0, "cross_entropy", {}, True, PROBE.data)).result()


# ----------------------------------------------------------------------- through the SDK and raw HTTP
@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, headers={"X-API-Key": server.api_key}, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def tenant(service_client, tiny_model_dir):
    training = service_client.create_lora_training_client(base_model=str(tiny_model_dir), rank=4, seed=0).result()
    training.forward_backward([_sdk_datum()], "cross_entropy").result()
    training.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    return training


def _sdk_datum(weights: list[float] | None = None) -> types.Datum:
    inputs: dict = {"target_tokens": IDS[1:].tolist()}
    if weights is not None:
        inputs["weights"] = weights
    return types.Datum(model_input=types.ModelInput.from_ints(IDS[:-1].tolist()), loss_fn_inputs=inputs)


def _sdk_logprobs(training) -> list[float]:
    return training.forward([_sdk_datum()], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].tolist()


def _post_raw_json(http: httpx.Client, route: str, body: dict) -> httpx.Response:
    """POST ``body`` with NaN and Infinity written as the bare literals Python's JSON parser accepts."""
    return http.post(route, content=json.dumps(body), headers={"Content-Type": "application/json"})


def _assert_user_error(response: httpx.Response, status: int, fragment: str) -> None:
    assert response.status_code == status, response.text
    assert response.json()["category"] == "user" and fragment in response.json()["error"], response.text


@pytest.mark.parametrize("field", ["learning_rate", "beta1", "beta2", "eps", "weight_decay", "grad_clip_norm"])
def test_http_non_finite_adam_params_are_400_and_the_adapter_is_unchanged(http, tenant, field):
    before = _sdk_logprobs(tenant)
    for value in NON_FINITE:
        body = {"model_id": tenant.model_id, "adam_params": {field: value}}
        _assert_user_error(_post_raw_json(http, "/api/v1/optim_step", body), 400, f"adam_params.{field}")
    assert _sdk_logprobs(tenant) == before and all(map(math.isfinite, before))


def test_http_non_finite_metadata_is_400(http):
    for value in NON_FINITE:
        response = _post_raw_json(http, "/api/v1/create_session", {"user_metadata": {"score": [1.0, {"x": value}]}})
        _assert_user_error(response, 400, "user_metadata.score")


def test_sdk_non_finite_and_overflowing_training_is_refused_and_the_adapter_is_unchanged(tenant):
    before = _sdk_logprobs(tenant)
    for field in ("learning_rate", "eps", "weight_decay"):
        for value in NON_FINITE:  # the SDK sends them as null
            with pytest.raises(tinker.BadRequestError, match=f"adam_params.{field}"):
                tenant.optim_step(types.AdamParams(**{field: value})).result()
    with pytest.raises(tinker.BadRequestError, match="non-finite"):
        tenant.forward_backward([_sdk_datum([math.nan] * 5)], "cross_entropy").result()
    with pytest.raises(tinker.BadRequestError, match="beta.* must be finite"):
        datum = types.Datum(
            model_input=types.ModelInput.from_ints(IDS[:-1].tolist()),
            loss_fn_inputs={"target_tokens": IDS[1:].tolist(), "logprobs": [-1.0] * 5, "advantages": [1.0] * 5},
        )
        tenant.forward_backward([datum], "dro", {"beta": math.nan}).result()
    with pytest.raises(tinker.RequestFailedError, match="not finite") as info:
        tenant.forward_backward([_sdk_datum([3e38] * 5)], "cross_entropy").result()
    assert info.value.category == tinker.types.RequestErrorCategory.User
    tenant.forward_backward([_sdk_datum([1e30] * 5)], "cross_entropy").result()
    with pytest.raises(tinker.RequestFailedError, match="optim_step refused"):
        tenant.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    after = _sdk_logprobs(tenant)
    assert after == before and all(map(math.isfinite, after))
    tenant.forward_backward([_sdk_datum()], "cross_entropy").result()
    assert math.isfinite(tenant.optim_step(types.AdamParams(learning_rate=1e-3)).result().metrics["grad_norm:mean"])


def _sample_body(prompt: list[int], **params) -> dict:
    return {
        "num_samples": 1, "prompt": {"chunks": [{"type": "encoded_text", "tokens": prompt}]},
        "sampling_params": params, "base_model": None, "model_path": None,
    }


@pytest.mark.parametrize(
    "params, status, fragment",
    [({"max_tokens": 2, "temperature": v}, 400, "sampling_params.temperature") for v in NON_FINITE]
    + [({"max_tokens": 2, "top_p": v}, 400, "sampling_params.top_p") for v in NON_FINITE]
    + [({"max_tokens": 2, "seed": 2**70}, 400, "sampling_params.seed must be an integer in")]
    + [({"max_tokens": 2, "top_k": k}, 400, "sampling_params.top_k") for k in (2**70, 2**31, -2)]
    + [({"max_tokens": 2, "stop": [f"s{i}" for i in range(1000)]}, 400, "1000 stop strings; at most 16")]
    + [({}, 413, "the prompt has 8192 tokens; the context, prompt included, is 2048")],
)
def test_http_bad_sampling_requests_are_refused_quickly(http, server, tiny_model_dir, params, status, fragment):
    prompt = [2, 10, 11] if params else [2] + [10] * 8191  # the last case: an 8,192-token prompt, no max_tokens
    body = _sample_body(prompt, **params)
    body["base_model"] = str(tiny_model_dir)
    started = time.perf_counter()
    response = _post_raw_json(http, "/api/v1/asample", body)
    assert time.perf_counter() - started < 2.0
    _assert_user_error(response, status, fragment)


@pytest.mark.parametrize(
    "field, value",
    [("prompt_logprobs_last_n", 2**70), ("prompt_logprobs_last_n", 0), ("num_samples", 2**70),
     ("topk_prompt_logprobs", 2**70), ("prompt_logprobs", 2**70)],
)
def test_http_oversized_sample_request_fields_are_400_naming_them(http, tiny_model_dir, field, value):
    body = {**_sample_body([2, 10, 11], max_tokens=2), "base_model": str(tiny_model_dir), "prompt_logprobs": True,
            field: value}
    _assert_user_error(_post_raw_json(http, "/api/v1/asample", body), 400, f"invalid request body: {field}")


def test_sdk_sampling_with_a_huge_seed_and_a_one_token_prompt_works(service_client, tiny_model_dir):
    sampler = service_client.create_sampling_client(base_model=str(tiny_model_dir)).result()
    seeded = [sampler.sample(types.ModelInput.from_ints([2, 10]), 1, types.SamplingParams(max_tokens=3, seed=2**62))
              for _ in range(2)]
    tokens = [f.result().sequences[0].tokens for f in seeded]
    assert tokens[0] == tokens[1] and len(tokens[0]) == 3
    one = sampler.sample(types.ModelInput.from_ints([2]), 1, types.SamplingParams(max_tokens=2), include_prompt_logprobs=True)
    assert one.result().prompt_logprobs == [None]
