"""The definitions' exact arithmetic in mpmath: numbers at the precision of the enclosing
``mpmath.workdps``. Used by :mod:`attnspec.reference.exact`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mpmath
import numpy as np
import numpy.typing as npt

from attnspec.reference.arith import Move
from attnspec.reference.rounding import to_float64

__all__ = ["Exact"]

ObjArray = npt.NDArray[np.object_]


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

    def rearrange(self, a: ObjArray, move: Move) -> ObjArray:
        return move(np.asarray(a, dtype=object))

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
