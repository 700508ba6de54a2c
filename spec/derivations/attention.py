r"""Claims about scaled dot-product attention, each proved by SymPy when run.

Notation, used by every claim (the definition of :mod:`attnspec.reference.attention`,
steps 1-8). Query :math:`i`, key :math:`j`, alignment offset :math:`o`;
:math:`s_{ij} = \tau\, q_i \cdot k_j`; :math:`\mathcal{V}_i` is the set of keys visible
to query :math:`i`;

.. math::

    Z_i = \sum_{j \in \mathcal{V}_i} e^{s_{ij}},\qquad
    \ell_i = \log Z_i,\qquad
    p_{ij} = e^{s_{ij} - \ell_i}\ (j \in \mathcal{V}_i),\quad p_{ij} = 0\ \text{otherwise},\qquad
    o_i = \sum_j p_{ij} v_j .

The general-size derivations relabel the visible keys of one row :math:`l = 1..n`, with
logits :math:`s_l` and values :math:`v_l` (one column of :math:`V`: the columns never
mix), as ``IndexedBase`` entries summed with ``Sum``. Where a claim is about positions
(causal visibility, alignment, head mapping) it is checked on explicit symbolic matrices
for each size up to a stated bound, built by :func:`_logits` and :func:`_attend`, a
transcription of steps 1 and 4-8 (scale, visibility, sink, weights, output) for SymPy
matrices, checked against :func:`attnspec.exact.sdpa` by the tests; ``method`` says why
SymPy cannot do the general size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import permutations
from typing import Any

import sympy
import sympy.stats as stats
from sympy import (
    Abs,
    Function,
    IndexedBase,
    Interval,
    KroneckerDelta,
    Matrix,
    MatrixSymbol,
    OneMatrix,
    S,
    Sum,
    diff,
    exp,
    log,
    oo,
    solveset,
    symbols,
    tanh,
)
from sympy.calculus.util import function_range

from attnspec.spec.derivations.claim import (
    Claim,
    ClaimFailed,
    Step,
    equal,
    holds,
    limit,
    nonnegative,
)

__all__ = ["CLAIMS"]

TOPIC = "attention"

# Symbols of the general-n derivations: one query row, its n visible keys l = 1..n.
_s = IndexedBase("s", real=True)  # logits s_l
_v = IndexedBase("v", real=True)  # values v_l (one column)
_l, _j = symbols("l j", integer=True, positive=True)
_n = symbols("n", integer=True, positive=True)
_tau = symbols("tau", positive=True)


def _Z(logit: Callable[[Any], Any] = lambda idx: _s[idx], n: Any = _n) -> sympy.Expr:
    r""":math:`Z = \sum_{l=1}^n e^{s_l}`: the normaliser of one row."""
    return Sum(exp(logit(_l)), (_l, 1, n))


def _out(
    logit: Callable[[Any], Any] = lambda idx: _s[idx],
    value: Callable[[Any], Any] = lambda idx: _v[idx],
    n: Any = _n,
) -> sympy.Expr:
    r""":math:`o = \sum_l e^{s_l} v_l / Z`: one output entry of one row."""
    return Sum(exp(logit(_l)) * value(_l), (_l, 1, n)) / _Z(logit, n)


# --- explicit symbolic matrices -----------------------------------------------------

Seen = Callable[[int, int], bool]


def _attend(s: Matrix, v: Matrix, seen: Seen, sink: Any = None) -> tuple[Matrix, list[sympy.Expr]]:
    r"""Steps 4-8 of the definition on explicit SymPy matrices: ``(O, lse)``.

    ``s`` is the ``(L, S)`` logit matrix, ``v`` the ``(S, Ev)`` values, ``seen(i, j)``
    the visibility rule and ``sink`` an optional sink logit. A hidden key is left out
    of both sums (weight exactly 0); a row with nothing visible and no sink has
    output 0 (the empty sum) and lse :math:`\log 0 = -\infty`.
    """
    n_q, n_k = s.shape
    rows: list[list[sympy.Expr]] = []
    lse: list[sympy.Expr] = []
    for i in range(n_q):
        keys = [j for j in range(n_k) if seen(i, j)]
        z = sum((exp(s[i, j]) for j in keys), S.Zero) + (S.Zero if sink is None else exp(sink))
        if z == 0:
            rows.append([S.Zero] * v.cols)
            lse.append(-oo)
            continue
        rows.append(
            [sum((exp(s[i, j]) * v[j, c] for j in keys), S.Zero) / z for c in range(v.cols)]
        )
        lse.append(log(z))
    return Matrix(n_q, v.cols, lambda i, c: rows[i][c]), lse


def _logits(q: Matrix, k: Matrix, tau: Any = _tau) -> Matrix:
    """Step 1: ``tau * q @ k.T``."""
    return tau * q * k.T


def _causal(offset: int) -> Seen:
    """Causal visibility ``j <= i + o``."""
    return lambda i, j: j <= i + offset


def _everything(i: int, j: int) -> bool:
    return True


def _columns(name: str, rows: int, start: int = 0) -> Matrix:
    """A column of fresh real symbols ``name_start .. name_{start+rows-1}``."""
    return Matrix([symbols(f"{name}_{r}", real=True) for r in range(start, start + rows)])


def _same(
    label: str, a: Any, b: Any, *, shown: tuple[Any, Any] | None = None, key: bool = False
) -> Step:
    """``a == b`` entry by entry (matrices or lists), each by :func:`equal`'s rule."""
    a_m, b_m = Matrix(a), Matrix(b)
    if a_m.shape != b_m.shape:
        raise ClaimFailed(f"{label}: shapes {a_m.shape} and {b_m.shape} differ")
    for x, y in zip(a_m, b_m, strict=True):
        if x == -oo or y == -oo:
            if x != y:
                raise ClaimFailed(f"{label}: {x} != {y}")
            continue
        equal(label, x, y)
    left, right = (a, b) if shown is None else shown
    return Step(label, left, right, "=", key)


# --- the row: weights, lse, empty rows ----------------------------------------------


def _lse_link() -> list[Step]:
    sigma = symbols("sigma", real=True)
    lse = log(_Z())
    lse_sink = log(_Z() + exp(sigma))
    return [
        equal(
            r"$e^{s_j - \ell}$ with $\ell = \operatorname{LSE}(s_{\mathcal{V}})$",
            exp(_s[_j] - lse),
            exp(_s[_j]) / _Z(),
        ),
        equal(
            r"with a sink: $\ell = \operatorname{logaddexp}(\operatorname{LSE}(s_{\mathcal{V}}),"
            r" \sigma)$",
            lse_sink,
            log(exp(lse) + exp(sigma)),
        ),
    ]


