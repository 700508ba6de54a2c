r"""Claims about softmax, log_softmax and log-sum-exp, each proved by SymPy when run.

Notation, used by every claim: :math:`x \in \mathbb{R}^n`,
:math:`Z = \sum_{i=1}^n e^{x_i}`, :math:`p_j = \operatorname{softmax}(x)_j = e^{x_j}/Z`,
:math:`\operatorname{LSE}(x) = \log Z`; :math:`a = x_k = \max_i x_i`,
:math:`d_j = x_j - a`, :math:`s' = \sum_{i \ne k} e^{d_i}` (the sum of the terms other
than the maximum, as in :mod:`attnspec.reference.softmax`).

Where SymPy can, a claim is proved for a general (symbolic) :math:`n` with
``IndexedBase`` and ``Sum``. Where it cannot (a limit of a sum with a symbolic number
of terms, a double sum that must be symmetrised), the claim is proved for each size up
to a stated bound, and ``method`` says why.
"""

from __future__ import annotations

from itertools import combinations

import sympy
from sympy import (
    Abs,
    IndexedBase,
    Interval,
    KroneckerDelta,
    Matrix,
    Rational,
    S,
    Sum,
    diff,
    exp,
    log,
    oo,
    solveset,
    symbols,
)

from attnspec.spec.derivations.claim import Claim, Step, equal, holds, limit, nonnegative

__all__ = ["CLAIMS"]

TOPIC = "softmax"

# Symbols shared by the general-n derivations. Indices i, j run over 1..n.
_x = IndexedBase("x", real=True)
_y = IndexedBase("y", real=True)  # the entries other than the maximum, m = n - 1 of them
_i, _j, _l = symbols("i j l", integer=True, positive=True)
_n = symbols("n", integer=True, positive=True)
_m = symbols("m", integer=True, nonnegative=True)
_a, _c, _b, _t = symbols("a c b t", real=True)
_T = symbols("T", positive=True)
_Z = Sum(exp(_x[_l]), (_l, 1, _n))


def _p(index: object) -> sympy.Expr:
    """softmax(x)_index = e^{x_index} / Z, for a general n."""
    return exp(_x[index]) / _Z


def _in_range(expr: sympy.Expr) -> sympy.Expr:
    r"""Resolve SymPy's ``Piecewise`` guards ``j <= n``: the indices i, j lie in 1..n.

    ``Sum(f(l) * KroneckerDelta(l, j), (l, 1, n)).doit()`` gives ``f(j)`` only if
    ``1 <= j <= n``; SymPy knows ``j >= 1`` from the assumptions and asks for the rest.
    """
    return expr.xreplace({sympy.Le(_j, _n): sympy.true, sympy.Le(_i, _n): sympy.true})


def _delta_cases(label: str, expr: sympy.Expr) -> list[Step]:
    r"""Check ``expr == 0`` in both cases of :math:`\delta_{ij}`: i = j, and i != j."""
    same = expr.subs(_j, _i)
    other = expr.replace(lambda e: isinstance(e, KroneckerDelta), lambda e: S.Zero)
    return [
        equal(f"{label} (case $i = j$)", same, 0, key=False),
        equal(f"{label} (case $i \\ne j$, $\\delta_{{ij}} = 0$)", other, 0, key=False),
    ]


# --- the definition and its evaluation ------------------------------------------------


def _max_shift() -> list[Step]:
    y, i, j, m, a = _y, _i, _j, _m, _a
    others = Sum(exp(y[i]), (i, 1, m))  # S' = sum of e^{x_i} over i != k
    s_prime = Sum(exp(y[i] - a), (i, 1, m))  # s' = sum of e^{x_i - a} over i != k
    steps = [
        equal(
            "$s'$ is $e^{-a}$ times the sum of the other exponentials", s_prime, exp(-a) * others
        ),
    ]
    # From here the sum of the others is a symbol: a sum of exponentials is >= 0.
    big = symbols("S'", nonnegative=True)  # S' = e^a s'
    sp_ = big * exp(-a)
    total = exp(a) + big  # Z = e^{x_k} + S'
    steps += [
        holds(
            "each term of $S'$ is positive",
            r"e^{y_i} > 0",
            (exp(y[i]) > 0) == sympy.true,
            key=False,
        ),
        equal("softmax of the maximum entry", exp(a) / total, 1 / (1 + sp_)),
        equal("softmax of another entry", exp(y[j]) / total, exp(y[j] - a) / (1 + sp_)),
        equal("LSE", log(total), a + log(1 + sp_)),
        equal("log_softmax of another entry", log(exp(y[j]) / total), (y[j] - a) - log(1 + sp_)),
        equal("log_softmax of the maximum entry", log(exp(a) / total), -log(1 + sp_)),
    ]
    return steps


