"""Start ``python -m trainer_api serve`` as a child process on a free localhost port.

Tests, the compatibility report and the benchmark all talk to a real server
process, exactly as a trial would; this is the one place that knows how to
launch one and wait for it to become healthy.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

PACKAGE_ROOT = Path(__file__).resolve().parents[1]


def popen_service(cmd: list[str], **kwargs) -> subprocess.Popen:
    """Start a service command in a process group of its own, so that :func:`stop_service` reaches its children."""
    return subprocess.Popen(cmd, start_new_session=True, **kwargs)


def stop_service(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM the service's process group, wait up to ``grace_s``, SIGKILL what is left of it, reap the service.

    The whole group: vLLM's engine processes are the service's children, and a service killed
    before it stops them (or one that took too long to) must not leave them running, holding memory.
    """
    _signal_group(proc, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    _signal_group(proc, signal.SIGKILL)
    proc.wait()


def _signal_group(proc: subprocess.Popen, sig: signal.Signals) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:  # the group is gone already
        pass


def free_port() -> int:
    """A localhost TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServiceProcess:
    """A running service process and how to reach it."""

    proc: subprocess.Popen
    base_url: str
    api_key: str | None
    log_path: Path

    def stop(self) -> None:
        stop_service(self.proc)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_service(
    model_dir: str | Path,
    checkpoint_root: str | Path,
    log_path: str | Path,
    api_key: str | None = None,
    extra_args: tuple[str, ...] = (),
    timeout: float = 120.0,
    sampler: str | None = None,
) -> ServiceProcess:
    """Launch the service and return once ``/api/v1/healthz`` answers (raise with the log if it dies).

    ``api_key`` reaches the service as ``TRAINER_API_KEY`` (keys never go on a command line, which
    ``ps`` shows to every user); without it the service gets no key from this environment either, so
    ``extra_args`` may pass ``--api-keys-file``. ``sampler`` (torch or vllm) is the service's default when None.
    """
    port = free_port()
    cmd = [sys.executable, "-m", "trainer_api", "serve", "--base-model", str(model_dir),
           "--port", str(port), "--checkpoint-root", str(checkpoint_root), *extra_args]
    if sampler is not None:
        cmd += ["--sampler", sampler]
    env = {k: v for k, v in os.environ.items() if k != "TRAINER_API_KEY"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")]))
    if api_key:
        env["TRAINER_API_KEY"] = api_key
    log_path = Path(log_path)
    with open(log_path, "w") as log_file:
        proc = popen_service(cmd, cwd=PACKAGE_ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the service exited early:\n{log_path.read_text()}")
        try:
            if httpx.get(f"{base_url}/api/v1/healthz", timeout=1).status_code == 200:
                return ServiceProcess(proc, base_url, api_key, log_path)
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop_service(proc, grace_s=0)
    raise RuntimeError(f"the service did not become healthy in {timeout:.0f} s:\n{log_path.read_text()}")
