"""Whole-model properties: causality, packed documents, max logits, logical axes, mixed precision."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from k2 import model as model_lib
from k2.attention import attention_reference
from k2.config import get_config

CONFIG = get_config('k2_tiny', vocab_size=512, num_layers=3, dtype='float32')


@pytest.fixture(scope='module')
def model():
  return model_lib.create(CONFIG, seed=0)


def random_tokens(shape, seed=0):
  return jax.random.randint(jax.random.key(seed), shape, 0, CONFIG.vocab_size, dtype=jnp.int32)


def test_output_shapes(model):
  logits, aux = model(random_tokens((2, 12)))
  assert logits.shape == (2, 12, CONFIG.vocab_size) and logits.dtype == jnp.float32
  assert aux['max_logits'].shape == (3, CONFIG.attention.num_heads)
  assert aux['expert_load'].shape == (2, CONFIG.moe.num_experts)
  np.testing.assert_allclose(np.asarray(aux['expert_load'].sum(-1)), 24 * CONFIG.moe.num_experts_per_token)


def test_causal(model):
  tokens = random_tokens((1, 10))
  changed = tokens.at[0, 7].set((tokens[0, 7] + 1) % CONFIG.vocab_size)
  a, b = model(tokens)[0], model(changed)[0]
  np.testing.assert_allclose(np.asarray(a[:, :7]), np.asarray(b[:, :7]), rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(a[:, 7:] - b[:, 7:]).max()) > 1e-3


def test_packed_documents_do_not_attend_across(model):
  first, second = random_tokens((1, 6), seed=1), random_tokens((1, 9), seed=2)
  packed = jnp.concatenate([first, second], axis=1)
  positions = jnp.concatenate([jnp.arange(6), jnp.arange(9)])[None]
  segment_ids = jnp.concatenate([jnp.ones(6, jnp.int32), 2 * jnp.ones(9, jnp.int32)])[None]
  logits, _ = model(packed, positions, segment_ids)
  alone, _ = model(second)
  np.testing.assert_allclose(np.asarray(logits[:, 6:]), np.asarray(alone), rtol=1e-5, atol=1e-5)


def test_max_logits_exclude_masked_positions():
  rng = np.random.default_rng(0)
  q = rng.normal(size=(2, 5, 3, 8)).astype(np.float32)
  k = rng.normal(size=(2, 5, 3, 8)).astype(np.float32)
  v = rng.normal(size=(2, 5, 3, 4)).astype(np.float32)
  k[:, 4] *= 100  # the last key is only visible to the last query, and masked for the others by segment
  segment_ids = np.array([[1, 1, 1, 2, 2], [1, 1, 1, 1, 1]], np.int32)
  _, max_logits = attention_reference(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(segment_ids), 0.5)
  expected = np.full((2, 3), -np.inf)
  for b in range(2):
    for i in range(5):
      for j in range(i + 1):
        if segment_ids[b, i] == segment_ids[b, j]:
          expected[b] = np.maximum(expected[b], 0.5 * np.einsum('hk,hk->h', q[b, i], k[b, j]))
  np.testing.assert_allclose(np.asarray(max_logits), expected, rtol=1e-5)


def test_max_logits_are_max_over_batch(model):
  tokens = random_tokens((3, 8))
  _, joint = model(tokens)
  singles = np.stack([np.asarray(model(tokens[i:i + 1])[1]['max_logits']) for i in range(3)])
  np.testing.assert_allclose(np.asarray(joint['max_logits']), singles.max(0), rtol=1e-5)


def test_every_parameter_has_logical_axes(model):
  for path, variable in nnx.to_flat_state(nnx.state(model)):
    axes = variable.get_metadata().get('logical_axes')
    assert axes is not None and len(axes) == variable.ndim, path


def test_bf16_compute_with_fp32_params_tracks_fp32():
  config = CONFIG.replace(dtype='bfloat16')
  bf16 = model_lib.create(config, seed=0)
  fp32 = model_lib.create(CONFIG, seed=0)
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
  tokens = random_tokens((2, 8))
  a, b = bf16(tokens)[0], fp32(tokens)[0]
  assert a.dtype == jnp.float32
  assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) < 0.05
