"""Prometheus text exposition of the service's health: queue depth, throughput, per-run steps.

Service-wide series are aggregates; per-run series cover only the runs passed in
(the caller's own), so one key's scrape does not list another key's runs.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .engine import Engine, Tenant


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(
    engine: Engine, requests: Counter[tuple[str, int]], pending_futures: int, active_sessions: int, runs: list[Tenant]
) -> str:
    """Render metrics in Prometheus text format 0.0.4, with per-run series for ``runs`` (loaded adapters)."""
    lines = [
        "# HELP trainer_sampler_info What serves sample requests (the backend label), always 1.",
        "# TYPE trainer_sampler_info gauge",
        f'trainer_sampler_info{{backend="{engine.sampler}"}} 1',
        "# HELP trainer_queue_depth Jobs waiting for the engine worker.",
        "# TYPE trainer_queue_depth gauge",
        f"trainer_queue_depth {engine.queue_depth()}",
        "# HELP trainer_pending_futures Requests whose result is not ready yet.",
        "# TYPE trainer_pending_futures gauge",
        f"trainer_pending_futures {pending_futures}",
        "# HELP trainer_tokens_per_second Tokens processed per second over the last minute.",
        "# TYPE trainer_tokens_per_second gauge",
        f"trainer_tokens_per_second {engine.tokens_per_second():.3f}",
        "# HELP trainer_tokens_total Tokens processed (training and sampling).",
        "# TYPE trainer_tokens_total counter",
        f"trainer_tokens_total {engine.tokens_total}",
        "# HELP trainer_forward_requests_total forward_backward requests computed.",
        "# TYPE trainer_forward_requests_total counter",
        f"trainer_forward_requests_total {engine.forward_requests}",
        "# HELP trainer_forward_passes_total Model forward passes (requests of one adapter are merged).",
        "# TYPE trainer_forward_passes_total counter",
        f"trainer_forward_passes_total {engine.forward_passes}",
        "# HELP trainer_sample_requests_total Sample requests generated.",
        "# TYPE trainer_sample_requests_total counter",
        f"trainer_sample_requests_total {engine.sample_requests}",
        "# HELP trainer_sample_batches_total Generation batches (queued requests for the same weights are merged).",
        "# TYPE trainer_sample_batches_total counter",
        f"trainer_sample_batches_total {engine.sample_batches}",
        "# HELP trainer_sessions_active SDK sessions with a recent heartbeat that have not finished.",
        "# TYPE trainer_sessions_active gauge",
        f"trainer_sessions_active {active_sessions}",
        "# HELP trainer_tenants Loaded LoRA adapters.",
        "# TYPE trainer_tenants gauge",
        f"trainer_tenants {len(engine.tenants())}",
        "# HELP trainer_tenant_steps_total Optimizer steps per training run.",
        "# TYPE trainer_tenant_steps_total counter",
    ]
    for tenant in runs:
        lines.append(f'trainer_tenant_steps_total{{model_id="{_label(tenant.model_id)}"}} {tenant.steps}')
    lines += [
        "# HELP trainer_tenant_tokens_total Training tokens per training run.",
        "# TYPE trainer_tenant_tokens_total counter",
    ]
    for tenant in runs:
        lines.append(f'trainer_tenant_tokens_total{{model_id="{_label(tenant.model_id)}"}} {tenant.tokens}')
    lines += [
        "# HELP trainer_tenant_device_seconds_total Seconds of device compute per training run (training and sampling its weights).",
        "# TYPE trainer_tenant_device_seconds_total counter",
    ]
    seconds = engine.device_seconds_by_run()
    for tenant in runs:
        lines.append(f'trainer_tenant_device_seconds_total{{model_id="{_label(tenant.model_id)}"}} '
                     f'{seconds.get(tenant.model_id, 0.0):.6f}')
    lines += [
        "# HELP trainer_http_requests_total HTTP requests by route and status.",
        "# TYPE trainer_http_requests_total counter",
    ]
    for (route, status), count in sorted(requests.items()):
        lines.append(f'trainer_http_requests_total{{route="{_label(route)}",status="{status}"}} {count}')
    return "\n".join(lines) + "\n"
