r"""The worked example: attention over the seven characters of 写代码的中年人.

``attnspec demo`` prints it; ``docs/worked-example.md`` (written by
:mod:`attnspec.worked_example`) tells the same story with the same numbers, both taken
from :func:`walkthrough`.

The sentence 写代码的中年人 ("a middle-aged person who writes code") has seven
characters; each gets a random embedding :math:`x_j \in \mathbb{R}^4`, drawn with
``numpy.random.default_rng(SEED).standard_normal((7, 4))`` (``SEED = 2017``, the year of
"Attention is all you need") and rounded to two decimals, so that every dot product is
an exact decimal that can be checked by hand. It is *self-attention* in its classic
tutorial form: queries, keys and values are the embeddings themselves (:math:`Q = K = V
= X`, the learned projections of a transformer taken as the identity). The character
年 asks the question: with :math:`q = x_{年}` and :math:`E = 4`,

.. math::

    s_j = q \cdot k_j, \qquad z_j = s_j / \sqrt{E}, \qquad
    p_j = \frac{e^{z_j - m}}{\sum_i e^{z_i - m}} \ (m = \max_i z_i), \qquad
    o = \sum_j p_j v_j .

The step-by-step part scales by :math:`1/\sqrt{E} = 1/2` explicitly, because
:func:`attnspec.sdpa` does by default; it is written in plain float64 numpy, the way a
tutorial would, and is then compared with :func:`attnspec.sdpa` (``precision="accurate"``)
and with :func:`attnspec.exact.sdpa` at 50 digits. All seven queries at once give the
7 x 7 weight matrix :math:`P = \operatorname{softmax}(X X^\top / \sqrt{E})`, taken from
:func:`attnspec.sdpa` itself: with :math:`V = I` the output :math:`P V` is :math:`P`.

How close the float64 numbers must be is derived, not picked: :func:`step_by_step_bounds`
(the numpy steps) and :func:`sdpa_bound` (the accuracy ``attnspec.sdpa`` documents).

References
----------
A. Vaswani et al., "Attention is all you need", NeurIPS 2017, arXiv:1706.03762.
P. Blanchard, D. J. Higham, N. J. Higham, "Accurately computing the log-sum-exp and
softmax functions", IMA J. Numer. Anal. 41(4), 2021, doi:10.1093/imanum/draa038.
N. J. Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., SIAM 2002,
doi:10.1137/1.9780898718027.
"""

from __future__ import annotations

import math
import unicodedata
from typing import Any, NamedTuple, TextIO

import mpmath
import numpy as np
import numpy.typing as npt

import attnspec
from attnspec.spec.tolerances.softmax import (
    ETA64,
    SECOND_ORDER,
    U64,
    perturbed_softmax_factor,
    softmax_fast_bound,
    sum_to_one_bound,
    ulp_error,
)

__all__ = [
    "DECIMALS",
    "DPS",
    "PINYIN",
    "QUERY",
    "SEED",
    "SENTENCE",
    "WIDTH",
    "Agreement",
    "dot_expansion",
    "embeddings",
    "fixed",
    "gamma",
    "run",
    "sdpa_bound",
    "step_by_step_bounds",
    "steps",
    "walkthrough",
]

F64 = npt.NDArray[np.float64]

#: the sentence; one token per character
SENTENCE = "写代码的中年人"
#: the characters in pinyin, for readers (and figures) without a CJK font
PINYIN = ("xiě", "dài", "mǎ", "de", "zhōng", "nián", "rén")
#: the character that asks the question
QUERY = "年"
#: the seed of ``numpy.random.default_rng`` (PCG64; the stream is stable since numpy 1.17)
SEED = 2017
#: the embedding width E
WIDTH = 4
#: the embeddings are rounded to this many decimals
DECIMALS = 2
#: the working precision of the exact values (decimal digits)
DPS = 50


def embeddings() -> tuple[tuple[str, ...], F64]:
    """The seven characters and their embeddings, shape (7, 4).

    ``numpy.random.default_rng(SEED).standard_normal((7, WIDTH))`` rounded to
    ``DECIMALS`` decimals (the float64 nearest each two-decimal number).
    """
    rng = np.random.default_rng(SEED)
    x = np.round(rng.standard_normal((len(SENTENCE), WIDTH)), DECIMALS)
    return tuple(SENTENCE), x


