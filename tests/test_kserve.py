"""The Open Inference Protocol (KServe v2) API of a real server, through raw generated stubs:
metadata, readiness, inference equal to lossgrad.v1's bit for bit (raw and typed tensors),
parameters, and the status code and google.rpc.Status of every bad request.

tests/test_kserve_tritonclient.py calls the same API with tritonclient itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import ml_dtypes
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from grpc_status import rpc_status
from lossgrad import catalog, kserve
from lossgrad._proto.inference import grpc_predict_v2_pb2 as kpb
from lossgrad._proto.inference import grpc_predict_v2_pb2_grpc as kpb_grpc
from lossgrad._proto.inference import model_config_pb2 as config_pb
from lossgrad.server import LossServer
from lossgrad_client import LossClient
from lossgrad_client._proto.lossgrad.v1 import lossgrad_pb2 as pb
from lossgrad_client._proto.lossgrad.v1 import lossgrad_pb2_grpc as pb_grpc

pytestmark = pytest.mark.e2e

KSERVE = "inference.GRPCInferenceService"
Stub = kpb_grpc.GRPCInferenceServiceStub
_DATATYPES = {np.dtype(np.float32): "FP32", np.dtype(np.float64): "FP64",
              np.dtype(np.int32): "INT32", np.dtype(np.int64): "INT64"}
_CONTENTS = {"FP32": "fp32_contents", "FP64": "fp64_contents", "INT32": "int_contents",
             "INT64": "int64_contents"}
_NUMPY = {"FP32": "<f4", "FP64": "<f8", "INT32": "<i4", "INT64": "<i8"}


def infer_request(model: str, inputs: dict[str, np.ndarray], *, typed: bool = False,
                  outputs: tuple[str, ...] = (), **parameters: Any) -> kpb.ModelInferRequest:
    """A ModelInferRequest with the arrays in raw_input_contents (or typed contents)."""
    request = kpb.ModelInferRequest(model_name=model, id="req-1")
    for name, array in inputs.items():
        datatype = _DATATYPES[array.dtype]
        tensor = request.inputs.add(name=name, datatype=datatype, shape=array.shape)
        if typed:
            getattr(tensor.contents, _CONTENTS[datatype]).extend(array.reshape(-1).tolist())
        else:
            request.raw_input_contents.append(array.tobytes())
    for name in outputs:
        request.outputs.add(name=name)
    for key, value in parameters.items():
        param = request.parameters[key]
        if isinstance(value, bool):
            param.bool_param = value
        elif isinstance(value, int):
            param.int64_param = value
        elif isinstance(value, float):
            param.double_param = value
        else:
            param.string_param = value
    return request


def outputs_of(response: kpb.ModelInferResponse) -> dict[str, np.ndarray]:
    """The response's outputs as arrays, from raw bytes or typed contents."""
    arrays = {}
    for index, out in enumerate(response.outputs):
        if response.raw_output_contents:
            flat = np.frombuffer(response.raw_output_contents[index], dtype=_NUMPY[out.datatype])
        else:
            flat = np.asarray(getattr(out.contents, _CONTENTS[out.datatype]),
                              dtype=_NUMPY[out.datatype])
        arrays[out.name] = flat.reshape(tuple(out.shape))
    return arrays


def _rng_case(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(16, 5)).astype(np.float32),
            rng.normal(size=(16, 5)).astype(np.float32))


# --- server and models -----------------------------------------------------------------------

def test_server_is_live_and_ready_and_names_itself(
        kserve_stub: Stub) -> None:
    assert kserve_stub.ServerLive(kpb.ServerLiveRequest(), timeout=10).live
    assert kserve_stub.ServerReady(kpb.ServerReadyRequest(), timeout=10).ready
    meta = kserve_stub.ServerMetadata(kpb.ServerMetadataRequest(), timeout=10)
    assert (meta.name, meta.version) == ("lossgrad", "0.1.0")


