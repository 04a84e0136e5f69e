"""The checkpoint store on a local directory and on an fsspec URL (memory://)."""

from __future__ import annotations

import uuid

import pytest

torch = pytest.importorskip("torch")

from trainer_api.checkpoints import (  # noqa: E402
    CheckpointError,
    CheckpointNotFound,
    CheckpointStore,
    age_recipients,
    checkpoint_ref,
    parse_path,
)


@pytest.fixture(params=["local", "memory"])
def store(request, tmp_path) -> CheckpointStore:
    root = str(tmp_path / "ckpt") if request.param == "local" else f"memory://ckpt-{uuid.uuid4().hex}"
    return CheckpointStore(root)


def _adapter() -> dict[str, torch.Tensor]:
    return {"layer.lora_A.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3)}


def test_round_trip_with_optimizer_and_listing(store):
    opt_state = {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    ref = checkpoint_ref("run-1", "weights", "step-3")
    assert store.save(ref, _adapter(), {"base_model": "m", "lora": {"rank": 2}}, opt_state) == "tinker://run-1/weights/step-3"
    loaded = store.load(parse_path("tinker://run-1/weights/step-3"), with_optimizer=True)
    assert torch.equal(loaded.adapter["layer.lora_A.weight"], _adapter()["layer.lora_A.weight"])
    assert loaded.optimizer["param_groups"][0]["lr"] == 0.1 and loaded.meta["lora"] == {"rank": 2}
    store.write_run("run-1", {"training_run_id": "run-1", "created_at": 1.0})
    assert [r["training_run_id"] for r in store.list_runs()] == ["run-1"]
    [listed] = store.list("run-1")
    assert listed["checkpoint_id"] == "weights/step-3" and listed["size_bytes"] > 0
    assert store.read_owner("run-1") is None  # no owner recorded yet: no tenant's run
    store.write_owner("run-1", "tenant-a")
    assert store.read_owner("run-1") == "tenant-a" and store.read_owner("run-2") is None
    with pytest.raises(CheckpointError, match="already exists"):
        store.save(ref, _adapter(), {}, None)
    store.save(ref, _adapter(), {"base_model": "m2"}, None, overwrite=True)
    assert store.load(ref, with_optimizer=False).meta["base_model"] == "m2"
    with pytest.raises(CheckpointError, match="no optimizer state"):
        store.load(ref, with_optimizer=True)


def test_exports_ttl_and_delete(store):
    export = checkpoint_ref("run-2", "external_weights", "peft")
    store.save_external(export, _adapter(), {"r": 2, "target_modules": {"q_proj"}}, {})
    urls = store.files(export)
    assert set(urls) == {"adapter_model.safetensors", "adapter_config.json"}
    assert all(u.startswith(("file://", "memory://")) for u in urls.values())
    with pytest.raises(CheckpointError, match="is an export"):
        store.load(export, with_optimizer=False)
    short = checkpoint_ref("run-2", "sampler_weights", "short")
    store.save(short, _adapter(), {}, None, ttl_seconds=3600)
    assert store.list("run-2")[-1]["expires_at"] is not None
    store.set_ttl(short, None)
    assert all(c["expires_at"] is None for c in store.list("run-2"))
    store.delete(short)
    with pytest.raises(CheckpointNotFound):
        store.load(short, with_optimizer=False)


def test_an_export_is_encrypted_in_place_and_never_left_plain_when_that_fails(store):
    import pyrage

    identity = pyrage.x25519.Identity.generate()
    export = checkpoint_ref("run-3", "external_weights", "sealed")
    store.save_external(export, _adapter(), {"r": 2}, {"base_model": "m"}, ttl_seconds=3600)
    plain = {name: store._read_bytes(store._dir(export) + "/" + name) for name in store.files(export)}
    size = store.encrypt_export(export, age_recipients([str(identity.to_public())]))
    assert set(store.files(export)) == {f"{name}.age" for name in plain} and size == store.size(export)
    for name, data in plain.items():
        assert pyrage.decrypt(store._read_bytes(f"{store._dir(export)}/{name}.age"), [identity]) == data
    [listed] = store.list("run-3")
    assert listed["expires_at"] is not None  # the TTL survives the rewrite

    failing = checkpoint_ref("run-3", "external_weights", "failing")
    store.save_external(failing, _adapter(), {"r": 2}, {})
    with pytest.raises(pyrage.EncryptError):
        store.encrypt_export(failing, [])  # no recipient: age refuses, and the plain export goes
    with pytest.raises(CheckpointNotFound):
        store.files(failing)


@pytest.mark.parametrize("recipients, message", [
    (["age1notakey"], "is not an age recipient"),
    (["ssh-ed25519 AAAAnotakey"], "is not an age recipient"),
    (["x" * 500], r"x{77}\.\.\.' is not"),  # a long one is shortened in the message
])
def test_malformed_age_recipients_are_refused_naming_them(recipients, message):
    with pytest.raises(CheckpointError, match=message):
        age_recipients(recipients)


@pytest.mark.parametrize(
    "path",
    ["tinker://../weights/x", "tinker://run/weights/../../etc", "tinker://run/other/x", "s3://run/weights/x", "tinker://run/weights"],
)
def test_paths_that_could_escape_or_are_malformed_are_rejected(path):
    with pytest.raises(CheckpointError):
        parse_path(path)
