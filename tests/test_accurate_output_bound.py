"""The output claim of ``precision="accurate"`` on inputs that once broke it.

The claim (:func:`attnspec.sdpa`, :func:`attnspec.spec.tolerances.attention.accurate_sdpa_bound`):
every output :math:`o_{ik}` is within :math:`4u \\sum_j p_{ij} |v_{jk}| + 2^{-1074}` of the
exact value, the sum running over the keys with weight. Values at keys of weight 0 (hidden
by the mask or by a bias of -inf) take no part in it, however large.

Every expected value is computed here with mpmath at 60 significant digits, written out: the
float64 inputs are exact mpf numbers, the logits :math:`\\tau\\, q_i \\cdot k_j + b_{ij}` are
summed at that precision (the few products of 53-bit numbers are exact at 199 bits), and
:math:`p_{ij} = e^{s_{ij} - m_i} / (\\sum_{j\\ \\mathrm{visible}} e^{s_{ij} - m_i} + e^{\\sigma
- m_i})`; the relative error of the result is below :math:`10^{-55}`, far below :math:`u`.
"""

from __future__ import annotations

import mpmath
import numpy as np
import pytest

import attnspec

U = mpmath.mpf(2) ** -53
ETA = mpmath.mpf(2) ** -1074  # the smallest subnormal: a subnormal output rounds by up to half


def _exact_rows(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    scale: float,
    seen: np.ndarray,
    bias: np.ndarray | None = None,
    sink: float | None = None,
    keep: np.ndarray | None = None,
    dropout_p: float = 0.0,
) -> tuple[list[list[mpmath.mpf]], list[list[mpmath.mpf]]]:
    """Exact outputs o_ik and masses sum_j p_ij |v_jk| of one head (2-D q, k, v), in mpmath
    at 60 digits; ``seen`` (L, S) says which keys each query sees (a bias of -inf is
    folded into it by the caller); ``keep`` (L, S) and ``dropout_p``: the dropout weights
    p_ij keep_ij / (1 - dropout_p)."""
    L, S, Ev = q.shape[0], k.shape[0], v.shape[1]
    outs: list[list[mpmath.mpf]] = []
    masses: list[list[mpmath.mpf]] = []
    with mpmath.workdps(60):
        tau = mpmath.mpf(float(scale))
        for i in range(L):
            logits: dict[int, mpmath.mpf] = {}
            for j in range(S):
                if not seen[i, j]:
                    continue
                pairs = zip(q[i], k[j], strict=True)
                dot = mpmath.fsum(mpmath.mpf(float(a)) * mpmath.mpf(float(b)) for a, b in pairs)
                s = tau * dot
                if bias is not None:
                    s += mpmath.mpf(float(bias[i, j]))
                logits[j] = s
            every = list(logits.values()) + ([mpmath.mpf(sink)] if sink is not None else [])
            if not every:
                outs.append([mpmath.mpf(0)] * Ev)
                masses.append([mpmath.mpf(0)] * Ev)
                continue
            top = max(every)
            z = mpmath.fsum(mpmath.exp(s - top) for s in every)
            p = {j: mpmath.exp(s - top) / z for j, s in logits.items()}
            if keep is not None:
                p = {j: pj * int(keep[i, j]) / (1 - mpmath.mpf(dropout_p)) for j, pj in p.items()}
            outs.append(
                [mpmath.fsum(p[j] * mpmath.mpf(float(v[j, c])) for j in p) for c in range(Ev)]
            )
            masses.append(
                [mpmath.fsum(p[j] * abs(mpmath.mpf(float(v[j, c]))) for j in p) for c in range(Ev)]
            )
    return outs, masses


def _assert_within_claim(
    out: np.ndarray, exact: list[list[mpmath.mpf]], mass: list[list[mpmath.mpf]]
) -> None:
    __tracebackhide__ = True
    with mpmath.workdps(60):
        for i, row in enumerate(exact):
            for c, o in enumerate(row):
                err = abs(mpmath.mpf(float(out[i, c])) - o)
                bound = 4 * U * mass[i][c] + ETA
                assert err <= bound, (
                    f"output ({i}, {c}) = {float(out[i, c])!r}, exact {mpmath.nstr(o, 20)}: "
                    f"error {mpmath.nstr(err, 5)} > 4u sum p|v| + 2**-1074 = "
                    f"{mpmath.nstr(bound, 5)}"
                )


