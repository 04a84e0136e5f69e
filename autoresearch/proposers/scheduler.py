"""Hybrid scheduling: Optuna's sampler owns the study, the LLM proposes a share of the trials.

The controller asks every trial through :meth:`ProposalScheduler.ask`. Slot
``k`` (counting the study's trials that are not retries, read from storage so
that a restarted controller agrees) goes to the LLM when
``floor((k+1)*share) > floor(k*share)``. An LLM slot enqueues a validated,
deduplicated proposal and asks it; any failure (timeout, HTTP error, invalid
JSON, refusal, every proposal rejected, budget spent) asks the sampler
instead and records why on the trial. The call runs on a helper thread with
a hard deadline, so the controller never waits longer on one call, and after
a failure LLM slots go to the sampler for ``failure_cooldown_s``.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

from ..spec import SpecError, StudySpec
from .base import LLMReply, Prompt, Proposer, ProposerError
from .factory import make_proposer, notes_path
from .prompt import build_prompt
from .replay import Recorder
from .validate import Checked, Rejected, check, duplicate_of

log = logging.getLogger("autoresearch.proposer")

USAGE_ATTR = "proposer_usage"
HYPOTHESES_ATTR = "llm_hypotheses"
LLM = "llm"
REPLY_FIELDS = {"hypotheses", "proposals"}


def is_llm_slot(k: int, share: float) -> bool:
    """Whether fresh slot ``k`` (0-based) goes to the LLM: exactly ``share`` of slots, spread evenly."""
    return math.floor((k + 1) * share + 1e-9) > math.floor(k * share + 1e-9)


@dataclass
class Usage:
    """LLM calls and tokens spent by this study, kept in the study's user attrs (``status`` reads them)."""

    calls: int = 0
    failures: int = 0
    input_tokens: int = 0
    output_tokens: int = 0

    def cost_usd(self, spec: StudySpec) -> float:
        p = spec.proposer
        return (self.input_tokens * p.usd_per_million_input_tokens + self.output_tokens * p.usd_per_million_output_tokens) / 1e6


@dataclass
class Outcome:
    """What one LLM slot produced: a proposal to run, or the reason it fell back; rejections either way."""

    proposal: Checked | None = None
    fallback: str = ""
    rejections: list[str] = field(default_factory=list)
    call: dict[str, Any] | None = None


