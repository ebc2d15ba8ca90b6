"""QK-Clip: after each optimizer update, rescale the query/key weights of heads whose max logit exceeded tau.

K2 report section 2.1 (Algorithm 1, K2_REFERENCE.md section 2). For head h of a layer with S_max^h > tau,
gamma_h = tau / S_max^h, and

  MLA: q_nope columns of head h (q_b_proj or q_proj) and k_nope columns of head h (kv_b_proj) * sqrt(gamma_h),
       q_rope columns of head h * gamma_h; the rope key kv_a_proj[:, C:] is shared by all heads and never touched.
  MHA/GQA: q_proj and k_proj columns of head h * sqrt(gamma_h).

Every term of the logit q_h . k_h is then scaled by exactly gamma_h (nope: sqrt * sqrt, rope: gamma * 1), so the
same inputs give max logit tau. Heads at or under tau get scale 1 (bit-identical weights).

`params` is any pytree whose key paths name the layers as the model does: .../layers/<i>/attn/<weight> (an
nnx.State of the model's Params, or its pure dict).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp

from k2.config import ModelConfig

_ATTN_WEIGHT = re.compile(r'(?:^|/)layers/(\d+)/attn/(q_b_proj|q_proj|kv_b_proj|k_proj)$')


def _key_name(key) -> str | None:
  for attribute in ('key', 'name', 'idx'):
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return None


def _path_string(path) -> str:
  names = [_key_name(k) for k in path]
  names = [n for n in names if n is not None and n != 'value']  # nnx.Variable wraps arrays in .value
  return '/'.join(names)


def head_scales(max_logits: jax.Array, tau: float) -> jax.Array:
  """gamma = min(1, tau / max_logit) per [layer, head], as float32 (exactly 1 at or under tau)."""
  max_logits = max_logits.astype(jnp.float32)
  return jnp.where(max_logits > tau, tau / jnp.where(max_logits > tau, max_logits, 1.0), 1.0)


def column_scales(gamma: jax.Array, head_dim: int, num_sqrt: int) -> jax.Array:
  """Per-head column multipliers [H, head_dim]: sqrt(gamma) on the first num_sqrt columns, gamma on the rest."""
  columns = jnp.arange(head_dim)[None, :]
  return jnp.where(columns < num_sqrt, jnp.sqrt(gamma)[:, None], gamma[:, None])


def rescale_heads(weight: jax.Array, scales: jax.Array) -> jax.Array:
  """weight [..., H, K] * scales [H, K], in float32, back in the weight's dtype. An elementwise pass XLA fuses; a
  Pallas kernel for it was 23x slower on the H200 (BENCHMARKS.md, bench_optim) and was deleted."""
  return (weight.astype(jnp.float32) * scales).astype(weight.dtype)


def qk_clip(params, max_logits: jax.Array, tau: float, model_config: ModelConfig):
  """Returns (params with clipped heads rescaled, stats).

  max_logits: [num_layers, H] float32, the forward's aux['max_logits'] already reduced over the global batch.
  stats: {'clipped_heads': int32 count of heads over tau, 'max_logit_per_layer': [num_layers] float32}.
  """
  att = model_config.attention
  gamma = head_scales(max_logits, tau)  # [L, H]
  nope, qk = att.qk_nope_head_dim, att.qk_head_dim

  # Plain MHA/GQA layers have a k_proj [..., KV heads, head_dim]; MLA layers have kv_b_proj instead.
  key_heads = {}
  for path, weight in jax.tree_util.tree_flatten_with_path(params)[0]:
    match = _ATTN_WEIGHT.search(_path_string(path))
    if match and match.group(2) == 'k_proj':
      key_heads[int(match.group(1))] = weight.shape[-2]

  def clip_leaf(path, weight):
    match = _ATTN_WEIGHT.search(_path_string(path))
    if match is None:
      return weight
    layer, name = int(match.group(1)), match.group(2)
    layer_gamma, head_dim = gamma[layer], weight.shape[-1]
    if layer not in key_heads:
      if name == 'kv_b_proj':  # [C, H, nope + v]: k_nope by sqrt(gamma), v untouched
        scales = jnp.where(jnp.arange(head_dim)[None, :] < nope, jnp.sqrt(layer_gamma)[:, None], 1.0)
      else:  # MLA query [..., H, nope + rope]: q_nope by sqrt(gamma), q_rope by gamma
        assert head_dim == qk, f'{_path_string(path)} has head dim {head_dim}, expected {qk}'
        scales = column_scales(layer_gamma, qk, nope)
    elif key_heads[layer] == layer_gamma.shape[0]:  # MHA: q and k of head h by sqrt(gamma_h)
      scales = column_scales(layer_gamma, head_dim, head_dim)
    elif name == 'q_proj':  # GQA: a key head serves several query heads, so the query takes all of gamma_h
      scales = column_scales(layer_gamma, head_dim, 0)
    else:
      return weight
    return rescale_heads(weight, scales)

  clipped = jax.tree_util.tree_map_with_path(clip_leaf, params)
  stats = {'clipped_heads': jnp.sum(max_logits > tau).astype(jnp.int32),
           'max_logit_per_layer': jnp.max(max_logits, axis=-1).astype(jnp.float32)}
  return clipped, stats
