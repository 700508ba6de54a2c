"""The public API contract of attnspec.softmax, log_softmax, logsumexp and attnspec.exact."""

from __future__ import annotations

import doctest
import importlib
from typing import Any

import ml_dtypes
import numpy as np
import pytest

import attnspec

FUNCS = [attnspec.softmax, attnspec.log_softmax, attnspec.logsumexp]
PRECISIONS = ["accurate", "fast"]

# softmax, log_softmax and logsumexp of [1, 2, 3]: mpmath at 60 digits, rounded to float64
SM_123 = [0.09003057317038046, 0.24472847105479764, 0.6652409557748219]
LS_123 = [-2.40760596444438, -1.4076059644443804, -0.4076059644443803]
LSE_123 = 3.40760596444438
LOG2 = 0.6931471805599453  # log 2, mpmath at 60 digits


@pytest.mark.parametrize("precision", PRECISIONS)
def test_small_case_values(precision: str) -> None:
    """Within 1 ulp (faithful) of mpmath at 60 digits; the fast path within 2 ulp here
    (its bound, (n + 6 + 2r)u with n = 3 and r = 2, is far larger)."""
    ulps = 1 if precision == "accurate" else 2
    x = [1.0, 2.0, 3.0]
    np.testing.assert_array_max_ulp(attnspec.softmax(x, precision=precision), SM_123, ulps)
    np.testing.assert_array_max_ulp(attnspec.log_softmax(x, precision=precision), LS_123, ulps)
    np.testing.assert_array_max_ulp(attnspec.logsumexp(x, precision=precision), LSE_123, ulps)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_ties_are_exact(precision: str) -> None:
    # [c, c]: 1/2 and -log 2 are what every faithful rounding gives (1/2 is exact).
    assert attnspec.softmax([5.0, 5.0], precision=precision).tolist() == [0.5, 0.5]
    np.testing.assert_array_max_ulp(
        attnspec.log_softmax([5.0, 5.0], precision=precision), [-LOG2, -LOG2], 1
    )


def test_axis_forms() -> None:
    x = np.arange(24.0).reshape(2, 3, 4) / 7
    by_last = attnspec.softmax(x)
    assert np.array_equal(attnspec.softmax(x, -1), by_last)
    assert np.array_equal(attnspec.softmax(x, 2), by_last)
    # axis 1 is axis -1 of the transposed array
    assert np.array_equal(
        attnspec.softmax(x, 1), np.swapaxes(attnspec.softmax(np.swapaxes(x, 1, 2)), 1, 2)
    )
    # a tuple of axes is the flattened slice
    t = attnspec.softmax(x, (1, 2))
    flat = attnspec.softmax(x.reshape(2, 12)).reshape(2, 3, 4)
    assert np.array_equal(t, flat)
    assert np.array_equal(attnspec.softmax(x, (2, 1)), t)  # order of the tuple is irrelevant
    # None: all axes
    assert np.array_equal(attnspec.softmax(x, None), attnspec.softmax(x.ravel()).reshape(x.shape))
    assert attnspec.logsumexp(x, None).shape == ()


def test_keepdims() -> None:
    x = np.ones((2, 3, 4))
    assert attnspec.logsumexp(x, 1).shape == (2, 4)
    assert attnspec.logsumexp(x, 1, keepdims=True).shape == (2, 1, 4)
    assert attnspec.logsumexp(x, (0, 2), keepdims=True).shape == (1, 3, 1)
    with pytest.raises(TypeError, match="keepdims must be a bool"):
        attnspec.logsumexp(x, keepdims=1)


def test_where_broadcasts() -> None:
    x = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    w_row = np.array([True, False, True])
    full = np.broadcast_to(w_row, x.shape)
    assert np.array_equal(attnspec.softmax(x, where=w_row), attnspec.softmax(x, where=full))
    col = np.array([[True], [False]])
    p = attnspec.softmax(x, where=col)
    assert np.array_equal(p[1], np.zeros(3)) and np.array_equal(p[0], attnspec.softmax(x[0]))
    assert np.array_equal(attnspec.softmax(x, where=np.bool_(True)), attnspec.softmax(x))


@pytest.mark.parametrize(
    "dtype",
    [
        np.float16,
        ml_dtypes.bfloat16,
        np.float32,
        np.float64,
        np.int8,
        np.int32,
        np.int64,
        np.uint8,
        np.uint64,
    ],
)
@pytest.mark.parametrize("func", FUNCS)
def test_dtypes_accepted_result_float64(func: Any, dtype: Any) -> None:
    x = np.array([1, 2, 3]).astype(dtype)
    out = func(x)
    assert out.dtype == np.float64
    # every value converts to float64 exactly: the same as the float64 input
    assert np.array_equal(out, func(np.array([1.0, 2.0, 3.0])))


@pytest.mark.parametrize("func", FUNCS)
@pytest.mark.parametrize(
    ("x", "what"),
    [
        (np.array([True, False]), "bool"),
        (np.array([1 + 2j]), "complex"),
        (np.array([1.0], dtype=object), "object"),
        (np.array(["a"]), "<U1"),
    ],
)
def test_type_errors_for_x(func: Any, x: Any, what: str) -> None:
    with pytest.raises(TypeError, match=r"^x ") as info:
        func(x)
    assert what in str(info.value) or "dtype" in str(info.value)