def test_every_loss_and_alias_is_a_ready_model(kserve_stub: Stub) -> None:
    names = [n for spec in catalog.LOSSES for n in (spec.name, *spec.aliases)]
    assert "sigmoid_cross_entropy" in names and "l2" in names
    for name in names:
        assert kserve_stub.ModelReady(kpb.ModelReadyRequest(name=name), timeout=10).ready, name
    for name, version, ready in (("mse", "1", True), ("mse", "2", False), ("resnet50", "", False)):
        request = kpb.ModelReadyRequest(name=name, version=version)
        assert kserve_stub.ModelReady(request, timeout=10).ready is ready


def test_model_metadata_describes_inputs_and_outputs(
        kserve_stub: Stub) -> None:
    def tensors(items: Any) -> list[tuple[str, str, list[int]]]:
        return [(t.name, t.datatype, list(t.shape)) for t in items]

    mse = kserve_stub.ModelMetadata(kpb.ModelMetadataRequest(name="mse"), timeout=10)
    assert (mse.name, list(mse.versions), mse.platform) == ("mse", ["1"], "lossgrad")
    assert tensors(mse.inputs) == [("PREDICTIONS", "FP32", [-1]), ("TARGETS", "FP32", [-1]),
                                   ("SAMPLE_WEIGHT", "FP32", [-1])]
    assert tensors(mse.outputs) == [("LOSS", "FP64", [-1]), ("GRADIENT", "FP32", [-1]),
                                    ("HESSIAN", "FP32", [-1])]
    sparse = kserve_stub.ModelMetadata(
        kpb.ModelMetadataRequest(name="sparse_categorical_cross_entropy"), timeout=10)
    assert tensors(sparse.inputs)[:2] == [("PREDICTIONS", "FP32", [-1, -1]),
                                          ("TARGETS", "INT64", [-1])]
    assert tensors(sparse.outputs)[1] == ("GRADIENT", "FP32", [-1, -1])
    alias = kserve_stub.ModelMetadata(kpb.ModelMetadataRequest(name="l2"), timeout=10)
    assert alias.name == "l2" and tensors(alias.inputs) == tensors(mse.inputs)


def test_model_config_in_tritons_terms(kserve_stub: Stub) -> None:
    request = kpb.ModelConfigRequest(name="sparse_categorical_cross_entropy")
    config = kserve_stub.ModelConfig(request, timeout=10).config
    assert (config.name, config.platform, config.max_batch_size) == (
        "sparse_categorical_cross_entropy", "lossgrad", 0)
    assert [(t.name, config_pb.DataType.Name(t.data_type), list(t.dims), t.optional)
            for t in config.input] == [("PREDICTIONS", "TYPE_FP32", [-1, -1], False),
                                       ("TARGETS", "TYPE_INT64", [-1], False),
                                       ("SAMPLE_WEIGHT", "TYPE_FP32", [-1], True)]
    assert [(t.name, config_pb.DataType.Name(t.data_type)) for t in config.output] == [
        ("LOSS", "TYPE_FP64"), ("GRADIENT", "TYPE_FP32"), ("HESSIAN", "TYPE_FP32")]
    with pytest.raises(grpc.RpcError) as info:
        kserve_stub.ModelConfig(kpb.ModelConfigRequest(name="resnet50"), timeout=10)
    assert info.value.code() is grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]


# --- inference equals lossgrad.v1 ------------------------------------------------------------

def test_infer_raw_equals_the_native_api_bit_for_bit(
        kserve_stub: Stub, client: LossClient) -> None:
    x, y = _rng_case()
    w = np.linspace(0.0, 2.0, 16, dtype=np.float32)
    response = kserve_stub.ModelInfer(infer_request(
        "mse", {"PREDICTIONS": x, "TARGETS": y, "SAMPLE_WEIGHT": w}), timeout=30)
    native = client.compute_gradient("mse", x, y, sample_weight=w)
    out = outputs_of(response)
    assert (response.model_name, response.model_version, response.id) == ("mse", "1", "req-1")
    assert [o.name for o in response.outputs] == ["LOSS", "GRADIENT"]
    assert out["LOSS"].shape == (1,) and out["LOSS"].dtype == np.float64
    assert out["LOSS"][0] == native.loss
    assert out["GRADIENT"].dtype == np.float32
    assert out["GRADIENT"].tobytes() == native.gradient.tobytes()


