"""Multi-head latent attention (MLA; DeepSeek-V2 section 2.1), with per-head max logits for QK-Clip.

Einsum legend: B batch, T query time, S key time, D model width, H heads, Q q_lora_rank, C kv_lora_rank,
K qk head dim (nope + rope), N qk_nope_head_dim, R qk_rope_head_dim, V v_head_dim.

Parameter layout keeps the head axis explicit so QK-Clip can rescale one head's slices:
  q_b_proj [Q, H, K] (or q_proj [D, H, K]): per head, [:N] is q_nope, [N:] is q_rope.
  kv_b_proj [C, H, N + V]: per head, [:N] is k_nope, [N:] is v.
  kv_a_proj [D, C + R]: the latent and the ONE rope key shared by all heads (QK-Clip never touches it).

One forward for training and decoding. Without a cache, MLA expands the latent to per-head keys and values and runs
causal attention (the flash kernel on GPU/TPU). With a cache ([B, S, C + R] per layer: the normalized latent, then
the rotated rope key, FlashMLA's layout), the new tokens' latents are written at their positions (a token's position
is its cache slot), and then either
  * prefill (decode=False, the cache was empty): the new tokens attend to each other exactly as in training, or
  * decode (decode=True): the new tokens attend to the cache slots up to their own position in the weight-absorbed
    form (DeepSeek-V2 section 2.1 and its appendix): per head, W_k folds into the query and W_v is applied after the
    weighted sum of latents,
        q^h . k^h_s = (W_k^h q_nope^h) . c_s + q_rope^h . k_rope_s,    sum_s p_s v^h_s = (sum_s p_s c_s) W_v^h,
    so decoding reads C + R numbers per cached token (576 for K2) instead of H * (K + V) (20480).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from k2 import rope as rope_lib
from k2 import sharding
from k2.config import MLAConfig, RopeConfig
from k2.norms import RMSNorm
from pallas_kernels.flash_attention import flash_attention
from pallas_kernels.mla_decode import mla_decode
from pallas_kernels.mla_decode import mla_decode_reference


def attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None,
                        sm_scale: float) -> tuple[jax.Array, jax.Array]:
  """Causal softmax attention with packed-document masking, materializing the logits.

  q: [B, T, H, K], k: [B, T, H, K], v: [B, T, H, V], segment_ids: [B, T] (tokens attend only within their
  segment). Returns out [B, T, H, V] in v's dtype and max_logits [B, H] float32: the largest scaled pre-softmax
  logit over valid (causal, same-segment) query/key pairs, which QK-Clip compares with tau.
  """
  seq_len = q.shape[1]
  logits = jnp.einsum('BTHK,BSHK->BHTS', q, k, preferred_element_type=jnp.float32) * sm_scale
  mask = jnp.tril(jnp.ones((seq_len, seq_len), dtype=bool))[None, None]
  if segment_ids is not None:
    mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
  max_logits = jnp.max(jnp.where(mask, logits, -jnp.inf), axis=(2, 3))
  probs = jax.nn.softmax(jnp.where(mask, logits, jnp.finfo(jnp.float32).min), axis=-1)
  out = jnp.einsum('BHTS,BSHV->BTHV', probs.astype(v.dtype), v)
  return out, max_logits


def latent_attention(q: jax.Array, cache: jax.Array, positions: jax.Array, latent_dim: int, sm_scale: float,
                     impl: str = 'auto') -> jax.Array:
  """Absorbed MLA attention over a latent cache (the decode form), by RuntimeConfig.attention_impl.

  q [B, T, H, C + R] (the absorbed nope query, then the rotated rope query), cache [B, S, C + R], positions [B, T]:
  a query at position p sees slots 0..p. Returns the attention-weighted latents [B, T, H, C] in the cache's dtype.
  'flash' is the length-aware Pallas decode kernel of pallas_kernels/mla_decode (it reads only the filled slots,
  compiled on GPU/TPU, interpreted on CPU); 'reference' is its plain-jnp `mla_decode_reference`; 'auto' is the
  kernel on GPU/TPU and the reference on CPU. H200 figures: BENCHMARKS.md (bench_sample).
  """
  if impl == 'auto':
    impl = 'reference' if jax.default_backend() == 'cpu' else 'flash'
  attend = mla_decode if impl == 'flash' else mla_decode_reference
  # One call per new token (decode has T = 1): each query has its own number of visible slots.
  return jnp.stack([attend(q[:, t], cache, positions[:, t] + 1, kv_lora_rank=latent_dim, sm_scale=sm_scale)[0]
                    for t in range(q.shape[1])], axis=1)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None, sm_scale: float,
              impl: str = 'auto') -> tuple[jax.Array, jax.Array]:
  """Causal attention with per-head max logits, by RuntimeConfig.attention_impl; shapes as `attention_reference`.

  'flash' is the Pallas kernel of pallas_kernels/flash_attention (compiled on GPU/TPU, interpreted on CPU), which
  returns the max logits from inside the kernel; 'reference' is `attention_reference`; 'auto' is flash on GPU/TPU
  and reference on CPU. Both give QK-Clip the same max_logits. H200 figures: BENCHMARKS.md (bench_attention).
  """
  if impl == 'auto':
    impl = 'reference' if jax.default_backend() == 'cpu' else 'flash'
  if impl == 'flash':
    return flash_attention(q, k, v, causal=True, segment_ids=segment_ids, sm_scale=sm_scale)
  return attention_reference(q, k, v, segment_ids, sm_scale)


class MLA(nnx.Module):
  """x: [B, T, D] -> (out [B, T, D], max_logits [B, H], cache). See the module docstring for the cache.

  rms_norm_eps: of the q and kv latent norms (ModelConfig.rms_norm_eps); attention_impl: see `attention`."""

  def __init__(self, config: MLAConfig, rope: RopeConfig, *, rngs: nnx.Rngs, dtype=jnp.bfloat16,
               param_dtype=jnp.float32, rms_norm_eps: float = 1e-6, attention_impl: str = 'auto'):
    self.config, self.rope, self.dtype, self.attention_impl = config, rope, dtype, attention_impl
    c, p = config, param_dtype
    heads_k = (c.num_heads, c.qk_head_dim)
    if c.q_lora_rank is None:
      self.q_proj = sharding.param(rngs, (c.hidden_size, *heads_k), ('embed', 'heads', 'head_dim'), p)
    else:
      self.q_a_proj = sharding.param(rngs, (c.hidden_size, c.q_lora_rank), ('embed', 'q_lora'), p)
      self.q_a_norm = RMSNorm(c.q_lora_rank, eps=rms_norm_eps, param_dtype=p)
      self.q_b_proj = sharding.param(rngs, (c.q_lora_rank, *heads_k), ('q_lora', 'heads', 'head_dim'), p)
    self.kv_a_proj = sharding.param(rngs, (c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim),
                                    ('embed', 'kv_lora'), p)
    self.kv_a_norm = RMSNorm(c.kv_lora_rank, eps=rms_norm_eps, param_dtype=p)
    self.kv_b_proj = sharding.param(rngs, (c.kv_lora_rank, c.num_heads, c.qk_nope_head_dim + c.v_head_dim),
                                    ('kv_lora', 'heads', 'head_dim'), p)
    self.o_proj = sharding.param(rngs, (c.num_heads, c.v_head_dim, c.hidden_size), ('heads', 'head_dim', 'embed'),
                                 p, stddev=(c.num_heads * c.v_head_dim) ** -0.5)

  def init_cache(self, batch: int, slots: int) -> jax.Array:
    """An empty cache [batch, slots, C + R] in the compute dtype, split over the batch."""
    shape = (batch, slots, self.config.kv_lora_rank + self.config.qk_rope_head_dim)
    return sharding.constrain(jnp.zeros(shape, self.dtype), ('batch', None, None))

  def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None,
               cache: jax.Array | None = None, decode: bool = False):
    """x [B, T, D], positions/segment_ids [B, T] -> (out [B, T, D], max_logits [B, H] float32, cache).

    cache: None (training) or [B, S, C + R]; the returned cache holds the new tokens at slots `positions`.
    decode (static): attend to the cache (absorbed form) rather than among the new tokens; max_logits is then -inf
    (QK-Clip needs it from training forwards only).
    """
    c, dtype = self.config, self.dtype
    x = x.astype(dtype)
    w = lambda param: param[...].astype(dtype)
    if c.q_lora_rank is None:
      q = jnp.einsum('BTD,DHK->BTHK', x, w(self.q_proj))
    else:
      q_latent = self.q_a_norm(jnp.einsum('BTD,DQ->BTQ', x, w(self.q_a_proj)))
      q = jnp.einsum('BTQ,QHK->BTHK', q_latent, w(self.q_b_proj))
    q = sharding.constrain(q, ('batch', 'seq', 'act_heads', None))
    q_nope = q[..., :c.qk_nope_head_dim]
    q_rope = rope_lib.apply_rope(q[..., c.qk_nope_head_dim:], positions, self.rope)

    kv = jnp.einsum('BTD,DC->BTC', x, w(self.kv_a_proj))
    latent = self.kv_a_norm(kv[..., :c.kv_lora_rank])
    k_rope = rope_lib.apply_rope(kv[..., c.kv_lora_rank:][:, :, None, :], positions, self.rope)  # [B, T, 1, R]
    sm_scale = rope_lib.softmax_scale(c.qk_head_dim, self.rope)
    if cache is not None:
      rows = jnp.arange(cache.shape[0])[:, None]
      new_kv = jnp.concatenate([latent, k_rope[:, :, 0, :]], axis=-1).astype(cache.dtype)
      cache = cache.at[rows, positions].set(new_kv, mode='drop')

    if decode:
      w_k, w_v = w(self.kv_b_proj)[..., :c.qk_nope_head_dim], w(self.kv_b_proj)[..., c.qk_nope_head_dim:]
      q_absorbed = jnp.einsum('BTHN,CHN->BTHC', q_nope, w_k, preferred_element_type=jnp.float32).astype(dtype)
      out_latent = latent_attention(jnp.concatenate([q_absorbed, q_rope.astype(dtype)], axis=-1), cache, positions,
                                    c.kv_lora_rank, sm_scale, self.attention_impl)
      out = jnp.einsum('BTHC,CHV->BTHV', out_latent, w_v)
      max_logits = jnp.full(q.shape[:1] + q.shape[2:3], -jnp.inf, jnp.float32)  # not measured while decoding
    else:
      kv_up = sharding.constrain(jnp.einsum('BTC,CHK->BTHK', latent, w(self.kv_b_proj)),
                                 ('batch', 'seq', 'act_heads', None))
      k_nope, v = kv_up[..., :c.qk_nope_head_dim], kv_up[..., c.qk_nope_head_dim:]
      q = jnp.concatenate([q_nope, q_rope], axis=-1)
      k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope, k_nope.shape[:3] + k_rope.shape[-1:])], axis=-1)
      out, max_logits = attention(q, k, v, segment_ids, sm_scale, self.attention_impl)
    out = sharding.constrain(out, ('batch', 'seq', 'act_heads', None))
    return jnp.einsum('BTHV,HVD->BTD', out, w(self.o_proj)), max_logits, cache
