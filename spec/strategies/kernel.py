r"""Attention problems in the forms a kernel takes, for ``attnspec check``.

A kernel is not :func:`attnspec.sdpa`: it takes full 4-D ``(B, H, L, E)`` arrays in its own
dtype, masks and biases of full shape ``(B, Hq, L, S)``, per-head arguments of shape
``(Hq,)``, :math:`L, S \ge 1` and :math:`E_v = E`. Everything else is an extra *form* it may
declare (:data:`FORMS`):

``broadcast``
    masks, biases and per-head arguments in any shape that broadcasts (0-d ``sinks`` ...);
``two_d``
    2-D ``(L, E)`` single-head inputs;
``empty``
    :math:`L = 0` or :math:`S = 0`;
``ev``
    :math:`E_v \ne E`.

:func:`full_form` rewrites any :class:`~attnspec.spec.strategies.attention.AttentionCase`
into the kernel form, exactly (broadcasting is exact; :math:`E_v \ne E` is sent as several
calls with :math:`E_v = E`, since each output column depends only on its own column of
:math:`V`), or says why it cannot (a batched per-head argument that differs along the
batch, an empty sequence). :func:`kernel_cases` draws cases already in the kernel form, with
:math:`q, k, v` values of the kernel's dtype. :func:`sized_case` and :func:`family_case`
build the deterministic cases of the sizes and input-family stages (sizes that cross tile
boundaries, inputs beyond Gaussians) from a seed, so that a reproduction is one line.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from hypothesis import strategies as st

from attnspec.reference.emulate import round_to
from attnspec.spec.strategies.attention import (
    FEATURES,
    AttentionCase,
    attention_cases,
    case_visibility,
)

__all__ = [
    "FAMILIES",
    "FORMS",
    "HEAD_DIMS",
    "SEQ_LENGTHS",
    "FormError",
    "KernelForm",
    "blind_rows",
    "family_case",
    "full_form",
    "kernel_cases",
    "representable",
    "size_plan",
    "sized_case",
    "visible_keys",
]

F64 = npt.NDArray[np.float64]

#: the extra input forms a kernel may declare (the default form is always sent)
FORMS = ("broadcast", "two_d", "empty", "ev")
#: sequence lengths of the sizes stage: tile boundaries of 64, 128, 256 and 1024
SEQ_LENGTHS = (1, 2, 63, 64, 65, 127, 128, 129, 255, 256, 257, 1023, 1024, 1025)
#: head dimensions of the sizes stage: the odd ones FlashAttention tests (59, 111) and
#: those of real bug reports (72, 104: flash-attention#2896; 256: TransformerEngine#3216)
HEAD_DIMS = (59, 64, 72, 104, 111, 128, 256)
#: the input families beyond Gaussians (see :func:`family_case`)
FAMILIES = (
    "gaussian",
    "outlier_channels",
    "large_norms",
    "low_rank",
    "near_duplicate_keys",
    "negative_rows",
    "logit_offset",
    "visible_nan",
)


class FormError(ValueError):
    """A case that cannot be sent in the forms a kernel declared (the message says why)."""


@dataclass(frozen=True)
class KernelForm:
    """A case rewritten in the kernel form, and how to map results back.

    ``calls`` holds one ``(v, kwargs)`` per call (several when :math:`E_v \ne E`: the
    columns of V in chunks of E, the last padded with zeros); ``q``, ``k`` are shared.
    :meth:`restore` joins the outputs and reshapes them to the case's output shape.
    """

    q: F64
    k: F64
    vs: tuple[F64, ...]
    kwargs: dict[str, Any]
    out_shape: tuple[int, ...]
    lse_shape: tuple[int, ...]
    ev: int

    def restore(self, outs: list[F64]) -> F64:
        """The outputs of the calls (each ``(B, Hq, L, E)``) as the case's output."""
        joined = np.concatenate(outs, axis=-1)[..., : self.ev]
        return np.asarray(joined.reshape(self.out_shape), dtype=np.float64)

    def restore_lse(self, lse: F64) -> F64:
        return np.asarray(lse, dtype=np.float64).reshape(self.lse_shape)


_PER_HEAD = ("alibi_slopes", "sinks")
_FULL = ("mask", "bias", "dropout_mask")


