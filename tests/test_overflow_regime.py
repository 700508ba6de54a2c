"""Regression tests for the defects the overflow regime's contract found (issue 7: logits
beyond the float64 range from finite inputs, ``tests/fuzz_contract.check_sdpa_overflow``),
each named after what it guards. Every call runs with warnings as errors. Expected values
say where they come from."""

from __future__ import annotations

import math
import warnings
from typing import Any

import mpmath
import numpy as np

import attnspec

TINY = 2.0**-1074  # the smallest subnormal


def _no_warning(**kw: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return attnspec.sdpa(**kw)


def test_fast_sdpa_logits_that_overflow_in_the_bias_addition_raise_no_warning() -> None:
    # tau q.k = 1e308 plus a bias of 1e308: the logit 2e308 overflows to +inf in Fast.add
    # (it warned "overflow encountered in add"). Plain float64's answer: one +inf logit
    # takes all the weight (the +inf rule), so the output is v = 0 and the lse +inf.
    out, lse = _no_warning(
        q=np.array([[1.0]]),
        k=np.array([[1.0]]),
        v=np.array([[0.0]]),
        scale=1e308,
        bias=np.full((1, 1), 1e308),
        return_lse=True,
        precision="fast",
    )
    assert out.tolist() == [[0.0]] and lse.tolist() == [math.inf]


def test_fast_sdpa_alibi_that_overflows_on_an_overflowed_logit_raises_no_warning() -> None:
    # tau q.k = 1e308 * 4 = +inf at every key; ALiBi 1e308 * |i - j| is 0, 1e308 or +inf
    # (distance 2): inf - inf = NaN in Fast.sub (it warned "invalid value encountered in
    # subtract"). IEEE, by the definition's rules: rows 0 and 2 hold a NaN logit (NaN
    # output and lse); row 1 has three +inf logits (inf - 1e308 = inf), weight 1/3 each:
    # output mean(0, 1, 2) = 1, lse +inf.
    q = np.full((1, 3, 1), 2.0)
    out, lse = _no_warning(
        q=q,
        k=q,
        v=np.arange(3.0).reshape(1, 3, 1),
        scale=1e308,
        alibi_slopes=np.array([1e308]),
        align="top_left",
        return_lse=True,
        precision="fast",
    )
    assert np.isnan(out[0, [0, 2], 0]).all() and out[0, 1, 0] == 1.0
    assert np.isnan(lse[0, [0, 2]]).all() and lse[0, 1] == math.inf


def test_accurate_sdpa_with_no_keys_and_a_subnormal_softcap_raises_no_warning() -> None:
    # S = 0: no logit, so every entry is "in the middle region" of DoubleDouble.softcap
    # (vacuously), which took the unscaled path: 1 / 8e-323 overflowed (a warning). The
    # empty-row rule: output 0, lse -inf.
    out, lse = _no_warning(
        q=np.array([[0.0]]),
        k=np.zeros((0, 1)),
        v=np.zeros((0, 1)),
        softcap=8e-323,
        return_lse=True,
    )
    assert out.tolist() == [[0.0]] and lse.tolist() == [-math.inf]


def test_accurate_sdpa_softcaps_logits_of_the_size_of_a_subnormal_cap() -> None:
    # One key, logit s = 8e-323 = 16 * 2^-1074 and cap c = s: r = s/c = 1, every entry in
    # the middle region, which took the unscaled path (1/c = inf, a NaN logit, refused as
    # "beyond the float64 range"). The lse is the logit c tanh(1) = 12.1855... * 2^-1074
    # (mpmath, 50 digits), on the subnormal grid 12 * 2^-1074; the output is v = 1.
    out, lse = _no_warning(
        q=np.array([[8e-323]]),
        k=np.array([[1.0]]),
        v=np.array([[1.0]]),
        scale=1.0,
        softcap=8e-323,
        return_lse=True,
    )
    assert out.tolist() == [[1.0]] and lse.tolist() == [12 * TINY]
    # a cap of 1e-300 (below 2^-900: scaled by 2^600), logit 1e-300: c tanh(1), normal
    out, lse = _no_warning(
        q=np.array([[1e-300]]),
        k=np.array([[1.0]]),
        v=np.array([[1.0]]),
        scale=1.0,
        softcap=1e-300,
        return_lse=True,
    )
    with mpmath.workdps(50):
        want = float(mpmath.mpf(1e-300) * mpmath.tanh(1))  # 7.61594155955765e-301
    assert out.tolist() == [[1.0]] and lse.tolist() == [want]
