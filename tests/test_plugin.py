"""Plugin losses: the example package in examples/plugin, installed with pip into a
folder on PYTHONPATH, served by a real ``lossgrad serve`` subprocess and called through
the real client; and the loader's checks of broken plugins.

The Fair loss reference below is written from its formula, apart from the plugin:
l = c^2 (u - log(1 + u)), u = |p - y| / c (LightGBM's ``fair`` objective).
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import reference as ref
from lossgrad import catalog, compute
from lossgrad._proto.inference import grpc_predict_v2_pb2 as kpb
from lossgrad._proto.inference import grpc_predict_v2_pb2_grpc as kpb_grpc
from lossgrad.engine import run_elementwise_kernel
from lossgrad.plugin import Loss, Param, PluginReport, load
from lossgrad.plugin import _prepare_all as prepare_all
from lossgrad.request import prepare
from lossgrad_client import InvalidArgumentError, LossClient
from lossgrad_client._proto.lossgrad.v1 import lossgrad_pb2 as pb
from lossgrad_client._proto.lossgrad.v1 import lossgrad_pb2_grpc as pb_grpc
from test_cli import READY_LINE, READY_TIMEOUT_S, STOP_TIMEOUT_S, _readline
from test_node_client import _encode, node_with_dependencies, run_both

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "plugin"

# A second distribution, next to the example, whose loss takes a built-in name.
BROKEN_MODULE = """\
from lossgrad.plugin import Loss


def twice(x, y):
    return 2.0 * (x - y), 2.0


CLASH = Loss("mse", twice, "takes the name of a built-in loss")
"""


def fair_reference(p: np.ndarray, y: np.ndarray, c: float) -> np.ndarray:
    r = np.asarray(p, np.float64) - np.asarray(y, np.float64)
    u = np.abs(r) / c
    return c * c * (u - np.log1p(u))


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the example plugin, installed by pip (offline, no dependencies),
    and a broken plugin distribution."""
    root = tmp_path_factory.mktemp("plugins")
    source = root / "src"
    shutil.copytree(EXAMPLE, source)  # the build writes into its source folder
    target = root / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
         "--no-build-isolation", "--no-index", "--target", str(target), str(source)],
        check=True, capture_output=True, text=True, timeout=300)
    (target / "lossgrad_broken.py").write_text(BROKEN_MODULE)
    info = target / "lossgrad_broken-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lossgrad-broken\n"
                                   "Version: 0.1.0\n")
    (info / "entry_points.txt").write_text("[lossgrad.losses]\nclash = lossgrad_broken:CLASH\n")
    return target


def _env(site: Path, **extra: str) -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    return {"PYTHONPATH": path, **extra}


