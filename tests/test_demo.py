"""The worked example: ``attnspec demo`` and docs/worked-example.md (attnspec.demo,
attnspec.worked_example).

Bounds used here are derived in attnspec.demo (``step_by_step_bounds``, ``sdpa_bound``)
from attnspec.spec.tolerances.softmax; expected numbers say where they come from.
"""

from __future__ import annotations

import io
import math
from fractions import Fraction
from pathlib import Path

import mpmath
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import attnspec
from attnspec import demo, worked_example
from attnspec.spec.tolerances.softmax import SECOND_ORDER, U64, sum_to_one_bound, ulp_error

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def walk() -> dict:
    return demo.walkthrough()


# --- the embeddings ---------------------------------------------------------------------


def test_embeddings_are_the_pinned_draw() -> None:
    # Provenance: numpy default_rng(2017).standard_normal((7, 4)), numpy >= 1.17 PCG64
    # stream, read off numpy 2.4 on the development machine; the first three raw draws are
    # 1.37550874..., -0.57396039..., 1.16037153.... If numpy ever changes the stream, this
    # test (not the docs check) is the one that says so.
    raw = np.random.default_rng(demo.SEED).standard_normal((7, 4))
    assert raw[0, :3] == pytest.approx([1.37550874, -0.57396039, 1.16037153], abs=5e-9)
    chars, x = demo.embeddings()
    assert chars == tuple("写代码的中年人")
    assert x.shape == (7, 4)
    assert x.dtype == np.float64
    # Two-decimal values of the same draw (the float64 nearest each decimal).
    assert x[0].tolist() == [1.38, -0.57, 1.16, -1.99]
    assert x[5].tolist() == [0.63, 0.38, -0.28, 0.73]  # the query 年
    assert x[6, 3] == -0.83
    assert np.array_equal(x, np.round(raw, 2))


def test_embeddings_are_stable_between_calls() -> None:
    _, a = demo.embeddings()
    _, b = demo.embeddings()
    assert np.array_equal(a, b)


# --- the step-by-step numbers -----------------------------------------------------------


def test_scores_are_the_exact_decimal_dot_products(walk: dict) -> None:
    # Provenance: the dot products of the two-decimal embeddings in exact rational
    # arithmetic (fractions.Fraction of the decimal strings); 4 decimals are exact.
    x = walk["x"]
    q = [Fraction(f"{t:.2f}") for t in walk["q"]]
    for j in range(7):
        s = sum(a * Fraction(f"{t:.2f}") for a, t in zip(q, x[j], strict=True))
        assert demo.fixed(walk["scores"][j], 4) == f"{float(s):.4f}"
        assert s * 10_000 == int(s * 10_000)
    # Scaling by 1/sqrt(4) = 1/2 is exact in binary floating point.
    assert walk["tau"] == 0.5
    assert np.array_equal(walk["scaled"], walk["scores"] / 2)


def test_step_by_step_matches_exact_within_derived_bound(walk: dict) -> None:
    b = walk["bounds"]
    with mpmath.workdps(demo.DPS):
        for got, ref, bound in [
            (walk["scaled"], walk["exact_scaled"], b["scores"]),
            (walk["weights"], walk["exact_weights"], b["weights_rel"] * walk["weights"]),
            (walk["context"], walk["exact_context"], b["context"]),
        ]:
            for g, r, e in zip(got, ref, bound, strict=True):
                assert abs(mpmath.mpf(float(g)) - r) <= e, (g, r, e)


def test_sdpa_matches_exact_within_its_documented_bound(walk: dict) -> None:
    # attnspec.sdpa's docstring: each output within 4u sum_j p_ij |v_jk| of exact.
    b = walk["bounds"]
    with mpmath.workdps(demo.DPS):
        for g, r, e in zip(
            walk["sdpa_context"], walk["exact_context"], b["sdpa_context"], strict=True
        ):
            assert abs(mpmath.mpf(float(g)) - r) <= e, (g, r, e)
        for g, r, e in zip(
            walk["matrix"].ravel(),
            walk["exact_matrix"].ravel(),
            b["sdpa_matrix"].ravel(),
            strict=True,
        ):
            assert abs(mpmath.mpf(float(g)) - r) <= e, (g, r, e)


