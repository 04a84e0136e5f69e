"""The codecs agree with the SDK's own encoders and decoders (the wheel is the reference)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

tinker = pytest.importorskip("tinker")

from tinker import types  # noqa: E402
from tinker.proto.request_conv import forward_backward_request_to_proto  # noqa: E402
from tinker.proto.response_conv import deserialize_forward_backward_output, deserialize_sample_response  # noqa: E402

from trainer_api import wire  # noqa: E402


def _request() -> types.ForwardBackwardRequest:
    datum = types.Datum(
        model_input=types.ModelInput.from_ints([2, 10, 11]),
        loss_fn_inputs={"target_tokens": [10, 11, 1], "weights": [0.0, 1.0, 1.0]},
    )
    return types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(
            data=[datum, datum], loss_fn="ppo", loss_fn_config={"clip_low_threshold": 0.9}
        ),
        model_id="m",
        seq_id=3,
    )


def test_decodes_the_sdk_protobuf_request():
    msg = forward_backward_request_to_proto(_request())
    msg.forward_only = True
    req = wire.decode_forward_backward_proto(msg.SerializeToString())
    assert (req.model_id, req.seq_id, req.loss_fn, req.forward_only) == ("m", 3, "ppo", True)
    assert req.loss_fn_config == {"clip_low_threshold": pytest.approx(0.9)}
    assert req.data[0].tokens.tolist() == [2, 10, 11]
    assert req.data[1].inputs["target_tokens"].tolist() == [10, 11, 1]
    assert req.data[1].inputs["weights"].dtype == np.float32


def test_decodes_sparse_csr_inputs_to_dense():
    torch = pytest.importorskip("torch")
    dense = torch.tensor([[0, 5], [7, 0]])
    datum = types.Datum(
        model_input=types.ModelInput.from_ints([1, 2]),
        loss_fn_inputs={"target_tokens": types.TensorData.from_torch_sparse(dense)},
    )
    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=[datum], loss_fn="cross_entropy"), model_id="m", seq_id=1
    )
    req = wire.decode_forward_backward_proto(forward_backward_request_to_proto(request).SerializeToString())
    assert req.data[0].inputs["target_tokens"].tolist() == [[0, 5], [7, 0]]


def test_decodes_the_legacy_json_request():
    datum = {
        "model_input": {"chunks": [{"type": "encoded_text", "tokens": [2, 10, 11]}]},
        "loss_fn_inputs": {
            "target_tokens": {"data": [10, 11, 1], "dtype": "int64", "shape": [3]},
            "weights": {"data": [0.0, 1.0, 1.0], "dtype": "float32", "shape": [3]},
        },
    }
    body = {"model_id": "m", "seq_id": 2, "forward_backward_input": {"data": [datum], "loss_fn": "ppo"}}
    req = wire.decode_forward_backward_json(json.loads(json.dumps(body)), forward_only=False)
    assert req.data[0].inputs["weights"].tolist() == [0.0, 1.0, 1.0]
    assert req.loss_fn == "ppo"


def test_garbage_is_a_wire_error():
    with pytest.raises(wire.WireError):
        wire.decode_forward_backward_proto(b"\xff\xff\xff")
    with pytest.raises(wire.WireError, match="list of integers"):
        wire.decode_forward_backward_json(
            {"model_id": "m", "forward_backward_input": {"data": [{"model_input": {"chunks": [{"tokens": ["a"]}]}}]}},
            False,
        )


def test_forward_backward_output_round_trips_through_the_sdk_decoder():
    out = wire.ForwardBackwardOut(
        [{"logprobs": np.array([-1.0, -2.0], np.float32)}, {"logprobs": np.array([-3.0], np.float32)}],
        {"loss:sum": 6.0},
    )
    decoded = deserialize_forward_backward_output(wire.encode_forward_backward_proto(out))
    assert decoded.metrics == {"loss:sum": 6.0}
    assert [o["logprobs"].tolist() for o in decoded.loss_fn_outputs] == [[-1.0, -2.0], [-3.0]]
    as_json = wire.encode_forward_backward_json(out)
    assert as_json["loss_fn_outputs"][1]["logprobs"] == {"data": [-3.0], "dtype": "float32", "shape": [1]}


def test_sample_response_round_trips_through_the_sdk_decoder():
    out = wire.SampleOut([wire.SampledSeq([5, 6], [-0.5, -0.25], "stop")], prompt_logprobs=[None, -1.5])
    decoded = deserialize_sample_response(wire.encode_sample_proto(out))
    assert decoded.sequences[0].tokens == [5, 6]
    assert decoded.sequences[0].logprobs == [-0.5, -0.25]
    assert decoded.sequences[0].stop_reason == "stop"
    assert decoded.prompt_logprobs[0] is None and math.isclose(decoded.prompt_logprobs[1], -1.5)
