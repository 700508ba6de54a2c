r"""Error bounds for the backward pass of attention in float64, derived step by step.

Each bound is componentwise, a function of the actual inputs: for every gradient
:math:`g` (``dq``, ``dk``, ``dv``, ``dbias``, ``dsinks``), a bound on
:math:`|\hat g - g|`, the computed gradient against the exact gradient of the definition
on the same float64 inputs. Notation of :mod:`attnspec.reference.backward`
(:math:`P, \tilde P, O, dP, D, dZ, dS`), :math:`u = 2^{-53}`, :math:`\eta = 2^{-1074}`,
:math:`\gamma_n = nu/(1-nu)` (Higham 2002, Lemma 3.1). The magnitudes the bounds are
made of (all entries nonnegative; hidden positions 0):

.. math::

    W_{ie} = \textstyle\sum_j \tilde P_{ij} |v_{je}| \;(\ge |O_{ie}|), \qquad
    C_i = \textstyle\sum_e |dO_{ie}|\, W_{ie} \;(\ge |D_i|), \qquad
    B_{ij} = \textstyle\sum_e |dO_{ie}|\,|v_{je}| \;(\ge |dP_{ij}|),

    A_{ij} = |dP_{ij}| + |D_i| + |d\ell_i|, \qquad
    M^Z_{ij} = P_{ij} (A_{ij} + C_i) \;(\ge |dZ_{ij}|),

and the magnitudes of the gradients, the closed forms with every factor replaced by its
magnitude: :math:`M^Q = |\tau|\, M^Z |K|`, :math:`M^K = |\tau|\, (M^Z)^\top |Q|`,
:math:`M^V = \tilde P^\top |dO|`, :math:`M^{b} = M^Z`, :math:`M^\sigma_h = \sum_i
M^Z_{i\sigma}`, each summed over the axes its input was broadcast along (GQA groups
included). :math:`M^{1}` is the same with :math:`P` and :math:`\tilde P` replaced by 1 at
every visible position (for the absolute floors).

* "accurate" (:func:`accurate_backward_bound`): :math:`u|g| + u M^g + \eta(M^{1,g} + 1)`;
* "fast" (:func:`fast_backward_bound`): a first-order bound for any implementation that
  evaluates the closed forms in float64 the textbook way (derivation at the function).

References
----------
N. J. Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., SIAM, 2002,
doi:10.1137/1.9780898718027 (Lemma 3.1, eq. 3.5).
M. Joldes, J.-M. Muller, V. Popescu, Tight and rigorous error bounds for basic building
blocks of double-word arithmetic, ACM TOMS 44(2), 2017, doi:10.1145/3121432.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from attnspec.spec.tolerances._core import ETA, SECOND_ORDER, U
from attnspec.spec.tolerances.attention import _fast_rho, gamma, logit_data, textbook_sdpa_bound

__all__ = [
    "GRADIENTS",
    "BackwardQuantities",
    "accurate_backward_bound",
    "family_bound",
    "fast_backward_bound",
    "quantities",
    "sum_to",
]

F64 = npt.NDArray[np.float64]
Bools = npt.NDArray[np.bool_]
#: the gradients of sdpa_backward, in order
GRADIENTS = ("dq", "dk", "dv", "dbias", "dsinks")


def sum_to(x: F64, shape: tuple[int, ...]) -> F64:
    """``x`` summed over the axes along which an array of ``shape`` broadcasts to it."""
    lead = x.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        lead + i for i, n in enumerate(shape) if n == 1 and x.shape[lead + i] != 1
    )
    return np.sum(x, axis=axes).reshape(shape) if axes else x.reshape(shape)


def _count_to(full: tuple[int, ...], shape: tuple[int, ...]) -> int:
    """How many entries of ``full`` are summed into each entry of ``shape``."""
    return max(1, math.prod(full) // max(1, math.prod(shape)))


@dataclass(frozen=True)
class BackwardQuantities:
    """The forward and backward quantities of one problem in float64 (plain evaluation:
    the bounds are first order, so these stand in for the exact ones), every array in the
    shape of the logits ``(..., Hq, L, S)`` (keys only; the sink column apart)."""

    tau: float
    q: F64  # (..., Hq, L, E)
    k: F64  # (..., Hq, S, E), kv heads repeated
    v: F64  # (..., Hq, S, Ev)
    dout: F64  # (..., Hq, L, Ev)
    seen: Bools  # visible keys
    p: F64  # weights before dropout, 0 at hidden keys
    pd: F64  # after dropout
    p_sink: F64 | None  # (..., Hq, L, 1)
    dp: F64  # dO V^T kappa r
    big_d: F64  # D (..., Hq, L, 1)
    dlse: F64  # (..., Hq, L, 1), 0 when not given
    capped: F64 | None  # c tanh(s/c) before bias, with softcap
    shapes: dict[str, tuple[int, ...]]  # the inputs' shapes (2-D with their head axis)
    two_d: bool


def quantities(
    q: Any, k: Any, v: Any, dout: Any, dlse: Any = None, **kw: Any
) -> BackwardQuantities:
    """The quantities of :class:`BackwardQuantities` for ``sdpa_backward(q, k, v, dout,
    dlse=dlse, **kw)``, by the reference's own steps in plain float64."""
    from attnspec.reference.arith import Fast
    from attnspec.reference.attention import SdpaOptions, dropped, logits, prepare
    from attnspec.reference.softmax import normalise

    kw = {name: value for name, value in kw.items() if name not in ("precision", "return_lse")}
    arith = Fast()
    prep = prepare(arith, q, k, v, SdpaOptions.from_kwargs(kw))
    lg = logits(arith, prep.q, prep.k, prep.v, prep.block(0, prep.n_q))
    with np.errstate(invalid="ignore", over="ignore"):
        p_all = normalise(arith, lg.s, lg.approx, ("softmax",))["softmax"]
        pd_all = dropped(arith, p_all, lg.keep, prep.options.dropout_p)
        n_k = prep.n_k
        d_out = np.asarray(dout, dtype=np.float64)
        if prep.two_d:
            d_out = d_out[None]
        o = np.matmul(pd_all, np.where(np.isfinite(lg.v), lg.v, 0.0))
        dpd = np.matmul(d_out, np.swapaxes(lg.v, -1, -2))
        dp_all = dropped(arith, dpd, lg.keep, prep.options.dropout_p)
        big_d = np.sum(d_out * o, axis=-1, keepdims=True)
    seen_all = (
        np.ones(p_all.shape, dtype=bool)
        if lg.seen is None
        else np.broadcast_to(lg.seen, p_all.shape)
    )
    dl = np.zeros((*d_out.shape[:-1], 1))
    if dlse is not None:
        dl = np.asarray(dlse, dtype=np.float64)[..., None]
        if prep.two_d:
            dl = dl[None]
    shapes = {
        "dq": np.shape(q),
        "dk": np.shape(k),
        "dv": np.shape(v),
    }
    if prep.two_d:
        shapes = {name: (1, *shape) for name, shape in shapes.items()}
    if prep.bias is not None:
        shapes["dbias"] = prep.bias.shape
    if prep.sinks is not None:
        shapes["dsinks"] = prep.sinks.shape
    keys = slice(0, n_k)
    sink = prep.sinks is not None
    return BackwardQuantities(
        tau=prep.tau,
        q=prep.q,
        k=prep.k,
        v=prep.v,
        dout=d_out,
        seen=seen_all[..., keys],
        p=np.where(seen_all, p_all, 0.0)[..., keys],
        pd=np.where(seen_all, pd_all, 0.0)[..., keys],
        p_sink=p_all[..., n_k:] if sink else None,
        dp=np.where(seen_all, dp_all, 0.0)[..., keys],
        big_d=big_d,
        dlse=dl,
        capped=None if lg.capped is None else lg.capped[..., keys],
        shapes=shapes,
        two_d=prep.two_d,
    )


