"""Mixture of experts: sigmoid router with aux-loss-free bias, dropless sort-based dispatch, shared experts.

DeepSeek-V3 section 2.1.2, as K2 uses it (K2_REFERENCE.md section 1). Einsum legend: N tokens (B*T flattened),
D model width, E routed experts, F expert intermediate width, K experts per token.

Routing: s = sigmoid(x @ W_router) (float32). The per-expert `router_bias` is added to s only to pick the top-K
experts; the gates are the *unbiased* scores of the picked experts, normalized to sum 1, times
routed_scaling_factor. The bias is a `RouterBias` variable, not an `nnx.Param`, so gradients never reach it; the
trainer nudges it toward balance from the expert loads this layer reports.

Expert parallelism: inside `sharding.use_mesh(mesh)` with an 'expert' axis of size ep > 1, the routed experts run
in `jax.shard_map` (`expert_parallel`): each device routes its own tokens, sends each (token, expert) copy to the
device that owns the expert (expert stacks are split into ep blocks of E/ep experts) with an all-to-all, runs its
local experts, and sends the results back. `ep_impl` (RuntimeConfig) picks the exchange: 'ragged' (dropless,
`jax.lax.ragged_all_to_all`, GPU/TPU) or 'capacity' (fixed [ep, capacity, D] buffers and `jax.lax.all_to_all`;
copies beyond capacity are dropped and counted in aux['dropped_tokens']); 'auto' is ragged on GPU/TPU and, on CPU
(XLA:CPU has no ragged all-to-all), the capacity exchange with buffers large enough never to drop, so the default
is dropless and equals one device on every backend. The router, the shared experts and the
expert-load count stay outside, in plain GSPMD, so expert_load is always the global count.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, PartitionSpec

from k2 import sharding
from k2.config import ConfigError, MoEConfig
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

  impl (RuntimeConfig.matmul_impl): 'ragged_dot' is jax.lax.ragged_dot; 'pallas' is the Pallas kernel of
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


EXPERT_AXIS = 'expert'


def expert_ffn(sorted_x: jax.Array, group_sizes: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array,
               matmul_impl: str = 'auto') -> jax.Array:
  """SwiGLU of rows sorted by expert through their expert. sorted_x: [M, D] (group_sizes [E] rows per expert; rows
  past sum(group_sizes) come out zero), w_gate/w_up: [E, D, F], w_down: [E, F, D] -> [M, D]."""
  matmul = functools.partial(grouped_matmul, group_sizes=group_sizes, impl=matmul_impl)
  hidden = jax.nn.silu(matmul(sorted_x, w_gate)) * matmul(sorted_x, w_up)
  return matmul(hidden, w_down)


def _exclusive_cumsum(sizes: jax.Array) -> jax.Array:
  return jnp.cumsum(sizes) - sizes


def capacity_exchange(sorted_x: jax.Array, sorted_ids: jax.Array, expert_fn, *, local_experts: int, num_shards: int,
                      capacity: int, axis_name: str = EXPERT_AXIS):
  """Fixed-size all-to-all dispatch (inside shard_map over `axis_name`); drops copies beyond `capacity`.

  sorted_x [S, D]: this device's (token, expert) copies sorted by global expert id sorted_ids [S]. Shard j owns
  experts [j * G, (j + 1) * G) with G = local_experts = E / num_shards. The copies bound for shard j fill row j of a
  [num_shards, capacity, D] send buffer in expert order; the ones past `capacity` (the last experts' copies, and
  the later tokens of an expert) are dropped. expert_fn(rows [R, D], local_ids [R]) -> [R, D] runs the local
  experts (local_ids == G marks an empty slot). Returns (y [S, D] with zero rows for dropped copies,
  dropped [] int32: the number of this device's copies that were dropped).
  """
  copies, width = sorted_x.shape
  shard = sorted_ids // local_experts
  shard_start = _exclusive_cumsum(jnp.bincount(shard, length=num_shards))
  slot = jnp.arange(copies) - shard_start[shard]  # position among the copies bound for the same shard
  kept = slot < capacity
  slot = jnp.where(kept, slot, capacity)  # out of bounds: the scatters drop it, the gather fills zero
  send_x = jnp.zeros((num_shards, capacity, width), sorted_x.dtype).at[shard, slot].set(sorted_x, mode='drop')
  send_ids = jnp.full((num_shards, capacity), local_experts, jnp.int32).at[shard, slot].set(
      sorted_ids % local_experts, mode='drop')
  # Row j goes to shard j; the received row i came from shard i.
  exchange = functools.partial(jax.lax.all_to_all, axis_name=axis_name, split_axis=0, concat_axis=0, tiled=True)
  recv_x, recv_ids = exchange(send_x), exchange(send_ids)
  out = expert_fn(recv_x.reshape(num_shards * capacity, width), recv_ids.reshape(-1))
  back = exchange(out.reshape(num_shards, capacity, width))
  y = back.at[shard, slot].get(mode='fill', fill_value=0)
  return y, jnp.sum(~kept).astype(jnp.int32)


def ragged_layout(expert_counts: jax.Array, num_shards: int, axis_name: str = EXPERT_AXIS):
  """Sizes and offsets for the two ragged all-to-alls of the dropless exchange (inside shard_map).

  expert_counts [E]: this device's copies per global expert (its copies are sorted by expert, so the ones bound
  for shard j are the contiguous block j). Returns a dict of [num_shards] int32 arrays
    send_sizes, send_offsets: this device's block for shard j (in its sorted copies)
    recv_sizes, recv_offsets: the block received from shard i (in this device's receive buffer, ordered by source)
    remote_recv_offsets: where this device's block lands in shard j's receive buffer
    remote_send_offsets: where shard i's block for this device starts in shard i's sorted copies
  and recv_counts [num_shards, G]: copies received from shard i for local expert g.
  """
  per_shard = expert_counts.reshape(num_shards, -1).astype(jnp.int32)  # [shards, G]
  exchange = functools.partial(jax.lax.all_to_all, axis_name=axis_name, split_axis=0, concat_axis=0, tiled=True)
  send_sizes = per_shard.sum(axis=1)
  send_offsets = _exclusive_cumsum(send_sizes)
  recv_counts = exchange(per_shard)
  recv_sizes = recv_counts.sum(axis=1)
  recv_offsets = _exclusive_cumsum(recv_sizes)
  return dict(send_sizes=send_sizes, send_offsets=send_offsets, recv_sizes=recv_sizes, recv_offsets=recv_offsets,
              remote_recv_offsets=exchange(recv_offsets), remote_send_offsets=exchange(send_offsets),
              recv_counts=recv_counts)


def received_expert_ids(recv_counts: jax.Array, buffer_rows: int) -> jax.Array:
  """Local expert of each row of the dropless receive buffer. recv_counts [shards, G] -> [buffer_rows] int32.

  The buffer holds the block of shard 0, then shard 1, ..., each sorted by expert: the concatenation of
  shards * G segments in (source, expert) order; rows past the last segment get G (empty)."""
  num_local = recv_counts.shape[1]
  segment_ends = jnp.cumsum(recv_counts.reshape(-1))
  segment = jnp.searchsorted(segment_ends, jnp.arange(buffer_rows, dtype=segment_ends.dtype), side='right')
  return jnp.where(segment < segment_ends.shape[0], segment % num_local, num_local).astype(jnp.int32)


def ragged_exchange(sorted_x: jax.Array, sorted_ids: jax.Array, expert_fn, *, local_experts: int, num_shards: int,
                    axis_name: str = EXPERT_AXIS, ragged_all_to_all=jax.lax.ragged_all_to_all):
  """Dropless all-to-all dispatch (inside shard_map over `axis_name`); arguments as `capacity_exchange`.

  Counts are exchanged first (all_to_all), then the copies travel with `ragged_all_to_all` into a receive buffer
  of num_shards * S rows (the worst case: every shard sends all its copies here), and the results come back the
  same way. `ragged_all_to_all` is injectable so the layout can be tested where XLA lacks the collective (CPU).
  """
  copies, width = sorted_x.shape
  layout = ragged_layout(jnp.bincount(sorted_ids, length=num_shards * local_experts), num_shards,
                         axis_name)
  buffer_rows = num_shards * copies
  recv_x = ragged_all_to_all(sorted_x, jnp.zeros((buffer_rows, width), sorted_x.dtype), layout['send_offsets'],
                             layout['send_sizes'], layout['remote_recv_offsets'], layout['recv_sizes'],
                             axis_name=axis_name)
  out = expert_fn(recv_x, received_expert_ids(layout['recv_counts'], buffer_rows))
  y = ragged_all_to_all(out, jnp.zeros_like(sorted_x), layout['recv_offsets'], layout['recv_sizes'],
                        layout['remote_send_offsets'], layout['send_sizes'], axis_name=axis_name)
  return y, jnp.zeros((), jnp.int32)


def _check_expert_axis(num_experts: int, mesh: Mesh) -> None:
  if num_experts % mesh.shape[EXPERT_AXIS]:
    raise ConfigError(f'num_experts={num_experts} is not divisible by the expert axis ({mesh.shape[EXPERT_AXIS]}) '
                      f'of mesh {dict(mesh.shape)}')


def _active_expert_mesh(num_experts: int, num_tokens: int, width: int) -> tuple[Mesh, dict] | None:
  """The (mesh, rules) of the enclosing `sharding.use_mesh` if its expert axis has more than one device and the
  tokens split over it; None otherwise (then the dropless single-program dispatch runs under GSPMD, e.g. for a
  decode batch smaller than the expert axis)."""
  mesh, rules = sharding.active_mesh()
  if mesh is None or mesh.shape.get(EXPERT_AXIS, 1) == 1:
    return None
  _check_expert_axis(num_experts, mesh)
  token_axes = _as_tuple(sharding.logical_to_spec(('tokens', None), (num_tokens, width), mesh, rules)[0])
  return (mesh, rules) if EXPERT_AXIS in token_axes else None


def _as_tuple(entry) -> tuple[str, ...]:
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def expert_parallel(x: jax.Array, gates: jax.Array, expert_ids: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                    w_down: jax.Array, mesh: Mesh, rules=sharding.DEFAULT_RULES, *, ep_impl: str = 'auto',
                    capacity_factor: float = 1.25, matmul_impl: str = 'auto',
                    ragged_all_to_all=jax.lax.ragged_all_to_all):
  """The routed experts split over the mesh's 'expert' axis. x: [N, D], gates/expert_ids: [N, K], w_gate/w_up:
  [E, D, F], w_down: [E, F, D] -> (y [N, D], dropped [] int32: (token, expert) copies dropped over the batch).
  ep_impl, capacity_factor, matmul_impl: RuntimeConfig's ep_impl, ep_capacity_factor and matmul_impl.

  Tokens are split over the batch axes the rules give 'tokens' (which must include 'expert'), expert stacks over
  'expert' (and F over the axes 'mlp' maps to, e.g. 'tensor': the down projection's partial sums are psum-ed);
  other weight axes (fsdp's D) are gathered by XLA before the shard_map.
  """
  num_tokens, top_k = expert_ids.shape
  num_experts, width, inner = w_gate.shape
  num_shards = mesh.shape[EXPERT_AXIS]
  _check_expert_axis(num_experts, mesh)
  if ep_impl == 'auto':  # dropless everywhere: on CPU, a capacity exchange whose buffers hold every local copy
    ep_impl, capacity_factor = ('capacity', num_shards) if mesh.devices.flat[0].platform == 'cpu' else ('ragged', 0)
  if ep_impl == 'ragged' and ragged_all_to_all is jax.lax.ragged_all_to_all and mesh.devices.flat[0].platform == 'cpu':
    raise ConfigError("ep_impl='ragged' needs ragged_all_to_all, which XLA:CPU lacks; use 'auto' or 'capacity'")
  token_axes = _as_tuple(sharding.logical_to_spec(('tokens', None), (num_tokens, width), mesh, rules)[0])
  mlp_axes = _as_tuple(sharding.logical_to_spec(('expert', None, 'mlp'), (num_experts, width, inner), mesh,
                                                rules)[2])
  token_spec = PartitionSpec(token_axes or None)
  in_spec = PartitionSpec(EXPERT_AXIS, None, mlp_axes or None)
  out_spec = PartitionSpec(EXPERT_AXIS, mlp_axes or None, None)
  local_experts = num_experts // num_shards
  local_tokens = num_tokens // math.prod(mesh.shape[axis] for axis in token_axes)
  # Copies each device may send to each expert shard; a factor of num_shards or more never drops (a device holds
  # local_tokens * top_k copies in all).
  capacity = min(math.ceil(capacity_factor * local_tokens * top_k / num_shards), local_tokens * top_k)

  def local(x, gates, expert_ids, w_gate, w_up, w_down):
    def expert_fn(rows, local_ids):  # received rows in arrival order; local_ids == local_experts: empty slot
      order = jnp.argsort(local_ids, stable=True)  # empty slots sort last, past sum(group_sizes): output zero
      group_sizes = jnp.bincount(local_ids, length=local_experts).astype(jnp.int32)
      out = expert_ffn(jnp.take(rows, order, axis=0), group_sizes, w_gate, w_up, w_down, matmul_impl)
      out = jax.lax.psum(out, mlp_axes) if mlp_axes else out  # F split over 'mlp' axes: sum the partial products
      return jnp.zeros_like(out).at[order].set(out)
    flat_ids = expert_ids.reshape(-1)
    order = jnp.argsort(flat_ids, stable=True)
    sorted_x, sorted_ids = jnp.take(x, order // top_k, axis=0), jnp.take(flat_ids, order)
    if ep_impl == 'capacity':
      sorted_y, dropped = capacity_exchange(sorted_x, sorted_ids, expert_fn, local_experts=local_experts,
                                            num_shards=num_shards, capacity=capacity)
    else:
      sorted_y, dropped = ragged_exchange(sorted_x, sorted_ids, expert_fn, local_experts=local_experts,
                                          num_shards=num_shards, ragged_all_to_all=ragged_all_to_all)
    y = jnp.zeros_like(sorted_y).at[order].set(sorted_y).reshape(x.shape[0], top_k, -1)
    return jnp.einsum('NKD,NK->ND', y, gates.astype(y.dtype)), jax.lax.psum(dropped, token_axes)

  return jax.shard_map(local, mesh=mesh, in_specs=(token_spec, token_spec, token_spec, in_spec, in_spec, out_spec),
                       out_specs=(token_spec, PartitionSpec()))(x, gates, expert_ids, w_gate, w_up, w_down)


@jax.custom_vjp
def permute_rows(x: jax.Array, order: jax.Array, inverse: jax.Array) -> jax.Array:
  """x[order] for a permutation `order` whose inverse is `inverse`. Its gradient is the gather g[inverse]: XLA
  would otherwise differentiate the gather into a scatter-add, several times slower on GPUs (profiled on the
  H200 in BENCHMARKS.md, bench_train)."""
  return jnp.take(x, order, axis=0, unique_indices=True)


def _permute_rows_fwd(x, order, inverse):
  return permute_rows(x, order, inverse), (order, inverse)


def _permute_rows_bwd(residuals, g):
  order, inverse = residuals
  return jnp.take(g, inverse, axis=0, unique_indices=True), None, None


permute_rows.defvjp(_permute_rows_fwd, _permute_rows_bwd)


class MoE(nnx.Module):
  """x: [B, T, D] -> (y [B, T, D], aux {'expert_load': [E], 'dropped_tokens': [] int32, 'balance_loss': []}).

  expert_load counts every routed (token, expert) copy over the whole batch; dropped_tokens the copies the
  capacity exchange of expert parallelism dropped (0 otherwise); balance_loss only when its weight is > 0.
  matmul_impl, ep_impl, ep_capacity_factor: how the experts compute and travel (RuntimeConfig's fields).
  """

  def __init__(self, config: MoEConfig, *, rngs: nnx.Rngs, dtype=jnp.bfloat16, param_dtype=jnp.float32,
               matmul_impl: str = 'auto', ep_impl: str = 'auto', ep_capacity_factor: float = 1.25):
    self.config, self.dtype = config, dtype
    self.matmul_impl, self.ep_impl, self.ep_capacity_factor = matmul_impl, ep_impl, ep_capacity_factor
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
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.size, dtype=order.dtype))
    group_sizes = jnp.bincount(flat_ids, length=self.config.num_experts).astype(jnp.int32)
    sorted_x = permute_rows(jnp.repeat(x, top_k, axis=0), order, inverse)
    w = lambda param: param[...].astype(self.dtype)
    sorted_y = expert_ffn(sorted_x, group_sizes, w(self.gate_proj), w(self.up_proj), w(self.down_proj),
                          self.matmul_impl)
    y = permute_rows(sorted_y, inverse, order).reshape(num_tokens, top_k, -1)
    return jnp.einsum('NKD,NK->ND', y, gates.astype(y.dtype))

  def __call__(self, x: jax.Array):
    batch, seq_len, hidden_size = x.shape
    expert_mesh = _active_expert_mesh(self.config.num_experts, batch * seq_len, hidden_size)
    x = x.astype(self.dtype)
    flat = sharding.constrain(x.reshape(batch * seq_len, hidden_size), ('tokens', 'act_embed'))
    gates, expert_ids, scores = route(flat, self.router[...], self.router_bias[...], self.config)
    if expert_mesh is not None:
      w = lambda param: param[...].astype(self.dtype)
      y, dropped = expert_parallel(flat, gates, expert_ids, w(self.gate_proj), w(self.up_proj), w(self.down_proj),
                                   *expert_mesh, ep_impl=self.ep_impl, capacity_factor=self.ep_capacity_factor,
                                   matmul_impl=self.matmul_impl)
    else:
      y, dropped = self.routed_experts(flat, gates, expert_ids), jnp.zeros((), jnp.int32)
    y = y.reshape(batch, seq_len, hidden_size)
    if self.shared is not None:
      y = y + self.shared(x)
    aux = {'expert_load': jnp.bincount(expert_ids.reshape(-1), length=self.config.num_experts).astype(jnp.float32),
           'dropped_tokens': dropped}
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
