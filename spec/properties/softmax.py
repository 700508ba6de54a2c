r"""The properties of the softmax family, as checks of any implementation.

Each ``check_*`` function takes a :class:`SoftmaxFamily` (softmax, log_softmax and
logsumexp of one implementation, with what it claims) and a
:class:`~attnspec.spec.strategies.softmax.SoftmaxCase`, ``check(impl, case)``, the
signature of the checks of every topic (``check(impl, x, axis, where)`` works too),
evaluates the implementation, and raises :class:`PropertyViolation` with the worst
element, the bound it broke and a call that reproduces it. The implementation may be ours
(:func:`attnspec_family`), the exact reference rounded to float64 (:func:`exact_family`)
or any other: a callable takes a float64 array, ``axis`` and ``where`` (a bool array
broadcast to ``x``, or None) and returns a numpy array.

Every property is evaluated per *slice* (all entries along ``axis``, brought into a row).
A slice is *regular* when it has at least one included finite entry and no included NaN
or :math:`+\infty` (included :math:`-\infty` entries act as excluded ones); the other
slices are decided exactly by the special-value rules of ``reference/softmax.py``
(:func:`check_special_values`). Bounds come from :mod:`attnspec.spec.tolerances.softmax`; where a
property holds exactly in floating point, the docstring says why.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import mpmath
import numpy as np
import numpy.typing as npt
from hypothesis import strategies as st

from attnspec.reference.inputs import as_real_float64, as_where, normalize_axes
from attnspec.spec.properties._core import (
    Arguments,
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
from attnspec.spec.strategies.softmax import SoftmaxCase, softmax_cases
from attnspec.spec.tolerances import softmax as tol

__all__ = [
    "PROPERTIES",
    "PropertyViolation",
    "SoftmaxFamily",
    "attnspec_family",
    "check_agreement",
    "check_bounded",
    "check_consistency",
    "check_excluded",
    "check_lse_bounds",
    "check_order",
    "check_permutation",
    "check_shift_invariance",
    "check_special_values",
    "check_sum_to_one",
    "exact_family",
]

F64 = npt.NDArray[np.float64]
Bools = npt.NDArray[np.bool_]
#: ``f(x, axis, where) -> array``: x is float64, where a bool array broadcast to x or None
FamilyFn = Callable[[F64, Any, "Bools | None"], Any]
_KINDS = ("softmax", "log_softmax", "logsumexp")


@dataclass(frozen=True, repr=False)
class SoftmaxFamily(Implementation):
    """One implementation of softmax, log_softmax and logsumexp, and what it claims.

    An :class:`~attnspec.spec.properties._core.Implementation` (``name``, ``accuracy``,
    ``call``), with:

    Attributes
    ----------
    softmax, log_softmax, logsumexp : callable
        ``f(x, axis, where)`` with ``x`` float64, ``axis`` an int, a tuple of ints or None,
        ``where`` a bool array of the shape of ``x`` or None; logsumexp reduces ``axis``
        without keeping it.
    accuracy : "accurate", "fast" or a number
        "accurate": every result within one ulp of the exact value. "fast": the bounds of
        the shifted float64 algorithm (:func:`attnspec.spec.tolerances.softmax.error_bound`).
        A number :math:`\rho`: :math:`|c - y| \\le \rho|y| + 2^{-1074}` (softmax) and
        :math:`\rho(|y| + 1)` (log_softmax, logsumexp).
    supports_where : bool
        Whether ``where`` is accepted; properties of excluded entries need it.
    supports_tuple_axis : bool
        Whether ``axis`` may be a tuple or None.
    shifts_by_max : bool
        The implementation subtracts the slice maximum first, so that
        :math:`fl(x_j + c) - fl(a + c) = x_j - a` when the shift is exact: results are
        then bitwise shift invariant.
    monotone : bool
        One monotone ``exp`` (and ``log1p``) for every position, one denominator per
        slice: order preservation then holds exactly.
    call : str, optional
        The reproduction's form, e.g. ``"attnspec.{kind}({args}, precision='fast')"``.
    """

    topic: ClassVar[str] = "softmax"

    softmax: FamilyFn
    log_softmax: FamilyFn
    logsumexp: FamilyFn
    supports_where: bool = True
    supports_tuple_axis: bool = True
    shifts_by_max: bool = True
    monotone: bool = True

    @property
    def features(self) -> frozenset[str]:
        """What it supports beyond one axis: ``where`` and ``tuple_axis``."""
        return frozenset(
            name
            for name, on in (
                ("where", self.supports_where),
                ("tuple_axis", self.supports_tuple_axis),
            )
            if on
        )

    def fn(self, kind: str) -> FamilyFn:
        """The callable for ``kind`` ("softmax", "log_softmax" or "logsumexp")."""
        return {"softmax": self.softmax, "log_softmax": self.log_softmax}.get(kind, self.logsumexp)


def attnspec_family(precision: str = "accurate") -> SoftmaxFamily:
    """Our reference at ``precision`` ("accurate": faithful, "fast": plain float64)."""
    import attnspec

    if precision not in ("accurate", "fast"):
        raise ValueError(f"precision must be 'accurate' or 'fast', got {precision!r}")
    return SoftmaxFamily(
        name=f"attnspec[{precision}]",
        softmax=lambda x, axis, where: attnspec.softmax(x, axis, where=where, precision=precision),
        log_softmax=lambda x, axis, where: attnspec.log_softmax(
            x, axis, where=where, precision=precision
        ),
        logsumexp=lambda x, axis, where: attnspec.logsumexp(
            x, axis, where=where, precision=precision
        ),
        accuracy="accurate" if precision == "accurate" else "fast",
        call=f"attnspec.{{kind}}({{args}}, precision={precision!r})",
    )


def exact_family(dps: int = 50) -> SoftmaxFamily:
    """attnspec.exact at ``dps`` digits, rounded to float64 (correctly, hence faithful)."""
    from attnspec import exact

    def wrap(f: Callable[..., Any]) -> FamilyFn:
        # undecided="midpoint": where no precision decides, the ball's midpoint
        return lambda x, axis, where: exact.to_float64(
            f(x, axis, where=where, dps=dps, undecided="midpoint")
        )

    return SoftmaxFamily(
        name=f"attnspec.exact[dps={dps}]",
        softmax=wrap(exact.softmax),
        log_softmax=wrap(exact.log_softmax),
        logsumexp=wrap(exact.logsumexp),
        accuracy="accurate",
        call=(
            "attnspec.exact.to_float64(attnspec.exact.{kind}({args}, "
            f"dps={dps}, undecided='midpoint'))"
        ),
    )


# ---------------------------------------------------------------------------------------
# Slices as rows, reproductions, messages
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    shape: tuple[int, ...]
    order: tuple[int, ...]
    kept_shape: tuple[int, ...]
    slice_shape: tuple[int, ...]

    @property
    def n(self) -> int:
        return math.prod(self.slice_shape)

    @property
    def rows(self) -> int:
        return math.prod(self.kept_shape)

    def to_rows(self, a: Any) -> F64:
        return np.transpose(np.asarray(a), self.order).reshape(self.rows, self.n)

    def from_rows(self, rows: Any) -> Any:
        full = np.asarray(rows).reshape(self.kept_shape + self.slice_shape)
        return np.transpose(full, np.argsort(self.order))

    def index(self, r: int, j: int | None) -> tuple[int, ...]:
        """The index into the original array of entry ``j`` of row ``r``."""
        kept = np.unravel_index(r, self.kept_shape) if self.kept_shape else ()
        if j is None:
            return tuple(int(i) for i in kept)
        inner = np.unravel_index(j, self.slice_shape) if self.slice_shape else ()
        pos = dict(zip(self.order, (*kept, *inner), strict=True))
        return tuple(int(pos[a]) for a in range(len(self.shape)))


def slice_layout(shape: tuple[int, ...], axis: object) -> _Layout:
    axes = normalize_axes(axis, len(shape))
    kept = tuple(a for a in range(len(shape)) if a not in axes)
    return _Layout(
        shape=shape,
        order=kept + axes,
        kept_shape=tuple(shape[a] for a in kept),
        slice_shape=tuple(shape[a] for a in axes),
    )


def _reproduction(
    family: SoftmaxFamily, kind: str, x: F64, axis: object, where: Bools | None
) -> str:
    w = "" if where is None else f", where={array_repr(where)}"
    return family.reproduce(f"x={array_repr(x)}, axis={axis!r}{w}", kind)


def _fail(
    prop: str,
    family: SoftmaxFamily,
    kind: str,
    x: F64,
    axis: object,
    where: Bools | None,
    detail: str,
) -> None:
    __tracebackhide__ = True
    raise PropertyViolation(prop, family.name, detail, _reproduction(family, kind, x, axis, where))


def _arguments(x: object, axis: object, where: object) -> tuple[object, object, object]:
    """A check's inputs: ``check(impl, case)`` (a SoftmaxCase, the one check signature of
    every topic) or, for convenience, ``check(impl, x, axis, where)``."""
    if isinstance(x, SoftmaxCase):
        return x.x, x.axis, x.where
    return x, axis, where


class _Inputs:
    """One call's inputs: x as float64, where broadcast, the slices as rows."""

    def __init__(self, family: SoftmaxFamily, x: object, axis: object, where: object) -> None:
        self.family = family
        self.x = np.array(as_real_float64(x, "x"), dtype=np.float64, copy=True)
        self.axis = axis
        self.where = None if where is None else np.array(as_where(where, self.x.shape))
        if self.where is not None and not family.supports_where:
            raise ValueError(f"{family.name} does not support where=; pass where=None")
        self.lay = slice_layout(self.x.shape, axis)
        self.xr = self.lay.to_rows(self.x)
        self.wr: Bools = np.asarray(
            np.ones(self.xr.shape, dtype=bool)
            if self.where is None
            else self.lay.to_rows(self.where),
            dtype=bool,
        )
        xm = np.where(self.wr, self.xr, -np.inf)
        self.nan_rows: Bools = np.asarray(np.isnan(xm).any(axis=-1), dtype=bool)
        self.posinf_rows: Bools = ~self.nan_rows & (xm == np.inf).any(axis=-1)
        self.empty_rows: Bools = ~self.nan_rows & ~self.posinf_rows & (xm == -np.inf).all(axis=-1)
        self.regular: Bools = ~(self.nan_rows | self.posinf_rows | self.empty_rows)
        #: included and finite: the entries that carry weight in a regular row
        self.live = self.wr & np.isfinite(self.xr)

    def call(self, kind: str, x: F64 | None = None, where: Bools | None = None) -> F64:
        """Evaluate ``kind`` (on a copy) and return the result as rows; check its shape."""
        __tracebackhide__ = True
        xx = self.x if x is None else x
        ww = self.where if where is None else where
        out = np.asarray(
            self.family.fn(kind)(xx.copy(), self.axis, None if ww is None else ww.copy())
        )
        expected = self.lay.kept_shape if kind == "logsumexp" else self.x.shape
        if out.shape != expected:
            self.fail(kind, f"returned shape {out.shape}, expected {expected}", x=xx, where=ww)
        out = out.astype(np.float64)
        if kind == "logsumexp":
            return out.reshape(self.lay.rows, 1)
        return self.lay.to_rows(out)

    def bound(self, kind: str, rows: F64 | None = None) -> tuple[F64, F64]:
        return tol.error_bound(
            kind, self.family.accuracy, self.xr if rows is None else rows, self.wr
        )

    def fail(
        self,
        kind: str,
        detail: str,
        prop: str = "",
        x: F64 | None = None,
        where: Bools | None = None,
    ) -> None:
        __tracebackhide__ = True
        _fail(
            prop or caller_name(),
            self.family,
            kind,
            self.x if x is None else x,
            self.axis,
            self.where if where is None else where,
            detail,
        )

    def at(self, r: Any, j: Any = None) -> str:
        return f"at index {self.lay.index(int(r), None if j is None else int(j))}"