def _rows_sum_to_one() -> list[Step]:
    return [
        equal("the sum of the weights", Sum(_p(_j), (_j, 1, _n)), 1),
        holds("each weight is positive", r"p_j > 0", (_p(_j) > 0) == sympy.true, key=False),
    ]


def _shift_invariance() -> list[Step]:
    shifted = exp(_x[_j] + _c) / Sum(exp(_x[_l] + _c), (_l, 1, _n))
    return [equal(r"softmax of $x + c\mathbf{1}$", shifted, _p(_j))]


def _lse_shift() -> list[Step]:
    return [
        equal(
            r"LSE of $x + c\mathbf{1}$",
            log(Sum(exp(_x[_l] + _c), (_l, 1, _n))),
            log(_Z) + _c,
        )
    ]


def _lse_bounds() -> list[Step]:
    # LSE(x) - a = log(1 + s') (claim max-shift). 0 <= s' <= n - 1 gives the bounds.
    d = symbols("d", real=True)
    w = symbols("w", positive=True)
    sp_ = symbols("s'", nonnegative=True)  # s' >= 0: a sum of exponentials
    dd = IndexedBase("d", real=True)  # the exponents d_i = x_i - a of the terms of s'
    return [
        holds(
            r"$e^{d} \le 1$ exactly when $d \le 0$, so each of the $n - 1$ terms of $s'$ is"
            r" at most 1: $0 \le s' \le n - 1$",
            r"\{d \in \mathbb{R} : e^{d} \le 1\} = "
            + sympy.latex(solveset(exp(d) <= 1, d, S.Reals)),
            solveset(exp(d) <= 1, d, S.Reals) == Interval(-oo, 0),
        ),
        equal(
            r"so $n - 1 - s'$ is a sum of $n - 1$ terms $1 - e^{d_i} \ge 0$",
            Sum(1 - exp(dd[_i]), (_i, 1, _n - 1)),
            (_n - 1) - Sum(exp(dd[_i]), (_i, 1, _n - 1)),
            key=False,
        ),
        holds(
            r"lower bound: $\log(1 + s') \ge 0$ for $s' \ge 0$",
            r"\log(1 + s') \ge 0",
            log(1 + sp_).is_nonnegative is True,
            key=False,
        ),
        holds(
            r"$\log$ is increasing on $(0, \infty)$, so $0 \le s' \le n - 1$ gives"
            r" $0 \le \log(1 + s') \le \log n$",
            sympy.Derivative(log(w), w) > 0,
            (diff(log(w), w) > 0) == sympy.true,
            key=False,
        ),
        equal(
            "the upper bound is attained when all entries are equal",
            log(Sum(exp(_a), (_l, 1, _n))),
            _a + log(_n),
            key=False,
        ),
    ]


def _tie_invariance() -> list[Step]:
    # With x_k = x_{k'} = a, s'_k = (sum over all i of e^{x_i - x_k}) - 1, since the
    # i = k term is e^0 = 1; the same for k'. Substituting the tie x_{k'} = x_k:
    k, k2 = symbols("k k'", integer=True, positive=True)
    x = _x
    s_k = Sum(exp(x[_l] - x[k]), (_l, 1, _n)) - 1
    s_k2_raw = Sum(exp(x[_l] - x[k2]), (_l, 1, _n)) - 1
    s_k2 = s_k2_raw.subs(x[k2], x[k])
    p_k = exp(x[_j] - x[k]) / (1 + s_k)
    p_k2_raw = exp(x[_j] - x[k2]) / (1 + s_k2_raw)
    p_k2 = p_k2_raw.subs(x[k2], x[k])
    return [
        equal(r"$s'$ computed with $k$ and with $k'$, when $x_{k'} = x_k$", s_k, s_k2, key=False),
        equal(
            r"softmax computed with $k$ and with $k'$",
            p_k,
            p_k2,
            shown=(p_k, sympy.Subs(p_k2_raw, x[k2], x[k])),
        ),
        equal(
            r"LSE computed with $k$ and with $k'$",
            x[k] + log(1 + s_k),
            (x[k2] + log(1 + s_k2)).subs(x[k2], x[k]),
            key=False,
        ),
    ]


