"""End to end: LossClient -> gRPC -> LossService -> engine, against a real loopback server.

Every result that crosses the wire must be bit-identical to ``lossgrad.compute`` run
in-process on the same arrays (the wire adds no rounding); a few losses are also checked
against small float64 NumPy formulas written here from the definitions in the README.
"""

from __future__ import annotations

import math
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from lossgrad import LOSSES, compute
from lossgrad_client import GradientResult, InvalidArgumentError, LossClient, LossResult

pytestmark = pytest.mark.e2e

REDUCTIONS = ("none", "sum", "mean")
DTYPES = (np.float32, np.float64)
RTOL = 1e-12  # float64 against the NumPy formulas below


# --- inputs ------------------------------------------------------------------------------

def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def make_inputs(
    loss: str, dtype: Any, params: dict[str, Any], *, shape: tuple[int, ...] | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Valid (predictions, targets) for ``loss``; ``shape`` is the predictions' shape."""
    rng = np.random.default_rng(seed)
    spec = next(s for s in LOSSES if loss == s.name or loss in s.aliases)
    logits = params.get("from_logits") or loss == "sigmoid_cross_entropy"
    if not spec.class_axis_last:
        shape = shape or (4, 3)
        if spec.name in ("hinge", "squared_hinge"):
            labels = rng.choice([-1.0, 1.0], shape)
            return rng.normal(size=shape).astype(dtype), labels.astype(dtype)
        if spec.name == "binary_cross_entropy":
            x = rng.normal(size=shape) if logits else rng.uniform(0.05, 0.95, shape)
            return x.astype(dtype), rng.uniform(0.0, 1.0, shape).astype(dtype)
        if spec.name == "sigmoid_focal":
            return rng.normal(size=shape).astype(dtype), rng.uniform(0.0, 1.0, shape).astype(dtype)
        if spec.name == "tweedie":  # means > 0, targets >= 0
            return (rng.uniform(0.1, 3.0, shape).astype(dtype),
                    rng.uniform(0.0, 3.0, shape).astype(dtype))
        return rng.normal(size=shape).astype(dtype), rng.normal(size=shape).astype(dtype)
    shape = shape or (4, 5)
    z = rng.normal(size=shape)
    if spec.name == "sparse_categorical_cross_entropy":
        x = z if logits else _softmax(z)
        return x.astype(dtype), rng.integers(0, shape[-1], shape[:-1])
    if spec.name in ("nll", "multiclass_hinge"):
        x = np.log(_softmax(z)) if spec.name == "nll" else z
        return x.astype(dtype), rng.integers(0, shape[-1], shape[:-1])
    if spec.name == "kl_divergence" and params.get("log_predictions"):
        x = np.log(_softmax(z))
    else:
        x = z if logits else _softmax(z)
    return x.astype(dtype), _softmax(rng.normal(size=shape)).astype(dtype)


# Every catalog loss once with its defaults, every alias, and parameter variants (the loss
# with a third input, gaussian_nll, has its own tests in test_e2e_catalog.py).
CASES: list[tuple[str, dict[str, Any]]] = [
    (spec.name, {}) for spec in LOSSES if spec.variance is None] + [
    ("l1", {}),
    ("l2", {}),
    ("sigmoid_cross_entropy", {}),
    ("huber", {"delta": 0.5}),
    ("pseudo_huber", {"delta": 2.0}),
    ("binary_cross_entropy", {"from_logits": True, "pos_weight": 2.0, "label_smoothing": 0.1}),
    ("categorical_cross_entropy", {"from_logits": True, "label_smoothing": 0.2}),
    ("sparse_categorical_cross_entropy",
     {"from_logits": True, "ignore_index": 1, "label_smoothing": 0.1,
      "class_weight": [1.0, 2.0, 0.5, 1.5, 0.0]}),
    ("kl_divergence", {"log_predictions": True}),
]


def _case_id(case: tuple[str, dict[str, Any]]) -> str:
    name, params = case
    return name + "".join(f"-{k}" for k in params)


# --- comparison helpers --------------------------------------------------------------------

def assert_same_bits(actual: Any, expected: Any) -> None:
    """Equal values and dtypes, bit for bit (floats and arrays)."""
    if isinstance(expected, np.ndarray):
        assert isinstance(actual, np.ndarray)
        assert actual.dtype == expected.dtype
        assert actual.shape == expected.shape
        assert actual.tobytes() == expected.tobytes()
    else:
        assert isinstance(actual, float)
        assert np.float64(actual).tobytes() == np.float64(expected).tobytes()


def assert_matches_engine(
    result: LossResult | GradientResult, loss: str, x: Any, t: Any, **kwargs: Any
) -> None:
    gradient = isinstance(result, GradientResult)
    expected = compute(loss, x, t, gradient=gradient, **kwargs)
    assert_same_bits(result.loss, expected.loss)
    if isinstance(result, GradientResult):
        assert expected.gradient is not None
        assert_same_bits(result.gradient, expected.gradient)
    assert result.positions == expected.positions
    assert result.positions_counted == expected.positions_counted
    assert_same_bits(result.weight_sum, expected.weight_sum)


# --- every loss through the wire -----------------------------------------------------------

@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "sample_weight"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_every_loss_is_bit_identical_to_the_engine(
    client: LossClient, case: tuple[str, dict[str, Any]], reduction: str, dtype: Any,
    weighted: bool,
) -> None:
    name, params = case
    x, t = make_inputs(name, dtype, params)
    # Batch-axis weights with one zero: exercises the broadcast and positions_counted.
    w = np.array([0.5, 0.0, 2.0, 1.0], dtype=dtype) if weighted else None
    kwargs = {"reduction": reduction, "sample_weight": w, **params}
    loss_result = client.compute_loss(name, x, t, **kwargs)
    grad_result = client.compute_gradient(name, x, t, **kwargs)

    assert_matches_engine(loss_result, name, x, t, **kwargs)
    assert_matches_engine(grad_result, name, x, t, **kwargs)
    assert grad_result.gradient.shape == x.shape
    assert grad_result.gradient.dtype == x.dtype
    position_shape = x.shape if t.shape == x.shape and not _class_axis(name) else x.shape[:-1]
    assert loss_result.positions == math.prod(position_shape)
    if reduction == "none":
        assert isinstance(loss_result.loss, np.ndarray)
        assert loss_result.loss.shape == position_shape
        assert loss_result.loss.dtype == x.dtype
    else:
        assert isinstance(loss_result.loss, float)
        assert math.isfinite(loss_result.loss)


def _class_axis(name: str) -> bool:
    return next(s for s in LOSSES if name == s.name or name in s.aliases).class_axis_last


# --- against independent NumPy formulas ------------------------------------------------------

def test_mse_mean_matches_numpy(client: LossClient) -> None:
    x, t = make_inputs("mse", np.float64, {}, seed=1)
    result = client.compute_gradient("l2", x, t)
    np.testing.assert_allclose(result.loss, np.mean((x - t) ** 2), rtol=RTOL)
    np.testing.assert_allclose(result.gradient, 2 * (x - t) / x.size, rtol=RTOL)
    assert (result.positions, result.positions_counted, result.weight_sum) == (12, 12, 12.0)


def test_mae_sum_matches_numpy(client: LossClient) -> None:
    x, t = make_inputs("mae", np.float64, {}, seed=2)
    result = client.compute_gradient("mae", x, t, reduction="sum")
    np.testing.assert_allclose(result.loss, np.abs(x - t).sum(), rtol=RTOL)
    np.testing.assert_array_equal(result.gradient, np.sign(x - t))


def test_huber_mean_matches_numpy(client: LossClient) -> None:
    delta = 0.5
    x, t = make_inputs("huber", np.float64, {}, seed=3)
    r = x - t
    quadratic = np.abs(r) < delta
    expected = np.where(quadratic, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta))
    expected_grad = np.where(quadratic, r, delta * np.sign(r)) / r.size
    result = client.compute_gradient("huber", x, t, delta=delta)
    np.testing.assert_allclose(result.loss, expected.mean(), rtol=RTOL)
    np.testing.assert_allclose(result.gradient, expected_grad, rtol=RTOL)


