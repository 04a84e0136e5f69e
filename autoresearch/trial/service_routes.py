"""The training service's own routes that the tinker SDK has no call for, as plain HTTP requests."""

from __future__ import annotations

import time
from typing import Any

import httpx

PROBE_TIMEOUT_S = 5.0


class TrainingServiceError(RuntimeError):
    """The training service cannot be used: it does not answer, or it refuses the API key. One line, no traceback
    from the SDK: ``run_trial`` raises it before any training starts."""


def check_service(url: str, api_key: str, timeout_s: float = PROBE_TIMEOUT_S, fix: str = "check trainer_url") -> None:
    """Fail within ``timeout_s`` seconds, with one line, unless ``url`` answers and accepts ``api_key``; an
    unreachable service's message ends with ``fix``, what the caller can change (the controller names the
    study file's ``[training] api``).

    The SDK would retry a dead URL for minutes, silently, and a refused key ends in a long traceback. The
    probe is the capabilities route every Tinker-compatible service has, sent with the key: no answer is a
    connection error, 401 or 403 a refused key; any other answer is left for the SDK to judge.
    """
    if not url:
        raise TrainingServiceError("run_trial needs trainer_url, the training service's http(s):// URL "
                                   "(a study with [training] api = \"none\" cannot run it)")
    base = url.rstrip("/")
    try:
        response = httpx.get(f"{base}/api/v1/get_server_capabilities", headers={"X-API-Key": api_key}, timeout=timeout_s)
    except httpx.TransportError as error:
        raise TrainingServiceError(f"the training service at {url} is not reachable within {timeout_s:g} s "
                                   f"({type(error).__name__}: {error or 'no answer'}); {fix}") from None
    if response.status_code in (401, 403):
        try:
            detail = response.json().get("detail") or response.json().get("error")
        except ValueError:
            detail = response.text[:200]
        raise TrainingServiceError(f"the training service at {url} refused the API key "
                                   f"(HTTP {response.status_code}: {detail}); pass api_key=... or fix [training] api_key")


def device_usage(url: str, api_key: str, model_id: str) -> dict[str, Any]:
    """``device`` (cpu, cuda) and ``device_seconds`` spent on this adapter (training, and sampling its weights).

    Our service's own route; another Tinker-compatible service may lack it,
    and then both are None; so are they when the service cannot be asked
    (this runs while a failure is being handled).
    """
    try:
        response = httpx.get(f"{url}/api/v1/training_runs/{model_id}/device_usage",
                             headers={"X-API-Key": api_key}, timeout=30)
    except httpx.HTTPError:
        return {"device": None, "device_seconds": None}
    found = response.json() if response.status_code == 200 else {}
    return {"device": found.get("device"), "device_seconds": found.get("device_seconds")}


def unload_model(url: str, api_key: str, model_id: str) -> None:
    """Unload the adapter and its optimizer state from the shared service (its saved checkpoint stays).

    The service's ``unload_model`` request, polled like any other future; a
    long study would otherwise keep every finished trial's adapter in GPU memory.
    """
    with httpx.Client(base_url=url, headers={"X-API-Key": api_key}, timeout=30) as http:
        response = http.post("/api/v1/unload_model", json={"model_id": model_id})
        response.raise_for_status()
        request = {"request_id": response.json()["request_id"]}
        while http.post("/api/v1/retrieve_future", json=request).json().get("type") == "try_again":
            time.sleep(0.1)
