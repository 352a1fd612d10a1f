"""The shared-memory transport: the server's validation of keys, regions and locations,
and calls through the real clients against a real server on a loopback port, whose
results must be bit-identical to those of the plain bytes path.

Each server here opens keys in a temporary directory of its own (``--shared-memory-dir``),
as a sidecar does with a volume shared by both containers; the clients create their
segments there too.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from lossgrad import errors, shm
from lossgrad.server import create_server
from lossgrad.shm import SharedMemoryConfig, SharedMemoryRegistry
from lossgrad_client import (
    AsyncLossClient,
    FailedPreconditionError,
    LossClient,
    SharedMemoryOptions,
)
from lossgrad_client._proto.lossgrad.v1 import lossgrad_pb2 as pb
from lossgrad_client._proto.lossgrad.v1 import lossgrad_pb2_grpc as pb_grpc
from lossgrad_client._wire import SharedMemoryLocation, Tensor

CALL_TIMEOUT_S = 60.0
F32 = pb.DATA_TYPE_FLOAT32


def make_object(directory: Path, name: str, size: int, fill: bytes = b"") -> Path:
    """A shared-memory object (a file in the server's directory) of ``size`` bytes."""
    path = directory / name
    path.write_bytes(fill.ljust(size, b"\0"))
    return path


def segments(directory: Path) -> list[Path]:
    """The files in a server's shared-memory directory but its socket."""
    return [p for p in directory.iterdir() if not p.is_socket()]


# --- the registry, without gRPC ------------------------------------------------------------

@pytest.fixture()
def registry(tmp_path: Path) -> Iterator[SharedMemoryRegistry]:
    reg = SharedMemoryRegistry(SharedMemoryConfig(str(tmp_path), "lossgrad", 3, 1 << 20))
    yield reg
    reg.close()


@pytest.mark.parametrize("key", [
    "", "/", ".", "..", "/..", "../lossgrad-x", "lossgrad/../x", "/lossgrad/x", "//lossgrad-x",
    "lossgrad x", "lossgrad-\u00e9", "other-x", "x" * 300, "lossgrad-" + "x" * 250,
])
def test_keys_outside_the_directory_or_prefix_are_refused(
        registry: SharedMemoryRegistry, key: str) -> None:
    with pytest.raises(errors.InvalidArgumentError) as info:
        registry.register("r", key, 0, 8)
    assert (info.value.field, info.value.reason) == ("key", errors.SHARED_MEMORY_INVALID_KEY)


def test_symbolic_links_and_directories_are_refused(registry: SharedMemoryRegistry,
                                                     tmp_path: Path) -> None:
    target = make_object(tmp_path, "elsewhere", 64)
    (tmp_path / "lossgrad-link").symlink_to(target)
    (tmp_path / "lossgrad-dir").mkdir()
    for key in ("lossgrad-link", "/lossgrad-dir"):
        with pytest.raises(errors.InvalidArgumentError) as info:
            registry.register("r", key, 0, 8)
        assert info.value.reason == errors.SHARED_MEMORY_INVALID_KEY, key
    assert registry.status("") == []


def test_a_missing_key_is_not_found(registry: SharedMemoryRegistry) -> None:
    with pytest.raises(errors.NotFoundError) as info:
        registry.register("r", "/lossgrad-missing", 0, 8)
    assert (info.value.field, info.value.reason) == ("key", errors.SHARED_MEMORY_KEY_NOT_FOUND)


@pytest.mark.parametrize(("name", "offset", "byte_size", "field", "reason"), [
    ("", 0, 8, "name", errors.SHARED_MEMORY_INVALID_NAME),
    ("a/b", 0, 8, "name", errors.SHARED_MEMORY_INVALID_NAME),
    ("r" * 129, 0, 8, "name", errors.SHARED_MEMORY_INVALID_NAME),
    ("r", -1, 8, "offset", errors.SHARED_MEMORY_OUT_OF_RANGE),
    ("r", 0, 0, "byte_size", errors.SHARED_MEMORY_OUT_OF_RANGE),
    ("r", 0, -8, "byte_size", errors.SHARED_MEMORY_OUT_OF_RANGE),
    ("r", 0, 4097, "byte_size", errors.SHARED_MEMORY_OUT_OF_RANGE),
    ("r", 4000, 100, "byte_size", errors.SHARED_MEMORY_OUT_OF_RANGE),
    ("r", 2**62, 2**62, "byte_size", errors.SHARED_MEMORY_OUT_OF_RANGE),
])
def test_bad_names_and_ranges(registry: SharedMemoryRegistry, tmp_path: Path, name: str,
                              offset: int, byte_size: int, field: str, reason: str) -> None:
    make_object(tmp_path, "lossgrad-a", 4096)
    with pytest.raises(errors.InvalidArgumentError) as info:
        registry.register(name, "/lossgrad-a", offset, byte_size)
    assert (info.value.field, info.value.reason) == (field, reason)


def test_registration_is_idempotent_and_names_are_not_reused(
        registry: SharedMemoryRegistry, tmp_path: Path) -> None:
    make_object(tmp_path, "lossgrad-a", 8192)
    registry.register("r", "/lossgrad-a", 4096, 4096)
    registry.register("r", "/lossgrad-a", 4096, 4096)  # the same again: fine
    with pytest.raises(errors.AlreadyExistsError) as info:
        registry.register("r", "/lossgrad-a", 0, 4096)
    assert info.value.reason == errors.SHARED_MEMORY_REGION_EXISTS
    (region,) = registry.status("r")
    assert (region.name, region.key, region.offset, region.byte_size, region.writable) == \
        ("r", "/lossgrad-a", 4096, 4096, True)
    registry.unregister("r")
    registry.unregister("r")  # unknown names are not an error
    with pytest.raises(errors.NotFoundError):
        registry.status("r")


def test_limits_on_regions_and_bytes(registry: SharedMemoryRegistry, tmp_path: Path) -> None:
    make_object(tmp_path, "lossgrad-a", 1 << 20)
    registry.register("big", "lossgrad-a", 0, (1 << 20) - 8)
    with pytest.raises(errors.ResourceExhaustedError) as info:
        registry.register("more", "lossgrad-a", 0, 16)
    assert info.value.reason == errors.TOO_MANY_SHARED_MEMORY_BYTES
    registry.unregister("big")
    for name in ("a", "b", "c"):
        registry.register(name, "lossgrad-a", 0, 8)
    with pytest.raises(errors.ResourceExhaustedError) as info:
        registry.register("d", "lossgrad-a", 0, 8)
    assert info.value.reason == errors.TOO_MANY_SHARED_MEMORY_REGIONS


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write any file")
def test_an_object_the_server_may_only_read_takes_no_outputs(
        registry: SharedMemoryRegistry, tmp_path: Path) -> None:
    path = make_object(tmp_path, "lossgrad-ro", 4096, np.ones(8, np.float32).tobytes())
    path.chmod(0o400)
    registry.register("ro", "lossgrad-ro", 0, 4096)
    assert registry.status("ro")[0].writable is False
    with registry.call() as scope:
        tensor = Tensor(F32, (8,), b"", SharedMemoryLocation("ro", 0, 32))
        array = scope.decode(tensor, "predictions")
        assert array.tolist() == [1.0] * 8 and not array.flags.writeable
        with pytest.raises(errors.FailedPreconditionError) as info:
            scope.output(SharedMemoryLocation("ro", 64, 32), "gradient_output", 4)
        assert info.value.reason == errors.SHARED_MEMORY_READ_ONLY


def test_inputs_are_read_only_views_of_the_region(registry: SharedMemoryRegistry,
                                                  tmp_path: Path) -> None:
    values = np.arange(16, dtype=np.float64)
    path = make_object(tmp_path, "lossgrad-a", 4096, values.tobytes())
    registry.register("r", "lossgrad-a", 0, 4096)
    with registry.call() as scope:
        array = scope.decode(Tensor(pb.DATA_TYPE_FLOAT64, (4, 4), b"",
                                    SharedMemoryLocation("r", 0, 128)), "targets")
        assert array.shape == (4, 4) and not array.flags.writeable
        np.testing.assert_array_equal(array.ravel(), values)
        with path.open("r+b") as f:  # the client writes: the view sees it (no copy)
            f.write(np.float64(-1).tobytes())
        assert array[0, 0] == -1.0
        del array


def test_unregister_during_a_call_unmaps_after_it(registry: SharedMemoryRegistry,
                                                   tmp_path: Path) -> None:
    path = make_object(tmp_path, "lossgrad-a", 4096, np.ones(4, np.float32).tobytes())
    registry.register("r", "lossgrad-a", 0, 4096)
    with registry.call() as scope:
        array = scope.decode(Tensor(F32, (4,), b"", SharedMemoryLocation("r", 0, 16)), "x")
        registry.unregister("r")
        assert registry.status("") == []
        assert array.sum() == 4.0  # still mapped: the call holds it
        with pytest.raises(errors.NotFoundError):  # but new uses fail
            scope.decode(Tensor(F32, (4,), b"", SharedMemoryLocation("r2", 0, 16)), "y")
        del array
    assert str(path) not in Path("/proc/self/maps").read_text()


# --- a server with shared memory on --------------------------------------------------------

@pytest.fixture(scope="module")
def shm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("shm")


@pytest.fixture(scope="module")
def shm_server(shm_dir: Path) -> Iterator[tuple[Any, str]]:
    server, port = create_server("127.0.0.1", 0, shared_memory=SharedMemoryConfig(
        str(shm_dir), max_regions=32, max_bytes=1 << 30))
    try:
        yield server, f"127.0.0.1:{port}"
    finally:
        server.stop(0).wait()


@pytest.fixture(scope="module")
def shm_address(shm_server: tuple[Any, str]) -> str:
    return shm_server[1]


@pytest.fixture(scope="module")
def shm_stub(shm_address: str) -> Iterator[pb_grpc.LossServiceStub]:
    with grpc.insecure_channel(shm_address) as channel:
        yield pb_grpc.LossServiceStub(channel)


@pytest.fixture()
def options(shm_dir: Path) -> SharedMemoryOptions:
    return SharedMemoryOptions(directory=str(shm_dir), min_bytes=0)


@pytest.fixture(scope="module")
def plain(shm_address: str) -> Iterator[LossClient]:
    with LossClient(shm_address, timeout=CALL_TIMEOUT_S) as client:
        yield client


def _cases(rng: np.random.Generator, dtype: Any) -> list[tuple[str, Any, Any, dict[str, Any]]]:
    x = rng.normal(size=(64, 10)).astype(dtype)
    labels = rng.integers(0, 10, size=64)
    labels[::7] = 3
    probs = rng.dirichlet(np.ones(10), size=64).astype(dtype)
    return [
        ("mse", x, rng.normal(size=x.shape).astype(dtype), {}),
        ("huber", x, rng.normal(size=x.shape).astype(dtype), {"delta": 0.5}),
        ("binary_cross_entropy", x, (rng.random(x.shape) < 0.5).astype(dtype),
         {"from_logits": True, "pos_weight": 2.0}),
        ("sparse_categorical_cross_entropy", x, labels,
         {"from_logits": True, "ignore_index": 3, "class_weight": list(np.linspace(0.5, 2, 10)),
          "label_smoothing": 0.1}),
        ("categorical_cross_entropy", x, probs, {"from_logits": True}),
        ("kl_divergence", probs, rng.dirichlet(np.ones(10), size=64).astype(dtype), {}),
    ]


def _same(a: Any, b: Any) -> None:
    for name in ("positions", "positions_counted", "weight_sum"):
        assert getattr(a, name) == getattr(b, name), name
    if isinstance(a.loss, np.ndarray):
        assert a.loss.dtype == b.loss.dtype and a.loss.shape == b.loss.shape
        assert a.loss.tobytes() == b.loss.tobytes()
    else:
        assert np.float64(a.loss).tobytes() == np.float64(b.loss).tobytes()
    if hasattr(a, "gradient"):
        assert a.gradient.dtype == b.gradient.dtype and a.gradient.shape == b.gradient.shape
        assert a.gradient.tobytes() == b.gradient.tobytes()


@pytest.mark.e2e
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_copying_mode_is_bit_identical_to_bytes(shm_address: str, plain: LossClient,
                                                options: SharedMemoryOptions,
                                                dtype: Any) -> None:
    rng = np.random.default_rng(1)
    weights = rng.uniform(0, 2, size=64).astype(dtype)
    with LossClient(shm_address, timeout=CALL_TIMEOUT_S, shared_memory=options) as client:
        for loss, x, t, params in _cases(rng, dtype):
            for reduction in ("mean", "sum", "none"):
                for w in (None, weights):
                    args = dict(reduction=reduction, sample_weight=w, **params)
                    _same(client.compute_gradient(loss, x, t, **args),
                          plain.compute_gradient(loss, x, t, **args))
                    _same(client.compute_loss(loss, x, t, **args),
                          plain.compute_loss(loss, x, t, **args))


@pytest.mark.e2e
def test_zero_copy_mode_is_bit_identical_to_bytes(shm_address: str, plain: LossClient,
                                                  options: SharedMemoryOptions,
                                                  shm_dir: Path) -> None:
    rng = np.random.default_rng(2)
    with LossClient(shm_address, timeout=CALL_TIMEOUT_S, shared_memory=options) as client:
        for loss, x, t, params in _cases(rng, np.float32):
            xs = client.shared_array(x.shape, x.dtype)
            ts = client.shared_array(t.shape, t.dtype)
            gs = client.shared_array(x.shape, x.dtype)
            xs[...], ts[...] = x, t
            expected = plain.compute_gradient(loss, x, t, **params)
            got = client.compute_gradient(loss, xs, ts, out=gs, **params)
            assert got.gradient is gs  # the server's kernel wrote it there
            _same(got, expected)
            got = client.compute_gradient(loss, xs[:32], ts[:32], reduction="none", **params)
            _same(got, plain.compute_gradient(loss, x[:32], t[:32], reduction="none", **params))
        # an out that is not shared gets a copy; the result is that array
        out = np.empty((64, 10), np.float32)
        got = client.compute_gradient("mse", xs, xs, out=out)
        assert got.gradient is out and not out.any()
        assert len(segments(shm_dir)) >= 3
    assert segments(shm_dir) == []


@pytest.mark.e2e
def test_out_without_shared_memory(plain: LossClient) -> None:
    x = np.arange(4, dtype=np.float64).reshape(2, 2)
    out = np.full((2, 2), np.nan)
    result = plain.compute_gradient("mse", x, np.zeros_like(x), out=out)
    assert result.gradient is out
    np.testing.assert_array_equal(out, x / 2)  # d/dx mean(x^2) = 2x / 4, exact here
    with pytest.raises(ValueError, match="out"):
        plain.compute_gradient("mse", x, x, out=np.empty((3, 2)))


@pytest.mark.e2e
def test_small_requests_go_as_bytes_unless_shared(shm_address: str, shm_dir: Path) -> None:
    options = SharedMemoryOptions(directory=str(shm_dir), min_bytes=1 << 20)
    with LossClient(shm_address, timeout=CALL_TIMEOUT_S, shared_memory=options) as client:
        client.compute_gradient("mse", [1.0, 2.0], [0.0, 0.0])
        assert segments(shm_dir) == []  # no segment was needed
        x = client.shared_array(2, np.float64)
        x[:] = [1.0, 2.0]
        assert client.compute_gradient("mse", x, [0.0, 0.0]).gradient.tolist() == [1.0, 2.0]


@pytest.mark.e2e
def test_concurrent_calls_on_their_own_regions(shm_address: str, plain: LossClient,
                                               options: SharedMemoryOptions) -> None:
    rng = np.random.default_rng(3)
    inputs = [(rng.normal(size=(200, 50)).astype(np.float32), rng.integers(0, 50, size=200))
              for _ in range(6)]
    expected = [plain.compute_gradient("sparse_categorical_cross_entropy", x, t,
                                       from_logits=True) for x, t in inputs]
    failures: list[str] = []
    with LossClient(shm_address, timeout=CALL_TIMEOUT_S, shared_memory=options) as client:
        def work(i: int) -> None:
            x, t = inputs[i]
            shared = client.shared_array(x.shape, x.dtype) if i % 2 else None
            if shared is not None:
                shared[...] = x
            for _ in range(15):
                got = client.compute_gradient("sparse_categorical_cross_entropy",
                                              x if shared is None else shared, t,
                                              from_logits=True)
                if (got.loss != expected[i].loss
                        or got.gradient.tobytes() != expected[i].gradient.tobytes()):
                    failures.append(f"thread {i}")

        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert failures == []


@pytest.mark.e2e
def test_async_client(shm_address: str, plain: LossClient,
                      options: SharedMemoryOptions, shm_dir: Path) -> None:
    rng = np.random.default_rng(4)
    x = rng.normal(size=(128, 8)).astype(np.float32)
    t = rng.integers(0, 8, size=128)

    async def calls() -> list[Any]:
        async with AsyncLossClient(shm_address, timeout=CALL_TIMEOUT_S,
                                   shared_memory=options) as client:
            xs = client.shared_array(x.shape, np.float32)
            xs[...] = x
            gs = client.shared_array(x.shape, np.float32)
            results = list(await asyncio.gather(*(
                client.compute_gradient("sparse_categorical_cross_entropy", x, t,
                                        from_logits=True) for _ in range(4))))
            zero_copy = await client.compute_gradient(
                "sparse_categorical_cross_entropy", xs, t, from_logits=True, out=gs)
            assert zero_copy.gradient is gs
            assert client._shm is not None and client._shm.link is not None  # the socket
            losses = await client.compute_loss("sparse_categorical_cross_entropy", xs, t,
                                               from_logits=True, reduction="none")
            return [*results, zero_copy, losses]

    *results, zero_copy, losses = asyncio.run(calls())
    expected = plain.compute_gradient("sparse_categorical_cross_entropy", x, t,
                                      from_logits=True)
    for result in (*results, zero_copy):
        _same(result, expected)
    _same(losses, plain.compute_loss("sparse_categorical_cross_entropy", x, t,
                                     from_logits=True, reduction="none"))
    assert segments(shm_dir) == []


# --- the RPCs: register, status, unregister, errors ----------------------------------------

def _code_reason(err: grpc.RpcError) -> tuple[grpc.StatusCode, str, str]:
    metadata = dict(err.trailing_metadata() or ())  # type: ignore[attr-defined]
    return (err.code(), metadata.get("lossgrad-error-reason", ""),  # type: ignore[attr-defined]
            metadata.get("lossgrad-error-field", ""))


def _location_tensor(region: str, offset: int, byte_size: int, shape: tuple[int, ...],
                     dtype: int = F32) -> pb.Tensor:
    return pb.Tensor(dtype=dtype, shape=shape, shared_memory=pb.SharedMemoryLocation(
        region=region, offset=offset, byte_size=byte_size))


@pytest.fixture()
def region(shm_stub: pb_grpc.LossServiceStub, shm_dir: Path) -> Iterator[Path]:
    """Region "r": 4 KiB of 1024 float32 values 0..1023, in object lossgrad-test."""
    path = make_object(shm_dir, "lossgrad-test", 4096, np.arange(1024, dtype=np.float32)
                       .tobytes())
    shm_stub.RegisterSharedMemoryRegion(pb.RegisterSharedMemoryRegionRequest(
        name="r", key="/lossgrad-test", offset=0, byte_size=4096), timeout=CALL_TIMEOUT_S)
    yield path
    shm_stub.UnregisterSharedMemoryRegion(pb.UnregisterSharedMemoryRegionRequest(name="r"),
                                          timeout=CALL_TIMEOUT_S)
    path.unlink()


@pytest.mark.e2e
def test_register_status_unregister(shm_stub: pb_grpc.LossServiceStub, region: Path) -> None:
    status = shm_stub.GetSharedMemoryStatus(pb.GetSharedMemoryStatusRequest(),
                                            timeout=CALL_TIMEOUT_S)
    assert [(r.name, r.key, r.offset, r.byte_size, r.writable) for r in status.regions] == \
        [("r", "/lossgrad-test", 0, 4096, True)]
    request = pb.ComputeGradientRequest(
        loss="mse", predictions=_location_tensor("r", 0, 64, (16,)),
        targets=_location_tensor("r", 64, 64, (16,)),
        gradient_output=pb.SharedMemoryLocation(region="r", offset=1024, byte_size=64))
    answer = shm_stub.ComputeGradient(request, timeout=CALL_TIMEOUT_S)
    assert answer.loss == 256.0  # ((i) - (i + 16))^2 = 256 for every i
    assert answer.gradient.shared_memory == pb.SharedMemoryLocation(region="r", offset=1024,
                                                                    byte_size=64)
    assert answer.gradient.data == b"" and list(answer.gradient.shape) == [16]
    written = np.frombuffer(region.read_bytes()[1024:1088], np.float32)
    np.testing.assert_array_equal(written, np.full(16, -2.0 * 16 / 16, np.float32))
    shm_stub.UnregisterSharedMemoryRegion(pb.UnregisterSharedMemoryRegionRequest(name="r"),
                                          timeout=CALL_TIMEOUT_S)
    with pytest.raises(grpc.RpcError) as info:
        shm_stub.ComputeGradient(request, timeout=CALL_TIMEOUT_S)
    assert _code_reason(info.value) == (grpc.StatusCode.NOT_FOUND,
                                        errors.SHARED_MEMORY_REGION_NOT_FOUND,
                                        "predictions.shared_memory.region")
    shm_stub.RegisterSharedMemoryRegion(pb.RegisterSharedMemoryRegionRequest(
        name="r", key="lossgrad-test", offset=0, byte_size=4096), timeout=CALL_TIMEOUT_S)
    assert shm_stub.ComputeGradient(request, timeout=CALL_TIMEOUT_S).loss == 256.0


def _gradient_request(**fields: Any) -> pb.ComputeGradientRequest:
    values = {"predictions": _location_tensor("r", 0, 64, (16,)),
              "targets": _location_tensor("r", 64, 64, (16,)), **fields}
    return pb.ComputeGradientRequest(loss="mse", **values)


INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.e2e
@pytest.mark.parametrize(("fields", "expected"), [
    ({"predictions": _location_tensor("r", 4096 + 4, 0, (0,))},
     (INVALID, errors.SHARED_MEMORY_OUT_OF_RANGE, "predictions.shared_memory.offset")),
    ({"predictions": _location_tensor("r", -4, 64, (16,))},
     (INVALID, errors.SHARED_MEMORY_OUT_OF_RANGE, "predictions.shared_memory.offset")),
    ({"predictions": _location_tensor("r", 4096 - 32, 64, (16,))},
     (INVALID, errors.SHARED_MEMORY_OUT_OF_RANGE, "predictions.shared_memory.byte_size")),
    ({"targets": _location_tensor("r", 0, 2**62, (2**60,))},
     (INVALID, errors.SHARED_MEMORY_OUT_OF_RANGE, "targets.shared_memory.byte_size")),
    ({"predictions": _location_tensor("r", 0, 60, (16,))},
     (INVALID, errors.BYTE_SIZE_MISMATCH, "predictions.shared_memory.byte_size")),
    ({"predictions": _location_tensor("r", 2, 64, (16,))},
     (INVALID, errors.SHARED_MEMORY_MISALIGNED, "predictions.shared_memory.offset")),
    ({"predictions": pb.Tensor(dtype=F32, shape=[1], data=b"\0" * 4,
                               shared_memory=pb.SharedMemoryLocation(region="r", byte_size=4))},
     (INVALID, errors.DATA_AND_SHARED_MEMORY, "predictions.data")),
    ({"sample_weight": _location_tensor("nope", 0, 64, (16,))},
     (grpc.StatusCode.NOT_FOUND, errors.SHARED_MEMORY_REGION_NOT_FOUND,
      "sample_weight.shared_memory.region")),
    ({"gradient_output": pb.SharedMemoryLocation(region="r", offset=32, byte_size=64)},
     (INVALID, errors.SHARED_MEMORY_OVERLAP, "gradient_output")),
    ({"gradient_output": pb.SharedMemoryLocation(region="r", offset=1024, byte_size=32)},
     (INVALID, errors.SHARED_MEMORY_OUT_OF_RANGE, "gradient_output.byte_size")),
    ({"gradient_output": pb.SharedMemoryLocation(region="r", offset=1026, byte_size=64)},
     (INVALID, errors.SHARED_MEMORY_MISALIGNED, "gradient_output.offset")),
    ({"gradient_output": pb.SharedMemoryLocation(region="r", offset=1024, byte_size=64),
      "losses_output": pb.SharedMemoryLocation(region="r", offset=1056, byte_size=64),
      "reduction": pb.REDUCTION_NONE},
     (INVALID, errors.SHARED_MEMORY_OVERLAP, "losses_output")),
    ({"losses_output": pb.SharedMemoryLocation(region="r", offset=1024, byte_size=64)},
     (INVALID, "INVALID_ARGUMENT", "losses_output")),
    ({"gradient_output": pb.SharedMemoryLocation(region="", offset=1024, byte_size=64)},
     (grpc.StatusCode.NOT_FOUND, errors.SHARED_MEMORY_REGION_NOT_FOUND,
      "gradient_output.region")),
])
def test_bad_locations(shm_stub: pb_grpc.LossServiceStub, region: Path,
                       fields: dict[str, Any], expected: tuple[Any, str, str]) -> None:
    with pytest.raises(grpc.RpcError) as info:
        shm_stub.ComputeGradient(_gradient_request(**fields), timeout=CALL_TIMEOUT_S)
    assert _code_reason(info.value) == expected
    assert shm_stub.ComputeGradient(_gradient_request(), timeout=CALL_TIMEOUT_S).loss == 256.0


@pytest.mark.e2e
def test_a_shrunk_object_fails_the_precondition(shm_stub: pb_grpc.LossServiceStub,
                                                region: Path) -> None:
    os.truncate(region, 2048)
    with pytest.raises(grpc.RpcError) as info:
        shm_stub.ComputeGradient(_gradient_request(), timeout=CALL_TIMEOUT_S)
    assert _code_reason(info.value) == (grpc.StatusCode.FAILED_PRECONDITION,
                                        errors.SHARED_MEMORY_CHANGED,
                                        "predictions.shared_memory.region")


@pytest.mark.e2e
def test_register_errors_over_grpc(shm_stub: pb_grpc.LossServiceStub) -> None:
    for request, expected in [
        (pb.RegisterSharedMemoryRegionRequest(name="x", key="/../etc/passwd", byte_size=8),
         (INVALID, errors.SHARED_MEMORY_INVALID_KEY, "key")),
        (pb.RegisterSharedMemoryRegionRequest(name="x", key="/lossgrad-none", byte_size=8),
         (grpc.StatusCode.NOT_FOUND, errors.SHARED_MEMORY_KEY_NOT_FOUND, "key")),
    ]:
        with pytest.raises(grpc.RpcError) as info:
            shm_stub.RegisterSharedMemoryRegion(request, timeout=CALL_TIMEOUT_S)
        assert _code_reason(info.value) == expected
    with pytest.raises(grpc.RpcError) as info:
        shm_stub.GetSharedMemoryStatus(pb.GetSharedMemoryStatusRequest(name="x"),
                                       timeout=CALL_TIMEOUT_S)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]