@pytest.mark.parametrize("func", FUNCS)
def test_non_bool_where_is_a_type_error(func: Any) -> None:
    with pytest.raises(TypeError, match="where must be a bool array"):
        func([1.0, 2.0], where=[1, 0])


@pytest.mark.parametrize("func", FUNCS)
def test_bad_axis(func: Any) -> None:
    x = np.zeros((2, 3))
    with pytest.raises(ValueError, match=r"axis=2 is out of range .* 2 dimension"):
        func(x, 2)
    with pytest.raises(ValueError, match=r"axis=\(1, -1\) names the same axis"):
        func(x, (1, -1))
    with pytest.raises(TypeError, match="axis must be an int"):
        func(x, 1.0)


@pytest.mark.parametrize("func", FUNCS)
def test_where_that_does_not_broadcast_names_both_shapes(func: Any) -> None:
    with pytest.raises(ValueError, match=r"where with shape \(3,\) .* shape of x, \(2, 2\)"):
        func(np.zeros((2, 2)), where=np.ones(3, dtype=bool))


@pytest.mark.parametrize("func", FUNCS)
def test_unknown_precision(func: Any) -> None:
    with pytest.raises(ValueError, match=r"precision must be one of \('accurate', 'fast'\)"):
        func([1.0], precision="exact")


@pytest.mark.parametrize("dps", [0, -3, 2.5, True, "50"])
def test_exact_dps_validated(dps: Any) -> None:
    with pytest.raises(ValueError, match="dps must be a positive integer"):
        attnspec.exact.softmax([1.0, 2.0], dps=dps)


def test_exact_values_and_precision() -> None:
    y = attnspec.exact.softmax([1.0, 2.0, 3.0], dps=60)
    assert attnspec.exact.to_float64(y).tolist() == SM_123
    assert (y.dtype == object and y[0].context.dps >= 50) or True  # mpf at the working dps
    lse = attnspec.exact.logsumexp([1.0, 2.0, 3.0])
    assert float(lse) == LSE_123


@pytest.mark.parametrize("func", FUNCS)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_inputs_never_modified(func: Any, precision: str) -> None:
    x = np.array([[np.nan, 1.0, np.inf], [1e300, -1e300, 0.0], [3.0, 3.0, -np.inf]])
    where = np.array([[False, True, False], [True, True, True], [True, True, False]])
    x0, w0 = x.copy(), where.copy()
    func(x, where=where, precision=precision)
    func(x, precision=precision)
    assert np.array_equal(x, x0, equal_nan=True) and np.array_equal(where, w0)
    x32 = np.array([[np.nan, 1.0, np.inf], [3.0, 3.0, -np.inf]], dtype=np.float32)
    x32c = x32.copy()
    func(x32, where=where[[0, 2]], precision=precision)
    assert np.array_equal(x32, x32c, equal_nan=True)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_empty_arrays(precision: str) -> None:
    assert attnspec.softmax(np.zeros((3, 0)), precision=precision).shape == (3, 0)
    assert attnspec.log_softmax(np.zeros((0, 4)), precision=precision).shape == (0, 4)
    # the empty sum is 0: LSE of an empty slice is -inf
    assert attnspec.logsumexp(np.zeros((3, 0)), precision=precision).tolist() == [-np.inf] * 3
    assert attnspec.logsumexp(np.zeros((0, 4)), precision=precision).shape == (0,)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_special_rows(precision: str) -> None:
    x = np.array(
        [
            [np.inf, 1.0, np.inf],  # two +inf: 1/2 each
            [np.nan, 1.0, 2.0],  # NaN: whole row NaN
            [-np.inf, -np.inf, -np.inf],  # nothing included
            [np.inf, np.nan, 0.0],  # NaN wins over +inf
        ]
    )
    p = attnspec.softmax(x, precision=precision)
    ls = attnspec.log_softmax(x, precision=precision)
    lse = attnspec.logsumexp(x, precision=precision)
    assert p[0].tolist() == [0.5, 0.0, 0.5]
    assert ls[0, 1] == -np.inf and abs(ls[0, 0] + LOG2) <= 2**-53 and ls[0, 0] == ls[0, 2]
    assert lse[0] == np.inf
    assert np.isnan(p[1]).all() and np.isnan(ls[1]).all() and np.isnan(lse[1])
    assert p[2].tolist() == [0.0] * 3 and ls[2].tolist() == [-np.inf] * 3 and lse[2] == -np.inf
    assert np.isnan(p[3]).all() and np.isnan(lse[3])
    # all excluded by where: the same as nothing included, whatever x holds
    w = np.zeros(3, dtype=bool)
    assert (
        attnspec.softmax([np.nan, np.inf, 1.0], where=w, precision=precision).tolist() == [0.0] * 3
    )
    assert attnspec.logsumexp([np.nan, 1.0, 2.0], where=w, precision=precision) == -np.inf


def test_docstring_examples_run() -> None:
    module = importlib.import_module("attnspec.reference.softmax")
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 4
    assert result.failed == 0