def _convex() -> list[Step]:
    a, b = symbols("a b", real=True)  # a <= every visible v_l <= b
    d = IndexedBase("d", nonnegative=True)  # v_l - a >= 0, or b - v_l >= 0
    o = _out()
    w = exp(_s[_j]) / _Z()
    steps = [
        equal(r"the weights of a row sum to one", Sum(w, (_j, 1, _n)), 1),
        holds("each weight of a visible key is positive", w > 0, (w > 0) == sympy.true, key=False),
        equal(
            r"$o - a = \sum_l p_l (v_l - a)$",
            o - a,
            Sum(exp(_s[_l]) * (_v[_l] - a), (_l, 1, _n)) / _Z(),
        ),
    ]
    above = _out(value=lambda idx: a + d[idx])  # v_l = a + d_l with d_l >= 0
    steps.append(
        nonnegative(
            r"lower bound: $v_l = a + d_l$, $d_l \ge 0$", above - a, _out(value=lambda idx: d[idx])
        )
    )
    below = _out(value=lambda idx: b - d[idx])  # v_l = b - d_l with d_l >= 0
    steps.append(
        nonnegative(
            r"upper bound: $v_l = b - d_l$, $d_l \ge 0$", b - below, _out(value=lambda idx: d[idx])
        )
    )
    return steps


def _empty_row() -> list[Step]:
    z = symbols("z", positive=True)
    t, sigma = symbols("t sigma", real=True)
    s, v = Matrix([[symbols("s_0", real=True)]]), _columns("v", 1)
    hidden, alone = (lambda i, j: False), _everything
    out, lse = _attend(s, v, hidden)
    out_sink, lse_sink = _attend(s, v, hidden, sink=sigma)
    out_low, _ = _attend(Matrix([[-t]]), v, alone)
    return [
        equal(
            "the numerator of an empty row is the empty sum",
            Sum(exp(_s[_l]) * _v[_l], (_l, 1, 0)).doit(),
            0,
        ),
        limit(r"$\ell = \log Z$ as $Z \to 0^+$", log(z), z, 0, -oo),
        _same(
            "the definition (steps 4-8) on a row whose only key is hidden",
            [*out, *lse],
            [0, -oo],
            key=False,
        ),
        _same(
            r"not a limit: one visible key at logit $-t$ keeps output $v_0$ for every $t$",
            out_low,
            v,
            key=False,
        ),
        _same(
            r"a sink in an empty row: output 0 and $\ell = \sigma$",
            [*out_sink, *lse_sink],
            [0, sigma],
            key=False,
        ),
    ]


# --- symmetries -----------------------------------------------------------------------


def _query_permutation() -> list[Step]:
    q = IndexedBase("q", real=True)
    k = IndexedBase("k", real=True)
    m = IndexedBase("m", nonnegative=True)  # mask row i: m_{ij} in {0, 1}
    v = IndexedBase("v", real=True)
    i, e, c = symbols("i e c", integer=True, positive=True)
    size_e, size_s = symbols("E S", integer=True, positive=True)
    pi = Function("pi")  # any permutation of the queries

    def row(qb: Any, mb: Any, idx: Any) -> sympy.Expr:
        def logit(j: Any) -> sympy.Expr:
            return _tau * Sum(qb[idx, e] * k[j, e], (e, 1, size_e))

        num = Sum(mb[idx, _l] * exp(logit(_l)) * v[_l, c], (_l, 1, size_s))
        return num / Sum(mb[idx, _l] * exp(logit(_l)), (_l, 1, size_s))

    # The permuted inputs q'_i = q_{pi(i)}, m'_{ij} = m_{pi(i), j}, read through the
    # definition of row i:
    q2, m2 = IndexedBase("q'"), IndexedBase("m'")
    permuted = row(q2, m2, i).replace(
        lambda x: isinstance(x, sympy.Indexed) and x.base in (q2, m2),
        lambda x: (q if x.base == q2 else m)[pi(x.indices[0]), x.indices[1]],
    )
    steps = [
        equal(
            r"row $i$ of $\operatorname{attn}(Q_\pi, K, V; M_\pi)$ is row $\pi(i)$ of"
            r" $\operatorname{attn}(Q, K, V; M)$",
            permuted,
            row(q, m, pi(i)),
            shown=(r"o'_{ic}", row(q, m, pi(i))),
        ),
    ]
    # And on explicit matrices, every permutation of 3 queries (E = 1, S = 2).
    qs, ks, vs = _columns("q", 3), _columns("k", 2), _columns("v", 2)
    out, lse = _attend(_logits(qs, ks), vs, _everything)
    for perm in permutations(range(3)):
        p_out, p_lse = _attend(_logits(qs.extract(list(perm), [0]), ks), vs, _everything)
        steps.append(_same(f"queries permuted by {perm}", p_out, out.extract(list(perm), [0])))
        steps.append(_same(f"lse, queries permuted by {perm}", p_lse, [lse[r] for r in perm]))
    return steps


def _key_permutation(move_values: bool = True) -> list[Step]:
    q = IndexedBase("q", real=True)
    k = IndexedBase("k", real=True)
    e = symbols("e", integer=True, positive=True)
    size_e = symbols("E", integer=True, positive=True)
    steps: list[Step] = []
    for n in range(1, 5):
        ms = symbols(f"m0:{n}", nonnegative=True)  # mask entries, 0 or 1
        vs = symbols(f"v0:{n}", real=True)

        def logit(j: int) -> sympy.Expr:
            return _tau * Sum(q[e] * k[j, e], (e, 1, size_e))  # general E

        def attn(
            order: Sequence[int],
            value_order: Sequence[int],
            ms: tuple[Any, ...] = ms,
            vs: tuple[Any, ...] = vs,
        ) -> tuple[Any, Any]:
            z = sum(ms[j] * exp(logit(j)) for j in order)
            num = sum(
                ms[j] * exp(logit(j)) * vs[w] for j, w in zip(order, value_order, strict=True)
            )
            return num / z, log(z)

        base_out, base_lse = attn(range(n), range(n))
        for perm in permutations(range(n)):
            out, lse = attn(perm, perm if move_values else range(n))
            key = n == 3 and perm == (2, 0, 1)
            steps.append(
                equal(
                    f"output, $S = {n}$, keys and values permuted by {perm}", out, base_out, key=key
                )
            )
            steps.append(equal(f"lse, $S = {n}$, permutation {perm}", lse, base_lse, key=False))
    return steps


def _key_shift() -> list[Step]:
    q, k, u = (IndexedBase(name, real=True) for name in ("q", "k", "u"))
    e = symbols("e", integer=True, positive=True)
    size_e = symbols("E", integer=True, positive=True)

    def logit(kk: Callable[[Any, Any], Any]) -> Callable[[Any], sympy.Expr]:
        return lambda j: _tau * Sum(q[e] * kk(j, e), (e, 1, size_e))

    plain = logit(lambda j, ee: k[j, ee])
    moved = logit(lambda j, ee: k[j, ee] + u[ee])
    shift = _tau * Sum(q[e] * u[e], (e, 1, size_e))  # tau q . u: the same for every key
    # Not with a softcap (c = 1): logits (0, 1) moved by 1 to (1, 2) give key 0 another
    # weight, since tanh is not a shift.
    capped = [sympy.tanh(S(x)) for x in (0, 1, 2)]
    before = exp(capped[0]) / (exp(capped[0]) + exp(capped[1]))
    after = exp(capped[1]) / (exp(capped[1]) + exp(capped[2]))
    return [
        equal(
            r"the logits move by $\tau\, q \cdot u$, the same for every key",
            moved(_j),
            plain(_j) + shift,
            key=False,
        ),
        equal(r"the output with $k_l + u$", _out(logit=moved), _out(logit=plain)),
        equal(
            r"the lse moves by $\tau\, q \cdot u$",
            log(_Z(moved)),
            log(_Z(plain)) + shift,
            key=False,
        ),
        holds(
            r"not with a softcap: $c = 1$, logits $(0, 1) \mapsto (1, 2)$ change the weights",
            sympy.Ne(before, after, evaluate=False),
            sympy.Ne(before, after),
            key=False,
        ),
    ]