def _order_preservation() -> list[Step]:
    t = symbols("t", real=True)
    return [
        equal(
            "the ratio of two weights",
            _p(_i) / _p(_j),
            exp(_x[_i] - _x[_j]),
            shown=(r"\frac{p_i}{p_j}", exp(_x[_i] - _x[_j])),
        ),
        holds(
            r"$e^{t} \ge 1$ exactly when $t \ge 0$ (and the weights are positive)",
            r"\{t \in \mathbb{R} : e^{t} \ge 1\} = "
            + sympy.latex(solveset(exp(t) >= 1, t, S.Reals)),
            solveset(exp(t) >= 1, t, S.Reals) == Interval(0, oo),
        ),
        holds(
            r"$e^{t} > 1$ exactly when $t > 0$ (strict order is kept too)",
            r"\{t \in \mathbb{R} : e^{t} > 1\} = " + sympy.latex(solveset(exp(t) > 1, t, S.Reals)),
            solveset(exp(t) > 1, t, S.Reals) == Interval.open(0, oo),
            key=False,
        ),
    ]


# --- derivatives ---------------------------------------------------------------------


def _grad_lse() -> list[Step]:
    grad = _in_range(diff(log(_Z), _x[_j]).doit())
    return [
        equal(
            r"$\partial \operatorname{LSE} / \partial x_j$",
            grad,
            _p(_j),
            shown=(sympy.Derivative(log(_Z), _x[_j]), _p(_j)),
        )
    ]


def _jacobian() -> list[Step]:
    i, j = _i, _j
    dp = _in_range(diff(_p(i), _x[j]).doit())
    jac = _p(i) * (KroneckerDelta(i, j) - _p(j))
    hess = _in_range(diff(_in_range(diff(log(_Z), _x[i]).doit()), _x[j]).doit())
    row = _in_range(Sum(jac, (j, 1, _n)).doit())
    steps = [
        equal(
            r"$\partial p_i / \partial x_j$",
            dp,
            jac,
            shown=(sympy.Derivative(_p(i), _x[j]), r"p_i (\delta_{ij} - p_j)"),
        ),
        equal(r"the Hessian of LSE is the same matrix", hess, jac, key=False),
        equal(r"$(J\mathbf{1})_i = \sum_j J_{ij}$", row, 0, shown=(Sum(jac, (j, 1, _n)), 0)),
    ]
    steps += _delta_cases(
        r"symmetry, $J_{ij} - J_{ji}$", jac - jac.subs({i: j, j: i}, simultaneous=True)
    )
    return steps


def _jacobian_psd() -> list[Step]:
    steps: list[Step] = []
    for n in range(1, 7):
        e = symbols(f"e1:{n + 1}", positive=True)  # e_i = e^{x_i} > 0
        v = symbols(f"v1:{n + 1}", real=True)
        z = sum(e)
        p = [ei / z for ei in e]
        jac = Matrix([[p[r] * (int(r == c) - p[c]) for c in range(n)] for r in range(n)])
        quad = (Matrix([v]) * jac * Matrix(v))[0, 0]
        lagrange = sum(e[r] * e[c] * (v[r] - v[c]) ** 2 for r, c in combinations(range(n), 2))
        steps.append(
            nonnegative(
                f"$v^T J v$ for $n = {n}$",
                quad,
                lagrange / z**2,
                shown=rf"v^T \left(\operatorname{{diag}}(p) - p p^T\right) v\ (n = {n})",
                key=n == 3,
            )
        )
    return steps


def _log_softmax_derivative() -> list[Step]:
    log_p = _x[_i] - log(_Z)
    d = _in_range(diff(log_p, _x[_j]).doit())
    return [
        equal(
            r"$\partial \log p_i / \partial x_j$",
            d,
            KroneckerDelta(_i, _j) - _p(_j),
            shown=(sympy.Derivative(log_p, _x[_j]), KroneckerDelta(_i, _j) - _p(_j)),
        )
    ]


