"""Gemini through ``google-genai``: structured output, explicit timeout and retries, token usage per call."""

from __future__ import annotations

from ..spec import ProposerSpec, from_env
from .base import LLMReply, Prompt, ProposerError

RETRIED_STATUS = [408, 429, 500, 502, 503, 504]


class GeminiProposer:
    """Calls ``models.generate_content`` with ``response_schema``; the API key or Vertex AI project comes from the
    study file or the environment (``api_key = "env:NAME"``, else the SDK's own ``GEMINI_API_KEY``/``GOOGLE_API_KEY``)."""

    def __init__(self, config: ProposerSpec) -> None:
        from google import genai
        from google.genai import types

        self.model = config.model or ""
        self._types = types
        retry = types.HttpRetryOptions(
            attempts=config.max_retries + 1, initial_delay=config.retry_delay_s, max_delay=max(config.retry_delay_s, 1) * 8,
            jitter=config.retry_delay_s, http_status_codes=RETRIED_STATUS,
        )
        http = types.HttpOptions(base_url=config.base_url, api_version=config.api_version,
                                 timeout=int(config.timeout_s * 1000), retry_options=retry)
        if config.vertex_project:
            self._client = genai.Client(vertexai=True, project=config.vertex_project, location=config.vertex_location,
                                        http_options=http)
        else:
            key = from_env(config.api_key, "api_key") if config.api_key else None
            self._client = genai.Client(api_key=key, http_options=http)

    def complete(self, prompt: Prompt) -> LLMReply:
        response = self._client.models.generate_content(
            model=self.model,
            contents=prompt.user,
            config=self._types.GenerateContentConfig(
                system_instruction=prompt.system, response_mime_type="application/json",
                response_schema=prompt.schema, candidate_count=1,
            ),
        )
        usage = response.usage_metadata
        tokens_in = (usage.prompt_token_count or 0) if usage else 0
        tokens_out = ((usage.candidates_token_count or 0) + (usage.thoughts_token_count or 0)) if usage else 0
        text = response.text
        if not text:
            blocked = response.prompt_feedback.block_reason if response.prompt_feedback else None
            finish = response.candidates[0].finish_reason if response.candidates else None
            raise ProposerError(f"no reply text (block reason {blocked}, finish reason {finish})")
        return LLMReply(text, tokens_in, tokens_out)