@pytest.fixture(scope="module")
def served(site: Path, server_address: str) -> Iterator[str]:
    """The address of ``lossgrad serve --plugin-errors skip`` with both plugins installed;
    stopped with SIGTERM at the end, which must exit 0. The session's server has compiled
    the built-in kernels into numba's cache first, so this start only loads them."""
    log = site.parent / "serve.log"
    with open(log, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lossgrad", "serve", "--port", "0", "--plugin-errors",
             "skip"], stdout=subprocess.PIPE, stderr=stderr, text=True,
            env={**os.environ, **_env(site)})
    try:
        assert proc.stdout is not None
        line = _readline(proc.stdout, READY_TIMEOUT_S).rstrip("\n")
        match = READY_LINE.match(line)
        assert match, f"unexpected first line {line!r}; stderr:\n{log.read_text()}"
        yield f"{match.group(1)}:{match.group(2)}"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(STOP_TIMEOUT_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(STOP_TIMEOUT_S)
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.fixture(scope="module")
def client(served: str) -> Iterator[LossClient]:
    with LossClient(served, timeout=60) as c:
        yield c


# --- through a real server ----------------------------------------------------------------

@pytest.mark.e2e
def test_listed_with_its_origin(client: LossClient) -> None:
    losses = {info.name: info for info in client.list_losses()}
    fair = losses["fair"]
    assert fair.origin == "plugin"
    assert fair.aliases == ("fair_loss",)
    assert fair.plugin is not None
    assert fair.plugin.entry_point == "fair = lossgrad_fair:LOSSES"
    assert (fair.plugin.distribution, fair.plugin.version) == ("lossgrad-fair", "0.1.0")
    c = fair.param("c")
    assert c is not None and c.type == "double" and c.default == 1.0
    assert (c.minimum, c.minimum_inclusive, c.maximum) == (0.0, False, None)
    assert fair.predictions.kind == "values" and not fair.class_axis_last
    assert losses["mse"].origin == "builtin" and losses["mse"].plugin is None
    assert len(losses) == len(catalog.LOSSES) + 1  # the broken plugin is left out


@pytest.mark.e2e
def test_broken_plugin_is_skipped_and_reported(served: str) -> None:
    with grpc.insecure_channel(served) as channel:
        info = pb_grpc.LossServiceStub(channel).GetServerInfo(pb.GetServerInfoRequest(),
                                                              timeout=60)
    status = info.features.plugins
    assert [s.entry_point for s in status.loaded] == ["fair = lossgrad_fair:LOSSES"]
    assert [f.source.entry_point for f in status.failed] == ["clash = lossgrad_broken:CLASH"]
    assert status.failed[0].source.distribution == "lossgrad-broken"
    assert "mse" in status.failed[0].error and "already taken" in status.failed[0].error


@pytest.mark.e2e
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_values_and_gradient_match_the_reference(client: LossClient, dtype: type,
                                                 reduction: str) -> None:
    rng = np.random.default_rng(3)
    p = (rng.standard_normal((6, 5)) * 3).astype(dtype)
    y = rng.standard_normal((6, 5)).astype(dtype)
    w = rng.uniform(0.0, 2.0, 6)
    c = 1.5
    result = client.compute_gradient("fair", p, y, reduction=reduction, sample_weight=w, c=c)
    weights = ref.position_weights(w, p.shape)
    per = fair_reference(p, y, c) * weights
    expected = ref.reduce(per, weights, reduction)
    rtol = 1e-12 if dtype == np.float64 else 2e-6
    np.testing.assert_allclose(result.loss, expected, rtol=rtol, atol=rtol)
    # d/dp of the weighted per-position loss: w r / (1 + |r| / c), scaled for MEAN.
    r = p.astype(np.float64) - y
    grad = weights * r / (1 + np.abs(r) / c)
    if reduction == "mean":
        grad /= weights.sum()
    assert result.gradient.dtype == dtype and result.gradient.shape == p.shape
    np.testing.assert_allclose(result.gradient, grad, rtol=rtol * 10, atol=rtol)
    assert result.weight_sum == pytest.approx(weights.sum())


@pytest.mark.e2e
def test_gradient_matches_central_differences(client: LossClient) -> None:
    """The server's own per-position values at p +- h: each depends on its element only."""
    rng = np.random.default_rng(4)
    p = rng.standard_normal(50) * 4
    y = rng.standard_normal(50)
    h = 1e-6
    up = client.compute_loss("fair_loss", p + h, y, reduction="none", c=0.7).loss
    down = client.compute_loss("fair_loss", p - h, y, reduction="none", c=0.7).loss
    numeric = (np.asarray(up) - np.asarray(down)) / (2 * h)
    grad = client.compute_gradient("fair_loss", p, y, reduction="sum", c=0.7).gradient
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.e2e
def test_default_parameter_and_parallel_path(client: LossClient) -> None:
    """c defaults to 1; above the parallel threshold the same bits come back every call
    and the per-position values still match the reference."""
    rng = np.random.default_rng(5)
    p = rng.standard_normal(70_000)
    y = np.zeros(70_000)
    first = client.compute_gradient("fair", p, y, reduction="sum")
    again = client.compute_gradient("fair", p, y, reduction="sum", c=1.0)
    assert first.loss == again.loss
    assert np.array_equal(first.gradient, again.gradient)
    assert first.loss == pytest.approx(math.fsum(fair_reference(p, y, 1.0)), rel=1e-12)


@pytest.mark.e2e
def test_streamed_in_chunks_gives_the_same_bits(served: str) -> None:
    """ComputeStream runs the plugin's driver chunk by chunk; the sum continues across
    chunks, so the result is that of one message."""
    rng = np.random.default_rng(6)
    p = rng.standard_normal((300, 100))
    y = rng.standard_normal((300, 100))
    w = rng.uniform(0.0, 1.0, 300)
    with LossClient(served, timeout=60, stream_chunk_bytes=64 * 1024) as small_chunks:
        whole = small_chunks.compute_gradient("fair", p, y, sample_weight=w, c=0.5,
                                              stream=False)
        streamed = small_chunks.compute_gradient("fair", p, y, sample_weight=w, c=0.5,
                                                 stream=True)
    assert streamed.loss == whole.loss
    assert np.array_equal(streamed.gradient, whole.gradient)


@pytest.mark.e2e
def test_a_kserve_model_too(served: str, client: LossClient) -> None:
    """The Open Inference Protocol API serves every loss of the catalog as a model."""
    rng = np.random.default_rng(8)
    p = rng.standard_normal((4, 3))
    y = rng.standard_normal((4, 3))
    request = kpb.ModelInferRequest(model_name="fair_loss")
    for name, array in (("PREDICTIONS", p), ("TARGETS", y)):
        request.inputs.add(name=name, datatype="FP64", shape=array.shape)
        request.raw_input_contents.append(array.tobytes())
    request.parameters["c"].double_param = 0.5
    with grpc.insecure_channel(served) as channel:
        stub = kpb_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ModelReady(kpb.ModelReadyRequest(name="fair"), timeout=60).ready
        response = stub.ModelInfer(request, timeout=60)
    outputs = {out.name: np.frombuffer(raw, np.float64) for out, raw in
               zip(response.outputs, response.raw_output_contents, strict=True)}
    native = client.compute_gradient("fair", p, y, c=0.5)
    assert outputs["LOSS"][0] == native.loss
    assert np.array_equal(outputs["GRADIENT"], native.gradient.reshape(-1))


@pytest.mark.e2e
@pytest.mark.parametrize(("params", "field", "reason"), [
    ({"c": 0.0}, "params.c", "PARAMETER_OUT_OF_RANGE"),
    ({"c": -2}, "params.c", "PARAMETER_OUT_OF_RANGE"),
    ({"c": math.inf}, "params.c", "PARAMETER_OUT_OF_RANGE"),
    ({"c": True}, "params.c", "PARAMETER_OUT_OF_RANGE"),
    ({"c": [1.0, 2.0]}, "params.c", "PARAMETER_OUT_OF_RANGE"),
    ({"delta": 1.0}, "params.delta", "UNKNOWN_PARAMETER"),
    ({"cc": 1.0}, "params.cc", "UNKNOWN_PARAMETER"),
])
def test_bad_parameters_are_invalid_argument(client: LossClient, params: dict[str, object],
                                             field: str, reason: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        client.compute_loss("fair", [1.0, 2.0], [0.0, 0.0], **params)
    assert info.value.field == field and info.value.reason == reason


@pytest.mark.e2e
def test_plugin_inputs_get_the_built_in_checks(client: LossClient) -> None:
    for kwargs, field, reason in [
        ({"predictions": [1.0, math.nan], "targets": [0.0, 0.0]}, "predictions.data[1]",
         "NONFINITE_INPUT"),
        ({"predictions": [1.0, 2.0], "targets": [0.0]}, "targets.shape", "SHAPE_MISMATCH"),
        ({"predictions": [1.0], "targets": [0.0], "sample_weight": [-1.0]},
         "sample_weight.data[0]", "VALUE_OUT_OF_RANGE"),
    ]:
        with pytest.raises(InvalidArgumentError) as info:
            client.compute_loss("fair", **kwargs)
        assert (info.value.field, info.value.reason) == (field, reason)
    assert client.compute_loss("fair", [1.0], [0], c=2).loss == pytest.approx(
        float(fair_reference(np.array([1.0]), np.array([0.0]), 2.0)[0]))


def test_typed_and_by_name_duplicate_is_rejected(served: str) -> None:
    """The raw message the client never builds: a parameter both typed and by name."""
    params = pb.LossParams(delta=1.0)
    params.by_name["delta"].double_value = 2.0
    tensor = pb.Tensor(dtype=pb.DATA_TYPE_FLOAT64, shape=[1], data=np.zeros(1).tobytes())
    request = pb.ComputeLossRequest(loss="huber", predictions=tensor, targets=tensor,
                                    params=params)
    with grpc.insecure_channel(served) as channel:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.LossServiceStub(channel).ComputeLoss(request, timeout=60)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "params.by_name['delta']" in str(info.value.details())


# --- failing fast ---------------------------------------------------------------------------

@pytest.mark.e2e
def test_a_clash_stops_the_server_with_a_clear_message(site: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "lossgrad", "serve", "--port", "0"],
        env={**os.environ, **_env(site)}, capture_output=True, text=True,
        timeout=READY_TIMEOUT_S)
    assert done.returncode == 1
    assert "serving on" not in done.stdout
    assert "'clash = lossgrad_broken:CLASH' (lossgrad-broken 0.1.0)" in done.stderr
    assert "'mse' already taken" in done.stderr or "mse already taken" in done.stderr
    assert "LOSSGRAD_PLUGIN_ERRORS=skip" in done.stderr


def test_losses_command_lists_the_plugin(site: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "lossgrad", "losses"],
        env={**os.environ, **_env(site, LOSSGRAD_PLUGIN_ERRORS="skip")}, capture_output=True,
        text=True, timeout=READY_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    assert "fair: plugin fair = lossgrad_fair:LOSSES (lossgrad-fair 0.1.0)" in done.stdout
    assert "c=1.0 in (0, inf)" in done.stdout
    assert "clash = lossgrad_broken:CLASH" in done.stderr  # logged, then skipped


# --- the loader's checks, in process (nothing is registered) ---------------------------------

def _module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, body: str) -> None:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path))


