"""One trial as a plain library call: SFT warm-up, GRPO-style RL, held-out evaluation.

``run_trial(params, trainer_url=...)`` needs no study: the worker calls it with
an Optuna trial to report learning curves to (so the pruner can stop it), and
a researcher calls it with the parameters ``autoresearch best --export`` wrote.
All training goes through the official tinker SDK to a Tinker-compatible
service; all scoring through ``env.text2sql``, whose verdict defines the
objective (held-out execution accuracy) whatever the trial's reward weights.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any, Sequence

import httpx
import optuna
from optuna.artifacts import FileSystemArtifactStore, upload_artifact

from env.text2sql import Example, RewardConfig, Submission, Verdict, score_batch
from env.text2sql.data import generate, load
from env.text2sql.prompts import format_prompt

from .params import TrialParams, split_params
from .plots import pyplot
from .spec import DatasetSpec

ANSWER_END = "<end_of_turn>"
WILCOXON_CHUNK = 8
FINAL_LR_FRACTION = 0.1


def load_examples(dataset: DatasetSpec) -> tuple[list[Example], list[Example]]:
    """The training and held-out splits a study's dataset section describes; they never share an example.

    ``synthetic`` is the built-in generator over all its domains; ``synthetic:retail,hr`` restricts it to the
    named domains (fewer schemas to learn: what lets the tiny CPU study's model learn the task in minutes).
    """
    if dataset.source == "synthetic" or dataset.source.startswith("synthetic:"):
        _, _, names = dataset.source.partition(":")
        domains = [name.strip() for name in names.split(",")] if names else None
        return generate(dataset.n_train, dataset.n_eval, seed=dataset.seed, domains=domains)
    examples = load(dataset.source)
    if dataset.eval_source is not None:
        return examples[: dataset.n_train], load(dataset.eval_source)[: dataset.n_eval]
    random.Random(dataset.seed).shuffle(examples)
    return examples[dataset.n_eval : dataset.n_eval + dataset.n_train], examples[: dataset.n_eval]


class _Policy:
    """The trial's LoRA adapter on the training service, with the tokenizer to talk to it."""

    def __init__(self, trainer_url: str, api_key: str, base_model: str | None, hp: TrialParams) -> None:
        import tinker

        self.tinker = tinker
        client = tinker.ServiceClient(base_url=trainer_url, api_key=api_key)
        if base_model is None:  # the one model a local service serves
            capabilities = tinker.RestClient(base_url=trainer_url, api_key=api_key).get_server_capabilities().result()
            base_model = capabilities.supported_models[0].model_name
        self.training = client.create_lora_training_client(base_model=base_model, rank=hp.lora_rank, seed=hp.seed).result()
        self.tokenizer = self.training.get_tokenizer()
        self.hp = hp
        self.steps_taken = 0
        self._url, self._api_key = trainer_url, api_key

    def device_usage(self) -> dict[str, Any]:
        """``device`` (cpu, cuda) and ``device_seconds`` spent on this adapter (training, and sampling its weights).

        Our service's own route (the SDK has none); another Tinker-compatible
        service may lack it, and then both are None; so are they when the service
        cannot be asked (this runs while a failure is being handled).
        """
        try:
            response = httpx.get(f"{self._url}/api/v1/training_runs/{self.training.model_id}/device_usage",
                                 headers={"X-API-Key": self._api_key}, timeout=30)
        except httpx.HTTPError:
            return {"device": None, "device_seconds": None}
        found = response.json() if response.status_code == 200 else {}
        return {"device": found.get("device"), "device_seconds": found.get("device_seconds")}

    def sampling_client(self) -> Any:
        """A sampling client on the adapter's current weights (a frozen snapshot the service keeps)."""
        return self.training.save_weights_and_get_sampling_client().result()

    def release(self) -> None:
        """Unload the adapter and its optimizer state from the shared service (its saved checkpoint stays).

        The SDK has no call for this, so it is the service's ``unload_model``
        request, polled like any other future; a long study would otherwise
        keep every finished trial's adapter in GPU memory.
        """
        headers = {"X-API-Key": self._api_key}
        with httpx.Client(base_url=self._url, headers=headers, timeout=30) as http:
            response = http.post("/api/v1/unload_model", json={"model_id": self.training.model_id})
            response.raise_for_status()
            request = {"request_id": response.json()["request_id"]}
            while http.post("/api/v1/retrieve_future", json=request).json().get("type") == "try_again":
                time.sleep(0.1)

    def prompt_tokens(self, example: Example) -> list[int]:
        return self.tokenizer.encode(format_prompt(example, self.tokenizer), add_special_tokens=False)

    def learning_rate(self) -> float:
        """``learning_rate`` is the peak of a schedule that decays linearly to FINAL_LR_FRACTION of it over the
        trial's ``sft_steps + rl_steps`` optimizer steps. Measured on the tiny study: at a constant rate the
        warm-up ended noisy (greedy answers flipped from step to step) and the first RL steps undid it."""
        total = self.hp.sft_steps + self.hp.rl_steps
        progress = min(self.steps_taken / max(total - 1, 1), 1.0)
        return self.hp.learning_rate * (1.0 - (1.0 - FINAL_LR_FRACTION) * progress)

    def step(self, data: list[Any], loss: str, config: dict[str, float] | None) -> dict[str, float]:
        """One forward-backward and one optimizer step; the service's metrics."""
        result = self.training.forward_backward(data, loss, config)
        optim = self.training.optim_step(self.tinker.types.AdamParams(learning_rate=self.learning_rate()))
        self.steps_taken += 1
        metrics = result.result().metrics
        optim.result()
        return metrics

    def sample(self, sampler: Any, prompts: Sequence[list[int]], n: int, temperature: float, seed: int) -> list[list[Any]]:
        """``n`` completions per prompt, all requested before any is awaited."""
        types = self.tinker.types
        params = [types.SamplingParams(max_tokens=self.hp.max_tokens, temperature=temperature, seed=seed + i, stop=[ANSWER_END])
                  for i in range(len(prompts))]
        futures = [sampler.sample(types.ModelInput.from_ints(p), n, sp) for p, sp in zip(prompts, params)]
        return [f.result().sequences for f in futures]

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)


