"""Compatibility report: call every public method of the SDK's client classes against the service.

``python -m trainer_api compat-report`` starts a service on a tiny model, calls each
public method of ServiceClient, TrainingClient, SamplingClient and RestClient with
small arguments, and writes a Markdown table saying which work and, for the rest,
the error the SDK raised. The list of methods comes from the installed SDK by
introspection, so a newer SDK's additions show up as "no call written".
"""

from __future__ import annotations

import asyncio
import inspect
import re
import tempfile
import traceback
import warnings
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

CLASSES = ("ServiceClient", "TrainingClient", "SamplingClient", "RestClient")
API_KEY = "tml-compat-report"


@dataclass
class Outcome:
    method: str
    supported: bool
    note: str


class _Ctx:
    """Clients and small arguments shared by the calls."""

    def __init__(self, base_url: str, base_model: str, api_key: str) -> None:
        import tinker
        from tinker import types

        self.types = types
        self.base_model = base_model
        self.api_key = api_key
        self.sc = tinker.ServiceClient(base_url=base_url, api_key=api_key)
        self.rest = tinker.RestClient(base_url=base_url, api_key=api_key)
        self.tc = self.sc.create_lora_training_client(base_model=base_model, rank=4, seed=0).result()
        self.tokenizer = self.tc.get_tokenizer()
        ids = self.tokenizer.encode("SELECT name FROM users;")
        self.datum = types.Datum(
            model_input=types.ModelInput.from_ints(ids[:-1]),
            loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)},
        )
        self.prompt = types.ModelInput.from_ints(ids[:4])
        self.params = types.SamplingParams(max_tokens=4, seed=0)
        self.state_path = self.tc.save_state("compat-state").result().path
        self.sampler_path = self.tc.save_weights_for_sampler("compat-sampler").result().path
        self.sampler = self.sc.create_sampling_client(model_path=self.sampler_path).result()
        self.run_id = self.tc.model_id
        self.session_id = self.tc.holder.get_session_id()
        self.counter = 0

    def name(self, stem: str) -> str:
        self.counter += 1
        return f"{stem}-{self.counter}"

    def export(self) -> str:
        return self.tc.save_weights_external(self.name("external")).result().path

    def custom_loss(self, data, logprobs_list):
        import torch

        loss = -torch.stack([lp.sum() for lp in logprobs_list]).sum()
        return loss, {"custom:sum": float(loss)}