def gamma(n: int) -> float:
    r""":math:`\gamma_n = nu / (1 - nu)`, the bound of :math:`n` roundings (Higham 2002, sec. 3.1).

    Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., SIAM 2002,
    doi:10.1137/1.9780898718027.
    """
    return n * U64 / (1 - n * U64)


def step_by_step_bounds(q: F64, k: F64, v: F64, tau: float, z: F64, p: F64) -> dict[str, Any]:
    r"""Error bounds of the numpy steps against the exact values, for one query.

    Parameters
    ----------
    q, k, v : ndarray
        The query ``(E,)``, keys ``(S, E)`` and values ``(S, Ev)``.
    tau : float
        The scale (a float64 number: the definition uses it as it is).
    z, p : ndarray
        The computed scaled scores :math:`\hat z` and weights :math:`\hat p`, ``(S,)``.

    Returns
    -------
    dict
            ``scores`` (S,): :math:`\delta_j`; ``weights_rel`` (S,): :math:`\rho_j`;
            ``weights_abs`` (S,): the absolute part; ``context`` (Ev,): :math:`B_k`.

        Notes
        -----
        Model: each float64 operation rounds to nearest (:math:`|\epsilon| \le u = 2^{-53}`),
        ``exp`` is faithful (numpy's is within 0.67 ulp on the development machine,
        docs/performance.md).

        1. Scores. :math:`\hat s_j = fl(k_j \cdot q)`, a dot product of :math:`E` terms in any
           order (BLAS, with or without FMA): :math:`|\hat s_j - s_j| \le \gamma_E \sum_e
           |k_{je} q_e|` (Higham 2002, eq. (3.5)). Scaling rounds once more (not at all when
           :math:`\tau` is a power of two, as :math:`1/\sqrt 4 = 1/2` is):
           :math:`|\hat z_j - z_j| \le \delta_j = \tau\gamma_E \sum_e |k_{je} q_e| + u|\hat
           z_j|`, to first order.
        2. Weights. Exact softmax of :math:`\hat z` differs from that of :math:`z` by the
           relative factor :math:`e^{2\Delta} - 1`, :math:`\Delta = \max_j \delta_j`
           (:func:`attnspec.spec.tolerances.softmax.perturbed_softmax_factor`); the shifted, divided
           softmax in float64 adds :math:`\rho^{\mathrm{fast}}_j = (n + 6 + r_j + r)u`
           (:func:`attnspec.spec.tolerances.softmax.softmax_fast_bound`, Blanchard, Higham & Higham
           2021, Thm 4.3, doi:10.1093/imanum/draa038). Together :math:`|\hat p_j - p_j| \le
           \rho_j p_j + \alpha_j` with :math:`\rho_j = (1 + F)(1 + \rho^{\mathrm{fast}}_j) -
           1` and :math:`\alpha_j` the underflow part.
        3. Context. :math:`\hat o_k = fl(\sum_j \hat p_j v_{jk})`, :math:`S` terms:
           :math:`|\hat o_k - o_k| \le \sum_j |\hat p_j - p_j||v_{jk}| + \gamma_S \sum_j \hat
           p_j |v_{jk}| \le (R + \gamma_S) \sum_j \hat p_j |v_{jk}|` with :math:`R = \max_j
           \rho_j`, to first order (:math:`p_j \le \hat p_j / (1 - R)`; ``SECOND_ORDER``
           absorbs the second-order terms). Underflow adds :math:`\sum_j \alpha_j |v_{jk}|`
           and, for products that fall below the normal range, at most :math:`2^{-1075}`
           each (Higham 2002, sec. 2.1, the model with underflow): :math:`S \cdot 2^{-1074}` in all.
    """
    n_keys, width = k.shape
    scores = SECOND_ORDER * (tau * gamma(width) * (np.abs(k) @ np.abs(q)) + U64 * np.abs(z))
    factor = perturbed_softmax_factor(float(scores.max(initial=0.0)))
    fast_rel, fast_abs = softmax_fast_bound(z[None, :], np.ones((1, n_keys), dtype=bool))
    rel = SECOND_ORDER * ((1 + factor) * (1 + fast_rel[0]) - 1)
    big_r = float(rel.max(initial=0.0))
    alpha = fast_abs[0]
    context = (
        SECOND_ORDER * (big_r + gamma(n_keys)) * (p @ np.abs(v))
        + alpha @ np.abs(v)
        + n_keys * ETA64
    )
    return {"scores": scores, "weights_rel": rel, "weights_abs": alpha, "context": context}