def test_infer_parameters_and_reduction_none_in_float64(
        kserve_stub: Stub, client: LossClient) -> None:
    x, y = (a.astype(np.float64) * 3 for a in _rng_case(1))
    response = kserve_stub.ModelInfer(infer_request(
        "huber", {"PREDICTIONS": x, "TARGETS": y}, delta=0.5, reduction="none"), timeout=30)
    native = client.compute_gradient("huber", x, y, delta=0.5, reduction="none")
    out = outputs_of(response)
    assert isinstance(native.loss, np.ndarray)
    assert out["LOSS"].shape == x.shape
    assert out["LOSS"].tobytes() == native.loss.tobytes()  # float64 both
    assert out["GRADIENT"].dtype == np.float64
    assert out["GRADIENT"].tobytes() == native.gradient.tobytes()
    # An integer parameter value is taken for a double parameter.
    by_int = outputs_of(kserve_stub.ModelInfer(infer_request(
        "huber", {"PREDICTIONS": x, "TARGETS": y}, delta=2), timeout=30))
    assert by_int["LOSS"][0] == client.compute_loss("huber", x, y, delta=2.0).loss
    # Triton's scheduling hints are accepted and change nothing.
    hinted = infer_request("huber", {"PREDICTIONS": x, "TARGETS": y}, delta=2, timeout=100)
    hinted.parameters["priority"].uint64_param = 1
    hinted.parameters["triton_enable_empty_final_response"].bool_param = True
    assert outputs_of(kserve_stub.ModelInfer(hinted, timeout=30))["LOSS"][0] == by_int["LOSS"][0]


def test_infer_typed_contents_answers_typed(
        kserve_stub: Stub, client: LossClient) -> None:
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(12, 4)).astype(np.float32)
    labels = rng.integers(0, 4, size=12).astype(np.int64)
    labels[3] = -100
    params = {"from_logits": True, "label_smoothing": 0.1, "ignore_index": -100}
    response = kserve_stub.ModelInfer(infer_request(
        "sparse_categorical_cross_entropy", {"PREDICTIONS": logits, "TARGETS": labels},
        typed=True, class_weight="[1.0, 0.5, 2.0, 1.0]", **params), timeout=30)
    native = client.compute_gradient("sparse_categorical_cross_entropy", logits, labels,
                                     class_weight=[1.0, 0.5, 2.0, 1.0], **params)
    assert not response.raw_output_contents
    out = outputs_of(response)
    assert out["LOSS"][0] == native.loss
    assert out["GRADIENT"].tobytes() == native.gradient.tobytes()


def test_requested_outputs_and_aliases(
        kserve_stub: Stub, client: LossClient) -> None:
    x, y = _rng_case(3)
    y = (y > 0).astype(np.float32)
    only_loss = kserve_stub.ModelInfer(infer_request(
        "sigmoid_cross_entropy", {"PREDICTIONS": x, "TARGETS": y}, outputs=("LOSS",),
        reduction="sum"), timeout=30)
    assert [o.name for o in only_loss.outputs] == ["LOSS"]
    assert len(only_loss.raw_output_contents) == 1
    native = client.compute_loss("binary_cross_entropy", x, y, from_logits=True,
                                 reduction="sum")
    assert outputs_of(only_loss)["LOSS"][0] == native.loss
    gradient_only = kserve_stub.ModelInfer(infer_request(
        "mae", {"PREDICTIONS": x, "TARGETS": y}, outputs=("GRADIENT",)), timeout=30)
    assert [o.name for o in gradient_only.outputs] == ["GRADIENT"]


