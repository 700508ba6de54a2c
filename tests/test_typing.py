"""What the types say: ``sdpa`` returns an array, or a pair with ``return_lse=True``.

The assertions are static: ``.ci/typecheck`` runs mypy on this file against the
installed package (``typing.assert_type`` fails there when the overloads are wrong).
At run time the test checks the same thing on the values.
"""

from __future__ import annotations

from typing import assert_type

import numpy as np
import numpy.typing as npt

import attnspec

F64 = npt.NDArray[np.float64]


def test_sdpa_return_types_follow_return_lse() -> None:
    q = k = v = np.ones((1, 2, 3, 4))
    out = attnspec.sdpa(q, k, v)
    assert_type(out, F64)
    pair = attnspec.sdpa(q, k, v, return_lse=True)
    assert_type(pair, tuple[F64, F64])
    o, lse = pair
    assert isinstance(out, np.ndarray) and out.shape == (1, 2, 3, 4)
    assert o.shape == (1, 2, 3, 4) and lse.shape == (1, 2, 3)
