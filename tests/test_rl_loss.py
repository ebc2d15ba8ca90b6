"""The k1.5 RL loss: against a float64 NumPy reference, its gradient's direction, its zero at theta = theta_old with
equal rewards, the KL estimate, and its form for the shared training core (exact over micro-batches of groups)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from k2 import model as model_lib
from k2 import rl
from k2.config import get_config
from k2.optim import muon_adamw
from k2.train import step as step_lib


def reference_loss(logprobs, old_logprobs, mask, rewards, tau):
  """The formula in float64, loop by loop (K2 report 3.2.3)."""
  prompts, k, _ = logprobs.shape
  total = 0.0
  for p in range(prompts):
    baseline = np.mean(rewards[p].astype(np.float64))
    for i in range(k):
      log_ratio = np.sum(mask[p, i].astype(np.float64) * (logprobs[p, i].astype(np.float64) - old_logprobs[p, i]))
      total += (rewards[p, i] - baseline - tau * log_ratio) ** 2
  return total / (prompts * k)


def random_inputs(seed, prompts=3, k=4, t=7):
  rng = np.random.default_rng(seed)
  old = -rng.exponential(2.0, (prompts, k, t)).astype(np.float32)
  logprobs = (old + rng.normal(0, 0.3, old.shape)).astype(np.float32)
  mask = (rng.random(old.shape) < 0.7).astype(np.float32)
  rewards = rng.random((prompts, k)).astype(np.float32)
  return logprobs, old, mask, rewards


@pytest.mark.parametrize('seed,tau,shape', [(0, 0.1, (3, 4, 7)), (1, 1.0, (1, 8, 5)), (2, 0.01, (5, 2, 11))])
def test_matches_float64_reference(seed, tau, shape):
  logprobs, old, mask, rewards = random_inputs(seed, *shape)
  got = jax.jit(rl.k15_loss, static_argnums=4)(logprobs, old, mask, rewards, tau)
  assert got.shape == ()
  np.testing.assert_allclose(float(got), reference_loss(logprobs, old, mask, rewards, tau), rtol=1e-5)


def test_gradient_is_reinforce_with_mean_baseline_at_theta_old():
  _, old, mask, rewards = random_inputs(3)
  tau, n = 0.5, rewards.size
  grad = jax.grad(rl.k15_loss)(jnp.asarray(old), old, mask, rewards, tau)
  advantage = rewards - rewards.mean(axis=-1, keepdims=True)
  # d/d logprob_{i,t} of (1/N) sum_i (a_i - tau * sum_t m_t (lp - old))^2 at lp = old: -2 tau a_i m_t / N.
  np.testing.assert_allclose(grad, -2 * tau * advantage[..., None] * mask / n, rtol=1e-5, atol=1e-8)
  # Descending the gradient raises the sequence log-prob of above-mean responses and lowers that of below-mean ones.
  moved = np.sum(mask * -np.asarray(grad), axis=-1)
  has_tokens = mask.sum(-1) > 0
  assert np.all(np.sign(moved[has_tokens]) == np.sign(advantage[has_tokens]))


def test_gradient_pulls_log_ratio_towards_its_fixed_point():
  # Away from theta_old the gradient's sign follows (a_i - tau * log_ratio_i): past (r - rbar) / tau it pushes back.
  logprobs, old, mask, rewards = random_inputs(4)
  tau = 0.5
  grad = np.asarray(jax.grad(rl.k15_loss)(logprobs, old, mask, rewards, tau))
  residual = rewards - rewards.mean(-1, keepdims=True) - tau * np.sum(mask * (logprobs - old), -1)
  moved = np.sum(mask * -grad, axis=-1)
  has_tokens = mask.sum(-1) > 0
  assert np.all(np.sign(moved[has_tokens]) == np.sign(residual[has_tokens]))


def test_equal_rewards_at_theta_old_give_exactly_zero():
  _, old, mask, _ = random_inputs(5)
  rewards = np.full(mask.shape[:2], 0.7, np.float32)
  loss, grad = jax.value_and_grad(rl.k15_loss)(jnp.asarray(old), old, mask, rewards, 0.3)
  assert float(loss) == 0.0
  assert not np.any(np.asarray(grad))


def test_kl_estimate_is_unbiased_and_nonnegative():
  rng = np.random.default_rng(0)
  p_old = rng.dirichlet(np.ones(6))
  p_new = rng.dirichlet(np.ones(6))
  samples = rng.choice(6, size=200_000, p=p_old)  # tokens from pi_old, as in a rollout
  lp, old = np.log(p_new[samples]), np.log(p_old[samples])
  per_token = np.asarray(rl.kl_estimate(lp[:, None], old[:, None], np.ones((len(samples), 1))))
  assert np.all(per_token >= 0)
  true_kl = np.sum(p_old * np.log(p_old / p_new))
  assert per_token.mean() == pytest.approx(true_kl, rel=0.03)
  assert float(jnp.max(rl.kl_estimate(jnp.asarray(old), old, np.ones_like(old)))) == 0.0


CONFIG = get_config('k2_tiny', num_layers=2)
TX = muon_adamw(1e-3)


def rl_batch(model, prompts=4, k=2, t=12, seed=0):
  """Random token groups with prompt positions masked out, rewards, and old log-probs from the model itself."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, CONFIG.vocab_size, (prompts, k, t + 1)).astype(np.int32)
  mask = np.zeros((prompts, k, t), np.float32)
  mask[..., 4:] = 1.0
  mask[..., 4 + rng.integers(0, t - 4):] *= rng.integers(0, 2)  # some responses end early
  batch = {'inputs': tokens[..., :-1], 'targets': tokens[..., 1:],
           'positions': np.broadcast_to(np.arange(t, dtype=np.int32), (prompts, k, t)).copy(),
           'segment_ids': np.ones((prompts, k, t), np.int32), 'mask': mask,
           'rewards': rng.integers(0, 2, (prompts, k)).astype(np.float32)}
  batch['old_logprobs'] = np.asarray(rl.token_logprobs(model, batch)[0])
  return jax.tree.map(jnp.asarray, batch)


