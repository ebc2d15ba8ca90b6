"""MLA attention over a KV cache: the latent cache with the weight-absorbed decode form, and the naive baselines.

DeepSeek-V2 section 2.1 (and its appendix on inference): MLA only needs, per token, the normalized kv latent
c [C] and the one RoPE key k_rope [R] shared by all heads. The per-head keys and values are linear in c,
    k_nope^h = c W_k^h,  v^h = c W_v^h        (W_k^h = kv_b_proj[:, h, :N], W_v^h = kv_b_proj[:, h, N:])
so at decode time the up-projections fold into the query and the output instead of being applied to every cached
token ("weight absorption"):
    q^h . k^h_s = (W_k^h q_nope^h) . c_s + q_rope^h . k_rope_s          (query absorbs W_k)
    sum_s p_s v^h_s = (sum_s p_s c_s) W_v^h                              (output absorbs W_v)
The cache then holds C + R numbers per token and layer (576 for K2) instead of H * (K + V) (64 * 320 = 20480).

Three attention forms over one cache, which the tests show equal:
  * `absorbed_attention`  latent cache, decode form (reads C + R per cached token)
  * `expanded_attention`  latent cache, naive form: up-project every cached token to per-head k/v, then attend
                          (what the training forward computes; used for prefill, where it costs fewer FLOPs)
  * `per_head_attention`  a cache of per-head k/v, as MHA would keep (the memory baseline of the benchmark)

Einsum legend: B batch, T new tokens, S cache slots, H heads, D model width, C kv_lora_rank, Q q_lora_rank,
N qk_nope_head_dim, R qk_rope_head_dim, K N + R, V v_head_dim.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from k2 import rope as rope_lib
from k2 import sharding
from k2.attention import MLA
from k2.config import MLAConfig

LAYOUTS = ('latent', 'per_head')
FORMS = ('absorbed', 'expanded')


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LatentCache:
  """One layer's MLA cache: latent [B, S, C] (after kv_a_norm) and k_rope [B, S, R] (after RoPE)."""
  latent: jax.Array
  k_rope: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PerHeadCache:
  """One layer's naive cache: keys [B, S, H, K] ([nope | rope] per head) and values [B, S, H, V]."""
  keys: jax.Array
  values: jax.Array


def init_layer_cache(config: MLAConfig, batch: int, slots: int, dtype, layout: str = 'latent'):
  """An all-zero cache of `slots` tokens for one layer."""
  if layout == 'latent':
    return LatentCache(
        latent=sharding.constrain(jnp.zeros((batch, slots, config.kv_lora_rank), dtype), ('batch', None, None)),
        k_rope=sharding.constrain(jnp.zeros((batch, slots, config.qk_rope_head_dim), dtype), ('batch', None, None)))
  if layout == 'per_head':
    keys = jnp.zeros((batch, slots, config.num_heads, config.qk_head_dim), dtype)
    values = jnp.zeros((batch, slots, config.num_heads, config.v_head_dim), dtype)
    return PerHeadCache(keys=sharding.constrain(keys, ('batch', None, 'act_heads', None)),
                        values=sharding.constrain(values, ('batch', None, 'act_heads', None)))
  raise ValueError(f'unknown cache layout {layout!r}; known layouts: {", ".join(LAYOUTS)}')


def cache_bytes_per_token(config: MLAConfig, dtype, layout: str) -> int:
  """Bytes one token occupies in one layer's cache."""
  if layout == 'latent':
    numbers = config.kv_lora_rank + config.qk_rope_head_dim
  elif layout == 'per_head':
    numbers = config.num_heads * (config.qk_head_dim + config.v_head_dim)
  else:
    raise ValueError(f'unknown cache layout {layout!r}; known layouts: {", ".join(LAYOUTS)}')
  return numbers * jnp.dtype(dtype).itemsize


def project(attn: MLA, x: jax.Array, positions: jax.Array):
  """The projections of k2.attention.MLA, stopping at what the cache stores.

  x: [B, T, D], positions: [B, T] -> q_nope [B, T, H, N], q_rope [B, T, H, R] (rotated), latent [B, T, C]
  (normalized), k_rope [B, T, R] (rotated). Must compute what MLA.__call__ computes (tests compare them).
  """
  c, dtype = attn.config, attn.dtype
  x = x.astype(dtype)
  w = lambda param: param[...].astype(dtype)
  if c.q_lora_rank is None:
    q = jnp.einsum('BTD,DHK->BTHK', x, w(attn.q_proj))
  else:
    q_latent = attn.q_a_norm(jnp.einsum('BTD,DQ->BTQ', x, w(attn.q_a_proj)))
    q = jnp.einsum('BTQ,QHK->BTHK', q_latent, w(attn.q_b_proj))
  q = sharding.constrain(q, ('batch', 'seq', 'act_heads', None))
  q_nope, q_rope = q[..., :c.qk_nope_head_dim], q[..., c.qk_nope_head_dim:]
  kv = jnp.einsum('BTD,DC->BTC', x, w(attn.kv_a_proj))
  latent = attn.kv_a_norm(kv[..., :c.kv_lora_rank])
  q_rope = rope_lib.apply_rope(q_rope, positions, attn.rope)
  k_rope = rope_lib.apply_rope(kv[..., c.kv_lora_rank:][:, :, None, :], positions, attn.rope)[:, :, 0, :]
  return q_nope, q_rope, latent, k_rope


def _write(buffer: jax.Array, new: jax.Array, positions: jax.Array) -> jax.Array:
  """buffer [B, S, ...] with new [B, T, ...] stored at slots positions [B, T] (one slot per token)."""
  rows = jnp.arange(buffer.shape[0])[:, None]
  return buffer.at[rows, positions].set(new.astype(buffer.dtype), mode='drop')