def _err_from_computed(c: F64, rel: F64, absolute: F64) -> F64:
    r"""An upper bound of :math:`|c - y|` from the computed ``c``.

    :math:`|c - y| \le \rho|y| + \alpha` and :math:`|y| \le |c| + |c - y|` give
    :math:`|c - y| \le (\rho|c| + \alpha) / (1 - \rho)` for :math:`\rho < 1`.
    """
    with np.errstate(invalid="ignore", over="ignore"):  # inf bounds stay inf
        e = (rel * np.abs(c) + absolute) / (1.0 - rel) * tol.SECOND_ORDER
    # 0 * inf for an infinite c: no finite bound follows (whether the infinity is right
    # is for the special-value and agreement checks to say)
    return np.where(np.isnan(e), np.inf, e)


def _worst(excess: F64) -> tuple[int, int]:
    """Row and column of the largest entry of a 2-D array (NaN counts as largest)."""
    flat = np.where(np.isnan(excess), np.inf, excess)
    r, j = np.unravel_index(int(np.argmax(flat)), flat.shape)
    return int(r), int(j)


def _diff(a: F64, b: F64) -> F64:
    """|a - b|, 0 where a and b are the same (equal infinities, NaN and NaN)."""
    # inf - inf is NaN for equal infinities: those count as 0, the rest stays as it is.
    with np.errstate(invalid="ignore"):
        return np.where(same(a, b), 0.0, np.abs(a - b))


