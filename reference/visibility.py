r"""Who may attend to whom: masks, causal alignment, sliding windows.

Decided in this one place so that the forward pass, the backward pass and the blocked
algorithm cannot disagree.

Query :math:`i \in [0, L)` and key :math:`j \in [0, S)` are aligned by an offset
:math:`o`: ``"top_left"`` puts query 0 next to key 0 (:math:`o = 0`, torch's
``is_causal``); ``"bottom_right"`` puts the last query next to the last key
(:math:`o = S - L`, FlashAttention's ``causal`` since v2.1, the convention of a KV
cache where the queries are the newest tokens). Key :math:`j` is visible to query
:math:`i` when

* ``mask[i, j]`` is True (True = may attend), and
* with ``causal``: :math:`j \le i + o`, and
* with ``window=(left, right)``: :math:`i + o - \mathrm{left} \le j \le i + o + \mathrm{right}`
  (None for a side means unbounded).

When :math:`L = S` both alignments give :math:`o = 0`, so ``align`` may be left out;
otherwise it must be given whenever it matters (causal, window, ALiBi).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["ALIGNMENTS", "alignment_offset", "check_window", "relative_position", "visible"]

ALIGNMENTS = ("top_left", "bottom_right")


def alignment_offset(n_queries: int, n_keys: int, align: str | None, needed_by: str) -> int:
    """The offset ``o`` such that query ``i`` sits at key position ``i + o``.

    ``needed_by`` names the argument that needs the alignment (for the error).
    """
    if align is not None and align not in ALIGNMENTS:
        raise ValueError(f"align must be one of {ALIGNMENTS!r} or None, got {align!r}")
    if align is None:
        if n_queries != n_keys:
            raise ValueError(
                f"{needed_by} with L={n_queries} queries and S={n_keys} keys needs an explicit "
                "align=: 'top_left' puts query 0 next to key 0 (torch's is_causal), "
                "'bottom_right' puts the last query next to the last key (FlashAttention's "
                "causal, a KV cache); the reference does not guess"
            )
        return 0
    return 0 if align == "top_left" else n_keys - n_queries


def check_window(window: object) -> tuple[int | None, int | None] | None:
    """Validate ``window``: None, or ``(left, right)`` with ints >= 0 or None."""
    if window is None:
        return None
    if not isinstance(window, tuple | list) or len(window) != 2:
        raise ValueError(
            f"window must be None or a pair (left, right) of ints >= 0 or None, got {window!r}"
        )
    sides: list[int | None] = []
    for side_name, side in zip(("left", "right"), window, strict=True):
        if side is None:
            sides.append(None)
            continue
        if isinstance(side, bool) or not isinstance(side, int | np.integer):
            raise ValueError(f"window {side_name} side must be an int >= 0 or None, got {side!r}")
        if side < 0:
            raise ValueError(
                f"window {side_name} side must be >= 0 (None for unbounded), got {int(side)}; "
                "the window is i + o - left <= j <= i + o + right"
            )
        sides.append(int(side))
    return sides[0], sides[1]


def relative_position(
    n_queries: int, n_keys: int, offset: int, rows: tuple[int, int] | None = None
) -> npt.NDArray[np.int64]:
    """``j - (i + o)`` for every query ``i`` and key ``j``: shape (L, S).

    ``rows=(start, stop)`` gives only the queries ``start <= i < stop``.
    """
    start, stop = (0, n_queries) if rows is None else rows
    i = np.arange(start, stop, dtype=np.int64)[:, None]
    j = np.arange(n_keys, dtype=np.int64)[None, :]
    return j - (i + offset)


def visible(
    n_queries: int,
    n_keys: int,
    *,
    causal: bool = False,
    window: tuple[int | None, int | None] | None = None,
    offset: int = 0,
    rows: tuple[int, int] | None = None,
) -> npt.NDArray[np.bool_] | None:
    """The (L, S) pattern of causal and window visibility, or None when all is visible.

    A user ``mask`` is combined with it by the caller (logical and).
    ``rows=(start, stop)`` gives only the queries ``start <= i < stop``.
    """
    if not causal and window is None:
        return None
    rel = relative_position(n_queries, n_keys, offset, rows)  # j - (i + o)
    seen = np.ones(rel.shape, dtype=bool)
    if causal:
        seen &= rel <= 0
    if window is not None:
        left, right = window
        if left is not None:
            seen &= rel >= -left
        if right is not None:
            seen &= rel <= right
    return seen
