r"""Claims about the online softmax and merging partial results, each proved by SymPy.

Notation (the states of :mod:`attnspec.reference.online`). For a set of keys with logits
:math:`s_j` and values :math:`v_j` (one column: the columns never mix), the state is
:math:`(m, l, \mathit{acc})` with :math:`l = \sum_j e^{s_j - m}` and
:math:`\mathit{acc} = \sum_j e^{s_j - m} v_j` for a reference point :math:`m` (the running
maximum); it stands for the sums of the definition,

.. math::

    \varphi(m, l, \mathit{acc}) = (Z, N) = (l\, e^{m},\ \mathit{acc}\, e^{m}),

and finalises to :math:`o = \mathit{acc}/l = N/Z` and :math:`\ell = m + \log l = \log Z`.
A normalised partial :math:`(o, \ell)` stands for :math:`(e^{\ell}, e^{\ell} o)`. The
merge of two states uses :math:`m = \max(m_A, m_B)`; most claims hold for any reference
point :math:`c` in place of the maximum (the maximum only keeps the factors
:math:`e^{m_X - c} \le 1` from overflowing), and are proved for a general symbol
:math:`c`, which avoids ``Max`` in SymPy's simplification.

The merge claim for two blocks of general sizes is ``split-kv-merge`` of the attention
topic (:mod:`attnspec.spec.derivations.attention`); the claims here build on it: the
state form, any number of blocks, any partition and any merge order, the guards, the
sink and the rounding error of one merge.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from itertools import product
from typing import Any

import sympy
from sympy import (
    IndexedBase,
    Interval,
    Max,
    S,
    Sum,
    diff,
    exp,
    expand_log,
    log,
    oo,
    symbols,
)
from sympy.calculus.util import function_range

from attnspec.spec.derivations.claim import Claim, ClaimFailed, Step, equal, holds, limit

__all__ = ["CLAIMS"]

TOPIC = "online"

_s = IndexedBase("s", real=True)
_v = IndexedBase("v", real=True)
_l = symbols("l", integer=True, positive=True)
_n, _n1, _n2, _n3 = symbols("n n_1 n_2 n_3", integer=True, positive=True)
_ma, _mb, _mc, _c = symbols("m_A m_B m_C c", real=True)
_la, _lb, _lc = symbols("l_A l_B l_C", positive=True)
_aa, _ab, _ac = symbols(r"\mathit{acc}_A \mathit{acc}_B \mathit{acc}_C", real=True)

State = tuple[Any, Any, Any]  # (m, l, acc)
Merge = Callable[[State, State, Any], State]


def _merge(a: State, b: State, ref: Any = None) -> State:
    r"""The merge of two states at the reference point ``ref`` (default: the maximum)."""
    m = Max(a[0], b[0]) if ref is None else ref
    fa, fb = exp(a[0] - m), exp(b[0] - m)
    return m, fa * a[1] + fb * b[1], fa * a[2] + fb * b[2]


def _merge_unscaled(a: State, b: State, ref: Any = None) -> State:
    """A wrong merge: the sums added without the factors e^{m_X - m}."""
    m = Max(a[0], b[0]) if ref is None else ref
    return m, a[1] + b[1], a[2] + b[2]


def _phi(state: State) -> tuple[Any, Any]:
    r""":math:`\varphi`: the sums :math:`(Z, N)` a state stands for."""
    return state[1] * exp(state[0]), state[2] * exp(state[0])


def _equal_all(
    label: str,
    lhs: Sequence[Any],
    rhs: Sequence[Any],
    *,
    simplify: Callable[[Any], Any] | None = None,
    shown: tuple[Any, Any] | None = None,
    key: bool = True,
) -> Step:
    """Each ``lhs[i] == rhs[i]`` by :func:`equal`'s rule (or ``simplify``); one step."""
    if len(lhs) != len(rhs):
        raise ClaimFailed(f"{label}: {len(lhs)} left-hand sides, {len(rhs)} right-hand sides")
    for a, b in zip(lhs, rhs, strict=True):
        if simplify is None:
            equal(label, a, b)
        else:
            equal(label, a, b, simplify=simplify)
    left, right = (sympy.Matrix(lhs).T, sympy.Matrix(rhs).T) if shown is None else shown
    return Step(label, left, right, "=", key)


