"""SwiGLU feed-forward (Shazeer 2020): the dense layers, and the shared experts of MoE layers.

Einsum legend: B batch, T time, D model width, F intermediate width.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from k2 import sharding


class MLP(nnx.Module):
  """down(silu(x @ gate) * (x @ up)). x: [B, T, D] -> [B, T, D]."""

  def __init__(self, hidden_size: int, intermediate_size: int, *, rngs: nnx.Rngs, dtype=jnp.bfloat16,
               param_dtype=jnp.float32):
    self.dtype = dtype
    self.gate_proj = sharding.param(rngs, (hidden_size, intermediate_size), ('embed', 'mlp'), param_dtype)
    self.up_proj = sharding.param(rngs, (hidden_size, intermediate_size), ('embed', 'mlp'), param_dtype)
    self.down_proj = sharding.param(rngs, (intermediate_size, hidden_size), ('mlp', 'embed'), param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)
    gate = jnp.einsum('BTD,DF->BTF', x, self.gate_proj[...].astype(self.dtype))
    up = jnp.einsum('BTD,DF->BTF', x, self.up_proj[...].astype(self.dtype))
    hidden = sharding.constrain(jax.nn.silu(gate) * up, ('batch', 'seq', 'mlp'))
    return jnp.einsum('BTF,FD->BTD', hidden, self.down_proj[...].astype(self.dtype))