def _value_maps() -> list[Step]:
    n_q, n_k, e_v, d = symbols("L S E_v D", integer=True, positive=True)
    p = MatrixSymbol("P", n_q, n_k)
    v = MatrixSymbol("V", n_k, e_v)
    w = MatrixSymbol("W", e_v, d)
    c = MatrixSymbol("c", e_v, 1)
    one_k, one_q = OneMatrix(n_k, 1), OneMatrix(n_q, 1)
    shifted = (p * (v + one_k * c.T)).expand()
    # rows of P sum to one (claim weights-convex): P 1_S = 1_L
    after = shifted.subs(p * one_k, one_q)
    return [
        holds(
            r"$P(V + \mathbf{1} c^T) = PV + (P\mathbf{1}) c^T$",
            sympy.Eq(p * (v + one_k * c.T), shifted, evaluate=False),
            shifted == p * v + p * one_k * c.T,
            key=False,
        ),
        holds(
            r"$P \mathbf{1} = \mathbf{1}$ (each row sums to one) gives $O + \mathbf{1} c^T$",
            sympy.Eq(p * (v + one_k * c.T), p * v + one_q * c.T, evaluate=False),
            after == p * v + one_q * c.T,
        ),
        holds(
            r"$P (V W) = (P V) W$",
            sympy.Eq(p * (v * w), (p * v) * w, evaluate=False),
            sympy.Eq(p * (v * w), (p * v) * w) == sympy.true,
        ),
    ]


# --- the scale ------------------------------------------------------------------------


def _scale_zero(tau: Any = 0) -> list[Step]:
    q, k = IndexedBase("q", real=True), IndexedBase("k", real=True)
    e, size_e = symbols("e E", integer=True, positive=True)

    def logit(j: Any) -> sympy.Expr:
        return tau * Sum(q[e] * k[j, e], (e, 1, size_e))

    mean = Sum(_v[_l], (_l, 1, _n)) / _n
    return [
        equal(
            r"$\tau = 0$: every visible weight is $1/n$",
            (exp(logit(_j)) / _Z(logit)).doit(),
            1 / _n,
            key=False,
        ),
        equal(r"$\tau = 0$: the output", _out(logit=logit).doit(), mean),
        equal(r"$\tau = 0$: the lse", log(_Z(logit).doit()), log(_n), key=False),
    ]


def _moment_expectation(expr: sympy.Expr, variables: Sequence[sympy.Symbol]) -> sympy.Expr:
    """E[expr] for independent variables with E[x] = 0 and E[x^2] = 1.

    ``expr`` is a polynomial; by independence the expectation of a monomial is the
    product of the moments of its factors, which are given only up to order 2 (the
    monomials of a second moment of ``q . k`` have degree at most 2 in each variable).
    """
    moments = {0: S.One, 1: S.Zero, 2: S.One}
    total = S.Zero
    poly = sympy.Poly(sympy.expand(expr), *variables)
    for powers, coeff in poly.terms():
        term = coeff
        for power in powers:
            term *= moments[power]
        total += term
    return total


def _scaling_variance(scale_power: Any = S.Half) -> list[Step]:
    steps: list[Step] = []
    # Any distribution with mean 0 and variance 1, general E: E[q_e q_f] = delta_ef.
    e, f, size_e = symbols("e f E", integer=True, positive=True)
    second = Sum(
        Sum(KroneckerDelta(e, f) * KroneckerDelta(e, f), (f, 1, size_e)), (e, 1, size_e)
    ).doit()
    second = second.xreplace(
        {sympy.Ge(size_e, e): sympy.true, sympy.Le(e, size_e): sympy.true}
    ).doit()
    steps.append(
        equal(
            r"$E[(q\cdot k)^2] = \sum_{e,f} E[q_e q_f]\, E[k_e k_f] = \sum_{e,f} \delta_{ef}^2$",
            second,
            size_e,
        )
    )
    tau = size_e ** (-scale_power)
    steps.append(
        equal(
            r"$\operatorname{Var}(\tau\, q \cdot k) = \tau^2 E = 1$ at"
            r" $\tau = 1/\sqrt{E}$",
            tau**2 * second,
            1,
        )
    )
    # The same from the moments alone, each E <= 6, for any such distribution.
    for n in range(1, 7):
        qs = symbols(f"q1:{n + 1}", real=True)
        ks = symbols(f"k1:{n + 1}", real=True)
        dot = sum(a * b for a, b in zip(qs, ks, strict=True))
        mean = _moment_expectation(dot, [*qs, *ks])
        var = _moment_expectation(dot**2, [*qs, *ks]) - mean**2
        steps.append(equal(f"from the moments, $E = {n}$", var, n, key=False))
    # And by sympy.stats for two concrete distributions.
    for n in range(1, 3):
        qn = [stats.Normal(f"q{r}", 0, 1) for r in range(n)]
        kn = [stats.Normal(f"k{r}", 0, 1) for r in range(n)]
        dot = sum(a * b for a, b in zip(qn, kn, strict=True))
        steps.append(
            equal(f"standard normal entries, $E = {n}$", stats.variance(dot), n, key=False)
        )
    for n in range(1, 5):
        qr = [stats.Rademacher(f"q{r}") for r in range(n)]
        kr = [stats.Rademacher(f"k{r}") for r in range(n)]
        dot = sum(a * b for a, b in zip(qr, kr, strict=True))
        steps.append(
            equal(
                f"Rademacher ($\\pm 1$) entries, $E = {n}$",
                stats.variance(S(n) ** (-scale_power) * dot),
                1,
                key=False,
            )
        )
    return steps


# --- positions: causal, alignment, KV cache -------------------------------------------


def _causal_prefix() -> list[Step]:
    steps: list[Step] = []
    for n in range(1, 6):
        qs, ks, vs = _columns("q", n), _columns("k", n), _columns("v", n)
        full, full_lse = _attend(_logits(qs, ks), vs, _causal(0))
        for t in range(1, n + 1):
            part, part_lse = _attend(_logits(qs[:t, :], ks[:t, :]), vs[:t, :], _causal(0))
            key = (n, t) == (3, 2)
            steps.append(
                _same(
                    f"the first {t} outputs of {n}, from the first {t} keys",
                    full[:t, :],
                    part,
                    key=key,
                    shown=(rf"O^{{({n})}}_{{0:{t}}}", full[:t, :]) if key else None,
                )
            )
            steps.append(_same(f"the first {t} lse of {n}", full_lse[:t], part_lse))
    return steps


