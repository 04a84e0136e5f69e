"""Codecs between the tinker SDK's wire formats and the engine's plain data.

The current SDK (>= 0.25) sends forward_backward bodies as protobuf (optionally
zstd-compressed) and asks for forward_backward and sample results as protobuf
(``Accept: application/x-protobuf``); older SDKs use JSON for both. The schema is
the one shipped in the SDK wheel (``tinker.proto.tinker_public_pb2``), so the
server can never drift from the client it serves.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tinker.proto import tinker_public_pb2 as pb

PROTO_CONTENT_TYPE = "application/x-protobuf"

_PROTO_DTYPES: dict[int, np.dtype] = {
    pb.DTYPE_FLOAT32: np.dtype(np.float32),
    pb.DTYPE_INT64: np.dtype(np.int64),
    pb.DTYPE_INT32: np.dtype(np.int32),
}
_JSON_DTYPES: dict[str, np.dtype] = {"float32": np.dtype(np.float32), "int64": np.dtype(np.int64)}


class WireError(ValueError):
    """A request body that does not decode into a valid request (the caller's fault)."""


@dataclass(frozen=True)
class DatumIn:
    """One training sequence: input token ids and flat per-token loss inputs."""

    tokens: np.ndarray
    inputs: dict[str, np.ndarray]


@dataclass(frozen=True)
class ForwardBackwardIn:
    """A decoded forward_backward (or forward-only) request."""

    model_id: str
    seq_id: int
    loss_fn: str
    loss_fn_config: dict[str, float | str]
    forward_only: bool
    data: list[DatumIn]


@dataclass(frozen=True)
class SampledSeq:
    """One generated continuation: token ids, their log-probabilities and why it stopped."""

    tokens: list[int]
    logprobs: list[float]
    stop_reason: str


@dataclass(frozen=True)
class SampleOut:
    """The result of a sample request."""

    sequences: list[SampledSeq]
    prompt_logprobs: list[float | None] | None = None


@dataclass(frozen=True)
class ForwardBackwardOut:
    """Per-datum output tensors (flat, float32) and ``name:reduction`` metrics."""

    outputs: list[dict[str, np.ndarray]]
    metrics: dict[str, float] = field(default_factory=dict)


MAX_SPARSE_ELEMENTS = 1 << 22
"""The most elements the sparse tensors of one request may expand to (4,194,304: 2,048 times the
default context). A CSR tensor is a few bytes on the wire whatever shape it declares, so its dense
size is checked before anything is allocated; dense tensors are bounded by the body size already."""

_INT64 = (-(2**63), 2**63 - 1)


def _frombuffer(where: str, data: bytes, dtype: np.dtype) -> np.ndarray:
    if len(data) % dtype.itemsize:
        raise WireError(
            f"{where} has {len(data)} bytes, not a whole number of {dtype.name} elements ({dtype.itemsize} bytes each)"
        )
    return np.frombuffer(data, dtype=dtype)


def _checked_shape(where: str, shape: Any) -> list[int]:
    """A shape as non-negative Python ints (so its size cannot overflow), or a WireError."""
    if not isinstance(shape, (list, tuple)) or not all(
        isinstance(d, int) and not isinstance(d, bool) for d in shape
    ):
        raise WireError(f"{where} has shape {shape!r}; a shape is a list of integers")
    if any(d < 0 for d in shape):
        raise WireError(f"{where} has shape {list(shape)}; dimensions must not be negative")
    return [int(d) for d in shape]


class _SparseBudget:
    """How many elements the request's sparse tensors may still expand to."""

    def __init__(self) -> None:
        self.left = MAX_SPARSE_ELEMENTS

    def take(self, where: str, shape: list[int]) -> None:
        size = math.prod(shape)
        if size > self.left:
            raise WireError(
                f"{where} is sparse with shape {shape} ({size} elements); the sparse tensors of one request "
                f"may expand to at most {MAX_SPARSE_ELEMENTS} elements"
            )
        self.left -= size


def _dense_from_proto(name: str, t: pb.Tensor, budget: _SparseBudget | None = None) -> np.ndarray:
    where = f"loss_fn_inputs[{name!r}]"
    dtype = _PROTO_DTYPES.get(t.dtype)
    if dtype is None:
        raise WireError(f"{where} has unsupported dtype enum {t.dtype}")
    shape = _checked_shape(where, list(t.shape))
    if t.HasField("sparse_csr"):
        if len(shape) != 2:
            raise WireError(f"{where} is sparse but its shape {shape} is not 2-D")
        (budget or _SparseBudget()).take(where, shape)
        values = _frombuffer(f"{where}.sparse_csr.values", t.sparse_csr.values, dtype)
        crow = _frombuffer(f"{where}.sparse_csr.crow_indices", t.sparse_csr.crow_indices, np.dtype(np.int64))
        col = _frombuffer(f"{where}.sparse_csr.col_indices", t.sparse_csr.col_indices, np.dtype(np.int64))
        if (
            len(crow) != shape[0] + 1 or len(col) != len(values) or crow[0] != 0 or crow[-1] != len(col)
            or np.any(np.diff(crow) < 0)
        ):
            raise WireError(f"{where} has inconsistent CSR indices")
        if len(col) and (col.min() < 0 or col.max() >= shape[1]):
            raise WireError(f"{where} has a CSR column out of range")
        dense = np.zeros(shape, dtype=dtype)
        dense[np.repeat(np.arange(shape[0]), np.diff(crow)), col] = values
        return dense
    arr = _frombuffer(where, t.dense, dtype)
    if shape and math.prod(shape) != arr.size:
        raise WireError(f"{where} has {arr.size} values but shape {shape}")
    return arr.reshape(shape) if shape else arr


def decode_forward_backward_proto(body: bytes, forward_only: bool | None = None) -> ForwardBackwardIn:
    """Decode the SDK's protobuf ForwardBackwardRequest."""
    msg = pb.ForwardBackwardRequest()
    try:
        msg.ParseFromString(body)
    except Exception as exc:  # protobuf raises DecodeError, a bare Exception subclass
        raise WireError(f"body is not a valid ForwardBackwardRequest protobuf: {exc}") from exc
    data: list[DatumIn] = []
    budget = _SparseBudget()
    for i, datum in enumerate(msg.data):
        tokens: list[np.ndarray] = []
        for chunk in datum.model_input:
            kind = chunk.WhichOneof("chunk")
            if kind != "encoded_text":
                raise WireError(f"data[{i}]: only encoded_text chunks are supported, got {kind}")
            raw = _frombuffer(f"data[{i}].model_input tokens", chunk.encoded_text.tokens, np.dtype(np.int32))
            tokens.append(raw.astype(np.int64))
        inputs = {name: _dense_from_proto(name, t, budget) for name, t in datum.loss_fn_inputs.items()}
        data.append(DatumIn(np.concatenate(tokens) if tokens else np.zeros(0, np.int64), inputs))
    config: dict[str, float | str] = {}
    if msg.loss_fn_config_v2:
        for key, value in msg.loss_fn_config_v2.items():
            config[key] = value.text if value.WhichOneof("value") == "text" else value.number
    else:
        config = {key: float(value) for key, value in msg.loss_fn_config.items()}
    return ForwardBackwardIn(
        model_id=msg.model_id,
        seq_id=msg.seq_id,
        loss_fn=msg.loss_fn,
        loss_fn_config=config,
        forward_only=msg.forward_only if forward_only is None else forward_only,
        data=data,
    )


def _tensor_from_json(name: str, value: Any) -> np.ndarray:
    where = f"loss_fn_inputs[{name!r}]"
    if not isinstance(value, Mapping) or "data" not in value:
        raise WireError(f"{where} must be an object with 'data' and 'dtype'")
    dtype_name = value.get("dtype", "float32")
    dtype = _JSON_DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
    if dtype is None:
        raise WireError(f"{where} has unsupported dtype {dtype_name!r}")
    if not isinstance(value["data"], list):
        raise WireError(f"{where}.data must be a list of numbers")
    try:
        arr = np.asarray(value["data"], dtype=dtype)
    except OverflowError as exc:
        raise WireError(f"{where}.data has a value outside {dtype.name}: {exc}") from exc
    except (TypeError, ValueError) as exc:
        raise WireError(f"{where}.data is not numeric: {exc}") from exc
    shape = value.get("shape")
    if shape:
        shape = _checked_shape(where, shape)
        if math.prod(shape) != arr.size:
            raise WireError(f"{where} has {arr.size} values but shape {shape}")
        arr = arr.reshape(shape)
    return arr


def _model_input_tokens(model_input: Any, where: str) -> list[int]:
    """Token ids of a JSON ModelInput (``{"chunks": [{"tokens": [...]}]}``), type-checked."""
    if not isinstance(model_input, Mapping) or not isinstance(model_input.get("chunks"), list):
        raise WireError(f"{where} must be an object with a 'chunks' list")
    tokens: list[int] = []
    for chunk in model_input["chunks"]:
        if not isinstance(chunk, Mapping) or chunk.get("type", "encoded_text") != "encoded_text":
            raise WireError(f"{where}: only encoded_text chunks are supported")
        values = chunk.get("tokens")
        if not isinstance(values, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in values
        ):
            raise WireError(f"{where}: chunk tokens must be a list of integers")
        if values and not (_INT64[0] <= min(values) and max(values) <= _INT64[1]):
            raise WireError(f"{where}: token ids must be vocabulary ids; {max(values, key=abs)} is not")
        tokens.extend(values)
    return tokens


def decode_forward_backward_json(body: Mapping[str, Any], forward_only: bool) -> ForwardBackwardIn:
    """Decode the JSON ForwardBackwardRequest that SDKs before 0.25 send."""
    fbi = body.get("forward_backward_input")
    if not isinstance(fbi, Mapping) or not isinstance(fbi.get("data"), list):
        raise WireError("forward_backward_input.data must be a list of datums")
    model_id = body.get("model_id")
    if not isinstance(model_id, str):
        raise WireError("model_id must be a string")
    data = []
    for i, datum in enumerate(fbi["data"]):
        if not isinstance(datum, Mapping):
            raise WireError(f"data[{i}] must be an object")
        tokens = _model_input_tokens(datum.get("model_input"), f"data[{i}].model_input")
        raw_inputs = datum.get("loss_fn_inputs") or {}
        if not isinstance(raw_inputs, Mapping):
            raise WireError(f"data[{i}].loss_fn_inputs must be an object")
        inputs = {name: _tensor_from_json(name, v) for name, v in raw_inputs.items()}
        data.append(DatumIn(np.asarray(tokens, dtype=np.int64), inputs))
    config = fbi.get("loss_fn_config") or {}
    if not isinstance(config, Mapping):
        raise WireError("loss_fn_config must be an object")
    seq_id = body.get("seq_id")
    if seq_id is None:
        seq_id = 0
    elif not isinstance(seq_id, int) or isinstance(seq_id, bool) or not _INT64[0] <= seq_id <= _INT64[1]:
        raise WireError(f"seq_id must be a 64-bit integer, not {seq_id!r}")
    loss_fn = fbi.get("loss_fn")
    if not isinstance(loss_fn, str):
        raise WireError(f"forward_backward_input.loss_fn must be a string, not {loss_fn!r}")
    only = body.get("forward_only", forward_only)
    if not isinstance(only, bool):
        raise WireError(f"forward_only must be true or false, not {only!r}")
    return ForwardBackwardIn(
        model_id=model_id,
        seq_id=seq_id,
        loss_fn=loss_fn,
        loss_fn_config=dict(config),
        forward_only=only,
        data=data,
    )


def encode_forward_backward_proto(out: ForwardBackwardOut) -> bytes:
    """Encode per-datum outputs as one batched ArrayRecord, the layout the SDK decodes."""
    msg = pb.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord")
    for key, value in out.metrics.items():
        msg.metrics[key] = float(value)
    record = msg.loss_fn_outputs.add(type_tag="ArrayRecord", num_datums=len(out.outputs))
    names = list(out.outputs[0]) if out.outputs else []
    for name in names:
        arrays = [np.ascontiguousarray(o[name], dtype=np.float32).reshape(-1) for o in out.outputs]
        offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([a.nbytes for a in arrays])
        bt = record.fields[name]
        bt.data = b"".join(a.tobytes() for a in arrays)
        bt.offsets = offsets.tobytes()
        bt.dtype = pb.DTYPE_FLOAT32
    return msg.SerializeToString()


def encode_forward_backward_json(out: ForwardBackwardOut) -> dict[str, Any]:
    """The JSON ForwardBackwardOutput shape of SDKs before 0.25."""
    return {
        "loss_fn_output_type": "ArrayRecord",
        "loss_fn_outputs": [
            {
                name: {"data": arr.astype(np.float32).tolist(), "dtype": "float32", "shape": [int(arr.size)]}
                for name, arr in o.items()
            }
            for o in out.outputs
        ],
        "metrics": dict(out.metrics),
    }


_STOP_REASONS = {"stop": pb.STOP_REASON_STOP, "length": pb.STOP_REASON_LENGTH}


def encode_sample_proto(out: SampleOut) -> bytes:
    """Encode a SampleResponse; missing prompt log-probabilities travel as NaN."""
    msg = pb.SampleResponse()
    for seq in out.sequences:
        msg.sequences.add(
            stop_reason=_STOP_REASONS[seq.stop_reason],
            tokens=np.asarray(seq.tokens, dtype=np.int32).tobytes(),
            logprobs=np.asarray(seq.logprobs, dtype=np.float32).tobytes(),
        )
    if out.prompt_logprobs is not None:
        values = [math.nan if v is None else v for v in out.prompt_logprobs]
        msg.prompt_logprobs = np.asarray(values, dtype=np.float32).tobytes()
    return msg.SerializeToString()


def encode_sample_json(out: SampleOut) -> dict[str, Any]:
    """The JSON SampleResponse shape of SDKs before 0.25."""
    return {
        "type": "sample",
        "sequences": [
            {"tokens": s.tokens, "logprobs": s.logprobs, "stop_reason": s.stop_reason}
            for s in out.sequences
        ],
        "prompt_logprobs": out.prompt_logprobs,
    }


