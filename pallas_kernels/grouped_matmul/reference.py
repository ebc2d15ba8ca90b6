"""Plain-jnp reference for the grouped matmul: every group's matrix on every row, then each row keeps its own.

O(G * M * K * N) work, for tests only. Independent of jax.lax.ragged_dot (which the tests also compare against)
and differentiable by plain autodiff, so its VJP is the reference for both backward products.
"""

import jax
import jax.numpy as jnp


def row_groups(group_sizes: jax.Array, num_rows: int) -> jax.Array:
  """[M] int32 group of each row; G for rows past sum(group_sizes)."""
  ends = jnp.cumsum(group_sizes.astype(jnp.int32))
  return jnp.searchsorted(ends, jnp.arange(num_rows, dtype=jnp.int32), side='right').astype(jnp.int32)


def grouped_matmul_reference(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
  """lhs [M, K] sorted by group, rhs [G, K, N], group_sizes [G] -> [M, N]; rows past sum(group_sizes) are zero."""
  num_groups = rhs.shape[0]
  owner = row_groups(group_sizes, lhs.shape[0])
  keep = (owner[None, :] == jnp.arange(num_groups)[:, None])  # [G, M]
  every_group = jnp.einsum('MK,GKN->GMN', lhs, rhs, preferred_element_type=jnp.float32)
  out = jnp.sum(jnp.where(keep[:, :, None], every_group, 0.0), axis=0)
  return out.astype(jnp.result_type(lhs, rhs))
