"""attnspec.spec: derivations, properties, strategies and tolerances.

What any correct softmax or attention must satisfy, stated so that it can be checked
on any implementation, not only the reference.
"""
