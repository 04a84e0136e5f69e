"""One trial as a plain library call: SFT warm-up, GRPO-style RL, held-out evaluation.

``run_trial(params, trainer_url=...)`` needs no study: the worker calls it with
an Optuna trial to report learning curves to (so the pruner can stop it), and
a researcher calls it with the parameters ``autoresearch best --export`` wrote.
All training goes through the official tinker SDK to a Tinker-compatible
service; all scoring through ``env.text2sql``, whose verdict defines the
objective (held-out execution accuracy) whatever the trial's reward weights.

Its parts: ``data`` (the splits), ``policy`` (the adapter through the SDK) and
``service_routes`` (the service's routes the SDK lacks), ``grpo`` (the
arithmetic and the training data, pure), ``steps`` (one SFT or GRPO step),
``evaluation`` (held-out predictions and what is recorded of them),
``outputs`` (the files of the trial folder) and ``run`` (the loop).
"""

from __future__ import annotations

from .run import run_trial
from .service_routes import TrainingServiceError

__all__ = ["TrainingServiceError", "run_trial"]
