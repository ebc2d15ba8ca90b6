"""The plain-jnp reference: k2.optim.qk_clip.rescale_heads (one implementation, re-exported here)."""

from k2.optim.qk_clip import rescale_heads as rescale_heads_reference  # noqa: F401