def test_hinge_none_matches_numpy(client: LossClient) -> None:
    x, t = make_inputs("hinge", np.float64, {}, seed=4)
    result = client.compute_loss("hinge", x, t, reduction="none")
    np.testing.assert_allclose(result.loss, np.maximum(0.0, 1.0 - t * x), rtol=RTOL)


def test_sigmoid_cross_entropy_matches_numpy(client: LossClient) -> None:
    x, t = make_inputs("sigmoid_cross_entropy", np.float64, {}, seed=5)
    softplus = np.maximum(x, 0) + np.log1p(np.exp(-np.abs(x)))
    result = client.compute_gradient("sigmoid_cross_entropy", x, t)
    np.testing.assert_allclose(result.loss, np.mean(softplus - t * x), rtol=RTOL)
    np.testing.assert_allclose(result.gradient, (1 / (1 + np.exp(-x)) - t) / x.size, rtol=1e-10)


def test_sparse_categorical_cross_entropy_matches_numpy(client: LossClient) -> None:
    x, t = make_inputs("sparse_categorical_cross_entropy", np.float64, {"from_logits": True},
                       shape=(6, 4), seed=6)
    log_p = x - x.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    rows = np.arange(len(t))
    one_hot = np.zeros_like(x)
    one_hot[rows, t] = 1.0
    result = client.compute_gradient("sparse_categorical_cross_entropy", x, t, from_logits=True)
    np.testing.assert_allclose(result.loss, -log_p[rows, t].mean(), rtol=RTOL)
    np.testing.assert_allclose(result.gradient, (np.exp(log_p) - one_hot) / len(t),
                               rtol=1e-10, atol=1e-15)