def test_step_by_step_equals_sdpa_within_derived_bound(walk: dict) -> None:
    # Triangle inequality: |step - sdpa| <= (bound of step) + (bound of sdpa).
    diff = np.abs(walk["context"] - walk["sdpa_context"])
    bound = walk["bounds"]["context"] + walk["bounds"]["sdpa_context"]
    assert np.all(diff <= bound), (diff, bound)
    # The weights: the step-by-step row against sdpa's row of P.
    diff = np.abs(walk["weights"] - walk["sdpa_weights"])
    bound = (
        walk["bounds"]["weights_rel"] * walk["weights"]
        + walk["bounds"]["sdpa_matrix"][walk["query_index"]]
    )
    assert np.all(diff <= bound), (diff, bound)


def test_bounds_are_not_vacuous(walk: dict) -> None:
    # The bounds are a few dozen u relative to the sizes involved, not loose enough to
    # pass anything: a wrong scale (1/E instead of 1/sqrt(E)) moves the context by
    # about 1e-1, far beyond them.
    assert walk["bounds"]["context"].max() < 100 * U64 * np.abs(walk["v"]).max()
    q, k, v = walk["q"], walk["k"], walk["v"]
    wrong = demo.steps(q, k, v, 1.0 / 4)["context"]
    assert np.all(np.abs(wrong - walk["context"]) > walk["bounds"]["context"])


def test_lse_agrees(walk: dict) -> None:
    # sdpa's docstring: lse within one ulp in the accurate path; the step-by-step lse
    # (m + log(total), three roundings and a faithful log) is not checked to the ulp.
    assert ulp_error(walk["sdpa_lse"], walk["exact_lse"]) <= 1.0
    assert demo.fixed(walk["lse"]) == demo.fixed(float(walk["exact_lse"]))


# --- the weights sum to one ---------------------------------------------------------------


def test_sdpa_weights_sum_to_one_within_accurate_bound(walk: dict) -> None:
    # The accurate path promises each output within 4u sum_j p_ij |v_jk| of exact; with
    # v = I the output is P and each weight is within 4u p_ij. Summed: within 4u of 1;
    # math.fsum adds at most 1.01u (sum_to_one_bound): 5.01u, times SECOND_ORDER = 5.06u,
    # i.e. the fsum of a row is one of 1 - 5u, ..., 1 - u, 1, 1 + 2u, 1 + 4u (floats near
    # 1 are spaced u below and 2u above).
    bound = float(sum_to_one_bound(np.full(7, SECOND_ORDER * 4 * U64), np.zeros(7)).max())
    assert bound == walk["bounds"]["sdpa_weight_sum"]
    assert 5 * U64 < bound < 5.1 * U64
    for row in walk["matrix"]:
        assert abs(math.fsum(row) - 1.0) <= bound
    assert abs(walk["sdpa_weight_sum"] - 1.0) <= bound


def test_step_by_step_weights_sum_to_one_within_fast_bound(walk: dict) -> None:
    # sum_to_one_bound of the step-by-step weights' derived bound (33.3u on this row).
    bound = walk["bounds"]["weight_sum"]
    assert bound < 40 * U64
    assert abs(math.fsum(walk["weights"]) - 1.0) <= bound


# --- the derived bound on other inputs --------------------------------------------------

_elements = st.floats(-8, 8, allow_subnormal=False).filter(lambda t: t == 0 or abs(t) > 1e-3)


