"""The contract of attnspec's public API, and Hypothesis strategies for every input form.

Used by ``tests/test_fuzz.py`` (see its docstring and ``docs/reliability.md``). Eight
functions are fuzzed, ``attnspec.softmax, log_softmax, logsumexp, sdpa`` and
``attnspec.exact.softmax, log_softmax, logsumexp, sdpa``, and ``attnspec.exact.to_float64``.
The contract every call is held to:

(a) valid input gives a result within the claimed bound of the exact arithmetic, or the
    documented special value;
(b) invalid input gives a TypeError or ValueError whose message names the argument;
(c) no input is modified (values, bytes, shape, strides and flags, the buffer a view
    looks into included) and no result shares memory with an input;
(d) no warning escapes;
(e) no hidden value reaches an output.

Every argument is written as Python source (:class:`Form`) and built by evaluating it, so
that a failure's message is a call that reproduces it. Run a reproduction with::

    import numpy as np, ml_dtypes, mpmath, attnspec
    from math import nan, inf

Every call made through :func:`run` is counted in :data:`COUNTS`, by function and kind.
"""

from __future__ import annotations

import math
import re
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Any

import ml_dtypes
import mpmath
import numpy as np
import numpy.typing as npt
from hypothesis import assume
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import attnspec
from attnspec import exact
from attnspec.reference.inputs import normalize_axes
from attnspec.reference.visibility import alignment_offset, relative_position, visible
from attnspec.spec.properties._core import abs_error
from attnspec.spec.properties.softmax import slice_layout
from attnspec.spec.tolerances import attention as atol
from attnspec.spec.tolerances import softmax as tol
from attnspec.spec.tolerances._core import ulp_of_exact

F64 = npt.NDArray[np.float64]
DBL_MAX = float(np.finfo(np.float64).max)
U = 2.0**-53
KINDS = ("softmax", "log_softmax", "logsumexp")

#: the functions under test, by the name a reproduction calls them
FUNCTIONS: dict[str, Callable[..., Any]] = {
    "attnspec.softmax": attnspec.softmax,
    "attnspec.log_softmax": attnspec.log_softmax,
    "attnspec.logsumexp": attnspec.logsumexp,
    "attnspec.sdpa": attnspec.sdpa,
    "attnspec.exact.softmax": exact.softmax,
    "attnspec.exact.log_softmax": exact.log_softmax,
    "attnspec.exact.logsumexp": exact.logsumexp,
    "attnspec.exact.sdpa": exact.sdpa,
    "attnspec.exact.to_float64": exact.to_float64,
}

#: the kinds of input a call is counted under (one each; see :func:`kind_of`)
INPUT_KINDS = ("valid", "special", "layout", "invalid", "hidden", "overflow")

#: calls made through :func:`run`, by (function, kind)
COUNTS: Counter[tuple[str, str]] = Counter()
#: invalid calls, by (function, the argument that was bad)
INVALID_ARGS: Counter[tuple[str, str]] = Counter()
#: calls of attnspec.exact whose result did not decide its float64 rounding at any
#: precision (UndecidedRounding, documented): made again with undecided="midpoint"
UNDECIDED: Counter[str] = Counter()

_NAMESPACE: dict[str, Any] = {
    "np": np,
    "ml_dtypes": ml_dtypes,
    "mpmath": mpmath,
    "nan": math.nan,
    "inf": math.inf,
    "attnspec": attnspec,
}


def build(code: str) -> Any:
    """The object ``code`` (Python source, see the module docstring) stands for."""
    return eval(code, dict(_NAMESPACE))


# ---------------------------------------------------------------------------------------
# Violations: one exception class per (check, function), so that Hypothesis reports
# distinct failures separately, each with its own shrunk example
# ---------------------------------------------------------------------------------------


class ContractViolation(AssertionError):
    """A call broke the contract; the message holds the call that reproduces it."""


_VIOLATIONS: dict[str, type[ContractViolation]] = {}


def violation(check: str, call: Call | str, detail: str) -> ContractViolation:
    """A :class:`ContractViolation` of a class named after ``check`` and the function."""
    func = call.func if isinstance(call, Call) else str(call)
    key = re.sub(r"\W+", "_", f"{check}_{func}").strip("_")
    cls = _VIOLATIONS.get(key)
    if cls is None:
        cls = type(f"Violation_{key}", (ContractViolation,), {})
        _VIOLATIONS[key] = cls
    return cls(f"[{check}] {detail}\n  call: {call!r}")


# ---------------------------------------------------------------------------------------
# Calls, and the checks every call gets: (b) error classes, (c) immutability, (d) warnings
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """A call of one function of :data:`FUNCTIONS`, its arguments as Python source."""

    func: str
    args: tuple[str, ...] = ()
    kwargs: tuple[tuple[str, str], ...] = ()

    def __repr__(self) -> str:
        parts = [*self.args, *(f"{k}={v}" for k, v in self.kwargs)]
        return f"{self.func}({', '.join(parts)})"

    def with_kwargs(self, **kw: str | None) -> Call:
        """A copy with keyword arguments set (source) or removed (None)."""
        new = dict(self.kwargs)
        for key, val in kw.items():
            if val is None:
                new.pop(key, None)
            else:
                new[key] = val
        return replace(self, kwargs=tuple(new.items()))


@dataclass
class Outcome:
    """What a call gave: a result or a TypeError/ValueError (never both)."""

    call: Call
    result: Any = None
    error: Exception | None = None

    def value(self) -> Any:
        """The result; a violation when the call refused valid input."""
        if self.error is not None:
            words = " ".join(str(self.error).split()[:2])
            raise violation(
                f"valid input refused ({type(self.error).__name__}: {words})",
                self.call,
                f"raised {type(self.error).__name__}: {self.error}",
            ) from self.error
        return self.result


def _root(a: np.ndarray) -> np.ndarray:
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def snapshot(obj: Any) -> Any:
    """Everything a function could change about an argument, to compare before/after."""
    if isinstance(obj, np.ma.MaskedArray):
        return ("masked", snapshot(np.ma.getdata(obj)), snapshot(np.ma.getmaskarray(obj)))
    if isinstance(obj, np.ndarray):
        root = _root(obj)
        return (
            "ndarray",
            obj.dtype.str,
            obj.shape,
            obj.strides,
            obj.flags.writeable,
            # (a huge broadcast view: its few bytes are those of the array it views)
            obj.tobytes() if obj.size <= 2**20 else None,
            None if root is obj else (root.tobytes(), root.flags.writeable),
        )
    # nested lists, tuples, dicts, scalars: their repr holds every value (NaN as nan)
    return (type(obj).__name__, repr(obj))


def _arrays(result: Any) -> list[np.ndarray]:
    if isinstance(result, tuple):
        return [a for r in result for a in _arrays(r)]
    return [result] if isinstance(result, np.ndarray) else []


def run(call: Call, kind: str) -> Outcome:
    """Make ``call`` (its arguments built fresh), counted under ``kind``, and check (c) and
    (d): no argument modified, no result sharing memory with one, no warning escaping;
    any exception but a TypeError or ValueError is a violation too. An exact call that
    raises UndecidedRounding (documented) is made again with undecided="midpoint" and
    counted in UNDECIDED."""
    fn = FUNCTIONS[call.func]
    args = [build(c) for c in call.args]
    kwargs = {k: build(c) for k, c in call.kwargs}
    inputs = [*args, *kwargs.values()]
    before = [snapshot(a) for a in inputs]
    COUNTS[call.func, kind] += 1
    out = Outcome(call)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            try:
                out.result = fn(*args, **kwargs)
            except exact.UndecidedRounding:
                # documented (a value within 2**-16384 of a tie, such as a tie plus
                # e**-1e6): the checks read the balls' midpoints instead
                if "undecided" in kwargs:
                    raise
                UNDECIDED[call.func] += 1
                out.result = fn(*args, undecided="midpoint", **kwargs)
        except (TypeError, ValueError) as exc:
            out.error = exc
        except Exception as exc:
            raise violation(
                "only TypeError or ValueError",
                call,
                f"raised {type(exc).__name__}: {exc}",
            ) from exc
    if caught:
        shown = "; ".join(
            f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught[:3]
        )
        raise violation("no warning escapes", call, f"{len(caught)} warning(s): {shown}")
    for i, (obj, snap) in enumerate(zip(inputs, before, strict=True)):
        if snapshot(obj) != snap:
            which = call.args[i] if i < len(call.args) else call.kwargs[i - len(call.args)][0]
            raise violation("no input modified", call, f"the argument {which} was modified")
    for r in _arrays(out.result):
        for obj in inputs:
            if isinstance(obj, np.ndarray) and np.shares_memory(r, obj):
                raise violation(
                    "no result aliases an input", call, "a result shares memory with an input"
                )
    return out


_BOTH = (TypeError, ValueError)


def expect_refusal(
    call: Call,
    names: Sequence[str],
    classes: tuple[type[Exception], ...] = _BOTH,
    equivalent: Call | None = None,
) -> None:
    """(b): ``call`` raises one of ``classes`` whose message names every one of ``names``.

    With ``equivalent`` (an ambiguous form, e.g. a 0-d array for a number), a result is
    allowed too, and must then be bitwise that of ``equivalent``.
    """
    INVALID_ARGS[call.func, names[0]] += 1
    out = run(call, "invalid")
    if out.error is None:
        if equivalent is None:
            raise violation(
                f"invalid {names[0]} refused",
                call,
                f"expected a {' or '.join(c.__name__ for c in classes)} naming "
                f"{', '.join(names)}; got a result",
            )
        want = run(equivalent, "valid").value()
        if not _same_results(out.result, want):
            raise violation(
                f"ambiguous {names[0]} read as {equivalent!r}",
                call,
                "accepted, but the result differs from that of the equivalent call",
            )
        return
    if not isinstance(out.error, classes):
        raise violation(
            f"invalid {names[0]}: error class",
            call,
            f"raised {type(out.error).__name__} ({out.error}); expected "
            + " or ".join(c.__name__ for c in classes),
        )
    msg = str(out.error)
    for name in names:
        if not re.search(rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])", msg):
            raise violation(
                f"invalid {names[0]}: message names it",
                call,
                f"{type(out.error).__name__} does not name {name!r}: {msg}",
            )


def _same_results(a: Any, b: Any) -> bool:
    if isinstance(a, tuple) or isinstance(b, tuple):
        return (
            isinstance(a, tuple)
            and isinstance(b, tuple)
            and len(a) == len(b)
            and all(_same_results(x, y) for x, y in zip(a, b, strict=True))
        )
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype == object:
        return bool(mpf_same(a, b).all()) if a.size else True
    return same_bits(a, b)


# ---------------------------------------------------------------------------------------
# Comparisons
# ---------------------------------------------------------------------------------------