def test_kl_divergence_matches_numpy(client: LossClient) -> None:
    q, p = make_inputs("kl_divergence", np.float64, {}, seed=7)
    result = client.compute_gradient("kl_divergence", q, p)
    n = q.shape[0]
    np.testing.assert_allclose(result.loss, np.sum(p * (np.log(p) - np.log(q))) / n, rtol=RTOL)
    np.testing.assert_allclose(result.gradient, -p / q / n, rtol=RTOL)


# --- sample weights ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_sample_weight_batch_axis_equals_full_shape(client: LossClient, dtype: Any) -> None:
    x, t = make_inputs("mse", dtype, {}, shape=(4, 3), seed=8)
    w = np.array([0.5, 2.0, 0.0, 1.0], dtype=dtype)
    full = np.repeat(w[:, None], 3, axis=1)
    by_batch = client.compute_gradient("mse", x, t, sample_weight=w)
    by_position = client.compute_gradient("mse", x, t, sample_weight=full)
    assert_matches_engine(by_batch, "mse", x, t, sample_weight=w)
    assert_same_bits(by_batch.loss, by_position.loss)
    assert_same_bits(by_batch.gradient, by_position.gradient)
    x64, t64, full64 = (a.astype(np.float64) for a in (x, t, full))
    expected = np.sum(full64 * (x64 - t64) ** 2) / full64.sum()
    np.testing.assert_allclose(by_batch.loss, expected, rtol=1e-12 if dtype is np.float64 else 1e-6)
    assert by_batch.positions == 12
    assert by_batch.positions_counted == 9
    assert by_batch.weight_sum == pytest.approx(3.5 * 3)


def test_sample_weight_on_class_rows(client: LossClient) -> None:
    params = {"from_logits": True}
    x, t = make_inputs("sparse_categorical_cross_entropy", np.float64, params, shape=(2, 3, 5),
                       seed=9)
    w = np.array([1.0, 3.0])
    full = np.repeat(w[:, None], 3, axis=1)
    by_batch = client.compute_gradient("sparse_categorical_cross_entropy", x, t, sample_weight=w,
                                       reduction="sum", **params)
    by_position = client.compute_gradient("sparse_categorical_cross_entropy", x, t,
                                          sample_weight=full, reduction="sum", **params)
    assert_matches_engine(by_batch, "sparse_categorical_cross_entropy", x, t, sample_weight=w,
                          reduction="sum", **params)
    assert_same_bits(by_batch.loss, by_position.loss)
    assert_same_bits(by_batch.gradient, by_position.gradient)
    unweighted = client.compute_loss("sparse_categorical_cross_entropy", x, t, reduction="none",
                                     **params)
    assert isinstance(unweighted.loss, np.ndarray)
    np.testing.assert_allclose(by_batch.loss, np.sum(full * unweighted.loss), rtol=RTOL)
    assert by_batch.positions == 6
    assert by_batch.weight_sum == 12.0