def _ratio(got: F64, allowed: F64) -> F64:
    """got / allowed, 0 where got <= allowed (so that inf / inf does not hide a pass)."""
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        r = np.where(got <= allowed, 0.0, got / allowed)
    return np.where(np.isnan(r), np.inf, r)


# ---------------------------------------------------------------------------------------
# The properties
# ---------------------------------------------------------------------------------------


@tests_claims("rows-sum-to-one")
def check_sum_to_one(
    family: SoftmaxFamily, x: object, axis: object = -1, where: object = None
) -> None:
    r"""Each regular slice of softmax sums to 1 within the derived bound; an empty one to 0.

    The sum is taken exactly and rounded once (``math.fsum``); the bound is
    :func:`attnspec.spec.tolerances.softmax.sum_to_one_bound` of the family's error bound
    (:math:`3.01u + n 2^{-1074}` when faithful).
    """
    __tracebackhide__ = True
    x, axis, where = _arguments(x, axis, where)
    inp = _Inputs(family, x, axis, where)
    p = inp.call("softmax")
    rel, absolute = inp.bound("softmax")
    bound = tol.sum_to_one_bound(np.where(inp.live, rel, 0.0), np.where(inp.live, absolute, 0.0))
    for r in range(inp.lay.rows):
        if inp.regular[r]:
            s = math.fsum(p[r].tolist())
            if not abs(s - 1.0) <= bound[r, 0]:
                inp.fail(
                    "softmax",
                    f"slice {inp.at(r)} sums to {s!r}: |sum - 1| = {abs(s - 1.0):.3g} > "
                    f"bound {bound[r, 0]:.3g} (n = {int(inp.live[r].sum())})",
                )
        elif inp.empty_rows[r] and not np.all(p[r] == 0.0):
            j = int(np.argmax(p[r] != 0.0))
            inp.fail(
                "softmax",
                f"slice {inp.at(r)} includes nothing, yet "
                f"softmax {inp.at(r, j)} is {p[r, j]!r} instead of 0",
            )


@tests_claims("rows-sum-to-one")
def check_bounded(
    family: SoftmaxFamily, x: object, axis: object = -1, where: object = None
) -> None:
    r"""In regular and empty slices: :math:`0 \le` softmax :math:`\le 1`, log_softmax :math:`\le 0`.

    Holds exactly in floating point for any implementation that divides one of the
    summed terms by their rounded sum: the rounded sum of nonnegative terms that include
    :math:`\hat e_j` is at least :math:`\hat e_j` (rounding is monotone), so the quotient
    rounds to at most 1; and :math:`\hat d_j \le 0`, :math:`\log(1+\hat s') \ge 0`.
    """
    __tracebackhide__ = True
    x, axis, where = _arguments(x, axis, where)
    inp = _Inputs(family, x, axis, where)
    rows = inp.regular | inp.empty_rows
    p = inp.call("softmax")
    bad = rows[:, None] & ~((p >= 0.0) & (p <= 1.0))
    if bad.any():
        r, j = _worst(bad.astype(np.float64))
        inp.fail("softmax", f"softmax {inp.at(r, j)} is {p[r, j]!r}, outside [0, 1]")
    ls = inp.call("log_softmax")
    bad = rows[:, None] & ~(ls <= 0.0)
    if bad.any():
        r, j = _worst(bad.astype(np.float64))
        inp.fail("log_softmax", f"log_softmax {inp.at(r, j)} is {ls[r, j]!r}, not <= 0")