def same_bits(a: F64, b: F64) -> bool:
    """Bitwise equal but for NaN payloads: equal values, equal signs of zero, NaN at NaN."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return False
    nan_a, nan_b = np.isnan(a), np.isnan(b)
    if not np.array_equal(nan_a, nan_b):
        return False
    ok = nan_a | ((a == b) & (np.signbit(a) == np.signbit(b)))
    return bool(ok.all())


#: how far two results of attnspec.exact for the same value may lie apart: each is within
#: 10**-dps of the exact value (dps >= 30 here), and which midpoint is returned depends on
#: the precision the evaluation reached, which the form of the inputs may change (a hidden
#: value of 1e300 raises the starting precision)
_SAME_VALUE = mpmath.mpf(2) ** -90


def mpf_same(a: Any, b: Any) -> npt.NDArray[np.bool_]:
    """Elementwise: two object arrays of mpf hold the same values as attnspec.exact
    promises them: equal, NaN equal to NaN, or the same float64 rounding (bitwise) and
    within 2**-90 of each other (relative; absolute 2**-1164 near 0)."""
    a, b = np.asarray(a, dtype=object), np.asarray(b, dtype=object)
    out = np.zeros(np.broadcast_shapes(a.shape, b.shape), dtype=bool)
    a, b = np.broadcast_to(a, out.shape), np.broadcast_to(b, out.shape)
    for idx in np.ndindex(out.shape):
        x, y = mpmath.mpf(a[idx]), mpmath.mpf(b[idx])
        if (mpmath.isnan(x) and mpmath.isnan(y)) or x == y:
            out[idx] = True
        elif mpmath.isfinite(x) and mpmath.isfinite(y):
            rx, ry = exact.to_float64(np.array([x, y], dtype=object))
            with mpmath.workdps(60):
                near = abs(x - y) <= _SAME_VALUE * max(abs(x), abs(y), mpmath.mpf(2) ** -1074)
            out[idx] = (
                bool(near)
                and np.array_equal(rx, ry)
                and (math.copysign(1.0, rx) == math.copysign(1.0, ry))
            )
    return out


def check_exact_result(call: Call, y: Any, shape: tuple[int, ...]) -> None:
    """An exact function returns an object ndarray of mpf of the documented shape."""
    if not isinstance(y, np.ndarray) or y.dtype != object:
        raise violation(
            "exact result type", call, f"returned {type(y).__name__}, not an object array"
        )
    if y.shape != shape:
        raise violation("result shape", call, f"returned shape {y.shape}, expected {shape}")
    if not all(isinstance(e, mpmath.mpf) for e in y.reshape(-1)):
        raise violation("exact result type", call, "an entry is not an mpmath.mpf")


def check_float_result(call: Call, out: Any, shape: tuple[int, ...], what: str = "result") -> None:
    """A float64 function returns a float64 ndarray of the documented shape."""
    if not isinstance(out, np.ndarray) or out.dtype != np.float64:
        kind = type(out).__name__ + (f" of {out.dtype}" if isinstance(out, np.ndarray) else "")
        raise violation("result type", call, f"the {what} is a {kind}, not a float64 ndarray")
    if out.shape != shape:
        raise violation("result shape", call, f"the {what} has shape {out.shape}, expected {shape}")


def compare(
    check: str,
    call: Call,
    what: str,
    computed: F64,
    y: Any,
    allowed: Callable[[tuple[int, ...], Any], Any],
    dps: int = 50,
    where: npt.NDArray[np.bool_] | None = None,
) -> None:
    """Each ``computed`` entry (where ``where``, broadcast, is True) within
    ``allowed(idx, y)`` of the exact ``y`` (mpf); exactly the special value where ``y`` is
    NaN or infinite (:func:`abs_error`'s conventions: an infinity of the right sign is
    exact for a value beyond the float64 range)."""
    computed = np.asarray(computed, dtype=np.float64)
    y = np.asarray(y, dtype=object)
    if where is not None:
        where = np.broadcast_to(where, computed.shape)
    worst: tuple[float, Any] = (-1.0, None)
    with mpmath.workdps(max(dps, 40)):
        for idx in np.ndindex(computed.shape):
            if where is not None and not where[idx]:
                continue
            c, yv = float(computed[idx]), mpmath.mpf(y[idx])
            err = abs_error(c, yv)
            a = mpmath.mpf(allowed(idx, yv)) if mpmath.isfinite(yv) else mpmath.mpf(0)
            if mpmath.isnan(a):  # a NaN bound allows nothing but equality
                a = mpmath.mpf(0)
            if err > a:
                ratio = float(err / a) if a > 0 else math.inf
                if ratio > worst[0]:
                    worst = (ratio, (idx, c, yv, a, err))
        if worst[1] is not None:
            idx, c, yv, a, err = worst[1]
            ulps = float(err / ulp_of_exact(yv)) if mpmath.isfinite(yv) else math.inf
            raise violation(
                check,
                call,
                f"{what} at {idx} is {c!r}, exact {mpmath.nstr(yv, 20)}: error {ulps:.3g} ulp, "
                f"{worst[0]:.3g} times the allowed {mpmath.nstr(a, 3)}",
            )


def _ulp_allowed(idx: tuple[int, ...], yv: Any) -> Any:
    return ulp_of_exact(yv)


# ---------------------------------------------------------------------------------------
# Forms: an argument as Python source, and the canonical value it stands for
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Form:
    """One argument: ``code`` builds it; ``value`` is what it stands for (a C-contiguous
    float64, or bool, ndarray for an array; the plain Python value otherwise); ``plain``
    says the form is that value itself (a C-contiguous float64 or bool array, a Python
    number or string)."""

    code: str
    value: Any
    plain: bool = True

    def __repr__(self) -> str:
        return self.code


def py(value: Any) -> Form:
    """A plain Python value (number, string, tuple, bool)."""
    return Form(repr(value), value, True)


_ML = {
    np.dtype(ml_dtypes.bfloat16): "ml_dtypes.bfloat16",
    np.dtype(ml_dtypes.float8_e5m2): "ml_dtypes.float8_e5m2",
    np.dtype(ml_dtypes.float8_e4m3fn): "ml_dtypes.float8_e4m3fn",
}

FLOAT_DTYPES = (
    np.dtype(np.float64),
    np.dtype(np.float32),
    np.dtype(np.float16),
    np.dtype(ml_dtypes.bfloat16),
    np.dtype(ml_dtypes.float8_e5m2),
    np.dtype(ml_dtypes.float8_e4m3fn),
)
INT_DTYPES = tuple(
    np.dtype(d)
    for d in (np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64)
)


def dtype_code(dt: np.dtype[Any]) -> str:
    if dt in _ML:
        return _ML[dt]
    if not dt.isnative:
        return f"np.dtype({dt.str!r})"
    return f"np.{dt.name}" if dt.name != "bool" else "np.bool_"


def literal(a: np.ndarray) -> str:
    """Source that builds ``a`` (values, shape, dtype) as a new C-contiguous array."""
    d = dtype_code(a.dtype)
    if a.size == 0:
        return f"np.zeros({a.shape!r}, dtype={d})"
    return f"np.array({np.asarray(a).tolist()!r}, dtype={d})"


def _tuples(x: Any) -> Any:
    return tuple(_tuples(e) for e in x) if isinstance(x, list) else x


def _is_float(dt: np.dtype[Any]) -> bool:
    return dt.kind == "f" or dt in _ML


#: how an array argument may be laid out (besides "c", a new C-contiguous array)
LAYOUTS = (
    "c",
    "fortran",
    "negstride",
    "strided",
    "transposed",
    "readonly",
    "broadcast",
    "list",
    "tuple",
    "byteswapped",
    "scalar",
)


def _layouts_for(shape: tuple[int, ...], dt: np.dtype[Any], allowed: Sequence[str]) -> list[str]:
    ndim = len(shape)
    ok = []
    for lay in allowed:
        if lay in ("fortran", "transposed") and ndim < 2:
            continue
        if lay == "negstride" and ndim < 1:
            continue
        if lay == "byteswapped" and (dt in _ML or dt.kind == "b" or dt.itemsize == 1):
            continue
        if lay == "scalar" and ndim != 0:
            continue
        if lay in ("list", "tuple") and (0 in shape[:-1] or (dt.kind == "b" and 0 in shape)):
            continue  # a nested list loses such sides; an empty one is float64, not bool
        ok.append(lay)
    return ok


@st.composite
def broadcast_source(draw: st.DrawFn, shape: tuple[int, ...]) -> tuple[int, ...]:
    """A shape that broadcasts to ``shape``: a suffix, some sides replaced by 1."""
    keep = draw(st.integers(0, len(shape)))
    return tuple(1 if draw(st.booleans()) else side for side in shape[len(shape) - keep :])


def _cast(a: F64, dt: np.dtype[Any]) -> np.ndarray:
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.asarray(a).astype(dt)


def _canonical(a: np.ndarray, boolean: bool) -> np.ndarray:
    with np.errstate(all="ignore"):
        return np.array(a, dtype=bool if boolean else np.float64, order="C", copy=True)


@st.composite
def array_form(
    draw: st.DrawFn,
    shape: tuple[int, ...],
    values: Callable[[tuple[int, ...]], st.SearchStrategy[np.ndarray]],
    dtype: np.dtype[Any],
    layouts: Sequence[str] = LAYOUTS,
) -> Form:
    """An array argument of ``shape`` and ``dtype`` (the values drawn by ``values(shape)``
    as float64, or bool for a bool dtype, and cast), in one of ``layouts``."""
    boolean = dtype.kind == "b"
    choices = _layouts_for(shape, dtype, layouts)
    # "c" three times: about half the arguments are plain arrays
    layout = draw(st.sampled_from(["c", "c", "c", *choices] if "c" in choices else choices))
    src_shape = draw(broadcast_source(shape)) if layout == "broadcast" else shape
    a = _cast(draw(values(src_shape)), dtype)
    if layout == "broadcast":
        code = f"np.broadcast_to({literal(a)}, {shape!r})"
        a = np.broadcast_to(a, shape)
    elif layout == "c":
        code = literal(a)
    elif layout == "fortran":
        code = f"np.asfortranarray({literal(a)})"
    elif layout == "negstride":
        axes = tuple(sorted(draw(st.sets(st.integers(0, a.ndim - 1), min_size=1))))
        code = f"np.flip({literal(np.flip(a, axes))}, axis={axes!r})"
    elif layout == "strided":
        if boolean:
            fill = "False"
        elif _is_float(dtype):
            fill = "nan"
        else:
            fill = repr(int(np.iinfo(dtype).max))
        code = (
            f"np.stack([{literal(a)}, np.full({a.shape!r}, {fill}, dtype={dtype_code(dtype)})],"
            " axis=-1)[..., 0]"
        )
    elif layout == "transposed":
        perm = tuple(draw(st.permutations(range(a.ndim))))
        inv = tuple(int(i) for i in np.argsort(perm))
        code = f"np.transpose({literal(np.ascontiguousarray(np.transpose(a, perm)))}, {inv!r})"
    elif layout == "readonly":
        # a read-only array over an immutable bytes object
        d = dtype_code(dtype)
        code = f"np.frombuffer({literal(a)}.tobytes(), dtype={d}).reshape({a.shape!r})"
    elif layout == "byteswapped":
        code = literal(a.astype(dtype.newbyteorder(">")))
    elif layout == "list":
        code = repr(a.tolist())
    elif layout == "tuple":
        code = repr(_tuples(a.tolist()))
    elif layout == "scalar":
        v = bool(a) if boolean else (float(a) if _is_float(dtype) else int(a))
        code = f"{dtype_code(dtype)}({v!r})"
    else:  # pragma: no cover
        raise AssertionError(layout)
    canon = _canonical(a, boolean)
    form = Form(
        code, canon, plain=(layout == "c" and dtype == (np.bool_ if boolean else np.float64))
    )
    _verify(form, boolean)
    return form


def _verify(form: Form, boolean: bool = False) -> None:
    """The fuzzer's own check: the source builds what the form says it stands for."""
    built = build(form.code)
    with np.errstate(all="ignore"):
        got = np.array(built, dtype=bool if boolean else np.float64)
    want = form.value
    assert got.shape == want.shape, (form.code, got.shape, want.shape)
    if boolean:
        assert np.array_equal(got, want), form.code
    else:
        assert same_bits(got, want), form.code


# ---------------------------------------------------------------------------------------
# Numbers
# ---------------------------------------------------------------------------------------

#: the regimes of the softmax family's logits
REGIMES = ("moderate", "wide", "huge", "underflow", "subnormal", "ties")
#: the special values sprinkled over an array
SPECIALS = (math.nan, math.inf, -math.inf, -0.0)


def _elements(regime: str) -> st.SearchStrategy[float]:
    if regime == "moderate":
        return st.floats(-10, 10, width=32)
    if regime == "wide":
        return st.floats(-2e3, 2e3)
    if regime == "huge":
        big = [1e308, -1e308, DBL_MAX, -DBL_MAX, 1e300, -1e300, 8.98e307]
        return st.one_of(st.sampled_from(big), st.floats(-10, 10, width=32))
    if regime == "underflow":
        return st.one_of(st.sampled_from([0.0, -744.0, -745.2, -746.0, -1e3]), st.floats(-800, 0))
    if regime == "subnormal":
        tiny = [5e-324, -5e-324, 2.0**-1022, -(2.0**-1022), 2.0**-1070, 0.0, -0.0]
        return st.one_of(st.sampled_from(tiny), st.floats(-1e-308, 1e-308, allow_subnormal=True))
    return st.integers(-2, 2).map(float)  # ties


@st.composite
def float_values(
    draw: st.DrawFn,
    shape: tuple[int, ...],
    elements: st.SearchStrategy[float],
    specials: Sequence[float] = SPECIALS,
    special_rate: int = 3,
) -> F64:
    """A float64 array of ``elements``; in one array in ``special_rate``, up to three
    entries replaced by ``specials``."""
    a = np.array(draw(hnp.arrays(np.float64, shape, elements=elements)), dtype=np.float64)
    if a.size and specials and draw(st.integers(0, special_rate - 1)) == special_rate - 1:
        flat = a.reshape(-1)
        for _ in range(draw(st.integers(1, 3))):
            flat[draw(st.integers(0, a.size - 1))] = draw(st.sampled_from(list(specials)))
    return a


def int_values(dt: np.dtype[Any], small: bool) -> Callable[[tuple[int, ...]], Any]:
    info = np.iinfo(dt)
    if small:
        lo, hi = max(info.min, -3), min(info.max, 3)
        elements: st.SearchStrategy[int] = st.integers(lo, hi)
    else:
        elements = st.one_of(
            st.integers(max(info.min, -5), 5), st.sampled_from([int(info.min), int(info.max)])
        )
    return lambda shape: hnp.arrays(dt, shape, elements=elements)


def is_special(*arrays: Any) -> bool:
    """Whether any array holds a special value: NaN, inf, -0.0, a subnormal, |x| >= 1e300,
    or is empty."""
    for a in arrays:
        if a is None:
            continue
        a = np.asarray(a, dtype=np.float64)
        if a.size == 0:
            return True
        with np.errstate(all="ignore"):
            mag = np.abs(a)
            if (
                not np.isfinite(a).all()
                or (np.signbit(a) & (a == 0)).any()
                or ((mag > 0) & (mag < 2.0**-1022)).any()
                or (mag >= 1e300).any()
            ):
                return True
    return False


# ---------------------------------------------------------------------------------------
# The softmax family
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SoftmaxCase:
    """One input of the softmax family: ``x`` and the other arguments (None: left out)."""

    x: Form
    axis: Form | None = None
    axis_positional: bool = False
    where: Form | None = None
    keepdims: Form | None = None
    precision: Form | None = None
    dps: Form | None = None

    def call(self, kind: str, exact_fn: bool = False, x: str | None = None) -> Call:
        args = [x if x is not None else self.x.code]
        kw: list[tuple[str, str]] = []
        if self.axis is not None:
            if self.axis_positional:
                args.append(self.axis.code)
            else:
                kw.append(("axis", self.axis.code))
        if self.where is not None:
            kw.append(("where", self.where.code))
        if kind == "logsumexp" and self.keepdims is not None:
            kw.append(("keepdims", self.keepdims.code))
        if exact_fn:
            if self.dps is not None:
                kw.append(("dps", self.dps.code))
        elif self.precision is not None:
            kw.append(("precision", self.precision.code))
        prefix = "attnspec.exact." if exact_fn else "attnspec."
        return Call(prefix + kind, tuple(args), tuple(kw))

    @property
    def axis_value(self) -> Any:
        return -1 if self.axis is None else self.axis.value

    @property
    def precision_value(self) -> str:
        return "accurate" if self.precision is None else str(self.precision.value)

    @property
    def dps_value(self) -> int:
        return 50 if self.dps is None else int(self.dps.value)

    @property
    def keepdims_value(self) -> bool:
        return False if self.keepdims is None else bool(self.keepdims.value)

    def where_full(self) -> npt.NDArray[np.bool_]:
        x = self.x.value
        if self.where is None:
            return np.ones(x.shape, dtype=bool)
        return np.broadcast_to(self.where.value, x.shape)

    def kind(self) -> str:
        """The kind this input is counted under: special > layout > valid."""
        x = self.x.value
        lay = slice_layout(x.shape, self.axis_value)
        incl = lay.to_rows(self.where_full()) if lay.n else np.zeros((lay.rows, 0), bool)
        if is_special(x) or (lay.rows and not incl.any(axis=-1).all()):
            return "special"
        others = (self.axis, self.where, self.keepdims, self.precision, self.dps)
        if not self.x.plain or any(f is not None and not f.plain for f in others):
            return "layout"
        return "valid"

    def __repr__(self) -> str:
        return f"SoftmaxCase({self.call('softmax')!r})"


