"""attnspec: a property-tested math specification of softmax and attention.

The public functions evaluate the reference definition (:mod:`attnspec.reference`);
:mod:`attnspec.exact` evaluates the same definition in mpmath; :mod:`attnspec.spec`
holds the derivations, properties, strategies and tolerances that state what any
correct implementation must satisfy.
"""

from attnspec import exact
from attnspec.reference.attention import sdpa
from attnspec.reference.backward import (
    SdpaGradients,
    log_softmax_vjp,
    logsumexp_vjp,
    sdpa_backward,
    softmax_jvp,
    softmax_vjp,
)
from attnspec.reference.softmax import log_softmax, logsumexp, softmax

__version__ = "0.1.0"
__all__ = [
    "SdpaGradients",
    "__version__",
    "exact",
    "log_softmax",
    "log_softmax_vjp",
    "logsumexp",
    "logsumexp_vjp",
    "sdpa",
    "sdpa_backward",
    "softmax",
    "softmax_jvp",
    "softmax_vjp",
]
