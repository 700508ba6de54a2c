"""The reference definitions evaluated exactly (Arb balls, proved; or mpmath); see
attnspec.reference.exact."""

from attnspec.reference.exact import (
    BACKENDS,
    DEFAULT_DPS,
    MAX_BITS,
    UNDECIDED,
    UndecidedRounding,
    log_softmax,
    log_softmax_vjp,
    logsumexp,
    logsumexp_vjp,
    sdpa,
    sdpa_backward,
    softmax,
    softmax_jvp,
    softmax_vjp,
    to_float64,
)

__all__ = [
    "BACKENDS",
    "DEFAULT_DPS",
    "MAX_BITS",
    "UNDECIDED",
    "UndecidedRounding",
    "log_softmax",
    "log_softmax_vjp",
    "logsumexp",
    "logsumexp_vjp",
    "sdpa",
    "sdpa_backward",
    "softmax",
    "softmax_jvp",
    "softmax_vjp",
    "to_float64",
]
