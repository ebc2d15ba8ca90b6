"""The pure train_step: gradient accumulation, rematerialization, QK-Clip and router-bias effects, donation."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from k2 import model as model_lib
from k2.config import get_config
from k2.optim import muon_adamw
from k2.train import step as step_lib

CONFIG = get_config('k2_tiny', num_layers=2)


def batch(rows=4, seq=16, seed=0):
  rng = np.random.default_rng(seed)
  segment_ids = np.repeat(np.array([[1] * (seq // 2) + [2] * (seq - seq // 2)]), rows, axis=0).astype(np.int32)
  positions = np.concatenate([np.arange(seq // 2), np.arange(seq - seq // 2)])
  return {'inputs': rng.integers(0, CONFIG.vocab_size, (rows, seq)).astype(np.int32),
          'targets': rng.integers(0, CONFIG.vocab_size, (rows, seq)).astype(np.int32),
          'positions': np.tile(positions, (rows, 1)).astype(np.int32), 'segment_ids': segment_ids,
          'mask': np.ones((rows, seq), np.float32)}


TX = muon_adamw(1e-2)  # one optimizer and schedule object, so equal setups hit the same compiled step


def constant_schedule(step):
  return 1e-2


def setup_and_state(config=CONFIG, **kwargs):
  graphdef, state = step_lib.init_state(model_lib.create(config, seed=0), TX)
  return step_lib.StepSetup(graphdef=graphdef, model_config=config, optimizer=TX, schedule=constant_schedule,
                            **kwargs), state


def leaves(state):
  return [np.asarray(x) for x in jax.tree.leaves((state.params, state.buffers))]


def test_gradient_accumulation_equals_one_big_batch():
  data = jax.tree.map(jnp.asarray, batch(rows=4))
  setup, state = setup_and_state(qk_clip_tau=None)
  loss_one, grads_one, aux_one = step_lib._gradients(state, data, setup)
  setup, state = setup_and_state(qk_clip_tau=None, grad_accum_steps=2)
  loss_two, grads_two, aux_two = jax.jit(step_lib._gradients, static_argnums=2)(state, data, setup)
  # Full masks: the token-weighted mean (what accumulation computes) is also the mean of micro-batch means.
  assert float(loss_one) == pytest.approx(float(loss_two), rel=1e-6)
  for a, b in zip(jax.tree.leaves(grads_one), jax.tree.leaves(grads_two)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(aux_one['expert_load'], aux_two['expert_load'])
  np.testing.assert_allclose(aux_one['max_logits'], aux_two['max_logits'], rtol=1e-6)


@pytest.mark.parametrize('policy', ['full', 'dots'])
def test_rematerialization_does_not_change_the_gradients(policy):
  data = jax.tree.map(jnp.asarray, batch())
  gradients = jax.jit(step_lib._gradients, static_argnums=2)
  setup, state = setup_and_state(qk_clip_tau=None)
  loss, grads, _ = gradients(state, data, setup)
  setup, state = setup_and_state(CONFIG.replace(remat_policy=policy), qk_clip_tau=None)
  remat_loss, remat_grads, _ = gradients(state, data, setup)
  assert float(loss) == pytest.approx(float(remat_loss), rel=1e-6)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(remat_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)


def test_chunked_loss_gives_the_same_loss_and_gradients():
  data = jax.tree.map(jnp.asarray, batch(seq=32))
  data['mask'] = data['mask'].at[:, ::3].set(0.0)  # masked positions must not contribute either
  gradients = jax.jit(step_lib._gradients, static_argnums=2)
  setup, state = setup_and_state(qk_clip_tau=None)
  loss, grads, _ = gradients(state, data, setup)
  setup, state = setup_and_state(qk_clip_tau=None, loss_chunk=8)
  chunked_loss, chunked_grads, _ = gradients(state, data, setup)
  assert float(loss) == pytest.approx(float(chunked_loss), rel=1e-6)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(chunked_grads)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7)


def test_chunked_loss_in_bfloat16_rounds_where_the_full_logits_do():
  """bf16: the chunked op's own outputs (the loss, lm_head's gradient, and the hidden states' gradient, seen in
  the final norm's) match the full-logit path's; the layers below then differ only by how XLA compiles each
  graph's bf16 backward (single-ulp roundings), so they are not compared. XLA's excess precision, which may skip
  bf16 roundings inside a fusion, is off so both paths round where their code says."""
  config = CONFIG.replace(dtype='bfloat16')
  data = jax.tree.map(jnp.asarray, batch(seq=32))
  data['mask'] = data['mask'].at[:, ::3].set(0.0)
  gradients = jax.jit(step_lib._gradients, static_argnums=2,
                      compiler_options={'xla_allow_excess_precision': False})
  setup, state = setup_and_state(config, qk_clip_tau=None)
  loss, grads, _ = gradients(state, data, setup)
  setup, state = setup_and_state(config, qk_clip_tau=None, loss_chunk=8)
  chunked_loss, chunked_grads, _ = gradients(state, data, setup)
  assert float(loss) == pytest.approx(float(chunked_loss), rel=1e-6)
  relative = lambda a, b: np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(a))
  assert relative(grads['lm_head'][...], chunked_grads['lm_head'][...]) < 1e-4
  assert relative(grads['final_norm']['scale'][...], chunked_grads['final_norm']['scale'][...]) < 1e-6


def test_chunked_loss_keeps_one_chunk_of_logits():
  """The compiled step's temporaries shrink with the chunk: the whole [rows, T, V] float32 logits are gone."""
  config = get_config('k2_tiny', num_layers=1, first_k_dense=1)
  data = jax.tree.map(jnp.asarray, batch(rows=8, seq=128))
  temp = {}
  for chunk in (None, 16):
    setup, state = setup_and_state(config, qk_clip_tau=None, loss_chunk=chunk)
    compiled = jax.jit(step_lib._gradients, static_argnums=2).lower(state, data, setup).compile()
    temp[chunk] = compiled.memory_analysis().temp_size_in_bytes
  whole_logits = 8 * 128 * config.vocab_size * 4
  assert temp[None] - temp[16] > whole_logits  # logits and their gradient, less one chunk of each


