"""The K2 decoder: embeddings, `first_k_dense` dense SwiGLU layers, then MoE layers; MLA attention in every layer.

`Transformer(config, rngs=...)(tokens) -> (logits, aux)` with
  tokens      [B, T] int32
  logits      [B, T, vocab] float32
  aux['max_logits']   [num_layers, H] float32: per layer and head, the largest pre-softmax logit over the batch
                      (what QK-Clip compares with tau; masked positions excluded)
  aux['expert_load']  [num_moe_layers, E] float32: tokens routed to each expert (for aux-loss-free balancing)
  aux['balance_loss'] [] float32: the weighted sequence-wise balance loss summed over MoE layers (0 when off)
  aux['dropped_tokens'] [] int32: (token, expert) copies dropped by expert parallelism's capacity exchange, summed
                      over MoE layers (0 when dropless)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from k2 import sharding
from k2.attention import MLA
from k2.config import ModelConfig
from k2.mlp import MLP
from k2.moe import MoE
from k2.norms import RMSNorm


class DecoderLayer(nnx.Module):
  """Pre-norm residual block: x + attn(norm(x)), then x + ffn(norm(x)); ffn is an MLP or an MoE."""

  def __init__(self, config: ModelConfig, *, is_moe: bool, rngs: nnx.Rngs):
    dtype, param_dtype, runtime = jnp.dtype(config.runtime.dtype), jnp.dtype(config.param_dtype), config.runtime
    self.is_moe = is_moe
    self.attn_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_dtype=param_dtype)
    self.attn = MLA(config.attention, config.rope, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                    rms_norm_eps=config.rms_norm_eps, attention_impl=runtime.attention_impl)
    self.ffn_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_dtype=param_dtype)
    if is_moe:
      self.ffn = MoE(config.moe, rngs=rngs, dtype=dtype, param_dtype=param_dtype, matmul_impl=runtime.matmul_impl,
                     ep_impl=runtime.ep_impl, ep_capacity_factor=runtime.ep_capacity_factor)
    else:
      self.ffn = MLP(config.hidden_size, config.dense_intermediate_size, rngs=rngs, dtype=dtype,
                     param_dtype=param_dtype)

  def __call__(self, x, positions, segment_ids, cache=None, decode: bool = False):
    """-> (x, max_logits [B, H], moe_aux or None, cache); cache and decode as k2.attention.MLA."""
    attn_out, max_logits, cache = self.attn(self.attn_norm(x), positions, segment_ids, cache, decode)
    x = x + attn_out.astype(x.dtype)
    ffn_out = self.ffn(self.ffn_norm(x))
    ffn_out, moe_aux = ffn_out if self.is_moe else (ffn_out, None)
    x = sharding.constrain(x + ffn_out.astype(x.dtype), ('batch', 'seq', 'act_embed'))
    return x, max_logits, moe_aux, cache


@jax.custom_vjp
def output_logits(x: jax.Array, lm_head: jax.Array) -> jax.Array:
  """x [B, T, D] @ lm_head [D, V] -> float32 logits [B, T, V], accumulated in float32.

  The backward casts the logits' gradient to the compute dtype first, so both backward matmuls over the
  [tokens, vocab] gradient run in bf16 rather than float32 (measured on the H200: 35 ms against ~7 ms for a
  k2_small micro-batch; BENCHMARKS.md, bench_train). In float32 models the cast changes nothing.
  """
  return jnp.einsum('BTD,DV->BTV', x, lm_head, preferred_element_type=jnp.float32)


def _output_logits_fwd(x, lm_head):
  return output_logits(x, lm_head), (x, lm_head)


def _output_logits_bwd(residuals, g):
  x, lm_head = residuals
  g = g.astype(x.dtype)
  return (jnp.einsum('BTV,DV->BTD', g, lm_head, preferred_element_type=jnp.float32).astype(x.dtype),
          jnp.einsum('BTD,BTV->DV', x, g, preferred_element_type=jnp.float32).astype(lm_head.dtype))


output_logits.defvjp(_output_logits_fwd, _output_logits_bwd)


class Transformer(nnx.Module):
  """The whole model; see the module docstring for shapes."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    param_dtype = jnp.dtype(config.param_dtype)
    self.embed = sharding.param(rngs, (config.vocab_size, config.hidden_size), ('vocab', 'embed'), param_dtype,
                                stddev=1.0)
    self.layers = nnx.List([DecoderLayer(config, is_moe=i >= config.first_k_dense, rngs=rngs)
                            for i in range(config.num_layers)])
    self.final_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_dtype=param_dtype)
    self.lm_head = sharding.param(rngs, (config.hidden_size, config.vocab_size), ('embed', 'vocab'), param_dtype)

  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None, cache: list[jax.Array] | None = None, decode: bool = False):
    """tokens, positions, segment_ids: [B, T] int32 -> (float32 logits [B, T, V], aux). Positions default to
    0..T-1, one segment per row. With a cache (`init_cache`), aux['cache'] is the updated one (see `features`)."""
    x, aux = self.features(tokens, positions, segment_ids, cache, decode)
    return self.logits(x), aux

  def logits(self, x: jax.Array) -> jax.Array:
    """Final-normed hidden states [B, T, D] -> float32 logits [B, T, V]."""
    return sharding.constrain(output_logits(x, self.output_weights()), ('batch', 'seq', 'act_vocab'))

  def init_cache(self, batch: int, slots: int) -> list[jax.Array]:
    """An empty MLA latent cache per layer ([batch, slots, C + R] each, k2.attention.MLA)."""
    return [layer.attn.init_cache(batch, slots) for layer in self.layers]

  def output_weights(self) -> jax.Array:
    """lm_head [D, V] in the compute dtype."""
    return self.lm_head[...].astype(jnp.dtype(self.config.runtime.dtype))

  def features(self, tokens: jax.Array, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None, cache: list[jax.Array] | None = None, decode: bool = False):
    """The final-normed hidden states [B, T, D] (compute dtype) that the logits are taken from, and aux. A loss
    can take the logits itself from these (`k2.train.step.chunked_next_token_loss`), a sampler only the last ones.

    cache: None (training), or one [B, S, C + R] latent cache per layer; the new tokens are stored at slots
    `positions` and aux['cache'] is the updated cache. decode=False with a cache is a prefill (the new tokens attend
    to each other, as in training); decode=True attends to the cache slots up to each token's position.
    """
    dtype = jnp.dtype(self.config.runtime.dtype)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    # Gather the table over fsdp first (ZeRO-3 style), so the lookup comes out split like the tokens.
    table = sharding.constrain(self.embed[...], ('vocab', None))
    x = jnp.take(table, tokens, axis=0).astype(dtype)
    x = sharding.constrain(x, ('batch', 'seq', 'act_embed'))
    max_logits, expert_loads, balance_loss = [], [], jnp.zeros((), jnp.float32)
    dropped_tokens = jnp.zeros((), jnp.int32)
    run_layer = _remat(self.config.runtime.remat_policy) if cache is None else _call_layer
    new_cache = []
    for i, layer in enumerate(self.layers):
      x, layer_max_logits, moe_aux, layer_cache = run_layer(layer, x, positions, segment_ids,
                                                            None if cache is None else cache[i], decode)
      new_cache.append(layer_cache)
      max_logits.append(jnp.max(layer_max_logits, axis=0))
      if moe_aux is not None:
        expert_loads.append(moe_aux['expert_load'])
        balance_loss = balance_loss + moe_aux.get('balance_loss', 0.0)
        dropped_tokens = dropped_tokens + moe_aux['dropped_tokens']
    x = self.final_norm(x)
    num_experts = self.config.moe.num_experts
    aux = {
        'max_logits': jnp.stack(max_logits),
        'expert_load': jnp.stack(expert_loads) if expert_loads else jnp.zeros((0, num_experts), jnp.float32),
        'balance_loss': balance_loss,
        'dropped_tokens': dropped_tokens,
    }
    if cache is not None:
      aux['cache'] = new_cache
    return x, aux


