"""Adapters: peers' attention as :class:`attnspec.spec.conformance.Target` objects.

:mod:`attnspec.adapters.torch` (``torch_targets``: each SDPA backend, FlexAttention) and
:mod:`attnspec.adapters.jax` (``jax_target``: ``jax.nn.dot_product_attention``) translate
sdpa's keyword arguments (numpy arrays, canonical conventions) into the peer's API, so that
``attnspec check torch`` judges the peer's arithmetic, not a translation of it: each adapter
declares only the features the peer has natively (a causal mask with another alignment is
sent as the explicit mask the peer documents for it).
"""

__all__ = ["jax", "torch"]
