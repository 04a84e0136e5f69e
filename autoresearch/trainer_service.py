"""Start the study's own training service when ``training.api = "local"``.

The controller talks to ``trainer_api`` over HTTP only (through the tinker
SDK), so it starts the service as a command, ``python -m trainer_api serve``,
exactly as a user would; all trials of the study share this one process (one
base model, one LoRA adapter per trial).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from trainer_api.process import free_port, popen_service, stop_service  # no torch: the core install can import it

from .spec import StudySpec

PROJECT_ROOT = Path(__file__).resolve().parents[1]


class TrainerStartError(RuntimeError):
    """The local training service did not start (the message says where its log is)."""


@dataclass
class TrainerService:
    proc: subprocess.Popen
    url: str

    def stop(self) -> None:
        """SIGTERM the service and its children (vLLM's engine), SIGKILL them if they linger."""
        stop_service(self.proc)


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "trainer_api", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))}


def base_model_path(spec: StudySpec) -> str:
    """``tiny`` means a small random Gemma written once into the run folder; anything else is an id or directory.

    The folder is named by the model's size, so a study file whose ``[training.tiny_model]`` changed gets
    a new model instead of silently serving the old one."""
    if spec.training.base_model != "tiny":
        return spec.training.base_model
    size = spec.training.tiny_model
    folder = spec.run_folder / f"tiny-model-h{size.hidden_size}-l{size.num_layers}"
    if not (folder / "config.json").exists():
        made = subprocess.run(_command("make-tiny-model", str(folder), "--hidden-size", str(size.hidden_size),
                                       "--num-layers", str(size.num_layers)), env=_env(), capture_output=True, text=True)
        if made.returncode != 0:
            last = (made.stderr.strip().splitlines() or ["no output"])[-1]
            raise TrainerStartError(f"python -m trainer_api make-tiny-model failed: {last}")
    return str(folder)


def start_trainer(spec: StudySpec) -> TrainerService:
    """Start ``python -m trainer_api serve`` on a free port and wait until it answers its health check."""
    port = free_port()
    log_path = spec.run_folder / "trainer.log"
    # --exit-with-parent: a controller killed with SIGKILL cannot stop the service, so the service watches for that.
    cmd = _command("serve", "--base-model", base_model_path(spec), "--port", str(port),
                   "--checkpoint-root", str(spec.run_folder / "checkpoints"), "--exit-with-parent")
    if spec.training.device:
        cmd += ["--device", spec.training.device]
    if spec.training.sampler:
        cmd += ["--sampler", spec.training.sampler]
    # The key goes in the environment: a command line is visible to every user of the machine.
    env = {**_env(), "TRAINER_API_KEY": spec.training.api_key}
    with open(log_path, "ab") as log:
        proc = popen_service(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    service = TrainerService(proc, f"http://127.0.0.1:{port}")
    deadline = time.monotonic() + spec.training.startup_timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise TrainerStartError(f"the training service exited with code {proc.returncode}; see {log_path}")
        try:
            if httpx.get(f"{service.url}/api/v1/healthz", timeout=1).status_code == 200:
                return service
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    service.stop()
    raise TrainerStartError(f"the training service did not answer within {spec.training.startup_timeout_s:.0f} s; see {log_path}")
