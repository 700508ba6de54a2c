"""Hypothesis strategies, one module per topic: ``softmax`` and ``attention``."""
