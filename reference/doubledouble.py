"""Double-double arithmetic (placeholder: being written)."""
from attnspec.reference.arith import Fast


class DoubleDouble(Fast):
    name = "accurate"