def test_huge_value_at_a_masked_key_does_not_change_a_visible_output() -> None:
    # A hidden 1e300 once set the column scale of the product: the visible output
    # (weight e**-50 on a value 1) came out 1.9852e-22 instead of 1.9287e-22.
    q, k = np.zeros((1, 1)), np.zeros((2, 1))
    v = np.array([[1e300], [1.0]])
    mask = np.array([False, True])
    out = attnspec.sdpa(q, k, v, mask=mask, sinks=[50.0])
    exact, mass = _exact_rows(q, k, v, 1.0, np.array([[False, True]]), sink=50.0)
    _assert_within_claim(out, exact, mass)
    # the hidden key's value takes no part at all: the same bits as with 0 there
    zeroed = attnspec.sdpa(q, k, np.array([[0.0], [1.0]]), mask=mask, sinks=[50.0])
    assert np.array_equal(out, zeroed)


def test_huge_value_behind_a_minus_inf_bias_keeps_a_tiny_output() -> None:
    # A 1e100 hidden by a bias of -inf once made the output (about 9.75e-262) exactly 0.
    q = np.ones((1, 1))
    k = np.array([[0.0], [0.0], [1.0]])
    v = np.array([[1e100], [1.0], [0.0]])
    bias = np.array([-np.inf, -600.0, 0.0])
    out = attnspec.sdpa(q, k, v, bias=bias, scale=1.0)
    exact, mass = _exact_rows(q, k, v, 1.0, np.isfinite(bias)[None, :], bias=bias[None, :])
    assert float(exact[0][0]) > 1e-262
    _assert_within_claim(out, exact, mass)


def test_subnormal_weight_times_large_value_keeps_relative_accuracy() -> None:
    # p = e**-727 / (1 + e**-727), about 1.85e-316 (subnormal), times 1e10: the output was
    # 1.853154711898657e-306 (exact 1.8531546185751e-306), 3.1e6 times the claim's bound
    q = np.array([[1.0]])
    k = np.array([[0.0], [-727.0]])
    v = np.array([[0.0], [1e10]])
    out = attnspec.sdpa(q, k, v, scale=1.0)
    exact, mass = _exact_rows(q, k, v, 1.0, np.ones((1, 2), dtype=bool))
    _assert_within_claim(out, exact, mass)


# seeds 2, 4, 8 and 12 broke the claim before the fix (seed 0 did not)
@pytest.mark.parametrize("seed", [0, 2, 4, 8, 12])
def test_huge_values_hidden_from_some_rows_seen_by_others(seed: int) -> None:
    # One block of rows where a few keys hold values of 1e200..1e300: some rows see
    # them (their outputs are huge), the others do not (by the mask), and those rows'
    # outputs, of ordinary size or tiny (a dominant sink), must keep their accuracy:
    # the column scale of the product is set by the huge values (other rows weight
    # them), so the blind rows must not be computed in those units.
    rng = np.random.default_rng(seed)
    L, S, E, Ev = 12, 10, 4, 3
    q = rng.standard_normal((L, E))
    k = rng.standard_normal((S, E))
    v = rng.standard_normal((S, Ev))
    huge = rng.choice(S, size=3, replace=False)
    v[huge] = rng.choice([-1.0, 1.0], (3, Ev)) * 10.0 ** rng.uniform(200, 300, (3, Ev))
    mask = rng.random((L, S)) < 0.7
    blind = rng.random(L) < 0.6  # these rows see none of the huge keys
    mask[np.ix_(blind, huge)] = False
    mask[~blind, huge[0]] = True  # the others see at least one of them
    tame = np.flatnonzero(~np.isin(np.arange(S), huge))
    mask[np.arange(L), rng.choice(tame, L)] = True  # every row sees an ordinary key
    assert blind.any() and not blind.all()
    sink = float(rng.choice([0.0, 40.0]))
    out = attnspec.sdpa(q, k, v, mask=mask, sinks=[sink], scale=1.0)
    exact, mass = _exact_rows(q, k, v, 1.0, mask, sink=sink)
    _assert_within_claim(out, exact, mass)


# ---------------------------------------------------------------------------
# Weights below the double-double range (e**d < 2**-965, d < -669) times large values:
# the product takes them at scale 2**600 or 2**1200 (DoubleDouble.weights and matmul).
# ---------------------------------------------------------------------------

DBL_MAX = float(np.finfo(np.float64).max)