def _jacobian_inf_norm() -> list[Step]:
    # Row i of J: diagonal p_i (1 - p_i), off-diagonal -p_i p_j. With e = e^{x_i} > 0
    # and R = sum_{j != i} e^{x_j} >= 0 (a sum of exponentials), p_i = e / (e + R).
    e, r = symbols("e R", positive=True)
    y, j, m = _y, _j, _m
    p_i = e / (e + r)
    diag = p_i * (1 - p_i)
    # Off-diagonal entries of row i: |-p_i p_j| summed over the m = n - 1 others, whose
    # exponentials y_j sum to R.
    off_terms = Sum(Abs(-p_i * exp(y[j]) / (e + r)), (j, 1, m))
    off = sympy.factor_terms(off_terms.doit()).subs(Sum(exp(y[j]), (j, 1, m)), r)
    row_sum = Abs(diag) + off
    steps = [
        equal(
            r"the off-diagonal absolute values factor: $\sum_{j \ne i} p_i p_j = p_i (1 - p_i)$",
            off,
            diag,
            key=False,
        ),
        equal(r"absolute row sum of $J$: $\sum_j |J_{ij}| = 2 p_i (1 - p_i)$", row_sum, 2 * diag),
        nonnegative(
            r"$\tfrac12 - 2 p_i (1 - p_i) = 2 (p_i - \tfrac12)^2 \ge 0$",
            Rational(1, 2) - 2 * diag,
            2 * (p_i - Rational(1, 2)) ** 2,
        ),
    ]
    # Tightness: x = (0, 0) gives J = [[1/4, -1/4], [-1/4, 1/4]], row sums exactly 1/2.
    jac = Matrix(2, 2, lambda a_, b_: Rational(1, 2) * (int(a_ == b_) - Rational(1, 2)))
    steps.append(
        equal(
            r"attained: at $x = (0, 0)$, $\|J\|_\infty$",
            max(sum(Abs(v) for v in jac.row(r)) for r in range(2)),
            Rational(1, 2),
            key=False,
        )
    )
    return steps


# --- limits and special values ----------------------------------------------------------


def _temperature_zero() -> list[Step]:
    # x has its maximum a on a set M of m entries; the others are a - g_l with gaps
    # g_l > 0. Each entry is x_j / T.
    m = symbols("m", integer=True, positive=True)
    steps: list[Step] = []
    for r in range(4):
        g = symbols(f"g1:{r + 1}", positive=True)
        den = m * exp(_a / _T) + sum(exp((_a - gl) / _T) for gl in g)
        shifted = m + sum(exp(-gl / _T) for gl in g)
        steps.append(
            equal(f"max shift, {r} non-maximal entries", exp(_a / _T) / den, 1 / shifted, key=False)
        )
        steps.append(
            limit(f"an entry of the argmax set, {r} others", 1 / shifted, _T, 0, 1 / m, key=r == 2)
        )
        if r:
            steps.append(
                limit(
                    f"a non-maximal entry, {r} others",
                    exp(-g[0] / _T) / shifted,
                    _T,
                    0,
                    0,
                    key=r == 2,
                )
            )
    return steps


def _temperature_infinity() -> list[Step]:
    u = symbols("u", positive=True)  # u = 1/T
    steps: list[Step] = []
    for n in range(1, 5):
        x = symbols(f"x1:{n + 1}", real=True)
        p1 = exp(x[0] / _T) / sum(exp(xi / _T) for xi in x)
        steps.append(limit(f"$n = {n}$", p1, _T, oo, Rational(1, n), key=n == 3))
    # General n: with u = 1/T the weight is continuous at u = 0 (a quotient of
    # exponentials with a positive denominator), so the limit is its value there.
    general = exp(_x[_j] * u) / Sum(exp(_x[_l] * u), (_l, 1, _n))
    steps.append(
        equal(
            "general $n$, by continuity at $u = 1/T = 0$",
            general.subs(u, 0).doit(),
            1 / _n,
            key=False,
        )
    )
    return steps