def _failure(name: str, value: str) -> str:
    prepared, failed = prepare_all([metadata.EntryPoint(name, value, "lossgrad.losses")])
    assert not prepared and len(failed) == 1
    return failed[0].error


HEADER = "from lossgrad.plugin import Input, Loss, Param\n"


@pytest.mark.parametrize(("body", "message"), [
    ("X = 3\n", "must be a lossgrad.plugin.Loss or a non-empty list"),
    ("def f(x, y):\n    return x, y\nX = Loss('Bad-Name', f, 'd')\n", "must match"),
    ("def f(x, y):\n    return x, y\nX = Loss('ok', f, '')\n", "needs a description"),
    ("def f(x, y):\n    return x, y\nX = Loss('ok', f, 'd', params=(Param('c', 1.0, 'd'),))\n",
     "takes 2 arguments; it must take (x, y, c)"),
    ("def f(x, y, c):\n    return x, y\n"
     "X = Loss('ok', f, 'd', params=(Param('c', 0.0, 'd', minimum=0.0, "
     "minimum_inclusive=False),))\n", "bad default"),
    ("def f(x, y, c):\n    return x, y\n"
     "X = Loss('ok', f, 'd', params=(Param('delta', True, 'd', type='bool'),))\n",
     "LossParams.delta is a double field"),
    ("def f(x, y):\n    return x, y\nX = Loss('ok', f, 'd', predictions=Input('probabilities'))\n",
     "kind 'probabilities' is not one of"),
    ("def f(x, y):\n    return x, y\nX = Loss('ok', lambda x, y: (x, y), 'd')\n",
     "top level of its module"),
    ("def f(x, y):\n    return x, y\nX = [Loss('ok', f, 'd', aliases=('ok',))]\n",
     "already taken"),
    ("def f(x, y):\n    return undefined_name(x), y\nX = Loss('ok', f, 'd')\n",
     "TypingError"),
    ("def f(x, y):\n    return x, y\ndef h(x):\n    return x\nX = Loss('ok', f, 'd', hessian=h)\n",
     "h takes 1 arguments; it must take (x, y)"),
    ("def f(x, y):\n    return x, y\nX = Loss('ok', f, 'd', hessian=2.0)\n",
     "hessian must be a function, got float"),
])
def test_broken_plugins_are_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     body: str, message: str) -> None:
    name = f"lossgrad_case_{abs(hash(body)) % 10**8}"
    _module(tmp_path, monkeypatch, name, HEADER + body)
    assert message in _failure("case", f"{name}:X")


