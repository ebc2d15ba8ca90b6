"""Plain-jnp attention with per-head max logits: the definition the Pallas kernels are tested against.

It materializes the [B, H, T, S] logits in float32, so it is only for tests and small problems. The model's own
path (`k2.attention.attention_reference`, causal self-attention with equal query and key heads) computes the same
function on the shapes it supports; tests/test_flash_attention.py checks that the two agree.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attention_mask(q_len: int, kv_len: int, causal: bool, segment_ids: jax.Array | None) -> jax.Array:
  """Which (query, key) pairs may attend: [B or 1, 1, T, S] bool.

  Causal masking aligns the queries with the end of the keys (query t sees key s iff s <= t + S - T), as in
  decoding and FlashAttention-2; for T == S that is the usual lower triangle. When T > S the first T - S queries
  see no key at all (their output is zero). segment_ids [B, T] (T == S) keeps tokens within their packed document.
  """
  rows = jnp.arange(q_len)[:, None]
  cols = jnp.arange(kv_len)[None, :]
  mask = jnp.ones((q_len, kv_len), bool)
  if causal:
    mask = cols <= rows + (kv_len - q_len)
  mask = mask[None, None]
  if segment_ids is not None:
    mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
  return mask


def flash_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool = True,
                              segment_ids: jax.Array | None = None,
                              sm_scale: float | None = None) -> tuple[jax.Array, jax.Array]:
  """Softmax attention and its per-head max logit.

  Args:
    q: [B, T, H, K] queries.
    k: [B, S, G, K] keys; G divides H (G == H: multi-head, G < H: grouped-query, query head h reads key head
      h // (H // G)).
    v: [B, S, G, V] values (V may differ from K: MLA has K = 192, V = 128).
    causal: mask keys after the query (see `attention_mask`).
    segment_ids: [B, T] int32 document ids of packed sequences (needs T == S), or None.
    sm_scale: logit scale; None means 1/sqrt(K).

  Returns:
    out [B, T, H, V] in v's dtype (zero for a query that sees no key), and max_logits [B, H] float32: the largest
    scaled logit sm_scale * q.k over valid (query, key) pairs (-inf if a head has none).
  """
  batch, q_len, num_heads, qk_dim = q.shape
  kv_len, num_kv_heads = k.shape[1], k.shape[2]
  sm_scale = qk_dim ** -0.5 if sm_scale is None else sm_scale
  group = num_heads // num_kv_heads
  k = jnp.repeat(k, group, axis=2)
  v = jnp.repeat(v, group, axis=2)
  logits = jnp.einsum('BTHK,BSHK->BHTS', q, k, preferred_element_type=jnp.float32) * sm_scale
  mask = attention_mask(q_len, kv_len, causal, segment_ids)
  masked_logits = jnp.where(mask, logits, -jnp.inf)
  max_logits = jnp.max(masked_logits, axis=(2, 3))
  # Softmax that gives zeros (not NaN, in value or gradient) for rows without a valid key: shift by a constant row
  # max (the shift cancels, so stopping its gradient is exact) and exponentiate -inf where masked.
  row_max = jax.lax.stop_gradient(jnp.max(masked_logits, axis=-1, keepdims=True))
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  weights = jnp.exp(masked_logits - row_max)
  denominator = jnp.sum(weights, axis=-1, keepdims=True)
  probs = weights / jnp.where(denominator == 0, 1.0, denominator)
  out = jnp.einsum('BHTS,BSHV->BTHV', probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out.astype(v.dtype), max_logits
