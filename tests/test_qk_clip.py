"""QK-Clip on the real model, and MuonClip's parameter split."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from k2 import model as model_lib
from k2.config import get_config
from k2.optim import muon_adamw, param_labels, qk_clip
from k2.optim.muonclip import describe_split

CONFIG = get_config('k2_tiny', vocab_size=512, num_layers=3, dtype='float32')
TOKENS = jax.random.randint(jax.random.key(0), (2, 24), 0, 512, dtype=jnp.int32)


@pytest.mark.parametrize('layer, heads', [(0, (1, 3)), (2, (0,))])
def test_clipped_heads_land_on_tau_and_nothing_else_moves(layer, heads):
  model = model_lib.create(CONFIG, seed=1)
  attn = model.layers[layer].attn
  nope = CONFIG.attention.qk_nope_head_dim
  for h in heads:  # inflate query and key of these heads so their logits explode
    attn.q_b_proj[...] = attn.q_b_proj[...].at[:, h, :].multiply(6.0)
    attn.kv_b_proj[...] = attn.kv_b_proj[...].at[:, h, :nope].multiply(6.0)
  _, aux = model(TOKENS)
  max_logits = np.asarray(aux['max_logits'])
  others = np.delete(max_logits[layer], heads)
  tau = float(max(others.max(), max_logits[:layer].max(initial=-np.inf)) * 1.5)
  assert all(max_logits[layer, h] > tau for h in heads)
  if layer == len(max_logits) - 1:
    assert max_logits.max(axis=1)[:layer].max() <= tau

  before = nnx.state(model, nnx.Param)
  clipped, stats = qk_clip(before, aux['max_logits'], tau, CONFIG)
  assert int(stats['clipped_heads']) == int(np.sum(max_logits > tau))
  np.testing.assert_allclose(np.asarray(stats['max_logit_per_layer']), max_logits.max(1))

  # Weights: only the clipped heads' q and k_nope slices change; v, k_rope (kv_a_proj) and all else bit-identical.
  flat_before, flat_after = dict(nnx.to_flat_state(before)), dict(nnx.to_flat_state(clipped))
  for path, variable in flat_before.items():
    old, new = np.asarray(variable[...]), np.asarray(flat_after[path][...])
    if path[:2] == ('layers', layer) and path[-1] in ('q_b_proj', 'kv_b_proj'):
      other_heads = [h for h in range(old.shape[1]) if h not in heads]
      np.testing.assert_array_equal(old[:, other_heads], new[:, other_heads])
      for h in heads:
        assert not np.array_equal(old[:, h], new[:, h])
      if path[-1] == 'kv_b_proj':
        np.testing.assert_array_equal(old[..., nope:], new[..., nope:])  # values untouched
    else:
      np.testing.assert_array_equal(old, new, err_msg=str(path))

  nnx.update(model, clipped)
  _, fresh = model(TOKENS)
  fresh = np.asarray(fresh['max_logits'])
  for h in heads:
    np.testing.assert_allclose(fresh[layer, h], tau, rtol=1e-3)
  np.testing.assert_array_equal(fresh[:layer], max_logits[:layer])
  assert fresh[layer].max() <= tau * (1 + 1e-3)


def test_gamma_is_split_sqrt_nope_and_full_rope():
  model = model_lib.create(CONFIG, seed=2)
  params = nnx.state(model, nnx.Param)
  max_logits = jnp.zeros((3, CONFIG.attention.num_heads)).at[1, 2].set(400.0)
  clipped, _ = qk_clip(params, max_logits, 100.0, CONFIG)
  nope = CONFIG.attention.qk_nope_head_dim
  old_q = np.asarray(params['layers'][1]['attn']['q_b_proj'][...])
  new_q = np.asarray(clipped['layers'][1]['attn']['q_b_proj'][...])
  np.testing.assert_allclose(new_q[:, 2, :nope], old_q[:, 2, :nope] * 0.5, rtol=1e-6)   # sqrt(1/4)
  np.testing.assert_allclose(new_q[:, 2, nope:], old_q[:, 2, nope:] * 0.25, rtol=1e-6)  # 1/4
  old_k = np.asarray(params['layers'][1]['attn']['kv_b_proj'][...])
  new_k = np.asarray(clipped['layers'][1]['attn']['kv_b_proj'][...])
  np.testing.assert_allclose(new_k[:, 2, :nope], old_k[:, 2, :nope] * 0.5, rtol=1e-6)


def test_mha_and_gqa_layouts():
  rng = np.random.default_rng(0)
  mha = {'layers': {0: {'attn': {'q_proj': rng.normal(size=(8, 2, 4)), 'k_proj': rng.normal(size=(8, 2, 4))}},
                    1: {'attn': {'q_proj': rng.normal(size=(8, 2, 4)), 'k_proj': rng.normal(size=(8, 1, 4))}}}}
  mha = jax.tree.map(jnp.asarray, mha)
  max_logits = jnp.array([[400.0, 1.0], [400.0, 1.0]])
  out, _ = qk_clip(mha, max_logits, 100.0, CONFIG)
  x = rng.normal(size=(8,))
  def logit(params, layer, head, key_head):
    q = x @ np.asarray(params['layers'][layer]['attn']['q_proj'])[:, head]
    k = x @ np.asarray(params['layers'][layer]['attn']['k_proj'])[:, key_head]
    return q @ k
  np.testing.assert_allclose(logit(out, 0, 0, 0), logit(mha, 0, 0, 0) / 4, rtol=1e-5)  # MHA: sqrt * sqrt
  np.testing.assert_allclose(logit(out, 0, 1, 1), logit(mha, 0, 1, 1), rtol=1e-6)
  np.testing.assert_allclose(logit(out, 1, 0, 0), logit(mha, 1, 0, 0) / 4, rtol=1e-5)  # GQA: q takes gamma
  np.testing.assert_allclose(logit(out, 1, 1, 0), logit(mha, 1, 1, 0), rtol=1e-6)     # shared key untouched


def test_every_model_parameter_gets_exactly_one_group():
  params = nnx.state(model_lib.create(CONFIG), nnx.Param)
  flat_labels = {jax.tree_util.keystr(p): l for p, l in jax.tree_util.tree_flatten_with_path(param_labels(params))[0]}
  adamw = {k for k, v in flat_labels.items() if v == 'adamw'}
  assert all(any(s in k for s in ('embed', 'lm_head', 'scale')) for k in adamw)
  assert any('q_b_proj' in k for k, v in flat_labels.items() if v == 'muon')
  assert any('gate_proj' in k for k, v in flat_labels.items() if v == 'muon')
  assert set(flat_labels.values()) == {'muon', 'adamw'}
  split = describe_split(params)
  assert 'muon:' in split and 'adamw:' in split


def test_unlabelled_or_non_matrix_leaf_fails_at_construction():
  optimizer = muon_adamw(1e-3)
  with pytest.raises(ValueError, match=r'parameter layers/0/attn/mystery matched 0 optimizer groups'):
    optimizer.init({'layers': {0: {'attn': {'mystery': jnp.zeros((4, 4))}}}})
  with pytest.raises(ValueError, match=r'parameter layers/0/attn/o_proj has shape \(4,\); Muon needs a matrix'):
    optimizer.init({'layers': {0: {'attn': {'o_proj': jnp.zeros((4,))}}}})


def test_muonclip_step_is_muon_on_matrix_views_and_adamw_elsewhere():
  params = nnx.state(model_lib.create(CONFIG, seed=3), nnx.Param)
  grads = jax.tree.map(lambda x: jnp.ones_like(x) * 0.01, params)
  updates, _ = muon_adamw(1e-2, weight_decay=0.0).update(grads, muon_adamw(1e-2, weight_decay=0.0).init(params), params)
  q_update = np.asarray(updates['layers'][0]['attn']['q_b_proj'][...])
  # Muon's update of a rank-1 gradient is a scaled rank-1 orthogonal factor: every singular value of the [Q, H*K]
  # view is ~0 but one. AdamW on an embedding moves every entry by ~lr.
  singular = np.linalg.svd(q_update.reshape(q_update.shape[0], -1), compute_uv=False)
  assert singular[1] < 1e-3 * singular[0]
  np.testing.assert_allclose(np.abs(np.asarray(updates['embed'][...])), 1e-2, rtol=1e-3)
  assert isinstance(optax.tree.norm(updates), jax.Array)
