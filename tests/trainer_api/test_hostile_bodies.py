"""Hostile request bodies: bombs, oversize bodies and malformed numbers get a fast 4xx, never a 500.

The service runs as its own process (conftest's ``server``), so its memory can be
read from /proc: a decompression bomb must cost it under 100 MB and be refused
within a second. ``FutureStore`` is tested on its own, under many threads.
"""

from __future__ import annotations

import gzip
import json
import socket
import struct
import threading
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest

tinker = pytest.importorskip("tinker")
zstandard = pytest.importorskip("zstandard")

from tinker import types  # noqa: E402
from tinker.proto import tinker_public_pb2 as pb  # noqa: E402
from tinker.proto.request_conv import forward_backward_request_to_proto  # noqa: E402

from trainer_api.bodies import (  # noqa: E402
    DEFAULT_MAX_BODY_BYTES,
    BodyTooLarge,
    decompress,
    default_max_body_bytes,
)
from trainer_api.exceptions import UserError  # noqa: E402
from trainer_api.futures import FutureStore  # noqa: E402
from trainer_api.process import start_service  # noqa: E402

GIB = 1 << 30
ZEROS = b"\0" * (1 << 24)  # 16 MiB
BOMB_SECONDS = 1.0
BOMB_MEMORY = 100 * 2**20


# ------------------------------------------------------------------------------------------- bombs
def _gzip_bomb() -> bytes:
    """1 GiB of zeros in about 1 MB: 64 gzip members of 16 MiB each (a valid gzip stream)."""
    deflate = zlib.compressobj(9, zlib.DEFLATED, 31)
    return (deflate.compress(ZEROS) + deflate.flush()) * 64


def _deflate_bomb() -> bytes:
    """1 GiB of zeros in one zlib stream (about 1 MB), checksum included.

    After a full flush a deflate block does not refer back, so the block for 16 MiB of
    zeros can be repeated; compressing the whole GiB would take ten seconds.
    """
    deflate = zlib.compressobj(9, zlib.DEFLATED, 15)
    first = deflate.compress(ZEROS) + deflate.flush(zlib.Z_FULL_FLUSH)
    block = deflate.compress(ZEROS) + deflate.flush(zlib.Z_FULL_FLUSH)
    checksum = 1
    for _ in range(64):
        checksum = zlib.adler32(ZEROS, checksum)
    return first[:2] + block * 64 + b"\x03\x00" + struct.pack(">I", checksum)


def _zstd_bomb() -> bytes:
    """1 GiB of zeros in one zstd frame of about 32 KB that declares its content size (the issue's case)."""
    compressor = zstandard.ZstdCompressor(level=3).compressobj(size=GIB)
    return b"".join([compressor.compress(ZEROS) for _ in range(64)] + [compressor.flush()])


@pytest.fixture(scope="module")
def bombs() -> dict[str, bytes]:
    made = {"gzip": _gzip_bomb(), "deflate": _deflate_bomb(), "zstd": _zstd_bomb()}
    assert zstandard.get_frame_parameters(made["zstd"]).content_size == GIB
    assert all(len(b) < 1_100_000 for b in made.values())
    return made


def test_the_bombs_are_real():
    """Each bomb really is 1 GiB of output (checked with a bounded, streaming read)."""
    def streamed_size(reader) -> int:
        total = 0
        while chunk := reader.read(1 << 24):
            total += len(chunk)
        return total

    zstd = _zstd_bomb()
    assert streamed_size(zstandard.ZstdDecompressor().stream_reader(zstd)) == GIB
    inflater, data, total = zlib.decompressobj(15), _deflate_bomb(), 0
    while data:
        total += len(inflater.decompress(data, 1 << 24))
        data = inflater.unconsumed_tail
    assert total == GIB and inflater.eof


# ------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, headers={"X-API-Key": server.api_key}, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def model_id(service_client, tiny_model_dir) -> str:
    return service_client.create_lora_training_client(base_model=str(tiny_model_dir), rank=4, seed=0).result().model_id


