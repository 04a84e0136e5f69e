"""What every proposer backend shares: the prompt it is given, the reply it returns, the error it raises."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Protocol


class ProposerError(RuntimeError):
    """An LLM call that gave no usable reply (HTTP error, timeout, refusal, empty text); the slot falls back."""


@dataclass(frozen=True)
class Prompt:
    """The instruction (trusted, ours) and the study context (which quotes untrusted trial output)."""

    system: str
    user: str
    schema: dict[str, Any]

    def key(self, model: str) -> str:
        """The record/replay key: the same prompt to the same model with the same schema gets the same reply."""
        blob = json.dumps([self.system, self.user, model, self.schema], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class LLMReply:
    """The model's raw text (parsed and validated by the scheduler, never trusted) and the tokens it cost."""

    text: str
    input_tokens: int = 0
    output_tokens: int = 0


class Proposer(Protocol):
    """One LLM backend. ``complete`` must raise (any exception) rather than return a reply it cannot stand by."""

    model: str

    def complete(self, prompt: Prompt) -> LLMReply:
        """Send ``prompt`` and return the raw structured reply."""