def _kv_cache(align: str = "bottom_right") -> list[Step]:
    steps: list[Step] = []
    for n_k in range(1, 6):
        qs, ks, vs = _columns("q", n_k), _columns("k", n_k), _columns("v", n_k)
        full, full_lse = _attend(_logits(qs, ks), vs, _causal(0))
        for n_q in range(1, n_k + 1):
            offset = n_k - n_q if align == "bottom_right" else 0
            new_q = qs[n_k - n_q :, :]  # the newest n_q tokens; all n_k keys cached
            out, lse = _attend(_logits(new_q, ks), vs, _causal(offset))
            key = (n_k, n_q) == (3, 1)
            steps.append(
                _same(
                    f"{n_q} new queries against {n_k} cached keys, {align}",
                    out,
                    full[n_k - n_q :, :],
                    key=key,
                    shown=(
                        rf"\operatorname{{attn}}_{{o = S - L}}(q_{{{n_k - 1}}}, K_{{0:{n_k}}},"
                        rf" V_{{0:{n_k}}})",
                        full[n_k - 1 :, :],
                    )
                    if key
                    else None,
                )
            )
            steps.append(_same(f"lse, {n_q} new of {n_k}", lse, full_lse[n_k - n_q :]))
    return steps


def _alignments() -> list[Step]:
    n_q, n_k = symbols("L S", integer=True, nonnegative=True)
    i = symbols("i", integer=True, nonnegative=True)
    x = symbols("x", real=True)
    top_left, bottom_right = S.Zero, n_k - n_q
    return [
        holds(
            r"the offsets $0$ and $S - L$ agree exactly when $L = S$",
            sympy.Eq(
                solveset(sympy.Eq(bottom_right - top_left, 0), n_k),
                sympy.FiniteSet(n_q),
                evaluate=False,
            ),
            solveset(sympy.Eq(bottom_right - top_left, 0), n_k) == sympy.FiniteSet(n_q),
        ),
        equal(
            r"bottom-right: the last query $i = L - 1$ sits at key $S - 1$ (it sees every key"
            r" under causal)",
            (i + bottom_right).subs(i, n_q - 1),
            n_k - 1,
        ),
        equal(
            r"top-left: the last query sits at key $L - 1$",
            (i + top_left).subs(i, n_q - 1),
            n_q - 1,
            key=False,
        ),
        holds(
            r"bottom-right with $L > S$: query $i$ sees no key ($i + o < 0$) exactly when"
            r" $i < L - S$",
            sympy.Eq(
                solveset(x + n_k - n_q < 0, x, S.Reals),
                Interval.open(-oo, n_q - n_k),
                evaluate=False,
            ),
            solveset(x + n_k - n_q < 0, x, S.Reals) == Interval.open(-oo, n_q - n_k),
            key=False,
        ),
    ]


# --- hiding keys ----------------------------------------------------------------------


def _hidden_key() -> list[Step]:
    # The other visible keys of the row are aggregated: Z > 0 (their exponential sum,
    # at least one of them) and N (their numerator); the key in question has logit s
    # and value w (any real).
    z = symbols("Z", positive=True)
    num, s, w, b = symbols("N s w b", real=True)
    t = symbols("t", positive=True)
    removed = num / z
    return [
        equal(
            "hidden (mask False): left out of both sums",
            (num + 0 * exp(s) * w) / (z + 0 * exp(s)),
            removed,
            key=False,
        ),
        limit(
            r"bias $b - t$, $t \to \infty$: the output",
            (num + exp(b - t) * w) / (z + exp(b - t)),
            t,
            oo,
            removed,
        ),
        limit(r"bias $b - t$, $t \to \infty$: the lse", log(z + exp(b - t)), t, oo, log(z)),
        limit(
            r"bias $b - t$, $t \to \infty$: its weight",
            exp(b - t) / (z + exp(b - t)),
            t,
            oo,
            0,
            key=False,
        ),
    ]


# --- heads ----------------------------------------------------------------------------


def _gqa(mapping: Callable[[int, int, int], int] | None = None) -> list[Step]:
    g, r, t, size_g = symbols("g r t G", integer=True, nonnegative=True)
    h = size_g * g + r  # query head h = G g + r with 0 <= r <= G - 1, i.e. G = r + 1 + t
    group = {size_g: r + 1 + t}
    steps = [
        holds(
            r"$G g \le h$ for $h = G g + r$, $r \ge 0$",
            sympy.Ge(h, size_g * g),
            sympy.expand(h - size_g * g).is_nonnegative is True,
            key=False,
        ),
        holds(
            r"$h < G (g + 1)$ for $r \le G - 1$, so $\lfloor h / G \rfloor = g$",
            sympy.Lt(h, size_g * (g + 1)),
            sympy.expand((size_g * (g + 1) - h).subs(group)).is_positive is True,
        ),
    ]
    if mapping is None:

        def mapping(head: int, groups: int, kv_heads: int) -> int:
            return head // groups  # the definition: query head h reads kv head h // G

    # np.repeat(K, G, axis=heads) puts kv head g at repeated positions G g .. G g + G - 1.
    for kv_heads in range(1, 4):
        ks = [_columns(f"k{hh}", 2) for hh in range(kv_heads)]
        vs = [_columns(f"v{hh}", 2) for hh in range(kv_heads)]
        for groups in range(1, 4):
            repeated = [hh for hh in range(kv_heads) for _ in range(groups)]
            for head in range(groups * kv_heads):
                qh = _columns(f"q{head}", 1)
                read = mapping(head, groups, kv_heads)
                direct, _ = _attend(_logits(qh, ks[read]), vs[read], _everything)
                rep, _ = _attend(_logits(qh, ks[repeated[head]]), vs[repeated[head]], _everything)
                steps.append(
                    _same(f"head {head}, $G = {groups}$, $H_{{kv}} = {kv_heads}$", direct, rep)
                )
    return steps


def _sink() -> list[Step]:
    sigma = symbols("sigma", real=True)
    z_sink = _Z() + exp(sigma)
    # The sink as key n + 1 of the sums: logit sigma, value 0.
    as_key_num = Sum(exp(_s[_l]) * _v[_l], (_l, 1, _n)) + exp(sigma) * 0
    as_key_den = _Z() + exp(sigma)
    lse = log(_Z())
    return [
        equal(
            r"a key with logit $\sigma$ and value 0",
            as_key_num / as_key_den,
            Sum(exp(_s[_l]) * _v[_l], (_l, 1, _n)) / z_sink,
        ),
        equal(
            r"it only rescales: $o^{\sigma} = o \,/\, (1 + e^{\sigma - \ell})$",
            Sum(exp(_s[_l]) * _v[_l], (_l, 1, _n)) / z_sink,
            _out() / (1 + exp(sigma - lse)),
        ),
        equal(
            r"the visible weights sum to $1 - e^{\sigma - \ell^{\sigma}}$",
            Sum(exp(_s[_j]) / z_sink, (_j, 1, _n)),
            1 - exp(sigma - log(z_sink)),
            key=False,
        ),
    ]


# --- logit modifiers ------------------------------------------------------------------


