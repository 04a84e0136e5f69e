"""A self-hosted model behind an OpenAI-compatible chat API (a Gemma served by vLLM, for instance)."""

from __future__ import annotations

import os

from ..spec import ProposerSpec, from_env
from .base import LLMReply, Prompt, ProposerError


class OpenAICompatibleProposer:
    """Chat completions with a strict ``json_schema`` response format, through the ``openai`` SDK.

    The key is read from ``api_key = "env:NAME"`` (default ``OPENAI_API_KEY``); servers that need none get a placeholder.
    """

    def __init__(self, config: ProposerSpec) -> None:
        import openai

        self.model = config.model or ""
        key = from_env(config.api_key, "api_key") if config.api_key else os.environ.get("OPENAI_API_KEY")
        self._client = openai.OpenAI(base_url=config.base_url, api_key=key or "unused",
                                     timeout=config.timeout_s, max_retries=config.max_retries)

    def complete(self, prompt: Prompt) -> LLMReply:
        response = self._client.chat.completions.create(
            model=self.model,
            messages=[{"role": "system", "content": prompt.system}, {"role": "user", "content": prompt.user}],
            response_format={"type": "json_schema",
                             "json_schema": {"name": "proposals", "schema": prompt.schema, "strict": True}},
        )
        usage = response.usage
        tokens_in, tokens_out = (usage.prompt_tokens, usage.completion_tokens) if usage else (0, 0)
        if not response.choices:
            raise ProposerError("no choices in the reply")
        message = response.choices[0].message
        if getattr(message, "refusal", None):
            raise ProposerError(f"the model refused: {message.refusal[:200]}")
        if not message.content:
            raise ProposerError(f"no reply text (finish reason {response.choices[0].finish_reason})")
        return LLMReply(message.content, tokens_in, tokens_out)
