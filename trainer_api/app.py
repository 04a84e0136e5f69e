"""FastAPI routes that make this service a drop-in server for the tinker SDK (0.38).

Every route speaks the SDK's wire format: JSON bodies validated by the pydantic
models in ``schemas.py`` (a bad field is a 400 with the field named), protobuf for
forward_backward bodies and for forward_backward/sample results when the client
asks for it, and ``{"error", "category"}`` for every failure.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
import uuid
import zlib
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from . import metrics, wire
from .checkpoints import CheckpointError, CheckpointNotFound, checkpoint_ref, iso, parse_path
from .engine import BASE_SNAPSHOT, AdamStep, Engine, LoraSpec, NotFound, ServiceError, UserError
from .futures import FutureStore
from .losses import LossConfigError
from .sampling import SampleTask, SamplingSpec
from .schemas import (
    ClientConfigBody,
    CreateModelBody,
    CreateSamplingSessionBody,
    CreateSessionBody,
    LoadWeightsBody,
    LoraBody,
    ModelBody,
    OptimStepBody,
    RetrieveBody,
    SampleBody,
    SamplingParamsBody,
    SaveExternalBody,
    SaveForSamplerBody,
    SaveWeightsBody,
    SessionBody,
    TtlBody,
    WeightsInfoBody,
)
from .service import Service, SessionState

log = logging.getLogger("trainer_api.app")

POLL_SECONDS = 20.0
"""How long retrieve_future holds a request open; well under the SDK's 45 s read timeout."""


_UNIMPLEMENTED: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"/copy_weights$"), "there are no projects to copy between; all checkpoints share one store"),
    (re.compile(r"/sessions/[^/]+/project$|/audit|/billing/"), "a self-hosted service has no projects, billing or audit log"),
    (re.compile(r"/trace_export$"), "session traces are not recorded"),
    (re.compile(r"/sessions/search$"), "session search is not implemented; list_sessions and get_session are"),
    (re.compile(r"/publish$"), "there is no public checkpoint sharing; every caller with the API key sees every checkpoint"),
    (re.compile(r"/create_custom_loss$"), "custom losses run client-side (client config custom_loss_server_side is false)"),
    (re.compile(r"/retrieve_futures$"), "sampling results are polled per request (sample_use_retrieve_futures is false)"),
    (re.compile(r"/auth/token$|/whoami$"), "JWT authentication is not implemented; send X-API-Key"),
]
"""SDK endpoints this service does not implement, and why (said in the 404's message)."""


def _error(status: int, message: str, category: str = "user") -> JSONResponse:
    return JSONResponse({"error": message, "category": category, "detail": message}, status_code=status)


def _classify(exc: BaseException) -> tuple[int, str, str]:
    """HTTP status, SDK error category and message for an exception, in one place."""
    if isinstance(exc, ServiceError):
        return exc.status_code, exc.category, str(exc)
    if isinstance(exc, CheckpointNotFound):
        return 404, "user", str(exc)
    if isinstance(exc, (CheckpointError, LossConfigError, wire.WireError)):
        return 400, "user", str(exc)
    return 500, "server", f"internal error: {type(exc).__name__}: {exc}"


def _failure_payload(exc: BaseException) -> dict[str, str]:
    """The body retrieve_future returns for a request that failed."""
    _, category, message = _classify(exc)
    return {"error": message, "category": category}


def _sampling_spec(engine: Engine, params: SamplingParamsBody, prompt_len: int) -> SamplingSpec:
    """Map the SDK's SamplingParams: ``stop=None`` means EOS, ``[]`` means no stop at all."""
    stop = params.stop
    if stop is None:
        stop_ids, stop_strings = engine.eos_ids, ()
    elif isinstance(stop, str):
        stop_ids, stop_strings = frozenset(), (stop,)
    elif all(isinstance(s, int) for s in stop):
        stop_ids, stop_strings = frozenset(stop), ()
    else:
        stop_ids, stop_strings = frozenset(), tuple(stop)
    max_tokens = params.max_tokens
    if max_tokens is None:
        max_tokens = min(engine.limits.max_sample_tokens, engine.max_seq_len - prompt_len)
    if max_tokens > engine.limits.max_sample_tokens:
        raise UserError(f"max_tokens {max_tokens} exceeds this service's limit of {engine.limits.max_sample_tokens}")
    return SamplingSpec(
        max_tokens=max_tokens,
        temperature=params.temperature,
        top_k=params.top_k,
        top_p=params.top_p,
        seed=params.seed,
        stop_token_ids=stop_ids,
        stop_strings=stop_strings,
    )