@pytest.fixture(scope='module')
def model():
  return model_lib.create(CONFIG, seed=0)


def test_loss_fn_matches_k15_loss_and_starts_at_zero_log_ratio(model):
  batch = rl_batch(model)
  loss_sum, count, aux = rl.k15_loss_fn(model, batch, tau=0.2)
  assert float(count) == 8.0
  logprobs, _ = rl.token_logprobs(model, batch)
  expected = rl.k15_loss(logprobs, batch['old_logprobs'], batch['mask'], batch['rewards'], 0.2)
  np.testing.assert_allclose(float(loss_sum / count), float(expected), rtol=1e-6)
  assert float(aux['log_ratio']) == 0.0 and float(aux['kl']) == 0.0  # the first inner step of an iteration
  assert {'max_logits', 'expert_load', 'balance_loss'} <= set(aux)


def test_accumulation_over_whole_groups_is_exact_and_padding_groups_do_not_count(model):
  batch = rl_batch(model, prompts=4)
  # Move the log-probs off theta_old so the log-ratio terms matter too.
  batch['old_logprobs'] = batch['old_logprobs'] + 0.05 * jnp.sin(jnp.arange(batch['mask'].size)).reshape(
      batch['mask'].shape)
  loss_fn = functools.partial(rl.k15_loss_fn, tau=0.2)
  graphdef, state = step_lib.init_state(model, TX)

  def gradients(data, accum):
    setup = step_lib.StepSetup(graphdef=graphdef, model_config=CONFIG, optimizer=TX, schedule=lambda s: 1e-3,
                               grad_accum_steps=accum, loss_fn=loss_fn, aux_reductions=rl.AUX_REDUCTIONS)
    return jax.jit(step_lib._gradients, static_argnums=2)(state, data, setup)

  loss_one, grads_one, aux_one = gradients(batch, 1)
  # Two micro-batches (prompts 0, 2, 4 and 1, 3, 5) of a batch padded with two groups of zero masks and rewards:
  # neither the split nor the padding changes the mean loss, its gradient or the per-response metrics.
  padded = jax.tree.map(lambda x: jnp.concatenate([x, jnp.zeros((2, *x.shape[1:]), x.dtype)]), batch)
  loss_two, grads_two, aux_two = gradients(padded, 2)
  assert float(loss_one) == pytest.approx(float(loss_two), rel=1e-5)
  assert float(aux_one['kl']) == pytest.approx(float(aux_two['kl']), rel=1e-4)  # float32 sums
  for a, b in zip(jax.tree.leaves(grads_one), jax.tree.leaves(grads_two)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)  # float32 sums; gradients ~1e-2


def test_chunked_log_probs_match_the_plain_forward_and_its_gradient(model):
  batch = rl_batch(model, prompts=2, k=2, t=12)
  batch['old_logprobs'] = batch['old_logprobs'] - 0.1 * batch['mask']  # off theta_old: every term has gradient
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params, loss_chunk):
    loss_sum, count, _ = rl.k15_loss_fn(nnx.merge(graphdef, params, rest), batch, tau=0.2, loss_chunk=loss_chunk)
    return loss_sum / count

  value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  plain, grads_plain = value_and_grad(params, None)
  chunked, grads_chunked = value_and_grad(params, 4)
  assert float(chunked) == pytest.approx(float(plain), rel=1e-6)
  for a, b in zip(jax.tree.leaves(grads_plain), jax.tree.leaves(grads_chunked)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
  with pytest.raises(ValueError, match='loss_chunk 5 does not divide'):
    rl.token_logprobs(model, batch, loss_chunk=5)


def test_bad_shapes_and_tau_raise_clear_errors():
  logprobs, old, mask, rewards = random_inputs(0)
  with pytest.raises(ValueError, match='rewards'):
    rl.k15_loss(logprobs, old, mask, rewards[:, :2], 0.1)
  with pytest.raises(ValueError, match='tau=0'):
    rl.k15_loss(logprobs, old, mask, rewards, 0)
