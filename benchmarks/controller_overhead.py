"""Overhead of the autoresearch controller versus plain ``optuna`` ``study.optimize(n_jobs=...)``.

Runs, in one invocation, N trials of the same trivial objective (sleep, then
return a quadratic of one parameter):
  1. through our controller: one worker process per trial, ask in the
     controller, tell from the worker, heartbeats and reaping on;
  2. through ``study.optimize(objective, n_trials=N, n_jobs=P)`` in one process,
with the same storage kind and parallelism, and prints each run's per-trial
overhead (wall time beyond the ideal N * sleep / P, per trial) and their ratio.
The controller pays for process isolation (a crash or a hang takes down one
trial only); this measures what that costs per trial.

    python benchmarks/controller_overhead.py [--n-trials 200] [--parallel 4] [--sleep 0.05] [--storage sqlite|postgresql]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import optuna  # noqa: E402

from autoresearch.controller import run_study  # noqa: E402
from autoresearch.spec import StudySpec, load_spec  # noqa: E402
from autoresearch.study import make_sampler  # noqa: E402

POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"

STUDY = """
name = "{name}"
objective = "controller_overhead:objective"
{storage}
[space.x]
type = "float"
low = -1.0
high = 1.0
[fixed]
sleep = {sleep}
[training]
api = "none"
[budget]
n_trials = {n_trials}
parallel = {parallel}
[pruner]
type = "none"
[sampler]
type = "{sampler}"
"""


def objective(params: dict[str, Any], **_: Any) -> float:
    """The trivial objective both runs share: the study file plugs it into the controller's workers."""
    time.sleep(params["sleep"])
    return -params["x"] ** 2


def _storage_url(kind: str, folder: Path) -> str:
    return POSTGRES_URL if kind == "postgresql" else f"sqlite:///{folder / 'plain.db'}"


def write_study(args: argparse.Namespace, folder: Path) -> Path:
    storage = f'storage = "{POSTGRES_URL}"' if args.storage == "postgresql" else ""
    path = folder / "study.toml"
    path.write_text(STUDY.format(name=f"bench-{uuid.uuid4().hex[:8]}", storage=storage, sleep=args.sleep,
                                 n_trials=args.n_trials, parallel=args.parallel, sampler=args.sampler))
    return path


def through_controller(spec: StudySpec, args: argparse.Namespace) -> float:
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "benchmarks"), os.environ.get("PYTHONPATH")]))
    started = time.perf_counter()
    state = run_study(spec)
    wall = time.perf_counter() - started
    assert state.complete == args.n_trials, state
    return wall


def through_optuna(spec: StudySpec, args: argparse.Namespace, folder: Path) -> float:
    """The same sampler (seeded, same TPE settings) as the controller's, in one process."""
    study = optuna.create_study(study_name=f"plain-{uuid.uuid4().hex[:8]}", storage=_storage_url(args.storage, folder),
                                direction="maximize", sampler=make_sampler(spec))
    started = time.perf_counter()
    study.optimize(lambda t: objective({"x": t.suggest_float("x", -1.0, 1.0), "sleep": args.sleep}),
                   n_trials=args.n_trials, n_jobs=args.parallel)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-trials", type=int, default=200)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--sleep", type=float, default=0.05, help="seconds each trial sleeps")
    parser.add_argument("--storage", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--sampler", choices=["tpe", "random"], default="tpe")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ideal = args.n_trials * args.sleep / args.parallel
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        spec = load_spec(write_study(args, folder))
        ours = through_controller(spec, args)
        plain = through_optuna(spec, args, folder)
    per_trial = {name: (wall - ideal) * args.parallel / args.n_trials for name, wall in (("ours", ours), ("plain", plain))}
    print(f"{args.n_trials} trials, {args.parallel} in parallel, sleep {args.sleep} s, {args.storage} storage, "
          f"{args.sampler} sampler, {os.cpu_count()} CPUs; ideal wall {ideal:.2f} s")
    print(f"  autoresearch controller: wall {ours:7.2f} s, overhead {per_trial['ours'] * 1000:8.1f} ms/trial")
    print(f"  optuna optimize(n_jobs): wall {plain:7.2f} s, overhead {per_trial['plain'] * 1000:8.1f} ms/trial")
    print(f"  ratio (controller / optuna): wall {ours / plain:.2f}x, per-trial overhead "
          f"{per_trial['ours'] / per_trial['plain']:.1f}x")


if __name__ == "__main__":
    main()
