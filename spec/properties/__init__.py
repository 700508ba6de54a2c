"""Properties as checks of any implementation, one module per topic.

``softmax`` holds the properties of softmax, log_softmax and logsumexp; ``attention``
those of scaled dot-product attention. Each ``check_*`` function evaluates an
implementation and raises :class:`~attnspec.spec.properties.softmax.PropertyViolation`
with the worst entry, the bound it broke and a call that reproduces it.
"""

#: claims of attnspec.spec.derivations that no property tests on an implementation, and why
SYMBOLIC_ONLY: dict[str, str] = {
    "temperature-zero": "a limit in a parameter that no implementation takes",
    "temperature-infinity": "a limit in a parameter that no implementation takes",
}
