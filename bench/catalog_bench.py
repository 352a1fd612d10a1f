"""Section 10: every loss of the catalog, in-process, against PyTorch on the same CPU.

Section 1 times a few losses in depth; this one times them all, at the sizes the targets
name, against what a training worker would run locally: PyTorch's own loss where it has
one, elsewhere the defining library's formula written in torch operations (the forms
``tests/test_numerics_catalog_torch.py`` checks the values against), with autograd for
the gradient.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lossgrad
import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - PyTorch's own convention
from cases import SEED
from measure import Timing, calmly, fmt_ms, fmt_ratio, interleaved, table

TORCH_THREADS = 2
TOLERANCE = 1e-4  # float32, loss and max |Δgradient| / max |gradient|; formulas differ in order
KERAS_EPSILON = 1e-7
ELEMENT_SIZES = (10**3, 10**5, 10**6)
ROW_SHAPES = ((256, 10), (4096, 1000))
TorchFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Entry:
    """A catalog loss with parameters, its inputs and its PyTorch counterpart."""

    loss: str
    params: dict[str, Any]
    inputs: str  # a key of INPUTS
    torch_fn: TorchFn  # (predictions, targets[, variance]) -> mean loss
    reference: str
    rows: bool = False
    label: str = field(default="")

    @property
    def name(self) -> str:
        return self.label or self.loss


def _mean(per_position: TorchFn) -> TorchFn:
    return lambda *t: per_position(*t).mean()


def _rows_mean(per_row: TorchFn) -> TorchFn:
    return lambda *t: per_row(*t).mean()


def _tweedie(mu: torch.Tensor, y: torch.Tensor, p: float = 1.5) -> torch.Tensor:
    return 2 * (torch.clamp(y, min=0) ** (2 - p) / ((1 - p) * (2 - p))
                - y * mu ** (1 - p) / (1 - p) + mu ** (2 - p) / (2 - p))


def _sigmoid_focal(x: torch.Tensor, y: torch.Tensor, alpha: float = 0.25,
                   gamma: float = 2.0) -> torch.Tensor:
    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, y, reduction="none")
    p_t = p * y + (1 - p) * (1 - y)
    return (alpha * y + (1 - alpha) * (1 - y)) * ce * (1 - p_t) ** gamma


def _softmax_focal(x: torch.Tensor, q: torch.Tensor, alpha: float = 0.25,
                   gamma: float = 2.0) -> torch.Tensor:
    logp = torch.log_softmax(x, -1)
    return (alpha * (1 - logp.exp()) ** gamma * -q * logp).sum(-1)


def _categorical_hinge(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    pos = (y * x).sum(-1)
    neg = ((1 - y) * x).amax(-1)
    return torch.clamp(neg - pos + 1, min=0)


def _cosine(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    nx = torch.clamp(torch.linalg.vector_norm(x, dim=-1, keepdim=True), min=KERAS_EPSILON)
    ny = torch.clamp(torch.linalg.vector_norm(y, dim=-1, keepdim=True), min=KERAS_EPSILON)
    return -((x / nx) * (y / ny)).sum(-1)


def _crammer_singer(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    one_hot = F.one_hot(y, x.shape[-1]).to(x.dtype)
    return (x + 1 - one_hot).amax(-1) - (x * one_hot).sum(-1)


def _log_cosh(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r = x - y
    return r + F.softplus(-2.0 * r) - math.log(2.0)


def _msle(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (torch.log(torch.clamp(x, min=KERAS_EPSILON) + 1)
            - torch.log(torch.clamp(y, min=KERAS_EPSILON) + 1)) ** 2


ENTRIES = (
    Entry("mae", {}, "values", F.l1_loss, "F.l1_loss"),
    Entry("mse", {}, "values", F.mse_loss, "F.mse_loss"),
    Entry("rmse", {}, "values", lambda x, y: torch.sqrt(F.mse_loss(x, y)),
          "sqrt(F.mse_loss)"),
    Entry("huber", {}, "values", F.huber_loss, "F.huber_loss"),
    Entry("pseudo_huber", {}, "values", _mean(lambda x, y: torch.sqrt(1 + (x - y) ** 2) - 1),
          "formula (optax)"),
    Entry("smooth_l1", {}, "values", F.smooth_l1_loss, "F.smooth_l1_loss"),
    Entry("log_cosh", {}, "values", _mean(_log_cosh), "formula (Keras)"),
    Entry("quantile", {"quantile": 0.8}, "values",
          _mean(lambda x, y: 0.8 * torch.clamp(y - x, min=0) + 0.2 * torch.clamp(x - y, min=0)),
          "formula (scikit-learn)"),
    Entry("mape", {}, "values", _mean(lambda x, y: 100.0 * torch.abs(
        (y - x) / torch.clamp(torch.abs(y), min=KERAS_EPSILON))), "formula (Keras)"),
    Entry("msle", {}, "positive", _mean(_msle), "formula (Keras)"),
    Entry("hinge", {}, "signed", _mean(lambda x, y: torch.clamp(1 - y * x, min=0)),
          "formula (Keras)"),
    Entry("squared_hinge", {}, "signed",
          _mean(lambda x, y: torch.clamp(1 - y * x, min=0) ** 2), "formula (Keras)"),
    Entry("binary_cross_entropy", {}, "probabilities", F.binary_cross_entropy,
          "F.binary_cross_entropy", label="binary_cross_entropy (probabilities)"),
    Entry("binary_cross_entropy", {"from_logits": True}, "logits",
          F.binary_cross_entropy_with_logits, "F.binary_cross_entropy_with_logits",
          label="binary_cross_entropy (logits)"),
    Entry("sigmoid_focal", {}, "logits", _mean(_sigmoid_focal), "formula (torchvision)"),
    Entry("poisson_nll", {}, "counts", F.poisson_nll_loss, "F.poisson_nll_loss"),
    Entry("tweedie", {}, "positive", _mean(_tweedie), "formula (scikit-learn)"),
    Entry("gaussian_nll", {}, "gaussian", F.gaussian_nll_loss, "F.gaussian_nll_loss"),
    Entry("sparse_categorical_cross_entropy", {"from_logits": True}, "labels", F.cross_entropy,
          "F.cross_entropy", rows=True, label="sparse_categorical_cross_entropy (logits)"),
    Entry("sparse_categorical_cross_entropy", {}, "labels_probabilities",
          lambda x, y: F.nll_loss(torch.log(x), y), "F.nll_loss(log)", rows=True,
          label="sparse_categorical_cross_entropy (probabilities)"),
    Entry("categorical_cross_entropy", {"from_logits": True}, "soft", F.cross_entropy,
          "F.cross_entropy", rows=True, label="categorical_cross_entropy (logits)"),
    Entry("categorical_cross_entropy", {}, "soft_probabilities",
          _rows_mean(lambda x, y: -(y * torch.log(x)).sum(-1)), "formula (Keras)", rows=True,
          label="categorical_cross_entropy (probabilities)"),
    Entry("nll", {}, "labels_log_probabilities", F.nll_loss, "F.nll_loss", rows=True),
    Entry("kl_divergence", {"log_predictions": True}, "soft_log_probabilities",
          lambda x, y: F.kl_div(x, y, reduction="batchmean"), "F.kl_div", rows=True,
          label="kl_divergence (log input)"),
    Entry("kl_divergence", {}, "soft_probabilities",
          lambda x, y: F.kl_div(torch.log(x), y, reduction="batchmean"), "F.kl_div(log)",
          rows=True, label="kl_divergence (probabilities)"),
    Entry("softmax_focal", {}, "soft", _rows_mean(_softmax_focal), "formula (Keras)",
          rows=True),
    Entry("multiclass_hinge", {}, "labels", _rows_mean(_crammer_singer), "formula (optax)",
          rows=True),
    Entry("categorical_hinge", {}, "one_hot", _rows_mean(_categorical_hinge),
          "formula (Keras)", rows=True),
    Entry("cosine_similarity", {}, "vectors", _rows_mean(_cosine), "formula (Keras)",
          rows=True),
)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def inputs(kind: str, shape: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    """Seeded float32 inputs: (predictions, targets[, variance])."""
    rng = np.random.default_rng(SEED)

    def normal() -> np.ndarray:
        return rng.standard_normal(shape, dtype=np.float32)

    if kind == "values":  # |x - y| >= 0.1: no ties at a kink, where subgradients may differ
        x = normal()
        r = rng.choice(np.array([-1.0, 1.0], np.float32), shape) * rng.uniform(0.1, 3.0, shape)
        return x, (x - r).astype(np.float32)
    if kind == "positive":
        return (rng.uniform(0.1, 4.0, shape).astype(np.float32),
                rng.uniform(0.0, 4.0, shape).astype(np.float32))
    if kind == "signed":
        return normal(), rng.choice(np.array([-1.0, 1.0], np.float32), shape)
    if kind == "probabilities":
        return (rng.uniform(0.01, 0.99, shape).astype(np.float32),
                (rng.random(shape) < 0.5).astype(np.float32))
    if kind == "logits":
        return normal(), (rng.random(shape) < 0.5).astype(np.float32)
    if kind == "counts":
        return normal(), rng.poisson(2.0, shape).astype(np.float32)
    if kind == "gaussian":
        return normal(), normal(), rng.uniform(0.5, 2.0, shape).astype(np.float32)
    labels = rng.integers(0, shape[-1], size=shape[:-1], dtype=np.int64)
    logits = normal()
    if kind == "one_hot":
        return logits, np.eye(shape[-1], dtype=np.float32)[labels]
    if kind == "vectors":
        return logits, normal()
    soft = _softmax(rng.standard_normal(shape, dtype=np.float32))
    # "labels" / "soft" targets, after "_" the predictions' form (logits when none)
    targets, _, form = kind.partition("_")
    forms: dict[str, Callable[[], np.ndarray]] = {
        "": lambda: logits, "probabilities": lambda: _softmax(logits),
        "log_probabilities": lambda: np.log(_softmax(logits))}
    if targets in ("labels", "soft") and form in forms:
        return forms[form](), labels if targets == "labels" else soft
    raise ValueError(f"unknown inputs {kind!r}")


@dataclass(frozen=True)
class Row:
    entry: Entry
    size: str
    elements: int
    lossgrad: Timing
    torch: Timing
    diff: float

    @property
    def ratio(self) -> float:
        return self.torch.ms() / self.lossgrad.ms()


def _relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


def measure(entry: Entry, shape: tuple[int, ...], budget_s: float, max_reps: int) -> Row:
    arrays = inputs(entry.inputs, shape)
    x, y = arrays[0], arrays[1]
    extra = {"variance": arrays[2]} if len(arrays) > 2 else {}
    leaf = torch.from_numpy(x).requires_grad_(True)
    others = [torch.from_numpy(a) for a in arrays[1:]]

    def torch_step() -> tuple[float, np.ndarray]:
        leaf.grad = None
        loss = entry.torch_fn(leaf, *others)
        loss.backward()
        assert leaf.grad is not None
        return float(loss.detach()), leaf.grad.numpy()

    def ours() -> Any:
        return lossgrad.compute(entry.loss, x, y, **extra, **entry.params)

    result = ours()
    torch_loss, torch_grad = torch_step()
    grad_scale = max(float(np.max(np.abs(torch_grad))), 1e-300)
    diff = max(_relative(float(result.loss), torch_loss),
               float(np.max(np.abs(result.gradient.astype(np.float64) - torch_grad)))
               / grad_scale)
    del result, torch_grad
    gc.collect()
    t = interleaved({"lossgrad": ours, "torch": torch_step}, budget_s=budget_s, min_reps=5,
                    max_reps=max_reps)
    size = f"{shape[0]}×{shape[1]}" if len(shape) == 2 else f"1e{round(math.log10(shape[0]))}"
    return Row(entry, size, int(np.prod(shape)), t["lossgrad"], t["torch"], diff)


NOTE = """\
Every loss of the catalog (float32, reduction `mean`, default parameters unless shown),
`lossgrad.compute` with its gradient against a PyTorch forward + `backward()` on
{threads} threads (`grad = None` before each step, included). *PyTorch* is its own loss
where it has one, elsewhere the defining library's formula in torch operations, as a
worker would write it. Median / p90 over interleaved calls ({budget:g} s per
implementation and row, at least 5 calls); seeded inputs (`bench/catalog_bench.py`).
*diff*: the larger of the losses' relative difference and max |Δgradient| / max
|PyTorch gradient|, checked before timing (rows over {tol:g} are marked **MISMATCH**).
"""


def render(rows: list[Row], budget_s: float) -> str:
    header = ["loss", "params", "size", "lossgrad ms", "PyTorch ms", "PyTorch / lossgrad",
              "PyTorch side", "diff"]
    body = [[r.entry.name, ", ".join(f"{k}={v}" for k, v in r.entry.params.items()) or "–",
             r.size, f"{fmt_ms(r.lossgrad.ms())} / {fmt_ms(r.lossgrad.ms(90))}",
             f"{fmt_ms(r.torch.ms())} / {fmt_ms(r.torch.ms(90))}", fmt_ratio(r.ratio),
             r.entry.reference,
             f"{r.diff:.1e}" + ("" if r.diff <= TOLERANCE else " **MISMATCH**")]
            for r in rows]
    slower = [f"{r.entry.name} {r.size} ({fmt_ratio(r.ratio)})" for r in rows if r.ratio < 1]
    short = [f"{r.entry.name} {r.size} ({fmt_ratio(r.ratio)})" for r in rows
             if r.elements >= 10**5 and 1 <= r.ratio < 3]
    text = NOTE.format(threads=TORCH_THREADS, budget=budget_s, tol=TOLERANCE) + "\n"
    text += table(header, body)
    text += ("\nSlower than PyTorch: " + ("; ".join(slower) or "none") + ".\n"
             "At least 1e5 elements and under 3× faster: " + ("; ".join(short) or "none")
             + ".\n")
    return text


def run(quick: bool) -> tuple[str, list[str]]:
    """Run the catalog section; return its Markdown and its problems (mismatches)."""
    torch.set_num_threads(TORCH_THREADS)
    budget_s, max_reps = (0.1, 40) if quick else (0.4, 200)
    rows: list[Row] = []
    for entry in ENTRIES:
        shapes = ROW_SHAPES if entry.rows else tuple((n,) for n in ELEMENT_SIZES)
        for shape in shapes:
            row, _ = calmly(lambda e=entry, s=shape: measure(e, s, budget_s, max_reps),
                            max_wait_s=0.5 if quick else 2.0, attempts=1)
            print(f"  catalog {entry.name} {row.size}: lossgrad {row.lossgrad.ms():.3f} ms, "
                  f"torch {row.torch.ms():.3f} ms", flush=True)
            rows.append(row)
    problems = [f"{r.entry.name} {r.size}: diff {r.diff:.2e} against PyTorch"
                for r in rows if r.diff > TOLERANCE]
    return render(rows, budget_s), problems
