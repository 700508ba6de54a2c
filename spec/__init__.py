"""attnspec.spec: derivations, properties, strategies and tolerances.

What any correct softmax or attention must satisfy, stated so that it can be checked
on any implementation, not only the reference.
"""

#: the topics, in reading order: the one place where they are listed. Each has a module
#: of that name in every kind of spec/ (derivations, properties, strategies, tolerances).
TOPICS: tuple[str, ...] = ("softmax", "attention", "backward", "online")
