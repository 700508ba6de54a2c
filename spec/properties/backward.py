r"""The properties of the backward pass, as checks of any implementation.

Each ``check_*`` function takes a :class:`BackwardImpl` (a forward with the signature of
:func:`attnspec.sdpa`, a backward with that of :func:`attnspec.sdpa_backward`, optionally
the gradients of the softmax family, the features it supports and the accuracy it claims)
and a :class:`~attnspec.spec.strategies.backward.BackwardCase` (or, for the softmax
family, a :class:`~attnspec.spec.strategies.backward.FamilyGradCase`), evaluates the
implementation, and raises :class:`~attnspec.spec.properties._core.PropertyViolation`
with the worst entry, the bound it broke and a call that reproduces it. Each check names
the claims of ``spec/derivations/backward.py`` (and, for the softmax family,
``spec/derivations/softmax.py``) it tests on an implementation.

Notation of :mod:`attnspec.reference.backward`: :math:`P` the weights before dropout,
:math:`\tilde P` after, :math:`dP = (dO\,V^\top)\odot\kappa r`, :math:`D_i =
\sum_e dO_{ie} O_{ie}`, :math:`dZ = P \odot (dP - D + d\ell)` (= ``dbias``), :math:`dS`
after the softcap's factor, :math:`u = 2^{-53}`, :math:`\eta = 2^{-1074}`,
:math:`\gamma_n = nu/(1-nu)`.

Tolerances. Every gradient :math:`g` an implementation returns is held to
:math:`|\hat g - g| \le B^g`, componentwise, with :math:`B` from
:mod:`attnspec.spec.tolerances.backward`: ``accuracy="accurate"``:
:func:`~attnspec.spec.tolerances.backward.accurate_backward_bound`; ``"fast"``:
:func:`~attnspec.spec.tolerances.backward.fast_backward_bound`; a number :math:`c`:
:math:`c` times the fast bound. Its forward output is held to the bound of
:func:`attnspec.spec.properties.attention.output_bound` ("accurate" or "fast"; a number
:math:`c`: :math:`c` times the fast one). Two computed results that must agree are
allowed the sum of their bounds; where a check moves the inputs by a rounding, the
effect of that rounding on the exact gradients is derived at the check.

Derived here (not in the tolerances modules), each at its check:

* :func:`check_closed_form`: the effect of a perturbation :math:`\delta_i` of :math:`D`
  on the closed forms, :math:`\Pi(|\delta|)` (:func:`propagated`);
* :func:`check_key_shift`: the change of the exact gradients when the logits move by
  the rounding of :math:`k + u`;
* :func:`check_central_differences`: the error of the central difference quotient, from a
  bound on the third derivative of the loss along the direction (cumulants of the
  weights; no Richardson estimate, which is not a bound);
* :func:`family_bound`: the bounds of the softmax family's gradients (softmax_vjp,
  softmax_jvp, log_softmax_vjp, logsumexp_vjp), for double-double and for textbook
  float64 evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Any, ClassVar

import mpmath
import numpy as np
import numpy.typing as npt
from hypothesis import strategies as st

from attnspec.reference.backward import SdpaGradients
from attnspec.spec.properties._core import (
    Check,
    Implementation,
    PropertyViolation,
    abs_error,
    array_repr,
    caller_name,
    same,
    tests_claims,
    two_sum_error,
)
from attnspec.spec.properties.attention import (
    AttentionImpl,
    _colwise,
    _fit,
    _materialise,
    _poisoned,
    _rowwise,
    output_bound,
)
from attnspec.spec.properties.softmax import slice_layout
from attnspec.spec.strategies.attention import FEATURES, AttentionCase, case_visibility
from attnspec.spec.strategies.backward import (
    BACKWARD_FEATURES,
    BackwardCase,
    FamilyGradCase,
    backward_cases,
    family_grad_cases,
)
from attnspec.spec.tolerances import softmax as stol
from attnspec.spec.tolerances._core import ETA, SECOND_ORDER, U, perturbation_factor
from attnspec.spec.tolerances.attention import gamma
from attnspec.spec.tolerances.backward import (
    GRADIENTS,
    BackwardQuantities,
    accurate_backward_bound,
    fast_backward_bound,
    quantities,
    sum_to,
)

__all__ = [
    "BATTERY",
    "FAMILY_KINDS",
    "PROPERTIES",
    "BackwardImpl",
    "PropertyViolation",
    "attnspec_implementation",
    "check_agreement",
    "check_central_differences",
    "check_closed_form",
    "check_dz_rows",
    "check_gqa",
    "check_grad_lse",
    "check_hidden_gradients",
    "check_hidden_rows",
    "check_jacobian",
    "check_jacobian_inf_norm",
    "check_jacobian_psd",
    "check_key_permutation",
    "check_key_shift",
    "check_log_softmax_derivative",
    "check_lse_gradient",
    "check_query_permutation",
    "exact_implementation",
    "family_bound",
    "gradient_bounds",
    "propagated",
]

F64 = npt.NDArray[np.float64]
Bools = npt.NDArray[np.bool_]
SdpaFn = Callable[..., Any]
#: ``f(x, g, axis, where)``: x and g float64 (g of logsumexp: the reduced shape), where a
#: bool array of x's shape or None
FamilyGradFn = Callable[[F64, F64, Any, "Bools | None"], Any]
#: the gradients of the softmax family an implementation may provide
FAMILY_KINDS = ("softmax_vjp", "softmax_jvp", "log_softmax_vjp", "logsumexp_vjp")
_SO = SECOND_ORDER
#: digits of the exact reference (attnspec.exact)
_DPS = 50


@dataclass(frozen=True, repr=False)
class BackwardImpl(Implementation):
    """One implementation of the backward pass, and what it claims.

    An :class:`~attnspec.spec.properties._core.Implementation` (``name``, ``accuracy``,
    ``call``; a reproduction is ``call.format(kind="sdpa_backward", args=...)``, or
    ``kind="softmax_vjp"`` and so on), with:

    Attributes
    ----------
    fn : callable
        The forward, ``fn(q, k, v, **kwargs)`` with the keyword arguments of
        :func:`attnspec.sdpa` (but ``precision``); ``return_lse=True`` gives ``(out, lse)``.
    backward : callable
        ``backward(q, k, v, dout, *, dlse=None, **kwargs)`` with the same keywords (but
        ``return_lse``); returns an object with attributes ``dq, dk, dv, dbias, dsinks``
        or a tuple in that order (``dbias``, ``dsinks`` None without bias, sinks).
    features : frozenset of str
        From :data:`~attnspec.spec.strategies.backward.BACKWARD_FEATURES`: those of
        attention (``lse``: the backward takes ``dlse``) and ``family``: the four
        callables below are given.
    softmax_vjp, softmax_jvp, log_softmax_vjp, logsumexp_vjp : callable, optional
        ``f(x, g, axis, where)``; logsumexp_vjp's ``g`` has logsumexp's output shape.
    accuracy : "accurate", "fast" or a number c
        The bound it claims: see the module docstring.
    """

    topic: ClassVar[str] = "backward"

    fn: SdpaFn
    backward: SdpaFn
    features: frozenset[str] = field(default_factory=lambda: frozenset(FEATURES))
    softmax_vjp: FamilyGradFn | None = None
    softmax_jvp: FamilyGradFn | None = None
    log_softmax_vjp: FamilyGradFn | None = None
    logsumexp_vjp: FamilyGradFn | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = set(self.features) - set(BACKWARD_FEATURES)
        if unknown:
            raise ValueError(f"unknown features {sorted(unknown)}; choose from {BACKWARD_FEATURES}")
        missing = [kind for kind in FAMILY_KINDS if getattr(self, kind) is None]
        if "family" in self.features and missing:
            raise ValueError(f"the feature 'family' needs the callables {missing}")

    def family_fn(self, kind: str) -> FamilyGradFn:
        """The callable of ``kind`` (one of :data:`FAMILY_KINDS`)."""
        fn = getattr(self, kind)
        if fn is None:
            raise ValueError(f"{self.name} has no {kind}")
        return fn

    def forward(self) -> AttentionImpl:
        """The forward as an :class:`~attnspec.spec.properties.attention.AttentionImpl`
        (a number c claims c times the fast bounds: the view claims "fast")."""
        acc = self.accuracy if isinstance(self.accuracy, str) else "fast"
        return AttentionImpl(
            name=self.name,
            fn=self.fn,
            features=frozenset(self.features) & frozenset(FEATURES),
            accuracy=acc,
        )


def attnspec_impl(precision: str = "accurate") -> BackwardImpl:
    """:func:`attnspec.sdpa`, :func:`attnspec.sdpa_backward` and the softmax family's
    gradients at ``precision`` ("accurate" or "fast"), every feature."""
    import attnspec

    if precision not in ("accurate", "fast"):
        raise ValueError(f"precision must be 'accurate' or 'fast', got {precision!r}")

    def fn(q: Any, k: Any, v: Any, **kw: Any) -> Any:
        return attnspec.sdpa(q, k, v, precision=precision, **kw)

    def backward(q: Any, k: Any, v: Any, dout: Any, **kw: Any) -> Any:
        return attnspec.sdpa_backward(q, k, v, dout, precision=precision, **kw)

    def family(name: str) -> FamilyGradFn:
        f = getattr(attnspec, name)
        return lambda x, g, axis, where: f(x, g, axis, where=where, precision=precision)

    return BackwardImpl(
        name=f"attnspec.sdpa_backward[{precision}]",
        fn=fn,
        backward=backward,
        features=frozenset(BACKWARD_FEATURES),
        accuracy=precision,
        call=f"attnspec.{{kind}}({{args}}, precision={precision!r})",
        **{kind: family(kind) for kind in FAMILY_KINDS},
    )


def exact_implementation(dps: int = _DPS) -> BackwardImpl:
    """attnspec.exact (forward, backward and the family's gradients) at ``dps`` digits,
    rounded to float64: correctly rounded, so it meets the "accurate" claim
    (``undecided="midpoint"``, as :func:`attnspec.spec.properties.attention.exact_impl`)."""
    from attnspec import exact

    mid: dict[str, Any] = {"dps": dps, "undecided": "midpoint"}

    def fn(q: Any, k: Any, v: Any, **kw: Any) -> Any:
        res = exact.sdpa(q, k, v, **mid, **kw)
        if kw.get("return_lse"):
            return tuple(exact.to_float64(r) for r in res)
        return exact.to_float64(res)

    def backward(q: Any, k: Any, v: Any, dout: Any, **kw: Any) -> Any:
        grads = exact.sdpa_backward(q, k, v, dout, **mid, **kw)
        return SdpaGradients(*(None if g is None else exact.to_float64(g) for g in grads))

    def family(name: str) -> FamilyGradFn:
        f = getattr(exact, name)
        return lambda x, g, axis, where: exact.to_float64(f(x, g, axis, where=where, **mid))

    return BackwardImpl(
        name=f"attnspec.exact[dps={dps}]",
        fn=fn,
        backward=backward,
        features=frozenset(BACKWARD_FEATURES),
        accuracy="accurate",
        call=f"attnspec.exact.{{kind}}({{args}}, dps={dps}, undecided='midpoint')",
        **{kind: family(kind) for kind in FAMILY_KINDS},
    )


# ---------------------------------------------------------------------------------------
# Evaluation, bounds, comparisons
# ---------------------------------------------------------------------------------------


def _fail(impl: BackwardImpl, bc: BackwardCase, detail: str) -> None:
    __tracebackhide__ = True
    raise PropertyViolation(
        caller_name(), impl.name, detail, impl.reproduce(bc.args(), "sdpa_backward")
    )


def _copy(a: Any) -> Any:
    return a.copy() if isinstance(a, np.ndarray) else a


def _expected_shapes(bc: BackwardCase) -> dict[str, tuple[int, ...] | None]:
    kw = bc.kwargs
    bias, sinks = kw.get("bias"), kw.get("sinks")
    return {
        "dq": bc.q.shape,
        "dk": bc.k.shape,
        "dv": bc.v.shape,
        "dbias": None if bias is None else np.shape(bias),
        "dsinks": None if sinks is None else np.shape(sinks),
    }


def gradients(impl: BackwardImpl, bc: BackwardCase) -> SdpaGradients:
    """``impl.backward`` on (copies of) ``bc``: float64 gradients of the inputs' shapes
    (``dbias``, ``dsinks`` None where the case has no bias, sinks); a
    :class:`PropertyViolation` for a missing gradient or a wrong shape."""
    __tracebackhide__ = True
    kw = {key: _copy(val) for key, val in bc.kwargs.items()}
    if bc.dlse is not None:
        kw["dlse"] = bc.dlse.copy()
    res = impl.backward(bc.q.copy(), bc.k.copy(), bc.v.copy(), bc.dout.copy(), **kw)
    if all(hasattr(res, name) for name in ("dq", "dk", "dv")):
        got = [getattr(res, name, None) for name in GRADIENTS]
    else:
        got = [*tuple(res), None, None][:5]
    out: list[F64 | None] = []
    for name, g, want in zip(GRADIENTS, got, _expected_shapes(bc).values(), strict=True):
        if want is None:
            out.append(None)
            continue
        if g is None:
            _fail(impl, bc, f"returned no {name}, expected one of shape {want}")
        arr = np.asarray(g, dtype=np.float64)
        if arr.shape != want:
            _fail(impl, bc, f"{name} has shape {arr.shape}, expected {want}")
        out.append(arr)
    return SdpaGradients(*out)


def gradient_bounds(impl: BackwardImpl, bc: BackwardCase) -> dict[str, F64]:
    """The bound ``impl`` claims on each gradient (module docstring), keyed ``dq`` ...
    ``dsinks``, in the inputs' shapes; inf where a bound says nothing (it overflows)."""
    # the bounds depend on visible positions only: computed with 0 at the hidden ones
    bc = bc.with_case(_poisoned(bc.case, 0.0))
    args = (bc.q, bc.k, bc.v, bc.dout, bc.dlse)
    if impl.accuracy == "accurate":
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            bounds = accurate_backward_bound(*args, **bc.kwargs)
        return {name: np.where(np.isnan(b), np.inf, b) for name, b in bounds.items()}
    bounds = fast_backward_bound(*args, **bc.kwargs)
    if impl.accuracy != "fast":
        c = float(impl.accuracy)
        bounds = {name: c * b for name, b in bounds.items()}
    return bounds


def _forward(impl: BackwardImpl, case: AttentionCase) -> tuple[F64, F64 | None]:
    """The forward's output (and lse, with the feature) on copies of ``case``."""
    kw = {key: _copy(val) for key, val in case.kwargs.items()}
    want_lse = "lse" in impl.features
    if want_lse:
        kw["return_lse"] = True
    res = impl.fn(case.q.copy(), case.k.copy(), case.v.copy(), **kw)
    out, lse = res if want_lse else (res, None)
    return np.asarray(out, dtype=np.float64), None if lse is None else np.asarray(lse, float)


def _forward_bound(impl: BackwardImpl, case: AttentionCase) -> F64:
    """The bound on the forward's output ``impl`` claims (module docstring)."""
    bound, _ = output_bound(impl.forward(), case)
    scale = 1.0 if isinstance(impl.accuracy, str) else float(impl.accuracy)
    return np.broadcast_to(scale * np.asarray(bound), (*case.logits_shape[:-1], case.v.shape[-1]))


def _fit_bc(impl: BackwardImpl, bc: BackwardCase, drop: tuple[str, ...] = ()) -> BackwardCase:
    """The problem without the features ``impl`` lacks and those in ``drop`` (``lse``:
    no dlse)."""
    case = _fit(impl.forward(), bc.case, tuple(d for d in drop if d != "lse"))
    keep_lse = "lse" in impl.features and "lse" not in drop
    return BackwardCase(case, bc.dout, bc.dlse if keep_lse else None)


def _compare(
    impl: BackwardImpl,
    bc: BackwardCase,
    what: str,
    a: Any,
    b: Any,
    allowed: Any,
    where: Bools | None = None,
) -> None:
    """Fail unless ``a`` and ``b`` agree within ``allowed`` (bitwise where it is 0; NaN
    equals NaN)."""
    __tracebackhide__ = True
    a, b = np.broadcast_arrays(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64))
    allowed = np.broadcast_to(np.asarray(allowed, dtype=np.float64), a.shape)
    with np.errstate(invalid="ignore"):
        diff = np.where(same(a, b), 0.0, np.abs(a - b))
        diff = np.where(np.isnan(diff), np.inf, diff)
        bad = (diff > 0) & ~(diff <= allowed) & ~(allowed == np.inf)
    if where is not None:
        bad = bad & np.broadcast_to(where, bad.shape)
    if bad.any():
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            ratio = np.where(bad, diff / np.where(allowed > 0, allowed, ETA), 0.0)
        ratio = np.where(np.isnan(ratio), np.inf, ratio)
        at = tuple(int(i) for i in np.unravel_index(int(np.argmax(ratio)), ratio.shape))
        _fail(
            impl,
            bc,
            f"{what} at index {at}: {a[at]!r} vs {b[at]!r}, |difference| = "
            f"{float(diff[at]):.3g} > allowed {float(allowed[at]):.3g}",
        )


