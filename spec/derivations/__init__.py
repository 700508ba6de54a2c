"""SymPy derivations: each module proves its claims when run (see Claim)."""
