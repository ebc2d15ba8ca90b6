"""The Pallas Newton-Schulz op against its plain-jnp reference (pallas_kernels/newton_schulz/reference.py).

The kernel is Mosaic (TPU) only. On CPU, `interpret=None` runs it in TPU interpret mode (`pltpu.InterpretParams()`,
which also simulates VMEM and the sequential grid), on a TPU the same tests run the compiled kernel; on a GPU they
are skipped (no GPU backend: XLA's batched matmuls are faster there, BENCHMARKS.md).
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.newton_schulz import BlockSizes
from pallas_kernels.newton_schulz import kernel
from pallas_kernels.newton_schulz import newton_schulz
from pallas_kernels.newton_schulz import newton_schulz_reference
from pallas_kernels.newton_schulz import newton_schulz_steps
from pallas_kernels.newton_schulz import newton_schulz_steps_reference
from pallas_kernels.newton_schulz import normalized_matrices
from pallas_kernels.newton_schulz import normalizing_step

pytestmark = pytest.mark.skipif(jax.default_backend() == 'gpu', reason='the kernel has no GPU backend')

# Relative Frobenius error allowed between kernel and reference, by iteration dtype. Both round A, B and X to the
# iteration dtype at the same points; they differ only in float32 summation order, which in bfloat16 flips an
# occasional last bit (about 0.3% after 5 steps, measured); in float32 it is at the 1e-6 level.
RELATIVE_TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 1e-2}

SHAPES = [
    (32, 32),  # square
    (16, 48),  # wide
    (48, 16),  # tall: transposed to wide inside
    (20, 36),  # sides that are not multiples of any tile: zero-padded
    (3, 24, 40),  # a stack of matrices (e.g. experts)
    (2, 2, 40, 12),  # two batch axes, tall
    (2, 130, 200),  # padded to 256 x 256: with SMALL_TILES, 2 x 2 output tiles and 2 contraction slices
]
# The smallest Mosaic tiles, so that the larger test shape spans several row, column and contraction tiles (and
# every identity tile of P = a I + .. sits at a different offset).
SMALL_TILES = BlockSizes(block_rows=128, block_cols=128, block_contract=128, fused_max_dim=0)
PATHS = {'fused': None, 'tiled': SMALL_TILES}
# The tiled path (slow to interpret) on a tall, an unaligned and the several-tile shape only.
TILED_SHAPES = [(48, 16), (20, 36), (2, 130, 200)]


def _random_matrices(shape, dtype=jnp.float32, seed=0):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def _relative_error(actual, expected):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return np.linalg.norm(actual - expected) / np.linalg.norm(expected)


def _reference(x, dtype):
  # Full float32 matmuls on every backend (XLA on GPU may otherwise use TF32 for float32 products).
  with jax.default_matmul_precision('float32'):
    return newton_schulz_reference(x, dtype=dtype)


@pytest.mark.parametrize('shape, dtype, path', [
    pytest.param(shape, dtype, path, id=f'{"x".join(map(str, shape))}-{dtype.__name__}-{path}')
    for shape, dtype, path in itertools.product(SHAPES, [jnp.float32, jnp.bfloat16], PATHS)
    if path == 'fused' or shape in TILED_SHAPES])
def test_kernel_matches_reference(shape, dtype, path):
  x = _random_matrices(shape)
  actual = newton_schulz(x, dtype=dtype, block_sizes=PATHS[path])
  assert actual.shape == x.shape and actual.dtype == x.dtype
  assert _relative_error(actual, _reference(x, dtype)) < RELATIVE_TOLERANCE[dtype]


def test_bfloat16_input_keeps_its_dtype():
  x = _random_matrices((2, 24, 40), jnp.bfloat16)
  actual = newton_schulz(x, block_sizes=SMALL_TILES)
  assert actual.dtype == jnp.bfloat16
  assert _relative_error(actual, _reference(x, jnp.bfloat16)) < RELATIVE_TOLERANCE[jnp.bfloat16]


def test_tall_stacks_give_the_transposed_wide_result():
  # The reference iterates a tall X in place (A = X^T X, X <- X P); the kernel transposes it to the wide form.
  x = normalized_matrices(_random_matrices((2, 40, 24)), 1e-7, jnp.float32)
  for steps in (newton_schulz_steps, newton_schulz_steps_reference):
    tall, wide = steps(x), steps(jnp.swapaxes(x, -1, -2))
    assert _relative_error(tall, jnp.swapaxes(wide, -1, -2)) < RELATIVE_TOLERANCE[jnp.float32]


def test_output_is_nearly_orthogonal():
  # Not a comparison with the reference: the quintic iteration leaves every singular value in roughly [0.7, 1.2].
  singular_values = np.linalg.svd(np.asarray(newton_schulz(_random_matrices((3, 24, 40)), dtype=jnp.float32)),
                                  compute_uv=False)
  assert singular_values.min() > 0.6 and singular_values.max() < 1.25


@pytest.mark.parametrize('shape', [(3, 24, 40), (2, 40, 24)])
def test_normalizing_step_is_one_step_from_the_normalized_matrices_at_any_scale(shape):
  # The first step takes ||y||_F from the trace of its Gram matrix and divides inside P: in float32 it must equal
  # normalizing first, then one plain step, whatever y's scale (each matrix of the stack its own).
  y = _random_matrices(shape) * jnp.array([1e-3, 1e3, 7.0][:shape[0]])[:, None, None]
  expected = newton_schulz_steps_reference(normalized_matrices(y, 1e-7, jnp.float32), 1)
  with jax.default_matmul_precision('float32'):
    actual = normalizing_step(y, eps=1e-7)
  assert _relative_error(actual, expected) < 1e-5
  assert _relative_error(normalizing_step(y[:1] * 1e4), normalizing_step(y[:1])) < 1e-5


def test_zero_matrix_stays_zero():
  np.testing.assert_array_equal(newton_schulz(jnp.zeros((16, 32))), np.zeros((16, 32)))


def test_vector_is_rejected():
  with pytest.raises(ValueError, match=r'\[\.\.\., n, m\]'):
    newton_schulz(jnp.ones((8,)))


@pytest.mark.parametrize('size', [1, 15, 16, 17, 100, 129, 300, 1000, 2048, 7168])
def test_every_clamped_tile_divides_the_padded_size(size):
  block_sizes = BlockSizes()
  padded = kernel.padded_size(size, block_sizes)
  assert size <= padded and padded >= kernel.MIN_TILE
  for block in (block_sizes.block_rows, block_sizes.block_cols, block_sizes.block_contract):
    assert padded % min(block, padded) == 0