@st.composite
def axis_forms(draw: st.DrawFn, ndim: int) -> tuple[Form | None, bool]:
    """A valid ``axis`` for ``ndim`` dimensions (None: left out, the default -1) and whether
    it is passed positionally."""
    positional = draw(st.booleans())
    if ndim == 0:
        choice = draw(st.sampled_from(["none", "empty"]))
    else:
        choice = draw(
            st.sampled_from(["default", "int", "neg", "tuple", "none", "list", "npint", "empty"])
        )
    if choice == "default":
        return None, False
    if choice == "none":
        return py(None), positional
    if choice == "empty":
        return py(()), positional
    i = draw(st.integers(0, ndim - 1))
    if choice == "int":
        return py(i), positional
    if choice == "neg":
        return py(i - ndim), positional
    if choice == "npint":
        return Form(f"np.int64({i})", i, False), positional
    axes = draw(st.lists(st.integers(0, ndim - 1), min_size=1, max_size=ndim, unique=True))
    axes = [a - ndim if draw(st.booleans()) else a for a in axes]
    if choice == "list":
        return Form(repr(axes), tuple(axes), False), positional
    return py(tuple(axes)), positional


def _bools(shape: tuple[int, ...]) -> st.SearchStrategy[np.ndarray]:
    # mostly True (shrinks to all True)
    return hnp.arrays(np.bool_, shape, elements=st.sampled_from([True, True, True, False]))


@st.composite
def where_forms(draw: st.DrawFn, shape: tuple[int, ...], layouts: Sequence[str] = LAYOUTS) -> Form:
    """A bool ``where`` that broadcasts to ``shape``."""
    src = draw(broadcast_source(shape))
    if src == () and draw(st.booleans()):
        v = draw(st.booleans())
        return Form(repr(v), np.array(v), True)
    return draw(array_form(src, _bools, np.dtype(np.bool_), layouts))


PRECISION_FORMS = (
    None,
    py("accurate"),
    py("fast"),
    Form("np.str_('fast')", "fast", False),
    Form("np.str_('accurate')", "accurate", False),
)
DPS_FORMS = (None, py(30), Form("np.int64(40)", 40, False), py(60))
KEEPDIMS_FORMS = (None, py(False), py(True), Form("np.bool_(True)", True, False))


@st.composite
def x_values(draw: st.DrawFn, shape: tuple[int, ...], dt: np.dtype[Any]) -> Any:
    if dt.kind in "iu":
        return int_values(dt, small=False)
    regime = draw(st.sampled_from(REGIMES))
    return lambda s: float_values(s, _elements(regime))


@st.composite
def softmax_cases(
    draw: st.DrawFn,
    *,
    max_side: int = 4,
    max_dims: int = 3,
    plain: bool = False,
    need_excluded: bool = False,
    big_ints: bool = False,
) -> SoftmaxCase:
    """An input of the softmax family in any valid form (``plain``: float64 C arrays;
    ``big_ints``: x a nested list of Python ints beyond int64, which round to float64)."""
    ndim = draw(st.integers(1 if need_excluded else 0, max_dims))
    lo = 1 if (need_excluded or big_ints) else 0
    shape = tuple(
        draw(st.sampled_from([s for s in (1, 2, 3, 4, 0) if lo <= s <= max_side]))
        for _ in range(ndim)
    )
    layouts = ("c",) if plain else LAYOUTS
    if plain:
        dt: Any = np.dtype(np.float64)
    elif big_ints:
        dt = "pyint"
    else:
        dt = draw(st.sampled_from((FLOAT_DTYPES[0], *FLOAT_DTYPES, *INT_DTYPES)))
    if isinstance(dt, str):  # Python ints beyond int64, in a list (documented: rounded)
        ints = draw(
            st.lists(
                st.one_of(st.integers(-3, 3), st.integers(-(2**200), 2**200)),
                min_size=math.prod(shape),
                max_size=math.prod(shape),
            )
        )
        if ints:
            ints[0] = draw(st.sampled_from([2**64, -(2**70), 2**100 + 1]))
        canon = np.array([float(i) for i in ints], dtype=np.float64).reshape(shape)
        nested = np.array(ints, dtype=object).reshape(shape).tolist() if shape else ints[0]
        x = Form(repr(nested), canon, False)
    else:
        values = draw(x_values(shape, dt))
        x = draw(array_form(shape, values, dt, layouts))
    axis, positional = draw(axis_forms(ndim))
    if plain and axis is not None and not axis.plain:
        axis = py(axis.value)
    where = None
    if need_excluded or draw(st.booleans()):
        where = draw(where_forms(shape, layouts))
        if need_excluded:
            w = np.broadcast_to(where.value, shape).copy()
            if w.all():
                w.reshape(-1)[draw(st.integers(0, w.size - 1))] = False
            where = Form(literal(w), w, True)
    case = SoftmaxCase(
        x=x,
        axis=axis,
        axis_positional=positional,
        where=where,
        keepdims=draw(st.sampled_from(KEEPDIMS_FORMS[:3] if plain else KEEPDIMS_FORMS)),
        precision=draw(st.sampled_from(PRECISION_FORMS[:3] if plain else PRECISION_FORMS)),
        dps=draw(st.sampled_from(DPS_FORMS[:2] if plain else DPS_FORMS)),
    )
    return case


def _rows(case: SoftmaxCase, kind: str, a: Any) -> Any:
    """A result (or exact result) of ``kind`` as rows: (R, n), or (R, 1) for logsumexp."""
    lay = slice_layout(case.x.value.shape, case.axis_value)
    a = np.asarray(a)
    if kind == "logsumexp":
        return a.reshape(lay.rows, 1)
    return lay.to_rows(a)


def softmax_expected_shape(case: SoftmaxCase, kind: str) -> tuple[int, ...]:
    x = case.x.value
    if kind != "logsumexp":
        return x.shape
    lay = slice_layout(x.shape, case.axis_value)
    if not case.keepdims_value:
        return lay.kept_shape
    axes = normalize_axes(case.axis_value, x.ndim)
    return tuple(1 if a in axes else x.shape[a] for a in range(x.ndim))


def softmax_allowed(case: SoftmaxCase, kind: str) -> Callable[[tuple[int, ...], Any], Any]:
    """The claimed bound of ``kind`` at the case's precision, entry by entry of the rows:
    one ulp of the exact value ("accurate"), or the derived fast bound of
    :func:`attnspec.spec.tolerances.softmax.error_bound` ("fast"); a +inf slice is held to
    the bound of its infinite entries taken as equal (as check_agreement does)."""
    if case.precision_value == "accurate":
        return _ulp_allowed
    x = case.x.value
    lay = slice_layout(x.shape, case.axis_value)
    xr, wr = lay.to_rows(x), lay.to_rows(case.where_full())
    with np.errstate(invalid="ignore"):
        posinf = (wr & (xr == np.inf)).any(axis=-1) & ~(wr & np.isnan(xr)).any(axis=-1)
    stand_in = np.where(wr & (xr == np.inf), 0.0, -np.inf)
    xb = np.where(posinf[:, None], stand_in, xr)
    rel, ab = tol.error_bound(kind, "fast", xb, wr)

    def allowed(idx: tuple[int, ...], yv: Any) -> Any:
        return mpmath.mpf(float(rel[idx])) * abs(yv) + mpmath.mpf(float(ab[idx]))

    return allowed


def check_softmax_rules(case: SoftmaxCase, kind: str, call: Call, out: Any) -> None:
    """The special-slice rules of reference/softmax.py, on rows of a float64 result."""
    x = case.x.value
    lay = slice_layout(x.shape, case.axis_value)
    xr, wr = lay.to_rows(x), lay.to_rows(case.where_full())
    r = _rows(case, kind, out)
    with np.errstate(invalid="ignore"):
        incl = wr & (xr != -np.inf)
        nan_rows = (incl & np.isnan(xr)).any(axis=-1)
        on = incl & (xr == np.inf)
        posinf_rows = ~nan_rows & on.any(axis=-1)
        empty_rows = ~nan_rows & ~posinf_rows & ~incl.any(axis=-1)
    for i in range(lay.rows):
        row = r[i]
        if nan_rows[i]:
            if kind == "logsumexp":
                ok, want = bool(np.isnan(row).all()), "NaN (an included NaN)"
            else:
                # NaN but where no weight is carried (excluded entries, -inf): 0 / -inf
                off = 0.0 if kind == "softmax" else -np.inf
                ok = bool(np.isnan(row[incl[i]]).all() and (row[~incl[i]] == off).all())
                want = f"NaN at the included entries, {off} at the others (an included NaN)"
        elif empty_rows[i]:
            v = 0.0 if kind == "softmax" else -np.inf
            ok, want = bool((row == v).all()), f"{v} throughout (nothing included)"
        elif posinf_rows[i]:
            if kind == "logsumexp":
                ok, want = bool(row[0] == np.inf), "inf (an included +inf)"
            else:
                n_inf = int(on[i].sum())
                off = 0.0 if kind == "softmax" else -np.inf
                with mpmath.workdps(40):
                    ye = mpmath.mpf(1) / n_inf if kind == "softmax" else -mpmath.log(n_inf)
                    # two ulps: the accurate claim, or the fast bound's order for k <= 64
                    close = all(
                        abs(mpmath.mpf(float(v)) - ye) <= 4 * (n_inf + 8) * U * abs(ye) + 1e-300
                        for v in row[on[i]]
                    )
                ok = bool((row[~on[i]] == off).all()) and close
                want = f"{off} off the {n_inf} +inf entries, about {float(ye)!r} on them"
        else:
            continue
        if not ok:
            raise violation(
                "special-value rules",
                call,
                f"slice {i} of the result (as rows) is {row.tolist()!r}; expected {want}",
            )


def check_softmax_case(case: SoftmaxCase, label: str | None = None) -> dict[str, Any]:
    """(a), (c), (d) for the three functions and their exact counterparts on ``case``;
    returns the results and exact results by kind (for the hidden-value check)."""
    kind_label = label or case.kind()
    x = case.x.value
    where = None if case.where is None else case.where_full()
    exact_results = {}
    for kind in KINDS:
        call = case.call(kind)
        out = run(call, kind_label).value()
        shape = softmax_expected_shape(case, kind)
        check_float_result(call, out, shape)
        ecall = case.call(kind, exact_fn=True)
        y = run(ecall, kind_label).value()
        check_exact_result(ecall, y, shape)
        if kind_label != "valid":
            kw: dict[str, Any] = {"where": where, "dps": case.dps_value}
            if kind == "logsumexp":
                kw["keepdims"] = case.keepdims_value
            y_plain = getattr(exact, kind)(x.copy(), case.axis_value, undecided="midpoint", **kw)
            if not mpf_same(y, y_plain).all():
                raise violation(
                    "exact reads every form",
                    ecall,
                    "differs from the call on the same values as a C-contiguous float64 array",
                )
        compare(
            f"{case.precision_value} bound",
            call,
            kind,
            _rows(case, kind, out),
            _rows(case, kind, y),
            softmax_allowed(case, kind),
            case.dps_value,
        )
        check_softmax_rules(case, kind, call, out)
        y64 = run(Call("attnspec.exact.to_float64", (_obj_literal(y),)), kind_label).value()
        check_softmax_rules(case, kind, ecall, y64)
        exact_results[kind] = (out, y)
    return exact_results


def mpf_code(v: Any) -> str:
    """Source that builds the mpf ``v`` exactly (whatever the working precision)."""
    if not isinstance(v, mpmath.mpf):
        v = mpmath.mpf(v)  # (an mpf is kept as it is: mpf(v) would round it)
    if mpmath.isnan(v):
        return "mpmath.mpf('nan')"
    if mpmath.isinf(v):
        return "mpmath.mpf('inf')" if v > 0 else "mpmath.mpf('-inf')"
    sign, man, exp_, bc = v._mpf_
    if v == 0:
        return "mpmath.mpf(0)"
    m = -int(man) if sign else int(man)
    if bc <= 53:
        return f"mpmath.mpf(({m}, {int(exp_)}))"
    return f"mpmath.workprec({int(bc) + 8})(mpmath.mpf)(({m}, {int(exp_)}))"


def nested_code(codes: Sequence[str], shape: tuple[int, ...]) -> str:
    """A nested list literal of the source ``codes`` (flat, C order) with ``shape``."""
    if not shape:
        return codes[0]
    step = math.prod(shape[1:])
    parts = [nested_code(codes[i * step : (i + 1) * step], shape[1:]) for i in range(shape[0])]
    return "[" + ", ".join(parts) + "]"


def _obj_literal(y: Any) -> str:
    """Source for an object array of mpf (exactly)."""
    y = np.asarray(y, dtype=object)
    if y.size == 0:
        return f"np.empty({y.shape!r}, dtype=object)"
    codes = [mpf_code(v) for v in y.reshape(-1)]
    return f"np.array({nested_code(codes, y.shape)}, dtype=object)"


HUGE_HIDDEN = (1e300, -1e300)


def check_softmax_hidden(case: SoftmaxCase) -> None:
    """(e): excluded entries set to NaN, +-inf give bitwise the same results; set to a huge
    finite value, results within the claimed bound of the exact ones."""
    hidden = ~case.where_full()
    assume(hidden.any())
    results = check_softmax_case(case)
    base = {kind: r[0] for kind, r in results.items()}
    exact_base = {kind: r[1] for kind, r in results.items()}
    x = case.x.value
    for value in (math.nan, math.inf, -math.inf, *HUGE_HIDDEN):
        xp = x.copy()
        xp[hidden] = value
        code = literal(xp)
        for kind in KINDS:
            call = case.call(kind, x=code)
            out = run(call, "hidden").value()
            if value in HUGE_HIDDEN:
                compare(
                    f"hidden {value:g} within the bound",
                    call,
                    kind,
                    _rows(case, kind, out),
                    _rows(case, kind, exact_base[kind]),
                    softmax_allowed(case, kind),
                    case.dps_value,
                )
            elif not same_bits(out, base[kind]):
                raise violation(
                    f"hidden {value} never reaches the result",
                    call,
                    f"result {np.asarray(out).tolist()!r} differs from "
                    f"{np.asarray(base[kind]).tolist()!r} (the excluded entries as drawn)",
                )
            ecall = case.call(kind, exact_fn=True, x=code)
            y = run(ecall, "hidden").value()
            if not mpf_same(y, exact_base[kind]).all():
                raise violation(
                    f"hidden {value} never reaches the exact result",
                    ecall,
                    "differs from the exact result with the excluded entries as drawn",
                )


# ---------------------------------------------------------------------------------------
# sdpa
# ---------------------------------------------------------------------------------------