@pytest.mark.e2e
def test_client_registers_again_after_the_server_forgot(
        shm_address: str, shm_stub: pb_grpc.LossServiceStub,
        options: SharedMemoryOptions) -> None:
    with LossClient(shm_address, timeout=CALL_TIMEOUT_S, shared_memory=options) as client:
        x = client.shared_array(4, np.float32)
        x[:] = [1, 2, 3, 4]
        assert client.compute_gradient("mse", x, np.zeros(4, np.float32)).loss == 7.5
        shm_stub.UnregisterSharedMemoryRegion(pb.UnregisterSharedMemoryRegionRequest(),
                                              timeout=CALL_TIMEOUT_S)  # as after a restart
        assert client.compute_gradient("mse", x, np.zeros(4, np.float32)).loss == 7.5


@pytest.mark.e2e
def test_server_info(shm_stub: pb_grpc.LossServiceStub, stub: pb_grpc.LossServiceStub) -> None:
    info = shm_stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=CALL_TIMEOUT_S)
    assert info.features.shared_memory is True
    assert (info.limits.max_shared_memory_regions, info.limits.max_shared_memory_bytes) == \
        (32, 1 << 30)
    off = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=CALL_TIMEOUT_S)
    assert off.features.shared_memory is False and off.limits.max_shared_memory_regions == 0