def _same_sums(label: str, a: State, b: State, key: bool = False) -> list[Step]:
    """``a`` and ``b`` stand for the same sums (both components), by :func:`equal`."""
    za, na = _phi(a)
    zb, nb = _phi(b)
    return [
        equal(
            label + " ($Z$)",
            sympy.powsimp(sympy.expand(za)),
            sympy.powsimp(sympy.expand(zb)),
            key=key,
        ),
        equal(
            label + " ($N$)",
            sympy.powsimp(sympy.expand(na)),
            sympy.powsimp(sympy.expand(nb)),
            key=False,
        ),
    ]


# --- the state and its rescaling ------------------------------------------------------


def _rescale(merge: Merge = _merge) -> list[Step]:
    m_old, m_new = symbols("m m'", real=True)
    l_old = symbols("l", positive=True)
    # the block: n keys with logits s_l, values v_l; its state at the new maximum m'
    block = Sum(exp(_s[_l] - m_new), (_l, 1, _n))
    block_acc = Sum(exp(_s[_l] - m_new) * _v[_l], (_l, 1, _n))
    new = merge((m_old, l_old, _aa), (m_new, block, block_acc), m_new)
    z_block = Sum(exp(_s[_l]), (_l, 1, _n))
    n_block = Sum(exp(_s[_l]) * _v[_l], (_l, 1, _n))
    d_prev = symbols("d_{j-1}", positive=True)
    x = symbols("x_j", real=True)
    m_prev, m_j = symbols("m_{j-1} m_j", real=True)
    z, acc, m = symbols("Z N m", positive=True)
    return [
        equal(
            r"rescaling to a new reference point is exact: $(e^{m - m'} l)\, e^{m'} = l\, e^m$",
            exp(m_old - m_new) * l_old * exp(m_new),
            l_old * exp(m_old),
            simplify=lambda e: sympy.simplify(sympy.powsimp(e)),
        ),
        equal(
            r"the update $l' = e^{m - m'} l + \sum_{j} e^{s_j - m'}$ stands for $Z + \sum_j"
            r" e^{s_j}$",
            sympy.expand(new[1] * exp(m_new)),
            l_old * exp(m_old) + z_block,
            simplify=lambda e: sympy.simplify(sympy.powsimp(sympy.expand(e))),
            shown=(r"l' e^{m'}", r"l e^{m} + \sum_{j} e^{s_j}"),
        ),
        equal(
            r"and $\mathit{acc}'$ for $N + \sum_j e^{s_j} v_j$",
            sympy.expand(new[2] * exp(m_new)),
            _aa * exp(m_old) + n_block,
            simplify=lambda e: sympy.simplify(sympy.powsimp(sympy.expand(e))),
            shown=(r"\mathit{acc}' e^{m'}", r"\mathit{acc}\, e^{m} + \sum_{j} e^{s_j} v_j"),
            key=False,
        ),
        equal(
            r"Milakov and Gimelshein's recurrence $d_j = d_{j-1} e^{m_{j-1} - m_j} +"
            r" e^{x_j - m_j}$ keeps $d_j e^{m_j} = d_{j-1} e^{m_{j-1}} + e^{x_j}$",
            (d_prev * exp(m_prev - m_j) + exp(x - m_j)) * exp(m_j),
            d_prev * exp(m_prev) + exp(x),
            simplify=lambda e: sympy.simplify(sympy.powsimp(sympy.expand(e))),
            key=False,
        ),
        _equal_all(
            r"finalising gives the definition: $\mathit{acc}/l = N/Z$, $m + \log l = \log Z$",
            [acc * exp(-m) / (z * exp(-m)), m + log(z * exp(-m))],
            [acc / z, log(z)],
            simplify=lambda e: sympy.simplify(expand_log(e, force=True)),
            shown=(
                r"\bigl(\tfrac{N e^{-m}}{Z e^{-m}},\ m + \log(Z e^{-m})\bigr)",
                r"\bigl(\tfrac{N}{Z},\ \log Z\bigr)",
            ),
            key=False,
        ),
    ]


# --- the merge is a commutative monoid ------------------------------------------------


