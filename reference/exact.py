"""The same definitions, evaluated in mpmath at a precision of the caller's choice.

This is the ground truth the tests compare against. Each function takes the same
arguments as its float64 counterpart in :mod:`attnspec`, plus ``dps`` (decimal digits
of working precision, default 50), and returns a numpy object array of
``mpmath.mpf`` values (a 0-d object array for a full reduction) that carry the
working precision, so that the error of a float64 result can be measured in
fractions of an ulp. :func:`to_float64` rounds them.

Inputs are float64 (or converted to float64 exactly), so every input is an exact
mpmath number whenever ``dps >= 16``; the only errors are those of mpmath's
operations at the working precision, which ``dps`` controls.
"""

from __future__ import annotations

import math
from typing import Any

import mpmath
import numpy as np
import numpy.typing as npt

from attnspec.reference.inputs import as_real_float64
from attnspec.reference.mpmath_exact import Exact, _as_mpf
from attnspec.reference.rounding import to_float64
from attnspec.reference.softmax import _evaluate

__all__ = ["DEFAULT_DPS", "Exact", "log_softmax", "logsumexp", "sdpa", "softmax", "to_float64"]

ObjArray = npt.NDArray[np.object_]
DEFAULT_DPS = 50


def _check_dps(dps: object) -> int:
    if isinstance(dps, bool) or not isinstance(dps, int | np.integer) or dps < 1:
        raise ValueError(f"dps must be a positive integer (decimal digits), got {dps!r}")
    return int(dps)


def _run(
    kind: str, x: object, axis: object, where: object, keepdims: bool, dps: object
) -> ObjArray:
    with mpmath.workdps(_check_dps(dps)):
        out = _evaluate(kind, x, axis, where, None, keepdims, arith=Exact())
        # Special rows hold float64 values (0, -inf, nan); make every entry an mpf.
        return _as_mpf(out)


def softmax(
    x: npt.ArrayLike,
    axis: int | tuple[int, ...] | None = -1,
    *,
    where: npt.ArrayLike | None = None,
    dps: int = DEFAULT_DPS,
) -> ObjArray:
    """:func:`attnspec.softmax` in mpmath at ``dps`` decimal digits (object array of mpf)."""
    return _run("softmax", x, axis, where, False, dps)


def log_softmax(
    x: npt.ArrayLike,
    axis: int | tuple[int, ...] | None = -1,
    *,
    where: npt.ArrayLike | None = None,
    dps: int = DEFAULT_DPS,
) -> ObjArray:
    """:func:`attnspec.log_softmax` in mpmath at ``dps`` decimal digits."""
    return _run("log_softmax", x, axis, where, False, dps)


def logsumexp(
    x: npt.ArrayLike,
    axis: int | tuple[int, ...] | None = -1,
    *,
    where: npt.ArrayLike | None = None,
    keepdims: bool = False,
    dps: int = DEFAULT_DPS,
) -> ObjArray:
    """:func:`attnspec.logsumexp` in mpmath at ``dps`` decimal digits."""
    return _run("logsumexp", x, axis, where, keepdims, dps)


def sdpa(
    q: npt.ArrayLike,
    k: npt.ArrayLike,
    v: npt.ArrayLike,
    *,
    dps: int = DEFAULT_DPS,
    **options: Any,
) -> Any:
    """:func:`attnspec.sdpa` in mpmath at ``dps`` decimal digits.

    Takes the same keyword arguments as :func:`attnspec.sdpa` (except ``precision``)
    and returns object arrays of mpf: ``out`` or ``(out, lse)``.
    """
    from attnspec.reference.attention import SdpaOptions, evaluate

    opts = SdpaOptions.from_kwargs(options)
    digits = _check_dps(dps) + _logit_digits(q, k, opts)
    with mpmath.workdps(digits):
        res = evaluate(Exact(), q, k, v, opts)
        if opts.return_lse:
            return tuple(_as_mpf(r) for r in res)
        return _as_mpf(res)


def _logit_digits(q: object, k: object, opts: Any) -> int:
    r"""Decimal digits to add to ``dps`` so that the logits keep ``dps`` digits *after*
    the shift by their maximum: the products and sums that form them round relative to
    their magnitude, up to :math:`|\tau| E \max|q| \max|k| + \max|b| + \max|m|(L + S) +
    \max|\sigma|` (finite entries), while the weights depend on their differences. 0 for
    logits below 1; invalid inputs give 0 here and their error from the definition."""
    try:
        q64 = np.abs(as_real_float64(q, "q"))
        k64 = np.abs(as_real_float64(k, "k"))
        if q64.ndim == 0 or k64.ndim == 0:
            return 0
        width = q64.shape[-1]
        tau = abs(opts.scale) if opts.scale is not None else (width**-0.5 if width else 0.0)

        def top(a: Any) -> float:
            a = np.abs(as_real_float64(a, "x")) if a is not None else np.zeros(0)
            finite = a[np.isfinite(a)]
            return float(finite.max()) if finite.size else 0.0

        sides = q64.shape[-2] + k64.shape[-2] if q64.ndim >= 2 and k64.ndim >= 2 else 0
        with np.errstate(over="ignore"):
            mag = (
                tau * width * top(q64) * top(k64)
                + top(opts.bias)
                + top(opts.alibi_slopes) * sides
                + top(opts.sinks)
            )
    except (TypeError, ValueError):
        return 0
    if not math.isfinite(mag):
        return 330  # beyond the float64 range: 10**330 covers every float64 logit
    return max(0, math.ceil(math.log10(mag))) if mag > 1 else 0