def test_missing_module_is_reported() -> None:
    assert "ModuleNotFoundError" in _failure("gone", "lossgrad_no_such_module:X")


def test_a_loss_object_is_accepted_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _module(tmp_path, monkeypatch, "lossgrad_case_single", HEADER + """
def half(x, y):
    r = x - y
    return 0.5 * r * r, r
HALF = Loss("half_squared_case", half, "0.5 r^2")
""")
    prepared, failed = prepare_all(
        [metadata.EntryPoint("half", "lossgrad_case_single:HALF", "lossgrad.losses")])
    assert not failed
    assert [spec.name for spec in prepared[0].specs] == ["half_squared_case"]
    assert prepared[0].specs[0].plugin is not None


@pytest.mark.parametrize("n", [1000, 70_000])  # serial, then parallel (>= PARALLEL_MIN)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_plugin_driver_gives_the_built_in_bits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               n: int, dtype: type) -> None:
    """The same math as mse, as a plugin: the driver around it is the built-in one, so
    the loss, the gradient and the per-position values are the same bits."""
    _module(tmp_path, monkeypatch, "lossgrad_case_square", HEADER + """
from lossgrad.plugin import fconst
def square(x, y):
    r = x - y
    return r * r, fconst(x, 2.0) * r
SQUARE = Loss("square_case", square, "r^2")
""")
    prepared, failed = prepare_all(
        [metadata.EntryPoint("square", "lossgrad_case_square:SQUARE", "lossgrad.losses")])
    assert not failed
    driver, names = prepared[0].drivers[0]
    rng = np.random.default_rng(7)
    x = rng.standard_normal(n).astype(dtype)
    y = rng.standard_normal(n).astype(dtype)
    w = rng.uniform(0.0, 2.0, n)
    for reduction in ("none", "mean"):
        batch = prepare("mse", x, y, reduction, w, False, {})
        mine = run_elementwise_kernel(batch, True, driver, ())
        built_in = compute("mse", x, y, reduction=reduction, sample_weight=w)
        assert np.array_equal(np.asarray(mine.loss), np.asarray(built_in.loss))
        assert np.array_equal(mine.gradient, built_in.gradient)


