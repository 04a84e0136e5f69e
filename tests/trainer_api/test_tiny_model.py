"""``python -m trainer_api make-tiny-model DIR`` writes a Gemma3 checkpoint that loads like a real one."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("torch")

from trainer_api.process import PACKAGE_ROOT  # noqa: E402


def test_cli_writes_a_gemma3_model_and_tokenizer_loadable_with_from_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "tiny"
    done = subprocess.run(
        [sys.executable, "-m", "trainer_api", "make-tiny-model", str(out)],
        cwd=PACKAGE_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gemma3_text"
    assert config["architectures"] == ["Gemma3ForCausalLM"]
    assert 64 <= config["hidden_size"] <= 128 and config["num_hidden_layers"] <= 4

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert model.config.vocab_size == len(tokenizer)
    for token, expected_id in [("<pad>", 0), ("<eos>", 1), ("<bos>", 2)]:
        assert tokenizer.convert_tokens_to_ids(token) == expected_id
    assert {"<start_of_turn>", "<end_of_turn>"} <= set(tokenizer.get_vocab())

    sql = "SELECT name FROM users WHERE age > 30;"
    ids = tokenizer.encode(sql)
    assert ids[0] == tokenizer.bos_token_id
    assert len(ids) < len(sql) // 2  # BPE trained on SQL merges common keywords
    assert tokenizer.decode(ids, skip_special_tokens=True) == sql
    # trained on the synthetic text-to-SQL prompts too: their schema boilerplate is one id a word
    assert tokenizer.tokenize(" INTEGER PRIMARY KEY, TEXT NOT NULL") == [
        "ĠINTEGER", "ĠPRIMARY", "ĠKEY", ",", "ĠTEXT", "ĠNOT", "ĠNULL"]

    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "SELECT 1;"}], tokenize=False
    )
    assert chat == "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\nSELECT 1;<end_of_turn>\n"
    assert model.generation_config.eos_token_id == [1, tokenizer.convert_tokens_to_ids("<end_of_turn>")]