def _finite(a: F64) -> F64:
    """Hidden NaN and inf are not part of any gradient (the quantities at visible
    positions are finite for the problems a bound is asked for)."""
    return np.where(np.isfinite(a), a, 0.0)


def _magnitudes(
    bq: BackwardQuantities, weights: F64, weights_d: F64, sink_w: F64 | None
) -> dict[str, F64]:
    """:math:`M^g` for the weights given (the true ones, or 1 at visible keys for
    :math:`M^{1}`), summed to the inputs' shapes, in the full (repeated-head) layout
    first."""
    abs_v, abs_do = np.abs(_finite(bq.v)), np.abs(bq.dout)
    w = weights_d @ abs_v  # W
    c = np.sum(abs_do * w, axis=-1, keepdims=True)  # C
    a = np.abs(bq.dp) + np.abs(bq.big_d) + np.abs(bq.dlse)  # A
    mz = weights * (a + c)
    tau = abs(bq.tau)
    out = {
        "dq": tau * (mz @ np.abs(_finite(bq.k))),
        "dk": tau * (np.swapaxes(mz, -1, -2) @ np.abs(_finite(bq.q))),
        "dv": np.swapaxes(weights_d, -1, -2) @ abs_do,
    }
    if "dbias" in bq.shapes:
        out["dbias"] = mz
    if sink_w is not None:
        out["dsinks"] = (sink_w * (np.abs(bq.big_d) + np.abs(bq.dlse) + c))[..., 0]
    return out


