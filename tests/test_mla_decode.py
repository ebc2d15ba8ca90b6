"""The Pallas MLA decode op (pallas_kernels/mla_decode) against its plain-jnp reference, and the reference against
a float64 NumPy oracle that attends over each row's filled slots only.

On CPU the Triton kernel runs in Pallas' interpreter (`interpret=True`) and the Mosaic kernel in TPU interpret mode
(`pltpu.InterpretParams()`). Every case stores NaN in the slots past each row's length (they must not matter) and
uses ragged lengths that include 1 and S; cache sizes are not whole numbers of slot blocks.

Tolerances (relative Frobenius error against the reference in float32 on the same, upcast, inputs):
  float32   1e-5: summation order only.
  bfloat16  1e-2: the kernel rounds the probabilities to bfloat16 before the product with the latents, as
            FlashAttention does.
"""

import itertools

import jax
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.mla_decode import BlockSizes
from pallas_kernels.mla_decode import mla_decode
from pallas_kernels.mla_decode import mla_decode_reference
from pallas_kernels.mla_decode.ops import merge_splits

RELATIVE_TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}
FAST_COMPILE = {'xla_backend_optimization_level': 0}
BACKENDS = {'triton': True, 'mosaic': pltpu.InterpretParams()}
# (C, R, H): the latent, rope and head sizes of k2_tiny, k2_small and K2.
SHAPES = {'k2_tiny': (32, 16, 4), 'k2_small': (128, 32, 16), 'k2': (512, 64, 64)}


def _inputs(batch, slots, latent, rope, heads, dtype, lengths, seed=0):
  """q, cache with NaN in every slot at or past the row's length, lengths."""
  keys = jax.random.split(jax.random.key(seed), 2)
  q = jax.random.normal(keys[0], (batch, heads, latent + rope), jnp.float32).astype(dtype)
  cache = jax.random.normal(keys[1], (batch, slots, latent + rope), jnp.float32).astype(dtype)
  lengths = jnp.asarray(lengths, jnp.int32)
  cache = jnp.where(jnp.arange(slots)[None, :, None] < lengths[:, None, None], cache, jnp.nan)
  return q, cache, lengths


def _relative_error(actual, expected):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return np.linalg.norm(actual - expected) / np.linalg.norm(expected)


def _check(backend, shape, dtype, lengths, slots, blocks):
  latent, rope, heads = SHAPES[shape]
  q, cache, lengths = _inputs(len(lengths), slots, latent, rope, heads, dtype, lengths)
  sm_scale = (latent + rope) ** -0.5
  kernel = jax.jit(lambda q, c, n: mla_decode(q, c, n, kv_lora_rank=latent, sm_scale=sm_scale,
                                               interpret=BACKENDS[backend], block_sizes=blocks),
                   compiler_options=FAST_COMPILE)
  out, lse = kernel(q, cache, lengths)
  upcast = lambda x: x.astype(jnp.float32)
  ref_out, ref_lse = mla_decode_reference(upcast(q), upcast(cache), lengths, kv_lora_rank=latent, sm_scale=sm_scale)
  assert out.shape == (len(lengths), heads, latent) and out.dtype == dtype
  assert lse.shape == (len(lengths), heads) and lse.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(out, np.float32))), 'NaN from the slots past the lengths leaked in'
  assert _relative_error(out, ref_out) < RELATIVE_TOLERANCE[dtype], _relative_error(out, ref_out)
  np.testing.assert_allclose(lse, ref_lse, rtol=1e-5, atol=1e-4)


# Triton, in the interpreter: every model's shape x both dtypes x one split or several (merged by their lse).
# 72 slots are not a whole number of 16-slot blocks (the loads are masked at the length, the cache is not padded).
SPLITS = {'one_split': 1, 'three_splits': 3}


@pytest.mark.parametrize('shape, dtype, splits', list(itertools.product(
    SHAPES, [jnp.float32, jnp.bfloat16], SPLITS)))
def test_triton_matches_reference(shape, dtype, splits):
  lengths = [1, 72, 37, 16] if shape != 'k2' else [72, 1]
  blocks = BlockSizes(block_h=16, block_s=16, num_splits=SPLITS[splits])
  _check('triton', shape, dtype, lengths, slots=72, blocks=blocks)


def test_triton_default_blocks():
  """The backend's defaults (auto split count, 64-slot steps) on a cache longer than one step."""
  _check('triton', 'k2_small', jnp.bfloat16, [200, 1, 129, 64], slots=200, blocks=None)