def _alibi(causal: bool = True) -> list[Step]:
    m = symbols("m", nonnegative=True)  # the slope of the head
    i, o = symbols("i o", integer=True)
    pos = IndexedBase("j", integer=True)  # key positions of the visible keys
    # Under causal visibility j_l <= i + o: write j_l = i + o - d_l with d_l >= 0.
    d = IndexedBase("d", nonnegative=True) if causal else IndexedBase("d", integer=True)
    at = {pos[_l]: i + o - d[_l], pos[_j]: i + o - d[_j]}

    def alibi(idx: Any) -> sympy.Expr:
        return (_s[idx] - m * Abs(i + o - pos[idx])).xreplace(at)

    def linear(idx: Any) -> sympy.Expr:
        return (_s[idx] + m * pos[idx]).xreplace(at)

    r = symbols("r", real=True)  # any per-row constant
    n_k = symbols("S", integer=True, positive=True)
    return [
        equal(
            r"$-m|i + o - j| = -m(i + o) + m j$ for $j \le i + o$",
            alibi(_j),
            linear(_j) - m * (i + o),
            key=False,
        ),
        equal(
            r"the weights: ALiBi and $s_{ij} + m j$ give the same $P$",
            exp(alibi(_j)) / _Z(alibi),
            exp(linear(_j)) / _Z(linear),
        ),
        equal(
            r"the lse: $\ell^{\mathrm{ALiBi}} = \ell^{+mj} - m(i + o)$",
            log(_Z(alibi)),
            log(_Z(linear)) - m * (i + o),
        ),
        equal(
            r"any row constant $r_i$: $\ell^{+mj + r} = \ell^{+mj} + r$",
            log(_Z(lambda idx: linear(idx) + r)),
            log(_Z(linear)) + r,
            key=False,
        ),
        equal(
            r"FlashAttention's test reference ($m(j - S + 1)$): $\ell^{\mathrm{ref}}"
            r" = \ell^{\mathrm{ALiBi}} + m(i + o - S + 1)$",
            log(_Z(lambda idx: linear(idx) - m * (n_k - 1))),
            log(_Z(alibi)) + m * (i + o - n_k + 1),
        ),
    ]


def _softcap() -> list[Step]:
    c = symbols("c", positive=True)
    x = symbols("s", real=True)
    capped = c * tanh(x / c)
    slope = diff(capped, x)
    return [
        holds(
            r"the range of $c \tanh(s / c)$ over $s \in \mathbb{R}$",
            sympy.Eq(sympy.Symbol(r"\operatorname{range}"), Interval.open(-c, c), evaluate=False),
            function_range(capped, x, S.Reals) == Interval.open(-c, c),
        ),
        nonnegative(
            r"increasing: $\frac{d}{ds} c\tanh(s/c) = 1/\cosh^2(s/c)$",
            slope,
            1 / sympy.cosh(x / c) ** 2,
            key=False,
        ),
        limit(r"no cap as $c \to \infty$", capped, c, oo, x),
        equal(
            r"slope 1 at $s = 0$: near 0 the cap is the identity", slope.subs(x, 0), 1, key=False
        ),
    ]


def _dropout(scale: Any = None) -> list[Step]:
    p = symbols("p", positive=True)  # dropout probability, 0 < p < 1
    keep_scale = 1 / (1 - p) if scale is None else scale
    kappa = stats.Bernoulli("kappa", 1 - p)
    weight = symbols("w", positive=True)
    steps = [
        equal(
            r"$E[\kappa / (1 - p)] = 1$ for $\kappa \sim \operatorname{Bernoulli}(1 - p)$",
            stats.E(kappa * keep_scale),
            1,
        ),
        equal(
            r"the variance of a dropped weight, $w^2 p / (1 - p)$",
            stats.variance(weight * kappa * keep_scale),
            weight**2 * p / (1 - p),
            key=False,
        ),
    ]
    # General n by linearity: E[o] = sum_l p_l v_l E[kappa_l] / (1 - p).
    mean_kappa = stats.E(kappa)
    expected = Sum(exp(_s[_l]) * _v[_l] * mean_kappa * keep_scale, (_l, 1, _n)) / _Z()
    steps.append(equal(r"$E[o] = \sum_l p_l v_l\, E[\kappa_l] / (1 - p)$", expected, _out()))
    # Each n <= 3 with independent keep-bits, the expectation of the whole output.
    for n in range(1, 4):
        kappas = [stats.Bernoulli(f"kappa{r}", 1 - p) for r in range(n)]
        s = symbols(f"s0:{n}", real=True)
        v = symbols(f"v0:{n}", real=True)
        z = sum(exp(x) for x in s)
        dropped = sum(exp(s[r]) * kappas[r] * keep_scale * v[r] for r in range(n)) / z
        plain = sum(exp(s[r]) * v[r] for r in range(n)) / z
        steps.append(equal(f"$n = {n}$, independent keep-bits", stats.E(dropped), plain, key=False))
    return steps


# --- blocks ---------------------------------------------------------------------------


def _split_merge() -> list[Step]:
    a, b = IndexedBase("a", real=True), IndexedBase("b", real=True)  # logits of A and B
    va, vb = IndexedBase("v^A", real=True), IndexedBase("v^B", real=True)
    n_a, n_b = symbols("n_A n_B", integer=True, positive=True)
    z_a = Sum(exp(a[_l]), (_l, 1, n_a))
    z_b = Sum(exp(b[_l]), (_l, 1, n_b))
    o_a = Sum(exp(a[_l]) * va[_l], (_l, 1, n_a)) / z_a
    o_b = Sum(exp(b[_l]) * vb[_l], (_l, 1, n_b)) / z_b
    lse_a, lse_b = log(z_a), log(z_b)
    lse = log(exp(lse_a) + exp(lse_b))  # logaddexp
    # Attention over the disjoint union A + B: its sums are the sums over A plus over B.
    union = (Sum(exp(a[_l]) * va[_l], (_l, 1, n_a)) + Sum(exp(b[_l]) * vb[_l], (_l, 1, n_b))) / (
        z_a + z_b
    )
    merged = exp(lse_a - lse) * o_a + exp(lse_b - lse) * o_b
    big_l, o_x = symbols("L_A O_A", real=True)
    return [
        equal(r"$\operatorname{logaddexp}(\ell_A, \ell_B) = \ell_{A \cup B}$", lse, log(z_a + z_b)),
        equal(r"$e^{\ell_A - \ell} O_A + e^{\ell_B - \ell} O_B = O_{A \cup B}$", merged, union),
        equal(
            r"an empty block ($\ell_B = -\infty$, $O_B = 0$) changes nothing",
            exp(big_l - log(exp(big_l) + exp(-oo))) * o_x + exp(-oo) * 0,
            o_x,
            key=False,
        ),
    ]


# --- the claims, in reading order -----------------------------------------------------