def _posinf_limit() -> list[Step]:
    # |I| = m entries b + t with one finite part b, the others y_l finite; t -> +oo.
    m = symbols("m", integer=True, positive=True)
    steps: list[Step] = []
    for r in range(1, 4):
        y = symbols(f"y1:{r + 1}", real=True)
        z = m * exp(_b + _t) + sum(exp(yl) for yl in y)
        key = r == 2
        steps += [
            limit(
                rf"weight of an infinite entry, {r} finite",
                exp(_b + _t) / z,
                _t,
                oo,
                1 / m,
                key=key,
            ),
            limit(rf"weight of a finite entry, {r} finite", exp(y[0]) / z, _t, oo, 0, key=key),
            limit(
                rf"log_softmax of an infinite entry, {r} finite",
                log(exp(_b + _t) / z),
                _t,
                oo,
                -log(m),
                key=key,
            ),
            limit(
                rf"log_softmax of a finite entry, {r} finite",
                log(exp(y[0]) / z),
                _t,
                oo,
                -oo,
                key=False,
            ),
            limit(rf"LSE, {r} finite", log(z), _t, oo, oo, key=key),
        ]
    # Why the convention is needed: with different finite parts the limit depends on them.
    b1, b2, y1 = symbols("b1 b2 y1", real=True)
    z = exp(b1 + _t) + exp(b2 + _t) + exp(y1)
    steps.append(
        limit(
            "different finite parts give a limit that depends on them",
            exp(b1 + _t) / z,
            _t,
            oo,
            exp(b1) / (exp(b1) + exp(b2)),
            key=False,
        )
    )
    return steps


def _neginf_limit() -> list[Step]:
    # Entry 1 is b - t, t -> +oo; the others y_l are finite.
    steps: list[Step] = []
    for r in range(1, 4):
        y = symbols(f"y1:{r + 1}", real=True)
        rest = sum(exp(yl) for yl in y)
        z = exp(_b - _t) + rest
        key = r == 2
        steps += [
            limit(f"weight of the entry, {r} others", exp(_b - _t) / z, _t, oo, 0, key=key),
            limit(
                f"log_softmax of the entry, {r} others",
                log(exp(_b - _t) / z),
                _t,
                oo,
                -oo,
                key=False,
            ),
            limit(
                f"weight of another entry, {r} others",
                exp(y[0]) / z,
                _t,
                oo,
                exp(y[0]) / rest,
                key=key,
            ),
            limit(f"LSE, {r} others", log(z), _t, oo, log(rest), key=key),
        ]
    return steps


def _empty_sum() -> list[Step]:
    s = symbols("s", positive=True)
    lse_a = symbols("L", real=True)  # LSE of some nonempty row A
    return [
        equal(
            "the empty sum",
            Sum(exp(_x[_l]), (_l, 1, 0)).doit(),
            0,
            shown=(Sum(exp(_x[_l]), (_l, 1, 0)), 0),
        ),
        limit(r"$\log s$ as the sum $s \to 0^+$", log(s), s, 0, -oo),
        equal(
            r"$-\infty$ is the identity of $\operatorname{logaddexp}$:"
            r" $\operatorname{LSE}(A \cup \emptyset) = \operatorname{LSE}(A)$",
            log(exp(lse_a) + exp(-oo)),
            lse_a,
            shown=(r"\log\left(e^{L} + e^{-\infty}\right)", lse_a),
        ),
        equal(
            r"no limit gives softmax 0: $\operatorname{softmax}(x - t\mathbf{1})"
            r" = \operatorname{softmax}(x)$ for every $t$",
            exp(_x[_j] - _t) / Sum(exp(_x[_l] - _t), (_l, 1, _n)),
            _p(_j),
            key=False,
        ),
    ]


# --- the claims, in reading order ----------------------------------------------------------

_BHH = (
    "P. Blanchard, D. J. Higham, N. J. Higham, *Accurately computing the log-sum-exp and"
    " softmax functions*, IMA J. Numer. Anal. 41(4):2311-2330, 2021,"
    " [doi:10.1093/imanum/draa038](https://doi.org/10.1093/imanum/draa038)"
)
_NAIR = (
    "P. Nair, *Softmax is 1/2-Lipschitz: a tight bound across all $\\ell_p$ norms*, 2025,"
    " [arXiv:2510.23012](https://arxiv.org/abs/2510.23012)"
)

