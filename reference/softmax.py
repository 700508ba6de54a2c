r"""softmax, log_softmax and logsumexp: the definition.

For a slice :math:`x \in \mathbb{R}^n` and the set :math:`V` of its included entries
(``where`` True and not :math:`-\infty`), pick one :math:`k \in V` with
:math:`x_k = a = \max_{j \in V} x_j` and let

.. math::

    d_j = x_j - a, \qquad s' = \sum_{j \in V,\, j \ne k} e^{d_j}.

Then, for :math:`j \in V`,

.. math::

    \operatorname{softmax}(x)_j = \frac{e^{d_j}}{1 + s'}, \qquad
    \operatorname{log\_softmax}(x)_j = d_j - \log(1 + s'), \qquad
    \operatorname{LSE}(x) = a + \log(1 + s'),

and softmax is 0 and log_softmax is :math:`-\infty` for :math:`j \notin V`. This is
the same function as :math:`e^{x_j} / \sum_{i \in V} e^{x_i}` (the max-shift identity,
proved in ``spec/derivations/softmax.py``), written so that no term overflows, the
largest term is exactly 1, and :math:`\log(1+s')` is evaluated as ``log1p`` of the
sum of the other terms (Blanchard, Higham & Higham 2021, Alg. 4.1).

Special slices, decided here for every arithmetic alike:

* empty or nothing included: softmax 0, log_softmax :math:`-\infty`, LSE :math:`-\infty`
  (the empty sum is 0);
* an included NaN: the whole slice is NaN, but for the entries that carry no weight
  whatever the others hold (excluded ones and :math:`-\infty`): softmax 0 and
  log_softmax :math:`-\infty` there, as at a hidden key of attention;
* included :math:`+\infty` entries (and no NaN): the limit
  :math:`t \to \infty` of :math:`\operatorname{softmax}(x + t\,\mathbb{1}_I)` with the
  infinite entries :math:`I` sharing one finite part: weight :math:`1/|I|` on each
  infinite entry and 0 elsewhere, log_softmax :math:`-\log|I|` and :math:`-\infty`,
  LSE :math:`+\infty`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from attnspec.reference.arith import Arithmetic, get_arithmetic
from attnspec.reference.inputs import as_real_float64, as_where, check_size, normalize_axes

__all__ = ["log_softmax", "logsumexp", "softmax"]

F64 = npt.NDArray[np.float64]
_KINDS = ("softmax", "log_softmax", "logsumexp")


def softmax(
    x: npt.ArrayLike,
    axis: int | tuple[int, ...] | None = -1,
    *,
    where: npt.ArrayLike | None = None,
    precision: str = "accurate",
) -> F64:
    r"""Softmax along ``axis``: :math:`e^{x_j} / \sum_{i} e^{x_i}`.

    Parameters
    ----------
    x : array_like
        Real input: float16, bfloat16, float32, float64 or integers.
    axis : int, tuple of ints or None
        The axis or axes that form one slice (None: all axes). Default -1.
    where : array_like of bool, optional
        Broadcasts to ``x``; False entries are excluded: their weight is exactly 0
        and whatever they hold (NaN, inf) never reaches the result.
    precision : {"accurate", "fast"}
        "accurate" (default) rounds each result to within one ulp of the exact value;
        "fast" is plain float64 (error bound of Blanchard, Higham & Higham 2021,
        Thm 4.3).

    Returns
    -------
    ndarray of float64, the shape of ``x``. A slice with nothing included is all 0;
    see the module docstring for NaN and infinite entries.

    Examples
    --------
    >>> import attnspec
    >>> attnspec.softmax([0.0, 0.0, 0.0, 0.0])
    array([0.25, 0.25, 0.25, 0.25])
    >>> attnspec.softmax([1000.0, 0.0], where=[True, False])
    array([1., 0.])
    """
    return _evaluate("softmax", x, axis, where, precision, keepdims=False)


def log_softmax(
    x: npt.ArrayLike,
    axis: int | tuple[int, ...] | None = -1,
    *,
    where: npt.ArrayLike | None = None,
    precision: str = "accurate",
) -> F64:
    r"""Log-softmax along ``axis``: :math:`x_j - \log \sum_i e^{x_i}`.

    Arguments as for :func:`softmax`. Excluded entries, and every entry of a slice
    with nothing included, are :math:`-\infty`.

    Examples
    --------
    >>> import attnspec
    >>> attnspec.log_softmax([0.0, 0.0])
    array([-0.69314718, -0.69314718])
    """
    return _evaluate("log_softmax", x, axis, where, precision, keepdims=False)


def logsumexp(
    x: npt.ArrayLike,
    axis: int | tuple[int, ...] | None = -1,
    *,
    where: npt.ArrayLike | None = None,
    keepdims: bool = False,
    precision: str = "accurate",
) -> F64:
    r"""Log-sum-exp along ``axis``: :math:`\log \sum_i e^{x_i}`.

    Arguments as for :func:`softmax`; ``keepdims=True`` keeps the reduced axes with
    length 1. An empty slice, or one with nothing included, gives :math:`-\infty`.

    Examples
    --------
    >>> import attnspec
    >>> float(attnspec.logsumexp([1000.0, 1000.0]))  # 1000 + log 2, no overflow
    1000.6931471805599
    """
    return _evaluate("logsumexp", x, axis, where, precision, keepdims=keepdims)


def _evaluate(
    kind: str,
    x: object,
    axis: object,
    where: object,
    precision: object,
    keepdims: bool,
    arith: Arithmetic[Any] | None = None,
) -> Any:
    """Validate, bring the slices into rows, evaluate the definition, restore shape."""
    if arith is None:
        arith = get_arithmetic(precision)
    x64 = as_real_float64(x, "x")
    check_size(x64.size, arith.name, "entries of x")
    axes = normalize_axes(axis, x64.ndim)
    w = None if where is None else as_where(where, x64.shape)
    if not isinstance(keepdims, bool | np.bool_):
        raise TypeError(f"keepdims must be a bool, got {keepdims!r}")

    layout = Rows(x64.shape, axes)
    rows_w = None if w is None else layout.rows(w)
    out = _rows(kind, layout.rows(x64), rows_w, arith)
    if kind == "logsumexp":
        return layout.reduced(out, keepdims)
    return layout.full(out)


class Rows:
    """The slices of an array along ``axes`` as the rows of a 2-D array (R, n): the slice
    axes moved last and flattened; and back."""

    def __init__(self, shape: tuple[int, ...], axes: tuple[int, ...]) -> None:
        self.shape, self.axes = shape, axes
        kept = tuple(a for a in range(len(shape)) if a not in axes)
        self.order = kept + axes
        self.kept_shape = tuple(shape[a] for a in kept)
        self.n = int(np.prod([shape[a] for a in axes], dtype=np.int64))
        self.n_rows = int(np.prod(self.kept_shape, dtype=np.int64))

    def rows(self, a: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """``a`` (of ``shape``) as rows (R, n)."""
        return np.transpose(a, self.order).reshape(self.n_rows, self.n)

    def full(self, rows: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """Rows (R, n) back in ``shape``."""
        full = rows.reshape(self.kept_shape + tuple(self.shape[a] for a in self.axes))
        return np.transpose(full, np.argsort(self.order))

    def reduced(self, values: npt.NDArray[Any], keepdims: bool) -> npt.NDArray[Any]:
        """One value per row (R,) in the reduced shape (the slice axes kept with length 1
        for ``keepdims``)."""
        out = values.reshape(self.kept_shape)
        return np.expand_dims(out, self.axes) if keepdims else out


def _rows(kind: str, x: F64, where: npt.NDArray[np.bool_] | None, arith: Arithmetic[Any]) -> Any:
    """Evaluate ``kind`` on each row of ``x`` (shape (R, n)), in blocks of rows."""
    n_rows, n = x.shape
    if kind == "logsumexp":
        if n == 0:  # the empty sum is 0, its log -inf
            return arith.result(arith.lift(np.full(n_rows, -np.inf)))
    elif n == 0 or n_rows == 0:
        return arith.result(arith.lift(np.empty((n_rows, n))))

    block = n_rows if arith.chunk_elements <= 0 else max(1, arith.chunk_elements // n)
    if block >= n_rows:
        return _block(kind, x, where, arith)
    # Each block's result goes straight into the output (no list of parts to concatenate).
    out: Any = None
    for r in range(0, n_rows, block):
        part = _block(
            kind, x[r : r + block], None if where is None else where[r : r + block], arith
        )
        if out is None:
            out = np.empty((n_rows, *part.shape[1:]), dtype=part.dtype)
        out[r : r + block] = part
    return out


def _block(kind: str, x: F64, where: npt.NDArray[np.bool_] | None, arith: Arithmetic[Any]) -> Any:
    """The definition (:func:`normalise`), on a block of rows of length n >= 1."""
    if where is not None:
        # Excluded entries become -inf: weight 0, whatever they held.
        x = np.where(where, x, -np.inf)
    name = "lse" if kind == "logsumexp" else kind
    out = arith.result(normalise(arith, arith.lift(x), x, (name,))[name])
    return out[:, 0] if kind == "logsumexp" else out


def normalise(
    arith: Arithmetic[Any], logits: Any, approx: F64, want: tuple[str, ...]
) -> dict[str, Any]:
    """The definition on numbers of ``arith``: softmax, log_softmax and LSE of each row.

    The one place where the definition and its special rows are written: the softmax
    family (:func:`softmax`, ...) and :func:`attnspec.sdpa` both call it.

    ``logits`` holds numbers of the arithmetic, shape (..., n) with n >= 1, excluded
    entries already -inf; ``approx`` the same values rounded to float64 (used only to
    choose the maximum term k and to find the special rows). ``want`` names the
    outputs ("softmax", "log_softmax", "lse"); they are returned as numbers of the
    arithmetic (LSE with the last axis kept), with the special-row rules applied.
    """
    if approx.shape[-1] == 0:  # nothing to attend to: the empty-slice rule
        empty: dict[str, Any] = {
            "softmax": logits,
            "log_softmax": logits,
            "lse": arith.lift(np.full((*approx.shape[:-1], 1), -np.inf)),
        }
        return {name: empty[name] for name in want}
    k = np.argmax(approx, axis=-1)
    top = np.take_along_axis(approx, k[..., None], axis=-1)[..., 0]
    special = ~np.isfinite(top)
    if special.any():
        nan_rows = np.isnan(top)
        posinf_rows = top == np.inf
        empty_rows = top == -np.inf
        # +inf rows: the limit is softmax over the infinite entries, taken as equal;
        # empty and NaN rows: any finite stand-in, the results are replaced below.
        with np.errstate(invalid="ignore"):  # NaN == inf compares False, quietly
            standin = np.where(
                posinf_rows[..., None], np.where(approx == np.inf, 0.0, -np.inf), 0.0
            )
        logits = arith.select(special[..., None], arith.lift(standin), logits)
        k = np.where(special, np.argmax(standin, axis=-1), k)

    a = arith.take(logits, k)  # the maximum term, shape (..., 1)
    d = arith.sub(logits, a)  # d_j = x_j - a; d_k = 0
    if arith.overflow != "ieee":
        # The maximum was chosen from float64 roundings of the logits: two logits that
        # round alike (1e19 and 1e19 + 1000) may come in the wrong order, leaving a
        # positive d_j whose exponential overflows. The shifted logits are exact enough
        # to order: take the largest of them. (Plain float64 holds its logits as they
        # are rounded: its maximum is the maximum.)
        shifted = arith.approx(d)
        ahead = np.any(shifted > 0, axis=-1)
        if ahead.any():
            k = np.where(ahead, np.argmax(shifted, axis=-1), k)
            a = arith.take(logits, k)
            d = arith.sub(logits, a)
    out: dict[str, Any] = {}
    if "softmax" in want:
        # p_j = e^{d_j} / (1 + s'), s' = sum_{j != k} e^{d_j}
        out["softmax"], s = arith.weights(d, k)
    else:
        s = arith.sum_others(d, k)
    if "log_softmax" in want:
        out["log_softmax"] = arith.sub(d, arith.log1p(s))  # d_j - log(1 + s')
    if "lse" in want:
        out["lse"] = arith.lse(a, d, k, s)  # a + log(1 + s')

    if special.any():
        rules = {
            "softmax": (0.0, np.nan, None),
            "log_softmax": (-np.inf, np.nan, None),
            "lse": (-np.inf, np.nan, np.inf),
        }
        # in a NaN row the entries that carry no weight (excluded, or -inf) keep their
        # rule: softmax 0, log_softmax -inf, as in attention's step 6 (0 at hidden keys)
        no_weight = nan_rows[..., None] & (approx == -np.inf)
        for name in out:
            empty_value, nan_value, posinf_value = rules[name]
            fix = np.where(empty_rows, empty_value, nan_value)
            rows = empty_rows | nan_rows
            if posinf_value is not None:
                fix = np.where(posinf_rows, posinf_value, fix)
                rows = rows | posinf_rows
            fix = fix[..., None]
            if name != "lse":
                fix = np.where(no_weight, empty_value, fix)
            out[name] = arith.select(rows[..., None], arith.lift(fix), out[name])
    return out