def _calls(c: _Ctx) -> dict[str, Callable[[], Any]]:
    t = c.types
    now = datetime.now(timezone.utc)
    return {
        # ServiceClient
        "ServiceClient.close": lambda: __import__("tinker").ServiceClient(base_url=c.sc._base_url, api_key=c.api_key).close("success"),
        "ServiceClient.copy_weights": lambda: c.sc.copy_weights(c.state_path),
        "ServiceClient.create_custom_loss": lambda: c.sc.create_custom_loss(
            lambda logprobs, weights: (-(logprobs * weights).sum(), {}), {"logprobs": 1, "weights": 1}
        ),
        "ServiceClient.create_lora_training_client": lambda: c.sc.create_lora_training_client(base_model=c.base_model, rank=2),
        "ServiceClient.create_lora_training_client_async": lambda: c.sc.create_lora_training_client_async(base_model=c.base_model, rank=2),
        "ServiceClient.create_rest_client": lambda: c.sc.create_rest_client().get_server_capabilities(),
        "ServiceClient.create_sampling_client": lambda: c.sc.create_sampling_client(base_model=c.base_model),
        "ServiceClient.create_sampling_client_async": lambda: c.sc.create_sampling_client_async(model_path=c.sampler_path),
        "ServiceClient.create_training_client_from_state": lambda: c.sc.create_training_client_from_state(c.state_path),
        "ServiceClient.create_training_client_from_state_async": lambda: c.sc.create_training_client_from_state_async(c.state_path),
        "ServiceClient.create_training_client_from_state_with_optimizer": lambda: c.sc.create_training_client_from_state_with_optimizer(c.state_path),
        "ServiceClient.create_training_client_from_state_with_optimizer_async": lambda: c.sc.create_training_client_from_state_with_optimizer_async(c.state_path),
        "ServiceClient.get_console_url": lambda: c.sc.get_console_url(),
        "ServiceClient.get_server_capabilities": lambda: c.sc.get_server_capabilities(),
        "ServiceClient.get_server_capabilities_async": lambda: c.sc.get_server_capabilities_async(),
        "ServiceClient.get_telemetry": lambda: c.sc.get_telemetry(),
        "ServiceClient.holder": lambda: c.sc.holder.get_session_id(),
        # TrainingClient
        "TrainingClient.create_sampling_client": lambda: c.tc.create_sampling_client(c.sampler_path),
        "TrainingClient.create_sampling_client_async": lambda: c.tc.create_sampling_client_async(c.sampler_path),
        "TrainingClient.forward": lambda: c.tc.forward([c.datum], "cross_entropy"),
        "TrainingClient.forward_async": lambda: c.tc.forward_async([c.datum], "cross_entropy"),
        "TrainingClient.forward_backward": lambda: c.tc.forward_backward([c.datum], "cross_entropy"),
        "TrainingClient.forward_backward_async": lambda: c.tc.forward_backward_async([c.datum], "cross_entropy"),
        "TrainingClient.forward_backward_custom": lambda: c.tc.forward_backward_custom([c.datum], c.custom_loss),
        "TrainingClient.forward_backward_custom_async": lambda: c.tc.forward_backward_custom_async([c.datum], c.custom_loss),
        "TrainingClient.get_console_url": lambda: c.tc.get_console_url(),
        "TrainingClient.get_info": lambda: c.tc.get_info(),
        "TrainingClient.get_info_async": lambda: c.tc.get_info_async(),
        "TrainingClient.get_telemetry": lambda: c.tc.get_telemetry(),
        "TrainingClient.get_tokenizer": lambda: c.tc.get_tokenizer(),
        "TrainingClient.load_state": lambda: c.tc.load_state(c.state_path),
        "TrainingClient.load_state_async": lambda: c.tc.load_state_async(c.state_path),
        "TrainingClient.load_state_with_optimizer": lambda: c.tc.load_state_with_optimizer(c.state_path),
        "TrainingClient.load_state_with_optimizer_async": lambda: c.tc.load_state_with_optimizer_async(c.state_path),
        "TrainingClient.optim_step": lambda: c.tc.optim_step(t.AdamParams(learning_rate=1e-4)),
        "TrainingClient.optim_step_async": lambda: c.tc.optim_step_async(t.AdamParams(learning_rate=1e-4)),
        "TrainingClient.save_state": lambda: c.tc.save_state(c.name("state")),
        "TrainingClient.save_state_async": lambda: c.tc.save_state_async(c.name("state")),
        "TrainingClient.save_weights_and_get_sampling_client": lambda: c.tc.save_weights_and_get_sampling_client(),
        "TrainingClient.save_weights_and_get_sampling_client_async": lambda: c.tc.save_weights_and_get_sampling_client_async(),
        "TrainingClient.save_weights_external": lambda: c.tc.save_weights_external(c.name("external")),
        "TrainingClient.save_weights_external_async": lambda: c.tc.save_weights_external_async(c.name("external")),
        "TrainingClient.save_weights_for_sampler": lambda: c.tc.save_weights_for_sampler(c.name("sampler")),
        "TrainingClient.save_weights_for_sampler_async": lambda: c.tc.save_weights_for_sampler_async(c.name("sampler")),
        # SamplingClient
        "SamplingClient.compute_logprobs": lambda: c.sampler.compute_logprobs(c.prompt),
        "SamplingClient.compute_logprobs_async": lambda: c.sampler.compute_logprobs_async(c.prompt),
        "SamplingClient.create": lambda: __import__("tinker").SamplingClient.create(c.tc.holder, model_path=c.sampler_path),
        "SamplingClient.from_sampler_handle": lambda: __import__("tinker").SamplingClient.from_sampler_handle(
            c.sampler.get_sampler_handle(), api_key=c.api_key
        ).sample(c.prompt, 1, c.params),
        "SamplingClient.get_base_model": lambda: c.sampler.get_base_model(),
        "SamplingClient.get_base_model_async": lambda: c.sampler.get_base_model_async(),
        "SamplingClient.get_sampler_handle": lambda: c.sampler.get_sampler_handle(),
        "SamplingClient.get_telemetry": lambda: c.sampler.get_telemetry(),
        "SamplingClient.get_tokenizer": lambda: c.sampler.get_tokenizer(),
        "SamplingClient.on_queue_state_change": lambda: c.sampler.on_queue_state_change(
            __import__("tinker.lib.api_future_impl", fromlist=["QueueState"]).QueueState.ACTIVE, None
        ),
        "SamplingClient.sample": lambda: c.sampler.sample(c.prompt, 2, c.params),
        "SamplingClient.sample_async": lambda: c.sampler.sample_async(c.prompt, 1, c.params),
        # RestClient
        "RestClient.assign_session_project": lambda: c.rest.assign_session_project(c.session_id, "project-1"),
        "RestClient.assign_session_project_async": lambda: c.rest.assign_session_project_async(c.session_id, "project-1"),
        "RestClient.copy_weights": lambda: c.rest.copy_weights(c.state_path, "project-1"),
        "RestClient.copy_weights_async": lambda: c.rest.copy_weights_async(c.state_path, "project-1"),
        "RestClient.delete_checkpoint": lambda: c.rest.delete_checkpoint(c.run_id, "weights/" + c.tc.save_state(c.name("del")).result().path.rsplit("/", 1)[1]),
        "RestClient.delete_checkpoint_async": lambda: c.rest.delete_checkpoint_async(c.run_id, "weights/" + c.tc.save_state(c.name("del")).result().path.rsplit("/", 1)[1]),
        "RestClient.delete_checkpoint_from_tinker_path": lambda: c.rest.delete_checkpoint_from_tinker_path(c.tc.save_state(c.name("del")).result().path),
        "RestClient.delete_checkpoint_from_tinker_path_async": lambda: c.rest.delete_checkpoint_from_tinker_path_async(c.tc.save_state(c.name("del")).result().path),
        "RestClient.export_session_trace": lambda: c.rest.export_session_trace(c.session_id),
        "RestClient.export_session_trace_async": lambda: c.rest.export_session_trace_async(c.session_id),
        "RestClient.get_audit_log": lambda: c.rest.get_audit_log(),
        "RestClient.get_audit_log_async": lambda: c.rest.get_audit_log_async(),
        "RestClient.get_billing_usage": lambda: c.rest.get_billing_usage(now - timedelta(days=1), now),
        "RestClient.get_billing_usage_async": lambda: c.rest.get_billing_usage_async(now - timedelta(days=1), now),
        "RestClient.get_current_checkpoint_storage_usage": lambda: c.rest.get_current_checkpoint_storage_usage(),
        "RestClient.get_current_checkpoint_storage_usage_async": lambda: c.rest.get_current_checkpoint_storage_usage_async(),
        "RestClient.get_external_weights_urls": lambda: c.rest.get_external_weights_urls(c.export()),
        "RestClient.get_external_weights_urls_async": lambda: c.rest.get_external_weights_urls_async(c.export()),
        "RestClient.get_sampler": lambda: c.rest.get_sampler(c.sampler._sampling_session_id),
        "RestClient.get_sampler_async": lambda: c.rest.get_sampler_async(c.sampler._sampling_session_id),
        "RestClient.get_server_capabilities": lambda: c.rest.get_server_capabilities(),
        "RestClient.get_session": lambda: c.rest.get_session(c.session_id),
        "RestClient.get_session_async": lambda: c.rest.get_session_async(c.session_id),
        "RestClient.get_telemetry": lambda: c.rest.get_telemetry(),
        "RestClient.get_training_run": lambda: c.rest.get_training_run(c.run_id),
        "RestClient.get_training_run_async": lambda: c.rest.get_training_run_async(c.run_id),
        "RestClient.get_training_run_by_tinker_path": lambda: c.rest.get_training_run_by_tinker_path(c.state_path),
        "RestClient.get_training_run_by_tinker_path_async": lambda: c.rest.get_training_run_by_tinker_path_async(c.state_path),
        "RestClient.get_weights_info_by_tinker_path": lambda: c.rest.get_weights_info_by_tinker_path(c.state_path),
        "RestClient.list_checkpoints": lambda: c.rest.list_checkpoints(c.run_id),
        "RestClient.list_checkpoints_async": lambda: c.rest.list_checkpoints_async(c.run_id),
        "RestClient.list_sessions": lambda: c.rest.list_sessions(),
        "RestClient.list_sessions_async": lambda: c.rest.list_sessions_async(),
        "RestClient.list_training_runs": lambda: c.rest.list_training_runs(),
        "RestClient.list_training_runs_async": lambda: c.rest.list_training_runs_async(),
        "RestClient.list_user_checkpoints": lambda: c.rest.list_user_checkpoints(),
        "RestClient.list_user_checkpoints_async": lambda: c.rest.list_user_checkpoints_async(),
        "RestClient.publish_checkpoint_from_tinker_path": lambda: c.rest.publish_checkpoint_from_tinker_path(c.state_path),
        "RestClient.publish_checkpoint_from_tinker_path_async": lambda: c.rest.publish_checkpoint_from_tinker_path_async(c.state_path),
        "RestClient.search_sessions": lambda: c.rest.search_sessions(t.SessionSearchRequest()),
        "RestClient.set_checkpoint_ttl_from_tinker_path": lambda: c.rest.set_checkpoint_ttl_from_tinker_path(c.state_path, 7200),
        "RestClient.set_checkpoint_ttl_from_tinker_path_async": lambda: c.rest.set_checkpoint_ttl_from_tinker_path_async(c.state_path, 7200),
        "RestClient.unpublish_checkpoint_from_tinker_path": lambda: c.rest.unpublish_checkpoint_from_tinker_path(c.state_path),
        "RestClient.unpublish_checkpoint_from_tinker_path_async": lambda: c.rest.unpublish_checkpoint_from_tinker_path_async(c.state_path),
        "RestClient.whoami": lambda: c.rest.whoami(),
    }


