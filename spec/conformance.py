r"""``attnspec check TARGET``: is a kernel's attention right, by the properties and the
reference, with derived tolerances.

A :class:`Target` is a callable with the signature of :func:`attnspec.sdpa` on numpy arrays
(``fn(q, k, v, **kwargs)``, ``return_lse=True`` gives ``(out, lse)``), the features it
declares (:data:`KERNEL_FEATURES`), the extra input forms it accepts
(:data:`~attnspec.spec.strategies.kernel.FORMS`), and the dtype it works in. The harness
sends only what it declared (full 4-D ``(B, H, L, E)`` arrays in its dtype, full-shape masks,
``(Hq,)`` per-head arguments, :math:`L, S \ge 1`, :math:`E_v = E` by default: see
:mod:`attnspec.spec.strategies.kernel`), checks every result it returns (type, shape,
dtype; a wrong one is a failure with a message, never a crash of the harness) and judges
it in four stages:

1. **properties**: the attention battery (:mod:`attnspec.spec.properties.attention`) on
   Hypothesis-drawn problems in the kernel form. The battery's bound of a computed result
   becomes the dtype's: :func:`attnspec.spec.tolerances.attention.textbook_sdpa_bound` for
   float64, :func:`attnspec.spec.tolerances.precision.forward_bound` (``against="exact"``)
   for a lower precision. An example whose transformed inputs are not values of the dtype
   is not sent (the battery's tolerances are for exact inputs); a check none of whose
   examples can be sent is "not applicable", with the reason. Hidden positions: no NaN or
   inf may leak and the output must meet the tolerance (bitwise with ``strict``).
2. **sizes**: L, S across tile boundaries (:func:`~attnspec.spec.strategies.kernel.size_plan`)
   against the reference: ``attnspec.sdpa`` accurate for float64 (tolerance: the
   textbook bound plus the reference's accurate bound), fast for lower precisions
   (``forward_bound(..., against="fast")``, which adds the reference's own bound).
3. **families**: the same comparison on outlier channels, large norms, low rank,
   near-duplicate keys, strongly negative rows (logits near -160), logit offsets, and NaN
   at visible positions (which must reach the rows that see them).
4. **backward** (feature ``backward``): the gradients against
   :func:`attnspec.sdpa_backward` (with ``dlse`` where the target has ``lse``; every
   variant of the sizes stage once) within the target's bound
   (:func:`~attnspec.spec.tolerances.backward.fast_backward_bound` for float64,
   :func:`~attnspec.spec.tolerances.precision.backward_bound` for a lower precision) plus
   the reference's accurate bound, and the gradient battery of
   :mod:`attnspec.spec.properties.backward` with the same bounds, on inputs that are
   values of the target's dtype.

A target that raises on valid input, returns something that is not a result, or writes
into an array it was given has failed.

Conventions (``convention``): a peer's facts in :mod:`attnspec.spec.conventions` become
rules (:class:`ConventionRules`): the checks it does not promise are not applicable (with
the fact that says so), NaN is not placed behind masks where it leaks, and where a row
that sees no key gets the mean of V (jax) such rows are judged by that rule.

Every reported error is a multiple of its bound (``worst``: the largest
:math:`|\hat o - o_{\mathrm{ref}}| / \mathrm{bound}`; a pass is at most 1); beside the derived
bound, the low-precision stages report the empirical criterion
(:func:`~attnspec.spec.tolerances.precision.empirical_bound`, FlashAttention's rule).
Entries whose bound is :math:`\infty` (a correct kernel may overflow there) are counted as
"not judged", never passed or failed.

:func:`run` gives a :class:`Report`; its :meth:`Report.exit_code` is 0 (conforms) or 1
(a property failed); :func:`main` is the command line (2: bad usage).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, TextIO

import numpy as np
import numpy.typing as npt

from attnspec.spec.strategies.attention import FEATURES, AttentionCase
from attnspec.spec.strategies.kernel import (
    FAMILIES,
    FORMS,
    FormError,
    blind_rows,
    family_case,
    full_form,
    kernel_cases,
    representable,
    size_plan,
    sized_case,
)

__all__ = [
    "CONVENTIONS",
    "DTYPES",
    "KERNEL_FEATURES",
    "STAGES",
    "Report",
    "Target",
    "TargetError",
    "Verdict",
    "add_arguments",
    "judge",
    "load_target",
    "main",
    "reproduce_property",
    "run",
]

F64 = npt.NDArray[np.float64]

#: the dtypes a target may work in
DTYPES = ("float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2")
#: what a target may declare: the attention features and ``backward``
KERNEL_FEATURES = (*FEATURES, "backward")
#: the stages, in order
STAGES = ("properties", "sizes", "families", "backward")


class TargetError(AssertionError):
    """The target returned something that is not a result (wrong type, shape, dtype)."""


# ---------------------------------------------------------------------------------------
# Conventions: what each peer promises, as data (from spec/conventions.py)
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConventionRules:
    """What a convention changes in the judgment, each from a fact of
    :mod:`attnspec.spec.conventions`:

    * ``excused``: the checks it does not promise (name -> the fact that says so);
    * ``poison``: whether the properties put NaN and inf at hidden positions (not where
      the convention says they leak: every other check would meet the leak too);
    * ``blind_rows``: what a row that sees no key (and has no sink) returns, "0" or
      "mean of V". Under "mean of V" the properties draw no such row and the sizes and
      families stages judge such rows against the mean of V, by the bound of the problem
      whose logits are all equal (their lse is not judged: it is the fill's)."""

    name: str
    excused: dict[str, str] = field(default_factory=dict)
    poison: bool = True
    blind_rows: str = "0"


def _rules(name: str) -> ConventionRules:
    from attnspec.spec.conventions import PRESETS

    if name == "canonical":
        return ConventionRules("canonical")
    p = PRESETS[name]
    excused: dict[str, str] = {}
    poison = True
    if "leaks" in p.hidden_nan.value or "not measured" in p.hidden_nan.value:
        excused["hidden_values"] = f"{name} hidden_nan: {p.hidden_nan.value!r}"
        poison = False
    blind = "0"
    if p.fully_masked_output.value.strip() not in ("0", "0 (-inf mask); mean of V (finite fill)"):
        excused["empty_rows"] = f"{name} fully_masked_output: {p.fully_masked_output.value!r}"
        if p.fully_masked_output.value.startswith("mean of V"):
            blind = "mean of V"
    return ConventionRules(name, excused, poison, blind)


#: the conventions ``--convention`` takes: canonical (attnspec's definition) and peers
CONVENTIONS = ("canonical", "torch", "jax", "flash")


# ---------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------


def _np_dtype(dtype: str) -> Any:
    if dtype in ("float64", "float32", "float16"):
        return np.dtype(dtype)
    import ml_dtypes

    return np.dtype(getattr(ml_dtypes, dtype))


@dataclass(frozen=True)
class Target:
    """A kernel under test.

    Attributes
    ----------
    name : str
        Shown in the report; ``spec`` rebuilds it with :func:`load_target`.
    fn : callable
        ``fn(q, k, v, **kwargs)``, sdpa's keywords (but ``precision``), arrays of
        ``dtype`` in and out; ``return_lse=True`` -> ``(out, lse)`` (feature ``lse``).
    features : frozenset of str
        Declared, from :data:`KERNEL_FEATURES`.
    forms : frozenset of str
        Extra input forms it accepts (:data:`~attnspec.spec.strategies.kernel.FORMS`).
    dtype, accumulate : str
        The precision it works in; the accumulation dtype (None: float32).
    backward : callable, optional
        ``backward(q, k, v, dout, *, dlse=None, **kwargs)`` like
        :func:`attnspec.sdpa_backward` (feature ``backward``).
    logits : {"dtype", "accumulate"}
        Which low-precision bound it claims (:func:`~attnspec.spec.tolerances.precision.
        forward_bound`): "dtype" covers every naive order.
    spec : str
        How :func:`load_target` rebuilds it (for the reproductions).
    """

    name: str
    fn: Callable[..., Any]
    features: frozenset[str] = frozenset()
    forms: frozenset[str] = frozenset()
    dtype: str = "float64"
    accumulate: str | None = None
    backward: Callable[..., Any] | None = None
    logits: str = "dtype"
    spec: str = ""
    note: str = ""

    def __post_init__(self) -> None:
        bad = set(self.features) - set(KERNEL_FEATURES)
        if bad:
            raise ValueError(f"unknown features {sorted(bad)}; choose from {KERNEL_FEATURES}")
        badf = set(self.forms) - set(FORMS)
        if badf:
            raise ValueError(f"unknown forms {sorted(badf)}; choose from {FORMS}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if "backward" in self.features and self.backward is None:
            raise ValueError(f"{self.name}: feature 'backward' needs a backward function")

    # -- calling it, in its forms and dtype ------------------------------------------

    def _to(self, a: Any, name: str) -> Any:
        if a is None or isinstance(a, bool | int | float | str | tuple):
            return a
        arr = np.asarray(a)
        if arr.dtype == bool:
            return arr.copy()
        if name in ("bias", "sinks", "alibi_slopes") and self.dtype.startswith("float8"):
            return arr.astype(np.float32)  # float8 has no -inf; a kernel keeps these wider
        return arr.astype(_np_dtype(self.dtype))

    def call(self, case: AttentionCase, lse: bool = False) -> tuple[F64, F64 | None]:
        """The target on ``case``, sent in its forms and dtype; the results checked
        (:class:`TargetError`) and returned as float64 in the case's shapes.

        :class:`~attnspec.spec.strategies.kernel.FormError` where the case has no form
        the target declared, or q, k, v are not values of its dtype.
        """
        want_lse = lse and "lse" in self.features
        for name in ("q", "k", "v"):
            if not representable(getattr(case, name), self.dtype):
                raise FormError(f"{name} holds values that are not {self.dtype}")
        form = full_form(case, self.forms)
        outs, lse_out = [], None
        for v in form.vs:
            kw = {key: self._to(val, key) for key, val in form.kwargs.items()}
            if want_lse:
                kw["return_lse"] = True
            args = {"q": self._to(form.q, "q"), "k": self._to(form.k, "k"), "v": self._to(v, "v")}
            kept = _copies({**args, **kw})
            res = self.fn(args["q"], args["k"], args["v"], **kw)
            self._untouched({**args, **kw}, kept)
            out, ls = self._check_result(res, want_lse, form)
            outs.append(out)
            lse_out = ls if lse_out is None else lse_out
        out = form.restore(outs)
        return out, (None if lse_out is None else form.restore_lse(lse_out))

    def _untouched(self, sent: dict[str, Any], kept: dict[str, Any]) -> None:
        """TargetError where the target wrote into an array it was given."""
        for name, copy in kept.items():
            now = np.asarray(sent[name])
            # bitwise (NaN payloads included; ml_dtypes' bfloat16 is not of kind "f")
            if now.shape != copy.shape or now.tobytes() != copy.tobytes():
                raise TargetError(
                    f"{self.name} modified its input {name!r} in place (inputs are read-only "
                    "to an attention kernel: a caller reuses them)"
                )

    def _check_result(self, res: Any, want_lse: bool, form: Any) -> tuple[F64, F64 | None]:
        shape = (*form.q.shape[:-1], form.vs[0].shape[-1])
        if want_lse:
            if not isinstance(res, tuple | list) or len(res) != 2:
                raise TargetError(
                    f"{self.name} with return_lse=True returned {type(res).__name__}, "
                    "expected a tuple (out, lse)"
                )
            out, ls = res
        else:
            if isinstance(res, tuple | list):
                raise TargetError(
                    f"{self.name} returned a {type(res).__name__} of {len(res)} where an "
                    "array was expected (return_lse was not asked)"
                )
            out, ls = res, None
        a = self._array(out, "output", shape)
        b = None if ls is None else self._array(ls, "lse", shape[:-1], lse=True)
        return a, b

    def _array(self, x: Any, what: str, shape: tuple[int, ...], lse: bool = False) -> F64:
        if not isinstance(x, np.ndarray):
            raise TargetError(
                f"{self.name}'s {what} is a {type(x).__name__}, expected a numpy array"
            )
        if x.shape != tuple(shape):
            raise TargetError(f"{self.name}'s {what} has shape {x.shape}, expected {tuple(shape)}")
        want = _np_dtype(self.dtype)
        ok = {want} | ({np.dtype(np.float32), np.dtype(np.float64)} if lse else set())
        if x.dtype not in ok:
            raise TargetError(f"{self.name}'s {what} has dtype {x.dtype}, expected {want}")
        return np.asarray(x, dtype=np.float64)

    def call_backward(self, case: AttentionCase, dout: F64, dlse: F64 | None = None) -> Any:
        """The target's backward on a case in its form (4-D, full shapes only)."""
        assert self.backward is not None
        for name, x in (("q", case.q), ("k", case.k), ("v", case.v), ("dout", dout)):
            if not representable(x, self.dtype):
                raise FormError(f"{name} holds values that are not {self.dtype}")
        form = full_form(case, self.forms)
        if len(form.vs) != 1:
            raise FormError("Ev != E")
        kw = {key: self._to(val, key) for key, val in form.kwargs.items()}
        if dlse is not None:
            kw["dlse"] = self._to(dlse, "dlse")
        args = {
            "q": self._to(form.q, "q"),
            "k": self._to(form.k, "k"),
            "v": self._to(form.vs[0], "v"),
            "dout": self._to(dout, "dout"),
        }
        kept = _copies({**args, **kw})
        res = self.backward(args["q"], args["k"], args["v"], args["dout"], **kw)
        self._untouched({**args, **kw}, kept)
        return res


def _copies(sent: dict[str, Any]) -> dict[str, Any]:
    """Copies of the arrays among ``sent``, to tell whether the target wrote into them."""
    return {k: np.array(v, copy=True) for k, v in sent.items() if isinstance(v, np.ndarray)}


def _features_of(obj: Any, default: Sequence[str]) -> frozenset[str]:
    feats = getattr(obj, "attnspec_features", None)
    return frozenset(default if feats is None else feats)


def _callable_target(text: str, dtype: str, accumulate: str | None) -> Target:
    mod_name, _, attr = text.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        # as ``python -m`` and pytest do: a module of the current folder is importable
        sys.path.append(os.getcwd())
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ValueError(f"TARGET {text!r}: cannot import module {mod_name!r} ({exc})") from None
    obj: Any = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"TARGET {text!r}: module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"TARGET {text!r}: {attr!r} is a {type(obj).__name__}, not callable")
    feats = _features_of(obj, ())
    back = getattr(obj, "attnspec_backward", None)
    if back is not None:
        feats = feats | {"backward"}
    return Target(
        name=text,
        fn=obj,
        features=feats,
        forms=frozenset(getattr(obj, "attnspec_forms", ())),
        dtype=dtype,
        accumulate=accumulate,
        backward=back,
        spec=text,
    )


def _attnspec_target(dtype: str, accumulate: str | None) -> Target:
    r"""TARGET ``attnspec``: :func:`attnspec.sdpa` and :func:`attnspec.sdpa_backward` at
    ``precision="fast"``, judged on the fast claim (the textbook bounds of
    :mod:`attnspec.spec.tolerances.attention` and :func:`~attnspec.spec.tolerances.
    backward.fast_backward_bound`) against the ``precision="accurate"`` reference, with the
    default number of examples. The accurate path would be compared with itself in the
    sizes and families stages (an error of 0, which tests nothing) and is slow on the
    large cases; its own claim is tested by the project's test suite."""
    import attnspec

    if dtype != "float64":
        raise ValueError(
            "TARGET 'attnspec' works in float64 only (its reference); use --dtype float64"
        )

    def fn(q: Any, k: Any, v: Any, **kw: Any) -> Any:
        return attnspec.sdpa(q, k, v, precision="fast", **kw)

    def back(q: Any, k: Any, v: Any, dout: Any, **kw: Any) -> Any:
        return attnspec.sdpa_backward(q, k, v, dout, precision="fast", **kw)

    return Target(
        name="attnspec.sdpa[fast]",
        fn=fn,
        features=frozenset(KERNEL_FEATURES),
        forms=frozenset(FORMS),
        dtype="float64",
        backward=back,
        spec="attnspec",
    )


def load_target(
    text: str,
    *,
    dtype: str = "float64",
    accumulate: str | None = None,
    device: str = "cpu",
    backend: str | None = None,
    features: Sequence[str] | None = None,
) -> list[Target]:
    """The targets ``text`` names: ``torch`` (one per SDPA backend that runs on
    ``device``, and FlexAttention where it runs), ``jax``, ``attnspec`` or
    ``module:function``. ``features`` restricts what is declared. ValueError (with the
    reason) for a TARGET that cannot be loaded or a device that is not there."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {DTYPES}, got {dtype!r}")
    if text == "torch":
        from attnspec.adapters.torch import torch_targets

        targets = torch_targets(dtype=dtype, accumulate=accumulate, device=device, backend=backend)
    elif text == "jax":
        from attnspec.adapters.jax import jax_target

        targets = [jax_target(dtype=dtype, accumulate=accumulate)]
    elif text == "attnspec":
        targets = [_attnspec_target(dtype, accumulate)]
    elif ":" in text:
        targets = [_callable_target(text, dtype, accumulate)]
    else:
        raise ValueError(f"TARGET must be torch, jax, attnspec or module:function, got {text!r}")
    if device != "cpu" and text != "torch":
        raise ValueError(f"--device {device} is for TARGET torch only")
    if features is not None:
        unknown = set(features) - set(KERNEL_FEATURES)
        if unknown:
            raise ValueError(
                f"--features: unknown {sorted(unknown)}; choose from {KERNEL_FEATURES}"
            )
        targets = [replace(t, features=t.features & frozenset(features)) for t in targets]
    return targets


# ---------------------------------------------------------------------------------------
# Bounds
# ---------------------------------------------------------------------------------------


def _kernel_bound(target: Target, case: AttentionCase, against: str) -> tuple[F64, F64]:
    """The target's bound on |out - exact| (``against="exact"``) or on |out -
    sdpa_fast| (``"fast"``), and on the lse."""
    from attnspec.spec.tolerances import attention as atol
    from attnspec.spec.tolerances.precision import forward_bound

    if target.dtype == "float64":
        _, ob = atol.textbook_sdpa_bound(case.q, case.k, case.v, **case.kwargs)
        lb = atol.textbook_lse_bound(case.q, case.k, **case.kwargs)
        if against == "fast":
            return 2 * ob, 2 * lb
        return ob, lb
    return forward_bound(
        case.q,
        case.k,
        case.v,
        dtype=target.dtype,
        accumulate=target.accumulate,
        logits=target.logits,
        against=against,
        **case.kwargs,
    )


@dataclass
class _Stats:
    worst: float = 0.0
    not_judged: int = 0
    judged: int = 0

    def add(self, diff: Any, allowed: Any) -> None:
        diff = np.asarray(diff, dtype=np.float64)
        allowed = np.broadcast_to(np.asarray(allowed, dtype=np.float64), diff.shape)
        inf = ~np.isfinite(allowed)
        self.not_judged += int((inf & (diff > 0)).sum())  # equal results need no bound
        fin = ~inf
        self.judged += int(fin.sum())
        if fin.any():
            with np.errstate(divide="ignore", invalid="ignore"):
                r = np.where(diff[fin] == 0, 0.0, diff[fin] / allowed[fin])
            r = np.where(np.isnan(r), np.inf, r)
            self.worst = max(self.worst, float(np.max(r)))


_STATS: list[_Stats] = []


@contextlib.contextmanager
def _kernel_bounds(target: Target) -> Iterator[None]:
    """The battery's bounds and comparisons, for the duration, in ``target``'s dtype.

    :func:`attnspec.spec.properties.attention.output_bound` becomes the dtype's bound on
    ``|computed - exact|`` (float64: the textbook bound, the battery's own "fast" claim);
    each comparison records its worst error as a multiple of its bound and the entries
    not judged (bound inf). Restored on exit.
    """
    from hypothesis import reject

    from attnspec.spec.properties import attention as A

    orig_bound, orig_compare = A.output_bound, A._compare

    def bound(impl: Any, case: AttentionCase, lse: Any = None, v: Any = None) -> Any:
        if target.dtype == "float64":
            return orig_bound(impl, case, lse, v)
        c = case if v is None else replace(case, v=v)
        for name in ("q", "k", "v"):
            if not representable(getattr(c, name), target.dtype):
                reject()
        ob, lb = _kernel_bound(target, c, "exact")
        return ob, (None if lse is None else lb)

    def compare(
        impl: Any,
        case: Any,
        what: str,
        a: Any,
        b: Any,
        allowed: Any,
        rows: Any = None,
        lse: bool = False,
    ) -> None:
        __tracebackhide__ = True
        if _STATS:
            with np.errstate(invalid="ignore"):
                aa, bb = np.broadcast_arrays(np.asarray(a, dtype=float), np.asarray(b, dtype=float))
                d = np.where(A.same(aa, bb), 0.0, np.abs(aa - bb))
                d = np.where(np.isnan(d), np.inf, d)
            if rows is not None:
                d = np.where(np.broadcast_to(rows, d.shape), d, 0.0)
            _STATS[-1].add(d, np.broadcast_to(allowed, d.shape))
        orig_compare(impl, case, what, a, b, allowed, rows, lse)

    from attnspec.spec.properties import backward as B

    orig_b = B.output_bound, B.gradient_bounds

    def grad_bounds(impl: Any, bc: Any) -> dict[str, F64]:
        if target.dtype == "float64":
            return orig_b[1](impl, bc)
        for x in (bc.q, bc.k, bc.v, bc.dout):
            if not representable(x, target.dtype):
                reject()  # a derived case the target cannot be sent (as for the forward)
        bc = bc.with_case(A._poisoned(bc.case, 0.0))  # as the float64 bounds: visible only
        with np.errstate(all="ignore"):
            got = _backward_bound(target, bc.case, bc.dout, bc.dlse)
        return {name: np.where(np.isnan(b), np.inf, b) for name, b in got.items()}

    A.output_bound, A._compare = bound, compare
    B.output_bound, B.gradient_bounds = bound, grad_bounds
    try:
        yield
    finally:
        A.output_bound, A._compare = orig_bound, orig_compare
        B.output_bound, B.gradient_bounds = orig_b


# ---------------------------------------------------------------------------------------
# Verdicts and the report
# ---------------------------------------------------------------------------------------


@dataclass
class Verdict:
    """One line of the report."""

    stage: str
    name: str
    description: str
    verdict: str  # "pass", "fail", "not applicable", "not judged"
    examples: int = 0
    worst: float | None = None  # worst error / derived bound
    empirical: float | None = None  # worst error / the empirical criterion
    not_judged: int = 0  # entries whose bound is inf
    seconds: float = 0.0
    message: str = ""
    reproduction: str = ""


@dataclass
class Report:
    """What ``attnspec check`` found for one target."""

    target: str
    dtype: str
    accumulate: str | None
    convention: str
    strict: bool
    seed: int
    examples: int
    features: list[str]
    forms: list[str]
    verdicts: list[Verdict] = field(default_factory=list)
    seconds: float = 0.0
    note: str = ""

    @property
    def failed(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.verdict == "fail"]

    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["conforms"] = not self.failed
        for v in d["verdicts"]:
            for key in ("worst", "empirical"):
                if v[key] is not None and not math.isfinite(v[key]):
                    v[key] = "inf"
        return d

    def text(self) -> str:
        head = (
            f"attnspec check {self.target}  dtype={self.dtype} accumulate="
            f"{self.accumulate or 'float32' if self.dtype != 'float64' else 'float64'} "
            f"convention={self.convention}{' strict' if self.strict else ''} seed={self.seed}"
        )
        lines = [
            head,
            f"  features: {', '.join(self.features) or '(none)'}; "
            f"extra forms: {', '.join(self.forms) or '(none)'}",
        ]
        if self.note:
            lines.append(f"  note: {self.note}")
        for v in self.verdicts:
            worst = "" if v.worst is None else f" worst {v.worst:.3g}x bound"
            emp = "" if v.empirical is None else f" (empirical {v.empirical:.3g}x)"
            nj = (
                f" ({v.not_judged} entries not judged: no finite bound, or an lse the "
                "convention leaves open)"
                if v.not_judged
                else ""
            )
            lines.append(
                f"  {v.verdict.upper():15s} {v.stage}/{v.name}: {v.examples} cases{worst}{emp}{nj}"
                f" [{v.seconds:.1f} s]"
            )
            if v.verdict in ("fail", "not applicable", "not judged") and v.message:
                msg = v.message if v.verdict == "fail" else v.message.splitlines()[0]
                lines.extend("      " + m for m in msg.splitlines()[:12])
            if v.verdict == "fail" and v.reproduction:
                lines.append("    reproduce:")
                lines.extend("      " + r for r in v.reproduction.splitlines())
        n_f = len(self.failed)
        n_nj = sum(v.not_judged for v in self.verdicts)
        lines.append(
            f"  {'CONFORMS' if not n_f else f'FAILS {n_f} of {len(self.verdicts)}'}"
            f" ({n_nj} entries not judged) in {self.seconds:.1f} s"
        )
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Stage 1: the properties
# ---------------------------------------------------------------------------------------

#: check name -> (max L and S, max E): as in the attention battery
_SIDES = {"agreement": (16, 32)}
#: seconds a failing property is shrunk for (Hypothesis shrinks for minutes otherwise: each
#: step evaluates the property and its bounds); the smallest failure found is reported
SHRINK_SECONDS = 3


@contextlib.contextmanager
def _shrink_limit() -> Iterator[None]:
    """Hypothesis shrinks a failure for at most :data:`SHRINK_SECONDS` for the duration
    (its engine's limit, 300 s by default; the smallest failure found by then is reported),
    without the engine's warning that it stopped after "five minutes" or its warnings
    about the size of a counterexample's repr."""
    try:
        from hypothesis.internal.conjecture import engine
    except ImportError:  # pragma: no cover - another Hypothesis layout: its own limit
        yield
        return
    old = getattr(engine, "MAX_SHRINKING_SECONDS", None)
    if old is None:  # pragma: no cover
        yield
        return
    from hypothesis import reporting

    outer = reporting.current_reporter()

    def quiet(value: object) -> None:
        # the engine's warning at the limit says "five minutes" whatever the limit is
        if not str(value).startswith("WARNING: Hypothesis has spent more than five minutes"):
            outer(value)

    engine.MAX_SHRINKING_SECONDS = SHRINK_SECONDS
    try:
        with reporting.with_reporter(quiet), warnings.catch_warnings():
            # the report prints its own counterexample, not Hypothesis's repr of the call
            warnings.filterwarnings("ignore", message="Generating overly large repr")
            yield
    finally:
        engine.MAX_SHRINKING_SECONDS = old


#: examples cap per check relative to --examples (the certified reference is slow)
_CAPS = {"agreement": 0.5, "dropout": 0.6}


def _snippet_header(target: Target) -> list[str]:
    acc = f", accumulate={target.accumulate!r}" if target.accumulate else ""
    return [
        "import numpy as np",
        "from attnspec.spec import conformance",
        "from attnspec.spec.strategies.attention import AttentionCase",
        f"target = conformance.load_target({target.spec!r}, dtype={target.dtype!r}{acc})"
        + (f"[{_index_of(target)}]" if target.spec in ("torch",) else "[0]"),
    ]


_TARGET_INDEX: dict[str, int] = {}


def _array_source(a: Any) -> str:
    """Python source that rebuilds ``a`` exactly: ``np.array([...])`` (shape kept, also
    when empty), or its bytes in base64 when it is large."""
    from attnspec.spec.properties._core import array_repr

    arr = np.asarray(a)
    if arr.size == 0:
        return f"np.zeros({arr.shape!r}, dtype={arr.dtype.name!r})"
    if arr.size <= 400:
        return array_repr(arr)
    import base64

    data = base64.b64encode(np.ascontiguousarray(arr).tobytes()).decode("ascii")
    return (
        f"np.frombuffer(__import__('base64').b64decode({data!r}), "
        f"dtype={arr.dtype.str!r}).reshape({arr.shape!r})"
    )


def _case_source(case: AttentionCase) -> str:
    """``case`` as a call of :class:`AttentionCase` that rebuilds it exactly."""
    from attnspec.spec.properties._core import float_repr

    def src(val: Any) -> str:
        if isinstance(val, np.ndarray):
            return _array_source(val)
        if isinstance(val, float):
            return float_repr(val)
        return repr(val)

    kw = ", ".join(f"{key!r}: {src(val)}" for key, val in case.kwargs.items())
    qkv = ", ".join(f"{n}={_array_source(getattr(case, n))}" for n in ("q", "k", "v"))
    return f"AttentionCase({qkv}, kwargs={{{kw}}})"


def _index_of(target: Target) -> int:
    return _TARGET_INDEX.get(target.name, 0)


def _impl(target: Target, strict: bool, rules: ConventionRules | None = None) -> Any:
    """``target`` as an attention implementation for the properties; under ``rules``
    whose rows that see no key are not 0, every case a property evaluates (the drawn one
    and those it derives) with such a row is rejected."""
    from attnspec.spec.properties.attention import AttentionImpl

    blind_ok = rules is None or rules.blind_rows == "0"

    def fn(q: Any, k: Any, v: Any, **kw: Any) -> Any:
        from hypothesis import reject

        lse = bool(kw.pop("return_lse", False))
        case = AttentionCase(
            np.asarray(q, dtype=float), np.asarray(k, dtype=float), np.asarray(v, dtype=float), kw
        )
        if not blind_ok and blind_rows(case).any():
            reject()
        try:
            out, ls = target.call(case, lse=lse)
        except FormError:
            reject()
        return (out, ls) if lse else out

    feats = frozenset(target.features) & set(FEATURES)
    return AttentionImpl(name=target.name, fn=fn, features=feats, accuracy="fast")


def check_hidden_values_tolerant(impl: Any, case: AttentionCase) -> None:
    r"""NaN and :math:`\pm\infty` at hidden positions never reach the output: with them,
    every output and lse entry is finite where it is with 0 there, and within the sum
    of the two results' bounds of it (bitwise equality is ``--strict``,
    :func:`attnspec.spec.properties.attention.check_hidden_values`)."""
    __tracebackhide__ = True
    from attnspec.spec.properties import attention as A

    case = A._fit(impl, case)
    zero = A._poisoned(case, 0.0, True)
    out0, lse0, e0, el0 = A._evaluated(impl, zero)
    for value in (np.nan, np.inf, -np.inf):
        bad = A._poisoned(case, float(value), True)
        out, lse = A._eval(impl, bad, lse=True)
        leak = ~np.isfinite(out) & np.isfinite(out0)
        if leak.any():
            at = tuple(int(i) for i in np.argwhere(leak)[0])
            A._fail(
                impl,
                bad,
                f"{value} at hidden positions leaks into the output at {at}: {out[at]!r} "
                f"(with 0 there: {out0[at]!r})",
            )
        A._compare(
            impl,
            bad,
            f"output with {value} at hidden positions vs 0 there",
            out,
            out0,
            2 * np.asarray(e0),
        )
        if lse is not None and lse0 is not None and el0 is not None:
            A._compare(
                impl,
                bad,
                f"lse with {value} at hidden positions",
                lse,
                lse0,
                2 * np.asarray(el0),
                lse=True,
            )


def _property_checks(strict: bool) -> list[tuple[str, str, Callable[..., None], frozenset[str]]]:
    from attnspec.spec.properties.attention import BATTERY

    out = []
    for c in BATTERY:
        prop = c.prop
        if c.name == "hidden_values" and not strict:
            prop = check_hidden_values_tolerant
        out.append((c.name, c.description, prop, c.needs))
    return out


def reproduce_property(
    target: Target,
    name: str,
    case: AttentionCase,
    strict: bool = False,
    convention: str = "canonical",
) -> None:
    """Run the property ``name`` of the attention battery on ``target`` for ``case``, in
    the target's dtype: raises the property's violation (an AssertionError) if it fails."""
    checks = {n: p for n, _, p, _ in _property_checks(strict)}
    impl = _impl(target, strict, _rules(convention))
    with _kernel_bounds(target):
        checks[name](impl, case)


def _run_properties(
    target: Target,
    n: int,
    seed: int,
    strict: bool,
    rules: ConventionRules,
    progress: Callable[[str], None],
    only: frozenset[str] | None = None,
) -> list[Verdict]:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hseed
    from hypothesis.errors import Unsatisfiable

    impl = _impl(target, strict, rules)
    verdicts = []
    for name, text, prop, needs in _property_checks(strict):
        if only is not None and name not in only and f"properties/{name}" not in only:
            continue
        missing = set(needs) - set(impl.features)
        if missing:
            verdicts.append(
                Verdict(
                    "properties", name, text, "not applicable", message=f"needs {sorted(missing)}"
                )
            )
            continue
        if name in rules.excused:
            verdicts.append(
                Verdict(
                    "properties",
                    name,
                    text,
                    "not applicable",
                    message=f"not promised by the convention: {rules.excused[name]}",
                )
            )
            continue
        progress(f"properties/{name}")
        side, width = _SIDES.get(name, (4, 4))
        m = max(1, int(n * _CAPS.get(name, 1.0)))
        strategy = kernel_cases(
            features=impl.features,
            forms=target.forms,
            dtype=target.dtype,
            max_side=side,
            max_width=width,
            poison=None if rules.poison else False,
            min_visible=0 if rules.blind_rows == "0" else 1,
        )
        last: list[Any] = [None]
        count = [0]

        @hseed(seed)
        @settings(
            max_examples=m,
            deadline=None,
            database=None,
            report_multiple_bugs=False,
            print_blob=False,
            suppress_health_check=list(HealthCheck),
        )
        @given(strategy)
        def test(case: AttentionCase) -> None:  # run at once, in this iteration
            last[0] = case  # noqa: B023
            count[0] += 1  # noqa: B023
            prop(impl, case)  # noqa: B023

        stats = _Stats()
        _STATS.append(stats)
        t0 = time.perf_counter()
        verdict, message = "pass", ""
        try:
            with _kernel_bounds(target), _shrink_limit():
                test()
        except Unsatisfiable:
            verdict = "not applicable"
            message = (
                f"no drawn example could be sent: its transformed inputs are not values of "
                f"{target.dtype} or need forms the target did not declare"
            )
        except AssertionError as exc:
            verdict, message = "fail", str(exc).split("\n  reproduce:")[0]
        except Exception as exc:  # the target raised on valid input
            verdict, message = "fail", f"{target.name} raised {type(exc).__name__}: {exc}"
        finally:
            _STATS.pop()
        repro = ""
        if verdict == "fail" and last[0] is not None:
            repro = "\n".join(
                [
                    *_snippet_header(target),
                    f"case = {_case_source(last[0])}",
                    f"conformance.reproduce_property(target, {name!r}, case"
                    f"{', strict=True' if strict else ''}"
                    f"{'' if rules.name == 'canonical' else f', convention={rules.name!r}'})",
                ]
            )
        verdicts.append(
            Verdict(
                "properties",
                name,
                text,
                verdict,
                count[0],
                # a failure not measured against a bound (a relation, an exception) has
                # no worst ratio: the judged entries' worst would read as its size
                stats.worst if stats.judged and (verdict != "fail" or stats.worst > 1) else None,
                None,
                stats.not_judged,
                time.perf_counter() - t0,
                message,
                repro,
            )
        )
    return verdicts


# ---------------------------------------------------------------------------------------
# Stages 2 and 3: sizes and input families, against the reference
# ---------------------------------------------------------------------------------------


def _reference(target: Target, case: AttentionCase) -> tuple[F64, F64, F64, F64, Any]:
    """The reference output and lse for ``target`` on ``case``, the bounds on the
    target's distance from them (its own bound plus the reference's), and the empirical
    bound (None for float64)."""
    import attnspec
    from attnspec.spec.tolerances import attention as atol

    if target.dtype == "float64":
        ref, ref_lse = attnspec.sdpa(case.q, case.k, case.v, return_lse=True, **case.kwargs)
        ob, lb = _kernel_bound(target, case, "exact")
        from attnspec.spec.properties.attention import _weighted_up

        w, vmax = _weighted_up(case)
        allowed = ob + atol.accurate_sdpa_bound(w, vmax)
        lse_allowed = lb + 2 * atol.U * np.abs(ref_lse) * atol.SECOND_ORDER + atol.ETA
        return ref, ref_lse, allowed, lse_allowed, None
    from attnspec.spec.tolerances.precision import empirical_bound

    ref, ref_lse = attnspec.sdpa(
        case.q, case.k, case.v, precision="fast", return_lse=True, **case.kwargs
    )
    allowed, lse_allowed = _kernel_bound(target, case, "fast")
    emp, _ = empirical_bound(
        case.q, case.k, case.v, dtype=target.dtype, accumulate=target.accumulate, **case.kwargs
    )
    return ref, ref_lse, allowed, lse_allowed, emp


def judge(target: Target, case: AttentionCase, convention: str = "canonical") -> dict[str, Any]:
    """``target`` on ``case`` against the reference (module docstring, stage 2);
    AssertionError with the worst entry where it errs beyond its bound (or leaks NaN or
    inf where the reference is finite); else the figures: ``worst`` (error / bound),
    ``empirical``, ``not_judged``. Under a ``convention`` whose rows that see no key
    return the mean of V (:class:`ConventionRules`), such rows are judged by that rule."""
    out, lse = target.call(case, lse=True)
    ref, ref_lse, allowed, lse_allowed, emp = _reference(target, case)
    blind_lse = 0
    rules = _rules(convention)
    nonfinite = not all(bool(np.isfinite(x).all()) for x in (case.q, case.k, case.v))
    if not rules.poison and nonfinite:
        # NaN in the inputs (the visible_nan family) reaches a row that sees no key through
        # 0 * NaN where the convention says hidden values leak: those rows are not judged
        blind = np.broadcast_to(blind_rows(case)[..., None], out.shape)
        out = np.where(blind, ref, out)
        blind_lse = int(blind.sum())
    if rules.blind_rows == "mean of V":
        blind = blind_rows(case)
        if blind.any():
            # the definition's problem with all logits equal: weights 1/S, the mean of V
            flat = AttentionCase(np.zeros_like(case.q), case.k, case.v, {})
            fref, _, fallowed, _, femp = _reference(target, flat)
            ref = np.where(blind[..., None], fref, ref)
            allowed = np.where(blind[..., None], fallowed, np.broadcast_to(allowed, ref.shape))
            if emp is not None:
                emp = np.where(blind[..., None], femp, np.broadcast_to(emp, ref.shape))
            if lse is not None:  # the fill's lse: not judged
                lse = np.where(blind, 0.0, lse)
                ref_lse = np.where(blind, 0.0, ref_lse)
                blind_lse += int(blind.sum())
    result: dict[str, Any] = {"worst": 0.0, "empirical": None, "not_judged": blind_lse}
    for what, got, want, tol in (("output", out, ref, allowed), ("lse", lse, ref_lse, lse_allowed)):
        if got is None:
            continue
        tol = np.broadcast_to(np.asarray(tol, dtype=np.float64), want.shape)
        tol = np.where(np.isfinite(want), tol, 0.0)  # a non-finite reference: matched exactly
        with np.errstate(invalid="ignore"):
            both = (got == want) | (np.isnan(got) & np.isnan(want))
            diff = np.where(both, 0.0, np.abs(got - want))
            diff = np.where(np.isnan(diff), np.inf, diff)
        st = _Stats()
        st.add(diff, tol)
        result["not_judged"] += st.not_judged
        result["worst"] = max(result["worst"], st.worst)
        leak = ~np.isfinite(got) & np.isfinite(want)
        bad = leak | (np.isfinite(tol) & (diff > tol))
        if what == "output" and emp is not None:
            with np.errstate(divide="ignore", invalid="ignore"):
                r = np.where(diff == 0, 0.0, diff / np.broadcast_to(emp, diff.shape))
            result["empirical"] = float(np.nanmax(r)) if r.size else 0.0
        if bad.any():
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = np.where(bad, np.where(tol > 0, diff / tol, np.inf), -1.0)
            ratio = np.where(np.isnan(ratio), np.inf, ratio)
            at = tuple(int(i) for i in np.unravel_index(int(np.argmax(ratio)), ratio.shape))
            raise AssertionError(
                f"{what} at {at} is {float(got[at])!r}, reference {float(want[at])!r}: error "
                f"{float(diff[at]):.3g} = {float(ratio[at]):.3g} times the derived bound "
                f"{float(tol[at]):.3g}" + (" (the reference is finite there)" if leak[at] else "")
            )
    return result


def _case_label(case: AttentionCase) -> str:
    kw = sorted(k for k in case.kwargs if case.kwargs[k] is not None)
    return f"L={case.n_queries} S={case.n_keys} E={case.q.shape[-1]} {','.join(kw) or 'plain'}"


def _run_cases(
    target: Target,
    stage: str,
    name: str,
    text: str,
    builders: Sequence[tuple[str, str, Callable[[], AttentionCase]]],
    progress: Callable[[str], None],
    convention: str = "canonical",
) -> Verdict:
    t0 = time.perf_counter()
    call = "conformance.judge(target, case" + (
        ")" if convention == "canonical" else f", convention={convention!r})"
    )
    worst, emp, nj, count = 0.0, None, 0, 0
    for label, expr, build in builders:
        progress(f"{stage}/{name}: {label}")
        case = build()
        try:
            res = judge(target, case, convention)
        except FormError:
            continue  # not a form it declared (never sent)
        except AssertionError as exc:
            repro = "\n".join([*_snippet_header(target), f"case = {expr}", call])
            return Verdict(
                stage,
                name,
                text,
                "fail",
                count + 1,
                None,
                emp,
                nj,
                time.perf_counter() - t0,
                f"{_case_label(case)}: {exc}",
                repro,
            )
        except Exception as exc:
            repro = "\n".join([*_snippet_header(target), f"case = {expr}", call])
            return Verdict(
                stage,
                name,
                text,
                "fail",
                count + 1,
                None,
                emp,
                nj,
                time.perf_counter() - t0,
                f"{_case_label(case)}: {target.name} raised {type(exc).__name__}: {exc}",
                repro,
            )
        count += 1
        worst = max(worst, res["worst"])
        nj += res["not_judged"]
        if res["empirical"] is not None:
            emp = max(emp or 0.0, res["empirical"])
    verdict = "pass" if count else "not applicable"
    return Verdict(
        stage,
        name,
        text,
        verdict,
        count,
        worst if count else None,
        emp,
        nj,
        time.perf_counter() - t0,
        "" if count else "no case in a form the target declared",
    )


def _variants(features: frozenset[str]) -> list[int]:
    out = [0]
    if "causal" in features:
        out.append(1)
    if "mask" in features:
        out.append(2)
    if "window" in features:
        out.append(3)
    if features & {"softcap", "alibi", "sinks"}:
        out.append(4)
    if "dropout" in features:
        out.append(5)
    return out


def _run_sizes(
    target: Target,
    seed: int,
    n_sizes: int,
    progress: Callable[[str], None],
    convention: str = "canonical",
) -> list[Verdict]:
    feats = frozenset(target.features)
    dt = target.dtype
    builders = []
    variants = _variants(feats)
    for i, (L, S, E) in enumerate(size_plan(seed, n_sizes)):
        var = variants[i % len(variants)]
        expr = (
            f"conformance.sized_case({L}, {S}, {E}, seed={seed}, dtype={dt!r}, "
            f"features={sorted(feats)!r}, variant={var})"
        )
        builders.append(
            (
                f"L={L} S={S} E={E} v{var}",
                expr,
                (
                    lambda L=L, S=S, E=E, var=var: sized_case(
                        L, S, E, seed=seed, dtype=dt, features=feats, variant=var
                    )
                ),
            )
        )
    return [
        _run_cases(
            target,
            "sizes",
            "tile_boundaries",
            "L, S across tiles of 64/128/256/1024, L != S both ways, odd head dims",
            builders,
            progress,
            convention,
        )
    ]


def _run_families(
    target: Target, seed: int, progress: Callable[[str], None], convention: str = "canonical"
) -> list[Verdict]:
    feats = frozenset(target.features)
    dt = target.dtype
    out = []
    variants = _variants(feats)
    for fam in FAMILIES[1:]:
        builders = []
        for _j, var in enumerate(variants[:2]):
            expr = (
                f"conformance.family_case({fam!r}, seed={seed}, dtype={dt!r}, "
                f"features={sorted(feats)!r}, variant={var})"
            )
            builders.append(
                (
                    f"{fam} v{var}",
                    expr,
                    (
                        lambda fam=fam, var=var: family_case(
                            fam, seed=seed, dtype=dt, features=feats, variant=var
                        )
                    ),
                )
            )
        out.append(
            _run_cases(
                target,
                "families",
                fam,
                f"input family: {fam.replace('_', ' ')}",
                builders,
                progress,
                convention,
            )
        )
    return out


# ---------------------------------------------------------------------------------------
# Stage 4: backward
# ---------------------------------------------------------------------------------------


def _run_backward(
    target: Target,
    n: int,
    seed: int,
    progress: Callable[[str], None],
    rules: ConventionRules | None = None,
    only: frozenset[str] | None = None,
) -> list[Verdict]:
    if "backward" not in target.features:
        return [
            Verdict(
                "backward",
                "gradients",
                "gradient properties and gradients vs the reference",
                "not applicable",
                message="needs ['backward'] (attnspec_backward)",
            )
        ]
    if target.dtype != "float64":
        from attnspec.spec.tolerances import precision

        if not hasattr(precision, "backward_bound"):
            return [
                Verdict(
                    "backward",
                    "gradients",
                    "gradients in low precision",
                    "not judged",
                    message=f"no derived backward bound for {target.dtype} "
                    "(spec/tolerances/precision.py has no backward_bound)",
                )
            ]
    return [
        _backward_vs_reference(target, seed, progress),
        *_backward_battery(target, n, seed, progress, rules, only),
    ]


def _grads(res: Any) -> tuple[Any, ...]:
    if hasattr(res, "dq"):
        return (res.dq, res.dk, res.dv, getattr(res, "dbias", None), getattr(res, "dsinks", None))
    if isinstance(res, tuple | list) and len(res) >= 3:
        r = list(res) + [None] * (5 - len(res))
        return tuple(r[:5])
    raise TargetError(
        f"the backward returned a {type(res).__name__}, expected (dq, dk, dv, dbias, dsinks)"
    )


def _rounded(a: F64, target: Target) -> F64:
    """``a`` rounded to the target's dtype (float32 for a float8 target's wide inputs)."""
    from attnspec.reference.emulate import round_to

    return a if target.dtype == "float64" else round_to(a, target.dtype)


def upstream(target: Target, case: AttentionCase, seed: int) -> tuple[F64, F64 | None]:
    """The ``dout`` (and, with the ``lse`` feature, ``dlse``) of the gradients stage for
    ``case``: standard normal from ``seed`` and L, values of the target's dtype."""
    rng = np.random.default_rng([seed, 7, case.n_queries])
    dout = _rounded(rng.standard_normal((*case.q.shape[:-1], case.v.shape[-1])), target)
    dlse = None
    if "lse" in target.features:
        dlse = _rounded(rng.standard_normal(case.q.shape[:-1]), target)
    return dout, dlse


def _backward_bound(
    target: Target, case: AttentionCase, dout: F64, dlse: F64 | None
) -> dict[str, F64]:
    """The target's bound on each gradient against the exact ones: the textbook float64
    bound, or the derived bound of its dtype (spec/tolerances/precision.py)."""
    from attnspec.spec.tolerances.backward import fast_backward_bound
    from attnspec.spec.tolerances.precision import backward_bound

    if target.dtype == "float64":
        return fast_backward_bound(case.q, case.k, case.v, dout, dlse, **case.kwargs)
    return backward_bound(
        case.q,
        case.k,
        case.v,
        dout,
        dlse=dlse,
        dtype=target.dtype,
        accumulate=target.accumulate,
        logits=target.logits,
        **case.kwargs,
    )


def _backward_vs_reference(target: Target, seed: int, progress: Callable[[str], None]) -> Verdict:
    import attnspec
    from attnspec.spec.tolerances.backward import accurate_backward_bound

    t0 = time.perf_counter()
    feats = frozenset(target.features)
    worst, count = 0.0, 0
    variants = _variants(feats)
    # every variant at least once (the fifth and sixth: dropout and softcap/ALiBi/sinks
    # on small cases)
    sizes = [(1, 1, 64), (65, 63, 59), (129, 130, 72), (64, 64, 104), (17, 70, 16), (40, 9, 8)]
    for i, (L, S, E) in enumerate(sizes[: max(4, len(variants))]):
        var = variants[i % len(variants)]
        progress(f"backward/gradients: L={L} S={S} E={E}")
        case = sized_case(L, S, E, seed=seed, dtype=target.dtype, features=feats, variant=var)
        dout, dlse = upstream(target, case, seed)  # with dlse: a backward may ignore it
        expr = (
            f"conformance.sized_case({L}, {S}, {E}, seed={seed}, dtype={target.dtype!r}, "
            f"features={sorted(feats)!r}, variant={var})"
        )
        try:
            got = _grads(target.call_backward(case, dout, dlse))
            ref = attnspec.sdpa_backward(case.q, case.k, case.v, dout, dlse=dlse, **case.kwargs)
            # the target's bound against the exact gradients, plus the reference's own
            fb = _backward_bound(target, case, dout, dlse)
            ab = accurate_backward_bound(case.q, case.k, case.v, dout, dlse, **case.kwargs)
            for j, name in enumerate(("dq", "dk", "dv", "dbias", "dsinks")):
                want = getattr(ref, name)
                if want is None:
                    continue
                g = got[j]
                if not isinstance(g, np.ndarray) or g.shape != np.shape(want):
                    raise TargetError(
                        f"{name} is {type(g).__name__} of shape {getattr(g, 'shape', None)}, "
                        f"expected {np.shape(want)}"
                    )
                tol = np.asarray(fb[name]) + np.asarray(ab[name])
                d = np.abs(np.asarray(g, dtype=float) - want)
                d = np.where(np.isnan(d), np.inf, d)
                st = _Stats()
                st.add(d, tol)
                worst = max(worst, st.worst)
                if st.worst > 1:
                    raise AssertionError(f"{name} errs by {st.worst:.3g} times its bound")
        except (AssertionError, Exception) as exc:
            repro = "\n".join(
                [
                    *_snippet_header(target),
                    f"case = {expr}",
                    f"dout, dlse = conformance.upstream(target, case, seed={seed})",
                    "import attnspec",
                    "print(target.call_backward(case, dout, dlse))",
                    "print(attnspec.sdpa_backward(case.q, case.k, case.v, dout, dlse=dlse, "
                    "**case.kwargs))",
                ]
            )
            return Verdict(
                "backward",
                "gradients",
                "gradients vs attnspec.sdpa_backward",
                "fail",
                count + 1,
                None,
                None,
                0,
                time.perf_counter() - t0,
                f"L={L} S={S} E={E}: {type(exc).__name__}: {exc}",
                repro,
            )
        count += 1
    return Verdict(
        "backward",
        "gradients",
        "gradients vs attnspec.sdpa_backward (fast + accurate bounds)",
        "pass",
        count,
        worst,
        None,
        0,
        time.perf_counter() - t0,
    )


def _rounding_cases(cases: Callable[[Any], Any], target: Target) -> Callable[[Any], Any]:
    """The backward cases of ``cases`` with every input a value of the target's dtype
    (q, k, v, dout, dlse; bias, sinks and ALiBi slopes too, float32 for float8), those
    that overflow it left out: the exact gradients are those of what the target gets."""
    from attnspec.spec.strategies.backward import BackwardCase

    wide = "float32" if target.dtype.startswith("float8") else target.dtype

    def rnd(a: Any, dtype: str) -> Any:
        from attnspec.reference.emulate import round_to

        a = np.asarray(a, dtype=np.float64)
        r = round_to(a, dtype)
        if (np.isfinite(a) & ~np.isfinite(r)).any():
            raise OverflowError
        return r

    def one(d: Any) -> Any:
        if isinstance(d, BackwardCase):
            c = d.case
            kw = dict(c.kwargs)
            for name in ("bias", "sinks", "alibi_slopes"):
                if kw.get(name) is not None:
                    kw[name] = rnd(kw[name], wide)
            dt = target.dtype
            case = AttentionCase(rnd(c.q, dt), rnd(c.k, dt), rnd(c.v, dt), kw)
            dlse = None if d.dlse is None else rnd(d.dlse, target.dtype)
            return BackwardCase(case, rnd(d.dout, target.dtype), dlse)
        if isinstance(d, tuple):
            return tuple(one(x) for x in d)
        return d

    def safe(d: Any) -> Any:
        try:
            return one(d)
        except OverflowError:
            return None

    return lambda impl: cases(impl).map(safe).filter(lambda d: d is not None)


def _kernel_form_cases(cases: Callable[[Any], Any], target: Target) -> Callable[[Any], Any]:
    """The backward cases of ``cases`` rewritten to the form the target takes (as
    :func:`~attnspec.spec.strategies.kernel.kernel_cases` does for the forward: 4-D, full
    shapes; ``dout`` and ``dlse`` broadcast with them), those that cannot be left out:
    most drawn cases have a batch or mask shape a kernel never takes, and rejecting them
    one by one in the properties cost seconds per check."""
    from attnspec.spec.strategies.backward import BackwardCase

    def one(d: Any) -> Any:
        if isinstance(d, tuple):
            parts = tuple(one(x) for x in d)
            return None if any(p is None for p in parts) else parts
        if not isinstance(d, BackwardCase):
            return d
        try:
            f = full_form(d.case, target.forms)
        except FormError:
            return None
        if len(f.vs) != 1 or f.vs[0].shape[-1] != d.v.shape[-1]:
            return None
        kw = d.case.kwargs
        same = (
            f.q.shape == d.q.shape
            and f.k.shape == d.k.shape
            and f.vs[0].shape == d.v.shape
            and all(np.shape(f.kwargs.get(n, kw[n])) == np.shape(kw[n]) for n in kw)
        )
        if same:
            return d
        if "broadcast" in target.forms:
            return None  # a target of every form takes the drawn shapes or none
        case = AttentionCase(f.q, f.k, f.vs[0], f.kwargs)
        out = (*f.q.shape[:-1], f.vs[0].shape[-1])
        try:  # the batch axes flattened into one, as full_form does
            dout = np.reshape(d.dout, out)
            dlse = None if d.dlse is None else np.reshape(d.dlse, out[:-1])
        except ValueError:
            return None
        return BackwardCase(case, dout.copy(), None if dlse is None else dlse.copy())

    return lambda impl: cases(impl).map(one).filter(lambda d: d is not None)


def _finite_cases(cases: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """The backward cases of ``cases`` whose inputs are all finite (no poison)."""
    from attnspec.spec.strategies.backward import BackwardCase

    def finite(d: Any) -> bool:
        if isinstance(d, tuple):
            return all(finite(x) for x in d)
        if not isinstance(d, BackwardCase):
            return True
        arrays = [d.q, d.k, d.v, d.dout, d.kwargs.get("bias", 0.0)]
        return all(bool(np.isfinite(np.asarray(a, dtype=np.float64)).all()) for a in arrays)

    return lambda impl: cases(impl).filter(finite)


def _backward_battery(
    target: Target,
    n: int,
    seed: int,
    progress: Callable[[str], None],
    rules: ConventionRules | None = None,
    only: frozenset[str] | None = None,
) -> list[Verdict]:
    from hypothesis import settings

    from attnspec.spec.battery import run_battery
    from attnspec.spec.properties.backward import BATTERY as BWD
    from attnspec.spec.properties.backward import BackwardImpl
    from attnspec.spec.strategies.backward import BACKWARD_FEATURES

    def fn(q: Any, k: Any, v: Any, **kw: Any) -> Any:
        from hypothesis import reject

        lse = bool(kw.pop("return_lse", False))
        try:
            out, ls = target.call(
                AttentionCase(np.asarray(q, float), np.asarray(k, float), np.asarray(v, float), kw),
                lse=lse,
            )
        except FormError:
            reject()
        return (out, ls) if lse else out

    def back(q: Any, k: Any, v: Any, dout: Any, **kw: Any) -> Any:
        from hypothesis import reject

        dlse = kw.pop("dlse", None)
        case = AttentionCase(np.asarray(q, float), np.asarray(k, float), np.asarray(v, float), kw)
        if dlse is not None and "lse" not in target.features:
            reject()
        try:
            f = full_form(case, target.forms)
            if (
                f.q.shape != np.shape(q)
                or f.k.shape != np.shape(k)
                or any(x.shape != np.shape(v) for x in f.vs)
                or any(np.shape(f.kwargs.get(n_)) != np.shape(kw[n_]) for n_ in kw)  # type: ignore[arg-type]
            ):
                reject()  # the gradients of a rewritten form are not the case's
            return target.call_backward(case, np.asarray(dout, float), dlse)
        except FormError:
            reject()

    feats = frozenset(target.features) & set(BACKWARD_FEATURES)
    impl = BackwardImpl(name=target.name, fn=fn, backward=back, features=feats, accuracy="fast")
    progress("backward/battery")
    base = settings(max_examples=max(1, n // 2), deadline=None, database=None, print_blob=False)
    out = []
    # the softmax family's gradient claims need a family implementation, not a kernel
    checks = [c for c in BWD if "family" not in c.needs]
    rules = rules or ConventionRules("canonical")
    checks = [replace(c, cases=_kernel_form_cases(c.cases, target)) for c in checks]
    if target.dtype != "float64":
        checks = [replace(c, cases=_rounding_cases(c.cases, target)) for c in checks]
    excused: dict[str, str] = {}
    if not rules.poison:  # no NaN or inf behind masks where the convention says it leaks
        checks = [replace(c, cases=_finite_cases(c.cases)) for c in checks]
        excused["hidden_gradients"] = rules.excused.get("hidden_values", rules.name)
    checks = [c for c in checks if c.name not in excused]
    if only is not None:
        checks = [c for c in checks if c.name in only or f"backward/{c.name}" in only]
    with _shrink_limit(), _kernel_bounds(target):
        results = run_battery(impl, base, checks, seed=seed)
    for name, why in excused.items():
        out.append(
            Verdict(
                "backward",
                name,
                next(c.description for c in BWD if c.name == name),
                "not applicable",
                message=f"not promised by the convention: {why}",
            )
        )
    for r in results:
        if not r.applicable:
            out.append(
                Verdict("backward", r.name, r.description, "not applicable", message=r.message)
            )
        elif "Unsatisfiable" in r.message:
            out.append(
                Verdict(
                    "backward",
                    r.name,
                    r.description,
                    "not applicable",
                    seconds=r.seconds,
                    message="no drawn example in the forms the target declared",
                )
            )
        else:
            out.append(
                Verdict(
                    "backward",
                    r.name,
                    r.description,
                    "pass" if r.passed else "fail",
                    r.examples,
                    None,
                    None,
                    0,
                    r.seconds,
                    r.message,
                )
            )
    return out


# ---------------------------------------------------------------------------------------
# Running it
# ---------------------------------------------------------------------------------------


def run(
    target: Target,
    *,
    examples: int = 6,
    seed: int = 0,
    strict: bool = False,
    convention: str = "canonical",
    stages: Sequence[str] = STAGES,
    sizes: int = 8,
    progress: TextIO | None = None,
    only: Sequence[str] | None = None,
) -> Report:
    """Check ``target`` (module docstring); ``examples`` Hypothesis examples per property,
    ``sizes`` cases in the sizes stage; ``progress`` gets one line per step; ``only``
    keeps the checks it names (``name`` or ``stage/name``; None: all of them)."""
    chosen = None if only is None else frozenset(only)
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    rules = _rules(convention)

    def say(msg: str) -> None:
        if progress is not None:
            print(f"[{target.name}] {msg}", file=progress, flush=True)

    t0 = time.perf_counter()
    rep = Report(
        target.name,
        target.dtype,
        target.accumulate,
        convention,
        strict,
        seed,
        examples,
        sorted(target.features),
        sorted(target.forms),
        note=target.note,
    )
    with np.errstate(all="ignore"):
        if "properties" in stages:
            rep.verdicts += _run_properties(target, examples, seed, strict, rules, say, chosen)
        if "sizes" in stages:
            rep.verdicts += _run_sizes(target, seed, sizes, say, convention)
        if "families" in stages:
            rep.verdicts += _run_families(target, seed, say, convention)
        if "backward" in stages:
            rep.verdicts += _run_backward(target, examples, seed, say, rules, chosen)
    if chosen is not None:
        rep.verdicts = [
            v for v in rep.verdicts if v.name in chosen or f"{v.stage}/{v.name}" in chosen
        ]
    rep.seconds = time.perf_counter() - t0
    return rep


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``attnspec check``."""
    p.add_argument("target", metavar="TARGET", help="torch, jax, attnspec or module:function")
    p.add_argument("--features", help=f"comma-separated subset of {', '.join(KERNEL_FEATURES)}")
    p.add_argument(
        "--dtype", default="float64", choices=DTYPES, help="the precision the target works in"
    )
    p.add_argument(
        "--accumulate",
        choices=("float64", "float32", "float16", "bfloat16"),
        help="its accumulation dtype (default float32)",
    )
    p.add_argument(
        "--convention",
        default="canonical",
        choices=CONVENTIONS,
        help="judge against this peer's promises",
    )
    p.add_argument(
        "--examples", type=int, default=6, help="Hypothesis examples per property (default 6)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--strict", action="store_true", help="bitwise equality at hidden positions")
    p.add_argument("--json", metavar="PATH", help="write the report as JSON")
    p.add_argument("--device", default="cpu", help="torch device (cpu or cuda)")
    p.add_argument(
        "--backend",
        choices=("math", "flash", "efficient", "cudnn", "flex"),
        help="torch SDPA backend (default: every one that runs)",
    )
    p.add_argument(
        "--stages", default=",".join(STAGES), help=f"comma-separated subset of {', '.join(STAGES)}"
    )
    p.add_argument(
        "--only",
        metavar="CHECKS",
        help="comma-separated checks to run (name or stage/name, as in the report); default all",
    )


def check_command(
    args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """``attnspec check`` on parsed arguments: print the reports, write the JSON; the exit
    status (0 conforms, 1 a property failed, 2 bad usage)."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    if args.examples < 1:
        print(f"attnspec check: --examples must be >= 1, got {args.examples}", file=err)
        return 2
    stages = [s for s in args.stages.split(",") if s]
    if set(stages) - set(STAGES):
        print(
            f"attnspec check: --stages: unknown {sorted(set(stages) - set(STAGES))}; "
            f"choose from {STAGES}",
            file=err,
        )
        return 2
    feats = None if args.features is None else [f for f in args.features.split(",") if f]
    try:
        targets = load_target(
            args.target,
            dtype=args.dtype,
            accumulate=args.accumulate,
            device=args.device,
            backend=args.backend,
            features=feats,
        )
    except (ValueError, ImportError, RuntimeError) as exc:
        print(f"attnspec check: {exc}", file=err)
        return 2
    only_text = getattr(args, "only", None)
    only = None if only_text is None else [c for c in only_text.split(",") if c]
    reports = []
    for i, t in enumerate(targets):
        _TARGET_INDEX[t.name] = i
        rep = run(
            t,
            examples=args.examples,
            seed=args.seed,
            strict=args.strict,
            convention=args.convention,
            stages=stages,
            progress=err,
            only=only,
        )
        if only is not None and not rep.verdicts:
            print(f"attnspec check: --only {args.only!r} names no check of {stages}", file=err)
            return 2
        print(rep.text(), file=out, flush=True)
        reports.append(rep)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(
                {
                    "conforms": all(not r.failed for r in reports),
                    "reports": [r.as_dict() for r in reports],
                },
                fh,
                indent=1,
            )
    return 1 if any(r.failed for r in reports) else 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m attnspec.spec.conformance TARGET ...`` (the same as ``attnspec check``)."""
    p = argparse.ArgumentParser(
        prog="attnspec check", description="Check an attention kernel against the specification."
    )
    add_arguments(p)
    return check_command(p.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
