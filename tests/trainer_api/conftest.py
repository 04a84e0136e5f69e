"""Shared fixtures: a tiny model on disk and real ``python -m trainer_api serve`` processes."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("tinker")

from trainer_api.process import ServiceProcess, start_service  # noqa: E402

API_KEY = "tml-test-key"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: starts extra service processes (still part of the default run)")


def start_server(model_dir: Path, checkpoint_root: Path, log_path: Path, sampler: str = "torch") -> ServiceProcess:
    """The service as the tests run it: API key enforced; the torch sampler unless a test is about vLLM
    (tests/trainer_api/test_sampling_backends.py runs the sampling tests on both)."""
    return start_service(model_dir, checkpoint_root, log_path, api_key=API_KEY, sampler=sampler, timeout=240.0)


@pytest.fixture()
def server_factory():
    """Start extra service processes inside a test; all are stopped at its end."""
    started: list[ServiceProcess] = []

    def start(model_dir: Path, checkpoint_root: Path, log_path: Path) -> ServiceProcess:
        started.append(start_server(model_dir, checkpoint_root, log_path))
        return started[-1]

    yield start
    for srv in started:
        if srv.proc.poll() is None:
            srv.stop()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trainer_api.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-gemma"))


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """One shared service process per test module."""
    root = tmp_path_factory.mktemp("ckpt")
    srv = start_server(tiny_model_dir, root, root / "server.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def service_client(server: ServiceProcess):
    import tinker

    return tinker.ServiceClient(base_url=server.base_url, api_key=server.api_key)


@pytest.fixture(scope="module")
def base_model(tiny_model_dir: Path) -> str:
    return str(tiny_model_dir)


@pytest.fixture(scope="module")
def tokenizer(service_client, base_model: str):
    return service_client.create_lora_training_client(base_model=base_model, rank=2).result().get_tokenizer()
