"""The torch sampling backend: vectorised token choice, seeds, stop conditions and log-probabilities.

A scripted fake model (its next token a function of the sequence length) pins stop conditions
down exactly; a fake model with fixed logits gives many draws for distribution tests; the tiny
Gemma checks log-probabilities and batching against real forward passes.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
stats = pytest.importorskip("scipy.stats")

from transformers.modeling_outputs import CausalLMOutputWithPast

from trainer_api.exceptions import UserError
from trainer_api.sampling import (
    SampleTask,
    SamplingSpec,
    _choose,
    _filter,
    _mix64,
    _row_params,
    _signed64,
    _stop_string_appeared,
    _uniforms,
    generate,
)
from trainer_api.wire import SampleOut

CPU = torch.device("cpu")
PROMPT = (2, 10, 11, 12, 13)


class ScriptedModel(torch.nn.Module):
    """Logits that make ``script[i]`` the best next token after ``i`` generated tokens, and ``logits`` (when given)
    at every step instead: a stand-in with the KV-cache call signature ``generate`` uses."""

    def __init__(self, vocab: int, script: Sequence[int] = (), logits: torch.Tensor | None = None,
                 nan_after: int | None = None) -> None:
        super().__init__()
        self.vocab, self.script, self.fixed, self.nan_after = vocab, list(script), logits, nan_after

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None, past_key_values=None):
        prompt_len, generated = (input_ids.shape[1], 0) if past_key_values is None else past_key_values
        generated += 0 if past_key_values is None else 1
        rows, width = input_ids.shape
        logits = torch.zeros(rows, width, self.vocab)
        if self.fixed is not None:
            logits[:, -1] = self.fixed
        else:
            logits[:, -1, self.script[min(generated, len(self.script) - 1)]] = 10.0
        if self.nan_after is not None and generated >= self.nan_after:
            logits[:, -1, 0] = float("nan")
        return CausalLMOutputWithPast(logits=logits, past_key_values=(prompt_len, generated))


def _gen(model: torch.nn.Module, tasks: Sequence[SampleTask], decode: Callable[[list[int]], str] = str) -> list[SampleOut]:
    return generate(model, tasks, decode=decode, device=CPU, pad_id=0)


def _tokens(outs: list[SampleOut]) -> list[list[list[int]]]:
    return [[s.tokens for s in out.sequences] for out in outs]


def _joining(pieces: Sequence[str]) -> Callable[[list[int]], str]:
    """A decoder that concatenates each id's piece."""
    return lambda ids: "".join(pieces[i] for i in ids)


# ------------------------------------------------------------------ the counter-based hash


def _splitmix64_reference(z: int) -> int:
    z &= 2**64 - 1
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return z ^ (z >> 31)


def test_the_mixer_equals_splitmix64_on_unsigned_integers_including_negative_bit_patterns():
    values = [0, 1, -1, 2**63 - 1, -(2**63), 12345, -987654321] + [random.Random(0).getrandbits(64) for _ in range(50)]
    got = _mix64(torch.tensor([_signed64(v) for v in values], dtype=torch.long)).tolist()
    assert [g % 2**64 for g in got] == [_splitmix64_reference(v) for v in values]


def test_uniforms_lie_in_the_unit_interval_and_depend_on_seed_and_step_only():
    seeds = torch.tensor([_signed64(s) for s in range(-500, 500)], dtype=torch.long)
    u = _uniforms(seeds, 3)
    assert u.dtype == torch.float64 and bool(((u >= 0) & (u < 1)).all())
    assert torch.equal(_uniforms(seeds[10:20], 3), u[10:20])
    assert not torch.equal(_uniforms(seeds, 4), u)
    assert stats.kstest(u.numpy(), "uniform").pvalue > 1e-3


# ------------------------------------------------------------------ the choice rules


def _reference_filter(logits: torch.Tensor, spec: SamplingSpec) -> torch.Tensor:
    """The per-row rules of the sampler before it was vectorised, kept here as the specification."""
    scores = (logits - logits.max(dim=-1, keepdim=True).values) / spec.temperature
    if 0 < spec.top_k < scores.shape[-1]:
        kth = torch.topk(scores, spec.top_k, dim=-1).values[..., -1, None]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if spec.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
        cumulative = torch.softmax(sorted_scores, dim=-1).cumsum(dim=-1)
        drop_sorted = (cumulative - torch.softmax(sorted_scores, dim=-1)) >= spec.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores


