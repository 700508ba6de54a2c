"""The accuracy claims on larger cases than the battery's: L and S up to 64, E up to 128.

The exact reference in balls (attnspec.exact, Arb) makes these affordable: about 0.1 s
an example at L = S = E = 64, where the mpmath path took over a second (issue 8,
benchmarks/exact_bench.py). The claim checked is the same as in
tests/test_attention_properties.py (:func:`attnspec.spec.properties.attention.check_agreement`:
"accurate" within 4u sum_j p_ij |v_jk| + eta of the certified exact value, the lse within
one ulp; "fast" within the textbook bound), on cases from the same strategy with every
feature, only larger; and a case that crosses the reference's 64-row block of the (1, 2,
64, 64, 64) benchmark shape, with a mask, bias, GQA and sinks.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings

from attnspec.spec.properties import attention as AP
from attnspec.spec.strategies.attention import AttentionCase, attention_cases

IMPLS = {"fast": AP.attnspec_impl("fast"), "accurate": AP.attnspec_impl("accurate")}

#: examples per implementation: a quarter of the profile's, at least 5 (the ci profile:
#: about 12 s for each)
LARGE = settings(max_examples=max(5, settings().max_examples // 4), deadline=None)


@pytest.mark.parametrize("impl", list(IMPLS.values()), ids=list(IMPLS))
@LARGE
@given(case=attention_cases(max_side=64, max_width=128))
def test_agreement_with_exact_on_large_cases(impl: AP.AttentionImpl, case: AttentionCase) -> None:
    AP.check_agreement(impl, case)


@pytest.mark.parametrize("impl", list(IMPLS.values()), ids=list(IMPLS))
def test_agreement_at_64_queries_and_keys_with_every_feature(impl: AP.AttentionImpl) -> None:
    rng = np.random.default_rng(20261201)
    q = rng.standard_normal((1, 4, 64, 32))
    k = rng.standard_normal((1, 2, 64, 32))
    v = rng.standard_normal((1, 2, 64, 48))
    mask = rng.random((64, 64)) < 0.8
    bias = rng.standard_normal((1, 4, 64, 64))
    case = AttentionCase(q, k, v, {"mask": mask, "bias": bias, "sinks": rng.standard_normal(4)})
    AP.check_agreement(impl, case)
