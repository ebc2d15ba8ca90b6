"""RMSNorm (Zhang & Sennrich 2019), statistics in float32 as DeepSeek-V3 computes them."""

import jax
import jax.numpy as jnp
from flax import nnx

from k2 import sharding


class RMSNorm(nnx.Module):
  """y = scale * x / sqrt(mean(x^2) + eps). x: [..., dim] -> [..., dim] in x's dtype."""

  def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype=jnp.float32):
    self.eps = eps
    self.scale = sharding.param(None, (dim,), ('norm',), param_dtype, value=1.0)

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.scale[...].astype(x.dtype) * normed.astype(x.dtype)
