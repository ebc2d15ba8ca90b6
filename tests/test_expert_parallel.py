"""Expert parallelism (k2.moe.expert_parallel) on 8 fake CPU devices: the all-to-all dispatch inside shard_map
equals the single-device dropless MoE (forward, expert loads, gradients); the capacity exchange drops exactly the
copies past capacity and reports how many; the dropless ragged exchange is checked with an all-gather stand-in
for ragged_all_to_all, which XLA:CPU lacks."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from k2 import sharding
from k2.config import ConfigError, MoEConfig
from k2.moe import MoE, expert_parallel, received_expert_ids, route

CONFIG = MoEConfig(hidden_size=16, num_experts=8, num_experts_per_token=2, num_shared_experts=1,
                   expert_intermediate_size=12, routed_scaling_factor=2.827)
BATCH_AXES = ('data', 'fsdp', 'expert')
MESHES = [{'expert': 8}, {'data': 2, 'expert': 4}, {'fsdp': 2, 'expert': 2, 'tensor': 2}]


def make_moe(config=CONFIG, skew=False, **runtime):
  """runtime: MoE's ep_impl / ep_capacity_factor / matmul_impl."""
  moe = MoE(config, rngs=nnx.Rngs(0), dtype=jnp.float32, **runtime)
  if skew:  # nearly every token picks expert 3 (sigmoid scores lie in (0, 1))
    moe.router_bias[...] = jnp.zeros(config.num_experts).at[3].set(10.0)
  return moe


def inputs(batch=8, seq_len=16):
  return jax.random.normal(jax.random.key(1), (batch, seq_len, CONFIG.hidden_size))


def forward_and_grads(moe, x):
  """(y, aux, grads w.r.t. the parameters, grad w.r.t. x, compiled HLO text) of sum(y * fixed random weights)."""
  graphdef, params, rest = nnx.split(moe, nnx.Param, ...)
  weights = jax.random.normal(jax.random.key(2), x.shape)

  def loss(params, x):
    y, aux = nnx.merge(graphdef, params, rest)(x)
    return jnp.sum(y * weights), (y, aux)

  compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)).lower(params, x).compile()
  (_, (y, aux)), (grad_params, grad_x) = compiled(params, x)
  return y, aux, grad_params, grad_x, compiled.as_text()


@functools.cache
def one_device():
  """forward_and_grads of make_moe() on inputs() without a mesh (computed once for every mesh)."""
  moe, x = make_moe(), inputs()
  y, aux, grads, grad_x, hlo = forward_and_grads(moe, x)
  np.testing.assert_allclose(np.asarray(y), np.asarray(moe.dense_reference(x)), rtol=1e-5, atol=1e-5)
  assert 'all-to-all' not in hlo
  return y, aux, grads, grad_x


@pytest.mark.parametrize('axes', MESHES, ids=str)
def test_default_exchange_is_dropless_and_equals_one_device(axes):
  """ep_impl='auto' on CPU: the capacity exchange with buffers that hold every local copy."""
  y_one, aux_one, grads_one, grad_x_one = one_device()
  moe, x = make_moe(), inputs()
  mesh = sharding.make_mesh(axes)
  with sharding.use_mesh(mesh):
    sharding.shard_model(moe, mesh)
    x_sharded = jax.device_put(x, jax.NamedSharding(mesh, jax.P(BATCH_AXES)))
    y, aux, grads, grad_x, hlo = forward_and_grads(moe, x_sharded)
  assert 'all-to-all' in hlo  # the tokens really travel to their experts' devices and back
  assert int(aux['dropped_tokens']) == 0
  np.testing.assert_array_equal(np.asarray(aux['expert_load']), np.asarray(aux_one['expert_load']))
  # float32; the expert products are the same, only the order of the final sums can differ.
  np.testing.assert_allclose(np.asarray(y), np.asarray(y_one), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(grad_x), np.asarray(grad_x_one), rtol=1e-5, atol=1e-5)
  for name in ('gate_proj', 'up_proj', 'down_proj', 'router'):
    np.testing.assert_allclose(np.asarray(grads[name][...]), np.asarray(grads_one[name][...]), rtol=1e-4,
                               atol=1e-5, err_msg=name)