#: the number regimes of attention inputs
SDPA_REGIMES = (
    "moderate",
    "wide",
    "offset",
    "scaled150",
    "tiny_qk",
    "values_huge",
    "values_max",
    "values_tiny",
    "ints",
    "specials",
)
#: option values
SCALES = (
    py(0.5),
    py(1.0),
    py(-0.75),
    py(0.0),
    py(2),
    Form("np.float32(0.25)", 0.25, False),
    Form("np.int64(1)", 1.0, False),
    Form("np.float16(0.5)", 0.5, False),
    py(1e-300),
)
SOFTCAPS = (
    py(5.0),
    py(0.5),
    py(1.0),
    py(30.0),
    py(2),
    Form("np.float32(5.0)", 5.0, False),
    py(1e300),
    py(1e-300),
    py(2.0**-1070),
)
SLOPES = (0.0, 2.0**-8, 0.25, 0.5, 1.0, -0.5)
DROPOUT_PS = (
    py(0.1),
    py(0.5),
    py(0.9),
    py(0.0),  # a keep-mask with dropout_p=0: the factor is 1
    py(0),
    Form("np.float32(0.5)", 0.5, False),
)


@dataclass(frozen=True)
class SdpaCase:
    """One input of sdpa: q, k, v and the keyword arguments given (Forms)."""

    q: Form
    k: Form
    v: Form
    options: tuple[tuple[str, Form], ...] = ()
    precision: Form | None = None
    return_lse: Form | None = None
    dps: Form | None = None
    label: str | None = None  # the kind to count it under (None: decide)

    def opt(self, name: str, default: Any = None) -> Any:
        for key, form in self.options:
            if key == name:
                return form.value
        return default

    def kwargs(self) -> dict[str, Any]:
        """The options as canonical values (sdpa's keyword arguments but precision)."""
        return {key: form.value for key, form in self.options}

    @property
    def rl(self) -> bool:
        return False if self.return_lse is None else bool(self.return_lse.value)

    @property
    def precision_value(self) -> str:
        return "accurate" if self.precision is None else str(self.precision.value)

    @property
    def dps_value(self) -> int:
        return 50 if self.dps is None else int(self.dps.value)

    def call(self, exact_fn: bool = False, **codes: str) -> Call:
        """The call; ``codes`` replace arguments (q, k, v or options) by source."""
        args = tuple(codes.get(n, getattr(self, n).code) for n in ("q", "k", "v"))
        kw = [(key, codes.get(key, form.code)) for key, form in self.options]
        kw += [
            (key, c)
            for key, c in codes.items()
            if key not in ("q", "k", "v") and key not in dict(self.options)
        ]
        if self.return_lse is not None:
            kw.append(("return_lse", self.return_lse.code))
        if exact_fn:
            if self.dps is not None:
                kw.append(("dps", self.dps.code))
        elif self.precision is not None:
            kw.append(("precision", self.precision.code))
        return Call("attnspec.exact.sdpa" if exact_fn else "attnspec.sdpa", args, tuple(kw))

    def kind(self) -> str:
        if self.label is not None:
            return self.label
        m = model(self)
        arrays = [self.q.value, self.k.value, self.v.value]
        arrays += [self.opt(n) for n in ("bias", "alibi_slopes", "sinks")]
        scalars = [self.opt("scale"), self.opt("softcap")]
        odd_scalar = any(
            s is not None and (s == 0 or abs(s) < 2.0**-1022 or abs(s) >= 1e300) for s in scalars
        )
        empty_row = m.seen.size > 0 and not m.seen.any(axis=-1).all()
        if is_special(*arrays) or odd_scalar or empty_row or 0 in m.logits_shape:
            return "special"
        forms = [self.q, self.k, self.v, *(f for _, f in self.options)]
        forms += [f for f in (self.precision, self.return_lse, self.dps) if f is not None]
        return "layout" if any(not f.plain for f in forms) else "valid"

    def __repr__(self) -> str:
        return f"SdpaCase({self.call()!r})"


@dataclass(frozen=True)
class Model:
    """What the definition makes of a case's shapes and visibility."""

    two_d: bool
    batch: tuple[int, ...]
    hq: int
    hkv: int
    n_q: int
    n_k: int
    width: int
    width_v: int
    logits_shape: tuple[int, ...]  # (*batch, Hq, L, S); (L, S) for 2-D inputs
    seen: npt.NDArray[np.bool_]  # visible keys (mask, causal, window, bias -inf)
    seen_no_bias: npt.NDArray[np.bool_]  # mask, causal and window only
    keep: npt.NDArray[np.bool_] | None  # the dropout keep-mask, full shape


def model(case: SdpaCase) -> Model:
    q, k, v = case.q.value, case.k.value, case.v.value
    two_d = q.ndim == 2 and k.ndim == 2 and v.ndim == 2
    if two_d:
        batch: tuple[int, ...] = ()
        hq = hkv = 1
    else:
        batch = np.broadcast_shapes(q.shape[:-3], k.shape[:-3], v.shape[:-3])
        hq, hkv = q.shape[-3], k.shape[-3]
    n_q, width = q.shape[-2:]
    n_k, width_v = k.shape[-2], v.shape[-1]
    shape = (n_q, n_k) if two_d else (*batch, hq, n_q, n_k)
    kw = case.kwargs()
    seen = np.ones(shape, dtype=bool)
    if kw.get("mask") is not None:
        seen = seen & kw["mask"]
    causal = bool(kw.get("causal", False))
    win = kw.get("window")
    if causal or win is not None or kw.get("alibi_slopes") is not None:
        offset = alignment_offset(n_q, n_k, kw.get("align"), "causal")
    else:
        offset = 0
    pattern = visible(n_q, n_k, causal=causal, window=win, offset=offset)
    if pattern is not None:
        seen = seen & pattern
    seen_nb = np.broadcast_to(seen, shape).copy()
    if kw.get("bias") is not None:
        seen = seen & (kw["bias"] != -np.inf)
    keep = None
    if kw.get("dropout_mask") is not None:
        keep = np.broadcast_to(kw["dropout_mask"], shape).copy()
    return Model(
        two_d,
        tuple(batch),
        hq,
        hkv,
        n_q,
        n_k,
        width,
        width_v,
        shape,
        np.broadcast_to(seen, shape).copy(),
        seen_nb,
        keep,
    )


def _reduce_to(full: npt.NDArray[np.bool_], shape: tuple[int, ...]) -> npt.NDArray[np.bool_]:
    """For each entry of an operand of ``shape`` (broadcasting to ``full``): all of the
    entries of ``full`` it is broadcast to."""
    lead = full.ndim - len(shape)
    r = full.all(axis=tuple(range(lead))) if lead > 0 else full
    axes = tuple(i for i, s in enumerate(shape) if s == 1 and r.shape[i] != 1)
    if axes:
        r = r.all(axis=axes, keepdims=True)
    return np.broadcast_to(r, shape)


def hidden_positions(case: SdpaCase) -> dict[str, npt.NDArray[np.bool_]]:
    """Entries of q, k, v and bias that the definition hides: k of keys no query sees, v of
    keys that no query sees or that are dropped wherever seen, q of queries that see no
    key (their logits are all hidden), bias entries hidden by mask, causal or window."""
    m = model(case)
    full = m.logits_shape if not m.two_d else (1, m.n_q, m.n_k)
    unseen = ~m.seen.reshape(full)
    no_weight = unseen if m.keep is None else (unseen | ~m.keep.reshape(full))
    g = m.hq // m.hkv

    def per_key(hide: npt.NDArray[np.bool_], operand: F64) -> npt.NDArray[np.bool_]:
        by_head = hide.all(axis=-2)  # (*batch, Hq, S)
        grouped = by_head.reshape(*by_head.shape[:-2], m.hkv, g, m.n_k).all(axis=-2)
        opshape = operand.shape if not m.two_d else (1, *operand.shape)
        red = _reduce_to(grouped, opshape[:-1])
        out = np.broadcast_to(red[..., None], opshape)
        return out[0] if m.two_d else out

    q = case.q.value
    by_row = unseen.all(axis=-1)  # (*batch, Hq, L)
    qshape = q.shape if not m.two_d else (1, *q.shape)
    hq_ = np.broadcast_to(_reduce_to(by_row, qshape[:-1])[..., None], qshape)
    out = {
        "q": hq_[0] if m.two_d else hq_,
        "k": per_key(unseen, case.k.value),
        "v": per_key(no_weight, case.v.value),
    }
    bias = case.opt("bias")
    if bias is not None:
        out["bias"] = _reduce_to(~m.seen_no_bias, bias.shape)
    return {key: np.array(h) for key, h in out.items()}