def _sft_datum(types: Any, prompt: list[int], answer: list[int]) -> Any:
    tokens = prompt + answer
    weights = [0.0] * (len(prompt) - 1) + [1.0] * len(answer)
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights})


def _rl_datum(types: Any, prompt: list[int], sequence: Any, advantage: float) -> Any:
    tokens = prompt + list(sequence.tokens)
    pad = [0.0] * (len(prompt) - 1)
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "logprobs": pad + list(sequence.logprobs),
                        "advantages": pad + [advantage] * len(sequence.tokens)},
    )


def _metrics(out: dict[str, float]) -> dict[str, float]:
    """The service's ``name:reduction`` metric keys as plain names (``loss:sum`` becomes ``loss_sum``)."""
    return {key.replace(":", "_"): value for key, value in out.items()}


def _sft_step(policy: _Policy, batch: list[Example]) -> dict[str, float]:
    """One cross-entropy step on the gold answers, formatted as the model should answer."""
    types = policy.tinker.types
    data = [_sft_datum(types, policy.prompt_tokens(e),
                       policy.tokenizer.encode(f"```sql\n{e.gold}\n```{ANSWER_END}", add_special_tokens=False))
            for e in batch]
    return _metrics(policy.step(data, "cross_entropy", None))


def _rl_step(policy: _Policy, batch: list[Example], reward: RewardConfig, seed: int) -> dict[str, float]:
    """One GRPO step: a group of samples per prompt, rewards, group-normalised advantages, the policy loss.

    Completions whose advantage is zero (a group that all scored the same)
    carry no gradient and are not sent. As in GRPO's objective, each token's
    advantage is divided by its completion's length and by the number of
    completions in the step: the loss is a mean over completions of per-token
    means, not a sum over every sampled token. The sum's gradient is hundreds
    of times the SFT warm-up's, and Adam (whose second moments the warm-up
    set) turned it into steps that wrecked a warmed-up model in one RL step
    (measured on the tiny study: held-out accuracy to 0 and degenerate text).
    """
    hp, types = policy.hp, policy.tinker.types
    sampler = policy.sampling_client()
    prompts = [policy.prompt_tokens(e) for e in batch]
    groups = policy.sample(sampler, prompts, hp.samples_per_prompt, hp.temperature, seed=seed)
    scores = iter(score_batch([Submission(e, policy.decode(s.tokens)) for e, seqs in zip(batch, groups) for s in seqs],
                              reward=reward))
    data, rewards, matches = [], [], 0
    completions = len(batch) * hp.samples_per_prompt
    for prompt, seqs in zip(prompts, groups):
        group = [next(scores) for _ in seqs]
        rewards += [s.reward for s in group]
        matches += sum(s.execution_match for s in group)
        advantages = group_advantages([s.reward for s in group])
        data += [_rl_datum(types, prompt, seq, adv / (len(seq.tokens) * completions))
                 for seq, adv in zip(seqs, advantages) if adv != 0.0 and seq.tokens]
    out = policy.step(data, hp.loss, hp.loss_config()) if data else {}
    return {"reward_mean": sum(rewards) / len(rewards), "train_match_rate": matches / len(rewards), "datums": len(data),
            **_metrics(out)}