@pytest.mark.e2e
def test_a_server_without_shared_memory_refuses_it(stub: pb_grpc.LossServiceStub,
                                                   server_address: str,
                                                   options: SharedMemoryOptions) -> None:
    for call in (lambda: stub.RegisterSharedMemoryRegion(pb.RegisterSharedMemoryRegionRequest(
                     name="r", key="lossgrad-x", byte_size=8), timeout=CALL_TIMEOUT_S),
                 lambda: stub.ComputeLoss(pb.ComputeLossRequest(
                     loss="mse", predictions=_location_tensor("r", 0, 4, (1,)),
                     targets=_location_tensor("r", 0, 4, (1,))), timeout=CALL_TIMEOUT_S)):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert _code_reason(info.value)[:2] == (grpc.StatusCode.FAILED_PRECONDITION,
                                                errors.SHARED_MEMORY_DISABLED)
    with LossClient(server_address, timeout=CALL_TIMEOUT_S, shared_memory=options) as client:
        with pytest.raises(FailedPreconditionError) as error:
            client.compute_gradient("mse", np.zeros(4), np.zeros(4))
        assert error.value.reason == errors.SHARED_MEMORY_DISABLED


@pytest.mark.e2e
def test_shutdown_unmaps_every_region(tmp_path: Path) -> None:
    path = make_object(tmp_path, "lossgrad-shutdown", 8192)
    server, port = create_server("127.0.0.1", 0, warm=False,
                                 shared_memory=SharedMemoryConfig(str(tmp_path)))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            pb_grpc.LossServiceStub(channel).RegisterSharedMemoryRegion(
                pb.RegisterSharedMemoryRegionRequest(name="a", key="lossgrad-shutdown",
                                                     offset=4096, byte_size=4096),
                timeout=CALL_TIMEOUT_S)
        assert str(path) in Path("/proc/self/maps").read_text()
    finally:
        server.stop(0).wait()
    assert server.shared_memory is not None and server.shared_memory.status("") == []
    assert str(path) not in Path("/proc/self/maps").read_text()
    with pytest.raises(errors.FailedPreconditionError):
        server.shared_memory.register("b", "lossgrad-shutdown", 0, 8)