def test_load_is_done_once_per_process() -> None:
    """The conftest server loaded the (absent) plugins; later settings change nothing."""
    first = load()
    assert isinstance(first, PluginReport)
    assert load(enabled=False, errors="skip") is first


def test_plugin_names_must_be_new() -> None:
    assert "mse" in catalog.taken_names()
    with pytest.raises(ValueError, match="already taken by the built-in loss 'mse'"):
        catalog.register(catalog.LossSpec(
            "mse", catalog.Layout.ELEMENTWISE, "d", "r", catalog.LOSSES[0].predictions,
            catalog.LOSSES[0].targets))


def test_param_checks_use_the_request_rules() -> None:
    """Param and Loss are plain data: nothing is checked until load."""
    p = Param("c", 1.0, "d")
    assert (p.type, p.minimum) == ("double", None)
    assert Loss("x", print, "d").predictions.kind == "values"



# --- Hessians: the example's second derivative, run by the built-in Hessian driver ---------

def fair_hessian_reference(p: np.ndarray, y: np.ndarray, c: float) -> np.ndarray:
    """d/dp of r / (1 + |r| / c): 1 / (1 + |r| / c)^2 (LightGBM's c^2 / (|r| + c)^2)."""
    u = np.abs(np.asarray(p, np.float64) - np.asarray(y, np.float64)) / c
    return 1.0 / (1.0 + u) ** 2