def public_methods() -> list[str]:
    """Qualified names of the public methods (and properties) of the four client classes."""
    import tinker

    names = []
    for cls_name in CLASSES:
        cls = getattr(tinker, cls_name)
        for name, member in inspect.getmembers(cls):
            if not name.startswith("_") and (inspect.isfunction(member) or isinstance(member, property)):
                names.append(f"{cls_name}.{name}")
    return names


async def _await_all(value: Any) -> Any:
    while inspect.isawaitable(value):
        value = await value
    return value


def _resolve(value: Any, timeout: float) -> Any:
    """Wait for whatever the call returned: a coroutine, a future, or a plain value."""
    if inspect.iscoroutine(value):
        return asyncio.run(asyncio.wait_for(_await_all(value), timeout))
    if hasattr(value, "result") and callable(value.result) and not isinstance(value, type):
        return _resolve(value.result(timeout=timeout), timeout)
    return value


def _summary(exc: BaseException) -> str:
    """The server's own message where there is one, else the SDK's exception text."""
    body = getattr(exc, "body", None)
    if isinstance(body, dict) and "error" in body:
        return f"HTTP {getattr(exc, 'status_code', '?')}: {body['error']}"
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:220]}"


def run_calls(base_url: str, base_model: str, api_key: str = API_KEY, timeout: float = 60.0) -> list[Outcome]:
    """Call every public SDK method once; an exception marks the method unsupported."""
    ctx = _Ctx(base_url, base_model, api_key)
    calls = _calls(ctx)
    outcomes = []
    for method in public_methods():
        call = calls.get(method)
        if call is None:
            outcomes.append(Outcome(method, False, "no call written for this method (new in this SDK?)"))
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = _resolve(call(), timeout)
        except Exception as exc:  # the report records every failure, whatever its type
            outcomes.append(Outcome(method, False, _summary(exc)))
            continue
        outcomes.append(Outcome(method, True, f"returned {type(result).__name__}"))
    return outcomes


