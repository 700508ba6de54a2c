"""Every backward property on every arithmetic, each property's power to fail on a
deliberately broken gradient, and the strategies' reach.

The implementations: attnspec.sdpa_backward precision="fast" (held to
fast_backward_bound), precision="accurate" (accurate_backward_bound) and attnspec.exact
at 50 digits rounded to float64 (correctly rounded, so it meets the accurate claim), at
tiny sizes. The broken ones are a textbook float64 backward written here (numpy, the
closed forms of attnspec.reference.backward evaluated the plain way) with one defect
each; the same textbook code without a defect passes every check on the same inputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import Phase, example, find, given, settings
from hypothesis.errors import InvalidArgument

import attnspec
from attnspec.reference.backward import SdpaGradients
from attnspec.spec.battery import run_battery
from attnspec.spec.properties import backward as BP
from attnspec.spec.strategies.attention import AttentionCase, case_visibility
from attnspec.spec.strategies.backward import (
    BackwardCase,
    FamilyGradCase,
    backward_cases,
    family_grad_cases,
)
from attnspec.spec.tolerances.backward import sum_to

IMPLS = {
    "fast": BP.attnspec_implementation("fast"),
    "accurate": BP.attnspec_implementation("accurate"),
    "exact": BP.exact_implementation(50),
}
impl_param = pytest.mark.parametrize("impl", list(IMPLS.values()), ids=list(IMPLS))

#: examples per test: the profile's, at most 6 (16 properties x 3 arithmetics, each
#: example several exact evaluations; the file must stay under ~40 s on 2 cores)
FEW = settings(max_examples=min(settings().max_examples, 6))
cases = backward_cases(max_side=3, max_width=3)
family = family_grad_cases(max_side=4)

_RNG = np.random.default_rng(20261126)


def _r(*shape: int) -> np.ndarray:
    """Entries of 3 decimals: float32-representable is not needed, only reproducible."""
    return np.round(_RNG.standard_normal(shape), 3)


_Q, _K, _V = _r(1, 2, 3, 2), _r(1, 2, 3, 2), _r(1, 2, 3, 2)
_DO, _DL = _r(1, 2, 3, 2), _r(1, 2, 3)
_K_NAN, _V_NAN = _K.copy(), _V.copy()
_K_NAN[..., 1, 0] = np.nan
_V_NAN[..., 1, :] = np.inf
_HIDE_KEY_1 = np.array([True, False, True])
_EMPTY_ROW = np.array([[True] * 3, [False] * 3, [True] * 3])
_KEEP = np.array([[True, False, True], [True, True, False], [False, True, True]])


def _b(q: Any, k: Any, v: Any, dout: Any, dlse: Any = None, **kw: Any) -> BackwardCase:
    arr = {key: (np.asarray(val) if isinstance(val, list) else val) for key, val in kw.items()}
    case = AttentionCase(
        np.asarray(q, dtype=np.float64),
        np.asarray(k, dtype=np.float64),
        np.asarray(v, dtype=np.float64),
        arr,
    )
    return BackwardCase(case, np.asarray(dout, dtype=np.float64), dlse)


#: the special problems every property is pinned to (keys say what each reaches)
SPECIAL = {
    "plain with dlse": _b(_Q, _K, _V, _DO, _DL),
    "fully masked row": _b(_Q, _K, _V, _DO, _DL, mask=_EMPTY_ROW),
    "NaN and inf at a hidden key": _b(_Q, _K_NAN, _V_NAN, _DO, _DL, mask=_HIDE_KEY_1),
    "bias with -inf": _b(_Q, _K, _V, _DO, _DL, bias=np.array([0.5, -np.inf, -1.0])),
    "GQA": _b(np.concatenate([_Q, -_Q], -3), _K, _V, np.concatenate([_DO, _DO], -3)),
    "sinks": _b(_Q, _K, _V, _DO, _DL, sinks=np.array([0.5, -1.0])),
    "softcap": _b(_Q * 3, _K * 3, _V, _DO, _DL, softcap=2.0),
    "dropout": _b(_Q, _K, _V, _DO, _DL, dropout_mask=_KEEP, dropout_p=0.5),
    "causal bottom-right, L < S": _b(
        _Q[..., :2, :], _K, _V, _DO[..., :2, :], _DL[..., :2], causal=True, align="bottom_right"
    ),
    "2-D with a sink": _b(_Q[0, 0], _K[0, 0], _V[0, 0], _DO[0, 0], None, sinks=np.array(0.25)),
}


def with_special_examples(test: Callable[..., None]) -> Callable[..., None]:
    for bc in SPECIAL.values():
        test = example(bc=bc)(test)
    return test


_FAMILY_NAMES = {
    "grad_lse",
    "jacobian",
    "jacobian_psd",
    "log_softmax_derivative",
    "jacobian_inf_norm",
}

FAMILY_SPECIAL = [
    FamilyGradCase(
        np.array([[0.0, 0.0], [1.0, -2.0]]),
        -1,
        None,
        np.array([[1.0, -1.0], [0.5, 2.0]]),
        np.array([1.0, -3.0]),
    ),
    FamilyGradCase(
        np.array([3.0, -1e3, 2.0, 1e-300]),
        0,
        np.array([True, True, False, True]),
        np.array([1.0, 2.0, 3.0, -4.0]),
        np.array(2.0),
    ),
]


def _property_test(name: str) -> Callable[..., None]:
    check = BP.PROPERTIES[name]
    if name in _FAMILY_NAMES:

        @impl_param
        @FEW
        @given(fc=family)
        @example(fc=FAMILY_SPECIAL[0])
        @example(fc=FAMILY_SPECIAL[1])
        def test_family(impl: BP.BackwardImpl, fc: FamilyGradCase) -> None:
            check(impl, fc)

        test_family.__name__ = f"test_{name}"
        test_family.__doc__ = check.__doc__
        return test_family

    @impl_param
    @FEW
    @given(bc=cases)
    @with_special_examples
    def test(impl: BP.BackwardImpl, bc: BackwardCase) -> None:
        check(impl, bc)

    test.__name__ = f"test_{name}"
    test.__doc__ = check.__doc__
    return test


test_agreement = _property_test("agreement")
test_closed_form = _property_test("closed_form")
test_dz_rows = _property_test("dz_rows")
test_hidden_gradients = _property_test("hidden_gradients")
test_hidden_rows = _property_test("hidden_rows")
test_query_permutation = _property_test("query_permutation")
test_key_permutation = _property_test("key_permutation")
test_key_shift = _property_test("key_shift")
test_gqa = _property_test("gqa")
test_central_differences = _property_test("central_differences")
test_lse_gradient = _property_test("lse_gradient")
test_grad_lse = _property_test("grad_lse")
test_jacobian = _property_test("jacobian")
test_jacobian_psd = _property_test("jacobian_psd")
test_log_softmax_derivative = _property_test("log_softmax_derivative")
test_jacobian_inf_norm = _property_test("jacobian_inf_norm")


def test_every_property_has_a_test() -> None:
    assert {f"test_{n}" for n in BP.PROPERTIES} <= set(globals())


# ---------------------------------------------------------------------------------------
# Findings, pinned
# ---------------------------------------------------------------------------------------


def test_accurate_dk_with_values_near_1e300() -> None:
    # found by check_agreement: dk[0] was -3.932238625048916e+299 against attnspec.exact's
    # -3.93223866482963e+299 (3e7 times the accurate bound): the double-double product of
    # D = dO * O with |O| >= 2**995 kept no low part (Veltkamp's split overflows there);
    # DoubleDouble.mul now scales such operands for the TwoProduct
    bc = _b(
        [[1.0], [1.0]],
        [[0.0], [1.0]],
        [[0.0], [2e300]],
        [[1.0], [1.0]],
        mask=_EMPTY_ROW[:2, :2][::-1],
    )
    BP.check_agreement(IMPLS["accurate"], bc)


def test_fast_bound_of_two_d_inputs_is_computed_as_one_head() -> None:
    """2-D inputs are one head (fast_backward_bound raised on them once): the bounds
    equal those of the 3-D problem."""
    bc = SPECIAL["2-D with a sink"]
    three = _b(bc.q[None], bc.k[None], bc.v[None], bc.dout[None], sinks=np.array([0.25]))
    two_b = BP.gradient_bounds(IMPLS["fast"], bc)
    three_b = BP.gradient_bounds(IMPLS["fast"], three)
    for name in ("dq", "dk", "dv"):
        np.testing.assert_array_equal(two_b[name], three_b[name][0])
    np.testing.assert_array_equal(two_b["dsinks"], three_b["dsinks"].reshape(()))


# ---------------------------------------------------------------------------------------
# Each property can fail: a textbook backward with one defect at a time
# ---------------------------------------------------------------------------------------

#: the defects the textbook backward can carry (each a bug seen in kernels or by hand)
DEFECTS = (
    "no -D",  # dS = P dP: the row term -D_i forgotten
    "D from float32 output",  # D from a separately rounded copy of O, not the output given
    "no tau",  # dQ = dS K, dK = dS^T Q without the scale
    "dK with Q and K swapped",  # dK = tau dS^T K (L = S)
    "dV not transposed",  # dV = P dO (L = S)
    "softcap factor missing",  # dS = dZ through a softcap
    "softcap 1 - t^2",  # 1 - t^2 for 1 - (t / c)^2
    "sink sign",  # dsink = +sum P_sink (D - dlse)
    "sink missing",  # dsink = 0
    "GQA h % Hkv",  # dK, dV of kv head h % Hkv instead of h // G
    "dropout twice",  # dP = dO V^T kappa^2 r^2
    "NaN leak",  # hidden keys multiplied by their weight 0 (0 * NaN = NaN)
    "dlse ignored",  # dZ = P (dP - D)
    "finite mask fill",  # a hidden key gets logit -30 instead of weight 0
    "empty row attends everywhere",  # a fully masked row weighs every key alike
    "last query row skipped",  # an off-by-one in the loop over query blocks
    "last key skipped",  # an off-by-one in the loop over key blocks
)


def _textbook(defect: str | None = None) -> Callable[..., SdpaGradients]:
    """The closed forms of attnspec.reference.backward in plain float64 (mask, bias,
    softcap, sinks, dropout, GQA, dlse), with ``defect`` (one of DEFECTS) or none."""

    def backward(
        q: Any,
        k: Any,
        v: Any,
        dout: Any,
        *,
        dlse: Any = None,
        scale: float | None = None,
        mask: Any = None,
        bias: Any = None,
        softcap: float | None = None,
        sinks: Any = None,
        dropout_mask: Any = None,
        dropout_p: float = 0.0,
        align: str | None = None,
    ) -> SdpaGradients:
        two_d = np.ndim(q) == 2
        q, k, v, dout = (np.asarray(a, dtype=np.float64) for a in (q, k, v, dout))
        if two_d:
            q, k, v, dout = q[None], k[None], v[None], dout[None]
            dlse = None if dlse is None else np.asarray(dlse)[None]
        groups = q.shape[-3] // k.shape[-3]
        if defect == "GQA h % Hkv":
            tile = (1,) * (k.ndim - 3) + (groups, 1, 1)
            kr, vr = np.tile(k, tile), np.tile(v, tile)
        else:
            kr, vr = np.repeat(k, groups, axis=-3), np.repeat(v, groups, axis=-3)
        tau = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            s = tau * (q @ np.swapaxes(kr, -1, -2))
            t = s if softcap is None else softcap * np.tanh(s / softcap)
            z = t + (0.0 if bias is None else np.asarray(bias, dtype=np.float64))
            allowed = (
                np.ones(z.shape, dtype=bool) if mask is None else np.broadcast_to(mask, z.shape)
            )
            if defect == "finite mask fill":
                z, allowed = np.where(allowed, z, -30.0), np.ones(z.shape, dtype=bool)
            seen = allowed & (z > -np.inf)
            if defect == "empty row attends everywhere":
                seen = seen | ~seen.any(axis=-1, keepdims=True)
            zs = np.where(seen, z, -np.inf)
            sig = None
            if sinks is not None:
                sig = np.broadcast_to(
                    np.asarray(sinks, dtype=np.float64)[..., None, None], (*z.shape[:-1], 1)
                )
                zs_all = np.concatenate([zs, sig], axis=-1)
            else:
                zs_all = zs
            top = np.max(zs_all, axis=-1, keepdims=True, initial=-np.inf)
            top = np.where(np.isfinite(top), top, 0.0)
            e = np.where(seen, np.exp(zs - top), 0.0)
            total = e.sum(axis=-1, keepdims=True)
            e_sink = None if sig is None else np.exp(sig - top)
            if e_sink is not None:
                total = total + e_sink
            p = np.where(total > 0, e / np.where(total > 0, total, 1.0), 0.0)
            p_sink = None if e_sink is None else e_sink / total
            keep: Any = 1.0
            if dropout_mask is not None:
                keep = np.broadcast_to(dropout_mask, p.shape) / (1.0 - dropout_p)
            pd = p * keep
            v_used = vr if defect == "NaN leak" else np.where(np.isfinite(vr), vr, 0.0)
            k_used = kr if defect == "NaN leak" else np.where(np.isfinite(kr), kr, 0.0)
            q_used = np.where(np.isfinite(q), q, 0.0)
            o = pd @ v_used
            dpd = dout @ np.swapaxes(v_used, -1, -2)
            dp = dpd * keep * (keep if defect == "dropout twice" else 1.0)
            o_for_d = (
                o.astype(np.float32).astype(np.float64) if defect == "D from float32 output" else o
            )
            big_d = np.sum(dout * o_for_d, axis=-1, keepdims=True)
            if defect == "no -D":
                big_d = np.zeros_like(big_d)
            dl: Any = 0.0
            if dlse is not None and defect != "dlse ignored":
                dl = np.asarray(dlse, dtype=np.float64)[..., None]
            dz = np.where(seen, p * (dp - big_d + dl), 0.0)
            if defect == "last query row skipped":
                dz[..., -1, :] = 0.0
            if defect == "last key skipped":
                dz[..., :, -1] = 0.0
            factor: Any = 1.0
            if softcap is not None and defect != "softcap factor missing":
                factor = 1 - t**2 if defect == "softcap 1 - t^2" else 1 - (t / softcap) ** 2
            ds = dz * factor
            t_scale = 1.0 if defect == "no tau" else tau
            dq = t_scale * (ds @ k_used)
            if defect == "dK with Q and K swapped":
                dk_full = t_scale * (np.swapaxes(ds, -1, -2) @ k_used)
            else:
                dk_full = t_scale * (np.swapaxes(ds, -1, -2) @ q_used)
            if defect == "dV not transposed":
                dv_full = pd @ dout
            else:
                pd_used = pd.copy()
                if defect == "last key skipped":
                    pd_used[..., :, -1] = 0.0
                dv_full = np.swapaxes(pd_used, -1, -2) @ dout

            def kv(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
                hkv = shape[-3]
                if defect == "GQA h % Hkv":
                    x = x.reshape((*x.shape[:-3], groups, hkv, *x.shape[-2:])).sum(axis=-4)
                else:
                    x = x.reshape((*x.shape[:-3], hkv, groups, *x.shape[-2:])).sum(axis=-3)
                return sum_to(x, shape)

            dk, dv = kv(dk_full, k.shape), kv(dv_full, v.shape)
            dq = sum_to(dq, q.shape)
            dbias = None if bias is None else sum_to(dz, np.shape(bias))
            dsinks = None
            if p_sink is not None:
                sign = 1.0 if defect == "sink sign" else -1.0
                per_row = sign * p_sink * (big_d - dl)
                dsinks = sum_to(per_row[..., 0].sum(axis=-1), np.shape(sinks))
                if defect == "sink missing":
                    dsinks = np.zeros(np.shape(sinks))
        if two_d:
            dq, dk, dv = dq[0], dk[0], dv[0]
        return SdpaGradients(dq, dk, dv, dbias, dsinks)

    return backward


_TEXTBOOK_FEATURES = frozenset({"mask", "gqa", "softcap", "sinks", "dropout", "lse"})


def _fast_forward(q: Any, k: Any, v: Any, **kw: Any) -> Any:
    return attnspec.sdpa(q, k, v, precision="fast", **kw)


def _textbook_impl(defect: str | None = None, accuracy: str | float = "fast") -> BP.BackwardImpl:
    return BP.BackwardImpl(
        name="broken" if defect else "textbook",
        fn=_fast_forward,
        backward=_textbook(defect),
        features=_TEXTBOOK_FEATURES,
        accuracy=accuracy,
    )


def _family_broken(kind: str, defect: str) -> Callable[..., Any]:
    def f(x: Any, g: Any, axis: Any, where: Any) -> Any:
        p = attnspec.softmax(x, axis, where=where, precision="fast")
        keep = (
            np.ones(np.shape(x), dtype=bool)
            if where is None
            else np.broadcast_to(where, np.shape(x))
        )
        gi = np.where(keep, g, 0.0) if kind != "logsumexp_vjp" else g
        axes = axis if axis is not None else tuple(range(np.ndim(x)))

        def total(a: Any) -> Any:
            return np.sum(a, axis=axes, keepdims=True)

        if defect == "softmax_vjp without the mean":
            return p * gi
        if defect == "logsumexp_vjp uniform":
            n = total(keep.astype(float))
            return (
                np.where(keep, np.expand_dims(g, axes) / n, 0.0)
                if np.ndim(g) < np.ndim(x)
                else g / n
            )
        if defect == "jvp sign flipped":
            return -p * (gi - total(p * gi))
        if defect == "log_softmax_vjp without p":
            return np.where(keep, gi - total(gi), 0.0)
        if defect == "jvp doubled":
            return 2 * p * (gi - total(p * gi))
        raise AssertionError(defect)

    return f


def _family_impl(kind: str, defect: str) -> BP.BackwardImpl:
    fam: dict[str, Any] = {}
    for name in BP.FAMILY_KINDS:
        fn = getattr(attnspec, name)
        fam[name] = lambda x, g, axis, where, fn=fn: fn(x, g, axis, where=where, precision="fast")
    fam[kind] = _family_broken(kind, defect)
    return BP.BackwardImpl(
        name="broken",
        fn=_fast_forward,
        backward=_textbook(None),
        features=_TEXTBOOK_FEATURES | {"family"},
        accuracy="fast",
        **fam,
    )


_SQ = _b(_Q, _K, _V, _DO, _DL)  # L = S = 3
_GQA4 = _b(_r(1, 4, 3, 2), _r(1, 2, 3, 2), _r(1, 2, 3, 2), _r(1, 4, 3, 2))

BROKEN = [
    ("no -D", BP.check_dz_rows, SPECIAL["plain with dlse"]),
    ("no -D vs exact", BP.check_agreement, SPECIAL["GQA"]),
    ("no -D under a key shift", BP.check_key_shift, SPECIAL["plain with dlse"]),
    ("D from float32 output", BP.check_closed_form, SPECIAL["plain with dlse"]),
    ("no tau", BP.check_central_differences, _b(_Q, _K, _V, _DO, scale=0.5)),
    ("dK with Q and K swapped", BP.check_agreement, _SQ),
    ("dV not transposed", BP.check_agreement, _SQ),
    ("softcap factor missing", BP.check_central_differences, SPECIAL["softcap"]),
    ("softcap 1 - t^2", BP.check_agreement, SPECIAL["softcap"]),
    ("sink sign", BP.check_central_differences, SPECIAL["sinks"]),
    ("sink missing", BP.check_lse_gradient, SPECIAL["sinks"]),
    ("GQA h % Hkv", BP.check_gqa, _GQA4),
    ("dropout twice", BP.check_agreement, SPECIAL["dropout"]),
    ("NaN leak", BP.check_hidden_gradients, SPECIAL["NaN and inf at a hidden key"]),
    ("dlse ignored", BP.check_lse_gradient, SPECIAL["plain with dlse"]),
    ("dlse ignored in the row sums", BP.check_dz_rows, SPECIAL["plain with dlse"]),
    ("finite mask fill", BP.check_hidden_gradients, _b(_Q, _K, _V, _DO, _DL, mask=_HIDE_KEY_1)),
    ("empty row attends everywhere", BP.check_hidden_rows, SPECIAL["fully masked row"]),
    ("last query row skipped", BP.check_query_permutation, SPECIAL["plain with dlse"]),
    ("last key skipped", BP.check_key_permutation, SPECIAL["plain with dlse"]),
]
_DEFECT_OF = {name: next(d for d in DEFECTS if name.startswith(d)) for name, _, _ in BROKEN}

FAMILY_BROKEN = [
    ("softmax_vjp", "softmax_vjp without the mean", BP.check_jacobian),
    ("logsumexp_vjp", "logsumexp_vjp uniform", BP.check_grad_lse),
    ("softmax_jvp", "jvp sign flipped", BP.check_jacobian_psd),
    ("log_softmax_vjp", "log_softmax_vjp without p", BP.check_log_softmax_derivative),
    ("softmax_jvp", "jvp doubled", BP.check_jacobian_inf_norm),
]


@pytest.mark.parametrize(
    ("name", "check", "bc"), [pytest.param(n, c, b, id=n) for n, c, b in BROKEN]
)
def test_property_catches_broken_backward(
    name: str, check: Callable[..., None], bc: BackwardCase
) -> None:
    with pytest.raises(BP.PropertyViolation) as info:
        check(_textbook_impl(_DEFECT_OF[name]), bc)
    assert "reproduce: broken.sdpa_backward(q=np.array(" in str(info.value)


@pytest.mark.parametrize(
    ("kind", "defect", "check"), [pytest.param(k, d, c, id=d) for k, d, c in FAMILY_BROKEN]
)
def test_property_catches_broken_family_gradient(
    kind: str, defect: str, check: Callable[..., None]
) -> None:
    with pytest.raises(BP.PropertyViolation) as info:
        check(_family_impl(kind, defect), FAMILY_SPECIAL[0])
    assert f"reproduce: broken.{kind}(x=np.array(" in str(info.value)


def test_every_defect_is_caught_and_every_property_shown_able_to_fail() -> None:
    assert set(_DEFECT_OF.values()) == set(DEFECTS)
    caught = {check for _, check, _ in BROKEN} | {check for _, _, check in FAMILY_BROKEN}
    missing = set(BP.PROPERTIES.values()) - caught
    assert not missing, f"no broken implementation fails {sorted(c.__name__ for c in missing)}"


def test_broken_cases_pass_on_the_textbook_and_the_reference() -> None:
    """The inputs above are fine inputs: the textbook code without its defect, and
    attnspec fast and accurate, pass each check on them."""
    for impl in (_textbook_impl(None), IMPLS["fast"], IMPLS["accurate"]):
        for _, check, bc in BROKEN:
            check(impl, bc)
    for impl in (IMPLS["fast"], IMPLS["accurate"]):
        for fc in FAMILY_SPECIAL:
            for _, _, family_check in FAMILY_BROKEN:
                family_check(impl, fc)


def test_the_defects_are_wrong_on_their_inputs() -> None:
    """Each defect changes some gradient on its input (so that the check that catches it
    is not catching a difference of the reference's own making)."""
    for name, _, bc in BROKEN:
        good = _textbook(None)(bc.q, bc.k, bc.v, bc.dout, dlse=bc.dlse, **bc.kwargs)
        bad = _textbook(_DEFECT_OF[name])(bc.q, bc.k, bc.v, bc.dout, dlse=bc.dlse, **bc.kwargs)
        differs = False
        for a, b in zip(good, bad, strict=True):
            if a is None:
                continue
            with np.errstate(invalid="ignore"):
                differs |= bool(np.any(~((a == b) | (np.isnan(a) & np.isnan(b)))))
        assert differs, name


def test_battery_catches_broken_backwards() -> None:
    """run_battery on three defects: the check made for each fails, with a reproduction
    (not shrunk here: shrinking repeats the exact evaluations many times)."""
    few = settings(
        max_examples=5, derandomize=True, database=None, deadline=None, phases=[Phase.generate]
    )
    chosen = {c.name: c for c in BP.BATTERY}
    for defect, check_name in (
        ("no tau", "agreement"),
        ("GQA h % Hkv", "gqa"),
        ("dlse ignored", "lse_gradient"),
    ):
        impl = _textbook_impl(defect)
        (result,) = run_battery(impl, few, [chosen[check_name]])
        assert not result.passed, (defect, check_name)
        assert "reproduce: broken.sdpa_backward(" in result.message


def test_battery_passes_on_the_textbook_and_marks_what_it_lacks() -> None:
    few = settings(max_examples=3, derandomize=True, database=None, deadline=None)
    results = run_battery(_textbook_impl(None), few, BP.BATTERY)
    by_name = {r.name: r for r in results}
    assert [r.name for r in results] == [c.name for c in BP.BATTERY]
    assert all(r.passed for r in results), [r.message for r in results if not r.passed]
    assert not by_name["jacobian"].applicable  # no "family" feature
    assert by_name["agreement"].applicable and by_name["agreement"].examples == 3


# ---------------------------------------------------------------------------------------
# The implementation type and the strategies
# ---------------------------------------------------------------------------------------


def test_backward_impl_validates_its_features() -> None:
    with pytest.raises(ValueError, match="unknown features"):
        BP.BackwardImpl("x", fn=_fast_forward, backward=_textbook(), features=frozenset({"wings"}))
    with pytest.raises(ValueError, match="'family' needs the callables"):
        BP.BackwardImpl("x", fn=_fast_forward, backward=_textbook(), features=frozenset({"family"}))
    with pytest.raises(ValueError, match="precision must be"):
        BP.attnspec_implementation("exact")


def test_a_missing_or_misshapen_gradient_is_a_violation() -> None:
    def no_dbias(*args: Any, **kw: Any) -> Any:
        return attnspec.sdpa_backward(*args, precision="fast", **kw)[:3]

    impl = BP.BackwardImpl(
        "short", fn=_fast_forward, backward=no_dbias, features=_TEXTBOOK_FEATURES
    )
    with pytest.raises(BP.PropertyViolation, match="returned no dbias"):
        BP.check_agreement(impl, SPECIAL["bias with -inf"])

    def transposed(*args: Any, **kw: Any) -> Any:
        g = attnspec.sdpa_backward(*args, precision="fast", **kw)
        return g._replace(dq=np.swapaxes(g.dq, -1, -2))

    impl = BP.BackwardImpl("t", fn=_fast_forward, backward=transposed, features=_TEXTBOOK_FEATURES)
    with pytest.raises(BP.PropertyViolation, match=r"dq has shape \(1, 2, 2, 3\)"):
        BP.check_agreement(impl, SPECIAL["plain with dlse"])


#: find without shrinking: only that the case is reached matters here
_REACH = settings(database=None, max_examples=400, deadline=None, phases=[Phase.generate])

#: what backward_cases must reach (module docstring), as predicates
REACHES: dict[str, Callable[[BackwardCase], bool]] = {
    "dlse": lambda bc: bc.dlse is not None,
    "no dlse": lambda bc: bc.dlse is None,
    "dout all zero": lambda bc: bc.dout.size > 0 and not bc.dout.any(),
    "a fully hidden row with NaN in its query": lambda bc: bool(
        (~case_visibility(bc.case).any(axis=-1)).any()
        and np.isnan(bc.q).any()
        and bc.kwargs.get("sinks") is None
    ),
    "NaN or inf at a hidden key": lambda bc: (
        not np.isfinite(bc.k).all() or not np.isfinite(bc.v).all()
    ),
    "GQA": lambda bc: bc.q.ndim >= 3 and bc.k.ndim >= 3 and bc.q.shape[-3] > bc.k.shape[-3],
    "softcap and dlse": lambda bc: "softcap" in bc.kwargs and bc.dlse is not None,
    "sinks and dropout": lambda bc: "sinks" in bc.kwargs and "dropout_mask" in bc.kwargs,
    "values near 1e300": lambda bc: bool(
        (np.abs(np.where(np.isfinite(bc.v), bc.v, 0)) > 1e299).any()
    ),
}


@pytest.mark.parametrize("what", list(REACHES))
def test_backward_cases_reach(what: str) -> None:
    find(backward_cases(max_side=3), REACHES[what], settings=_REACH)


def test_backward_cases_respect_features_and_flags() -> None:
    @settings(max_examples=30, database=None, deadline=None)
    @given(backward_cases(features=("gqa",), hidden_rows=False, dlse=False))
    def only_gqa(bc: BackwardCase) -> None:
        assert bc.features() <= {"gqa"} and bc.dlse is None

    only_gqa()
    find(
        backward_cases(features=("mask", "lse"), hidden_rows=True, dlse=True),
        lambda bc: (
            bc.dlse is not None
            and bc.q.shape[-2] > 0
            and (~case_visibility(bc.case).any(axis=-1)).any()
        ),
        settings=_REACH,
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"features": "mask"}, "Expected a set or tuple"),
        ({"features": ("mask", "wings")}, "unknown"),
        ({"magnitude": "offset1e12"}, "Expected None or one of"),
        ({"max_side": 0}, "max_side >= 1"),
        ({"max_width": 1.5}, "Expected an int"),
        ({"hidden_rows": True, "features": ("gqa",)}, "needs the feature 'mask'"),
        ({"dlse": True, "features": ("mask",)}, "needs the feature 'lse'"),
        ({"poison": "yes"}, "Expected a bool or None"),
    ],
)
def test_backward_cases_refuse_bad_arguments_when_built(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        backward_cases(**kwargs)


def test_backward_case_checks_the_upstream_shapes() -> None:
    case = SPECIAL["plain with dlse"].case
    with pytest.raises(ValueError, match=r"dout must have the output's shape \(1, 2, 3, 2\)"):
        BackwardCase(case, np.zeros((1, 2, 3)))
    with pytest.raises(ValueError, match=r"dlse must have the lse's shape \(1, 2, 3\)"):
        BackwardCase(case, np.zeros((1, 2, 3, 2)), np.zeros(3))


def test_family_grad_cases_reach_where_and_reduced_shapes() -> None:
    find(
        family_grad_cases(),
        lambda fc: fc.where is not None and not np.all(fc.where),
        settings=_REACH,
    )
    find(
        family_grad_cases(),
        lambda fc: fc.g_lse.ndim < fc.x.ndim and fc.x.ndim >= 2,
        settings=_REACH,
    )