def test_reduction_none_applies_weights_per_position(client: LossClient) -> None:
    x, t = make_inputs("mae", np.float32, {}, shape=(2, 2), seed=10)
    w = np.array([[1.0, 0.0], [2.0, 0.5]], dtype=np.float32)
    result = client.compute_loss("mae", x, t, sample_weight=w, reduction="none")
    assert isinstance(result.loss, np.ndarray)
    np.testing.assert_allclose(result.loss, w * np.abs(x - t), rtol=1e-6)
    assert result.positions_counted == 3


# --- catalog ---------------------------------------------------------------------------------

def test_list_losses_serves_the_catalog(client: LossClient) -> None:
    infos = {info.name: info for info in client.list_losses()}
    assert sorted(infos) == sorted([
        "mae", "mse", "rmse", "huber", "pseudo_huber", "hinge", "squared_hinge",
        "binary_cross_entropy", "categorical_cross_entropy",
        "sparse_categorical_cross_entropy", "kl_divergence",
        "smooth_l1", "log_cosh", "quantile", "mape", "msle", "poisson_nll", "tweedie",
        "gaussian_nll", "sigmoid_focal", "softmax_focal", "nll", "multiclass_hinge",
        "categorical_hinge", "cosine_similarity",
    ])
    assert infos["mae"].aliases == ("l1",)
    assert infos["mse"].aliases == ("l2",)
    assert infos["binary_cross_entropy"].aliases == ("sigmoid_cross_entropy",)
    for spec in LOSSES:
        info = infos[spec.name]
        assert info.description == spec.description
        assert info.reference == spec.reference
        assert info.class_axis_last == spec.class_axis_last
        assert info.alias_params == spec.alias_presets
        assert info.predictions.kind == spec.predictions.kind.value
        assert info.predictions.dtypes == spec.predictions.dtypes
        assert info.targets.kind == spec.targets.kind.value
        assert info.targets.dtypes == spec.targets.dtypes
        assert info.targets.description == spec.targets.description
        assert [p.name for p in info.params] == [p.name for p in spec.params]
        for p, ps in zip(info.params, spec.params, strict=True):
            assert p.type == ps.type.value
            assert p.default == ps.default
            assert p.optional == ps.optional
            assert p.minimum == ps.minimum
            assert p.maximum == ps.maximum
            if ps.minimum is not None:
                assert p.minimum_inclusive == ps.minimum_inclusive
            if ps.maximum is not None:
                assert p.maximum_inclusive == ps.maximum_inclusive
            assert p.description == ps.description


def test_list_losses_parameter_ranges(client: LossClient) -> None:
    infos = {info.name: info for info in client.list_losses()}
    delta = infos["huber"].param("delta")
    assert delta is not None
    assert (delta.type, delta.default, delta.minimum, delta.minimum_inclusive) == (
        "double", 1.0, 0.0, False)
    smoothing = infos["binary_cross_entropy"].param("label_smoothing")
    assert smoothing is not None
    assert (smoothing.default, smoothing.minimum, smoothing.minimum_inclusive,
            smoothing.maximum, smoothing.maximum_inclusive) == (0.0, 0.0, True, 1.0, False)
    ignore = infos["sparse_categorical_cross_entropy"].param("ignore_index")
    assert ignore is not None
    assert (ignore.type, ignore.optional, ignore.default) == ("int64", True, None)
    class_weight = infos["sparse_categorical_cross_entropy"].param("class_weight")
    assert class_weight is not None
    assert (class_weight.type, class_weight.optional, class_weight.minimum) == (
        "double_list", True, 0.0)
    from_logits = infos["categorical_cross_entropy"].param("from_logits")
    assert from_logits is not None
    assert (from_logits.type, from_logits.default) == ("bool", False)
    assert infos["sparse_categorical_cross_entropy"].targets.kind == "class_indices"
    assert infos["sparse_categorical_cross_entropy"].targets.dtypes == ("int32", "int64")


