r"""Claims about the backward pass of softmax and attention, each proved by SymPy when run.

Every gradient here is taken by SymPy from the forward definition itself: the general-size
claims differentiate the indexed ``Sum`` transcription of one row
(:func:`attnspec.spec.derivations.attention._out`, ``_Z``), the explicit-size claims
differentiate :func:`_forward`, steps 1-8 of :mod:`attnspec.reference.attention` on
explicit SymPy matrices, built on the attention topic's :func:`_logits` (step 1) and
:func:`_attend` (steps 4-6 and 8); the derivative is then shown equal to the closed form
that :func:`attnspec.sdpa_backward` evaluates.

Notation (per head). :math:`s = \tau Q K^T` the raw logits, :math:`t = c\tanh(s/c)` with a
softcap :math:`c` (else :math:`t = s`), :math:`z_{ij} = t_{ij} + b_{ij} - m|i + o - j|` the
final logits, :math:`\ell` the lse, :math:`P_{ij} = e^{z_{ij} - \ell_i}` the weights
(0 at hidden keys), :math:`\kappa` the keep-mask and :math:`r = 1/(1 - p)`,
:math:`P^d = P \odot \kappa\, r`, :math:`O = P^d V`. For a loss :math:`\mathcal{L}(O, \ell)`
write :math:`dO = \partial\mathcal{L}/\partial O` and
:math:`d\ell = \partial\mathcal{L}/\partial \ell`; by the chain rule the gradient of
:math:`\mathcal{L}` with respect to any input is that of

.. math::

    F = \sum_{i,c} dO_{ic}\, O_{ic} + \sum_i d\ell_i\, \ell_i

with :math:`dO`, :math:`d\ell` held fixed, so every claim differentiates this :math:`F`.
The closed forms:

.. math::

    dV = (P^d)^T dO,\quad dP = (dO\, V^T) \odot \kappa\, r,\quad
    D_i = \textstyle\sum_c dO_{ic} O_{ic},\quad dZ = P \odot (dP - D + d\ell),\quad
    dS = dZ \odot (1 - (t/c)^2),\quad dQ = \tau\, dS\, K,\quad dK = \tau\, dS^T Q .

An explicit entry's check works on a rational function: each :math:`e^{a}` is split over
the terms of :math:`a` and every :math:`e^{\text{monomial}}` is replaced by a positive
unknown (:func:`_rational`); a rational identity in independent unknowns stays true when
the unknowns are the exponentials, so a numerator that expands to 0 proves the entry.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import permutations
from typing import Any

import sympy
from sympy import (
    QQ,
    Add,
    Dummy,
    Function,
    IndexedBase,
    Interval,
    Matrix,
    O,
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
from sympy.polys.rings import PolyElement
from sympy.polys.rings import ring as poly_ring

from attnspec.spec.derivations.attention import (
    _Z,
    Seen,
    _attend,
    _everything,
    _j,
    _l,
    _logits,
    _n,
    _out,
    _s,
    _tau,
    _v,
)
from attnspec.spec.derivations.claim import Claim, ClaimFailed, Step, equal, holds, nonnegative
from attnspec.spec.derivations.softmax import _i, _in_range

__all__ = ["CLAIMS"]

TOPIC = "backward"

# Symbols of the general-n derivations (one row: logits s_l, values v_l, l = 1..n, from
# the attention topic; i, j indices in 1..n).
_g = IndexedBase("g", real=True)  # a cotangent (the upstream gradient)
_t = IndexedBase("t", real=True)  # a tangent (the direction of a jvp)
_sigma = symbols("sigma", real=True)  # a sink logit
_dlse = symbols(r"d\ell", real=True)  # the gradient of the row's lse, one row


def _p(index: Any) -> sympy.Expr:
    r""":math:`p_{\text{index}} = e^{s_{\text{index}}} / Z`: a weight of the row."""
    return exp(_s[index]) / _Z()


# --- explicit matrices: the forward, the loss and the closed forms ----------------------


def _matrix(name: str, rows: int, cols: int) -> Matrix:
    """A ``rows x cols`` matrix of fresh real symbols ``name_{rc}``."""
    return Matrix(rows, cols, lambda r, c: symbols(f"{name}_{r}{c}", real=True))


def _vector(name: str, size: int) -> list[sympy.Symbol]:
    """``size`` fresh real symbols ``name_0 .. name_{size-1}``."""
    return [symbols(f"{name}_{r}", real=True) for r in range(size)]


@dataclass(frozen=True)
class _Forward:
    """The forward of one head on explicit matrices, with what its backward reads."""

    t: Matrix  # the logits after the softcap (the raw logits without one)
    z: Matrix  # the final logits
    weights: Matrix  # P: e^{z - lse} at visible keys, exactly 0 at hidden ones
    sink_weights: list[sympy.Expr]  # P_{i, sink} = e^{sigma - lse_i}; [] without a sink
    out: Matrix  # O = P^d V
    lse: list[sympy.Expr]


def _forward(
    q: Matrix,
    k: Matrix,
    v: Matrix,
    *,
    tau: Any = _tau,
    softcap: Any = None,
    bias: Matrix | None = None,
    slope: Any = None,
    offset: int = 0,
    seen: Seen = _everything,
    sink: Any = None,
    keep: Matrix | None = None,
    keep_scale: Any = 1,
) -> _Forward:
    r"""Steps 1-8 of the definition on explicit SymPy matrices (one head).

    Step 1 is the attention topic's :func:`_logits`, steps 4-6 and 8 its :func:`_attend`
    (a hidden key is left out of both sums; a row with nothing visible and no sink has
    output 0 and lse :math:`-\infty`). Step 2 caps, step 3 adds ``bias`` and the ALiBi
    term :math:`-m|i + o - j|`; step 7 multiplies the weights by ``keep * keep_scale``.
    The weights are written :math:`e^{z_{ij}} e^{-\ell_i}`, which SymPy evaluates to
    :math:`e^{z_{ij}} / Z_i`.
    """
    n_q, n_k = q.rows, k.rows
    s = _logits(q, k, tau)  # step 1
    t = s if softcap is None else s.applyfunc(lambda x: softcap * tanh(x / softcap))  # 2
    z = t if bias is None else t + bias  # step 3
    if slope is not None:
        z = z + Matrix(n_q, n_k, lambda i, j: -slope * abs(i + offset - j))
    out, lse = _attend(z, v, seen, sink)  # steps 4-6 and 8
    weights = Matrix(
        n_q,
        n_k,
        lambda i, j: exp(z[i, j]) * exp(-lse[i]) if seen(i, j) and lse[i] != -oo else S.Zero,
    )
    sink_weights = [] if sink is None else [exp(sink) * exp(-x) for x in lse]
    if keep is not None:  # step 7, then step 8 again with the dropped weights
        out = weights.multiply_elementwise(keep) * keep_scale * v
    return _Forward(t, z, weights, sink_weights, out, lse)


def _loss(fw: _Forward, dout: Matrix, dlse: Sequence[Any] | None) -> sympy.Expr:
    r""":math:`F = \sum dO \odot O + \sum_i d\ell_i \ell_i`, over the rows with a finite lse.

    A row with nothing visible has :math:`\ell_i = -\infty` whatever the inputs: a
    constant, which carries no gradient, so its term is left out.
    """
    total = sum(
        (dout[i, c] * fw.out[i, c] for i in range(dout.rows) for c in range(dout.cols)), S.Zero
    )
    if dlse is not None:
        total += sum((dlse[i] * x for i, x in enumerate(fw.lse) if x != -oo), S.Zero)
    return total


@dataclass(frozen=True)
class _Grads:
    """The closed forms of the backward, on explicit matrices."""

    dq: Matrix
    dk: Matrix
    dv: Matrix
    dz: Matrix  # the gradient of the final logits (= dbias)
    ds: Matrix  # the gradient of the raw logits s
    d: list[sympy.Expr]  # D_i = rowsum(dO * O)
    dp: Matrix  # the gradient of the weights before dropout
    dsink: sympy.Expr  # the gradient of the sink logit (0 without a sink)


def _cap_slope(t: Any, c: Any) -> sympy.Expr:
    r"""The slope of the softcap written with its output: :math:`1 - (t/c)^2`."""
    return 1 - (t / c) ** 2


def _backward(
    fw: _Forward,
    q: Matrix,
    k: Matrix,
    v: Matrix,
    dout: Matrix,
    dlse: Sequence[Any] | None,
    *,
    tau: Any = _tau,
    softcap: Any = None,
    keep: Matrix | None = None,
    keep_scale: Any = 1,
    subtract_d: bool = True,
    scale_dq: bool = True,
    rescale_dp: bool = True,
    cap_factor: Callable[[Any, Any], Any] = _cap_slope,
    sink_sign: int = -1,
) -> _Grads:
    r"""The closed forms that :func:`attnspec.sdpa_backward` evaluates (module docstring).

    ``D`` is computed from the output :math:`O` the forward produced, as the API does.
    ``subtract_d``, ``scale_dq``, ``rescale_dp``, ``cap_factor`` and ``sink_sign`` make one
    part of it wrong, for the tests' false variants.
    """
    n_q, n_k = fw.weights.shape
    lam = [S.Zero] * n_q if dlse is None else list(dlse)
    p = fw.weights
    dropped = p if keep is None else p.multiply_elementwise(keep) * keep_scale
    dv = dropped.T * dout
    dp = dout * v.T
    if keep is not None and rescale_dp:
        dp = dp.multiply_elementwise(keep) * keep_scale
    d = [sum((dout[i, c] * fw.out[i, c] for c in range(dout.cols)), S.Zero) for i in range(n_q)]
    centre = d if subtract_d else [S.Zero] * n_q
    dz = Matrix(n_q, n_k, lambda i, j: p[i, j] * (dp[i, j] - centre[i] + lam[i]))
    ds = dz
    if softcap is not None:
        ds = Matrix(n_q, n_k, lambda i, j: dz[i, j] * cap_factor(fw.t[i, j], softcap))
    scale = tau if scale_dq else 1
    dsink = sum((sink_sign * w * (d[i] - lam[i]) for i, w in enumerate(fw.sink_weights)), S.Zero)
    return _Grads(scale * ds * k, tau * ds.T * q, dv, dz, ds, d, dp, dsink)


def _grad(f: sympy.Expr, variables: Matrix) -> Matrix:
    """The gradient of ``f``: its derivative by each entry of ``variables`` (same shape)."""
    return variables.applyfunc(lambda x: diff(f, x))


def _exponentials_as_unknowns(expr: Any) -> Any:
    r"""``expr`` with each :math:`e^{a}` split over the terms of :math:`a` (expanded) and every
    :math:`e^{\text{monomial}}` replaced by a positive unknown (one per monomial)."""
    table: dict[Any, Dummy] = {}

    def split(arg: Any) -> Any:
        product = S.One
        for term in Add.make_args(sympy.expand(arg)):
            coeff, monomial = term.as_coeff_Mul()
            if monomial not in table:
                table[monomial] = Dummy("e", positive=True)
            product *= table[monomial] ** coeff
        return product

    return sympy.sympify(expr).replace(lambda e: isinstance(e, exp), lambda e: split(e.args[0]))


#: a rational function: its numerator, and its denominator as factors with their powers
_Fraction = tuple[PolyElement, dict[PolyElement, int]]


def _numerator(flat: Any) -> PolyElement:
    """The numerator of ``flat`` over the least common multiple of its denominators.

    ``flat`` is evaluated in a sparse polynomial ring over the rationals whose generators
    are its leaves: anything but a sum, a product, an integer power or a rational number
    (a symbol, an unknown, ``tanh(...)``). Each denominator is kept as factors with powers,
    and a sum takes each factor to its largest power, so no product is expanded twice.
    """

    def is_leaf(e: Any) -> bool:
        return not (e.is_Add or e.is_Mul or e.is_Rational or (e.is_Pow and e.exp.is_Integer))

    leaves = list(dict.fromkeys(e for e in sympy.preorder_traversal(flat) if is_leaf(e)))
    for leaf in leaves:
        if leaf.is_Number:  # a float or an infinity
            raise ClaimFailed(f"{leaf} is not exact: no rational identity to check")
    ring, *gens = poly_ring(leaves or [Dummy()], QQ)
    generator = dict(zip(leaves, gens, strict=False))
    done: dict[Any, _Fraction] = {}

    def lift(part: _Fraction, target: dict[PolyElement, int]) -> PolyElement:
        num, den = part
        for factor, power in target.items():
            if power > den.get(factor, 0):
                num = num * factor ** (power - den.get(factor, 0))
        return num

    def convert(e: Any) -> _Fraction:
        if e in done:
            return done[e]
        result: _Fraction
        if e.is_Rational:
            result = (ring(QQ(int(e.p), int(e.q))), {})
        elif e in generator:
            result = (generator[e], {})
        elif e.is_Add:
            parts = [convert(a) for a in e.args]
            target: dict[PolyElement, int] = {}
            for _, den in parts:
                for factor, power in den.items():
                    target[factor] = max(power, target.get(factor, 0))
            result = (sum((lift(part, target) for part in parts), ring.zero), target)
        elif e.is_Mul:
            num, den = ring.one, {}
            for a in e.args:
                a_num, a_den = convert(a)
                num = num * a_num
                for factor, power in a_den.items():
                    den[factor] = den.get(factor, 0) + power
            result = (num, den)
        else:  # an integer power
            b_num, b_den = convert(e.base)
            k = int(e.exp)
            if k >= 0:
                result = (b_num**k, {f: p * k for f, p in b_den.items()})
            else:  # (n / d)^k = d^|k| / n^|k|
                num = ring.one
                for factor, power in b_den.items():
                    num = num * factor ** (power * -k)
                result = (num, {b_num: -k})
        done[e] = result
        return result

    return convert(flat)[0]


def _rational(expr: Any) -> Any:
    r"""The zero test of the explicit claims, for :func:`equal`'s ``simplify``.

    ``expr`` with its exponentials as positive unknowns (:func:`_exponentials_as_unknowns`)
    is a rational function; this returns 0 when its numerator (:func:`_numerator`) is the
    zero polynomial, else a SymPy symbol that says how many terms are left and shows one.
    It is sound: :math:`e^{a + b} = e^a e^b` and :math:`e^{k u} = (e^u)^k` are identities,
    and a rational function that vanishes identically in independent unknowns vanishes when
    they are exponentials. (It is not complete: an identity that needs a relation between
    the exponentials, or one of :math:`\tanh`, would not be found; none here does.)
    """
    numerator = _numerator(_exponentials_as_unknowns(expr))
    if not numerator:
        return S.Zero
    terms = numerator.terms()
    first = numerator.ring.from_terms(terms[:1]).as_expr()
    return sympy.Symbol(f"<a numerator of {len(terms)} terms, such as {first}>")


def _agree(
    label: str,
    got: Any,
    want: Any,
    *,
    shown: tuple[Any, Any] | None = None,
    key: bool = True,
) -> Step:
    """``got == want`` entry by entry (matrices or lists), each by :func:`_rational`."""
    a, b = Matrix(got), Matrix(want)
    if a.shape != b.shape:
        raise ClaimFailed(f"{label}: shapes {a.shape} and {b.shape} differ")
    for index, (x, y) in enumerate(zip(a, b, strict=True)):
        equal(f"{label} (entry {index})", x, y, simplify=_rational)
    left, right = (got, want) if shown is None else shown
    return Step(label, left, right, "=", key)


# --- softmax, log_softmax, logsumexp ------------------------------------------------------


def _softmax_vjp(centre: bool = True) -> list[Step]:
    dp = diff(_p(_i), _s[_j])  # the derivative of the forward, p_i = e^{s_i} / Z
    vjp = _in_range(Sum(_g[_i] * dp, (_i, 1, _n)).doit())
    jvp = _in_range(Sum(dp * _t[_j], (_j, 1, _n)).doit())
    mean_g = Sum(_g[_i] * _p(_i), (_i, 1, _n)) if centre else S.Zero
    mean_t = Sum(_t[_j] * _p(_j), (_j, 1, _n)) if centre else S.Zero
    a = symbols("a", real=True)
    moved_g = Sum((_g[_i] + a) * _p(_i), (_i, 1, _n))
    return [
        equal(
            r"the vjp: $\sum_i g_i\, \partial p_i / \partial s_j$",
            vjp,
            _p(_j) * (_g[_j] - mean_g),
            shown=(
                Sum(_g[_i] * sympy.Derivative(_p(_i), _s[_j]), (_i, 1, _n)),
                r"p_j (g_j - p^T g)",
            ),
        ),
        equal(
            r"the jvp: $\sum_j (\partial p_i / \partial s_j)\, t_j$",
            jvp,
            _p(_i) * (_t[_i] - mean_t),
            shown=(
                Sum(sympy.Derivative(_p(_i), _s[_j]) * _t[_j], (_j, 1, _n)),
                r"p_i (t_i - p^T t)",
            ),
        ),
        equal(
            r"a constant $a$ added to $g$ changes nothing ($\sum_i p_i = 1$)",
            _p(_j) * (_g[_j] + a - moved_g),
            _p(_j) * (_g[_j] - mean_g),
            key=False,
        ),
    ]


def _log_softmax_vjp() -> list[Step]:
    log_p = _s[_i] - log(_Z())  # log_softmax as the forward defines it
    vjp = _in_range(Sum(_g[_i] * diff(log_p, _s[_j]), (_i, 1, _n)).doit())
    g = symbols("g", real=True)  # the cotangent of the scalar LSE
    lse_vjp = _in_range(diff(g * log(_Z()), _s[_j]).doit())
    return [
        equal(
            r"log_softmax: $\sum_i g_i\, \partial \log p_i / \partial s_j$",
            vjp,
            _g[_j] - _p(_j) * Sum(_g[_i], (_i, 1, _n)),
            shown=(
                Sum(_g[_i] * sympy.Derivative(log_p, _s[_j]), (_i, 1, _n)),
                r"g_j - p_j \sum_i g_i",
            ),
        ),
        equal(
            r"logsumexp: $g\, \partial \operatorname{LSE} / \partial s_j$",
            lse_vjp,
            g * _p(_j),
            shown=(g * sympy.Derivative(log(_Z()), _s[_j]), g * _p(_j)),
        ),
    ]


# --- one row ---------------------------------------------------------------------------


def _one_row() -> list[Step]:
    o = _out()
    value = IndexedBase("V", real=True)  # the values, a general number E_v of columns
    dout, o_c = IndexedBase("dO", real=True), IndexedBase("o", real=True)
    c = symbols("c", integer=True, positive=True)
    width = symbols("E_v", integer=True, positive=True)
    column = _out(value=lambda idx: value[idx, c])
    return [
        equal(
            r"$\partial o / \partial v_j = p_j$",
            _in_range(diff(o, _v[_j]).doit()),
            _p(_j),
            shown=(sympy.Derivative(o, _v[_j]), _p(_j)),
        ),
        equal(
            r"$\partial o / \partial s_j = p_j (v_j - o)$",
            _in_range(diff(o, _s[_j]).doit()),
            _p(_j) * (_v[_j] - o),
            shown=(sympy.Derivative(o, _s[_j]), r"p_j (v_j - o)"),
        ),
        equal(
            r"the same for each column $c$ of $V$: $\partial o_c / \partial s_j"
            r" = p_j (V_{jc} - o_c)$",
            _in_range(diff(column, _s[_j]).doit()),
            _p(_j) * (value[_j, c] - column),
            key=False,
        ),
        equal(
            r"so $\sum_c dO_c\, \partial o_c / \partial s_j = p_j (dP_j - D)$ with"
            r" $dP_j = \sum_c dO_c V_{jc}$, $D = \sum_c dO_c o_c$",
            Sum(dout[c] * _p(_j) * (value[_j, c] - o_c[c]), (c, 1, width)),
            _p(_j)
            * (Sum(dout[c] * value[_j, c], (c, 1, width)) - Sum(dout[c] * o_c[c], (c, 1, width))),
        ),
    ]


# --- the whole head ---------------------------------------------------------------------


def _sdpa_closed_form(subtract_d: bool = True, scale_dq: bool = True) -> list[Step]:
    n_q, n_k, width, width_v = 2, 3, 2, 2
    q, k, v = _matrix("q", n_q, width), _matrix("k", n_k, width), _matrix("v", n_k, width_v)
    dout, dlse = _matrix("dO", n_q, width_v), _vector(r"d\ell", n_q)
    fw = _forward(q, k, v)
    f = _loss(fw, dout, dlse)
    want = _backward(fw, q, k, v, dout, dlse, subtract_d=subtract_d, scale_dq=scale_dq)
    dp = dout * v.T
    return [
        _agree(
            r"$\partial F / \partial Q = \tau\, dS\, K$",
            _grad(f, q),
            want.dq,
            shown=(
                r"\frac{\partial F}{\partial Q}",
                r"\tau\, \bigl(P \odot (dP - D + d\ell)\bigr) K",
            ),
        ),
        _agree(
            r"$\partial F / \partial K = \tau\, dS^T Q$",
            _grad(f, k),
            want.dk,
            shown=(r"\frac{\partial F}{\partial K}", r"\tau\, dS^T Q"),
        ),
        _agree(
            r"$\partial F / \partial V = P^T dO$",
            _grad(f, v),
            want.dv,
            shown=(r"\frac{\partial F}{\partial V}", r"P^T dO"),
        ),
        _agree(
            r"$D_i = \sum_c dO_{ic} O_{ic} = \sum_j P_{ij}\, dP_{ij}$",
            want.d,
            [sum((fw.weights[i, j] * dp[i, j] for j in range(n_k)), S.Zero) for i in range(n_q)],
            key=False,
        ),
    ]


def _softcap_gradient(factor: Callable[[Any, Any], Any] = _cap_slope) -> list[Step]:
    c = symbols("c", positive=True)
    x = symbols("s", real=True)
    capped = c * tanh(x / c)
    q, k, v = _matrix("q", 2, 1), _matrix("k", 2, 1), _matrix("v", 2, 1)
    dout, dlse = _matrix("dO", 2, 1), _vector(r"d\ell", 2)
    fw = _forward(q, k, v, softcap=c)
    f = _loss(fw, dout, dlse)
    want = _backward(fw, q, k, v, dout, dlse, softcap=c, cap_factor=factor)
    return [
        equal(
            r"$\frac{d}{ds} c \tanh(s/c) = 1 - \tanh^2(s/c) = 1 - (t/c)^2$",
            diff(capped, x),
            factor(capped, c),
            shown=(sympy.Derivative(capped, x), 1 - (symbols("t") / c) ** 2),
        ),
        nonnegative(
            r"the factor is at most 1: $1 - (1 - (t/c)^2) = \tanh^2(s/c) \ge 0$",
            1 - factor(capped, c),
            tanh(x / c) ** 2,
            key=False,
        ),
        _agree(
            r"$\partial F / \partial Q = \tau\, dS\, K$ with"
            r" $dS_{ij} = dZ_{ij} (1 - (t_{ij}/c)^2)$",
            _grad(f, q),
            want.dq,
            shown=(
                r"\frac{\partial F}{\partial Q}",
                r"\tau\, dS\, K,\quad dS_{ij} = dZ_{ij} \bigl(1 - (t_{ij}/c)^2\bigr)",
            ),
        ),
        _agree(r"$\partial F / \partial K = \tau\, dS^T Q$", _grad(f, k), want.dk, key=False),
    ]


def _bias_gradient(factor: Callable[[Any, Any], Any] = _cap_slope) -> list[Step]:
    m = symbols("m", nonnegative=True)  # the ALiBi slope: a constant
    c = symbols("c", positive=True)  # the softcap
    q, k, v = _matrix("q", 2, 1), _matrix("k", 2, 1), _matrix("v", 2, 1)
    bias, row = _matrix("b", 2, 2), _matrix("beta", 1, 2)
    dout, dlse = _matrix("dO", 2, 1), _vector(r"d\ell", 2)
    fw = _forward(q, k, v, softcap=c, bias=bias, slope=m)
    f = _loss(fw, dout, dlse)
    want = _backward(fw, q, k, v, dout, dlse, softcap=c, cap_factor=factor)
    # A bias broadcast over the queries: one row beta_j for every query.
    shared = _forward(q, k, v, softcap=c, bias=Matrix.vstack(row, row), slope=m)
    shared_want = _backward(shared, q, k, v, dout, dlse, softcap=c, cap_factor=factor)
    return [
        _agree(
            r"$\partial F / \partial b_{ij} = dZ_{ij} = P_{ij}(dP_{ij} - D_i + d\ell_i)$",
            _grad(f, bias),
            want.dz,
            shown=(r"\frac{\partial F}{\partial B}", r"dZ = P \odot (dP - D + d\ell)"),
        ),
        _agree(
            r"with the softcap, ALiBi and the bias: $\partial F / \partial Q = \tau\, dS\, K$,"
            r" $dS_{ij} = dZ_{ij} (1 - (t_{ij}/c)^2)$",
            _grad(f, q),
            want.dq,
            key=False,
        ),
        _agree(
            r"a bias broadcast over the queries gets $\sum_i dZ_{ij}$",
            _grad(_loss(shared, dout, dlse), row),
            Matrix([[shared_want.dz[0, j] + shared_want.dz[1, j] for j in range(2)]]),
            shown=(r"\frac{\partial F}{\partial \beta_j}", r"\sum_i dZ_{ij}"),
        ),
    ]


def _sink_gradient(sign: int = -1) -> list[Step]:
    g = symbols("g", real=True)
    z_sink = _Z() + exp(_sigma)
    o = Sum(exp(_s[_l]) * _v[_l], (_l, 1, _n)) / z_sink
    lse = log(z_sink)
    p_sink = exp(_sigma) * exp(-lse)
    # Explicit: row 0 sees no key (only the sink), row 1 sees both.
    q, k, v = _matrix("q", 2, 1), _matrix("k", 2, 1), _matrix("v", 2, 2)
    dout, dlse = _matrix("dO", 2, 2), _vector(r"d\ell", 2)
    fw = _forward(q, k, v, seen=lambda i, j: i > 0, sink=_sigma)
    f = _loss(fw, dout, dlse)
    want = _backward(fw, q, k, v, dout, dlse, sink_sign=sign)
    return [
        equal(
            r"one row, general $n$: $\partial (g\, o + d\ell\, \ell) / \partial \sigma"
            r" = -p_\sigma (g\, o - d\ell)$",
            diff(g * o + _dlse * lse, _sigma),
            sign * p_sink * (g * o - _dlse),
            shown=(
                sympy.Derivative(sympy.Symbol("F"), _sigma),
                r"-p_\sigma (D - d\ell),\quad p_\sigma = e^{\sigma - \ell},\ D = g\, o",
            ),
        ),
        _agree(
            r"a head, with a row that sees only the sink: $\partial F / \partial \sigma ="
            r" \sum_i -P_{i,\sigma}(D_i - d\ell_i)$",
            [diff(f, _sigma)],
            [want.dsink],
            shown=(r"\frac{\partial F}{\partial \sigma}", r"\sum_i -P_{i,\sigma} (D_i - d\ell_i)"),
        ),
        _agree(
            r"with the sink, still $\partial F / \partial Q = \tau\, dZ\, K$",
            _grad(f, q),
            want.dq,
            key=False,
        ),
    ]


def _dropout_gradient(rescale_dp: bool = True) -> list[Step]:
    p_drop = symbols("p", positive=True)
    r = 1 / (1 - p_drop)
    keep = _matrix("kappa", 2, 2)  # any keep-mask: the identities hold for any values
    q, k, v = _matrix("q", 2, 1), _matrix("k", 2, 1), _matrix("v", 2, 2)
    dout, dlse = _matrix("dO", 2, 2), _vector(r"d\ell", 2)
    fw = _forward(q, k, v, keep=keep, keep_scale=r)
    f = _loss(fw, dout, dlse)
    want = _backward(fw, q, k, v, dout, dlse, keep=keep, keep_scale=r, rescale_dp=rescale_dp)
    return [
        _agree(
            r"$\partial F / \partial V = (P^d)^T dO$",
            _grad(f, v),
            want.dv,
            shown=(r"\frac{\partial F}{\partial V}", r"(P \odot \kappa\, r)^T dO"),
        ),
        _agree(
            r"$\partial F / \partial Q = \tau\, dZ\, K$ with $dP = (dO\, V^T) \odot \kappa\, r$",
            _grad(f, q),
            want.dq,
            shown=(
                r"\frac{\partial F}{\partial Q}",
                r"\tau\, \bigl(P \odot (dP - D + d\ell)\bigr) K,\quad"
                r" dP = (dO\, V^T) \odot \kappa\, r",
            ),
        ),
        _agree(r"$\partial F / \partial K = \tau\, dZ^T Q$", _grad(f, k), want.dk, key=False),
        _agree(
            r"$D_i = \sum_c dO_{ic} O_{ic} = \sum_j P_{ij}\, dP_{ij}$, with dropout",
            want.d,
            [sum((fw.weights[i, j] * want.dp[i, j] for j in range(2)), S.Zero) for i in range(2)],
            shown=(r"\sum_c dO_{ic} O_{ic}", r"\sum_j P_{ij}\, dP_{ij}"),
        ),
    ]


def _gqa_gradient(group: Callable[[int, int, int], int] | None = None) -> list[Step]:
    kv_heads, groups = 2, 2
    if group is None:

        def group(head: int, size: int, kv: int) -> int:
            return head // size  # the definition: query head h reads kv head h // G

    heads = kv_heads * groups
    ks = [_matrix(f"k{g}", 2, 1) for g in range(kv_heads)]
    vs = [_matrix(f"v{g}", 2, 1) for g in range(kv_heads)]
    # The repeated (MHA) problem: every query head has its own copy of K and V.
    ks_rep = [_matrix(f"K{h}", 2, 1) for h in range(heads)]
    vs_rep = [_matrix(f"V{h}", 2, 1) for h in range(heads)]
    qs = [_matrix(f"q{h}", 1, 1) for h in range(heads)]
    douts, dlses = (
        [_matrix(f"dO{h}", 1, 1) for h in range(heads)],
        [_vector(f"dl{h}", 1) for h in range(heads)],
    )

    def loss(kk: list[Matrix], vv: list[Matrix], read: Callable[[int], int]) -> sympy.Expr:
        return sum(
            (
                _loss(_forward(qs[h], kk[read(h)], vv[read(h)]), douts[h], dlses[h])
                for h in range(heads)
            ),
            S.Zero,
        )

    gqa = loss(ks, vs, lambda h: h // groups)
    rep = loss(ks_rep, vs_rep, lambda h: h)
    repeat = {
        x: y
        for h in range(heads)
        for mats in ((ks_rep[h], ks[h // groups]), (vs_rep[h], vs[h // groups]))
        for x, y in zip(*mats, strict=True)
    }
    steps: list[Step] = []
    for name, own, copies in (("K", ks, ks_rep), ("V", vs, vs_rep)):
        for g in range(kv_heads):
            members = [h for h in range(heads) if group(h, groups, kv_heads) == g]
            summed = sum(
                (_grad(rep, copies[h]).xreplace(repeat) for h in members), Matrix.zeros(2, 1)
            )
            steps.append(
                _agree(
                    f"$d{name}$ of kv head {g} is the sum over query heads {members}",
                    _grad(gqa, own[g]),
                    summed,
                    shown=(
                        rf"\frac{{\partial F}}{{\partial {name}_{{{g}}}}}",
                        rf"\sum_{{h = {g * groups}}}^{{{g * groups + groups - 1}}}"
                        rf" \frac{{\partial F^{{\mathrm{{MHA}}}}}}{{\partial \tilde {name}_h}}",
                    ),
                    key=(name, g) == ("K", 1),
                )
            )
    return steps


# --- structure ----------------------------------------------------------------------------


def _dz_rows_sum(with_sink: bool = True) -> list[Step]:
    dp, c = IndexedBase("dP", real=True), symbols("c", real=True)
    d = symbols("D", real=True)  # D does not depend on j: a constant of the sum over j
    z_sink = _Z() + exp(_sigma)

    def weight(idx: Any) -> sympy.Expr:
        return exp(_s[idx]) / z_sink

    p_sink = exp(_sigma) / z_sink
    total = Sum(weight(_i) * dp[_i], (_i, 1, _n))  # D = sum_i p_i dP_i (sdpa-closed-form)
    dz = weight(_j) * (dp[_j] - d + _dlse)
    dsink = -p_sink * (d - _dlse) if with_sink else S.Zero
    summed = Sum(weight(_j) * dp[_j], (_j, 1, _n)) - (d - _dlse) * _Z() / z_sink
    g = symbols("g", real=True)
    moved = Sum(exp(_s[_l] + c) * _v[_l], (_l, 1, _n)) / (
        Sum(exp(_s[_l] + c), (_l, 1, _n)) + exp(_sigma + c)
    )
    moved_lse = log(Sum(exp(_s[_l] + c), (_l, 1, _n)) + exp(_sigma + c))
    return [
        equal(
            r"$\sum_j dZ_j = \sum_j p_j\, dP_j - (D - d\ell) \sum_j p_j$",
            Sum(dz, (_j, 1, _n)),
            summed,
            key=False,
        ),
        equal(
            r"$\sum_j dZ_j + d\sigma = d\ell$ with $D = \sum_i p_i\, dP_i$",
            (summed + dsink).subs(d, total),
            _dlse,
            shown=(r"\sum_j dZ_j + d\sigma", _dlse),
        ),
        equal(
            r"the reason: moving every logit and $\sigma$ by $c$ leaves $o$ and moves"
            r" $\ell$ by $c$, so $\frac{d}{dc} (g\, o + d\ell\, \ell) = d\ell$",
            diff(g * moved + _dlse * moved_lse, c).doit(),
            _dlse,
            key=False,
        ),
    ]


def _hidden_zero() -> list[Step]:
    # Row 0 sees no key, row 1 sees key 0, row 2 sees keys 0 and 1; key 2 is hidden from all.
    def seen(i: int, j: int) -> bool:
        return j < i

    q, k, v = _matrix("q", 3, 1), _matrix("k", 3, 1), _matrix("v", 3, 1)
    bias = _matrix("b", 3, 3)
    dout, dlse = _matrix("dO", 3, 1), _vector(r"d\ell", 3)
    fw = _forward(q, k, v, bias=bias, seen=seen)
    f = _loss(fw, dout, dlse)
    want = _backward(fw, q, k, v, dout, dlse)
    hidden = [(i, j) for i in range(3) for j in range(3) if not seen(i, j)]
    # The same problem without row 0: rows 1, 2 see keys j < i, i.e. j <= i' for i' = i - 1.
    rest = _forward(q[1:, :], k, v, bias=bias[1:, :], seen=lambda i, j: j <= i)
    f_rest = _loss(rest, dout[1:, :], dlse[1:])
    return [
        _agree(
            "a key hidden from every query: its $k$ and $v$ get 0",
            [diff(f, k[2, 0]), diff(f, v[2, 0])],
            [0, 0],
            shown=(r"\frac{\partial F}{\partial k_2} = \frac{\partial F}{\partial v_2}", 0),
        ),
        _agree(
            "the bias at every hidden position gets 0",
            [diff(f, bias[i, j]) for i, j in hidden],
            [0] * len(hidden),
            shown=(r"\frac{\partial F}{\partial b_{ij}}\ (j \notin \mathcal{V}_i)", 0),
        ),
        _agree(
            "a row with nothing visible: $dq_0 = 0$",
            [diff(f, q[0, 0])],
            [0],
            shown=(r"\frac{\partial F}{\partial q_0}", 0),
        ),
        _agree(
            "and it contributes nothing to $dK$, $dV$: the gradients without row 0",
            [*_grad(f, k), *_grad(f, v)],
            [*_grad(f_rest, k), *_grad(f_rest, v)],
            key=False,
        ),
        _agree(
            r"the closed forms give the same ($P_{ij} = 0$ at hidden keys)",
            [*_grad(f, q), *_grad(f, k), *_grad(f, v), *_grad(f, bias)],
            [*want.dq, *want.dk, *want.dv, *want.dz],
            key=False,
        ),
    ]


def _key_shift(with_dlse: bool = False) -> list[Step]:
    q, k, v = _matrix("q", 2, 2), _matrix("k", 2, 2), _matrix("v", 2, 1)
    u = _matrix("u", 1, 2)
    dout, dlse = _matrix("dO", 2, 1), _vector(r"d\ell", 2)
    moved_k = k + Matrix.vstack(u, u)  # K + 1 u^T

    def loss(keys: Matrix, lam: Sequence[Any] | None) -> sympy.Expr:
        return _loss(_forward(q, keys, v), dout, lam)

    lam = dlse if with_dlse else None
    plain, moved = loss(k, lam), loss(moved_k, lam)
    fw = _forward(q, k, v)
    ds = _backward(fw, q, k, v, dout, None).ds
    with_lse = loss(moved_k, dlse)
    return [
        _agree(
            r"$dQ$ with $K + \mathbf{1} u^T$ ($d\ell = 0$)",
            _grad(moved, q),
            _grad(plain, q),
            shown=(
                r"\frac{\partial F(Q, K + \mathbf{1} u^T, V)}{\partial Q}",
                r"\frac{\partial F(Q, K, V)}{\partial Q}",
            ),
        ),
        _agree(
            r"$dK$ with $K + \mathbf{1} u^T$ ($d\ell = 0$)",
            _grad(moved, k),
            _grad(plain, k),
            shown=(
                r"\frac{\partial F(Q, K + \mathbf{1} u^T, V)}{\partial K}",
                r"\frac{\partial F(Q, K, V)}{\partial K}",
            ),
        ),
        _agree(r"and $dV$", _grad(moved, v), _grad(plain, v), key=False),
        _agree(
            r"because $dS\, \mathbf{1} = 0$: $dQ$ moves by $\tau\, (dS\, \mathbf{1})\, u^T$",
            [ds[i, 0] + ds[i, 1] for i in range(2)],
            [0, 0],
            key=False,
        ),
        _agree(
            r"with $d\ell \ne 0$ the rows of $dS$ sum to $d\ell_i$: $dQ$ moves by"
            r" $\tau\, d\ell\, u^T$",
            _grad(with_lse, q) - _grad(loss(k, dlse), q),
            Matrix(2, 2, lambda i, e: _tau * dlse[i] * u[0, e]),
            key=False,
        ),
    ]


def _permutations() -> list[Step]:
    q, k, v = _matrix("q", 2, 1), _matrix("k", 3, 1), _matrix("v", 3, 1)
    dout, dlse = _matrix("dO", 2, 1), _vector(r"d\ell", 2)
    f = _loss(_forward(q, k, v), dout, dlse)
    dq, dk, dv = _grad(f, q), _grad(f, k), _grad(f, v)
    steps: list[Step] = []
    # Queries (with their dO rows and dl entries) swapped: dQ's rows swap, dK, dV stay.
    swap = {q[0, 0]: q[1, 0], q[1, 0]: q[0, 0], dout[0, 0]: dout[1, 0], dout[1, 0]: dout[0, 0]}
    swap |= {dlse[0]: dlse[1], dlse[1]: dlse[0]}
    steps.append(
        _agree(
            r"queries permuted: $dQ$ permuted, $dK$, $dV$ unchanged",
            [*dq.xreplace(swap), *dk.xreplace(swap), *dv.xreplace(swap)],
            [dq[1, 0], dq[0, 0], *dk, *dv],
            shown=(
                r"\nabla_{\Pi Q, K, V} F(\Pi Q, K, V; \Pi\, dO, \Pi\, d\ell)",
                r"(\Pi\, dQ, dK, dV)",
            ),
        )
    )
    for perm in permutations(range(3)):
        move = {k[r, 0]: k[perm[r], 0] for r in range(3)} | {
            v[r, 0]: v[perm[r], 0] for r in range(3)
        }
        steps.append(
            _agree(
                f"keys and values permuted by {perm}: $dK$, $dV$ rows permuted, $dQ$ unchanged",
                [*dq.xreplace(move), *dk.xreplace(move), *dv.xreplace(move)],
                [*dq, *(dk[perm[r], 0] for r in range(3)), *(dv[perm[r], 0] for r in range(3))],
                shown=(
                    r"\nabla_{Q, \Sigma K, \Sigma V} F(Q, \Sigma K, \Sigma V)",
                    r"(dQ, \Sigma\, dK, \Sigma\, dV)",
                )
                if perm == (2, 0, 1)
                else None,
                key=perm == (2, 0, 1),
            )
        )
    return steps


def _lse_weights() -> list[Step]:
    z_sink = _Z() + exp(_sigma)
    lse = log(z_sink)
    logits = _matrix("z", 2, 3)
    v = _matrix("v", 3, 1)

    def seen(i: int, j: int) -> bool:
        return j <= i  # row 0 sees key 0, row 1 keys 0 and 1; key 2 is hidden

    _, lse_rows = _attend(logits, v, seen)
    weights = Matrix(
        2, 3, lambda i, j: exp(logits[i, j]) * exp(-lse_rows[i]) if seen(i, j) else S.Zero
    )
    return [
        equal(
            r"with a sink, general $n$: $\partial \ell / \partial s_j = p_j$",
            _in_range(diff(lse, _s[_j]).doit()),
            exp(_s[_j]) * exp(-lse),
            shown=(sympy.Derivative(lse, _s[_j]), r"e^{s_j - \ell}"),
        ),
        equal(
            r"$\partial \ell / \partial \sigma = p_\sigma$",
            diff(lse, _sigma),
            exp(_sigma) * exp(-lse),
            shown=(sympy.Derivative(lse, _sigma), r"e^{\sigma - \ell}"),
        ),
        _agree(
            r"a head with a hidden key: $\partial \ell_i / \partial z_{ij} = P_{ij}$,"
            r" 0 where hidden",
            Matrix(2, 3, lambda i, j: diff(lse_rows[i], logits[i, j])),
            weights,
            key=False,
        ),
        _agree(
            r"and $\partial \ell_i / \partial z_{i'j} = 0$ for another row $i'$",
            [diff(lse_rows[0], logits[1, j]) for j in range(3)],
            [0, 0, 0],
            key=False,
        ),
    ]


def _central_difference(two_sided: bool = True) -> list[Step]:
    f = Function("f")
    x = symbols("x", real=True)
    h = symbols("h", positive=True)
    quotient = (f(x + h) - f(x - h)) / (2 * h) if two_sided else (f(x + h) - f(x)) / h
    series = quotient.series(h, 0, 4).doit()
    d1, d3 = sympy.Derivative(f(x), x), sympy.Derivative(f(x), (x, 3))
    richardson = (4 * quotient.subs(h, h / 2) - quotient) / 3  # D(h) and D(h/2) combined
    extrapolated = richardson.series(h, 0, 6).doit()
    d5 = sympy.Derivative(f(x), (x, 5))
    one_sided = ((f(x + h) - f(x)) / h).series(h, 0, 2).doit()
    big_m, eps = symbols("M epsilon", positive=True)
    total = h**2 * big_m / 6 + eps / h  # truncation + rounding: each f within eps
    best = solveset(diff(total, h), h, Interval.open(0, oo))
    return [
        equal(
            r"the series of the quotient to $O(h^4)$",
            series.removeO(),
            d1 + h**2 * d3 / 6,
            shown=(quotient, d1 + h**2 * d3 / 6 + O(h**4)),
        ),
        holds(
            r"the remainder is $O(h^4)$",
            sympy.Eq(series.getO(), O(h**4), evaluate=False),
            series.getO() == O(h**4),
            key=False,
        ),
        equal(
            r"Richardson: $(4 D(h/2) - D(h)) / 3 = f'(x) - h^4 f^{(5)}(x) / 480 + O(h^6)$",
            extrapolated.removeO(),
            d1 - h**4 * d5 / 480,
            shown=(r"\frac{4 D(h/2) - D(h)}{3}", d1 - h**4 * d5 / 480 + O(h**6)),
        ),
        equal(
            r"one-sided, only first order: $(f(x + h) - f(x)) / h = f'(x) + h f''(x) / 2"
            r" + O(h^2)$",
            one_sided.removeO(),
            d1 + h * sympy.Derivative(f(x), (x, 2)) / 2,
            key=False,
        ),
        equal(
            r"for $f = \exp$: $(e^{x+h} - e^{x-h}) / 2h = e^x (1 + h^2/6 + h^4/120 + \dots)$",
            ((exp(x + h) - exp(x - h)) / (2 * h)).series(h, 0, 6).removeO(),
            exp(x) * (1 + h**2 / 6 + h**4 / 120),
            key=False,
        ),
        holds(
            r"with each $f$ within $\epsilon$ and $|f'''| \le M$, the bound"
            r" $h^2 M / 6 + \epsilon / h$ is least at $h = (3 \epsilon / M)^{1/3}$",
            sympy.Eq(
                sympy.Symbol("h^*"), (3 * eps / big_m) ** sympy.Rational(1, 3), evaluate=False
            ),
            best == sympy.FiniteSet((3 * eps / big_m) ** sympy.Rational(1, 3)),
        ),
        equal(
            r"where it is $\tfrac{3^{2/3}}{2} M^{1/3} \epsilon^{2/3}$",
            total.subs(h, (3 * eps / big_m) ** sympy.Rational(1, 3)),
            3 ** sympy.Rational(2, 3)
            / 2
            * big_m ** sympy.Rational(1, 3)
            * eps ** sympy.Rational(2, 3),
            key=False,
        ),
    ]


# --- the claims, in reading order ------------------------------------------------------------

_DAO = (
    "T. Dao, D. Y. Fu, S. Ermon, A. Rudra, C. Re, *FlashAttention: fast and memory-efficient"
    " exact attention with IO-awareness*, NeurIPS 2022,"
    " [arXiv:2205.14135](https://arxiv.org/abs/2205.14135) (appendix B.2, the backward pass)"
)
_DAO2 = (
    "T. Dao, *FlashAttention-2: faster attention with better parallelism and work"
    " partitioning*, ICLR 2024, [arXiv:2307.08691](https://arxiv.org/abs/2307.08691)"
)
_GRIEWANK = (
    "A. Griewank, A. Walther, *Evaluating derivatives: principles and techniques of"
    " algorithmic differentiation*, 2nd ed., SIAM, 2008,"
    " [doi:10.1137/1.9780898717761](https://doi.org/10.1137/1.9780898717761)"
)
_AINSLIE = (
    "J. Ainslie, J. Lee-Thorp, M. de Jong, Y. Zemlyanskiy, F. Lebron, S. Sanghai, *GQA:"
    " training generalized multi-query transformer models from multi-head checkpoints*,"
    " EMNLP 2023, [arXiv:2305.13245](https://arxiv.org/abs/2305.13245)"
)
_XIAO = (
    "G. Xiao, Y. Tian, B. Chen, S. Han, M. Lewis, *Efficient streaming language models with"
    " attention sinks*, ICLR 2024, [arXiv:2309.17453](https://arxiv.org/abs/2309.17453)"
)
_GEMMA2 = (
    "Gemma Team, *Gemma 2: improving open language models at a practical size*, 2024,"
    " [arXiv:2408.00118](https://arxiv.org/abs/2408.00118) (logit soft-capping)"
)
_SRIVASTAVA = (
    "N. Srivastava, G. Hinton, A. Krizhevsky, I. Sutskever, R. Salakhutdinov, *Dropout: a"
    " simple way to prevent neural networks from overfitting*, JMLR 15(56):1929-1958, 2014,"
    " [jmlr.org/papers/v15/srivastava14a](https://jmlr.org/papers/v15/srivastava14a.html)"
)
_NOCEDAL = (
    "J. Nocedal, S. J. Wright, *Numerical optimization*, 2nd ed., Springer, 2006,"
    " [doi:10.1007/978-0-387-40065-5](https://doi.org/10.1007/978-0-387-40065-5)"
    " (sec. 8.1, finite-difference derivative approximations)"
)

_EXPLICIT = (
    "explicit symbolic matrices, {sizes}: SymPy differentiates the indexed form of one row"
    " (a Sum over keys of exponentials of a Sum over E) but does not simplify the nested"
    " sums that result to the closed form, so each entry is checked on matrices of symbols,"
    " as a rational function of the exponentials"
)

CLAIMS: tuple[Claim, ...] = (
    Claim(
        topic=TOPIC,
        name="softmax-vjp",
        title="The softmax vjp and jvp",
        statement=(
            r"\sum_i g_i \frac{\partial p_i}{\partial s_j} = p_j \Bigl(g_j - \sum_i g_i p_i\Bigr),"
            r"\qquad \sum_j \frac{\partial p_i}{\partial s_j}\, t_j"
            r" = p_i \Bigl(t_i - \sum_j p_j t_j\Bigr)"
        ),
        method="symbolic, general n (SymPy differentiates the indexed Sum and sums the deltas)",
        explanation=(
            "The backward pass of softmax is $J^T g$, computed without forming the $n \\times n$"
            " Jacobian: one inner product $p^T g$ and an elementwise product. It builds on the"
            " softmax page's [Jacobian](softmax.md#jacobian) $J = \\operatorname{diag}(p) - p p^T$:"
            " $J$ is symmetric, so the jvp $J t$ has the same formula. Both are 0 where $p_j = 0$"
            " and unchanged when a constant is added to $g$ ($J \\mathbf{1} = 0$)."
        ),
        derivation=_softmax_vjp,
        references=(_GRIEWANK,),
    ),
    Claim(
        topic=TOPIC,
        name="log-softmax-and-lse-vjp",
        title="The vjp of log_softmax and of logsumexp",
        statement=(
            r"\sum_i g_i \frac{\partial \log p_i}{\partial s_j} = g_j - p_j \sum_i g_i,"
            r"\qquad g\, \frac{\partial \operatorname{LSE}(s)}{\partial s_j} = g\, p_j"
        ),
        method="symbolic, general n",
        explanation=(
            "From the softmax page's [derivative of log_softmax](softmax.md#log-softmax-derivative)"
            " $\\delta_{ij} - p_j$ and [gradient of LSE](softmax.md#grad-lse) $p$, summed against"
            " the upstream gradient. Neither divides by $p$, so neither needs $p_j > 0$: an entry"
            " whose weight underflows to 0 still gets $g_j$ from log_softmax."
        ),
        derivation=_log_softmax_vjp,
    ),
    Claim(
        topic=TOPIC,
        name="output-gradients-one-row",
        title="One row: the gradients of the output by the values and the logits",
        statement=(
            r"\frac{\partial o}{\partial v_j} = p_j,\qquad"
            r" \frac{\partial o}{\partial s_j} = p_j (v_j - o),\qquad"
            r" \sum_c dO_c \frac{\partial o_c}{\partial s_j} = p_j (dP_j - D),"
            r"\ dP_j = \sum_c dO_c V_{jc},\ D = \sum_c dO_c\, o_c"
        ),
        method="symbolic, general n and general width $E_v$ (each column differentiated alone)",
        explanation=(
            "For one query, $o = \\sum_l p_l v_l$ with $p = \\operatorname{softmax}(s)$. Moving"
            " logit $s_j$ moves the output towards $v_j$ in proportion to $p_j$. Summed over the"
            " columns against $dO$ this is row $i$ of $dS = P \\odot (dP - D)$: $D$ is one number"
            " per row, the inner product of the upstream gradient with the output."
        ),
        derivation=_one_row,
        references=(_DAO,),
    ),
    Claim(
        topic=TOPIC,
        name="sdpa-closed-form",
        title="The closed form of the attention backward",
        statement=(
            r"F = \sum dO \odot O + \sum_i d\ell_i \ell_i:\quad"
            r" \frac{\partial F}{\partial Q} = \tau\, dS\, K,\quad"
            r" \frac{\partial F}{\partial K} = \tau\, dS^T Q,\quad"
            r" \frac{\partial F}{\partial V} = P^T dO,\quad"
            r" dS = P \odot (dO\, V^T - D + d\ell),\ D_i = \sum_c dO_{ic} O_{ic}"
        ),
        method=_EXPLICIT.format(
            sizes="L = 2, S = 3, E = 2, E_v = 2 (sizes that differ, so a"
            " transposed factor cannot fit)"
        ),
        explanation=(
            "$F$ is the loss to first order: for any loss $\\mathcal{L}(O, \\ell)$ with"
            " $dO = \\partial \\mathcal{L} / \\partial O$ and $d\\ell = \\partial \\mathcal{L} /"
            " \\partial \\ell$, the chain rule gives $\\nabla \\mathcal{L} = \\nabla F$. The lse"
            " output adds $P \\odot d\\ell$ to $dS$"
            " ([lse-gradient-is-weights](#lse-gradient-is-weights))."
            " $D_i = \\sum_j P_{ij}\\, dP_{ij}$ is computed as $\\sum_c dO_{ic} O_{ic}$, $E_v$"
            " products instead of $S$, which is how FlashAttention's backward forms it"
            " (Dao et al. 2022, appendix B.2); in floating point the two may differ, and the"
            " reference takes $O$ as the forward computed it."
        ),
        derivation=_sdpa_closed_form,
        references=(_DAO, _DAO2),
    ),
    Claim(
        topic=TOPIC,
        name="softcap-gradient",
        title="Softcap: the chain factor 1 - (t/c)^2",
        statement=(
            r"t = c \tanh(s/c):\quad \frac{dt}{ds} = 1 - \tanh^2(s/c) = 1 - (t/c)^2,\qquad"
            r" dS_{ij} = dZ_{ij} \bigl(1 - (t_{ij}/c)^2\bigr)"
        ),
        method=_EXPLICIT.format(sizes="L = S = 2, E = E_v = 1")
        + "; the scalar chain factor symbolically",
        explanation=(
            "The gradient of the logits passes the cap multiplied by its slope, which can be"
            " written with the capped logit $t$ alone, so a kernel need not keep $s$. The factor"
            " lies in $[0, 1]$ (at most 1 here; the slope $1/\\cosh^2(s/c) \\ge 0$ on the"
            " attention page, [softcap-range](attention.md#softcap-range)) and tends to 0 as"
            " $|t| \\to c$: a saturated cap passes almost no gradient."
        ),
        derivation=_softcap_gradient,
        references=(_GEMMA2,),
    ),
    Claim(
        topic=TOPIC,
        name="bias-gradient",
        title="The bias gets the gradient of the final logits",
        statement=(
            r"z_{ij} = t_{ij} + b_{ij} - m|i + o - j|:\quad"
            r" \frac{\partial F}{\partial b_{ij}} = dZ_{ij} = P_{ij}(dP_{ij} - D_i + d\ell_i),"
            r"\qquad b_{ij} = \beta_j \implies \frac{\partial F}{\partial \beta_j} = \sum_i dZ_{ij}"
        ),
        method=_EXPLICIT.format(sizes="L = S = 2, E = E_v = 1, with a softcap and an ALiBi slope"),
        explanation=(
            "The bias enters the logits with coefficient 1, so its gradient is $dZ$, before the"
            " softcap's factor (the bias is added after the cap). ALiBi slopes, the mask,"
            " causal and window are constants: they change $P$ but get no gradient. A bias"
            " broadcast along an axis gets $dZ$ summed over that axis."
        ),
        derivation=_bias_gradient,
    ),
    Claim(
        topic=TOPIC,
        name="sink-gradient",
        title="The gradient of a sink logit",
        statement=(
            r"\frac{\partial F}{\partial \sigma_h} = \sum_i -P_{i,\sigma} (D_i - d\ell_i),"
            r"\qquad P_{i,\sigma} = e^{\sigma_h - \ell_i}"
        ),
        method=(
            "symbolic, general n for one row; explicit symbolic matrices (L = S = 2, E = 1,"
            " E_v = 2, a row that sees only the sink) for the sum over rows"
        ),
        explanation=(
            'The sink is a key with value 0: its "$dP$" is 0, so its entry of $dZ$ is'
            " $P_{i,\\sigma}(0 - D_i + d\\ell_i)$, summed over the queries of the head. A row"
            " that sees only the sink has $O_i = 0$, $D_i = 0$, $P_{i,\\sigma} = 1$ and"
            " contributes $d\\ell_i$."
        ),
        derivation=_sink_gradient,
        references=(_XIAO,),
    ),
    Claim(
        topic=TOPIC,
        name="dropout-gradient",
        title="Dropout: the keep-mask scales dP; D keeps its formula",
        statement=(
            r"O = (P \odot \kappa\, r) V:\quad dV = (P \odot \kappa\, r)^T dO,\quad"
            r" dP = (dO\, V^T) \odot \kappa\, r,\quad"
            r" \sum_c dO_{ic} O_{ic} = \sum_j P_{ij}\, dP_{ij}"
        ),
        method=_EXPLICIT.format(sizes="L = S = E_v = 2, E = 1, with symbolic keep-mask entries"),
        explanation=(
            "The keep-mask multiplies the weights after the softmax, so the gradient of the"
            " weights before dropout is that of the dropped weights times $\\kappa\\, r$, and"
            " $dZ = P \\odot (dP - D + d\\ell)$ holds with this $dP$. $D$ is still"
            " $\\sum_c dO_{ic} O_{ic}$ from the dropped output; $\\ell$ is taken before dropout."
            " The proof holds for any values of $\\kappa$, in particular 0 and 1."
        ),
        derivation=_dropout_gradient,
        references=(_SRIVASTAVA, _DAO),
    ),
    Claim(
        topic=TOPIC,
        name="gqa-gradient",
        title="Grouped-query attention: dK and dV are summed over each group",
        statement=(
            r"\frac{\partial F}{\partial K_g} = \sum_{h = Gg}^{Gg + G - 1}"
            r" \frac{\partial F^{\mathrm{MHA}}}{\partial \tilde K_h}\Big|_{\tilde K = "
            r"\operatorname{repeat}(K, G)},\quad \text{the same for } V"
        ),
        method=(
            "explicit symbolic matrices, H_kv = 2, G = 2, L = 1, S = 2, E = E_v = 1: a head is"
            " chosen by integer division, not an algebraic identity"
        ),
        explanation=(
            "GQA is multi-head attention with each kv head repeated $G$ times (attention page,"
            " [gqa-repeat](attention.md#gqa-repeat)); a repeated input's gradient is the sum of"
            " its copies' gradients. Summing the heads $h \\bmod H_{kv} = g$ instead, the tiled"
            " layout, is wrong whenever $G > 1$ and $H_{kv} > 1$."
        ),
        derivation=_gqa_gradient,
        references=(_AINSLIE,),
    ),
    Claim(
        topic=TOPIC,
        name="dz-rows-sum",
        title="Each row of dZ, with the sink's share, sums to the lse gradient",
        statement=(
            r"\sum_j dZ_{ij} + d\sigma_i = d\ell_i,\qquad"
            r" d\sigma_i = -P_{i,\sigma}(D_i - d\ell_i);\qquad"
            r" \text{no sink, } d\ell = 0:\ \sum_j dZ_{ij} = 0"
        ),
        method="symbolic, general n ($D$ is constant in $j$, then $D = \\sum_i p_i\\, dP_i$)",
        explanation=(
            "Adding $c$ to every logit of a row (and to the sink) leaves the output and moves"
            " the lse by $c$: the gradient along that direction is $d\\ell_i$. So without an lse"
            " gradient and a sink the rows of $dS$ sum to zero, which is why shifting every key"
            " changes no gradient ([key-shift-gradients](#key-shift-gradients)); a test may check"
            " it on any implementation's $dZ$ (its $d\\text{bias}$)."
        ),
        derivation=_dz_rows_sum,
    ),
    Claim(
        topic=TOPIC,
        name="hidden-zero-gradient",
        title="Hidden positions and empty rows get gradient exactly 0",
        statement=(
            r"j \notin \bigcup_i \mathcal{V}_i \implies dk_j = dv_j = 0;\quad"
            r" j \notin \mathcal{V}_i \implies db_{ij} = 0;\quad"
            r" \mathcal{V}_i = \emptyset,\ \text{no sink} \implies dq_i = 0"
        ),
        method=(
            "explicit symbolic matrices, L = S = 3, E = E_v = 1, key $j$ visible to query $i$"
            " when $j < i$ (row 0 sees nothing, key 2 no query): visibility is a condition on"
            " integer positions, not an algebraic identity"
        ),
        explanation=(
            "What sits at a hidden position is not read by the forward, so it has no gradient:"
            " exactly 0, not a small number. A key hidden from some queries only gets the"
            " gradient of the queries that see it. An empty row has output 0 and lse $-\\infty$"
            " whatever its query, so its $dO$ and $d\\ell$ reach nothing. The closed forms"
            " agree, since $P_{ij} = 0$ at hidden keys."
        ),
        derivation=_hidden_zero,
    ),
    Claim(
        topic=TOPIC,
        name="key-shift-gradients",
        title="Adding one vector to every key leaves dQ and dK unchanged",
        statement=(
            r"d\ell = 0,\ \text{no sink}:\quad \nabla_Q F(Q, K + \mathbf{1} u^T, V) ="
            r" \nabla_Q F(Q, K, V),\quad \nabla_K \text{ and } \nabla_V \text{ likewise}"
        ),
        method=_EXPLICIT.format(sizes="L = S = E = 2, E_v = 1"),
        explanation=(
            "The forward ignores the shift (attention page,"
            " [key-shift-invariance](attention.md#key-shift-invariance)), so $P$ and $dS$ do not"
            " move, and $dQ = \\tau\\, dS (K + \\mathbf{1} u^T) = \\tau\\, dS\\, K$ because"
            " $dS\\, \\mathbf{1} = 0$ ([dz-rows-sum](#dz-rows-sum)). With an lse gradient the"
            " rows of $dS$ sum to $d\\ell_i$ and $dQ$ moves by $\\tau\\, d\\ell\\, u^T$, as the"
            " lse itself moves."
        ),
        derivation=_key_shift,
    ),
    Claim(
        topic=TOPIC,
        name="permutation-gradients",
        title="Permuting queries, or keys with values, permutes the gradients",
        statement=(
            r"\nabla F(\Pi Q, K, V; \Pi\, dO, \Pi\, d\ell) = (\Pi\, dQ, dK, dV),\qquad"
            r" \nabla F(Q, \Sigma K, \Sigma V) = (dQ, \Sigma\, dK, \Sigma\, dV)"
        ),
        method=(
            "explicit symbolic matrices, L = 2, S = 3, E = E_v = 1, both query orders and all"
            " 3! key orders: SymPy cannot reindex a Sum by an arbitrary bijection"
        ),
        explanation=(
            "The gradients inherit the forward's symmetries (attention page,"
            " [query-permutation-equivariance](attention.md#query-permutation-equivariance) and"
            " [key-value-permutation-invariance](attention.md#key-value-permutation-invariance)):"
            " the upstream $dO$ and $d\\ell$ move with the queries; anything positional (causal,"
            " window, ALiBi, a bias) must be permuted too."
        ),
        derivation=_permutations,
    ),
    Claim(
        topic=TOPIC,
        name="lse-gradient-is-weights",
        title="The gradient of the lse output is the weights",
        statement=(
            r"\frac{\partial \ell_i}{\partial z_{ij}} = P_{ij}\ (0 \text{ where hidden}),"
            r"\qquad \frac{\partial \ell_i}{\partial \sigma_h} = P_{i,\sigma}"
        ),
        method=(
            "symbolic, general n with a sink; explicit symbolic logits (L = 2, S = 3, one"
            " hidden key) for the visibility"
        ),
        explanation=(
            "The softmax page's [gradient of LSE](softmax.md#grad-lse), for the attention lse:"
            " with a sink in the normaliser and hidden keys left out. It is why an lse gradient"
            " enters $dZ$ as $P \\odot d\\ell$."
        ),
        derivation=_lse_weights,
    ),
    Claim(
        topic=TOPIC,
        name="central-difference-error",
        title="The error of a central-difference check",
        statement=(
            r"D(h) = \frac{f(x + h) - f(x - h)}{2h} = f'(x) + \frac{h^2}{6} f'''(x) + O(h^4),"
            r"\quad \frac{4 D(h/2) - D(h)}{3} = f'(x) + O(h^4),\quad"
            r" \frac{h^2 M}{6} + \frac{\epsilon}{h} \text{ least at } h = (3\epsilon / M)^{1/3}:"
            r" \tfrac{3^{2/3}}{2} M^{1/3} \epsilon^{2/3}"
        ),
        method="symbolic (SymPy's series of an undefined function; solveset for the step)",
        explanation=(
            "A gradient test compares the closed form with finite differences of the forward."
            " The central quotient is exact to second order; a one-sided quotient only to"
            " first ($h f''/2$). Combining two steps (Richardson) cancels the $h^2$ term. With"
            " each evaluation of $f$ within $\\epsilon$ (its rounding)"
            " the quotient is further off by up to $\\epsilon / h$, so the total is"
            " $h^2 M/6 + \\epsilon/h$ with $M \\ge |f'''|$ near $x$, least at"
            " $h = (3\\epsilon/M)^{1/3}$, where it is still of order $\\epsilon^{2/3}$: a check"
            " that differences a float64 forward keeps about two thirds of its digits."
        ),
        derivation=_central_difference,
        references=(_NOCEDAL,),
    ),
)