@tests_claims("neginf-limit")
def check_excluded(
    family: SoftmaxFamily, x: object, axis: object = -1, where: object = None
) -> None:
    r"""Excluded entries get softmax exactly 0 and log_softmax :math:`-\infty`, and what
    they hold never reaches any result.

    The same call is repeated with the excluded entries replaced by NaN, by
    :math:`+\infty` and by :math:`-\infty`; every result of all three functions must be
    bitwise the same (NaN equal to NaN).
    """
    __tracebackhide__ = True
    x, axis, where = _arguments(x, axis, where)
    inp = _Inputs(family, x, axis, where)
    if inp.where is None:
        return
    hidden = ~inp.wr
    for kind, value in (("softmax", 0.0), ("log_softmax", -np.inf)):
        out = inp.call(kind)
        bad = hidden & (out != value)
        if bad.any():
            r, j = _worst(bad.astype(np.float64))
            inp.fail(
                kind,
                f"{kind} {inp.at(r, j)} is {out[r, j]!r} at an excluded entry, expected {value!r}",
            )
    for kind in _KINDS:
        base = inp.call(kind)
        for fill in (np.nan, np.inf, -np.inf):
            xf = np.where(inp.where, inp.x, fill)
            out = inp.call(kind, x=xf)
            diff = ~same(out, base)
            if diff.any():
                r, j = _worst(diff.astype(np.float64))
                where_txt = inp.at(r, None if kind == "logsumexp" else j)
                inp.fail(
                    kind,
                    f"with {fill!r} at the excluded entries {kind} {where_txt} is "
                    f"{out[r, j]!r}, but {base[r, j]!r} with the original values there",
                    x=xf,
                )


@tests_claims("shift-invariance", "lse-shift")
def check_shift_invariance(
    family: SoftmaxFamily, x: object, axis: object = -1, where: object = None, c: float = 1.0
) -> None:
    r"""softmax(x + c) = softmax(x), log_softmax too, LSE(x + c) = LSE(x) + c.

    * Where :math:`x_j + c` is exact for every included entry of a slice and the
      family subtracts the slice maximum first, softmax and log_softmax are bitwise
      equal: :math:`fl(x_j + c) - fl(a + c) = x_j - a` exactly, so every later
      operation sees the same operands.
    * Otherwise the shifted logits are perturbed by :math:`\delta = \max_j |fl(x_j + c)
      - (x_j + c)|` (found exactly by TwoSum), which changes softmax by the factor of
      :func:`attnspec.spec.tolerances.softmax.perturbed_softmax_factor` and log_softmax and LSE by
      at most :math:`2\delta` and :math:`\delta`; each evaluation adds its own error bound.

    Special slices must give bitwise the same results (the rules ignore the shift).
    Slices where :math:`x_j + c` overflows are not checked.
    """
    __tracebackhide__ = True
    x, axis, where = _arguments(x, axis, where)
    inp = _Inputs(family, x, axis, where)
    c = float(c)
    if not math.isfinite(c):
        raise ValueError(f"c must be finite, got {c!r}")
    with np.errstate(over="ignore"):  # an overflowing shift is detected below
        xs = inp.x + c
    inp_s = _Inputs(family, xs, axis, inp.where)
    err = np.abs(two_sum_error(inp.xr, np.full_like(inp.xr, c)))
    err = np.where(inp.live, err, 0.0)
    overflow = np.asarray((inp.live & ~np.isfinite(inp_s.xr)).any(axis=-1), dtype=bool)
    exact_rows = np.asarray((err == 0.0).all(axis=-1) & family.shifts_by_max, dtype=bool)
    delta = err.max(axis=-1, initial=0.0)
    special = ~inp.regular
    checked = ~overflow
    for kind in _KINDS:
        a, b = inp.call(kind), inp_s.call(kind)
        if kind == "logsumexp":
            same_needed = special
        else:
            same_needed = special | exact_rows
        diff = same_needed[:, None] & ~same(a, b) & checked[:, None]
        if diff.any():
            r, j = _worst(diff.astype(np.float64))
            inp.fail(
                kind,
                f"{kind} {inp.at(r, j)} is {a[r, j]!r} for x and {b[r, j]!r} for "
                f"x + {c!r}; the shift is exact there, so they must be bitwise equal",
            )
        rel, absolute = inp.bound(kind)
        rel_s, abs_s = inp_s.bound(kind)
        e1 = _err_from_computed(a, rel, absolute)
        e2 = _err_from_computed(b, rel_s, abs_s)
        if kind == "softmax":
            move = np.array([tol.perturbed_softmax_factor(d) for d in delta])[:, None]
            allowed = e1 + e2 + move * (a + e1)
            got = _diff(a, b)
        elif kind == "log_softmax":
            allowed = e1 + e2 + 2 * delta[:, None] * tol.SECOND_ORDER
            got = _diff(a, b)
        else:
            # a + c would round: the difference is taken exactly instead
            got = np.array(
                [[_exact_abs_diff(b[r, 0], a[r, 0], c)] for r in range(inp.lay.rows)]
            ).reshape(a.shape)
            allowed = e1 + e2 + delta[:, None] * tol.SECOND_ORDER
        mask = (inp.regular & checked)[:, None] & (inp.live if kind != "logsumexp" else True)
        ratio = np.where(mask, _ratio(got, allowed), 0.0)
        if (ratio > 0).any():
            r, j = _worst(ratio)
            inp.fail(
                kind,
                f"{kind} {inp.at(r, j)} moves by {float(got[r, j]):.3g} under the "
                f"shift c = {c!r}; bound {float(allowed[r, j]):.3g} (delta = {delta[r]:.3g})",
            )