def group_advantages(rewards: Sequence[float]) -> list[float]:
    """GRPO: each completion's reward relative to its group's, in group standard deviations (0 if all equal)."""
    mean = sum(rewards) / len(rewards)
    std = (sum((r - mean) ** 2 for r in rewards) / len(rewards)) ** 0.5
    return [0.0 if std < 1e-8 else (r - mean) / std for r in rewards]


def _accuracy(matches: list[bool | None]) -> tuple[float, int]:
    """Execution accuracy over the examples that count (a broken gold, None, does not), and how many counted."""
    counted = [m for m in matches if m is not None]
    return (sum(counted) / len(counted) if counted else 0.0), len(counted)


def _evaluate(policy: _Policy, sampler: Any, examples: list[Example], reward: RewardConfig) -> tuple[list[bool | None], list[dict[str, Any]]]:
    """Greedy predictions for ``examples``: per example, whether it matches (None: broken gold, excluded), and the rows."""
    outputs = policy.sample(sampler, [policy.prompt_tokens(e) for e in examples], 1, temperature=0.0, seed=0)
    texts = [policy.decode(seqs[0].tokens) for seqs in outputs]
    scores = score_batch([Submission(e, t) for e, t in zip(examples, texts)], reward=reward)
    rows = [{"id": e.id, "question": e.question, "gold": e.gold, "prediction": t, "verdict": s.verdict.value}
            for e, t, s in zip(examples, texts, scores)]
    return [None if s.verdict is Verdict.GOLD_ERROR else s.execution_match for s in scores], rows