def sdpa_bound(p: F64, v: F64) -> F64:
    r"""What :func:`attnspec.sdpa` (``precision="accurate"``) promises: ``|out - exact|``.

    Its docstring: each output within :math:`4u \sum_j p_{ij} |v_{jk}|` of the exact value
    (docs/performance.md, "Accurate attention"). ``p`` are computed weights
    :math:`\hat p` (within a relative :math:`10^{-14}` of the exact ones here);
    ``SECOND_ORDER`` covers the difference. Shape: ``p @ v``.
    """
    return np.asarray(SECOND_ORDER * 4 * U64 * (p @ np.abs(v)), dtype=np.float64)


def steps(q: F64, k: F64, v: F64, tau: float) -> dict[str, Any]:
    r"""Attention for one query ``q (E,)``, step by step in float64 numpy, as a tutorial writes it.

    Returns ``scores`` :math:`s_j = q \cdot k_j`, ``scaled`` :math:`z_j = \tau s_j`,
    ``max`` :math:`m`, ``shifted`` :math:`z_j - m`, ``exps`` :math:`e^{z_j - m}`,
    ``total`` (their sum), ``weights`` :math:`p_j`, ``context`` :math:`o = \sum_j p_j
    v_j` and ``lse`` :math:`m + \log(\text{total})`. :func:`step_by_step_bounds` bounds
    their errors.
    """
    scores = k @ q
    scaled = scores * tau
    m = float(scaled.max())
    shifted = scaled - m
    exps = np.exp(shifted)
    total = float(exps.sum())
    weights = exps / total
    return {
        "scores": scores,
        "scaled": scaled,
        "max": m,
        "shifted": shifted,
        "exps": exps,
        "total": total,
        "weights": weights,
        "context": weights @ v,
        "lse": m + math.log(total),
    }


def _exact_scores(q: F64, k: F64) -> list[Any]:
    # Each score an exact sum of exact products rounded once at DPS digits (mpmath.fdot).
    with mpmath.workdps(DPS):
        return [mpmath.fdot(list(map(mpmath.mpf, row)), list(map(mpmath.mpf, q))) for row in k]


def walkthrough() -> dict[str, Any]:
    r"""Every number of the worked example, for the CLI and the docs alike.

    Returns
    -------
    dict
    ``chars``, ``pinyin``, ``seed``, ``x`` (7, 4): the embeddings; ``query_index``,
    ``query`` (the character), ``q`` (4,), ``k``, ``v`` (7, 4) (both ``x``);
    ``tau``: :math:`1/\sqrt{E}`. Step by step, float64 numpy: ``scores`` :math:`s_j`,
    ``scaled`` :math:`z_j`, ``max`` :math:`m`, ``shifted`` :math:`z_j - m`, ``exps``,
    ``total`` (their sum), ``weights`` :math:`p_j`, ``weight_sum`` (math.fsum),
    ``context`` :math:`o`, ``lse`` :math:`m + \log(\text{total})`. attnspec:
    ``sdpa_context``, ``sdpa_lse``; ``matrix`` (7, 7) the weights of all queries
    (``attnspec.sdpa(x, x, I)``), ``sdpa_weights`` its 年 row, ``sdpa_weight_sum``.
    Exact at ``DPS`` digits (object arrays of mpf): ``exact_scaled``,
    ``exact_weights``, ``exact_context``, ``exact_lse``, ``exact_matrix``.
    ``bounds``: :func:`step_by_step_bounds` plus ``sdpa_context``, ``sdpa_matrix``,
    ``weight_sum`` (step by step) and ``sdpa_weight_sum``. ``agreement``: a list of
    :class:`Agreement` rows.
    """
    chars, x = embeddings()
    qi = chars.index(QUERY)
    q, k, v = x[qi], x, x
    tau = 1.0 / math.sqrt(WIDTH)  # the default scale of attnspec.sdpa

    st = steps(q, k, v, tau)
    scaled, weights = st["scaled"], st["weights"]

    # The same through attnspec; V = I turns the output into the weight matrix.
    sdpa_out, sdpa_lse = attnspec.sdpa(q[None, :], k, v, return_lse=True)
    identity = np.eye(len(chars))
    matrix = attnspec.sdpa(x, x, identity)
    exact_out, exact_lse = attnspec.exact.sdpa(q[None, :], k, v, dps=DPS, return_lse=True)
    exact_matrix = attnspec.exact.sdpa(x, x, identity, dps=DPS)
    with mpmath.workdps(DPS):
        exact_scaled = np.array([s * mpmath.mpf(tau) for s in _exact_scores(q, k)], dtype=object)

    bounds = step_by_step_bounds(q, k, v, tau, scaled, weights)
    bounds["sdpa_context"] = sdpa_bound(matrix[qi], v)
    bounds["sdpa_matrix"] = sdpa_bound(matrix, identity)
    bounds["weight_sum"] = float(
        sum_to_one_bound(bounds["weights_rel"], bounds["weights_abs"]).max()
    )
    # v = I: each weight within SECOND_ORDER * 4u of itself (relative), no absolute part.
    n = len(chars)
    bounds["sdpa_weight_sum"] = float(
        sum_to_one_bound(np.full(n, SECOND_ORDER * 4 * U64), np.zeros(n)).max()
    )

    walk: dict[str, Any] = {
        "chars": chars,
        "pinyin": PINYIN,
        "seed": SEED,
        "x": x,
        "query_index": qi,
        "query": QUERY,
        "q": q,
        "k": k,
        "v": v,
        "tau": tau,
        **st,
        "weight_sum": math.fsum(weights),
        "sdpa_context": sdpa_out[0],
        "sdpa_lse": float(sdpa_lse[0]),
        "matrix": matrix,
        "sdpa_weights": matrix[qi],
        "sdpa_weight_sum": math.fsum(matrix[qi]),
        "exact_scaled": exact_scaled,
        "exact_weights": exact_matrix[qi],
        "exact_context": exact_out[0],
        "exact_lse": exact_lse[0],
        "exact_matrix": exact_matrix,
        "bounds": bounds,
    }
    walk["agreement"] = _agreement(walk)
    return walk