def _exact_abs_diff(lse_shifted: float, lse: float, c: float) -> float:
    """|lse_shifted - (lse + c)| evaluated exactly, rounded up to float64."""
    if not (math.isfinite(lse_shifted) and math.isfinite(lse)):
        return 0.0 if lse_shifted == lse else math.inf
    with mpmath.workprec(2200):
        d = abs(mpmath.mpf(lse_shifted) - mpmath.mpf(lse) - mpmath.mpf(c))
        return float(mpmath.mpf(d) * (1 + mpmath.mpf(2) ** -50))


@tests_claims()
def check_permutation(
    family: SoftmaxFamily,
    x: object,
    axis: object = -1,
    where: object = None,
    perm: Sequence[int] | None = None,
) -> None:
    r"""softmax(x[perm]) = softmax(x)[perm] (and log_softmax; LSE unchanged), within bounds.

    ``perm`` permutes the entries of every slice (in the row-major order of the slice
    axes; default: reversed), ``where`` with them. In real arithmetic this is exact. In
    floating point it is **not** bitwise: the slice sum depends on the order of its terms
    (numpy sums pairwise), so each side carries its own rounding error, and the check is
    :math:`|\hat f(\Pi x)_{\Pi j} - \hat f(x)_j| \le E_1 + E_2` with each :math:`E` the
    family's bound. Special slices are decided by order-free rules: bitwise.
    """
    __tracebackhide__ = True
    x, axis, where = _arguments(x, axis, where)
    inp = _Inputs(family, x, axis, where)
    n = inp.lay.n
    pi = np.arange(n)[::-1] if perm is None else np.asarray(perm, dtype=np.intp)
    if sorted(pi.tolist()) != list(range(n)):
        raise ValueError(f"perm must be a permutation of range({n}), got {list(pi)!r}")
    xp = inp.lay.from_rows(inp.xr[:, pi])
    wp = None if inp.where is None else inp.lay.from_rows(inp.wr[:, pi])
    inp_p = _Inputs(family, xp, axis, wp)
    for kind in _KINDS:
        a = inp.call(kind)
        b = inp_p.call(kind)
        if kind != "logsumexp":
            b = b[:, np.argsort(pi)]  # back to the original order
        special = ~inp.regular
        diff = special[:, None] & ~same(a, b)
        if diff.any():
            r, j = _worst(diff.astype(np.float64))
            inp.fail(
                kind,
                f"{kind} {inp.at(r, j)} of a special slice changes under "
                f"permutation: {a[r, j]!r} vs {b[r, j]!r}",
                x=xp,
                where=wp,
            )
        rel, absolute = inp.bound(kind)
        allowed = 2 * _err_from_computed(a, rel, absolute)
        got = _diff(a, b)
        mask = inp.regular[:, None] & (inp.live if kind != "logsumexp" else True)
        ratio = np.where(mask, _ratio(got, allowed), 0.0)
        if (ratio > 0).any():
            r, j = _worst(ratio)
            inp.fail(
                kind,
                f"{kind} {inp.at(r, j)} is {a[r, j]!r}, but {b[r, j]!r} after "
                f"permuting the slice; |difference| = {float(got[r, j]):.3g} > bound "
                f"{float(allowed[r, j]):.3g}",
                x=xp,
                where=wp,
            )


@tests_claims("order-preservation", "tie-invariance")
def check_order(family: SoftmaxFamily, x: object, axis: object = -1, where: object = None) -> None:
    r"""Order preservation: :math:`x_i > x_j \Rightarrow p_i \ge p_j` and
    :math:`x_i = x_j \Rightarrow p_i = p_j`, for softmax and log_softmax.

    Exact in floating point for a ``monotone`` family: :math:`\hat d_j = fl(x_j - a)` is
    monotone in :math:`x_j`, ``exp`` is monotone, and every entry is divided by the same
    :math:`\hat D` (or has the same :math:`\log(1 + \hat s')` subtracted), and rounding
    is monotone. (Strict order is *not* preserved: two close logits may round to equal
    weights.) For a family that is not ``monotone`` the check allows each result its
    error bound.
    """
    __tracebackhide__ = True
    x, axis, where = _arguments(x, axis, where)
    inp = _Inputs(family, x, axis, where)
    for kind in ("softmax", "log_softmax"):
        out = inp.call(kind)
        rel, absolute = inp.bound(kind)
        slack = np.zeros(out.shape) if family.monotone else _err_from_computed(out, rel, absolute)
        for r in np.flatnonzero(inp.regular):
            idx = np.flatnonzero(inp.live[r])
            idx = idx[np.argsort(inp.xr[r, idx], kind="stable")]
            xs, ps, ss = inp.xr[r, idx], out[r, idx], slack[r, idx]
            # consecutive pairs in increasing x: p must not decrease (beyond the slack)
            # -inf (log_softmax far below the max) and an infinite slack make inf - inf
            # here; a NaN comparison is False, i.e. nothing is claimed there.
            with np.errstate(invalid="ignore"):
                drop = (ps[:-1] - ss[:-1]) > (ps[1:] + ss[1:])
                tie = (xs[:-1] == xs[1:]) & (_diff(ps[:-1], ps[1:]) > ss[:-1] + ss[1:])
            bad = drop | tie | np.isnan(ps[:-1]) | np.isnan(ps[1:])
            if bad.any():
                m = int(np.argmax(bad))
                i, j = int(idx[m]), int(idx[m + 1])
                rel_txt = "==" if xs[m] == xs[m + 1] else "<"
                inp.fail(
                    kind,
                    f"x {inp.at(r, i)} = {xs[m]!r} {rel_txt} x {inp.at(r, j)} = "
                    f"{xs[m + 1]!r}, but {kind} there is {ps[m]!r} and {ps[m + 1]!r}",
                )


