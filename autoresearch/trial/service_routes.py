"""The training service's own routes that the tinker SDK has no call for, as plain HTTP requests."""

from __future__ import annotations

import time
from typing import Any

import httpx


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
