"""Muon (k2.optim.muon) against an independent float64 NumPy Muon, against optax.contrib.muon, and the WSD schedule.

Where k2's muon and optax.contrib.muon (optax 0.2.8) differ, precisely:
  1. Momentum buffer. Ours is the plain sum of the K2 report, M_t = mu M_{t-1} + G_t. optax keeps an EMA,
     m_t = mu m_{t-1} + (1 - mu) G_t = (1 - mu) M_t, and bias-corrects it. Newton-Schulz is invariant to the scale
     of its input (up to eps), so without Nesterov the two orthogonalize the same matrix and match at every step.
  2. Nesterov. Ours orthogonalizes mu M_t + G_t (Moonlight, K2). optax orthogonalizes
     mu m_t / (1 - mu^(t+1)) + (1 - mu) G_t / (1 - mu^t), proportional to w_t M_t + G_t with
     w_t = mu (1 - mu^t) / (1 - mu^(t+1)). At t = 1, M_1 = G_1, so both are proportional to G_1 and match; from
     t = 2 on the momentum weights differ (w_t -> mu only as t grows). Tested below, step by step.
  3. Update scale. Ours: rms_scale * sqrt(max(n, m)). optax's default (consistent_rms=None) is Keller Jordan's
     sqrt(max(1, fan_out / fan_in)); `consistent_rms=rms_scale` gives ours, and the tests use it.
  4. Newton-Schulz precision. Ours runs in `ns_dtype` (bfloat16 by default, the reference precision, products
     accumulated in float32); optax runs in the momentum's dtype (float32 here). The tests compare in float32. optax
     adds eps = 1e-8 to the Frobenius norm by default; ours 1e-7 (the tests pass eps=1e-7 to optax).
  5. Leaves. optax sends every leaf that is not 2-D (vectors, and 3-D stacks unless given
     `muon_weight_dimension_numbers`) to an internal AdamW. Ours trains [n, m] and [batch, n, m] leaves (a stack is
     orthogonalized matrix by matrix, like optax with reduction_axis=1, output_axis=2) and rejects anything else at
     init: K2 routes non-matrix parameters to AdamW outside Muon.
  6. Smaller things: ours has no `adaptive` (dual-norm) scaling, no NS preconditioning variants or per-step
     coefficient lists, no weight-decay mask, and needs `params` in every update. Weight decay is placed the same
     way in both: -lr * (O_t + weight_decay * W).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax.contrib import MuonDimensionNumbers
import pytest

from k2.optim import muon
from k2.optim import wsd_schedule

NS_COEFFS = (3.4445, -4.7750, 2.0315)
MOMENTUM = 0.95
# Relative Frobenius error of each step's update against float64 NumPy (measured: about 1e-6 with float32
# Newton-Schulz, 1% to 2.2% with bfloat16 Newton-Schulz, the reference precision).
TOLERANCE_NS_FLOAT32 = 1e-5
TOLERANCE_NS_BFLOAT16 = 4e-2


def numpy_newton_schulz(x, steps=5, coeffs=NS_COEFFS, eps=1e-7):
  """float64 Newton-Schulz over [..., n, m], written from the K2 report, independently of k2.optim."""
  a, b, c = coeffs
  transposed = x.shape[-2] > x.shape[-1]
  if transposed:
    x = np.swapaxes(x, -1, -2)
  x = x / (np.sqrt(np.sum(x * x, axis=(-2, -1), keepdims=True)) + eps)
  for _ in range(steps):
    gram = x @ np.swapaxes(x, -1, -2)
    x = a * x + (b * gram + c * gram @ gram) @ x
  return np.swapaxes(x, -1, -2) if transposed else x


def numpy_muon_updates(params, grads_per_step, learning_rates, *, nesterov=True, weight_decay=0.0,
                       rms_scale=0.2, nesterov_momentum_weight=lambda step: MOMENTUM):
  """Updates of float64 Muon (K2 report Algorithm 1), one dict per step; params evolve with the updates.

  nesterov_momentum_weight(t): w in NS(w M_t + G_t) at step t = 1, 2, ... (MOMENTUM for K2; see the module
  docstring for optax's).
  """
  params = {name: np.asarray(value, np.float64) for name, value in params.items()}
  momenta = {name: np.zeros_like(value) for name, value in params.items()}
  all_updates = []
  for step, (grads, lr) in enumerate(zip(grads_per_step, learning_rates), start=1):
    updates = {}
    for name, param in params.items():
      grad = np.asarray(grads[name], np.float64)
      momenta[name] = MOMENTUM * momenta[name] + grad
      direction = nesterov_momentum_weight(step) * momenta[name] + grad if nesterov else momenta[name]
      scale = rms_scale * math.sqrt(max(param.shape[-2:]))
      updates[name] = -lr * (numpy_newton_schulz(direction) * scale + weight_decay * param)
      params[name] = param + updates[name]
    all_updates.append(updates)
  return all_updates


SHAPES = {'wide': (8, 24), 'tall': (40, 12), 'experts': (3, 16, 20)}


def _random_tree(seed):
  keys = jax.random.split(jax.random.key(seed), len(SHAPES))
  return {name: jax.random.normal(key, shape) for key, (name, shape) in zip(keys, SHAPES.items())}


def _run(optimizer, params, grads_per_step, compiler_options=None):
  """Updates of `optimizer` over the steps (jitted), one dict per step; params evolve with the updates."""
  state = optimizer.init(params)
  update = jax.jit(optimizer.update, compiler_options=compiler_options)
  all_updates = []
  for grads in grads_per_step:
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    all_updates.append(updates)
  return all_updates, state


def _relative_error(actual, expected):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return np.linalg.norm(actual - expected) / np.linalg.norm(expected)


def _assert_updates_close(actual_per_step, expected_per_step, tolerance):
  for actual, expected in zip(actual_per_step, expected_per_step, strict=True):
    for name in SHAPES:
      assert _relative_error(actual[name], expected[name]) < tolerance, name


@pytest.mark.parametrize('num_steps', [1, 3])
@pytest.mark.parametrize('nesterov', [True, False])
@pytest.mark.parametrize('ns_dtype, tolerance', [(jnp.float32, TOLERANCE_NS_FLOAT32),
                                                 (jnp.bfloat16, TOLERANCE_NS_BFLOAT16)])
def test_matches_float64_numpy(num_steps, nesterov, ns_dtype, tolerance):
  params = _random_tree(0)
  grads_per_step = [_random_tree(seed) for seed in range(1, num_steps + 1)]
  optimizer = muon(0.1, nesterov=nesterov, weight_decay=0.1, ns_impl='jnp', ns_dtype=ns_dtype)
  updates, state = _run(optimizer, params, grads_per_step)
  expected = numpy_muon_updates(params, grads_per_step, [0.1] * num_steps, nesterov=nesterov, weight_decay=0.1)
  _assert_updates_close(updates, expected, tolerance)
  assert int(state.count) == num_steps


@pytest.mark.skipif(jax.default_backend() == 'gpu', reason='the Pallas Newton-Schulz kernel has no GPU backend')
def test_pallas_newton_schulz_gives_the_same_updates():
  # On CPU the Pallas op runs in TPU interpret mode; on TPU it is the compiled kernel ('auto' would pick it).
  params, grads_per_step = _random_tree(0), [_random_tree(1)]
  # XLA may skip the reference's bfloat16 roundings inside a fusion (excess precision, on by default; on CPU it then
  # runs Newton-Schulz nearly in float32); the kernel rounds where the reference says, so compare against the
  # reference as written.
  exact_roundings = {'xla_allow_excess_precision': False}
  with_jnp, _ = _run(muon(0.1, ns_impl='jnp'), params, grads_per_step, exact_roundings)
  with_pallas, _ = _run(muon(0.1, ns_impl='pallas'), params, grads_per_step)
  # Same bfloat16 rounding points in both; only float32 summation order differs (see the kernel tests).
  _assert_updates_close(with_pallas, with_jnp, 1e-2)


def test_momentum_buffer_dtype_and_value():
  params, grads = _random_tree(0), _random_tree(1)
  state = muon(0.1, mu_dtype=jnp.bfloat16).init(params)
  assert all(buffer.dtype == jnp.bfloat16 for buffer in jax.tree.leaves(state.momentum))
  optimizer = muon(0.1, ns_impl='jnp')
  _, state = jax.jit(optimizer.update)(grads, optimizer.init(params), params)
  for name in SHAPES:  # M_1 = G_1: a plain sum, no (1 - mu) factor
    np.testing.assert_array_equal(state.momentum[name], grads[name])


def _optax_muon(learning_rate, nesterov):
  """optax.contrib.muon set up to coincide with ours as far as it can (see the module docstring)."""
  return optax.contrib.muon(
      learning_rate, nesterov=nesterov, weight_decay=0.1, consistent_rms=0.2, eps=1e-7,
      muon_weight_dimension_numbers={'wide': MuonDimensionNumbers(), 'tall': MuonDimensionNumbers(),
                                     'experts': MuonDimensionNumbers(reduction_axis=1, output_axis=2)})


def test_matches_optax_without_nesterov():
  params, grads_per_step = _random_tree(0), [_random_tree(seed) for seed in (1, 2, 3)]
  ours, _ = _run(muon(0.1, nesterov=False, weight_decay=0.1, ns_impl='jnp', ns_dtype=jnp.float32), params,
                 grads_per_step)
  theirs, _ = _run(_optax_muon(0.1, nesterov=False), params, grads_per_step)
  _assert_updates_close(ours, theirs, 1e-5)


def test_nesterov_differs_from_optax_exactly_by_its_bias_correction():
  params, grads_per_step = _random_tree(0), [_random_tree(seed) for seed in (1, 2, 3)]
  ours, _ = _run(muon(0.1, weight_decay=0.1, ns_impl='jnp', ns_dtype=jnp.float32), params, grads_per_step)
  theirs, _ = _run(_optax_muon(0.1, nesterov=True), params, grads_per_step)
  _assert_updates_close(ours[:1], theirs[:1], 1e-5)  # step 1: both orthogonalize a multiple of G_1
  assert _relative_error(ours[2]['wide'], theirs[2]['wide']) > 1e-2  # step 3: different momentum weights (~10%)
  optax_weight = lambda t: MOMENTUM * (1 - MOMENTUM**t) / (1 - MOMENTUM**(t + 1))
  # The update rule is otherwise the same: each side matches float64 Muon with its own weight.
  expected_ours = numpy_muon_updates(params, grads_per_step, [0.1] * 3, weight_decay=0.1)
  expected_theirs = numpy_muon_updates(params, grads_per_step, [0.1] * 3, weight_decay=0.1,
                                       nesterov_momentum_weight=optax_weight)
  _assert_updates_close(ours, expected_ours, TOLERANCE_NS_FLOAT32)
  _assert_updates_close(theirs, expected_theirs, TOLERANCE_NS_FLOAT32)


def test_non_matrix_leaf_is_rejected_at_init_by_path():
  params = {'attention': {'wq': jnp.ones((8, 16))}, 'norm': {'scale': jnp.ones((16,))}}
  with pytest.raises(ValueError, match=r"\['norm'\]\['scale'\] has shape \(16,\).*AdamW"):
    muon(0.1).init(params)


def test_update_without_params_is_rejected():
  params = _random_tree(0)
  optimizer = muon(0.1)
  with pytest.raises(ValueError, match='needs params'):
    optimizer.update(params, optimizer.init(params))


def test_unknown_ns_impl_is_rejected():
  with pytest.raises(ValueError, match='ns_impl'):
    muon(0.1, ns_impl='cuda')


def test_schedule_as_learning_rate():
  schedule = optax.linear_schedule(0.0, 0.3, transition_steps=3)  # 0.0, 0.1, 0.2 at counts 0, 1, 2
  params, grads_per_step = _random_tree(0), [_random_tree(seed) for seed in (1, 2, 3)]
  updates, state = _run(muon(schedule, weight_decay=0.1, ns_impl='jnp', ns_dtype=jnp.float32), params,
                        grads_per_step)
  assert all(np.all(update == 0) for update in updates[0].values())  # learning_rate(0) = 0 on the first step
  expected = numpy_muon_updates(params, grads_per_step, [0.0, 0.1, 0.2], weight_decay=0.1)
  _assert_updates_close(updates[1:], expected[1:], TOLERANCE_NS_FLOAT32)
  assert int(state.count) == 3


def test_wsd_schedule_key_steps():
  # K2's recipe: 500 warm-up steps, 2e-4 held, cosine to 2e-5 (stable and decay shortened to 1000 steps each).
  schedule = jax.jit(wsd_schedule(2e-4, warmup_steps=500, stable_steps=1000, decay_steps=1000, end_value=2e-5))
  expected = {
      0: 0.0,  # init_value
      250: 1e-4,  # half-way up the linear warm-up
      500: 2e-4,  # warm-up end: peak
      1000: 2e-4,  # stable
      1500: 2e-4,  # decay start
      1750: 2e-5 + (2e-4 - 2e-5) * 0.5 * (1 + math.cos(math.pi / 4)),
      2000: 1.1e-4,  # mid-decay: half-way between peak and floor
      2500: 2e-5,  # decay end: the floor
      10_000: 2e-5,  # held at the floor after the end
  }
  for step, value in expected.items():
    np.testing.assert_allclose(schedule(step), value, rtol=1e-5, atol=1e-12, err_msg=f'step {step}')


def test_wsd_schedule_init_value_and_no_warmup():
  warm_from_1e5 = wsd_schedule(1e-3, warmup_steps=10, stable_steps=0, decay_steps=10, end_value=1e-4,
                               init_value=1e-5)
  np.testing.assert_allclose([warm_from_1e5(0), warm_from_1e5(5), warm_from_1e5(10)], [1e-5, 5.05e-4, 1e-3],
                             rtol=1e-5)
  no_warmup = wsd_schedule(1e-3, warmup_steps=0, stable_steps=5, decay_steps=0, end_value=1e-4)
  np.testing.assert_allclose([no_warmup(0), no_warmup(5), no_warmup(6)], [1e-3, 1e-3, 1e-4], rtol=1e-5)
