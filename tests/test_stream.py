"""ComputeStream end to end: a real server whose message limit is smaller than the
tensors, the real clients (sync and async), results bit-identical to the unary calls,
whatever the chunk size; malformed streams get INVALID_ARGUMENT naming the field.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from lossgrad import compute
from lossgrad.server import create_server
from lossgrad_client import AsyncLossClient, InvalidArgumentError, LossClient
from lossgrad_client._proto.lossgrad.v1 import lossgrad_pb2 as pb
from lossgrad_client._proto.lossgrad.v1 import lossgrad_pb2_grpc as pb_grpc
from lossgrad_client._stream import DEFAULT_CHUNK_BYTES, stream_sizes

pytestmark = pytest.mark.e2e

MAX_MESSAGE = 256 * 1024  # the server's limit: every tensor below is larger
TIMEOUT = 60.0


@pytest.fixture(scope="module")
def small_server() -> Iterator[str]:
    server, port = create_server("127.0.0.1", 0, max_message_bytes=MAX_MESSAGE,
                                 max_stream_chunks=1000)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(0).wait()


def _client(address: str, chunk_bytes: int) -> LossClient:
    return LossClient(address, timeout=TIMEOUT, max_message_bytes=MAX_MESSAGE,
                      stream_chunk_bytes=chunk_bytes)


def _cases() -> list[tuple[str, np.ndarray, np.ndarray, dict[str, Any]]]:
    rng = np.random.default_rng(7)
    x = rng.standard_normal((96, 700)).astype(np.float32)  # 269 KB: over the limit
    t = rng.standard_normal((96, 700)).astype(np.float32)
    labels01 = (rng.random((96, 700)) < 0.4).astype(np.float32)
    logits = rng.standard_normal((4, 150, 120)).astype(np.float32)
    classes = rng.integers(0, 120, (4, 150))
    classes[:, ::7] = 5  # ignored
    return [
        ("mse", x, t, {"sample_weight": rng.uniform(0, 2, 96)}),
        ("binary_cross_entropy", x, labels01, {"from_logits": True}),
        ("sparse_categorical_cross_entropy", logits, classes,
         {"from_logits": True, "ignore_index": 5, "class_weight": rng.uniform(0.2, 3, 120),
          "sample_weight": rng.uniform(0, 1, 4)}),
    ]


CASES = _cases()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_stream_matches_unary_bits(small_server: str, case: Any, reduction: str) -> None:
    """Larger than the server's message limit, so only the stream can carry it; the
    in-process engine gives the unary bits (a unary call would exceed the limit)."""
    loss, x, t, kw = case
    assert x.nbytes > MAX_MESSAGE
    expected = compute(loss, x, t, reduction=reduction, **kw)
    with _client(small_server, 50_000) as client:
        got = client.compute_gradient(loss, x, t, reduction=reduction, **kw)
        value = client.compute_loss(loss, x, t, reduction=reduction, **kw)
    assert np.array_equal(got.gradient, expected.gradient)
    assert got.gradient.dtype == x.dtype and got.gradient.shape == x.shape
    for result in (got, value):
        assert np.array_equal(result.loss, expected.loss)
        assert result.positions == expected.positions
        assert result.positions_counted == expected.positions_counted
        assert result.weight_sum == expected.weight_sum


@pytest.mark.parametrize("chunk_bytes", [1, 3_000, 33_333, 120_000])
def test_chunk_size_invariance(small_server: str, chunk_bytes: int) -> None:
    """Any chunk size (one row, rows that cut kernel blocks, large chunks) gives the same
    bits as the unary call on a server whose limit admits it."""
    loss, x, t, kw = CASES[2]
    x, t = x[:, :40], t[:, :40]  # 77 KB: unary fits too
    with _client(small_server, chunk_bytes) as client:
        unary = client.compute_gradient(loss, x, t, stream=False, **kw)
        streamed = client.compute_gradient(loss, x, t, stream=True, **kw)
    assert np.array_equal(unary.gradient, streamed.gradient)
    assert unary.loss == streamed.loss and unary.weight_sum == streamed.weight_sum


def test_unaligned_chunks_from_a_raw_stream(small_server: str) -> None:
    """Chunks of 3 rows cut the server's blocks (409 rows of 10 classes): the carry gives
    the same bits as the unary call."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2000, 10)).astype(np.float32)
    y = rng.integers(0, 10, 2000)
    expected = compute("sparse_categorical_cross_entropy", x, y, from_logits=True)
    header = pb.ComputeStreamHeader(
        loss="sparse_categorical_cross_entropy", gradient=True,
        params=pb.LossParams(from_logits=True),
        predictions=pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=x.shape),
        targets=pb.Tensor(dtype=pb.DATA_TYPE_INT64, shape=y.shape))
    chunks = [pb.ComputeStreamRequest(
        predictions=pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=x[i:i + 3].shape,
                              data=x[i:i + 3].tobytes()),
        targets=pb.Tensor(dtype=pb.DATA_TYPE_INT64, shape=y[i:i + 3].shape,
                          data=y[i:i + 3].tobytes())) for i in range(0, 2000, 3)]
    with grpc.insecure_channel(small_server) as channel:
        responses = list(pb_grpc.LossServiceStub(channel).ComputeStream(
            iter([pb.ComputeStreamRequest(header=header), *chunks]), timeout=TIMEOUT))
    assert responses[0].ready.block_rows == 409
    grad = np.concatenate([np.frombuffer(r.gradient.data, np.float32)
                           for r in responses[1:-1]])
    assert np.array_equal(grad, expected.gradient.reshape(-1))
    assert responses[-1].summary.loss == expected.loss


