"""LLM-guided proposals: an LLM reads the study so far and proposes a share of the next trials.

Optuna's sampler owns the study; :class:`~.scheduler.ProposalScheduler` decides
which asks go to the LLM, validates what it returns against the declared
space, and falls back to the sampler whenever the LLM fails, so a study never
waits on it.
"""

from .base import LLMReply, Proposer, ProposerError
from .scheduler import ProposalScheduler, make_scheduler

__all__ = ["LLMReply", "ProposalScheduler", "Proposer", "ProposerError", "make_scheduler"]
