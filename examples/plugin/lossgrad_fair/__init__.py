"""The Fair loss as a lossgrad plugin.

    l(r) = c^2 (|r| / c - log(1 + |r| / c)),  r = prediction - target,  c > 0

It is quadratic near 0 (r^2 / 2 for |r| << c) and grows like c |r| for |r| >> c, so
outliers pull on the fit with a bounded force. The gradient is r / (1 + |r| / c), smooth
everywhere (no kink at 0, unlike L1 or Huber's second derivative). It is XGBoost's and
LightGBM's ``fair`` objective (LightGBM's ``fair_c`` is ``c`` here).
"""

import math

from lossgrad.plugin import Input, Loss, Param, fconst


def fair(x, y, c):
    """One element: (loss, d loss / d x). numba compiles it in nopython mode for
    float32 and float64; ``fconst`` keeps constants in the input's type, so float32
    math stays float32."""
    r = x - y
    u = abs(r) / c
    return c * c * (u - math.log1p(u)), r / (fconst(x, 1.0) + u)


LOSSES = [
    Loss(
        name="fair",
        aliases=("fair_loss",),
        elementwise=fair,
        description="c^2 (|r|/c - log(1 + |r|/c)), r = p - y; gradient r / (1 + |r|/c)",
        reference="XGBoost/LightGBM fair objective",
        params=(Param("c", 1.0, "scale: quadratic for |r| << c, linear beyond",
                      minimum=0.0, minimum_inclusive=False),),
        predictions=Input("values"),
        targets=Input("values", ("float32", "float64", "int32", "int64"),
                      "real values, same shape as predictions (integers are converted)"),
    ),
]
