"""A local HTTP server that speaks Gemini's ``generateContent`` and OpenAI's ``chat/completions``, scripted per test.

The real ``google-genai`` and ``openai`` SDKs send real HTTP to it; each
request takes the next scripted action (a reply, an HTTP error, a hang).
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

GEMINI_PATH = re.compile(r"^/(v1|v1beta)/models/([^/:]+):generateContent$")
OPENAI_PATH = "/v1/chat/completions"


@dataclass
class Action:
    """One scripted answer: ``text`` as the model's reply, an HTTP ``status`` error, ``hang`` (send nothing) or
    ``trickle`` (send a byte at a time, forever) until the server stops."""

    text: str | None = None
    status: int = 200
    hang: bool = False
    trickle: bool = False
    refusal: str | None = None
    input_tokens: int = 100
    output_tokens: int = 20


def reply(proposals: list[dict[str, Any]], hypotheses: str = "x near the top of its range scores best",
          **extra: Any) -> Action:
    """A structured reply with these proposals (and any extra top-level keys)."""
    return Action(text=json.dumps({"hypotheses": hypotheses, "proposals": proposals, **extra}))


def proposal(x: float, rationale: str = "probe a new x", **extra: Any) -> dict[str, Any]:
    return {"params": {"x": x}, "rationale": rationale, **extra}


@dataclass
class LLMServer:
    """The server, its script, and every request it received (path and JSON body)."""

    script: list[Action] = field(default_factory=list)
    default: Action | None = None
    requests: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    _release: threading.Event = field(default_factory=threading.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def prompts(self) -> list[str]:
        """The user prompt of every request, whichever API it came through."""
        out = []
        for path, body in self.requests:
            if path == OPENAI_PATH:
                out.append(next(m["content"] for m in body["messages"] if m["role"] == "user"))
            else:
                out.append(body["contents"][0]["parts"][0]["text"])
        return out

    def _next(self) -> Action:
        if self.script:
            return self.script.pop(0)
        if self.default is None:
            raise AssertionError("the LLM server got a request its script did not expect")
        return self.default

    def start(self) -> "LLMServer":
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
                gemini = GEMINI_PATH.match(self.path)
                if not gemini and self.path != OPENAI_PATH:
                    return self._send(404, {"error": {"code": 404, "message": f"no route {self.path}"}})
                server.requests.append((self.path, body))
                server.keys.append(self.headers.get("x-goog-api-key") or self.headers.get("authorization", ""))
                action = server._next()
                if action.hang:
                    server._release.wait(60)
                    return
                if action.trickle:
                    return self._trickle()
                if action.status != 200:
                    error = {"error": {"code": action.status, "message": "scripted failure", "status": "UNAVAILABLE"}}
                    return self._send(action.status, error, {"retry-after-ms": "10"})
                if gemini:
                    return self._send(200, _gemini_body(action))
                return self._send(200, _openai_body(action, body.get("model", "")))

            def _trickle(self) -> None:
                """A reply that never ends: a byte every 0.1 s, so no single read ever times out."""
                try:
                    self.send_response(200)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", "100000")
                    self.end_headers()
                    while not server._release.wait(0.1):
                        self.wfile.write(b" ")
                        self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def _send(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    for key, value in {"content-type": "application/json", **(headers or {})}.items():
                        self.send_header(key, value)
                    self.send_header("content-length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (its timeout)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()


def _gemini_body(action: Action) -> dict[str, Any]:
    usage = {"promptTokenCount": action.input_tokens, "candidatesTokenCount": action.output_tokens,
             "totalTokenCount": action.input_tokens + action.output_tokens}
    if action.refusal is not None:
        return {"candidates": [{"finishReason": "SAFETY", "index": 0}], "usageMetadata": usage}
    return {"candidates": [{"content": {"role": "model", "parts": [{"text": action.text}]}, "finishReason": "STOP",
                            "index": 0}], "usageMetadata": usage, "modelVersion": "local"}


def _openai_body(action: Action, model: str) -> dict[str, Any]:
    message = {"role": "assistant", "content": None if action.refusal else action.text, "refusal": action.refusal}
    return {"id": "chatcmpl-local", "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": action.input_tokens, "completion_tokens": action.output_tokens,
                      "total_tokens": action.input_tokens + action.output_tokens}}


def serve() -> Iterator[LLMServer]:
    """For a pytest fixture: a started server, stopped afterwards."""
    server = LLMServer().start()
    try:
        yield server
    finally:
        server.stop()