_VASWANI = (
    "A. Vaswani, N. Shazeer, N. Parmar, J. Uszkoreit, L. Jones, A. N. Gomez, L. Kaiser,"
    " I. Polosukhin, *Attention is all you need*, NeurIPS 2017,"
    " [arXiv:1706.03762](https://arxiv.org/abs/1706.03762) (sec. 3.2.1 and footnote 4)"
)
_LEE = (
    "J. Lee, Y. Lee, J. Kim, A. R. Kosiorek, S. Choi, Y. W. Teh, *Set Transformer: a"
    " framework for attention-based permutation-invariant neural networks*, ICML 2019,"
    " [arXiv:1810.00825](https://arxiv.org/abs/1810.00825)"
)
_PRESS = (
    "O. Press, N. A. Smith, M. Lewis, *Train short, test long: attention with linear biases"
    " enables input length extrapolation*, ICLR 2022,"
    " [arXiv:2108.12409](https://arxiv.org/abs/2108.12409)"
)
_FLASH_ALIBI = (
    "FlashAttention's test reference `attn_bias_from_alibi_slopes` (causal: slope times"
    " `arange(-S + 1, 1)`), Dao-AILab/flash-attention, `tests/test_flash_attn.py`"
)
_XIAO = (
    "G. Xiao, Y. Tian, B. Chen, S. Han, M. Lewis, *Efficient streaming language models with"
    " attention sinks*, ICLR 2024, [arXiv:2309.17453](https://arxiv.org/abs/2309.17453)"
)
_SRIVASTAVA = (
    "N. Srivastava, G. Hinton, A. Krizhevsky, I. Sutskever, R. Salakhutdinov, *Dropout: a"
    " simple way to prevent neural networks from overfitting*, JMLR 15(56):1929-1958, 2014,"
    " [jmlr.org/papers/v15/srivastava14a](https://jmlr.org/papers/v15/srivastava14a.html)"
)
_MILAKOV = (
    "M. Milakov, N. Gimelshein, *Online normalizer calculation for softmax*, 2018,"
    " [arXiv:1805.02867](https://arxiv.org/abs/1805.02867)"
)
_DAO2 = (
    "T. Dao, *FlashAttention-2: faster attention with better parallelism and work"
    " partitioning*, ICLR 2024, [arXiv:2307.08691](https://arxiv.org/abs/2307.08691)"
)
_AINSLIE = (
    "J. Ainslie, J. Lee-Thorp, M. de Jong, Y. Zemlyanskiy, F. Lebron, S. Sanghai, *GQA:"
    " training generalized multi-query transformer models from multi-head checkpoints*,"
    " EMNLP 2023, [arXiv:2305.13245](https://arxiv.org/abs/2305.13245)"
)
_GEMMA2 = (
    "Gemma Team, *Gemma 2: improving open language models at a practical size*, 2024,"
    " [arXiv:2408.00118](https://arxiv.org/abs/2408.00118) (logit soft-capping)"
)

