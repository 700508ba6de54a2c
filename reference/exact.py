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
from collections.abc import Callable
from typing import Any

import mpmath
import numpy as np
import numpy.typing as npt

from attnspec.reference.inputs import as_real_float64
from attnspec.reference.softmax import _evaluate

__all__ = ["DEFAULT_DPS", "Exact", "log_softmax", "logsumexp", "sdpa", "softmax", "to_float64"]

ObjArray = npt.NDArray[np.object_]
DEFAULT_DPS = 50


def _elementwise(f: Callable[[Any], Any]) -> Callable[[Any], ObjArray]:
    ufunc: Callable[[Any], ObjArray] = np.frompyfunc(f, 1, 1)
    return ufunc


_to_mpf = _elementwise(mpmath.mpf)
_exp = _elementwise(mpmath.exp)
_log1p = _elementwise(mpmath.log1p)
_tanh = _elementwise(mpmath.tanh)
_to_float = np.frompyfunc(float, 1, 1)


def _as_mpf(a: object) -> ObjArray:
    """Every entry as an mpf (exact for float64 entries), as an object array."""
    # NaN converts to mpf('nan') exactly; numpy's object loop still reports it as an
    # invalid value, which would be an error under warnings-as-errors.
    with np.errstate(invalid="ignore"):
        return np.asarray(_to_mpf(np.asarray(a, dtype=object)), dtype=object)


class Exact:
    """mpmath numbers at the precision of the enclosing ``mpmath.workdps``."""

    name = "exact"
    chunk_elements = 0
    #: mpmath's exponents are unbounded: logits beyond the float64 range are held exactly
    overflow = "exact"

    def lift(self, x: npt.NDArray[np.float64]) -> ObjArray:
        return _as_mpf(x)

    def add(self, a: ObjArray, b: ObjArray) -> ObjArray:
        return a + b

    def sub(self, a: ObjArray, b: ObjArray) -> ObjArray:
        return a - b

    def div(self, a: ObjArray, b: ObjArray) -> ObjArray:
        return a / b

    def log1p(self, a: ObjArray) -> ObjArray:
        return np.asarray(_log1p(a), dtype=object)

    def mul(self, a: ObjArray, b: ObjArray) -> ObjArray:
        return a * b

    def softcap(self, s: ObjArray, c: float) -> ObjArray:
        cap = _as_mpf(np.asarray(c, dtype=np.float64))
        return cap * np.asarray(_tanh(s / cap), dtype=object)

    def matmul(self, a: ObjArray, b: ObjArray) -> ObjArray:
        # Each entry an exact sum of exact products, rounded once (mpmath.fdot).
        a, b = np.asarray(a, dtype=object), np.asarray(b, dtype=object)
        batch = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        a = np.broadcast_to(a, (*batch, *a.shape[-2:]))
        b = np.broadcast_to(b, (*batch, *b.shape[-2:]))
        out = np.empty((*batch, a.shape[-2], b.shape[-1]), dtype=object)
        for idx in np.ndindex(*batch, a.shape[-2], b.shape[-1]):
            *bi, i, j = idx
            row = a[(*bi, i)]
            col = b[(*bi, slice(None), j)]
            out[idx] = mpmath.fdot(row, col) if len(row) else mpmath.mpf(0)
        return out

    def take(self, a: ObjArray, index: npt.NDArray[np.intp]) -> ObjArray:
        return np.take_along_axis(a, index[..., None], axis=-1)

    def select(self, cond: npt.NDArray[np.bool_], a: ObjArray, b: ObjArray) -> ObjArray:
        return np.where(cond, a, b)

    def approx(self, a: ObjArray) -> npt.NDArray[np.float64]:
        """``a`` rounded to float64, but a finite value beyond the float64 range becomes
        the largest float64 of its sign, not an infinity: the definition decides from
        ``approx`` which rows are special (an infinite logit) and which entry is the
        maximum, and a finite logit of 2e308 is neither infinite nor equal to 4e308. (The
        maximum chosen among such values may not be the largest; the exact shift then
        leaves a positive d_j, which mpmath's exponent range holds: the weights stay exact.)
        """
        rounded = to_float64(a)
        over = np.isinf(rounded)
        if over.any():
            finite = np.asarray(np.frompyfunc(mpmath.isfinite, 1, 1)(a), dtype=bool)
            big = float(np.finfo(np.float64).max)
            rounded = np.where(over & finite, np.copysign(big, rounded), rounded)
        return rounded

    def sum_others(self, d: ObjArray, k: npt.NDArray[np.intp]) -> ObjArray:
        return _sum_others(np.asarray(_exp(d), dtype=object), k)

    def weights(self, d: ObjArray, k: npt.NDArray[np.intp]) -> tuple[ObjArray, ObjArray]:
        e = np.asarray(_exp(d), dtype=object)
        s = _sum_others(e, k)
        return e / (1 + s), s

    def lse(self, a: ObjArray, d: ObjArray, k: npt.NDArray[np.intp], s: ObjArray) -> ObjArray:
        return a + np.asarray(_log1p(s), dtype=object)

    def result(self, a: ObjArray) -> ObjArray:
        return a


def _sum_others(e: ObjArray, k: npt.NDArray[np.intp]) -> ObjArray:
    """Each row of ``e`` summed without its entry ``k``: exactly, rounded once (fsum)."""
    kept = e.copy()
    np.put_along_axis(kept, k[..., None], mpmath.mpf(0), axis=-1)
    sums = [mpmath.fsum(row) for row in kept.reshape(-1, kept.shape[-1])]
    return np.array(sums, dtype=object).reshape((*kept.shape[:-1], 1))


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


def to_float64(a: object) -> npt.NDArray[np.float64]:
    """Round an array of mpmath numbers to float64 (round to nearest)."""
    arr = np.asarray(a, dtype=object)
    # Values beyond the float64 range round to +-inf, correctly, and mpf('nan') to
    # NaN: numpy's object loop reports both, so silence it here only.
    with np.errstate(over="ignore", invalid="ignore"):
        return np.asarray(_to_float(arr), dtype=np.float64).reshape(arr.shape)