def test_async_client_streams_with_out_and_progress(small_server: str) -> None:
    loss, x, t, kw = CASES[0]
    expected = compute(loss, x, t, **kw)
    out = np.empty_like(x)
    seen: list[tuple[int, int]] = []

    async def run() -> Any:
        async with AsyncLossClient(small_server, timeout=TIMEOUT, max_message_bytes=MAX_MESSAGE,
                                   stream_chunk_bytes=40_000) as client:
            return await client.compute_gradient(loss, x, t, out=out,
                                                 progress=lambda a, b: seen.append((a, b)),
                                                 **kw)

    result = asyncio.run(run())
    assert result.gradient is out and np.array_equal(out, expected.gradient)
    assert result.loss == expected.loss
    assert seen[-1][0] == seen[-1][1] and len(seen) > 2  # weight pass + data pass chunks


def test_out_on_the_unary_path(small_server: str) -> None:
    x = np.linspace(-1, 1, 10)
    out = np.empty_like(x)
    with _client(small_server, 50_000) as client:
        result = client.compute_gradient("mse", x, np.zeros(10), out=out)
        with pytest.raises(InvalidArgumentError) as err:
            client.compute_gradient("mse", x, np.zeros(10), out=np.empty(10, np.float32))
    assert result.gradient is out and np.array_equal(out, compute("mse", x, np.zeros(10))
                                                         .gradient)
    assert err.value.field == "out"


# --- malformed streams -----------------------------------------------------------------

def _header(**kw: Any) -> pb.ComputeStreamRequest:
    return pb.ComputeStreamRequest(header=pb.ComputeStreamHeader(
        loss="mse", gradient=True,
        predictions=pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[4, 2]),
        targets=pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[4, 2]), **kw))


def _chunk(rows: int, cols: int = 2, dtype: int = pb.DATA_TYPE_FLOAT32,
           nbytes: int | None = None) -> pb.ComputeStreamRequest:
    data = bytes(rows * cols * 4 if nbytes is None else nbytes)
    tensor = pb.Tensor(dtype=dtype, shape=[rows, cols], data=data)
    return pb.ComputeStreamRequest(predictions=tensor, targets=pb.Tensor(
        dtype=pb.DATA_TYPE_FLOAT32, shape=[rows, cols], data=bytes(rows * cols * 4)))


