"""``run_trial``: the SFT warm-up, the GRPO steps, and the held-out evaluations around them."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import optuna

from env.text2sql import Example, ScorerSpec, ScoringPool
from env.text2sql.suite_cache import default_cache_dir

from ..params import TrialParams, split_params
from ..spec import DatasetSpec
from ..stats import Accuracy, accuracy
from .data import load_examples
from .evaluation import examples_digest, predict, summary
from .outputs import LEARNING_CURVE, MetricsLog, learning_curve, write_predictions
from .policy import Policy, open_policy
from .service_routes import check_service
from .steps import rl_step, sft_step

WILCOXON_CHUNK = 8
PREFIXES = {"untrained": "untrained_eval_", "sft_eval": "sft_eval_", "eval": "eval_"}
"""Each evaluation phase of ``metrics.jsonl`` and the prefix of what the trial records of it."""


class _Evaluator:
    """The trial's held-out evaluations, and everything they recorded (``found``, also the trial's user attrs)."""

    def __init__(self, policy: Policy, pool: ScoringPool, held_out: list[Example], log: MetricsLog, run_dir: Path,
                 optuna_trial: optuna.Trial | None) -> None:
        self.policy, self.pool, self.held_out, self.log, self.run_dir = policy, pool, held_out, log, run_dir
        self.trial = optuna_trial
        self.wilcoxon = optuna_trial is not None and isinstance(optuna_trial.study.pruner, optuna.pruners.WilcoxonPruner)
        self.found: dict[str, Any] = {}

    def remember(self, values: dict[str, Any]) -> None:
        """Keep ``values`` for the result, and set them on the Optuna trial at once: a pruned or failed trial
        keeps what it measured before it stopped."""
        self.found.update(values)
        if self.trial is not None:
            for key, value in values.items():
                self.trial.set_user_attr(key, value)

    def evaluate(self, phase: str, step: int, final: bool = False) -> Accuracy:
        """Held-out execution accuracy now, recorded as a ``phase`` point at RL step ``step``.

        ``untrained`` (LoRA starts as the identity, so: the base model's) and
        ``sft_eval`` (after the warm-up, before RL) are the baselines a trial
        is read against; they are not reported to the pruner, whose curve is
        the RL phase's. WilcoxonPruner compares trials example by example, so
        with it the final evaluation runs in chunks and reports each example's
        match as a step; other pruners get each ``eval`` point.
        """
        sampler = self.policy.sampling_client()
        per_example = self.wilcoxon and final
        chunk = WILCOXON_CHUNK if per_example else len(self.held_out)
        matches: list[bool | None] = []
        rows: list[dict[str, Any]] = []
        for start in range(0, len(self.held_out), chunk):
            part, part_rows = predict(self.policy, sampler, self.pool, self.held_out[start:start + chunk])
            matches, rows = matches + part, rows + part_rows
            if per_example:
                for index, match in enumerate(part, start):
                    if match is not None:
                        self.trial.report(float(match), index)
                if self.trial.should_prune():
                    raise optuna.TrialPruned(f"pruned by the Wilcoxon test after {len(matches)} held-out examples")
        found = accuracy(matches)
        key = "untrained_execution_accuracy" if phase == "untrained" else "eval_execution_accuracy"
        self.log.record({"phase": phase, "step": step, key: found.value, "n_eval": found.counted, "ci": found.ci})
        write_predictions(self.run_dir, rows)
        if phase != "eval" or final:
            self.remember({**summary(PREFIXES[phase], matches), "n_eval": found.counted})
        if phase == "eval" and self.trial is not None and not self.wilcoxon:
            self.trial.report(found.value, step)
            if self.trial.should_prune():
                raise optuna.TrialPruned(f"pruned at RL step {step} with held-out accuracy {found.value:.4f}")
        return found


def run_trial(
    params: dict[str, Any],
    *,
    trainer_url: str,
    dataset: DatasetSpec | dict[str, Any] | None = None,
    run_dir: str | Path = "runs/trial",
    optuna_trial: optuna.Trial | None = None,
    base_model: str | None = None,
    api_key: str = "tml-autoresearch-local",
    scoring_workers: int = 1,
) -> dict[str, Any]:
    """Train one LoRA adapter with ``params`` and return its metrics; ``objective`` is held-out execution accuracy.

    Re-run a study's trial with what ``autoresearch best STUDY --export F`` (or ``--trial N``) wrote::

        autoresearch.run_trial(**json.load(open(F))["run_trial"], trainer_url="http://host:8000")

    Arguments and their defaults:

    - ``params``: TrialParams fields and ``reward.<weight>`` RewardConfig weights; a field left out takes
      TrialParams' default (``learning_rate`` 1e-4, ``lora_rank`` 8, ``samples_per_prompt`` 4,
      ``prompts_per_step`` 4, ``temperature`` 1.0, ``loss`` ``ppo``, ``clip_low`` 0.8, ``clip_high`` 1.2,
      ``dro_beta`` 0.05, ``rl_steps`` 10, ``sft_steps`` 0, ``sft_batch_size`` 8, ``max_tokens`` 128,
      ``eval_every`` 5, ``seed`` 0), a weight left out RewardConfig's.
    - ``trainer_url``: the Tinker-compatible training service (required). It is probed first: one that does
      not answer within 5 s, or refuses ``api_key``, raises :class:`TrainingServiceError` with one line.
    - ``dataset``: a DatasetSpec or its dict (a study's ``[dataset]``); default ``DatasetSpec()``: the
      synthetic generator over all its domains, 200 training and 50 held-out examples, seed 0.
    - ``run_dir``: the trial folder for ``metrics.jsonl``, predictions and the learning curve (``runs/trial``,
      relative to the working directory).
    - ``optuna_trial``: None. With one, each evaluation is reported (``optuna.TrialPruned`` is raised when the
      pruner says stop) and what the evaluations found is set as user attrs. In a study, the worker copies
      the folder's curves and wrong predictions into the study's storage and its files to the study's
      artifact store.
    - ``base_model``: None, the service's first (a local service's only) model.
    - ``api_key``: ``tml-autoresearch-local``, the key a study's local service gets by default.
    - ``scoring_workers``: 1 scoring process.

    Every policy output is scored by one ScoringPool of ``scoring_workers``
    processes that lives as long as the trial: its scorers keep each schema's
    databases and each gold's result across steps, and a query that outlives
    its deadline is killed with its process. The pool is closed however the
    trial ends.

    Besides the objective, the result holds ``untrained_eval_*``, ``sft_eval_*``
    (after the warm-up; absent when ``sft_steps`` is 0) and the final ``eval_*``
    evaluation's ``execution_accuracy``, its 95% Wilson interval
    ``execution_accuracy_ci`` and the per-example ``matches`` (``1``, ``0``, or
    ``-`` for an example that does not count), with ``n_eval`` (examples that
    count) and ``eval_examples_sha256`` (which held-out examples, in order).
    """
    started = time.monotonic()
    hyper, reward = split_params(params)
    hp = TrialParams(**hyper)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    check_service(trainer_url, api_key)
    dataset = DatasetSpec.model_validate(dataset) if isinstance(dataset, dict) else dataset or DatasetSpec()
    train, held_out = load_examples(dataset)
    rng = random.Random(hp.seed)
    spec = ScorerSpec(reward=reward, suite_cache=str(default_cache_dir()))  # suites distilled once per machine
    with ScoringPool(spec, workers=scoring_workers) as pool, MetricsLog(run_dir, started) as log:
        policy = open_policy(trainer_url, api_key, base_model, hp)
        evaluator = _Evaluator(policy, pool, held_out, log, run_dir, optuna_trial)
        try:
            evaluator.remember({"eval_examples_sha256": examples_digest(held_out)})
            evaluator.evaluate("untrained", 0)
            for step in range(hp.sft_steps):
                log.record({"phase": "sft", "step": step, **sft_step(policy, rng.sample(train, min(hp.sft_batch_size, len(train))))})
            if hp.sft_steps:
                evaluator.evaluate("sft_eval", 0)
            for step in range(hp.rl_steps):
                batch = rng.sample(train, min(hp.prompts_per_step, len(train)))
                log.record({"phase": "rl", "step": step, **rl_step(policy, pool, batch, seed=hp.seed * 1_000_003 + step * 1009)})
                if (step + 1) % hp.eval_every == 0 and step + 1 < hp.rl_steps:
                    evaluator.evaluate("eval", step + 1)
            final = evaluator.evaluate("eval", hp.rl_steps, final=True)
            checkpoint = policy.save_checkpoint(f"final-{run_dir.name}")
        finally:
            usage = policy.device_usage()
            if optuna_trial is not None:  # a pruned or failed trial cost device time too
                for key, value in usage.items():
                    optuna_trial.set_user_attr(key, value)
            policy.release()
            if log.points:
                learning_curve(log.points, run_dir / LEARNING_CURVE)
    points = log.points
    result = {
        "objective": final.value,
        **evaluator.found,
        "best_eval_execution_accuracy": max(p["eval_execution_accuracy"] for p in points if p["phase"] == "eval"),
        # The last RL step's mean training reward, kept next to the held-out metric: a reward that rises
        # while held-out accuracy falls is the mark of reward hacking.
        "train_reward_mean": next((p["reward_mean"] for p in reversed(points) if "reward_mean" in p), None),
        "adapter_id": policy.model_id,
        "checkpoint": checkpoint,
        "reward_config": reward.to_dict(),
        "wall_seconds": round(time.monotonic() - started, 3),
        **usage,
    }
    if optuna_trial is not None:
        for key in ("adapter_id", "checkpoint", "train_reward_mean"):
            optuna_trial.set_user_attr(key, result[key])
    return result
