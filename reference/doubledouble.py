r"""Double-double arithmetic: the ``accurate`` precision.

A number is an unevaluated sum :math:`\hat a = a_{hi} + a_{lo}` of two float64 values
(:class:`DD`); ``lo`` may be ``None`` for a value that is an exact float64, so that
:meth:`DoubleDouble.lift` costs nothing. Everything is built from error-free
transformations in plain float64 numpy (numpy has no fused multiply-add):

TwoSum (Knuth; Ogita, Rump & Oishi 2005, Alg. 3.1)
    :math:`s = \mathrm{fl}(a+b)` and :math:`e = (a - (s - b')) + (b - b')`,
    :math:`b' = s - a`, give :math:`a + b = s + e` exactly, unless :math:`s` overflows.
Fast2Sum (Dekker 1971)
    for :math:`|a| \ge |b|`, :math:`e = (a - s) + b` gives the same in three operations.
TwoProduct (Dekker 1971, with Veltkamp's splitting)
    :math:`a = a_1 + a_2` with 26-bit halves (:math:`c = (2^{27}+1)a`,
    :math:`a_1 = c - (c - a)`), and
    :math:`e = ((a_1 b_1 - p) + a_1 b_2 + a_2 b_1) + a_2 b_2` gives :math:`ab = p + e`
    exactly for :math:`p = \mathrm{fl}(ab)`, when no partial product underflows and
    :math:`|a|, |b| < 2^{995}`.

With :math:`u = 2^{-53}` the operations used on whole rows have these errors (relative
to the exact result of the operation on the double-double operands):

* the shift :math:`d = x - a` is exact (TwoSum); where it overflows (:math:`\pm 10^{308}`)
  ``hi`` is :math:`-\infty`, the correctly rounded value, and ``lo`` is set to 0;
* ``exp`` (:func:`exp_rows`): :math:`\le 2^{-62.3}` (derivation at the function);
* ``sum_except`` (:func:`extract_sum`): nonnegative terms, :math:`\le 2^{2M+2}n^2u^3 + nu^2`
  with :math:`2^M \ge 2(n+2)` (:math:`2^{-86}` at :math:`n = 10^5`);
* ``div`` by a per-row divisor: :math:`\le 2^{-100}` for the reciprocal, then an exact
  product of ``exp``'s 26-bit high part with a 26-bit part of the reciprocal and two
  cross terms (:math:`\le 2^{-77}`; TwoProduct, :math:`\le 3u^2`, for other operands);
* ``log1p`` of a per-row sum (:meth:`DoubleDouble.log1p`): :math:`\le 2^{-88}`;
* ``add``/``sub`` of two double-doubles: :math:`\le 4u^2(|a| + |b|)`.

A double-double with relative error :math:`\delta` rounds (:meth:`DoubleDouble.result`,
one IEEE addition :math:`\mathrm{fl}(hi + lo)`, which is correctly rounded) to within
:math:`1/2 + 2^{53}\delta` ulp. For softmax and log_softmax the errors above add up to
:math:`\delta < 2^{-62}`, so every normal result is within :math:`0.51` ulp of the exact
value. Below :math:`2^{-969}` a double-double cannot hold its low part (it would be
subnormal): there ``exp`` rounds each part to the subnormal grid, and the operations
that need more recompute at scale :math:`2^{600}` (the product in ``div``, the terms of
``sum_except``), so that a subnormal softmax carries the rounding of :math:`e^{d_j}`
(half a subnormal ulp, divided by :math:`1+s'`) and the final rounding: below 1 ulp.
Such a weight is still off by up to :math:`2^{-1074}` absolute (0 below :math:`2^{-1075}`),
which a large value multiplies: so where some :math:`d_j < -669`, :meth:`DoubleDouble.weights`
returns :class:`Weights`, the same numbers carrying those entries at scale :math:`2^{600}` or
:math:`2^{1200}` as well (:class:`Tiny`), and :meth:`DoubleDouble.matmul` evaluates at scale
the rows where they matter: attention's output keeps its relative bound for every weight
that can matter (:math:`p_{ij}|v_{jk}| \ge 2^{-1075}`, :math:`d_j > -1455`).

Performance: rows are evaluated in blocks (``chunk_elements``) whose temporaries come
from a :class:`Scratch` pool, so that the dozen arrays alive per block are reused rather
than allocated (fresh allocations of a few hundred KiB cost page faults).

logsumexp :math:`a + \log(1+s')` can cancel when :math:`a < 0` (its value near 0):
its absolute error is that of :math:`\log(1+s')`, about :math:`2^{-62.5}\min(1, s')`,
which is not small compared with a result near 0. Rows where
:math:`|\mathrm{LSE}| < 2^{-6}\, s'/(1+s')` are therefore recomputed from their inputs in
mpmath at a working precision raised until the float64 rounding is settled (Ziv's
strategy); other rows keep the double-double value, within 0.6 ulp. Such rows are rare
(logsumexp of log-probabilities is one source) and cost microseconds per element. The
recomputation starts from the values the operation :meth:`DoubleDouble.lse` is given, the
maximum :math:`a` and the shifted row :math:`d` (exact for the softmax family's float64
inputs; for attention's logits, double-doubles that carry their own error).

No operation looks at how its operands were made: the softmax steps that need to know
more than one value (the terms of a sum near the underflow threshold, the 26-bit high
parts of ``exp`` that make the division cheap) are single operations of the arithmetic,
:meth:`DoubleDouble.weights`, :meth:`DoubleDouble.sum_others` and :meth:`DoubleDouble.lse`.

References
----------
.. [1] T. J. Dekker, "A floating-point technique for extending the available
   precision", Numer. Math. 18 (1971) 224-242. doi:10.1007/BF01397083
.. [2] T. Ogita, S. M. Rump, S. Oishi, "Accurate sum and dot product", SIAM J. Sci.
   Comput. 26(6) (2005) 1955-1988. doi:10.1137/030601818
.. [3] S. M. Rump, T. Ogita, S. Oishi, "Accurate floating-point summation part I:
   faithful rounding", SIAM J. Sci. Comput. 31(1) (2008) 189-224.
   doi:10.1137/050645671
.. [4] P. Blanchard, D. J. Higham, N. J. Higham, "Accurately computing the log-sum-exp
   and softmax functions", IMA J. Numer. Anal. 41(4) (2021) 2311-2330.
   doi:10.1093/imanum/draa038
.. [5] P. T. P. Tang, "Table-driven implementation of the exponential function in IEEE
   floating-point arithmetic", ACM TOMS 15(2) (1989) 144-157. doi:10.1145/63522.214389
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import mpmath
import numpy as np
import numpy.typing as npt

from attnspec.reference.arith import Move
from attnspec.reference.eft import SPLITTER as _SPLITTER
from attnspec.reference.eft import fast_two_sum, split, two_prod, two_sum

__all__ = [
    "DD",
    "DoubleDouble",
    "dd_add",
    "dd_mul",
    "exp_rows",
    "expm1_precise",
    "extract_sum",
]

F64 = npt.NDArray[np.float64]


class DD(NamedTuple):
    """A double-double number array: the exact value is ``hi + lo``.

    ``lo`` is None when ``hi`` is exact (a float64 value, as :meth:`DoubleDouble.lift`
    makes it). Nothing else is recorded: an operation sees the value, never how it
    was made.
    """

    hi: F64
    lo: F64 | None = None


class Tiny(NamedTuple):
    r"""The weights below the double-double range, at scale: what :class:`Weights` carries.

    ``where`` marks the entries :math:`j` with a finite :math:`d_j < -669`
    (:math:`e^{d_j} < 2^{-965}`), where ``hi + lo`` of the weights cannot hold
    :math:`p_j` to relative precision (``lo`` subnormal; below :math:`2^{-1022}` ``hi``
    too; below :math:`2^{-1075}` 0). There ``hi + lo`` of this tuple is the same number
    :math:`p_j` times :math:`2^{600}`, or times :math:`2^{1200}` where ``deep``
    (:math:`d_j < -1040`), within :math:`2^{-62}` of it; 0 elsewhere. All four arrays
    have the shape of the weights' ``hi``.
    """

    where: npt.NDArray[np.bool_]
    deep: npt.NDArray[np.bool_]
    hi: F64
    lo: F64


class Weights(DD):
    r"""Softmax weights (a :class:`DD`, the same numbers bit for bit) with :attr:`tiny`:
    the weights below the double-double range at scale (:class:`Tiny`), for
    :meth:`DoubleDouble.matmul`.

    Only :meth:`DoubleDouble.weights` makes them, and only where some :math:`d_j < -669`;
    :attr:`tiny` is evaluated when first asked for (the softmax family never asks).
    :meth:`DoubleDouble.mul` and :meth:`DoubleDouble.div` by a number of moderate size
    (the dropout factors) and :meth:`DoubleDouble.select` carry it along; every other
    operation gives a plain :class:`DD`, and so do those where they cannot
    (:func:`_tiny_times`): then the product sees the weights as they are, each within
    :math:`2^{-1074}` absolute.
    """

    _maker: Callable[[], Tiny | None]
    _tiny: Tiny | None

    @classmethod
    def of(cls, x: DD, tiny: Tiny | Callable[[], Tiny | None] | None) -> DD:
        """``x`` with ``tiny`` (or the function that makes it) attached; ``x`` itself for
        None."""
        if tiny is None:
            return x
        out = cls(x.hi, x.lo)
        if callable(tiny):
            out._maker = tiny
        else:
            out._tiny = tiny
        return out

    @property
    def tiny(self) -> Tiny | None:
        """The scaled weights, or None where no entry has one."""
        if "_tiny" not in self.__dict__:
            self._tiny = self._maker()
            del self._maker
        return self._tiny


def _tiny_of(x: DD) -> Tiny | None:
    return x.tiny if isinstance(x, Weights) else None


# ---------------------------------------------------------------------------
# Error-free transformations (attnspec.reference.eft) on scratch arrays
# ---------------------------------------------------------------------------


def _two_sum_lean(a: F64, b: F64 | float, scratch: Scratch) -> tuple[F64, F64]:
    """:func:`~attnspec.reference.eft.two_sum`, the same operations in the same order,
    with one scratch temporary and the result arrays only."""
    shape = a.shape if np.shape(b) == a.shape else np.broadcast_shapes(a.shape, np.shape(b))
    s = np.add(a, b, out=scratch.fresh(shape))
    bb = np.subtract(s, a, out=scratch.get("twosum.bb", shape))
    e = np.subtract(s, bb, out=scratch.fresh(shape))
    np.subtract(a, e, out=e)
    np.subtract(b, bb, out=bb)
    e += bb
    return s, e


def _lo(x: DD) -> F64 | float:
    return 0.0 if x.lo is None else x.lo


def dd_add(a: DD, b: DD) -> DD:
    r"""Double-double addition; both parts are added by TwoSum ("accurate" addition).

    Exact (one TwoSum) when both operands are exact float64 values. Otherwise the high
    parts and the low parts are each added by TwoSum and the pieces renormalized by
    Fast2Sum; the error, from two roundings of terms of size :math:`u|a+b|` and of the
    low parts' error term, is at most about :math:`4u^2|a + b| + 2u^2(|a_{lo}| + |b_{lo}|)`
    (Dekker 1971's add2 with a second TwoSum), so cancelling high parts cost no relative
    accuracy (used per row, in ``log1p``). An infinite ``hi`` (-inf inputs, or an
    overflowing sum) gives ``lo = 0``.
    """
    # inf - inf in the error terms of an infinite sum (-inf entries, or x - a
    # overflowing at +-1e308) is NaN: such entries are repaired by _repair.
    with np.errstate(invalid="ignore", over="ignore"):
        s, e = two_sum(a.hi, b.hi)
        if a.lo is None and b.lo is None:
            return DD(*_repair(s, e, a, b))
        t, f = two_sum(np.asarray(_lo(a), dtype=np.float64), np.asarray(_lo(b), np.float64))
        e += t
        s, e = fast_two_sum(s, e)
        e += f
        hi, lo = fast_two_sum(s, e)
    return DD(*_repair(hi, lo, a, b))


def _repair(hi: F64, lo: F64, a: DD, b: DD) -> tuple[F64, F64]:
    """Where the error terms came out NaN (an infinite sum), ``hi = a + b`` and ``lo = 0``.

    One reduction decides whether there is anything to repair (inputs hold no NaN: the
    definition has replaced NaN rows before any arithmetic).
    """
    if not np.isnan(np.add.reduce(lo, axis=None)):
        return hi, lo
    bad = np.isnan(lo)
    with np.errstate(invalid="ignore", over="ignore"):  # the same infinite sums again
        plain = np.broadcast_to(a.hi + b.hi, bad.shape)
    hi = np.where(bad, plain, hi)
    lo = np.where(bad, 0.0, lo)
    return hi, lo


def dd_add_sloppy(a: DD, b: DD, scratch: Scratch | None = None) -> DD:
    r"""Double-double addition with one TwoSum: :math:`(s, e) = \mathrm{TwoSum}(a_{hi}, b_{hi})`,
    ``lo`` :math:`= e + a_{lo} + b_{lo}` (not renormalized: :math:`|lo| \le 3u|hi|`).

    Error at most :math:`4u^2(|a| + |b|)` (two roundings of the low parts); relative to
    the result that is :math:`4u^2` when the operands have one sign (``d - log(1+s')``,
    ``1 + s'``), and exact when both operands are float64 values.
    """
    # inf - inf in the error term of an infinite sum (-inf entries, or x - a
    # overflowing at +-1e308) is NaN: such entries are repaired by _repair.
    with np.errstate(invalid="ignore", over="ignore"):
        if scratch is None:
            s, e = two_sum(a.hi, b.hi)
        else:
            s, e = _two_sum_lean(a.hi, b.hi, scratch)
    if a.lo is not None:
        e += a.lo
    if b.lo is not None:
        e += b.lo
    return DD(*_repair(s, e, a, b))


def _neg(a: DD) -> DD:
    return DD(-a.hi, None if a.lo is None else -a.lo)


def dd_mul(a: DD, b: DD) -> DD:
    r"""Double-double product: :math:`p + e + a_{hi}b_{lo} + a_{lo}b_{hi}`, renormalized.

    Relative error at most about :math:`5u^2` (the dropped :math:`a_{lo}b_{lo}` and three
    roundings of terms of size :math:`u`), within the range of :func:`two_product`.
    """
    p, e = two_prod(a.hi, b.hi)
    lo = e + (a.hi * _lo(b) + _lo(a) * b.hi)
    hi, lo = fast_two_sum(p, lo)
    return DD(hi, lo)


# ---------------------------------------------------------------------------
# The exponential
# ---------------------------------------------------------------------------


def _parts(c: Any, bits: int) -> tuple[float, ...]:
    """``c`` as float64 parts; every part but the last has ``bits`` significant bits."""
    out: list[float] = []
    rest = mpmath.mpf(c)
    while len(out) < 3:
        if rest == 0:
            out.append(0.0)
            continue
        e = int(mpmath.floor(mpmath.log(abs(rest), 2)))
        q = mpmath.nint(rest * mpmath.mpf(2) ** (bits - 1 - e)) * mpmath.mpf(2) ** (e - bits + 1)
        part = float(q) if len(out) < 2 else float(rest)
        out.append(part)
        rest -= mpmath.mpf(part)
    return tuple(out)


with mpmath.workdps(60):
    # ln2/1024 in parts of 32 significant bits: N * C1 and N * C2 are exact for
    # |N| < 2**21 (every reduction here has |N| <= 746 * 1024 / ln 2 < 2**20.1).
    _C1, _C2, _C3 = _parts(mpmath.ln(2) / 1024, 32)
    # C2_ROUNDED: ln2/1024 - C1 rounded to float64 (the bulk exponential's second part).
    _C2_ROUNDED = float(mpmath.ln(2) / 1024 - mpmath.mpf(_C1))
    _INV_C = float(1024 / mpmath.ln(2))
    # 2**(j/1024) = TH[j] + TL[j] to about 2**-107 relative (mpmath at 60 digits).
    _T = [mpmath.mpf(2) ** (mpmath.mpf(j) / 1024) for j in range(1024)]
    _TH = np.array([float(t) for t in _T])
    _TL = np.array([float(t - mpmath.mpf(float(t))) for t in _T])
    # 1/k! as double-doubles, k = 0..12, for the precise expm1 series.
    _FACT_HI = [float(1 / mpmath.factorial(k)) for k in range(13)]
    _FACT_LO = [float(1 / mpmath.factorial(k) - mpmath.mpf(f)) for k, f in enumerate(_FACT_HI)]
    # 600 ln 2 as a double-double (to about 2**-97 absolute): d + 600 ln 2 moves e**d by 2**600.
    _SHIFT_HI = float(600 * mpmath.ln(2))
    _SHIFT_LO = float(600 * mpmath.ln(2) - mpmath.mpf(_SHIFT_HI))
del _T

# The bulk exponential's polynomial: expm1(r) = r + r^2 (1/2 + r/6 + r^2/24 + r^3/120) + O(r^6).
_P5, _P4, _P3 = 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0
# e**x rounds to 0 below this (e**-745.2 < 2**-1075): every input below is treated alike.
_EXP_MIN = -746.0
_EXP_MAX = 710.0  # e**710 overflows float64
_LN2 = 0.6931471805599453


def exp_rows(
    hi: F64, lo: F64 | None, scratch: Scratch | None = None, lift: int = 0
) -> tuple[F64, F64]:
    r"""``exp(hi + lo)`` (times :math:`2^{lift}`) as a double-double, relative error below
    :math:`2^{-62.3}`.

    The high part is returned split to 26 significant bits (Veltkamp; the rest joins
    the low part, :math:`|lo| \le 2^{-25}hi`), so that :meth:`DoubleDouble.div` can
    multiply it exactly. ``lift > 0`` returns :math:`2^{lift} e^{h+\ell}` with arguments down to
    :math:`-746 - lift \ln 2` kept, so that terms below the underflow threshold can be
    summed without rounding each to the subnormal grid (see ``sum_except``).

    Tang's table-driven reduction [5]: :math:`N = \mathrm{rint}(h \cdot 1024/\ln 2)`,
    :math:`N = 1024m + j` with :math:`0 \le j < 1024`, :math:`r = h - N C + \ell` where
    :math:`C = \ln 2 / 1024 = C_1 + C_2`, and

    .. math::

        e^{h+\ell} = 2^m \, 2^{j/1024} \, e^{r}, \qquad |r| \le \tfrac{\ln 2}{2048}
        + |\ell| < 2^{-11.4}.

    :math:`h - N C_1` is exact (:math:`C_1` has 32 bits, :math:`|N| < 2^{21}`, and the
    difference is exact by Sterbenz's lemma); :math:`r = \mathrm{fl}(\mathrm{fl}(h - NC_1
    - NC_2) + \ell)` costs two roundings of a number below :math:`2^{-11.4}` and the
    error of :math:`NC_2` (:math:`2^{-75}`): :math:`\le 2^{-64.4}` absolute, which is the
    relative error it causes in :math:`e^r`. Then :math:`e^r = 1 + r + p` with
    :math:`p = r^2(1/2 + r/6 + r^2/24 + r^3/120)` (truncation :math:`|r|^6/720 < 2^{-78}`,
    roundings :math:`< 2^{-75}`), and with :math:`2^{j/1024} = T_h + T_l` (mpmath at 60
    digits)

    .. math::

        T e^r \approx T_h + \mathrm{fl}(T_h r) + (T_l + T_h p),

    the first two joined by Fast2Sum. The dropped :math:`T_l r` is below
    :math:`2^{-64.4}` and the rounding of :math:`T_h r_{hi}` below :math:`2^{-63.5}`
    (relative to :math:`T e^r \ge 0.99`): in all :math:`< 2^{-62.3}`. The scaling by
    :math:`2^m` is exact unless the result is subnormal, where ``hi`` is rounded once to
    the subnormal grid and ``lo`` underflows: in all the error is at most
    :math:`2^{-62.3}e^{h+\ell} + 2^{-1075}` (the second term matters below
    :math:`2^{-969}`, where ``lo`` is subnormal).
    ``hi = -inf`` gives exactly 0; arguments below -746 give 0 (the exact value is below
    half the smallest subnormal).
    """
    ws = Scratch() if scratch is None else scratch
    shape = hi.shape
    if lo is not None and lo.size and float(np.max(np.abs(lo))) > 2.0**-10:
        # A difference whose high parts cancelled (a logit q.k = 1e300 + 1 plus a bias
        # -1e300: hi 0, lo 1) can leave lo far above |hi|, where the reduction below,
        # made from hi alone, assumes |lo| small (|r| < 2**-8.8 keeps the truncation
        # below 2**-62). Renormalize (TwoSum: exact) so that hi carries the value. Below
        # 2**-10 nothing changes: d = x - a of logits near 1e12 carries lo up to 1e-4.
        with np.errstate(invalid="ignore", over="ignore"):
            hi, lo = two_sum(hi, lo)
        lo = np.where(np.isfinite(lo), lo, 0.0)
    low, high = (float(np.min(hi)), float(np.max(hi))) if hi.size else (0.0, 0.0)
    h = hi
    emin = _EXP_MIN - lift * _LN2  # e**emin * 2**lift is below half the smallest subnormal
    if low < emin or high > _EXP_MAX:  # -inf, deep underflow, overflow
        h = np.clip(hi, emin, _EXP_MAX, out=ws.get("exp.h", shape))
        if lo is not None:  # a clipped argument's low part (up to 1e284) is irrelevant
            lo = np.where(h == hi, lo, 0.0)
    n = np.multiply(h, _INV_C, out=ws.get("exp.n", shape))
    np.rint(n, out=n)
    r = np.multiply(n, _C1, out=ws.get("exp.r", shape))
    np.subtract(h, r, out=r)  # exact
    p = np.multiply(n, _C2_ROUNDED, out=ws.get("exp.p", shape))
    r -= p
    if lo is not None:
        r += lo
    ni = ws.get("exp.ni", shape, np.int64)
    ni[...] = n  # |n| < 2**21: exact conversion
    j = np.bitwise_and(ni, 1023, out=ws.get("exp.j", shape, np.int64))
    th = np.take(_TH, j, out=ws.get("exp.th", shape))
    tl = np.take(_TL, j, out=ws.get("exp.tl", shape))
    np.right_shift(ni, 10, out=ni)  # m
    np.multiply(r, _P5, out=p)
    p += _P4
    p *= r
    p += _P3
    p *= r
    p += 0.5
    q = np.multiply(r, r, out=ws.get("exp.q", shape))
    p *= q
    np.multiply(th, r, out=q)
    out_hi = np.add(th, q, out=ws.fresh(shape))
    out_lo = np.subtract(th, out_hi, out=ws.fresh(shape))
    out_lo += q
    p *= th
    p += tl
    out_lo += p
    # Veltkamp split of hi to 26 significant bits, the rest moved to lo (exact; now
    # |lo| <= 2**-25 hi): div then multiplies hi by a 26-bit divisor part exactly.
    c = np.multiply(out_hi, _SPLITTER, out=ws.get("exp.c", shape))
    np.subtract(c, out_hi, out=q)
    np.subtract(c, q, out=c)  # the high half
    np.subtract(out_hi, c, out=q)
    out_lo += q
    np.copyto(out_hi, c)
    if lift == 0 and -669.0 < low and high < 706.0:
        # 2**m is a normal number (|m| <= 1019), built from its bits, and the results
        # are above 2**-965, so that hi * 2**m and lo * 2**m (|lo| < 2**-24 hi, not
        # renormalized) are both exact.
        ni += 1023
        ni <<= 52
        scale = ni.view(np.float64)
        out_hi *= scale
        out_lo *= scale
        return out_hi, out_lo
    # Results near or below the underflow threshold, or overflowing: ldexp rounds each
    # part once to the subnormal grid (absolute error below 2**-1075 each; entries whose
    # hi is subnormal are recomputed at scale by div and sum_except); underflow to 0 and
    # overflow to inf are the intended values.
    if lift:
        ni += lift
    with np.errstate(under="ignore", over="ignore"):
        out_hi = np.ldexp(out_hi, ni)
        out_lo = np.ldexp(out_lo, ni)
    out_lo[h <= emin] = 0.0
    out_hi[h <= emin] = 0.0
    out_lo[np.isinf(out_hi)] = 0.0  # hi overflowed to inf: lo 0, so hi + lo stays inf
    return out_hi, out_lo


def _pool_only_refs() -> int:
    """``sys.getrefcount`` of an array held by nothing but a pool list, taken exactly as
    :meth:`Scratch.fresh` takes it. CPython 3.11 gives 3 (the list, the loop's name,
    getrefcount's argument); measuring it instead of assuming it keeps the pool safe on
    interpreters that count stack references differently."""
    pool = [np.empty(0)]
    for arr in pool:
        return sys.getrefcount(arr)
    raise AssertionError("unreachable")


_POOL_ONLY_REFS = _pool_only_refs()


def _huge_product_error(a: DD, b: DD, where: npt.NDArray[np.bool_]) -> F64:
    r"""The low part of :math:`a b` where an operand is at least :math:`2^{995}` (the
    Veltkamp split of :func:`two_prod` overflows there) and the product is finite: the
    TwoProduct of the operands scaled by :math:`2^{-64}` each where they are that large
    (exact: a power of two), its error term scaled back, plus the cross terms. Exact
    unless the scaled error term is subnormal, which needs :math:`|ab| < 2^{-840}`."""
    shape = np.broadcast_shapes(np.shape(a.hi), np.shape(b.hi))
    ah = np.broadcast_to(a.hi, shape)[where]
    bh = np.broadcast_to(b.hi, shape)[where]
    sa = np.where(np.abs(ah) >= 2.0**995, -64, 0)
    sb = np.where(np.abs(bh) >= 2.0**995, -64, 0)
    with np.errstate(over="ignore", invalid="ignore"):
        _, e = two_prod(np.ldexp(ah, sa), np.ldexp(bh, sb))
        e = np.ldexp(e, -(sa + sb))
        if a.lo is not None or b.lo is not None:
            al = np.broadcast_to(_lo(a), shape)[where]
            bl = np.broadcast_to(_lo(b), shape)[where]
            e = e + (ah * bl + al * bh)
    out = np.zeros(shape)
    out[where] = np.where(np.isfinite(e), e, 0.0)
    return out


class Scratch:
    """Reusable temporaries, by name and shape: the bulk operations write their
    intermediate arrays here instead of allocating (fresh allocations of a few hundred
    KiB cost page faults). Never holds a value that is returned to the caller."""

    def __init__(self) -> None:
        self._arrays: dict[tuple[str, tuple[int, ...], Any], npt.NDArray[Any]] = {}
        self._pools: dict[tuple[int, ...], list[F64]] = {}

    def fresh(self, shape: tuple[int, ...]) -> F64:
        """A float64 array of ``shape`` that nothing else references (safe to return).

        Arrays handed out earlier are reused once every reference to them (and to views
        of them) is gone: CPython's reference count tells. The pool keeps the values the
        definition passes between operations in memory that is already mapped.
        """
        pool = self._pools.setdefault(shape, [])
        for arr in pool:
            # Only the pool holds it (the count is measured the same way as
            # _POOL_ONLY_REFS, so it follows the interpreter's way of counting).
            if sys.getrefcount(arr) == _POOL_ONLY_REFS:
                return arr
        arr = np.empty(shape)
        pool.append(arr)
        return arr

    def get(self, name: str, shape: tuple[int, ...], dtype: Any = np.float64) -> Any:
        key = (name, shape, dtype)
        arr = self._arrays.get(key)
        if arr is None:
            arr = self._arrays[key] = np.empty(shape, dtype=dtype)
        return arr


def expm1_precise(y: F64) -> DD:
    r"""``expm1(y)`` for float64 :math:`0 \le y \le 700` as a double-double, relative error
    :math:`\le 2^{-88}`.

    Used on one value per row (the Newton step of ``log1p``). Reduction as in
    :func:`exp_rows` with three parts of :math:`\ln 2/1024` (:math:`NC_1`, :math:`NC_2`
    exact, :math:`NC_3` rounded: :math:`< 2^{-110}`), then
    :math:`e^r - 1 = r + r^2/2 + r^3/6 + r^4 \sum_{k=4}^{10} r^{k-4}/k!` with the first
    three terms in double-double (TwoProduct; :math:`1/6` as a double-double) and the
    tail, below :math:`2^{-38.8}|r|`, in float64 (a relative error of a few :math:`u`
    there is :math:`< 2^{-89}` of the result; truncation :math:`< 2^{-120}`), and

    .. math::

        e^y - 1 = (2^m T_h - 1 + 2^m T_l) + 2^m T (e^r - 1),

    whose first part is exact by TwoSum and whose parts have one sign unless
    :math:`N = 0`, where the first part is 0: no cancellation, so the relative error of
    the series carries over (tiny :math:`y` keep full relative accuracy).
    """
    n = np.rint(y * _INV_C)
    t = y - n * _C1  # exact (Sterbenz), N * C1 exact
    u, ue = two_sum(t, -(n * _C2))  # N * C2 exact
    r = DD(*fast_two_sum(u, ue - n * _C3))
    ni = n.astype(np.int64)
    j = ni & 1023
    m = ni >> 10
    # e^r - 1 = r + r^2/2 + r^3/6 + r^4 (1/4! + r/5! + ... + r^6/10!): the first three
    # terms in double-double (TwoProduct), the rest (below 2**-38.8 |r|) in float64.
    r_h, r_l = r.hi, r.lo
    assert r_l is not None
    sq_h, sq_l = two_prod(r_h, r_h)
    sq_l += 2.0 * r_h * r_l
    c_h, c_l = two_prod(sq_h, r_h)
    c_l += sq_l * r_h + sq_h * r_l
    t_h, t_l = two_prod(c_h, np.full_like(y, _FACT_HI[3]))
    t_l += c_h * _FACT_LO[3] + c_l * _FACT_HI[3]
    tail = np.full_like(y, _FACT_HI[10])
    for k in range(9, 3, -1):
        tail *= r_h
        tail += _FACT_HI[k]
    tail *= sq_h * sq_h
    s1, e1 = two_sum(r_h, 0.5 * sq_h)
    s2, e2 = two_sum(s1, t_h)
    low = e1 + e2 + r_l + 0.5 * sq_l + t_l + tail
    series = DD(*fast_two_sum(s2, low))
    t_dd = DD(_TH[j], _TL[j])
    scale = np.ldexp(1.0, m)
    b = dd_mul(t_dd, series)
    b = DD(b.hi * scale, b.lo * scale)  # exact: 2**m with m >= 0
    a_hi, a_lo = two_sum(_TH[j] * scale, np.full_like(y, -1.0))
    a = dd_add(DD(a_hi, a_lo), DD(_TL[j] * scale, None))
    return dd_add(a, b)


# ---------------------------------------------------------------------------
# Summation
# ---------------------------------------------------------------------------


def extract_sum(
    hi: F64, lo: F64 | None, scratch: Scratch | None = None, overwrite: bool = False
) -> DD:
    r"""Sum of nonnegative ``hi + lo`` over the last axis by two error-free extractions.

    With a per-row power of two :math:`\sigma_1 = 2^{M}\,2^{\lceil\log_2 \max_i h_i\rceil}`,
    :math:`2^M \ge 2(n+2)`, the split :math:`q_i = \mathrm{fl}(\mathrm{fl}(\sigma_1 + h_i) -
    \sigma_1)`, :math:`h_i' = h_i - q_i` is exact, every :math:`q_i` is a multiple of
    :math:`u\sigma_1`, and :math:`\sum_i q_i` is computed exactly in any order (Rump, Ogita
    & Oishi 2008, Lemma 3.3 and Alg. 3.3 ExtractVector); :math:`|h_i'| \le 2u\sigma_1`.
    A second extraction with :math:`\sigma_2 = 2^{M+1} u\sigma_1` leaves
    :math:`|h_i''| \le 2^{2M+2}u^2\max_i h_i`, whose float64 sum errs by at most
    :math:`n u \sum|h''| \le 2^{2M+2} n^2 u^3 \max h`. Rows short enough that one
    extraction suffices (:math:`n^2 2^{M+2} \le 2^{40}`, about :math:`n \le 5000`: error
    :math:`n^2 2^{M+2}u^2 \max h \le 2^{-66}\max h`) skip the second. The low parts
    (:math:`|lo_i| \le 2^{-25} h_i` from :func:`exp_rows`) are summed in float64 for
    :math:`n \le 4096` (error :math:`n u 2^{-25} s \le 2^{-66} s`) and after one extraction
    of their own beyond. With :math:`\max h \le s` the relative error is below
    :math:`2^{-66}` (short rows) and :math:`2^{2M+2}n^2u^3 + 2^{-66}` (long rows). Each row
    costs five to nine elementwise passes and three to seven reductions. ``hi`` is
    overwritten when ``overwrite``; the result keeps the last axis (length 1).
    """
    ws = Scratch() if scratch is None else scratch
    n = hi.shape[-1]
    rest = hi
    if not overwrite:
        rest = ws.get("ext.rest", hi.shape)
        np.copyto(rest, hi)
    big = np.maximum.reduce(hi, axis=-1, keepdims=True)
    m = int(n + 2).bit_length() + 1  # 2**m >= 2 (n + 2)
    # One extraction leaves |h'| <= 2u sigma1, whose float64 sum errs by at most
    # n^2 2^(m+2) u^2 max h: enough (2**-66) for short rows; longer rows take two.
    two = n * n * 2.0 ** (m + 2) > 2.0**40
    t = ws.get("ext.t", hi.shape)
    taus = _extract(rest, t, big, m, 2 if two else 1)
    tail = np.add.reduce(rest, axis=-1, keepdims=True)
    if lo is not None:
        if n <= 4096:
            # |lo| <= 2**-25 h (exp_rows' split): the plain sum errs by n u 2**-25 s <= 2**-66 s
            tail += np.add.reduce(lo, axis=-1, keepdims=True)
        else:  # one extraction of the low parts too
            rest_lo = ws.get("ext.rlo", lo.shape)
            np.copyto(rest_lo, lo)
            big_lo = np.maximum(
                np.maximum.reduce(lo, axis=-1, keepdims=True),
                -np.minimum.reduce(lo, axis=-1, keepdims=True),
            )
            taus_lo = _extract(rest_lo, t, big_lo, m, 1)
            tail += taus_lo[0]
            tail += np.add.reduce(rest_lo, axis=-1, keepdims=True)
    s_hi, s_lo = two_sum(taus[0], taus[-1]) if two else (taus[0], np.zeros_like(taus[0]))
    return dd_add(DD(s_hi, s_lo), DD(tail, None))


def _extract(rest: F64, t: F64, big: F64, m: int, levels: int) -> list[F64]:
    """Extraction levels of ``rest`` in place (see :func:`extract_sum`); the exact sums."""
    _, ex = np.frexp(big)  # |values| <= big < 2**ex
    sigma = np.ldexp(1.0, ex + m)
    taus = []
    for _ in range(levels):
        np.add(rest, sigma, out=t)
        t -= sigma  # q_i, exact
        rest -= t  # h_i - q_i, exact
        taus.append(np.add.reduce(t, axis=-1, keepdims=True))  # exact
        sigma = sigma * 2.0 ** (m + 1 - 53)  # the next level's sigma: 2^(m+1) u sigma
    return taus


# ---------------------------------------------------------------------------
# The arithmetic
# ---------------------------------------------------------------------------


def _recompute_lse(
    d_hi: F64, d_lo: F64, a_hi: F64, a_lo: F64, k_rows: npt.NDArray[np.intp]
) -> tuple[F64, F64]:
    r"""logsumexp of whole rows in mpmath, precision raised until the rounding is settled.

    Row :math:`r` holds the exact shifted values :math:`d_j = d^{hi}_j + d^{lo}_j` and
    the exact maximum :math:`a = a^{hi} + a^{lo}`. :math:`a + \log(1 + \sum_{j \ne k}
    e^{d_j})` at ``dps`` digits has absolute error below
    :math:`10^{4-\mathrm{dps}}(1 + |a| + \log n)`; the row is accepted when that is below
    :math:`2^{-56}|r|`, so its float64 rounding is within :math:`1/2 + 1/8` ulp. The value
    is never exactly 0 for such rows (Lindemann-Weierstrass), so the loop ends.
    """
    out_hi = np.empty(len(a_hi))
    out_lo = np.empty(len(a_hi))
    for i in range(len(a_hi)):
        dps = 40
        while True:
            with mpmath.workdps(dps):
                am = mpmath.mpf(float(a_hi[i])) + mpmath.mpf(float(a_lo[i]))
                terms = [
                    mpmath.exp(mpmath.mpf(float(h)) + mpmath.mpf(float(lo)))
                    for j, (h, lo) in enumerate(zip(d_hi[i], d_lo[i], strict=True))
                    if j != k_rows[i]
                ]
                r = am + mpmath.log1p(mpmath.fsum(terms))
                bound = mpmath.mpf(10) ** (4 - dps) * (1 + abs(am) + mpmath.log(len(terms) + 2))
                if abs(r) * mpmath.mpf(2) ** -56 > bound or dps > 5000:
                    out_hi[i] = float(r)
                    out_lo[i] = float(r - mpmath.mpf(out_hi[i]))
                    break
            dps *= 2
    return out_hi, out_lo


def _reciprocal(b: DD) -> tuple[F64, F64]:
    r""":math:`1/b` in double-double by one Newton step.

    :math:`q = \mathrm{fl}(1/b_{hi})`, :math:`\rho = 1 - bq` (exact by TwoProduct and
    Sterbenz, then :math:`-b_{lo}q`), :math:`1/b \approx q + \rho q`: relative error
    about :math:`2^{-104}`. For the softmax the divisor is :math:`1 + s' \ge 1`.
    """
    q = 1.0 / b.hi
    p, e = two_prod(b.hi, q)
    rho = ((1.0 - p) - e) - _lo(b) * q
    return fast_two_sum(q, rho * q)


def _near_underflow(d: DD) -> bool:
    """Whether some :math:`e^{d_j}` lies below :math:`2^{-969}` (some :math:`d_j < -669`),
    where a double-double cannot hold its low part (see :func:`_round_small_products`)."""
    return bool(d.hi.size) and float(np.min(d.hi)) < -669.0


def _times_power_of_two(a: DD, b: DD) -> DD | None:
    r"""``a * b`` for a float64 scalar :math:`b = \pm 2^m` (:math:`|m| \le 64`) and an array
    ``a`` whose high parts all lie in :math:`[2^{-900}, 2^{900}]` in magnitude: ``(a_hi b,
    a_lo b)``; None otherwise (the caller takes the general product).

    This is what :meth:`DoubleDouble.mul` computes in that case, in two passes instead of
    TwoProduct's fifteen, with the same bits: the Veltkamp halves of :math:`b` are
    :math:`(b, 0)`, so every partial product :math:`a_i b` is exact (each is normal:
    :math:`|a_2| \ge 2^{-53}|a_{hi}|` or 0) and the error term is exactly 0, leaving
    ``lo`` :math:`= 0 + (a_{hi} \cdot 0 + a_{lo} b) = a_{lo} b`, one rounding (only when
    :math:`a_{lo} b` is subnormal). ``a_lo`` is finite wherever ``a_hi`` is (every
    double-double this arithmetic makes), so the general path's repair of non-finite
    error terms has nothing to do here. Used for the attention scale :math:`\tau = 1/\sqrt{E}`
    with E a power of four (E = 64: :math:`\tau = 2^{-3}`).
    """
    if b.lo is not None or np.ndim(b.hi) != 0 or a.hi.size == 0:
        return None
    t = float(b.hi)
    mant, exp2 = math.frexp(t)
    if abs(mant) != 0.5 or not -64 <= exp2 <= 66:
        return None
    mag = np.abs(a.hi)
    if not (float(np.min(mag)) >= 2.0**-900 and float(np.max(mag)) <= 2.0**900):
        return None  # zeros, tiny or huge entries, inf or NaN (NaN fails both tests)
    hi = np.multiply(a.hi, t, out=mag)
    if a.lo is None:
        return DD(hi, np.zeros_like(hi))
    with np.errstate(under="ignore"):  # a subnormal a_lo b rounds, as in TwoProduct's path
        lo = np.multiply(a.lo, t)
    lo += 0.0  # -0.0 becomes +0.0, as the general path's sum e + (... + a_lo b) gives
    return DD(hi, lo)


_NEAR_UNDERFLOW = 2.0**-969  # below this, lo (about 2**-53 hi) is subnormal
_LIFT = 600  # 2**600 brings every such product into the normal range, exactly


def _round_small_products(a: DD, r_hi: F64, r_lo: F64, hi: F64, lo: F64) -> None:
    r"""Overwrite ``hi, lo`` where :math:`|a_{hi}| < 2^{-969}` with the product
    :math:`a \cdot r` rounded once to float64 (``lo = 0``).

    There TwoProduct is not exact (its error term underflows) and a double-double cannot
    hold the product's low bits. The product is formed exactly at scale :math:`2^{600}`
    (TwoProduct, then the cross terms), its high part is scaled back with one rounding to
    the subnormal grid, and the remainder (exact by Sterbenz's lemma) decides whether to
    step one grid spacing: the result is the correctly rounded product (up to the
    :math:`2^{-100}` error of the scaled double-double). For softmax this leaves the
    rounding of :math:`e^{d_j}` itself (at most half a subnormal ulp, divided by
    :math:`1+s'`) plus this rounding: below one ulp.
    """
    sel = np.nonzero(np.abs(a.hi) < _NEAR_UNDERFLOW)
    if not sel[0].size:
        return
    shape = hi.shape
    a_s = np.ldexp(a.hi[sel], _LIFT)
    al_s = np.ldexp(np.broadcast_to(_lo(a), shape)[sel], _LIFT)
    rh = np.broadcast_to(r_hi, shape)[sel]
    rl = np.broadcast_to(r_lo, shape)[sel]
    p, e = two_prod(a_s, rh)
    e += a_s * rl + al_s * rh
    p, e = fast_two_sum(p, e)  # |e| <= ulp(p)/2: the rounding below moves p at most one step
    hi[sel] = _descale_rounded(p, e, _LIFT)
    lo[sel] = 0.0


#: d_j below this (e**d_j < 2**-965): the weight is also carried at scale (:class:`Tiny`).
#: The same threshold as :func:`_near_underflow`, which gates the search for such entries.
_TINY_D = -669.0
#: d_j below this (e**d_j < 2**-1500): at scale 2**1200 rather than 2**600, so that every
#: scaled weight that can matter (p |v| >= 2**-1075 with |v| < 2**1024: d_j > -1455) is
#: normal and below 2**-300 (p 2**L |v| cannot overflow).
_DEEP_D = -1040.0
#: a factor of mul or div that the scaled weights follow: 0 or of magnitude within
#: [2**-64, 2**64] (the dropout factors 0, 1 and 1/(1 - p_drop)); others drop them.
_FACTOR_RANGE = 2.0**64


def _tiny_part(d: DD, r_hi: F64, r_lo: F64) -> Tiny | None:
    r"""The weights :math:`p_j = e^{d_j}(r_{hi} + r_{lo})` of the entries with a finite
    :math:`d_j < -669` at scale (:class:`Tiny`); None when there is none.

    Only those entries are evaluated. :math:`2^{600} e^{d_j}` by :func:`exp_rows` with
    ``lift=600`` for :math:`-1040 \le d_j < -669` (values in :math:`[2^{-901},
    2^{-365}]`); :math:`2^{1200} e^{d_j}` for :math:`d_j < -1040` as :func:`exp_rows`
    (``lift=600``) of :math:`d_j + 600 \ln 2`, formed by TwoSum with the double-double
    :math:`600 \ln 2` (an error below :math:`2^{-95}`, relative in the result): values below
    :math:`2^{-300}`, normal down to :math:`d_j \approx -1455`, below which
    :math:`p_j |v| < 2^{-1075}` for every float64 :math:`v`; 0 below -1578. The product
    with the reciprocal as in :meth:`DoubleDouble._times_reciprocal` (26-bit ``hi``:
    :math:`2^{-77}`), renormalized by Fast2Sum: within :math:`2^{-62}` of
    :math:`p_j 2^{L}` in all (:func:`exp_rows`' :math:`2^{-62.3}` dominates).
    """
    hi = d.hi
    where = hi < _TINY_D
    where &= hi > -np.inf  # a hidden key (-inf) has weight exactly 0; NaN fails both tests
    if not where.any():
        return None
    idx = np.nonzero(where)
    dh = hi[idx]
    dl = np.broadcast_to(np.asarray(_lo(d), dtype=np.float64), hi.shape)[idx]
    deep = dh < _DEEP_D
    if deep.any():
        sh, se = two_sum(dh, np.full_like(dh, _SHIFT_HI))  # exact
        se += dl
        se += _SHIFT_LO
        dh = np.where(deep, sh, dh)
        dl = np.where(deep, se, dl)
    e_hi, e_lo = exp_rows(dh, dl, lift=_LIFT)
    rh = np.broadcast_to(r_hi, hi.shape)[idx]
    rl = np.broadcast_to(r_lo, hi.shape)[idx]
    b1, b2 = split(rh)
    p, e = fast_two_sum(e_hi * b1, e_hi * (b2 + rl) + e_lo * rh)  # e_hi * b1 exact
    t_hi = np.zeros(hi.shape)
    t_lo = np.zeros(hi.shape)
    t_deep = np.zeros(hi.shape, dtype=np.bool_)
    t_hi[idx] = p
    t_lo[idx] = e
    t_deep[idx] = deep
    return Tiny(where, t_deep, t_hi, t_lo)


def _tiny_times(t: Tiny, f: DD) -> Tiny | None:
    r"""The scaled weights ``t`` times the double-double ``f`` (broadcasting): TwoProduct
    of the high parts and the cross terms, renormalized (:func:`dd_mul`'s
    :math:`5u^2`). None, so that the caller drops them, unless every entry of ``f`` is
    finite and 0 or within :math:`[2^{-64}, 2^{64}]` in magnitude: then the products stay
    normal (above :math:`2^{-1000}` for a weight that matters) and far from overflow.
    """
    f_hi = np.asarray(f.hi, dtype=np.float64)
    f_lo = np.asarray(_lo(f), dtype=np.float64)
    mag = np.abs(f_hi)
    ok = np.isfinite(f_lo).all() and bool(
        np.all((mag == 0.0) | ((mag >= 1.0 / _FACTOR_RANGE) & (mag <= _FACTOR_RANGE)))
    )
    if not ok:
        return None
    p, e = two_prod(t.hi, f_hi)
    e = e + (t.hi * f_lo + t.lo * f_hi)
    p, e = fast_two_sum(p, e)
    shape = p.shape
    return Tiny(np.broadcast_to(t.where, shape), np.broadcast_to(t.deep, shape), p, e)


def _tiny_select(cond: npt.NDArray[np.bool_], a: DD, b: DD, shape: tuple[int, ...]) -> Tiny | None:
    """The scaled weights of ``select(cond, a, b)``: those of ``a`` where ``cond``, else
    those of ``b`` (none where the chosen operand has none); None when no entry has any."""
    ta, tb = _tiny_of(a), _tiny_of(b)
    if ta is None and tb is None:
        return None
    none: tuple[Any, ...] = (False, False, 0.0, 0.0)
    pa: tuple[Any, ...] = none if ta is None else tuple(ta)
    pb: tuple[Any, ...] = none if tb is None else tuple(tb)
    parts = [np.broadcast_to(np.where(cond, x, y), shape) for x, y in zip(pa, pb, strict=True)]
    if not parts[0].any():
        return None
    return Tiny(*parts)


def _descale_rounded(hi: F64, lo: F64, lift: int) -> F64:
    r""":math:`(hi + lo)\, 2^{-lift}` rounded once to float64, for a double-double with
    :math:`|lo| \le \mathrm{ulp}(hi)/2` and :math:`lift > 0`: the correctly rounded value
    (as in :func:`_round_small_products`), so that a subnormal result errs by at most
    :math:`2^{-1075}`. ``ldexp`` rounds ``hi`` to the subnormal grid, the remainder
    :math:`hi - h\, 2^{lift}` is exact, and it decides, with ``lo``, whether to step one grid
    spacing (in the normal range :math:`h` is exact and ``lo`` below half a spacing)."""
    with np.errstate(under="ignore"):
        h = np.ldexp(hi, -lift)
        rest = (hi - np.ldexp(h, lift)) + lo
        grid = np.spacing(np.abs(h))
        step = np.where(np.abs(rest) > 0.5 * np.ldexp(grid, lift), np.sign(rest) * grid, 0.0)
        out: F64 = h + step
    return out


#: the keys of weight below 2**-965 are negligible in a row when their values, times
#: 2**-1074 (what such a weight may have lost), are below 2**-128 of the mass of the others
#: (2**-64 after a dropout factor up to 2**64), and that mass is at least this (so that the
#: claim's absolute 2**-1074 is not needed)
_MASS_FLOOR = 2.0**-1000
#: rows whose mass without those keys is below this are evaluated at scale 2**600
#: (every product then stays below 2**1001)
_MASS_CEILING = 2.0**400


def _redo_rows_at_scale(ph: F64, pl: F64, t: Tiny, v: F64, hi: F64, lo: F64) -> None:
    r"""Overwrite the outputs ``hi, lo`` (``(p_hi + p_lo) @ v`` by
    :func:`~attnspec.reference.matmul.dot_dd`) of the rows where weights below the
    double-double range matter, with the product evaluated at scale (``t``).

    A row is left as it is when, in every column :math:`k`, the values at its keys in
    ``t.where`` are 0, or when :math:`2^{-1074}\sum_{j \in \mathrm{tiny}} |v_{jk}|
    \le 2^{-128} B_k` and :math:`B_k \ge 2^{-1000}`, with
    :math:`B_k = \sum_{j \notin \mathrm{tiny}} |p_{ij}||v_{jk}|` (both by BLAS in float64;
    the margins cover their roundings): each of those weights is within
    :math:`u p_{ij}/2 + 2^{-1074}` of its value (float64 roundings of :math:`e^{d_j}` and of
    the product), times the factors of :meth:`mul` and :meth:`div` (up to :math:`2^{64}`:
    dropout's :math:`1/(1 - p_{drop})`, which scales :math:`B_k` alike) and one more
    rounding of :meth:`div`, so the absolute parts cost less than :math:`2^{-63}` of the
    mass, and the mass is far above the absolute term of the claim. (The pinned
    ``underflow-weights`` case is such a row: its bits stay.) Otherwise, when
    :math:`B_k < 2^{400}` in every column (above, the first test holds for any
    :math:`S < 2^{320}`), the row is evaluated as

    .. math::

        o_{ik} = 2^{-600}\Bigl(\sum_{j \notin \mathrm{tiny}} (2^{600} p_{ij}) v_{jk}
            + \sum_{\mathrm{tiny},\ \mathrm{not\ deep}} (2^{600} p_{ij}) v_{jk}
            + 2^{-600} \sum_{\mathrm{deep}} (2^{1200} p_{ij}) v_{jk}\Bigr):

    the first two sums in one :func:`dot_dd` (the other weights scaled exactly; no term
    above :math:`2^{1001}`), the third in another (scaled weights below :math:`2^{-300}`,
    so below :math:`2^{724}` times any value), scaled down (a rounding below
    :math:`2^{-1075}` at scale :math:`2^{600}`, that is :math:`2^{-1675}`), added by
    :func:`dd_add` and rounded once to float64 by :func:`_descale_rounded` (``lo = 0``).
    Each product is within :math:`2^{-56}` of its mass plus :math:`2^{-1074}` at its scale,
    so the output is within :math:`(2^{-53} + 2^{-56} + 2^{-100})\sum_j |p_{ij}||v_{jk}|
    + 2^{-1075}` of the product of the weights, and those are within :math:`2^{-62}` of
    :math:`p_{ij}` at the tiny keys.
    """
    from attnspec.reference.matmul import dot_dd

    batch = hi.shape[:-2]
    n_q, n_k = ph.shape[-2:]
    full = (*batch, n_q, n_k)
    b_ph, b_pl = np.broadcast_to(ph, full), np.broadcast_to(pl, full)
    b_where, b_deep = np.broadcast_to(t.where, full), np.broadcast_to(t.deep, full)
    b_th, b_tl = np.broadcast_to(t.hi, full), np.broadcast_to(t.lo, full)
    b_v = np.broadcast_to(v, (*batch, n_k, v.shape[-1]))
    for idx in np.ndindex(batch):
        rows = np.flatnonzero(b_where[idx].any(axis=1))
        if not rows.size:
            continue
        w = b_where[idx][rows]
        x_hi, x_lo = b_ph[idx][rows], b_pl[idx][rows]
        v2 = b_v[idx]
        av = np.abs(v2)
        with np.errstate(over="ignore", invalid="ignore"):  # inf bounds decide alike
            mass = np.abs(np.where(w, 0.0, x_hi)) @ av
            tail = w.astype(np.float64) @ av
            fine = (tail == 0.0) | ((tail <= 2.0**946 * mass) & (mass >= _MASS_FLOOR))
        redo = ~fine.all(axis=1) & (np.max(mass, axis=1, initial=0.0) < _MASS_CEILING)
        if not redo.any():
            continue
        rows, w = rows[redo], w[redo]
        x_hi, x_lo = x_hi[redo], x_lo[redo]
        deep = b_deep[idx][rows] & w
        th, tl = b_th[idx][rows], b_tl[idx][rows]
        shallow = w & ~deep
        s_hi = np.where(shallow, th, np.where(w, 0.0, np.ldexp(x_hi, _LIFT)))
        s_lo = np.where(shallow, tl, np.where(w, 0.0, np.ldexp(x_lo, _LIFT)))
        h, e = dot_dd(s_hi, s_lo, v2)
        if deep.any():
            h2, e2 = dot_dd(np.where(deep, th, 0.0), np.where(deep, tl, 0.0), v2)
            with np.errstate(under="ignore"):  # below 2**-1074 at scale 2**600: negligible
                far = DD(np.ldexp(h2, -_LIFT), np.ldexp(e2, -_LIFT))
            both = dd_add(DD(h, e), far)
            h, e = both.hi, np.asarray(_lo(both), dtype=np.float64)
        out_hi, out_lo = hi[idx], lo[idx]
        out_hi[rows] = _descale_rounded(h, e, _LIFT)
        out_lo[rows] = 0.0


class DoubleDouble:
    """Double-double numbers (:class:`DD`): results within one ulp of the exact value.

    See the module docstring for the algorithms and the error bound of each operation.
    """

    name = "accurate"
    #: Blocks of 64 Ki elements (512 KiB per array). Temporaries come from a Scratch
    #: pool, so no block allocates fresh memory but its results; measured on the
    #: 2-core dev machine (4096 x 4096), 2**16 was faster than 2**14, 2**15 and 2**17:
    #: smaller blocks pay the per-row work (log1p, reciprocal) more often, larger ones
    #: fall out of the 2 MiB L2 cache.
    chunk_elements = 1 << 16
    #: the high parts overflow like float64, so logits beyond its range are refused
    overflow = "refuse"

    def __init__(self) -> None:
        self._scratch = Scratch()

    def lift(self, x: F64) -> DD:
        return DD(x, None)

    def add(self, a: DD, b: DD) -> DD:
        """:func:`dd_add_sloppy`."""
        return dd_add_sloppy(a, b, self._scratch)

    def sub(self, a: DD, b: DD) -> DD:
        """:func:`dd_add_sloppy` of ``a`` and ``-b``: exact for float64 operands."""
        return dd_add_sloppy(a, _neg(b), self._scratch)

    def div(self, a: DD, b: DD) -> DD:
        r"""``a / b`` as ``a * (1/b)`` (:func:`_reciprocal`).

        The product with ``a`` (:func:`dd_mul`) adds about :math:`5u^2`. Weights
        (:class:`Weights`) divided by a number of moderate size (:func:`_tiny_times`:
        the dropout factor :math:`1 - p_{drop}`) keep their scaled part, divided alike.
        """
        out = self._div(a, b)
        tiny = _tiny_of(a)
        if tiny is None or _tiny_of(b) is not None:
            return out
        return Weights.of(out, _tiny_times(tiny, DD(*_reciprocal(b))))

    def _div(self, a: DD, b: DD) -> DD:
        r_hi, r_lo = _reciprocal(b)
        # a * (r_hi + r_lo): TwoProduct of the high parts (Dekker, written out to reuse
        # scratch arrays), the cross terms in float64; not renormalized (result() rounds
        # hi + lo in one addition).
        ws = self._scratch
        b1, b2 = split(r_hi)  # one value per row
        shape = np.broadcast_shapes(a.hi.shape, r_hi.shape)
        hi = np.multiply(a.hi, r_hi, out=ws.fresh(shape))
        c = np.multiply(a.hi, _SPLITTER, out=ws.get("div.c", hi.shape))
        a1 = np.subtract(c, a.hi, out=ws.get("div.a1", hi.shape))
        np.subtract(c, a1, out=a1)
        a2 = np.subtract(a.hi, a1, out=c)
        lo = np.multiply(a1, b1, out=ws.fresh(shape))
        lo -= hi
        np.multiply(a1, b2, out=a1)
        lo += a1
        t = np.multiply(a2, b1, out=ws.get("div.t", hi.shape))
        lo += t
        np.multiply(a2, b2, out=t)
        lo += t
        np.multiply(a.hi, r_lo, out=t)
        lo += t
        if a.lo is not None:
            np.multiply(a.lo, r_hi, out=t)
            lo += t
        if np.any(np.abs(a.hi) < _NEAR_UNDERFLOW):
            _round_small_products(a, r_hi, r_lo, hi, lo)
        return DD(hi, lo)

    def _times_reciprocal(self, a: DD, r_hi: F64, r_lo: F64, near_underflow: bool) -> DD:
        r"""``a * (r_hi + r_lo)`` for ``a`` as :func:`exp_rows` returns it: ``hi`` with at
        most 26 significant bits, :math:`|lo| \le 2^{-25} hi`.

        With :math:`r_{hi} = b_1 + b_2` (Veltkamp, 26-bit :math:`b_1`), the product
        :math:`a_{hi} b_1` is exact, and :math:`a_{hi}(b_2 + r_{lo}) + a_{lo} r_{hi}` are
        terms of relative size :math:`2^{-25}` computed with one rounding each: relative
        error below :math:`2^{-77}` (the dropped :math:`a_{lo} r_{lo}` is :math:`2^{-78}`).
        Four passes instead of TwoProduct's fifteen.
        """
        ws = self._scratch
        b1, b2 = split(r_hi)  # one value per row
        rest = b2 + r_lo
        shape = np.broadcast_shapes(a.hi.shape, r_hi.shape)
        hi = np.multiply(a.hi, b1, out=ws.fresh(shape))
        lo = np.multiply(a.hi, rest, out=ws.fresh(shape))
        t = np.multiply(_lo(a), r_hi, out=ws.get("div.t", shape))
        lo += t
        if near_underflow:  # entries below 2**-969 (see div)
            _round_small_products(a, r_hi, r_lo, hi, lo)
        return DD(hi, lo)

    # -- operations used by the attention definition (reference/attention.py) --------

    def mul(self, a: DD, b: DD) -> DD:
        r"""``a * b``: TwoProduct of the high parts plus the cross terms (:func:`dd_mul`'s
        bound, about :math:`5u^2` relative). An operand with :math:`|a| \ge 2^{995}` (where
        the splitting overflows) is scaled by :math:`2^{-64}` for the TwoProduct, which is
        then exact again (:func:`_huge_product_error`). Where the error term is not finite
        for other reasons (inf or NaN operands, a product that overflows) the plain float64
        product is kept with ``lo = 0``; inf * 0 = NaN is the IEEE answer the definition
        relies on.

        Weights (:class:`Weights`) times a number of moderate size (:func:`_tiny_times`:
        the dropout keep-mask) keep their scaled part, multiplied alike; the product of
        two such operands has none.
        """
        out = self._mul(a, b)
        ta, tb = _tiny_of(a), _tiny_of(b)
        if (ta is None) == (tb is None):
            return out
        if ta is not None:
            return Weights.of(out, _tiny_times(ta, b))
        assert tb is not None
        return Weights.of(out, _tiny_times(tb, a))

    def _mul(self, a: DD, b: DD) -> DD:
        scaled = _times_power_of_two(a, b)
        if scaled is not None:
            return scaled
        # inf * 0, inf - inf and the splitting's overflow for huge operands make NaN
        # or inf error terms: they are replaced by 0 just below.
        with np.errstate(invalid="ignore", over="ignore"):
            p, e = two_prod(a.hi, b.hi)
            if a.lo is not None or b.lo is not None:
                e = e + (a.hi * _lo(b) + _lo(a) * b.hi)
        bad = ~np.isfinite(e)
        if bad.any():
            e = np.where(bad, 0.0, e)
            huge = bad & np.isfinite(p) & (p != 0)
            if huge.any():
                e = np.where(huge, _huge_product_error(a, b, huge), e)
        return DD(p, e)

    def tanh(self, a: DD) -> DD:
        r""":math:`\tanh(h + \ell) = \operatorname{sign}(h)\, t/(t + 2) + \ell(1 - \tanh^2 h)`
        with :math:`t = \mathrm{expm1}(2|h|)` (:func:`expm1_precise`), relative error
        about :math:`2^{-88}`; :math:`|h| \ge 40` gives :math:`\pm 1` (the difference is
        below :math:`2^{-114}`), NaN stays NaN.
        """
        h = a.hi
        mag = np.minimum(np.abs(np.where(np.isnan(h), 0.0, h)), 40.0)
        t = expm1_precise(2.0 * mag)
        q = self.div(t, dd_add(t, DD(np.full_like(mag, 2.0), None)))
        sign = np.where(h < 0, -1.0, 1.0)
        lo = sign * _lo(q)
        if a.lo is not None:
            lo = lo + a.lo * (1.0 - q.hi * q.hi)
        hi = np.where(np.isnan(h), np.nan, sign * q.hi)
        return DD(hi, np.where(np.isnan(h), 0.0, lo))

    def softcap(self, s: DD, c: float) -> DD:
        r""":math:`c \tanh(s / c)` for a float64 cap :math:`c > 0`, by regions of
        :math:`r = |s_{hi}| / c`:

        * :math:`r > 40` (and :math:`s = \pm\infty`): :math:`\pm c`, since
          :math:`1 - \tanh r < 2^{-114}`;
        * :math:`r < 2^{-52}`: :math:`s` itself, since :math:`c \tanh(s/c) = s(1 - r^2/3 +
          \dots)` moves it by less than :math:`2^{-105}|s|` (a subnormal logit stays exact,
          where forming :math:`s/c` would round it);
        * NaN stays NaN;
        * elsewhere :meth:`mul`, :meth:`tanh` and :meth:`div`, with :math:`s` and :math:`c`
          scaled by :math:`2^{600}` first when :math:`c < 2^{-900}` (so that :math:`1/c`
          does not overflow).

        When every entry lies in the last region and the cap needs no scaling (the usual
        case), that is the whole evaluation, exactly as before this operation existed. A
        cap below :math:`2^{-900}` always takes the scaled path, also when every entry is in
        the last region or there is none at all (S = 0, where ``middle.all()`` holds
        vacuously): unscaled, :math:`1/c` overflows (:math:`c < 2^{-1024}`) or so does the
        splitting of it (:math:`c < 2^{-996}`), which made NaN logits and warnings.
        """
        hi = s.hi
        with np.errstate(over="ignore", under="ignore", invalid="ignore"):
            ratio = np.abs(hi) / c
        nan = np.isnan(hi)
        saturated = ~nan & (ratio > 40.0)
        tiny = ~nan & (ratio < 2.0**-52)
        middle = ~(nan | saturated | tiny)
        scale = 600 if c < 2.0**-900 else 0
        if middle.all() and not scale:
            cap = DD(np.asarray(c, dtype=np.float64), None)
            return self.mul(cap, self.tanh(self.div(s, cap)))
        lo = np.broadcast_to(_lo(s), hi.shape)
        out_hi = np.where(saturated, np.copysign(c, hi), hi)
        out_lo = np.where(saturated | nan, 0.0, lo)
        if middle.any():
            # the other entries get the stand-in s = c (r = 1), replaced below
            part = DD(
                np.ldexp(np.where(middle, hi, c), scale), np.ldexp(np.where(middle, lo, 0.0), scale)
            )
            cap = DD(np.asarray(np.ldexp(c, scale), dtype=np.float64), None)
            r = self.mul(cap, self.tanh(self.div(part, cap)))
            with np.errstate(under="ignore"):  # back to scale 1: may round to subnormals
                r_hi, r_lo = np.ldexp(r.hi, -scale), np.ldexp(_lo(r), -scale)
            out_hi = np.where(middle, r_hi, out_hi)
            out_lo = np.where(middle, r_lo, out_lo)
        return DD(out_hi, out_lo)

    def matmul(self, a: DD, b: DD) -> DD:
        r"""``a @ b``: exact products of float64 matrices (Ozaki scheme,
        :func:`attnspec.reference.matmul.dot_exact`) or a double-double times a float64
        matrix (:func:`attnspec.reference.matmul.dot_dd`), each as a double-double.

        ``dot_dd`` is within :math:`2^{-56} \sum_j |a_{ij}| |b_{jk}| + 2^{-1074}` of the
        product of the numbers it is given, whatever ``b`` holds where ``a`` is 0. It
        cannot restore what ``a`` lost before: a weight below :math:`2^{-969}` is held
        only to :math:`2^{-1074}` absolute (below :math:`2^{-1022}` it is a subnormal
        float64, below :math:`2^{-1075}` 0), and that error times a large
        :math:`|b_{jk}|` can exceed any relative bound of the output. So weights of
        :meth:`weights` (:class:`Weights`) that carry such entries at scale are, in the
        rows where those entries can matter, multiplied at scale
        (:func:`_redo_rows_at_scale`): each output then within
        :math:`(2^{-53} + 2^{-56} + 2^{-62}) \sum_j p_{ij}|b_{jk}| + 2^{-1075}` of
        :math:`\sum_j p_{ij} b_{jk}` for the weights :math:`p` as the double-doubles hold
        them at the other keys. The other rows, and every row of a product without such
        entries, are ``dot_dd``'s, bit for bit.
        """
        from attnspec.reference.matmul import dot_dd, dot_exact

        if a.lo is None and b.lo is None:
            return DD(*dot_exact(a.hi, b.hi))
        if b.lo is None:
            p_lo = np.broadcast_to(_lo(a), a.hi.shape)
            hi, lo = dot_dd(a.hi, p_lo, b.hi)
            tiny = _tiny_of(a)
            if tiny is not None and bool(np.isfinite(b.hi).all()):
                _redo_rows_at_scale(a.hi, p_lo, tiny, b.hi, hi, lo)
            return DD(hi, lo)
        raise NotImplementedError(
            "DoubleDouble.matmul: both operands carry low parts (shapes "
            f"{a.hi.shape} and {b.hi.shape}); only float64 @ float64 and "
            "double-double @ float64 are implemented"
        )

    def take(self, a: DD, index: npt.NDArray[np.intp]) -> DD:
        hi = np.take_along_axis(a.hi, index[..., None], axis=-1)
        if a.lo is None:
            return DD(hi, None)
        lo = np.take_along_axis(np.broadcast_to(a.lo, a.hi.shape), index[..., None], axis=-1)
        return DD(hi, lo)

    def select(self, cond: npt.NDArray[np.bool_], a: DD, b: DD) -> DD:
        """``a`` where ``cond``, else ``b``; the scaled part of :class:`Weights` operands
        is selected alike (:func:`_tiny_select`: none where the chosen one has none, as at
        the special rows of the softmax, whose weights are 0, 1/|I| or NaN)."""
        hi = np.where(cond, a.hi, b.hi)
        if a.lo is None and b.lo is None:
            out = DD(hi, None)
        else:
            out = DD(hi, np.where(cond, _lo(a), _lo(b)))
        if isinstance(a, Weights) or isinstance(b, Weights):
            return Weights.of(out, _tiny_select(cond, a, b, hi.shape))
        return out

    def rearrange(self, a: DD, move: Move) -> DD:
        # a plain DD: the scaled tiny weights (Weights) are not carried through a change
        # of layout; each weight is then as hi + lo holds it, within 2**-1074 absolute
        lo = None if a.lo is None else move(np.broadcast_to(a.lo, np.shape(a.hi)))
        return DD(move(np.asarray(a.hi)), lo)

    def approx(self, a: DD) -> F64:
        return self.result(a)

    def exp(self, a: DD) -> DD:
        """:func:`exp_rows`: ``hi`` split to 26 significant bits."""
        return DD(*exp_rows(a.hi, a.lo, self._scratch))

    # -- the softmax of a shifted row (reference/softmax.py, normalise) --------------

    def sum_others(self, d: DD, k: npt.NDArray[np.intp]) -> DD:
        r""":math:`s' = \sum_{j \ne k} e^{d_j}` (:meth:`_sum_others`)."""
        return self._sum_others(self.exp(d), d, k)

    def weights(self, d: DD, k: npt.NDArray[np.intp]) -> tuple[DD, DD]:
        r""":math:`p_j = e^{d_j} / (1 + s')` and :math:`s'`.

        :math:`e^{d_j}` by :func:`exp_rows` (26-bit ``hi``), :math:`s'` by
        :meth:`_sum_others`, :math:`1 + s'` by :func:`dd_add_sloppy` (exact high part:
        TwoSum), its reciprocal by :func:`_reciprocal`, and the product by
        :meth:`_times_reciprocal` (four passes, exact high product).

        Where some :math:`d_j < -669` (:func:`_near_underflow`; hidden keys, -inf,
        included) the weights are :class:`Weights`: the same numbers, bit for bit, whose
        entries with a finite :math:`d_j < -669` (:math:`e^{d_j} < 2^{-965}`, below the
        double-double range: ``lo`` subnormal, from :math:`2^{-1022}` down ``hi`` too) are
        also carried at scale :math:`2^{600}` or :math:`2^{1200}` (:func:`_tiny_part`,
        within :math:`2^{-62}`), for :meth:`matmul`. That part is evaluated when first
        asked for (by :meth:`matmul`, :meth:`mul`, :meth:`div` or :meth:`select`): the
        softmax family never pays for it, and other rows nothing at all.
        """
        e = self.exp(d)
        s = self._sum_others(e, d, k)
        one = DD(np.ones((1,) * e.hi.ndim), None)
        r_hi, r_lo = _reciprocal(dd_add_sloppy(one, s, self._scratch))
        near = _near_underflow(d)
        p = self._times_reciprocal(e, r_hi, r_lo, near)
        if near:
            p = Weights.of(p, lambda: _tiny_part(d, r_hi, r_lo))
        return p, s

    def lse(self, a: DD, d: DD, k: npt.NDArray[np.intp], s: DD) -> DD:
        r""":math:`a + \log(1 + s')` (:meth:`log1p`, :func:`dd_add_sloppy`); rows where the
        two cancel are evaluated again from ``a`` and ``d`` (:func:`_recompute_lse`).

        The absolute error of :math:`\log(1 + s')` is about :math:`2^{-62.5}\min(1, s')`:
        not small next to a result near 0. Rows with
        :math:`|\mathrm{LSE}| < 2^{-6} s'/(1 + s')` are therefore recomputed in mpmath
        from the exact values :math:`a` and :math:`d_j` at a working precision raised
        until the float64 rounding is settled (Ziv's strategy).
        """
        out = dd_add_sloppy(a, self.log1p(s), self._scratch)
        s_hi = np.broadcast_to(s.hi, out.hi.shape)
        with np.errstate(divide="ignore"):
            need = (s_hi > 0) & (np.abs(out.hi) < 2.0**-6 * s_hi / (1.0 + s_hi))
        if not need.any():
            return out
        n = d.hi.shape[-1]
        rows = np.flatnonzero(need)
        full = (*out.hi.shape[:-1], n)

        def flat(x: F64 | float, shape: tuple[int, ...], width: int) -> F64:
            return np.broadcast_to(np.asarray(x, dtype=np.float64), shape).reshape(-1, width)

        hi, lo = _recompute_lse(
            flat(d.hi, full, n)[rows],
            flat(_lo(d), full, n)[rows],
            flat(a.hi, out.hi.shape, 1)[rows, 0],
            flat(_lo(a), out.hi.shape, 1)[rows, 0],
            np.broadcast_to(k, out.hi.shape[:-1]).reshape(-1)[rows],
        )
        out_hi = out.hi.copy()
        out_lo = np.array(np.broadcast_to(_lo(out), out_hi.shape))
        out_hi.reshape(-1)[rows] = hi
        out_lo.reshape(-1)[rows] = lo
        return DD(out_hi, out_lo)

    def log1p(self, a: DD) -> DD:
        r"""``log(1 + a)`` for :math:`a \ge 0` (one value per row): Newton on expm1.

        :math:`y_0 = \mathrm{fl}(\log1p(a_{hi}))` (numpy, a few ulps), then with
        :math:`M = \mathrm{expm1}(y_0)` (:func:`expm1_precise`) and
        :math:`c = (a - M)/(1 + M)`,

        .. math::

            \log(1+a) = y_0 + \log\Bigl(1 + \frac{a - M}{1 + M}\Bigr)
            \approx y_0 + c - c^2/2,

        where :math:`|c| \lesssim 2^{-51}y_0`, so the dropped :math:`c^3/3` and the
        rounding of :math:`c` are below :math:`2^{-100}y_0`. The difference
        :math:`a - M` is formed in double-double (its high parts nearly cancel, exactly by
        Sterbenz), and the error of :math:`M` (relative :math:`2^{-88}`) is the error of
        the result. Working on expm1 rather than exp keeps the relative accuracy for tiny
        :math:`a`, where :math:`\log(1 + a) \approx a` (log_softmax of the max element).
        """
        y0 = np.log1p(a.hi)
        m = expm1_precise(y0)
        w = dd_add(a, _neg(m))
        c = w.hi / (1.0 + m.hi)
        c -= 0.5 * c * c
        hi, lo = fast_two_sum(y0, c)
        return DD(hi, lo)

    def _sum_others(self, e: DD, d: DD, skip: npt.NDArray[np.intp]) -> DD:
        r""":func:`extract_sum` of the terms :math:`e = e^{d}` with the entry ``skip`` of
        each row set to 0.

        Terms of ``exp`` below :math:`2^{-969}` were rounded to the subnormal grid one by
        one; many of them would add up those roundings (log_softmax of the max, and
        logsumexp, are :math:`\approx s'` when :math:`s'` is tiny). For such blocks the
        terms are recomputed from ``d`` at scale :math:`2^{600}` (exactly, by
        ``exp_rows``' lift), summed, and scaled back with one rounding.
        """
        terms, lift = e, 0
        if _near_underflow(d):
            lift = _LIFT
            terms = DD(*exp_rows(d.hi, d.lo, self._scratch, lift=lift))
        hi = self._scratch.get("sum.hi", terms.hi.shape)
        np.copyto(hi, terms.hi)
        if hi.ndim == 2:
            hi[np.arange(hi.shape[0]), skip] = 0.0
        else:
            np.put_along_axis(hi, skip[..., None], 0.0, axis=-1)
        s = extract_sum(hi, terms.lo, self._scratch, overwrite=True)
        if terms.lo is not None:
            # leave out the low part of the skipped entry too (0 for e^0 = 1 exactly)
            lo_k = np.take_along_axis(terms.lo, skip[..., None], axis=-1)
            s = DD(*fast_two_sum(s.hi, s.lo - lo_k))  # type: ignore[operator]
        if lift:
            # back to scale 1: hi rounds once (to the subnormal grid if s' is that small)
            with np.errstate(under="ignore"):
                s_hi, s_lo = fast_two_sum(s.hi, s.lo)  # type: ignore[arg-type]
                s = DD(np.ldexp(s_hi, -lift), np.ldexp(s_lo, -lift))
        return s

    def result(self, a: DD) -> F64:
        if a.lo is None:
            return a.hi
        return a.hi + a.lo  # one IEEE addition: the correctly rounded value of hi + lo