def _kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


class PeakMemory:
    """How far the server's resident memory rose above where it was, at its peak, during a block.

    Linux resets the peak (VmHWM) on writing 5 to /proc/PID/clear_refs; where that is not
    allowed, a thread samples VmRSS every millisecond instead.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.growth = 0

    def __enter__(self) -> PeakMemory:
        self.before = _kib(self.pid, "VmRSS")
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
            self.sampler = None
        except OSError:
            self.peak, self.done = self.before, threading.Event()
            self.sampler = threading.Thread(target=self._sample, daemon=True)
            self.sampler.start()
        return self

    def _sample(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, _kib(self.pid, "VmRSS"))
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        if self.sampler is None:
            peak = _kib(self.pid, "VmHWM")
        else:
            self.done.set()
            self.sampler.join()
            peak = self.peak
        self.growth = peak - self.before


def _assert_user_error(response: httpx.Response, status: int, fragment: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["category"] == "user", body
    assert fragment in body["error"], body


def _proto(model_id: str, tokens: bytes, inputs: dict[str, pb.Tensor]) -> bytes:
    msg = pb.ForwardBackwardRequest(model_id=model_id, seq_id=1, loss_fn="cross_entropy")
    datum = msg.data.add()
    datum.model_input.add().encoded_text.tokens = tokens
    for name, tensor in inputs.items():
        datum.loss_fn_inputs[name].CopyFrom(tensor)
    return msg.SerializeToString()


PROTO = {"Content-Type": "application/x-protobuf"}
JSON = {"Content-Type": "application/json"}
TOKENS = np.asarray([2, 10, 11], np.int32).tobytes()
TARGETS = pb.Tensor(dtype=pb.DTYPE_INT64, dense=np.asarray([10, 11, 1], np.int64).tobytes(), shape=[3])


def _json_fb(model_id: str, tokens: list, inputs: dict | None = None, **extra) -> dict:
    inputs = inputs if inputs is not None else {"target_tokens": {"data": [10, 11, 1], "dtype": "int64", "shape": [3]}}
    datum = {"model_input": {"chunks": [{"type": "encoded_text", "tokens": tokens}]}, "loss_fn_inputs": inputs}
    return {"model_id": model_id, "seq_id": 1, "forward_backward_input": {"loss_fn": "cross_entropy", "data": [datum]},
            **extra}


# --------------------------------------------------------------------------------- body limits
@pytest.mark.parametrize("encoding", ["gzip", "deflate", "zstd"])
def test_a_decompression_bomb_is_refused_within_a_second_in_little_memory(server, http, model_id, bombs, encoding):
    headers = {**PROTO, "Content-Encoding": encoding}
    with PeakMemory(server.proc.pid) as memory:
        started = time.perf_counter()
        response = http.post("/api/v1/forward_backward", content=bombs[encoding], headers=headers)
        elapsed = time.perf_counter() - started
    _assert_user_error(response, 413, f"decompresses ({encoding}) to more than the limit of {DEFAULT_MAX_BODY_BYTES}")
    print(f"{encoding} bomb ({len(bombs[encoding])} B -> 1 GiB): 413 in {elapsed:.3f} s, "
          f"server memory +{memory.growth / 2**20:.1f} MiB")
    assert elapsed < BOMB_SECONDS
    assert memory.growth < BOMB_MEMORY
    assert http.get("/api/v1/healthz").status_code == 200


def test_bombs_sent_at_once_stay_bounded(server, bombs):
    """The issue's two 1 MB gzip bodies at once took 5.7 GB and 19 s; three of each encoding now take little."""
    def send(encoding: str) -> tuple[int, float]:
        started = time.perf_counter()
        response = httpx.post(f"{server.base_url}/api/v1/forward_backward", content=bombs[encoding], timeout=60,
                              headers={"X-API-Key": server.api_key, **PROTO, "Content-Encoding": encoding})
        return response.status_code, time.perf_counter() - started

    with PeakMemory(server.proc.pid) as memory, ThreadPoolExecutor(6) as pool:
        results = list(pool.map(send, ["gzip", "deflate", "zstd"] * 2))
    print(f"6 bombs at once: slowest {max(t for _, t in results):.3f} s, server memory +{memory.growth / 2**20:.1f} MiB")
    assert [status for status, _ in results] == [413] * 6
    assert max(t for _, t in results) < 3 * BOMB_SECONDS
    assert memory.growth < 2 * BOMB_MEMORY