MIXED_SPECS = [
    SamplingSpec(1, temperature=1.0),
    SamplingSpec(1, temperature=0.7, top_k=5),
    SamplingSpec(1, temperature=1.3, top_p=0.4),
    SamplingSpec(1, temperature=0.5, top_k=20, top_p=0.9),
    SamplingSpec(1, temperature=2.0, top_k=1),
    SamplingSpec(1, temperature=1.0, top_k=64),  # the whole vocabulary: no cut
    SamplingSpec(1, temperature=1e-3, top_p=0.95),
]


@pytest.mark.parametrize("batch", [MIXED_SPECS, MIXED_SPECS[1:2], MIXED_SPECS[2:3], MIXED_SPECS[:1] + MIXED_SPECS[4:6]])
def test_the_vectorised_cut_keeps_the_per_row_rules(batch):
    logits = torch.randn(len(batch), 64, generator=torch.Generator().manual_seed(1)) * 3
    params = _row_params(batch, range(len(batch)), 64, CPU)
    scores = (logits - logits.max(dim=-1, keepdim=True).values) / params.temperature[:, None]
    got = _filter(scores, params) if params.max_top_k or params.any_top_p else scores
    for row, spec in enumerate(batch):
        assert torch.equal(torch.isinf(got[row]), torch.isinf(_reference_filter(logits[row : row + 1], spec)[0]))


def test_greedy_top_k_1_tiny_top_p_and_tiny_temperatures_pick_the_argmax():
    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(2))
    specs = [SamplingSpec(1, temperature=0.0), SamplingSpec(1, temperature=0.0, top_k=3, top_p=0.1),
             SamplingSpec(1, top_k=1), SamplingSpec(1, top_p=1e-6), SamplingSpec(1, temperature=1e-30),
             SamplingSpec(1, temperature=1e-300)]
    params = _row_params(specs, range(6), 300, CPU)
    for step in range(20):
        assert torch.equal(_choose(logits, params, step), logits.argmax(dim=-1))


def _chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """The chi-square test's p-value of ``counts`` against ``probs`` (renormalised in float64, as scipy wants the
    totals equal)."""
    expected = probs.double() / probs.double().sum() * int(counts.sum())
    return float(stats.chisquare(counts.double().numpy(), expected.numpy()).pvalue)


def _draws(logits: torch.Tensor, spec: SamplingSpec, n: int) -> torch.Tensor:
    """``n`` draws at step 0 from ``n`` rows with distinct seeds and the same logits."""
    params = _row_params([spec] * n, range(n), logits.shape[-1], CPU)
    return _choose(logits.expand(n, -1), params, 0)


LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.3, 0.0, -0.5, -1.0, -3.0])


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (SamplingSpec(1, temperature=1.0), torch.softmax(LOGITS, -1)),
        (SamplingSpec(1, temperature=0.6), torch.softmax(LOGITS / 0.6, -1)),
        (SamplingSpec(1, temperature=1.0, top_k=3), torch.softmax(LOGITS[:3], -1)),
        # softmax(LOGITS) starts [.41, .25, .15, .08]: the tokens above token 3 cover .81 >= .7, those above 2 only .66
        (SamplingSpec(1, temperature=1.0, top_p=0.7), torch.softmax(LOGITS[:3], -1)),
    ],
)
def test_draws_follow_the_softmax_of_the_scores(spec, expected):
    n = 40_000
    counts = torch.bincount(_draws(LOGITS, spec, n), minlength=len(LOGITS))
    kept = expected.numel()
    assert int(counts[kept:].sum()) == 0
    assert _chi_square_p(counts[:kept], expected) > 1e-3


def test_one_rows_steps_are_draws_from_the_softmax_too():
    model = ScriptedModel(len(LOGITS), logits=LOGITS)
    outs = _gen(model, [SampleTask(PROMPT, 4, SamplingSpec(max_tokens=2000, temperature=1.0, seed=5))])
    for seq in outs[0].sequences:
        counts = torch.bincount(torch.tensor(seq.tokens), minlength=len(LOGITS))
        assert _chi_square_p(counts, torch.softmax(LOGITS, -1)) > 1e-4


# ------------------------------------------------------------------ seeds and batching


def test_a_seed_reproduces_its_samples_and_another_seed_does_not():
    model = ScriptedModel(50, logits=torch.zeros(50))
    spec = SamplingSpec(max_tokens=30, temperature=1.0, seed=-(2**63))
    first, again = (_gen(model, [SampleTask(PROMPT, 3, spec)]) for _ in range(2))
    assert _tokens(first) == _tokens(again)
    other = _gen(model, [SampleTask(PROMPT, 3, SamplingSpec(max_tokens=30, temperature=1.0, seed=2**63 - 1))])
    assert _tokens(other) != _tokens(first)
    samples = _tokens(first)[0]
    assert len({tuple(s) for s in samples}) == 3  # each sample has its own stream