class ProposalScheduler:
    """Asks trials for the controller, from the LLM for its share of slots and from the sampler otherwise."""

    def __init__(self, spec: StudySpec, study: optuna.Study, space: dict[str, BaseDistribution],
                 proposer: Proposer | None) -> None:
        self._spec, self._study, self._space, self._proposer = spec, study, space, proposer
        self._pending: list[Checked] = []
        self._failed_at: float | None = None
        self.usage = Usage(**study.user_attrs.get(USAGE_ATTR, {}))

    def ask(self) -> int:
        """Ask the next trial and return its number."""
        if self._proposer is None:
            return self._study.ask(self._space).number
        trials = self._study.get_trials(deepcopy=False)
        fresh = sum("failed_trial" not in t.system_attrs for t in trials)
        # A waiting trial (a retry) is asked first anyway: it takes this ask, not a fresh slot.
        if any(t.state == TrialState.WAITING for t in trials) or not is_llm_slot(fresh, self._spec.proposer.share):
            return self._study.ask(self._space).number
        outcome = self._next_proposal(trials)
        if outcome.proposal is None:
            trial = self._study.ask(self._space)
            log.warning("trial %d: LLM slot fell back to the sampler: %s", trial.number, outcome.fallback)
            trial.set_user_attr("proposer_fallback", outcome.fallback)
        else:
            proposal = outcome.proposal
            self._study.enqueue_trial(proposal.params, user_attrs={
                "proposer": LLM, "proposer_model": f"{self._spec.proposer.type}:{self._proposer.model}",
                "rationale": proposal.rationale, "proposal_adjustments": proposal.adjustments,
            })
            trial = self._study.ask(self._space)  # its note, from these attrs, is the controller's (review.py)
        if outcome.rejections:
            trial.set_user_attr("proposal_rejections", outcome.rejections)
        if outcome.call:
            trial.set_user_attr("proposer_call", outcome.call)
        return trial.number

    def _next_proposal(self, trials: list[FrozenTrial]) -> Outcome:
        """A queued proposal that is still new, else a fresh LLM call's first acceptable one."""
        outcome = Outcome()
        while self._pending:
            queued = self._pending.pop(0)
            duplicate = duplicate_of(queued.params, trials, [])
            if duplicate is None:
                outcome.proposal = queued
                return outcome
            outcome.rejections.append(duplicate)
        cap = self._spec.proposer
        if self.usage.calls >= cap.max_calls or self.usage.input_tokens + self.usage.output_tokens >= cap.max_tokens:
            outcome.fallback = (f"LLM budget spent: {self.usage.calls} of {cap.max_calls} calls, "
                                f"{self.usage.input_tokens + self.usage.output_tokens} of {cap.max_tokens} tokens")
            return outcome
        if self._failed_at is not None and time.monotonic() - self._failed_at < cap.failure_cooldown_s:
            # Several LLM slots in one round of asks must not each wait out a dead LLM's deadline.
            outcome.fallback = (f"the last LLM call failed {time.monotonic() - self._failed_at:.0f} s ago; "
                                f"the next is tried {cap.failure_cooldown_s:g} s after it")
            return outcome
        try:
            accepted = self._call(trials, outcome)
        except Exception as error:  # noqa: BLE001 - whatever the LLM path raises, the slot goes to the sampler
            self.usage.failures += 1
            self._save_usage()
            self._failed_at = time.monotonic()
            outcome.fallback = f"{type(error).__name__}: {str(error)[:300]}"
            return outcome
        self._failed_at = None
        if not accepted:
            outcome.fallback = f"no acceptable proposal ({len(outcome.rejections)} rejected)"
            return outcome
        outcome.proposal, self._pending = accepted[0], accepted[1:]
        return outcome

    def _call(self, trials: list[FrozenTrial], outcome: Outcome) -> list[Checked]:
        """One LLM call: prompt, reply, parse, validate, deduplicate. Raises on anything unusable.

        The call's tokens go on ``outcome`` (the trial of this slot records them) and into the study's usage.
        """
        assert self._proposer is not None
        cap = self._spec.proposer
        notes = self._notes()
        prompt = build_prompt(self._spec, self._space, trials, notes, cap.proposals_per_call)
        self.usage.calls += 1  # a call that fails counts too: the cap bounds the time spent waiting as well
        reply = self._complete(prompt)
        if isinstance(self._proposer, Recorder):  # only replies that arrived in time were used: keep those
            self._proposer.keep(prompt, reply)
        self.usage.input_tokens += reply.input_tokens
        self.usage.output_tokens += reply.output_tokens
        self._save_usage()
        outcome.call = {"input_tokens": reply.input_tokens, "output_tokens": reply.output_tokens,
                        "prompt_sha256": prompt.key(self._proposer.model)}
        hypotheses, proposals = parse_reply(reply.text)
        if hypotheses:
            self._study.set_user_attr(HYPOTHESES_ATTR, hypotheses)
            _note(self._study, f"## LLM hypotheses (after {len(trials)} trials)\n\n{hypotheses}\n")
        accepted: list[Checked] = []
        for raw in proposals[: cap.proposals_per_call]:
            try:
                checked = check(raw, self._space, clamp=cap.out_of_range == "clamp")
            except Rejected as error:
                outcome.rejections.append(str(error))
                continue
            duplicate = duplicate_of(checked.params, trials, [c.params for c in accepted])
            if duplicate:
                outcome.rejections.append(duplicate)
            else:
                accepted.append(checked)
        return accepted

    def _complete(self, prompt: Prompt) -> LLMReply:
        """The proposer's call on a daemon thread, abandoned after the deadline (its timeout, retries and waits)."""
        assert self._proposer is not None
        deadline = self._spec.proposer.deadline
        box: dict[str, Any] = {}

        def call() -> None:
            try:
                box["reply"] = self._proposer.complete(prompt)  # type: ignore[union-attr]
            except BaseException as error:  # noqa: BLE001 - handed back to the controller's thread
                box["error"] = error

        thread = threading.Thread(target=call, name="llm-proposer", daemon=True)
        thread.start()
        thread.join(deadline)
        if "error" in box:
            raise box["error"]
        if "reply" not in box:
            raise ProposerError(f"no reply within {deadline:g} s")
        return box["reply"]

    def _notes(self) -> str | None:
        """The research notes, read at every call so that edits during a study count."""
        path = notes_path(self._spec)
        return path.read_text() if path else None

    def _save_usage(self) -> None:
        self._study.set_user_attr(USAGE_ATTR, self.usage.__dict__.copy())


def parse_reply(text: str) -> tuple[str | None, list[Any]]:
    """The reply's hypotheses and raw proposals; a reply that is not exactly ``{hypotheses, proposals}`` is refused."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ProposerError(f"reply is not valid JSON ({error})") from None
    if not isinstance(data, dict) or not isinstance(data.get("proposals"), list):
        raise ProposerError("reply has no 'proposals' list")
    extra = sorted(set(data) - REPLY_FIELDS)
    if extra:
        raise ProposerError(f"reply has unknown field(s) {', '.join(map(repr, extra))}")
    hypotheses = data.get("hypotheses")
    return (hypotheses.strip()[:4000] or None) if isinstance(hypotheses, str) else None, data["proposals"]


def _note(study: optuna.Study, body: str) -> None:
    """The study's optuna-dashboard note (Markdown), the LLM's hypotheses; imported here, when the LLM has
    proposed something, rather than by every controller at start-up."""
    from optuna_dashboard import save_note

    save_note(study, body)


def make_scheduler(spec: StudySpec, study: optuna.Study, space: dict[str, BaseDistribution]) -> ProposalScheduler:
    """The controller's scheduler; a proposer that cannot start (no key, no cassette, no notes) is a one-line error."""
    try:
        path = notes_path(spec)
        if path is not None and not path.is_file():
            raise ProposerError(f"research notes {path} do not exist")
        proposer = make_proposer(spec)
    except (ProposerError, ValueError) as error:
        raise SpecError(f"{spec.path}: proposer: {error}") from None
    return ProposalScheduler(spec, study, space, proposer)