def test_a_declared_length_over_the_limit_is_413_before_the_body_is_sent(server):
    """Headers announcing 200 MB get their 413 at once: the server answers without reading a byte of body."""
    url = urlparse(server.base_url)
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        started = time.perf_counter()
        sock.sendall(
            b"POST /api/v1/forward_backward HTTP/1.1\r\nHost: x\r\n"
            + f"X-API-Key: {server.api_key}\r\n".encode()
            + b"Content-Type: application/x-protobuf\r\nContent-Length: 200000000\r\n\r\n"
        )
        answer = sock.recv(65536)
        elapsed = time.perf_counter() - started
        while b"\r\n\r\n" not in answer:  # the head may come in several reads
            answer += sock.recv(65536)
        head, _, body = answer.partition(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
        while len(body) < length:
            body += sock.recv(65536)
        answer = head + b"\r\n\r\n" + body
    assert answer.startswith(b"HTTP/1.1 413"), answer
    assert b"200000000 bytes (Content-Length)" in answer and b"--max-body-bytes" in answer
    assert elapsed < BOMB_SECONDS


def test_a_body_over_the_limit_is_413_whether_declared_or_streamed(http):
    declared = http.post("/api/v1/create_session", content=b" " * (DEFAULT_MAX_BODY_BYTES + 1), headers=JSON)
    _assert_user_error(declared, 413, f"is {DEFAULT_MAX_BODY_BYTES + 1} bytes (Content-Length), more than the limit")

    def chunks():  # no Content-Length: chunked transfer, counted as it arrives
        for _ in range(DEFAULT_MAX_BODY_BYTES // 2**20 + 4):
            yield b" " * 2**20

    streamed = http.post("/api/v1/create_session", content=chunks(), headers=JSON)
    _assert_user_error(streamed, 413, f"request body is more than the limit of {DEFAULT_MAX_BODY_BYTES} bytes")
    # Just under the limit is read and parsed (JSON may carry that much whitespace).
    fits = http.post("/api/v1/create_session", content=b" " * (DEFAULT_MAX_BODY_BYTES - 2) + b"{}", headers=JSON)
    assert fits.status_code == 200, fits.text


def test_the_largest_legitimate_request_fits_with_room(http, model_id):
    """A forward of the whole 65,536-token batch limit, in the bulkiest encoding (older SDKs' JSON), is accepted
    and is under a third of the default limit; the SDK's protobuf of it is under a tenth."""
    rng = np.random.default_rng(0)
    data = []
    for _ in range(32):
        inputs = {
            "target_tokens": rng.integers(2, 200, 2048).tolist(),
            "logprobs": (-5 * rng.random(2048)).astype(np.float32).tolist(),
            "advantages": rng.standard_normal(2048).astype(np.float32).tolist(),
            "weights": np.ones(2048, np.float32).tolist(),
        }
        data.append(types.Datum(model_input=types.ModelInput.from_ints(rng.integers(2, 200, 2048).tolist()),
                                loss_fn_inputs=inputs))
    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=data, loss_fn="importance_sampling"),
        model_id=model_id, seq_id=1,
    )
    proto = forward_backward_request_to_proto(request).SerializeToString()
    legacy = json.dumps({
        "model_id": model_id, "seq_id": 1, "forward_only": True,
        "forward_backward_input": {"loss_fn": "importance_sampling", "data": [
            {"model_input": {"chunks": [{"type": "encoded_text", "tokens": d.model_input.to_ints()}]},
             "loss_fn_inputs": {k: {"data": v.tolist(), "dtype": "int64" if k == "target_tokens" else "float32",
                                    "shape": [2048]} for k, v in d.loss_fn_inputs.items()}}
            for d in data]},
    }).encode()
    print(f"65,536 tokens: protobuf {len(proto)} B, JSON {len(legacy)} B, limit {DEFAULT_MAX_BODY_BYTES} B")
    assert len(proto) < DEFAULT_MAX_BODY_BYTES / 10
    assert len(legacy) < DEFAULT_MAX_BODY_BYTES / 3
    assert default_max_body_bytes(65536) == DEFAULT_MAX_BODY_BYTES
    assert default_max_body_bytes(4 * 65536) == 4 * DEFAULT_MAX_BODY_BYTES
    for body, headers in [(legacy, JSON), (gzip.compress(legacy, 1), {**JSON, "Content-Encoding": "gzip"})]:
        response = http.post("/api/v1/forward", content=body, headers=headers)
        assert response.status_code == 200, response.text
        result = http.post("/api/v1/retrieve_future", json={"request_id": response.json()["request_id"]})
        while result.json().get("type") == "try_again":
            result = http.post("/api/v1/retrieve_future", json={"request_id": response.json()["request_id"]})
        assert result.status_code == 200 and len(result.json()["loss_fn_outputs"]) == 32, result.text[:300]


