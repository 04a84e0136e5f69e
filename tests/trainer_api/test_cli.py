"""Command-line details: where the API key comes from, and structured logs."""

from __future__ import annotations

import json

import httpx
import pytest

from trainer_api.__main__ import JsonFormatter, resolve_api_key


def test_api_key_comes_from_the_flag_then_the_environment():
    assert resolve_api_key("tml-flag", {"TRAINER_API_KEY": "tml-env"}) == "tml-flag"
    assert resolve_api_key(None, {"TRAINER_API_KEY": "tml-env"}) == "tml-env"
    assert resolve_api_key(None, {}) is None
    with pytest.raises(ValueError, match="must start with 'tml-'"):
        resolve_api_key("secret", {})


def test_server_logs_are_one_json_object_per_line(server):
    httpx.get(f"{server.base_url}/api/v1/healthz")
    entries = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    requests = [e for e in entries if e.get("msg") == "request"]
    assert requests, "no request log lines"
    assert {"method", "path", "status", "ms", "ts", "level"} <= set(requests[-1])
    assert any(e.get("msg") == "engine ready" for e in entries)


def test_json_formatter_keeps_extra_fields():
    import logging

    record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello %s", ("world",), None)
    record.model_id = "m1"
    entry = json.loads(JsonFormatter().format(record))
    assert entry["msg"] == "hello world" and entry["model_id"] == "m1" and entry["level"] == "INFO"