def test_first_use_names_the_field() -> None:
    from lossgrad_client._wire import ComputeRequest

    location = SharedMemoryLocation("r", 0, 4)
    tensor = Tensor(F32, (1,), b"\0" * 4)
    assert shm.first_use(ComputeRequest(predictions=tensor, targets=tensor), True) is None
    assert shm.first_use(ComputeRequest(targets=Tensor(F32, (1,), b"", location)), True) == \
        "targets.shared_memory"
    assert shm.first_use(ComputeRequest(gradient_output=location), False) is None
    assert shm.first_use(ComputeRequest(gradient_output=location), True) == "gradient_output"


@pytest.mark.e2e
def test_half_precision_and_hessians_through_shared_memory(
        shm_address: str, plain: LossClient, options: SharedMemoryOptions) -> None:
    """float16 predictions (computed in float32, rounded once, then written to the region)
    and a Hessian (sent back as bytes) give the bytes path's bits."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(64, 10)).astype(np.float16)
    t = rng.normal(size=(64, 10)).astype(np.float16)
    with LossClient(shm_address, timeout=CALL_TIMEOUT_S, shared_memory=options) as client:
        xs, out = client.shared_array(x.shape, np.float16), client.shared_array(x.shape,
                                                                                np.float16)
        xs[...] = x
        for reduction in ("mean", "none"):
            expected = plain.compute_gradient("huber", x, t, reduction=reduction)
            _same(client.compute_gradient("huber", x, t, reduction=reduction), expected)
            got = client.compute_gradient("huber", xs, t, reduction=reduction, out=out)
            assert got.gradient is out
            _same(got, expected)
        x64 = x.astype(np.float64)
        expected = plain.compute_gradient("mse", x64, t.astype(np.float64), hessian="exact")
        got = client.compute_gradient("mse", x64, t.astype(np.float64), hessian="exact")
        _same(got, expected)
        assert got.hessian is not None and expected.hessian is not None
        assert got.hessian.tobytes() == expected.hessian.tobytes()