@pytest.mark.slow
def test_the_limit_is_a_serve_flag_and_the_sdk_is_told(tiny_model_dir, tmp_path):
    srv = start_service(tiny_model_dir, tmp_path / "ckpt", tmp_path / "log", api_key="tml-small",
                        extra_args=("--max-body-bytes", "4096"), sampler="torch")
    try:
        headers = {"X-API-Key": "tml-small", **JSON}
        with httpx.Client(base_url=srv.base_url, headers=headers, timeout=30) as client:
            _assert_user_error(client.post("/api/v1/create_session", content=b" " * 4097), 413,
                               "more than the limit of 4096 bytes")
            small_bomb = zstandard.ZstdCompressor().compress(b" " * 5000 + b"{}")
            _assert_user_error(
                client.post("/api/v1/create_session", content=small_bomb, headers={"Content-Encoding": "zstd"}),
                413, "decompresses (zstd) to more than the limit of 4096 bytes",
            )
            config = client.post("/api/v1/client/config", json={}).json()
            assert config["fwdbwd_max_chunk_bytes_count"] == 2048  # the SDK keeps its bodies within half the limit
    finally:
        srv.stop()


@pytest.mark.parametrize(
    ("headers", "body", "status", "fragment"),
    [
        ({"Content-Encoding": "br"}, b"{}", 415, "Content-Encoding 'br' is not supported"),
        ({"Content-Encoding": "gzip"}, b"not gzip", 400, "body is not valid gzip"),
        ({"Content-Encoding": "gzip"}, gzip.compress(b"{}")[:-4], 400, "the stream is truncated"),
        ({"Content-Encoding": "deflate"}, b"not deflate", 400, "body is not valid deflate"),
        ({"Content-Encoding": "zstd"}, b"not zstd", 400, "body is not valid zstd"),
    ],
)
def test_bad_encodings_are_refused(http, headers, body, status, fragment):
    _assert_user_error(http.post("/api/v1/create_session", content=body, headers={**JSON, **headers}), status, fragment)


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "zstd"])
def test_every_encoding_is_accepted_on_every_route(http, model_id, encoding):
    """Compressed JSON reaches pydantic routes too, not only forward_backward."""
    pack = {"gzip": gzip.compress, "deflate": zlib.compress, "zstd": zstandard.ZstdCompressor().compress}[encoding]
    headers = {**JSON, "Content-Encoding": encoding}
    created = http.post("/api/v1/create_session", content=pack(b'{"tags": ["x"]}'), headers=headers)
    assert created.status_code == 200 and created.json()["type"] == "create_session", created.text
    forward = http.post("/api/v1/forward", content=pack(json.dumps(_json_fb(model_id, [2, 10, 11])).encode()),
                        headers=headers)
    assert forward.status_code == 200, forward.text
    proto = http.post("/api/v1/forward", content=pack(_proto(model_id, TOKENS, {"target_tokens": TARGETS})),
                      headers={**PROTO, "Content-Encoding": encoding})
    assert proto.status_code == 200, proto.text