@tests_claims("lse-bounds")
def check_lse_bounds(
    family: SoftmaxFamily, x: object, axis: object = -1, where: object = None
) -> None:
    r""":math:`\max x \le \operatorname{LSE}(x) \le \max x + \log n` within the rounding slack.

    :math:`n` counts the included entries. The slack on each side is the family's LSE
    error bound (in terms of the computed value); the comparison is done in mpmath.
    For the shifted algorithm the lower bound even holds exactly: :math:`fl(a + \hat L)
    \ge a` because :math:`\hat L \ge 0` and rounding is monotone. Empty slices: exactly
    :math:`-\infty`.
    """
    __tracebackhide__ = True
    x, axis, where = _arguments(x, axis, where)
    inp = _Inputs(family, x, axis, where)
    lse = inp.call("logsumexp")
    rel, absolute = inp.bound("logsumexp")
    slack = _err_from_computed(lse, rel, absolute)
    for r in range(inp.lay.rows):
        v = float(lse[r, 0])
        if inp.empty_rows[r]:
            if v != -np.inf:
                inp.fail(
                    "logsumexp", f"slice {inp.at(r)} includes nothing: LSE is {v!r}, expected -inf"
                )
            continue
        if not inp.regular[r]:
            continue
        a = float(np.max(inp.xr[r][inp.live[r]]))
        n = int(inp.live[r].sum())
        with mpmath.workdps(40):
            lo = mpmath.mpf(a) - mpmath.mpf(float(slack[r, 0]))
            hi = mpmath.mpf(a) + mpmath.log(n) + mpmath.mpf(float(slack[r, 0]))
            ok = not math.isnan(v) and lo <= v <= hi
        if not ok:
            inp.fail(
                "logsumexp",
                f"LSE {inp.at(r)} is {v!r}, outside [max x - slack, max x + "
                f"log n + slack] = [{float(lo)!r}, {float(hi)!r}] (max x = {a!r}, n = {n})",
            )


@tests_claims("max-shift")
def check_consistency(
    family: SoftmaxFamily, x: object, axis: object = -1, where: object = None
) -> None:
    r"""log_softmax agrees with log(softmax) and with :math:`x_j - \operatorname{LSE}(x)`.

    With :math:`E` the family's bounds (from the computed values):

    * :math:`|\widehat{ls}_j - \log \hat p_j| \le E_{ls,j} - \log(1 - E_{p,j}/\hat p_j)`,
      checked where :math:`E_{p,j} \le \hat p_j / 2` (elsewhere :math:`\log \hat p_j` is
      not determined by the bound);
    * :math:`|\widehat{ls}_j - (x_j - \widehat{LSE})| \le E_{ls,j} + E_{LSE}`, evaluated
      exactly.
    """
    __tracebackhide__ = True
    x, axis, where = _arguments(x, axis, where)
    inp = _Inputs(family, x, axis, where)
    p, ls, lse = inp.call("softmax"), inp.call("log_softmax"), inp.call("logsumexp")
    ep = _err_from_computed(p, *inp.bound("softmax"))
    els = _err_from_computed(ls, *inp.bound("log_softmax"))
    else_ = _err_from_computed(lse, *inp.bound("logsumexp"))
    with mpmath.workdps(60):
        for r in np.flatnonzero(inp.regular):
            for j in np.flatnonzero(inp.live[r]):
                lsv, pv = float(ls[r, j]), float(p[r, j])
                if pv > 0 and ep[r, j] <= pv / 2:
                    allowed = els[r, j] - math.log1p(-ep[r, j] / pv) * tol.SECOND_ORDER
                    got = abs(mpmath.mpf(lsv) - mpmath.log(pv)) if math.isfinite(lsv) else math.inf
                    if not got <= allowed:
                        inp.fail(
                            "log_softmax",
                            f"log_softmax {inp.at(r, j)} is {lsv!r} but "
                            f"log(softmax) = {float(mpmath.log(pv))!r}: |difference| = "
                            f"{float(got):.3g} > bound {allowed:.3g}",
                        )
                allowed = els[r, j] + else_[r, 0]
                lv = float(lse[r, 0])
                got = (
                    abs_error(lsv, mpmath.mpf(float(inp.xr[r, j])) - mpmath.mpf(lv))
                    if math.isfinite(lv)
                    else math.inf
                )
                if not got <= allowed:
                    inp.fail(
                        "log_softmax",
                        f"log_softmax {inp.at(r, j)} is {lsv!r} but x - LSE "
                        f"= {inp.xr[r, j]!r} - {lv!r}: |difference| = {float(got):.3g} > "
                        f"bound {allowed:.3g}",
                    )


