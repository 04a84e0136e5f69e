"""Command-line details: where the API key comes from, and structured logs."""

from __future__ import annotations

import json
import re

import httpx
import pytest

from trainer_api.__main__ import JsonFormatter, main
from trainer_api.tenants import (
    ANONYMOUS,
    KeyConfigError,
    Unauthorized,
    check_exposure,
    fingerprint,
    load_keyring,
)


def test_keys_come_from_the_keys_file_or_the_environment(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# researchers\n\ntml-alice-key alice\n   tml-bob-key\n  # old: tml-gone\n")
    ring = load_keyring(keys, {})
    assert sorted(t.name for t in ring.tenants) == sorted(["alice", fingerprint("tml-bob-key")])
    assert ring.authenticate("tml-alice-key").id == fingerprint("tml-alice-key") != ring.authenticate("tml-bob-key").id
    with pytest.raises(Unauthorized, match="wrong X-API-Key"):
        ring.authenticate("tml-gone")
    with pytest.raises(Unauthorized, match="missing X-API-Key"):
        ring.authenticate(None)
    env = load_keyring(None, {"TRAINER_API_KEY": "tml-env"})
    assert env.authenticate("tml-env").id == fingerprint("tml-env")
    assert load_keyring(None, {}).authenticate(None) == ANONYMOUS
    with pytest.raises(KeyConfigError, match="not both"):
        load_keyring(keys, {"TRAINER_API_KEY": "tml-env"})


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("tml-a one\ntml-a two\n", "line 2: the same key as line 1"),
        ("tml-a one\ntml-b one\n", "line 2: the name 'one' is already used on line 1"),
        ("secret-key\n", "line 1: an API key must start with 'tml-'"),
        ("tml-a name extra\n", "line 1: expected 'KEY [NAME]'"),
        ("# nothing but comments\n", "has no keys"),
    ],
)
def test_a_bad_keys_file_is_refused_by_line_without_echoing_the_key(tmp_path, text, problem):
    keys = tmp_path / "keys"
    keys.write_text(text)
    with pytest.raises(KeyConfigError, match=re.escape(problem)) as caught:
        load_keyring(keys, {})
    assert "tml-a" not in str(caught.value) and "secret-key" not in str(caught.value)


def test_without_a_key_the_service_stays_on_loopback_unless_told(tmp_path, capsys):
    open_ring, keyed = load_keyring(None, {}), load_keyring(None, {"TRAINER_API_KEY": "tml-env"})
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        check_exposure(host, open_ring, allow_unauthenticated=False)
    for host in ("0.0.0.0", "::", "10.1.2.3", "trainer.example.com"):
        with pytest.raises(KeyConfigError, match="refusing to listen on"):
            check_exposure(host, open_ring, allow_unauthenticated=False)
        check_exposure(host, open_ring, allow_unauthenticated=True)
        check_exposure(host, keyed, allow_unauthenticated=False)
    # Through the command line: one clear line and exit status 2, before any model is loaded.
    code = main(["serve", "--base-model", str(tmp_path / "no-model"), "--host", "0.0.0.0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--allow-unauthenticated" in err[0]


def test_no_flag_takes_a_key_on_the_command_line():
    with pytest.raises(SystemExit):
        main(["serve", "--base-model", "m", "--api-key", "tml-secret"])  # nor taken for --api-keys-file


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


@pytest.mark.parametrize("flags", [["--quota-checkpoints", "-1"], ["--quota-gib", "-2"], ["--quota-gib", "inf"]])
def test_a_negative_or_endless_quota_is_refused_before_the_model_loads(tmp_path, capsys, flags):
    code = main(["serve", "--base-model", str(tmp_path / "no-model"), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--quota-checkpoints and --quota-gib" in err[0]