def test_decompress_streams_and_caps_each_encoding():
    payload = b"abc" * 1000
    assert decompress(gzip.compress(payload) + gzip.compress(payload), "gzip", 10_000) == payload * 2
    assert decompress(zlib.compress(payload), "deflate", 10_000) == payload
    frames = zstandard.ZstdCompressor().compress(payload) * 2
    assert decompress(frames, "zstd", 10_000) == payload * 2
    for encoding, packed in [("gzip", gzip.compress(payload)), ("deflate", zlib.compress(payload)),
                             ("zstd", zstandard.ZstdCompressor().compress(payload))]:
        with pytest.raises(BodyTooLarge, match="more than the limit of 2999 bytes"):
            decompress(packed, encoding, 2999)
        assert decompress(packed, encoding, 3000) == payload
    with pytest.raises(UserError, match="not valid gzip"):
        decompress(gzip.compress(payload) + b"trailing junk", "gzip", 10_000)
    huge_window = zstandard.ZstdCompressor(
        compression_params=zstandard.ZstdCompressionParameters(window_log=27)
    ).compress(b"\1" * (1 << 24))
    with pytest.raises(UserError, match="not valid zstd"):
        decompress(huge_window, "zstd", 1 << 25)  # a frame asking for a 128 MiB window is refused up front


