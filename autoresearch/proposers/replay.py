"""Record/replay: a cassette (JSONL) of raw LLM replies keyed by the hash of prompt, model and schema.

``record`` calls the LLM and appends each reply; ``replay`` answers from the
cassette alone, so a study re-runs deterministically without the LLM (CI
does this). A prompt the cassette lacks is a ProposerError: that slot falls
back to the sampler like any other LLM failure.
"""

from __future__ import annotations

import json
from pathlib import Path

from .base import LLMReply, Prompt, Proposer, ProposerError


class Cassette:
    """Replies by prompt key; later lines win, so a re-recorded prompt replaces the old reply."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._replies: dict[str, LLMReply] = {}
        if path.is_file():
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if line.strip():
                    try:
                        entry = json.loads(line)
                        self._replies[entry["key"]] = LLMReply(entry["text"], entry.get("input_tokens", 0),
                                                               entry.get("output_tokens", 0))
                    except (json.JSONDecodeError, KeyError, TypeError) as error:
                        raise ValueError(f"{path}:{number}: not a cassette entry ({error})") from None

    def get(self, key: str) -> LLMReply | None:
        return self._replies.get(key)

    def put(self, key: str, model: str, reply: LLMReply) -> None:
        self._replies[key] = reply
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as out:
            out.write(json.dumps({"key": key, "model": model, "text": reply.text, "input_tokens": reply.input_tokens,
                                  "output_tokens": reply.output_tokens}) + "\n")


class Recorder:
    """Pass calls through to ``inner``; the scheduler keeps the replies it used in the cassette.

    Not ``complete`` itself: a reply that arrives after the scheduler's deadline
    was not used (the sampler took that slot), and replaying it would run a
    different study.
    """

    def __init__(self, inner: Proposer, cassette: Cassette) -> None:
        self.model, self._inner, self._cassette = inner.model, inner, cassette

    def complete(self, prompt: Prompt) -> LLMReply:
        return self._inner.complete(prompt)

    def keep(self, prompt: Prompt, reply: LLMReply) -> None:
        self._cassette.put(prompt.key(self.model), self.model, reply)


class Replayer:
    """Answer from the cassette only; never contacts an LLM."""

    def __init__(self, model: str, cassette: Cassette) -> None:
        self.model, self._cassette = model, cassette

    def complete(self, prompt: Prompt) -> LLMReply:
        reply = self._cassette.get(prompt.key(self.model))
        if reply is None:
            raise ProposerError(f"replay: no reply recorded for this prompt in {self._cassette.path}")
        return reply
