"""``autoresearch`` command line: run, status, dashboard, report, best, and the worker's ``trial``.

Every expected failure (a bad study file, a missing study, no completed
trial) prints one ``error: ...`` line and exits with code 2, never a traceback;
``run`` exits with code 1 when its study ends with no completed trial.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .spec import ENV_PREFIX, SpecError, StudySpec, load_spec
from .study import Tally

EXIT_NO_RESULT = 1
EXIT_USAGE = 2


class CommandError(Exception):
    """An expected failure to report in one line."""


def _open(spec: StudySpec):  # noqa: ANN202 - optuna.Study
    from .study import open_study

    sqlite_file = spec.storage_url.removeprefix("sqlite:///")
    if spec.storage_url.startswith("sqlite:///") and not Path(sqlite_file).exists():
        raise CommandError(f"study {spec.name!r} has no database at {sqlite_file} yet; start it with `autoresearch run`")
    try:
        return open_study(spec)
    except KeyError:
        raise CommandError(f"study {spec.name!r} does not exist in {spec.storage_url} yet; start it with `autoresearch run`") from None


def _run(args: argparse.Namespace) -> int:
    spec = load_spec(args.study)
    if args.dry_run:
        return _dry_run(spec, args.n_trials or spec.budget.n_trials)
    from .console import RunConsole
    from .controller import ControllerBusy, run_study
    from .preflight import check_study
    from .trainer_service import TrainerStartError
    from .trial.service_routes import TrainingServiceError

    check_study(spec)  # a typo in ``objective`` or ``[dataset]`` is a one-line error here, not a failure in every worker
    budget = args.n_trials or spec.budget.n_trials
    try:
        with RunConsole(spec.name) as observer:
            state = run_study(spec, n_trials=args.n_trials, observer=observer, retry_failed=args.retry_failed)
    except (ControllerBusy, TrainerStartError, TrainingServiceError) as error:
        raise CommandError(str(error)) from None
    except KeyboardInterrupt:
        print(f"interrupted: running trials were stopped and will be retried by `autoresearch run {args.study}`",
              file=sys.stderr)
        return 130
    best = "none" if state.best is None else f"{state.best:.4f}"
    print(f"study {spec.name}: {state.settled} trials settled ({state.complete} complete, {state.pruned} pruned, "
          f"{state.failed_final} failed), best {best}")
    _how_to_continue(args.study, state, budget, spec.budget.parallel)
    if state.complete == 0:
        print(f"error: study {spec.name!r} has no completed trial; {_last_failure(spec)}", file=sys.stderr)
        return EXIT_NO_RESULT
    return 0


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _how_to_continue(study: str, state: Tally, budget: int, parallel: int) -> None:
    """Once the budget is spent, ``run`` does nothing more: say how to go on."""
    if state.settled < budget:
        return
    more = f"`autoresearch run {study} --n-trials {state.settled + parallel}` adds {parallel} trial(s) to the budget"
    if state.failed_final:
        more += f"; `autoresearch run {study} --retry-failed` runs the {state.failed_final} failed trial(s) again"
    print(f"budget of {budget} trials spent: {more}", file=sys.stderr)


def _last_failure(spec: StudySpec) -> str:
    from optuna.trial import TrialState

    failed = _open(spec).get_trials(deepcopy=False, states=(TrialState.FAIL,))
    if not failed:
        return "no trial failed either (all were pruned)"
    last = max(failed, key=lambda t: (t.datetime_complete is not None, t.datetime_complete, t.number))
    return f"last failure, trial {last.number}: {last.user_attrs.get('failure_reason') or 'no reason recorded'}"


def _dry_run(spec: StudySpec, budget: int) -> int:
    """Check everything that needs no training; the summary on stderr, the Kubernetes manifests alone on stdout."""
    from .params import distributions
    from .preflight import dry_run_checks

    checked = dry_run_checks(spec)
    storage = spec.storage if (spec.storage or "").startswith(ENV_PREFIX) else spec.storage_url
    summary = [f"study {spec.name}: storage {storage}, run folder {spec.run_folder}",
               f"budget {budget} trials, {spec.budget.parallel} in parallel, timeout {spec.budget.timeout_s:g} s; "
               f"sampler {spec.sampler.type}; pruner {spec.pruner.type}; objective {spec.objective}",
               *(f"  {name}: {distribution}" for name, distribution in distributions(spec).items()),
               *checked.lines]
    if spec.launcher == "kubernetes":
        documents = _job_documents(spec, budget, checked.storage_answers)
        summary.append(f"{len(documents)} Kubernetes manifests on stdout (the anchor ConfigMap and the first Jobs)")
    print("\n".join(summary), file=sys.stderr)
    if spec.launcher == "kubernetes":
        import yaml

        print(yaml.safe_dump_all(documents, sort_keys=False, explicit_start=True), end="")
    print("dry run: the study file checks out; nothing was trained", file=sys.stderr)
    return 0


def _job_documents(spec: StudySpec, budget: int, storage_answers: bool) -> list[dict]:
    """The anchor ConfigMap and the first Jobs ``run`` would create, without API calls.

    Trials are numbered from the study's next number when its storage answers, else from 0; attempt 0.
    """
    from sqlalchemy.exc import SQLAlchemyError

    from .launchers.k8s_jobs import anchor_manifest, job_manifest

    first = 0
    if storage_answers:  # else opening it could wait for a TCP timeout
        try:
            first = len(_open(spec).get_trials(deepcopy=False))
        except (CommandError, SpecError, SQLAlchemyError):
            pass
    trainer_url = None if spec.training.api == "none" else spec.training.api  # "local" is refused for kubernetes
    return [anchor_manifest(spec)] + [job_manifest(spec, first + i, 0, trainer_url)
                                      for i in range(min(spec.budget.parallel, budget))]


def _status(args: argparse.Namespace) -> int:
    from .summary import status_document, status_table

    spec = load_spec(args.study)
    document = status_document(spec, _open(spec))
    print(json.dumps(document, indent=2, default=str) if args.json else status_table(document))
    return 0


def _best(args: argparse.Namespace) -> int:
    from .summary import export_best, export_trial

    spec = load_spec(args.study)
    study = _open(spec)
    try:
        document = export_best(spec, study) if args.trial is None else export_trial(spec, study, args.trial)
    except LookupError as error:
        raise CommandError(str(error)) from None
    if document["study_file_changed"]:
        _warn(f"{spec.path} changed since trial {document['trial']} ran: the exported dataset and training are "
              "the file's now, not necessarily the trial's")
    text = json.dumps(document, indent=2, default=str)
    if args.export:
        Path(args.export).write_text(text + "\n")
    print(text)
    return 0


def _report(args: argparse.Namespace) -> int:
    from .report import write_report

    spec = load_spec(args.study)
    out = Path(args.out) if args.out else spec.run_folder / "report"
    print(write_report(spec, _open(spec), out))
    return 0


def _dashboard(args: argparse.Namespace) -> int:
    from optuna_dashboard import run_server

    from .artifacts import open_artifact_store
    from .study import make_storage

    spec = load_spec(args.study)
    _open(spec)
    store = open_artifact_store(spec)
    print(f"optuna-dashboard for {spec.name} on http://{args.host}:{args.port}", file=sys.stderr)
    run_server(make_storage(spec), host=args.host, port=args.port, artifact_store=store)
    return 0


def _trial(args: argparse.Namespace) -> int:
    from .worker import run_worker

    return run_worker(load_spec(args.study), args.trial_number, args.trainer_url)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="autoresearch", description="Self-driving text-to-SQL post-training studies.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run (or resume) a study until its budget is spent")
    run.add_argument("study")
    run.add_argument("--n-trials", type=int, default=None, help="override the study's budget.n_trials")
    run.add_argument("--retry-failed", action="store_true",
                     help="queue every failed trial again with its parameters (they no longer count towards the budget)")
    run.add_argument("--dry-run", action="store_true",
                     help="check the study file, dataset, proposer and storage without training; the summary on stderr, "
                          "Kubernetes manifests alone on stdout")
    run.set_defaults(func=_run)

    status = sub.add_parser("status", help="show the study's trials")
    status.add_argument("study")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=_status)

    dashboard = sub.add_parser("dashboard", help="serve optuna-dashboard on the study's storage and artifacts")
    dashboard.add_argument("study")
    dashboard.add_argument("--host", default="127.0.0.1")
    dashboard.add_argument("--port", type=int, default=8080)
    dashboard.set_defaults(func=_dashboard)

    report = sub.add_parser("report", help="write a Markdown report with plots")
    report.add_argument("study")
    report.add_argument("--out", default=None, help="folder (default: <run folder>/report)")
    report.set_defaults(func=_report)

    best = sub.add_parser("best", help="print (and export) the best trial, or any trial, as a re-runnable run_trial call")
    best.add_argument("study")
    best.add_argument("--trial", type=int, default=None, metavar="N", help="export trial N instead of the best")
    best.add_argument("--export", default=None, metavar="FILE",
                      help="also write it to FILE: autoresearch.run_trial(**doc['run_trial'], trainer_url=...) re-runs it")
    best.set_defaults(func=_best)

    trial = sub.add_parser("trial", help="worker entry point: run one asked trial")
    trial.add_argument("--study", required=True)
    trial.add_argument("--trial-number", type=int, required=True)
    trial.add_argument("--trainer-url", default=None)
    trial.set_defaults(func=_trial)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "n_trials", None) is not None and args.n_trials < 1:
        print("error: --n-trials must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    try:
        return args.func(args)
    except (SpecError, CommandError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