CLAIMS: tuple[Claim, ...] = (
    Claim(
        topic=TOPIC,
        name="max-shift",
        title="The max-shift identity the reference evaluates",
        statement=(
            r"\frac{e^{x_j}}{\sum_i e^{x_i}} = \frac{e^{d_j}}{1 + s'},\quad"
            r" \operatorname{LSE}(x) = a + \log(1 + s'),\quad"
            r" \log p_j = d_j - \log(1 + s')"
        ),
        method=(
            "symbolic, general n: the other entries are an indexed family $y_1..y_m$,"
            " $m = n - 1 \\ge 0$, and their exponential sum $S'$ a nonnegative symbol"
        ),
        explanation=(
            "Subtracting the maximum $a = x_k$ changes nothing mathematically, but makes"
            " every exponent $d_j \\le 0$, so no term overflows, the largest term is exactly"
            " $e^0 = 1$, and the denominator is $1 + s' \\ge 1$: it cannot underflow to 0."
            " Keeping the 1 out of $s'$ lets $\\log(1 + s')$ be evaluated as"
            " $\\operatorname{log1p}(s')$, accurate even when $s'$ is tiny."
        ),
        derivation=_max_shift,
        references=(_BHH,),
    ),
    Claim(
        topic=TOPIC,
        name="rows-sum-to-one",
        title="Softmax is a probability distribution",
        statement=r"p_j > 0,\qquad \sum_{j=1}^n p_j = 1",
        method="symbolic, general n",
        explanation=(
            "Every weight is positive and the weights sum to one, for every $n \\ge 1$. A row"
            " with nothing included is the one exception: it has no weights to normalise"
            " (see *The empty sum*)."
        ),
        derivation=_rows_sum_to_one,
    ),
    Claim(
        topic=TOPIC,
        name="shift-invariance",
        title="Softmax ignores a common shift",
        statement=r"\operatorname{softmax}(x + c\mathbf{1}) = \operatorname{softmax}(x)"
        r"\quad (c \in \mathbb{R})",
        method="symbolic, general n",
        explanation=(
            "The factor $e^c$ cancels between numerator and denominator. This is why the max"
            " shift is allowed, and why only differences of logits matter."
        ),
        derivation=_shift_invariance,
    ),
    Claim(
        topic=TOPIC,
        name="lse-shift",
        title="LSE moves with a common shift",
        statement=r"\operatorname{LSE}(x + c\mathbf{1}) = \operatorname{LSE}(x) + c",
        method="symbolic, general n",
        explanation="$\\log(e^c Z) = c + \\log Z$: LSE is shift-equivariant.",
        derivation=_lse_shift,
    ),
    Claim(
        topic=TOPIC,
        name="lse-bounds",
        title="LSE is a smooth maximum",
        statement=r"\max_i x_i \le \operatorname{LSE}(x) \le \max_i x_i + \log n",
        method=(
            "symbolic, general n: from $\\operatorname{LSE}(x) - a = \\log(1 + s')$"
            " (max-shift) and the solution sets of $e^d \\le 1$ and"
            " $\\log(1 + s) \\le \\log n$"
        ),
        explanation=(
            "Each of the $n - 1$ terms of $s'$ lies in $(0, 1]$, so $0 \\le s' \\le n - 1$. The"
            " upper bound is attained when all entries are equal; the lower one is approached"
            " when one entry dominates (the $-\\infty$ limit,"
            " [neginf-limit](#neginf-limit), with $n = 2$)."
        ),
        derivation=_lse_bounds,
    ),
    Claim(
        topic=TOPIC,
        name="tie-invariance",
        title="Any of several tied maxima may serve as k",
        statement=(
            r"x_k = x_{k'} = \max_i x_i \implies \frac{e^{x_j - x_k}}{1 + s'_k} ="
            r" \frac{e^{x_j - x_{k'}}}{1 + s'_{k'}}"
        ),
        method=(
            "symbolic, general n: $s'_k = \\sum_{i} e^{x_i - x_k} - 1$, the $i = k$ term"
            " being $e^0 = 1$"
        ),
        explanation=(
            "The reference picks one position $k$ of the maximum (the first). When the maximum"
            " is tied the choice does not matter: both give the same $a$ and the same $s'$, so"
            " the same softmax, log_softmax and LSE."
        ),
        derivation=_tie_invariance,
    ),
    Claim(
        topic=TOPIC,
        name="order-preservation",
        title="Softmax preserves order",
        statement=r"x_i \ge x_j \iff p_i \ge p_j, \qquad x_i > x_j \iff p_i > p_j",
        method="symbolic, general n",
        explanation=(
            "$p_i / p_j = e^{x_i - x_j}$, and $e^t$ is at least 1 exactly when $t \\ge 0$. In"
            " particular the argmax of the weights is the argmax of the logits."
        ),
        derivation=_order_preservation,
    ),
    Claim(
        topic=TOPIC,
        name="grad-lse",
        title="The gradient of LSE is softmax",
        statement=r"\frac{\partial \operatorname{LSE}(x)}{\partial x_j} = p_j",
        method="symbolic, general n (SymPy differentiates the indexed Sum)",
        explanation=(
            "So softmax is the gradient of a convex function, and the backward pass of LSE is"
            " a softmax."
        ),
        derivation=_grad_lse,
    ),
    Claim(
        topic=TOPIC,
        name="jacobian",
        title="The softmax Jacobian",
        statement=(
            r"J_{ij} = \frac{\partial p_i}{\partial x_j} = p_i(\delta_{ij} - p_j),\quad"
            r" J = \operatorname{diag}(p) - p p^T = J^T = \nabla^2 \operatorname{LSE},\quad"
            r" J \mathbf{1} = 0"
        ),
        method=(
            "symbolic, general n; symmetry is checked in the two cases $i = j$ and"
            " $i \\ne j$, since SymPy does not simplify $\\delta_{ij}(p_i - p_j)$ to 0"
        ),
        explanation=(
            "$J\\mathbf{1} = 0$ restates shift invariance: moving all logits together does not"
            " move the weights. The backward pass of softmax is"
            " $J^T g = p \\odot (g - p^T g)$."
        ),
        derivation=_jacobian,
    ),
    Claim(
        topic=TOPIC,
        name="jacobian-psd",
        title="The Jacobian is positive semidefinite",
        statement=(
            r"v^T J v = \sum_i p_i v_i^2 - \Big(\sum_i p_i v_i\Big)^2 ="
            r" \frac{1}{Z^2}\sum_{i<j} e^{x_i} e^{x_j} (v_i - v_j)^2 \ge 0"
        ),
        method=(
            "symbolic, each n <= 6: the Lagrange-type identity is checked by expansion for"
            " each n; for a general n SymPy cannot symmetrise the double Sum"
        ),
        explanation=(
            "$v^T J v$ is the variance of $v$ under the distribution $p$. So LSE is convex,"
            " and softmax is monotone: $(\\operatorname{softmax}(x) -"
            " \\operatorname{softmax}(y))^T (x - y) \\ge 0$."
        ),
        derivation=_jacobian_psd,
    ),
    Claim(
        topic=TOPIC,
        name="log-softmax-derivative",
        title="The derivative of log_softmax",
        statement=r"\frac{\partial \log p_i}{\partial x_j} = \delta_{ij} - p_j",
        method="symbolic, general n",
        explanation=(
            "The backward pass of log_softmax is $g - p \\sum_i g_i$; it needs no division"
            " by $p$, so it stays accurate where $p$ underflows."
        ),
        derivation=_log_softmax_derivative,
    ),
    Claim(
        topic=TOPIC,
        name="jacobian-inf-norm",
        title="Softmax is 1/2-Lipschitz in the max norm",
        statement=(
            r"\|J\|_\infty = \max_i \sum_j |J_{ij}| = \max_i 2 p_i (1 - p_i) \le \tfrac12,"
            r"\quad\text{so}\quad \|\operatorname{softmax}(x) - \operatorname{softmax}(y)\|_\infty"
            r" \le \tfrac12 \|x - y\|_\infty"
        ),
        method=(
            "symbolic, general n: row $i$ with $e = e^{x_i}$ and the other exponentials"
            " summing to $R \\ge 0$; attained at $x = (0, 0)$"
        ),
        explanation=(
            "The diagonal entry $p_i(1 - p_i)$ and the off-diagonal entries $p_i p_j$ of row"
            " $i$ add up to $2 p_i (1 - p_i)$, at most $\\tfrac12$ (at $p_i = \\tfrac12$). Since"
            " $\\operatorname{softmax}(x) - \\operatorname{softmax}(y) = \\int_0^1 J(y + s(x - y))"
            " \\,(x - y)\\, ds$, this bounds the change in the $\\ell_\\infty$ norm."
            " Nair (2025) proves the constant $\\tfrac12$ holds,"
            " and is tight, in every $\\ell_p$ norm, $p \\ge 1$."
        ),
        derivation=_jacobian_inf_norm,
        references=(_NAIR,),
    ),
    Claim(
        topic=TOPIC,
        name="temperature-zero",
        title="Zero temperature: uniform over the argmax set",
        statement=(
            r"\lim_{T \to 0^+} \operatorname{softmax}(x / T)_j ="
            r" \begin{cases} 1/|M| & j \in M \\ 0 & j \notin M \end{cases},"
            r"\quad M = \operatorname{argmax}_i x_i"
        ),
        method=(
            "symbolic in $|M| = m$, each number $r \\le 3$ of non-maximal entries: SymPy's"
            " limit cannot take the limit of a Sum with a symbolic number of terms"
        ),
        explanation=(
            "After the max shift every non-maximal term is $e^{-g/T}$ with a gap $g > 0$,"
            " which vanishes as $T \\to 0^+$; the $|M|$ maximal terms stay 1. Ties are"
            " shared equally: the limit is not a one-hot argmax unless the maximum is unique."
        ),
        derivation=_temperature_zero,
    ),
    Claim(
        topic=TOPIC,
        name="temperature-infinity",
        title="Infinite temperature: uniform",
        statement=r"\lim_{T \to \infty} \operatorname{softmax}(x / T)_j = \frac{1}{n}",
        method=("symbolic, each n <= 4 by SymPy's limit; general n by continuity at $u = 1/T = 0$"),
        explanation="As $T$ grows every exponent $x_j / T$ tends to 0 and every term to 1.",
        derivation=_temperature_infinity,
    ),
    Claim(
        topic=TOPIC,
        name="posinf-limit",
        title="Entries equal to +inf: the limit the reference returns",
        statement=(
            r"\lim_{t \to \infty} \operatorname{softmax}(x + t\mathbf{1}_I)_j ="
            r" \begin{cases} 1/|I| & j \in I \\ 0 & j \notin I \end{cases},\quad"
            r" \log p_j \to -\log|I| \ (j \in I),\quad \operatorname{LSE} \to +\infty"
        ),
        method=(
            "symbolic in $|I|$ and the shared finite part $b$, each number $r \\le 3$ of"
            " finite entries (SymPy's limit needs an explicit number of terms)"
        ),
        explanation=(
            "An entry $+\\infty$ is read as $b + t$ with $t \\to \\infty$, all infinite entries"
            " sharing one finite part $b$ (a float $+\\infty$ carries none, so none is"
            " preferred). With different finite parts $b_1, b_2$ the limit would be"
            " $e^{b_1}/(e^{b_1} + e^{b_2})$, which the input cannot tell: this is why a"
            " convention is needed. The reference returns $1/|I|$ on the infinite entries,"
            " 0 elsewhere, log_softmax $-\\log|I|$ and $-\\infty$, and LSE $+\\infty$."
        ),
        derivation=_posinf_limit,
    ),
    Claim(
        topic=TOPIC,
        name="neginf-limit",
        title="Entries equal to -inf get weight exactly 0",
        statement=(
            r"\lim_{t \to \infty} \operatorname{softmax}(b - t, y)_1 = 0,\quad"
            r" \operatorname{softmax}(b - t, y)_{1+j} \to \operatorname{softmax}(y)_j,\quad"
            r" \operatorname{LSE}(b - t, y) \to \operatorname{LSE}(y)"
        ),
        method="symbolic, each number $r \\le 3$ of other entries",
        explanation=(
            "A $-\\infty$ entry is the same as an excluded one: it drops out of every sum."
            " This is how `where=False` is implemented (excluded entries become $-\\infty$),"
            " and why whatever an excluded position holds, NaN included, never reaches the"
            " result."
        ),
        derivation=_neginf_limit,
    ),
    Claim(
        topic=TOPIC,
        name="empty-sum",
        title="The empty sum: LSE of nothing is -inf",
        statement=(
            r"\sum_{i \in \emptyset} e^{x_i} = 0,\quad"
            r" \operatorname{LSE}(\emptyset) = \log 0 = -\infty,\quad"
            r" \log(e^{L} + e^{-\infty}) = L"
        ),
        method="symbolic",
        explanation=(
            "LSE of an empty or fully excluded slice is $\\log$ of the empty sum, $-\\infty$:"
            " the identity element of $\\operatorname{logaddexp}$, so that LSE over a union"
            " of blocks is the logaddexp of the blocks' LSEs even when a block is empty."
            " Softmax of such a slice has no weights to normalise; it is *not* a limit of"
            " finite rows (softmax of $x - t\\mathbf{1}$ does not move with $t$). The reference"
            " gives every excluded entry weight 0, as in any other row, and log_softmax"
            " $\\log 0 = -\\infty$; such a row sums to 0, not 1."
        ),
        derivation=_empty_sum,
    ),
)