@pytest.mark.e2e
def test_hessian_modes_are_listed(client: LossClient) -> None:
    fair = next(info for info in client.list_losses() if info.name == "fair")
    assert fair.hessian_modes == ("exact", "clipped", "constant")
    assert fair.hessian.startswith("1 / (1 + |r|/c)^2")


@pytest.mark.e2e
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_hessian_matches_the_reference(client: LossClient, dtype: type, reduction: str) -> None:
    """Weighted and scaled like the gradient; the loss and gradient are those of the
    gradient-only call."""
    rng = np.random.default_rng(9)
    p = (rng.standard_normal((40, 3)) * 3).astype(dtype)
    y = rng.standard_normal((40, 3)).astype(dtype)
    w = rng.uniform(0.0, 2.0, 40)
    plain = client.compute_gradient("fair", p, y, reduction=reduction, sample_weight=w, c=0.8)
    with_h = client.compute_gradient("fair", p, y, reduction=reduction, sample_weight=w,
                                     c=0.8, hessian="exact")
    weights = ref.position_weights(w, p.shape)
    want = weights * fair_hessian_reference(p, y, 0.8)
    if reduction == "mean":
        want /= weights.sum()
    rtol = 1e-13 if dtype == np.float64 else 1e-6
    assert with_h.hessian is not None and with_h.hessian.dtype == dtype
    np.testing.assert_allclose(with_h.hessian, want, rtol=rtol, atol=0)
    assert with_h.loss == pytest.approx(plain.loss, rel=rtol)
    np.testing.assert_allclose(with_h.gradient, plain.gradient, rtol=rtol, atol=0)


@pytest.mark.e2e
def test_hessian_matches_differences_of_the_gradient(client: LossClient) -> None:
    rng = np.random.default_rng(10)
    p = rng.standard_normal(200) * 4
    y = rng.standard_normal(200)
    h = 1e-6
    up = client.compute_gradient("fair", p + h, y, reduction="sum", c=1.3).gradient
    down = client.compute_gradient("fair", p - h, y, reduction="sum", c=1.3).gradient
    hess = client.compute_gradient("fair", p, y, reduction="sum", c=1.3,
                                   hessian="exact").hessian
    np.testing.assert_allclose(hess, (up - down) / (2 * h), rtol=1e-6, atol=1e-9)


@pytest.mark.e2e
def test_hessian_clipped_and_constant(client: LossClient) -> None:
    p = np.array([0.0, 0.5, 3.0, -10.0])
    y = np.zeros(4)
    exact = fair_hessian_reference(p, y, 1.0)  # 1, 0.444, 0.0625, 0.00826
    clipped = client.compute_gradient("fair", p, y, reduction="sum", hessian="clipped",
                                      hessian_floor=0.1).hessian
    np.testing.assert_allclose(clipped, np.maximum(exact, 0.1), rtol=1e-15)
    constant = client.compute_gradient("fair", p, y, reduction="sum", hessian="constant",
                                       hessian_constant=2.5).hessian
    assert constant.tolist() == [2.5] * 4


