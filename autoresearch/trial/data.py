"""The examples a trial trains and is evaluated on, from its study's dataset section."""

from __future__ import annotations

import random

from env.text2sql import Example
from env.text2sql.data import generate, load

from ..spec import DatasetSpec


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
