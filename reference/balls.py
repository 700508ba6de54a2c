r"""The definitions' exact arithmetic in ball arithmetic: Arb, through python-flint.

A number is a *ball* :math:`[m \pm r]`: a midpoint and a radius that Arb proves to
contain the exact value of every operation so far (Johansson 2017, "Arb: efficient
arbitrary-precision midpoint-radius interval arithmetic"). Operations run at the
working precision ``flint.ctx.prec`` (bits); the inputs are float64, so every input is
an exact ball (radius 0), and so is every result that is exactly representable at the
working precision (a hidden key's weight of 0, a weight of 1/2).

Arb has no signed infinities: ``arb(inf) + 1`` is the whole real line. The definition
needs the extended reals (a logit of +inf makes a special row, a hidden key's -inf
gives the weight 0), so a number of this arithmetic is a pair :class:`Balls`: the balls
of its finite entries, and the float64 value of the others (+-inf, NaN) with IEEE's
rules for them, which are those of the extended reals wherever the definition meets
them. The definition never depends on more than that: it decides structure (the row
maximum, the special rows) from :meth:`BallArithmetic.approx`.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any, NamedTuple

import flint
import numpy as np
import numpy.typing as npt

from attnspec.reference.arith import Move

__all__ = ["BallArithmetic", "Balls"]

F64 = npt.NDArray[np.float64]
ObjArray = npt.NDArray[np.object_]

_ZERO: Any = flint.arb(0)
_ONE: Any = flint.arb(1)
_MAX = float(np.finfo(np.float64).max)


def _elementwise(f: Callable[[Any], Any]) -> Callable[[Any], ObjArray]:
    ufunc = np.frompyfunc(f, 1, 1)

    def apply(a: Any) -> ObjArray:
        return np.asarray(ufunc(a), dtype=object)

    return apply


_to_arb = _elementwise(flint.arb)
_exp = _elementwise(flint.arb.exp)
_log1p = _elementwise(flint.arb.log1p)
_tanh = _elementwise(flint.arb.tanh)
_mid_float = np.frompyfunc(float, 1, 1)  # float(arb): its midpoint, rounded


def _sign(b: flint.arb) -> float:
    """The sign of a ball's midpoint (0 for an exact zero): what an infinity times it
    gives. (A ball that contains 0 but is not 0 takes its midpoint's sign.)"""
    m = b.mid()
    return 1.0 if m > 0 else (-1.0 if m < 0 else 0.0)


_signs = np.frompyfunc(_sign, 1, 1)

# -- the rational variant: exact rationals (flint.fmpq) for as long as the operations
# keep them rational, balls after that (Python's operators mix the two: fmpq + arb is
# an arb). Used when a result does not decide in balls alone: the result may be a
# rational on a rounding boundary (a tie), which no ball around it decides.
_Q_ZERO: Any = flint.fmpq(0)
_Q_ONE: Any = flint.fmpq(1)


def _q_of_float(x: float) -> Any:
    return flint.fmpq(*float(x).as_integer_ratio())


def _rational_at_zero(f: Callable[[Any], Any], at_zero: Any) -> Callable[[Any], Any]:
    """``f`` (a method of arb) of a rational or a ball: the rational ``at_zero`` for the
    rational 0 (e**0 = 1, log1p(0) = tanh(0) = 0), else the ball."""

    def apply(x: Any) -> Any:
        if isinstance(x, flint.fmpq):
            return at_zero if x == 0 else f(flint.arb(x))
        return f(x)

    return apply


_q_exp = _rational_at_zero(flint.arb.exp, _Q_ONE)
_q_log1p = _rational_at_zero(flint.arb.log1p, _Q_ZERO)
_q_tanh = _rational_at_zero(flint.arb.tanh, _Q_ZERO)


def _q_sign(x: Any) -> float:
    if isinstance(x, flint.fmpq):
        return 1.0 if x > 0 else (-1.0 if x < 0 else 0.0)
    return _sign(x)


def _q_float(x: Any) -> float:
    if isinstance(x, flint.fmpq):
        from attnspec.reference.rounding import nearest_fraction

        return nearest_fraction(int(x.p), int(x.q))
    return float(x)


class Balls(NamedTuple):
    """Numbers of :class:`BallArithmetic`: ``b`` the balls (an object array of
    ``flint.arb``; 0 where the value is not finite), ``s`` the non-finite values
    (float64: +-inf or NaN there, 0 elsewhere), or None when every entry is finite."""

    b: ObjArray
    s: F64 | None


def _obj(b: Any) -> ObjArray:
    """``b`` as an object array (numpy gives a bare scalar for 0-d operands)."""
    return b if isinstance(b, np.ndarray) else np.asarray(b, dtype=object)


def _special(x: Balls) -> F64:
    return np.zeros((1,) * x.b.ndim) if x.s is None else x.s


def _ieee_signs(x: Balls, signs_of: Callable[[Any], Any] = _signs) -> F64:
    """Each entry as IEEE float64 sees it for the rules of infinities: its non-finite
    value, else the sign of its ball (0 for an exact zero)."""
    signs = np.asarray(signs_of(x.b), dtype=np.float64).reshape(x.b.shape)
    return signs if x.s is None else np.where(x.s != 0, x.s, signs)


def _with_special(b: ObjArray, s: F64 | None, zero: Any = _ZERO) -> Balls:
    """``Balls(b, s)`` with the balls zeroed where ``s`` is not finite (and s None if
    every entry is finite)."""
    b = _obj(b)
    if s is None:
        return Balls(b, None)
    off = s != 0
    if not off.any():
        return Balls(b, None)
    b, s = np.broadcast_arrays(b, s)
    return Balls(np.where(off, zero, b), np.array(s))


class BallArithmetic:
    """Arb balls at the working precision ``flint.ctx.prec`` (see the module).

    ``rational=True``: entries are exact rationals (``flint.fmpq``) while every
    operation on them is rational (sums, products, quotients, e**0, log1p(0),
    tanh(0)), and balls from the first that is not; slower (no Arb matrix product
    where a factor holds rationals), and used only where balls alone do not decide.
    """

    name = "exact"
    chunk_elements = 0
    #: Arb's exponents are unbounded: logits beyond the float64 range are held exactly
    overflow = "exact"

    def __init__(self, *, rational: bool = False) -> None:
        self.rational = rational
        e = _elementwise
        self._memo: dict[tuple[Any, ...], Any] = {}
        if rational:
            self._zero, self._one = _Q_ZERO, _Q_ONE
            self._num, self._expf = e(_q_of_float), e(_q_exp)
            self._log1pf = e(_q_log1p)
            self._tanhf = e(lambda x: _numbered_1(x, _q_tanh, self._memo))
            self._signs_of, self._float = (
                np.frompyfunc(_q_sign, 1, 1),
                np.frompyfunc(_q_float, 1, 1),
            )
        else:
            self._zero, self._one = _ZERO, _ONE
            self._num, self._expf, self._log1pf, self._tanhf = _to_arb, _exp, _log1p, _tanh
            self._signs_of, self._float = _signs, _mid_float

    def _op(self, f: Callable[[Any, Any], Any], a: Any, b: Any) -> Any:
        """``f(a, b)`` entry by entry (numpy's broadcasting). In the rational variant each
        result is numbered by its operands (value numbering): the same operation on the
        same numbers gives the same object, and ``x - x`` of one object is an exact 0.
        Equal logits made by irrational steps (a softcap of equal rationals, then the
        same bias) thus shift to exactly 0 and give exactly equal, rational, weights."""
        if not self.rational:
            return f(a, b)
        return _numbered(a, b, f, self._memo)

    def _special(self, b: ObjArray, s: F64 | None) -> Balls:
        return _with_special(b, s, self._zero)

    def _ieee(self, x: Balls) -> F64:
        return _ieee_signs(x, self._signs_of)

    def lift(self, x: F64) -> Balls:
        x = np.asarray(x, dtype=np.float64)
        finite = np.isfinite(x)
        if finite.all():
            return Balls(self._num(x), None)
        return Balls(self._num(np.where(finite, x, 0.0)), np.where(finite, 0.0, x))

    def add(self, a: Balls, b: Balls) -> Balls:
        if a.s is None and b.s is None:
            return Balls(_obj(self._op(operator.add, a.b, b.b)), None)
        with np.errstate(invalid="ignore"):  # inf + -inf is NaN, as in the reals' rules
            return self._special(self._op(operator.add, a.b, b.b), _special(a) + _special(b))

    def sub(self, a: Balls, b: Balls) -> Balls:
        if a.s is None and b.s is None:
            return Balls(_obj(self._op(operator.sub, a.b, b.b)), None)
        with np.errstate(invalid="ignore"):
            return self._special(self._op(operator.sub, a.b, b.b), _special(a) - _special(b))

    def mul(self, a: Balls, b: Balls) -> Balls:
        if a.s is None and b.s is None:
            return Balls(_obj(self._op(operator.mul, a.b, b.b)), None)
        sa, sb = _special(a), _special(b)
        with np.errstate(invalid="ignore"):  # inf * 0 is NaN
            s = np.where((sa != 0) | (sb != 0), self._ieee(a) * self._ieee(b), 0.0)
        return self._special(self._op(operator.mul, a.b, b.b), s)

    def div(self, a: Balls, b: Balls) -> Balls:
        if a.s is None and b.s is None:
            return Balls(_obj(self._op(operator.truediv, a.b, b.b)), None)
        sa, sb = _special(a), _special(b)
        either = (sa != 0) | (sb != 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            ieee = self._ieee(a) / self._ieee(b)
        # finite / inf is 0 (a ball of 0); inf / finite and NaN keep their IEEE value
        s = np.where(either & ~np.isfinite(ieee), ieee, 0.0)
        divisor = np.where(sb != 0, self._one, b.b)
        q = np.where(either, self._zero, self._op(operator.truediv, a.b, divisor))
        return self._special(q, s)

    def log1p(self, a: Balls) -> Balls:
        if a.s is None:
            return Balls(self._log1pf(a.b), None)
        return self._special(self._log1pf(a.b), a.s)  # log1p(inf) = inf, NaN stays

    def softcap(self, s: Balls, c: float) -> Balls:
        cap: Any = self._num(np.asarray(c, dtype=np.float64))[()]
        capped = self._op(operator.mul, cap, self._tanhf(self._op(operator.truediv, s.b, cap)))
        if s.s is None:
            return Balls(_obj(capped), None)
        # c tanh(+-inf / c) = +-c exactly; NaN stays NaN
        limits = np.where(s.s > 0, cap, np.where(s.s < 0, -cap, capped))
        return self._special(limits, np.where(np.isnan(s.s), np.nan, 0.0))

    def matmul(self, a: Balls, b: Balls) -> Balls:
        out = _matmul(a.b, b.b, self._zero, self.rational)
        if a.s is None and b.s is None:
            return Balls(out, None)
        # The non-finite entries by IEEE's rules (inf * 0 is NaN, inf - inf NaN): the
        # product of each entry's IEEE sign stand-in; finite sums of signs stay finite.
        with np.errstate(invalid="ignore"):
            ieee = np.matmul(self._ieee(a), self._ieee(b))
        return self._special(out, np.where(np.isfinite(ieee), 0.0, ieee))

    def take(self, a: Balls, index: npt.NDArray[np.intp]) -> Balls:
        at = index[..., None]
        s = None if a.s is None else np.take_along_axis(a.s, at, axis=-1)
        return Balls(np.take_along_axis(a.b, at, axis=-1), s)

    def select(self, cond: npt.NDArray[np.bool_], a: Balls, b: Balls) -> Balls:
        balls = np.where(cond, a.b, b.b)
        if a.s is None and b.s is None:
            return Balls(balls, None)
        return self._special(balls, np.where(cond, _special(a), _special(b)))

    def rearrange(self, a: Balls, move: Move) -> Balls:
        s = None if a.s is None else move(np.broadcast_to(a.s, a.b.shape))
        return Balls(_obj(move(a.b)), s)

    def approx(self, a: Balls) -> F64:
        """The midpoints rounded to float64, but a finite value beyond the float64 range
        becomes the largest float64 of its sign, not an infinity (as in the mpmath
        arithmetic: a finite logit of 2e308 is neither infinite nor equal to 4e308)."""
        with np.errstate(over="ignore"):
            mid = np.asarray(self._float(a.b), dtype=np.float64).reshape(a.b.shape)
        mid = np.clip(mid, -_MAX, _MAX)
        return mid if a.s is None else np.where(a.s != 0, a.s, mid)

    def sum_others(self, d: Balls, k: npt.NDArray[np.intp]) -> Balls:
        return _sum_others(self._exp(d), k, self._zero)

    def weights(self, d: Balls, k: npt.NDArray[np.intp]) -> tuple[Balls, Balls]:
        e = self._exp(d)
        s = _sum_others(e, k, self._zero)
        return self.div(e, self.add(Balls(np.asarray([self._one], dtype=object), None), s)), s

    def lse(self, a: Balls, d: Balls, k: npt.NDArray[np.intp], s: Balls) -> Balls:
        return self.add(a, self.log1p(s))

    def result(self, a: Balls) -> ObjArray:
        """An object array of ``flint.arb`` balls and, where the value is not finite,
        its float64 value."""
        if a.s is None:
            return a.b
        b, s = np.broadcast_arrays(a.b, a.s)
        return np.where(s != 0, s.astype(object), b)

    def _exp(self, d: Balls) -> Balls:
        e = self._expf(d.b)
        if d.s is None:
            return Balls(e, None)
        # e**-inf = 0 (the ball 0), e**inf = inf, NaN stays
        return self._special(np.where(d.s == -np.inf, self._zero, e), np.where(d.s > 0, d.s, 0.0))


def _sum_others(e: Balls, k: npt.NDArray[np.intp], zero: Any = _ZERO) -> Balls:
    """Each row of ``e`` summed without its entry ``k`` (the last axis kept)."""
    at = k[..., None]
    balls = e.b.copy()
    np.put_along_axis(balls, at, zero, axis=-1)
    total = np.add.reduce(balls, axis=-1, keepdims=True, initial=zero)
    if e.s is None:
        return Balls(np.asarray(total, dtype=object), None)
    s = np.array(e.s, dtype=np.float64)
    np.put_along_axis(s, at, 0.0, axis=-1)
    with np.errstate(invalid="ignore"):
        return _with_special(np.asarray(total, dtype=object), s.sum(axis=-1, keepdims=True), zero)


def _matmul(a: ObjArray, b: ObjArray, zero: Any = _ZERO, rational: bool = False) -> ObjArray:
    """``a @ b`` of object arrays of balls over the last two axes (batch axes broadcast),
    each 2-D product by Arb's matrix multiplication; with ``rational``, by FLINT's exact
    rational one where both factors are rationals, else entry by entry in Python."""
    batch = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    a = np.broadcast_to(a, (*batch, *a.shape[-2:]))
    b = np.broadcast_to(b, (*batch, *b.shape[-2:]))
    m, n, p = a.shape[-2], a.shape[-1], b.shape[-1]
    out = np.empty((*batch, m, p), dtype=object)
    if n == 0:
        out[...] = zero
        return out
    for idx in np.ndindex(*batch):
        if m == 0 or p == 0:
            continue
        if rational:
            x, y = a[idx], b[idx]
            prod: Any
            if _all_rational(x) and _all_rational(y):
                prod = flint.fmpq_mat(x.tolist()) * flint.fmpq_mat(y.tolist())
            else:
                out[idx] = np.matmul(x, y)
                continue
        else:
            prod = flint.arb_mat(a[idx].tolist()) * flint.arb_mat(b[idx].tolist())
        flat = np.empty(m * p, dtype=object)
        flat[:] = prod.entries()
        out[idx] = flat.reshape(m, p)
    return out


def _all_rational(x: ObjArray) -> bool:
    return all(isinstance(e, flint.fmpq) for e in x.flat)


def _key(x: Any) -> tuple[str, Any]:
    """What identifies a number for value numbering: a rational by its value (equal
    rationals are equal numbers), a ball by its identity (one object, one real number)."""
    return ("q", x) if isinstance(x, flint.fmpq) else ("o", id(x))


def _numbered_2(f: Callable[[Any, Any], Any], memo: dict[tuple[Any, ...], Any]) -> Any:
    def apply(a: Any, b: Any) -> Any:
        if f is operator.sub and a is b:
            return _Q_ZERO
        key = (f, _key(a), _key(b))
        hit = memo.get(key)
        if hit is None:
            hit = memo[key] = (f(a, b), a, b)  # the operands kept: their ids stay theirs
        return hit[0]

    return np.frompyfunc(apply, 2, 1)


def _numbered(
    a: Any, b: Any, f: Callable[[Any, Any], Any], memo: dict[tuple[Any, ...], Any]
) -> Any:
    ufunc = memo.get(("ufunc", f))
    if ufunc is None:
        ufunc = memo[("ufunc", f)] = _numbered_2(f, memo)
    return ufunc(a, b)


def _numbered_1(x: Any, f: Callable[[Any], Any], memo: dict[tuple[Any, ...], Any]) -> Any:
    key = (f, _key(x))
    hit = memo.get(key)
    if hit is None:
        hit = memo[key] = (f(x), x)
    return hit[0]
