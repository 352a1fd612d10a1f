"""``lossgrad plot``: the curves come from the server and match the formulas; the command
writes a PNG and fails with a clear message and a non-zero status on bad input."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from lossgrad.cli import main
from lossgrad.plot import PlotError, _curve, curves, resolve
from lossgrad_client import LossClient, LossInfo

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def catalog_infos(client: LossClient) -> Iterator[list[LossInfo]]:
    yield client.list_losses()


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


# --- the curves -----------------------------------------------------------------------------

@pytest.mark.e2e
def test_regression_curves_match_the_formulas(client: LossClient,
                                              catalog_infos: list[LossInfo]) -> None:
    resolved = resolve(catalog_infos, ["mse", "huber:delta=0.5"], [])
    panels = curves(client, resolved, targets=[1.0])
    assert len(panels) == 1 and panels[0].kind == "values"
    mse, huber = panels[0].curves
    assert mse.label == "mse" and huber.label == "huber (delta=0.5)"
    r = mse.x - 1.0
    assert mse.x[0] == -2.0 and mse.x[-1] == 4.0  # 3 either side of the target
    np.testing.assert_allclose(mse.loss, r * r, rtol=1e-12)
    np.testing.assert_allclose(mse.gradient, 2 * r, rtol=1e-12)
    np.testing.assert_allclose(huber.gradient, np.clip(r, -0.5, 0.5), rtol=1e-12, atol=1e-15)


@pytest.mark.e2e
def test_classification_grids_follow_the_input_kind(client: LossClient,
                                                    catalog_infos: list[LossInfo]) -> None:
    resolved = resolve(catalog_infos, ["hinge", "binary_cross_entropy",
                                       "sparse_categorical_cross_entropy"],
                       ["from_logits=true"])
    panels = curves(client, resolved)
    kinds = [(p.kind, p.structure) for p in panels]
    assert kinds == [("logits", "binary"), ("logits", "class")]
    hinge, bce = panels[0].curves
    assert hinge.x[0] == -4.0 and hinge.target == 1.0  # positive label, scores in [-4, 4]
    np.testing.assert_allclose(hinge.loss, np.maximum(0.0, 1.0 - hinge.x), atol=1e-15)
    np.testing.assert_allclose(bce.loss, np.logaddexp(0.0, -bce.x), rtol=1e-12)
    np.testing.assert_allclose(bce.gradient, -1.0 / (1.0 + np.exp(bce.x)), rtol=1e-12)
    # two-class rows [z, 0] with class 0 true: the loss is softplus(-z), like BCE.
    (sparse,) = panels[1].curves
    np.testing.assert_allclose(sparse.loss, bce.loss, rtol=1e-12)
    np.testing.assert_allclose(sparse.gradient, bce.gradient, rtol=1e-12)


@pytest.mark.e2e
def test_probability_inputs_use_the_open_unit_interval(client: LossClient,
                                                       catalog_infos: list[LossInfo]) -> None:
    (panel,) = curves(client, resolve(catalog_infos, ["kl_divergence"], []))
    assert panel.kind == "probabilities" and panel.structure == "class"
    true_class = panel.curves[0]
    assert 0 < true_class.x[0] < true_class.x[-1] < 1
    # target row [1, 0] against [q, 1 - q]: KL = -log q, gradient -1/q in the first entry.
    np.testing.assert_allclose(true_class.loss, -np.log(true_class.x), rtol=1e-12)
    np.testing.assert_allclose(true_class.gradient, -1.0 / true_class.x, rtol=1e-12)


@pytest.mark.e2e
def test_grid_is_cut_to_the_loss_domain(client: LossClient,
                                        catalog_infos: list[LossInfo]) -> None:
    """Probabilities outside [0, 1] are rejected by the server: the curve keeps the rest."""
    (info, request), = resolve(catalog_infos, ["binary_cross_entropy"], [])
    grid = np.linspace(-1.0, 2.0, 31)
    curve = _curve(client, info, request, "probabilities", grid, 1.0, "bce")
    assert curve.x[0] == pytest.approx(0.0, abs=1e-12)
    assert curve.x[-1] == pytest.approx(1.0)
    assert np.isfinite(curve.gradient[1:]).all()


@pytest.mark.parametrize(("losses", "params", "message"), [
    (["nope"], [], "unknown loss 'nope'"),
    (["mse:delta=1"], [], "mse has no parameter 'delta'"),
    (["huber:delta=wide"], [], "huber: delta=wide: not a double"),
    (["mse"], ["delta=1"], "none of the losses has a parameter 'delta'"),
    (["huber:delta"], [], "is not NAME=VALUE"),
])
def test_bad_requests_are_plot_errors(catalog_infos: list[LossInfo], losses: list[str],
                                      params: list[str], message: str) -> None:
    with pytest.raises(PlotError, match=message):
        resolve(catalog_infos, losses, params)


# --- the command ----------------------------------------------------------------------------

@pytest.mark.e2e
def test_command_writes_a_png(server_address: str, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "losses.png"
    assert main(["plot", "mae", "mse", "huber", "hinge", "binary_cross_entropy",
                 "--param", "from_logits=true", "--target", server_address,
                 "-o", str(out)]) == 0
    width, height = _png_size(out)
    assert (width, height) == (920, 600)  # two columns of 4.6 x 6 inches at 100 dpi
    assert 10_000 < out.stat().st_size < 150_000
    assert f"wrote {out}" in capsys.readouterr().out


@pytest.mark.e2e
def test_command_starts_its_own_server(tmp_path: Path) -> None:
    out = tmp_path / "huber.png"
    assert main(["plot", "huber", "--targets", "0,2", "-o", str(out)]) == 0
    assert _png_size(out) == (460, 600)


@pytest.mark.e2e
@pytest.mark.parametrize(("args", "status", "message"), [
    (["nope"], 2, "lossgrad plot: unknown loss 'nope'"),
    (["huber:delta=wide"], 2, "not a double"),
    (["huber:delta=-1"], 1, "params.delta: -1.0 is outside (0, inf)"),
])
def test_command_errors_are_clear(server_address: str, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str], args: list[str],
                                  status: int, message: str) -> None:
    out = tmp_path / "never.png"
    assert main(["plot", *args, "--target", server_address, "-o", str(out)]) == status
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.e2e
def test_an_alias_plots_with_the_values_it_fixes(client: LossClient,
                                                 catalog_infos: list[LossInfo]) -> None:
    """sigmoid_cross_entropy is binary_cross_entropy with from_logits=true: ListLosses
    says so, and the plot draws it on logits (softplus(x) - t x) like the canonical name
    with that parameter."""
    bce_info = next(info for info in catalog_infos if info.name == "binary_cross_entropy")
    assert bce_info.alias_params == {"sigmoid_cross_entropy": {"from_logits": True}}
    assert next(info for info in catalog_infos if info.name == "mse").alias_params == {}
    (panel,) = curves(client, resolve(catalog_infos, ["sigmoid_cross_entropy"], []))
    assert panel.kind == "logits" and len(panel.curves) == 2
    assert panel.curves[0].label == "sigmoid_cross_entropy"
    for curve in panel.curves:
        np.testing.assert_allclose(curve.loss, np.logaddexp(0.0, curve.x) - curve.target * curve.x,
                                   rtol=1e-12)
    # a shared --param leaves the alias's value alone; the alias's own may not change it
    pair = resolve(catalog_infos, ["binary_cross_entropy", "sigmoid_cross_entropy"],
                   ["from_logits=false"])
    assert [request.params for _, request in pair] == [{"from_logits": False},
                                                       {"from_logits": True}]
    with pytest.raises(PlotError, match="sigmoid_cross_entropy means from_logits=True"):
        resolve(catalog_infos, ["sigmoid_cross_entropy:from_logits=false"], [])
