r"""Error bounds of blocked attention and of merging partial results, in float64.

What an online implementation (a blocked attention walking key blocks, a merge of
normalised partials) may claim, against the exact values of the definition on its
float64 inputs, per output entry and per lse:

* "fast" (plain float64): :func:`online_sdpa_bound` for a blocked attention with a given
  block size, :func:`merge_bound` for one merge of given partials;
* "accurate": :func:`accurate_online_bound` for a blocked attention whose partials meet
  the claim of ``attnspec.sdpa(precision="accurate")`` and whose merges are accurate
  (:func:`accurate_merge_bound`, the accurate claim for attention over two keys).

Notation as in :mod:`attnspec.spec.tolerances.attention`: :math:`u = 2^{-53}`,
:math:`\eta = 2^{-1074}`, :math:`\gamma_n = nu/(1 - nu)`; for row :math:`i`:
:math:`\varepsilon_i` the error bound of its float64 logits, :math:`R_i` their range,
:math:`n_i` the visible keys (sink included), :math:`W_{ik} = \sum_j p_{ij}|v_{jk}|`, and
:math:`M_i = |\max_j s_{ij}| + R_i + \log n_i`, which bounds :math:`|\ell_X|` for every
set :math:`X` of the row's keys (:math:`\min_j s_{ij} \le \ell_X \le \max_j s_{ij} + \log
n_i`). ``exp``, ``log`` and ``log1p`` are taken within one ulp (relative :math:`2u`), as in
the attention bounds. All bounds are first order in :math:`u`; ``SECOND_ORDER`` absorbs
the rest, and they are evaluated as :math:`e^{x} - 1` of the first-order sum where the
analysis multiplies factors :math:`e^{\delta}`.

**One merge** (claim ``online-merge-rounding``, proved by SymPy): for exact partials
:math:`(o_X, \ell_X)`, weights :math:`w_X = e^{\ell_X - \ell}`,

.. math::

    |\hat\ell - \ell| \le u(|\ell| + 3), \qquad
    |\hat o_k - o_k| \le u \sum_X w_X |o_{X,k}|\,(|\ell| + |\ell - \ell_X| + 7),

plus :math:`4\eta(1 + \max_X |o_{X,k}|)` for a weight or a product that underflows.

**A merge tree.** A blocked evaluation computes a partial for each block and merges them
along a tree whose every path from a block to the root has at most :math:`D` merges.
Take the computed partial of a leaf :math:`X` with :math:`|\hat\ell_X - \ell_X| \le e_X`
and :math:`|\hat o_X - o_X| \le \rho_X W_X`. The weight of leaf :math:`X` in the root is
the product of the merge weights :math:`e^{\hat\ell_{\mathrm{child}} - \hat\ell_{\mathrm{parent}}}`
along its path, each with its rounding; the exponents telescope to
:math:`\hat\ell_X - \hat\ell_{\mathrm{root}}`, so its relative error is at most

.. math::

    \delta_X \le e_X + e_{\mathrm{root}} + u(R_i + \log n_i) + 4uD,

(the subtractions' roundings, :math:`u|\ell_{\mathrm{child}} - \ell_{\mathrm{parent}}|`, add
up along the path to :math:`u(\ell_{\mathrm{root}} - \ell_X) \le u(R_i + \log n_i)`; each
level adds an exp, a product and a sum, :math:`4u`), and since logaddexp is 1-Lipschitz
in the max norm, :math:`e_{\mathrm{root}} \le \max_X e_X + D u(M_i + 3)`. As
:math:`\sum_X w_X W_X = W`, the output is within :math:`(\max_X \rho_X + \delta) W`.
For leaves computed the textbook way on blocks of at most :math:`b` keys
(:func:`~attnspec.spec.tolerances.attention.textbook_sdpa_bound` and
:func:`~attnspec.spec.tolerances.attention.textbook_lse_bound` on the computed logits:
:math:`\rho_X \le u(2R_i + 5b + 7)`, :math:`e_X \le u(M_i + 3\log b + 4b + 2 + R_i)`):

.. math::

    \rho^{\mathrm{partials}}_i = u\bigl(5R_i + 13b + 11 + 2M_i + 6\log b + \log n_i +
    D(M_i + 7)\bigr).

**The state form** (FlashAttention-2: :math:`m, l, \mathit{acc}` carried through :math:`D`
updates or merges). The maximum is exact; a key's weight :math:`e^{s_j - m}` is rescaled by
the factors :math:`e^{m_{\mathrm{old}} - m_{\mathrm{new}}}` of the later levels, whose
rounded exponents add up to at most :math:`u(m_{\mathrm{final}} - s_j) \le uR_i`, with an
exp (:math:`2u`) per level and for the key itself: the weights of :math:`l` and
:math:`\mathit{acc}` share a relative error :math:`\psi \le uR_i + 2u(D + 1)`, which moves
the normalised weights by at most :math:`2\psi`. The sums: a block's dot product
(:math:`\gamma_b`) and a product and a sum per level: :math:`\gamma_{b + 2D}` for each of
:math:`l` and :math:`\mathit{acc}`; the final division and dropout's factor
:math:`\gamma_4`:

.. math::

    \rho^{\mathrm{state}}_i = u\,(2R_i + 2b + 8D + 10).

**Together** ("fast": either form, any tree of depth :math:`D` over blocks of at most
:math:`b` keys; a sequential fold of :math:`N` blocks has :math:`D \le N`; a sink is one
more leaf, :math:`D + 1`), with the logits' own error :math:`\varepsilon_i` (each weight
moves by a factor within :math:`e^{\pm 2\varepsilon_i}`,
:func:`~attnspec.spec.tolerances._core.perturbation_factor`):

.. math::

    |\hat o_{ik} - o_{ik}| \le \bigl(e^{2\varepsilon_i + \max(\rho^{\mathrm{state}}_i,
    \rho^{\mathrm{partials}}_i)} - 1\bigr) W_{ik} + (S + 2N + 1)\,\eta\,(1 + \max_j |v_{jk}|),

and for the lse :math:`\varepsilon_i + \max\bigl(u(M_i + 2\log n_i + R_i + b + 4D + 2),\
u(M_i + 3\log b + 4b + 2 + R_i + D(M_i + 3))\bigr)` (the state form: :math:`\log l` from
:math:`l`'s relative error, the final :math:`m + \log l`).

**"accurate"**: every leaf within the accurate claim (:math:`4uW_X + \eta`, lse within one
ulp: :math:`e_X \le 2u|\ell_X| + \eta`) and every merge accurate (:math:`4u \sum_X w_X |o_X|
+ 2\eta` of the exact merge of its inputs, lse within one ulp: :func:`accurate_merge_bound`).
The weights of each merge are exact for its rounded inputs, so the telescoping holds up
to the rounding :math:`r` of each parent's lse, :math:`|r| \le 2uM_i`:
:math:`\delta_X \le e_X + e_{\mathrm{root}} + 2uM_iD`,
:math:`e_{\mathrm{root}} \le 2uM_i(D + 1)`, and

.. math::

    |\hat o_{ik} - o_{ik}| \le u\,(4 + 4D + 4M_i(D + 1))\, W_{ik} + (3N + 1)\eta, \qquad
    |\hat\ell_i - \ell_i| \le 2uM_i(D + 1) + (D + 1)\eta .

References
----------
N. J. Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., SIAM, 2002,
doi:10.1137/1.9780898718027 (sec. 2.2, Lemma 3.1). T. Dao, FlashAttention-2, ICLR 2024,
arXiv:2307.08691 (the state form).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

from attnspec.spec.tolerances._core import ETA, SECOND_ORDER, U
from attnspec.spec.tolerances.attention import (
    logit_data,
    textbook_sdpa_bound,
    visible_value_max,
)

__all__ = [
    "ETA",
    "U",
    "accurate_merge_bound",
    "accurate_online_bound",
    "merge_bound",
    "n_blocks",
    "online_sdpa_bound",
    "row_quantities",
]

F64 = npt.NDArray[np.float64]


def _expm1(x: Any) -> Any:
    """``SECOND_ORDER * (e^x - 1)``, inf where it would overflow (and for NaN)."""
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        out = SECOND_ORDER * np.expm1(np.minimum(x, 710.0))
    return np.where((x < 709) & ~np.isnan(x), out, np.inf)


def n_blocks(n_keys: int, block_keys: int) -> int:
    """The number of blocks of at most ``block_keys`` keys that cover ``n_keys`` keys."""
    if block_keys < 1:
        raise ValueError(f"block_keys must be >= 1, got {block_keys}")
    return max(1, -(-n_keys // block_keys))


def row_quantities(q: Any, k: Any, **kw: Any) -> dict[str, F64]:
    r"""Per row (shape ``(..., Hq, L)``): :math:`\varepsilon_i`, :math:`R_i`, :math:`n_i`,
    :math:`M_i` and the number of keys, from
    :func:`~attnspec.spec.tolerances.attention.logit_data` (0 for rows that see nothing)."""
    data = logit_data(q, k, **kw)
    two_d = np.ndim(q) == 2 and np.ndim(k) == 2
    n = np.maximum(data.count, 1.0)
    top = np.where(np.isfinite(data.top), data.top, 0.0)
    with np.errstate(over="ignore", invalid="ignore"):
        big_m = np.abs(top) + data.spread + np.log(n)
    out = {"eps": data.eps, "spread": data.spread, "count": n, "M": big_m}
    if two_d:
        out = {key: val[0] for key, val in out.items()}
    return out


def _depth(n_keys: int, block_keys: int, sinks: bool) -> tuple[int, int, int]:
    """(b, N, D): the block size, the number of blocks (a sink is one more) and the depth
    bound of any fold of them."""
    b = max(1, min(block_keys, max(n_keys, 1)))
    n = n_blocks(n_keys, b) + (1 if sinks else 0)
    return b, n, n


def online_sdpa_bound(
    q: Any, k: Any, v: Any, *, block_keys: int, **kw: Any
) -> tuple[F64, F64, F64]:
    r"""The "fast" claim of a blocked attention with blocks of ``block_keys`` keys.

    Returns ``(weighted, bound, lse_bound)``: an upper bound of :math:`W_{ik}` and the
    bounds on :math:`|\hat o_{ik} - o_{ik}|` (the output's shape) and
    :math:`|\hat\ell_i - \ell_i|` (the lse's shape, the batch of q, k and the options), for
    any float64 evaluation that folds the :math:`N = \lceil S / b \rceil` blocks (and the
    sink) in the state form or as normalised partials, along any tree (module docstring).
    ``kw`` are the keyword arguments of :func:`attnspec.sdpa`.
    """
    kw = {key: val for key, val in kw.items() if key not in ("precision", "return_lse")}
    weighted, tb = textbook_sdpa_bound(q, k, v, **kw)
    w_up = weighted + tb  # W <= the computed W plus its own bound
    rq = row_quantities(q, k, **kw)
    n_k = int(np.shape(k)[-2])
    b, n, d = _depth(n_k, int(block_keys), kw.get("sinks") is not None)
    r, big_m, count, eps = rq["spread"], rq["M"], rq["count"], rq["eps"]
    with np.errstate(over="ignore", invalid="ignore"):
        rho_state = U * (2 * r + 2 * b + 8 * d + 10)
        rho_part = U * (
            5 * r + 13 * b + 11 + 2 * big_m + 6 * math.log(b) + np.log(count) + d * (big_m + 7)
        )
        rho = _expm1(2 * eps + np.maximum(rho_state, rho_part))[..., None]
        bound = np.where(w_up == 0, 0.0, rho * w_up)
        lse_state = U * (big_m + 2 * np.log(count) + r + b + 4 * d + 2)
        lse_part = U * (big_m + 3 * math.log(b) + 4 * b + 2 + r + d * (big_m + 3))
        lse_bound = eps + SECOND_ORDER * np.maximum(lse_state, lse_part)
    bound = np.where(np.isnan(bound), np.inf, bound)
    lse_bound = np.where(np.isnan(lse_bound), np.inf, lse_bound)
    data = logit_data(q, k, **kw)
    two_d = np.ndim(q) == 2 and np.ndim(k) == 2
    vmax = visible_value_max(v, data, two_d)
    floor = SECOND_ORDER * (n_k + 2 * n + 1) * ETA * (1 + vmax)
    return w_up, bound + floor, lse_bound


def accurate_online_bound(
    q: Any, k: Any, v: Any, *, block_keys: int, **kw: Any
) -> tuple[F64, F64, F64]:
    r"""The "accurate" claim of a blocked attention: accurate partials, accurate merges.

    ``(weighted, bound, lse_bound)`` as for :func:`online_sdpa_bound`:
    :math:`u(4 + 4D + 4M_i(D + 1)) W_{ik} + (3N + 1)\eta` (:math:`\eta` per leaf,
    :math:`2\eta` per merge) and
    :math:`2uM_i(D + 1) + (D + 1)\eta` (module docstring).
    """
    kw = {key: val for key, val in kw.items() if key not in ("precision", "return_lse")}
    weighted, tb = textbook_sdpa_bound(q, k, v, **kw)
    w_up = weighted + tb
    rq = row_quantities(q, k, **kw)
    n_k = int(np.shape(k)[-2])
    _, n, d = _depth(n_k, int(block_keys), kw.get("sinks") is not None)
    big_m = rq["M"]
    with np.errstate(over="ignore", invalid="ignore"):
        rho = _expm1(U * (4 + 4 * d + 4 * big_m * (d + 1)))[..., None]
        bound = np.where(w_up == 0, 0.0, rho * w_up) + SECOND_ORDER * (3 * n + 1) * ETA
        lse_bound = SECOND_ORDER * (2 * U * big_m * (d + 1) + (d + 1) * ETA)
    bound = np.where(np.isnan(bound), np.inf, bound)
    lse_bound = np.where(np.isnan(lse_bound), np.inf, lse_bound)
    return w_up, bound, lse_bound


def _weights(lse_a: F64, lse_b: F64) -> tuple[F64, F64, F64]:
    """logaddexp and the two weights, in float64, for the bounds (0 for an empty side)."""
    with np.errstate(invalid="ignore", over="ignore"):
        ell = np.logaddexp(lse_a, lse_b)
        wa = np.where(lse_a == -np.inf, 0.0, np.exp(lse_a - ell))
        wb = np.where(lse_b == -np.inf, 0.0, np.exp(lse_b - ell))
    return ell, wa, wb


def merge_bound(o_a: Any, lse_a: Any, o_b: Any, lse_b: Any) -> tuple[F64, F64]:
    r"""The "fast" claim of one merge of the partials ``(o_a, lse_a)`` and ``(o_b, lse_b)``,
    against their exact merge (claim ``online-merge-rounding``).

    Returns ``(bound, lse_bound)``:
    :math:`u \sum_X w_X |o_{X,k}| (|\ell| + |\ell - \ell_X| + 7) + 4\eta(1 + \max_X|o_{X,k}|)`
    per output entry (evaluated as :math:`e^x - 1` of the relative part) and
    :math:`u(|\ell| + 3)` for the lse; inf where the inputs are not finite (the special
    rows are decided exactly: see :func:`attnspec.reference.online.merge_partials`).
    """
    oa, ob = np.asarray(o_a, dtype=np.float64), np.asarray(o_b, dtype=np.float64)
    la, lb = np.asarray(lse_a, dtype=np.float64), np.asarray(lse_b, dtype=np.float64)
    ell, wa, wb = _weights(la, lb)
    with np.errstate(invalid="ignore", over="ignore"):
        big = np.abs(ell)
        ra = _expm1(U * (big + np.abs(ell - la) + 7))[..., None]
        rb = _expm1(U * (big + np.abs(ell - lb) + 7))[..., None]
        rel = np.where(wa[..., None] > 0, ra * wa[..., None] * np.abs(oa), 0.0) + np.where(
            wb[..., None] > 0, rb * wb[..., None] * np.abs(ob), 0.0
        )
        floor = 4 * ETA * (1 + np.maximum(np.abs(oa), np.abs(ob)))
        bound = rel + floor
        lse_bound = SECOND_ORDER * U * (big + 3)
    finite = np.isfinite(bound)
    bound = np.where(finite, bound, np.inf)
    return bound, np.where(np.isfinite(ell), lse_bound, np.inf)


def accurate_merge_bound(o_a: Any, lse_a: Any, o_b: Any, lse_b: Any) -> tuple[F64, F64]:
    r"""The "accurate" claim of one merge, the accurate claim of attention over two keys
    (logits :math:`\ell_X`, values :math:`o_X`): :math:`4u \sum_X w_X |o_{X,k}| + 2\eta`
    (the weights within one ulp, :math:`2u`, the weighted sum rounded once, :math:`u`,
    and :math:`u` to spare; :math:`2\eta` for products that underflow and the final
    rounding of a subnormal), and the lse within one ulp (:math:`2u|\ell| + \eta`,
    rounded up by ``SECOND_ORDER``)."""
    oa, ob = np.asarray(o_a, dtype=np.float64), np.asarray(o_b, dtype=np.float64)
    la, lb = np.asarray(lse_a, dtype=np.float64), np.asarray(lse_b, dtype=np.float64)
    ell, wa, wb = _weights(la, lb)
    with np.errstate(invalid="ignore", over="ignore"):
        weighted = np.where(wa[..., None] > 0, wa[..., None] * np.abs(oa), 0.0) + np.where(
            wb[..., None] > 0, wb[..., None] * np.abs(ob), 0.0
        )
        bound = SECOND_ORDER * 4 * U * weighted + 2 * ETA
        lse_bound = SECOND_ORDER * (2 * U * np.abs(ell) + ETA)
    return np.where(np.isfinite(bound), bound, np.inf), np.where(
        np.isfinite(ell), lse_bound, np.inf
    )