def logit_magnitude(case: SdpaCase) -> float:
    """An upper bound of every |logit| and every intermediate of it (finite parts only):
    sum_e |q||k|, |tau| times that, plus |bias| and |slope| * distance."""
    q, k = case.q.value, case.k.value
    m = model(case)
    with np.errstate(all="ignore"):
        qa = np.where(np.isfinite(q), np.abs(q), 0.0)
        ka = np.where(np.isfinite(k), np.abs(k), 0.0)
        if not m.two_d and m.hq != m.hkv:
            ka = np.repeat(ka, m.hq // m.hkv, axis=-3)
        prod = qa @ np.swapaxes(ka, -1, -2)
        worst = float(np.max(prod, initial=0.0))
        scale = case.opt("scale")
        tau = (1.0 / math.sqrt(m.width) if m.width else 0.0) if scale is None else abs(scale)
        worst = max(worst, tau * worst)
        bias = case.opt("bias")
        if bias is not None:
            b = np.where(np.isfinite(bias), np.abs(bias), 0.0)
            worst += float(np.max(b, initial=0.0))
        slopes = case.opt("alibi_slopes")
        if slopes is not None and m.n_q and m.n_k:
            s = np.where(np.isfinite(slopes), np.abs(slopes), 0.0)
            offset = alignment_offset(m.n_q, m.n_k, case.opt("align"), "alibi_slopes")
            dist = float(np.max(np.abs(relative_position(m.n_q, m.n_k, offset))))
            worst += float(np.max(s, initial=0.0)) * dist
    return worst if math.isfinite(worst) else math.inf


def _sdpa_shapes(draw: st.DrawFn, mode: str, max_logits: int) -> tuple[Any, ...]:
    n_q, n_k, width, width_v = (draw(st.sampled_from([1, 2, 3])) for _ in range(4))
    if mode == "valid" and draw(st.integers(0, 7)) == 7:  # one side empty
        side = draw(st.sampled_from(["L", "S", "E", "Ev"]))
        n_q, n_k = (0 if side == "L" else n_q), (0 if side == "S" else n_k)
        width, width_v = (0 if side == "E" else width), (0 if side == "Ev" else width_v)
    if draw(st.integers(0, 5)) == 0:
        return (n_q, width), (n_k, width), (n_k, width_v), (n_q, n_k), 1
    hkv = draw(st.sampled_from([1, 2]))
    hq = hkv * draw(st.sampled_from([1, 2]))
    batch = tuple(draw(st.sampled_from([1, 2])) for _ in range(draw(st.integers(0, 2))))
    while batch and math.prod(batch) * hq * n_q * n_k > max_logits:
        batch = batch[1:]
    qb, kb, vb = (draw(broadcast_source(batch)) for _ in range(3))
    full = np.broadcast_shapes(qb, kb, vb)
    return (
        (*qb, hq, n_q, width),
        (*kb, hkv, n_k, width),
        (*vb, hkv, n_k, width_v),
        (*full, hq, n_q, n_k),
        hq,
    )


def _moderate(shape: tuple[int, ...]) -> st.SearchStrategy[F64]:
    return float_values(shape, st.floats(-3, 3, width=32), specials=())


def _mapped(
    base: Callable[[tuple[int, ...]], st.SearchStrategy[F64]], f: Callable[[F64], F64]
) -> Callable[[tuple[int, ...]], st.SearchStrategy[F64]]:
    return lambda shape: base(shape).map(f)


def _set_first(value: float) -> Callable[[F64], F64]:
    def f(a: F64) -> F64:
        a = a.copy()
        if a.shape and a.shape[-1]:
            a[..., 0] = value
        return a

    return f


@st.composite
def sdpa_cases(draw: st.DrawFn, mode: str = "valid", max_logits: int = 36) -> SdpaCase:
    """An input of sdpa.

    ``mode``: "valid" (any valid form: dtypes, layouts, options, special values; logits
    within the float64 range, see :func:`logit_magnitude`); "hidden" (plain float64 arrays,
    at least one hiding feature, see :func:`hidden_positions`); "overflow" (logits beyond
    the float64 range: a huge scale, q and k, bias or ALiBi slope, nothing hidden).
    """
    qs, ks, vs, full, _ = _sdpa_shapes(draw, mode, max_logits)
    n_q, n_k, width = qs[-2], ks[-2], qs[-1]
    plain = mode != "valid"
    layouts = ("c",) if plain else LAYOUTS
    options: dict[str, Form] = {}
    if mode == "valid":
        regime = draw(st.sampled_from(SDPA_REGIMES))
    elif mode == "overflow":
        regime = draw(st.sampled_from(["scale", "qk", "bias", "alibi"]))
    elif mode == "hidden":  # tiny weights, huge and tiny values, dominant sinks
        regime = draw(st.sampled_from(["moderate", "wide", "offset", "values_huge", "values_tiny"]))
    else:
        regime = "moderate"
    qv = kv = vv = _moderate
    if regime == "wide":
        qv = kv = _mapped(_moderate, lambda a: a * 30.0)
        options["scale"] = py(1.0)
    elif regime == "offset":
        qv = kv = _mapped(_moderate, _set_first(1e3))
        options["scale"] = py(1.0)
    elif regime == "scaled150":
        up = draw(st.booleans())
        qv = _mapped(_moderate, lambda a: a * (1e150 if up else 1e-150))
        kv = _mapped(_moderate, lambda a: a * (1e-150 if up else 1e150))
    elif regime == "tiny_qk":
        qv = kv = _mapped(_moderate, lambda a: a * 1e-160)
    elif regime == "values_huge":
        vv = _mapped(_moderate, lambda a: a * 1e300)
    elif regime == "values_max":
        big = st.sampled_from([DBL_MAX, -DBL_MAX, 1e308, -1e308, 0.0, 1.0])
        vv = lambda shape: float_values(shape, big, specials=())  # noqa: E731
    elif regime == "values_tiny":
        t = draw(st.sampled_from([1e-300, 2.0**-1070, 3 * 2.0**-1074]))
        vv = _mapped(_moderate, lambda a: a * t)
    elif regime == "specials":
        sp = (math.nan, math.inf, -math.inf, -0.0, 5e-324)
        qv = kv = lambda shape: float_values(shape, st.floats(-3, 3, width=32), sp, 2)
        vv = lambda shape: float_values(  # noqa: E731
            shape, st.floats(-3, 3, width=32), (*sp, 1e308, -DBL_MAX), 2
        )
    elif regime in ("scale", "qk", "bias", "alibi"):  # overflow
        pos = lambda shape: float_values(shape, st.floats(1.5, 3.0), specials=())  # noqa: E731
        qv = kv = pos
        if regime == "scale":
            options["scale"] = py(draw(st.sampled_from([1e308, -1e308, 1e200])))
            if options["scale"].value == 1e200:
                qv = kv = _mapped(pos, lambda a: a * 1e60)
        elif regime == "qk":
            qv = kv = _mapped(pos, lambda a: a * 1e160)
            options["scale"] = py(1.0)
        elif regime == "bias":
            options["scale"] = py(1e308)
            qv = kv = _mapped(pos, lambda a: a * 0 + 1.0)
    ints = regime == "ints"

    def dtype_for() -> np.dtype[Any]:
        if plain:
            return np.dtype(np.float64)
        if ints:
            return draw(st.sampled_from((*INT_DTYPES[:4], np.dtype(np.float64))))
        return draw(st.sampled_from((FLOAT_DTYPES[0], FLOAT_DTYPES[0], *FLOAT_DTYPES[:4])))

    def operand(shape: tuple[int, ...], values: Any) -> Form:
        dt = dtype_for()
        if dt.kind in "iu":
            values = int_values(dt, small=True)
        return draw(array_form(shape, values, dt, layouts))

    q, k, v = operand(qs, qv), operand(ks, kv), operand(vs, vv)
    if width == 0 or draw(st.integers(0, 3)) == 3:
        options.setdefault("scale", draw(st.sampled_from(SCALES)))

    def on(p: int = 2) -> bool:  # one time in p (shrinks to off)
        return draw(st.integers(0, p - 1)) == p - 1

    hiding = mode == "hidden"
    head_shape = full[:-2]
    if mode != "overflow":
        if on() or (hiding and on()):
            mask_shape = draw(broadcast_source(full))
            options["mask"] = draw(array_form(mask_shape, _bools, np.dtype(np.bool_), layouts))
        if on(3):
            b_shape = draw(broadcast_source(full))

            def bias_values(shape: tuple[int, ...]) -> st.SearchStrategy[F64]:
                sp = (
                    (-math.inf,) if regime != "specials" else (-math.inf, math.nan, math.inf, 1e308)
                )
                # a bias of -600 or -40 makes weights of e**-600, e**-40
                elements = st.one_of(
                    st.floats(-4, 4, width=32), st.sampled_from([-600.0, -40.0, 40.0])
                )
                return float_values(shape, elements, sp, 2)

            bdt = (
                draw(st.sampled_from((FLOAT_DTYPES[0], FLOAT_DTYPES[2], FLOAT_DTYPES[3])))
                if not plain
                else np.dtype(np.float64)
            )
            options["bias"] = draw(array_form(b_shape, bias_values, bdt, layouts))
        if on(3):
            options["causal"] = draw(
                st.sampled_from([py(True), Form("np.bool_(True)", True, False), py(False)])
            )
        if on(4):
            side = st.sampled_from([None, 0, 1, 2])
            w = (draw(side), draw(side))
            if plain or draw(st.booleans()):
                options["window"] = py(w)
            else:
                options["window"] = Form(repr(list(w)), w, False)
        if on(4):
            options["softcap"] = draw(st.sampled_from(SOFTCAPS[:5] if plain else SOFTCAPS))
        if on(4):
            p = draw(st.sampled_from(DROPOUT_PS))
            keep_shape = draw(broadcast_source(full))
            options["dropout_mask"] = draw(
                array_form(keep_shape, _bools, np.dtype(np.bool_), layouts)
            )
            options["dropout_p"] = p
        elif on(8) and not plain:
            options["dropout_mask"] = Form(
                f"np.ones({full!r}, dtype=bool)", np.ones(full, bool), False
            )
            options["dropout_p"] = draw(st.sampled_from([py(0.0), py(0)]))
        if hiding and not any(
            n in options for n in ("mask", "causal", "window", "bias", "dropout_mask")
        ):
            options["causal"] = py(True)
    if regime == "bias":
        options["bias"] = Form(f"np.full({full!r}, 1e308)", np.full(full, 1e308), False)
    if on(4) or regime == "alibi":
        a_shape = draw(broadcast_source((*head_shape,))) if head_shape else ()
        if regime == "alibi":
            values_a = lambda s: float_values(s, st.just(1e308), specials=())  # noqa: E731
        else:
            values_a = lambda s: float_values(s, st.sampled_from(SLOPES), specials=())  # noqa: E731
        options["alibi_slopes"] = draw(array_form(a_shape, values_a, np.dtype(np.float64), layouts))
    if on(4):
        s_shape = draw(broadcast_source((*head_shape,))) if head_shape else ()
        sp = (math.nan, math.inf, -math.inf) if regime == "specials" else ()
        options["sinks"] = draw(
            array_form(
                s_shape,
                # a sink of 40 or 50 takes nearly all the weight
                lambda s: float_values(
                    s, st.one_of(st.floats(-4, 4, width=32), st.sampled_from([40.0, 50.0])), sp, 2
                ),
                np.dtype(np.float64),
                layouts,
            )
        )
    needs = (
        options.get("causal", py(False)).value or "window" in options or "alibi_slopes" in options
    )
    if (needs and n_q != n_k) or on(4):
        options["align"] = draw(
            st.sampled_from(
                [py("top_left"), py("bottom_right")]
                + ([] if plain else [Form("np.str_('bottom_right')", "bottom_right", False)])
            )
        )
    rl = draw(
        st.sampled_from([py(True), py(True), None, py(False), Form("np.bool_(True)", True, False)])
    )
    if plain and rl is not None and not rl.plain:
        rl = py(True)
    precision = draw(st.sampled_from(PRECISION_FORMS[:3] if plain else PRECISION_FORMS))
    dps = draw(st.sampled_from(DPS_FORMS[:2] if plain else DPS_FORMS))
    order = (
        "scale",
        "mask",
        "bias",
        "causal",
        "window",
        "align",
        "softcap",
        "alibi_slopes",
        "sinks",
        "dropout_mask",
        "dropout_p",
    )
    opts = tuple((n, options[n]) for n in order if n in options)
    case = SdpaCase(q, k, v, opts, precision, rl, dps, "overflow" if mode == "overflow" else None)
    magnitude = logit_magnitude(case)
    if mode == "overflow":
        assume(magnitude > DBL_MAX)
    else:
        assume(magnitude < DBL_MAX * 0.75)
    return case


def _output_shape(m: Model) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if m.two_d:
        return (m.n_q, m.width_v), (m.n_q,)
    return (*m.batch, m.hq, m.n_q, m.width_v), (*m.batch, m.hq, m.n_q)


def check_sdpa_rules(case: SdpaCase, call: Call, out: F64, lse: F64 | None) -> None:
    """A row that sees no key: output 0 and lse -inf, or with a sink sigma: output 0 and
    lse sigma (NaN throughout for a NaN sink)."""
    m = model(case)
    empty = ~m.seen.any(axis=-1)  # (*batch, Hq, L) or (L,)
    if not empty.any():
        return
    sinks = case.opt("sinks")
    sig = None
    if sinks is not None:
        sig = (
            np.broadcast_to(np.asarray(sinks)[..., None], empty.shape)
            if not m.two_d
            else np.broadcast_to(sinks, empty.shape)
        )
    for idx in zip(*np.nonzero(empty), strict=True):
        row = out[idx]
        s = -math.inf if sig is None else float(sig[idx])
        if math.isnan(s):
            ok = bool(np.isnan(row).all()) and (lse is None or math.isnan(lse[idx]))
            want = "NaN throughout (a NaN sink)"
        else:
            ok = bool((row == 0).all()) and (lse is None or lse[idx] == s)
            want = f"output 0 and lse {s!r}"
        if not ok:
            got = f"output {row.tolist()!r}" + ("" if lse is None else f", lse {lse[idx]!r}")
            raise violation(
                "a row that sees nothing",
                call,
                f"query row {tuple(int(i) for i in idx)} sees no key: {got}; expected {want}",
            )


def textbook_bounds_evaluate(
    case: SdpaCase, q: F64 | None = None, k: F64 | None = None
) -> tuple[F64, F64]:
    """The textbook bounds (output, lse) of the case's plain form (q and k replaced by
    ``q``, ``k`` if given); a violation of the spec's own if they cannot be evaluated."""
    kw = case.kwargs()
    q = case.q.value if q is None else q
    k = case.k.value if k is None else k
    try:
        with np.errstate(all="ignore"):
            _, bound = atol.textbook_sdpa_bound(q, k, case.v.value, **kw)
            lse_b = atol.textbook_lse_bound(q, k, **kw)
    except Exception as exc:
        raise violation(
            "spec: the textbook bounds evaluate",
            "attnspec.spec.tolerances.attention.textbook_sdpa_bound",
            f"raised {type(exc).__name__}: {exc} on the plain form of {case.call()!r}",
        ) from exc
    return bound, lse_b


def sdpa_allowed(case: SdpaCase, w: F64 | None) -> tuple[Any, Any]:
    """The claimed bounds on the output and the lse: "accurate": 4u sum_j p|v| + eta (w:
    that sum, exact, rounded) and one ulp; "fast": the textbook bounds."""
    if case.precision_value == "accurate":
        assert w is not None
        with np.errstate(over="ignore"):
            bound = atol.accurate_sdpa_bound(w * (1 + 2 * U))
        return (lambda idx, yv: float(bound[idx])), _ulp_allowed
    m = model(case)
    q, k = case.q.value, case.k.value
    if not m.two_d:
        # q and k broadcast to the batch of the output (the same attention): the
        # textbook bounds do not take options with batch dimensions only v has (see
        # textbook_bounds_evaluate and test_spec_textbook_bounds_on_every_valid_case)
        q = np.broadcast_to(q, (*m.batch, *q.shape[-3:])).copy()
        k = np.broadcast_to(k, (*m.batch, *k.shape[-3:])).copy()
    bound, lse_b = textbook_bounds_evaluate(case, q, k)
    out_shape, lse_shape = _output_shape(m)
    bound = np.broadcast_to(bound, out_shape)
    lse_b = np.broadcast_to(lse_b, lse_shape)
    return (lambda idx, yv: float(bound[idx])), (lambda idx, yv: float(lse_b[idx]))


@dataclass(frozen=True)
class SdpaResults:
    out: F64
    lse: F64 | None
    exact: Any  # what exact.sdpa returned for the case
    y: Any  # the exact output
    y_lse: Any  # the exact lse (always computed)
    weighted: F64  # sum_j p_ij |v_jk|, exact, rounded to float64


def _exact_on_plain_values(
    case: SdpaCase, ecall: Call, y: Any, y_lse: Any, dps: int, kwargs: dict[str, Any]
) -> tuple[Any, Any]:
    """exact.sdpa on the case's plain values (C-contiguous float64), with |v| beside v;
    a violation unless its output and lse are the values ``y``, ``y_lse`` of the drawn
    call. Returns the exact sums sum_j p_ij |v_jk| and the lse."""
    v = case.v.value
    with np.errstate(invalid="ignore"):
        both = np.concatenate([v, np.abs(v)], axis=-1)
    yc, ylc = exact.sdpa(
        case.q.value.copy(),
        case.k.value.copy(),
        both,
        dps=dps,
        return_lse=True,
        undecided="midpoint",
        **kwargs,
    )
    ev = v.shape[-1]
    if not mpf_same(y, yc[..., :ev]).all() or (
        y_lse is not None and not mpf_same(y_lse, ylc).all()
    ):
        raise violation(
            "exact reads every form",
            ecall,
            "differs from the call on the same values as C-contiguous float64 arrays",
        )
    return yc[..., ev:], ylc


def check_sdpa_case(case: SdpaCase, label: str | None = None) -> SdpaResults:
    """(a), (c), (d) for sdpa and exact.sdpa on ``case``."""
    if case.label == "overflow":
        raise AssertionError("an overflow case has a contract of its own: check_sdpa_overflow")
    kind_label = label or case.kind()
    m = model(case)
    out_shape, lse_shape = _output_shape(m)
    call = case.call()
    res = run(call, kind_label).value()
    if case.rl:
        if not isinstance(res, tuple) or len(res) != 2:
            raise violation("result type", call, f"return_lse=True gave {type(res).__name__}")
        out, lse = res
        check_float_result(call, lse, lse_shape, "lse")
    else:
        out, lse = res, None
    check_float_result(call, out, out_shape, "output")
    ecall = case.call(exact_fn=True)
    yres = run(ecall, kind_label).value()
    y, y_lse = yres if case.rl else (yres, None)
    check_exact_result(ecall, y, out_shape)
    if y_lse is not None:
        check_exact_result(ecall, y_lse, lse_shape)
    mass, ylc = _exact_on_plain_values(case, ecall, y, y_lse, case.dps_value, case.kwargs())
    w = exact.to_float64(mass)
    out_allowed, lse_allowed = sdpa_allowed(case, w)
    p = case.precision_value
    compare(f"{p} bound", call, "output", out, y, out_allowed, case.dps_value)
    if lse is not None:
        compare(f"{p} bound", call, "lse", lse, ylc, lse_allowed, case.dps_value)
    check_sdpa_rules(case, call, out, lse)
    return SdpaResults(out, lse, yres, y, ylc, w)


# ---------------------------------------------------------------------------------------
# Logits beyond the float64 range (sdpa_cases("overflow")): the decision of issue 7
# ---------------------------------------------------------------------------------------

#: the least magnitude that rounds to an infinity (round to nearest): 2^1024 - 2^970
ROUNDS_TO_INF = Fraction(2**1024 - 2**970)
#: "the logit at (i, j, ...) ... is beyond the float64 range", as
#: attnspec.reference.attention._refuse_overflowed_logits words it
_REFUSAL = re.compile(r"the logit at \(([0-9, ]*)\).*? is beyond the float64 range", re.S)


def _fraction_of(v: Any) -> Fraction:
    f = _exact_fraction(v)
    assert isinstance(f, Fraction), v  # (the fuzzer's own check: a finite value)
    return f


def _mpf_of(f: Fraction) -> Any:
    """``f`` as an mpf at the working precision."""
    return mpmath.mpf(f.numerator) / f.denominator


@dataclass(frozen=True)
class LogitModel:
    """The exact logits of a case, found independently of attnspec (``fractions``), and
    where they, or the values on their way, leave the float64 range.

    Arrays have the logits' shape, ``(1, L, S)`` for 2-D inputs; a sink's logit is not
    among them (it is an input, never beyond the range).
    """

    logits: npt.NDArray[np.object_]  # Fraction: tau q.k, softcap, + bias - slope |i + o - j|
    #: visible, and a value on the way rounds to +-inf: q.k, tau q.k (unless a softcap
    #: follows: c tanh(+-inf) = +-c is the limit), the sum with the bias, the ALiBi term
    #: slope * distance, the logit
    overflows: npt.NDArray[np.bool_]
    #: visible, and a value on the way exceeds the largest float64 (the rounding band
    #: (DBL_MAX, 2^1024 - 2^970) included), or could in some order of summation of q.k
    #: (sum_e |q_e k_e|, times |tau|), softcapped or not: where precision="accurate" may
    #: refuse, as "the way there"
    beyond: npt.NDArray[np.bool_]
    seen: npt.NDArray[np.bool_]  # the visible logits (mask, causal, window, bias -inf)


def logit_model(case: SdpaCase) -> LogitModel:
    """The exact logits of ``case`` (finite q, k, bias and slopes; the overflow cases)."""
    m = model(case)
    q, k = case.q.value, case.k.value
    if m.two_d:
        q, k = q[None], k[None]
    full = m.logits_shape if not m.two_d else (1, m.n_q, m.n_k)
    # query head h reads key/value head h // G
    kr = np.repeat(k, m.hq // m.hkv, axis=-3)
    qb = np.broadcast_to(q, (*full[:-2], m.n_q, m.width))
    kb = np.broadcast_to(kr, (*full[:-2], m.n_k, m.width))
    scale = case.opt("scale")
    tau = _fraction_of(1.0 / math.sqrt(m.width) if scale is None else float(scale))
    cap = case.opt("softcap")
    bias = case.opt("bias")
    bias_b = None if bias is None else np.broadcast_to(bias, full)
    slopes = case.opt("alibi_slopes")
    slopes_b = dist = None
    if slopes is not None:
        slopes_b = np.broadcast_to(np.asarray(slopes, dtype=np.float64)[..., None, None], full)
        offset = alignment_offset(m.n_q, m.n_k, case.opt("align"), "alibi_slopes")
        dist = np.abs(relative_position(m.n_q, m.n_k, offset))
    seen = m.seen.reshape(full)
    logits = np.empty(full, dtype=object)
    overflows = np.zeros(full, dtype=bool)
    beyond = np.zeros(full, dtype=bool)
    big = Fraction(DBL_MAX)
    for idx in np.ndindex(full):
        qrow, krow = qb[idx[:-1]], kb[(*idx[:-2], idx[-1])]
        pairs = zip(qrow, krow, strict=True)
        prods = [_fraction_of(float(a)) * _fraction_of(float(b)) for a, b in pairs]
        qk = sum(prods, Fraction(0))
        size = sum((abs(p) for p in prods), Fraction(0))
        s = tau * qk
        way = [qk, s]  # the values on the way that must stay in range
        loose = [qk, s, size, abs(tau) * size]  # those that may not
        if cap is not None:
            c = _fraction_of(float(cap))
            with mpmath.workprec(200):
                s = _fraction_of(_mpf_of(c) * mpmath.tanh(_mpf_of(s) / _mpf_of(c)))
            way = []  # a softcap brings an overflowed tau q.k back, exactly to the limit
        if bias_b is not None:
            s = s + _fraction_of(float(bias_b[idx]))
            way.append(s)
        if slopes_b is not None:
            assert dist is not None
            alibi = _fraction_of(float(slopes_b[idx])) * int(dist[idx[-2], idx[-1]])
            s = s - alibi
            way += [alibi, s]
        way.append(s)
        logits[idx] = s
        overflows[idx] = bool(seen[idx]) and any(abs(x) >= ROUNDS_TO_INF for x in way)
        beyond[idx] = overflows[idx] or (
            bool(seen[idx]) and any(abs(x) > big for x in (*loose, *way))
        )
    return LogitModel(logits, overflows, beyond, seen)


def _named_logit(msg: str, lm: LogitModel) -> str | None:
    """Why the refusal ``msg`` does not name a visible logit beyond the range (None: it
    does). The index it names is in (..., Hq, L, S) with the batch dimensions of q and k
    (not those only v has): it is read right-aligned."""
    found = _REFUSAL.search(msg)
    if found is None:
        return "the message does not say 'the logit at (...) ... is beyond the float64 range'"
    at = tuple(int(i) for i in found.group(1).replace(" ", "").split(",") if i)
    lead = lm.beyond.ndim - len(at)
    if len(at) < 3 or lead < 0:
        return f"it names {at}, not an index (..., Hq, L, S) of the logits {lm.beyond.shape}"
    where = np.asarray(lm.beyond.any(axis=tuple(range(lead))) if lead else lm.beyond)
    if any(i >= n for i, n in zip(at, where.shape, strict=True)):
        return f"it names {at}, outside the logits {lm.beyond.shape}"
    if not where[at]:
        return f"it names {at}, a logit that is not beyond the float64 range (nor on its way)"
    return None


def check_sdpa_overflow(case: SdpaCase) -> None:
    """The contract where a visible logit, or a value on its way, is beyond the float64
    range although q, k and bias are finite (``sdpa_cases("overflow")``; the decision of
    issue 7, docs/reliability.md):

    * ``precision="accurate"``: a ValueError whose message names such a logit ("the logit
      at (...) is beyond the float64 range"); where no visible logit gets there
      (:class:`LogitModel`), a result within its claimed bound, as for valid input;
    * ``precision="fast"``: plain float64's answer (IEEE overflow to +-inf; outputs may be
      NaN, inf or 0, no accuracy bound): float64 arrays of the documented shapes;
    * ``attnspec.exact.sdpa`` holds the logits exactly: finite output and lse (every row
      sees a key or a sink), the output of each row within [min, max] of the values of
      its visible keys (the weights are convex: p_j >= 0, sum_j p_j = 1; a sink's value is
      0), the lse within [max_j x_j, max_j x_j + log n] of the exact logits x_j (a sink's
      included), both on the mpf values.

    All calls are held to (c) and (d) by :func:`run`: no input modified, no result
    sharing memory with one, no warning escaping (the refusal included).
    """
    kw = case.kwargs()
    # the fuzzer's own checks: what this contract (and the convexity) presumes
    assert "dropout_mask" not in kw, "an overflow case has no dropout"
    for name in ("bias", "alibi_slopes", "sinks"):
        assert kw.get(name) is None or np.isfinite(kw[name]).all(), name
    assert all(np.isfinite(a).all() for a in (case.q.value, case.k.value, case.v.value))
    m = model(case)
    lm = logit_model(case)
    out_shape, lse_shape = _output_shape(m)
    dps = case.dps_value

    # attnspec.exact: finite, the output convex in the visible values, the lse in range.
    # A result within 2^-MAX_BITS of a float64 rounding boundary cannot decide its
    # rounding at any precision (an lse that is a tie between two float64 plus
    # e^-1e308, from a logit of -1e308 beside finite ones): exact raises
    # UndecidedRounding, as documented, and run() reads it with undecided="midpoint".
    # The checks below are on the mpf values, not on their roundings.
    ecall = case.call(exact_fn=True)
    yres = run(ecall, "overflow").value()
    y, y_lse = yres if case.rl else (yres, None)
    check_exact_result(ecall, y, out_shape)
    if y_lse is not None:
        check_exact_result(ecall, y_lse, lse_shape)
    mass, ylc = _exact_on_plain_values(case, ecall, y, y_lse, dps, kw)
    _check_exact_overflow(case, ecall, m, lm, y, ylc, dps)

    # attnspec.sdpa, in both arithmetics (the drawn precision form, and the other one)
    other = py("fast") if case.precision_value == "accurate" else None
    for form in (case.precision, other):
        pcase = replace(case, precision=form)
        call = pcase.call()
        outcome = run(call, "overflow")
        if pcase.precision_value == "fast" or outcome.error is None:
            res = outcome.value()
            if pcase.rl:
                if not isinstance(res, tuple) or len(res) != 2:
                    raise violation(
                        "result type", call, f"return_lse=True gave {type(res).__name__}"
                    )
                out, lse = res
                check_float_result(call, lse, lse_shape, "lse")
            else:
                out, lse = res, None
            check_float_result(call, out, out_shape, "output")
        if pcase.precision_value == "fast":
            continue  # plain float64's answer: no accuracy bound
        if outcome.error is not None:
            if lm.overflows.any() or lm.beyond.any():
                why = (
                    f"{type(outcome.error).__name__} is not a ValueError"
                    if not isinstance(outcome.error, ValueError)
                    else _named_logit(str(outcome.error), lm)
                )
                if why is not None:
                    raise violation(
                        "accurate refuses naming a logit beyond the range",
                        call,
                        f"{why}: {type(outcome.error).__name__}: {outcome.error}",
                    )
                continue
            outcome.value()  # no visible logit gets beyond the range: refused valid input
        if lm.overflows.any():
            at = tuple(int(i) for i in np.argwhere(lm.overflows)[0])
            raise violation(
                "accurate refuses logits beyond the range",
                call,
                f"returned a result, but the logit at {at} (..., Hq, L, S) is "
                f"{mpmath.nstr(_mpf_of(lm.logits[at]), 5)} (or a value on its way beyond)",
            )
        # a result although logits got near (or, on the way, beyond) the range: the claim
        w = exact.to_float64(mass)
        out_allowed, lse_allowed = sdpa_allowed(pcase, w)
        compare("accurate bound", call, "output", out, y, out_allowed, dps)
        if lse is not None:
            compare("accurate bound", call, "lse", lse, ylc, lse_allowed, dps)
        check_sdpa_rules(pcase, call, out, lse)


def _check_exact_overflow(
    case: SdpaCase, ecall: Call, m: Model, lm: LogitModel, y: Any, y_lse: Any, dps: int
) -> None:
    """exact.sdpa's output and lse (``y``, ``y_lse``: mpf) against what the exact logits
    ``lm`` imply, row by row: finite, the output within [min, max] of the visible values,
    the lse within [max x, max x + log n]. Both up to the exact arithmetic's own
    rounding, 10^(3 - dps) relative (a sum of weights rounded at ``dps`` digits may
    exceed 1 by about 10^-dps)."""
    full = lm.logits.shape
    v = case.v.value
    vr = np.repeat(v[None] if m.two_d else v, m.hq // m.hkv, axis=-3)
    vb = np.broadcast_to(vr, (*full[:-2], m.n_k, m.width_v))
    y = np.asarray(y, dtype=object).reshape((*full[:-1], m.width_v))
    y_lse = np.asarray(y_lse, dtype=object).reshape(full[:-1])
    sinks = case.opt("sinks")
    sig = None
    if sinks is not None:
        sig = np.broadcast_to(np.asarray(sinks, dtype=np.float64)[..., None], full[:-1])
    empty = False
    with mpmath.workdps(dps + 20):
        rel = mpmath.mpf(10) ** (3 - dps)
        for row in np.ndindex(full[:-1]):
            keys = np.flatnonzero(lm.seen[row])
            xs = [_mpf_of(lm.logits[(*row, j)]) for j in keys]
            if sig is not None:
                xs.append(mpmath.mpf(float(sig[row])))
            if not xs:
                empty = True  # a row that sees nothing: check_sdpa_rules below
                continue
            at = tuple(int(i) for i in row)
            values = [y[(*row, e)] for e in range(m.width_v)] + [y_lse[row]]
            if not all(mpmath.isfinite(x) for x in values):
                raise violation(
                    "exact holds logits beyond the range",
                    ecall,
                    f"query row {at}: output {[mpmath.nstr(x, 5) for x in values[:-1]]}, "
                    f"lse {mpmath.nstr(values[-1], 5)}; the exact values are finite",
                )
            top = max(xs)
            lo_l, hi_l = top, top + mpmath.log(len(xs))
            slack = rel * max(abs(lo_l), abs(hi_l), 1)
            if not lo_l - slack <= y_lse[row] <= hi_l + slack:
                raise violation(
                    "exact lse within [max x, max x + log n]",
                    ecall,
                    f"query row {at}: lse {mpmath.nstr(y_lse[row], 20)}, the exact logits "
                    f"give [{mpmath.nstr(lo_l, 20)}, {mpmath.nstr(hi_l, 20)}]",
                )
            for e in range(m.width_v):
                col = [mpmath.mpf(float(vb[(*row[:-1], j, e)])) for j in keys]
                if sig is not None:
                    col.append(mpmath.mpf(0))  # the sink's value
                lo_v, hi_v = min(col), max(col)
                slack = rel * max(abs(lo_v), abs(hi_v))
                if not lo_v - slack <= y[(*row, e)] <= hi_v + slack:
                    raise violation(
                        "exact output within the visible values",
                        ecall,
                        f"query row {at}, column {e}: output {mpmath.nstr(y[(*row, e)], 20)} "
                        f"outside [{mpmath.nstr(lo_v, 20)}, {mpmath.nstr(hi_v, 20)}], the "
                        "range of the values its weights (convex) combine",
                    )
    if empty:
        out_shape, lse_shape = _output_shape(m)
        check_sdpa_rules(
            case,
            ecall,
            exact.to_float64(y.reshape(out_shape)),
            exact.to_float64(y_lse.reshape(lse_shape)),
        )


def poisoned(case: SdpaCase, value: float, targets: Sequence[str]) -> dict[str, str]:
    """Source of q, k, v and bias with ``value`` at their hidden positions (``targets``)."""
    hidden = hidden_positions(case)
    codes = {}
    for name in targets:
        if name not in hidden or not hidden[name].any():
            continue
        a = (case.opt("bias") if name == "bias" else getattr(case, name).value).copy()
        a[hidden[name]] = value
        codes[name] = literal(a)
    return codes


def check_sdpa_hidden(case: SdpaCase, targets: Sequence[str]) -> None:
    """(e): NaN, +-inf at the hidden positions of ``targets`` give bitwise the same output
    and lse; a huge finite value, results within the claimed bound of the exact ones."""
    hidden = hidden_positions(case)
    targets = [t for t in targets if t in hidden and hidden[t].any()]
    assume(targets)
    r = check_sdpa_case(case)
    y, ylc, base_out, base_lse, y_base = r.y, r.y_lse, r.out, r.lse, r.exact
    out_allowed, lse_allowed = sdpa_allowed(case, r.weighted)
    for value in (math.nan, math.inf, -math.inf, *HUGE_HIDDEN):
        codes = poisoned(case, value, targets)
        call = case.call(**codes)
        res = run(call, "hidden").value()
        out, lse = res if case.rl else (res, None)
        if value in HUGE_HIDDEN:
            check = f"hidden {value:g} within the bound"
            compare(check, call, "output", out, y, out_allowed, case.dps_value)
            if lse is not None:
                compare(check, call, "lse", lse, ylc, lse_allowed, case.dps_value)
        else:
            for what, got, want in (("output", out, base_out), ("lse", lse, base_lse)):
                if got is not None and not same_bits(got, want):
                    raise violation(
                        f"hidden {value} never reaches the result",
                        call,
                        f"the {what} {np.asarray(got).tolist()!r} differs from "
                        f"{np.asarray(want).tolist()!r} (hidden positions as drawn)",
                    )
        ecall = case.call(exact_fn=True, **codes)
        ye = run(ecall, "hidden").value()
        if not _same_results(ye, y_base):
            raise violation(
                f"hidden {value} never reaches the exact result",
                ecall,
                "differs from the exact result with the hidden positions as drawn",
            )


def check_sdpa_hidden_rows(case: SdpaCase, keys: Sequence[int], targets: Sequence[str]) -> None:
    """(e), row by row: NaN, +-inf or +-1e300 in k or v of the keys ``keys`` (all heads and
    batches) leave bitwise the same (within the bound, for +-1e300) every output row that
    gives those keys no weight, and the lse of every row when only v changes; the keys
    may be seen by other rows (values hidden from some rows only, as in the blocks of
    FlashAttention)."""
    m = model(case)
    keys = sorted(j for j in keys if j < m.n_k)
    assume(keys)
    seen = m.seen
    weighted = seen if m.keep is None else (seen & m.keep)
    touched = {"k": seen[..., keys].any(axis=-1), "v": weighted[..., keys].any(axis=-1)}
    affected = np.zeros(touched["k"].shape, dtype=bool)
    for t in targets:
        affected |= touched[t]
    assume((~affected).any())
    r = check_sdpa_case(case)
    out_allowed, lse_allowed = sdpa_allowed(case, r.weighted)
    lse_rows = ~affected if "k" in targets else np.ones_like(affected)
    for value in (math.nan, math.inf, -math.inf, *HUGE_HIDDEN):
        codes = {}
        for t in targets:
            a = getattr(case, t).value.copy()
            a[..., keys, :] = value
            codes[t] = literal(a)
        call = case.call(**codes)
        res = run(call, "hidden").value()
        out, lse = res if case.rl else (res, None)
        if value in HUGE_HIDDEN:
            check = f"values {value:g} hidden from some rows: within the bound"
            compare(
                check, call, "output", out, r.y, out_allowed, case.dps_value, ~affected[..., None]
            )
            if lse is not None:
                compare(check, call, "lse", lse, r.y_lse, lse_allowed, case.dps_value, lse_rows)
            continue
        for what, got, want, rows in (
            ("output", out, r.out, ~affected),
            ("lse", lse, r.lse, lse_rows),
        ):
            if got is None:
                continue
            got_r, want_r = np.asarray(got)[rows], np.asarray(want)[rows]
            if not same_bits(got_r, want_r):
                raise violation(
                    f"values {value} hidden from some rows never reach them",
                    call,
                    f"the {what} of the rows that give keys {keys} no weight changed: "
                    f"{got_r.tolist()!r}, was {want_r.tolist()!r}",
                )


# ---------------------------------------------------------------------------------------
# Invalid input
# ---------------------------------------------------------------------------------------

TYPE = (TypeError,)
VALUE = (ValueError,)
EITHER = _BOTH


@dataclass(frozen=True)
class Invalid:
    """A bad call: the names its error must contain and the classes it may raise;
    ``equivalent``: an ambiguous form, which may also be read as that call."""

    call: Call
    names: tuple[str, ...]
    classes: tuple[type[Exception], ...] = EITHER
    equivalent: Call | None = None

    def __repr__(self) -> str:
        return f"Invalid({self.call!r}, names={self.names!r})"

    def check(self) -> None:
        expect_refusal(self.call, self.names, self.classes, self.equivalent)


def _bad_arrays(shape: tuple[int, ...]) -> list[tuple[str, tuple[type[Exception], ...]]]:
    """Source of arguments that are not arrays of real numbers (for an array of ``shape``)."""
    s = repr(shape)
    out: list[tuple[str, tuple[type[Exception], ...]]] = [
        (f"np.ones({s}, dtype=bool)", TYPE),
        (f"np.ones({s}, dtype=complex)", TYPE),
        (f"np.ones({s}, dtype=np.complex64)", TYPE),
        (f"np.ones({s}, dtype=object)", TYPE),
        (f"np.full({s}, '1.0')", TYPE),
        (f"np.ones({s}, dtype='datetime64[D]')", TYPE),
        (f"np.ones({s}, dtype='timedelta64[s]')", TYPE),
        (f"np.zeros({s}, dtype=[('a', 'f8')])", TYPE),
        (f"np.ma.masked_array(np.ones({s}), mask=np.ones({s}, dtype=bool))", TYPE),
        (f"np.ma.masked_array(np.ones({s}))", TYPE),
        ("None", TYPE),
        ("'abc'", TYPE),
        ("b'12'", TYPE),
        ("{1.0, 2.0}", TYPE),
        ("{'a': 1.0}", TYPE),
        ("object()", TYPE),
        ("[[1.0, 2.0], [3.0]]", VALUE),
        ("[1.0, [2.0, 3.0]]", VALUE),
        ("[[1.0], 2.0]", VALUE),
        ("[10**400, 1.0]", EITHER),
    ]
    if np.dtype(np.longdouble).itemsize > 8:
        out.append((f"np.ones({s}, dtype=np.longdouble)", TYPE))
    return out


def _bad_masks(shape: tuple[int, ...]) -> list[tuple[str, tuple[type[Exception], ...]]]:
    s = repr(shape)
    wrong = repr((*shape[:-1], shape[-1] + 1)) if shape else "(2,)"
    return [
        (f"np.ones({s}, dtype=int)", TYPE),
        (f"np.ones({s})", TYPE),
        (f"np.ones({s}, dtype=object)", TYPE),
        (f"np.ones({wrong}, dtype=bool)", VALUE),
        ("[[True, False], [True]]", VALUE),
        (f"np.ma.masked_array(np.ones({s}, dtype=bool))", TYPE),
        ("'yes'", TYPE),
        ("1", TYPE),
    ]


BAD_PRECISIONS = (
    ("'exact'", VALUE),
    ("'Accurate'", VALUE),
    ("''", VALUE),
    ("'fast '", VALUE),
    ("'float64'", VALUE),
    ("None", EITHER),
    ("1", EITHER),
    ("np.array('fast')", EITHER),
    ("np.array(['fast', 'fast'])", EITHER),
    ("['fast']", EITHER),
    ("b'fast'", EITHER),
    ("('fast',)", EITHER),
)
BAD_DPS = ("0", "-5", "1.5", "'50'", "True", "None", "np.float64(50)", "[50]")
BAD_REALS = (
    "'1'",
    "1j",
    "True",
    "[1.0]",
    "np.array([1.0, 2.0])",
    "nan",
    "inf",
    "-inf",
    "10**400",
    "-(10**400)",
    "b'1'",
)


@st.composite
def softmax_invalid(draw: st.DrawFn) -> Invalid:
    """A bad call of a softmax-family function (public or exact)."""
    kind = draw(st.sampled_from(KINDS))
    is_exact = draw(st.booleans())
    func = ("attnspec.exact." if is_exact else "attnspec.") + kind
    x = "np.array([[0.5, -1.0, 2.0], [3.0, 0.0, 1.5]])"
    what = draw(
        st.sampled_from(
            ["x", "size", "axis", "axis0d", "where", "precision", "keepdims", "dps", "kw", "either"]
        )
    )
    if what == "x":
        code, classes = draw(st.sampled_from(_bad_arrays((2, 3))))
        return Invalid(Call(func, (code,)), ("x",), classes)
    if what == "size":  # 2**34 entries, a broadcast view of one: past every size limit
        big = "np.broadcast_to(np.zeros(1), (2**17, 2**17))"
        return Invalid(Call(func, (big,)), ("x", "size limit"), VALUE)
    if what == "axis":
        code, classes = draw(
            st.sampled_from(
                [
                    ("2", VALUE),
                    ("-3", VALUE),
                    ("(0, 0)", VALUE),
                    ("(0, -2)", VALUE),
                    ("[1, 1]", VALUE),
                    ("(0, 2)", VALUE),
                    ("np.int64(5)", VALUE),
                    ("1.0", TYPE),
                    ("True", TYPE),
                    ("'0'", TYPE),
                    ("(0, 1.5)", TYPE),
                    ("np.float64(1)", TYPE),
                    ("(None,)", TYPE),
                    ("[0, 'a']", TYPE),
                    ("{0}", TYPE),
                ]
            )
        )
        return Invalid(Call(func, (x,), (("axis", code),)), ("axis",), classes)
    if what == "axis0d":
        x0 = draw(st.sampled_from(["np.array(1.0)", "2.5", "np.float16(1)", "3"]))
        ax = draw(st.sampled_from([None, "0", "-1", "(0,)"]))
        kw = () if ax is None else (("axis", ax),)
        return Invalid(Call(func, (x0,), kw), ("axis",), VALUE)
    if what == "where":
        code, classes = draw(
            st.sampled_from(
                [
                    *_bad_masks((2, 3)),
                    ("np.ones((3, 3), dtype=bool)", VALUE),
                    ("np.ones((2, 3, 1), dtype=bool)", VALUE),
                ]
            )
        )
        return Invalid(Call(func, (x,), (("where", code),)), ("where",), classes)
    if what == "precision":
        if is_exact:  # exact takes no precision: Python's TypeError names it
            return Invalid(Call(func, (x,), (("precision", "'fast'"),)), ("precision",), TYPE)
        code, classes = draw(st.sampled_from(BAD_PRECISIONS))
        return Invalid(Call(func, (x,), (("precision", code),)), ("precision",), classes)
    if what == "keepdims":
        if kind != "logsumexp":
            return Invalid(Call(func, (x,), (("keepdims", "True"),)), ("keepdims",), TYPE)
        code = draw(st.sampled_from(["1", "0", "'yes'", "None", "np.array([True])", "[True]"]))
        return Invalid(Call(func, (x,), (("keepdims", code),)), ("keepdims",), EITHER)
    if what == "dps":
        if not is_exact:
            return Invalid(Call(func, (x,), (("dps", "50"),)), ("dps",), TYPE)
        code = draw(st.sampled_from(BAD_DPS))
        return Invalid(Call(func, (x,), (("dps", code),)), ("dps",), EITHER)
    if what == "kw":
        name, code = draw(
            st.sampled_from(
                [
                    ("mask", "np.ones(3, dtype=bool)"),
                    ("axes", "0"),
                    ("dim", "0"),
                    ("keepdim", "True"),
                    ("out", "np.zeros((2, 3))"),
                ]
            )
        )
        return Invalid(Call(func, (x,), ((name, code),)), (name,), TYPE)
    # ambiguous forms: refused naming the argument, or read as the plain value
    choices = [("axis", "np.array(1)", "1"), ("axis", "(np.array(0),)", "(0,)")]
    if kind == "logsumexp":
        choices.append(("keepdims", "np.array(True)", "True"))
    if is_exact:
        choices.append(("dps", "np.array(40)", "40"))
    name, code, plain = draw(st.sampled_from(choices))
    return Invalid(
        Call(func, (x,), ((name, code),)), (name,), EITHER, Call(func, (x,), ((name, plain),))
    )


@st.composite
def sdpa_invalid(draw: st.DrawFn) -> Invalid:
    """A bad call of sdpa (public or exact)."""
    is_exact = draw(st.booleans())
    func = "attnspec.exact.sdpa" if is_exact else "attnspec.sdpa"
    two_d = draw(st.integers(0, 4)) == 0
    n_q, n_k, e, ev = 2, 3, 2, 2
    if two_d:
        qs, ks, vs, full, hq = (n_q, e), (n_k, e), (n_k, ev), (n_q, n_k), 1
    else:
        b = draw(st.sampled_from([(), (2,)]))
        hkv = draw(st.sampled_from([1, 2]))
        hq = 2
        qs, ks, vs, full = (
            (*b, hq, n_q, e),
            (*b, hkv, n_k, e),
            (*b, hkv, n_k, ev),
            (*b, hq, n_q, n_k),
        )

    def arr(shape: tuple[int, ...]) -> str:
        vals = np.array(draw(hnp.arrays(np.float64, shape, elements=st.floats(-3, 3, width=16))))
        return literal(vals)

    q, k, v = arr(qs), arr(ks), arr(vs)
    heads = (hq,) if not two_d else ()

    def bad(
        kw: dict[str, str],
        names: tuple[str, ...],
        classes: Any = EITHER,
        args: tuple[str, ...] | None = None,
        equivalent: dict[str, str] | None = None,
    ) -> Invalid:
        a = args or (q, k, v)
        eq = None if equivalent is None else Call(func, (q, k, v), tuple(equivalent.items()))
        return Invalid(Call(func, a, tuple(kw.items())), names, classes, eq)

    what = draw(
        st.sampled_from(
            [
                "operand",
                "size",
                "shape",
                "scale",
                "softcap",
                "dropout_p",
                "dropout",
                "causal",
                "window",
                "align",
                "align_needed",
                "alibi",
                "sinks",
                "mask",
                "bias",
                "return_lse",
                "precision",
                "dps",
                "kw",
                "either",
            ]
        )
    )
    if what == "size":  # 2**34 logits from broadcast views of one entry
        big = "np.broadcast_to(np.zeros(1), (1, 1, 2**17, 1))"
        return bad({}, ("size limit",), VALUE, (big, big, big))
    if what == "operand":
        i = draw(st.integers(0, 2))
        name = "qkv"[i]
        code, classes = draw(st.sampled_from(_bad_arrays((qs, ks, vs)[i])))
        args = [q, k, v]
        args[i] = code
        return bad({}, (name,), classes, tuple(args))
    if what == "shape":
        cases = [
            ("q", (f"np.ones(({e},))", k, v)),
            ("k", (q, "1.0", v)),
            ("v", (q, k, f"np.ones(({ev},))")),
            ("k", (q, f"np.ones({(*ks[:-1], e + 1)!r})", v)),
            ("v", (q, k, f"np.ones({(*vs[:-2], n_k + 1, ev)!r})")),
        ]
        if not two_d:
            cases += [
                (
                    "q",
                    (
                        f"np.ones({(*qs[:-3], 3, n_q, e)!r})",
                        f"np.ones({(*ks[:-3], 2, n_k, e)!r})",
                        f"np.ones({(*vs[:-3], 2, n_k, ev)!r})",
                    ),
                ),
                (
                    "q",
                    (
                        f"np.ones((2, {hq}, {n_q}, {e}))",
                        f"np.ones((3, {ks[-3]}, {n_k}, {e}))",
                        f"np.ones((3, {vs[-3]}, {n_k}, {ev}))",
                    ),
                ),
                (
                    "q",
                    (
                        f"np.ones(({n_q}, {e}))",
                        f"np.ones((1, {n_k}, {e}))",
                        f"np.ones((1, {n_k}, {ev}))",
                    ),
                ),
                ("v", (q, k, f"np.ones({(*vs[:-3], vs[-3] + 1, n_k, ev)!r})")),
            ]
        name, args = draw(st.sampled_from(cases))
        if draw(st.booleans()):  # E = 0 needs a scale
            zq, zk = (*qs[:-1], 0), (*ks[:-1], 0)
            return bad({}, ("scale",), VALUE, (f"np.zeros({zq!r})", f"np.zeros({zk!r})", v))
        return bad({}, (name,), VALUE, args)
    if what in ("scale", "softcap"):
        extra = ("0", "0.0", "-1.0", "-0.0") if what == "softcap" else ()
        code = draw(st.sampled_from(BAD_REALS + extra))
        return bad({what: code}, (what,))
    if what == "dropout_p":
        code = draw(
            st.sampled_from(
                (
                    "-0.1",
                    "1.0",
                    "1",
                    "1.5",
                    "nan",
                    "inf",
                    "'0.1'",
                    "True",
                    "None",
                    "10**400",
                    "-1e-300",
                    "[0.5]",
                )
            )
        )
        return bad(
            {"dropout_mask": f"np.ones({full!r}, dtype=bool)", "dropout_p": code}, ("dropout_p",)
        )
    if what == "dropout":
        # (a keep-mask with dropout_p=0 is defined: factor 1, see the valid cases)
        if draw(st.integers(0, 4)) == 0:
            return bad({"dropout_p": "0.5"}, ("dropout_mask",), VALUE)
        code, classes = draw(st.sampled_from(_bad_masks(full)))
        return bad({"dropout_mask": code, "dropout_p": "0.5"}, ("dropout_mask",), classes)
    if what == "causal":
        code = draw(st.sampled_from(["1", "'yes'", "None", "np.array([True])", "[True]", "1.0"]))
        return bad({"causal": code, "align": "'top_left'"}, ("causal",))
    if what == "window":
        code = draw(
            st.sampled_from(
                [
                    "(1,)",
                    "(1, 2, 3)",
                    "5",
                    "'ab'",
                    "(-1, None)",
                    "(None, -2)",
                    "(1.5, None)",
                    "(True, None)",
                    "(None, '1')",
                    "{1, 2}",
                    "[None]",
                    "np.array([1, 1])",
                ]
            )
        )
        return bad({"window": code, "align": "'top_left'"}, ("window",))
    if what == "align":
        code = draw(
            st.sampled_from(
                [
                    "'top'",
                    "''",
                    "'Top_Left'",
                    "'bottom-right'",
                    "1",
                    "np.array('top_left')",
                    "['top_left']",
                    "('top_left',)",
                    "b'top_left'",
                    "True",
                ]
            )
        )
        return bad({"causal": "True", "align": code}, ("align",))
    if what == "align_needed":
        kw = draw(
            st.sampled_from(
                [
                    {"causal": "True"},
                    {"window": "(1, 1)"},
                    {"window": "(None, None)"},
                    {"alibi_slopes": repr([0.5] * hq) if heads else "0.5"},
                ]
            )
        )
        return bad(kw, ("align",), VALUE)
    if what in ("alibi", "sinks"):
        name = "alibi_slopes" if what == "alibi" else "sinks"
        shape = heads
        wrong = (hq + 1,)
        choices: list[tuple[str, Any]] = [
            (f"np.ones({wrong!r})", VALUE),
            (f"np.ones({(3, *shape)!r})", VALUE) if not two_d else ("np.ones((2,))", VALUE),
        ]
        choices += [(c, cl) for c, cl in _bad_arrays(shape) if c not in ("None", "[10**400, 1.0]")]
        if what == "alibi":
            choices += [
                (repr([math.inf] * max(1, hq)), VALUE),
                (repr([-math.inf] * max(1, hq)), VALUE),
                (repr([math.nan] * max(1, hq)), EITHER),
            ]
        code, classes = draw(st.sampled_from(choices))
        return bad({name: code, "align": "'top_left'"}, (name,), classes)
    if what == "mask":
        code, classes = draw(st.sampled_from(_bad_masks(full)))
        return bad({"mask": code}, ("mask",), classes)
    if what == "bias":
        choices = [(f"np.ones({(*full[:-1], n_k + 1)!r})", VALUE)] + [
            (c, cl) for c, cl in _bad_arrays(full) if c not in ("None", "[10**400, 1.0]")
        ]
        code, classes = draw(st.sampled_from(choices))
        return bad({"bias": code}, ("bias",), classes)
    if what == "return_lse":
        code = draw(st.sampled_from(["1", "None", "'yes'", "np.array([True])", "0"]))
        return bad({"return_lse": code}, ("return_lse",))
    if what == "precision":
        if is_exact:
            return bad({"precision": "'fast'"}, ("precision",), TYPE)
        code, classes = draw(st.sampled_from(BAD_PRECISIONS))
        return bad({"precision": code}, ("precision",), classes)
    if what == "dps":
        if not is_exact:
            return bad({"dps": "50"}, ("dps",), TYPE)
        return bad({"dps": draw(st.sampled_from(BAD_DPS))}, ("dps",))
    if what == "kw":
        name, code = draw(
            st.sampled_from(
                [
                    ("is_causal", "True"),
                    ("attn_mask", f"np.ones({full!r}, dtype=bool)"),
                    ("dropout", "0.1"),
                    ("enable_gqa", "True"),
                    ("axis", "-1"),
                ]
            )
        )
        return bad({name: code}, (name,), TYPE)
    name, code, plain = draw(
        st.sampled_from(
            [
                ("scale", "np.array(0.5)", "0.5"),
                ("softcap", "np.array(5.0)", "5.0"),
                ("dropout_p", "np.array(0.0)", "0.0"),
                ("causal", "np.array(True)", "True"),
                ("window", "(np.array(1), None)", "(1, None)"),
                ("return_lse", "np.array(True)", "True"),
            ]
        )
    )
    extra = {"align": "'top_left'"} if name in ("causal", "window") else {}
    return bad({**extra, name: code}, (name,), EITHER, equivalent={**extra, name: plain})


# ---------------------------------------------------------------------------------------
# to_float64
# ---------------------------------------------------------------------------------------


def _exact_fraction(v: Any) -> Fraction | float:
    """The exact value of a real number (mpf, int, float), as a Fraction (or NaN/inf)."""
    if isinstance(v, mpmath.mpf):
        if mpmath.isnan(v) or mpmath.isinf(v):
            return float(v)
        sign, man, exp_, _ = v._mpf_
        f = Fraction(int(man)) * (Fraction(2) ** int(exp_))
        return -f if sign else f
    if isinstance(v, float | np.floating):
        fv = float(v)
        return fv if not math.isfinite(fv) else Fraction(fv)
    return Fraction(int(v))


def rounded(v: Any) -> float:
    """``v`` rounded to the nearest float64 (ties to even): Python's int/int true
    division, which is correctly rounded; beyond the range, the infinity of its sign."""
    if isinstance(v, float | np.floating):
        return float(v)  # itself (-0.0 included)
    f = _exact_fraction(v)
    if isinstance(f, float):
        return f
    try:
        return f.numerator / f.denominator  # -0.0 for a negative value that rounds to 0
    except OverflowError:
        return math.inf if f > 0 else -math.inf


@st.composite
def mpf_values(draw: st.DrawFn, big_ints: bool = False) -> Any:
    """A real number as to_float64 may be given it: mostly mpf with more bits than float64
    (ties, beyond the range, below the subnormals), or a float or int (``big_ints``: an
    int beyond the float64 range)."""
    if big_ints:
        return draw(st.integers(2**1024, 2**1100)) * draw(st.sampled_from([1, -1]))
    choice = draw(st.sampled_from(["extra", "tie", "edge", "float", "int", "special"]))
    with mpmath.workprec(300):
        if choice == "extra":
            man = draw(st.integers(2**60, 2**120)) * draw(st.sampled_from([1, -1]))
            return mpmath.mpf((man, draw(st.integers(-1250, 1000))))
        if choice == "tie":
            f = draw(st.floats(allow_nan=False, allow_infinity=False, allow_subnormal=True))
            up = ulp_of_exact(mpmath.mpf(f)) / 2
            return mpmath.mpf(f) + up * draw(st.sampled_from([1, -1]))
        if choice == "edge":
            two = mpmath.mpf(2)
            return draw(
                st.sampled_from(
                    [
                        two**1024,
                        -(two**1024),
                        two**1024 * (1 - two**-54),
                        two**1024 * (1 - two**-54) * (1 - two**-100),
                        two**-1075,
                        two**-1075 * (1 + two**-80),
                        -3 * two**-1076,
                        two**-1100,
                        two**5000,
                        two**-5000,
                    ]
                )
            )
    if choice == "float":
        return draw(st.floats(allow_subnormal=True) | st.just(-0.0))
    if choice == "int":
        # within the float64 range (beyond it: to_float64_cases(big_ints=True))
        return draw(st.integers(-(2**1023), 2**1023) | st.integers(-(2**70), 2**70))
    return draw(
        st.sampled_from([mpmath.mpf("nan"), mpmath.mpf("inf"), mpmath.mpf("-inf"), mpmath.mpf(0)])
    )


def _value_code(v: Any) -> str:
    return mpf_code(v) if isinstance(v, mpmath.mpf) else repr(v)


@dataclass(frozen=True)
class ToFloatCase:
    """An input of to_float64: source, and the real numbers it holds (nested, flat)."""

    code: str
    values: tuple[Any, ...]
    shape: tuple[int, ...]

    def __repr__(self) -> str:
        return f"attnspec.exact.to_float64({self.code})"


@st.composite
def to_float64_cases(draw: st.DrawFn, big_ints: bool = False) -> ToFloatCase:
    """An input of to_float64 (``big_ints``: one entry a Python int beyond the range)."""
    sides = [1, 2, 3] if big_ints else [1, 2, 3, 0]
    shape = tuple(draw(st.sampled_from(sides)) for _ in range(draw(st.integers(0, 2))))
    n = math.prod(shape)
    values = [draw(mpf_values()) for _ in range(n)]
    if big_ints:
        values[draw(st.integers(0, n - 1))] = draw(mpf_values(big_ints=True))
    codes = [_value_code(v) for v in values]
    body = nested_code(codes, shape) if n else ""
    form = draw(
        st.sampled_from(["object", "list", "scalar"] if shape == () else ["object", "list"])
    )
    if n == 0:
        code = f"np.empty({shape!r}, dtype=object)"
    elif form == "object":
        code = f"np.array({body}, dtype=object)"
    else:
        code = body
    return ToFloatCase(code, tuple(values), shape)


def check_to_float64(case: ToFloatCase) -> None:
    call = Call("attnspec.exact.to_float64", (case.code,))
    kind = (
        "special"
        if any(not math.isfinite(rounded(v)) or rounded(v) == 0 for v in case.values)
        else "valid"
    )
    out = run(call, kind).value()
    check_float_result(call, out, case.shape)
    for i, v in enumerate(case.values):
        got, want = float(out.reshape(-1)[i]), rounded(v)
        if not same_bits(np.array(got), np.array(want)):
            raise violation(
                "to_float64 rounds to nearest",
                call,
                f"entry {i}: got {got!r}, the nearest float64 is {want!r}",
            )


TO_FLOAT64_INVALID = (
    "np.array(['abc'])",
    "'abc'",
    "None",
    "[None, 1.0]",
    "mpmath.mpc(1, 2)",
    "np.array([mpmath.mpc(1, 2)], dtype=object)",
    "complex(1, 2)",
    "np.array([1 + 2j])",
    "{}",
    "object()",
    "[[1.0, 2.0], [3.0]]",
    "np.array(['2020-01-01'], dtype='datetime64[D]')",
)


def check_to_float64_invalid(code: str) -> None:
    # the argument is called ``a``: any message would "name" it, so only the class counts
    call = Call("attnspec.exact.to_float64", (code,))
    INVALID_ARGS[call.func, "a"] += 1
    out = run(call, "invalid")
    if out.error is None:
        raise violation(
            "invalid a refused", call, "expected a TypeError or ValueError; got a result"
        )


# ---------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------


def counts_table(counts: Counter[tuple[str, str]] | None = None) -> str:
    """The calls counted, as a Markdown table: one row per function, one column per kind."""
    counts = COUNTS if counts is None else counts
    kinds = [k for k in INPUT_KINDS if any(c for (f, kk), c in counts.items() if kk == k)]
    lines = ["| function | " + " | ".join(kinds) + " | total |", "|---" * (len(kinds) + 2) + "|"]
    for func in FUNCTIONS:
        row = [counts[func, k] for k in kinds]
        lines.append(f"| `{func}` | " + " | ".join(str(c) for c in row) + f" | {sum(row)} |")
    totals = [sum(counts[f, k] for f in FUNCTIONS) for k in kinds]
    lines.append("| all | " + " | ".join(str(c) for c in totals) + f" | {sum(totals)} |")
    return "\n".join(lines)


__all__ = [
    "COUNTS",
    "FUNCTIONS",
    "INVALID_ARGS",
    "TO_FLOAT64_INVALID",
    "Call",
    "ContractViolation",
    "Invalid",
    "LogitModel",
    "SdpaCase",
    "SoftmaxCase",
    "build",
    "check_sdpa_case",
    "check_sdpa_hidden",
    "check_sdpa_overflow",
    "check_softmax_case",
    "check_softmax_hidden",
    "check_to_float64",
    "check_to_float64_invalid",
    "counts_table",
    "logit_model",
    "run",
    "sdpa_cases",
    "sdpa_invalid",
    "softmax_cases",
    "softmax_invalid",
    "to_float64_cases",
]
