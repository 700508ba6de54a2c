"""The peers' conventions (spec/conventions.py): well formed, and still true.

Two kinds of test:

* the presets are well formed: unique names, every fact with a source of a known form,
  every measured fact re-measured by a test of this module, and the table in
  ``docs/conventions.md`` equal to the one the presets generate;
* the measured facts still hold: each ``test_<peer>_...`` runs the peer and compares what
  it does with the preset's value. SciPy is a test dependency, so its checks always run;
  torch and jax are optional and their checks are skipped when they are not installed
  (``pytest.importorskip``). The canonical preset is checked against attnspec itself.

The probes below build tiny inputs with a fixed seed and classify what the implementation
returns ("top-left", "mean of V", "K leaks, V blocked", ...), so that the preset's value is
compared with an observation, not with a number. The comparisons use numpy's default
``allclose`` tolerances only to tell apart outcomes that differ by O(1) (a top-left
versus a bottom-right causal mask, a zero row versus the mean of V); no rounding-level
claim rests on them.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.special

import attnspec
from attnspec.spec import conventions as conv
from attnspec.spec.conventions import FACT_ROWS, HEADER_FIELDS, PRESETS, Fact

DOCS = Path(__file__).resolve().parents[1] / "docs" / "conventions.md"
BEGIN = "<!-- BEGIN GENERATED: spec.conventions.markdown_table() -->"
END = "<!-- END GENERATED -->"

ALL_FACTS = [(name, field) for name in PRESETS for field, _ in FACT_ROWS]

# An attention implementation as the probes see it: numpy (H, L, E), (Hkv, S, E), (Hkv, S, Ev)
# in, numpy (H, L, Ev) out; ``mask`` is bool (L, S) with True = may attend.
Attention = Callable[..., np.ndarray]


# ---------------------------------------------------------------------------------------------
# The presets are well formed
# ---------------------------------------------------------------------------------------------


def test_preset_names_are_unique_and_match_their_keys() -> None:
    names = [c.name for c in PRESETS.values()]
    assert len(set(names)) == len(names)
    assert all(key == c.name for key, c in PRESETS.items())
    assert {"attnspec", "torch", "jax", "flash", "xformers", "scipy"} <= set(PRESETS)


def test_convention_fields_are_the_header_and_the_features() -> None:
    fields = tuple(f.name for f in dataclasses.fields(conv.Convention))
    assert fields == HEADER_FIELDS + tuple(name for name, _ in FACT_ROWS)
    assert len({label for _, label in FACT_ROWS}) == len(FACT_ROWS)


@pytest.mark.parametrize(("preset", "field"), ALL_FACTS, ids=[f"{p}.{f}" for p, f in ALL_FACTS])
def test_every_fact_has_a_well_formed_source(preset: str, field: str) -> None:
    fact = getattr(PRESETS[preset], field)
    assert isinstance(fact, Fact)
    assert conv.source_problems(fact) == [], f"{preset}.{field}: {conv.source_problems(fact)}"


def test_every_measured_fact_names_a_test_of_this_module() -> None:
    module = sys.modules[__name__]
    missing = [
        (name, field, test)
        for name, c in PRESETS.items()
        for field, fact in c.facts().items()
        for test in conv.measured_tests(fact)
        if not callable(getattr(module, test, None))
    ]
    assert missing == []
    measured = [f for c in PRESETS.values() for f in c.facts().values() if f.status == "measured"]
    assert measured and all(conv.measured_tests(f) for f in measured)


def test_canonical_preset_cites_only_attnspec() -> None:
    for field, fact in PRESETS["attnspec"].facts().items():
        assert fact.status == "definition", field
        assert all(s.startswith("attnspec: ") for s in fact.sources), field


def test_cited_attnspec_modules_exist() -> None:
    root = Path(__file__).resolve().parents[1]
    cited = {
        s.removeprefix("attnspec: ")
        for c in PRESETS.values()
        for f in c.facts().values()
        for s in f.sources
        if s.startswith("attnspec: ")
    }
    assert cited and all((root / path).is_file() for path in cited), cited


@pytest.mark.parametrize(
    ("fact", "complaint"),
    [
        (Fact("x", ()), "no source"),
        (Fact("x", ("somewhere on the web",)), "is not"),
        (Fact("x", ("someone/else path/file.py (f)",)), "is not"),
        (Fact("x", ("measured: torch 2.13.0 CPU (tests/test_conventions.py::test_a)",)), "needs"),
        (Fact("x", ("pytorch/pytorch a/b.cpp (f)",), "measured"), "needs a 'measured'"),
        (Fact("x", ("pytorch/pytorch a/b.cpp (f)",), "unverified"), "must say"),
        (Fact("x", ("pytorch/pytorch a/b.cpp (f)",), "guessed"), "not in"),
        (Fact("a\nb", ("pytorch/pytorch a/b.cpp (f)",)), "short one-line"),
    ],
    ids=[
        "no-source",
        "free-text",
        "unknown-repo",
        "source-status-without-repo",
        "measured-without-test",
        "unverified-without-note",
        "unknown-status",
        "multiline-value",
    ],
)
def test_source_problems_catches_malformed_facts(fact: Fact, complaint: str) -> None:
    problems = conv.source_problems(fact)
    assert any(complaint in p for p in problems), problems


def test_docs_table_is_generated_from_the_presets() -> None:
    text = DOCS.read_text(encoding="utf-8")
    assert BEGIN in text and END in text, f"{DOCS} lacks the generated-section markers"
    generated = text.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n") + "\n"
    assert generated == conv.markdown_table(), (
        "docs/conventions.md drifted from spec/conventions.py; regenerate the table with "
        "python -c 'from attnspec.spec.conventions import markdown_table as t; print(t())'"
    )


def test_markdown_table_has_one_row_per_feature_and_a_footnote_per_source() -> None:
    table = conv.markdown_table()
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + len(FACT_ROWS)
    assert all(row.count(" | ") == len(PRESETS) for row in rows)
    marks = set(re.findall(r"\[\^(\d+)\](?!:)", table))
    notes = set(re.findall(r"^\[\^(\d+)\]:", table, flags=re.MULTILINE))
    assert marks == notes
    with pytest.raises(KeyError, match="known"):
        conv.get("tensorflow")


# ---------------------------------------------------------------------------------------------
# Probes: classify what an implementation does
# ---------------------------------------------------------------------------------------------


def _qkv(hq: int = 1, hkv: int = 1, n_q: int = 2, n_k: int = 4, e: int = 3, ev: int = 5) -> Any:
    rng = np.random.default_rng(20261125)
    return (
        rng.standard_normal((hq, n_q, e)),
        rng.standard_normal((hkv, n_k, e)),
        rng.standard_normal((hkv, n_k, ev)),
    )


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    """Same outcome? The outcomes told apart here differ by O(1) (a shifted causal diagonal,
    0 versus the mean of V), while a correct float32 softmax is off by ~1e-7 (jax computes it
    in float32 even for float64 input), so an absolute 1e-5 separates them safely."""
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=0.0, atol=1e-5))  # see docstring


def _plain(q: np.ndarray, k: np.ndarray, v: np.ndarray, visible: Any) -> np.ndarray:
    """softmax(q k^T / sqrt(E)) v over the visible keys, in float64 (classification only)."""
    s = np.einsum("hle,hse->hls", q, k) / math.sqrt(q.shape[-1])
    s = np.where(visible, s, -np.inf)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    return np.einsum("hls,hsf->hlf", p / p.sum(axis=-1, keepdims=True), v)


# Each probe takes ``ev``, the value head dimension, because jax requires Ev == E (= 3 here).


def probe_causal_alignment(fn: Attention, ev: int = 5) -> str:
    q, k, v = _qkv(n_q=2, n_k=4, ev=ev)
    out = fn(q, k, v, causal=True)
    ones = np.ones((2, 4), dtype=bool)
    if _close(out, _plain(q, k, v, np.tril(ones))):
        return "top-left"
    if _close(out, _plain(q, k, v, np.tril(ones, 4 - 2))):
        return "bottom-right"
    return "other"


def probe_fully_masked_row(fn: Attention, ev: int = 5) -> str:
    q, k, v = _qkv(n_q=3, n_k=4, ev=ev)
    mask = np.ones((3, 4), dtype=bool)
    mask[0] = False
    row = fn(q, k, v, mask=mask)[0, 0]
    if np.isnan(row).all():
        return "NaN"
    if np.all(row == 0):
        return "0"
    if _close(row, v[0].mean(axis=0)):
        return "mean of V"
    return "other"


def probe_hidden_nan(fn: Attention, ev: int = 5) -> str:
    q, k, v = _qkv(n_q=2, n_k=4, ev=ev)
    mask = np.ones((2, 4), dtype=bool)
    mask[:, 3] = False
    k_nan, v_nan = k.copy(), v.copy()
    k_nan[:, 3] = np.nan
    v_nan[:, 3] = np.nan
    leaks_k = bool(np.isnan(fn(q, k_nan, v, mask=mask)).any())
    leaks_v = bool(np.isnan(fn(q, k, v_nan, mask=mask)).any())
    return f"K {'leaks' if leaks_k else 'blocked'}, V {'leaks' if leaks_v else 'blocked'}"


def probe_gqa(fn: Attention, ev: int = 5) -> str:
    q, k, v = _qkv(hq=4, hkv=2, ev=ev)
    out = fn(q, k, v)
    if _close(out, _plain(q, np.repeat(k, 2, axis=0), np.repeat(v, 2, axis=0), True)):
        return "h // G"
    if _close(out, _plain(q, np.tile(k, (2, 1, 1)), np.tile(v, (2, 1, 1)), True)):
        return "h % Hkv"
    return "other"


def probe_default_scale(fn: Attention, ev: int = 5) -> str:
    q, k, v = _qkv(e=3, ev=ev)
    q = 4.0 * q  # large enough logits that 1/sqrt(E) and, say, 1/E give different outputs
    return "1/sqrt(E)" if _close(fn(q, k, v), _plain(q, k, v, True)) else "other"


def probe_empty_sequences(fn: Attention, ev: int = 5) -> str:
    q, k, v = _qkv(n_q=2, n_k=3, ev=ev)
    no_queries = fn(q[:, :0], k, v)
    no_keys = fn(q, k[:, :0], v[:, :0])
    first = "empty" if no_queries.shape == (1, 0, ev) else "other"
    second = "zeros" if no_keys.shape == (1, 2, ev) and np.all(no_keys == 0) else "other"
    return f"L=0: {first}; S=0: {second}"


# ---------------------------------------------------------------------------------------------
# SciPy (a test dependency: always runs)
# ---------------------------------------------------------------------------------------------

SCIPY = PRESETS["scipy"]


def test_scipy_default_axis() -> None:
    assert SCIPY.softmax_default_axis.value == "None (all axes)"
    x = np.array([[0.0, 1.0], [2.0, 3.0]])
    assert inspect.signature(scipy.special.softmax).parameters["axis"].default is None
    assert scipy.special.softmax(x).sum() == pytest.approx(1.0)  # one slice: the whole array


def test_scipy_posinf() -> None:
    assert SCIPY.softmax_posinf.value == "NaN; log_softmax NaN/-inf; lse +inf"
    x = np.array([np.inf, 1.0])
    with pytest.warns(RuntimeWarning, match="invalid value"):
        assert np.isnan(scipy.special.softmax(x)).all()
    with pytest.warns(RuntimeWarning, match="invalid value"):
        ls = scipy.special.log_softmax(x)
    assert np.isnan(ls[0]) and ls[1] == -np.inf
    assert scipy.special.logsumexp(x) == np.inf


def test_scipy_nan() -> None:
    assert SCIPY.softmax_nan.value == "NaN slice"
    x = np.array([np.nan, 1.0])
    assert np.isnan(scipy.special.softmax(x)).all()
    assert np.isnan(scipy.special.log_softmax(x)).all()
    assert np.isnan(scipy.special.logsumexp(x))


def test_scipy_all_neginf() -> None:
    assert SCIPY.softmax_all_neginf.value == "NaN + RuntimeWarning; lse -inf"
    x = np.array([-np.inf, -np.inf])
    with pytest.warns(RuntimeWarning, match="invalid value"):
        assert np.isnan(scipy.special.softmax(x)).all()
    with pytest.warns(RuntimeWarning, match="invalid value"):
        assert np.isnan(scipy.special.log_softmax(x)).all()
    assert scipy.special.logsumexp(x) == -np.inf
    # b = 0 removes an entry even when it is inf or NaN (noted with this fact).
    assert scipy.special.logsumexp([1.0, np.inf, np.nan], b=[1.0, 0.0, 0.0]) == 1.0


def test_scipy_empty_axis() -> None:
    assert SCIPY.softmax_empty_axis.value == "ValueError; lse -inf"
    for fn in (scipy.special.softmax, scipy.special.log_softmax):
        with pytest.raises(ValueError, match="zero-size array"):
            fn(np.zeros((2, 0)), axis=-1)
    assert scipy.special.logsumexp(np.zeros(0)) == -np.inf
    assert np.all(scipy.special.logsumexp(np.zeros((2, 0)), axis=-1) == -np.inf)


# ---------------------------------------------------------------------------------------------
# attnspec: the canonical preset describes the reference
# ---------------------------------------------------------------------------------------------

CANON = PRESETS["attnspec"]


# The conventions are semantics, not accuracy: the plain float64 arithmetic states them as
# well as the accurate one does, and keeps these checks independent of it.
FAST = {"precision": "fast"}


def _attnspec(q: np.ndarray, k: np.ndarray, v: np.ndarray, **kw: Any) -> np.ndarray:
    return np.asarray(attnspec.sdpa(q, k, v, **FAST, **kw))


def test_attnspec_causal_needs_explicit_alignment() -> None:
    assert CANON.causal_alignment.value == "explicit align= required"
    q, k, v = _qkv(n_q=2, n_k=4)
    with pytest.raises(ValueError, match="align"):
        attnspec.sdpa(q, k, v, causal=True, **FAST)
    for align, expected in (("top_left", "top-left"), ("bottom_right", "bottom-right")):
        assert (
            probe_causal_alignment(lambda *a, align=align, **kw: _attnspec(*a, align=align, **kw))
            == expected
        )


def test_attnspec_probes_match_the_canonical_preset() -> None:
    assert probe_fully_masked_row(_attnspec) == CANON.fully_masked_output.value
    assert probe_hidden_nan(_attnspec) == CANON.hidden_nan.value
    assert probe_gqa(_attnspec) == CANON.gqa.value
    assert probe_default_scale(_attnspec) == CANON.default_scale.value
    q, k, v = _qkv(n_q=3, n_k=4)
    mask = np.ones((3, 4), dtype=bool)
    mask[0] = False
    _, lse = attnspec.sdpa(q, k, v, mask=mask, return_lse=True, **FAST)
    assert CANON.fully_masked_lse.value == "-inf" and lse[0, 0] == -np.inf
    assert CANON.mask_dtypes.value == "bool only"
    with pytest.raises(TypeError, match="mask must be a bool array"):
        attnspec.sdpa(q, k, v, mask=mask.astype(np.float64), **FAST)
    assert CANON.input_dtypes.value == "real float or int; bool, complex refused"
    for bad in (q.astype(bool), q.astype(complex)):
        with pytest.raises(TypeError, match="real numbers"):
            attnspec.sdpa(bad, k, v, **FAST)
    assert CANON.value_head_dim.value == "allowed"
    assert _attnspec(q, k, v).shape == (1, 3, 5)  # E = 3, Ev = 5


def test_attnspec_empty_sequences() -> None:
    assert probe_empty_sequences(_attnspec) + ", lse -inf" == "L=0: empty; S=0: zeros, lse -inf"
    q, k, v = _qkv(n_q=2, n_k=3)
    _, lse = attnspec.sdpa(q, k[:, :0], v[:, :0], return_lse=True, **FAST)
    assert np.all(lse == -np.inf)


def test_attnspec_softmax_special_values() -> None:
    assert CANON.softmax_all_neginf.value == "0; log_softmax -inf; lse -inf"
    x = np.array([-np.inf, -np.inf])
    assert np.all(attnspec.softmax(x, **FAST) == 0)
    assert np.all(attnspec.log_softmax(x, **FAST) == -np.inf)
    assert attnspec.logsumexp(x, **FAST) == -np.inf
    assert CANON.softmax_posinf.value == "1/k on the k +inf entries"
    assert np.array_equal(
        attnspec.softmax(np.array([np.inf, 1.0, np.inf]), **FAST), [0.5, 0.0, 0.5]
    )
    assert CANON.softmax_empty_axis.value == "empty; lse -inf"
    assert attnspec.softmax(np.zeros((2, 0)), **FAST).shape == (2, 0)
    assert np.all(attnspec.logsumexp(np.zeros((2, 0)), **FAST) == -np.inf)
    assert CANON.softmax_nan.value == "NaN slice"
    assert np.isnan(attnspec.softmax(np.array([np.nan, 1.0]), **FAST)).all()


# ---------------------------------------------------------------------------------------------
# PyTorch (optional)
# ---------------------------------------------------------------------------------------------

TORCH = PRESETS["torch"]


@pytest.fixture(scope="module")
def torch() -> Any:
    return pytest.importorskip("torch")


def _torch_sdpa(torch: Any, backend: str | None = None) -> Attention:
    def fn(
        q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: Any = None, causal: bool = False
    ) -> np.ndarray:
        F = torch.nn.functional
        args = [torch.from_numpy(np.ascontiguousarray(a))[None] for a in (q, k, v)]
        m = None if mask is None else torch.from_numpy(mask)
        call = lambda: F.scaled_dot_product_attention(  # noqa: E731
            *args, attn_mask=m, is_causal=causal, enable_gqa=q.shape[0] != k.shape[0]
        )
        if backend is None:
            return call()[0].numpy()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([getattr(SDPBackend, backend)]):
            return call()[0].numpy()

    return fn


# (backend, value head dim): the CPU flash kernel needs Ev == E (= 3 in the probes).
BACKENDS = [("MATH", 5), ("FLASH_ATTENTION", 3)]
BACKEND_IDS = [b for b, _ in BACKENDS]


def test_torch_signature(torch: Any) -> None:
    # A builtin: inspect.signature cannot read it, its docstring's first lines can.
    doc = torch.nn.functional.scaled_dot_product_attention.__doc__
    header = doc.split(")", 1)[0]
    params = set(re.findall(r"(\w+)(?:=[^,]*)?(?:,|$)", header.split("(", 1)[1]))
    expected = {"query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale"}
    assert params == expected | {"enable_gqa"}, params
    # so: no window, softcap, ALiBi or sinks argument
    assert (TORCH.window.value, TORCH.softcap.value, TORCH.sinks.value) == (
        "none (explicit mask)",
        "no",
        "no",
    )
    assert TORCH.alibi.value == "only as a float mask"


def test_torch_default_scale(torch: Any) -> None:
    assert probe_default_scale(_torch_sdpa(torch)) == TORCH.default_scale.value


@pytest.mark.parametrize(("backend", "ev"), BACKENDS, ids=BACKEND_IDS)
def test_torch_causal_alignment(torch: Any, backend: str, ev: int) -> None:
    assert probe_causal_alignment(_torch_sdpa(torch, backend), ev) == TORCH.causal_alignment.value
    from torch.nn.attention.bias import causal_lower_right

    q, k, v = (torch.from_numpy(a)[None] for a in _qkv(n_q=2, n_k=4))
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=causal_lower_right(2, 4)
    )
    expected = _plain(q[0].numpy(), k[0].numpy(), v[0].numpy(), np.tril(np.ones((2, 4), bool), 2))
    assert np.allclose(out[0].numpy(), expected)


@pytest.mark.parametrize(("backend", "ev"), BACKENDS, ids=BACKEND_IDS)
def test_torch_fully_masked_row(torch: Any, backend: str, ev: int) -> None:
    assert TORCH.fully_masked_output.value == "0 (-inf mask); mean of V (finite fill)"
    fn = _torch_sdpa(torch, backend)
    assert probe_fully_masked_row(fn, ev) == "0"

    def finite_fill(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: Any = None) -> np.ndarray:
        bias = np.where(mask, 0.0, np.finfo(np.float64).min)  # the "finfo.min" idiom
        F = torch.nn.functional
        t = [torch.from_numpy(a)[None] for a in (q, k, v)]
        return F.scaled_dot_product_attention(*t, attn_mask=torch.from_numpy(bias))[0].numpy()

    assert probe_fully_masked_row(finite_fill) == "mean of V"


def test_torch_multihead_attention_need_weights_still_nan(torch: Any) -> None:
    # pytorch/pytorch#160064, cited in the note of torch.fully_masked_output.
    assert "#160064" in TORCH.fully_masked_output.note
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(4, 1, batch_first=True).eval()
    x = torch.randn(1, 3, 4)
    hide = torch.zeros(3, 3, dtype=torch.bool)
    hide[0] = True  # MultiheadAttention: True = may NOT attend
    with torch.no_grad():
        out, _ = mha(x, x, x, attn_mask=hide, need_weights=True)
        fast, _ = mha(x, x, x, attn_mask=hide, need_weights=False)
    assert torch.isnan(out[0, 0]).all() and bool((fast[0, 0] == 0).all())


def test_torch_fully_masked_lse(torch: Any) -> None:
    assert TORCH.fully_masked_lse.value == "not public; CPU flash op: 0.0"
    q, k, v = (torch.from_numpy(a)[None].float() for a in _qkv(n_q=3, n_k=4, ev=3))
    bias = torch.zeros(3, 4)
    bias[0] = -math.inf
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=bias)
    assert lse.shape == (1, 1, 3)  # (B, H, L)
    assert lse[0, 0, 0].item() == 0.0 and bool((out[0, 0, 0] == 0).all())
    scaled = (q @ k.transpose(-1, -2)) / math.sqrt(3) + bias
    assert torch.allclose(lse[0, 0, 1:], torch.logsumexp(scaled, dim=-1)[0, 0, 1:])  # natural log
    from torch.nn.attention.flex_attention import AuxRequest, flex_attention

    def hide_first_query(score: Any, b: Any, h: Any, qi: Any, kv: Any) -> Any:
        return torch.where(qi == 0, -math.inf, score)

    with warnings.catch_warnings():
        # Eager flex_attention warns that it is unfused without torch.compile; irrelevant here.
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        _, aux = flex_attention(
            q, k, v, score_mod=hide_first_query, return_aux=AuxRequest(lse=True)
        )
    assert aux.lse is not None and aux.lse[0, 0, 0].item() == -math.inf


@pytest.mark.parametrize(("backend", "ev"), BACKENDS, ids=BACKEND_IDS)
def test_torch_hidden_nan(torch: Any, backend: str, ev: int) -> None:
    assert probe_hidden_nan(_torch_sdpa(torch, backend), ev) == TORCH.hidden_nan.value


def test_torch_gqa(torch: Any) -> None:
    assert TORCH.gqa.value == "h // G (enable_gqa=True)"
    assert probe_gqa(_torch_sdpa(torch)) == "h // G"
    q, k, v = (torch.from_numpy(a)[None] for a in _qkv(hq=4, hkv=2))
    with pytest.raises(RuntimeError, match="size of tensor"):
        torch.nn.functional.scaled_dot_product_attention(q, k, v)  # enable_gqa=False


def test_torch_value_head_dim(torch: Any) -> None:
    assert TORCH.value_head_dim.value == "allowed"
    q, k, v = _qkv(e=3, ev=5)
    assert _torch_sdpa(torch)(q, k, v).shape == (1, 2, 5)


def test_torch_mask_dtypes(torch: Any) -> None:
    assert TORCH.mask_dtypes.value == "bool, float32 or q's dtype"
    q, k, v = (torch.from_numpy(a)[None] for a in _qkv())  # float64
    sdpa = torch.nn.functional.scaled_dot_product_attention
    for dtype in (torch.bool, torch.float32, torch.float64):
        sdpa(q, k, v, attn_mask=torch.zeros(2, 4, dtype=dtype))
    with pytest.raises(RuntimeError, match="attn_mask dtype"):
        sdpa(q, k, v, attn_mask=torch.zeros(2, 4, dtype=torch.int64))


def test_torch_mixed_dtypes(torch: Any) -> None:
    assert TORCH.input_dtypes.value == "q, k, v same dtype"
    q, k, v = (torch.from_numpy(a)[None] for a in _qkv())
    with pytest.raises(RuntimeError, match="same dtype"):
        torch.nn.functional.scaled_dot_product_attention(q.float(), k, v)


def test_torch_empty_sequences(torch: Any) -> None:
    assert probe_empty_sequences(_torch_sdpa(torch)) == TORCH.empty_sequence.value


def test_torch_softmax_special_values(torch: Any) -> None:
    t = torch.tensor
    inf, nan = math.inf, math.nan
    assert TORCH.softmax_default_axis.value == "dim required"
    with pytest.raises(TypeError, match="dim"):
        torch.softmax(t([1.0, 2.0]))
    assert TORCH.softmax_posinf.value == "NaN; logsumexp +inf"
    assert torch.isnan(torch.softmax(t([inf, 1.0]), 0)).all()
    assert torch.logsumexp(t([inf, 1.0]), 0).item() == inf
    assert TORCH.softmax_nan.value == "NaN slice"
    assert torch.isnan(torch.softmax(t([nan, 1.0]), 0)).all()
    assert TORCH.softmax_all_neginf.value == "NaN; log_softmax NaN; lse -inf"
    assert torch.isnan(torch.softmax(t([-inf, -inf]), 0)).all()
    assert torch.isnan(torch.log_softmax(t([-inf, -inf]), 0)).all()
    assert torch.logsumexp(t([-inf, -inf]), 0).item() == -inf
    assert TORCH.softmax_empty_axis.value == "empty; lse -inf"
    assert torch.softmax(torch.zeros(2, 0), -1).shape == (2, 0)
    assert bool((torch.logsumexp(torch.zeros(2, 0), -1) == -inf).all())


# ---------------------------------------------------------------------------------------------
# JAX (optional)
# ---------------------------------------------------------------------------------------------

JAX = PRESETS["jax"]


@pytest.fixture(scope="module")
def jax() -> Any:
    return pytest.importorskip("jax")


def _jax_dpa(jax: Any, dtype: Any = np.float32, **extra: Any) -> Attention:
    """jax.nn.dot_product_attention on (H, L, E) arrays (jax wants (B, L, H, E))."""

    def fn(
        q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: Any = None, causal: bool = False
    ) -> np.ndarray:
        blhe = [np.swapaxes(a, 0, 1)[None].astype(dtype) for a in (q, k, v)]
        m = None if mask is None else np.broadcast_to(mask, (1, 1, *mask.shape))
        out = jax.nn.dot_product_attention(*blhe, mask=m, is_causal=causal, **extra)
        return np.swapaxes(np.asarray(out)[0], 0, 1).astype(np.float64)

    return fn


def test_jax_signature(jax: Any) -> None:
    params = set(inspect.signature(jax.nn.dot_product_attention).parameters)
    assert not params & {"softcap", "alibi_slopes", "sinks", "dropout_p", "dropout_rate"}
    assert {"bias", "mask", "local_window_size", "return_residual"} <= params
    assert (JAX.softcap.value, JAX.sinks.value, JAX.dropout.value, JAX.alibi.value) == (
        "no",
        "no",
        "no",
        "only as bias",
    )
    assert JAX.softmax_default_axis.value == "-1 (logsumexp: None)"
    assert inspect.signature(jax.nn.softmax).parameters["axis"].default == -1
    assert inspect.signature(jax.nn.logsumexp).parameters["axis"].default is None


def test_jax_default_scale(jax: Any) -> None:
    assert probe_default_scale(_jax_dpa(jax), ev=3) == JAX.default_scale.value


def test_jax_causal_alignment(jax: Any) -> None:
    assert probe_causal_alignment(_jax_dpa(jax), ev=3) == JAX.causal_alignment.value


def test_jax_window(jax: Any) -> None:
    assert JAX.window.value == "i-left <= j <= i+right (top-left)"
    q, k, v = _qkv(n_q=3, n_k=5, ev=3)
    i, j = np.arange(3)[:, None], np.arange(5)[None, :]
    for left, right in ((1, 0), (0, 2), (1, 1)):
        out = _jax_dpa(jax, local_window_size=(left, right))(q, k, v)  # no mask given
        visible = (j >= i - left) & (j <= i + right)
        assert _close(out, _plain(q, k, v, visible)), (left, right)


def test_jax_fully_masked_row(jax: Any) -> None:
    assert probe_fully_masked_row(_jax_dpa(jax), ev=3) == JAX.fully_masked_output.value
    q, k, v = _qkv(n_q=3, n_k=4, ev=3)
    mask = np.ones((3, 4), dtype=bool)
    mask[0] = False
    blhe = [np.swapaxes(a, 0, 1)[None].astype(np.float32) for a in (q, k, v)]
    _, lse = jax.nn.dot_product_attention(*blhe, mask=mask[None, None], return_residual=True)
    lse = np.asarray(lse)
    assert JAX.lse.value == "return_residual=True, (B, L, Hq)" and lse.shape == (1, 3, 1)
    assert JAX.fully_masked_lse.value == "finite: -0.7*f32 max + log S"
    # float32 spacing at 2.4e38 is ~2e31, far above log(4): the fill itself comes back.
    fill = np.float32(-0.7 * float(np.finfo(np.float32).max))
    assert np.isfinite(lse[0, 0, 0]) and lse[0, 0, 0] == pytest.approx(float(fill) + math.log(4))
    s = np.einsum("le,se->ls", q[0], k[0]) / math.sqrt(3)
    # jax works in float32 here (u = 2**-24 = 6e-8): an LSE of 4 logits below 3 in size is
    # within (n + 2 + 2 range) u |lse| < 1e-6 of exact, so atol=1e-5 keeps a 10x margin.
    expected = scipy.special.logsumexp(s[1:], axis=-1)
    assert np.allclose(lse[0, 1:, 0], expected, atol=1e-5)  # float32 bound above, 10x margin


def test_jax_hidden_nan(jax: Any) -> None:
    assert probe_hidden_nan(_jax_dpa(jax), ev=3) == JAX.hidden_nan.value


def test_jax_gqa(jax: Any) -> None:
    assert probe_gqa(_jax_dpa(jax), ev=3) == JAX.gqa.value


def test_jax_value_head_dim(jax: Any) -> None:
    assert JAX.value_head_dim.value == "refused (Ev must equal E)"
    q, k, v = _qkv(e=3, ev=5)
    with pytest.raises(ValueError, match="value shape"):
        _jax_dpa(jax)(q, k, v)


def test_jax_mask_dtypes(jax: Any) -> None:
    assert JAX.mask_dtypes.value == "bool only"
    q, k, v = (np.swapaxes(a, 0, 1)[None].astype(np.float32) for a in _qkv(ev=3))
    with pytest.raises(ValueError, match="mask dtype"):
        jax.nn.dot_product_attention(q, k, v, mask=np.zeros((1, 1, 2, 4), np.float32))


def test_jax_mixed_dtypes(jax: Any) -> None:
    assert JAX.input_dtypes.value == "q, k, v same dtype"
    q, k, v = (np.swapaxes(a, 0, 1)[None] for a in _qkv(ev=3))
    with pytest.raises(ValueError, match="dtype"):
        jax.nn.dot_product_attention(
            q.astype(np.float16), k.astype(np.float32), v.astype(np.float32)
        )


def test_jax_float64_softmax_in_float32(jax: Any) -> None:
    assert JAX.accumulation.value == "softmax in float32, even for float64"
    q, k, v = _qkv(n_q=8, n_k=8, e=16, ev=16)
    with jax.enable_x64(True):
        out = _jax_dpa(jax, np.float64)(q, k, v)
    err = float(np.abs(out - _plain(q, k, v, True)).max())
    # A float64 softmax would stay within a few hundred float64 ulps (~1e-14) of the plain
    # float64 evaluation; a float32 softmax differs by about float32 eps (1.2e-7) times O(1)
    # outputs. The window [1e3 * eps64, 1e2 * eps32] separates the two by orders of magnitude.
    assert 1e3 * np.finfo(np.float64).eps < err < 1e2 * np.finfo(np.float32).eps


def test_jax_empty_sequences(jax: Any) -> None:
    assert probe_empty_sequences(_jax_dpa(jax), ev=3) == JAX.empty_sequence.value


def test_jax_softmax_special_values(jax: Any) -> None:
    jnp, inf, nan = jax.numpy, np.inf, np.nan
    assert JAX.softmax_posinf.value == "NaN; logsumexp +inf"
    assert np.isnan(jax.nn.softmax(jnp.array([inf, 1.0]))).all()
    assert jax.nn.logsumexp(jnp.array([inf, 1.0])) == inf
    assert JAX.softmax_nan.value == "NaN slice"
    assert np.isnan(jax.nn.softmax(jnp.array([nan, 1.0]))).all()
    assert JAX.softmax_all_neginf.value == "NaN; where= all False: 0"
    assert np.isnan(jax.nn.softmax(jnp.array([-inf, -inf]))).all()
    assert np.isnan(jax.nn.log_softmax(jnp.array([-inf, -inf]))).all()
    assert jax.nn.logsumexp(jnp.array([-inf, -inf])) == -inf
    none = jnp.array([False, False])
    assert np.all(jax.nn.softmax(jnp.array([1.0, 2.0]), where=none) == 0)
    assert np.all(jax.nn.log_softmax(jnp.array([1.0, 2.0]), where=none) == -inf)
    assert JAX.softmax_empty_axis.value == "empty; lse -inf"
    assert jax.nn.softmax(jnp.zeros((2, 0))).shape == (2, 0)
    assert jax.nn.logsumexp(jnp.zeros(0)) == -inf
