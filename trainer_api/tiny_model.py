"""A small, randomly initialised Gemma3-family causal LM with a locally built tokenizer.

Tests and demos need a real checkpoint directory that loads through the same
``from_pretrained`` path as a production Gemma model, but this machine cannot
download one. The tokenizer is a byte-level BPE trained locally on a built-in
corpus of SQL and English plus prompts and gold queries of the synthetic
text-to-SQL generator (``env.text2sql.data``, drawn with a seed of its own),
so that SQL keywords, the domains' table and column names and the prompt's
boilerplate are single tokens: a tiny model learns the task far faster when
``patients`` is one id rather than four byte pieces.
"""

from __future__ import annotations

from pathlib import Path

SPECIAL_TOKENS: list[str] = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
"""Gemma's special tokens, in Gemma's id order (pad=0, eos=1, bos=2, unk=3)."""

GEMMA_CHAT_TEMPLATE: str = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n{{ message['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

_CORPUS: list[str] = [
    "SELECT name, age FROM users WHERE age > 30 ORDER BY age DESC LIMIT 10;",
    "SELECT COUNT(*) FROM orders GROUP BY customer_id HAVING COUNT(*) > 5;",
    "SELECT p.title, c.name FROM products AS p JOIN categories AS c ON p.category_id = c.id;",
    "SELECT AVG(salary) FROM employees WHERE department = 'Sales';",
    "SELECT DISTINCT city FROM customers WHERE country = 'France' AND city IS NOT NULL;",
    "SELECT id FROM flights WHERE origin IN (SELECT code FROM airports WHERE state = 'CA');",
    "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT, age INTEGER);",
    "INSERT INTO users VALUES (1, 'Alice', 34), (2, 'Bob', 27);",
    "How many users are older than thirty? List the names of all customers in Paris.",
    "What is the average salary of employees in the sales department?",
    "Write a SQL query that answers the question using the given schema.",
    "The quick brown fox jumps over the lazy dog. Hello world, this is a test.",
    "Return the total revenue for each product category, sorted from highest to lowest.",
    "Which airline has the most flights departing from California airports?",
    "Given the database schema below, translate the question into SQL.",
]


HEAD_DIM = 32
"""Attention head size: vLLM's CPU attention refuses 16 and serves 32, so the tiny model has fewer, wider heads."""

EMBEDDING_STD = 0.1
"""Spread of the random embedding, which is also the output head (tied, as in Gemma). The head is never a LoRA
target (trainer_api.engine.LoraSpec), so it stays as drawn: at the 0.02 of Gemma's config its logits stay
within about +-1.3, too flat for any confident prediction, and LoRA learns the task far more slowly (measured
on three SQL lines, rank 8: cross-entropy 0.86 of its start after 10 Adam steps at 0.02, 0.30 at 0.1)."""

TOKENIZER_CORPUS_SEED = 7919
"""Seed of the synthetic examples the tokenizer is trained on: a vocabulary, not answers to any split."""


def _synthetic_corpus(n: int) -> list[str]:
    """Prompts and fenced gold answers of ``n`` synthetic examples, as the trials format them."""
    if n <= 0:
        return []
    from env.text2sql.data import generate
    from env.text2sql.prompts import prompt_message

    examples, _ = generate(n, 0, seed=TOKENIZER_CORPUS_SEED)
    return [text for e in examples for text in (prompt_message(e), f"```sql\n{e.gold}\n```")]


def build_tokenizer(vocab_size: int = 512, synthetic_examples: int = 1000):
    """Train a byte-level BPE on the built-in corpus and ``synthetic_examples`` synthetic text-to-SQL
    examples, and wrap it as a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4 + _synthetic_corpus(synthetic_examples), trainer=trainer)
    bos_id = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
        chat_template=GEMMA_CHAT_TEMPLATE,
    )


def make_tiny_model(
    out_dir: str | Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    vocab_size: int = 512,
    seed: int = 0,
) -> Path:
    """Write a tiny Gemma3ForCausalLM and its tokenizer to ``out_dir`` with save_pretrained."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(vocab_size)
    tokenizer.save_pretrained(out)
    heads = max(2, hidden_size // HEAD_DIM)
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        head_dim=HEAD_DIM,
        query_pre_attn_scalar=HEAD_DIM,
        max_position_embeddings=2048,
        sliding_window=512,
        layer_types=["sliding_attention"] * (num_layers - 1) + ["full_attention"],
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")],
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(config)
    with torch.no_grad():
        embedding = model.get_input_embeddings().weight
        embedding.normal_(0.0, EMBEDDING_STD)
        embedding[tokenizer.pad_token_id].zero_()
    model.save_pretrained(out)
    return out