def _compare_all(
    impl: BackwardImpl,
    bc: BackwardCase,
    what: str,
    a: SdpaGradients,
    b: SdpaGradients,
    allowed: dict[str, Any],
    names: tuple[str, ...] = GRADIENTS,
) -> None:
    """:func:`_compare` for each gradient of ``names`` both results have."""
    __tracebackhide__ = True
    for name in names:
        x, y = getattr(a, name), getattr(b, name)
        if x is not None and y is not None:
            _compare(impl, bc, f"{name} {what}", x, y, allowed[name])


def _full(a: Any, shape: tuple[int, ...]) -> Any:
    return np.broadcast_to(np.asarray(a), shape).copy()


def _reduce(full: Bools, shape: tuple[int, ...], how: Callable[..., Any]) -> Bools:
    """``full`` reduced by ``how`` (np.all or np.any) over the axes along which an array
    of ``shape`` broadcasts to it."""
    lead = full.ndim - len(shape)
    out = how(full, axis=tuple(range(lead))) if lead else full
    axes = tuple(a for a in range(len(shape)) if shape[a] == 1 and out.shape[a] != 1)
    return np.asarray(how(out, axis=axes, keepdims=True) if axes else out).reshape(shape)


def _two_d(case: AttentionCase) -> bool:
    return case.q.ndim == 2 and case.k.ndim == 2


