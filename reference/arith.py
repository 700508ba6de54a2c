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

from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

__all__ = ["PRECISIONS", "Arithmetic", "Fast", "Move", "get_arithmetic"]

F64 = npt.NDArray[np.float64]
T = TypeVar("T")
#: a change of layout of an array's axes (see :meth:`Arithmetic.rearrange`)
Move = Callable[[npt.NDArray[Any]], npt.NDArray[Any]]

#: The names accepted by ``precision=``.
PRECISIONS = ("accurate", "fast")


class Arithmetic(Protocol[T]):
    """What a definition may do with numbers; each arithmetic says how."""

    #: the name users pass as ``precision=``
    name: str
    #: rows are evaluated in blocks of about this many elements (0: all at once),
    #: so that an arithmetic with many temporaries can keep them in cache.
    chunk_elements: int
    #: what a logit beyond the float64 range from finite inputs becomes: "ieee" (the
    #: float64 overflow to +-inf, plain float64's answer), "refuse" (a ValueError: the
    #: arithmetic would order such logits by their roundings), "exact" (it holds them)
    overflow: str

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

    def log1p(self, a: T) -> T:
        """``log(1 + a)`` for ``a >= 0``."""
        ...

    def mul(self, a: T, b: T) -> T:
        """``a * b``."""
        ...

    def softcap(self, s: T, c: float) -> T:
        r""":math:`c \tanh(s / c)` for a cap :math:`c > 0`: :math:`\pm c` for
        :math:`s = \pm\infty`, NaN for NaN."""
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

    def rearrange(self, a: T, move: Move) -> T:
        """The same numbers in another layout: ``move`` (a reshape, transpose, slice or
        broadcast of the axes, the same for every float64 array) applied to ``a``; the
        backward pass transposes and sums over axes with it (a sum is a product with ones)."""
        ...

    # -- the three steps of the softmax of a shifted row (reference/softmax.py) ------
    # Rows lie along the last axis; ``d`` holds d_j = x_j - a (so d_k = 0 at the
    # maximum k, and d_j <= 0), ``k`` the position of the maximum in each row (the shape
    # of ``d`` without its last axis). Results that reduce a row keep the last axis
    # with length 1.

    def sum_others(self, d: T, k: npt.NDArray[np.intp]) -> T:
        r"""The sum of the other terms, :math:`s' = \sum_{j \ne k} e^{d_j}`."""
        ...

    def weights(self, d: T, k: npt.NDArray[np.intp]) -> tuple[T, T]:
        r"""The weights :math:`p_j = e^{d_j} / (1 + s')` of each row, and :math:`s'`."""
        ...

    def lse(self, a: T, d: T, k: npt.NDArray[np.intp], s: T) -> T:
        r"""The log-sum-exp of each row from its maximum and the sum of the others:
        :math:`a + \log(1 + s')`, with :math:`s'` as returned by :meth:`sum_others`
        (or :meth:`weights`) for ``d``.

        The value is a function of ``a`` and ``d`` alone (:math:`\log \sum_j
        e^{a + d_j}`); ``s`` is passed so that it need not be computed twice, and ``d``
        and ``k`` so that an arithmetic can go back to the row where :math:`a` and
        :math:`\log(1 + s')` cancel.
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
    overflow = "ieee"

    def lift(self, x: F64) -> F64:
        return x

    def add(self, a: F64, b: F64) -> F64:
        # inf + (-inf) = NaN is the IEEE answer; where it arises the key is hidden
        # (a bias of -inf) or the row is NaN by the definition's rules. A logit beyond
        # the float64 range (tau q.k = 1e308 plus a bias of 1e308) overflows to +-inf:
        # plain float64's answer, which precision="fast" returns (docs/reliability.md).
        # No warning.
        with np.errstate(invalid="ignore", over="ignore"):
            return np.add(a, b)

    def sub(self, a: F64, b: F64) -> F64:
        # x - max overflows to -inf for x = -1e308, max = 1e308: the correctly
        # rounded result, and exp(-inf) = 0 is the right weight. An ALiBi term that
        # overflowed (slope 1e308 times distance 2 = inf) taken from a logit that did
        # too (+inf) gives inf - inf = NaN, the IEEE answer: the row is NaN by the
        # definition's rules. No warning.
        with np.errstate(over="ignore", invalid="ignore"):
            return np.subtract(a, b)

    def div(self, a: F64, b: F64) -> F64:
        return np.divide(a, b)

    def log1p(self, a: F64) -> F64:
        return np.log1p(a)

    def mul(self, a: F64, b: F64) -> F64:
        # inf * 0 = NaN is the IEEE answer the definition relies on (a NaN logit at a
        # visible key makes its row NaN; at a hidden key it is discarded): no warning.
        with np.errstate(invalid="ignore", over="ignore"):
            return np.multiply(a, b)

    def softcap(self, s: F64, c: float) -> F64:
        # s / c overflows to inf for |s| near 1e308 and a small cap (then tanh gives the
        # limit, 1); inf / c and tanh(inf) are the IEEE answers. No warning.
        with np.errstate(over="ignore", invalid="ignore", under="ignore"):
            cap = np.asarray(c, dtype=np.float64)
            return np.multiply(cap, np.tanh(np.divide(s, cap)))

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

    def rearrange(self, a: F64, move: Move) -> F64:
        return move(a)

    def sum_others(self, d: F64, k: npt.NDArray[np.intp]) -> F64:
        return _sum_others(np.exp(d), k)

    def weights(self, d: F64, k: npt.NDArray[np.intp]) -> tuple[F64, F64]:
        e = np.exp(d)  # a new array: dividing it in place writes no operand
        s = _sum_others(e, k)
        return np.divide(e, 1.0 + s, out=e), s

    def lse(self, a: F64, d: F64, k: npt.NDArray[np.intp], s: F64) -> F64:
        return a + np.log1p(s)

    def result(self, a: F64) -> F64:
        return a


def _sum_others(e: F64, k: npt.NDArray[np.intp]) -> F64:
    """The sum of each row of ``e`` without its entry ``k``: the entry is set to 0, the
    row summed, and the entry put back, so that a sum far below the left-out term
    (e^{d_k} = 1) keeps its relative accuracy (``total - 1`` would lose it:
    fl(1 + 4e-18) - 1 = 0). ``e`` must be the caller's own array (it is written, then
    restored): no copy of the whole block is made."""
    at = k[..., None]
    left_out = np.take_along_axis(e, at, axis=-1)
    np.put_along_axis(e, at, 0.0, axis=-1)
    s = np.sum(e, axis=-1, keepdims=True)
    np.put_along_axis(e, at, left_out, axis=-1)
    return s


def get_arithmetic(precision: object) -> Arithmetic[Any]:
    """The arithmetic named by ``precision`` ("accurate" or "fast")."""
    if not isinstance(precision, str):
        raise TypeError(
            f"precision must be one of {PRECISIONS!r}, got {type(precision).__name__} "
            f"{precision!r}; for arbitrary precision use attnspec.exact"
        )
    if precision == "fast":
        return Fast()
    if precision == "accurate":
        from attnspec.reference.doubledouble import DoubleDouble

        return DoubleDouble()
    raise ValueError(
        f"precision must be one of {PRECISIONS!r}, got {precision!r}; "
        "for arbitrary precision use attnspec.exact"
    )