MALFORMED = {
    "missing header": ([_chunk(4)], "header", "MISSING_FIELD"),
    "no messages": ([], "header", "MISSING_FIELD"),
    "second header": ([_header(), _header()], "chunk[0].header", "MALFORMED_STREAM"),
    "shape change": ([_header(), _chunk(2), _chunk(2, cols=3)], "chunk[1].predictions.shape",
                     "SHAPE_MISMATCH"),
    "wrong byte size": ([_header(), _chunk(2, nbytes=12)], "chunk[0].predictions.data",
                        "BYTE_SIZE_MISMATCH"),
    "dtype change": ([_header(), _chunk(2, dtype=pb.DATA_TYPE_FLOAT64)],
                     "chunk[0].predictions.dtype", "UNSUPPORTED_DTYPE"),
    "too many rows": ([_header(), _chunk(3), _chunk(3)], "chunk[1].predictions.shape[0]",
                      "SHAPE_MISMATCH"),
    "ends early": ([_header(), _chunk(3)], "chunk[1]", "MALFORMED_STREAM"),
    "too many chunks": ([_header(), *[_chunk(0)] * 1001], "chunk[1000]", "TOO_MANY_CHUNKS"),
    "data in header": ([pb.ComputeStreamRequest(header=pb.ComputeStreamHeader(
        loss="mse", predictions=pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[1], data=b"1234"),
        targets=pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[1])))],
        "header.predictions.data", "MALFORMED_STREAM"),
    "rmse gradient": ([pb.ComputeStreamRequest(header=pb.ComputeStreamHeader(
        loss="rmse", gradient=True, predictions=pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[1]),
        targets=pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[1])))],
        "header.gradient", "NOT_STREAMABLE"),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_stream(small_server: str, name: str) -> None:
    messages, field, reason = MALFORMED[name]
    with grpc.insecure_channel(small_server) as channel:
        stub = pb_grpc.LossServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.ComputeStream(iter(messages), timeout=TIMEOUT))
        metadata = dict(err.value.trailing_metadata() or ())
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert (metadata["lossgrad-error-field"], metadata["lossgrad-error-reason"]) == \
            (field, reason)
        # the server keeps serving
        ok = list(stub.ComputeStream(iter([_header(), _chunk(4)]), timeout=TIMEOUT))
        assert ok[-1].summary.positions == 8


def test_bad_value_mid_stream_has_its_absolute_index(small_server: str) -> None:
    loss, x, t, kw = CASES[1]
    x = x.copy()
    x[80, 3] = np.nan
    with _client(small_server, 20_000) as client, pytest.raises(InvalidArgumentError) as err:
        client.compute_gradient(loss, x, t, **kw)
    assert err.value.field == f"predictions.data[{80 * 700 + 3}]"


def test_deadline_ends_the_stream(small_server: str) -> None:
    loss, x, t, kw = CASES[2]
    with _client(small_server, 1) as client, pytest.raises(Exception) as err:
        client.compute_gradient(loss, x, t, timeout=0.05, **kw)
    assert "DEADLINE_EXCEEDED" in str(err.value)


def test_server_info_announces_streaming(small_server: str) -> None:
    with grpc.insecure_channel(small_server) as channel:
        info = pb_grpc.LossServiceStub(channel).GetServerInfo(pb.GetServerInfoRequest())
    assert info.features.streaming and info.limits.max_stream_chunks == 1000
    assert {pb.DATA_TYPE_FLOAT16, pb.DATA_TYPE_BFLOAT16} <= set(info.supported_dtypes)


def _weighted_3d() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(11)
    x = rng.standard_normal((4, 6, 5)).astype(np.float32)
    t = rng.standard_normal((4, 6, 5)).astype(np.float32)
    classes = rng.integers(0, 5, (4, 6))
    return x, t, classes, rng.uniform(0, 2, (4, 6, 5))


