"""Mixture of experts: sigmoid router with aux-loss-free bias, dropless sort-based dispatch, shared experts.

DeepSeek-V3 section 2.1.2, as K2 uses it (K2_REFERENCE.md section 1). Einsum legend: N tokens (B*T flattened),
D model width, E routed experts, F expert intermediate width, K experts per token.

Routing: s = sigmoid(x @ W_router) (float32). The per-expert `router_bias` is added to s only to pick the top-K
experts; the gates are the *unbiased* scores of the picked experts, normalized to sum 1, times
routed_scaling_factor. The bias is a `RouterBias` variable, not an `nnx.Param`, so gradients never reach it; the
trainer nudges it toward balance from the expert loads this layer reports.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from k2 import sharding
from k2.config import MoEConfig
from k2.mlp import MLP
from pallas_kernels.grouped_matmul import grouped_matmul as pallas_grouped_matmul


class RouterBias(nnx.Variable):
  """Per-expert selection bias updated by the balancing rule, never by gradients."""


def route(x: jax.Array, router_kernel: jax.Array, router_bias: jax.Array, config: MoEConfig):
  """Picks experts. x: [N, D] -> gates [N, K] float32, expert_ids [N, K] int32, scores [N, E] float32."""
  logits = jnp.einsum('ND,DE->NE', x.astype(jnp.float32), router_kernel.astype(jnp.float32))
  scores = jax.nn.sigmoid(logits)
  choice = scores + jax.lax.stop_gradient(router_bias.astype(jnp.float32))
  if config.n_group > 1:
    # Group-limited routing (DeepSeek-V3): keep the topk_group groups whose two best experts score highest.
    grouped = choice.reshape(choice.shape[0], config.n_group, -1)
    group_scores = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)  # [N, n_group]
    _, top_groups = jax.lax.top_k(group_scores, config.topk_group)
    group_mask = jnp.any(jax.nn.one_hot(top_groups, config.n_group, dtype=bool), axis=1)  # [N, n_group]
    choice = jnp.where(group_mask[:, :, None], grouped, -jnp.inf).reshape(choice.shape)
  _, expert_ids = jax.lax.top_k(jax.lax.stop_gradient(choice), config.num_experts_per_token)
  gates = jnp.take_along_axis(scores, expert_ids, axis=-1)
  if config.norm_topk_prob:
    gates = gates / (jnp.sum(gates, axis=-1, keepdims=True) + 1e-20)
  return gates * config.routed_scaling_factor, expert_ids.astype(jnp.int32), scores


def grouped_matmul(x: jax.Array, weights: jax.Array, group_sizes: jax.Array, impl: str = 'auto') -> jax.Array:
  """Rows of x, sorted by expert, times their expert's matrix. x: [M, A], weights: [E, A, B] -> [M, B].

  impl (MoEConfig.matmul_impl): 'ragged_dot' is jax.lax.ragged_dot; 'pallas' is the Pallas kernel of
  pallas_kernels/grouped_matmul (compiled on GPU/TPU, interpreted on CPU); 'auto' is pallas on GPU/TPU and
  ragged_dot on CPU. On an H200, at K2's expert shapes the kernel runs at ~0.8x a dense bf16 matmul and ~25x
  ragged_dot (BENCHMARKS.md, bench_moe).
  """
  if impl == 'auto':
    impl = 'ragged_dot' if jax.default_backend() == 'cpu' else 'pallas'
  if impl == 'pallas':
    return pallas_grouped_matmul(x, weights, group_sizes)
  return jax.lax.ragged_dot(x, weights, group_sizes)


def sequence_balance_loss(scores: jax.Array, expert_ids: jax.Array, batch: int, config: MoEConfig) -> jax.Array:
  """Sequence-wise balance loss (DeepSeek-V3 eq. 17-20), unweighted. scores [N, E], expert_ids [N, K]."""
  num_experts, top_k = config.num_experts, config.num_experts_per_token
  picked = jnp.sum(jax.nn.one_hot(expert_ids, num_experts, dtype=jnp.float32), axis=1).reshape(batch, -1,
                                                                                                num_experts)
  seq_len = picked.shape[1]
  fraction = picked.sum(axis=1) * num_experts / (top_k * seq_len)  # f_i per sequence [B, E]
  normalized = scores / jnp.sum(scores, axis=-1, keepdims=True)
  probability = normalized.reshape(batch, seq_len, num_experts).mean(axis=1)  # P_i per sequence [B, E]
  return jnp.mean(jnp.sum(fraction * probability, axis=-1))


class MoE(nnx.Module):
  """x: [B, T, D] -> (y [B, T, D], aux {'expert_load': [E], 'balance_loss': []})."""

  def __init__(self, config: MoEConfig, *, rngs: nnx.Rngs, dtype=jnp.bfloat16, param_dtype=jnp.float32):
    self.config, self.dtype = config, dtype
    c, p = config, param_dtype
    self.router = sharding.param(rngs, (c.hidden_size, c.num_experts), ('embed', None), p)
    self.router_bias = RouterBias(jnp.zeros((c.num_experts,), jnp.float32), logical_axes=(None,))
    expert_in = (c.num_experts, c.hidden_size, c.expert_intermediate_size)
    expert_out = (c.num_experts, c.expert_intermediate_size, c.hidden_size)
    self.gate_proj = sharding.param(rngs, expert_in, ('expert', 'embed', 'mlp'), p, stddev=c.hidden_size ** -0.5)
    self.up_proj = sharding.param(rngs, expert_in, ('expert', 'embed', 'mlp'), p, stddev=c.hidden_size ** -0.5)
    self.down_proj = sharding.param(rngs, expert_out, ('expert', 'mlp', 'embed'), p,
                                    stddev=c.expert_intermediate_size ** -0.5)
    self.shared = nnx.data(MLP(c.hidden_size, c.expert_intermediate_size * c.num_shared_experts, rngs=rngs,
                               dtype=dtype, param_dtype=param_dtype) if c.num_shared_experts else None)

  def routed_experts(self, x: jax.Array, gates: jax.Array, expert_ids: jax.Array) -> jax.Array:
    """Dropless dispatch: sort the N*K (token, expert) pairs by expert, grouped matmuls, unsort, combine.

    x: [N, D], gates/expert_ids: [N, K] -> [N, D].
    """
    num_tokens, top_k = expert_ids.shape
    flat_ids = expert_ids.reshape(-1)
    order = jnp.argsort(flat_ids, stable=True)
    group_sizes = jnp.bincount(flat_ids, length=self.config.num_experts).astype(jnp.int32)
    sorted_x = jnp.take(x, order // top_k, axis=0)
    w = lambda param: param[...].astype(self.dtype)
    matmul = functools.partial(grouped_matmul, group_sizes=group_sizes, impl=self.config.matmul_impl)
    hidden = jax.nn.silu(matmul(sorted_x, w(self.gate_proj))) * matmul(sorted_x, w(self.up_proj))
    sorted_y = matmul(hidden, w(self.down_proj))
    y = jnp.zeros_like(sorted_y).at[order].set(sorted_y).reshape(num_tokens, top_k, -1)
    return jnp.einsum('NKD,NK->ND', y, gates.astype(y.dtype))

  def __call__(self, x: jax.Array):
    batch, seq_len, hidden_size = x.shape
    x = x.astype(self.dtype)
    flat = sharding.constrain(x.reshape(batch * seq_len, hidden_size), ('tokens', 'act_embed'))
    gates, expert_ids, scores = route(flat, self.router[...], self.router_bias[...], self.config)
    y = self.routed_experts(flat, gates, expert_ids).reshape(batch, seq_len, hidden_size)
    if self.shared is not None:
      y = y + self.shared(x)
    aux = {'expert_load': jnp.bincount(expert_ids.reshape(-1), length=self.config.num_experts).astype(jnp.float32)}
    if self.config.balance_loss_weight > 0:
      aux['balance_loss'] = self.config.balance_loss_weight * sequence_balance_loss(scores, expert_ids, batch,
                                                                                   self.config)
    return y, aux

  def dense_reference(self, x: jax.Array) -> jax.Array:
    """Every expert on every token, weighted by the gates (zero for unpicked experts). x: [B, T, D] -> [B, T, D].

    The slow definition the dispatch must equal; used by tests.
    """
    batch, seq_len, hidden_size = x.shape
    x = x.astype(self.dtype)
    flat = x.reshape(-1, hidden_size)
    gates, expert_ids, _ = route(flat, self.router[...], self.router_bias[...], self.config)
    dense_gates = jnp.zeros((flat.shape[0], self.config.num_experts), jnp.float32)
    dense_gates = dense_gates.at[jnp.arange(flat.shape[0])[:, None], expert_ids].set(gates)
    w = lambda param: param[...].astype(self.dtype)
    hidden = (jax.nn.silu(jnp.einsum('ND,EDF->ENF', flat, w(self.gate_proj)))
              * jnp.einsum('ND,EDF->ENF', flat, w(self.up_proj)))
    y = jnp.einsum('ENF,EFD,NE->ND', hidden, w(self.down_proj), dense_gates.astype(self.dtype))
    y = y.reshape(batch, seq_len, hidden_size)
    return y + self.shared(x) if self.shared is not None else y
