"""Error bounds, and the tolerances derived from them.

Errors are measured in ulps of the exact value: for an exact real ``y`` the ulp is
the spacing of float64 numbers at ``|y|``, ``2**(floor(log2|y|) - 52)``, and never
less than the smallest subnormal ``2**-1074``. A result within 1 ulp is one of the
two float64 numbers that bracket the exact value (faithful rounding); 0.5 ulp is
correct rounding.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from attnspec.spec.tolerances._core import (
    ACCURACIES,
    ETA64,
    SECOND_ORDER,
    U64,
    perturbation_factor,
    ulp_error,
    ulp_of_exact,
)

__all__ = [
    "ACCURACIES",
    "ETA64",
    "SECOND_ORDER",
    "U64",
    "UNDERFLOW_RANGE",
    "error_bound",
    "faithful_bound",
    "log_softmax_fast_bound",
    "logsumexp_fast_bound",
    "perturbed_softmax_factor",
    "row_ranges",
    "softmax_fast_bound",
    "sum_to_one_bound",
    "ulp_error",
    "ulp_of_exact",
]

F64 = npt.NDArray[np.float64]

# ---------------------------------------------------------------------------------------
# Error bounds of the softmax family, per element.
#
# A bound is a pair of arrays ``(rel, abs)`` with the shape of the result: the computed
# value c and the exact value y satisfy |c - y| <= rel * |y| + abs. The bounds depend on
# the inputs only (never on the exact value), so that every property can use them.
# ---------------------------------------------------------------------------------------

#: the accuracy classes a softmax implementation may claim

#: beyond this distance below the row maximum, e^{x_j - a} < 2**-1074: the term is 0 or
#: the smallest subnormal whatever its relative error, so only an absolute error remains.
#: log(2**-1074) = -744.44..., rounded up.
UNDERFLOW_RANGE = 746.0

_KINDS = ("softmax", "log_softmax", "logsumexp")


def _check_accuracy(accuracy: str | float) -> None:
    if isinstance(accuracy, str) and accuracy not in ACCURACIES:
        raise ValueError(f"accuracy must be one of {ACCURACIES!r} or a number, got {accuracy!r}")


def row_ranges(x: F64, included: npt.NDArray[np.bool_]) -> tuple[F64, F64, F64]:
    r"""Per-row statistics the bounds need, for rows ``x`` of shape (R, n).

    Returns ``(n_incl, r_elem, r_max)``: the number of included entries of each row
    (shape (R, 1)); :math:`r_j = \min(a - x_j, 746)` for included finite entries
    (0 elsewhere), with :math:`a` the row maximum; and :math:`r = \max_j r_j` (shape
    (R, 1)). Entries that are not finite, and excluded ones, count as not included;
    rows holding them are decided exactly by the special-value rules.
    """
    incl = included & np.isfinite(x)
    n_incl = incl.sum(axis=-1, keepdims=True).astype(np.float64)
    lo = np.where(incl, x, np.inf)
    hi = np.where(incl, x, -np.inf)
    a = hi.max(axis=-1, keepdims=True, initial=-np.inf)
    # a - x_j may overflow for |x| near 1e308; the clamp makes that harmless.
    with np.errstate(over="ignore", invalid="ignore"):
        r_elem = np.where(incl, np.minimum(a - x, UNDERFLOW_RANGE), 0.0)
        r_max = np.where(
            n_incl > 0,
            np.minimum(a - lo.min(axis=-1, keepdims=True, initial=np.inf), UNDERFLOW_RANGE),
            0.0,
        )
    return n_incl, r_elem, r_max


def faithful_bound(shape: tuple[int, ...]) -> tuple[F64, F64]:
    r"""The bound of a faithfully rounded result: within one ulp of the exact value.

    A result within 1 ulp of :math:`y` satisfies :math:`|c - y| \le \operatorname{ulp}(y)
    \le 2u|y|` for normal :math:`|y|` and :math:`\le 2^{-1074}` in the subnormal range,
    so ``rel = 2u``, ``abs = 2**-1074`` (Higham, *Accuracy and Stability of Numerical
    Algorithms*, 2nd ed., SIAM 2002, sec. 2.1, doi:10.1137/1.9780898718027).
    The agreement property checks the sharper statement ``ulp_error <= 1`` directly.
    """
    return np.full(shape, 2 * U64), np.full(shape, ETA64)


def softmax_fast_bound(x: F64, included: npt.NDArray[np.bool_]) -> tuple[F64, F64]:
    r"""Error bound of the shifted, divided softmax in float64 (rows of shape (R, n)).

    The algorithm (Blanchard, Higham & Higham 2021, Alg. 4.1; ``reference/softmax.py``):
    :math:`a = x_k = \max x`, :math:`\hat d_j = fl(x_j - a)`, :math:`\hat e_j =
    fl(\exp \hat d_j)`, :math:`\hat D = fl(1 + \hat s')` with :math:`\hat s'` the
    computed sum of the other terms, :math:`\hat p_j = fl(\hat e_j / \hat D)`.

    Model: every arithmetic operation rounds to nearest (:math:`|\delta| \le u =
    2^{-53}`); ``exp`` and ``log1p`` are faithful (relative error :math:`< 2u`; numpy's
    are within 0.67 ulp on the development machine, measured in docs/performance.md). Then,
    to first order, with :math:`r_j = a - x_j` and :math:`r = \max_j r_j`:

    * :math:`\hat d_j = d_j(1 + \delta)` perturbs :math:`e_j` by the factor
      :math:`e^{r_j u}`, and ``exp`` adds :math:`2u`: :math:`\hat e_j = e_j(1 +
      \epsilon_j)`, :math:`|\epsilon_j| \le (r_j + 2)u`.
    * The sum of the other terms (:func:`_sum_of_others_error`): :math:`(n + r + 1)u`
      relative; forming :math:`1 + s'` adds one rounding: :math:`|\hat D / D - 1| \le
      (n + 2 + r)u`, which the :math:`(n + 3 + r)u` used here covers.
    * The division: :math:`u`.

    So :math:`|\hat p_j - p_j| \le (n + 6 + r_j + r)\,u\, p_j`, which has the form of
    Blanchard, Higham & Higham 2021, Thm 4.3 (doi:10.1093/imanum/draa038, paraphrased
    in the project's notes as :math:`[n + 2 + 2(x_{\max} - x_{\min})]u + O(u^2)`
    for an exactly rounded exp); the two extra roundings for the sum and :math:`2u`
    instead of :math:`u` for a faithful ``exp`` give :math:`n + 6`.

    Underflow: a term with :math:`r_j > 744.5` rounds to 0 or :math:`2^{-1074}`, and a
    subnormal quotient rounds with absolute error :math:`\le 2^{-1075}`; this gives the
    absolute part :math:`2^{-1073}` and is why :math:`r_j` and :math:`r` are clamped at
    746 (see :func:`row_ranges`). ``SECOND_ORDER`` absorbs the :math:`O(u^2)` terms.
    """
    n, r_elem, r_max = row_ranges(x, included)
    rel = SECOND_ORDER * (n + 6.0 + r_elem + r_max) * U64
    return np.broadcast_to(rel, x.shape).copy(), np.full(x.shape, 2 * ETA64)


def _sum_of_others_error(x: F64, included: npt.NDArray[np.bool_]) -> tuple[F64, F64, F64]:
    r"""Per row: :math:`n`, :math:`r` and :math:`\rho_s = (n + r + 1)u`, the relative error
    of the computed sum of the other terms :math:`\hat s'` (shape (R, 1) each).

    Fast sums the other terms directly (the entry :math:`k` set to 0, the row summed):
    each :math:`\hat e_j = e_j(1 + \epsilon_j)` with :math:`|\epsilon_j| \le (r_j + 2)u`
    (:func:`softmax_fast_bound`), and a float64 sum of :math:`n` nonnegative terms in any
    order adds :math:`\gamma_{n-1}` (Higham 2002, eq. (4.4)): :math:`|\hat s' - s'| \le
    (n + r + 1)u\,s'` to first order. Terms that underflow (:math:`r_j > 744.4`) carry an
    absolute error below :math:`2^{-1074}` each instead, which the absolute parts below
    hold (:math:`(n + 2) 2^{-1074}` with the roundings of a subnormal result).
    """
    n, _, r_max = row_ranges(x, included)
    return n, r_max, (n + r_max + 1.0) * U64


def log_softmax_fast_bound(x: F64, included: npt.NDArray[np.bool_]) -> tuple[F64, F64]:
    r"""Error bound of the shifted log-softmax :math:`\hat d_j - fl(\log(1 + \hat s'))`.

    With :math:`L = \log(1 + s')` and :math:`\rho_s` of :func:`_sum_of_others_error`:

    * :math:`|\log(1 + \hat s') - L| \le \rho_s\, s'/(1 + s') \le \rho_s \min(1, L)`
      (the slope of :math:`\log(1+s)` is :math:`1/(1+s)`, and :math:`s/(1+s) \le
      \log(1+s)`); ``log1p`` is faithful: :math:`2uL`;
    * :math:`\hat d_j = d_j(1 + \delta)`: :math:`u|d_j|`; the final subtraction:
      :math:`u(|d_j| + L)`.

    Since :math:`d_j \le 0 \le L`, the exact value is :math:`y_j = d_j - L` with
    :math:`|y_j| = |d_j| + L`: no cancellation, so the error :math:`2u|d_j| + (\rho_s +
    3u)L` is relative, :math:`|\hat c - y| \le (n + r + 4)u|y|` (plus the absolute
    :math:`(n + 2)2^{-1074}` of underflowing terms). Where the sum of the others was
    formed as :math:`fl(\hat T - 1)` this was only an absolute bound (the result at the
    maximum, :math:`-\log(1+s') \approx -s'`, could come out 0); summing the others
    directly keeps it relative, as Blanchard, Higham & Higham 2021 (sec. 3,
    doi:10.1093/imanum/draa038) recommend.
    """
    n, _, rho_s = _sum_of_others_error(x, included)
    rel = SECOND_ORDER * (rho_s + 3 * U64)
    absolute = SECOND_ORDER * (n + 2.0) * ETA64
    return np.broadcast_to(rel, x.shape).copy(), np.broadcast_to(absolute, x.shape).copy()


def logsumexp_fast_bound(x: F64, included: npt.NDArray[np.bool_]) -> tuple[F64, F64]:
    r"""Error bound of the shifted log-sum-exp :math:`fl(a + fl(\log(1 + \hat s')))`.

    As in :func:`log_softmax_fast_bound`, :math:`\log(1 + \hat s')` is within
    :math:`\rho_s \min(1, L) + 2uL` of :math:`L`, and adding :math:`a` (exact) rounds
    once, :math:`u|y|`. When :math:`a \ge 0` the exact :math:`y = a + L \ge L`: the bound
    is relative, :math:`(n + r + 4)u|y|`. When :math:`a < 0` the two may cancel (rows of
    log-probabilities, :math:`y \approx 0`); then :math:`L \le \log n` gives the absolute
    part :math:`\rho_s + 2u\log n` beside the relative :math:`u|y|` (Blanchard, Higham &
    Higham 2021, sec. 3: the error of the shifted log-sum-exp is relative only when
    :math:`|a + L|` is not small). Both carry the absolute :math:`(n + 2)2^{-1074}` of
    underflowing terms. Shape (R, 1).
    """
    n, _, rho_s = _sum_of_others_error(x, included)
    incl = included & np.isfinite(x)
    a = np.where(incl, x, -np.inf).max(axis=-1, keepdims=True, initial=-np.inf)
    log_n = np.log(np.maximum(n, 1.0))
    below = np.isfinite(a) & (a < 0)
    rel = SECOND_ORDER * np.where(below, U64, rho_s + 3 * U64)
    absolute = SECOND_ORDER * (np.where(below, rho_s + 2 * U64 * log_n, 0.0) + (n + 2.0) * ETA64)
    return rel, absolute


def error_bound(
    kind: str, accuracy: str | float, x: F64, included: npt.NDArray[np.bool_]
) -> tuple[F64, F64]:
    """The bound ``(rel, abs)`` of ``kind`` for rows ``x`` (R, n) at ``accuracy``.

    For softmax and log_softmax the arrays have shape (R, n); for logsumexp (R, 1).
    """
    _check_accuracy(accuracy)
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS!r}, got {kind!r}")
    shape = x.shape if kind != "logsumexp" else (x.shape[0], 1)
    if not isinstance(accuracy, str):
        # a claimed relative bound rho: |c - y| <= rho |y| + eta for softmax, and
        # rho max(1, |y|) <= rho |y| + rho for log_softmax and logsumexp (as for the lse of
        # attention, attnspec.spec.properties.attention)
        rho = float(accuracy)
        return np.full(shape, rho), np.full(shape, ETA64 if kind == "softmax" else rho)
    if accuracy == "accurate":
        return faithful_bound(shape)
    # For |x| near 1e308 a bound may overflow to inf: it is then vacuous, as it must be
    # (the result itself is near or beyond the float64 range).
    with np.errstate(over="ignore"):
        if kind == "softmax":
            return softmax_fast_bound(x, included)
        if kind == "log_softmax":
            return log_softmax_fast_bound(x, included)
        return logsumexp_fast_bound(x, included)


def sum_to_one_bound(rel: F64, absolute: F64) -> F64:
    r"""How far the exactly summed softmax row may lie from 1, per row (shape (R, 1)).

    With :math:`|\hat p_j - p_j| \le \rho_j p_j + \alpha_j` and :math:`\sum p_j = 1`:
    :math:`|\sum_j \hat p_j - 1| \le \max_j \rho_j + \sum_j \alpha_j`. The check sums
    with ``math.fsum`` (correctly rounded, Shewchuk 1997, doi:10.1007/PL00009321), which
    adds at most :math:`u(1 + \dots) \le 1.01u`. For a faithful softmax this is
    :math:`3.01u + n\,2^{-1074}`.
    """
    return (
        np.max(rel, axis=-1, keepdims=True, initial=0.0)
        + np.sum(absolute, axis=-1, keepdims=True)
        + SECOND_ORDER * U64
    )


def perturbed_softmax_factor(delta: float) -> float:
    r"""How much softmax may change when each logit moves by at most ``delta``:
    :math:`e^{2\delta} - 1`, rounded up (:func:`attnspec.spec.tolerances._core.perturbation_factor`,
    the same factor attention uses)."""
    return float(perturbation_factor(delta))