def test_raw_outputs_serialize_as_protobuf_does() -> None:
    message = kpb.ModelInferResponse(model_name="mse", model_version="1", id="x")
    arrays = (np.array([0.25]), np.arange(12, dtype=np.float32).reshape(4, 3) - 5)
    for name, array in zip(("LOSS", "GRADIENT"), arrays, strict=True):
        message.outputs.add(name=name, datatype=_DATATYPES[array.dtype], shape=array.shape)
    full = kpb.ModelInferResponse()
    full.CopyFrom(message)
    full.raw_output_contents.extend(a.tobytes() for a in arrays)
    written = kserve.serialize_infer(kserve.InferResponse(message, arrays))
    assert written == full.SerializeToString()
    big = np.zeros(100_000, np.float32)  # a length of three varint bytes
    assert kpb.ModelInferResponse.FromString(kserve.serialize_infer(
        kserve.InferResponse(message, (big,)))).raw_output_contents[0] == big.tobytes()


def test_hessian_on_request_equals_the_native_api(
        kserve_stub: Stub, client: LossClient) -> None:
    x, y = _rng_case(6)
    y = (y > 0).astype(np.float32)
    response = kserve_stub.ModelInfer(infer_request(
        "binary_cross_entropy", {"PREDICTIONS": x, "TARGETS": y},
        outputs=("LOSS", "GRADIENT", "HESSIAN"), from_logits=True, hessian="clipped",
        hessian_floor=1e-3, reduction="sum"), timeout=30)
    native = client.compute_gradient("binary_cross_entropy", x, y, from_logits=True,
                                     hessian="clipped", hessian_floor=1e-3, reduction="sum")
    out = outputs_of(response)
    assert native.hessian is not None and out["HESSIAN"].dtype == np.float32
    assert out["LOSS"][0] == native.loss
    assert out["GRADIENT"].tobytes() == native.gradient.tobytes()
    assert out["HESSIAN"].tobytes() == native.hessian.tobytes()
    assert out["HESSIAN"].min() >= np.float32(1e-3)
    # Without a mode, HESSIAN is the exact one.
    exact = outputs_of(kserve_stub.ModelInfer(infer_request(
        "mse", {"PREDICTIONS": x, "TARGETS": y}, outputs=("HESSIAN",)), timeout=30))
    assert list(exact) == ["HESSIAN"]
    assert exact["HESSIAN"].tobytes() == client.compute_gradient(
        "mse", x, y, hessian="exact").hessian.tobytes()  # type: ignore[union-attr]


def test_variance_input_and_its_gradient(kserve_stub: Stub, client: LossClient) -> None:
    x, y = _rng_case(8)
    v = np.linspace(0.5, 2.0, 80, dtype=np.float32).reshape(x.shape)
    meta = kserve_stub.ModelMetadata(kpb.ModelMetadataRequest(name="gaussian_nll"), timeout=10)
    assert [t.name for t in meta.inputs][-1] == "VARIANCE"
    assert [t.name for t in meta.outputs][-1] == "VARIANCE_GRADIENT"
    response = kserve_stub.ModelInfer(infer_request(
        "gaussian_nll", {"PREDICTIONS": x, "TARGETS": y, "VARIANCE": v},
        outputs=("LOSS", "GRADIENT", "VARIANCE_GRADIENT")), timeout=30)
    native = client.compute_gradient("gaussian_nll", x, y, variance=v)
    out = outputs_of(response)
    assert native.variance_gradient is not None
    assert out["LOSS"][0] == native.loss
    assert out["GRADIENT"].tobytes() == native.gradient.tobytes()
    assert out["VARIANCE_GRADIENT"].tobytes() == native.variance_gradient.tobytes()


# --- errors ----------------------------------------------------------------------------------

def _details(err: grpc.RpcError) -> tuple[str, str]:
    """(reason, field) from the google.rpc.Status in the error's trailers."""
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason, info.metadata.get("field", "")
    raise AssertionError("no ErrorInfo")


