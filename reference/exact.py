r"""The same definitions, evaluated exactly: the ground truth every accuracy claim is
measured against.

Each function takes the same arguments as its float64 counterpart in :mod:`attnspec`,
plus ``dps`` (decimal digits) and ``backend``, and returns a numpy object array of
``mpmath.mpf`` values (a 0-d object array for a full reduction). :func:`to_float64`
rounds them.

``backend="arb"`` (the default) evaluates the definition in ball arithmetic (Arb,
through python-flint; :mod:`attnspec.reference.balls`): every result is a ball proved to
contain the exact value of the definition on the float64 inputs. A result is returned
only when its ball is narrow enough to decide two things: its rounding to float64 (every
point of the ball rounds to the same float64), and ``dps`` digits (a radius at most
:math:`10^{-\mathrm{dps}} \max(|m|, 2^{-1074})` for a midpoint :math:`m`). Otherwise the
whole evaluation is repeated at twice the working precision (Ziv's strategy), up to
:data:`MAX_BITS`, after which :class:`UndecidedRounding` says which result did not
decide. The mpf returned is the ball's midpoint: it rounds to the float64 nearest the
exact value, and is within :math:`10^{-\mathrm{dps}}` of it (relative, or absolute at
:math:`2^{-1074}`). Exact zeros, infinities, NaN and the special rows are the
definition's own values, exactly.

Balls alone cannot decide an exact value that *is* a rounding boundary: a tie between two
float64, which equal logits produce (the weights 1/n of a row, times values whose mean is
a tie). So the second and later evaluations use the rational variant of the arithmetic:
exact rationals (FLINT's fmpq) for as long as every operation keeps them rational, balls
from there on; a result that is rational is then rounded exactly. A value that is not
rational but lies within :math:`2^{-\mathrm{MAX\_BITS}}` of a boundary (a softcap
saturated by logits of 1e12, whose weights differ from 1/n by :math:`e^{-10^{12}}`) does
not decide: ``undecided="midpoint"`` returns its ball's midpoint instead of raising.

``backend="mpmath"`` evaluates the same definition in mpmath at ``dps`` digits (plus the
digits the logits' magnitude needs): the ground truth of earlier versions, kept as a
second, independent backend the tests compare against; nothing there is proved, and it
can round the wrong way where the exact value is within :math:`10^{-\mathrm{dps}}` of a
boundary (an lse just above a tie: tests/test_exact_balls.py).

Without python-flint (a platform with no wheel), ``backend="arb"`` raises ImportError;
``backend="mpmath"`` and the rest of attnspec work.

Inputs are float64 (or converted to float64 exactly), so every input is an exact number.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from typing import Any

import mpmath
import numpy as np
import numpy.typing as npt

from attnspec.reference.inputs import as_real_float64
from attnspec.reference.mpmath_exact import Exact, _as_mpf
from attnspec.reference.rounding import (
    UndecidedRounding,
    nearest_fraction,
    round_ball,
    to_float64,
)
from attnspec.reference.rounding import _round_mpf as _round_mpf_exactly
from attnspec.reference.softmax import _evaluate

__all__ = [
    "BACKENDS",
    "DEFAULT_DPS",
    "MAX_BITS",
    "UNDECIDED",
    "Exact",
    "UndecidedRounding",
    "log_softmax",
    "log_softmax_vjp",
    "logsumexp",
    "logsumexp_vjp",
    "recording_precision",
    "sdpa",
    "sdpa_backward",
    "softmax",
    "softmax_jvp",
    "softmax_vjp",
    "to_float64",
]

ObjArray = npt.NDArray[np.object_]
DEFAULT_DPS = 50
#: the backends of ``backend=``: Arb balls (proved) and mpmath (the earlier ground truth)
BACKENDS = ("arb", "mpmath")
#: what ``undecided=`` accepts: raise UndecidedRounding, or return the ball's midpoint
UNDECIDED = ("raise", "midpoint")
#: the largest working precision (bits) the ball evaluation may reach; past it,
#: UndecidedRounding (a value that lies within about 2**-MAX_BITS of a rounding boundary
#: without being rational, such as a tie plus e**-1e6, never decides)
MAX_BITS = 1 << 14
#: bits of working precision beyond the dps asked for, at the first evaluation
GUARD_BITS = 32


def _check_dps(dps: object) -> int:
    if isinstance(dps, bool) or not isinstance(dps, int | np.integer) or dps < 1:
        raise ValueError(f"dps must be a positive integer (decimal digits), got {dps!r}")
    return int(dps)


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices!r}, got {value!r}")
    return value


def _run(
    kind: str,
    x: object,
    axis: object,
    where: object,
    keepdims: bool,
    dps: object,
    backend: object,
    undecided: object = "raise",
) -> ObjArray:
    digits = _check_dps(dps)
    rule = _check_choice("undecided", undecided, UNDECIDED)
    if _check_choice("backend", backend, BACKENDS) == "mpmath":
        with mpmath.workdps(digits):
            out = _evaluate(kind, x, axis, where, None, keepdims, arith=Exact())
            # Special rows hold float64 values (0, -inf, nan); make every entry an mpf.
            return _as_mpf(out)

    def evaluate_once(arith: Any) -> Any:
        return (_evaluate(kind, x, axis, where, None, keepdims, arith=arith),)

    result: ObjArray = _certified(evaluate_once, digits, 0, kind, rule)[0]
    return result


def softmax(
    x: npt.ArrayLike,
    axis: int | tuple[int, ...] | None = -1,
    *,
    where: npt.ArrayLike | None = None,
    dps: int = DEFAULT_DPS,
    backend: str = "arb",
    undecided: str = "raise",
) -> ObjArray:
    """:func:`attnspec.softmax`, exactly: an object array of mpf, each the midpoint of a
    ball proved to hold the exact value, that rounds to the float64 nearest it and is
    within ``10**-dps`` of it (see the module docstring).

    ``backend``: "arb" (default, proved) or "mpmath" (``dps`` digits, not proved).
    ``undecided``: "raise" (default: :class:`UndecidedRounding` where even
    :data:`MAX_BITS` bits do not decide) or "midpoint" (the ball's midpoint there).

    Examples
    --------
    >>> from attnspec import exact
    >>> exact.to_float64(exact.softmax([1.0, 2.0, 3.0]))
    array([0.09003057, 0.24472847, 0.66524096])
    """
    return _run("softmax", x, axis, where, False, dps, backend, undecided)


def log_softmax(
    x: npt.ArrayLike,
    axis: int | tuple[int, ...] | None = -1,
    *,
    where: npt.ArrayLike | None = None,
    dps: int = DEFAULT_DPS,
    backend: str = "arb",
    undecided: str = "raise",
) -> ObjArray:
    """:func:`attnspec.log_softmax`, exactly; arguments as for :func:`softmax`."""
    return _run("log_softmax", x, axis, where, False, dps, backend, undecided)


def logsumexp(
    x: npt.ArrayLike,
    axis: int | tuple[int, ...] | None = -1,
    *,
    where: npt.ArrayLike | None = None,
    keepdims: bool = False,
    dps: int = DEFAULT_DPS,
    backend: str = "arb",
    undecided: str = "raise",
) -> ObjArray:
    """:func:`attnspec.logsumexp`, exactly; arguments as for :func:`softmax`."""
    return _run("logsumexp", x, axis, where, keepdims, dps, backend, undecided)


def sdpa(
    q: npt.ArrayLike,
    k: npt.ArrayLike,
    v: npt.ArrayLike,
    *,
    dps: int = DEFAULT_DPS,
    backend: str = "arb",
    undecided: str = "raise",
    **options: Any,
) -> Any:
    """:func:`attnspec.sdpa`, exactly: object arrays of mpf, ``out`` or ``(out, lse)``,
    with the guarantees of :func:`softmax`.

    Takes the same keyword arguments as :func:`attnspec.sdpa` (except ``precision``),
    and ``dps``, ``backend`` and ``undecided`` as :func:`softmax`. With the mpmath
    backend, the working precision is ``dps`` plus the digits the logits' magnitude
    needs (their differences keep ``dps`` digits after the shift by the maximum).
    """
    from attnspec.reference.attention import SdpaOptions, evaluate

    opts = SdpaOptions.from_kwargs(options)
    digits = _check_dps(dps)
    rule = _check_choice("undecided", undecided, UNDECIDED)
    if _check_choice("backend", backend, BACKENDS) == "mpmath":
        with mpmath.workdps(digits + _logit_digits(q, k, opts)):
            res = evaluate(Exact(), q, k, v, opts)
            if opts.return_lse:
                return tuple(_as_mpf(r) for r in res)
            return _as_mpf(res)

    def evaluate_once(arith: Any) -> Any:
        res = evaluate(arith, q, k, v, opts)
        return res if opts.return_lse else (res,)

    parts = _certified(evaluate_once, digits, _logit_digits(q, k, opts), "sdpa", rule)
    return parts if opts.return_lse else parts[0]


def softmax_vjp(
    x: npt.ArrayLike,
    g: npt.ArrayLike,
    axis: int | tuple[int, ...] | None = -1,
    *,
    where: npt.ArrayLike | None = None,
    dps: int = DEFAULT_DPS,
    backend: str = "arb",
    undecided: str = "raise",
) -> ObjArray:
    """:func:`attnspec.softmax_vjp`, exactly, with the guarantees of :func:`softmax`."""
    return _gradient("softmax", x, g, axis, where, False, dps, backend, undecided)


def softmax_jvp(
    x: npt.ArrayLike,
    t: npt.ArrayLike,
    axis: int | tuple[int, ...] | None = -1,
    *,
    where: npt.ArrayLike | None = None,
    dps: int = DEFAULT_DPS,
    backend: str = "arb",
    undecided: str = "raise",
) -> ObjArray:
    """:func:`attnspec.softmax_jvp`, exactly, with the guarantees of :func:`softmax`."""
    return _gradient("softmax", x, t, axis, where, False, dps, backend, undecided, "t")


def log_softmax_vjp(
    x: npt.ArrayLike,
    g: npt.ArrayLike,
    axis: int | tuple[int, ...] | None = -1,
    *,
    where: npt.ArrayLike | None = None,
    dps: int = DEFAULT_DPS,
    backend: str = "arb",
    undecided: str = "raise",
) -> ObjArray:
    """:func:`attnspec.log_softmax_vjp`, exactly, with the guarantees of :func:`softmax`."""
    return _gradient("log_softmax", x, g, axis, where, False, dps, backend, undecided)


def logsumexp_vjp(
    x: npt.ArrayLike,
    g: npt.ArrayLike,
    axis: int | tuple[int, ...] | None = -1,
    *,
    where: npt.ArrayLike | None = None,
    keepdims: bool = False,
    dps: int = DEFAULT_DPS,
    backend: str = "arb",
    undecided: str = "raise",
) -> ObjArray:
    """:func:`attnspec.logsumexp_vjp`, exactly, with the guarantees of :func:`softmax`."""
    return _gradient("logsumexp", x, g, axis, where, keepdims, dps, backend, undecided)


def _gradient(
    kind: str,
    x: object,
    g: object,
    axis: object,
    where: object,
    keepdims: object,
    dps: object,
    backend: object,
    undecided: object,
    g_name: str = "g",
) -> ObjArray:
    from attnspec.reference.backward import family_vjp

    digits = _check_dps(dps)
    rule = _check_choice("undecided", undecided, UNDECIDED)
    if _check_choice("backend", backend, BACKENDS) == "mpmath":
        with mpmath.workdps(digits):
            return _as_mpf(family_vjp(kind, x, g, axis, where, keepdims, Exact(), g_name))

    def evaluate_once(arith: Any) -> Any:
        return (family_vjp(kind, x, g, axis, where, keepdims, arith, g_name),)

    result: ObjArray = _certified(evaluate_once, digits, 0, f"{kind}_vjp", rule)[0]
    return result


def sdpa_backward(
    q: npt.ArrayLike,
    k: npt.ArrayLike,
    v: npt.ArrayLike,
    dout: npt.ArrayLike,
    *,
    dlse: npt.ArrayLike | None = None,
    dps: int = DEFAULT_DPS,
    backend: str = "arb",
    undecided: str = "raise",
    **options: Any,
) -> Any:
    """:func:`attnspec.sdpa_backward`, exactly: an
    :class:`~attnspec.reference.backward.SdpaGradients` of object arrays of mpf, with the
    guarantees of :func:`softmax`; arguments as :func:`sdpa`'s, and ``dout``, ``dlse``."""
    from attnspec.reference.attention import SdpaOptions
    from attnspec.reference.backward import SdpaGradients, sdpa_gradients

    opts = SdpaOptions.from_kwargs(options)
    digits = _check_dps(dps)
    rule = _check_choice("undecided", undecided, UNDECIDED)
    if _check_choice("backend", backend, BACKENDS) == "mpmath":
        with mpmath.workdps(digits + _logit_digits(q, k, opts)):
            grads = sdpa_gradients(Exact(), q, k, v, dout, dlse, opts)
            return SdpaGradients(*(None if g is None else _as_mpf(g) for g in grads))
    present = [name for name in SdpaGradients._fields if name != "dbias" or opts.bias is not None]
    present = [name for name in present if name != "dsinks" or opts.sinks is not None]

    def evaluate_once(arith: Any) -> Any:
        grads = sdpa_gradients(arith, q, k, v, dout, dlse, opts)
        return tuple(getattr(grads, name) for name in present)

    parts = _certified(
        evaluate_once,
        digits,
        _logit_digits(q, k, opts),
        "sdpa_backward",
        rule,
        names=tuple(present),
    )
    found = dict(zip(present, parts, strict=True))
    return SdpaGradients(*(found.get(name) for name in SdpaGradients._fields))


def _logit_digits(q: object, k: object, opts: Any) -> int:
    r"""Decimal digits to add to ``dps`` so that the logits keep ``dps`` digits *after*
    the shift by their maximum: the products and sums that form them round relative to
    their magnitude, up to :math:`|\tau| E \max|q| \max|k| + \max|b| + \max|m|(L + S) +
    \max|\sigma|` (finite entries), while the weights depend on their differences. 0 for
    logits below 1; invalid inputs give 0 here and their error from the definition."""
    try:
        q64 = np.abs(as_real_float64(q, "q"))
        k64 = np.abs(as_real_float64(k, "k"))
        if q64.ndim == 0 or k64.ndim == 0:
            return 0
        width = q64.shape[-1]
        tau = abs(opts.scale) if opts.scale is not None else (width**-0.5 if width else 0.0)

        def top(a: Any) -> float:
            a = np.abs(as_real_float64(a, "x")) if a is not None else np.zeros(0)
            finite = a[np.isfinite(a)]
            return float(finite.max()) if finite.size else 0.0

        sides = q64.shape[-2] + k64.shape[-2] if q64.ndim >= 2 and k64.ndim >= 2 else 0
        with np.errstate(over="ignore"):
            mag = (
                tau * width * top(q64) * top(k64)
                + top(opts.bias)
                + top(opts.alibi_slopes) * sides
                + top(opts.sinks)
            )
    except (TypeError, ValueError):
        return 0
    if not math.isfinite(mag):
        return 330  # beyond the float64 range: 10**330 covers every float64 logit
    return max(0, math.ceil(math.log10(mag))) if mag > 1 else 0


_RECORDS: list[list[tuple[int, int]]] = []


@contextlib.contextmanager
def recording_precision() -> Iterator[list[tuple[int, int]]]:
    """Within the block, each call in balls appends ``(evaluations, bits)`` to the list
    this yields: how many evaluations it took and the working precision at which its
    results decided (MAX_BITS also where some did not, with ``undecided="midpoint"``):
    the benchmark's figures of how often the first precision suffices."""
    record: list[tuple[int, int]] = []
    _RECORDS.append(record)
    try:
        yield record
    finally:
        _RECORDS.remove(record)


def _bits(digits: int) -> int:
    return math.ceil(digits * math.log2(10))


def _certified(
    evaluate_once: Callable[[Any], Any],
    digits: int,
    logit_digits: int,
    what: str,
    undecided_rule: str = "raise",
    names: tuple[str, ...] = ("out", "lse"),
) -> tuple[ObjArray, ...]:
    """Evaluate in balls until every result decides its float64 rounding and ``digits``
    digits (Ziv's strategy), doubling the working precision; the results as mpf.

    After the first evaluation that does not decide, the rational variant of the
    arithmetic is used: a result that is a rational (equal logits give weights 1/n)
    is then exact, and decides even where it is a tie between two float64, which no
    ball around it would.

    At MAX_BITS, what still does not decide raises UndecidedRounding, or with
    ``undecided_rule="midpoint"`` is the midpoint of its ball (within the ball's
    radius, at most about 2**-MAX_BITS relative, of the exact value)."""
    try:
        import flint
    except ImportError as err:  # pragma: no cover - python-flint is a dependency
        raise ImportError(
            "attnspec.exact needs python-flint (pip install python-flint) for its default "
            "backend='arb'; backend='mpmath' works without it"
        ) from err

    from attnspec.reference.balls import BallArithmetic

    target = _bits(digits)
    bits = target + GUARD_BITS + _bits(logit_digits)
    saved = flint.ctx.prec
    arith = BallArithmetic()
    evaluations = 0
    while True:
        evaluations += 1
        flint.ctx.prec = bits
        try:
            parts = evaluate_once(arith)
            finished = [_finish_all(np.asarray(p, dtype=object), target) for p in parts]
        finally:
            flint.ctx.prec = saved
        undecided = [np.argwhere(np.asarray(_is_none(f), dtype=bool)) for f in finished]
        if not any(u.size for u in undecided):
            for record in _RECORDS:
                record.append((evaluations, bits))
            if evaluations > 1:
                return tuple(_trimmed(f, target) for f in finished)
            return tuple(finished)
        if bits >= MAX_BITS and undecided_rule == "midpoint":
            for f, p, u in zip(finished, parts, undecided, strict=True):
                p = np.asarray(p, dtype=object)
                for at in map(tuple, u):  # balls: rationals and floats always decide
                    f[at] = _mpf_of_ball_mid(p[at])
            for record in _RECORDS:
                record.append((evaluations, bits))
            return tuple(_trimmed(f, target) for f in finished)
        if bits >= MAX_BITS:
            which = next(i for i, u in enumerate(undecided) if u.size)
            at = tuple(int(i) for i in undecided[which][0])
            name = "" if len(parts) == 1 else names[which] + " "
            raise UndecidedRounding(
                f"attnspec.exact.{what}: the result {name}at {at} is the ball "
                f"{np.asarray(parts[which], dtype=object)[at]} at {bits} bits of working "
                f"precision, which decides neither its float64 rounding nor {digits} "
                "digits: its exact value lies closer to a rounding boundary than that "
                "precision resolves (softcap saturated by huge logits, for example); "
                "undecided='midpoint' returns the ball's midpoint instead"
            )
        bits = min(2 * bits, MAX_BITS)
        arith = BallArithmetic(rational=True)


_make_mpf = mpmath.mp.make_mpf
_is_none = np.frompyfunc(lambda x: x is None, 1, 1)


def _finish(x: Any, target: int) -> Any:
    """The ball ``x`` as an mpf (its midpoint) if it decides its float64 rounding and
    ``target`` bits, else None. A float (a special value of the definition) is exact."""
    if isinstance(x, float):
        return mpmath.mpf(x)
    if type(x).__name__ == "fmpq":
        return _mpf_of_rational(int(x.p), int(x.q), target)
    digits_held = x.rel_accuracy_bits() >= target or x.rad() <= _tiny(target)
    if not digits_held or round_ball(x) is None:
        return None
    return _mpf_of_ball_mid(x)


def _mpf_of_rational(p: int, q: int, target: int) -> Any:
    """p / q as an mpf: exact when q is a power of two, else to ``target`` + 64 bits and
    then as many more as it takes to round to float64 as p / q does (a rational that is
    not dyadic is never a tie, but may lie close to one)."""
    if q & (q - 1) == 0:  # dyadic: exactly p * 2**-log2(q)
        return _make_mpf(mpmath.libmp.from_man_exp(p, 1 - q.bit_length()))
    bits = target + 64
    return _rounded_keeping(
        lambda mode: mpmath.libmp.from_rational(p, q, bits, mode), nearest_fraction(p, q)
    )


def _rounded_keeping(round_to: Callable[[str], Any], want: float) -> Any:
    """The first of the value rounded to nearest, down and up (``round_to(mode)``, an
    mpmath raw number) that still rounds to the float64 ``want``: the exact value lies
    strictly inside the float64 interval of ``want`` (or is its midpoint, exactly), and
    a few bits beyond float64 apart, so one of the directed roundings stays inside."""
    for mode in ("n", "f", "c"):
        y = _make_mpf(round_to(mode))
        if _round_mpf_exactly(y) == want:
            return y
    raise AssertionError(f"no rounding of the value keeps its float64 rounding {want!r}")


def _trimmed(a: ObjArray, target: int) -> ObjArray:
    """The mpf of ``a`` rounded to ``target`` + 64 bits where they carry more (a result of
    a raised precision), in the direction that keeps their float64 rounding: the digits
    promised, without mantissas of thousands of bits."""
    bits = target + 64
    out = a.copy()
    for at in np.ndindex(a.shape):
        y = a[at]
        if isinstance(y, mpmath.mpf) and y._mpf_[3] > bits:
            round_to = functools.partial(mpmath.libmp.mpf_pos, y._mpf_, bits)
            out[at] = _rounded_keeping(round_to, _round_mpf_exactly(y))
    return out


_finish_each = np.frompyfunc(_finish, 2, 1)


def _finish_all(a: ObjArray, target: int) -> ObjArray:
    """:func:`_finish` of every entry, where the balls that :func:`_rounds_quickly` settles
    (most) go straight to their conversion to mpf."""
    with np.errstate(invalid="ignore"):  # NaN entries: numpy reports them, quietly
        balls = np.asarray(_is_ball(a), dtype=bool).reshape(a.shape)
        quick = np.zeros(a.shape, dtype=bool)
        quick[balls] = _rounds_quickly(a[balls], target)
        out = np.empty(a.shape, dtype=object)
        out[quick] = _mpf_of_balls(a[quick])
        slow = ~quick
        if slow.any():
            out[slow] = _finish_each(a[slow], target)
        return out


def _rounds_quickly(a: ObjArray, target: int) -> npt.NDArray[np.bool_]:
    r"""A sufficient test, in float64, for a 1-D array of balls at once (numpy's loops
    call the balls' own methods: no Python frame per entry), that each holds ``target``
    bits (relative) and rounds to ``float(x)``, a normal float64 f: the residual
    :math:`r = m - f` of the midpoint is computed as a ball and rounded (relative error at
    most :math:`2^{-52}`), so every point lies within :math:`|\mathrm{fl}(r)|(1 + 2^{-50})
    + 2^{2-t}|f|` of f, which must stay below half the smaller gap to f's neighbours.
    False where unsure (:func:`round_ball` decides there)."""
    if a.size == 0:
        return np.zeros(a.shape, dtype=bool)
    rel = np.asarray(_rel_bits(a), dtype=np.int64).reshape(a.shape)
    with np.errstate(over="ignore"):
        f = np.asarray(_as_float(a), dtype=np.float64).reshape(a.shape)
        r = np.abs(np.asarray(_as_float(a - f), dtype=np.float64).reshape(a.shape))
        mag = np.abs(f)
        gap = np.spacing(mag)
        power_of_two = np.frexp(mag)[0] == 0.5
        gap = np.where(power_of_two, gap / 2, gap)  # the gap below a power of two is half
        normal = (mag >= 2.0**-1021) & (mag <= 2.0**1022)
        ok = r * (1 + 2.0**-50) + 2.0 ** (2 - target) * mag < gap / 2
    return normal & (rel >= target) & ok


_is_ball = np.frompyfunc(lambda x: type(x).__name__ == "arb", 1, 1)
_rel_bits = np.frompyfunc(lambda b: b.rel_accuracy_bits(), 1, 1)
_as_float = np.frompyfunc(float, 1, 1)


def _mpf_of_ball_mid(x: Any) -> Any:
    """The midpoint of a ball as an mpf, exactly (Arb's midpoints are normalized, with an
    odd mantissa: mpmath's raw form, directly)."""
    man, exp = x.mid().man_exp()
    m, e = int(man), int(exp)
    if m == 0:
        return mpmath.mpf(0)
    return _make_mpf((0, m, e, m.bit_length()) if m > 0 else (1, -m, e, (-m).bit_length()))


_mpf_of_balls = np.frompyfunc(_mpf_of_ball_mid, 1, 1)


@functools.cache
def _tiny(target: int) -> Any:
    import flint

    return flint.arb(2) ** (-1074 - target)
