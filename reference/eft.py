r"""Error-free transformations of float64 sums and products.

Each function returns the rounded result of one operation together with its exact
rounding error, so that no information is lost: :math:`s + e = a + b` exactly, or
:math:`p + e = a b` exactly. They are the building blocks of the accurate products in
:mod:`attnspec.reference.matmul`. All work elementwise on float64 arrays (numpy
broadcasting) and assume round-to-nearest-even, the IEEE 754 default.

Notes
-----
With :math:`u = 2^{-53}` the unit roundoff and :math:`\mathrm{fl}` rounding to
nearest:

* :func:`two_sum` (Knuth 1969, Møller 1965): :math:`s = \mathrm{fl}(a + b)` and
  :math:`e = (a + b) - s` exactly, for any finite :math:`a, b` whose sum does not
  overflow; :math:`|e| \le u |s|` and :math:`|e| \le u |a + b|`. Six flops, no
  branch.
* :func:`fast_two_sum` (Dekker 1971): the same with three flops, valid when
  :math:`a = 0` or :math:`\lfloor \log_2 |a| \rfloor \ge \lfloor \log_2 |b| \rfloor`
  (in particular when :math:`|a| \ge |b|`).
* :func:`split` (Veltkamp, in Dekker 1971): :math:`a = h + l` with :math:`h` holding
  the leading 26 bits and :math:`l` the rest (at most 26 bits and a sign), exact for
  :math:`|a| < 2^{996}` (above that :math:`(2^{27}+1) a` overflows).
* :func:`two_prod` (Dekker 1971): :math:`p = \mathrm{fl}(a b)` and
  :math:`e = a b - p` exactly, without a fused multiply-add, provided no intermediate
  overflows (:math:`|a|, |b| < 2^{996}`, :math:`|ab| < 2^{1023}`) and
  :math:`e` does not underflow: exact whenever :math:`|a b| \ge 2^{-969}`
  (Boldo 2006); below that :math:`|e - (ab - p)| \le 2^{-1074}`.

References
----------
Dekker, T. J. (1971). A floating-point technique for extending the available
precision. Numerische Mathematik 18, 224-242. doi:10.1007/BF01397083

Knuth, D. E. (1969). The Art of Computer Programming, vol. 2, Seminumerical
Algorithms, section 4.2.2 (Theorem B).

Ogita, T., Rump, S. M., Oishi, S. (2005). Accurate sum and dot product. SIAM J. Sci.
Comput. 26(6), 1955-1988. doi:10.1137/030601818 (Algorithms 3.1-3.3.)

Boldo, S. (2006). Pitfalls of a full floating-point proof: example on the formal
proof of the Veltkamp/Dekker algorithms. IJCAR 2006, LNCS 4130, 52-66.
doi:10.1007/11814771_6
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["SPLITTER", "fast_two_sum", "split", "two_prod", "two_sum"]

F64 = npt.NDArray[np.float64]

#: Veltkamp's splitting constant for float64, :math:`2^{\lceil 53/2 \rceil} + 1`.
SPLITTER = 134217729.0  # 2**27 + 1


def two_sum(a: F64, b: F64) -> tuple[F64, F64]:
    """Return ``(s, e)`` with ``s = fl(a + b)`` and ``s + e = a + b`` exactly.

    Knuth's branch-free TwoSum; any order of magnitudes. See the module Notes.
    """
    s = np.add(a, b)
    bb = s - a
    e = (a - (s - bb)) + (b - bb)
    return s, e


def fast_two_sum(a: F64, b: F64) -> tuple[F64, F64]:
    """Return ``(s, e)`` with ``s + e = a + b`` exactly, assuming ``|a| >= |b|``.

    Dekker's Fast2Sum; the precondition (exponent of ``a`` at least that of ``b``,
    or ``a == 0``) is the caller's to guarantee.
    """
    s = np.add(a, b)
    e = b - (s - a)
    return s, e


def split(a: F64) -> tuple[F64, F64]:
    """Veltkamp split: ``a = h + l`` exactly, ``h`` with at most 26 significant bits.

    Exact for ``|a| < 2**996``.
    """
    c = SPLITTER * a
    h = c - (c - a)
    return h, a - h


def two_prod(a: F64, b: F64) -> tuple[F64, F64]:
    """Return ``(p, e)`` with ``p = fl(a * b)`` and ``p + e = a * b`` (Dekker).

    Exact when ``|a|, |b| < 2**996``, the product does not overflow and
    ``|a * b| >= 2**-969`` (see the module Notes for the underflow bound).
    """
    p = np.multiply(a, b)
    ah, al = split(a)
    bh, bl = split(b)
    # Dekker's order: the first three terms cancel p exactly, the last adds al * bl.
    # (Ogita, Rump & Oishi's Alg. 3.3 writes the same sum the other way round; the two
    # agree wherever the result is exact, and this order is the one whose signed zeros
    # the double-double arithmetic's quick products reproduce.)
    e = ((ah * bh - p) + ah * bl + al * bh) + al * bl
    return p, e