def test_qk_clip_rescales_the_updated_weights_by_this_steps_max_logits():
  from flax import nnx
  data = batch()
  tau = 1e-3
  setup, state = setup_and_state(qk_clip_tau=None, bias_update_rate=0.01)
  model = nnx.merge(setup.graphdef, state.params, state.buffers)
  _, aux = model(jnp.asarray(data['inputs']), jnp.asarray(data['positions']), jnp.asarray(data['segment_ids']))
  gamma = np.minimum(1.0, tau / np.asarray(aux['max_logits']))  # [L, H], from the step's own forward
  before_bias = [np.asarray(x) for x in jax.tree.leaves(state.buffers)]
  unclipped, _ = step_lib.train_step(state, data, setup)
  setup, state = setup_and_state(qk_clip_tau=tau, bias_update_rate=0.01)
  clipped, metrics = step_lib.train_step(state, data, setup)
  assert int(metrics['clipped_heads']) == int(np.sum(gamma < 1))
  nope = CONFIG.attention.qk_nope_head_dim
  for layer in range(CONFIG.num_layers):
    q_ratio = (np.asarray(clipped.params['layers'][layer]['attn']['q_b_proj'][...]) /
               np.asarray(unclipped.params['layers'][layer]['attn']['q_b_proj'][...]))
    np.testing.assert_allclose(q_ratio[..., :nope], np.broadcast_to(np.sqrt(gamma[layer])[None, :, None],
                                                                    q_ratio[..., :nope].shape), rtol=1e-4)
    np.testing.assert_allclose(q_ratio[..., nope:], np.broadcast_to(gamma[layer][None, :, None],
                                                                    q_ratio[..., nope:].shape), rtol=1e-4)
  moved = [a - b for a, b in zip([np.asarray(x) for x in jax.tree.leaves(clipped.buffers)], before_bias)]
  assert all(np.all(np.isin(np.round(m / 0.01, 3), [-1, 0, 1])) for m in moved)  # sign steps of the rate
  assert any(np.any(m != 0) for m in moved)
  assert int(clipped.step) == 1 and float(metrics['update_rms']) > 0