# ----------------------------------------------------------------------------------- 400 not 500
def _bad_requests(model_id: str, session_id: str) -> list[tuple[str, str, dict, bytes | dict, str]]:
    """(case, route, headers, body, what the error says)."""
    deep = b"[" * 50_000 + b"]" * 50_000
    sparse = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[10**6, 10**6])
    sparse.sparse_csr.crow_indices = np.zeros(2, np.int64).tobytes()
    return [
        ("seq_id not an integer", "/api/v1/forward_backward", JSON,
         _json_fb(model_id, [2, 10, 11], seq_id="abc"), "seq_id must be a 64-bit integer, not 'abc'"),
        ("seq_id a fraction", "/api/v1/forward_backward", JSON,
         _json_fb(model_id, [2, 10, 11], seq_id=1.5), "seq_id must be a 64-bit integer, not 1.5"),
        ("model_seq_id a string", "/api/v1/create_model", JSON,
         {"session_id": "s", "model_seq_id": "x", "base_model": "m"}, "model_seq_id: Input should be a valid integer"),
        ("model_seq_id a fraction", "/api/v1/create_model", JSON,
         {"session_id": "s", "model_seq_id": 1.5, "base_model": "m"}, "model_seq_id: Input should be a valid integer"),
        ("model_seq_id 2**70", "/api/v1/create_model", JSON,
         {"session_id": "s", "model_seq_id": 2**70, "base_model": "m"}, "model_seq_id: Input should be less than"),
        ("request_id a number", "/api/v1/retrieve_future", JSON, {"request_id": 5}, "request_id: Input should be a valid string"),
        ("token id 2**70 (JSON model input)", "/api/v1/forward_backward", JSON,
         _json_fb(model_id, [2, 10, 2**70]), f"token ids must be vocabulary ids; {2**70} is not"),
        ("token id 2**70 (JSON target_tokens)", "/api/v1/forward_backward", JSON,
         _json_fb(model_id, [2, 10, 11], {"target_tokens": {"data": [10, 11, 2**70], "dtype": "int64"}}),
         "loss_fn_inputs['target_tokens'].data has a value outside int64"),
        ("token id 2**70 (prompt)", "/api/v1/asample", JSON,
         {"prompt": {"chunks": [{"tokens": [2, 2**70]}]}, "sampling_params": {"max_tokens": 2}},
         "prompt.chunks.0.tokens.1: Input should be less than or equal to 2147483647"),
        ("token id 2**70 (stop)", "/api/v1/asample", JSON,
         {"prompt": {"chunks": [{"tokens": [2, 3]}]}, "sampling_params": {"max_tokens": 2, "stop": [2**70]}},
         "Input should be less than or equal to 2147483647"),
        ("TTL past any date", "/api/v1/save_weights", JSON,
         {"model_id": model_id, "path": "forever", "ttl_seconds": 2**70}, "ttl_seconds: Input should be less than"),
        ("tokens not a whole number of int32", "/api/v1/forward_backward", PROTO,
         _proto(model_id, TOKENS[:7], {"target_tokens": TARGETS}), "has 7 bytes, not a whole number of int32 elements"),
        ("tensor not a whole number of int64", "/api/v1/forward_backward", PROTO,
         _proto(model_id, TOKENS, {"target_tokens": pb.Tensor(dtype=pb.DTYPE_INT64, dense=b"\0" * 23, shape=[3])}),
         "has 23 bytes, not a whole number of int64 elements"),
        ("dense tensor declaring 1e6 x 1e6", "/api/v1/forward_backward", PROTO,
         _proto(model_id, TOKENS, {"target_tokens": pb.Tensor(dtype=pb.DTYPE_INT64, dense=b"\0" * 24,
                                                               shape=[10**6, 10**6])}),
         "has 3 values but shape [1000000, 1000000]"),
        ("dense tensor whose shape overflows int64", "/api/v1/forward_backward", PROTO,
         _proto(model_id, TOKENS, {"target_tokens": pb.Tensor(dtype=pb.DTYPE_INT64, shape=[2**32, 2**32])}),
         "has 0 values but shape [4294967296, 4294967296]"),
        ("sparse tensor declaring 1e6 x 1e6", "/api/v1/forward_backward", PROTO,
         _proto(model_id, TOKENS, {"target_tokens": TARGETS, "weights": sparse}),
         "is sparse with shape [1000000, 1000000] (1000000000000 elements)"),
        ("JSON tensor declaring 1e6 x 1e6", "/api/v1/forward_backward", JSON,
         _json_fb(model_id, [2, 10, 11], {"target_tokens": {"data": [10, 11, 1], "dtype": "int64", "shape": [1e6, 1e6]}}),
         "a shape is a list of integers"),
        ("JSON tensor with a negative shape", "/api/v1/forward_backward", JSON,
         _json_fb(model_id, [2, 10, 11], {"target_tokens": {"data": [10, 11, 1], "dtype": "int64", "shape": [-1, -3]}}),
         "dimensions must not be negative"),
        ("JSON 50,000 deep (schema route)", "/api/v1/create_session", JSON, b'{"user_metadata": {"a": ' + deep + b"}}",
         "the JSON body is nested too deeply"),
        ("JSON 50,000 deep (forward_backward)", "/api/v1/forward_backward", JSON, b'{"a": ' + deep + b"}",
         "the JSON body is nested too deeply"),
        ("JSON 50,000 deep (free-form route)", f"/api/v1/sessions/{session_id}/finish", JSON, deep,
         "the JSON body is nested too deeply"),
        ("JSON 900 deep in metadata", "/api/v1/create_session", JSON,
         b'{"user_metadata": {"a": ' + b"[" * 900 + b"]" * 900 + b"}}", "levels deep): Recursion error"),
    ]