@tests_claims()
def check_agreement(
    family: SoftmaxFamily, x: object, axis: object = -1, where: object = None, dps: int = 50
) -> None:
    r"""Every result agrees with attnspec.exact (``dps`` digits) within the family's bound.

    "accurate": within one ulp of the exact value (``ulp_error <= 1``), the accuracy goal
    of precision="accurate". "fast": :math:`|c - y| \le \rho|y| + \alpha` with the bounds
    of :mod:`attnspec.spec.tolerances.softmax` (Blanchard, Higham & Higham 2021, Thm 4.3, made
    explicit). A result beyond the float64 range counts as exact when it is the infinity
    of the right sign. Special slices must match the exact rules bitwise, except the
    weights :math:`1/k` and :math:`-\log k` of :math:`+\infty` slices, which are held to
    the same bound as a slice of :math:`k` equal logits.
    """
    __tracebackhide__ = True
    x, axis, where = _arguments(x, axis, where)
    from attnspec import exact

    inp = _Inputs(family, x, axis, where)
    for kind in _KINDS:
        c = inp.call(kind)
        f = getattr(exact, kind)
        y = f(inp.x, inp.axis, where=inp.where, dps=dps, undecided="midpoint")
        y = np.asarray(y, dtype=object)
        yr = y.reshape(inp.lay.rows, 1) if kind == "logsumexp" else inp.lay.to_rows(y)
        # the bound of a +inf slice is that of its infinite entries taken as equal
        stand_in = np.where(inp.wr & (inp.xr == np.inf), 0.0, -np.inf)
        xb = np.where(inp.posinf_rows[:, None], stand_in, inp.xr)
        rel, absolute = tol.error_bound(kind, family.accuracy, xb, inp.wr)
        worst_ratio, worst = 0.0, None
        with mpmath.workdps(max(dps, 40)):
            for r in range(c.shape[0]):
                for j in range(c.shape[1]):
                    cv, yv = float(c[r, j]), mpmath.mpf(yr[r, j])
                    err = abs_error(cv, yv)
                    if family.accuracy == "accurate" and mpmath.isfinite(yv) and err > 0:
                        allowed = tol.ulp_of_exact(yv)
                    else:
                        allowed = mpmath.mpf(float(rel[r, j])) * abs(yv) + float(absolute[r, j])
                        if not mpmath.isfinite(yv):
                            allowed = mpmath.mpf(0)
                    if err > allowed:
                        ratio = float(err / allowed) if allowed > 0 else math.inf
                        if ratio >= worst_ratio:
                            worst_ratio, worst = ratio, (r, j, cv, yv, allowed)
        if worst is not None:
            r, j, cv, yv, allowed = worst
            at = inp.at(r, None if kind == "logsumexp" else j)
            ulps = float(abs_error(cv, yv) / tol.ulp_of_exact(yv))
            inp.fail(
                kind,
                f"{kind} {at} is {cv!r}, exact value {mpmath.nstr(yv, 20)} "
                f"({dps} digits): error {ulps:.3g} ulp, {worst_ratio:.3g} times the "
                f"{family.accuracy} bound {mpmath.nstr(allowed, 3)}",
            )


@tests_claims("posinf-limit", "neginf-limit", "empty-sum")
def check_special_values(
    family: SoftmaxFamily, x: object, axis: object = -1, where: object = None
) -> None:
    r"""The rules of ``reference/softmax.py`` for special slices, exactly.

    * nothing included (empty, all excluded or all :math:`-\infty`): softmax 0,
      log_softmax :math:`-\infty`, LSE :math:`-\infty`;
    * an included NaN: every result of the slice is NaN, but softmax 0 and log_softmax
      :math:`-\infty` at the entries with no weight (excluded, or :math:`-\infty`);
    * included :math:`+\infty` entries (no NaN), :math:`k` of them: softmax is 0 off
      them and :math:`1/k` on them, log_softmax :math:`-\infty` off them and
      :math:`-\log k` on them, LSE :math:`+\infty`. The values :math:`1/k` and
      :math:`-\log k` are rounded: they must be within the family's bound of a slice of
      :math:`k` equal logits (exact when :math:`k` is 1).
    """
    __tracebackhide__ = True
    x, axis, where = _arguments(x, axis, where)
    inp = _Inputs(family, x, axis, where)
    for kind in _KINDS:
        out = inp.call(kind)
        for r in np.flatnonzero(~inp.regular):
            row = out[r]
            if inp.nan_rows[r]:
                if kind == "logsumexp":
                    ok, want = bool(np.isnan(row).all()), "NaN (an included NaN)"
                else:
                    # entries with no weight (excluded or -inf) keep their rule
                    none = ~inp.wr[r] | (inp.xr[r] == -np.inf)
                    off = 0.0 if kind == "softmax" else -np.inf
                    ok = bool(np.isnan(row[~none]).all() and (row[none] == off).all())
                    want = f"NaN, but {off!r} at excluded and -inf entries (an included NaN)"
            elif inp.empty_rows[r]:
                v = 0.0 if kind == "softmax" else -np.inf
                ok, want = bool((row == v).all()), f"{v!r} everywhere (nothing included)"
            else:
                on = inp.wr[r] & (inp.xr[r] == np.inf)
                k = int(on.sum())
                if kind == "logsumexp":
                    ok, want = bool(row[0] == np.inf), "inf (an included +inf)"
                else:
                    off = 0.0 if kind == "softmax" else -np.inf
                    y = 1.0 / k if kind == "softmax" else -math.log(k)
                    stand_in = np.where(on, 0.0, -np.inf)[None, :]
                    rel, ab = tol.error_bound(kind, family.accuracy, stand_in, on[None, :])
                    with mpmath.workdps(40):
                        ye = mpmath.mpf(1) / k if kind == "softmax" else -mpmath.log(k)
                        if family.accuracy == "accurate":
                            allowed = tol.ulp_of_exact(ye)
                        else:
                            allowed = float(rel[0, 0]) * abs(ye) + float(ab[0, 0])
                        on_ok = all(abs(mpmath.mpf(float(v)) - ye) <= allowed for v in row[on])
                    ok = bool((row[~on] == off).all()) and on_ok
                    want = f"{off!r} off the {k} +inf entries and about {y!r} on them"
            if not ok:
                inp.fail(
                    kind,
                    f"{kind} of the special slice {inp.at(r)} is "
                    f"{array_repr(row)}, expected {want}",
                )


