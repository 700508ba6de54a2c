"""The arithmetics the definition runs in.

The definitions in :mod:`attnspec.reference` are written once, against the small
interface :class:`Arithmetic`; an arithmetic decides how each operation is evaluated:

``fast``
    plain float64 numpy: every operation rounds to float64. The speed path.
``accurate``
    double-double numbers (an unevaluated sum ``hi + lo`` of two float64 values) built
    from error-free transformations, so that the final results round to within one
    ulp of the exact value. See :mod:`attnspec.reference.doubledouble`.
``exact``
    mpmath numbers at a chosen precision: the ground truth. See
    :mod:`attnspec.reference.exact`.

Numbers of an arithmetic are opaque to the definition: it creates them from float64
arrays with :meth:`Arithmetic.lift`, combines them with the operations below, and
turns them into results with :meth:`Arithmetic.result`. Operations broadcast like
numpy; reductions run over the last axis and keep it (length 1).
"""

from __future__ import annotations

from typing import Any, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

__all__ = ["PRECISIONS", "Arithmetic", "Fast", "get_arithmetic"]

F64 = npt.NDArray[np.float64]
T = TypeVar("T")

#: The names accepted by ``precision=``.
PRECISIONS = ("accurate", "fast")


class Arithmetic(Protocol[T]):
    """What a definition may do with numbers; each arithmetic says how."""

    #: the name users pass as ``precision=``
    name: str
    #: rows are evaluated in blocks of about this many elements (0: all at once),
    #: so that an arithmetic with many temporaries can keep them in cache.
    chunk_elements: int

    def lift(self, x: F64) -> T:
        """The float64 values ``x`` as numbers of this arithmetic (exactly)."""
        ...

    def add(self, a: T, b: T) -> T:
        """``a + b``."""
        ...

    def sub(self, a: T, b: T) -> T:
        """``a - b``."""
        ...

    def div(self, a: T, b: T) -> T:
        """``a / b``."""
        ...

    def exp(self, a: T) -> T:
        """``e**a``; ``exp(-inf) = 0``."""
        ...

    def log1p(self, a: T) -> T:
        """``log(1 + a)`` for ``a >= 0``."""
        ...

    def mul(self, a: T, b: T) -> T:
        """``a * b``."""
        ...

    def tanh(self, a: T) -> T:
        """``tanh(a)``."""
        ...

    def matmul(self, a: T, b: T) -> T:
        """``a @ b`` over the last two axes, batch axes broadcast as in numpy."""
        ...

    def take(self, a: T, index: npt.NDArray[np.intp]) -> T:
        """``a[..., index[...]]``, one entry a row, keeping the last axis (length 1)."""
        ...

    def select(self, cond: npt.NDArray[np.bool_], a: T, b: T) -> T:
        """``a`` where ``cond`` is True, else ``b`` (broadcasting like np.where)."""
        ...

    def approx(self, a: T) -> F64:
        """``a`` rounded to float64 (to choose a maximum, to find special values)."""
        ...

    def sum_except(self, a: T, skip: npt.NDArray[np.intp]) -> T:
        """Sum over the last axis leaving out ``a[..., skip[...]]`` (one entry a row).

        ``skip`` has the shape of ``a`` without its last axis; the result keeps the
        last axis with length 1.
        """
        ...

    def result(self, a: T) -> Any:
        """The numbers ``a`` as results: float64 (rounded) or the arithmetic's own."""
        ...


class Fast:
    """Plain float64: each operation is numpy's, rounded to float64.

    Every operation returns a new array: no operand is ever written, so no input can
    be. (Reusing temporaries by reference count was measured at about 10% on sdpa and
    dropped: it depends on CPython's reference counting, which newer Pythons change,
    and a miscount would overwrite a value the definition still needs.)
    """

    name = "fast"
    chunk_elements = 0

    def lift(self, x: F64) -> F64:
        return x

    def add(self, a: F64, b: F64) -> F64:
        # inf + (-inf) = NaN is the IEEE answer; where it arises the key is hidden
        # (a bias of -inf) or the row is NaN by the definition's rules: no warning.
        with np.errstate(invalid="ignore"):
            return np.add(a, b)

    def sub(self, a: F64, b: F64) -> F64:
        # x - max overflows to -inf for x = -1e308, max = 1e308: the correctly
        # rounded result, and exp(-inf) = 0 is the right weight. No warning.
        with np.errstate(over="ignore"):
            return np.subtract(a, b)

    def div(self, a: F64, b: F64) -> F64:
        return np.divide(a, b)

    def exp(self, a: F64) -> F64:
        return np.exp(a)

    def log1p(self, a: F64) -> F64:
        return np.log1p(a)

    def mul(self, a: F64, b: F64) -> F64:
        # inf * 0 = NaN is the IEEE answer the definition relies on (a NaN logit at a
        # visible key makes its row NaN; at a hidden key it is discarded): no warning.
        with np.errstate(invalid="ignore", over="ignore"):
            return np.multiply(a, b)

    def tanh(self, a: F64) -> F64:
        return np.tanh(a)

    def matmul(self, a: F64, b: F64) -> F64:
        # Non-finite inputs give NaN or inf entries (inf - inf, inf * 0): the IEEE
        # answers, which the definition handles; overflow to inf likewise.
        with np.errstate(invalid="ignore", over="ignore"):
            return np.matmul(a, b)

    def take(self, a: F64, index: npt.NDArray[np.intp]) -> F64:
        return np.take_along_axis(a, index[..., None], axis=-1)

    def select(self, cond: npt.NDArray[np.bool_], a: F64, b: F64) -> F64:
        return np.where(cond, a, b)

    def approx(self, a: F64) -> F64:
        return a

    def sum_except(self, a: F64, skip: npt.NDArray[np.intp]) -> F64:
        total = np.sum(a, axis=-1, keepdims=True)
        left_out = np.take_along_axis(a, skip[..., None], axis=-1)
        return total - left_out

    def result(self, a: F64) -> F64:
        return a


def get_arithmetic(precision: object) -> Arithmetic[Any]:
    """The arithmetic named by ``precision`` ("accurate" or "fast")."""
    if precision == "fast":
        return Fast()
    if precision == "accurate":
        from attnspec.reference.doubledouble import DoubleDouble

        return DoubleDouble()
    raise ValueError(
        f"precision must be one of {PRECISIONS!r}, got {precision!r}; "
        "for arbitrary precision use attnspec.exact"
    )