# --- input conversions -----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_cpu_torch_tensors(client: LossClient, dtype: torch.dtype) -> None:
    x = torch.tensor([[0.2, -1.0, 3.0], [0.5, 0.0, -2.5]], dtype=dtype, requires_grad=True)
    t = torch.tensor([[0.0, -1.5, 2.0], [1.0, 0.5, -2.0]], dtype=dtype)
    result = client.compute_gradient("huber", x, t, delta=0.8)
    x_np, t_np = x.detach().numpy(), t.numpy()
    assert result.gradient.dtype == x_np.dtype
    assert_matches_engine(result, "huber", x_np, t_np, delta=0.8)
    # PyTorch's own Huber loss agrees (float64 accumulation vs PyTorch's float32 for float32).
    expected = torch.nn.functional.huber_loss(x, t, delta=0.8)
    expected.backward()
    assert x.grad is not None
    rtol = 1e-12 if dtype is torch.float64 else 1e-6
    np.testing.assert_allclose(result.loss, expected.item(), rtol=rtol)
    np.testing.assert_allclose(result.gradient, x.grad.numpy(), rtol=rtol)


def test_python_lists(client: LossClient) -> None:
    result = client.compute_gradient("mse", [[1.0, 2.0], [3.0, 4.0]], [[0.0, 2.0], [3.0, 2.0]])
    assert result.gradient.dtype == np.float64  # lists of floats travel as float64
    assert result.loss == pytest.approx(1.25)
    np.testing.assert_allclose(result.gradient, [[0.5, 0.0], [0.0, 1.0]])
    sparse = client.compute_loss("sparse_categorical_cross_entropy",
                                 [[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], [0, 2], reduction="none")
    np.testing.assert_allclose(sparse.loss, -np.log([0.7, 0.8]), rtol=RTOL)


def test_integer_class_targets_keep_their_dtype(client: LossClient) -> None:
    x, t = make_inputs("sparse_categorical_cross_entropy", np.float32, {}, seed=11)
    as_int32 = client.compute_gradient("sparse_categorical_cross_entropy", x, t.astype(np.int32))
    as_int64 = client.compute_gradient("sparse_categorical_cross_entropy", x, t.astype(np.int64))
    assert_same_bits(as_int32.loss, as_int64.loss)
    assert_same_bits(as_int32.gradient, as_int64.gradient)


def test_big_endian_and_non_contiguous_inputs(client: LossClient) -> None:
    x, t = make_inputs("mse", np.float64, {}, shape=(6, 4), seed=12)
    reference = client.compute_gradient("mse", x, t)
    swapped = client.compute_gradient("mse", x.astype(">f8"), t.astype(">f8"))
    strided = client.compute_gradient("mse", np.asfortranarray(x), t.T.copy().T)
    for other in (swapped, strided):
        assert_same_bits(other.loss, reference.loss)
        assert_same_bits(other.gradient, reference.gradient)


def test_reduction_is_case_insensitive(client: LossClient) -> None:
    x, t = make_inputs("mae", np.float64, {}, seed=13)
    assert_same_bits(client.compute_loss("mae", x, t, reduction="SUM").loss,
                     client.compute_loss("mae", x, t, reduction="sum").loss)


def test_result_arrays_are_read_only_views(client: LossClient) -> None:
    x, t = make_inputs("mse", np.float32, {}, seed=14)
    result = client.compute_gradient("mse", x, t, reduction="none")
    assert isinstance(result.loss, np.ndarray)
    assert not result.gradient.flags.writeable
    assert not result.loss.flags.writeable
    writable = result.gradient.copy()
    writable[0, 0] = 0.0
    assert writable[0, 0] == 0.0


def test_none_leaves_a_parameter_unset(client: LossClient) -> None:
    x, t = make_inputs("huber", np.float64, {}, seed=15)
    assert_same_bits(client.compute_loss("huber", x, t, delta=None).loss,
                     client.compute_loss("huber", x, t).loss)


# --- client-side checks (nothing is sent) --------------------------------------------------------

def test_unknown_keyword_is_rejected_by_the_server(client: LossClient) -> None:
    """A keyword without a typed LossParams field travels by name (plugin losses have
    such parameters); the server, which knows the loss, rejects it."""
    with pytest.raises(InvalidArgumentError, match="not a parameter of loss 'huber'") as info:
        client.compute_loss("huber", [1.0], [2.0], deltaa=1.0)
    assert info.value.field == "params.deltaa"
    assert info.value.reason == "UNKNOWN_PARAMETER"
    assert "its parameters: delta" in info.value.message
    assert isinstance(info.value.__cause__, grpc.RpcError)


def test_keyword_of_an_unusable_type_is_rejected_locally(client: LossClient) -> None:
    with pytest.raises(InvalidArgumentError, match="expected a sequence of numbers") as info:
        client.compute_loss("huber", [1.0], [2.0], deltaa="wide")
    assert info.value.field == "params.deltaa"
    assert info.value.__cause__ is not None and not isinstance(info.value.__cause__,
                                                               grpc.RpcError)


@pytest.mark.parametrize("reduction", ["avg", "", "batchmean"])
def test_unknown_reduction_is_rejected_locally(client: LossClient, reduction: str) -> None:
    with pytest.raises(InvalidArgumentError, match="reduction") as info:
        client.compute_loss("mse", [1.0], [2.0], reduction=reduction)
    assert info.value.field == "reduction"


@pytest.mark.parametrize("value", [
    np.array([True, False]), np.array([1.0, 2.0], dtype=np.int8).view(np.bool_),
    np.array([1 + 2j, 3j]), np.array(["a", "b"]),
], ids=["bool", "bool-view", "complex", "str"])
def test_unsupported_arrays_are_rejected_locally(client: LossClient, value: np.ndarray) -> None:
    with pytest.raises(InvalidArgumentError, match="predictions.dtype") as info:
        client.compute_loss("mse", value, [1.0, 2.0])
    assert info.value.reason == "UNSUPPORTED_DTYPE"


@pytest.mark.parametrize(("name", "value"), [
    ("delta", "1.0"), ("delta", True), ("from_logits", 1), ("ignore_index", 1.5),
    ("class_weight", [[1.0], [2.0]]),
])
def test_mistyped_parameters_are_rejected_locally(
    client: LossClient, name: str, value: Any
) -> None:
    with pytest.raises(InvalidArgumentError, match=f"params.{name}"):
        client.compute_loss("sparse_categorical_cross_entropy", [[0.5, 0.5]], [0],
                            **{name: value})


# --- concurrency and packaging -----------------------------------------------------------------

def test_concurrent_calls_give_the_same_bits(client: LossClient) -> None:
    """One channel shared by many threads; every answer equals the serial one."""
    x, t = make_inputs("sparse_categorical_cross_entropy", np.float32, {"from_logits": True},
                       shape=(256, 10), seed=16)
    serial = client.compute_gradient("sparse_categorical_cross_entropy", x, t, from_logits=True)
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(
            lambda _: client.compute_gradient("sparse_categorical_cross_entropy", x, t,
                                              from_logits=True),
            range(32)))
    for result in results:
        assert_same_bits(result.loss, serial.loss)
        assert_same_bits(result.gradient, serial.gradient)