class Agreement(NamedTuple):
    """One comparison of the walkthrough."""

    what: str
    #: max |computed - reference| over the entries, formed exactly
    max_abs: float
    #: max ulp_error(computed, reference)
    max_ulps: float
    #: max of the derived bound on |computed - reference| over the entries
    bound: float
    #: every entry within its own bound
    within: bool


def _agreement(w: dict[str, Any]) -> list[Agreement]:
    b = w["bounds"]
    qi = w["query_index"]

    def row(what: str, got: F64, ref: Any, bound: F64) -> Agreement:
        # The difference of a float64 and an mpf, formed exactly at DPS digits.
        diff = [abs(mpmath.mpf(float(g)) - mpmath.mpf(r)) for g, r in zip(got, ref, strict=True)]
        within = all(d <= mpmath.mpf(float(e)) for d, e in zip(diff, bound, strict=True))
        ulps = float(ulp_error(got, ref).max())
        return Agreement(what, float(max(diff)), ulps, float(bound.max()), within)

    with mpmath.workdps(DPS):
        return [
            row(
                "scaled scores z: step by step vs exact",
                w["scaled"],
                w["exact_scaled"],
                b["scores"],
            ),
            row(
                "weights p: step by step vs exact",
                w["weights"],
                w["exact_weights"],
                b["weights_rel"] * w["weights"] + b["weights_abs"],
            ),
            row(
                "weights p: attnspec.sdpa vs exact",
                w["sdpa_weights"],
                w["exact_weights"],
                b["sdpa_matrix"][qi],
            ),
            row("context o: step by step vs exact", w["context"], w["exact_context"], b["context"]),
            row(
                "context o: attnspec.sdpa vs exact",
                w["sdpa_context"],
                w["exact_context"],
                b["sdpa_context"],
            ),
            row(
                "context o: step by step vs attnspec.sdpa",
                w["context"],
                w["sdpa_context"],
                b["context"] + b["sdpa_context"],
            ),
        ]


# ---------------------------------------------------------------------------------------
# Printing
# ---------------------------------------------------------------------------------------


