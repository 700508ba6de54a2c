"""Inputs whose accurate results are pinned bit for bit (tests/test_pinned.py).

Each case is a name and a function that computes a tuple of float64 arrays with the
accurate arithmetic. The digests in tests/pinned.json were written by
``python tests/pinned_cases.py --write`` at commit 62828eb (before the layout rework of
issue 6), so that moving or restructuring the arithmetic cannot change a single bit of
what it returns on these inputs. Rewrite them only for a change that is meant to alter
results, and say which in the commit message.

The cases cover the regimes each operation of the double-double arithmetic treats
differently: short and long rows (one or two extraction levels), the underflow edge
(terms and weights below 2**-969, lifted by 2**600), +-1e308, ties, excluded entries,
special rows, logsumexp rows that cancel; and for sdpa the scale 2**-3 (E = 64), logit
offsets, 1e+-150 scaling, softcap, ALiBi, sinks, dropout, GQA, masks with empty rows,
non-finite values at visible and hidden keys.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

import attnspec

PINNED = Path(__file__).with_name("pinned.json")
Result = tuple[np.ndarray, ...]


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _family(x: np.ndarray, **kw: object) -> Result:
    return (
        attnspec.softmax(x, **kw),  # type: ignore[arg-type]
        attnspec.log_softmax(x, **kw),  # type: ignore[arg-type]
        attnspec.logsumexp(x, **kw),  # type: ignore[arg-type]
    )


def _softmax_cases() -> dict[str, Callable[[], Result]]:
    cases: dict[str, Callable[[], Result]] = {}
    cases["randn"] = lambda: _family(_rng(1).standard_normal((37, 129)))
    cases["wide"] = lambda: _family(30.0 * _rng(2).standard_normal((9, 301)))
    cases["long-rows"] = lambda: _family(_rng(3).standard_normal((3, 6000)))
    cases["dominant"] = lambda: _family(np.concatenate([[700.0], _rng(4).standard_normal(999)]))

    def huge() -> Result:
        x = _rng(5).uniform(-1.0, 1.0, (11, 40)) * 1e308
        x[0, :2] = [1e308, -1e308]
        return _family(x)

    cases["huge"] = huge

    def underflow() -> Result:
        x = _rng(6).uniform(-760.0, 0.0, (13, 64))
        x[:, 0] = 0.0
        x[1] = -745.0 + _rng(7).uniform(0, 2, 64)
        x[1, 0] = 0.0
        return _family(x)

    cases["underflow"] = underflow
    cases["subnormal"] = lambda: _family(np.ldexp(_rng(8).uniform(-1, 1, (5, 33)), -1060))
    cases["ties"] = lambda: _family(np.repeat(_rng(9).integers(-3, 3, (7, 1)), 50, axis=1) * 1.0)

    def specials() -> Result:
        x = _rng(10).standard_normal((8, 6))
        x[0] = -np.inf
        x[1, 2] = np.nan
        x[2, [1, 4]] = np.inf
        x[3, 0] = -np.inf
        x[4] = [np.inf, -np.inf, 1.0, np.inf, 0.0, 2.0]
        return _family(x)

    cases["specials"] = specials

    def where() -> Result:
        x = _rng(11).standard_normal((6, 20))
        w = _rng(12).random((6, 20)) < 0.6
        w[0] = False
        x[~w] = np.nan  # excluded entries never reach a result
        return _family(x, where=w)

    cases["where"] = where
    cases["axes"] = lambda: _family(_rng(13).standard_normal((3, 4, 5)), axis=(0, 2))
    cases["axis-none"] = lambda: _family(_rng(14).standard_normal((4, 9)), axis=None)

    def cancelling() -> Result:
        p = _rng(15).dirichlet(np.ones(12), size=10)
        x = np.log(p)
        return _family(x)

    cases["lse-cancelling"] = cancelling
    cases["lse-near-zero"] = lambda: _family(
        np.array([[-5.0, math.log1p(-math.exp(-5.0))], [0.0, -40.0], [-1e-3, -7.0]])
    )
    cases["empty-axis"] = lambda: _family(np.zeros((3, 0)))
    cases["float32"] = lambda: _family(_rng(16).standard_normal((5, 17)).astype(np.float32))
    return cases


def _sdpa_cases() -> dict[str, Callable[[], Result]]:
    cases: dict[str, Callable[[], Result]] = {}

    def qkv(seed: int, shape_q: tuple[int, ...], shape_k: tuple[int, ...], ev: int) -> Result:
        r = _rng(seed)
        q = r.standard_normal(shape_q)
        k = r.standard_normal(shape_k)
        v = r.standard_normal((*shape_k[:-1], ev))
        return q, k, v

    def run(q: np.ndarray, k: np.ndarray, v: np.ndarray, **kw: object) -> Result:
        out, lse = attnspec.sdpa(q, k, v, return_lse=True, **kw)  # type: ignore[arg-type]
        return out, lse

    cases["randn"] = lambda: run(*qkv(20, (2, 3, 9, 8), (2, 3, 11, 8), 5))
    cases["e64"] = lambda: run(*qkv(21, (1, 2, 17, 64), (1, 2, 23, 64), 64))
    cases["causal-square"] = lambda: run(*qkv(22, (2, 4, 16, 16), (2, 4, 16, 16), 16), causal=True)

    def offset(c: float) -> Result:
        q, k, v = qkv(23, (1, 2, 8, 4), (1, 2, 10, 4), 3)
        bias = np.full((1, 2, 8, 10), c)
        bias += _rng(24).standard_normal((1, 2, 8, 10))
        return run(q, k, v, bias=bias)

    cases["offset-1e6"] = lambda: offset(1e6)
    cases["offset-1e12"] = lambda: offset(1e12)

    def scaled(f: float) -> Result:
        q, k, v = qkv(25, (1, 1, 6, 4), (1, 1, 7, 4), 4)
        return run(q * f, k, v * f, scale=1.0 / f)

    cases["scale-1e150"] = lambda: scaled(1e150)
    cases["scale-1e-150"] = lambda: scaled(1e-150)

    def everything() -> Result:
        q, k, v = qkv(26, (2, 4, 7, 6), (2, 2, 9, 6), 3)
        keep = _rng(27).random((2, 4, 7, 9)) < 0.8
        return run(
            q * 4,
            k,
            v,
            causal=True,
            align="bottom_right",
            softcap=5.0,
            alibi_slopes=np.array([0.5, 0.25, 0.125, 0.0625]),
            sinks=np.array([0.3, -1.0, 2.0, 0.0]),
            dropout_mask=keep,
            dropout_p=0.2,
        )

    cases["softcap-alibi-sinks-dropout-gqa"] = everything

    def window_mask() -> Result:
        q, k, v = qkv(28, (1, 2, 12, 5), (1, 2, 12, 5), 5)
        mask = _rng(29).random((1, 2, 12, 12)) < 0.7
        mask[0, 0, 3] = False  # an empty row
        return run(q, k, v, mask=mask, window=(3, 1))

    cases["window-mask-empty-row"] = window_mask

    def nonfinite() -> Result:
        q, k, v = qkv(30, (1, 1, 5, 3), (1, 1, 6, 3), 2)
        v = v.copy()
        v[0, 0, 1, 0] = np.inf
        v[0, 0, 2, 1] = np.nan
        v[0, 0, 4, 0] = -np.inf
        mask = np.ones((5, 6), dtype=bool)
        mask[:, 2] = False  # the NaN value is hidden
        mask[0, 1] = False
        bias = np.zeros((5, 6))
        bias[1, 4] = -np.inf
        return run(q, k, v, mask=mask, bias=bias)

    cases["nonfinite-values"] = nonfinite

    def underflow_weights() -> Result:
        q = np.array([[1.0]])
        k = np.array([[0.0], [-700.0], [-730.0], [-745.0]])
        v = np.array([[1.0], [3.0], [-2.0], [5.0]])
        return run(q, k, v, scale=1.0)

    cases["underflow-weights"] = underflow_weights
    cases["two-d"] = lambda: run(*qkv(31, (4, 3), (5, 3), 2))
    cases["empty-keys"] = lambda: run(
        np.zeros((1, 2, 3, 4)), np.zeros((1, 2, 0, 4)), np.zeros((1, 2, 0, 4))
    )
    return cases


def all_cases() -> dict[str, Callable[[], Result]]:
    out = {f"softmax-family/{n}": f for n, f in _softmax_cases().items()}
    out.update({f"sdpa/{n}": f for n, f in _sdpa_cases().items()})
    return out


def digest(result: Result) -> str:
    """SHA-256 of the shapes and the float64 bytes of every array in ``result``."""
    h = hashlib.sha256()
    for a in result:
        arr = np.ascontiguousarray(np.asarray(a, dtype=np.float64))
        h.update(repr(arr.shape).encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def compute() -> dict[str, str]:
    return {name: digest(f()) for name, f in all_cases().items()}


if __name__ == "__main__":
    if "--write" in sys.argv[1:]:
        PINNED.write_text(json.dumps(compute(), indent=1, sort_keys=True) + "\n")
        print(f"wrote {PINNED}")
    else:
        print(json.dumps(compute(), indent=1, sort_keys=True))