def _hidden_keys(case: AttentionCase) -> Bools:
    """Keys no query sees, in ``k.shape[:-1]``: for every query of every head of its
    group and every batch that shares it."""
    seen = case_visibility(case).any(axis=-2)  # (..., Hq, S) or (S,)
    if _two_d(case):
        return np.asarray(~seen)
    hq, hkv = seen.shape[-2], case.k.shape[-3]
    seen = seen.reshape((*seen.shape[:-2], hkv, hq // hkv, seen.shape[-1])).any(axis=-2)
    return np.asarray(~_reduce(np.asarray(seen, dtype=bool), case.k.shape[:-1], np.any))


def _empty_rows(case: AttentionCase) -> Bools:
    """Rows that see no key (the sink apart), in the logits' shape without S."""
    return np.asarray(~case_visibility(case).any(axis=-1))


def _exact_sum(values: Any) -> Fraction:
    """The exact sum of float64 values (NaN and inf: ValueError is avoided by the caller)."""
    return sum((Fraction(float(x)) for x in np.ravel(values)), Fraction(0))


# ---------------------------------------------------------------------------------------
# The propagation of a perturbation of D (closed form), and of weights (key shift)
# ---------------------------------------------------------------------------------------


def _layout_to_inputs(bq: BackwardQuantities, full: dict[str, F64]) -> dict[str, F64]:
    """Full-layout magnitudes ``(..., Hq, *)`` summed to the inputs' shapes: over GQA
    groups (dk, dv), broadcast axes, and for dsinks over the rows; 2-D inputs lose the
    head axis again."""
    out = {}
    for name, x in full.items():
        shape = bq.shapes[name]
        if name in ("dk", "dv"):
            hkv, hq = shape[-3], x.shape[-3]
            x = x.reshape((*x.shape[:-3], hkv, hq // hkv, *x.shape[-2:])).sum(axis=-3)
        if name == "dsinks":
            x = sum_to(x.sum(axis=-1), shape)
        else:
            x = sum_to(x, shape)
        if bq.two_d and name in ("dq", "dk", "dv"):
            x = x[0]
        out[name] = x
    return out


def _finite(a: F64) -> F64:
    return np.where(np.isfinite(a), a, 0.0)


def propagated(bq: BackwardQuantities, weights: F64, sink_w: F64 | None, y: F64) -> dict[str, F64]:
    r""":math:`\Pi(y)`: a bound on how far the exact gradients move when :math:`D_i` (or,
    equally, :math:`d\ell_i`) moves by at most :math:`y_i \ge 0` (shape ``(..., Hq, L,
    1)``), given upper bounds ``weights`` of :math:`P` (``(..., Hq, L, S)``) and
    ``sink_w`` of the sink's weight.

    The gradients are affine in :math:`D`: :math:`\partial dZ_{ij}/\partial D_i =
    -P_{ij}`, the softcap's factor lies in :math:`[0, 1]`, :math:`dV` does not depend on
    :math:`D`. So :math:`\Pi^Z = P y`, :math:`\Pi^Q = |\tau|\, \Pi^Z |K|`,
    :math:`\Pi^K = |\tau|\, (\Pi^Z)^\top |Q|`, :math:`\Pi^b = \Pi^Z`, :math:`\Pi^\sigma_h =
    \sum_i P_{i\sigma} y_i`, :math:`\Pi^V = 0`, each summed to its input's shape; the
    float64 evaluation of these sums of nonnegative terms (relative error
    :math:`\gamma_n \ll 10^{-2}`) is covered by ``SECOND_ORDER``.
    """
    tau = abs(bq.tau)
    pz = weights * y
    with np.errstate(over="ignore", invalid="ignore"):
        full = {
            "dq": tau * (pz @ np.abs(_finite(bq.k))),
            "dk": tau * (np.swapaxes(pz, -1, -2) @ np.abs(_finite(bq.q))),
            "dv": np.zeros((*bq.p.shape[:-2], bq.p.shape[-1], bq.v.shape[-1])),
        }
        if "dbias" in bq.shapes:
            full["dbias"] = pz
        if "dsinks" in bq.shapes and sink_w is not None:
            full["dsinks"] = (sink_w * y)[..., 0]
    return {name: _SO * x for name, x in _layout_to_inputs(bq, full).items()}


# ---------------------------------------------------------------------------------------
# The properties of sdpa_backward
# ---------------------------------------------------------------------------------------


def _mpf_or_none(a: Any) -> Any:
    return None if a is None else np.asarray(a, dtype=object)


@tests_claims()
def check_agreement(impl: BackwardImpl, bc: BackwardCase, dps: int = _DPS) -> None:
    r"""Every gradient agrees with :func:`attnspec.exact.sdpa_backward` (``dps`` digits,
    certified) within the bound the implementation claims (:func:`gradient_bounds`).

    The exact values are rounded to nearest first: an entry passes at once when
    :math:`|\hat g - \mathrm{fl}(g)| + \tfrac12\mathrm{ulp}(\mathrm{fl}(g)) \le B`, and is
    otherwise compared with the exact value itself (mpmath). NaN must be matched by NaN.
    """
    __tracebackhide__ = True
    from attnspec import exact

    bc = _fit_bc(impl, bc)
    got = gradients(impl, bc)
    mid: dict[str, Any] = {"dps": dps, "undecided": "midpoint"}
    want = exact.sdpa_backward(bc.q, bc.k, bc.v, bc.dout, dlse=bc.dlse, **mid, **bc.kwargs)
    bounds = gradient_bounds(impl, bc)
    for name in GRADIENTS:
        c, y = getattr(got, name), getattr(want, name)
        if c is None or y is None:
            continue
        _agree_exactly(impl, bc, name, c, np.asarray(y, dtype=object), bounds[name], dps)


def _agree_exactly(
    impl: BackwardImpl, bc: BackwardCase, name: str, c: F64, y: Any, bound: F64, dps: int
) -> None:
    """``c`` within ``bound`` of the exact ``y`` (mpf), entry by entry (see
    :func:`check_agreement`)."""
    __tracebackhide__ = True
    from attnspec import exact

    y64 = np.asarray(exact.to_float64(y), dtype=np.float64)
    bound = np.broadcast_to(bound, c.shape)
    with np.errstate(invalid="ignore", over="ignore"):
        quick = np.abs(c - y64) + np.spacing(np.abs(y64)) / 2 <= bound
    worst: tuple[float, Any] = (-1.0, None)
    with mpmath.workdps(max(dps, 40)):
        for idx in np.argwhere(~quick):
            at = tuple(int(i) for i in idx)
            err = abs_error(float(c[at]), y[at])
            allowed = mpmath.mpf(float(bound[at])) if mpmath.isfinite(y[at]) else mpmath.mpf(0)
            if err > allowed:
                ratio = float(err / allowed) if allowed > 0 else math.inf
                if ratio > worst[0]:
                    worst = (ratio, (at, err, allowed))
        if worst[1] is not None:
            at, err, allowed = worst[1]
            _fail(
                impl,
                bc,
                f"{name} at {at} is {float(c[at])!r}, exact {mpmath.nstr(y[at], 20)} ({dps} "
                f"digits): error {float(err):.3g}, {worst[0]:.3g} times the "
                f"{impl.accuracy} bound {mpmath.nstr(allowed, 3)}",
            )


@tests_claims("output-gradients-one-row", "sdpa-closed-form")
def check_closed_form(impl: BackwardImpl, bc: BackwardCase, dps: int = _DPS) -> None:
    r"""The closed form holds with :math:`D` taken from the output the implementation
    itself produced (as cuDNN's and FlashAttention's tests take it), not from a separately
    rounded reference output.

    With :math:`\hat O` the implementation's forward output and :math:`\hat D_i =
    \sum_e dO_{ie}\hat O_{ie}` (exact), the reference is the closed form evaluated exactly
    with :math:`\hat D`: since the gradients depend on :math:`D` only through
    :math:`d\ell - D`, it is ``exact.sdpa_backward(dout, dlse)`` plus
    ``exact.sdpa_backward(0, dlse=delta)`` with :math:`\delta = D - \hat D` (rounded to
    float64, :math:`\tilde\delta`). Allowed: the backward's claimed bound :math:`B`,
    plus :math:`\Pi(y)` (:func:`propagated`, with the exact weights rounded up) for

    .. math::

        y_i = \textstyle\sum_e |dO_{ie}| E_{ie} + u|\tilde\delta_i| + \eta
              + 2\cdot 10^{-\mathrm{dps}} \sum_e |dO_{ie}| (|\hat O_{ie}| + E_{ie} + \eta),

    where :math:`E` is the forward's claimed bound: an implementation may take
    :math:`D` from a more accurate output than the one it returns (attnspec's accurate
    path keeps :math:`O` in double-double), and then differs from this reference by
    :math:`\Pi(D - \hat D)`; the other terms are the rounding of :math:`\delta` and the
    :math:`10^{-\mathrm{dps}}` of the exact values. The reference's own digits add
    :math:`2 \cdot 10^{-\mathrm{dps}}(|g| + \eta)`.
    """
    __tracebackhide__ = True
    from attnspec import exact

    bc = _fit_bc(impl, bc)
    case = bc.case
    o_hat, _ = _forward(impl, case)
    got = gradients(impl, bc)
    mid: dict[str, Any] = {"dps": dps, "undecided": "midpoint"}
    want = exact.sdpa_backward(bc.q, bc.k, bc.v, bc.dout, dlse=bc.dlse, **mid, **case.kwargs)
    o_exact = np.asarray(exact.sdpa(bc.q, bc.k, bc.v, **mid, **case.kwargs), dtype=object)
    e_fwd = _forward_bound(impl, case)
    rows = bc.dout.shape[:-1]
    delta = np.empty(rows, dtype=object)
    with mpmath.workdps(dps + 20), np.errstate(invalid="ignore"):
        for idx in np.ndindex(rows):
            delta[idx] = mpmath.fsum(
                mpmath.mpf(float(d)) * (o - mpmath.mpf(float(oh)))
                for d, o, oh in zip(bc.dout[idx], o_exact[idx], o_hat[idx], strict=True)
                if d != 0
            )
    if not all(mpmath.isfinite(x) for x in delta.ravel()):
        _fail(impl, bc, "the forward output is not finite where the exact output is")
    d64 = np.asarray(exact.to_float64(delta), dtype=np.float64) if delta.size else np.zeros(rows)
    ref = {name: _mpf_or_none(getattr(want, name)) for name in GRADIENTS}
    if np.any(d64 != 0):
        extra = exact.sdpa_backward(
            bc.q, bc.k, bc.v, np.zeros_like(bc.dout), dlse=d64, **mid, **case.kwargs
        )
        with mpmath.workdps(dps + 20):
            for name in GRADIENTS:
                if ref[name] is not None:
                    ref[name] = ref[name] + np.asarray(getattr(extra, name), dtype=object)
    abs_do = np.abs(bc.dout)
    with np.errstate(invalid="ignore", over="ignore"):
        y = np.sum(abs_do * e_fwd, axis=-1) + U * np.abs(d64) + ETA
        y = y + 2 * 10.0**-dps * np.sum(abs_do * (np.abs(o_hat) + e_fwd + ETA), axis=-1)
    weights, sink_w = _exact_weights(case, dps)
    bq = quantities(bc.q, bc.k, bc.v, bc.dout, bc.dlse, **case.kwargs)
    y_full = y[None] if bq.two_d else y
    extra_b = propagated(bq, weights, sink_w, y_full[..., None])
    bounds = gradient_bounds(impl, bc)
    for name in GRADIENTS:
        c = getattr(got, name)
        if c is None or ref[name] is None:
            continue
        ref64 = np.asarray(exact.to_float64(ref[name]), dtype=np.float64)
        allowed = bounds[name] + extra_b[name] + 2 * 10.0**-dps * (np.abs(ref64) + ETA)
        _agree_exactly(impl, bc, name, c, ref[name], allowed, dps)


def _exact_weights(case: AttentionCase, dps: int) -> tuple[F64, F64 | None]:
    """Upper bounds of the weights :math:`P` (before dropout; full layout
    ``(..., Hq, L, S)``) and of the sink's weight ``(..., Hq, L, 1)``, from the exact
    forward with values :math:`I_S` (then :math:`O = P`), rounded up by :math:`2u`."""
    from attnspec import exact

    s = case.n_keys
    plain = case.with_kwargs(dropout_mask=None, dropout_p=None)
    eye = np.broadcast_to(np.eye(s), (*case.v.shape[:-2], s, s)).copy()
    mid: dict[str, Any] = {"dps": dps, "undecided": "midpoint"}
    p, lse = exact.sdpa(case.q, case.k, eye, return_lse=True, **mid, **plain.kwargs)
    up = np.asarray(exact.to_float64(p), dtype=np.float64) * (1 + 2 * U)
    if _two_d(case):
        up = up[None]
    sinks = case.kwargs.get("sinks")
    if sinks is None:
        return up, None
    sig = np.broadcast_to(np.asarray(sinks, dtype=np.float64)[..., None], np.shape(lse))
    with mpmath.workdps(dps + 10):
        sink = np.vectorize(
            lambda a, b: float(mpmath.exp(mpmath.mpf(float(a)) - b)), otypes=[float]
        )(sig, np.asarray(lse, dtype=object))
    sink = np.asarray(sink, dtype=np.float64) * (1 + 2 * U)
    return up, (sink[None] if _two_d(case) else sink)[..., None]


@tests_claims("dz-rows-sum")
def check_dz_rows(impl: BackwardImpl, bc: BackwardCase) -> None:
    r"""Claim ``dz-rows-sum``: the rows of :math:`dZ` (``dbias`` of a bias of the
    logits' full shape) sum to :math:`d\ell_i` (to 0 without ``dlse``, and for a row that
    sees nothing); with a sink, :math:`\sum_{b,i,j} dZ_{bhij} + d\sigma_h = \sum_{b,i}
    d\ell_{bhi}` per head.

    Exact in real arithmetic (:math:`\sum_j P_{ij} dP_{ij} = D_i`); the sum of the computed
    entries is taken exactly (fractions), so the allowed error is the sum of the entries'
    bounds.
    """
    __tracebackhide__ = True
    if "mask" not in impl.features:
        return
    bc = _fit_bc(impl, bc)
    shape = bc.case.logits_shape
    bias = bc.kwargs.get("bias")
    full = _full(0.0 if bias is None else bias, shape).astype(np.float64)
    bc = bc.with_case(bc.case.with_kwargs(bias=full))
    got = gradients(impl, bc)
    bounds = gradient_bounds(impl, bc)
    dl = np.zeros(shape[:-1]) if bc.dlse is None else bc.dlse
    dz, b_z = got.dbias, np.broadcast_to(bounds["dbias"], shape)
    if (~np.isfinite(dz) & np.isfinite(b_z)).any():  # where the bound says something
        at = tuple(int(i) for i in np.argwhere(~np.isfinite(dz) & np.isfinite(b_z))[0])
        _fail(impl, bc, f"dbias at {at} is {dz[at]!r}")
    sinks = bc.kwargs.get("sinks")
    if sinks is None:
        empty = _empty_rows(bc.case)
        for idx in np.ndindex(shape[:-1]):
            a = float(_SO * np.sum(b_z[idx]))
            if not math.isfinite(a):
                continue  # an infinite bound (it overflows) says nothing of this row
            total = _exact_sum(dz[idx])
            want = Fraction(0) if empty[idx] else Fraction(float(dl[idx]))
            allowed = Fraction(a)
            if abs(total - want) > allowed:
                _fail(
                    impl,
                    bc,
                    f"the row {idx} of dZ (dbias) sums to {float(total)!r}, expected "
                    f"{float(want)!r} (dlse) within {float(allowed):.3g}",
                )
        return
    ds, b_s = got.dsinks, np.broadcast_to(bounds["dsinks"], np.shape(sinks))
    heads = () if _two_d(bc.case) else (shape[-3],)
    for h in np.ndindex(heads):
        head: tuple[Any, ...] = (..., *h, slice(None), slice(None))
        a = float(_SO * (np.sum(b_z[head]) + b_s[h]))
        if not math.isfinite(a):
            continue  # an infinite bound says nothing of this head
        if not np.isfinite(ds[h]):
            _fail(impl, bc, f"dsinks at {h} is {ds[h]!r}")
        total = _exact_sum(dz[head]) + Fraction(float(ds[h]))
        want = _exact_sum(dl[(..., *h, slice(None))])
        allowed = Fraction(a)
        if abs(total - want) > allowed:
            _fail(
                impl,
                bc,
                f"head {h}: dZ (dbias) summed over its rows plus dsinks is {float(total)!r}, "
                f"expected the sum of dlse {float(want)!r} within {float(allowed):.3g}",
            )


@tests_claims("hidden-zero-gradient")
def check_hidden_gradients(impl: BackwardImpl, bc: BackwardCase, through_bias: bool = True) -> None:
    r"""Claim ``hidden-zero-gradient``: :math:`dK` and :math:`dV` are exactly 0 at keys no
    query sees, ``dbias`` exactly 0 at hidden positions, and NaN, +inf or -inf put at every
    hidden position (k and v of hidden keys, q of rows that see nothing, hidden bias
    entries; :func:`attnspec.spec.properties.attention.check_hidden_values`) give
    **bitwise** the gradients of 0 put there.

    Exact: a hidden position has weight exactly 0 and must be left out, not multiplied by
    it (:math:`0 \cdot \mathrm{NaN} = \mathrm{NaN}`).
    """
    __tracebackhide__ = True
    bc = _fit_bc(impl, bc)
    case = bc.case
    got = gradients(impl, bc)
    hidden = _hidden_keys(case)
    for name in ("dk", "dv"):
        g = getattr(got, name)
        bad = hidden[..., None] & ~(g == 0.0)
        if bad.any():
            at = tuple(int(i) for i in np.argwhere(bad)[0])
            _fail(impl, bc, f"{name} at {at} (a key no query sees) is {g[at]!r}, not 0")
    if got.dbias is not None:
        bias_shape = np.shape(case.kwargs["bias"])
        hidden_b = _reduce(~case_visibility(case), bias_shape, np.all)
        bad = hidden_b & ~(got.dbias == 0.0)
        if bad.any():
            at = tuple(int(i) for i in np.argwhere(bad)[0])
            _fail(impl, bc, f"dbias at {at} (hidden) is {got.dbias[at]!r}, not 0")
    zero = bc.with_case(_poisoned(case, 0.0, through_bias))
    base = gradients(impl, zero)
    for value in (np.nan, np.inf, -np.inf):
        bad_case = bc.with_case(_poisoned(case, float(value), through_bias))
        poisoned = gradients(impl, bad_case)
        zeros = {name: 0.0 for name in GRADIENTS}
        _compare_all(
            impl, bad_case, f"with {value} at hidden positions vs 0", poisoned, base, zeros
        )


@tests_claims("hidden-zero-gradient")
def check_hidden_rows(impl: BackwardImpl, bc: BackwardCase) -> None:
    r"""Claim ``hidden-zero-gradient``: a query row that sees no key gets :math:`dq_i = 0`
    exactly (a sum of exact zeros) and does not change the other gradients: other values
    of its ``dout`` and ``dlse`` give the same :math:`dK`, :math:`dV`, :math:`dQ`,
    ``dbias`` within the sum of the two results' bounds (``dsinks`` apart: with a sink,
    that row's :math:`d\sigma` is its :math:`d\ell_i`).
    """
    __tracebackhide__ = True
    bc = _fit_bc(impl, bc)
    case = bc.case
    empty = _empty_rows(case)
    if not empty.any():
        return
    got = gradients(impl, bc)
    q_empty = _reduce(empty, case.q.shape[:-1], np.all)
    bad = q_empty[..., None] & ~(got.dq == 0.0)
    if bad.any():
        at = tuple(int(i) for i in np.argwhere(bad)[0])
        _fail(impl, bc, f"dq at {at} (its row sees no key) is {got.dq[at]!r}, not 0")
    dout = bc.dout.copy()
    dout[empty] = -2.0 * dout[empty] - 1.5
    dlse = None
    if bc.dlse is not None:
        dlse = bc.dlse.copy()
        dlse[empty] = 0.75 - dlse[empty]
    moved = bc.with_case(case, dout=dout, dlse=dlse)
    other = gradients(impl, moved)
    b1, b2 = gradient_bounds(impl, bc), gradient_bounds(impl, moved)
    names = ("dq", "dk", "dv", "dbias")
    allowed = {name: b1[name] + b2[name] for name in names if name in b1}
    _compare_all(
        impl, moved, "with other dout/dlse in rows that see nothing", other, got, allowed, names
    )


def _permuted(g: F64 | None, axis: int, index: Any) -> F64 | None:
    """``g`` indexed along ``axis`` where that side is not 1 (a broadcast gradient)."""
    if g is None or g.ndim < -axis or g.shape[axis] == 1:
        return g
    return np.take(g, index, axis=axis)


def _check_permuted(
    impl: BackwardImpl,
    bc: BackwardCase,
    moved: BackwardCase,
    inv: Any,
    axes: dict[str, int],
    what: str,
) -> None:
    """The gradients of ``moved``, permuted back by ``inv`` along ``axes`` (gradient ->
    axis), agree with those of ``bc`` within the sum of the two bounds."""
    __tracebackhide__ = True
    g1, g2 = gradients(impl, bc), gradients(impl, moved)
    b1, b2 = gradient_bounds(impl, bc), gradient_bounds(impl, moved)
    for name in GRADIENTS:
        a, b = getattr(g2, name), getattr(g1, name)
        if a is None or b is None:
            continue
        axis = axes.get(name)
        bound2 = np.broadcast_to(b2[name], a.shape)
        if axis is not None:
            a, bound2 = _permuted(a, axis, inv), np.asarray(_permuted(bound2, axis, inv))
        _compare(impl, moved, f"{name} {what}", a, b, b1[name] + bound2)


@tests_claims("permutation-gradients")
def check_query_permutation(impl: BackwardImpl, bc: BackwardCase, perm: Any = None) -> None:
    r"""Claim ``permutation-gradients`` (queries): permuting the queries, the rows of
    ``dout``, ``dlse``, mask, bias and keep-mask permutes :math:`dQ` (and the rows of
    ``dbias``) and leaves :math:`dK`, :math:`dV`, :math:`d\sigma` unchanged.

    Causal and window visibility are folded into the mask; ALiBi is dropped (positional).
    Allowed: the sum of the two results' bounds (sums over rows change order).
    """
    __tracebackhide__ = True
    bc = _fit_bc(impl, bc, ("alibi",))
    case = _materialise(bc.case)
    pi = np.arange(case.n_queries)[::-1] if perm is None else np.asarray(perm, dtype=np.intp)
    inv = np.argsort(pi)
    moved_case = AttentionCase(np.take(case.q, pi, axis=-2), case.k, case.v, _rowwise(case, pi))
    moved = BackwardCase(
        moved_case,
        np.take(bc.dout, pi, axis=-2),
        None if bc.dlse is None else np.take(bc.dlse, pi, axis=-1),
    )
    _check_permuted(
        impl,
        bc.with_case(case),
        moved,
        inv,
        {"dq": -2, "dbias": -2},
        "with the queries permuted back",
    )


@tests_claims("permutation-gradients")
def check_key_permutation(impl: BackwardImpl, bc: BackwardCase, perm: Any = None) -> None:
    r"""Claim ``permutation-gradients`` (keys with values): permuting keys and values
    together, and the columns of mask, bias and keep-mask, permutes :math:`dK`,
    :math:`dV` (and the columns of ``dbias``) and leaves :math:`dQ`, :math:`d\sigma`
    unchanged. Causal and window are folded into the mask; ALiBi is dropped. Allowed: the
    sum of the two results' bounds.
    """
    __tracebackhide__ = True
    bc = _fit_bc(impl, bc, ("alibi",))
    case = _materialise(bc.case)
    pi = np.arange(case.n_keys)[::-1] if perm is None else np.asarray(perm, dtype=np.intp)
    inv = np.argsort(pi)
    kw = _colwise(case.kwargs, pi)
    moved_case = AttentionCase(
        case.q, np.take(case.k, pi, axis=-2), np.take(case.v, pi, axis=-2), kw
    )
    moved = bc.with_case(moved_case)
    axes = {"dk": -2, "dv": -2, "dbias": -1}
    _check_permuted(impl, bc.with_case(case), moved, inv, axes, "with the keys permuted back")


@tests_claims("key-shift-gradients")
def check_key_shift(impl: BackwardImpl, bc: BackwardCase, shift: Any = None) -> None:
    r"""Claim ``key-shift-gradients``: :math:`K + \mathbf{1}u^\top` leaves :math:`dQ`,
    :math:`dK` (and :math:`dV`, ``dbias``) unchanged when :math:`d\ell = 0` and there is
    no sink (the rows of :math:`dS` then sum to 0, so :math:`dS\,\mathbf 1 u^\top = 0`).

    Softcap and sinks are dropped, ``dlse`` set to 0. :math:`\mathrm{fl}(k_j + u) = k_j +
    u + r_j` rounds (:math:`r` exact, TwoSum), so the exact logits of the shifted problem
    are :math:`s_{ij} + \tau q_i \cdot u + e_{ij}` with :math:`|e_{ij}| \le \delta_i =
    |\tau|\max_j \sum_e |q_{ie}||r_{je}|` (as in the attention check). With
    :math:`f_i` = :func:`~attnspec.spec.tolerances._core.perturbation_factor`
    :math:`(\delta_i)`: :math:`|P' - P| \le f P`, :math:`|D' - D| \le f S_i` with
    :math:`S_i = \sum_j P_{ij}|dP_{ij}|`, and

    .. math::

        |dZ' - dZ| \le \Delta^Z = f P (|dP| + |D| + f S) + f P S,

        |dQ' - dQ| \le |\tau| (\Delta^Z |K| + (M^Z + \Delta^Z)|r|), \quad
        |dK' - dK| \le |\tau| (\Delta^Z)^\top |Q|, \quad
        |dV' - dV| \le (f \tilde P)^\top |dO|,

    (:math:`M^Z = P(|dP| + |D|) \ge |dZ|`; ``dbias``: :math:`\Delta^Z`), summed to the
    inputs' shapes, evaluated in float64 from the plain quantities (second order,
    ``SECOND_ORDER``); allowed: that plus the two results' bounds. Default shift
    :math:`u = (1.5, -0.75, \dots)`.
    """
    __tracebackhide__ = True
    bc = _fit_bc(impl, bc, ("softcap", "sinks", "lse"))
    case = bc.case
    width = case.q.shape[-1]
    u = (
        np.array([1.5 if e % 2 == 0 else -0.75 for e in range(width)])
        if shift is None
        else np.asarray(shift, dtype=np.float64)
    )
    with np.errstate(invalid="ignore"):
        k2 = case.k + u
    r = two_sum_error(case.k, np.broadcast_to(u, case.k.shape))
    moved = bc.with_case(replace(case, k=k2))
    g1, g2 = gradients(impl, bc), gradients(impl, moved)
    b1, b2 = gradient_bounds(impl, bc), gradient_bounds(impl, moved)
    bq = quantities(bc.q, bc.k, bc.v, bc.dout, None, **case.kwargs)
    r_full = r[None] if bq.two_d else r
    if not bq.two_d:
        r_full = np.repeat(r_full, bq.p.shape[-3] // r.shape[-3], axis=-3)
    tau = abs(bq.tau)
    abs_q, abs_k = np.abs(_finite(bq.q)), np.abs(_finite(bq.k))
    with np.errstate(invalid="ignore", over="ignore"):
        delta = tau * np.max(
            np.where(bq.seen, abs_q @ np.swapaxes(np.abs(r_full), -1, -2), 0.0),
            axis=-1,
            keepdims=True,
            initial=0.0,
        )
        f = np.asarray(perturbation_factor(delta))
        abs_dp = np.abs(bq.dp)
        s_row = np.sum(bq.p * abs_dp, axis=-1, keepdims=True)
        mz = bq.p * (abs_dp + np.abs(bq.big_d))
        dz = f * bq.p * (abs_dp + np.abs(bq.big_d) + f * s_row) + f * bq.p * s_row
        full = {
            "dq": tau * (dz @ abs_k + (mz + dz) @ np.abs(_finite(r_full))),
            "dk": tau * (np.swapaxes(dz, -1, -2) @ abs_q),
            "dv": np.swapaxes(f * bq.pd, -1, -2) @ np.abs(bq.dout),
        }
        if "dbias" in bq.shapes:
            full["dbias"] = dz
    extra = {name: _SO * x for name, x in _layout_to_inputs(bq, full).items()}
    names = tuple(n for n in ("dq", "dk", "dv", "dbias") if n in extra)
    allowed: dict[str, Any] = {name: b1[name] + b2[name] + extra[name] for name in names}
    _compare_all(impl, moved, "with every key shifted", g2, g1, allowed, names)


@tests_claims("gqa-gradient")
def check_gqa(impl: BackwardImpl, bc: BackwardCase) -> None:
    r"""Claim ``gqa-gradient``: the gradients of grouped-query attention are those of the
    kv heads repeated (:math:`h \mapsto h // G`), :math:`dK` and :math:`dV` summed over
    each group of :math:`G` query heads.

    Allowed: the two results' bounds (the repeated ones summed over the group) and the
    rounding of that sum here, :math:`\gamma_{G-1}\sum|dK^{rep}|` (Higham 2002, eq. 3.5).
    """
    __tracebackhide__ = True
    if "gqa" not in impl.features:
        return
    bc = _fit_bc(impl, bc)
    case = bc.case
    if case.q.ndim < 3 or case.k.ndim < 3:
        return
    groups = case.q.shape[-3] // case.k.shape[-3]
    rep_case = replace(
        case, k=np.repeat(case.k, groups, axis=-3), v=np.repeat(case.v, groups, axis=-3)
    )
    rep = bc.with_case(rep_case)
    g1, g2 = gradients(impl, bc), gradients(impl, rep)
    b1, b2 = gradient_bounds(impl, bc), gradient_bounds(impl, rep)

    def grouped(x: F64) -> F64:
        return x.reshape((*x.shape[:-3], x.shape[-3] // groups, groups, *x.shape[-2:])).sum(-3)

    summed, allowed = {}, {}
    for name in ("dk", "dv"):
        x = getattr(g2, name)
        summed[name] = grouped(x)
        with np.errstate(invalid="ignore", over="ignore"):
            allowed[name] = (
                b1[name]
                + grouped(np.broadcast_to(b2[name], x.shape))
                + float(gamma(max(groups - 1, 0))) * grouped(np.abs(x))
            )
    for name in ("dq", "dbias", "dsinks"):
        if name in b1:
            summed[name] = getattr(g2, name)
            allowed[name] = b1[name] + b2[name]
    _compare_all(
        impl,
        rep,
        "of GQA vs the repeated heads summed over each group",
        g1,
        SdpaGradients(**{n: summed.get(n) for n in GRADIENTS}),
        allowed,
    )


# --- central differences ----------------------------------------------------------------

#: the inputs a central difference steps along, and the gradient of each
_STEPPED = {"q": "dq", "k": "dk", "v": "dv", "bias": "dbias", "sinks": "dsinks"}


def _direction(x: F64, seed: int, cap: int) -> tuple[F64, int]:
    r"""A direction :math:`d \in \{-1, 0, 1\}` (fixed signs from ``seed``) and the
    exponent :math:`e` of the step :math:`h = 2^e`, :math:`e = \max(\min(\lfloor\log_2
    \max|x|\rfloor - 50, \mathrm{cap}), -1074)`: :math:`x \pm h d` are computed exactly
    or :math:`d` is 0 there (TwoSum: the rounding error must be 0; non-finite entries get
    0)."""
    finite = np.isfinite(x)
    top = float(np.max(np.abs(np.where(finite, x, 0.0)), initial=0.0))
    e = (math.frexp(top)[1] - 1 if top > 0 else 0) - 50
    e = max(min(e, cap), -1074)
    h = math.ldexp(1.0, e)
    rng = np.random.default_rng(seed)
    d = rng.choice(np.array([-1.0, 1.0]), size=x.shape) if x.size else np.zeros(x.shape)
    with np.errstate(invalid="ignore", over="ignore"):
        step = h * d
        exact_step = (
            finite
            & (two_sum_error(x, step) == 0)
            & (two_sum_error(x, -step) == 0)
            & np.isfinite(x + step)
            & np.isfinite(x - step)
        )
    return np.where(exact_step, d, 0.0), e


def _loss(bc: BackwardCase, dps: int) -> tuple[Any, float]:
    r""":math:`\phi = \sum dO \odot O + \sum_{\ell_i \text{ finite}} d\ell_i \ell_i` by
    :func:`attnspec.exact.sdpa` at ``dps`` digits, and a bound on its error:
    :math:`10^{-\mathrm{dps}}` of each term's magnitude (:math:`\eta` floor; the exact
    results' guarantee) and the rounding of the sum at ``dps + 20`` digits."""
    from attnspec import exact

    mid: dict[str, Any] = {"dps": dps, "undecided": "midpoint"}
    out, lse = exact.sdpa(bc.q, bc.k, bc.v, return_lse=True, **mid, **bc.kwargs)
    out = np.asarray(out, dtype=object)
    lse = np.asarray(lse, dtype=object)
    with mpmath.workdps(dps + 20):
        terms = [
            mpmath.mpf(float(d)) * o for d, o in zip(bc.dout.ravel(), out.ravel(), strict=True)
        ]
        if bc.dlse is not None:
            terms += [
                mpmath.mpf(float(d)) * x
                for d, x in zip(bc.dlse.ravel(), lse.ravel(), strict=True)
                if mpmath.isfinite(x)
            ]
        value = mpmath.fsum(terms)
        magnitude = mpmath.fsum(abs(t) for t in terms) + len(terms) * mpmath.mpf(ETA)
        err = float(magnitude * (mpmath.mpf(10) ** -dps + mpmath.mpf(10) ** -(dps + 15)))
    return value, err * _SO + ETA


def _logit_rates(bq: BackwardQuantities, case: AttentionCase, name: str, d: F64) -> F64:
    r""":math:`m_{1,i} = \max_j |w_{ij}|`: how fast the logits of row :math:`i` (visible
    keys and the sink) move per unit step along ``d`` (before a softcap), shape
    ``(..., Hq, L)``."""
    seen = bq.seen
    tau = abs(bq.tau)
    with np.errstate(invalid="ignore", over="ignore"):
        if name == "q":
            dd = d[None] if bq.two_d else d
            w = tau * (np.abs(dd) @ np.swapaxes(np.abs(_finite(bq.k)), -1, -2))
        elif name == "k":
            dd = d[None] if bq.two_d else np.repeat(d, bq.p.shape[-3] // d.shape[-3], axis=-3)
            w = tau * (np.abs(_finite(bq.q)) @ np.swapaxes(np.abs(dd), -1, -2))
        elif name == "bias":
            w = np.broadcast_to(np.abs(d), seen.shape)
        else:
            w = np.zeros(seen.shape)
        m1 = np.max(np.where(seen, w, 0.0), axis=-1, initial=0.0)
    if name == "sinks":  # only the sink's logit moves
        sig = np.abs(d)
        m1 = np.broadcast_to(sig[..., None] if np.ndim(sig) else sig, m1.shape)
    return np.asarray(m1, dtype=np.float64)


def _truncation(
    bq: BackwardQuantities, case: AttentionCase, name: str, d: F64, dlse: F64 | None, h: float
) -> float:
    r"""A bound on :math:`\tfrac{h^2}{6}\max_{|t| \le h}|\phi'''(t)|` along ``d`` (see
    :func:`check_central_differences`), summed over the rows, evaluated with the scaled
    rates :math:`\omega h` (no overflow: :math:`m_1 h \le 2^{-40}`)."""
    if name == "v":  # phi is affine in v
        return 0.0
    seen = bq.seen
    keep: Any = 1.0
    if case.kwargs.get("dropout_mask") is not None:
        p_drop = float(case.kwargs.get("dropout_p", 0.0))
        mask = np.broadcast_to(np.asarray(case.kwargs["dropout_mask"], dtype=bool), seen.shape)
        keep = mask / (1 - p_drop)
    with np.errstate(invalid="ignore", over="ignore"):
        a_mag = (np.abs(bq.dout) @ np.swapaxes(np.abs(_finite(bq.v)), -1, -2)) * keep
        alpha = 2 * _SO * np.max(np.where(seen, a_mag, 0.0), axis=-1, initial=0.0)
        lam = np.zeros(alpha.shape)
        if dlse is not None:
            lam = np.abs(dlse[None] if bq.two_d else dlse)
        x1 = _SO * _logit_rates(bq, case, name, d) * h  # m_1 h
        w1 = 2 * x1  # omega_1 h
        third = (4 * alpha + lam) * w1**3
        cap = case.kwargs.get("softcap")
        if cap is not None and name in ("q", "k"):
            c = float(cap)
            w2 = 2 * 0.77 * x1**2 / c  # omega_2 h^2
            m3 = 2 * x1**3 / c**2  # m_3 h^3
            third = third + 3 * (alpha + lam) * w1 * w2 + alpha * 2 * m3 + lam * m3
        live = seen.any(axis=-1) | (case.kwargs.get("sinks") is not None)
        total = float(np.sum(np.where(live & (third > 0), third, 0.0)))
    return _SO * total / (6 * h)


@tests_claims(
    "sdpa-closed-form",
    "softcap-gradient",
    "bias-gradient",
    "sink-gradient",
    "dropout-gradient",
    "central-difference-error",
)
def check_central_differences(impl: BackwardImpl, bc: BackwardCase, dps: int | None = None) -> None:
    r"""Claims ``sdpa-closed-form`` and its modifiers (softcap, bias, sink, dropout): the
    gradients are the derivative of the forward, against central differences of the loss
    :math:`\phi(x) = \sum dO \odot O + \sum d\ell \odot \ell` evaluated exactly
    (:func:`attnspec.exact.sdpa`), along one direction per input (q, k, v, bias, sinks).

    For an input :math:`x`, a direction :math:`d \in \{-1,0,1\}` and a step :math:`h =
    2^e` such that :math:`x \pm hd` are exact float64 (:func:`_direction`):

    .. math::

        \Big|\tfrac{\phi(x + hd) - \phi(x - hd)}{2h} - \phi'(0)\Big|
        \le \tfrac{h^2}{6} \max_{|t| \le h} |\phi'''(t)| + \tfrac{\epsilon_+ + \epsilon_-}{2h}

    (Taylor with the Lagrange remainder; :math:`\epsilon` the exact evaluations' errors,
    :func:`_loss`; claim ``central-difference-error``). The third derivative is bounded,
    not estimated: :math:`\phi = \sum_i \psi_i` with :math:`\psi_i(z) = E_{P}[a] +
    \lambda\, \mathrm{LSE}(z)` over the visible keys and the sink of row :math:`i`
    (:math:`a_j = dP_{ij}`, the sink's :math:`a = 0`; :math:`\lambda = d\ell_i`). Its
    derivatives are joint cumulants under :math:`P`: :math:`D\psi[y] = \mathrm{Cov}(a, y)
    + \lambda E[y]`, :math:`D^2\psi = \kappa(a, y_1, y_2) + \lambda\mathrm{Cov}`,
    :math:`D^3\psi = \kappa(a, y_1, y_2, y_3) + \lambda\kappa(y_1, y_2, y_3)`; with the
    ranges :math:`\alpha` of :math:`a` and :math:`\omega_k` of :math:`y_k`, the centered
    moments give :math:`|\kappa(a,y,y,y)| \le 4\alpha\omega^3`, :math:`|\kappa(y,y,y)|
    \le \omega^3`, :math:`|\kappa(a, y_1, y_2)| \le \alpha\omega_1\omega_2`. Along q, k,
    bias or sinks (without softcap) the logits are affine in :math:`t`, :math:`z' = w`:
    :math:`|\psi'''| \le (4\alpha + |\lambda|)\omega^3`. Along v, :math:`\phi` is affine:
    the quotient is exact. Through a softcap, :math:`z = c\tanh((s + tw)/c)` has
    :math:`|z'| \le |w|`, :math:`|z''| \le 0.77 w^2/c` (:math:`\max|2\tanh\,
    \mathrm{sech}^2| = 4/(3\sqrt3)`), :math:`|z'''| \le 2|w|^3/c^2`, and
    :math:`\psi''' = D^3\psi[z',z',z'] + 3D^2\psi[z', z''] + D\psi[z''']` gives
    :math:`(4\alpha + |\lambda|)\omega_1^3 + 3(\alpha + |\lambda|)\omega_1\omega_2 +
    \alpha\omega_3 + |\lambda| m_3`. Ranges are bounded by twice the maxima (:math:`w`,
    :math:`a` from :math:`|dO||V|^\top\kappa r`), the products in float64 rounded up by
    ``SECOND_ORDER``.

    Compared: :math:`\langle \hat g, d\rangle` (exact) with the quotient; allowed
    :math:`\langle B, |d|\rangle` (the gradient's claimed bound) plus both error terms.
    ``dps`` (default: chosen so that the evaluation error is below :math:`2^{-20}` of the
    allowed total, at least 50) sets the exact evaluations' digits.
    """
    __tracebackhide__ = True
    bc = _fit_bc(impl, bc)
    case = bc.case
    got = gradients(impl, bc)
    bounds = gradient_bounds(impl, bc)
    bq = quantities(bc.q, bc.k, bc.v, bc.dout, bc.dlse, **case.kwargs)
    arrays = {"q": case.q, "k": case.k, "v": case.v}
    for key in ("bias", "sinks"):
        if case.kwargs.get(key) is not None:
            arrays[key] = np.asarray(case.kwargs[key], dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        out_plain, lse_plain = _forward_plain(case)
    for seed, (name, x) in enumerate(arrays.items()):
        # the step: at most 2**-40 / m_1 (logits move by at most 2**-40), so that the
        # truncation stays far below the claimed bounds
        rate = float(np.max(_logit_rates(bq, case, name, np.ones(x.shape)), initial=0.0))
        cap = math.frexp(2.0**-40 / rate)[1] - 1 if rate > 0 else 1023
        d, e = _direction(x, seed, cap)
        if not d.any():
            continue
        grad = getattr(got, _STEPPED[name])
        bound = np.broadcast_to(bounds[_STEPPED[name]], x.shape)
        with np.errstate(invalid="ignore", over="ignore"):
            allowed_b = float(_SO * np.sum(np.where(d != 0, bound, 0.0)))
        if not math.isfinite(allowed_b):
            continue  # an infinite bound (it overflows) says nothing along this direction
        h = math.ldexp(1.0, e)
        trunc = _truncation(bq, case, name, d, bc.dlse, h)
        digits = dps if dps is not None else _digits_needed(bc, out_plain, lse_plain, h, allowed_b)
        phi_p, err_p = _loss(_stepped(bc, name, x + h * d), digits)
        phi_m, err_m = _loss(_stepped(bc, name, x - h * d), digits)
        with mpmath.workprec(2300):
            dot = mpmath.fsum(
                mpmath.mpf(float(gi)) * int(di)
                for gi, di in zip(grad.ravel(), d.ravel(), strict=True)
                if di != 0
            )
            two_h = mpmath.ldexp(1, e + 1)
            quotient = (phi_p - phi_m) / two_h
            allowed = (
                mpmath.mpf(allowed_b)
                + mpmath.mpf(trunc)
                + (mpmath.mpf(err_p) + mpmath.mpf(err_m)) / two_h
            )
            diff = abs(dot - quotient)
            if not diff <= allowed:
                _fail(
                    impl,
                    bc,
                    f"<d{name}, d> = {mpmath.nstr(dot, 17)} for the direction d = "
                    f"{array_repr(d)}, but the central difference of the exact forward "
                    f"(h = 2**{e}) gives {mpmath.nstr(quotient, 17)}: off by "
                    f"{mpmath.nstr(diff, 3)} > allowed {mpmath.nstr(allowed, 3)} (claimed "
                    f"bound {allowed_b:.3g}, truncation {trunc:.3g})",
                )


def _forward_plain(case: AttentionCase) -> tuple[F64, F64]:
    """The float64 forward (attnspec, fast) and its lse: magnitudes for choosing digits
    only."""
    import attnspec

    out, lse = attnspec.sdpa(
        case.q, case.k, case.v, precision="fast", return_lse=True, **case.kwargs
    )
    return np.asarray(out, dtype=np.float64), np.asarray(lse, dtype=np.float64)


def _digits_needed(bc: BackwardCase, out: F64, lse: F64, h: float, allowed: float) -> int:
    r"""Digits for the exact evaluations so that their error over :math:`2h` is below
    :math:`2^{-20}` of ``allowed``: the loss's terms are estimated from the float64
    forward, :math:`\sum|dO|(|O| + 1) + \sum|d\ell|(|\ell| + 1)`, at most 1200 digits
    (an estimate only: :func:`_loss` bounds the error actually made, and the check allows
    it)."""
    with np.errstate(invalid="ignore", over="ignore"):
        mag = float(np.sum(np.abs(bc.dout) * (np.where(np.isfinite(out), np.abs(out), 0.0) + 1)))
        if bc.dlse is not None:
            finite_lse = np.where(np.isfinite(lse), np.abs(lse), 0.0)
            mag += float(np.sum(np.abs(bc.dlse) * (finite_lse + 1)))
    mag = max(mag, 1.0)
    target = max(allowed, ETA) * 2.0**-20 * h
    if not (target > 0 and math.isfinite(mag)):
        return 400
    need = math.log10(mag) - math.log10(target)
    return int(min(max(_DPS, math.ceil(need) + 5), 1200))


def _stepped(bc: BackwardCase, name: str, x: F64) -> BackwardCase:
    case = bc.case
    if name in ("q", "k", "v"):
        changes: dict[str, Any] = {name: x}
        return bc.with_case(replace(case, **changes))
    return bc.with_case(case.with_kwargs(**{name: x}))


@tests_claims("lse-gradient-is-weights")
def check_lse_gradient(impl: BackwardImpl, bc: BackwardCase) -> None:
    r"""Claim ``lse-gradient-is-weights``: with :math:`dO = 0` and :math:`d\ell = e_r` (one
    row), ``dbias`` (of a full-shape bias) is :math:`P_r` in row :math:`r` and 0 elsewhere,
    and :math:`d\sigma` is the sink's weight :math:`P_{r\sigma} = 1 - \sum_j P_{rj}`.

    :math:`P` is read from the forward with values :math:`I_S` and dropout dropped (the
    gradient of the lse is the weights before dropout); allowed: the backward's bound plus
    the forward's (its sum over the row for the sink).
    """
    __tracebackhide__ = True
    if not {"mask", "lse"} <= impl.features:
        return
    bc = _fit_bc(impl, bc)
    case = bc.case
    shape = case.logits_shape
    visible = ~_empty_rows(case)
    if case.kwargs.get("sinks") is not None:
        visible = np.ones(shape[:-1], dtype=bool)
    if not visible.any():
        return
    row = tuple(int(i) for i in np.argwhere(visible)[-1])
    dlse = np.zeros(shape[:-1])
    dlse[row] = 1.0
    bias = case.kwargs.get("bias")
    full = _full(0.0 if bias is None else bias, shape).astype(np.float64)
    lcase = case.with_kwargs(bias=full)
    lbc = BackwardCase(lcase, np.zeros_like(bc.dout), dlse)
    got = gradients(impl, lbc)
    bounds = gradient_bounds(impl, lbc)
    plain = lcase.with_kwargs(dropout_mask=None, dropout_p=None)
    s = case.n_keys
    eye = np.broadcast_to(np.eye(s), (*case.v.shape[:-2], s, s)).copy()
    pcase = replace(plain, v=eye)
    p, _ = _forward(impl, pcase)
    e_p = _forward_bound(impl, pcase)
    want = np.zeros(shape)
    want[row] = p[row]
    allowed = np.asarray(bounds["dbias"]).copy()
    allowed = np.broadcast_to(allowed, shape).copy()
    allowed[row] = allowed[row] + e_p[row]
    _compare(impl, lbc, "dbias for dout = 0, dlse = e_r vs the weights P", got.dbias, want, allowed)
    if got.dsinks is not None:
        head = () if _two_d(case) else (row[-2],)
        a = float(_SO * (np.sum(e_p[row]) + np.ravel(bounds["dsinks"])[head[0] if head else 0]))
        if not math.isfinite(a):
            return  # an infinite bound (it overflows) says nothing of the sink's gradient
        if not np.isfinite(got.dsinks[head]).all():
            _fail(impl, lbc, f"dsinks for dout = 0, dlse = e_{row} is {got.dsinks[head]!r}")
        sink = 1 - _exact_sum(p[row])
        total = _exact_sum(got.dsinks[head]) if np.ndim(got.dsinks) else Fraction(float(got.dsinks))
        slack = Fraction(a)
        if abs(total - sink) > slack:
            _fail(
                impl,
                lbc,
                f"dsinks for dout = 0, dlse = e_{row} is {float(total)!r}, the sink's weight "
                f"1 - sum_j P_rj is {float(sink)!r}: off by more than {float(slack):.3g}",
            )


# ---------------------------------------------------------------------------------------
# The softmax family's gradients
# ---------------------------------------------------------------------------------------


def family_bound(
    kind: str,
    accuracy: object,
    x: F64,
    included: Bools,
    g: F64,
    p: F64,
    y: F64,
) -> F64:
    r"""A bound on the error of a computed gradient of ``kind`` (one of
    :data:`FAMILY_KINDS`) for rows ``x`` (R, n) with ``included`` entries, the upstream
    ``g`` (R, n) (logsumexp_vjp: (R, 1)), the exact weights ``p`` rounded up and the
    exact result ``y``; excluded entries: 0 (the result must be exactly 0 there).

    The closed forms and their magnitudes :math:`M` (the closed form with every factor
    replaced by its magnitude), :math:`m = \sum_k p_k g_k`, :math:`T = \sum_k g_k` over
    the included entries, :math:`G = \sum_k |g_k|`:

    * softmax_vjp, softmax_jvp: :math:`y_j = p_j(g_j - m)`, :math:`M_j = p_j(|g_j| +
      \sum_k p_k |g_k|)`;
    * log_softmax_vjp: :math:`y_j = g_j - p_j T`, :math:`M_j = |g_j| + p_j G`;
    * logsumexp_vjp: :math:`y_j = g\, p_j`, :math:`M_j = |g| p_j`.

    "accurate" (double-double, the operation errors of
    :func:`~attnspec.spec.tolerances.backward.accurate_backward_bound`'s derivation): the
    weights within :math:`2^{-62}` relative (:math:`\eta` absolute below
    :math:`2^{-969}`), a product with ones (``dot_dd``) within :math:`2^{-56}\sum|a||b|`,
    each double-double operation within :math:`4u^2` of its operands' magnitude: at most
    :math:`(2^{-62} + 2^{-56} + 12u^2) M < u M` before the final rounding :math:`u|y|`;
    the floor :math:`\eta(1 + |g_j| + G)`. So :math:`u|y| + u M + \eta(1 + |g_j| + G)`
    (the form of the accurate backward bound).

    "fast" (textbook float64): the weights :math:`\hat p` within :math:`\rho_j p_j +
    \alpha_j` (:func:`attnspec.spec.tolerances.softmax.softmax_fast_bound`), then, first
    order, for :math:`\hat m = \mathrm{fl}(\sum_k \hat p_k g_k)`: :math:`E_m = \sum_k
    |g_k|(\rho_k p_k + \alpha_k) + \gamma_n \sum_k p_k|g_k|` (Higham 2002, eq. 3.5);
    for :math:`p_j(g_j - m)` or :math:`p_j g_j - p_j m` (either order):
    :math:`(\rho_j p_j + \alpha_j)(|g_j| + |m|) + p_j E_m + 2u\, p_j(|g_j| + |m|)`;
    for :math:`g_j - p_j T`: :math:`(\rho_j p_j + \alpha_j)G + p_j\gamma_n G +
    2u p_j G + u|g_j|`; for :math:`g p_j`: :math:`|g|((\rho_j + u)p_j + \alpha_j)`; all
    times ``SECOND_ORDER``, plus :math:`2\eta` for products that underflow.

    A number :math:`c`: :math:`c` times the fast bound.
    """
    n = included.sum(axis=-1, keepdims=True).astype(np.float64)
    gi = np.where(included, g, 0.0) if kind != "logsumexp_vjp" else g
    pa = np.where(included, p, 0.0)
    with np.errstate(invalid="ignore", over="ignore"):
        if kind in ("softmax_vjp", "softmax_jvp"):
            pg = np.sum(pa * np.abs(gi), axis=-1, keepdims=True)
            mag = pa * (np.abs(gi) + pg)
            floor = ETA * (1 + np.abs(gi) + np.sum(np.abs(gi), axis=-1, keepdims=True))
        elif kind == "log_softmax_vjp":
            big_g = np.sum(np.abs(gi), axis=-1, keepdims=True)
            mag = np.abs(gi) + pa * big_g
            floor = ETA * (1 + np.abs(gi) + big_g)
        elif kind == "logsumexp_vjp":
            mag = np.abs(g) * pa
            floor = ETA * (1 + np.abs(g))
        else:
            raise ValueError(f"kind must be one of {FAMILY_KINDS}, got {kind!r}")
        if accuracy == "accurate":
            out = _SO * (U * np.abs(y) + U * mag) + floor
        else:
            rel, absolute = stol.softmax_fast_bound(x, included)
            pe = rel * pa + absolute  # the weights' error
            if kind in ("softmax_vjp", "softmax_jvp"):
                e_m = np.sum(np.abs(gi) * pe, axis=-1, keepdims=True) + gamma(np.maximum(n, 1)) * pg
                out = pe * (np.abs(gi) + pg) + pa * e_m + 2 * U * pa * (np.abs(gi) + pg)
            elif kind == "log_softmax_vjp":
                out = pe * big_g + pa * gamma(np.maximum(n, 1)) * big_g + 2 * U * pa * big_g
                out = out + U * np.abs(gi)
            else:
                out = np.abs(g) * ((rel + U) * pa + absolute)
            out = _SO * out + 2 * ETA
            if not isinstance(accuracy, str):
                out = float(accuracy) * out  # type: ignore[arg-type]
    return np.where(included, out, 0.0)


class _Slices:
    """One family problem as rows: x, where, the exact weights, g (and g_lse)."""

    def __init__(self, impl: BackwardImpl, fc: FamilyGradCase) -> None:
        from attnspec import exact

        self.impl, self.fc = impl, fc
        self.lay = slice_layout(fc.x.shape, fc.axis)
        self.x = self.lay.to_rows(fc.x)
        w = np.ones(fc.x.shape, dtype=bool)
        if fc.where is not None:
            w = np.broadcast_to(np.asarray(fc.where, dtype=bool), fc.x.shape)
        self.incl = np.asarray(self.lay.to_rows(w), dtype=bool) & (self.x > -np.inf)
        mid: dict[str, Any] = {"dps": _DPS, "undecided": "midpoint"}
        self.p_exact = self.lay.to_rows(
            np.asarray(exact.softmax(fc.x, fc.axis, where=fc.where, **mid), dtype=object)
        )
        p64 = (
            np.asarray(exact.to_float64(self.p_exact), dtype=np.float64)
            if self.p_exact.size
            else np.zeros(self.x.shape)
        )
        self.p_up = p64 * (1 + 2 * U)

    def call(self, kind: str, g: F64) -> F64:
        """``kind`` on (copies of) x and ``g`` (x's shape, or logsumexp's), as rows."""
        __tracebackhide__ = True
        fc = self.fc
        where = None if fc.where is None else fc.where.copy()
        out = np.asarray(self.impl.family_fn(kind)(fc.x.copy(), g.copy(), fc.axis, where))
        if out.shape != fc.x.shape:
            self.fail(kind, g, f"returned shape {out.shape}, expected {fc.x.shape}")
        return self.lay.to_rows(out.astype(np.float64))

    def fail(self, kind: str, g: F64, detail: str) -> None:
        __tracebackhide__ = True
        fc = self.fc
        w = "" if fc.where is None else f", where={array_repr(fc.where)}"
        args = f"x={array_repr(fc.x)}, g={array_repr(g)}, axis={fc.axis!r}{w}"
        raise PropertyViolation(
            caller_name(), self.impl.name, detail, self.impl.reproduce(args, kind)
        )

    def exact(self, kind: str, g_rows: F64) -> Any:
        """The closed form of ``kind`` from the exact weights (mpf rows, 0 excluded)."""
        out = np.empty(self.x.shape, dtype=object)
        with mpmath.workdps(_DPS + 20):
            for r in range(self.x.shape[0]):
                inc = self.incl[r]
                p = self.p_exact[r]
                if kind == "logsumexp_vjp":
                    gl = mpmath.mpf(float(g_rows[r, 0]))
                    vals = [gl * p[j] if inc[j] else mpmath.mpf(0) for j in range(len(inc))]
                elif kind == "log_softmax_vjp":
                    total = mpmath.fsum(
                        mpmath.mpf(float(g_rows[r, j])) for j in np.flatnonzero(inc)
                    )
                    vals = [
                        mpmath.mpf(float(g_rows[r, j])) - p[j] * total if inc[j] else mpmath.mpf(0)
                        for j in range(len(inc))
                    ]
                else:
                    m = mpmath.fsum(
                        p[j] * mpmath.mpf(float(g_rows[r, j])) for j in np.flatnonzero(inc)
                    )
                    vals = [
                        p[j] * (mpmath.mpf(float(g_rows[r, j])) - m) if inc[j] else mpmath.mpf(0)
                        for j in range(len(inc))
                    ]
                out[r, :] = vals
        return out

    def bound(self, kind: str, g_rows: F64, y: Any) -> F64:
        y64 = np.asarray([[float(v) for v in row] for row in y], dtype=np.float64).reshape(
            self.x.shape
        )
        b = family_bound(kind, self.impl.accuracy, self.x, self.incl, g_rows, self.p_up, y64)
        # the exact values carry 10**-dps of their magnitude
        return b + 1e-45 * (np.abs(y64) + ETA)

    def agree(self, kind: str, g: F64, what: str) -> F64:
        """``kind`` at ``g`` within :func:`family_bound` of its closed form; the rows."""
        __tracebackhide__ = True
        c = self.call(kind, g)
        g_rows = g.reshape(self.x.shape[0], 1) if kind == "logsumexp_vjp" else self.lay.to_rows(g)
        y = self.exact(kind, g_rows)
        b = self.bound(kind, g_rows, y)
        with mpmath.workdps(_DPS):
            for r, j in np.ndindex(self.x.shape):
                err = abs_error(float(c[r, j]), y[r, j])
                if not err <= mpmath.mpf(float(b[r, j])):
                    at = self.lay.index(r, j)
                    self.fail(
                        kind,
                        g,
                        f"{kind} at {at} is {float(c[r, j])!r}, {what} "
                        f"{mpmath.nstr(y[r, j], 17)}: error {float(err):.3g} > bound "
                        f"{float(b[r, j]):.3g}",
                    )
        return c


def _needs_family(impl: BackwardImpl) -> bool:
    return "family" in impl.features


@tests_claims("grad-lse", "log-softmax-and-lse-vjp")
def check_grad_lse(impl: BackwardImpl, fc: FamilyGradCase) -> None:
    r"""Claim ``grad-lse``: the gradient of LSE is softmax: ``logsumexp_vjp(x, 1)`` is
    :math:`p` (and ``logsumexp_vjp(x, g)`` is :math:`g p`), against the exact weights,
    within :func:`family_bound`; excluded entries exactly 0."""
    __tracebackhide__ = True
    if not _needs_family(impl):
        return
    sl = _Slices(impl, fc)
    sl.agree("logsumexp_vjp", np.ones(fc.g_lse.shape), "the exact softmax")
    sl.agree("logsumexp_vjp", fc.g_lse, "g times the exact softmax")


@tests_claims("jacobian", "softmax-vjp")
def check_jacobian(impl: BackwardImpl, fc: FamilyGradCase) -> None:
    r"""Claim ``jacobian``: :math:`J = \operatorname{diag}(p) - pp^\top = J^\top`, so
    ``softmax_vjp(x, g)`` :math:`= J^\top g = p \odot (g - \langle p, g\rangle)` and
    ``softmax_jvp(x, g)`` :math:`= Jg` is the same, and :math:`J\mathbf 1 = 0`
    (``softmax_jvp(x, 1)`` is 0 within its bound); against the exact weights, within
    :func:`family_bound`."""
    __tracebackhide__ = True
    if not _needs_family(impl):
        return
    sl = _Slices(impl, fc)
    sl.agree("softmax_vjp", fc.g, "J^T g")
    sl.agree("softmax_jvp", fc.g, "J g (= J^T g)")
    sl.agree("softmax_jvp", np.ones(fc.x.shape), "J 1 = 0: exactly")


@tests_claims("jacobian-psd")
def check_jacobian_psd(impl: BackwardImpl, fc: FamilyGradCase) -> None:
    r"""Claim ``jacobian-psd``: :math:`g^\top J g = \mathrm{Var}_p(g) \ge 0`. The computed
    :math:`c = ` ``softmax_jvp(x, g)`` gives :math:`\sum_j g_j c_j` (exact) :math:`\ge
    -\sum_j |g_j| B_j`, with :math:`B` of :func:`family_bound`."""
    __tracebackhide__ = True
    if not _needs_family(impl):
        return
    sl = _Slices(impl, fc)
    c = sl.call("softmax_jvp", fc.g)
    g_rows = sl.lay.to_rows(fc.g)
    y = sl.exact("softmax_jvp", g_rows)
    b = sl.bound("softmax_jvp", g_rows, y)
    for r in range(sl.x.shape[0]):
        inc = sl.incl[r]
        if not inc.any():
            continue
        quad = _exact_sum(np.where(inc, g_rows[r], 0.0) * 0.0)  # 0, typed
        if not np.isfinite(c[r][inc]).all():
            sl.fail(
                "softmax_jvp", fc.g, f"softmax_jvp of slice {sl.lay.index(r, None)} is not finite"
            )
        quad = sum(
            (Fraction(float(g_rows[r, j])) * Fraction(float(c[r, j])) for j in np.flatnonzero(inc)),
            quad,
        )
        slack = Fraction(float(_SO * np.sum(np.abs(g_rows[r]) * b[r])))
        if quad < -slack:
            sl.fail(
                "softmax_jvp",
                fc.g,
                f"g^T J g of slice {sl.lay.index(r, None)} is {float(quad)!r} < 0 by more "
                f"than the bound {float(slack):.3g}",
            )


@tests_claims("log-softmax-derivative", "log-softmax-and-lse-vjp")
def check_log_softmax_derivative(impl: BackwardImpl, fc: FamilyGradCase) -> None:
    r"""Claim ``log-softmax-derivative``: :math:`\partial\log p_i / \partial x_j =
    \delta_{ij} - p_j`, so ``log_softmax_vjp(x, g)`` :math:`= g - p\sum_j g_j` (sums over
    the included entries; excluded entries 0), against the exact weights, within
    :func:`family_bound`."""
    __tracebackhide__ = True
    if not _needs_family(impl):
        return
    sl = _Slices(impl, fc)
    sl.agree("log_softmax_vjp", fc.g, "g - p sum(g)")


@tests_claims("jacobian-inf-norm")
def check_jacobian_inf_norm(impl: BackwardImpl, fc: FamilyGradCase) -> None:
    r"""Claim ``jacobian-inf-norm``: :math:`\|J\|_\infty = \max_i 2p_i(1 - p_i) \le
    \tfrac12`. So :math:`\|\mathrm{softmax\_vjp}(x, g)\|_\infty \le \tfrac12
    \|g\|_\infty + \max_j B_j` (:math:`J` symmetric), and for :math:`s = 2e_i -
    \mathbf 1` (:math:`i` a maximum of the slice) ``softmax_jvp(x, s)``:math:`_i` is
    the row sum :math:`2p_i(1 - p_i)` within its bound (the norm is attained there)."""
    __tracebackhide__ = True
    if not _needs_family(impl):
        return
    sl = _Slices(impl, fc)
    c = sl.call("softmax_vjp", fc.g)
    g_rows = sl.lay.to_rows(fc.g)
    y = sl.exact("softmax_vjp", g_rows)
    b = sl.bound("softmax_vjp", g_rows, y)
    s_rows = -np.ones(sl.x.shape)
    top: list[int | None] = []
    for r in range(sl.x.shape[0]):
        inc = sl.incl[r]
        if not inc.any():
            top.append(None)
            continue
        gmax = float(np.max(np.abs(g_rows[r][inc])))
        cmax = float(np.max(np.abs(np.where(inc, c[r], 0.0))))
        if not cmax <= 0.5 * gmax + float(np.max(b[r])) * _SO:
            sl.fail(
                "softmax_vjp",
                fc.g,
                f"|softmax_vjp| of slice {sl.lay.index(r, None)} reaches {cmax!r} > "
                f"||J||_inf ||g||_inf = 0.5 * {gmax!r} (+ bound {float(np.max(b[r])):.3g})",
            )
        i = int(np.flatnonzero(inc)[np.argmax(sl.x[r][inc])])
        s_rows[r, i] = 1.0
        top.append(i)
    s = sl.lay.from_rows(s_rows)
    c2 = sl.call("softmax_jvp", s)
    y2 = sl.exact("softmax_jvp", s_rows)
    b2 = sl.bound("softmax_jvp", s_rows, y2)
    with mpmath.workdps(_DPS):
        for r, top_i in enumerate(top):
            if top_i is None:
                continue
            p = sl.p_exact[r, top_i]
            want = 2 * p * (1 - p)
            err = abs_error(float(c2[r, top_i]), want)
            if not (
                err <= mpmath.mpf(float(b2[r, top_i]))
                and float(c2[r, top_i]) <= 0.5 + float(b2[r, top_i])
            ):
                sl.fail(
                    "softmax_jvp",
                    s,
                    f"softmax_jvp(x, 2e_i - 1) at {sl.lay.index(r, top_i)} is "
                    f"{float(c2[r, top_i])!r}, "
                    f"the row sum of |J| 2 p_i (1 - p_i) = {mpmath.nstr(want, 17)} (<= 1/2): "
                    f"error {float(err):.3g} > bound {float(b2[r, top_i]):.3g}",
                )


#: name -> check; the backward battery's vocabulary
PROPERTIES: dict[str, Callable[..., None]] = {
    "agreement": check_agreement,
    "closed_form": check_closed_form,
    "dz_rows": check_dz_rows,
    "hidden_gradients": check_hidden_gradients,
    "hidden_rows": check_hidden_rows,
    "query_permutation": check_query_permutation,
    "key_permutation": check_key_permutation,
    "key_shift": check_key_shift,
    "gqa": check_gqa,
    "central_differences": check_central_differences,
    "lse_gradient": check_lse_gradient,
    "grad_lse": check_grad_lse,
    "jacobian": check_jacobian,
    "jacobian_psd": check_jacobian_psd,
    "log_softmax_derivative": check_log_softmax_derivative,
    "jacobian_inf_norm": check_jacobian_inf_norm,
}


# ---------------------------------------------------------------------------------------
# The battery
# ---------------------------------------------------------------------------------------


def _backward_checks() -> list[Check]:
    def c(
        name: str,
        text: str,
        needs: tuple[str, ...] = (),
        n: int | None = 6,
        **opts: Any,
    ) -> Check:
        def cases(impl: Any) -> st.SearchStrategy[Any]:
            return backward_cases(
                features=impl.features,
                max_side=opts.get("side", 3),
                max_width=opts.get("width", 3),
                hidden_rows=opts.get("hidden_rows"),
            )

        return Check(name, text, PROPERTIES[name], cases, n, frozenset(needs))

    def f(name: str, text: str, n: int | None = 10) -> Check:
        def cases(impl: Any) -> st.SearchStrategy[Any]:
            return family_grad_cases(max_side=4)

        return Check(name, text, PROPERTIES[name], cases, n, frozenset({"family"}))

    return [
        c("agreement", "every gradient within the claimed bound of attnspec.exact (certified)"),
        c("closed_form", "the closed form with D from the implementation's own output", n=4),
        c("dz_rows", "rows of dZ (dbias) plus dsinks sum to dlse", ("mask",)),
        c("hidden_gradients", "dK, dV 0 at hidden keys; NaN/inf there never leak (bitwise)", n=5),
        c(
            "hidden_rows",
            "a row that sees nothing: dq = 0, dk and dv unchanged",
            ("mask",),
            hidden_rows=True,
        ),
        c("query_permutation", "permuting queries permutes dQ; dK, dV unchanged"),
        c("key_permutation", "permuting keys with values permutes dK, dV; dQ unchanged"),
        c("key_shift", "K + 1 u^T: dQ, dK unchanged (dlse = 0, no sink), derived bound"),
        c("gqa", "GQA gradients = repeated heads summed over each group", ("gqa",)),
        c("central_differences", "<g, d> = central difference of the exact forward (bounded)", n=4),
        c(
            "lse_gradient",
            "dout = 0, dlse = e_r: dbias = P_r, dsinks = the sink's weight",
            ("mask", "lse"),
        ),
        f("grad_lse", "logsumexp_vjp(x, 1) = softmax(x)"),
        f("jacobian", "softmax_vjp = J^T g, J = diag(p) - p p^T = J^T, J 1 = 0"),
        f("jacobian_psd", "g^T J g >= -bound"),
        f("log_softmax_derivative", "log_softmax_vjp = g - p sum(g)"),
        f("jacobian_inf_norm", "||J||_inf <= 1/2, attained at 2 e_i - 1"),
    ]


#: the backward checks (Hypothesis; at most 6 examples each of L, S, E <= 3 for sdpa, 10
#: slices for the family: the whole battery must run in well under 8 s per precision
#: with the ci profile)
BATTERY: list[Check] = _backward_checks()


def attnspec_implementation(precision: str = "accurate") -> BackwardImpl:
    """The reference at ``precision``: the name every topic's properties module gives it."""
    return attnspec_impl(precision)
