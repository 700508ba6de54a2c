r"""Hypothesis strategies for online attention: problems, block sizes, partitions, merge trees.

:func:`online_cases` draws an :class:`OnlineCase`: an attention problem (an
:class:`~attnspec.spec.strategies.attention.AttentionCase`, drawn by
:func:`~attnspec.spec.strategies.attention.attention_cases` with every shape, visibility
rule, modifier and number regime it reaches), and how to cut it:

* **a block size** ``block_keys`` in ``1 .. S + 1`` (:func:`block_sizes`): most often
  smaller than ``S``, so that there are several blocks, and the last one is short when
  ``b`` does not divide ``S``; sometimes ``S`` or more (one block);
* **a partition of the keys** into up to four parts (:func:`partitions`), contiguous or
  not; parts may be empty;
* **a merge tree** over the parts (:func:`merge_trees`): any full binary tree, any order
  of the leaves (sequential folds, balanced trees, reversed orders);
* **fully hidden blocks on purpose**: in one case in three (``hidden_block=None``) the
  first block of keys ``0 .. b - 1`` is hidden from every query by the mask, and in half of
  those its keys and values hold NaN and infinities (a kernel that computes
  :math:`-\infty - (-\infty)` there, or multiplies a hidden value by 0, fails).

Every strategy is tested in ``tests/test_online.py`` to reach what this docstring says
(``hypothesis.find``).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from attnspec.spec.strategies.attention import FEATURES, AttentionCase, attention_cases

__all__ = [
    "OnlineCase",
    "Tree",
    "block_sizes",
    "hide_first_block",
    "merge_trees",
    "online_cases",
    "partitions",
    "tree_leaves",
]

#: a merge tree: a leaf (the index of a part) or a pair of trees
Tree = int | tuple["Tree", "Tree"]


def tree_leaves(tree: Tree) -> list[int]:
    """The leaves of ``tree``, left to right."""
    if isinstance(tree, int):
        return [tree]
    return tree_leaves(tree[0]) + tree_leaves(tree[1])


def _check_tree(tree: object, n_leaves: int) -> None:
    def leaves(t: object) -> list[int]:
        if isinstance(t, int) and not isinstance(t, bool):
            return [t]
        if isinstance(t, tuple) and len(t) == 2:
            return leaves(t[0]) + leaves(t[1])
        raise ValueError(f"a merge tree is an int or a pair of trees, got {t!r}")

    got = leaves(tree)
    if sorted(got) != list(range(n_leaves)):
        raise ValueError(
            f"the merge tree {tree!r} must have each part 0..{n_leaves - 1} once as a leaf, "
            f"has {sorted(got)}"
        )


@dataclass(frozen=True)
class OnlineCase:
    """An attention problem and how to cut it into blocks.

    ``case``: the problem; ``block_keys``: the block size of a blocked attention;
    ``parts``: a partition of the keys ``0 .. S - 1`` (a tuple of tuples of key indices,
    each key in exactly one part; parts may be empty); ``tree``: a merge tree over the
    parts (leaves ``0 .. len(parts) - 1``). Validated when made; ``repr`` reproduces it.
    """

    case: AttentionCase
    block_keys: int
    parts: tuple[tuple[int, ...], ...]
    tree: Tree

    def __post_init__(self) -> None:
        if isinstance(self.block_keys, bool) or not isinstance(self.block_keys, int):
            raise TypeError(f"block_keys must be an int, got {self.block_keys!r}")
        if self.block_keys < 1:
            raise ValueError(f"block_keys must be >= 1, got {self.block_keys}")
        keys = sorted(j for part in self.parts for j in part)
        if keys != list(range(self.case.n_keys)):
            raise ValueError(
                f"parts {self.parts!r} must hold each key 0..{self.case.n_keys - 1} once"
            )
        if not self.parts:
            raise ValueError("parts must hold at least one part (it may be empty)")
        _check_tree(self.tree, len(self.parts))

    def __repr__(self) -> str:
        return (
            f"OnlineCase({self.case!r}, block_keys={self.block_keys}, parts={self.parts!r}, "
            f"tree={self.tree!r})"
        )


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidArgument(f"Expected an int but got {name}={value!r} ({type(value).__name__})")
    if value < low:
        raise InvalidArgument(f"Expected {name} >= {low} but got {name}={value!r}")
    return int(value)


def block_sizes(n_keys: int) -> st.SearchStrategy[int]:
    """Block sizes for ``n_keys`` keys: ``1 .. n_keys + 1``, mostly below ``n_keys``."""
    n = _check_int("n_keys", n_keys, 0)
    if n <= 1:
        return st.integers(1, 2)
    return st.one_of(st.integers(1, max(1, n - 1)), st.integers(1, n + 1))


@st.composite
def _partitions(draw: st.DrawFn, n_keys: int, max_parts: int) -> tuple[tuple[int, ...], ...]:
    k = draw(st.integers(1, max_parts))
    if draw(st.booleans()):  # contiguous runs
        cuts = sorted(draw(st.lists(st.integers(0, n_keys), min_size=k - 1, max_size=k - 1)))
        bounds = [0, *cuts, n_keys]
        return tuple(tuple(range(bounds[i], bounds[i + 1])) for i in range(k))
    owner = draw(st.lists(st.integers(0, k - 1), min_size=n_keys, max_size=n_keys))
    return tuple(tuple(j for j in range(n_keys) if owner[j] == p) for p in range(k))


def partitions(n_keys: int, max_parts: int = 4) -> st.SearchStrategy[tuple[tuple[int, ...], ...]]:
    """Partitions of the keys ``0 .. n_keys - 1`` into ``1 .. max_parts`` parts (contiguous
    runs or any assignment; parts may be empty)."""
    n = _check_int("n_keys", n_keys, 0)
    m = _check_int("max_parts", max_parts, 1)
    return _partitions(n, m)


@st.composite
def _trees(draw: st.DrawFn, leaves: tuple[int, ...]) -> Tree:
    if len(leaves) == 1:
        return leaves[0]
    cut = draw(st.integers(1, len(leaves) - 1))
    left = draw(_trees(leaves[:cut]))
    right = draw(_trees(leaves[cut:]))
    return (left, right)


@st.composite
def _merge_trees(draw: st.DrawFn, n_leaves: int) -> Tree:
    order = draw(st.permutations(list(range(n_leaves))))
    return draw(_trees(tuple(order)))


def merge_trees(n_leaves: int) -> st.SearchStrategy[Tree]:
    """Full binary trees over the leaves ``0 .. n_leaves - 1`` in any order."""
    return _merge_trees(_check_int("n_leaves", n_leaves, 1))


def hide_first_block(case: AttentionCase, block_keys: int, poison: bool = False) -> AttentionCase:
    """``case`` with keys ``0 .. block_keys - 1`` hidden from every query by the mask (and,
    with ``poison``, NaN in their keys and NaN, +inf, -inf in their values)."""
    n_k = case.n_keys
    first = np.arange(n_k) < block_keys
    base = case.kwargs.get("mask")
    mask = ~first if base is None else (np.asarray(base, dtype=bool) & ~first)
    out = case.with_kwargs(mask=np.array(mask, dtype=bool))
    if not poison or not first.any():
        return out
    k, v = out.k.copy(), out.v.copy()
    k[..., first, 0] = np.nan
    fill = np.array([np.nan, np.inf, -np.inf])
    idx = np.flatnonzero(first)
    v[..., idx, :] = fill[np.arange(idx.size) % 3][:, None]
    return AttentionCase(out.q, k, v, out.kwargs)


@st.composite
def _online_cases(
    draw: st.DrawFn,
    features: frozenset[str],
    max_side: int,
    max_width: int,
    magnitude: str | None,
    hidden_block: bool | None,
    max_parts: int,
) -> OnlineCase:
    case = draw(
        attention_cases(
            features=features, max_side=max_side, max_width=max_width, magnitude=magnitude
        )
    )
    n_k = case.n_keys
    b = draw(block_sizes(n_k))
    hide = (draw(st.integers(0, 2)) == 0) if hidden_block is None else hidden_block
    if hide and n_k > 0 and "mask" in features:
        case = hide_first_block(case, b, poison=draw(st.booleans()))
    parts = draw(partitions(n_k, max_parts))
    tree = draw(merge_trees(len(parts)))
    return OnlineCase(case, b, parts, tree)


def online_cases(
    *,
    features: frozenset[str] | set[str] | tuple[str, ...] = FEATURES,
    max_side: int = 4,
    max_width: int = 4,
    magnitude: str | None = None,
    hidden_block: bool | None = None,
    max_parts: int = 4,
) -> st.SearchStrategy[OnlineCase]:
    """An :class:`OnlineCase` whose problem uses only ``features`` (default: all).

    ``max_side`` bounds L and S, ``max_width`` E and Ev, ``magnitude`` as for
    :func:`~attnspec.spec.strategies.attention.attention_cases`; ``hidden_block``: hide the
    first block always (needs the "mask" feature), never, or (None) in one case in three;
    ``max_parts``: the most parts of a partition. Bad arguments raise
    :class:`hypothesis.errors.InvalidArgument` here, when the strategy is built.
    """
    # attention_cases checks features, max_side, max_width and magnitude
    attention_cases(features=features, max_side=max_side, max_width=max_width, magnitude=magnitude)
    feats = frozenset(features)
    side, width = int(max_side), int(max_width)
    parts = _check_int("max_parts", max_parts, 1)
    if hidden_block is not None and not isinstance(hidden_block, bool):
        raise InvalidArgument(f"Expected a bool or None but got hidden_block={hidden_block!r}")
    if hidden_block and "mask" not in feats:
        raise InvalidArgument(
            f"hidden_block=True hides a block with the mask, but got features={features!r} "
            "without 'mask'"
        )
    return _online_cases(feats, side, width, magnitude, hidden_block, parts)