def _learning_curve(points: list[dict[str, Any]], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    rl = [p for p in points if p["phase"] == "rl"]
    if rl:
        ax.plot([p["step"] for p in rl], [p["reward_mean"] for p in rl], label="train reward (mean)")
    evals = [p for p in points if "eval_execution_accuracy" in p]
    ax.plot([p["step"] for p in evals], [p["eval_execution_accuracy"] for p in evals], marker="o", label="held-out accuracy")
    ax.set(xlabel="RL step", title="Learning curve")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_trial(
    params: dict[str, Any],
    *,
    trainer_url: str,
    dataset: DatasetSpec | None = None,
    run_dir: str | Path = "runs/trial",
    optuna_trial: optuna.Trial | None = None,
    base_model: str | None = None,
    api_key: str = "tml-autoresearch-local",
    artifact_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Train one LoRA adapter with ``params`` and return its metrics; ``objective`` is held-out execution accuracy.

    ``params`` holds TrialParams fields and ``reward.*`` weights. With
    ``optuna_trial``, each evaluation is reported (``optuna.TrialPruned`` is
    raised when the pruner says stop) and the outputs are uploaded as
    artifacts to a FileSystemArtifactStore at ``artifact_dir``.
    """
    started = time.monotonic()
    hyper, reward = split_params(params)
    hp = TrialParams(**hyper)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    train, held_out = load_examples(dataset or DatasetSpec())
    rng = random.Random(hp.seed)
    policy = _Policy(trainer_url, api_key, base_model, hp)
    wilcoxon = optuna_trial is not None and isinstance(optuna_trial.study.pruner, optuna.pruners.WilcoxonPruner)
    points: list[dict[str, Any]] = []
    metrics_file = open(run_dir / "metrics.jsonl", "w")

    def record(point: dict[str, Any]) -> None:
        point["seconds"] = round(time.monotonic() - started, 3)
        points.append(point)
        metrics_file.write(json.dumps(point) + "\n")
        metrics_file.flush()

    def evaluate(step: int, final: bool) -> float:
        """Held-out execution accuracy now. WilcoxonPruner compares trials example by example, so with it the
        final evaluation runs in chunks and reports each example's match as a step; other pruners get the curve."""
        sampler = policy.sampling_client()
        per_example = wilcoxon and final
        chunk = WILCOXON_CHUNK if per_example else len(held_out)
        matches: list[bool | None] = []
        rows: list[dict[str, Any]] = []
        for start in range(0, len(held_out), chunk):
            part, part_rows = _evaluate(policy, sampler, held_out[start:start + chunk], reward)
            matches, rows = matches + part, rows + part_rows
            if per_example:
                for index, match in enumerate(part, start):
                    if match is not None:
                        optuna_trial.report(float(match), index)
                if optuna_trial.should_prune():
                    raise optuna.TrialPruned(f"pruned by the Wilcoxon test after {len(matches)} held-out examples")
        accuracy, counted = _accuracy(matches)
        record({"phase": "eval", "step": step, "eval_execution_accuracy": accuracy, "n_eval": counted})
        with open(run_dir / "predictions.jsonl", "w") as out:
            out.writelines(json.dumps(row) + "\n" for row in rows)
        if optuna_trial is not None and not wilcoxon:
            optuna_trial.report(accuracy, step)
            if optuna_trial.should_prune():
                raise optuna.TrialPruned(f"pruned at RL step {step} with held-out accuracy {accuracy:.4f}")
        return accuracy

    def evaluate_untrained() -> float:
        """Held-out accuracy of the adapter before any training (LoRA starts as the identity, so: the base
        model's), recorded as the ``untrained`` point: the baseline a trial's final accuracy is read against."""
        sampler = policy.sampling_client()
        accuracy, _ = _accuracy(_evaluate(policy, sampler, held_out, reward)[0])
        record({"phase": "untrained", "step": 0, "untrained_execution_accuracy": accuracy})
        return accuracy

    try:
        untrained = evaluate_untrained()
        for step in range(hp.sft_steps):
            record({"phase": "sft", "step": step, **_sft_step(policy, rng.sample(train, min(hp.sft_batch_size, len(train))))})
        for step in range(hp.rl_steps):
            batch = rng.sample(train, min(hp.prompts_per_step, len(train)))
            record({"phase": "rl", "step": step, **_rl_step(policy, batch, reward, seed=hp.seed * 1_000_003 + step * 1009)})
            if (step + 1) % hp.eval_every == 0 and step + 1 < hp.rl_steps:
                evaluate(step + 1, final=False)
        accuracy = evaluate(hp.rl_steps, final=True)
        checkpoint = policy.training.save_weights_for_sampler(f"final-{run_dir.name}").result().path
    finally:
        usage = policy.device_usage()
        if optuna_trial is not None:  # a pruned or failed trial cost device time too
            for key, value in usage.items():
                optuna_trial.set_user_attr(key, value)
        policy.release()
        metrics_file.close()
        if points:
            _learning_curve(points, run_dir / "learning_curve.png")
        if optuna_trial is not None and artifact_dir is not None:
            _upload(optuna_trial, Path(artifact_dir), run_dir)
    result = {
        "objective": accuracy,
        "eval_execution_accuracy": accuracy,
        "untrained_eval_execution_accuracy": untrained,
        "best_eval_execution_accuracy": max(p["eval_execution_accuracy"] for p in points if "eval_execution_accuracy" in p),
        # The last RL step's mean training reward, kept next to the held-out metric: a reward that rises
        # while held-out accuracy falls is the mark of reward hacking.
        "train_reward_mean": next((p["reward_mean"] for p in reversed(points) if "reward_mean" in p), None),
        "adapter_id": policy.training.model_id,
        "checkpoint": checkpoint,
        "reward_config": reward.to_dict(),
        "wall_seconds": round(time.monotonic() - started, 3),
        **usage,
    }
    if optuna_trial is not None:
        for key in ("adapter_id", "checkpoint", "untrained_eval_execution_accuracy", "train_reward_mean"):
            optuna_trial.set_user_attr(key, result[key])
    return result


def _upload(trial: optuna.Trial, artifact_dir: Path, run_dir: Path) -> None:
    """Attach the trial's outputs to it in the study's artifact store, so optuna-dashboard shows them."""
    artifact_dir.mkdir(parents=True, exist_ok=True)
    store = FileSystemArtifactStore(artifact_dir)
    for name in ("metrics.jsonl", "learning_curve.png", "predictions.jsonl"):
        if (run_dir / name).exists():
            upload_artifact(artifact_store=store, file_path=str(run_dir / name), study_or_trial=trial)
