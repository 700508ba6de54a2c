"""The attention strategies reach every hard case their docstrings promise (hypothesis.find),
and what they draw is valid input whose poison sits only at hidden positions. Bad
arguments raise InvalidArgument when the strategy is built, before anything is drawn."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, find, given, settings
from hypothesis.errors import InvalidArgument

import attnspec
from attnspec.spec.strategies.attention import (
    FEATURES,
    MAGNITUDES,
    AttentionCase,
    attention_cases,
    case_visibility,
)

# generation only: find() returns the first case that reaches the target
SEARCH = settings(
    max_examples=3000,
    database=None,
    phases=[Phase.generate],
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)


def _q_heads(c: AttentionCase) -> int:
    return c.q.shape[-3] if c.q.ndim >= 3 else 1


def _k_heads(c: AttentionCase) -> int:
    return c.k.shape[-3] if c.k.ndim >= 3 else 1


def _hidden_rows(c: AttentionCase) -> bool:
    seen = case_visibility(c)
    return bool(seen.size) and bool((~seen.any(axis=-1)).any())


def _finite_max(a: Any) -> float:
    fin = np.abs(a[np.isfinite(a)])
    return float(fin.max()) if fin.size else 0.0


def _finite_min_positive(a: Any) -> float:
    fin = np.abs(a[np.isfinite(a) & (a != 0)])
    return float(fin.min()) if fin.size else np.inf


TARGETS: dict[str, Callable[[AttentionCase], bool]] = {
    "batch dims that broadcast": lambda c: (
        c.q.ndim >= 4 and c.k.ndim >= 3 and c.q.shape[:-3] != c.k.shape[:-3]
    ),
    "two batch dims": lambda c: c.q.ndim == 5,
    "GQA (Hq = G Hkv, G > 1, Hkv > 1)": lambda c: _k_heads(c) > 1 and _q_heads(c) > _k_heads(c),
    "MQA (Hkv = 1 < Hq)": lambda c: _k_heads(c) == 1 and _q_heads(c) > 1,
    "L < S": lambda c: 0 < c.n_queries < c.n_keys,
    "L > S": lambda c: c.n_queries > c.n_keys > 0,
    "E != Ev": lambda c: c.q.shape[-1] != c.v.shape[-1],
    "2-D single head": lambda c: c.q.ndim == 2,
    "L = 0": lambda c: c.n_queries == 0,
    "S = 0": lambda c: c.n_keys == 0,
    "mask with a fully hidden row": lambda c: "mask" in c.kwargs and _hidden_rows(c),
    "mask without hidden rows": lambda c: (
        "mask" in c.kwargs and c.n_keys > 0 and not _hidden_rows(c)
    ),
    "causal top_left, L != S": lambda c: (
        bool(c.kwargs.get("causal"))
        and c.kwargs.get("align") == "top_left"
        and c.n_queries != c.n_keys
    ),
    "causal bottom_right, L != S": lambda c: (
        bool(c.kwargs.get("causal"))
        and c.kwargs.get("align") == "bottom_right"
        and c.n_queries != c.n_keys
    ),
    "bottom_right rows with no key (L > S)": lambda c: (
        c.kwargs.get("align") == "bottom_right"
        and bool(c.kwargs.get("causal"))
        and c.n_queries > c.n_keys
        and _hidden_rows(c)
    ),
    "window with a None side": lambda c: (
        c.kwargs.get("window") is not None
        and None in c.kwargs["window"]
        and c.kwargs["window"] != (None, None)
    ),
    "bounded window": lambda c: (
        c.kwargs.get("window") is not None and None not in c.kwargs["window"]
    ),
    "bias with -inf": lambda c: (
        c.kwargs.get("bias") is not None and bool((np.asarray(c.kwargs["bias"]) == -np.inf).any())
    ),
    "ALiBi slopes": lambda c: (
        c.kwargs.get("alibi_slopes") is not None
        and bool((np.asarray(c.kwargs["alibi_slopes"]) > 0).any())
    ),
    "sinks": lambda c: c.kwargs.get("sinks") is not None,
    "softcap": lambda c: c.kwargs.get("softcap") is not None,
    "dropout p > 0": lambda c: (
        (c.kwargs.get("dropout_p") or 0) > 0
        and c.kwargs.get("dropout_mask") is not None
        and not np.asarray(c.kwargs["dropout_mask"]).all()
    ),
    "q.k offset 1e6": lambda c: c.q.size > 0 and bool((c.q[..., 0] == 1e3).all()),
    "q.k offset 1e12": lambda c: c.q.size > 0 and bool((c.q[..., 0] == 1e6).all()),
    "q scaled by 1e150": lambda c: _finite_max(c.q) > 1e100,
    "q scaled by 1e-150": lambda c: 0 < _finite_max(c.q) < 1e-100 and _finite_max(c.k) > 1e100,
    "q and k tiny (products underflow)": lambda c: (
        0 < _finite_max(c.q) < 1e-150 and 0 < _finite_max(c.k) < 1e-150
    ),
    "logits beyond exp's range (wide)": lambda c: (
        _finite_max(c.q) * _finite_max(c.k) > 1000
        and c.kwargs.get("scale") == 1.0
        and _finite_max(c.q) < 1e3
    ),
    "huge values": lambda c: _finite_max(c.v) > 1e250,
    "tiny values": lambda c: _finite_min_positive(c.v) < 1e-250,
    "subnormal values": lambda c: _finite_min_positive(c.v) < 2.0**-1022,
    "NaN value at a hidden key": lambda c: bool(np.isnan(c.v).any()),
    "+inf value at a hidden key": lambda c: bool((c.v == np.inf).any()),
    "-inf value at a hidden key": lambda c: bool((c.v == -np.inf).any()),
    "NaN key at a hidden key": lambda c: bool(np.isnan(c.k).any()),
    "NaN query in a row that sees nothing": lambda c: bool(np.isnan(c.q).any()),
    "NaN or inf bias at a masked position": lambda c: (
        c.kwargs.get("bias") is not None
        and bool(
            (
                ~np.isfinite(np.asarray(c.kwargs["bias"]))
                & ~(np.asarray(c.kwargs["bias"]) == -np.inf)
            ).any()
        )
    ),
}


@pytest.mark.parametrize("target", list(TARGETS), ids=list(TARGETS))
def test_strategy_reaches(target: str) -> None:
    find(attention_cases(), TARGETS[target], settings=SEARCH)


@pytest.mark.parametrize("magnitude", MAGNITUDES)
def test_each_magnitude_can_be_forced(magnitude: str) -> None:
    find(attention_cases(magnitude=magnitude), lambda c: c.q.size > 0, settings=SEARCH)


@settings(max_examples=min(settings().max_examples, 200))
@given(case=attention_cases())
def test_cases_are_valid_and_poison_is_hidden(case: AttentionCase) -> None:
    """attnspec.sdpa accepts every case; non-finite inputs sit only where nothing sees them:
    the output of a row is finite whenever its visible values are."""
    out = attnspec.sdpa(case.q, case.k, case.v, precision="fast", **case.kwargs)
    assert out.shape == (*case.logits_shape[:-1], case.v.shape[-1])
    seen = case_visibility(case.with_kwargs(bias=None))
    bias = case.kwargs.get("bias")
    if bias is not None:
        b = np.broadcast_to(np.asarray(bias), seen.shape)
        assert not (seen & np.isnan(b)).any() and not (seen & (b == np.inf)).any()
    v = case.v if case.v.ndim >= 3 or case.q.ndim >= 3 else case.v[None]
    sn = seen if case.q.ndim >= 3 or case.k.ndim >= 3 else seen[None]
    v = np.repeat(v, sn.shape[-3] // v.shape[-3], axis=-3)
    # a visible key never holds a non-finite value, key or query
    used = sn.any(axis=(*tuple(range(sn.ndim - 2)), -2))
    assert np.isfinite(v[..., used, :]).all()
    assert np.isfinite(case.k[..., used, :]).all()


def test_features_restrict_what_is_drawn() -> None:
    none_of_them = attention_cases(features=())
    find(none_of_them, lambda c: c.n_keys > 0, settings=SEARCH)

    @settings(max_examples=min(settings().max_examples, 100))
    @given(case=none_of_them)
    def check(case: AttentionCase) -> None:
        assert case.features() == set()

    check()
    assert set(FEATURES) >= {"mask", "causal", "lse"}


def test_case_repr_reproduces_the_case() -> None:
    case = find(
        attention_cases(),
        lambda c: c.kwargs.get("mask") is not None and c.kwargs.get("causal") is True,
        settings=SEARCH,
    )
    text = repr(case)
    assert text.startswith("AttentionCase(q=np.array(")
    assert "'causal': True" in text and "'mask': np.array(" in text
    again = eval(text, {"np": np, "AttentionCase": AttentionCase})  # a call that rebuilds it
    assert repr(again) == text
    for name in ("q", "k", "v"):
        assert np.array_equal(getattr(again, name), getattr(case, name), equal_nan=True)
    assert np.array_equal(again.kwargs["mask"], case.kwargs["mask"])
    empty = AttentionCase(np.zeros((0, 3)), np.zeros((2, 3)), np.zeros((2, 1)), {})
    assert eval(repr(empty), {"np": np, "AttentionCase": AttentionCase}).q.shape == (0, 3)


# ---------------------------------------------------------------------------------------
# Arguments are checked when the strategy is built, not when it is drawn from
# ---------------------------------------------------------------------------------------

_NAMES = f"Expected a set or tuple of names from {FEATURES!r} but got "
_UNKNOWN = f"Expected features from {FEATURES!r} but got "
_MAGNITUDE = f"Expected None or one of {MAGNITUDES!r} but got "
_POISON = "poison=True needs a feature that hides positions, one of ('mask', 'causal', 'window')"

#: id: (keyword arguments of attention_cases, a fragment of the message)
BAD_ARGUMENTS: dict[str, tuple[dict[str, Any], str]] = {
    "features-a-str": ({"features": "mask"}, _NAMES + "features='mask' (type=str)"),
    "features-None": ({"features": None}, _NAMES + "features=None (type=NoneType)"),
    "features-a-dict": ({"features": {"mask": True}}, _NAMES + "features={'mask': True}"),
    "features-unknown": (
        {"features": ("mask", "flash")},
        _UNKNOWN + "features=('mask', 'flash'), with unknown ['flash']",
    ),
    "features-wrong-case": ({"features": {"Mask"}}, _UNKNOWN + "features={'Mask'}"),
    "features-not-str": (
        {"features": ("mask", 1)},
        f"Expected feature names (str) from {FEATURES!r} but got features=('mask', 1), with [1]",
    ),
    "magnitude-unknown": ({"magnitude": "huge"}, _MAGNITUDE + "magnitude='huge' (type=str)"),
    "magnitude-a-float": ({"magnitude": 1e6}, _MAGNITUDE + "magnitude=1000000.0 (type=float)"),
    "max_side-0": ({"max_side": 0}, "Expected max_side >= 1 but got max_side=0"),
    "max_side-negative": ({"max_side": -2}, "Expected max_side >= 1 but got max_side=-2"),
    "max_side-bool": ({"max_side": True}, "Expected an int but got max_side=True (type=bool)"),
    "max_side-float": ({"max_side": 4.0}, "Expected an int but got max_side=4.0 (type=float)"),
    "max_side-str": ({"max_side": "4"}, "Expected an int but got max_side='4' (type=str)"),
    "poison-an-int": ({"poison": 1}, "Expected a bool or None but got poison=1 (type=int)"),
    "poison-a-str": ({"poison": "always"}, "Expected a bool or None but got poison='always'"),
    "poison-without-hiding-features": (
        {"features": (), "poison": True},
        _POISON + ", but got features=()",
    ),
    "poison-with-softcap-only": (
        {"features": ("softcap", "alibi"), "poison": True},
        _POISON + ", but got features=('softcap', 'alibi')",
    ),
}


@pytest.mark.parametrize(
    ("kwargs", "message"), list(BAD_ARGUMENTS.values()), ids=list(BAD_ARGUMENTS)
)
def test_bad_argument_is_refused_at_build(kwargs: dict[str, Any], message: str) -> None:
    """The call itself raises: nothing is drawn (no .example(), find or given)."""
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        attention_cases(**kwargs)


VALID: dict[str, dict[str, Any]] = {
    "defaults": {},
    "every argument": {
        "features": ["mask", "gqa"],
        "magnitude": "tiny_qk",
        "max_side": np.int64(1),
        "poison": True,
    },
    "poison with causal only": {"features": frozenset({"causal"}), "poison": True},
    "no features, no poison": {"features": set(), "poison": False},
}


@pytest.mark.parametrize("kwargs", list(VALID.values()), ids=list(VALID))
def test_valid_arguments_build_and_draw(kwargs: dict[str, Any]) -> None:
    find(attention_cases(**kwargs), lambda c: True, settings=SEARCH)