def _bad_requests() -> list[tuple[str, kpb.ModelInferRequest, grpc.StatusCode, str, str]]:
    x, y = _rng_case(4)
    xy = {"PREDICTIONS": x, "TARGETS": y}
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    uint8 = infer_request("mse", xy)
    uint8.inputs[0].datatype = "UINT8"
    short = infer_request("mse", xy)
    short.raw_input_contents[1] = y.tobytes()[:-4]
    one_raw = infer_request("mse", xy)
    del one_raw.raw_input_contents[1]
    both = infer_request("mse", xy)
    both.inputs[0].contents.fp32_contents.append(1.0)
    typed_short = infer_request("mse", xy, typed=True)
    del typed_short.inputs[1].contents.fp32_contents[-1]
    twice = infer_request("mse", xy)
    twice.inputs[1].name = "PREDICTIONS"
    negative = infer_request("mse", {"PREDICTIONS": x, "TARGETS": x[:0]})
    negative.inputs[1].shape[0] = -16
    return [
        ("unknown model", infer_request("resnet50", xy), grpc.StatusCode.NOT_FOUND,
         "UNKNOWN_MODEL", "model_name"),
        ("unknown version", _with(infer_request("mse", xy), model_version="7"),
         grpc.StatusCode.NOT_FOUND, "UNKNOWN_MODEL", "model_version"),
        ("missing input", infer_request("mse", {"PREDICTIONS": x}), invalid, "MISSING_FIELD",
         "TARGETS"),
        ("unknown input", infer_request("mse", {**xy, "LABELS": y}), invalid, "UNKNOWN_TENSOR",
         "inputs[2].name"),
        ("input twice", twice, invalid, "MALFORMED_REQUEST", "inputs[1].name"),
        ("unsupported datatype", uint8, invalid, "UNSUPPORTED_DTYPE", "PREDICTIONS.datatype"),
        ("integer predictions", infer_request(
            "mse", {"PREDICTIONS": x.astype(np.int32), "TARGETS": y}), invalid,
         "UNSUPPORTED_DTYPE", "PREDICTIONS.dtype"),
        ("float class indices", infer_request(
            "sparse_categorical_cross_entropy", {"PREDICTIONS": x, "TARGETS": y[:, 0]}),
         invalid, "UNSUPPORTED_DTYPE", "TARGETS.dtype"),
        ("shape mismatch", infer_request("mse", {"PREDICTIONS": x, "TARGETS": y[:8]}), invalid,
         "SHAPE_MISMATCH", "TARGETS.shape"),
        ("raw bytes short", short, invalid, "BYTE_SIZE_MISMATCH", "TARGETS.data"),
        ("typed values short", typed_short, invalid, "BYTE_SIZE_MISMATCH",
         "TARGETS.contents.fp32_contents"),
        ("negative dimension", negative, invalid, "NEGATIVE_DIMENSION", "TARGETS.shape[0]"),
        ("raw for one input of two", one_raw, invalid, "MALFORMED_REQUEST",
         "raw_input_contents"),
        ("raw and typed", both, invalid, "INVALID_ARGUMENT", "PREDICTIONS.contents"),
        ("parameter out of range", infer_request("huber", xy, delta=-1.0), invalid,
         "PARAMETER_OUT_OF_RANGE", "parameters.delta"),
        ("parameter of the wrong type", infer_request("huber", xy, delta="big"), invalid,
         "PARAMETER_OUT_OF_RANGE", "parameters.delta"),
        ("bool for a number", infer_request("huber", xy, delta=True), invalid,
         "PARAMETER_OUT_OF_RANGE", "parameters.delta"),
        ("unknown parameter", infer_request("mse", xy, delta=1.0), invalid,
         "UNKNOWN_PARAMETER", "parameters.delta"),
        ("Hessian mode without the output", infer_request("mse", xy, hessian="exact"),
         invalid, "UNKNOWN_PARAMETER", "parameters.hessian"),
        ("unknown Hessian mode", infer_request("mse", xy, outputs=("HESSIAN",),
                                               hessian="diagonal"), invalid,
         "UNKNOWN_HESSIAN_MODE", "parameters.hessian"),
        ("Hessian floor out of range", infer_request(
            "mse", xy, outputs=("HESSIAN",), hessian="clipped", hessian_floor=-1.0), invalid,
         "PARAMETER_OUT_OF_RANGE", "parameters.hessian_floor"),
        ("unknown reduction", infer_request("mse", xy, reduction="max"), invalid,
         "UNKNOWN_REDUCTION", "parameters.reduction"),
        ("reduction not a string", infer_request("mse", xy, reduction=2), invalid,
         "PARAMETER_OUT_OF_RANGE", "parameters.reduction"),
        ("class_weight not JSON", infer_request(
            "sparse_categorical_cross_entropy",
            {"PREDICTIONS": x, "TARGETS": np.zeros(16, np.int64)}, class_weight="1,2"),
         invalid, "PARAMETER_OUT_OF_RANGE", "parameters.class_weight"),
        ("variance missing", infer_request("gaussian_nll", xy), invalid, "MISSING_FIELD",
         "VARIANCE"),
        ("variance of a loss without one", infer_request("mse", {**xy, "VARIANCE": y}),
         invalid, "UNEXPECTED_FIELD", "VARIANCE"),
        ("variance gradient of a loss without one", infer_request(
            "mse", xy, outputs=("VARIANCE_GRADIENT",)), invalid, "UNKNOWN_TENSOR", "outputs"),
        ("unknown output", infer_request("mse", xy, outputs=("PROBABILITIES",)), invalid,
         "UNKNOWN_TENSOR", "outputs[0].name"),
        ("non-finite input", infer_request(
            "mse", {"PREDICTIONS": np.full(4, np.nan, np.float32),
                    "TARGETS": np.zeros(4, np.float32)}), invalid, "NONFINITE_INPUT",
         "PREDICTIONS.data[0]"),
    ]