async def _decoded_body(request: Request) -> bytes:
    """The request body, decompressed per Content-Encoding (the SDK can zstd its protobuf bodies)."""
    body = await request.body()
    encoding = request.headers.get("content-encoding", "").lower()
    if encoding == "zstd":
        import zstandard

        try:
            return zstandard.ZstdDecompressor().decompress(body, max_output_size=1 << 30)
        except zstandard.ZstdError as exc:
            raise UserError(f"body is not valid zstd: {exc}") from exc
    if encoding in ("gzip", "deflate"):
        try:
            return zlib.decompress(body, zlib.MAX_WBITS | 32)
        except zlib.error as exc:
            raise UserError(f"body is not valid {encoding}: {exc}") from exc
    return body


def _parse_json_object(body: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(body or b"{}")
    except ValueError as exc:
        raise UserError(f"body is neither protobuf nor JSON: {exc}") from exc
    if not isinstance(payload, dict):
        raise UserError("the JSON body must be an object")
    return payload


async def _json_object(request: Request) -> dict[str, Any]:
    """A JSON object body for the few routes that take free-form JSON."""
    return _parse_json_object(await request.body())


def create_app(service: Service, session_timeout: float | None = 300.0) -> FastAPI:
    """Build the FastAPI app; all state lives in ``service``.

    Routes that may read checkpoints from disk are plain ``def`` functions, which FastAPI
    runs in its thread pool, so a large checkpoint never stalls the event loop that
    answers everyone's polls. Sessions silent for ``session_timeout`` seconds (the SDK
    sends a heartbeat every 10 s) are finished and their adapters unloaded.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        reaper = None
        if session_timeout:
            async def reap_forever() -> None:
                while True:
                    await asyncio.sleep(min(30.0, session_timeout / 4))
                    service.reap_expired(session_timeout)

            reaper = asyncio.create_task(reap_forever())
        yield
        if reaper is not None:
            reaper.cancel()

    app = FastAPI(title="trainer_api", version="0.1.0", lifespan=lifespan)
    engine = service.engine

    @app.middleware("http")
    async def auth_and_log(request: Request, call_next):
        start = time.perf_counter()
        path = request.url.path
        if (
            service.api_key
            and path.startswith("/api/")
            and path != "/api/v1/healthz"
            and not hmac.compare_digest(request.headers.get("x-api-key", "").encode(), service.api_key.encode())
        ):
            given = "missing" if "x-api-key" not in request.headers else "wrong"
            response: Response = _error(401, f"{given} X-API-Key header: this service requires its API key")
        else:
            response = await call_next(request)
        route = request.scope.get("route")
        service.requests[(getattr(route, "path", "unmatched"), response.status_code)] += 1
        log.info(
            "request",
            extra={"method": request.method, "path": path, "status": response.status_code,
                   "ms": round((time.perf_counter() - start) * 1000, 2)},
        )
        return response

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'] if p != 'body') or 'body'}: {err['msg']}" for err in exc.errors()
        )
        return _error(400, f"invalid request body: {problems}")

    async def on_known_error(request: Request, exc: Exception):
        status, category, message = _classify(exc)
        return _error(status, message, category)

    for known in (ServiceError, CheckpointError, LossConfigError, wire.WireError):
        app.add_exception_handler(known, on_known_error)

    # ------------------------------------------------------------ service and sessions
    @app.get("/api/v1/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.post("/api/v1/client/config")
    async def client_config(body: ClientConfigBody):
        return {
            "pjwt_auth_enabled": False,
            "credential_default_source": "api_key",
            "parallel_fwdbwd_chunks": False,
            "proto_compress_fwdbwd": False,
            "fwdbwd_max_chunk_len": engine.limits.max_batch_datums,
            "sample_use_retrieve_futures": False,
            "custom_loss_server_side": False,
            "sample_join_sampling_session": True,
            "use_pyqwest_transport": False,
        }

    @app.post("/api/v1/client/dynamic_config")
    async def client_dynamic_config(body: ClientConfigBody):
        return {"refresh_interval_sec": 300, "sample_cancel_enabled": True}

    @app.get("/api/v1/get_server_capabilities")
    async def capabilities():
        return {
            "supported_models": [
                {"model_name": service.model_name, "max_context_length": engine.max_seq_len,
                 "trainable": True, "sampleable": True}
            ]
        }

    @app.post("/api/v1/create_session")
    async def create_session(body: CreateSessionBody):
        session_id = f"session-{uuid.uuid4().hex[:16]}"
        service.sessions[session_id] = SessionState(session_id, body.user_metadata, body.display_name)
        log.info("session created", extra={"session_id": session_id, "sdk_version": body.sdk_version})
        return {"type": "create_session", "session_id": session_id}

    @app.post("/api/v1/session_heartbeat")
    async def heartbeat(body: SessionBody):
        session = service.session(body.session_id)
        if session.finished is not None:
            # 410 tells the SDK to stop its heartbeat loop.
            return _error(410, f"session {body.session_id} has finished ({session.finished})")
        session.last_heartbeat = time.time()
        return {"type": "session_heartbeat"}

    @app.post("/api/v1/sessions/{session_id}/finish")
    async def finish_session(session_id: str, request: Request):
        payload = await _json_object(request)
        reason = payload.get("reason")
        service.finish_session(session_id, str(reason.get("type", "success") if isinstance(reason, dict) else "success"))
        return {}

    @app.get("/api/v1/sessions/{session_id}")
    async def get_session(session_id: str):
        s = service.session(session_id)
        return {
            "training_run_ids": s.training_run_ids,
            "sampler_ids": s.sampler_ids,
            "user_metadata": {k: str(v) for k, v in (s.user_metadata or {}).items()},
            "display_name": s.display_name,
        }

    @app.get("/api/v1/sessions")
    async def list_sessions(limit: int = 20, offset: int = 0):
        return {"sessions": list(service.sessions)[offset : offset + limit]}

    @app.post("/api/v1/telemetry")
    async def telemetry(request: Request):
        return {"status": "accepted"}

    # ------------------------------------------------------------ training
    @app.post("/api/v1/create_model")
    async def create_model(body: CreateModelBody):
        session = service.live_session(body.session_id)
        engine.check_base_model(body.base_model)
        if body.optimizer_config.type != "adamw":
            raise UserError(f"optimizer {body.optimizer_config.type!r} is not supported; only 'adamw'")
        lora = body.lora_config or LoraBody(rank=32)
        model_id = f"{body.session_id}:train:{body.model_seq_id}"
        future = engine.create_model(
            model_id, body.session_id,
            LoraSpec(lora.rank, lora.seed, lora.train_mlp, lora.train_attn, lora.train_unembed),
            body.user_metadata or {},
        )
        session.training_run_ids.append(model_id)
        return service.future_response(
            future, lambda mid: {"type": "create_model", "model_id": mid}, "create_model", model_id=model_id
        )

    @app.post("/api/v1/get_info")
    async def get_info(body: ModelBody):
        tenant = engine.tenant(body.model_id)
        return {
            "type": "get_info",
            "model_data": {"arch": engine.arch, "model_name": service.model_name, "tokenizer_id": service.model_name},
            "model_id": tenant.model_id,
            "optimizer_config": {"type": "adamw"},
            "is_lora": True,
            "lora_rank": tenant.lora.rank,
            "model_name": service.model_name,
        }

    @app.post("/api/v1/unload_model")
    async def unload_model(body: ModelBody):
        future = engine.unload(body.model_id)
        return service.future_response(
            future, lambda mid: {"type": "unload_model", "model_id": mid}, "unload_model", model_id=body.model_id
        )

    async def _forward_backward(request: Request, forward_only: bool | None) -> dict[str, Any]:
        body = await _decoded_body(request)
        if wire.PROTO_CONTENT_TYPE in request.headers.get("content-type", ""):
            req = wire.decode_forward_backward_proto(body, forward_only)
        else:
            req = wire.decode_forward_backward_json(_parse_json_object(body), bool(forward_only))
        future = engine.forward_backward(req)
        return service.future_response(future, lambda out: out, "forward_backward", model_id=req.model_id)

    @app.post("/api/v1/forward_backward")
    async def forward_backward(request: Request):
        return await _forward_backward(request, None)

    @app.post("/api/v1/forward")
    async def forward(request: Request):
        return await _forward_backward(request, True)

    @app.post("/api/v1/optim_step")
    async def optim_step(body: OptimStepBody):
        if body.optimizer_params is not None:
            raise UserError(f"optimizer {body.optimizer_params.get('type')!r} is not supported; send adam_params")
        future = engine.optim_step(body.model_id, body.adam_params or AdamStep())
        return service.future_response(future, lambda m: {"metrics": m}, "optim_step", model_id=body.model_id)

    @app.post("/api/v1/save_weights")
    async def save_weights(body: SaveWeightsBody):
        name = body.path or f"step-{engine.tenant(body.model_id).steps:06d}-{uuid.uuid4().hex[:6]}"
        future = engine.save_state(body.model_id, name, body.overwrite, body.user_metadata, body.ttl_seconds)
        return service.future_response(future, lambda p: {"type": "save_weights", "path": p}, "save_weights", model_id=body.model_id)

    @app.post("/api/v1/save_weights_for_sampler")
    async def save_weights_for_sampler(body: SaveForSamplerBody):
        tenant = engine.tenant(body.model_id)
        if body.path is None and body.sampling_session_seq_id is None:
            raise UserError("save_weights_for_sampler needs a path (name) or a sampling_session_seq_id")
        future = engine.save_for_sampler(body.model_id, body.path, body.user_metadata, body.ttl_seconds)
        sampler_id = (
            f"{tenant.session_id}:sample:{body.sampling_session_seq_id}"
            if body.path is None else None
        )

        def encode(key: str) -> dict[str, Any]:
            if sampler_id is not None and sampler_id not in service.samplers:
                service.open_sampler(tenant.session_id, sampler_id, key, None)
            path = key if key.startswith("tinker://") else None
            return {"type": "save_weights_for_sampler", "path": path, "sampling_session_id": sampler_id}

        return service.future_response(future, encode, "save_weights_for_sampler", model_id=body.model_id)

    @app.post("/api/v1/save_weights_external")
    async def save_weights_external(body: SaveExternalBody):
        if body.age_encryption_recipients:
            raise UserError("age encryption of exported weights is not implemented by this service")
        future = engine.save_external(body.model_id, body.path, body.ttl_seconds)
        return service.future_response(
            future, lambda out: {"type": "save_weights_external", "path": out[0], "size_bytes": out[1]},
            "save_weights_external", model_id=body.model_id,
        )

    @app.post("/api/v1/load_weights")
    def load_weights(body: LoadWeightsBody):
        if body.session_id is not None:
            if body.model_seq_id is None:
                raise UserError("load_weights with session_id also needs model_seq_id")
            session = service.live_session(body.session_id)
            engine.check_base_model(body.base_model)
            model_id = f"{body.session_id}:train:{body.model_seq_id}"
            future = engine.load_state(model_id, body.path, body.optimizer,
                                       create=(body.session_id, body.user_metadata or {}))
            session.training_run_ids.append(model_id)
        elif body.model_id is not None:
            model_id = body.model_id
            future = engine.load_state(model_id, body.path, body.optimizer)
        else:
            raise UserError("load_weights needs either model_id or session_id and model_seq_id")
        return service.future_response(
            future, lambda p: {"type": "load_weights", "path": p, "model_id": model_id}, "load_weights", model_id=model_id
        )

    @app.post("/api/v1/weights_info")
    def weights_info(body: WeightsInfoBody):
        ref = parse_path(body.tinker_path)
        loaded = engine.store.load(ref, with_optimizer=False)
        lora = loaded.meta["lora"]
        return {
            "base_model": loaded.meta["base_model"], "optimizer_config": {"type": "adamw"}, "is_lora": True,
            "lora_rank": lora["rank"], "train_unembed": lora["train_unembed"],
            "train_mlp": lora["train_mlp"], "train_attn": lora["train_attn"],
        }

    # ------------------------------------------------------------ sampling
    @app.post("/api/v1/create_sampling_session")
    def create_sampling_session(body: CreateSamplingSessionBody):
        service.live_session(body.session_id)
        if body.model_path is None:
            if body.base_model is None:
                raise UserError("create_sampling_session needs model_path or base_model")
            engine.check_base_model(body.base_model)
        key = body.model_path or BASE_SNAPSHOT
        engine.snapshot(key)  # fail now, not at the first sample, if the checkpoint is missing
        sampler_id = f"{body.session_id}:sample:{body.sampling_session_seq_id}"
        service.open_sampler(body.session_id, sampler_id, key, body.model_path)
        return {"type": "create_sampling_session", "sampling_session_id": sampler_id}

    @app.post("/api/v1/join_sampling_session")
    async def join_sampling_session(request: Request):
        payload = await _json_object(request)
        sampler = service.samplers.get(str(payload.get("sampling_session_id")))
        if sampler is None:
            raise NotFound(f"unknown sampling_session_id {payload.get('sampling_session_id')!r}")
        counter = sampler.clients
        sampler.clients += 1
        return {"type": "join_sampling_session", "client_counter": counter}

    @app.get("/api/v1/samplers/{sampler_id}")
    async def get_sampler(sampler_id: str):
        sampler = service.samplers.get(sampler_id)
        if sampler is None:
            raise NotFound(f"unknown sampler {sampler_id!r}")
        return {"sampler_id": sampler_id, "base_model": service.model_name, "model_path": sampler.model_path}

    @app.post("/api/v1/asample")
    def asample(body: SampleBody):
        if body.sampling_session_id is not None:
            sampler = service.samplers.get(body.sampling_session_id)
            if sampler is None:
                raise NotFound(f"unknown sampling_session_id {body.sampling_session_id!r}")
            snapshot = engine.snapshot(sampler.snapshot_key)
        else:
            if body.model_path is None:
                engine.check_base_model(body.base_model or service.model_name)
            snapshot = engine.snapshot(body.model_path or BASE_SNAPSHOT)
        prompt = body.prompt.tokens()
        spec = _sampling_spec(engine, body.sampling_params, len(prompt))
        future = engine.sample(snapshot, SampleTask(tuple(prompt), body.num_samples, spec, bool(body.prompt_logprobs)))
        sequence_ids = [f"seq-{uuid.uuid4().hex[:12]}" for _ in range(body.num_samples)]
        return service.future_response(future, lambda out: out, "sample", sample_sequence_ids=sequence_ids)

    # ------------------------------------------------------------ futures
    @app.post("/api/v1/retrieve_future")
    async def retrieve_future(body: RetrieveBody, request: Request):
        entry = service.futures.get(body.request_id)
        if entry is None:
            return _error(404, f"unknown request_id {body.request_id!r} (never issued or expired)")
        if not await FutureStore.wait(entry, POLL_SECONDS):
            return {"type": "try_again", "request_id": body.request_id, "queue_state": "active"}
        FutureStore.mark_delivered(entry)
        if entry.future.cancelled():
            return {"error": "the request was cancelled", "category": "user"}
        exc = entry.future.exception()
        if exc is not None:
            return _failure_payload(exc)
        result = entry.encode(entry.future.result())
        want_proto = wire.PROTO_CONTENT_TYPE in request.headers.get("accept", "")
        if isinstance(result, wire.ForwardBackwardOut):
            if want_proto:
                return Response(wire.encode_forward_backward_proto(result), media_type=wire.PROTO_CONTENT_TYPE)
            return wire.encode_forward_backward_json(result)
        if isinstance(result, wire.SampleOut):
            if want_proto:
                return Response(wire.encode_sample_proto(result), media_type=wire.PROTO_CONTENT_TYPE)
            return wire.encode_sample_json(result)
        return result

    @app.post("/api/v1/cancel_future")
    async def cancel_future(body: RetrieveBody):
        service.futures.cancel(body.request_id)
        return {}

    # ------------------------------------------------------------ REST: runs and checkpoints
    @app.get("/api/v1/training_runs")
    def list_training_runs(limit: int = 20, offset: int = 0):
        runs = engine.store.list_runs()
        page = [service.training_run(r["training_run_id"]) for r in runs[offset : offset + limit]]
        return {"training_runs": page, "cursor": {"offset": offset, "limit": limit, "total_count": len(runs)}}

    @app.get("/api/v1/training_runs/{model_id}")
    def get_training_run(model_id: str):
        return service.training_run(model_id)

    @app.get("/api/v1/training_runs/{model_id}/checkpoints")
    def list_checkpoints(model_id: str):
        if engine.store.read_run(model_id) is None:
            raise NotFound(f"unknown training run {model_id!r}")
        return {"checkpoints": engine.store.list(model_id)}

    @app.get("/api/v1/training_runs/{model_id}/device_usage")
    def device_usage(model_id: str):
        """Not in Tinker: what a training run cost on the device, for a study to record next to its result."""
        return {"training_run_id": model_id, "device": engine.device.type, "device_seconds": engine.device_seconds(model_id)}

    @app.delete("/api/v1/training_runs/{model_id}/checkpoints/{kind}/{name}")
    def delete_checkpoint(model_id: str, kind: str, name: str):
        engine.store.delete(checkpoint_ref(model_id, kind, name))
        return {}

    @app.put("/api/v1/training_runs/{model_id}/checkpoints/{kind}/{name}/ttl")
    def set_checkpoint_ttl(model_id: str, kind: str, name: str, body: TtlBody):
        engine.store.set_ttl(checkpoint_ref(model_id, kind, name), body.ttl_seconds)
        return {}

    @app.get("/api/v1/training_runs/{model_id}/checkpoints/{kind}/{name}/external_weights_urls")
    def external_weights_urls(model_id: str, kind: str, name: str):
        """URLs in the checkpoint root's own scheme (file:// for a local root); nothing is signed."""
        return {"urls": engine.store.files(checkpoint_ref(model_id, kind, name)),
                "expires": iso(time.time() + 7 * 24 * 3600)}

    @app.get("/api/v1/billing/usage/checkpoints/current")
    def checkpoint_storage_usage():
        count, size = engine.store.usage()
        return {"effective_rate_usd_per_gigabyte_month": None,
                "data": [{"checkpoint_count": count, "size_bytes": size, "size_gigabytes": size / 1e9}]}

    @app.get("/api/v1/checkpoints")
    def list_user_checkpoints(limit: int = 100, offset: int = 0):
        everything = [c for r in engine.store.list_runs() for c in engine.store.list(r["training_run_id"])]
        return {
            "checkpoints": everything[offset : offset + limit],
            "cursor": {"offset": offset, "limit": limit, "total_count": len(everything)},
        }

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(
            metrics.render(engine, service.requests, service.futures.pending(), service.active_sessions()),
            media_type="text/plain; version=0.0.4",
        )

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"], include_in_schema=False)
    async def not_implemented(path: str, request: Request):
        for pattern, reason in _UNIMPLEMENTED:
            if pattern.search("/" + path):
                return _error(404, f"{request.method} /{path} is not implemented by trainer_api: {reason}")
        return _error(404, f"no such endpoint: {request.method} /{path}")

    return app