def test_malformed_requests_are_400_with_a_clear_message(server, http, model_id):
    """Every case the issue found answering 500 is now a quick 400 (category user) that says what is wrong."""
    failures = []
    session_id = http.post("/api/v1/create_session", json={}).json()["session_id"]
    with PeakMemory(server.proc.pid) as memory:
        for case, route, headers, body, fragment in _bad_requests(model_id, session_id):
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            started = time.perf_counter()
            response = http.post(route, content=content, headers=headers)
            elapsed = time.perf_counter() - started
            ok = (response.status_code == 400 and response.json().get("category") == "user"
                  and fragment in response.json().get("error", "") and elapsed < 1.0)
            if not ok:
                failures.append(f"{case}: {response.status_code} in {elapsed:.2f} s: {response.text[:300]}")
    assert not failures, "\n".join(failures)
    assert memory.growth < BOMB_MEMORY  # the 1e6 x 1e6 shapes were refused before anything was allocated
    assert http.get("/api/v1/training_runs").status_code == 200  # the refused TTL left no unlistable checkpoint
    assert http.get(f"/api/v1/sessions/{session_id}").status_code == 200  # the deep finish body finished nothing


def test_the_sdk_sees_a_malformed_tensor_as_a_bad_request(service_client, tiny_model_dir, http, model_id):
    """Through the SDK's own client: a 400, which it does not retry, instead of a 500 it retries forever."""
    body = _proto(model_id, TOKENS, {"target_tokens": pb.Tensor(dtype=pb.DTYPE_INT64, dense=b"\0" * 23, shape=[3])})
    started = time.perf_counter()
    response = http.post("/api/v1/forward_backward", content=body, headers=PROTO)
    assert response.status_code == 400 and time.perf_counter() - started < 1.0
    training = service_client.create_lora_training_client(base_model=str(tiny_model_dir), rank=4, seed=0).result()
    datum = types.Datum(model_input=types.ModelInput.from_ints([2, 10, 11]), loss_fn_inputs={"target_tokens": [10, 11, 1]})
    assert training.forward([datum], "cross_entropy").result().loss_fn_outputs  # the service still serves


# ------------------------------------------------------------------------------------- FutureStore
def _done(value: object = None) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


def test_future_store_is_safe_under_many_threads():
    """16 threads adding, retrieving, delivering, counting and expiring at once: no KeyError, no lost entry."""
    store = FutureStore(ttl_seconds=0.0, delivered_ttl=0.0, sweep_every=0.0)
    running: list[Future] = []
    kept: list[str] = []
    errors: list[BaseException] = []
    start = threading.Barrier(16)

    def work(worker: int) -> None:
        try:
            start.wait()
            for i in range(400):
                if i % 10 == 0:  # work still running is never expired
                    future: Future = Future()
                    running.append(future)
                    kept.append(store.add(future, lambda r: r, "compute_logprobs", f"t{worker}"))
                request_id = store.add(_done(i), lambda r: r, "compute_logprobs", f"t{worker}")
                entry = store.get(request_id)
                if entry is not None:
                    store.mark_delivered(entry)
                store.pending()
                store.expire()
                len(store)
        except BaseException as exc:  # noqa: BLE001 - any exception in a worker fails the test
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    store.expire()
    assert len(store) == len(kept) == 16 * 40  # every finished result swept, every running one kept
    assert store.pending() == len(kept)
    assert all(store.get(request_id) is not None for request_id in kept)
    for future in running:
        future.set_result(None)
    store.expire()
    assert len(store) == 0


def test_unclaimed_and_delivered_results_are_garbage_collected():
    store = FutureStore(ttl_seconds=0.3, delivered_ttl=0.1, sweep_every=0.0)
    unclaimed = store.add(_done(1), lambda r: r, "sample", "t")
    delivered = store.add(_done(2), lambda r: r, "sample", "t")
    store.mark_delivered(store.get(delivered))
    running = store.add(Future(), lambda r: r, "sample", "t")
    time.sleep(0.15)
    store.expire()
    assert store.get(delivered) is None  # claimed: kept delivered_ttl for a lost response, then dropped
    assert store.get(unclaimed) is not None
    time.sleep(0.2)
    store.add(_done(3), lambda r: r, "sample", "t")  # adding sweeps too
    assert store.get(unclaimed) is None  # never claimed: dropped after ttl_seconds
    assert store.get(running) is not None  # still running: never dropped