def _monoid(merge: Merge = _merge) -> list[Step]:
    a, b, cc = (_ma, _la, _aa), (_mb, _lb, _ab), (_mc, _lc, _ac)
    left, right = merge(merge(a, b, None), cc, None), merge(a, merge(b, cc, None), None)
    ba = merge(b, a, None)
    ab = merge(a, b, None)
    empty = (-oo, S.Zero, S.Zero)
    with_empty = merge(a, empty, None)
    steps = [
        holds(
            r"the maxima: $\max(\max(m_A, m_B), m_C) = \max(m_A, \max(m_B, m_C))$,"
            r" $\max(m_A, m_B) = \max(m_B, m_A)$, $\max(m_A, -\infty) = m_A$",
            r"\max(\max(m_A, m_B), m_C) = \max(m_A, \max(m_B, m_C))",
            bool(left[0] == right[0] and ab[0] == ba[0] and with_empty[0] == _ma),
            key=False,
        ),
    ]
    steps += _same_sums(
        r"associative: $(A \oplus B) \oplus C = A \oplus (B \oplus C)$", left, right, key=True
    )
    steps.append(
        equal(
            r"associative, the state itself:"
            r" $l_{(A \oplus B) \oplus C} = l_{A \oplus (B \oplus C)}$",
            sympy.powsimp(sympy.expand(left[1])),
            sympy.powsimp(sympy.expand(right[1])),
            shown=(r"l_{(A \oplus B) \oplus C}", r"l_{A \oplus (B \oplus C)}"),
            key=False,
        )
    )
    steps += _same_sums(r"commutative: $A \oplus B = B \oplus A$", ab, ba)
    steps.append(
        equal(
            r"the empty state $(-\infty, 0, 0)$ is the identity: $l_{A \oplus \emptyset} = l_A$",
            with_empty[1],
            _la,
            shown=(r"e^{m_A - m_A} l_A + e^{-\infty - m_A} \cdot 0", "l_A"),
        )
    )
    steps.append(
        equal(
            r"and $\mathit{acc}_{A \oplus \emptyset} = \mathit{acc}_A$",
            with_empty[2],
            _aa,
            key=False,
        )
    )
    return steps


# --- any partition, any order --------------------------------------------------------


def _partial_merge(a: tuple[Any, Any], b: tuple[Any, Any]) -> tuple[Any, Any]:
    r"""merge_partials on :math:`(o, \ell)`: logaddexp and the lse-weighted sum."""
    ell = log(exp(a[1]) + exp(b[1]))
    return exp(a[1] - ell) * a[0] + exp(b[1] - ell) * b[0], ell


def _average_merge(a: tuple[Any, Any], b: tuple[Any, Any]) -> tuple[Any, Any]:
    """A wrong merge: the outputs averaged, the lse ignored."""
    return (a[0] + b[0]) / 2, log(exp(a[1]) + exp(b[1]))


PartialMerge = Callable[[tuple[Any, Any], tuple[Any, Any]], tuple[Any, Any]]
Tree = Any  # an int (a block) or a pair of trees