def test_state_is_donated():
  setup, state = setup_and_state(qk_clip_tau=None, bias_update_rate=0.01)
  old_param = jax.tree.leaves(state.params)[0]
  step_lib.train_step(state, batch(), setup)
  assert old_param.is_deleted()


def test_chunked_loss_on_a_mesh_matches_one_device():
  """Batch over data x fsdp, vocab over tensor: the chunks' log-sum-exp and gradients reduce across the shards."""
  from jax.sharding import NamedSharding, PartitionSpec
  from k2 import sharding
  data = jax.tree.map(jnp.asarray, batch(rows=4, seq=32))
  gradients = jax.jit(step_lib._gradients, static_argnums=2)
  setup, state = setup_and_state(qk_clip_tau=None, loss_chunk=8)
  loss, grads, _ = gradients(state, data, setup)
  mesh = sharding.make_mesh({'data': 2, 'tensor': 4})
  with sharding.use_mesh(mesh):
    model = model_lib.create(CONFIG, seed=0)
    sharding.shard_model(model, mesh)
    graphdef, sharded_state = step_lib.init_state(model, TX)
    sharded_data = jax.device_put(data, NamedSharding(mesh, PartitionSpec(('data', 'fsdp', 'expert'))))
    sharded_loss, sharded_grads, _ = gradients(sharded_state, sharded_data, setup)
  assert float(loss) == pytest.approx(float(sharded_loss), rel=1e-5)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(sharded_grads)):
    np.testing.assert_allclose(a, np.asarray(b), rtol=1e-4, atol=1e-6)


def uneven_mask_batch(rows=8, seq=16):
  """Loss masks that differ a lot between the micro-batches of accumulation 4 (rows i, i + 4 form micro-batch i):
  SFT-like assistant spans of different lengths, one row with no loss token at all."""
  data = batch(rows=rows, seq=seq, seed=3)
  mask = np.zeros((rows, seq), np.float32)
  for row, (start, stop) in enumerate([(0, 16), (12, 14), (3, 16), (15, 16), (8, 9), (0, 0), (2, 11), (5, 15)]):
    mask[row, start:stop] = 1.0
  data['mask'] = mask
  return data


SGD = optax.sgd(0.5)  # plain SGD: the update is -lr * gradient, so equal updates mean equal gradients


def sgd_step(data, accum, mesh=None):
  """One plain-SGD train_step of float32 k2_tiny (no QK-Clip, no bias change): (loss, params after - before)."""
  from flax import nnx
  from jax.sharding import NamedSharding, PartitionSpec
  from k2 import sharding
  config = CONFIG.replace(dtype='float32')
  context = sharding.use_mesh(mesh) if mesh is not None else contextlib.nullcontext()
  with context:
    model = model_lib.create(config, seed=0)
    if mesh is not None:
      sharding.shard_model(model, mesh)
      data = jax.device_put(data, NamedSharding(mesh, PartitionSpec(('data', 'fsdp', 'expert'))))
    graphdef, state = step_lib.init_state(model, SGD)
    before = [np.asarray(x) for x in jax.tree.leaves(state.params)]
    setup = step_lib.StepSetup(graphdef=graphdef, model_config=config, optimizer=SGD, schedule=constant_schedule,
                               qk_clip_tau=None, bias_update_rate=0.0, grad_accum_steps=accum)
    state, metrics = step_lib.train_step(state, data, setup)
  del nnx
  return float(metrics['loss']), [np.asarray(a) - b for a, b in zip(jax.tree.leaves(state.params), before)]