def expert_ffn_numpy(moe, x, expert):
  w = lambda param: np.asarray(param[...][expert], np.float64)
  gate, up = x @ w(moe.gate_proj), x @ w(moe.up_proj)
  return (gate / (1 + np.exp(-gate)) * up) @ w(moe.down_proj)


def test_capacity_exchange_drops_and_counts_the_copies_past_capacity():
  axes, capacity_factor = {'data': 2, 'expert': 4}, 0.5
  moe, x = make_moe(skew=True, ep_impl='capacity', ep_capacity_factor=capacity_factor), inputs()
  flat = np.asarray(x, np.float64).reshape(-1, CONFIG.hidden_size)
  gates, expert_ids, _ = map(np.asarray, route(x.reshape(-1, CONFIG.hidden_size), moe.router[...],
                                                moe.router_bias[...], CONFIG))
  # Hand count: the batch splits into 8 contiguous blocks of 16 tokens (data-major); each block sends its copies,
  # sorted by (expert, token), to shard expert // 2; the first `capacity` copies per shard are kept.
  num_shards, top_k, blocks = 4, CONFIG.num_experts_per_token, 8
  local_tokens = flat.shape[0] // blocks
  capacity = math.ceil(capacity_factor * local_tokens * top_k / num_shards)
  kept = np.zeros(expert_ids.shape, bool)
  for block in range(blocks):
    rows = slice(block * local_tokens, (block + 1) * local_tokens)
    ids = expert_ids[rows].reshape(-1)
    order = np.argsort(ids, kind='stable')
    shard = ids[order] // (CONFIG.num_experts // num_shards)
    rank = np.arange(ids.size) - np.searchsorted(shard, shard)  # position among copies bound for the same shard
    block_kept = np.zeros(ids.size, bool)
    block_kept[order] = rank < capacity
    kept[rows] = block_kept.reshape(-1, top_k)
  expected_dropped = int((~kept).sum())
  assert expected_dropped > 0
  expected_y = np.zeros_like(flat)
  for token, k in zip(*np.nonzero(kept)):
    expected_y[token] += gates[token, k] * expert_ffn_numpy(moe, flat[token], expert_ids[token, k])
  expected_y += np.asarray(moe.shared(x)).reshape(flat.shape)

  mesh = sharding.make_mesh(axes)
  with sharding.use_mesh(mesh):
    sharding.shard_model(moe, mesh)
    y, aux = nnx.jit(lambda m, x: m(x))(moe, jax.device_put(x, jax.NamedSharding(mesh, jax.P(BATCH_AXES))))
  assert int(aux['dropped_tokens']) == expected_dropped
  # expert_load counts every routed copy over the whole batch, dropped or not (the bias update needs the demand).
  np.testing.assert_array_equal(np.asarray(aux['expert_load']),
                                np.bincount(expert_ids.reshape(-1), minlength=CONFIG.num_experts))
  np.testing.assert_allclose(np.asarray(y).reshape(flat.shape), expected_y, rtol=1e-4, atol=1e-4)


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                               axis_name):
  """jax.lax.ragged_all_to_all's documented semantics (one slice per peer) from all_gathers, for XLA:CPU."""
  del recv_sizes  # implied by the senders' sizes
  me = jax.lax.axis_index(axis_name)
  gather = lambda a: jax.lax.all_gather(a, axis_name)
  operands = gather(operand)  # [shards, rows, ...]
  starts, sizes, targets = gather(input_offsets)[:, me], gather(send_sizes)[:, me], gather(output_offsets)[:, me]
  rows = jnp.arange(output.shape[0])
  result = output
  for source in range(operands.shape[0]):
    inside = (rows >= targets[source]) & (rows < targets[source] + sizes[source])
    taken = jnp.take(operands[source], jnp.clip(starts[source] + rows - targets[source], 0,
                                                operands.shape[1] - 1), axis=0)
    result = jnp.where(inside[:, None], taken, result)
  return result


