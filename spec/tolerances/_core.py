"""What the tolerances of every topic share: float64's constants, ulps, perturbations.

Errors are measured in ulps of the exact value: for an exact real ``y`` the ulp is
the spacing of float64 numbers at ``|y|``, ``2**(floor(log2|y|) - 52)``, and never
less than the smallest subnormal ``2**-1074``. A result within 1 ulp is one of the
two float64 numbers that bracket the exact value (faithful rounding); 0.5 ulp is
correct rounding.
"""

from __future__ import annotations

import math
from typing import Any

import mpmath
import numpy as np
import numpy.typing as npt

__all__ = [
    "ACCURACIES",
    "ETA",
    "ETA64",
    "SECOND_ORDER",
    "U64",
    "U",
    "perturbation_factor",
    "ulp_error",
    "ulp_of_exact",
]

F64 = npt.NDArray[np.float64]

#: the accuracy an implementation of any topic may claim: "accurate" (the claim of
#: precision="accurate": within one ulp, and 4u sum_j p_ij |v_jk| for attention's
#: output), "fast" (the bounds of plain float64, derived in each topic's module), or a
#: number rho >= 0 (a relative bound of the implementation's own; see each topic)
ACCURACIES = ("accurate", "fast")
Accuracy = str | float

#: unit roundoff of float64, 2**-53
U = U64 = 2.0**-53
#: smallest positive subnormal float64, 2**-1074
ETA = ETA64 = 2.0**-1074
_TINY = mpmath.mpf(2) ** -1074

#: factor that absorbs the second-order terms of the first-order bounds and the
#: rounding of the bound's own evaluation. Every first-order coefficient c satisfies
#: c * u <= 2**-20 for rows of up to 2**30 entries, and a product of k factors
#: (1 + d_i), sum |d_i| = t <= 2**-20, differs from 1 + t by at most t**2 <= 2**-20 t;
#: 1.01 leaves a wide margin.
SECOND_ORDER = 1.01


def perturbation_factor(delta: Any) -> Any:
    r"""How much softmax (and attention) may change when every logit moves by at most
    :math:`\delta`.

    A perturbation :math:`|\tilde s_j - s_j| \le \delta` changes each weight by the factor
    :math:`e^{\tilde s_j - s_j} / \sum_l p_l e^{\tilde s_l - s_l} \in [e^{-2\delta},
    e^{2\delta}]`, so the relative change of a weight is at most :math:`e^{2\delta} - 1`,
    and :math:`|\tilde o_k - o_k| \le (e^{2\delta} - 1) \sum_j p_j |v_{jk}|` (the
    returned factor, rounded up by ``SECOND_ORDER``; inf where it would overflow), while
    the lse moves by at most :math:`\delta`.
    """
    d = np.asarray(delta, dtype=np.float64)
    with np.errstate(over="ignore"):  # a huge delta: the bound is inf, i.e. says nothing
        return SECOND_ORDER * np.expm1(np.minimum(2 * d, 710.0)) * np.where(2 * d < 709, 1, np.inf)


def ulp_of_exact(y: Any) -> Any:
    """The float64 ulp at the exact (mpmath) value ``y``, as an mpf."""
    y = abs(mpmath.mpf(y))
    if y == 0 or not mpmath.isfinite(y):
        return _TINY
    # floor(log2 y) exactly, from the binary representation y = man * 2**exp with a
    # mantissa of bc bits (taking log(y, 2) instead loops for ages on y ~ 1e-1e308).
    _, _, exp, bc = y._mpf_
    e = int(exp) + int(bc) - 1
    if e < -1022:  # subnormal range: the spacing is the smallest subnormal
        return _TINY
    return mpmath.mpf(2) ** (e - 52)


def _one(c: float, y: Any) -> float:
    y = mpmath.mpf(y)
    if math.isnan(c) or mpmath.isnan(y):
        return 0.0 if (math.isnan(c) and mpmath.isnan(y)) else math.inf
    if mpmath.isinf(y) or math.isinf(c):
        return 0.0 if mpmath.mpf(c) == y else math.inf
    return float(abs(mpmath.mpf(c) - y) / ulp_of_exact(y))


def ulp_error(computed: npt.ArrayLike, exact: npt.ArrayLike) -> F64:
    """Elementwise ``|computed - exact| / ulp(exact)``, in float64.

    ``computed`` holds float64 results; ``exact`` the exact values (mpmath numbers, as
    returned by :mod:`attnspec.exact`, or anything mpmath converts exactly). Equal
    infinities and NaN against NaN count as 0 ulp; any other disagreement about a
    special value counts as infinitely many.
    """
    c = np.asarray(computed, dtype=np.float64)
    e = np.asarray(exact, dtype=object)
    c, e = np.broadcast_arrays(c, e)
    out = np.empty(c.shape, dtype=np.float64)
    with mpmath.workdps(max(mpmath.mp.dps, 40)):
        for idx in np.ndindex(c.shape):
            out[idx] = _one(float(c[idx]), e[idx])
    return out
