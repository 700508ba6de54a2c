r"""Rounding exact numbers to float64, correctly: to nearest, ties to even.

Conversions the usual way round twice below the normal range: mpmath's ``float(mpf)``
and Arb's ``float(arb)`` first round to 53 bits, then to the subnormal's fewer bits, so
that :math:`2^{-1075}(1 + 2^{-125})` becomes :math:`2^{-1075}` and then 0, where the
nearest float64 is :math:`2^{-1074}`. Here a binary number :math:`m\,2^e` (an mpf, an
exact Arb midpoint, an int) is rounded once, by Python's integer true division, which
CPython rounds correctly over the whole float64 range, subnormals included; beyond the
range it is the infinity of its sign.

A ball (``flint.arb``) rounds only when every point in it rounds to the same float64:
:func:`round_ball` says whether it does.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["UndecidedRounding", "nearest", "nearest_fraction", "round_ball", "to_float64"]

_MAX = float(np.finfo(np.float64).max)
#: values of magnitude at least this round to infinity (max + half its ulp; the tie
#: goes to even, which is infinity: max has an odd significand)
_OVERFLOW_THRESHOLD = 2**1024 - 2**970


class UndecidedRounding(ArithmeticError):
    """A ball that does not determine its float64 rounding (it contains a point where
    the rounding changes), after every precision the evaluation was allowed."""


def nearest(man: int, exp: int) -> float:
    r"""The float64 nearest :math:`m\,2^e` (ties to even; beyond the range +-inf)."""
    if man == 0:
        return 0.0
    sign = -1.0 if man < 0 else 1.0
    top = abs(man).bit_length() + exp  # 2**(top - 1) <= |value| < 2**top
    if top > 1025:
        return sign * math.inf
    if top < -1075:  # below half the smallest subnormal, 2**-1075
        return math.copysign(0.0, sign)
    try:
        if exp >= 0:
            return float(man << exp)
        return man / (1 << -exp)
    except OverflowError:  # rounds beyond the largest float64
        return sign * math.inf


def nearest_fraction(p: int, q: int) -> float:
    """The float64 nearest p / q (q > 0; ties to even; beyond the range +-inf)."""
    try:
        return p / q  # CPython rounds int true division correctly, subnormals included
    except OverflowError:
        return math.inf if p > 0 else -math.inf


def _round_mpf(x: Any) -> float:
    import mpmath

    if not mpmath.isfinite(x):
        return float(x)  # +-inf and NaN convert exactly
    sign, man, exp, _ = x._mpf_
    return nearest(-int(man) if sign else int(man), int(exp))


def _round_exact_arb(x: Any) -> float:
    """The nearest float64 to an exact ball (radius 0)."""
    man, exp = x.mid().man_exp()
    return nearest(int(man), int(exp))


def round_ball(x: Any) -> float | None:
    """The float64 every point of the ball ``x`` (a ``flint.arb``) rounds to, or None
    if there is no such float64 (the ball holds a rounding boundary, or is not finite).
    A ball of radius 0 is its midpoint, rounded correctly (ties to even)."""
    if not x.is_finite():
        return None
    if x.is_exact():
        return _round_exact_arb(x)
    f = float(x.mid())
    if math.isinf(f) or abs(f) < 2.0**-1021:
        # float() may round twice below the normal range, and gives inf at the top:
        # round the midpoint once; then test the ball against that float64 below
        f = _round_exact_arb(x.mid())
    if math.isinf(f):
        return f if x.abs_lower() >= _OVERFLOW_THRESHOLD else None
    # the float64 interval that rounds to f: half the gaps to its neighbours (the
    # boundaries themselves excluded: a ball that reaches one is not decided)
    up = 2.0**971 if f == _MAX else math.nextafter(f, math.inf) - f
    down = 2.0**971 if f == -_MAX else f - math.nextafter(f, -math.inf)
    # 2(x - f) as a ball that contains every point's (the comparisons are rigorous;
    # the factor 2 is exact, where halving a subnormal gap would round)
    d = 2 * (x - f)
    if d < up and d > -down:
        return f
    return None


def _round_one(x: Any) -> float:
    kind = type(x).__name__
    if isinstance(x, float):
        return x
    if isinstance(x, int | np.integer) and not isinstance(x, bool | np.bool_):
        return nearest(int(x), 0)
    if kind == "mpf":
        return _round_mpf(x)
    if kind == "fmpq":
        return nearest_fraction(int(x.p), int(x.q))
    if kind == "arb":
        r = round_ball(x)
        if r is None:
            raise UndecidedRounding(
                f"the ball {x} does not determine its float64 rounding (it reaches a "
                "point where the rounding changes, or is not finite): evaluate it at a "
                "higher precision"
            )
        return r
    return float(x)


_round = np.frompyfunc(_round_one, 1, 1)


def to_float64(a: object) -> npt.NDArray[np.float64]:
    """Round numbers (mpmath mpf, Arb balls, ints, floats; an array or a scalar) to the
    nearest float64, correctly (ties to even; beyond the range +-inf).

    A ball rounds only if every point in it rounds to the same float64; otherwise
    :class:`UndecidedRounding` is raised. The results of :mod:`attnspec.exact` are
    mpf values chosen so that they always round (see :func:`attnspec.exact.softmax`).
    """
    arr = np.asarray(a, dtype=object)
    # mpf('nan') and mpf('inf') convert exactly; numpy's object loop still reports
    # them as invalid values, which would be an error under warnings-as-errors
    with np.errstate(over="ignore", invalid="ignore"):
        return np.asarray(_round(arr), dtype=np.float64).reshape(arr.shape)