@pytest.mark.parametrize(("loss", "weights"), [
    ("mse", lambda w: w), ("mse", lambda w: w[:, 0, 0]),
    ("sparse_categorical_cross_entropy", lambda w: w[:, :, 0]),
    ("sparse_categorical_cross_entropy", lambda w: w[:, 0, 0]),
], ids=["mse per element", "mse per batch row", "sce per position", "sce per batch row"])
def test_3d_weights_the_unary_call_takes(small_server: str, loss: str, weights: Any) -> None:
    """The client merges (batch, sequence) into rows; per-position and batch-axis
    weights of 3-D predictions give the unary call's bits."""
    x, t, classes, w = _weighted_3d()
    targets = classes if loss.startswith("sparse") else t
    kw = {"from_logits": True} if loss.startswith("sparse") else {}
    with _client(small_server, 100) as client:
        unary = client.compute_gradient(loss, x, targets, sample_weight=weights(w),
                                        stream=False, **kw)
        streamed = client.compute_gradient(loss, x, targets, sample_weight=weights(w),
                                           stream=True, **kw)
    assert np.array_equal(unary.gradient, streamed.gradient)
    assert unary.loss == streamed.loss and unary.weight_sum == streamed.weight_sum


@pytest.mark.parametrize(("loss", "weights"), [
    ("mse", lambda w: w[:, :, 0]),  # (batch, sequence): neither batch axis nor per element
    ("sparse_categorical_cross_entropy", lambda w: w),  # per element, not per position
], ids=["mse per (batch, sequence)", "sce per element"])
def test_3d_weights_the_unary_call_refuses(small_server: str, loss: str, weights: Any) -> None:
    """The catalog's rule (weights per batch row or per position; PyTorch broadcasts no
    other leading shape either) holds for the stream too, with the unary error."""
    x, t, classes, w = _weighted_3d()
    targets = classes if loss.startswith("sparse") else t
    errors = []
    with _client(small_server, 100) as client:
        for stream in (False, True):
            with pytest.raises(InvalidArgumentError) as info:
                client.compute_loss(loss, x, targets, sample_weight=weights(w), stream=stream)
            errors.append((info.value.reason, info.value.field, str(info.value)))
    assert errors[0] == errors[1]
    assert errors[0][:2] == ("SHAPE_MISMATCH", "sample_weight.shape")


def test_default_threshold_is_32_mib_at_most_half_a_message(small_server: str) -> None:
    assert stream_sizes(256 << 20, None, DEFAULT_CHUNK_BYTES) == (32 << 20, 16 << 20)
    assert stream_sizes(1 << 30, None, DEFAULT_CHUNK_BYTES)[0] == 32 << 20
    assert stream_sizes(MAX_MESSAGE, None, DEFAULT_CHUNK_BYTES) == (MAX_MESSAGE // 2,
                                                                    MAX_MESSAGE // 2)
    assert stream_sizes(256 << 20, 1000, DEFAULT_CHUNK_BYTES)[0] == 1000


def test_a_variance_is_never_streamed(small_server: str) -> None:
    rng = np.random.default_rng(3)
    x, t = rng.standard_normal(3000), rng.standard_normal(3000)
    var = rng.uniform(0.5, 2.0, 3000)
    with LossClient(small_server, timeout=TIMEOUT, max_message_bytes=MAX_MESSAGE,
                    stream_threshold_bytes=1000) as client:
        with pytest.raises(InvalidArgumentError) as info:
            client.compute_gradient("gaussian_nll", x, t, variance=var, stream=True)
        assert info.value.field == "variance"
        got = client.compute_gradient("gaussian_nll", x, t, variance=var)  # past the
        want = compute("gaussian_nll", x, t, variance=var)  # threshold: one message
        assert got.loss == want.loss
        assert got.gradient.tobytes() == want.gradient.tobytes()