def assert_same_update(one, other):
  (loss_one, update_one), (loss_other, update_other) = one, other
  assert loss_other == pytest.approx(loss_one, rel=1e-4)
  flat_one, flat_other = np.concatenate([u.ravel() for u in update_one]), np.concatenate([u.ravel() for u in
                                                                                         update_other])
  assert np.linalg.norm(flat_other - flat_one) <= 1e-4 * np.linalg.norm(flat_one)


def test_accumulation_with_uneven_loss_masks_is_the_token_weighted_mean():
  """Accumulation 4 vs 1 with very different loss masks per micro-batch: the same loss and update (plain SGD)."""
  data = uneven_mask_batch()
  one = sgd_step(data, accum=1)
  assert_same_update(one, sgd_step(data, accum=4))
  # And it is the token-weighted mean, not the mean of micro-batch means (which this data tells apart).
  micro_means = [float(data['mask'][i::4].sum()) for i in range(4)]
  assert min(micro_means) != max(micro_means)


def test_accumulation_with_uneven_loss_masks_on_a_mesh_matches_one_device():
  from k2 import sharding
  assert jax.device_count() == 8
  data = uneven_mask_batch()
  mesh = sharding.make_mesh({'data': 2, 'fsdp': 2, 'expert': 2})  # 8 rows: 4 micro-batches of 2 rows, one per shard
  assert_same_update(sgd_step(data, accum=1), sgd_step(data, accum=4, mesh=mesh))
  assert_same_update(sgd_step(data, accum=1), sgd_step(data, accum=1, mesh=mesh))


def test_a_stage_loss_with_its_own_aux_reduces_by_its_rules():
  """A custom loss (per-sequence terms, an extra logged mean and max): token-weighted aux over micro-batches."""
  data = jax.tree.map(jnp.asarray, uneven_mask_batch())

  def sequence_loss(model, batch):
    logits, aux = model(batch['inputs'], batch['positions'], batch['segment_ids'])
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits, batch['targets'])
    per_row = jnp.sum(per_token * batch['mask'], axis=-1) / jnp.maximum(jnp.sum(batch['mask'], axis=-1), 1.0)
    rows = jnp.ones_like(per_row)
    return jnp.sum(per_row), jnp.sum(rows), {**aux, 'row_loss_mean': jnp.mean(per_row),
                                             'row_loss_max': jnp.max(per_row)}

  rules = (('row_loss_mean', 'token_mean'), ('row_loss_max', 'max'))
  results = {}
  for accum in (1, 4):
    setup, state = setup_and_state(qk_clip_tau=None, grad_accum_steps=accum, loss_fn=sequence_loss,
                                   aux_reductions=rules)
    _, metrics = step_lib.train_step(state, data, setup)
    results[accum] = {k: float(metrics[k]) for k in ('loss', 'row_loss_mean', 'row_loss_max')}
  assert results[4] == pytest.approx(results[1], rel=1e-5)
  assert results[1]['loss'] == pytest.approx(results[1]['row_loss_mean'], rel=1e-6)

  with pytest.raises(ValueError, match='no reduction rule'):
    setup, state = setup_and_state(qk_clip_tau=None, loss_fn=sequence_loss)
    step_lib.train_step(state, data, setup)


def test_eval_step_uses_the_stage_loss_chunked_like_training():
  data = jax.tree.map(jnp.asarray, batch(seq=32))
  data['mask'] = data['mask'].at[:, ::3].set(0.0)
  setup, state = setup_and_state(qk_clip_tau=None)
  loss_sum, count = step_lib.eval_step(state, data, setup)
  setup, state = setup_and_state(qk_clip_tau=None, loss_chunk=8)
  chunked_sum, chunked_count = step_lib.eval_step(state, data, setup)
  assert float(count) == float(chunked_count) == float(np.sum(np.asarray(data['mask'])))
  assert float(chunked_sum) == pytest.approx(float(loss_sum), rel=1e-6)
  train_loss, _, _ = jax.jit(step_lib._gradients, static_argnums=2)(state, data, setup)
  assert float(train_loss) == pytest.approx(float(loss_sum) / float(count), rel=1e-6)
