"""The compatibility report calls every public SDK client method and counts what works."""

from __future__ import annotations

import re

from trainer_api import compat


def test_report_covers_every_public_method_and_core_calls_work(server, tiny_model_dir, tmp_path):
    out = tmp_path / "COMPATIBILITY.md"
    supported, total = compat.write_report(out, base_model=str(tiny_model_dir), base_url=server.base_url, api_key=server.api_key)
    text = out.read_text()
    assert total == len(compat.public_methods()) >= 100
    assert f"**{supported} of {total} methods supported.**" in text
    assert "served by the service's **torch** sampler" in text  # the test services sample with torch
    rows = dict(re.findall(r"^\| `([\w.]+)` \| (yes|no) \|", text, flags=re.M))
    assert len(rows) == total
    for method in [
        "ServiceClient.create_lora_training_client", "ServiceClient.create_training_client_from_state_with_optimizer",
        "TrainingClient.forward_backward", "TrainingClient.forward", "TrainingClient.optim_step",
        "TrainingClient.forward_backward_custom", "TrainingClient.save_state", "TrainingClient.load_state_with_optimizer",
        "TrainingClient.save_weights_and_get_sampling_client", "SamplingClient.sample", "SamplingClient.compute_logprobs",
        "SamplingClient.from_sampler_handle", "RestClient.list_checkpoints", "RestClient.delete_checkpoint",
        "RestClient.list_training_runs", "RestClient.get_session",
    ]:
        assert rows[method] == "yes", method
    # Every unsupported method says why.
    assert "not implemented by trainer_api" in text
    notes = re.findall(r"\| no \| ([^|]*)\|", text)
    assert len(notes) == total - supported and all(note.strip() for note in notes)
