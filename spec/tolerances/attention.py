r"""Error bounds for attention in float64, derived step by step.

Two accuracy classes, each a bound on :math:`|\hat o_{ik} - o_{ik}|` (the computed output
against the exact one) and on :math:`|\hat\ell_i - \ell_i|` (the lse):

* "fast": :func:`textbook_sdpa_bound` and :func:`textbook_lse_bound`, for any
  implementation that evaluates the definition in float64 with round to nearest the
  textbook way (logits by BLAS, max-shifted softmax, possibly online, a BLAS product with
  the values);
* "accurate": :func:`accurate_sdpa_bound`, the claim of ``precision="accurate"``: each
  output within :math:`4u \sum_j p_{ij} |v_{jk}|` of the exact value (plus the floors
  below) and the lse within one ulp.

Notation: :math:`u = 2^{-53}`, :math:`\eta = 2^{-1074}` (the smallest subnormal),
:math:`\gamma_n = nu/(1 - nu)` (Higham 2002, Lemma 3.1).

References
----------
N. J. Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., SIAM, 2002,
doi:10.1137/1.9780898718027 (Lemma 3.1, eq. 3.5, sec. 2.1).
P. Blanchard, D. J. Higham, N. J. Higham, Accurately computing the log-sum-exp and softmax
functions, IMA J. Numer. Anal. 41(4), 2021, doi:10.1093/imanum/draa038 (Thm 4.3, sec. 3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from attnspec.spec.tolerances._core import ETA, SECOND_ORDER, U, perturbation_factor

__all__ = [
    "ETA",
    "TANH_ULPS",
    "LogitData",
    "U",
    "accurate_sdpa_bound",
    "gamma",
    "logit_data",
    "perturbation_factor",
    "textbook_lse_bound",
    "textbook_sdpa_bound",
    "visible_value_max",
]

F64 = npt.NDArray[np.float64]
Bools = npt.NDArray[np.bool_]
#: relative error of ``tanh`` in ulps assumed for the softcap: glibc documents at most
#: 2 ulp for tanh on x86_64 ("Errors in Math Functions", The GNU C Library manual).
TANH_ULPS = 2.0


def gamma(n: int | F64) -> Any:
    r""":math:`\gamma_n = n u / (1 - n u)` (Higham 2002, Lemma 3.1), for float64."""
    nu = np.asarray(n, dtype=np.float64) * U
    if np.any(nu >= 1):
        raise ValueError(f"gamma_n needs n u < 1, got n = {n}")
    return nu / (1 - nu)


@dataclass(frozen=True)
class LogitData:
    """Per-row quantities of the fast bounds, for logits of shape (..., Hq, L, S)."""

    #: the float64 logits with every modifier (an approximation; sink column last if any)
    logits: F64
    #: visible entries (mask, causal, window, bias -inf and the sink column)
    seen: Bools
    #: per row: the bound on the logit error of any visible entry, epsilon_i
    eps: F64
    #: per row: max - min of the visible logits, R_i
    spread: F64
    #: per row: the largest visible logit (-inf for an empty row)
    top: F64
    #: per row: the number of visible keys, sink included
    count: F64
    #: the number of keys, sink included
    n_keys: int


def logit_data(q: Any, k: Any, **kw: Any) -> LogitData:
    r"""The logits of :func:`attnspec.sdpa` in float64 and the bound on their error.

    For each visible :math:`(i, j)`, first order in :math:`u`:

    1. :math:`\tau\, q_i \cdot k_j` by a dot product of length :math:`E` and at most four
       roundings for the scale (torch multiplies q and k each by
       :math:`\mathrm{fl}(\sqrt\tau)`): :math:`\gamma_{E+4} |\tau| \sum_e |q_{ie} k_{je}|`
       (Higham 2002, eq. 3.5), plus :math:`(E + 4)\eta \max(1, |\tau|)` for products that
       underflow (each rounds with an absolute error below :math:`\eta`);
    2. softcap :math:`c \tanh(s / c)`: the slope is at most 1, so an error in :math:`s`
       passes through; the division adds :math:`u|s|`, ``tanh`` :math:`2u \cdot` ``TANH_ULPS``
       :math:`\cdot c`, the product :math:`uc`;
    3. each addition of a bias or ALiBi term :math:`m_h |i + o - j|`: :math:`u` times the
       magnitude of its result, and :math:`u |m_h d|` for the ALiBi product;
    4. one more :math:`u |s_{ij}|` for an implementation that moves to base 2
       (:math:`s \log_2 e`, FlashAttention) before ``exp2``.

    The sink logit is taken as it is (no error). ``kw`` are the keyword arguments of
    :func:`attnspec.sdpa` (``precision`` and ``return_lse`` are ignored), in the forms it
    takes (see :func:`_logits_shape`): the arrays have the shape ``(..., Hq, L, S)``
    (``S + 1`` with a sink) with the batch of q, k and the options broadcast; batch
    dimensions that only v has are not there (the logits are the same along them).
    """
    from attnspec.reference.visibility import (
        alignment_offset,
        check_window,
        relative_position,
        visible,
    )

    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    two_d = q.ndim == 2 and k.ndim == 2
    if two_d:
        q, k = q[None], k[None]
    full = _logits_shape(q, k, two_d, kw)
    hq, hkv = q.shape[-3], k.shape[-3]
    width, n_q, n_k = q.shape[-1], q.shape[-2], k.shape[-2]
    kk = np.repeat(k, hq // hkv, axis=-3)
    scale = kw.get("scale")
    tau = 1.0 / math.sqrt(width) if scale is None else float(scale)
    # NaN or inf at hidden positions (poisoned keys) make NaN/inf logits there; only
    # visible entries are used below.
    with np.errstate(invalid="ignore", over="ignore"):
        s = tau * (q @ np.swapaxes(kk, -1, -2))
        magnitude = abs(tau) * (np.abs(q) @ np.swapaxes(np.abs(kk), -1, -2))
        eps = gamma(width + 4) * magnitude + (width + 4) * ETA * max(1.0, abs(tau))
        softcap = kw.get("softcap")
        if softcap is not None:
            c = float(softcap)
            eps = eps + U * np.abs(s) + (2 * TANH_ULPS + 1) * U * c
            s = c * np.tanh(s / c)
        bias = kw.get("bias")
        if bias is not None:
            s = s + np.asarray(bias, dtype=np.float64)
            eps = eps + U * np.abs(s)
        win = check_window(kw.get("window"))
        causal = bool(kw.get("causal", False))
        slopes = kw.get("alibi_slopes")
        needs = causal or win is not None or slopes is not None
        offset = alignment_offset(n_q, n_k, kw.get("align"), "causal") if needs else 0
        if slopes is not None:
            m = np.asarray(slopes, dtype=np.float64)[..., None, None]
            t = m * np.abs(relative_position(n_q, n_k, offset)).astype(np.float64)
            s = s - t
            eps = eps + U * (np.abs(t) + np.abs(s))
        eps = eps + U * np.abs(s)
    # a mask or sinks may have batch dimensions that q, k, bias and slopes lack
    if s.shape != full:
        s = np.broadcast_to(s, full)
    shape = s.shape
    seen = np.ones(shape, dtype=bool)
    mask = kw.get("mask")
    if mask is not None:
        seen = seen & np.asarray(mask, dtype=bool)
    pattern = visible(n_q, n_k, causal=causal, window=win, offset=offset)
    if pattern is not None:
        seen = seen & pattern
    with np.errstate(invalid="ignore"):
        seen = seen & ~(s == -np.inf)
    sinks = kw.get("sinks")
    if sinks is not None:
        sig = np.broadcast_to(
            np.asarray(sinks, dtype=np.float64)[..., None, None], (*shape[:-1], 1)
        )
        s = np.concatenate([s, sig], axis=-1)
        eps = np.concatenate([np.broadcast_to(eps, shape), np.zeros(sig.shape)], axis=-1)
        seen = np.concatenate([seen, np.ones(sig.shape, dtype=bool)], axis=-1)
    seen = np.broadcast_to(seen, s.shape)
    eps = np.broadcast_to(eps, s.shape)
    any_seen = seen.any(axis=-1)
    with np.errstate(invalid="ignore", over="ignore"):
        row_eps = np.max(np.where(seen, eps, 0.0), axis=-1, initial=0.0)
        top = np.max(np.where(seen, s, -np.inf), axis=-1, initial=-np.inf)
        low = np.min(np.where(seen, s, np.inf), axis=-1, initial=np.inf)
        spread = np.where(any_seen, top - low, 0.0)
    row_eps = np.where(np.isnan(row_eps), np.inf, row_eps)
    spread = np.where(np.isnan(spread), np.inf, spread)
    return LogitData(
        logits=s,
        seen=seen,
        eps=row_eps,
        spread=spread,
        top=top,
        count=seen.sum(axis=-1).astype(np.float64),
        n_keys=s.shape[-1],
    )


def _logits_shape(q: F64, k: F64, two_d: bool, kw: dict[str, Any]) -> tuple[int, ...]:
    r"""The shape ``(..., Hq, L, S)`` of the logits of ``q``, ``k`` and the options.

    The forms :func:`attnspec.sdpa` takes (``SdpaOptions``, ``_per_head``): ``mask`` and
    ``bias`` broadcast to ``(..., Hq, L, S)``, ``alibi_slopes`` and ``sinks`` to
    ``(..., Hq)`` (a 0-d sink is one sink for every head, ``(Hq,)`` one per head), with
    ``...`` the batch of q, k and v broadcast; a 1 may stand anywhere, leading dimensions
    may be left out. Here v is not known: an option may have batch dimensions that q and
    k lack (sdpa takes them when v has them), so the batch is that of q, k and the
    options broadcast. Three 2-D arrays (one head) have no batch: ``(1, L, S)``. A
    ValueError names an option that does not fit (one that would change Hq, L or S, or
    give 2-D inputs a batch).
    """
    heads = (*np.broadcast_shapes(q.shape[:-3], k.shape[:-3]), q.shape[-3])
    rows = (q.shape[-2], k.shape[-2])
    shape = (*heads, *rows)
    for name, core in (
        ("mask", (*heads[-1:], *rows)),
        ("bias", (*heads[-1:], *rows)),
        ("alibi_slopes", heads[-1:]),
        ("sinks", heads[-1:]),
    ):
        value = kw.get(name)
        if value is None:
            continue
        got = np.shape(value)
        target = shape if len(core) == 3 else heads
        letters = "(..., Hq, L, S)" if len(core) == 3 else "(..., Hq)"
        try:
            out = np.broadcast_shapes(got, target)
        except ValueError:
            out = None
        if out is None or out[-len(core) :] != core or (two_d and out != target):
            raise ValueError(
                f"{name} with shape {got} does not broadcast to {letters} = {target}"
                + ("" if two_d else " (with any batch dimensions of v)")
            )
        shape = np.broadcast_shapes(shape, (*out, *rows) if len(core) == 1 else out)
    return tuple(shape)


def _fast_rho(data: LogitData) -> F64:
    r""":math:`\rho_i` of :func:`textbook_sdpa_bound` from the logit data."""
    n = data.n_keys
    g_soft, g_pv, g_drop = gamma(4 * n + 4), gamma(max(n, 1)), gamma(3)
    with np.errstate(over="ignore", invalid="ignore"):
        factor = perturbation_factor(data.eps + U * data.spread) / SECOND_ORDER
        rho = (1 + factor) * (1 + g_soft) * (1 + g_pv) * (1 + g_drop) - 1
    rho = np.where(np.isnan(rho), np.inf, rho)
    return SECOND_ORDER * rho


def textbook_sdpa_bound(
    q: F64,
    k: F64,
    v: F64,
    *,
    scale: float | None = None,
    mask: npt.NDArray[np.bool_] | None = None,
    bias: F64 | None = None,
    causal: bool = False,
    align: str | None = None,
    **more: Any,
) -> tuple[F64, F64]:
    r"""A rigorous bound on the error of float64 attention computed the textbook way.

    Returns ``(weighted, bound)``, both of the output's shape: ``weighted`` is
    :math:`\sum_j p_{ij} |v_{jk}|` (computed; the dropout scaling included) and ``bound``
    the bound on :math:`|\hat o_{ik} - o_{ik}|` for any implementation that computes, in
    float64 with round-to-nearest:

    1. the logits with the error :math:`\varepsilon_i` of :func:`logit_data` (scale,
       softcap, bias, ALiBi);
    2. softmax by subtracting the row maximum, :math:`\exp` with an error below one ulp
       (relative :math:`2u`), a sum of :math:`S` positive terms (:math:`\gamma_S`), at
       most :math:`S` online rescalings of three roundings each (:math:`\gamma_{3S}`), and a
       division (:math:`u`). A perturbation :math:`\delta` of the logits changes each weight
       by a factor in :math:`[e^{-2\|\delta\|_\infty}, e^{2\|\delta\|_\infty}]`
       (:func:`perturbation_factor`); the rounded shift :math:`\mathrm{fl}(s_j - m)`
       perturbs by at most :math:`u R_i`, :math:`R_i` the range of the visible logits. So
       :math:`\hat p_{ij} = p_{ij} (1 + \rho'_{ij})` with
       :math:`|\rho'| \le e^{2\varepsilon_i + 2uR_i}(1 + \gamma_{4S+4}) - 1`;
    3. dropout :math:`\kappa / (1 - p)` (or times :math:`\mathrm{fl}(1/(1-p))`): three
       roundings, :math:`\gamma_3`;
    4. :math:`\hat o = \mathrm{fl}(\hat P V)`: :math:`\gamma_S \sum_j \hat p_{ij} |v_{jk}|`;
    5. underflow: a weight below the normal range, or a product :math:`p v` that
       underflows, has an absolute error of at most :math:`\eta` besides its relative one:
       :math:`(S + 1)\eta(1 + \max_j |v_{jk}|)` in all.

    Together: :math:`|\hat o_{ik} - o_{ik}| \le \rho_i W_{ik} + (S+1)\eta(1 + \max_j
    |v_{jk}|)` with :math:`\rho_i = e^{2\varepsilon_i + 2uR_i}(1+\gamma_{4S+4})
    (1+\gamma_S)(1 + \gamma_3) - 1` and :math:`W` the exact :math:`\sum_j p_{ij}|v_{jk}|`;
    the computed :math:`\hat W` is itself within :math:`\rho_i W` of it, so
    :math:`W \le \hat W / (1 - \rho_i)`. A sink counts as one more key. Only visible keys
    count; a row with nothing visible has bound 0 (plus the floor).

    ``more`` takes the other keyword arguments of :func:`attnspec.sdpa` (window,
    softcap, alibi_slopes, sinks, dropout_mask, dropout_p). Every form sdpa takes is
    taken (it validates them): batch dimensions broadcast between q, k, v and the
    options, v (or a mask, sinks) with batch dimensions that q and k lack, sinks 0-d,
    ``(Hq,)`` or ``(..., Hq)``, three 2-D arrays for one head; ``weighted`` and ``bound``
    have the output's shape ``(..., Hq, L, Ev)`` (``(L, Ev)`` for 2-D inputs).
    """
    import attnspec

    kw: dict[str, Any] = {"scale": scale, "mask": mask, "bias": bias, "causal": causal, **more}
    kw.pop("precision", None)
    kw.pop("return_lse", None)
    if align is not None:
        kw["align"] = align
    # |NaN| at a hidden value stays hidden: attnspec.sdpa discards it.
    weighted = attnspec.sdpa(q, k, np.abs(v), precision="fast", **kw)
    data = logit_data(q, k, **kw)
    rho = _fast_rho(data)
    two_d = np.ndim(q) == 2 and np.ndim(k) == 2
    if two_d:
        rho = rho[0]
    rho = rho[..., None]
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        exact_weighted = np.where(rho < 1, weighted / (1 - rho), np.inf)
        bound = rho * exact_weighted
    bound = np.where(np.isnan(bound), np.where(weighted == 0, 0.0, np.inf), bound)
    vmax = visible_value_max(v, data, two_d)
    floor = SECOND_ORDER * (data.n_keys + 1) * ETA * (1 + vmax)
    return weighted, bound + floor


def visible_value_max(v: Any, data: LogitData, two_d: bool) -> F64:
    r""":math:`\max_{j\ \mathrm{visible}} |v_{jk}|` per output entry (0 for empty rows)."""
    v = np.asarray(v, dtype=np.float64)
    if two_d:
        v = v[None]
    hq, hkv = data.seen.shape[-3], v.shape[-3]
    vv = np.abs(np.repeat(v, hq // hkv, axis=-3))
    seen = data.seen
    if seen.shape[-1] == vv.shape[-2] + 1:  # the sink: value 0
        seen = seen[..., :-1]
    # visible entries only: |v| at hidden keys may be NaN or inf
    with np.errstate(invalid="ignore"):
        big = np.where(seen[..., :, :, None], vv[..., None, :, :], 0.0)
    out = np.max(big, axis=-2, initial=0.0)
    return out[0] if two_d else out


def textbook_lse_bound(q: F64, k: F64, **kw: Any) -> F64:
    r"""A bound on :math:`|\hat\ell_i - \ell_i|` for the lse computed the textbook way.

    :math:`\ell = a + \log \sum_j e^{s_j - a}` with :math:`a` the row maximum: the logit
    errors move :math:`\ell` by at most :math:`\varepsilon_i` (the lse is 1-Lipschitz in
    the max norm); the rounded shifts perturb by :math:`uR_i`; ``exp`` (:math:`2u`), the
    sum (:math:`\gamma_n`) and up to :math:`n` online rescalings (:math:`\gamma_{3n}`) give
    the sum a relative error :math:`(4n + 2)u`, which the ``log`` turns into an absolute
    one; ``log`` itself :math:`2u \log n`, the final addition of :math:`a`:
    :math:`u(|a| + \log n)`. Total, first order: :math:`\varepsilon_i + u(|a| + 3\log n
    + 4n + 2 + R_i)`, with :math:`n` the visible keys (sink included): the form of
    Blanchard, Higham & Higham 2021 (sec. 3) for the shifted log-sum-exp, with the logit
    error added. Shape (..., Hq, L) with the batch of q, k and the options (v is not
    seen: the lse is the same along batch dimensions only v has; broadcast it to the lse's
    shape); 0 for a row with nothing visible (its lse is exactly :math:`-\infty`).
    """
    data = logit_data(q, k, **kw)
    n = np.maximum(data.count, 1.0)
    top = np.where(np.isfinite(data.top), data.top, 0.0)
    with np.errstate(over="ignore", invalid="ignore"):
        b = data.eps + SECOND_ORDER * U * (np.abs(top) + 3 * np.log(n) + 4 * n + 2 + data.spread)
    b = np.where(data.count > 0, b, 0.0)
    return b[0] if (np.ndim(q) == 2 and np.ndim(k) == 2) else b


def accurate_sdpa_bound(weighted: Any, max_abs_v: Any = 0.0, floor: float = 0.0) -> Any:
    r"""The claim of ``precision="accurate"`` on the output, as a bound.

    :math:`|\hat o_{ik} - o_{ik}| \le 4u \sum_j p_{ij}|v_{jk}| + f \max_j |v_{jk}| + \eta`
    with ``weighted`` :math:`= \sum_j p_{ij}|v_{jk}|` (exact), ``max_abs_v`` the largest
    visible :math:`|v_{jk}|` and ``floor`` :math:`f` (default 0: the claim as stated in
    :func:`attnspec.sdpa`). Where it comes from: the double-double weights and the
    accurate product (:func:`attnspec.reference.matmul.dot_dd`, within :math:`2^{-56}
    \sum_j |p_{ij}||v_{jk}| + \eta`, whatever the values at keys of weight 0) leave an
    error well below :math:`u \sum_j p_{ij}|v_{jk}|` before the final rounding to
    float64, which adds :math:`u|o_{ik}| \le u \sum_j p_{ij}|v_{jk}|`; the claim keeps a
    factor 4 of margin. :math:`\eta`: a subnormal result rounds with an absolute error up
    to :math:`\eta / 2`, which no relative bound covers. A nonzero ``floor`` states the
    weaker form :math:`+ 2^{-60} \max_j |v_{jk}|` should a product only guarantee that.

    Tiny weights times large values are included: a weight below :math:`2^{-969}` (a
    double-double cannot hold it to relative precision) is also carried at scale
    :math:`2^{600}` or :math:`2^{1200}` into the product :math:`PV`
    (:class:`attnspec.reference.doubledouble.Weights`; tests/test_accurate_output_bound.py).
    """
    w = np.asarray(weighted, dtype=np.float64)
    if not floor:  # no floor term: 0 * max|v| would be NaN where a value is infinite
        return 4 * U * w + ETA
    return 4 * U * w + floor * np.asarray(max_abs_v, dtype=np.float64) + ETA