def cell_width(text: str) -> int:
    """Columns ``text`` takes in a terminal: CJK characters take two."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def pad(text: str, width: int, right: bool = False) -> str:
    """``text`` padded with spaces to ``width`` terminal columns."""
    fill = " " * max(width - cell_width(text), 0)
    return fill + text if right else text + fill


def dot_expansion(q: F64, k: F64, times: str = "*") -> str:
    """``q . k`` written out, e.g. ``0.63*1.38 + 0.38*(-0.57)``, at ``DECIMALS`` decimals."""

    def num(t: float) -> str:
        text = fixed(t, DECIMALS)
        return f"({text})" if text.startswith("-") else text

    return " + ".join(f"{num(a)}{times}{num(b)}" for a, b in zip(q, k, strict=True))


def fixed(value: float, digits: int = 6) -> str:
    """``value`` with ``digits`` decimals, -0 shown as 0."""
    text = f"{value:.{digits}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def in_u(value: float) -> str:
    """``value`` in units of u = 2**-53, e.g. ``-1u``."""
    return f"{value / U64:+.3g}u"


def _table(out: TextIO, header: list[str], rows: list[list[str]], left: int = 2) -> None:
    """Print a table, the first ``left`` columns aligned left, the others right."""
    widths = [max(cell_width(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        cells = [
            pad(c, wd, right=i >= left) for i, (c, wd) in enumerate(zip(r, widths, strict=True))
        ]
        out.write("  " + "  ".join(cells).rstrip() + "\n")


def _title(out: TextIO, text: str) -> None:
    out.write(f"\n{text}\n{'-' * cell_width(text)}\n")


def run(out: TextIO) -> int:
    """Print the worked example to ``out``; return 0 when every check holds, else 1."""
    w = walkthrough()
    chars, x, qi = w["chars"], w["x"], w["query_index"]
    n, width = x.shape
    title = f'attnspec demo: attention over {SENTENCE} ("a middle-aged person who writes code")'
    out.write(f"{title}\n{'=' * cell_width(title)}\n")

    _title(out, "Step 0. Embeddings")
    out.write(
        f"  x_j = numpy.random.default_rng({SEED}).standard_normal(({n}, {width})), rounded to "
        f"{DECIMALS} decimals.\n  Self-attention: queries, keys and values are the embeddings "
        f"(q = k = v = x).\n\n"
    )
    _table(
        out,
        ["j", "char", "pinyin", *[f"x[{e}]" for e in range(width)]],
        [[str(j), chars[j], PINYIN[j], *[fixed(t, DECIMALS) for t in x[j]]] for j in range(n)],
        left=3,
    )
    out.write(f"\n  The query is {QUERY} ({PINYIN[qi]}, j = {qi}): q = x_{qi}.\n")

    _title(out, "Step 1. Scores: s_j = q . k_j (how well key j matches the query)")
    _table(
        out,
        ["j", "char", "q . k_j", "s_j"],
        [
            [str(j), chars[j], dot_expansion(w["q"], w["k"][j]), fixed(w["scores"][j], 4)]
            for j in range(n)
        ],
        left=3,
    )

    _title(out, f"Step 2. Scale: z_j = s_j / sqrt(E) = s_j * {w['tau']:g}   (E = {width})")
    out.write(
        "  attnspec.sdpa scales by 1/sqrt(E) by default; 1/sqrt(4) = 0.5 is a power of two,\n"
        "  so this step is exact in floating point.\n\n"
    )
    _table(
        out,
        ["j", "char", "s_j", "z_j"],
        [[str(j), chars[j], fixed(w["scores"][j], 4), fixed(w["scaled"][j], 5)] for j in range(n)],
    )

    _title(out, "Step 3. Softmax: p_j = exp(z_j - m) / sum_i exp(z_i - m),  m = max_j z_j")
    out.write(
        "  Subtracting the maximum changes nothing mathematically and keeps exp from "
        "overflowing.\n"
        f"  m = {fixed(w['max'], 5)};  sum_i exp(z_i - m) = {fixed(w['total'])}\n\n"
    )
    _table(
        out,
        ["j", "char", "z_j", "z_j - m", "exp(z_j - m)", "p_j"],
        [
            [
                str(j),
                chars[j],
                fixed(w["scaled"][j], 5),
                fixed(w["shifted"][j], 5),
                fixed(w["exps"][j]),
                fixed(w["weights"][j]),
            ]
            for j in range(n)
        ],
    )
    best = int(np.argmax(w["weights"]))
    sum_ok = abs(w["weight_sum"] - 1) <= w["bounds"]["weight_sum"]
    out.write(
        f"\n  {QUERY} attends most to {chars[best]} (p = {fixed(w['weights'][best])}).\n"
        f"  check: sum_j p_j = {w['weight_sum']!r} (math.fsum) = 1 {in_u(w['weight_sum'] - 1)}"
        f", u = 2**-53;\n  derived bound |sum - 1| <= {w['bounds']['weight_sum'] / U64:.3g}u "
        f"-> {_verdict(sum_ok)}\n"
    )

    _title(out, "Step 4. Context vector: o = sum_j p_j v_j (the values, mixed by the weights)")
    _table(
        out,
        ["j", "char", "p_j", *[f"p_j v_j[{e}]" for e in range(width)]],
        [
            [
                str(j),
                chars[j],
                fixed(w["weights"][j]),
                *[fixed(t) for t in w["weights"][j] * w["v"][j]],
            ]
            for j in range(n)
        ]
        + [["", "", "o", *[fixed(t) for t in w["context"]]]],
    )
    out.write(
        f"\n  log-sum-exp (the normaliser): lse = m + log(sum_i exp(z_i - m)) = {fixed(w['lse'])}\n"
    )

    _title(out, "Step 5. The same through attnspec")
    out.write(
        "  attnspec.sdpa(q[None], x, x, return_lse=True)            (precision='accurate')\n"
        f"  attnspec.exact.sdpa(q[None], x, x, return_lse=True, dps={DPS})   (exact, proved)\n\n"
    )
    _table(
        out,
        ["", "step by step", "attnspec.sdpa", "exact (first 25 digits)"],
        [
            [
                f"o[{e}]",
                repr(float(w["context"][e])),
                repr(float(w["sdpa_context"][e])),
                mpmath.nstr(w["exact_context"][e], 25),
            ]
            for e in range(width)
        ]
        + [["lse", repr(float(w["lse"])), repr(w["sdpa_lse"]), mpmath.nstr(w["exact_lse"], 25)]],
        left=1,
    )

    _title(out, "Step 6. Agreement (differences formed exactly; ulps of the reference)")
    out.write(
        "  ulps: |difference| / the spacing of float64 numbers at the reference value\n"
        "  (<= 0.5: correctly rounded; < 1: faithfully rounded). Bounds: attnspec.demo.\n\n"
    )
    rows = w["agreement"]
    _table(
        out,
        ["comparison", "max |diff|", "max ulps", "derived bound", ""],
        [
            [a.what, f"{a.max_abs:.3g}", f"{a.max_ulps:.3g}", f"{a.bound:.3g}", _verdict(a.within)]
            for a in rows
        ],
        left=1,
    )
    sdpa_sum_ok = abs(w["sdpa_weight_sum"] - 1) <= w["bounds"]["sdpa_weight_sum"]
    out.write(
        f"  attnspec.sdpa's weights of {QUERY}: sum = {w['sdpa_weight_sum']!r} = 1 "
        f"{in_u(w['sdpa_weight_sum'] - 1)}; bound {w['bounds']['sdpa_weight_sum'] / U64:.3g}u "
        f"-> {_verdict(sdpa_sum_ok)}\n"
    )

    _title(out, "Step 7. All seven queries at once: P = softmax(x x^T / sqrt(E))")
    out.write(
        "  attnspec.sdpa(x, x, numpy.eye(7)): with v = I the output P v is P itself.\n"
        "  Row i: how much character i attends to each character j.\n\n"
    )
    matrix = w["matrix"]
    _table(
        out,
        ["", *chars],
        [[chars[i], *[fixed(t, 3) for t in matrix[i]]] for i in range(n)],
        left=1,
    )
    sums = [math.fsum(r) for r in matrix]
    worst = max(abs(s - 1) for s in sums)
    rows_ok = worst <= w["bounds"]["sdpa_weight_sum"]
    out.write(
        f"\n  every row sums to one: max_i |sum_j P_ij - 1| = {worst / U64:.3g}u "
        f"(bound {w['bounds']['sdpa_weight_sum'] / U64:.3g}u) -> {_verdict(rows_ok)}\n"
        f"  Row {QUERY} is the weights of Steps 3 and 6.\n"
    )
    ok = (
        all(a.within for a in rows)
        and sdpa_sum_ok
        and rows_ok
        and abs(w["weight_sum"] - 1) <= w["bounds"]["weight_sum"]
    )
    out.write(f"\n{'all checks hold' if ok else 'SOME CHECK FAILED'}\n")
    return 0 if ok else 1


def _verdict(ok: bool) -> str:
    return "ok" if ok else "FAILED"