@pytest.mark.e2e
def test_lightgbm_remote_fair_matches_its_builtin_fair(client: LossClient) -> None:
    """lossgrad_client.boosting on the plugin loss: ten rounds with the remote objective
    give the margins of LightGBM's own ``fair`` objective (``fair_c`` = c)."""
    lgb = pytest.importorskip("lightgbm")
    from lossgrad_client.boosting import objective

    rng = np.random.default_rng(12)
    x = rng.normal(size=(300, 4))
    label = x @ np.array([1.0, -2.0, 0.5, 0.0]) + rng.standard_t(2, 300)  # heavy tails
    weight = rng.uniform(0.5, 2.0, 300)
    params = {"num_leaves": 7, "learning_rate": 0.3, "num_threads": 1, "verbose": -1,
              "seed": 0, "deterministic": True, "boost_from_average": False}

    def dataset() -> Any:
        return lgb.Dataset(x, label, weight=weight, free_raw_data=False)

    remote = objective(client, "fair", hessian="exact", c=2.0)
    mine = lgb.train({**params, "objective": remote}, dataset(), 10)
    theirs = lgb.train({**params, "objective": "fair", "fair_c": 2.0}, dataset(), 10)
    ours, expected = (b.predict(x, raw_score=True) for b in (mine, theirs))
    assert remote.calls == 10
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6)
    assert np.abs(expected).max() > 1.0


@pytest.mark.e2e
def test_xgboost_learns_with_the_remote_fair_objective(client: LossClient) -> None:
    """XGBoost has no fair objective: its trees fit with the remote one lower the Fair
    loss on the training set, and each round's (g, h) are the formulas'."""
    xgb = pytest.importorskip("xgboost")
    from lossgrad_client.boosting import objective

    rng = np.random.default_rng(13)
    x = rng.normal(size=(300, 4))
    label = x @ np.array([1.0, -2.0, 0.5, 0.0]) + rng.standard_t(2, 300)
    remote = objective(client, "fair", c=2.0)
    data = xgb.DMatrix(x, label, base_margin=np.zeros(300))
    grad, hess = objective(client, "fair", c=2.0).gradient_hessian(label, np.zeros(300))
    r = -label
    np.testing.assert_allclose(grad, r / (1 + np.abs(r) / 2.0), rtol=1e-12)
    np.testing.assert_allclose(hess, fair_hessian_reference(np.zeros(300), label, 2.0),
                               rtol=1e-12)
    booster = xgb.train({"max_depth": 3, "eta": 0.3, "tree_method": "hist", "nthread": 1,
                         "seed": 0, "disable_default_eval_metric": 1}, data, 20, obj=remote)
    fitted = booster.predict(data, output_margin=True)
    before = fair_reference(np.zeros(300), label, 2.0).mean()
    after = fair_reference(fitted, label, 2.0).mean()
    assert remote.calls == 20 and after < 0.5 * before


@pytest.mark.e2e
def test_node_client_sends_plugin_parameters(served: str) -> None:
    """client/node puts a plugin's parameters in LossParams.by_name: the Python client's
    numbers for a double, an integer given for it, and the same error for an unknown one."""
    node = node_with_dependencies()
    rng = np.random.default_rng(14)
    p, y = rng.standard_normal((5, 4)) * 3, rng.standard_normal((5, 4))
    tensors = {"predictions": _encode(p), "targets": _encode(y)}
    from_node = run_both(node, served, [
        {"method": "computeGradient", "loss": "fair", **tensors, "params": {"c": 2.5}},
        {"method": "computeLoss", "loss": "fair_loss", **tensors, "reduction": "none",
         "params": {"c": 2}},
        {"method": "computeLoss", "loss": "fair", **tensors, "params": {"cc": 1.0}},
    ])
    assert from_node[0]["loss"] == pytest.approx(fair_reference(p, y, 2.5).mean(), rel=1e-12)
    assert from_node[2]["error"]["code"] == 3 and "cc" in from_node[2]["error"]["details"]
