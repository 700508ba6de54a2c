"""Error bounds and the tolerances derived from them, one module per topic."""
