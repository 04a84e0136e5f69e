"""Request bodies: a size limit, bounded decompression, and free-form JSON objects.

Every route reads its body through :class:`LimitedBodyRoute` (each router's
``route_class``), after the app's middleware has authenticated the caller:

- a ``Content-Length`` over the limit is a 413 before any of the body is read;
- otherwise the body is read with a running count and refused (413) the moment it
  passes the limit, so an oversize body is never held whole;
- a ``Content-Encoding`` of ``gzip``, ``deflate`` or ``zstd`` is decompressed in a
  worker thread (never on the event loop), streaming, with the same limit on the
  output: a bomb stops at the limit whatever its frames declare. Any other
  encoding is a 415.

The default limit (``serve --max-body-bytes``, :func:`default_max_body_bytes`) is
16 MiB, or 256 bytes per token of ``--max-batch-tokens`` where that is more: about
4x the largest request the service accepts. A forward_backward of the default
65,536-token batch limit with four loss inputs (``target_tokens``, ``logprobs``,
``advantages``, ``weights``) is 1.6 MB as the current SDK's protobuf and 4.2 MB
(64 bytes a token) as older SDKs' JSON; the SDK splits batches into bodies of at
most 5 MB before compression (``fwdbwd_max_chunk_bytes_count``, which the
service advertises as at most half the limit).
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from fastapi import Request, Response
from fastapi.routing import APIRoute

from .exceptions import TooLarge, UserError

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
"""16 MiB: the least default for ``serve --max-body-bytes``; it bounds the body as sent and as decompressed."""
BODY_BYTES_PER_TOKEN = 256
"""Room per token of the batch limit: 4x the 64 bytes a token takes in the JSON of older SDKs."""

ENCODINGS = ("gzip", "x-gzip", "deflate", "zstd")
MAX_ZSTD_WINDOW = 1 << 23
"""8 MiB: the largest zstd window accepted (the SDK's level 3 uses 2 MiB, level 19 8 MiB); a frame
asking for more would make the decoder allocate it before writing a byte."""

_OUTPUT_STEP = 1 << 20
_DECOMPRESSORS = anyio.CapacityLimiter(4)
"""At most four bodies decompress at once, so concurrent bombs cost at most 4x the limit."""


class BodyTooLarge(TooLarge):
    """A 413 naming the limit and the flag that sets it."""

    def __init__(self, what: str, limit: int) -> None:
        super().__init__(
            f"request body {what} more than the limit of {limit} bytes ({limit / 2**20:g} MiB; "
            "serve --max-body-bytes sets it)"
        )


class UnsupportedEncoding(UserError):
    status_code = 415


def default_max_body_bytes(max_batch_tokens: int) -> int:
    """16 MiB, or 256 bytes per token of the batch limit where that is more."""
    return max(DEFAULT_MAX_BODY_BYTES, BODY_BYTES_PER_TOKEN * max_batch_tokens)


def max_body_bytes(request: Request) -> int:
    """The limit ``serve --max-body-bytes`` put on the app, else the default."""
    return int(getattr(request.app.state, "max_body_bytes", DEFAULT_MAX_BODY_BYTES))


def _inflate(body: bytes, encoding: str, limit: int) -> bytes:
    """gzip (several members too) or zlib/deflate, streaming, never more than ``limit`` bytes out."""
    out = bytearray()
    data = body
    while True:
        # wbits | 32 reads a gzip or a zlib header, whichever the stream has.
        inflater = zlib.decompressobj(zlib.MAX_WBITS | 32)
        try:
            while data:
                out += inflater.decompress(data, _OUTPUT_STEP)
                if len(out) > limit:
                    raise BodyTooLarge(f"decompresses ({encoding}) to", limit)
                if inflater.eof:
                    break
                data = inflater.unconsumed_tail
            out += inflater.flush(_OUTPUT_STEP)
        except zlib.error as exc:
            raise UserError(f"body is not valid {encoding}: {exc}") from exc
        if len(out) > limit:
            raise BodyTooLarge(f"decompresses ({encoding}) to", limit)
        if not inflater.eof:
            raise UserError(f"body is not valid {encoding}: the stream is truncated")
        data = inflater.unused_data
        if not data:
            return bytes(out)


def _unzstd(body: bytes, limit: int) -> bytes:
    """zstd, streaming, never more than ``limit`` bytes out: a frame's declared content size is ignored."""
    import zstandard

    out = bytearray()
    try:
        reader = zstandard.ZstdDecompressor(max_window_size=MAX_ZSTD_WINDOW).stream_reader(
            body, read_across_frames=True
        )
        while chunk := reader.read(_OUTPUT_STEP):
            out += chunk
            if len(out) > limit:
                raise BodyTooLarge("decompresses (zstd) to", limit)
    except zstandard.ZstdError as exc:
        hint = f" (windows over {MAX_ZSTD_WINDOW >> 20} MiB are refused; levels up to 19 stay within)" if (
            "too much memory" in str(exc)) else ""
        raise UserError(f"body is not valid zstd: {exc}{hint}") from exc
    return bytes(out)


def decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """``body`` decoded per its Content-Encoding, refused past ``limit`` bytes of output (blocking: run it in a thread)."""
    if encoding == "zstd":
        return _unzstd(body, limit)
    return _inflate(body, encoding, limit)


async def read_limited_body(request: Request, limit: int) -> bytes:
    """The body, decompressed, or a 413/415/400 as soon as it is known to be one (see the module docstring)."""
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding not in ("", "identity") and encoding not in ENCODINGS:
        raise UnsupportedEncoding(
            f"Content-Encoding {encoding!r} is not supported; send gzip, deflate, zstd or none"
        )
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise UserError(f"Content-Length {declared!r} is not a number of bytes")
        if int(declared) > limit:
            raise BodyTooLarge(f"is {int(declared)} bytes (Content-Length),", limit)
    received = bytearray()
    async for chunk in request.stream():
        received += chunk
        if len(received) > limit:
            raise BodyTooLarge("is", limit)
    body = bytes(received)
    del received
    if encoding in ENCODINGS and body:
        body = await anyio.to_thread.run_sync(decompress, body, encoding, limit, limiter=_DECOMPRESSORS)
    return body


class LimitedBodyRoute(APIRoute):
    """An APIRoute whose body is read through :func:`read_limited_body` before FastAPI parses it."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()

        async def limited(request: Request) -> Response:
            # Starlette's Request.body() returns ``_body`` once it is set; FastAPI and the routes read that.
            request._body = await read_limited_body(request, max_body_bytes(request))
            return await handler(request)

        return limited


async def decoded_body(request: Request) -> bytes:
    """The request body, already size-checked and decompressed by :class:`LimitedBodyRoute`."""
    return await request.body()


def parse_json_object(body: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(body or b"{}")
    except RecursionError:
        raise UserError("the JSON body is nested too deeply") from None
    except ValueError as exc:
        raise UserError(f"body is neither protobuf nor JSON: {exc}") from exc
    if not isinstance(payload, dict):
        raise UserError("the JSON body must be an object")
    return payload


async def json_object(request: Request) -> dict[str, Any]:
    """A JSON object body for the few routes that take free-form JSON."""
    return parse_json_object(await request.body())
