"""The Pallas QK-Clip rescale kernel against its jnp reference, in interpret mode on CPU."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental.pallas import tpu as pltpu

from k2 import model as model_lib
from k2.config import get_config
from k2.optim import qk_clip
from pallas_kernels.qk_clip import rescale_heads
from pallas_kernels.qk_clip.ops import BlockSizes
from pallas_kernels.qk_clip.reference import rescale_heads_reference

SHAPES = [(64, 4, 48), (24, 2, 40), (3, 16, 8, 24), (512, 4, 256)]
DTYPES = [jnp.float32, jnp.bfloat16]


# interpret=None compiles the kernel on a GPU/TPU and interprets it on CPU.
@pytest.mark.parametrize('shape, dtype, interpret', list(itertools.product(SHAPES, DTYPES, [True, None])))
def test_kernel_matches_reference(shape, dtype, interpret):
  weight = jax.random.normal(jax.random.key(0), shape, dtype)
  scales = jax.random.uniform(jax.random.key(1), shape[-2:], jnp.float32, 0.1, 1.0)
  expected = rescale_heads_reference(weight, scales)
  out = rescale_heads(jnp.array(weight), scales, interpret=interpret, block_sizes=BlockSizes(64, 128))
  assert out.dtype == dtype and out.shape == shape
  np.testing.assert_array_equal(np.asarray(out.astype(jnp.float32)), np.asarray(expected.astype(jnp.float32)))


def test_tpu_interpret_mode_matches_reference():
  weight = jax.random.normal(jax.random.key(2), (256, 4, 64), jnp.float32)
  scales = jax.random.uniform(jax.random.key(3), (4, 64), jnp.float32, 0.1, 1.0)
  out = rescale_heads(jnp.array(weight), scales, interpret=pltpu.InterpretParams(), block_sizes=BlockSizes(128, 128))
  np.testing.assert_array_equal(np.asarray(out), np.asarray(rescale_heads_reference(weight, scales)))


def test_qk_clip_with_kernel_equals_qk_clip_with_reference():
  config = get_config('k2_tiny', vocab_size=256, num_layers=2, dtype='float32')
  params = nnx.state(model_lib.create(config), nnx.Param)
  max_logits = jnp.array([[150.0, 1.0, 300.0, 2.0], [1.0, 1.0, 1.0, 120.0]])
  with_reference, _ = qk_clip(params, max_logits, 100.0, config)
  with_kernel, _ = qk_clip(jax.tree.map(jnp.array, params), max_logits, 100.0, config,
                           rescale=lambda w, s: rescale_heads(w, s, interpret=True))
  for a, b in zip(jax.tree.leaves(with_reference), jax.tree.leaves(with_kernel)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