def test_client_imports_without_the_server() -> None:
    code = (
        "import sys, lossgrad_client\n"
        "server_side = ('numba', 'lossgrad', 'torch')\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in server_side)\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_all_zero_weights_give_zero_loss_and_gradient(client: LossClient) -> None:
    x, t = make_inputs("huber", np.float64, {}, seed=17)
    result = client.compute_gradient("huber", x, t, sample_weight=np.zeros(x.shape[0]))
    assert result.loss == 0.0
    assert not result.gradient.any()
    assert (result.positions, result.positions_counted, result.weight_sum) == (12, 0, 0.0)
    ignored = client.compute_gradient("sparse_categorical_cross_entropy", [[0.5, 0.5]], [-1],
                                      ignore_index=-1)
    assert ignored.loss == 0.0
    assert not ignored.gradient.any()


def test_messages_above_grpc_default_limit(client: LossClient) -> None:
    """8 MiB tensors each way: both sides raise gRPC's 4 MiB default message limit."""
    rng = np.random.default_rng(18)
    x, t = rng.normal(size=1 << 20), rng.normal(size=1 << 20)
    result = client.compute_gradient("mse", x, t, reduction="none")
    assert_matches_engine(result, "mse", x, t, reduction="none")


def test_list_losses_states_the_conventions(stub: Any) -> None:
    """ListLosses carries the shared semantics, so other-language clients need no README."""
    from lossgrad_client._proto.lossgrad.v1 import lossgrad_pb2 as pb

    text = stub.ListLosses(pb.ListLossesRequest()).conventions
    for phrase in ("(predictions, targets)", "sum(w_i * l_i) / sum(w_i)", "floored at -100",
                   "ignore_index", "float64"):
        assert phrase in text