def _set_partitions(items: list[int]) -> Iterator[list[list[int]]]:
    """Every partition of ``items`` into non-empty blocks."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in _set_partitions(rest):
        for i in range(len(part)):
            yield [*part[:i], [first, *part[i]], *part[i + 1 :]]
        yield [[first], *part]


def _trees(leaves: Sequence[int]) -> Iterator[Tree]:
    """Every full binary tree over the leaves ``leaves``, with both orders of the children
    of every node (so that commutativity is not assumed)."""
    if len(leaves) == 1:
        yield leaves[0]
        return
    first, rest = leaves[0], leaves[1:]
    # split the leaves into two non-empty groups; both orders of the children
    for mask in range(1, 2 ** len(rest) + 1):
        left = [first] + [x for i, x in enumerate(rest) if mask >> i & 1]
        right = [x for i, x in enumerate(rest) if not mask >> i & 1]
        if not right:
            continue
        for lt, rt in product(_trees(left), _trees(right)):
            yield (lt, rt)
            yield (rt, lt)


def _fold(tree: Tree, parts: Sequence[tuple[Any, Any]], merge: PartialMerge) -> tuple[Any, Any]:
    if isinstance(tree, int):
        return parts[tree]
    return merge(_fold(tree[0], parts, merge), _fold(tree[1], parts, merge))


def _partition(merge: PartialMerge = _partial_merge, keys: int = 3) -> list[Step]:
    # phi maps a partial (o, ell) to (e^ell, e^ell o): the merge becomes the sum
    oa, ob = symbols("o_A o_B", real=True)
    ea, eb = symbols(r"\ell_A \ell_B", real=True)
    o_m, l_m = merge((oa, ea), (ob, eb))
    steps = [
        equal(
            r"$\varphi(o, \ell) = (e^{\ell}, e^{\ell} o)$ maps the merge to the sum:"
            r" $e^{\ell} = e^{\ell_A} + e^{\ell_B}$",
            exp(l_m),
            exp(ea) + exp(eb),
            key=False,
        ),
        equal(
            r"$e^{\ell} o = e^{\ell_A} o_A + e^{\ell_B} o_B$: so any merge tree over any"
            r" partition stands for the sums over all the keys",
            sympy.expand(exp(l_m) * o_m),
            exp(ea) * oa + exp(eb) * ob,
            shown=(r"e^{\ell} o", r"e^{\ell_A} o_A + e^{\ell_B} o_B"),
        ),
    ]

    # contiguous blocks of general sizes n_1, n_2, n_3: the block sums add up
    def z(lo: Any, hi: Any) -> Any:
        return Sum(exp(_s[_l]), (_l, lo, hi))

    steps.append(
        equal(
            r"three blocks of general sizes $n_1, n_2, n_3$: the sums of the blocks are the sum",
            z(1, _n1) + z(_n1 + 1, _n1 + _n2) + z(_n1 + _n2 + 1, _n1 + _n2 + _n3),
            z(1, _n1 + _n2 + _n3),
            key=False,
        )
    )
    # every partition of `keys` keys into blocks, every merge tree: the definition
    x = [symbols(f"x_{j}", positive=True) for j in range(keys)]  # e^{s_j}
    vv = [symbols(f"v_{j}", real=True) for j in range(keys)]
    z_all = sum(x, S.Zero)
    o_all = sum((xj * vj for xj, vj in zip(x, vv, strict=True)), S.Zero) / z_all
    count = 0
    for blocks in _set_partitions(list(range(keys))):
        parts = []
        for blk in blocks:
            zb = sum((x[j] for j in blk), S.Zero)
            parts.append((sum((x[j] * vv[j] for j in blk), S.Zero) / zb, log(zb)))
        for tree in _trees(list(range(len(blocks)))):
            o_t, l_t = _fold(tree, parts, merge)
            label = f"partition {blocks} of {keys} keys, merge tree {tree}"
            equal(
                label,
                sympy.together(sympy.expand(o_t)),
                o_all,
                simplify=lambda e: sympy.simplify(sympy.powsimp(e)),
            )
            equal(label + " (lse)", exp(l_t), z_all)
            count += 1
    steps.append(
        holds(
            f"every partition of {keys} keys into blocks and every merge tree over the blocks"
            f" ({count} cases) gives the definition's $o$ and $\\ell$",
            r"o_{\mathrm{tree}} = \frac{\sum_j e^{s_j} v_j}{\sum_j e^{s_j}},\ "
            r"\ell_{\mathrm{tree}} = \log \sum_j e^{s_j}",
            True,
        )
    )
    return steps


# --- partials and states -------------------------------------------------------------


def _partials_vs_states() -> list[Step]:
    a, b = (_ma, _la, _aa), (_mb, _lb, _ab)

    def fin(st: State) -> tuple[Any, Any]:
        return st[2] / st[1], st[0] + log(st[1])

    merged = fin(_merge(a, b, _c))  # any reference point c, the maximum among them
    partial = _partial_merge(fin(a), fin(b))
    oa, ob, ea, eb = symbols(r"o_A o_B \ell_A \ell_B", real=True)
    o_two, _ = _partial_merge((oa, ea), (ob, eb))
    softmax_a = exp(ea) / (exp(ea) + exp(eb))
    return [
        equal(
            r"the output: $\operatorname{finalize}(A \oplus B) ="
            r" \operatorname{merge\_partials}(\operatorname{finalize} A,"
            r" \operatorname{finalize} B)$",
            merged[0],
            partial[0],
            simplify=lambda e: sympy.simplify(sympy.powsimp(sympy.expand(e))),
            shown=(
                r"\frac{e^{m_A - c} \mathit{acc}_A + e^{m_B - c} \mathit{acc}_B}{e^{m_A - c} l_A"
                r" + e^{m_B - c} l_B}",
                r"e^{\ell_A - \ell} \frac{\mathit{acc}_A}{l_A} + e^{\ell_B - \ell}"
                r" \frac{\mathit{acc}_B}{l_B}",
            ),
        ),
        equal(
            r"the lse: $c + \log(e^{m_A - c} l_A + e^{m_B - c} l_B) ="
            r" \operatorname{logaddexp}(m_A + \log l_A, m_B + \log l_B)$",
            exp(merged[1]),
            exp(partial[1]),
            simplify=lambda e: sympy.simplify(sympy.powsimp(sympy.expand(e))),
            key=False,
        ),
        equal(
            r"merging partials is attention of one query over two keys with logits"
            r" $\ell_A, \ell_B$ and values $o_A, o_B$",
            o_two,
            softmax_a * oa + (1 - softmax_a) * ob,
            key=False,
        ),
    ]


# --- a fully hidden block ----------------------------------------------------------


def _guarded(x: Any, m: Any) -> Any:
    r"""The factor :math:`e^{x - m}` as the reference takes it: 0 for :math:`x = -\infty`."""
    return S.Zero if x == -oo else exp(x - m)


def _unguarded(x: Any, m: Any) -> Any:
    """The factor as the formula reads: e^{-inf - (-inf)} is e^NaN."""
    return exp(x - m)


def _hidden_block(factor: Callable[[Any, Any], Any] = _guarded) -> list[Step]:
    m, m_b = symbols("m m_B", real=True)
    l_ = symbols("l", positive=True)
    empty = (Max(), S.Zero, S.Zero)  # max over no key, the empty sums
    after = _merge((m, l_, _aa), empty, None)
    # a first block with nothing visible, folded into the empty state a row starts from
    top = Max(empty[0], empty[0])
    first = (top, factor(empty[0], top) * 0 + factor(empty[0], top) * 0)
    return [
        holds(
            r"a block with nothing visible has the empty state: $\max \emptyset = -\infty$,"
            r" empty sums 0",
            r"(\max \emptyset, \textstyle\sum_\emptyset, \sum_\emptyset) = (-\infty, 0, 0)",
            bool(empty[0] == -oo),
            key=False,
        ),
        _equal_all(
            r"folding it changes nothing: $l' = l$, $\mathit{acc}' = \mathit{acc}$",
            [after[1], after[2]],
            [l_, _aa],
            shown=(r"(e^{m - m} l + e^{-\infty - m} 0,\ \dots)", r"(l, \mathit{acc})"),
        ),
        limit(
            r"the factor of an empty side is the limit 0 (the guard)",
            exp(m_b - m),
            m_b,
            -oo,
            0,
        ),
        holds(
            r"a fully hidden first block: the factors of the two empty sides are"
            r" $e^{-\infty - (-\infty)}$, NaN as written; guarded (0), the state stays empty",
            r"(-\infty, 0) \oplus (-\infty, 0) = (-\infty, 0)",
            bool(first[0] == -oo and first[1] == 0),
            key=False,
        ),
    ]


# --- the sink ------------------------------------------------------------------------


def _sink(times: int = 1) -> list[Step]:
    o, ell, sigma = symbols(r"o \ell \sigma", real=True)
    merged = (o, ell)
    for _ in range(times):
        merged = _partial_merge(merged, (S.Zero, sigma))
    return [
        equal(
            r"the sink is one more partial $(0, \sigma)$, merged once:"
            r" $o^{\sigma} = o / (1 + e^{\sigma - \ell})$",
            merged[0],
            o / (1 + exp(sigma - ell)),
        ),
        equal(
            r"$\ell^{\sigma} = \operatorname{logaddexp}(\ell, \sigma)$",
            exp(merged[1]),
            exp(ell) + exp(sigma),
            key=False,
        ),
    ]


# --- the rounding error of one merge -----------------------------------------------


def _merge_rounding(exp_ulps: int = 1, c2_bound: Any = S.Half) -> list[Step]:
    r"""First-order error of ``merge_partials`` in float64 (the standard model)."""
    hi, d = symbols(r"\ell_{\max} d", real=True)  # d = lo - hi <= 0
    t, y = symbols("t y", nonnegative=True)
    dl = symbols("delta_1:10", real=True)
    zero = dict.fromkeys(dl, 0)
    # ell^ = fl(hi + fl(log1p(fl(exp(fl(lo - hi))))))
    lse_hat = (hi + log(1 + exp(d * (1 + dl[0])) * (1 + dl[1])) * (1 + dl[2])) * (1 + dl[3])
    ell = hi + log(1 + exp(d))
    coeff = [sympy.simplify(diff(lse_hat, dl[i]).subs(zero)) for i in range(4)]
    want = [d * exp(d) / (1 + exp(d)), exp(d) / (1 + exp(d)), log(1 + exp(d)), ell]
    steps = [
        _equal_all(
            r"$\hat\ell = \ell + \sum_i c_i \delta_i + O(u^2)$ with"
            r" $c = \bigl(\tfrac{d e^d}{1 + e^d}, \tfrac{e^d}{1 + e^d}, \log(1 + e^d), \ell\bigr)$"
            r" ($d = \ell_{\min} - \ell_{\max} \le 0$)",
            coeff,
            want,
            shown=(r"\partial \hat\ell / \partial \delta_i |_{\delta = 0}", sympy.Matrix(want).T),
            key=False,
        )
    ]
    # the ranges of the coefficients over d <= 0: with t = -d >= 0 and y = e^d in (0, 1]
    r1 = function_range(t * exp(-t), t, Interval(0, oo))  # |c_1| <= t e^{-t}
    r2 = function_range(y / (1 + y), y, Interval(0, 1))
    r3 = function_range(log(1 + y), y, Interval(0, 1))
    steps.append(
        holds(
            r"$|c_1| \le \max_{t \ge 0} t e^{-t} = e^{-1}$, $c_2 \le 1/2$, $c_3 \le \log 2$",
            r"|c_1| \le e^{-1},\ c_2 \le \tfrac12,\ c_3 \le \log 2",
            bool(r1.sup == exp(-1) and r2.sup <= c2_bound and r3.sup == log(2)),
            key=False,
        )
    )
    # exp and log1p within `exp_ulps` ulp: |delta_2|, |delta_3| <= 2 exp_ulps u; the others u
    total = r1.sup + 2 * exp_ulps * (r2.sup + r3.sup)
    steps.append(
        holds(
            r"so $|\hat\ell - \ell| \le u(|\ell| + e^{-1} + 1 + 2\log 2) \le u(|\ell| + 3)$"
            r" (exp and log1p within one ulp: $|\delta_2|, |\delta_3| \le 2u$)",
            r"|\hat\ell - \ell| \le u\,(|\ell| + 3)",
            bool(total < 3),
        )
    )
    # the weights w_X = e^{ell_X - ell} and the weighted sum
    ex, dd, oa, ob, wa, wb = symbols(r"\ell_X \Delta o_A o_B w_A w_B", real=True)
    w_hat = exp((ex - (ell + dd)) * (1 + dl[4])) * (1 + dl[5])
    rel = sympy.simplify(sympy.series(w_hat / exp(ex - ell), dd, 0, 2).removeO())
    first = sympy.expand(rel.subs(dd, 0) - 1)
    lin = sum((diff(first, dl[i]).subs(zero) * dl[i] for i in (4, 5)), S.Zero)
    steps.append(
        _equal_all(
            r"a weight: $\hat w_X = w_X(1 - \Delta + (\ell_X - \ell)\delta_5 + \delta_6) + O(u^2)$"
            r" with $\Delta = \hat\ell - \ell$",
            [diff(rel, dd).subs({dd: 0, **zero}), lin],
            [-1, (ex - ell) * dl[4] + dl[5]],
            shown=(r"\hat w_X / w_X - 1", r"-\Delta + (\ell_X - \ell)\delta_5 + \delta_6"),
            key=False,
        )
    )
    products = (wa * oa * (1 + dl[6]) + wb * ob * (1 + dl[7])) * (1 + dl[8])
    grad = [diff(products, dl[i]).subs(zero) for i in (6, 7, 8)]
    steps.append(
        _equal_all(
            r"$\mathrm{fl}(\hat w_A o_A + \hat w_B o_B)$: first-order terms"
            r" $w_A o_A \delta_7 + w_B o_B \delta_8 + (w_A o_A + w_B o_B)\delta_9$",
            grad,
            [wa * oa, wb * ob, wa * oa + wb * ob],
            key=False,
        )
    )
    steps.append(
        holds(
            r"together: $|\hat o - o| \le u \sum_X w_X |o_X|"
            r" \bigl(|\ell| + |\ell - \ell_X| + 7\bigr)$"
            r" (3 from $\Delta$, 2 from the exp, 1 from each product and the sum)",
            r"|\hat o - o| \le u \sum_{X \in \{A, B\}} w_X |o_X|\,(|\ell| + |\ell - \ell_X| + 7)",
            bool(3 + 2 * exp_ulps + 1 + 1 <= 7),
        )
    )
    return steps


# --- the claims ----------------------------------------------------------------------

_MILAKOV = (
    "M. Milakov, N. Gimelshein, *Online normalizer calculation for softmax*, 2018,"
    " [arXiv:1805.02867](https://arxiv.org/abs/1805.02867)"
)
_RABE = (
    "M. N. Rabe, C. Staats, *Self-attention does not need O(n^2) memory*, 2021,"
    " [arXiv:2112.05682](https://arxiv.org/abs/2112.05682)"
)
_DAO2 = (
    "T. Dao, *FlashAttention-2: faster attention with better parallelism and work"
    " partitioning*, ICLR 2024, [arXiv:2307.08691](https://arxiv.org/abs/2307.08691)"
)
_HIGHAM = (
    "N. J. Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., SIAM, 2002,"
    " [doi:10.1137/1.9780898718027](https://doi.org/10.1137/1.9780898718027) (sec. 2.2,"
    " the standard model)"
)
_XIAO = (
    "G. Xiao, Y. Tian, B. Chen, S. Han, M. Lewis, *Efficient streaming language models with"
    " attention sinks*, ICLR 2024, [arXiv:2309.17453](https://arxiv.org/abs/2309.17453)"
)

CLAIMS: tuple[Claim, ...] = (
    Claim(
        topic=TOPIC,
        name="online-rescale-exact",
        title="The state stands for the sums; rescaling by e^(m_old - m_new) is exact",
        statement=(
            r"(e^{m - m'} l)\, e^{m'} = l\, e^{m},\quad"
            r" l' e^{m'} = l\, e^{m} + \sum_{j \in \mathcal{B}} e^{s_j},\quad"
            r" \frac{\mathit{acc}}{l} = \frac{N}{Z},\ m + \log l = \log Z"
        ),
        method="symbolic, general block size n",
        explanation=(
            "The state $(m, l, \\mathit{acc})$ never holds $Z$ or $N$, which overflow; it holds"
            " them relative to the running maximum $m$. When a block raises the maximum to"
            " $m'$, the old sums are multiplied by $e^{m - m'} \\le 1$: in real arithmetic"
            " this changes nothing they stand for, so the update of FlashAttention-2 (and the"
            " per-element recurrence of Milakov and Gimelshein) computes the definition's"
            " sums; finalising divides them and takes the log."
        ),
        derivation=_rescale,
        references=(_MILAKOV, _RABE, _DAO2),
    ),
    Claim(
        topic=TOPIC,
        name="online-merge-monoid",
        title="The merge of states is associative and commutative; the empty state is its identity",
        statement=(
            r"(A \oplus B) \oplus C = A \oplus (B \oplus C),\quad A \oplus B = B \oplus A,"
            r"\quad A \oplus (-\infty, 0, 0) = A"
        ),
        method="symbolic (general logits, sums and maxima; Max as SymPy's)",
        explanation=(
            "$A \\oplus B = (\\max(m_A, m_B),\\ e^{m_A - m} l_A + e^{m_B - m} l_B,\\ \\dots)$."
            " So the keys may be folded in any grouping and order: sequentially"
            " (FlashAttention), as a tree (split-KV decoding), around a ring (ring attention)."
            " The empty state, $m = -\\infty$ with empty sums, is what a row starts from and"
            " what a block with nothing visible contributes. In floating point the merge is"
            " commutative bit for bit (each step is symmetric) but not associative: the order"
            " changes the roundings, within the bound of `online-merge-rounding`."
        ),
        derivation=_monoid,
        references=(_MILAKOV,),
    ),
    Claim(
        topic=TOPIC,
        name="online-any-partition",
        title="Any partition of the keys, merged in any order, gives the definition",
        statement=(
            r"\mathcal{K} = \textstyle\bigsqcup_b \mathcal{B}_b \implies"
            r" \bigoplus_{\mathrm{tree}} (o_b, \ell_b) = (o, \ell)"
        ),
        method=(
            "symbolic: $\\varphi(o, \\ell) = (e^{\\ell}, e^{\\ell} o)$ maps the merge to the sum"
            " (general); contiguous blocks of general sizes $n_1, n_2, n_3$; and explicitly"
            " every partition of 3 keys into blocks, contiguous or not, with every merge tree"
            " and order (SymPy cannot induct over trees)"
        ),
        explanation=(
            "A block's partial is attention over its own keys. The merge adds the sums the"
            " partials stand for, and addition does not care how the keys were grouped or"
            " in which order the groups are added; the blocks need not be contiguous, which"
            " is what lets a kernel skip or reorder them. Fully hidden blocks are blocks"
            " too (`online-hidden-block`)."
        ),
        derivation=_partition,
        references=(_RABE, _DAO2),
    ),
    Claim(
        topic=TOPIC,
        name="online-partials-merge",
        title="Merging normalised partials (o, lse) is merging states",
        statement=(
            r"\operatorname{finalize}(A \oplus B) = \operatorname{merge\_partials}"
            r"(\operatorname{finalize} A, \operatorname{finalize} B),\quad"
            r" \ell = \operatorname{logaddexp}(\ell_A, \ell_B),\ o = e^{\ell_A - \ell} o_A"
            r" + e^{\ell_B - \ell} o_B"
        ),
        method="symbolic, for any reference point c (the maximum among them)",
        explanation=(
            "Split-KV decoding and ring attention exchange normalised results $(o_X, \\ell_X)$"
            " instead of states; merging them gives what merging the states and finalising"
            " gives. It is attention of one query over two keys whose logits are"
            " $\\ell_A, \\ell_B$ and whose values are $o_A, o_B$: the accurate merge is"
            " evaluated that way. The two-block case for general block sizes is the"
            " attention topic's `split-kv-merge`."
        ),
        derivation=_partials_vs_states,
        references=(_DAO2,),
    ),
    Claim(
        topic=TOPIC,
        name="online-hidden-block",
        title="A fully hidden block changes nothing (and needs a guard)",
        statement=(
            r"\mathcal{V} \cap \mathcal{B} = \emptyset \implies (m, l, \mathit{acc}) \oplus"
            r" (-\infty, 0, 0) = (m, l, \mathit{acc}),\quad"
            r" \lim_{m_B \to -\infty} e^{m_B - m} = 0"
        ),
        method="symbolic",
        explanation=(
            "A block whose keys are all hidden (a mask, a causal or window rule, a bias of"
            " $-\\infty$) has the empty state and drops out. In floating point the first"
            " such block of a row computes $e^{m_{\\mathrm{old}} - m_{\\mathrm{new}}} ="
            " e^{-\\infty - (-\\infty)} = e^{\\mathrm{NaN}}$ unless the factor of an empty side"
            " is taken as its limit, 0: the reference guards it (and whatever the hidden"
            " keys hold never reaches the sums)."
        ),
        derivation=_hidden_block,
        references=(_DAO2,),
    ),
    Claim(
        topic=TOPIC,
        name="online-sink-once",
        title="A sink enters once, as a partial (0, sigma)",
        statement=(
            r"(o, \ell) \oplus (0, \sigma) = \Bigl(\frac{o}{1 + e^{\sigma - \ell}},\ "
            r"\operatorname{logaddexp}(\ell, \sigma)\Bigr)"
        ),
        method="symbolic",
        explanation=(
            "A sink is a key with logit $\\sigma$ and value 0 that every query sees: one more"
            " partial, merged once per row, giving the attention topic's `sink-rescales`."
            " Adding it in every block would merge it once per block: with $B$ blocks the"
            " output shrinks by $1 + B e^{\\sigma - \\ell}$ instead."
        ),
        derivation=_sink,
        references=(_XIAO,),
    ),
    Claim(
        topic=TOPIC,
        name="online-merge-rounding",
        title="The rounding error of one merge of partials in float64",
        statement=(
            r"|\hat\ell - \ell| \le u\,(|\ell| + 3),\quad"
            r" |\hat o_k - o_k| \le u \sum_{X \in \{A, B\}} w_X |o_{X,k}|\,"
            r"\bigl(|\ell| + |\ell - \ell_X| + 7\bigr) + O(u^2)"
        ),
        method=(
            "first-order error analysis in the standard model $\\mathrm{fl}(x \\circ y) ="
            " (x \\circ y)(1 + \\delta)$, $|\\delta| \\le u$, with exp and log1p within one ulp"
            " ($|\\delta| \\le 2u$): SymPy takes the derivative in each $\\delta$ and the range"
            " of each coefficient"
        ),
        explanation=(
            "For exact partials $(o_X, \\ell_X)$, `merge_partials` at precision 'fast' computes"
            " $\\hat\\ell = \\ell_{\\max}"
            " + \\operatorname{log1p}(e^{\\ell_{\\min} - \\ell_{\\max}})$,"
            " the weights $e^{\\ell_X - \\hat\\ell}$ and their sum with the outputs. The error"
            " of $\\hat\\ell$ enters both weights as a common factor $e^{-\\Delta}$; the term"
            " $u|\\ell|$ is the price of carrying the lse rounded to float64 (it does not"
            " arise in the state form, whose maximum is exact). The tolerances of the online"
            " topic (`spec/tolerances/online.py`) chain this bound along merge trees."
        ),
        derivation=_merge_rounding,
        references=(_HIGHAM,),
    ),
)