#: name -> (check, kinds it needs, whether it needs ``where``); the battery's vocabulary
PROPERTIES: dict[str, Callable[..., None]] = {
    "sum_to_one": check_sum_to_one,
    "bounded": check_bounded,
    "excluded": check_excluded,
    "shift_invariance": check_shift_invariance,
    "permutation": check_permutation,
    "order": check_order,
    "lse_bounds": check_lse_bounds,
    "consistency": check_consistency,
    "agreement": check_agreement,
    "special_values": check_special_values,
}


# ---------------------------------------------------------------------------------------
# The battery
# ---------------------------------------------------------------------------------------


def _cases(**kw: Any) -> Callable[[SoftmaxFamily], st.SearchStrategy[SoftmaxCase]]:
    def make(family: SoftmaxFamily) -> st.SearchStrategy[SoftmaxCase]:
        opts = {"max_side": 8, **kw}
        if not family.supports_where:
            opts["with_where"] = False
        opts.setdefault("allow_tuple_axis", family.supports_tuple_axis)
        if not family.supports_tuple_axis:
            opts["allow_tuple_axis"] = False
        return softmax_cases(**opts)

    return make


def _with_shift(family: SoftmaxFamily) -> st.SearchStrategy[Any]:
    shift = st.one_of(
        st.integers(-64, 64).map(float),  # usually exact for moderate logits
        st.floats(-1e3, 1e3, allow_nan=False),  # usually inexact
    )
    return st.tuples(_cases()(family), shift)


def _with_perm(family: SoftmaxFamily) -> st.SearchStrategy[Any]:
    @st.composite
    def make(draw: st.DrawFn) -> tuple[SoftmaxCase, list[int]]:
        case = draw(_cases()(family))
        n = slice_layout(case.x.shape, case.axis).n
        return case, draw(st.permutations(range(n)))

    return make()


def _case_and(keyword: str) -> Arguments:
    """Arguments for a drawn ``(case, value)``: the case, and ``keyword=value``."""
    return lambda drawn: ((drawn[0],), {keyword: drawn[1]})


#: the softmax battery: each property on the cases it needs (attnspec.spec.battery runs it)
BATTERY: list[Check] = [
    Check(
        "sum_to_one",
        "softmax slices sum to 1 within the derived bound (Hypothesis, hard "
        "logits, profile's examples)",
        check_sum_to_one,
        _cases(),
    ),
    Check(
        "bounded",
        "0 <= softmax <= 1 and log_softmax <= 0, exactly (Hypothesis, hard logits)",
        check_bounded,
        _cases(),
    ),
    Check(
        "excluded",
        "excluded entries weigh exactly 0 and NaN/inf there never leaks "
        "(Hypothesis, random where masks)",
        check_excluded,
        _cases(with_where=True),
        needs=frozenset({"where"}),
    ),
    Check(
        "shift_invariance",
        "softmax(x + c) = softmax(x): bitwise for exact shifts, else "
        "within the derived bound (Hypothesis, hard logits, random c)",
        check_shift_invariance,
        _with_shift,
        arguments=_case_and("c"),
    ),
    Check(
        "permutation",
        "softmax(x[perm]) = softmax(x)[perm] within the derived bound "
        "(Hypothesis, random permutations)",
        check_permutation,
        _with_perm,
        arguments=_case_and("perm"),
    ),
    Check(
        "order",
        "x_i > x_j => p_i >= p_j, ties equal (Hypothesis, hard logits)",
        check_order,
        _cases(),
    ),
    Check(
        "lse_bounds",
        "max x <= LSE <= max x + log n with rounding slack (Hypothesis)",
        check_lse_bounds,
        _cases(),
    ),
    Check(
        "consistency",
        "log_softmax = log(softmax) = x - LSE within bounds (Hypothesis)",
        check_consistency,
        _cases(max_side=4),
    ),
    Check(
        "agreement",
        "every result within the claimed bound of attnspec.exact (certified; Hypothesis, at "
        "most 50 examples of up to 8 per side)",
        check_agreement,
        _cases(max_side=8),
        max_examples=50,
    ),
    Check(
        "special_values",
        "empty, NaN and +inf slices follow the rules exactly (Hypothesis)",
        check_special_values,
        _cases(),
    ),
]


def attnspec_implementation(precision: str = "accurate") -> SoftmaxFamily:
    """The reference at ``precision``: the name every topic's properties module gives it."""
    return attnspec_family(precision)