def _check_heads(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    *,
    mask: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    sinks: np.ndarray | None = None,
    keep: np.ndarray | None = None,
    dropout_p: float = 0.0,
) -> np.ndarray:
    """``attnspec.sdpa`` (scale 1) on (B, H, L, E) inputs, GQA when k and v have fewer heads,
    each query head checked against :func:`_exact_rows`; returns the output."""
    kw: dict[str, object] = {}
    if mask is not None:
        kw["mask"] = mask
    if bias is not None:
        kw["bias"] = bias
    if sinks is not None:
        kw["sinks"] = sinks
    if keep is not None:
        kw.update(dropout_mask=keep, dropout_p=dropout_p)
    out = attnspec.sdpa(q, k, v, scale=1.0, **kw)  # type: ignore[arg-type]
    n_b, n_h, n_q = q.shape[:3]
    n_k = k.shape[2]
    group = n_h // k.shape[1]
    full = (n_b, n_h, n_q, n_k)
    seen = np.ones(full, dtype=bool) if mask is None else np.broadcast_to(mask, full)
    b_full = None if bias is None else np.broadcast_to(bias, full)
    if b_full is not None:
        seen = seen & np.isfinite(b_full)
    for b in range(n_b):
        for h in range(n_h):
            exact, mass = _exact_rows(
                q[b, h],
                k[b, h // group],
                v[b, h // group],
                1.0,
                seen[b, h],
                bias=None if b_full is None else b_full[b, h],
                sink=None if sinks is None else float(np.broadcast_to(sinks, (n_b, n_h))[b, h]),
                keep=None if keep is None else np.broadcast_to(keep, full)[b, h],
                dropout_p=dropout_p,
            )
            _assert_within_claim(out[b, h], exact, mass)
    return np.asarray(out)


def _one_query(d: list[float], v: list[list[float]], **kw: object) -> np.ndarray:
    """One query whose logits are ``d`` (a bias on zero q, k), values ``v`` (S, Ev)."""
    n_k = len(d)
    return _check_heads(
        np.zeros((1, 1, 1, 1)),
        np.zeros((1, 1, n_k, 1)),
        np.array(v, dtype=np.float64)[None, None],
        bias=np.array(d)[None, None, None, :],
        **kw,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(
    "d", [-670.0, -700.0, -745.0, -800.0, -1039.9, -1040.1, -1200.0, -1400.0, -1450.0, -1460.0]
)
@pytest.mark.parametrize("value", [1e100, 1e300, DBL_MAX, -DBL_MAX])
def test_tiny_weight_times_huge_value(d: float, value: float) -> None:
    # The only nonzero value sits at a key of weight e**d: below d = -745 that weight
    # rounds to 0 in float64 (the output was 0, e.g. e**-800 * 1e300 = 3.7e-48: an error of
    # 100% of sum p|v|); at d = -1450 and |v| = DBL_MAX the output is a subnormal of about
    # 3e-322, at -1460 it is below half the smallest subnormal (0 is within the claim).
    out = _one_query([0.0, d], [[0.0], [value]])
    if d < -745 and abs(value) > 1e200 and d >= -1400:
        assert out[0, 0, 0, 0] != 0.0


def test_tiny_weights_of_both_signs_cancel() -> None:
    # Two tiny (subnormal) weights on opposite huge values, whose difference is about
    # 2**-40 of each, and deeper ones; the column beside holds ordinary values at the main
    # keys too.
    out = _one_query(
        [0.0, -0.5, -730.0, -730.0 - 2.0**-40, -800.0, -1200.0],
        [
            [0.0, 1.0],
            [0.0, -2.0],
            [1e300, 1e300],
            [-1e300, 3.0],
            [DBL_MAX, -1e-300],
            [-DBL_MAX, 0.0],
        ],
    )
    assert out[0, 0, 0, 0] != 0.0


@pytest.mark.parametrize(
    ("main", "tiny", "d"),
    [
        (1e-9, 1e308, -730.0),  # both terms about 1e-9 (the tiny weight is subnormal)
        (-1.3e-9, 1e308, -730.0),  # nearly cancelling
        (1e-300, DBL_MAX, -1000.0),  # 1e-300 beside about 1.8e-126
        (3.0, 1e308, -760.0),  # the tiny term (4e-23) moves the output by 2**-76: nothing
        (1e-300, 1e300, -1300.0),  # a tiny main part (1e-300) and a tiny weight's 1e-265
        (1e-310, 1e300, -1400.0),  # both near the subnormal range
        (1e200, 1e300, -800.0),  # a huge main part: the weights as they are suffice
        (0.0, 1e-5, -740.0),  # a tiny weight times a small value: subnormal output
    ],
)
def test_tiny_weight_beside_an_ordinary_weight(main: float, tiny: float, d: float) -> None:
    _one_query([0.0, -1.0, d], [[main], [main * 0.5], [tiny]])


def test_rows_with_and_without_tiny_weights_several_heads_gqa_mask_sinks() -> None:
    rng = np.random.default_rng(7)
    n_b, n_h, n_kv, n_q, n_k, width, ev = 2, 4, 2, 5, 9, 3, 3
    q = rng.standard_normal((n_b, n_h, n_q, width))
    k = rng.standard_normal((n_b, n_kv, n_k, width))
    v = rng.standard_normal((n_b, n_kv, n_k, ev))
    v[:, :, 2:5] = rng.choice([-1.0, 1.0], (n_b, n_kv, 3, ev)) * 10.0 ** rng.uniform(
        250, 308, (n_b, n_kv, 3, ev)
    )
    bias = np.zeros((n_b, n_h, n_q, n_k))
    bias[..., 2:5] = rng.uniform(-1450.0, -680.0, (n_b, n_h, n_q, 3))
    bias[:, :, 0, 2:5] = 0.0  # row 0 of every head weights the huge values fully
    bias[:, :, 1] = 0.0  # row 1 has no tiny weight at all
    v[:, 0, 5:, 0] = 0.0  # kv head 0, column 0: the huge values at tiny weights are all
    v[:, 0, :2, 0] = 0.0
    mask = rng.random((n_b, n_h, n_q, n_k)) < 0.8
    mask[..., 0] = True
    mask[:, 1, 3, 2:5] = False  # blind to the huge keys
    sinks = rng.uniform(-2.0, 2.0, (n_b, n_h))
    _check_heads(q, k, v, mask=mask, bias=bias, sinks=sinks)


def test_tiny_weights_follow_dropout() -> None:
    rng = np.random.default_rng(11)
    n_q, n_k = 6, 8
    q = rng.standard_normal((1, 2, n_q, 2))
    k = rng.standard_normal((1, 2, n_k, 2))
    v = rng.standard_normal((1, 2, n_k, 2))
    v[..., 5:, :] = 1e300
    v[..., 6, 1] = -DBL_MAX
    v[..., :5, 0] = 0.0  # column 0: the tiny weights are the whole output
    bias = np.zeros((1, 2, n_q, n_k))
    bias[..., 5:] = rng.uniform(-1300.0, -700.0, (1, 2, n_q, 3))
    keep = rng.random((1, 2, n_q, n_k)) < 0.7
    keep[..., 0, 5:] = True
    keep[..., 1, 5] = False  # a dropped tiny key takes no part
    _check_heads(q, k, v, bias=bias, keep=keep, dropout_p=0.3)
    # dropout_p = 0 with dropped keys: the factor 1, the mask as given
    _check_heads(q, k, v, bias=bias, keep=keep, dropout_p=0.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_long_rows_with_a_few_tiny_weighted_huge_values(seed: int) -> None:
    # L = S = 64: random logits and values, a few keys per row with d in [-1450, -670]
    # holding values up to DBL_MAX; column 0 is 0 at every other key, so there the tiny
    # weights are the whole output.
    rng = np.random.default_rng(100 + seed)
    n, width, ev = 64, 4, 3
    q = rng.standard_normal((1, 1, n, width))
    k = rng.standard_normal((1, 1, n, width))
    v = rng.standard_normal((1, 1, n, ev))
    huge = rng.choice(n, size=6, replace=False)
    v[0, 0, :, 0] = 0.0
    v[0, 0, huge] = rng.choice([-1.0, 1.0], (6, ev)) * 10.0 ** rng.uniform(280, 308, (6, ev))
    bias = np.zeros((1, 1, n, n))
    bias[..., huge] = rng.uniform(-1450.0, -670.0, (n, 6))
    _check_heads(q, k, v, bias=bias)


def test_tiny_weights_against_attnspec_exact() -> None:
    # The certified reference (Arb balls) agrees with the written-out mpmath values, and
    # the accurate output lies within the claim of it.
    from attnspec import exact as ex

    q = np.zeros((3, 1))
    k = np.zeros((4, 1))
    v = np.array([[0.0, 1.0], [0.0, -1.0], [1e300, DBL_MAX], [-1e300, 5.0]])
    bias = np.array(
        [[0.0, -1.0, -727.0, -900.0], [0.0, 0.0, -1200.0, -1400.0], [-3.0, 0.0, -680.0, -1100.0]]
    )
    out = attnspec.sdpa(q, k, v, bias=bias, scale=1.0)
    ref = ex.sdpa(q, k, v, bias=bias, scale=1.0)
    exact, mass = _exact_rows(q, k, v, 1.0, np.ones((3, 4), dtype=bool), bias=bias)
    with mpmath.workdps(60):
        for i in range(3):
            for c in range(2):
                assert abs(ref[i, c] - exact[i][c]) <= mpmath.mpf(10) ** -40 * abs(exact[i][c])
    assert np.array_equal(ex.to_float64(ref), np.array([[float(o) for o in r] for r in exact]))
    _assert_within_claim(out, [list(r) for r in ref], mass)


def test_special_rows_beside_tiny_weights() -> None:
    # The softmax's special rows (+inf logits, NaN, nothing visible) replace their weights
    # (DoubleDouble.select) in a block whose other rows carry tiny weights at scale.
    q, k = np.zeros((4, 1)), np.zeros((3, 1))
    v = np.array([[1.0], [2.0], [1e300]])
    bias = np.array(
        [[0.0, -1.0, -800.0], [np.inf, np.inf, -800.0], [np.nan, 0.0, -800.0], [0.0, 0.0, -800.0]]
    )
    mask = np.ones((4, 3), dtype=bool)
    mask[3] = False
    out = attnspec.sdpa(q, k, v, bias=bias, mask=mask, scale=1.0)
    exact, mass = _exact_rows(q[:1], k, v, 1.0, np.ones((1, 3), dtype=bool), bias=bias[:1])
    _assert_within_claim(out[:1], exact, mass)
    assert out[1, 0] == 1.5  # the mean of the values at the +inf logits
    assert np.isnan(out[2, 0])
    assert out[3, 0] == 0.0


def test_weights_keep_their_bits_and_carry_the_tiny_ones_at_scale() -> None:
    # DoubleDouble.weights returns the softmax's numbers bit for bit; entries with a finite
    # d < -669 are also carried at scale 2**600 (d >= -1040) or 2**1200, to 2**-60 of
    # e**d 2**L / (1 + s') (mpmath at 60 digits); mul and div by the dropout factors keep
    # them, other operations (or factors beyond 2**64) give a plain double-double.
    from attnspec.reference.doubledouble import DD, DoubleDouble, Weights

    arith = DoubleDouble()
    x = np.array([[0.0, -1.0, -800.0, -1300.0, -np.inf]])
    p, _ = arith.weights(DD(x, None), np.array([0]))
    assert np.array_equal(arith.result(p), attnspec.softmax(x))
    assert isinstance(p, Weights)
    tiny = p.tiny
    assert tiny is not None
    assert np.flatnonzero(tiny.where[0]).tolist() == [2, 3]
    assert np.flatnonzero(tiny.deep[0]).tolist() == [3]
    with mpmath.workdps(60):
        z = 1 + mpmath.exp(-1) + mpmath.exp(-800) + mpmath.exp(-1300)
        for j, lift in ((2, 600), (3, 1200)):
            want = mpmath.exp(x[0, j]) * mpmath.mpf(2) ** lift / z
            got = mpmath.mpf(float(tiny.hi[0, j])) + mpmath.mpf(float(tiny.lo[0, j]))
            assert abs(got - want) <= mpmath.mpf(2) ** -60 * want
    kept = arith.mul(p, arith.lift(np.array([[1.0, 1.0, 0.0, 1.0, 1.0]])))
    assert isinstance(kept, Weights) and kept.tiny is not None
    assert kept.tiny.hi[0, 2] == 0.0 and kept.tiny.hi[0, 3] == tiny.hi[0, 3]
    scaled = arith.div(kept, arith.sub(arith.lift(np.ones(())), arith.lift(np.array(0.5))))
    assert isinstance(scaled, Weights) and scaled.tiny is not None
    assert scaled.tiny.hi[0, 3] == 2.0 * tiny.hi[0, 3]
    assert not isinstance(arith.mul(p, arith.lift(np.array(2.0**100))), Weights)
    assert not isinstance(arith.add(p, p), Weights)
    plain, _ = arith.weights(DD(np.array([[0.0, -1.0, -np.inf]]), None), np.array([0]))
    assert not isinstance(plain, Weights) or plain.tiny is None
