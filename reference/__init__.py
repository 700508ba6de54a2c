"""attnspec.reference: the executable definition, in numpy.

Each function is written once against an arithmetic (:mod:`.arith`) and evaluated in
float64 (``precision="fast"``), to within one ulp (``precision="accurate"``), or in
arbitrary precision (:mod:`.exact`).
"""

from attnspec.reference.softmax import log_softmax, logsumexp, softmax

__all__ = ["log_softmax", "logsumexp", "softmax"]
