"""The reference definitions in arbitrary precision (mpmath); see attnspec.reference.exact."""

from attnspec.reference.exact import (
    DEFAULT_DPS,
    log_softmax,
    logsumexp,
    sdpa,
    softmax,
    to_float64,
)

__all__ = ["DEFAULT_DPS", "log_softmax", "logsumexp", "sdpa", "softmax", "to_float64"]
