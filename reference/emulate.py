r"""What a straightforward same-dtype attention kernel computes: a low-precision emulation.

The definition of :mod:`attnspec.reference.attention` (steps 1-8, every option) evaluated
in an arithmetic that works the way a kernel written in ``dtype`` does:

* the inputs ``q``, ``k``, ``v`` are values of ``dtype`` (they are rounded to it first);
  so are the bias, the sinks and every constant the definition lifts (the scale, the ALiBi
  slopes and distances, the dropout factor);
* every elementwise result is rounded to ``dtype``: :math:`\mathrm{fl}_d(a \circ b)` for
  :math:`\circ \in \{+, -, \times, /\}`, and :math:`\mathrm{fl}_d(e^{x})`,
  :math:`\mathrm{fl}_d(\tanh x)` of the float64 functions;
* dot products (the logits :math:`q_i \cdot k_j` and the output :math:`\sum_j p_{ij}
  v_{jk}`) and row sums are accumulated in ``accumulate`` (default float32 for the 16- and
  8-bit formats, float32 itself for float32): each product and each partial sum rounded
  to it (float32: a BLAS ``sgemm`` / numpy's pairwise sum; float16 and bfloat16: a
  sequential loop, the order of a naive kernel), and the dot product's result rounded to
  ``dtype``;
* the softmax is the max-shifted one of :mod:`attnspec.reference.softmax`:
  :math:`d_j = \mathrm{fl}_d(s_j - a)`, :math:`e_j = \mathrm{fl}_d(e^{d_j})`,
  :math:`l = \mathrm{fl}_a(1 + \sum_{j \ne k} e_j)` and the weights
  :math:`p_j = \mathrm{fl}_d(\mathrm{fl}_a(e_j / l))`, rounded to ``dtype`` before the
  product with the values, as FlashAttention rounds :math:`P` before :math:`PV`
  (Dao 2023, arXiv:2307.08691, Alg. 1);
* the output is rounded to ``dtype``; the lse :math:`\mathrm{fl}_a(a + \mathrm{fl}_a(\log
  l))` stays in the accumulation dtype.

Rounding is to nearest, ties to even, from the float64 value (:func:`round_to`); the
float64 result of each operation is first rounded to float64, which for
:math:`+, -, \times, /` of operands of at most 24 bits is innocuous (53 >= 2p + 2 bits;
Higham 2002, sec. 2.3), so each of them is correctly rounded to ``dtype``. Overflow gives
:math:`\pm\infty` (NaN in ``float8_e4m3fn``, which has no infinity, as ml_dtypes casts),
as a kernel's arithmetic would. The results are float64 arrays holding the low-precision
values. The error bounds that hold for this and for any kernel of the same kind are
derived in :mod:`attnspec.spec.tolerances.precision`.

References
----------
N. J. Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., SIAM, 2002,
doi:10.1137/1.9780898718027 (sec. 2.1-2.3, eq. 3.5).
T. Dao, FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning,
2023, arXiv:2307.08691.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, overload

import ml_dtypes
import numpy as np
import numpy.typing as npt

from attnspec.reference.arith import Move
from attnspec.reference.attention import SdpaOptions, evaluate
from attnspec.reference.backward import SdpaGradients, sdpa_gradients
from attnspec.reference.inputs import as_real_float64

__all__ = [
    "ACCUMULATES",
    "DTYPES",
    "FORMATS",
    "Format",
    "LowPrecision",
    "default_accumulate",
    "emulated_sdpa",
    "emulated_sdpa_backward",
    "get_formats",
    "round_to",
]

F64 = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Format:
    r"""A binary floating-point format: ``precision`` significand bits (the implicit bit
    included), smallest normal :math:`2^{e_{\min}}`, largest finite value ``max``, and what
    an overflow gives (``"inf"``, or ``"nan"`` for a format without infinities)."""

    name: str
    precision: int
    min_exponent: int
    max: float
    overflow: str

    @property
    def u(self) -> float:
        r"""The unit roundoff :math:`u = 2^{-p}`."""
        return 2.0**-self.precision

    @property
    def eta(self) -> float:
        r"""The smallest positive subnormal :math:`\eta = 2^{e_{\min} - p + 1}`."""
        return 2.0 ** (self.min_exponent - self.precision + 1)

    @property
    def tiny(self) -> float:
        r"""The smallest positive normal number :math:`2^{e_{\min}}`."""
        return 2.0**self.min_exponent

    def holds(self, other: Format) -> bool:
        """Whether every value of ``other`` is a value of this format."""
        return (
            self.precision >= other.precision
            and self.min_exponent <= other.min_exponent
            and self.max >= other.max
        )


#: The formats by name (values from IEEE 754-2019 and the ml_dtypes definitions of
#: bfloat16, float8_e4m3fn and float8_e5m2; tests/test_precision_bounds.py checks them
#: against numpy's and ml_dtypes' finfo).
FORMATS: dict[str, Format] = {
    "float64": Format("float64", 53, -1022, float(np.finfo(np.float64).max), "inf"),
    "float32": Format("float32", 24, -126, float(np.finfo(np.float32).max), "inf"),
    "float16": Format("float16", 11, -14, 65504.0, "inf"),
    "bfloat16": Format("bfloat16", 8, -126, float(ml_dtypes.finfo(ml_dtypes.bfloat16).max), "inf"),
    "float8_e4m3fn": Format("float8_e4m3fn", 4, -6, 448.0, "nan"),
    "float8_e5m2": Format("float8_e5m2", 3, -14, 57344.0, "inf"),
}

#: the dtypes a kernel may work in (``dtype=``)
DTYPES = ("float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2")
#: the dtypes it may accumulate in (``accumulate=``)
ACCUMULATES = ("float64", "float32", "float16", "bfloat16")


def _format_name(value: object, argument: str, allowed: tuple[str, ...]) -> str:
    if isinstance(value, str):
        name = value
    else:
        try:
            name = np.dtype(value).name  # type: ignore[call-overload]
        except TypeError:
            raise TypeError(
                f"{argument} must be a dtype name, one of {allowed!r}, got "
                f"{type(value).__name__} {value!r}"
            ) from None
    if name not in allowed:
        raise ValueError(f"{argument} must be one of {allowed!r}, got {value!r}")
    return name


def default_accumulate(dtype: str) -> str:
    """The accumulation dtype of a kernel in ``dtype`` unless it says otherwise: float32
    (the float32 accumulators of FlashAttention, cuBLAS and torch for 16- and 8-bit
    inputs; float32 itself for float32)."""
    return "float32"


def get_formats(dtype: object, accumulate: object = None) -> tuple[Format, Format]:
    """The formats of ``dtype`` and ``accumulate`` (None: :func:`default_accumulate`),
    validated: a TypeError or ValueError names the argument, what it got and what is
    allowed; ``accumulate`` must hold every value of ``dtype``."""
    d = FORMATS[_format_name(dtype, "dtype", DTYPES)]
    a_name = (
        default_accumulate(d.name)
        if accumulate is None
        else _format_name(accumulate, "accumulate", ACCUMULATES)
    )
    a = FORMATS[a_name]
    if not a.holds(d):
        raise ValueError(
            f"accumulate={a.name!r} cannot hold every {d.name} value ({a.name}: "
            f"{a.precision} significand bits, smallest normal 2**{a.min_exponent}, max "
            f"{a.max:g}; {d.name}: {d.precision} bits, 2**{d.min_exponent}, {d.max:g}); "
            "use float32 or float64"
        )
    return d, a


def round_to(x: npt.ArrayLike, dtype: str | Format) -> F64:
    r"""The values of ``x`` rounded to ``dtype`` (to nearest, ties to even), as float64.

    Directly from the float64 value (ml_dtypes' casts go through float32, which rounds
    :math:`1 + 2^{-8} + 2^{-30}` to bfloat16 1 instead of :math:`1 + 2^{-7}`). A value
    beyond the format's range gives :math:`\pm\infty`, or NaN for ``float8_e4m3fn``;
    :math:`\pm 0`, infinities and NaN keep their kind (also in ``float8_e4m3fn``, which
    has no infinity: the definition's :math:`-\infty` marks a hidden key, which no
    kernel stores as a number).

    >>> from attnspec.reference.emulate import round_to
    >>> round_to([0.1, 70000.0], "float16").tolist()
    [0.0999755859375, inf]
    >>> round_to(1 + 2**-8 + 2**-30, "bfloat16").item()  # above the midpoint: up
    1.0078125
    >>> round_to([1 + 2**-8 + 2**-30, 464.0, 465.0], "float8_e4m3fn").tolist()
    [1.0, 448.0, nan]
    """
    fmt = (
        dtype
        if isinstance(dtype, Format)
        else FORMATS[_format_name(dtype, "dtype", tuple(FORMATS))]
    )
    a = np.asarray(x, dtype=np.float64)
    if fmt.name == "float64":
        return np.array(a, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        _, e = np.frexp(a)  # |a| in [2**(e-1), 2**e)
        # the spacing of the format at |a| (the subnormal spacing below the normal range)
        quantum = np.maximum(e - 1, fmt.min_exponent) - (fmt.precision - 1)
        out = np.ldexp(np.round(np.ldexp(a, -quantum)), quantum)  # np.round: ties to even
        big = np.isfinite(a) & (np.abs(out) > fmt.max)
    if big.any():
        over = np.copysign(np.inf, a) if fmt.overflow == "inf" else np.nan
        out = np.where(big, over, out)
    return np.asarray(out, dtype=np.float64)


class LowPrecision:
    """The arithmetic of a kernel in ``dtype`` accumulating in ``accumulate``: numbers are
    float64 arrays holding values of the format (see the module docstring)."""

    chunk_elements = 0
    overflow = "ieee"

    def __init__(self, dtype: Format, accumulate: Format) -> None:
        self.dtype = dtype
        self.acc = accumulate
        self.name = f"emulated {dtype.name} (accumulate {accumulate.name})"

    # -- rounding ---------------------------------------------------------------------
    def _d(self, x: F64) -> F64:
        return round_to(x, self.dtype)

    def _a(self, x: F64) -> F64:
        return round_to(x, self.acc)

    def _dot(self, a: F64, b: F64) -> F64:
        """``a @ b`` with every product and partial sum in the accumulation dtype."""
        with np.errstate(invalid="ignore", over="ignore"):
            if self.acc.name == "float64":
                return np.matmul(a, b)
            if self.acc.name == "float32":
                return np.matmul(a.astype(np.float32), b.astype(np.float32)).astype(np.float64)
            shape = (*np.broadcast_shapes(a.shape[:-2], b.shape[:-2]), a.shape[-2], b.shape[-1])
            total = np.zeros(shape)
            for t in range(a.shape[-1]):  # the order of a naive loop
                total = self._a(total + self._a(a[..., :, t : t + 1] * b[..., t : t + 1, :]))
            return total

    def _row_sum(self, x: F64) -> F64:
        """The sum along the last axis (kept, length 1) in the accumulation dtype."""
        if self.acc.name == "float64":
            return np.sum(x, axis=-1, keepdims=True)
        if self.acc.name == "float32":
            s32 = np.sum(x.astype(np.float32), axis=-1, keepdims=True)
            return np.asarray(s32, dtype=np.float64)
        total = np.zeros((*x.shape[:-1], 1))
        for j in range(x.shape[-1]):
            total = self._a(total + x[..., j : j + 1])
        return total

    # -- the interface of attnspec.reference.arith.Arithmetic -------------------------
    def lift(self, x: F64) -> F64:
        return self._d(np.asarray(x, dtype=np.float64))

    def add(self, a: F64, b: F64) -> F64:
        with np.errstate(invalid="ignore", over="ignore"):
            return self._d(np.add(a, b))

    def sub(self, a: F64, b: F64) -> F64:
        with np.errstate(invalid="ignore", over="ignore"):
            return self._d(np.subtract(a, b))

    def mul(self, a: F64, b: F64) -> F64:
        with np.errstate(invalid="ignore", over="ignore"):
            return self._d(np.multiply(a, b))

    def div(self, a: F64, b: F64) -> F64:
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            return self._d(np.divide(a, b))

    def log1p(self, a: F64) -> F64:
        return self._a(np.log1p(a))

    def softcap(self, s: F64, c: float) -> F64:
        with np.errstate(invalid="ignore", over="ignore"):
            return self._d(c * self._d(np.tanh(self._d(s / c))))

    def matmul(self, a: F64, b: F64) -> F64:
        return self._d(self._dot(a, b))

    def take(self, a: F64, index: npt.NDArray[np.intp]) -> F64:
        return np.take_along_axis(a, index[..., None], axis=-1)

    def select(self, cond: npt.NDArray[np.bool_], a: F64, b: F64) -> F64:
        return np.where(cond, a, b)

    def approx(self, a: F64) -> F64:
        return a

    def rearrange(self, a: F64, move: Move) -> F64:
        return move(a)

    def _exp(self, d: F64) -> F64:
        with np.errstate(over="ignore", invalid="ignore"):
            return self._d(np.exp(d))

    def _others(self, e: F64, k: npt.NDArray[np.intp]) -> F64:
        rest = np.array(e)  # a copy: e is returned too
        np.put_along_axis(rest, k[..., None], 0.0, axis=-1)
        return self._row_sum(rest)

    def sum_others(self, d: F64, k: npt.NDArray[np.intp]) -> F64:
        return self._others(self._exp(d), k)

    def weights(self, d: F64, k: npt.NDArray[np.intp]) -> tuple[F64, F64]:
        e = self._exp(d)  # e_k = exp(0) = 1 exactly
        s = self._others(e, k)
        with np.errstate(invalid="ignore", over="ignore"):
            total = self._a(1.0 + s)
            return self._d(self._a(e / total)), s

    def lse(self, a: F64, d: F64, k: npt.NDArray[np.intp], s: F64) -> F64:
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            return self._a(a + self._a(np.log(self._a(1.0 + s))))

    def result(self, a: F64) -> F64:
        return a


@overload
def emulated_sdpa(
    q: npt.ArrayLike,
    k: npt.ArrayLike,
    v: npt.ArrayLike,
    *,
    dtype: object,
    accumulate: object = None,
    return_lse: Literal[False] = False,
    **options: Any,
) -> F64: ...


@overload
def emulated_sdpa(
    q: npt.ArrayLike,
    k: npt.ArrayLike,
    v: npt.ArrayLike,
    *,
    dtype: object,
    accumulate: object = None,
    return_lse: Literal[True],
    **options: Any,
) -> tuple[F64, F64]: ...


def emulated_sdpa(
    q: npt.ArrayLike,
    k: npt.ArrayLike,
    v: npt.ArrayLike,
    *,
    dtype: object,
    accumulate: object = None,
    return_lse: bool = False,
    **options: Any,
) -> F64 | tuple[F64, F64]:
    r"""Attention as a straightforward kernel in ``dtype`` computes it (module docstring).

    Parameters
    ----------
    q, k, v : array_like
        As for :func:`attnspec.sdpa`; rounded to ``dtype`` first (inputs in ``dtype``).
    dtype : str or dtype
        One of :data:`DTYPES`: float32, float16, bfloat16, float8_e4m3fn, float8_e5m2.
    accumulate : str or dtype, optional
        One of :data:`ACCUMULATES`, holding every value of ``dtype``; default float32.
    return_lse : bool
        Also return the lse (in the accumulation dtype).
    **options
        The other keyword arguments of :func:`attnspec.sdpa` (scale, mask, bias, causal,
        window, align, softcap, alibi_slopes, sinks, dropout_mask, dropout_p), validated
        as it validates them; ``precision`` is not one of them.

    Returns
    -------
    out : ndarray of float64, ``(..., Hq, L, Ev)``, holding ``dtype`` values
    lse : ndarray of float64, ``(..., Hq, L)``, holding ``accumulate`` values (only with
        ``return_lse=True``)

    Examples
    --------
    >>> import numpy as np
    >>> from attnspec.reference.emulate import emulated_sdpa
    >>> q = np.array([[1.0, 0.0]]); k = np.array([[1.0, 0.0], [0.0, 1.0]])
    >>> v = np.array([[0.1], [0.2]])
    >>> emulated_sdpa(q, k, v, dtype="bfloat16", scale=0.0).tolist()  # bf16(0.15)
    [[0.150390625]]
    """
    fmt, acc = get_formats(dtype, accumulate)
    opts = SdpaOptions.from_kwargs({**options, "return_lse": return_lse})
    q_d = round_to(as_real_float64(q, "q"), fmt)
    k_d = round_to(as_real_float64(k, "k"), fmt)
    v_d = round_to(as_real_float64(v, "v"), fmt)
    result: F64 | tuple[F64, F64] = evaluate(LowPrecision(fmt, acc), q_d, k_d, v_d, opts)
    return result


def emulated_sdpa_backward(
    q: npt.ArrayLike,
    k: npt.ArrayLike,
    v: npt.ArrayLike,
    dout: npt.ArrayLike,
    *,
    dlse: npt.ArrayLike | None = None,
    dtype: object,
    accumulate: object = None,
    **options: Any,
) -> SdpaGradients:
    r"""The gradients of attention as a straightforward kernel in ``dtype`` computes them.

    The closed forms of :mod:`attnspec.reference.backward` (the same code,
    :func:`~attnspec.reference.backward.sdpa_gradients`) in the arithmetic
    :class:`LowPrecision` of :func:`emulated_sdpa`: the weights :math:`\hat P` recomputed
    as the forward computes them (rounded to ``dtype``), :math:`dP = \mathrm{fl}_d(dO\,
    V^\top)` accumulated in ``accumulate``, :math:`D_i = \mathrm{fl}_d(\sum_e
    \mathrm{fl}_d(dO_{ie} \hat O_{ie}))` from the emulated forward output :math:`\hat O`
    (rounded to ``dtype``, as the output the forward stored), :math:`dZ =
    \mathrm{fl}_d(\hat P\, \mathrm{fl}_d(\mathrm{fl}_d(dP - D) + d\ell))`, the softcap's
    factor :math:`\mathrm{fl}_d(1 - \mathrm{fl}_d(r^2))`, :math:`r = \mathrm{fl}_d(\hat t
    / c)`, and :math:`dQ = \mathrm{fl}_d(\mathrm{fl}_d(dS\, K)\, \hat\tau)`,
    :math:`dK = \mathrm{fl}_d(\mathrm{fl}_d(dS^\top Q)\, \hat\tau)`, :math:`dV =
    \mathrm{fl}_d(\hat{\tilde P}^\top dO)`, each product accumulated in ``accumulate``;
    sums over GQA groups and broadcast axes of at most eight terms one addition at a time
    in ``dtype``, of more terms accumulated in ``accumulate``. Every intermediate is a
    value of ``dtype``: the naive order of a kernel that stores each step (PyTorch's
    math backend in ``dtype``).

    Parameters
    ----------
    q, k, v, dout : array_like
        As for :func:`attnspec.sdpa_backward`; rounded to ``dtype`` first.
    dlse : array_like, optional
        The gradient of the lse, rounded to ``accumulate`` (a kernel takes it in its
        accumulation dtype, as FlashAttention's float32 ``dsoftmax_sum``), then lifted.
    dtype, accumulate, **options
        As for :func:`emulated_sdpa` (``return_lse`` is not taken).

    Returns
    -------
    SdpaGradients
        ``(dq, dk, dv, dbias, dsinks)``, float64 arrays holding ``dtype`` values.

    Examples
    --------
    >>> import numpy as np
    >>> from attnspec.reference.emulate import emulated_sdpa_backward
    >>> q = np.array([[1.0, 0.0]]); k = np.array([[1.0, 0.0], [0.0, 1.0]])
    >>> v = np.array([[0.1], [0.2]])
    >>> emulated_sdpa_backward(q, k, v, np.ones((1, 1)), dtype="bfloat16", scale=0.0).dv.tolist()
    [[0.5], [0.5]]
    """
    fmt, acc = get_formats(dtype, accumulate)
    if "return_lse" in options:
        raise TypeError("emulated_sdpa_backward takes no return_lse: pass dlse= instead")
    opts = SdpaOptions.from_kwargs({**options, "return_lse": False})
    q_d = round_to(as_real_float64(q, "q"), fmt)
    k_d = round_to(as_real_float64(k, "k"), fmt)
    v_d = round_to(as_real_float64(v, "v"), fmt)
    do_d = round_to(as_real_float64(dout, "dout"), fmt)
    dl = None if dlse is None else round_to(as_real_float64(dlse, "dlse"), acc)
    return sdpa_gradients(LowPrecision(fmt, acc), q_d, k_d, v_d, do_d, dl, opts)