@pytest.mark.parametrize('shape, dtype', [('k2_tiny', jnp.float32), ('k2_small', jnp.bfloat16)])
def test_mosaic_matches_reference(shape, dtype):
  # TPU interpret mode simulates every grid step (slowly): two splits of three 16-slot blocks, 72 slots (the last
  # block is partial), lengths that end inside a block, on a block edge, at 1 and at S.
  latent, rope, heads = SHAPES[shape]
  _check('mosaic', shape, dtype, [1, 72, 37, 32], slots=72,
         blocks=BlockSizes(block_h=heads, block_s=16, num_splits=2))


@pytest.mark.parametrize('backend', BACKENDS)
def test_empty_row(backend):
  """A row of length 0 gives zeros and lse -inf (as the reference), and does not disturb the others."""
  q, cache, lengths = _inputs(2, 32, 32, 16, 4, jnp.float32, [0, 20])
  args = dict(kv_lora_rank=32, sm_scale=0.1)
  out, lse = mla_decode(q, cache, lengths, interpret=BACKENDS[backend],
                        block_sizes=BlockSizes(block_h=16 if backend == 'triton' else 4, block_s=16), **args)
  ref_out, ref_lse = mla_decode_reference(q, cache, lengths, **args)
  assert np.all(np.asarray(out[0]) == 0) and np.all(np.asarray(lse[0]) == -np.inf)
  assert np.all(np.asarray(ref_out[0]) == 0) and np.all(np.asarray(ref_lse[0]) == -np.inf)
  assert _relative_error(out[1], ref_out[1]) < 1e-5


def test_reference_matches_float64_oracle():
  """Per row, plain softmax attention over slots [0, length) in float64 (NumPy), values = the latent part."""
  latent, rope, heads = SHAPES['k2_tiny']
  q, cache, lengths = _inputs(3, 40, latent, rope, heads, jnp.float32, [40, 1, 17], seed=3)
  out, lse = mla_decode_reference(q, cache, lengths, kv_lora_rank=latent, sm_scale=0.2)
  for row, length in enumerate(np.asarray(lengths)):
    filled = np.asarray(cache[row, :length], np.float64)
    logits = np.asarray(q[row], np.float64) @ filled.T * 0.2  # [H, length]
    expected_lse = np.log(np.exp(logits).sum(-1))
    expected = np.exp(logits - expected_lse[:, None]) @ filled[:, :latent]
    np.testing.assert_allclose(out[row], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lse[row], expected_lse, rtol=1e-6)


def test_merge_splits_equals_one_pass():
  """Merging per-split softmax outputs by their lse gives the softmax over the union (an empty split counts 0)."""
  q, cache, lengths = _inputs(2, 48, 32, 16, 4, jnp.float32, [48, 20])
  args = dict(kv_lora_rank=32, sm_scale=0.15)
  whole_out, whole_lse = mla_decode_reference(q, cache, lengths, **args)
  parts = []
  for first in (0, 16, 32):  # row 1 (length 20) has an empty third split
    part_lengths = jnp.clip(lengths - first, 0, 16)
    parts.append(mla_decode_reference(q, cache[:, first:first + 16], part_lengths, **args))
  out, lse = merge_splits(jnp.stack([p[0] for p in parts], 1), jnp.stack([p[1] for p in parts], 1))
  np.testing.assert_allclose(out, whole_out, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(lse, whole_lse, rtol=1e-6)


def test_model_decode_attention_kernel_equals_reference():
  """k2.attention.latent_attention (the model's decode call site): the kernel and the reference agree for queries at
  different positions per row and per new token (T = 2), with slots past each query's position holding NaN."""
  from k2 import attention  # the model side; this module is otherwise the kernel's
  latent, rope, heads = SHAPES['k2_tiny']
  q = jax.random.normal(jax.random.key(5), (3, 2, heads, latent + rope), jnp.float32)
  cache = jax.random.normal(jax.random.key(6), (3, 40, latent + rope), jnp.float32)
  positions = jnp.array([[0, 1], [20, 21], [38, 39]], jnp.int32)
  cache = jnp.where(jnp.arange(40)[None, :, None] <= positions[:, 1:, None], cache, jnp.nan)
  kernel = attention.latent_attention(q, cache, positions, latent, 0.2, impl='flash')
  reference = attention.latent_attention(q, cache, positions, latent, 0.2, impl='reference')
  assert kernel.shape == (3, 2, heads, latent)
  assert _relative_error(kernel, reference) < 1e-5