def test_unseeded_requests_draw_fresh_seeds():
    model = ScriptedModel(50, logits=torch.zeros(50))
    task = SampleTask(PROMPT, 2, SamplingSpec(max_tokens=30, temperature=1.0))
    assert _tokens(_gen(model, [task])) != _tokens(_gen(model, [task]))


def test_sample_i_depends_on_the_seed_and_i_only():
    model = ScriptedModel(50, logits=torch.zeros(50))
    two = _gen(model, [SampleTask(PROMPT, 2, SamplingSpec(max_tokens=20, temperature=1.0, seed=9))])
    four = _gen(model, [SampleTask(PROMPT, 4, SamplingSpec(max_tokens=20, temperature=1.0, seed=9))])
    assert _tokens(four)[0][:2] == _tokens(two)[0]


OTHERS = [
    SampleTask((2, 30, 31), 2, SamplingSpec(max_tokens=5, temperature=0.0)),
    SampleTask((2,) + tuple(range(40, 60)), 1, SamplingSpec(max_tokens=12, temperature=1.5, top_p=0.5, seed=3)),
    SampleTask((2, 50), 2, SamplingSpec(max_tokens=8, temperature=1.0)),
    SampleTask((2, 51), 1, SamplingSpec(max_tokens=12, temperature=0.3, top_k=2, seed=17)),
]


def test_a_rows_choices_do_not_depend_on_the_rows_batched_with_it():
    """Exactly, with logits that do not depend on the batch either."""
    model = ScriptedModel(64, logits=torch.randn(64, generator=torch.Generator().manual_seed(3)) * 2)
    mine = SampleTask(PROMPT, 3, SamplingSpec(max_tokens=12, temperature=0.9, top_k=40, top_p=0.95, seed=17))
    alone = _gen(model, [mine])[0]
    batched = _gen(model, [OTHERS[0], mine, *OTHERS[1:]])[1]
    assert [(s.tokens, s.logprobs) for s in batched.sequences] == [(s.tokens, s.logprobs) for s in alone.sequences]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    return model, lambda ids: tokenizer.decode(ids, skip_special_tokens=False)


def test_a_requests_samples_do_not_change_when_batched_with_other_requests(tiny):
    model, decode = tiny
    mine = SampleTask(PROMPT, 3, SamplingSpec(max_tokens=12, temperature=0.9, top_k=40, seed=17))
    alone = _gen(model, [mine], decode)[0]
    batched = _gen(model, [OTHERS[0], mine, *OTHERS[1:]], decode)[1]
    assert [s.tokens for s in batched.sequences] == [s.tokens for s in alone.sequences]
    for got, want in zip(batched.sequences, alone.sequences):
        assert got.logprobs == pytest.approx(want.logprobs, abs=1e-5)


# ------------------------------------------------------------------ log-probabilities


@pytest.mark.parametrize(
    "spec",
    [SamplingSpec(max_tokens=16, temperature=0.0), SamplingSpec(max_tokens=16, temperature=0.6, top_k=30, seed=1),
     SamplingSpec(max_tokens=16, temperature=1.4, top_p=0.7, seed=2)],
)
def test_logprobs_are_the_raw_distributions_in_a_forward_pass(tiny, spec):
    model, decode = tiny
    out = _gen(model, [SampleTask(PROMPT, 2, spec)], decode)[0]
    for seq in out.sequences:
        ids = torch.tensor([list(PROMPT) + seq.tokens])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(PROMPT) - 1 : -1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(seq.tokens)[:, None]).squeeze(-1)
        assert seq.logprobs == pytest.approx(lp.tolist(), abs=1e-5)
        if spec.temperature == 0.0:  # greedy is the argmax of the same forward pass
            assert seq.tokens == logits.argmax(-1).tolist()


def test_greedy_equals_top_k_1_and_a_tiny_top_p_on_the_model(tiny):
    model, decode = tiny
    specs = [SamplingSpec(10, temperature=0.0), SamplingSpec(10, top_k=1, seed=4), SamplingSpec(10, top_p=1e-6, seed=4)]
    outs = _gen(model, [SampleTask(PROMPT, 2, s) for s in specs], decode)
    assert _tokens(outs)[0] == _tokens(outs)[1] == _tokens(outs)[2]


def test_non_finite_logits_during_generation_are_refused():
    model = ScriptedModel(20, script=[5] * 10, nan_after=3)
    with pytest.raises(UserError, match="non-finite"):
        _gen(model, [SampleTask(PROMPT, 2, SamplingSpec(max_tokens=8, temperature=1.0, seed=0))])


# ------------------------------------------------------------------ stop conditions