@pytest.mark.parametrize('skew', [False, True], ids=['balanced', 'skewed'])
def test_ragged_exchange_is_dropless(skew):
  """The dropless path's counts, offsets and receive layout, with an all-gather stand-in for the collective."""
  config = dataclasses.replace(CONFIG, num_shared_experts=0)
  moe, x = make_moe(config, skew=skew), inputs(batch=8, seq_len=4)
  flat = x.reshape(-1, config.hidden_size)
  gates, expert_ids, _ = route(flat, moe.router[...], moe.router_bias[...], config)
  mesh = sharding.make_mesh({'data': 2, 'expert': 4})
  run = jax.jit(lambda *args: expert_parallel(*args, mesh, ep_impl='ragged',
                                              ragged_all_to_all=emulated_ragged_all_to_all))
  y, dropped = run(flat, gates, expert_ids, moe.gate_proj[...], moe.up_proj[...], moe.down_proj[...])
  assert int(dropped) == 0
  np.testing.assert_allclose(np.asarray(y), np.asarray(moe.dense_reference(x)).reshape(flat.shape), rtol=1e-5,
                             atol=1e-5)


def test_received_expert_ids_follow_the_source_major_layout():
  recv_counts = jnp.array([[2, 0], [1, 3], [0, 0]])  # from source 0: 2 rows of expert 0; source 1: 1 + 3 rows
  np.testing.assert_array_equal(np.asarray(received_expert_ids(recv_counts, 9)), [0, 0, 0, 1, 1, 1, 2, 2, 2])


def test_bad_expert_parallel_setups_are_one_line_errors():
  mesh = sharding.make_mesh({'data': 2, 'expert': 4})
  moe = make_moe(dataclasses.replace(CONFIG, num_experts=6))
  with sharding.use_mesh(mesh):
    with pytest.raises(ConfigError, match=r'num_experts=6 is not divisible by the expert axis \(4\)'):
      moe(inputs())
  moe = make_moe()
  flat = inputs().reshape(-1, CONFIG.hidden_size)
  gates, expert_ids, _ = route(flat, moe.router[...], moe.router_bias[...], CONFIG)
  with pytest.raises(ConfigError, match='XLA:CPU lacks'):
    expert_parallel(flat, gates, expert_ids, moe.gate_proj[...], moe.up_proj[...], moe.down_proj[...], mesh,
                    ep_impl='ragged')


def test_dropless_path_lowers_for_gpu_with_ragged_all_to_all():
  """XLA:CPU cannot run the real collective, but the dropless path (forward and gradients) lowers for CUDA: two
  ragged_all_to_all per MoE layer forward (dispatch, combine) and two more in the backward (their transposes)."""
  config = dataclasses.replace(CONFIG, num_shared_experts=0)
  moe, x = make_moe(config), inputs(batch=8, seq_len=4)
  flat = x.reshape(-1, config.hidden_size)
  gates, expert_ids, _ = route(flat, moe.router[...], moe.router_bias[...], config)
  mesh = sharding.make_mesh({'data': 2, 'expert': 4})
  real_collective = lambda *args, **kwargs: jax.lax.ragged_all_to_all(*args, **kwargs)  # skips the CPU guard

  def loss(gate, up, down, flat):
    y, _ = expert_parallel(flat, gates, expert_ids, gate, up, down, mesh, ep_impl='ragged',
                           ragged_all_to_all=real_collective)
    return jnp.sum(y.astype(jnp.float32) ** 2)

  weights = (moe.gate_proj[...], moe.up_proj[...], moe.down_proj[...])
  forward = jax.jit(loss).trace(*weights, flat).lower(lowering_platforms=('cuda',)).as_text()
  assert forward.count('ragged_all_to_all') == 2
  backward = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).trace(*weights, flat).lower(
      lowering_platforms=('cuda',)).as_text()
  assert backward.count('ragged_all_to_all') == 4
