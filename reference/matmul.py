r"""Accurate matrix products from ordinary float64 BLAS calls (the Ozaki scheme).

Two products, batched and broadcasting over leading dimensions like ``np.matmul``:

:func:`dot_exact`
    :math:`\tau\, A B` for float64 :math:`A` (..., L, E) and :math:`B` (..., E, S),
    returned as a double-double ``hi + lo`` within :math:`2^{-104}` of the exact value,
    relative to :math:`\sum_l |a_{il} b_{lj}|` (the slice products are exact; only the
    final double-double rounds). Used for the attention logits :math:`\tau\, Q K^\top`.
:func:`dot_dd`
    :math:`P V` for a double-double :math:`P` (..., L, S) and float64 :math:`V`
    (..., S, Ev), within :math:`2^{-56} \sum_j |p_{ij}| |v_{jk}| + 2^{-1074}`. Used for
    the attention output.

Shape letters: L rows of the left factor (queries), E or S the inner dimension,
S or Ev the columns of the right factor.

Notes
-----
**Assumption.** Every BLAS call here is a classical matrix product: each output is a
sum of the products :math:`x_{il} y_{lj}`, in any order, with or without fused
multiply-adds. Strassen-like algorithms or reduced-precision modes (TF32, BF16x9,
tensor-core emulation) void the guarantees, since they form sums of inputs before
multiplying. OpenBLAS and MKL dgemm are classical.

**Exact slices (Ozaki, Ogita, Oishi & Rump 2012).** Scale each row :math:`i` of
:math:`A` by :math:`2^{-e_i}` and each column :math:`j` of :math:`B` by
:math:`2^{-f_j}`, with :math:`e_i` the exponent of the row's largest magnitude
(``frexp``), so that the scaled :math:`x = 2^{-e_i} a` and :math:`y` lie in
:math:`(-1, 1)`; the exponents come from each row and column, not from a global
maximum, so inputs scaled by :math:`10^{\pm 150}` are handled alike. Cut ``x`` into
integer slices by truncation, :math:`w_0 = x`,

.. math::

    t_p = \operatorname{trunc}(2^\beta w_p), \qquad w_{p+1} = 2^\beta w_p - t_p,
    \qquad x = \sum_{p<k} t_p 2^{-(p+1)\beta} + w_k 2^{-k\beta},

every step exact (a power-of-two scaling and the integer and fractional parts of a
float). Each :math:`t_p` is an integer with :math:`|t_p| \le 2^\beta - 1` and the
sign of :math:`x`, so :math:`\sum_p |t_p| 2^{-(p+1)\beta} + |w_k| 2^{-k\beta} = |x|`.
The same for :math:`y` gives slices :math:`u_q`. All pairs of the same level
:math:`s = p + q` share one BLAS call, the slices concatenated along the inner
dimension:

.. math::

    C_s = [t_{p_0}, \dots, t_{p_1}]\,[u_{s-p_0}; \dots; u_{s-p_1}]
        = \sum_{p+q=s} t_p u_q .

With :math:`N` the inner dimension of that call (the inner dimension times the
number of pairs), every partial sum is an integer below :math:`N (2^\beta-1)^2`;
choosing :math:`2\beta + \log_2 N \le 52` makes each of them a float64 integer (with
one bit to spare for the carries below), so the call is exact whatever the
summation order. ``beta`` is chosen for at most :data:`_K_MAX` = 4 pairs a level
(:math:`\beta = 22` at E = 64; randn rows need 3 slices, rows with an offset of
:math:`10^6` need 4), and :math:`x y = \sum_s 2^{-(s+2)\beta} C_s` plus the terms
with the remainders :math:`w_k`, which are nonzero only when a row (column) spans
more than :math:`4\beta - 53` binades. Those are handled by recursion, for the
affected rows and columns only: :math:`x y = x' y' + x' r_y + r_x y` with
:math:`x'` the kept part and :math:`r_x` the remainder (renormalized by its own
row maxima), until every remainder is zero: the products are then exact, whatever
the inputs' range.

**Carrying the levels into double-double.** From the deepest level up, each
:math:`C_s` is split exactly as :math:`2^\beta H + R` with
:math:`H = \operatorname{rint}(2^{-\beta} C_s)`, :math:`|R| \le 2^{\beta-1}`, and
:math:`H` is added to :math:`C_{s-1}` (exact: below :math:`2^{53}`). Then
:math:`\sum_s 2^{-(s+2)\beta} C_s = a_0 + a_1 + a_2` exactly, with :math:`a_0` the
carried level 0, and :math:`a_1 + a_2` the digits :math:`R` paired into floats of
:math:`2\beta + 1` bits and summed by TwoSum (exact for up to five levels; for six or
seven, :math:`a_2` is rounded once, an error below :math:`2^{-(2\beta + 106)}` in
scaled units, where :math:`|x|, |y| < 1`). The double-double is
:math:`(h, e) = \mathrm{TwoSum}(a_0, a_1)`, :math:`(s, t) = \mathrm{TwoSum}(e, a_2)`,
:math:`(h', l) = \mathrm{TwoSum}(h, s)`, :math:`l \mathrel{+}= t`, renormalized by
TwoSum: one rounding, of a part below :math:`u |h'|`, so the error is at most
:math:`u^2 |c|` plus the term above. When :math:`\tau` is a power of two the cheaper
:math:`(h, e + a_2)` renormalized by Fast2Sum is used: its one rounding is at most
:math:`2.0001\, u^2 |c|`, since :math:`|a_2| \le u |a_1|` and :math:`a_0` is 0 or
above :math:`2 |a_1| (1 - 2^{1-\beta})`. Where recursion added terms, they are summed
with the parts above by a three-level TwoSum cascade (SumK with K = 3, Ogita, Rump &
Oishi 2005, Alg. 4.8), whose error is :math:`u^2 |c| + 5 m^3 u^3 \sum_i |c_i|` for
:math:`m` terms :math:`c_i`, with :math:`\sum_i |c_i| \le \sum_l |x_{il}| |y_{lj}|`
(up to the carried digits), since slices and remainders carry the signs of their
entries.

**Scale factor.** A power of two :math:`\tau = \pm 2^m` is folded into the row
exponents. Otherwise :math:`\tau = \pm 2^m \mu` with :math:`\mu \in (1/2, 1)`, and the
double-double :math:`h + l` of the product (in scaled units) is multiplied by
:math:`\mu`: TwoProduct (Dekker 1971) of :math:`h`, :math:`l \mu` rounded (error
:math:`\le u^2 |\mu h|`), the parts renormalized with one more rounding
(:math:`\le u^2 |\mu c|`): :math:`2 u^2 |\tau c|` in all. This gives the same
guarantee as splitting :math:`\tau a_{il}` into two matrices by TwoProduct (which
doubles the inner dimension), at a fraction of the cost, and with no underflow of
the TwoProduct error for tiny entries.

**Guarantee of dot_exact.** For finite inputs, with :math:`c_{ij} = \tau \sum_l
a_{il} b_{lj}`, :math:`\alpha_i = \max_l |a_{il}|`, :math:`\beta_j = \max_l |b_{lj}|`:

.. math::

    |hi_{ij} + lo_{ij} - c_{ij}| \le 2^{-104} |\tau| \sum_l |a_{il} b_{lj}|
        + 2^{-140} |\tau| \alpha_i \beta_j + 2^{-1074}.

The first term holds :math:`3 u^2 |c_{ij}|` (:math:`u^2` from the double-double and
:math:`2u^2` from :math:`\tau`, or :math:`2.0001 u^2` in all for a power of two) and the
cascade's term. The second covers the rounded
:math:`a_2` of six or seven levels (rows or columns spanning more than about
:math:`5\beta - 53` binades), at most :math:`2^{-(2\beta+104)} \alpha_i \beta_j`, with
:math:`\beta \ge 18` for E up to :math:`2^{14}` (beyond, the second term is
:math:`2^{-(2\beta + 104)}` instead of :math:`2^{-140}`); and entries more than about
1000 binades below their row's (column's) maximum, whose scaling underflows. The
third covers the final rounding of a subnormal ``lo`` and ``hi``. ``hi`` is the
float64 nearest to ``hi + lo``, and :math:`|lo| \le \mathrm{ulp}(hi)/2`, except that a
subnormal ``lo`` is rounded (to a multiple of :math:`2^{-1074}`), which can make
``hi + lo`` a tie. A product that overflows float64 is
:math:`\pm\infty` in ``hi`` with ``lo = 0``. Rows of ``a`` or columns of ``b``
holding inf or NaN give numpy's float64 product for their entries (IEEE inf/NaN),
with ``lo = 0``.

**dot_dd (P V).** The exact scheme on the whole of :math:`P` would need many slices:
softmax weights span hundreds of binades. Instead, with :math:`x` the row-scaled
``p_hi`` and ``l`` the row-scaled ``p_lo``, and two slices of each side
(:math:`x = x' + r_x`, :math:`y = y' + r_y`, :math:`|r_x|, |r_y| < 2^{-2\beta}` in
scaled units),

.. math::

    (x + l) y = x' y' + [x',\ \mathrm{fl}(r_x + l)]\,[r_y;\ y] + \delta,

where :math:`x' y'` is exact (three levels, four pair products) and the second term
is one plain BLAS call of inner dimension 2S. Its rounding errors, with that of
:math:`\mathrm{fl}(r_x + l)`, are at most
:math:`\gamma_{2S} \sum_j |x'_{ij}| |r_{y,jk}| + (\gamma_{2S} + u) \sum_j |r_{x,ij} +
l_{ij}| |y_{jk}|` (Higham 2002, eq. 3.5): small because the remainders are, but
small against :math:`\max_j |v_{jk}|`, not against :math:`\sum_j p_{ij} |v_{jk}|`
(the trap: a dominant key whose value is 0). So each output carries a certificate: a
rigorous upper bound :math:`E_{ik}` of its error, from row sums and column maxima,
is compared with :math:`2^{-56}` times a lower bound of :math:`\sum_j |p_{ij}|
|v_{jk}|`: first :math:`|hi| - E` (free), then, for the failing rows only, one BLAS
product :math:`|x| |y|` minus a bound of :math:`\sum_j |l_{ij}| |y_{jk}|`. Rows
that still fail are recomputed exactly by the scheme of :func:`dot_exact`, with
``p_hi`` and ``p_lo`` as two parts.

**Underflow and keys of weight 0.** The scaled units are :math:`2^{e_i + f_k}`, about
:math:`\max_j |p_{ij}| \max_j |v_{jk}|`, with the column maximum over all keys. An
output whose mass :math:`\sum_j |p_{ij}| |v_{jk}|` is below :math:`2^{-1022}` of that
(a value of 1e300 at a key the row gives weight 0, or a weight far below the row's
largest at the key of the column's largest value) falls among the subnormals in those
units, where float64 rounds absolutely: a hidden 1e300 once changed a visible output
of about 2e-22 by 3%. Three measures keep the bound relative. (1) In a block of rows,
keys whose column of :math:`P` is exactly 0 throughout the block have their values set
to 0 (exact: they multiply zeros) and the right factor is scaled and sliced again, when
they hold values more than 16 binades above those of the other keys in some column
(closer, they only change the slicing: the products are the same up to the
certificate). (2) The certificate adds what underflow can cost in scaled units, at
most :math:`2^{-1072}(S + 1 + \sum_j |x_{ij}| + \sum_j |w_{ij}|)` (the rounding of the
scaled operands, each product of the BLAS call, the bound's own products), so that an
output near the underflow threshold of its units fails it. (3) Failing rows are
recomputed exactly as above only where the exact scheme's bound (:math:`2^{-104}` of
the mass, :math:`2^{-140}(\max|x| + \max|l|)`, :math:`2^{-1074}` and the underflow term)
is below :math:`2^{-57}` of the mass's lower bound in every column. The other rows are
done again together, in a product of their own whose blocks leave out (by (1)) the keys
none of them weights (rows blind to a huge key, among rows that see it, are then
ordinary); what fails there too is computed from its own terms (:func:`_dot_dd_terms`):
each nonzero part of each weight times each value, exact by TwoProduct on the
mantissas, in units of the output's largest term, summed by error-free extraction and
scaled back once (about 10 ms a row at S = 1024, Ev = 64), from the row's keys of
nonzero weight only. So no value at a key of weight 0 enters any bound, and for finite
inputs

.. math::

    |hi_{ik} + lo_{ik} - \textstyle\sum_j p_{ij} v_{jk}|
        \le 2^{-56} \sum_j |p_{ij}| |v_{jk}| + 2^{-1074},

with :math:`p = p_{hi} + p_{lo}` exactly (:math:`2^{-1074}`: an output in the subnormal
range rounds ``hi`` and ``lo``, by half a subnormal ulp each). Rounded to float64
(``hi``), the output is within :math:`(2^{-53} + 2^{-56}) \sum_j |p_{ij}| |v_{jk}| +
2^{-1074}` of the exact product of the given :math:`P`: 1.125u, leaving more than 2.8u of
the attention bound :math:`4u \sum_j p_{ij} |v_{jk}|` to the error of :math:`P` itself.
This stronger bound was chosen over :math:`4u \sum_j p_{ij} |v_{jk}| + 2^{-60}
\max_j|v_{jk}|` because the certificate is cheap (row sums and column maxima, no
extra BLAS call unless an output nearly cancels) and the exact recomputation touches
only the rows of such traps. (It bounds the error of the product of the weights it is
given: a weight below :math:`2^{-969}` carries an absolute error of its own, up to
:math:`2^{-1074}` (below :math:`2^{-1022}` it is a subnormal float64), which no product of
those numbers can undo. :meth:`attnspec.reference.doubledouble.DoubleDouble.matmul` therefore
takes such weights at scale :math:`2^{600}` or :math:`2^{1200}` and calls this function on
the scaled weights, for the rows where they matter.)

**Memory.** Rows are processed in blocks: the workspace is a few arrays of
(block, S) for :func:`dot_exact` and (block, 2S) for :func:`dot_dd`, besides the
outputs themselves.

References
----------
Ozaki, K., Ogita, T., Oishi, S., Rump, S. M. (2012). Error-free transformations of
matrix multiplication by using fast routines of matrix multiplication and its
applications. Numerical Algorithms 59, 95-118. doi:10.1007/s11075-011-9478-1

Ogita, T., Rump, S. M., Oishi, S. (2005). Accurate sum and dot product. SIAM J. Sci.
Comput. 26(6), 1955-1988. doi:10.1137/030601818

Dekker, T. J. (1971). A floating-point technique for extending the available
precision. Numerische Mathematik 18, 224-242. doi:10.1007/BF01397083

Higham, N. J. (2002). Accuracy and Stability of Numerical Algorithms, 2nd ed.,
SIAM. doi:10.1137/1.9780898718027
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from attnspec.reference.eft import fast_two_sum, two_prod, two_sum
from attnspec.reference.inputs import as_real_float64

__all__ = ["DD_CERTIFICATE", "dot_dd", "dot_exact"]

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

#: at most this many slices of a row (column) in one pass of :func:`dot_exact`;
#: what is left goes to a recursive call.
_K_MAX = 4
#: slices of each side in :func:`dot_dd`.
_K_DD = 2
#: target number of output elements in one row block of :func:`dot_exact`.
_BLOCK_OUT = 1 << 16
#: the largest number of columns :func:`dot_exact` handles at once.
_COL_BLOCK = 2048
#: target number of elements of the left factor in one row block of :func:`dot_dd`.
_BLOCK_IN = 1 << 17
#: the relative error :func:`dot_dd` certifies, against sum_j |p_ij| |v_jk|.
DD_CERTIFICATE = 2.0**-56
_U = 2.0**-53


def _gamma(n: int) -> float:
    """An upper bound of gamma_n = n u / (1 - n u), rounded up generously."""
    nu = n * _U
    return nu / (1.0 - nu) * (1.0 + 2.0**-40) if nu < 0.5 else math.inf


def _beta(n_terms: int, bits: int = 53) -> int:
    """The largest beta with n_terms * 2**(2 beta) <= 2**bits (at least 1)."""
    need = max(int(n_terms) - 1, 0).bit_length()  # ceil(log2(n_terms))
    return max((bits - need) // 2, 1)


def _exponents(m: F64) -> I64:
    """Exponents e with m < 2**e (frexp), 0 for m == 0; m >= 0 finite."""
    return np.frexp(m)[1].astype(np.int64)


def _pow2(e: I64) -> F64:
    """2.0**e, exact for -1074 <= e <= 1023."""
    return np.ldexp(np.ones(e.shape), e.astype(np.int32))


def _in_normal_range(*es: I64) -> bool:
    return all(e.size == 0 or (int(e.min()) >= -1022 and int(e.max()) <= 1023) for e in es)


def _scale_rows(x: F64, e: I64) -> F64:
    """x * 2**-e[:, None], correctly rounded (exact unless the result is subnormal)."""
    if _in_normal_range(-e):
        return x * _pow2(-e)[:, None]
    return np.ldexp(x, (-e).astype(np.int32)[:, None])


def _scale_cols(y: F64, f: I64) -> F64:
    if _in_normal_range(-f):
        return y * _pow2(-f)[None, :]
    return np.ldexp(y, (-f).astype(np.int32)[None, :])


def _scale_out(h: F64, e: I64, f: I64) -> F64:
    """h * 2**(e_i + f_j), one rounding (exact unless subnormal or overflowing)."""
    if h.size == 0:
        return h
    if _in_normal_range(e, f):
        es = e[:, None] + f[None, :]
        if int(es.min()) >= -1074 and int(es.max()) <= 1023:
            g = _pow2(e)[:, None] * _pow2(f)[None, :]  # exact: a power of two in range
            with np.errstate(over="ignore"):  # a product beyond float64's range is inf
                return h * g
    with np.errstate(over="ignore"):  # as above
        return np.ldexp(h, (e[:, None] + f[None, :]).astype(np.int32))


class _Cascade:
    """Three-level TwoSum cascade (SumK with K = 3): see the module Notes.

    Works in place in preallocated arrays (temporaries of a few hundred KB would
    otherwise be mapped and unmapped at every operation).
    """

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.h = np.zeros(shape)
        self.l1 = np.zeros(shape)
        self.l2 = np.zeros(shape)
        self._s = np.empty(shape)
        self._t = np.empty(shape)
        self._u = np.empty(shape)
        self.count = 0

    def _two_sum_into(self, a: F64, b: F64) -> None:
        """a, b <- TwoSum(a, b) in place: a = fl(a + b), b = the exact error."""
        s, t, u = self._s, self._t, self._u
        np.add(a, b, out=s)
        np.subtract(s, a, out=t)  # t = s - a
        np.subtract(s, t, out=u)  # u = s - t
        np.subtract(a, u, out=u)  # u = a - (s - t)
        np.subtract(b, t, out=t)  # t = b - t
        np.add(u, t, out=b)  # error
        a[...] = s

    def add(self, c: F64) -> None:
        """Add c (destroyed: it is used as workspace)."""
        if self.count == 0:
            self.h[...] = c
            self.l1.fill(0.0)
            self.l2.fill(0.0)
        elif self.count == 1:
            self._two_sum_into(self.h, c)
            self.l1[...] = c
        else:
            self._two_sum_into(self.h, c)
            self._two_sum_into(self.l1, c)
            self.l2 += c
        self.count += 1

    def result(self) -> tuple[F64, F64]:
        if self.count == 0:
            return np.zeros_like(self.h), np.zeros_like(self.h)
        hi, lo = two_sum(self.h, self.l1)
        lo += self.l2
        return two_sum(hi, lo)


def _slices(
    w: F64, beta: int, kmax: int, out: F64, n: int, reverse: bool, stop: bool = True
) -> tuple[int, F64]:
    """Cut w (|w| < 1) into integer slices t_p = trunc(2**beta w_p), written into out.

    ``out`` holds kmax blocks of ``n`` along axis 1 (reverse=False: block p is slice p)
    or axis 0 (reverse=True: block kmax-1-q is slice q). Returns the number k of
    slices taken (fewer than kmax when the remainder became 0) and the remainder in
    the units of w (zero array when exact).
    """
    scale = 2.0**beta
    r = w * scale
    k = 0
    while k < kmax:
        if k:
            r *= scale
        dst = out[(kmax - 1 - k) * n : (kmax - k) * n] if reverse else out[:, k * n : (k + 1) * n]
        np.trunc(r, out=dst)
        r -= dst  # exact: the fractional part
        k += 1
        if stop and not r.any():
            # the slices not taken are 0 (dot_dd reads all kmax of them)
            if reverse:
                out[: (kmax - k) * n] = 0.0
            else:
                out[:, k * n :] = 0.0
            return k, np.zeros_like(w)
    r *= 2.0 ** (-k * beta)
    return k, r


class _Work:
    """Preallocated (rows, S) arrays for _levels_carried, reused by every block."""

    def __init__(self, rows: int, S: int) -> None:
        self.levels = np.empty((2 * _K_MAX - 1, rows, S))
        self.carry = np.empty((rows, S))
        self.tmp = np.empty((rows, S))
        self.zero = np.zeros((rows, S))

    def view(self, rows: int) -> tuple[F64, F64, F64, F64]:
        return self.levels[:, :rows], self.carry[:rows], self.tmp[:rows], self.zero[:rows]


def _levels_carried(
    xbuf: F64, ubuf: F64, kx: int, ky: int, n: int, beta: int, work: _Work
) -> tuple[F64, F64, F64]:
    """The product of the sliced parts as three floats a0 + a1 + a2, exactly.

    Level s (units 2**-(s+2) beta) is an integer C_s below 2**52. From the deepest
    level up, C_s = 2**beta H + R with H = rint(2**-beta C_s) and |R| <= 2**(beta-1)
    (both exact), and H is carried into C_(s-1) (exact: still below 2**53). Two
    consecutive digits R make one float exactly (2 beta + 1 bits); these few
    floats, each below 2**-2beta of the one before, are summed by TwoSum into
    a1 + a2 (exact for up to 5 levels; beyond, a2 is rounded once, an error below
    2**-(4 beta + 53) in the units of x and y). a0 holds the carried level 0.
    The arrays returned live in ``work`` until the next call.
    """
    m = kx + ky - 1
    up, down = 2.0**beta, 2.0**-beta
    levels, carry, tmp, zero = work.view(xbuf.shape[0])
    for s in range(m - 1, -1, -1):
        p0, p1 = max(0, s - ky + 1), min(s, kx - 1)
        left = xbuf[:, p0 * n : (p1 + 1) * n]
        right = ubuf[(_K_MAX - 1 - (s - p0)) * n : (_K_MAX - (s - p1)) * n]
        c = levels[s]
        np.matmul(left, right, out=c)  # exact: integers below 2**52
        if s < m - 1:
            c += carry  # exact, as above
        if s == 0:
            break
        np.multiply(c, down, out=carry)
        np.rint(carry, out=carry)
        np.multiply(carry, up, out=tmp)
        c -= tmp  # exact: the digit R_s, |R_s| <= 2**(beta-1)
    a0 = levels[0]
    a0 *= 2.0 ** (-2 * beta)
    # R_s has units 2**-(s+2) beta; words pair (R_1, R_2), (R_3, R_4), ...
    words: list[F64] = []
    for s in range(1, m, 2):
        w = levels[s]
        if s + 1 < m:
            w *= up
            w += levels[s + 1]  # exact: at most 2 beta + 1 bits
            w *= 2.0 ** (-(s + 3) * beta)
        else:
            w *= 2.0 ** (-(s + 2) * beta)
        words.append(w)
    if not words:
        return a0, zero, zero
    a1 = words[-1]
    if len(words) == 1:
        return a0, a1, zero
    a2 = np.zeros_like(a0)
    for w in reversed(words[:-1]):
        a1, e = two_sum(w, a1)
        a2 += e
    return a0, a1, a2


def _dd_times(h: F64, lo: F64, t: float) -> tuple[F64, F64]:
    """(h + lo) * t as a double-double, t in (0.5, 1): error <= 2 u**2 |t (h + lo)|.

    TwoProduct of h; the product lo * t rounded (error u |lo t| <= u**2 |t h|); the
    three parts renormalized, one more rounding of the last part (u**2 |result|).
    """
    p, e = two_prod(h, np.asarray(t, dtype=np.float64))
    s1, s2 = two_sum(e, lo * t)
    hh, l1 = fast_two_sum(p, s1)
    l1 += s2
    return fast_two_sum(hh, l1)


def _carried_to_dd(a0: F64, a1: F64, a2: F64) -> tuple[F64, F64]:
    """hi + lo = a0 + a1 + a2 from _levels_carried, error <= 2.0001 u**2 |hi|.

    (h, e) = TwoSum(a0, a1) is exact. a0 is 0 (then h = a1, e = 0 and e + a2 = a2 is
    exact) or a multiple of 2**-2beta, while |a1| <= 2**-(2beta+1) (1 + 2**(1-beta)), so
    |a2| <= u |a1| <= u |h| (1 + 2**(3-beta)); adding a2 to e rounds once, by at most
    u (|e| + |a2|) <= 2 u**2 |h| (1 + 2**(3-beta)).
    """
    h, e = two_sum(a0, a1)
    e += a2
    return fast_two_sum(h, e)


def _state_to_dd(s0: F64, s1: F64, s2: F64) -> tuple[F64, F64]:
    """hi + lo = s0 + s1 + s2 (carried levels or a cascade's state), error <= u**2 |hi|.

    Two TwoSums leave h + s + t exactly, the last part rounded once when added to a
    part below u |h| (within u**2 of the result), then renormalized.
    """
    h, e = two_sum(s0, s1)
    s, t = two_sum(e, s2)
    hh, lo = two_sum(h, s)
    lo += t
    return two_sum(hh, lo)


class _YSide:
    """The right factor, scaled by column and sliced once for all row blocks."""

    def __init__(self, y: F64, n_pairs: int) -> None:
        n = y.shape[0]
        self.n = n
        self.f = _exponents(np.max(np.abs(y), axis=0))
        self.yn = _scale_cols(y, self.f)
        self.beta = _beta(n * n_pairs, 52)
        self.ubuf = np.empty((_K_MAX * n, y.shape[1]))
        self.ky, self.rem = _slices(self.yn, self.beta, _K_MAX, self.ubuf, n, reverse=True)
        self.rem_cols = np.flatnonzero(self.rem.any(axis=0))

    def rescaled(self) -> _YSide:
        """The same slices for the scaled factor yn itself (its column exponents are 0:
        every nonzero column of yn has its maximum in [1/2, 1)), for recursion."""
        other = copy.copy(self)
        other.f = np.zeros_like(self.f)
        return other


State = tuple[F64, F64, F64]
#: writes a state (three arrays summing to the product, in scaled units; carried = the
#: a0, a1, a2 of _levels_carried, else a cascade's state) for the given rows and
#: columns, with the row and column exponents that scale it back
Sink = Callable[[State, bool, Any, Any, I64, I64], None]


def _cascade_state(terms: list[F64]) -> State:
    acc = _Cascade(terms[0].shape)
    for t in terms:
        acc.add(t.copy())
    return acc.h, acc.l1, acc.l2


def _product(parts: list[F64], y: F64, sink: Sink, ys: _YSide | None = None) -> None:
    """Feed ``sink`` with the exact product (sum of parts) @ y, block by block.

    Each part is scaled by its own row maxima and sliced on its own (parts that
    differ by 2**53, as p_hi and p_lo, would otherwise need twice the slices).
    The sliced parts give three exact floats per entry (_levels_carried); the
    remainders (rows or columns spanning more than K beta - 53 binades) are
    multiplied by recursion, once for all blocks, and the entries they touch are
    summed again by the cascade.
    """
    L, n = parts[0].shape
    S = y.shape[1]
    if L == 0 or S == 0:
        return
    if S > _COL_BLOCK:  # keep the (rows, S) workspace in cache: blocks of columns
        for c0 in range(0, S, _COL_BLOCK):
            c1 = min(S, c0 + _COL_BLOCK)

            def shifted(
                state: State,
                carried: bool,
                ri: Any,
                ci: Any,
                e: I64,
                f: I64,
                c0: int = c0,
                c1: int = c1,
            ) -> None:
                cols = slice(c0, c1) if isinstance(ci, slice) else ci + c0
                sink(state, carried, ri, cols, e, f)

            _product(parts, y[:, c0:c1], shifted)
        return
    if ys is None:
        ys = _YSide(y, _K_MAX)
    C = ys.rem_cols
    e_parts = [_exponents(np.max(np.abs(x), axis=1)) for x in parts]
    e_acc = np.maximum.reduce(e_parts) if len(parts) > 1 else e_parts[0]
    rows = max(1, min(L, max(16, _BLOCK_OUT // max(S, 1))))
    xbuf_all = np.empty((rows, _K_MAX * n))
    work = _Work(rows, S)
    kept = [np.empty((L, n)) for _ in parts] if C.size else []
    rem_rows: list[list[I64]] = [[] for _ in parts]
    rem_vals: list[list[F64]] = [[] for _ in parts]
    saved_rows: dict[int, State] = {}  # main state of rows with a remainder
    saved_cols: list[State] = []  # main state at the columns C, block by block
    for r0 in range(0, L, rows):
        r1 = min(L, r0 + rows)
        ea = e_acc[r0:r1]
        terms: list[F64] = []
        block_rem = np.zeros(r1 - r0, dtype=bool)
        for j, (x, e) in enumerate(zip(parts, e_parts, strict=True)):
            xn = _scale_rows(x[r0:r1], e[r0:r1])
            xbuf = xbuf_all[: r1 - r0]
            kx, xrem = _slices(xn, ys.beta, _K_MAX, xbuf, n, reverse=False)
            three = _levels_carried(xbuf, ys.ubuf, kx, ys.ky, n, ys.beta, work)
            d = e[r0:r1] - ea  # <= 0: this part's units relative to the block's
            if len(parts) > 1:
                g = _pow2(d)[:, None]  # exact unless it underflows (the 2**-140 term)
                three = (three[0] * g, three[1] * g, three[2] * g)
            terms.extend(three)
            rr = np.flatnonzero(xrem.any(axis=1))
            if rr.size:
                block_rem[rr] = True
                rem_rows[j].append(rr + r0)
                rem_vals[j].append(xrem[rr] * _pow2(d[rr])[:, None])
            if C.size:
                kept[j][r0:r1] = _scale_rows(xn - xrem, -d)
        state = (terms[0], terms[1], terms[2]) if len(terms) == 3 else _cascade_state(terms)
        sink(state, len(terms) == 3, slice(r0, r1), slice(None), ea, ys.f)
        for i in np.flatnonzero(block_rem):
            saved_rows[r0 + int(i)] = (state[0][i].copy(), state[1][i].copy(), state[2][i].copy())
        if C.size:
            saved_cols.append((state[0][:, C], state[1][:, C], state[2][:, C]))
    if not saved_rows and not C.size:
        return

    # The remainders, by recursion (each renormalized by its own maxima).
    R = np.array(sorted(saved_rows), dtype=np.int64)
    pos = {int(r): k for k, r in enumerate(R)}
    extra_rows: list[F64] = []
    for j in range(len(parts)):
        if rem_rows[j]:
            idx = np.concatenate(rem_rows[j])
            sub = _product_state([np.concatenate(rem_vals[j])], ys.yn, ys.rescaled())
            where = np.array([pos[int(r)] for r in idx], dtype=np.int64)
            for t in sub:
                full = np.zeros((R.size, S))
                full[where] = t
                extra_rows.append(full)
    extra_cols: list[F64] = []
    if C.size:
        extra_cols = list(_product_state(kept, ys.rem[:, C]))
    e_rows = e_acc
    if R.size:
        terms = [np.stack([saved_rows[int(r)][k] for r in R]) for k in range(3)]
        terms += extra_rows
        for t in extra_cols:
            full = np.zeros((R.size, S))
            full[:, C] = t[R]
            terms.append(full)
        sink(_cascade_state(terms), False, R, slice(None), e_rows[R], ys.f)
    if C.size:
        others = np.setdiff1d(np.arange(L), R)
        if others.size:
            main = [np.concatenate([s[k] for s in saved_cols])[others] for k in range(3)]
            terms = main + [t[others] for t in extra_cols]
            sink(_cascade_state(terms), False, others[:, None], C, e_rows[others], ys.f[C])


def _product_state(parts: list[F64], y: F64, ys: _YSide | None = None) -> State:
    """(sum of parts) @ y as three arrays whose sum is the product (for recursion)."""
    L, S = parts[0].shape[0], y.shape[1]
    out = (np.zeros((L, S)), np.zeros((L, S)), np.zeros((L, S)))

    def sink(state: State, carried: bool, ri: Any, ci: Any, e: I64, f: I64) -> None:
        for o, t in zip(out, state, strict=True):
            o[ri, ci] = _scale_out(t, e, f)

    if parts[0].shape[1]:
        _product(parts, y, sink, ys)
    return out


def _exact_2d(
    parts: list[F64],
    y: F64,
    shift: I64 | None = None,
    tau: float | None = None,
    out: tuple[F64, F64] | None = None,
) -> tuple[F64, F64]:
    """hi + lo = tau 2**shift_i (sum of parts) @ y, tau in (0.5, 1) (2-D, finite)."""
    L, n = parts[0].shape
    S = y.shape[1]
    if out is None:
        hi, lo = np.empty((L, S)), np.empty((L, S))
    else:
        hi, lo = out
    if not n:
        hi.fill(0.0)
        lo.fill(0.0)

    def sink(state: State, carried: bool, ri: Any, ci: Any, e: I64, f: I64) -> None:
        if tau is None and carried:
            h, lo_ = _carried_to_dd(*state)
        else:
            h, lo_ = _state_to_dd(*state)
        if tau is not None:
            h, lo_ = _dd_times(h, lo_, tau)
        if shift is not None:
            e = e + shift[ri].reshape(e.shape)
        hi[ri, ci] = _scale_out(h, e, f)
        lo[ri, ci] = _scale_out(lo_, e, f)

    if n:
        _product(parts, y, sink)
    _clear_lo_where_overflow(hi, lo)
    return hi, lo


def _clear_lo_where_overflow(hi: F64, lo: F64) -> None:
    inf = np.isinf(hi)
    if inf.any():
        lo[inf] = 0.0


def _check_operands(a: F64, b: F64, names: tuple[str, str]) -> tuple[int, ...]:
    """Broadcast batch shape of a (..., L, E) @ b (..., E, S), or a clear error."""
    na, nb = names
    if a.ndim < 2:
        raise ValueError(f"{na} must have at least 2 dimensions (..., L, E), got shape {a.shape}")
    if b.ndim < 2:
        raise ValueError(f"{nb} must have at least 2 dimensions (..., E, S), got shape {b.shape}")
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(
            f"inner dimensions differ: {na} has shape {a.shape} (last axis {a.shape[-1]}) "
            f"and {nb} has shape {b.shape} (second-to-last axis {b.shape[-2]})"
        )
    try:
        return tuple(np.broadcast_shapes(a.shape[:-2], b.shape[:-2]))
    except ValueError:
        raise ValueError(
            f"batch dimensions of {na} {a.shape[:-2]} and {nb} {b.shape[:-2]} "
            f"(shapes {a.shape} and {b.shape}) do not broadcast"
        ) from None


def _finite_mask(a: F64, axis: int) -> npt.NDArray[np.bool_]:
    return np.asarray(np.isfinite(a).all(axis=axis))


def _plain(a: F64, b: F64) -> F64:
    """numpy's float64 product, IEEE special values included."""
    with np.errstate(invalid="ignore", over="ignore"):  # inf * 0 is NaN, by design
        return np.asarray(a @ b, dtype=np.float64)


def dot_exact(a: npt.ArrayLike, b: npt.ArrayLike, *, scale: float | None = None) -> tuple[F64, F64]:
    r"""The product ``scale * (a @ b)`` as a double-double ``hi + lo``.

    Parameters
    ----------
    a : array_like, shape (..., L, E)
        Real numbers (converted to float64 exactly, see
        :func:`attnspec.reference.inputs.as_real_float64`).
    b : array_like, shape (..., E, S)
        Real numbers; batch dimensions broadcast with those of ``a``.
    scale : float, optional
        A finite factor :math:`\tau` folded in exactly (TwoProduct when it is not a
        power of two). Default 1.

    Returns
    -------
    hi, lo : ndarray of float64, shape (..., L, S)
        ``hi + lo`` is within :math:`2^{-104} |\tau| \sum_l |a_{il} b_{lj}|
        + 2^{-140} |\tau| \max_l |a_{il}| \max_l |b_{lj}| + 2^{-1074}` of
        :math:`\tau \sum_l a_{il} b_{lj}`; ``|lo| <= ulp(hi) / 2``. Inner dimension 0
        gives zeros. See the module Notes for the algorithm, the assumption of a
        classical dgemm, and infinities and NaN.

    Examples
    --------
    >>> import numpy as np
    >>> hi, lo = dot_exact(np.array([[1.0, 1e-20]]), np.array([[1.0], [1.0]]))
    >>> float(hi[0, 0]), float(lo[0, 0])
    (1.0, 1e-20)
    """
    a64 = as_real_float64(a, "a")
    b64 = as_real_float64(b, "b")
    batch = _check_operands(a64, b64, ("a", "b"))
    tau = 1.0 if scale is None else _check_scale(scale)
    L, n, S = a64.shape[-2], a64.shape[-1], b64.shape[-1]
    hi = np.empty((*batch, L, S))
    lo = np.empty((*batch, L, S))
    ab = np.broadcast_to(a64, (*batch, L, n))
    bb = np.broadcast_to(b64, (*batch, n, S))
    for idx in np.ndindex(batch):
        _dot_exact_2d(ab[idx], bb[idx], tau, (hi[idx], lo[idx]))
    return hi, lo


def _check_scale(scale: object) -> float:
    if isinstance(scale, bool) or not isinstance(scale, int | float | np.integer | np.floating):
        raise TypeError(f"scale must be a real number, got {scale!r}")
    tau = float(scale)
    if not math.isfinite(tau):
        raise ValueError(f"scale must be finite, got {scale!r}")
    return tau


def _dot_exact_2d(a: F64, b: F64, tau: float, out: tuple[F64, F64]) -> None:
    """dot_exact for one 2-D pair, written into out = (hi, lo)."""
    hi, lo = out
    L, S = hi.shape
    if L == 0 or S == 0:
        return
    a_in, b_in = a, b
    good_r = _finite_mask(a, 1)
    good_c = _finite_mask(b, 0)
    all_good = bool(good_r.all() and good_c.all())
    if not all_good:
        a = np.where(good_r[:, None], a, 0.0)
        b = np.where(good_c[None, :], b, 0.0)
    if tau == 0.0:
        hi.fill(0.0)
        lo.fill(0.0)
    else:
        mt, et = math.frexp(tau)  # tau = mt * 2**et, 0.5 <= |mt| < 1
        if mt < 0:
            a, mt = -a, -mt
        shift = np.full(L, et, dtype=np.int64)
        if mt == 0.5:  # a power of two: folded into the row exponents
            _exact_2d([a], b, shift=shift - 1, out=out)
        else:  # the double-double product times mt (see the Notes)
            _exact_2d([a], b, shift=shift, tau=mt, out=out)
    if not all_good:
        bad = ~good_r[:, None] | ~good_c[None, :]
        with np.errstate(invalid="ignore", over="ignore"):  # IEEE inf/NaN, by design
            plain = tau * _plain(a_in, b_in)
        hi[bad] = plain[bad]
        lo[bad] = 0.0


def dot_dd(p_hi: npt.ArrayLike, p_lo: npt.ArrayLike, v: npt.ArrayLike) -> tuple[F64, F64]:
    r"""The product ``(p_hi + p_lo) @ v`` of a double-double and a float64 matrix.

    Parameters
    ----------
    p_hi, p_lo : array_like, shape (..., L, S)
        The two parts of :math:`P = p_{hi} + p_{lo}` (attention weights in [0, 1]
        in the intended use; any finite reals are accepted). Same shape.
    v : array_like, shape (..., S, Ev)
        Real numbers; batch dimensions broadcast with those of ``p_hi``.

    Returns
    -------
    hi, lo : ndarray of float64, shape (..., L, Ev)
        ``hi + lo`` within :math:`2^{-56} \sum_j |p_{ij}| |v_{jk}| + 2^{-1074}` of
        :math:`\sum_j p_{ij} v_{jk}` (keys of weight 0 play no part, whatever their
        finite values); ``|lo| <= ulp(hi) / 2``, so ``hi`` alone is within
        :math:`(2^{-53} + 2^{-56}) \sum_j |p_{ij}| |v_{jk}| + 2^{-1074}`. See the
        module Notes (certificate, underflow, recomputation); rows of ``P`` or
        columns of ``v`` holding inf or NaN give numpy's float64 product of
        ``p_hi + p_lo`` and ``v`` for their entries, with ``lo = 0``.

    Examples
    --------
    >>> import numpy as np
    >>> hi, lo = dot_dd(np.array([[1.0, 2.0**-60]]), np.zeros((1, 2)), np.array([[0.0], [1.0]]))
    >>> float(hi[0, 0]) == 2.0**-60
    True
    """
    ph = as_real_float64(p_hi, "p_hi")
    pl = as_real_float64(p_lo, "p_lo")
    v64 = as_real_float64(v, "v")
    if ph.shape != pl.shape:
        raise ValueError(
            f"p_hi and p_lo must have the same shape (..., L, S), got {ph.shape} and {pl.shape}"
        )
    batch = _check_operands(ph, v64, ("p_hi", "v"))
    L, S, Ev = ph.shape[-2], ph.shape[-1], v64.shape[-1]
    hi = np.zeros((*batch, L, Ev))
    lo = np.zeros((*batch, L, Ev))
    phb = np.broadcast_to(ph, (*batch, L, S))
    plb = np.broadcast_to(pl, (*batch, L, S))
    vb = np.broadcast_to(v64, (*batch, S, Ev))
    for idx in np.ndindex(batch):
        hi[idx], lo[idx] = _dot_dd_2d(phb[idx], plb[idx], vb[idx])
    return hi, lo


class _DDRight:
    """The right factor of :func:`dot_dd`, scaled by column and cut into two slices."""

    def __init__(self, y: F64, beta: int) -> None:
        S = y.shape[0]
        self.f = _exponents(np.max(np.abs(y), axis=0))
        self.yn = _scale_cols(y, self.f)
        self.ubuf = np.empty((_K_DD * S, y.shape[1]))  # [u1; u0]
        _, ry = _slices(self.yn, beta, _K_DD, self.ubuf, S, reverse=True)
        self.u0, self.u1 = self.ubuf[S:], self.ubuf[:S]
        self.right_r = np.concatenate([ry, self.yn])  # [r_y; y]
        self.colmax_y = np.max(np.abs(self.yn), axis=0)  # <= 1
        self.colmax_r = np.max(np.abs(ry), axis=0)  # <= 2**(-2 beta)
        self.live_col = self.colmax_y > 0


#: a block's right factor is scaled again when keys hidden from the whole block hold
#: values this many binades above the others in some column (see _block_right).
_RESCALE_GAP = 16


def _block_right(full: _DDRight, y: F64, xh: F64, xl: F64, beta: int) -> _DDRight:
    """The right factor for one block of rows: ``full``, unless keys whose column of P is
    exactly 0 throughout the block (hidden from every row of it) hold the largest values
    of some column of ``y``, more than :data:`_RESCALE_GAP` binades above those of the
    other keys. Then those keys' values are set to 0 (exact: they are multiplied by 0)
    and the factor is scaled and sliced again, so that such values cannot shrink the
    block's units (a hidden 1e300 would put every visible output near the underflow
    threshold of the scaled products). A smaller gap costs nothing but a looser
    certificate: those keys add exact zeros to every product, so the factor is kept
    (in a causal block the later keys are hidden, and scaling again there would cost
    about a fifth of the product's time)."""
    live = (xh != 0).any(axis=0)
    if live.all():
        return full
    live |= (xl != 0).any(axis=0)
    top = np.max(np.abs(y[live]), axis=0) if live.any() else np.zeros(y.shape[1])
    # a column that only hidden keys fill counts as an infinite gap (its outputs are 0)
    gap = np.where(top > 0, full.f - _exponents(top), _RESCALE_GAP + 1)
    if not (gap[full.live_col] > _RESCALE_GAP).any():
        return full
    return _DDRight(np.where(live[:, None], y, 0.0), beta)


#: below this (times S + the row sums), an output of the scaled products may have lost
#: bits to underflow: see the certificate in the module Notes.
_UNDERFLOW_UNIT = 2.0**-1072


def _dot_dd_2d(ph: F64, pl: F64, v: F64, regroup: bool = True) -> tuple[F64, F64]:
    """dot_dd for one 2-D operand triple. Rows that the scaled products cannot certify
    (module Notes) are done again together in a call of their own, whose blocks leave
    out the keys none of them weights (``regroup``); what still fails there is computed
    from its own terms (:func:`_dot_dd_terms`)."""
    L, S = ph.shape
    Ev = v.shape[1]
    hi = np.zeros((L, Ev))
    lo = np.zeros((L, Ev))
    if L == 0 or Ev == 0 or S == 0:
        return hi, lo
    good_c = _finite_mask(v, 0)
    y_in = v if good_c.all() else np.where(good_c[None, :], v, 0.0)
    bad_rows_all: list[npt.NDArray[np.intp]] = []

    # The right factor, once: column scaling, two slices, the remainder r_y (again for
    # a block only where keys hidden from the whole block hold a column's maximum).
    beta = _beta(_K_DD * S)
    full_right = _DDRight(y_in, beta)
    g_s, g_2s = _gamma(S), _gamma(_K_DD * S)
    sum_up = 1 + 2 * g_s  # a computed sum of S nonnegative terms, times this, bounds the true

    rows = max(1, min(L, max(16, _BLOCK_IN // S)))
    xbuf_all = np.empty((rows, _K_DD * S))
    left_all = np.empty((rows, 2 * S))
    for r0 in range(0, L, rows):
        r1 = min(L, r0 + rows)
        nb = r1 - r0
        xh, xl = ph[r0:r1], pl[r0:r1]
        axh = np.abs(xh)
        mx = np.max(axh, axis=1)
        good = np.isfinite(mx) & np.isfinite(xl).all(axis=1)
        if not good.all():
            bad_rows_all.append(np.flatnonzero(~good) + r0)
            xh = np.where(good[:, None], xh, 0.0)
            xl = np.where(good[:, None], xl, 0.0)
            axh = np.abs(xh)
            mx = np.max(axh, axis=1)
        right = _block_right(full_right, y_in, xh, xl, beta)
        yn, colmax_y, colmax_r = right.yn, right.colmax_y, right.colmax_r
        e = _exponents(mx)
        xn = _scale_rows(xh, e)
        xbuf = xbuf_all[:nb]
        _, rx = _slices(xn, beta, _K_DD, xbuf, S, reverse=False, stop=False)
        t0, t1 = xbuf[:, :S], xbuf[:, S:]
        left = left_all[:nb]
        np.subtract(xn, rx, out=left[:, :S])  # x', exact
        w = left[:, S:]
        ln = _scale_rows(xl, e)
        np.add(rx, ln, out=w)  # r_x + l, rounded
        acc = _Cascade((nb, Ev))
        lv = t1 @ right.u1
        lv *= 2.0 ** (-4 * beta)  # exact: integers below 2**53 times a power of two
        acc.add(lv)
        lv = xbuf @ right.ubuf
        lv *= 2.0 ** (-3 * beta)  # exact, as above
        acc.add(lv)
        lv = t0 @ right.u0
        lv *= 2.0 ** (-2 * beta)  # exact, as above
        acc.add(lv)
        acc.add(left @ right.right_r)  # x' r_y + (r_x + l) y, rounded
        h, lo_ = acc.result()

        # Certificate: an upper bound of the error, in scaled units (module Notes).
        sum_x = _scale_rows(np.sum(axh, axis=1)[:, None], e)[:, 0] * sum_up
        sum_w = np.sum(np.abs(w), axis=1) * sum_up
        # what underflow can cost (scaled operands, products, the bound itself); nothing
        # where the row or the column is 0: their outputs are exact zeros
        under = np.where(sum_x + sum_w > 0, _UNDERFLOW_UNIT * (S + 1 + sum_x + sum_w), 0.0)
        err = (
            g_2s * sum_x[:, None] * colmax_r[None, :]
            + (g_2s + 2 * _U) * sum_w[:, None] * colmax_y[None, :]
            + 2.0**-100 * (sum_x + sum_w)[:, None] * colmax_y[None, :]
        ) * (1 + 2.0**-40) + under[:, None]
        fail = err > DD_CERTIFICATE * (np.abs(h) * (1 - 2.0**-50) - err)
        if not right.live_col.all():
            fail &= right.live_col[None, :]
        bad = np.flatnonzero(fail.any(axis=1))
        if bad.size:
            # lower bound of sum_j |x_j + l_j| |y_j| >= sum |x||y| - sum |l||y|
            ln_b = ln[bad]
            low = (
                (np.abs(xn[bad]) @ np.abs(yn)) * (1 - g_s)
                - (np.sum(np.abs(ln_b), axis=1)[:, None] * sum_up * colmax_y[None, :])
                - under[bad, None]
            )
            keep = ((err[bad] > DD_CERTIFICATE * low) & right.live_col[None, :]).any(axis=1)
            bad, low = bad[keep], low[keep]
        deep = np.zeros(0, dtype=np.intp)
        if bad.size:
            # The exact scheme errs by 2**-104 of the mass plus 2**-140 (max|x| + max|l|)
            # plus 2**-1074 in these units (dot_exact); rows where that is not below
            # 2**-57 of the mass's lower bound in every column (hidden huge values,
            # weights far below the row's largest at the keys holding a column's
            # largest values) are done again apart (see _dot_dd_2d's docstring).
            amax = np.max(np.abs(xn[bad]), axis=1) + np.max(np.abs(ln[bad]), axis=1)
            floor = (2.0**-140 * amax + 2.0**-1074 + under[bad])[:, None]
            short = ((low * 2.0**-57 < floor) & right.live_col[None, :]).any(axis=1)
            deep, bad = bad[short] + r0, bad[~short]
        if bad.size:
            he, le = _exact_2d([xn[bad], ln[bad]], yn)
            h[bad] = he
            lo_[bad] = le
        hi[r0:r1] = _scale_out(h, e, right.f)
        lo[r0:r1] = _scale_out(lo_, e, right.f)
        if deep.size:
            # (rows with non-finite weights are 0 in xh, xl: never deep)
            if regroup:
                hi[deep], lo[deep] = _dot_dd_2d(ph[deep], pl[deep], y_in, regroup=False)
            else:
                hi[deep], lo[deep] = _dot_dd_terms(ph[deep], pl[deep], y_in)
    _clear_lo_where_overflow(hi, lo)
    if bad_rows_all or not good_c.all():
        bad_r = np.zeros(L, dtype=bool)
        if bad_rows_all:
            bad_r[np.concatenate(bad_rows_all)] = True
        mask = bad_r[:, None] | ~good_c[None, :]
        plain = _plain(ph, v) + _plain(pl, v)
        with np.errstate(invalid="ignore"):  # inf - inf is NaN, by design
            hi[mask] = plain[mask]
        lo[mask] = 0.0
    return hi, lo


#: exponent of "no term" (a zero weight or value) in _dot_dd_terms
_NO_TERM = -(1 << 40)


def _dot_dd_terms(ph: F64, pl: F64, v: F64) -> tuple[F64, F64]:
    r"""``(ph + pl) @ v`` row by row from the exact terms, in units of each output's
    largest term: for the rows that the scaled products cannot certify.

    For row :math:`i` only the keys with a nonzero weight take part. Each term
    :math:`a_j v_{jk}` (:math:`a` running over the nonzero parts of ``ph`` and ``pl``) is
    :math:`m_a m_v 2^{E_{jk}}` with the mantissas :math:`m_a, m_v \in [1/2, 1)`
    (``frexp``) and :math:`E_{jk} = e_a + e_v`; :math:`m_a m_v = p + q` exactly
    (TwoProduct, :math:`|m_a m_v| \ge 1/4`: nothing underflows), and with
    :math:`M_k = \max_j E_{jk}` the terms :math:`2^{E_{jk} - M_k}(p + q)` lie below 1, the
    largest above 1/4. Scaling them is exact unless one falls below :math:`2^{-1022}` (an
    error below :math:`2^{-1075}` each, in units where the sum of magnitudes is at least
    1/4). Their sum is formed by error-free extraction (:func:`_sum_by_extraction`), to
    within :math:`2^{-100}` of the sum of magnitudes, and scaled back by :math:`2^{M_k}`
    (one rounding where the output is subnormal, at most :math:`2^{-1074}` for ``hi`` and
    ``lo`` together). Neither the other rows nor keys of weight 0 play any part.
    """
    R, S = ph.shape
    Ev = v.shape[1]
    hi = np.zeros((R, Ev))
    lo = np.zeros((R, Ev))
    mv, ev = np.frexp(v)
    ev = np.where(mv == 0.0, _NO_TERM, ev.astype(np.int64))
    for i in range(R):
        a = np.concatenate([ph[i], pl[i]])
        terms = np.flatnonzero(a)
        if not terms.size:
            continue
        ma, ea = np.frexp(a[terms])
        keys = terms % S
        big = ea.astype(np.int64)[:, None] + ev[keys]  # (n, Ev), _NO_TERM far below
        top = np.max(big, axis=0)
        top = np.where(top > _NO_TERM // 2, top, 0)  # no term at all: the output is 0
        shift = np.maximum(big - top[None, :], -1100).astype(np.int32)
        p, q = two_prod(ma[:, None], mv[keys])  # exact: both factors in [1/2, 1) or 0
        with np.errstate(under="ignore"):  # a term below 2**-1074 of the largest: 0
            p = np.ldexp(p, shift)
            q = np.ldexp(q, shift)
        h, l_ = _sum_by_extraction(np.concatenate([p, q], axis=0).T.copy())
        with np.errstate(under="ignore", over="ignore"):  # subnormal or overflowing outputs
            hi[i] = np.ldexp(h, top.astype(np.int32))
            lo[i] = np.ldexp(l_, top.astype(np.int32))
    return hi, lo


def _sum_by_extraction(t: F64) -> tuple[F64, F64]:
    r"""Each row of ``t`` (terms below 1 in magnitude) summed as a double-double, within
    :math:`2^{-100} \max_j |t_j|` (more exactly, see below), ``t`` overwritten.

    Error-free extraction (Rump, Ogita & Oishi 2008, Alg. 3.3 ExtractVector): with
    :math:`\sigma_1 = 2^{M} 2^{\lceil \log_2 \max_j |t_j| \rceil}` and :math:`2^M \ge 2(n+2)`,
    :math:`q_j = \mathrm{fl}(\mathrm{fl}(\sigma_1 + t_j) - \sigma_1)` and :math:`t_j - q_j`
    are exact, :math:`|t_j - q_j| \le u\sigma_1`, and :math:`\sum_j q_j` is exact in any
    order; the next level takes :math:`\sigma_2 = 2^{M+1}u\sigma_1`. After :math:`K` levels
    the plain sum of what is left errs by at most :math:`n^2 u \cdot u\sigma_K`
    (:math:`\le 2^{-104}\max|t|` for :math:`n \le 4096` and two levels; a third level is
    taken when that would exceed :math:`2^{-100}`). The exact level sums and that sum
    are added by TwoSum, the small parts with two roundings of numbers below
    :math:`2^{M+2} n u \max|t|`, and renormalized: :math:`|lo| \le \mathrm{ulp}(hi)/2`.
    """
    n = t.shape[1]
    m = int(n + 2).bit_length() + 1  # 2**m >= 2 (n + 2)
    levels = 2
    while n * n * 2.0 ** ((m + 1) * levels) * _U ** (levels + 1) > 2.0**-100:
        levels += 1
    big = np.max(np.abs(t), axis=1, keepdims=True)
    sigma = np.ldexp(1.0, np.frexp(big)[1] + m)
    q = np.empty_like(t)
    taus = []
    for _ in range(levels):
        np.add(t, sigma, out=q)
        q -= sigma  # exact
        t -= q  # exact
        taus.append(np.add.reduce(q, axis=1))  # exact
        sigma = sigma * 2.0 ** (m + 1 - 53)
    rest = np.add.reduce(t, axis=1)
    for tau in reversed(taus[2:]):
        rest = rest + tau
    h, e = two_sum(taus[0], taus[1])
    return two_sum(h, e + rest)