def _per_head(name: str, a: Any, batch: tuple[int, ...], hq: int) -> F64:
    arr = np.asarray(a)
    try:
        full = np.broadcast_to(arr, (*batch, hq))
    except ValueError:
        msg = f"{name} of shape {arr.shape} does not broadcast to {(*batch, hq)}"
        raise FormError(msg) from None
    flat = full.reshape(-1, hq)
    if flat.shape[0] and not (flat == flat[:1]).all() and not np.isnan(flat).all():
        raise FormError(f"{name} of shape {arr.shape} differs along the batch: no (Hq,) form")
    return np.array(flat[0] if flat.shape[0] else np.zeros(hq), dtype=np.float64)


def _squeezed(a: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """``a`` with every axis along which it is constant (NaN equal to NaN) cut to size 1:
    a broadcast form that broadcasts back to ``a.shape`` exactly."""
    out = np.asarray(a)
    for axis in range(out.ndim):
        if out.shape[axis] > 1:
            first = np.take(out, [0], axis=axis)
            if np.array_equal(
                np.broadcast_to(first, out.shape), out, equal_nan=out.dtype.kind == "f"
            ):
                out = first
    return np.array(out)


def full_form(case: AttentionCase, forms: Iterable[str] = ()) -> KernelForm:
    """``case`` in the kernel form (see the module docstring), keeping the extra
    ``forms`` declared; :class:`FormError` where it has no such form."""
    declared = set(forms)
    q, k, v, kw = case.q, case.k, case.v, dict(case.kwargs)
    full = case.logits_shape
    two_d = len(full) == 2
    if case.n_queries == 0 or case.n_keys == 0 or 0 in full:
        if "empty" not in declared:
            raise FormError(f"empty sequence or batch (logits of shape {full})")
    ev = int(v.shape[-1])
    out_shape = (*full[:-1], ev)
    lse_shape = tuple(full[:-1])
    if two_d and "two_d" in declared:
        logits4 = full
        batch: tuple[int, ...] = ()
    else:
        logits4 = (1, *full) if two_d else full
        batch = tuple(logits4[:-3])
    hq = logits4[-3] if len(logits4) >= 3 else 1
    n_q, n_k = logits4[-2], logits4[-1]
    keep_2d = two_d and "two_d" in declared
    if not keep_2d:
        b = math.prod(batch) if batch else 1
        hkv = int(k.shape[-3]) if k.ndim >= 3 else 1
        q = np.broadcast_to(
            q.reshape(q.shape if q.ndim >= 3 else (1, *q.shape)), (*batch, hq, n_q, q.shape[-1])
        ).reshape(b, hq, n_q, q.shape[-1])
        k = np.broadcast_to(
            k.reshape(k.shape if k.ndim >= 3 else (1, *k.shape)), (*batch, hkv, n_k, k.shape[-1])
        ).reshape(b, hkv, n_k, k.shape[-1])
        v = np.broadcast_to(
            v.reshape(v.shape if v.ndim >= 3 else (1, *v.shape)), (*batch, hkv, n_k, ev)
        ).reshape(b, hkv, n_k, ev)
        if "broadcast" not in declared:
            for name in _FULL:
                if kw.get(name) is not None:
                    a = np.asarray(kw[name])
                    kw[name] = np.broadcast_to(a, logits4).reshape(b, hq, n_q, n_k).copy()
            for name in _PER_HEAD:
                if kw.get(name) is not None:
                    kw[name] = _per_head(name, kw[name], batch, hq)
        elif tuple(logits4) != (b, hq, n_q, n_k):
            # q, k, v lost (or gained) batch axes: the broadcast forms follow them, each
            # axis kept of size 1 where the argument is constant along it
            for name in _FULL:
                if kw.get(name) is not None:
                    a = np.broadcast_to(np.asarray(kw[name]), logits4).reshape(b, hq, n_q, n_k)
                    kw[name] = _squeezed(a)
            for name in _PER_HEAD:
                if kw.get(name) is not None:
                    a = np.broadcast_to(np.asarray(kw[name]), (*batch, hq)).reshape(b, hq)
                    kw[name] = _squeezed(a)
        q, k, v = q.copy(), k.copy(), v.copy()
    e = int(q.shape[-1])
    if ev == e or "ev" in declared:
        vs: tuple[F64, ...] = (v,)
    else:
        chunks = []
        for start in range(0, ev, e):
            part = v[..., start : start + e]
            if part.shape[-1] < e:
                pad = np.zeros((*part.shape[:-1], e - part.shape[-1]))
                part = np.concatenate([part, pad], axis=-1)
            chunks.append(np.ascontiguousarray(part))
        if not chunks:  # Ev = 0: one call on zero values, its output dropped
            chunks.append(np.zeros((*v.shape[:-1], e)))
        vs = tuple(chunks)
    return KernelForm(q, k, vs, kw, out_shape, lse_shape, ev)


def representable(a: Any, dtype: str) -> bool:
    """Whether every finite entry of ``a`` is a value of ``dtype`` (NaN and inf are)."""
    arr = np.asarray(a, dtype=np.float64)
    if dtype == "float64":
        return True
    r = round_to(arr, dtype)
    with np.errstate(invalid="ignore"):
        return bool(((r == arr) | ~np.isfinite(arr)).all())


def _round_case(case: AttentionCase, dtype: str) -> AttentionCase:
    """q, k, v rounded to ``dtype``; the bias, sinks and ALiBi slopes too (to float32 for
    float8, as a target receives them), so that the reference sees what the target gets."""
    if dtype == "float64":
        return case
    q, k, v = (round_to(x, dtype) for x in (case.q, case.k, case.v))
    wide = "float32" if dtype.startswith("float8") else dtype
    kw = dict(case.kwargs)
    for name in ("bias", "sinks", "alibi_slopes"):
        if kw.get(name) is not None:
            kw[name] = round_to(np.asarray(kw[name], dtype=np.float64), wide)
    return AttentionCase(q, k, v, kw)


def _kernel_case(case: AttentionCase, forms: frozenset[str], dtype: str, ev: bool) -> AttentionCase:
    f = full_form(case, forms)
    v = f.vs[0]  # without "ev": the first E columns of V (zero-padded to E)
    return _round_case(AttentionCase(f.q, f.k, v, f.kwargs), dtype)


def kernel_cases(
    *,
    features: Iterable[str] = FEATURES,
    forms: Iterable[str] = (),
    dtype: str = "float64",
    max_side: int = 4,
    max_width: int = 4,
    poison: bool | None = None,
    min_visible: int = 0,
) -> st.SearchStrategy[AttentionCase]:
    """Cases in the kernel form: those of
    :func:`~attnspec.spec.strategies.attention.attention_cases` (shapes, visibility,
    modifiers, hidden NaN/inf) rewritten by :func:`full_form`, :math:`E_v = E` unless
    ``ev`` is declared, q, k, v rounded to ``dtype`` (magnitudes that stay in its range:
    moderate and wide logits for a low precision).

    ``poison`` as in ``attention_cases`` (False for a convention under which NaN behind a
    mask leaks); ``min_visible``: leave out the cases with a query row that sees fewer
    keys (and has no sink), for a convention that gives a row that sees no key another
    output than 0 (2 where a property hides one more key)."""
    feats = frozenset(features) & set(FEATURES)
    declared = frozenset(forms)
    magnitude = None if dtype == "float64" else "moderate"
    if poison and not feats & {"mask", "causal", "window"}:
        poison = None
    base = attention_cases(
        features=feats, max_side=max_side, max_width=max_width, magnitude=magnitude, poison=poison
    )
    if min_visible > 0:
        base = base.filter(lambda c: bool((visible_keys(c) >= min_visible).all()))

    def fit(case: AttentionCase) -> AttentionCase | None:
        try:
            return _kernel_case(case, declared, dtype, "ev" in declared)
        except FormError:
            return None

    fitted: st.SearchStrategy[Any] = base.map(fit).filter(lambda c: c is not None)
    return fitted


def visible_keys(case: AttentionCase) -> npt.NDArray[np.int64]:
    """How many keys each query row of ``case`` sees (shape ``q.shape[:-1]``; the sink
    counts as one): by mask, causal, window and a bias of -inf, whatever q.k holds."""
    seen = case_visibility(case).sum(axis=-1)
    if case.kwargs.get("sinks") is not None:
        seen = seen + 1
    return np.broadcast_to(seen, case.q.shape[:-1]).astype(np.int64)


def blind_rows(case: AttentionCase) -> npt.NDArray[np.bool_]:
    """The query rows of ``case`` (shape ``q.shape[:-1]``) that see no key and have no
    sink: their output is 0 by the definition, the mean of V under a finite mask fill."""
    return np.asarray(visible_keys(case) == 0)


# ---------------------------------------------------------------------------------------
# The sizes and input-family stages: deterministic cases from a seed
# ---------------------------------------------------------------------------------------


def size_plan(seed: int, n: int = 8) -> list[tuple[int, int, int]]:
    """``n`` (L, S, E) triples for the sizes stage, drawn with ``seed``: always one with
    L = S = 1, one past 1024 keys, L > S and L < S, every group of :data:`SEQ_LENGTHS`
    (1-2, 63-65, 127-129, 255-257, 1023-1025) and several :data:`HEAD_DIMS`."""
    rng = np.random.default_rng(seed)
    groups = [(1, 2), (63, 64, 65), (127, 128, 129), (255, 256, 257), (1023, 1024, 1025)]
    dims = list(HEAD_DIMS)
    rng.shuffle(dims)
    plan = [(1, 1, int(dims[0]))]
    # the first seven: L > S and L < S, every group, past 1024 keys and past 1024 queries
    picks = [(1, 2), (0, 4), (2, 1), (1, 3), (4, 0), (3, 2), (2, 3), (0, 1), (4, 4), (3, 3)]
    for i, (gl, gs) in enumerate(picks[: max(0, n - 1)]):
        L = int(rng.choice(groups[gl]))
        S = int(rng.choice(groups[gs]))
        e = int(dims[(i + 1) % len(dims)])
        if L * S * e > 1025 * 1025 * 64:  # keep the largest within a few seconds
            e = 64
        plan.append((L, S, e))
    return plan


def _rounded(a: F64, dtype: str) -> F64:
    return round_to(a, dtype) if dtype != "float64" else a


def _shapes(features: frozenset[str], n_q: int, n_k: int) -> tuple[int, int, int]:
    """(B, Hq, Hkv): GQA 6 (beyond the families' L x S: 4) query heads on 2 kv heads
    where declared; two batches up to the families' L x S (a batch stride bug shows),
    one beyond (time)."""
    small = n_q * n_k <= 96 * 80
    b = 2 if small else 1
    if "gqa" not in features:
        return (b, 2, 2)
    # G = 3 != Hkv: h // G, h % Hkv and h // Hkv all differ (with G = Hkv = 2 the last
    # two agree)
    return (b, 6, 2) if small else (b, 4, 2)


def _modifiers(
    rng: np.random.Generator,
    features: frozenset[str],
    b: int,
    hq: int,
    L: int,
    S: int,
    variant: int,
) -> dict[str, Any]:
    """The modifiers of variant ``variant`` (0: none, 1: causal, 2: mask and bias,
    3: window, 4: softcap, ALiBi and sinks, 5: dropout) among the declared ``features``."""
    kw: dict[str, Any] = {}
    if variant == 1 and "causal" in features:
        kw["causal"] = True
        if L != S:
            kw["align"] = "bottom_right" if rng.integers(2) else "top_left"
    if variant == 2 and "mask" in features:
        m = rng.random((b, hq, L, S)) > 0.2
        m[..., int(rng.integers(L)), :] = False  # a row that sees nothing
        kw["mask"] = m
        bias = rng.standard_normal((b, hq, L, S))
        kw["bias"] = bias
    if variant == 3 and "window" in features:
        kw["window"] = (int(rng.integers(0, 70)), int(rng.integers(0, 3)))
        if L != S:
            kw["align"] = "bottom_right"
    if variant == 4:
        if "softcap" in features:
            kw["softcap"] = 20.0
        if "alibi" in features:
            kw["alibi_slopes"] = np.array([2.0 ** -(h + 1) for h in range(hq)])
            if "causal" in features:
                kw["causal"] = True
                if L != S:
                    kw["align"] = "bottom_right"
        if "sinks" in features:
            kw["sinks"] = rng.standard_normal(hq)
    if variant == 5 and "dropout" in features:
        kw["dropout_p"] = 0.25
        kw["dropout_mask"] = rng.random((b, hq, L, S)) > 0.25
    return kw


def sized_case(
    L: int,
    S: int,
    E: int,
    *,
    seed: int,
    dtype: str = "float64",
    features: Iterable[str] = (),
    variant: int = 0,
    family: str = "gaussian",
) -> AttentionCase:
    """A Gaussian (or ``family``) problem of ``L`` queries, ``S`` keys, head dim ``E``,
    in the kernel form, q, k, v values of ``dtype``; ``variant`` picks the modifiers
    among ``features`` (0: none, 1: causal, 2: mask with an empty row and a bias,
    3: window, 4: softcap, ALiBi, sinks, 5: dropout); the bias and sinks are values of
    ``dtype`` too (float32 for float8), as a target receives them."""
    feats = frozenset(features)
    rng = np.random.default_rng([seed, L, S, E, variant, FAMILIES.index(family)])
    b, hq, hkv = _shapes(feats, L, S)
    q = rng.standard_normal((b, hq, L, E))
    k = rng.standard_normal((b, hkv, S, E))
    v = rng.standard_normal((b, hkv, S, E))
    kw = _modifiers(rng, feats, b, hq, L, S, variant)
    wide = "float32" if dtype.startswith("float8") else dtype  # as the target gets them
    for name in ("bias", "sinks"):
        if name in kw:
            kw[name] = _rounded(kw[name], wide)
    q, k, v, extra = _family(rng, family, q, k, v, dtype)
    kw.update(extra)
    case = AttentionCase(_rounded(q, dtype), _rounded(k, dtype), _rounded(v, dtype), kw)
    return _visible_nan(rng, case) if family == "visible_nan" else case


def _visible_nan(rng: np.random.Generator, case: AttentionCase) -> AttentionCase:
    """``case`` with NaN where every row sees it: one entry of V (last kv head) and one
    of K (first kv head) at keys that every row that sees a key sees, one entry of q in
    such a row of the first head. By the definition
    the rows that see them are NaN (the whole row for q and K, the column for V), and no
    leak through a hidden position is needed to get there."""
    seen = case_visibility(case)
    rows = np.asarray(seen.any(axis=-1))
    every = np.asarray(np.all(seen | ~rows[..., None], axis=tuple(range(seen.ndim - 1))))
    keys = np.flatnonzero(every) if rows.any() else np.zeros(0, dtype=np.int64)
    q, k, v = case.q.copy(), case.k.copy(), case.v.copy()
    if keys.size:
        j = int(rng.choice(keys))
        v[0, -1, j, int(rng.integers(v.shape[-1]))] = np.nan  # the last kv head's heads
        if keys.size > 1:
            k[0, 0, int(rng.choice(keys[keys != j])), int(rng.integers(k.shape[-1]))] = np.nan
    i = np.flatnonzero(np.broadcast_to(rows, q.shape[:-1])[0, 0])
    if i.size:
        q[0, 0, int(rng.choice(i)), int(rng.integers(q.shape[-1]))] = np.nan
    return AttentionCase(q, k, v, case.kwargs)


def _family(
    rng: np.random.Generator, family: str, q: F64, k: F64, v: F64, dtype: str
) -> tuple[F64, F64, F64, dict[str, Any]]:
    """The inputs of ``family`` built from the Gaussian ``q, k, v``."""
    e = q.shape[-1]
    extra: dict[str, Any] = {}
    big = 8.0 if dtype in ("float8_e4m3fn", "float8_e5m2", "float16") else 30.0
    if family == "outlier_channels":  # a few channels 30x larger (LLM activations)
        ch = rng.choice(e, size=max(1, e // 32), replace=False)
        q[..., ch] *= big
        k[..., ch] *= big
        v[..., ch] *= big
    elif family == "large_norms":  # logits tens apart: weights far from uniform
        q *= 4.0
        k *= 4.0
        v *= 100.0
    elif family == "low_rank":  # q and k of rank 2: many equal logits
        basis = rng.standard_normal((2, e))
        q = rng.standard_normal((*q.shape[:-1], 2)) @ basis
        k = rng.standard_normal((*k.shape[:-1], 2)) @ basis
    elif family == "near_duplicate_keys":  # every key one key plus noise of 1e-3
        k = k[..., :1, :] + 1e-3 * k
    elif family == "negative_rows":  # rows whose logits are all near -160
        # q - b u and k + a u for a unit vector u: every logit gets -tau a b = -160 (and
        # noise of a few units), where exp underflows float32 and float16 unless the row
        # maximum is subtracted (an online kernel whose running maximum starts at 0 fails)
        u = rng.standard_normal(e)
        u = u / float(np.linalg.norm(u))
        ab = 160.0 * math.sqrt(e)
        q = q - math.sqrt(ab) * u
        k = k + math.sqrt(ab) * u
    elif family == "logit_offset":  # a shared offset in every logit of a row
        root = 16.0
        q[..., 0] = root
        k[..., 0] = root
        extra["scale"] = 1.0 / math.sqrt(e)
    elif family not in ("gaussian", "visible_nan"):
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    return q, k, v, extra


def family_case(
    family: str,
    *,
    seed: int,
    dtype: str = "float64",
    features: Iterable[str] = (),
    L: int = 96,
    S: int = 80,
    E: int = 64,
    variant: int = 0,
) -> AttentionCase:
    """A problem of the input family ``family`` (:data:`FAMILIES`): outlier channels,
    large norms, low rank, near-duplicate keys, strongly negative rows, logit offsets,
    NaN at visible positions (which must reach the rows that see them)."""
    return sized_case(
        L, S, E, seed=seed, dtype=dtype, features=features, variant=variant, family=family
    )


#: the cases of a stage: (label, builder of the case)
StageCases = list[tuple[str, Callable[[], AttentionCase]]]
