"""Rounding exact numbers to float64."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["to_float64"]

_to_float = np.frompyfunc(float, 1, 1)


def to_float64(a: object) -> npt.NDArray[np.float64]:
    """Round an array of mpmath numbers to float64 (round to nearest)."""
    arr = np.asarray(a, dtype=object)
    # Values beyond the float64 range round to +-inf, correctly, and mpf('nan') to
    # NaN: numpy's object loop reports both, so silence it here only.
    with np.errstate(over="ignore", invalid="ignore"):
        return np.asarray(_to_float(arr), dtype=np.float64).reshape(arr.shape)