def _call_layer(layer: DecoderLayer, x, positions, segment_ids, cache=None, decode=False):
  return layer(x, positions, segment_ids, cache, decode)


def _remat(policy: str):
  """The per-layer call under the config's rematerialization policy (see RuntimeConfig.remat_policy).

  The layer is split into (graphdef, state) and rebuilt inside `jax.checkpoint`, a pure function of arrays;
  layers only read their variables in the forward pass, so nothing needs to flow back out."""
  if policy == 'none':
    return _call_layer
  saveable = {'full': jax.checkpoint_policies.nothing_saveable,
              'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable}[policy]

  def call(layer, x, positions, segment_ids, cache=None, decode=False):
    del cache, decode  # remat is for training forwards, which have no cache
    graphdef, state = nnx.split(layer)
    pure = jax.checkpoint(lambda state, x: _call_layer(nnx.merge(graphdef, state), x, positions, segment_ids),
                          policy=saveable)
    return pure(state, x)

  return call


def create(config: ModelConfig, seed: int = 0) -> Transformer:
  """A randomly initialized model."""
  return Transformer(config, rngs=nnx.Rngs(params=seed))


def abstract(config: ModelConfig) -> Transformer:
  """The model with ShapeDtypeStructs instead of arrays: shapes and counts with no memory allocated."""
  return nnx.eval_shape(lambda: create(config))