def _masked_softmax(logits: jax.Array, mask: jax.Array) -> jax.Array:
  """logits [B, H, T, S] float32, mask [B, T, S] -> probabilities; masked keys get exactly zero weight."""
  logits = jnp.where(mask[:, None], logits, jnp.finfo(jnp.float32).min)
  return jax.nn.softmax(logits, axis=-1)


def absorbed_attention(q_nope, q_rope, latent, k_rope, kv_b_proj, mask, sm_scale):
  """Decode form: W_k folded into the query, W_v applied after the weighted sum of latents.

  q_nope [B, T, H, N], q_rope [B, T, H, R], latent [B, S, C], k_rope [B, S, R], kv_b_proj [C, H, N + V],
  mask [B, T, S] -> out [B, T, H, V] in latent's dtype.
  """
  dtype, nope = latent.dtype, q_nope.shape[-1]
  w_k, w_v = kv_b_proj[..., :nope].astype(dtype), kv_b_proj[..., nope:].astype(dtype)
  q_absorbed = jnp.einsum('BTHN,CHN->BTHC', q_nope, w_k, preferred_element_type=jnp.float32).astype(dtype)
  logits = (jnp.einsum('BTHC,BSC->BHTS', q_absorbed, latent, preferred_element_type=jnp.float32)
            + jnp.einsum('BTHR,BSR->BHTS', q_rope.astype(dtype), k_rope, preferred_element_type=jnp.float32))
  probs = _masked_softmax(logits * sm_scale, mask)
  out_latent = jnp.einsum('BHTS,BSC->BTHC', probs.astype(dtype), latent)
  return jnp.einsum('BTHC,CHV->BTHV', out_latent, w_v)


def expanded_attention(q_nope, q_rope, latent, k_rope, kv_b_proj, mask, sm_scale):
  """Naive form on the latent cache: per-head k_nope and v for every cached token, then plain attention.

  Same arguments and result as `absorbed_attention`.
  """
  dtype, nope = latent.dtype, q_nope.shape[-1]
  kv_up = jnp.einsum('BSC,CHK->BSHK', latent, kv_b_proj.astype(dtype))
  k_nope, values = kv_up[..., :nope], kv_up[..., nope:]
  keys = jnp.concatenate(
      [k_nope, jnp.broadcast_to(k_rope[:, :, None, :], k_nope.shape[:3] + k_rope.shape[-1:])], axis=-1)
  return per_head_attention(jnp.concatenate([q_nope, q_rope], axis=-1).astype(dtype), keys, values, mask, sm_scale)


def per_head_attention(q, keys, values, mask, sm_scale):
  """Plain attention. q [B, T, H, K], keys [B, S, H, K], values [B, S, H, V], mask [B, T, S] -> [B, T, H, V]."""
  logits = jnp.einsum('BTHK,BSHK->BHTS', q.astype(keys.dtype), keys, preferred_element_type=jnp.float32)
  probs = _masked_softmax(logits * sm_scale, mask)
  return jnp.einsum('BHTS,BSHV->BTHV', probs.astype(values.dtype), values)


def cached_mla(attn: MLA, x: jax.Array, positions: jax.Array, cache, *, num_keys: int, form: str = 'absorbed'):
  """MLA of T new tokens against a cache: stores them at slots `positions`, then attends over slots [0, num_keys).

  x: [B, T, D]; positions: [B, T] int32, a token's position is also its cache slot; a query at position p sees the
  slots 0..p (so right-padded prompts never see their padding, which later tokens overwrite). num_keys (static)
  bounds the slots read: the prompt width at prefill, the whole cache at decode. `form` picks absorbed or expanded
  attention on a LatentCache; a PerHeadCache always uses per-head attention.
  Returns (out [B, T, D] in the module's dtype, the updated cache).
  """
  c = attn.config
  sm_scale = rope_lib.softmax_scale(c.qk_head_dim, attn.rope)
  q_nope, q_rope, latent, k_rope = project(attn, x, positions)
  mask = jnp.arange(num_keys)[None, None, :] <= positions[:, :, None]  # [B, T, S]
  if isinstance(cache, LatentCache):
    cache = LatentCache(latent=_write(cache.latent, latent, positions), k_rope=_write(cache.k_rope, k_rope, positions))
    attend = {'absorbed': absorbed_attention, 'expanded': expanded_attention}.get(form)
    if attend is None:
      raise ValueError(f'unknown MLA form {form!r}; known forms: {", ".join(FORMS)}')
    out = attend(q_nope, q_rope, cache.latent[:, :num_keys], cache.k_rope[:, :num_keys], attn.kv_b_proj[...], mask,
                 sm_scale)
  else:
    dtype = cache.keys.dtype
    kv_up = jnp.einsum('BTC,CHK->BTHK', latent, attn.kv_b_proj[...].astype(dtype))
    k_nope, values = kv_up[..., :c.qk_nope_head_dim], kv_up[..., c.qk_nope_head_dim:]
    keys = jnp.concatenate(
        [k_nope, jnp.broadcast_to(k_rope[:, :, None, :], k_nope.shape[:3] + k_rope.shape[-1:])], axis=-1)
    cache = PerHeadCache(keys=_write(cache.keys, keys, positions), values=_write(cache.values, values, positions))
    q = jnp.concatenate([q_nope, q_rope], axis=-1)
    out = per_head_attention(q, cache.keys[:, :num_keys], cache.values[:, :num_keys], mask, sm_scale)
  out = sharding.constrain(out, ('batch', 'seq', 'act_heads', None))
  return jnp.einsum('BTHV,HVD->BTD', out, attn.o_proj[...].astype(attn.dtype)), cache
