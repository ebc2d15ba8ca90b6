"""Plain-jnp MLA decode attention over the latent cache: the definition the Pallas kernels are tested against, and
the path the model takes on CPU.

Weight-absorbed MLA (DeepSeek-V2 section 2.1 and its appendix on inference; k2/attention.py explains the
algebra): every head attends to the same per-slot vector [latent (C) | rotated rope key (R)] with a query that has
absorbed W_k, and its output is the weighted sum of latents (W_v is applied afterwards, outside this op).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def mla_decode_reference(q: jax.Array, cache: jax.Array, lengths: jax.Array, *, kv_lora_rank: int,
                         sm_scale: float) -> tuple[jax.Array, jax.Array]:
  """softmax(sm_scale * q . cache[:len]^T) @ cache[:len, :C], per row and head.

  Args:
    q: [B, H, C + R] absorbed queries: (W_k^h q_nope^h) then the rotated q_rope^h.
    cache: [B, S, C + R] per slot the normalized latent (C = kv_lora_rank) then the rotated shared rope key (R).
    lengths: [B] int32: row b attends to slots 0..lengths[b]-1. Slots past it may hold anything (NaN too).
    kv_lora_rank: C.
    sm_scale: logit scale.

  Returns:
    out [B, H, C] in cache's dtype (zero for a row of length 0) and lse [B, H] float32, the natural log-sum-exp
    of the scaled logits over the valid slots (-inf for a row of length 0).
  """
  valid = jnp.arange(cache.shape[1])[None, :] < lengths[:, None]  # [B, S]
  # Zero the slots past the length before any product: 0 * NaN would poison the row otherwise.
  cache = jnp.where(valid[:, :, None], cache, jnp.zeros((), cache.dtype))
  logits = jnp.einsum('BHD,BSD->BHS', q.astype(cache.dtype), cache, preferred_element_type=jnp.float32) * sm_scale
  logits = jnp.where(valid[:, None, :], logits, -jnp.inf)
  lse = jax.nn.logsumexp(logits, axis=-1)  # -inf for an empty row
  probs = jnp.exp(logits - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None])
  out = jnp.einsum('BHS,BSC->BHC', probs.astype(cache.dtype), cache[..., :kv_lora_rank],
                   preferred_element_type=jnp.float32)
  return out.astype(cache.dtype), lse
