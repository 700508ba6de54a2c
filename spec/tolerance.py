"""Error bounds, and the tolerances derived from them.

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

__all__ = ["U64", "ulp_error", "ulp_of_exact"]

F64 = npt.NDArray[np.float64]

#: unit roundoff of float64, 2**-53
U64 = 2.0**-53
_TINY = mpmath.mpf(2) ** -1074


def ulp_of_exact(y: Any) -> Any:
    """The float64 ulp at the exact (mpmath) value ``y``, as an mpf."""
    y = abs(mpmath.mpf(y))
    if y == 0 or not mpmath.isfinite(y):
        return _TINY
    e = int(mpmath.floor(mpmath.log(y, 2)))
    # log(y, 2) can round across an integer; correct it with exact comparisons.
    while mpmath.mpf(2) ** e > y:
        e -= 1
    while mpmath.mpf(2) ** (e + 1) <= y:
        e += 1
    return max(mpmath.mpf(2) ** (e - 52), _TINY)


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
