"""The Fair loss as a lossgrad plugin.

    l(r) = c^2 (|r| / c - log(1 + |r| / c)),  r = prediction - target,  c > 0

It is quadratic near 0 (r^2 / 2 for |r| << c) and grows like c |r| for |r| >> c, so
outliers pull on the fit with a bounded force. The gradient is r / (1 + |r| / c), smooth
everywhere (no kink at 0, unlike L1 or Huber's second derivative), and the second
derivative 1 / (1 + |r| / c)^2 is positive, so gradient boosting can use it as is. It is
LightGBM's ``fair`` objective (``fair_c`` is ``c`` here); XGBoost has none built in.
"""

from lossgrad.plugin import Input, Loss, Param, fconst, log1p


def fair(x, y, c):
    """One element: (loss, d loss / d x). numba compiles it in nopython mode for
    float32 and float64; ``fconst`` keeps constants in the input's type, so float32
    math stays float32, and lossgrad's ``log1p`` (unlike ``math.log1p``, a libm call)
    lets the loop vectorise."""
    r = x - y
    u = abs(r) / c
    return c * c * (u - log1p(u)), r / (fconst(x, 1.0) + u)


def fair_hessian(x, y, c):
    """1 / (1 + |r|/c)^2, in (0, 1] (LightGBM's fair Hessian)."""
    s = fconst(x, 1.0) + abs(x - y) / c
    return fconst(x, 1.0) / (s * s)


LOSSES = [
    Loss(
        name="fair",
        aliases=("fair_loss",),
        elementwise=fair,
        hessian=fair_hessian,
        description="c^2 (|r|/c - log(1 + |r|/c)), r = p - y; gradient r / (1 + |r|/c)",
        reference="LightGBM fair objective",
        params=(Param("c", 1.0, "scale: quadratic for |r| << c, linear beyond",
                      minimum=0.0, minimum_inclusive=False),),
        predictions=Input("values"),
        targets=Input("values", ("float32", "float64", "int32", "int64"),
                      "real values, same shape as predictions (integers are converted)"),
    ),
]