def test_max_tokens_and_stop_token_ids_per_row():
    model = ScriptedModel(20, script=[5, 6, 7, 8, 9, 10, 11])
    outs = _gen(model, [
        SampleTask(PROMPT, 1, SamplingSpec(max_tokens=3, temperature=0.0)),
        SampleTask(PROMPT, 1, SamplingSpec(max_tokens=6, temperature=0.0, stop_token_ids=frozenset({8, 3}))),
        SampleTask(PROMPT, 1, SamplingSpec(max_tokens=0, temperature=0.0)),
        SampleTask(PROMPT, 1, SamplingSpec(max_tokens=7, temperature=0.0, stop_token_ids=frozenset({19}))),
    ])
    got = [(o.sequences[0].tokens, o.sequences[0].stop_reason) for o in outs]
    assert got == [([5, 6, 7], "length"), ([5, 6, 7, 8], "stop"), ([], "length"), ([5, 6, 7, 8, 9, 10, 11], "length")]


def test_a_stop_string_split_across_tokens_stops_where_it_completes():
    pieces = ["", "SEL", "E", "CT", " x", " FR", "OM", " t", ";", "\n", "`", "``", " é", "<eos>"]
    decode = _joining(pieces)
    script = [1, 2, 3, 4, 5, 6, 7, 10, 11, 9, 12, 13]
    model = ScriptedModel(len(pieces), script=script)
    cases = {"ECT x FRO": 6, "```": 9, "SELECT": 3, "t`": 8, "\n é": 11, "absent": len(script)}
    tasks = [SampleTask(PROMPT, 1, SamplingSpec(max_tokens=len(script), temperature=0.0, stop_strings=(s, "zz")))
             for s in cases]
    for (stop, n), out in zip(cases.items(), _gen(model, tasks, decode)):
        seq = out.sequences[0]
        assert (seq.tokens, seq.stop_reason) == (script[:n], "length" if stop == "absent" else "stop"), stop


def _first_stop_by_full_decode(stops: tuple[str, ...], ids: list[int], decode: Callable[[list[int]], str]) -> int | None:
    return next((t for t in range(1, len(ids) + 1) if any(s in decode(ids[:t]) for s in stops)), None)


def _first_stop_incrementally(stops: tuple[str, ...], ids: list[int], decode: Callable[[list[int]], str]) -> int | None:
    return next((t for t in range(1, len(ids) + 1) if _stop_string_appeared(stops, ids[:t], decode)), None)


def _check_incremental_equals_full_decode(ids: list[int], decode: Callable[[list[int]], str], rng: random.Random) -> int:
    """Stop strings cut from the decodes of random prefixes (some ending in an unfinished character, so holding
    U+FFFD); returns how many of them stopped the sequence."""
    found = 0
    for _ in range(60):
        text = decode(ids[: rng.randint(1, len(ids))])
        start = rng.randrange(len(text))
        stops = (text[start : start + rng.randint(1, 24)],) + (("never-there",) if rng.random() < 0.5 else ())
        want = _first_stop_by_full_decode(stops, ids, decode)
        assert _first_stop_incrementally(stops, ids, decode) == want, (stops, ids)
        found += want is not None
    return found


def test_incremental_stop_search_equals_full_decode_with_a_byte_level_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)
    rng = random.Random(0)
    words = ["SELECT", " name", " FROM", " users", "é", "日本語", "🙂", " ", "\n", "```", "<eos>", "ü", "x", ";"]
    for _ in range(8):
        ids = tokenizer.encode("".join(rng.choice(words) for _ in range(30)), add_special_tokens=False)
        assert _check_incremental_equals_full_decode(ids, decode, rng) > 0


def test_incremental_stop_search_equals_full_decode_with_a_byte_fallback_sentencepiece_decoder():
    from tokenizers import Tokenizer, decoders, models

    pieces = ["<unk>", "▁", "▁SEL", "ECT", "▁a", "b", "▁▁", "```", "<eos>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokenizer = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=[], unk_token="<unk>",
                                     byte_fallback=True))
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)
    units = [[i] for i in range(1, 9)] + [[9 + b for b in ch.encode()] for ch in ["é", "日", "🙂", "\u0301"]]
    rng = random.Random(1)
    for _ in range(8):
        ids = [i for _ in range(30) for i in rng.choice(units)]
        assert _check_incremental_equals_full_decode(ids, decode, rng) > 0


def test_a_stop_string_is_found_when_the_tokens_before_it_decode_to_nothing():
    decode = _joining(["", "a", "b", "c"])
    ids = [1, 2] + [0] * 100 + [3]
    assert _first_stop_incrementally(("abc",), ids, decode) == len(ids)
    assert _first_stop_incrementally(("ac",), ids, decode) is None