def sampler_backend(base_url: str, api_key: str) -> str:
    """What served the sampling methods, as the service's ``/metrics`` says (``trainer_sampler_info``)."""
    import httpx

    text = httpx.get(f"{base_url}/metrics", headers={"X-API-Key": api_key}, timeout=30).text
    match = re.search(r'^trainer_sampler_info\{backend="(\w+)"\} 1$', text, flags=re.MULTILINE)
    return match.group(1) if match else "unknown (the service does not say)"


def render(outcomes: list[Outcome], sdk_version: str, sampler: str) -> str:
    supported = sum(o.supported for o in outcomes)
    lines = [
        "# trainer_api compatibility with the tinker SDK",
        "",
        f"Generated by `python -m trainer_api compat-report` against tinker SDK {sdk_version}: every public",
        "method of ServiceClient, TrainingClient, SamplingClient and RestClient was called once with small",
        "arguments against a freshly started service on the tiny model. \"Supported\" means the call returned",
        "without error; otherwise the note is the error the SDK raised.",
        "",
        f"The sampling methods were served by the service's **{sampler}** sampler (`--sampler`).",
        "",
        f"**{supported} of {len(outcomes)} methods supported.**",
        "",
        "| Method | Supported | Notes |",
        "| --- | --- | --- |",
    ]
    for o in outcomes:
        note = o.note.replace("|", "\\|")
        lines.append(f"| `{o.method}` | {'yes' if o.supported else 'no'} | {note} |")
    return "\n".join(lines) + "\n"


def write_report(
    output: Path, base_model: str | None = None, base_url: str | None = None, api_key: str = API_KEY
) -> tuple[int, int]:
    """Run the calls (starting a service unless ``base_url`` is given) and write the Markdown report."""
    import tinker

    from .process import start_service
    from .tiny_model import make_tiny_model

    with tempfile.TemporaryDirectory(prefix="trainer-compat-") as tmp:
        service = None
        try:
            if base_url is None:
                base_model = base_model or str(make_tiny_model(Path(tmp) / "tiny"))
                service = start_service(base_model, Path(tmp) / "ckpt", Path(tmp) / "server.log", api_key=api_key)
                base_url = service.base_url
            assert base_model is not None, "base_model is required with base_url"
            outcomes = run_calls(base_url, base_model, api_key)
            sampler = sampler_backend(base_url, api_key)
        except Exception:
            if service is not None:
                traceback.print_exc()
                print(service.log())
            raise
        finally:
            if service is not None:
                service.stop()
    output.write_text(render(outcomes, tinker.__version__, sampler))
    return sum(o.supported for o in outcomes), len(outcomes)
