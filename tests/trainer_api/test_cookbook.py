"""tinker-cookbook, unmodified, against the service on the tiny model.

Its ``chat_sl`` recipe (renderer ``role_colon``, the wheel's own example conversations) and its ``math_rl``
recipe (``env=arithmetic``) run a few steps each and resume after a simulated crash; ``weights.download``
fetches an export (age-encrypted, as it asks for one) and ``weights.build_hf_model`` merges it into the
tiny model, whose unembedding is tied to its input embedding as in Gemma.

The recipes resolve a tokenizer from the model name; the service's model name is the tiny model's
directory, which the cookbook loads with ``AutoTokenizer`` like any local model, so nothing in the
cookbook is patched. No test here reaches the network: the pricing table the cookbook fetches at start
goes through a proxy that does not exist (and the cookbook carries on without it).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from urllib.request import urlopen

import numpy as np
import pytest

pytest.importorskip("tinker_cookbook", reason="tinker-cookbook is installed apart, with --no-deps (README.md)")

import tinker  # noqa: E402
import tinker_cookbook  # noqa: E402
import torch  # noqa: E402
from tinker_cookbook import weights  # noqa: E402
from tinker_cookbook.recipes.chat_sl import train as chat_sl  # noqa: E402
from tinker_cookbook.recipes.math_rl import train as math_rl  # noqa: E402
from tinker_cookbook.supervised.common import compute_mean_nll  # noqa: E402

from .sdk_helpers import TEXTS, forward_logprobs, sft_datum, train  # noqa: E402

# The cookbook's own call of a method the SDK deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:DEPRECATED. ServiceClient.create_rest_client:FutureWarning")

EXAMPLE_CONVERSATIONS = Path(tinker_cookbook.__file__).parent / "example_data" / "conversations.jsonl"


@pytest.fixture()
def cookbook_env(server, monkeypatch):
    """What a cookbook user sets: the key in ``TINKER_API_KEY``; and the test's own: no way out to the internet."""
    monkeypatch.setenv("TINKER_API_KEY", server.api_key)
    for name in ("https_proxy", "http_proxy", "HTTPS_PROXY", "HTTP_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # the discard port: nothing listens
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    return server


def metrics(log_path: Path) -> list[dict]:
    return [json.loads(line) for line in (log_path / "metrics.jsonl").read_text().splitlines()]


def loaded_checkpoints(server) -> list[str]:
    """The checkpoints the service loaded into an adapter, from its JSON log."""
    records = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    return [r["path"] for r in records if r.get("msg") == "checkpoint loaded"]


def crash_after_first_checkpoint(log_path: Path) -> str:
    """Leave the run's log as a run killed right after its first checkpoint would: only that one recorded."""
    checkpoints = log_path / "checkpoints.jsonl"
    first = checkpoints.read_text().splitlines()[0]
    checkpoints.write_text(first + "\n")
    return json.loads(first)["state_path"]


def test_chat_sl_trains_and_resumes_where_it_stopped(cookbook_env, tiny_model_dir, tmp_path):
    log_path = tmp_path / "chat_sl"
    recipe = dict(model_name=str(tiny_model_dir), dataset=str(EXAMPLE_CONVERSATIONS), renderer_name="role_colon",
                  max_length=512, batch_size=4)

    def run(behavior: str) -> None:
        chat_sl.cli_main(chat_sl.CLIConfig(
            log_path=str(log_path), base_url=cookbook_env.base_url, lora_rank=4, learning_rate=1e-3,
            max_steps=2, save_every=1, eval_every=0, behavior_if_log_dir_exists=behavior, **recipe,
        ))

    run("ask")  # a new log directory: nothing to ask
    straight = metrics(log_path)
    assert [m["step"] for m in straight] == [0, 1]
    assert all(np.isfinite(m["train_mean_nll"]) and m["num_tokens"] > 0 for m in straight)

    resumed_from = crash_after_first_checkpoint(log_path)
    run("resume")  # the cookbook drops the metrics past its checkpoint and logs step 1 again
    again = metrics(log_path)
    assert [m["step"] for m in again] == [0, 1] and again[0] == straight[0] and again[1] != straight[1]
    # The resumed step trained on the checkpoint's weights: its loss is what they give on the recipe's batch 1.
    # (Not the uninterrupted run's step-1 loss: the recipe submits a step ahead, so its save after step 0
    # is queued behind step 1's update, and the checkpoint holds the weights after both.)
    dataset, _ = chat_sl.get_dataset_builder(**recipe)()
    dataset.set_epoch(seed=0)
    batch = dataset.get_batch(1)
    service = tinker.ServiceClient(base_url=cookbook_env.base_url, api_key=cookbook_env.api_key)
    restored = service.create_training_client_from_state(resumed_from).result()
    logprobs = [out["logprobs"] for out in restored.forward(batch, "cross_entropy").result().loss_fn_outputs]
    expected = compute_mean_nll(logprobs, [datum.loss_fn_inputs["weights"] for datum in batch])
    assert again[1]["train_mean_nll"] == pytest.approx(expected, rel=1e-5)
    assert abs(again[1]["train_mean_nll"] - straight[0]["train_mean_nll"]) > 1e-3  # and training had moved them
    service.close("success").result()
    assert resumed_from in loaded_checkpoints(cookbook_env)
    assert json.loads((log_path / "checkpoints.jsonl").read_text().splitlines()[-1])["name"] == "final"


def test_math_rl_samples_trains_and_resumes(cookbook_env, tiny_model_dir, tmp_path):
    log_path = tmp_path / "math_rl"

    def run(behavior: str) -> None:
        asyncio.run(math_rl.cli_main(math_rl.CLIConfig(
            log_path=str(log_path), model_name=str(tiny_model_dir), env="arithmetic", renderer_name="role_colon",
            base_url=cookbook_env.base_url, lora_rank=4, group_size=2, groups_per_batch=2, max_tokens=5,
            loss_fn="importance_sampling",  # the default, stable_reinforce, is refused (trainer_api/README.md)
            max_steps=2, save_every=1, eval_every=0, behavior_if_log_dir_exists=behavior,
        )))

    run("ask")
    straight = [m for m in metrics(log_path) if "env/all/reward/total" in m]
    assert [m["progress/batch"] for m in straight] == [0, 1]
    for m in straight:
        assert m["tokens/sampled"] == 2 * 2 * 5 and np.isfinite(m["env/all/reward/total"])
        # The sampler's logprobs are the trained model's: the recipe's own on-policy check finds no gap.
        assert abs(m["optim/kl_sample_train_v1"]) < 1e-4

    resumed_from = crash_after_first_checkpoint(log_path)
    run("resume")  # the cookbook drops the metrics past its checkpoint and logs batch 1 again
    again = [m for m in metrics(log_path) if "env/all/reward/total" in m]
    assert [m["progress/batch"] for m in again] == [0, 1] and again[0] == straight[0] and again[1] != straight[1]
    assert abs(again[1]["optim/kl_sample_train_v1"]) < 1e-4
    assert resumed_from in loaded_checkpoints(cookbook_env)
    assert json.loads((log_path / "checkpoints.jsonl").read_text().splitlines()[-1])["name"] == "final"


def test_weights_download_decrypts_an_export_that_build_hf_model_merges(cookbook_env, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    service = tinker.ServiceClient(base_url=cookbook_env.base_url, api_key=cookbook_env.api_key)
    rest = tinker.RestClient(base_url=cookbook_env.base_url, api_key=cookbook_env.api_key)
    tc = service.create_lora_training_client(base_model=str(tiny_model_dir), rank=4, seed=0).result()
    data = [sft_datum(tc.get_tokenizer(), text) for text in TEXTS]
    train(tc, data, steps=4, lr=2e-2)
    state = tc.save_state("trained").result().path
    plain = tc.save_weights_external("plain").result().path

    # A training checkpoint: the cookbook exports it encrypted to a key of its own, decrypts and deletes it.
    url = cookbook_env.base_url
    sealed_dir = Path(weights.download(tinker_path=state, output_dir=str(tmp_path / "sealed"), base_url=url))
    plain_dir = Path(weights.download(tinker_path=plain, output_dir=str(tmp_path / "plain"), base_url=url))
    names = {"adapter_model.safetensors", "adapter_config.json"}
    assert {p.name for p in sealed_dir.iterdir()} == names == {p.name for p in plain_dir.iterdir()}
    for name in names:  # decrypted, the export of the checkpoint is the export of the adapter it was saved from
        assert (sealed_dir / name).read_bytes() == (plain_dir / name).read_bytes()
    exports = [c for c in rest.list_user_checkpoints().result().checkpoints if c.checkpoint_type == "external"]
    assert [c.tinker_path for c in exports] == [plain]  # the temporary encrypted export was deleted

    weights.build_hf_model(base_model=str(tiny_model_dir), adapter_path=str(sealed_dir),
                           output_path=str(tmp_path / "merged"), dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    served = forward_logprobs(tc, data)
    for datum, expected in zip(data, served):
        tokens = datum.model_input.to_ints()
        targets = datum.loss_fn_inputs["target_tokens"].tolist()

        def logprobs(model) -> np.ndarray:
            with torch.no_grad():
                logits = model(torch.tensor([tokens])).logits[0].float()
            return torch.log_softmax(logits, -1)[torch.arange(len(targets)), torch.tensor(targets)].numpy()

        np.testing.assert_allclose(logprobs(merged), expected, atol=1e-4)
        assert np.abs(logprobs(base) - expected).max() > 1e-2  # the merge carried what training changed
    service.close("success").result()


def test_exports_are_encrypted_to_the_recipients_asked_for(cookbook_env, tiny_model_dir):
    import pyrage

    service = tinker.ServiceClient(base_url=cookbook_env.base_url, api_key=cookbook_env.api_key)
    rest = tinker.RestClient(base_url=cookbook_env.base_url, api_key=cookbook_env.api_key)
    tc = service.create_lora_training_client(base_model=str(tiny_model_dir), rank=2, seed=0).result()
    identities = [pyrage.x25519.Identity.generate() for _ in range(2)]
    sealed = tc.save_weights_external(
        "sealed", ttl_seconds=3600, age_encryption_recipients=[str(i.to_public()) for i in identities]
    ).result()
    plain = tc.save_weights_external("plain").result()
    sealed_urls = rest.get_external_weights_urls(sealed.path).result().urls
    plain_urls = rest.get_external_weights_urls(plain.path).result().urls
    assert sorted(sealed_urls) == sorted(f"{name}.age" for name in plain_urls)
    listed = {c.tinker_path: c for c in rest.list_user_checkpoints().result().checkpoints}
    assert listed[sealed.path].expires_at is not None and listed[plain.path].expires_at is None  # its TTL kept
    for name, url in plain_urls.items():
        plain_bytes = urlopen(url).read()  # file:// URLs, as the export routes give them on a local root
        sealed_bytes = urlopen(sealed_urls[f"{name}.age"]).read()
        assert sealed_bytes.startswith(b"age-encryption.org/v1")
        for identity in identities:  # each recipient can open it
            assert pyrage.decrypt(sealed_bytes, [identity]) == plain_bytes
    with pytest.raises(tinker.BadRequestError, match="is not an age recipient"):
        tc.save_weights_external("bad", age_encryption_recipients=["age1notakey"]).result()
    with pytest.raises(tinker.BadRequestError, match="at most 10"):
        tc.save_weights_external("many", age_encryption_recipients=[str(identities[0].to_public())] * 11).result()
    assert not any(c.checkpoint_id.endswith(("/bad", "/many")) for c in rest.list_user_checkpoints().result().checkpoints)
    service.close("success").result()
