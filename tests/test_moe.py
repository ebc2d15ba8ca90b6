"""Router and dispatch properties (acceptance: bias picks experts but not gates; gates sum to the scaling factor;
dropless dispatch equals running every expert)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from k2.config import MoEConfig
from k2.moe import MoE, RouterBias, route, sequence_balance_loss

CONFIG = MoEConfig(hidden_size=16, num_experts=8, num_experts_per_token=2, num_shared_experts=1,
                   expert_intermediate_size=12, routed_scaling_factor=2.827)


def make_moe(config=CONFIG, seed=0):
  return MoE(config, rngs=nnx.Rngs(seed), dtype=jnp.float32)


def tokens(n=64, d=16, seed=1):
  return jax.random.normal(jax.random.key(seed), (n, d))


def test_gates_sum_to_routed_scaling_factor():
  moe = make_moe()
  gates, _, _ = route(tokens(), moe.router[...], jnp.linspace(-0.3, 0.3, 8), CONFIG)
  np.testing.assert_allclose(np.asarray(gates.sum(-1)), CONFIG.routed_scaling_factor, rtol=1e-6)


def test_bias_changes_selection_but_not_gate_values():
  moe = make_moe()
  x = tokens()
  _, ids_plain, scores = route(x, moe.router[...], jnp.zeros(8), CONFIG)
  bias = jnp.array([1.0, 0, 0, 0, 0, 0, 0, -1.0])  # sigmoid scores lie in (0, 1)
  gates, ids_biased, scores_biased = route(x, moe.router[...], bias, CONFIG)
  assert not np.array_equal(np.asarray(ids_plain), np.asarray(ids_biased))
  assert np.all(np.asarray(ids_biased) != 7)  # the penalized expert is never picked
  assert np.all(np.any(np.asarray(ids_biased) == 0, axis=-1))  # the favoured one always is
  np.testing.assert_array_equal(np.asarray(scores), np.asarray(scores_biased))  # bias never enters the scores
  # Gates are the *unbiased* sigmoid scores of the picked experts, normalized, times the scaling factor.
  picked = np.take_along_axis(np.asarray(scores), np.asarray(ids_biased), axis=-1)
  expected = picked / picked.sum(-1, keepdims=True) * CONFIG.routed_scaling_factor
  np.testing.assert_allclose(np.asarray(gates), expected, rtol=1e-6)


def test_router_bias_gets_no_gradient_but_router_does():
  moe = make_moe()
  x = tokens()[None]
  grads = nnx.grad(lambda m: jnp.sum(m(x)[0] ** 2))(moe)
  assert not isinstance(moe.router_bias, nnx.Param) and isinstance(moe.router_bias, RouterBias)
  assert 'router_bias' not in grads
  assert float(jnp.abs(grads['router'][...]).max()) > 0


@pytest.mark.parametrize('bias', ['zero', 'skewed'])
def test_dropless_dispatch_equals_dense_reference(bias):
  moe = make_moe()
  if bias == 'skewed':  # nearly every token goes to expert 3: a capacity-based dispatch would drop tokens
    moe.router_bias[...] = jnp.zeros(8).at[3].set(10.0)
  x = tokens(96)[None].reshape(2, 48, 16)
  y, aux = moe(x)
  np.testing.assert_allclose(np.asarray(y), np.asarray(moe.dense_reference(x)), rtol=1e-5, atol=1e-5)
  assert float(aux['expert_load'].sum()) == 96 * CONFIG.num_experts_per_token
  if bias == 'skewed':
    assert float(aux['expert_load'][3]) == 96


def test_group_limited_routing_stays_in_top_groups():
  config = dataclasses.replace(CONFIG, n_group=4, topk_group=2, num_experts_per_token=3)
  moe = make_moe(config)
  bias = jax.random.normal(jax.random.key(5), (8,)) * 0.2
  gates, ids, scores = route(tokens(), moe.router[...], bias, config)
  choice = np.asarray(scores + bias).reshape(-1, 4, 2)
  group_scores = np.sort(choice, axis=-1)[..., -2:].sum(-1)
  top_groups = np.argsort(-group_scores, axis=-1)[:, :2]
  for picked, groups in zip(np.asarray(ids) // 2, top_groups):
    assert set(picked) <= set(groups)
  np.testing.assert_allclose(np.asarray(gates.sum(-1)), config.routed_scaling_factor, rtol=1e-6)


def test_sequence_balance_loss_matches_formula_and_is_off_by_default():
  moe = make_moe()
  x = tokens(32)[None].reshape(2, 16, 16)
  assert 'balance_loss' not in moe(x)[1]
  _, ids, scores = route(x.reshape(-1, 16), moe.router[...], jnp.zeros(8), CONFIG)
  ids, scores = np.asarray(ids).reshape(2, 16, 2), np.asarray(scores).reshape(2, 16, 8)
  expected = []
  for b in range(2):  # DeepSeek-V3 eq. 17-20, one sequence at a time
    f = np.array([np.sum(ids[b] == i) for i in range(8)]) * 8 / (2 * 16)
    p = (scores[b] / scores[b].sum(-1, keepdims=True)).mean(0)
    expected.append(np.sum(f * p))
  loss = sequence_balance_loss(jnp.asarray(scores.reshape(-1, 8)), jnp.asarray(ids.reshape(-1, 2)), 2, CONFIG)
  np.testing.assert_allclose(float(loss), np.mean(expected), rtol=1e-5)
  weighted = make_moe(dataclasses.replace(CONFIG, balance_loss_weight=1e-3))
  np.testing.assert_allclose(float(weighted(x)[1]['balance_loss']), 1e-3 * np.mean(expected), rtol=1e-5)