CLAIMS: tuple[Claim, ...] = (
    Claim(
        topic=TOPIC,
        name="lse-is-softmax-lse",
        title="The attention lse is the LSE of the visible logits",
        statement=(
            r"\ell_i = \log \sum_{j \in \mathcal{V}_i} e^{s_{ij}}"
            r" = \operatorname{logsumexp}(s_i, \mathrm{where}=\mathcal{V}_i),\quad"
            r" p_{ij} = e^{s_{ij} - \ell_i} = \operatorname{softmax}(s_i,"
            r" \mathrm{where}=\mathcal{V}_i)_j,\quad"
            r" \ell_i^{\sigma} = \operatorname{logaddexp}(\ell_i, \sigma_h)"
        ),
        method="symbolic, general n",
        explanation=(
            "Steps 5-6 of the definition are the softmax topic's LSE and softmax of row $i$"
            " with `where=` the visibility, so every softmax claim (max shift, shift"
            " invariance, the special values) holds for the weights. A sink only adds the"
            " term $e^{\\sigma_h}$ to the normaliser: the lse becomes a logaddexp. The lse is"
            " what a kernel saves for the backward pass and for merging blocks."
        ),
        derivation=_lse_link,
        references=(_VASWANI,),
    ),
    Claim(
        topic=TOPIC,
        name="weights-convex",
        title="The output is a convex combination of the visible values",
        statement=(
            r"p_{ij} > 0\ (j \in \mathcal{V}_i),\quad \sum_j p_{ij} = 1,\quad"
            r" \min_{j \in \mathcal{V}_i} v_{jc} \le o_{ic} \le \max_{j \in \mathcal{V}_i} v_{jc}"
        ),
        method=(
            "symbolic, general n: with $a \\le v_l \\le b$ written as $v_l = a + d_l$ (or"
            " $b - d_l$), $d_l \\ge 0$, SymPy decides the sign of $o - a$ (of $b - o$)"
        ),
        explanation=(
            "Each output component lies between the smallest and the largest value of that"
            " column over the visible keys, whatever the logits: attention cannot overflow"
            " the values' range, and a test may bound each output by them. It needs a"
            " visible key, no sink and no dropout (those make the weights sum to less than"
            " one, or to a random amount)."
        ),
        derivation=_convex,
        references=(_VASWANI,),
    ),
    Claim(
        topic=TOPIC,
        name="empty-row",
        title="A fully hidden row: output 0, lse -inf",
        statement=(
            r"\mathcal{V}_i = \emptyset \implies o_i = \sum_{j \in \emptyset} p_{ij} v_j = 0,"
            r"\quad \ell_i = \log 0 = -\infty;\qquad"
            r"\text{with a sink: } o_i = 0,\ \ell_i = \sigma_h"
        ),
        method="symbolic",
        explanation=(
            "The output of a row with nothing visible is the empty sum, and its lse the log"
            " of the empty sum. This is a convention, not a limit: a row whose only visible"
            " key has logit $-t$ returns that key's value for every $t$. With a sink the row"
            " has a normaliser $e^{\\sigma_h}$ but nothing to average: output 0 again, and"
            " lse $\\sigma_h$. Peers differ here: see the conventions page."
        ),
        derivation=_empty_row,
    ),
    Claim(
        topic=TOPIC,
        name="query-permutation-equivariance",
        title="Permuting the queries permutes the outputs",
        statement=(
            r"\operatorname{attn}(\Pi Q, K, V; \Pi M) = \Pi\, \operatorname{attn}(Q, K, V; M)"
        ),
        method=(
            "symbolic, general L, S, E (row $i$ depends on $i$ only through $q_i$ and mask"
            " row $i$; $\\pi$ an undefined function); and on explicit matrices, every"
            " permutation of 3 queries"
        ),
        explanation=(
            "Each output row is computed from its own query alone: no query sees another."
            " The mask rows (and bias rows) must move with the queries; causal masks,"
            " windows and ALiBi are tied to positions, so they are permuted too or the"
            " property does not hold."
        ),
        derivation=_query_permutation,
        references=(_LEE,),
    ),
    Claim(
        topic=TOPIC,
        name="key-value-permutation-invariance",
        title="Permuting keys and values together changes nothing",
        statement=(
            r"\operatorname{attn}(Q, \Pi K, \Pi V; M \Pi^T) = \operatorname{attn}(Q, K, V; M)"
        ),
        method=(
            "symbolic in the width E (a general Sum), each S <= 4 and all S! permutations:"
            " SymPy cannot reindex a Sum by an arbitrary bijection"
        ),
        explanation=(
            "Attention treats the keys as a set: it sums over them. Permuting the keys"
            " without the values does change the output; and anything positional (causal,"
            " window, ALiBi, a bias) must be permuted with the keys."
        ),
        derivation=_key_permutation,
        references=(_LEE,),
    ),
    Claim(
        topic=TOPIC,
        name="key-shift-invariance",
        title="Adding one vector to every key changes nothing",
        statement=(
            r"\operatorname{attn}(Q, K + \mathbf{1} u^T, V) = \operatorname{attn}(Q, K, V),"
            r"\quad \ell_i \mapsto \ell_i + \tau\, q_i \cdot u"
        ),
        method="symbolic, general n and general width E",
        explanation=(
            "Every logit of row $i$ moves by the same $\\tau\\, q_i \\cdot u$, which softmax"
            " ignores (softmax topic, shift invariance); only the lse moves. It fails with a"
            " softcap, which is not a shift: $c\\tanh((s + a)/c) \\ne c\\tanh(s/c) + a$."
        ),
        derivation=_key_shift,
    ),
    Claim(
        topic=TOPIC,
        name="value-affine-equivariance",
        title="Values: a shift shifts the output, a linear map maps it",
        statement=(
            r"\operatorname{attn}(Q, K, V + \mathbf{1} c^T) = O + \mathbf{1} c^T,\qquad"
            r" \operatorname{attn}(Q, K, V W) = O W"
        ),
        method="symbolic, general L, S, E_v, D (MatrixSymbol), from $P\\mathbf{1} = \\mathbf{1}$",
        explanation=(
            "$O = PV$ is linear in $V$, and the rows of $P$ sum to one (weights-convex)."
            " The shift needs that: in a row with a sink, dropout or nothing visible the"
            " output moves by $(P\\mathbf{1})_i\\, c^T$ instead (for an empty row, not at"
            " all). The map $W$ needs nothing: it is why the output projection of"
            " multi-head attention may be applied before or after the weighting."
        ),
        derivation=_value_maps,
    ),
    Claim(
        topic=TOPIC,
        name="scale-zero-mean",
        title="Scale 0: the mean of the visible values",
        statement=(
            r"\tau = 0 \implies p_{ij} = \frac{1}{|\mathcal{V}_i|},\quad"
            r" o_i = \frac{1}{|\mathcal{V}_i|}\sum_{j \in \mathcal{V}_i} v_j,\quad"
            r" \ell_i = \log |\mathcal{V}_i|"
        ),
        method="symbolic, general n and general width E",
        explanation=(
            "With every logit 0 the weights are uniform over the visible keys. A bias,"
            " ALiBi or a sink is added after the scaling, so with those the output is no"
            " longer the mean; a softcap keeps 0 at 0."
        ),
        derivation=_scale_zero,
    ),
    Claim(
        topic=TOPIC,
        name="scaling-variance",
        title="Why the scale is 1/sqrt(E)",
        statement=(
            r"q_e, k_e \text{ independent},\ E[q_e] = E[k_e] = 0,\ \operatorname{Var} = 1"
            r" \implies \operatorname{Var}(q \cdot k) = E,\quad"
            r" \operatorname{Var}\bigl(q \cdot k / \sqrt{E}\bigr) = 1"
        ),
        method=(
            "symbolic, general E from the moments ($E[q_e q_f] = \\delta_{ef}$); each"
            " E <= 6 by expanding the moments of any such distribution; and by sympy.stats"
            " for standard normal (E <= 2) and Rademacher (E <= 4) entries (the"
            " exact expectations grow quickly with E)"
        ),
        explanation=(
            "Vaswani et al. (footnote 4): the products $q_e k_e$ have mean 0 and variance 1"
            " and are uncorrelated, so their sum has variance $E$. Without the scale the"
            " logits of wide heads would be large and the softmax nearly one-hot, with"
            " vanishing gradients; $1/\\sqrt{E}$ brings the variance back to 1."
        ),
        derivation=_scaling_variance,
        references=(_VASWANI,),
    ),
    Claim(
        topic=TOPIC,
        name="causal-prefix",
        title="Causal attention: the first t outputs depend only on the first t keys",
        statement=(
            r"\operatorname{attn}_{\mathrm{causal}}(Q, K, V)_{0:t}"
            r" = \operatorname{attn}_{\mathrm{causal}}(Q_{0:t}, K_{0:t}, V_{0:t})"
            r"\quad (L = S, \text{top-left})"
        ),
        method=(
            "explicit symbolic matrices, each L = S <= 5 and each t <= L: the visible set"
            " $\\{j \\le i\\}$ is a condition on integer positions, not an algebraic"
            " identity SymPy can carry through a Sum with a symbolic bound"
        ),
        explanation=(
            "Query $i$ sees keys $0..i$ only, so appending tokens never changes earlier"
            " outputs (nor their lse). This is what lets a decoder cache the keys and values"
            " of earlier tokens and compute each new output once."
        ),
        derivation=_causal_prefix,
        references=(_VASWANI,),
    ),
    Claim(
        topic=TOPIC,
        name="kv-cache-bottom-right",
        title="Decoding with a KV cache needs the bottom-right alignment",
        statement=(
            r"\operatorname{attn}_{\mathrm{causal},\, o = S - L}(Q_{S-L:S}, K, V)"
            r" = \operatorname{attn}_{\mathrm{causal}}(Q, K, V)_{S-L:S}"
        ),
        method=("explicit symbolic matrices, each S <= 5 and each L <= S (as for causal-prefix)"),
        explanation=(
            "The $L$ newest tokens attend to all $S$ cached keys: query $i$ is token"
            " $i + S - L$, so the causal rule must be $j \\le i + (S - L)$, FlashAttention's"
            " `causal` since v2.1. The top-left rule $j \\le i$ (torch's `is_causal`) gives a"
            " different answer whenever $L < S$: a single decoding query would see only"
            " key 0."
        ),
        derivation=_kv_cache,
        references=(_DAO2,),
    ),
    Claim(
        topic=TOPIC,
        name="alignments",
        title="The two causal alignments, and when they coincide",
        statement=(
            r"o_{\mathrm{top\,left}} = 0,\quad o_{\mathrm{bottom\,right}} = S - L;"
            r"\quad \text{equal} \iff L = S;\quad"
            r" (L - 1) + (S - L) = S - 1"
        ),
        method="symbolic, general L, S",
        explanation=(
            "When $L = S$ both alignments give the same visible sets, so `align` may be left"
            " out. Bottom-right puts the last query at the last key: under causal it sees"
            " every key. With $L > S$ the first $L - S$ queries see no key at all and are"
            " empty rows (output 0, lse $-\\infty$)."
        ),
        derivation=_alignments,
    ),
    Claim(
        topic=TOPIC,
        name="hidden-key",
        title="A hidden key, a key with bias -inf and a removed key are the same",
        statement=(
            r"\frac{N + 0 \cdot e^{s} w}{Z + 0 \cdot e^{s}} ="
            r" \lim_{t \to \infty} \frac{N + e^{b - t} w}{Z + e^{b - t}} = \frac{N}{Z},"
            r"\quad \lim_{t \to \infty}\log(Z + e^{b - t}) = \log Z"
        ),
        method=(
            "symbolic, general n: the other visible keys enter only through their sums"
            " $Z > 0$ and $N$"
        ),
        explanation=(
            "$Z = \\sum e^{s_l}$ and $N = \\sum e^{s_l} v_l$ are the sums over the other visible"
            " keys; the key in question has logit $s$ (or bias $b - t$) and value $w$. So a"
            " mask, an additive $-\\infty$ bias and slicing the key out agree, output and"
            " lse, as long as some other key is visible (else see empty-row). In floating"
            " point a hidden key must be left out of the sums rather than multiplied by 0:"
            " $0 \\cdot \\mathrm{NaN} = \\mathrm{NaN}$ and $0 \\cdot \\infty = \\mathrm{NaN}$."
            " A large finite fill (`-1e9`, `finfo.min`) is not the same: it is a key with a"
            " tiny weight, and in a row where the fill replaces every logit the output is the"
            " mean of the values, not 0."
        ),
        derivation=_hidden_key,
    ),
    Claim(
        topic=TOPIC,
        name="gqa-repeat",
        title="Grouped-query attention is repeating each kv head G times",
        statement=(
            r"h = G g + r,\ 0 \le r < G \implies \lfloor h / G \rfloor = g;\quad"
            r" \operatorname{attn}(q_h, K_{\lfloor h/G \rfloor}, V_{\lfloor h/G \rfloor})"
            r" = \operatorname{attn}(q_h, \tilde K_h, \tilde V_h),\quad"
            r" \tilde K = \operatorname{repeat}(K, G)"
        ),
        method=(
            "symbolic, general G for the index identity; explicit heads for G <= 3 and"
            " H_kv <= 3 (a head is chosen by integer division, not an algebraic identity)"
        ),
        explanation=(
            "Query heads $Gg .. Gg + G - 1$ share kv head $g$: the layout of"
            " `numpy.repeat` / `torch.repeat_interleave` along the head axis (torch's"
            " `enable_gqa`, JAX, FlashAttention). Tiling instead ($h \\bmod H_{kv}$) is a"
            " different model whenever $G > 1$ and $H_{kv} > 1$."
        ),
        derivation=_gqa,
        references=(_AINSLIE,),
    ),
    Claim(
        topic=TOPIC,
        name="sink-rescales",
        title="A sink is a key with logit sigma and value 0: it only rescales",
        statement=(
            r"p_{ij} = \frac{e^{s_{ij}}}{\sum_{l \in \mathcal{V}_i} e^{s_{il}} + e^{\sigma_h}},"
            r"\quad o^{\sigma}_i = \frac{o_i}{1 + e^{\sigma_h - \ell_i}},\quad"
            r" \sum_j p_{ij} = 1 - e^{\sigma_h - \ell^{\sigma}_i}"
        ),
        method="symbolic, general n",
        explanation=(
            "The sink takes part of the weight and contributes nothing, so the output is"
            " the sink-free output shrunk by the factor $1/(1 + e^{\\sigma_h - \\ell_i})$,"
            " and the weights no longer sum to one. This is how the reference implements it"
            " (an extra key with value 0), and what lets a head attend to nothing."
        ),
        derivation=_sink,
        references=(_XIAO,),
    ),
    Claim(
        topic=TOPIC,
        name="alibi-causal-row-constant",
        title="Causal ALiBi is adding m j: the row constant cancels",
        statement=(
            r"j \le i + o \implies -m|i + o - j| = m j - m(i + o);\quad"
            r" P^{\mathrm{ALiBi}} = P^{+mj},\quad \ell^{\mathrm{ALiBi}}_i = \ell^{+mj}_i - m(i+o)"
        ),
        method=("symbolic, general n: each visible key at $j_l = i + o - d_l$, $d_l \\ge 0$"),
        explanation=(
            "Under causal visibility the distance is $i + o - j \\ge 0$, so the bias is"
            " linear in $j$ plus a constant per row, which softmax ignores. Implementations"
            " use the cheaper form $m j$ plus any row constant (FlashAttention's test"
            " reference uses $m(j - S + 1)$): the weights and output agree, the lse does not,"
            " by exactly that constant, which matters when lse is compared or merged."
            " Without causal visibility the distance has both signs and no such form exists."
        ),
        derivation=_alibi,
        references=(_PRESS, _FLASH_ALIBI),
    ),
    Claim(
        topic=TOPIC,
        name="softcap-range",
        title="Softcapped logits lie in (-c, c); the cap vanishes as c grows",
        statement=(
            r"\{c \tanh(s/c) : s \in \mathbb{R}\} = (-c, c),\quad"
            r" \frac{d}{ds} c\tanh(s/c) \ge 0,\quad \lim_{c \to \infty} c\tanh(s/c) = s"
        ),
        method="symbolic (function_range, derivative, limit)",
        explanation=(
            "The cap bounds every logit by $c$, so before any bias the weights of a row are"
            " within a factor $e^{2c}$ of each other; it is increasing, so the order of the"
            " logits (and the argmax) is kept. It is applied before the bias and the mask,"
            " so a $-\\infty$ bias still hides a key."
        ),
        derivation=_softcap,
        references=(_GEMMA2,),
    ),
    Claim(
        topic=TOPIC,
        name="dropout-expectation",
        title="Inverted dropout keeps the output's expectation",
        statement=(
            r"\kappa_{ij} \sim \operatorname{Bernoulli}(1 - p):\quad"
            r" E\Bigl[\sum_j p_{ij} \frac{\kappa_{ij}}{1 - p} v_j\Bigr] = \sum_j p_{ij} v_j"
        ),
        method=(
            "symbolic, general n by linearity from $E[\\kappa] = 1 - p$ (sympy.stats); and"
            " each n <= 3 with independent keep-bits, by sympy.stats on the whole output"
        ),
        explanation=(
            "Dividing the kept weights by $1 - p$ makes each one unbiased, so the output is"
            " unbiased; the expectation needs only each bit's marginal, not independence"
            " (which matters for the variance, $p_{ij}^2\\, p / (1 - p)$ per weight). A"
            " single draw does not sum to one. The reference takes the keep-mask as an input"
            " and draws nothing."
        ),
        derivation=_dropout,
        references=(_SRIVASTAVA,),
    ),
    Claim(
        topic=TOPIC,
        name="split-kv-merge",
        title="Merging attention over two key blocks by their lse",
        statement=(
            r"\ell = \operatorname{logaddexp}(\ell_A, \ell_B),\quad"
            r" O = e^{\ell_A - \ell} O_A + e^{\ell_B - \ell} O_B = O_{A \cup B}"
        ),
        method="symbolic, general block sizes $n_A$, $n_B$",
        explanation=(
            "Attention over disjoint key blocks can be computed block by block and merged:"
            " each block's output is weighted by its share $e^{\\ell_A - \\ell}$ of the"
            " normaliser. This is the online-softmax recurrence behind FlashAttention and"
            " split-KV (flash-decoding). An empty block has $\\ell_B = -\\infty$ and weight 0,"
            " so it drops out, which is why the lse of an empty row is $-\\infty$."
        ),
        derivation=_split_merge,
        references=(_MILAKOV, _DAO2),
    ),
)