@st.composite
def _one_query(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    s = draw(st.integers(1, 8))
    e = draw(st.integers(1, 6))
    ev = draw(st.integers(1, 3))
    q = draw(arrays(np.float64, (e,), elements=_elements))
    k = draw(arrays(np.float64, (s, e), elements=_elements))
    v = draw(arrays(np.float64, (s, ev), elements=_elements))
    return q, k, v


@given(_one_query())
def test_step_by_step_bound_holds_beyond_the_demo(qkv: tuple) -> None:
    # The derivation of step_by_step_bounds is not specific to the demo's numbers.
    q, k, v = qkv
    tau = 1.0 / math.sqrt(q.shape[0])
    got = demo.steps(q, k, v, tau)
    bounds = demo.step_by_step_bounds(q, k, v, tau, got["scaled"], got["weights"])
    exact = attnspec.exact.sdpa(q[None, :], k, v, dps=40)[0]
    with mpmath.workdps(40):
        for g, r, e in zip(got["context"], exact, bounds["context"], strict=True):
            assert abs(mpmath.mpf(float(g)) - r) <= e, (g, r, e)


# --- what the CLI and the docs show ---------------------------------------------------


def test_shown_numbers_are_the_exact_values_rounded(walk: dict) -> None:
    # The docs check compares markdown across machines, so every rounded float shown must
    # round the same way as the exact value (mpmath at 50 digits); then another BLAS or
    # libm, off in the last bits, prints the same digits.
    pairs = [
        (walk["weights"], walk["exact_weights"], 6),
        (walk["context"], walk["exact_context"], 6),
        (walk["matrix"].ravel(), walk["exact_matrix"].ravel(), 3),
    ]
    with mpmath.workdps(demo.DPS):
        m = max(walk["exact_scaled"])
        exact_exps = [mpmath.exp(z - m) for z in walk["exact_scaled"]]
        exact_total = mpmath.fsum(exact_exps)
        pairs.append((walk["exps"], exact_exps, 6))
        pairs.append(([walk["total"]], [exact_total], 6))
        # The products p_j v_j of the context table, every column.
        v = walk["v"]
        products = (walk["weights"][:, None] * v).ravel()
        exact_products = (walk["exact_weights"][:, None] * v.astype(object)).ravel()
        pairs.append((products, exact_products, 6))
    for got, ref, digits in pairs:
        for g, r in zip(got, ref, strict=True):
            assert demo.fixed(float(g), digits) == demo.fixed(float(r), digits), (g, r)


def test_demo_prints_every_step() -> None:
    out = io.StringIO()
    status = demo.run(out)
    text = out.getvalue()
    assert status == 0, text
    for title in [
        "Step 0. Embeddings",
        "Step 1. Scores",
        "Step 2. Scale",
        "Step 3. Softmax",
        "Step 4. Context vector",
        "Step 5. The same through attnspec",
        "Step 6. Agreement",
        "Step 7. All seven queries at once",
    ]:
        assert title in text
    assert "写代码的中年人" in text
    assert "check: sum_j p_j =" in text
    assert "0.343103" in text  # p_的 for the query 年 (the exact value, rounded)
    assert text.count(" ok\n") >= 6
    assert "FAILED" not in text
    assert text.rstrip().endswith("all checks hold")


def test_demo_agreement_rows_all_within(walk: dict) -> None:
    assert len(walk["agreement"]) == 6
    for row in walk["agreement"]:
        assert row.within, row
        assert row.max_abs <= row.bound


def test_markdown_is_deterministic_and_carries_the_numbers(walk: dict) -> None:
    text = worked_example.render_markdown()
    assert text == worked_example.render_markdown()
    assert text.startswith("# Worked example: attention over 写代码的中年人\n")
    assert text.endswith("\n")
    # The numbers the figures are drawn from, and those of the CLI.
    for i in range(7):
        assert (
            "| " + " | ".join(demo.fixed(t, 3).replace("-", "−") for t in walk["matrix"][i]) + " |"
            in text
        )
    for t in walk["weights"]:
        assert demo.fixed(t) in text
    for t in walk["scores"]:
        assert demo.fixed(t, 4).replace("-", "−") in text
    assert str(mpmath.nstr(walk["exact_context"][0], 20)) in text
    assert f"figures/{worked_example.HEATMAP}" in text
    assert f"figures/{worked_example.ROW_CHART}" in text
    assert "default_rng(2017)" in text
    assert text.count("$$") % 2 == 0
    assert "nan" not in text.lower().replace("nián", "")


def test_render_figures_writes_two_pngs(tmp_path: Path) -> None:
    paths = worked_example.render_figures(tmp_path / "a")
    assert [p.name for p in paths] == [worked_example.HEATMAP, worked_example.ROW_CHART]
    again = worked_example.render_figures(tmp_path / "b")
    for p, q in zip(paths, again, strict=True):
        data = p.read_bytes()
        assert data.startswith(PNG_SIGNATURE)
        assert len(data) > 10_000
        assert b"Software" not in data  # metadata={"Software": None}
        assert data == q.read_bytes()  # deterministic with the same matplotlib


def test_render_figures_without_a_cjk_font(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The fallback labels the axes in pinyin.
    monkeypatch.setattr(worked_example, "cjk_font", lambda: None)
    paths = worked_example.render_figures(tmp_path)
    for p in paths:
        assert p.read_bytes().startswith(PNG_SIGNATURE)