def _with(request: kpb.ModelInferRequest, **fields: Any) -> kpb.ModelInferRequest:
    for key, value in fields.items():
        setattr(request, key, value)
    return request


@pytest.mark.parametrize(("case", "request_", "code", "reason", "field"), _bad_requests(),
                         ids=[case[0] for case in _bad_requests()])
def test_bad_requests_get_the_documented_status(
        kserve_stub: Stub, case: str, request_: kpb.ModelInferRequest,
        code: grpc.StatusCode, reason: str, field: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        kserve_stub.ModelInfer(request_, timeout=30)
    err = info.value
    assert err.code() is code, err.details()  # type: ignore[attr-defined]
    assert err.details().startswith(f"{field}: ")  # type: ignore[attr-defined]
    assert _details(err) == (reason, field)
    assert kserve_stub.ServerReady(kpb.ServerReadyRequest(), timeout=10).ready  # still serving


def test_model_metadata_of_an_unknown_model_is_not_found(
        kserve_stub: Stub) -> None:
    with pytest.raises(grpc.RpcError) as info:
        kserve_stub.ModelMetadata(kpb.ModelMetadataRequest(name="resnet50"), timeout=10)
    assert info.value.code() is grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
    assert "mse" in info.value.details()  # type: ignore[attr-defined]  (names the models)


def test_methods_outside_the_required_subset_are_unimplemented(server_address: str) -> None:
    with grpc.insecure_channel(server_address) as channel:
        call = channel.unary_unary(f"/{KSERVE}/ModelStatistics")
        with pytest.raises(grpc.RpcError) as info:
            call(b"", timeout=10)
        assert info.value.code() is grpc.StatusCode.UNIMPLEMENTED  # type: ignore[attr-defined]


# --- server options --------------------------------------------------------------------------

def test_reflection_lists_the_inference_service(server_address: str) -> None:
    with grpc.insecure_channel(server_address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        assert KSERVE in database.get_services()
        from google.protobuf.descriptor_pool import DescriptorPool

        service = DescriptorPool(database).FindServiceByName(KSERVE)
        assert {m.name for m in service.methods} == {
            "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata",
            "ModelInfer", "ModelConfig"}


def test_readiness_follows_the_servers(start: Callable[..., tuple[LossServer, str]]) -> None:
    server, address = start(warm=False)
    with grpc.insecure_channel(address) as channel:
        stub = kpb_grpc.GRPCInferenceServiceStub(channel)
        info = pb_grpc.LossServiceStub(channel).GetServerInfo(pb.GetServerInfoRequest(),
                                                              timeout=10)
        assert info.features.kserve
        assert stub.ServerReady(kpb.ServerReadyRequest(), timeout=10).ready
        # What stop() does first; the port keeps answering here.
        server.health.set("lossgrad.v1.LossService", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert stub.ServerLive(kpb.ServerLiveRequest(), timeout=10).live
        assert not stub.ServerReady(kpb.ServerReadyRequest(), timeout=10).ready
        assert not stub.ModelReady(kpb.ModelReadyRequest(name="mse"), timeout=10).ready


def test_the_api_can_be_turned_off(start: Callable[..., tuple[LossServer, str]]) -> None:
    _, address = start(warm=False, kserve_api=False)
    with grpc.insecure_channel(address) as channel:
        info = pb_grpc.LossServiceStub(channel).GetServerInfo(pb.GetServerInfoRequest(),
                                                              timeout=10)
        assert not info.features.kserve
        assert KSERVE not in ProtoReflectionDescriptorDatabase(channel).get_services()
        with pytest.raises(grpc.RpcError) as err:
            kpb_grpc.GRPCInferenceServiceStub(channel).ServerLive(kpb.ServerLiveRequest(),
                                                                  timeout=10)
        assert err.value.code() is grpc.StatusCode.UNIMPLEMENTED  # type: ignore[attr-defined]


def test_max_elements_applies(start: Callable[..., tuple[LossServer, str]]) -> None:
    server, address = start(warm=False, max_elements=100)
    x, y = _rng_case(5)  # 80 + 80 elements
    with grpc.insecure_channel(address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            kpb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                infer_request("mse", {"PREDICTIONS": x, "TARGETS": y}), timeout=30)
    assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    assert _details(info.value) == ("TOO_MANY_ELEMENTS", "request")
    assert server.telemetry.loss_counts() == {"mse": (1, 1)}


@pytest.mark.parametrize(("datatype", "dtype"), [("FP16", np.dtype(np.float16)),
                                                 ("BF16", np.dtype(ml_dtypes.bfloat16))])
def test_half_precision_inputs_in_raw_contents(
        kserve_stub: Stub, client: LossClient, datatype: str, dtype: np.dtype[Any]) -> None:
    """FP16/BF16 predictions and targets (raw only: the protocol has no typed field for
    them) give the native API's bits, the gradient in the predictions' datatype."""
    x, y = (a.astype(dtype) for a in _rng_case(5))
    request = kpb.ModelInferRequest(model_name="binary_cross_entropy")
    request.parameters["from_logits"].bool_param = True
    for name, array in (("PREDICTIONS", x), ("TARGETS", (y > 0).astype(dtype))):
        request.inputs.add(name=name, datatype=datatype, shape=array.shape)
        request.raw_input_contents.append(array.tobytes())
    out = kserve_stub.ModelInfer(request, timeout=30)
    native = client.compute_gradient("binary_cross_entropy", x, (y > 0).astype(dtype),
                                     from_logits=True)
    assert [o.datatype for o in out.outputs] == ["FP64", datatype]
    assert np.frombuffer(out.raw_output_contents[0], "<f8")[0] == native.loss
    assert out.raw_output_contents[1] == native.gradient.tobytes()
    typed = kpb.ModelInferRequest(model_name="mse")
    for name in ("PREDICTIONS", "TARGETS"):
        typed.inputs.add(name=name, datatype=datatype, shape=[2]).contents.fp32_contents.extend(
            [1.0, 2.0])
    with pytest.raises(grpc.RpcError) as info:
        kserve_stub.ModelInfer(typed, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert _details(info.value) == ("UNSUPPORTED_DTYPE", "PREDICTIONS.contents")