def _to_inputs(bq: BackwardQuantities, full: dict[str, F64]) -> dict[str, F64]:
    """Full-layout magnitudes summed to the inputs' shapes (GQA groups, broadcast axes)."""
    out = {}
    for name, x in full.items():
        shape = bq.shapes[name]
        if name in ("dk", "dv"):
            hkv = shape[-3]
            hq = x.shape[-3]
            x = x.reshape((*x.shape[:-3], hkv, hq // hkv, *x.shape[-2:])).sum(axis=-3)
        if name == "dsinks":
            x = sum_to(x.sum(axis=-1), shape)
        else:
            x = sum_to(x, shape)
        out[name] = x
    return out


def _terms(bq: BackwardQuantities, name: str) -> int:
    """The number of terms summed into each entry of gradient ``name`` (for gamma_n)."""
    full = {
        "dq": (*bq.p.shape[:-1], bq.k.shape[-1]),
        "dk": (*bq.p.shape[:-2], bq.p.shape[-1], bq.q.shape[-1]),
        "dv": (*bq.p.shape[:-2], bq.p.shape[-1], bq.v.shape[-1]),
        "dbias": bq.p.shape,
        "dsinks": bq.p.shape[:-1],
    }[name]
    inner = {"dq": bq.p.shape[-1], "dk": bq.p.shape[-2], "dv": bq.p.shape[-2]}.get(name, 1)
    return inner * _count_to(full, bq.shapes[name])


def _shaped(bq: BackwardQuantities, bounds: dict[str, F64]) -> dict[str, F64]:
    if bq.two_d:
        return {n: (b[0] if n in ("dq", "dk", "dv") else b) for n, b in bounds.items()}
    return bounds


def accurate_backward_bound(
    q: Any, k: Any, v: Any, dout: Any, dlse: Any = None, **kw: Any
) -> dict[str, F64]:
    r"""The claim of ``sdpa_backward(precision="accurate")``: each gradient within
    :math:`u|g| + u M^g + \eta (M^{1,g} + 1)` of the exact one (one entry per gradient
    the call returns, keyed by ``dq`` ... ``dsinks``, in the inputs' shapes).

    Derivation, for the double-double arithmetic of :mod:`attnspec.reference.doubledouble`
    (its docstring states each operation's error): the weights carry a relative error
    below :math:`2^{-62}`; a product of a double-double and a float64 matrix
    (``dot_dd``) is within :math:`2^{-56}\sum|a||b|`; a product of two float64 matrices is
    exact, then rounded to a double-double (:math:`2u^2`); additions, subtractions and
    products of double-doubles are within :math:`4u^2` of the magnitude of their operands
    (Joldes, Muller & Popescu 2017). So :math:`O` is within :math:`(2^{-56} + 2^{-62}) W`,
    :math:`D` (a ``dot_dd`` of :math:`dO \odot O` with ones) within
    :math:`(2^{-55} + 2^{-61} + 4u^2) C`, :math:`dP` within :math:`5u^2|dP|`, and
    :math:`dZ = P(dP - D + d\ell)` within :math:`(2^{-62} + 2^{-55} + 2^{-61} + 16u^2)
    M^Z < 2^{-54.8} M^Z`; the softcap's factor :math:`1 - (t/c)^2 \le 1` adds
    :math:`12u^2 |dZ|`. The last product (``dot_dd``, :math:`2^{-56}`), the scale
    (:math:`3u^2`), the sums over broadcast axes and GQA groups (at most eight additions,
    :math:`32u^2`, or a ``dot_dd`` with ones, :math:`2^{-56}`) and the accumulation over
    the blocks of query rows (at most :math:`2^{20}` additions, :math:`2^{22}u^2 <
    2^{-84}`) give in all below :math:`(2^{-54.8} + 2 \cdot 2^{-56} + 2^{-80}) M^g < u M^g`.
    The final rounding adds :math:`u|g|`. Weights below :math:`2^{-969}` are held to
    :math:`2^{-1074}` absolute, and products that underflow round with an absolute error
    below :math:`\eta`: the floor :math:`\eta (M^{1,g} + 1)`.
    """
    import attnspec

    bq = quantities(q, k, v, dout, dlse, **kw)
    kw = {name: value for name, value in kw.items() if name not in ("precision", "return_lse")}
    ref = attnspec.sdpa_backward(q, k, v, dout, dlse=dlse, precision="accurate", **kw)
    mag = _to_inputs(bq, _magnitudes(bq, bq.p, bq.pd, bq.p_sink))
    ones = bq.seen.astype(np.float64)
    one_sink = None if bq.p_sink is None else np.ones_like(bq.p_sink)
    floor = _to_inputs(bq, _magnitudes(bq, ones, ones, one_sink))
    mag, floor = _shaped(bq, mag), _shaped(bq, floor)
    out = {}
    for name in mag:
        g = np.abs(np.asarray(getattr(ref, name), dtype=np.float64))
        out[name] = SECOND_ORDER * (U * g + U * mag[name]) + ETA * (floor[name] + 1)
    return out


def fast_backward_bound(
    q: Any, k: Any, v: Any, dout: Any, dlse: Any = None, **kw: Any
) -> dict[str, F64]:
    r"""A first-order bound on the error of float64 gradients computed the textbook way
    (one entry per gradient, keyed by ``dq`` ... ``dsinks``, in the inputs' shapes).

    For any implementation that evaluates, in float64 with round to nearest: the weights
    with the relative error :math:`\rho_i` of :func:`~attnspec.spec.tolerances.attention.
    textbook_sdpa_bound` (logits, max-shifted softmax, dropout), the output :math:`O` with
    that function's bound :math:`\delta O`, and then the closed forms by dot products:

    1. :math:`dP_{ij} = (dO_i \cdot v_j)\,\kappa_{ij} r`: :math:`\delta dP_{ij} \le
       \gamma_{E_v} B_{ij} + \gamma_3 |dP_{ij}|`;
    2. :math:`D_i`, either as :math:`\sum_e dO_{ie} \hat O_{ie}` (FlashAttention, cuDNN):
       :math:`\gamma_{E_v} C_i + \sum_e |dO_{ie}|\,\delta O_{ie}`, or as
       :math:`\sum_j \hat P_{ij}\, dP_{ij}` (autograd of a materialised softmax):
       :math:`\sum_j P_{ij}((\rho_i + \gamma_S)|dP_{ij}| + \delta dP_{ij})`; the bound
       takes the sum of both;
    3. :math:`dZ_{ij} = \hat P_{ij}(dP_{ij} - D_i + d\ell_i)`: :math:`\delta dZ_{ij} \le
       (\rho_i + \gamma_3) P_{ij} A_{ij} + P_{ij}(\delta dP_{ij} + \delta D_i)`;
    4. softcap: :math:`1 - r^2` with :math:`r = \hat t/c` off by :math:`\varepsilon_i / c +
       u|r|` (:math:`\varepsilon_i` the logit error of
       :func:`~attnspec.spec.tolerances.attention.logit_data`): the factor is off by
       :math:`2\varepsilon_i/c + \gamma_4`, so :math:`\delta dS \le \delta dZ + |dZ|
       (2\varepsilon_i/c + \gamma_4)`;
    5. :math:`dQ = \tau\, dS\, K`, :math:`dK = \tau\, dS^\top Q`, :math:`dV = \hat{\tilde P}^\top
       dO`, :math:`d\mathrm{bias}`, :math:`d\sigma`: the errors of their factors through
       the product, plus :math:`\gamma_{n+2}` times the magnitude of the product, with
       :math:`n` the number of terms summed into each entry (keys, or queries times the
       GQA group times the broadcast axes);
    6. underflow: :math:`(S + E + 8)\,\eta\,(M^{1,g} + 1)`.

    The total is first order in :math:`u`; it is multiplied by ``SECOND_ORDER`` (1.01),
    which covers the second-order terms while every :math:`\rho_i, \gamma_n \le 2^{-20}`.
    """
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        out = _fast_bounds(q, k, v, dout, dlse, kw)
    # a bound that is not a number (inf * 0 where a relative error overflows) says nothing
    return {name: np.where(np.isnan(b), np.inf, b) for name, b in out.items()}


def _fast_bounds(
    q: Any, k: Any, v: Any, dout: Any, dlse: Any, kw: dict[str, Any]
) -> dict[str, F64]:
    """The body of :func:`fast_backward_bound` (its warnings silenced by the caller)."""
    bq = quantities(q, k, v, dout, dlse, **kw)
    kw = {name: value for name, value in kw.items() if name not in ("precision", "return_lse")}
    data = logit_data(q, k, **kw)
    rho = _fast_rho(data)  # (..., Hq, L); logit_data gives 2-D inputs their head axis
    rho = np.broadcast_to(rho[..., None], bq.big_d.shape)
    _, d_o = textbook_sdpa_bound(q, k, v, **kw)
    d_o = d_o[None] if bq.two_d else d_o
    d_o = np.broadcast_to(d_o, bq.dout.shape)
    n_k, width_v = bq.p.shape[-1], bq.v.shape[-1]
    abs_v, abs_do = np.abs(_finite(bq.v)), np.abs(bq.dout)
    b = abs_do @ np.swapaxes(abs_v, -1, -2)
    if bq.pd is not bq.p:
        b = b * np.where(bq.p > 0, np.abs(bq.pd) / np.where(bq.p > 0, bq.p, 1.0), 1.0)
    d_dp = gamma(width_v) * b + gamma(3) * np.abs(bq.dp)
    w = bq.pd @ abs_v
    c = np.sum(abs_do * w, axis=-1, keepdims=True)
    d_d = gamma(width_v) * c + np.sum(abs_do * d_o, axis=-1, keepdims=True)
    d_d = d_d + np.sum(
        bq.p * ((rho + gamma(max(n_k, 1))) * np.abs(bq.dp) + d_dp), axis=-1, keepdims=True
    )
    a = np.abs(bq.dp) + np.abs(bq.big_d) + np.abs(bq.dlse)
    d_z = (rho + gamma(3)) * bq.p * a + bq.p * (d_dp + d_d)
    dz = np.abs(bq.p * (bq.dp - bq.big_d + bq.dlse))
    d_s, ds = d_z, dz
    if bq.capped is not None:
        cap = float(kw["softcap"])
        eps = data.eps
        # hidden positions (whose logits may be NaN) carry no gradient
        factor = np.where(bq.seen, np.clip(1 - (bq.capped / cap) ** 2, 0.0, 1.0), 0.0)
        d_s = d_z * factor + dz * (2 * eps[..., None] / cap + gamma(4))
        ds = dz * factor
    tau = abs(bq.tau)
    abs_k, abs_q = np.abs(_finite(bq.k)), np.abs(_finite(bq.q))
    full = {
        "dq": (tau * (d_s @ abs_k), tau * (ds @ abs_k)),
        "dk": (
            tau * (np.swapaxes(d_s, -1, -2) @ abs_q),
            tau * (np.swapaxes(ds, -1, -2) @ abs_q),
        ),
        "dv": (
            np.swapaxes(rho * bq.pd, -1, -2) @ abs_do,
            np.swapaxes(np.abs(bq.pd), -1, -2) @ abs_do,
        ),
    }
    if "dbias" in bq.shapes:
        full["dbias"] = (d_z, dz)
    if bq.p_sink is not None:
        sink_a = np.abs(bq.big_d) + np.abs(bq.dlse)
        d_sink = (rho + gamma(3)) * bq.p_sink * sink_a + bq.p_sink * d_d
        full["dsinks"] = (d_sink[..., 0], np.abs(bq.p_sink * (bq.dlse - bq.big_d))[..., 0])
    errors = _to_inputs(bq, {name: pair[0] for name, pair in full.items()})
    products = _to_inputs(bq, {name: pair[1] for name, pair in full.items()})
    ones = bq.seen.astype(np.float64)
    one_sink = None if bq.p_sink is None else np.ones_like(bq.p_sink)
    floor = _to_inputs(bq, _magnitudes(bq, ones, ones, one_sink))
    out = {}
    width = bq.q.shape[-1]
    for name in errors:
        n = _terms(bq, name)
        first = errors[name] + gamma(n + 2) * products[name]
        under = (n_k + width + 8) * ETA * (floor[name] + 1)
        out[name] = SECOND_ORDER * first + under
    return _shaped(bq, out)


def family_bound(
    kind: str, x: Any, g: Any, accuracy: str, axis: int = -1, where: Any = None
) -> F64:
    r"""A bound on the error of the gradient of ``kind`` ("softmax" for
    :func:`attnspec.softmax_vjp` and ``softmax_jvp``, "log_softmax", "logsumexp") along
    ``axis``, for "accurate" or "fast" (textbook float64), in the shape of ``x``.

    With :math:`p` the weights, :math:`V` the included entries and the magnitudes
    :math:`M_j = p_j (|g_j| + \sum_{i \in V} p_i |g_i|)` (softmax),
    :math:`|g_j| + p_j \sum_{i \in V} |g_i|` (log_softmax), :math:`|g|\,p_j` (logsumexp):

    * accurate: :math:`u|r_j| + u M_j + \eta`. The weights in double-double carry a
      relative error below :math:`2^{-62}`, the row sum (``dot_dd`` with ones)
      :math:`2^{-56}` of the magnitude of its terms, each other operation :math:`4u^2`
      (see :func:`accurate_backward_bound`): below :math:`2^{-55} M_j`, and the final
      rounding :math:`u|r_j|`;
    * fast: :math:`(\rho_j + \gamma_{n+3}) M_j + 4\eta`, with :math:`\rho_j` the relative
      error of the weights (:func:`~attnspec.spec.tolerances.softmax.softmax_fast_bound`):
      the error of each weight passes into every term it multiplies, and the sum of
      :math:`n` terms, the subtraction and the product round :math:`n + 2` times (times
      ``SECOND_ORDER``).
    """
    from attnspec.spec.tolerances.softmax import softmax_fast_bound

    if accuracy not in ("accurate", "fast"):
        raise ValueError(f"accuracy must be 'accurate' or 'fast', got {accuracy!r}")
    x = np.moveaxis(np.asarray(x, dtype=np.float64), axis, -1)
    included = x > -np.inf
    if where is not None:
        included &= np.moveaxis(
            np.broadcast_to(np.asarray(where, dtype=bool), np.shape(x)), axis, -1
        )
    import attnspec

    xx = np.where(included, x, -np.inf)
    with np.errstate(invalid="ignore"):
        p = attnspec.softmax(xx, precision="accurate")
    g64 = np.asarray(g, dtype=np.float64)
    if kind == "logsumexp":  # g has the reduced shape (the axis kept or not)
        g_rows = g64 if g64.ndim == x.ndim else np.expand_dims(g64, axis)
        mag = np.abs(np.moveaxis(g_rows, axis, -1)) * p
        r = mag  # |g p|
    else:
        g_in = np.where(included, np.moveaxis(g64, axis, -1), 0.0)
        gg = np.abs(g_in)
        if kind == "softmax":
            mag = p * (gg + np.sum(p * gg, axis=-1, keepdims=True))
            vjp = attnspec.softmax_vjp
        else:
            mag = gg + p * np.sum(gg, axis=-1, keepdims=True)
            vjp = attnspec.log_softmax_vjp
        r = np.abs(vjp(xx, g_in, precision="accurate")) if accuracy == "accurate" else mag
    n = x.shape[-1]
    if accuracy == "accurate":
        out = SECOND_ORDER * U * (r + mag) + ETA
    else:
        rel, _ = softmax_fast_bound(xx.reshape(-1, n), included.reshape(-1, n))
        out = SECOND_ORDER * (rel.reshape(x.shape) + gamma(n + 3)) * mag + 4 * ETA
    return np.moveaxis(np.where(included, out, 0.0), -1, axis)
