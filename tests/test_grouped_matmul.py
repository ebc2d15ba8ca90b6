"""The Pallas grouped matmul against its reference, jax.lax.ragged_dot, and inside the MoE layer.

On CPU, `interpret=None` runs the Triton kernels in Pallas' interpreter and `pltpu.InterpretParams()` runs the
Mosaic (TPU) kernels in TPU interpret mode; on a GPU the same tests run the compiled Triton kernels. Small tiles make
the small test shapes span several row, column and contraction tiles, so group boundaries fall inside tiles.
"""

import functools

import jax
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from k2.config import get_config
from k2.moe import MoE
from pallas_kernels import grouped_matmul
from pallas_kernels.grouped_matmul import BlockSizes
from pallas_kernels.grouped_matmul import ProductBlocks
from pallas_kernels.grouped_matmul import grouped_matmul_reference
from pallas_kernels.grouped_matmul import tiling

_TINY = ProductBlocks(block_m=16, block_n=16, block_k=16)
TRITON_TILES = BlockSizes(forward=_TINY, dlhs=_TINY, drhs=_TINY)
# Mosaic's smallest tiles: 16 rows (bf16 sublane pairs), 128 lanes.
_MOSAIC_TINY = ProductBlocks(block_m=16, block_n=128, block_k=128)
MOSAIC_TILES = BlockSizes(forward=_MOSAIC_TINY, dlhs=_MOSAIC_TINY, drhs=_MOSAIC_TINY)

# Relative Frobenius error allowed against the float32 reference: float32 kernels differ only in summation order;
# bf16 outputs carry one rounding (~2^-9 relative per element).
RELATIVE_TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def _group_sizes(pattern: str, num_rows: int, num_groups: int, seed: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  if pattern == 'random':  # some groups empty, a tail of rows in no group
    used = rng.integers(num_rows // 2, num_rows + 1)
    weights = rng.random(num_groups) * (rng.random(num_groups) > 0.3)
    weights[rng.integers(num_groups)] += 0.1  # at least one nonempty group
    sizes = np.floor(weights / weights.sum() * used).astype(np.int64)
  elif pattern == 'one_group_holds_all':
    sizes = np.zeros(num_groups, np.int64)
    sizes[rng.integers(num_groups)] = num_rows
  elif pattern == 'all_empty':
    sizes = np.zeros(num_groups, np.int64)
  elif pattern == 'exact':  # sums to M, every group nonempty
    cuts = np.sort(rng.choice(np.arange(1, num_rows), num_groups - 1, replace=False))
    sizes = np.diff(np.concatenate([[0], cuts, [num_rows]]))
  else:
    raise ValueError(pattern)
  assert sizes.sum() <= num_rows
  return sizes.astype(np.int32)


def _relative_error(actual, expected):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  scale = np.linalg.norm(expected)
  return np.linalg.norm(actual - expected) / (scale if scale else 1.0)


@jax.jit
def _reference_and_grads(lhs, rhs, group_sizes, dout):
  upcast = lambda x: x.astype(jnp.float32)
  out, vjp = jax.vjp(lambda a, b: grouped_matmul_reference(a, b, group_sizes), upcast(lhs), upcast(rhs))
  return (out, *vjp(upcast(dout)))


@functools.partial(jax.jit, static_argnames=('interpret', 'block_sizes'))
def _kernel_and_grads(lhs, rhs, group_sizes, dout, interpret=None, block_sizes=None):
  out, vjp = jax.vjp(lambda a, b: grouped_matmul(a, b, group_sizes, interpret=interpret, block_sizes=block_sizes),
                     lhs, rhs)
  return (out, *vjp(dout))


def _check_against_reference(num_rows, contract, cols, num_groups, pattern, dtype, seed=0, **op_kwargs):
  """Forward, dlhs and drhs of the kernel against the reference's forward and VJP (one jit per shape)."""
  keys = jax.random.split(jax.random.key(seed), 3)
  lhs = jax.random.normal(keys[0], (num_rows, contract), jnp.float32).astype(dtype)
  rhs = jax.random.normal(keys[1], (num_groups, contract, cols), jnp.float32).astype(dtype)
  dout = jax.random.normal(keys[2], (num_rows, cols), jnp.float32).astype(dtype)
  group_sizes = jnp.asarray(_group_sizes(pattern, num_rows, num_groups, seed))

  out, dlhs, drhs = _kernel_and_grads(lhs, rhs, group_sizes, dout, **op_kwargs)
  expected, expected_dlhs, expected_drhs = _reference_and_grads(lhs, rhs, group_sizes, dout)

  assert out.shape == (num_rows, cols) and out.dtype == dtype
  assert dlhs.shape == lhs.shape and dlhs.dtype == dtype and drhs.shape == rhs.shape and drhs.dtype == dtype
  tolerance = RELATIVE_TOLERANCE[dtype]
  assert _relative_error(out, expected) < tolerance
  assert _relative_error(dlhs, expected_dlhs) < tolerance
  assert _relative_error(drhs, expected_drhs) < tolerance
  # Exact zeros where ragged_dot's semantics put them: rows past the groups, and (drhs) groups without rows.
  total = int(group_sizes.sum())
  assert not np.any(np.asarray(out[total:])) and not np.any(np.asarray(dlhs[total:]))
  assert not np.any(np.asarray(drhs)[np.asarray(group_sizes) == 0])
  return lhs, rhs, group_sizes, out


# One shape (one compile) for the group-size patterns: 6 row tiles, 3 contraction slices, 3 column tiles of 16.
SHAPE = dict(num_rows=96, contract=48, cols=40, num_groups=6)
PATTERNS = ['random', 'one_group_holds_all', 'all_empty', 'exact']


@pytest.mark.parametrize('pattern', PATTERNS)
def test_triton_kernels_match_reference(pattern):
  _check_against_reference(**SHAPE, pattern=pattern, dtype=jnp.float32, block_sizes=TRITON_TILES)


@pytest.mark.parametrize('seed', [1, 2, 3, 4])
def test_random_group_sizes_in_bfloat16(seed):
  _check_against_reference(**SHAPE, pattern='random', dtype=jnp.bfloat16, seed=seed, block_sizes=TRITON_TILES)


def test_sides_that_fill_no_tile():
  # 37 rows, K = 20, N = 17: K and N are padded to whole tiles, the last row tile is masked.
  _check_against_reference(37, 20, 17, 3, 'random', jnp.float32, seed=1, block_sizes=TRITON_TILES)


def test_matches_ragged_dot():
  lhs, rhs, group_sizes, out = _check_against_reference(**SHAPE, pattern='random', dtype=jnp.float32, seed=5,
                                                        block_sizes=TRITON_TILES)
  np.testing.assert_allclose(np.asarray(out), np.asarray(jax.lax.ragged_dot(lhs, rhs, group_sizes)),
                             rtol=1e-5, atol=1e-5)


def test_default_block_sizes_shrink_to_small_problems():
  _check_against_reference(**SHAPE, pattern='random', dtype=jnp.float32, seed=6)


@pytest.mark.parametrize('pattern', PATTERNS)
def test_mosaic_kernels_in_tpu_interpret_mode(pattern):
  # 2 x 2 row tiles of 16, K = 256 (two contraction slices), N = 130 (padded to two column tiles of 128).
  _check_against_reference(64, 256, 130, 5, pattern, jnp.float32, seed=6, interpret=pltpu.InterpretParams(),
                           block_sizes=MOSAIC_TILES)


def test_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match='share K'):
    grouped_matmul(jnp.ones((8, 4)), jnp.ones((2, 5, 3)), jnp.array([4, 4], jnp.int32))
  with pytest.raises(ValueError, match='integers'):
    grouped_matmul(jnp.ones((8, 4)), jnp.ones((2, 4, 3)), jnp.array([4.0, 4.0]))


@pytest.mark.parametrize('block_m', [1, 16, 64])
def test_row_tile_tables_cover_every_row_once(block_m):
  for seed, pattern in enumerate(['random', 'one_group_holds_all', 'all_empty', 'exact']):
    sizes = _group_sizes(pattern, 200, 9, seed)
    owner = np.repeat(np.arange(10), np.append(sizes, 200 - sizes.sum()))  # part of every row (9 = tail)

    part, start, end = map(np.asarray, tiling.group_aligned_tiles(jnp.asarray(sizes), 200, block_m))
    covered = np.zeros(200, np.int64)
    for p, s, e in zip(part, start, end):
      assert 0 <= e - s <= block_m
      covered[s:e] += 1
      assert np.all(owner[s:e] == p)  # a tile never straddles a group boundary
    np.testing.assert_array_equal(covered, 1)

    item_part, item_tile, part_starts, part_ends = map(
        np.asarray, tiling.aligned_tile_items(jnp.asarray(sizes), 200, block_m))
    visits = {(int(t), int(p)) for t, p in zip(item_tile, item_part)}
    rows = np.arange(200)
    expected = {(int(r // block_m), int(owner[r])) for r in rows}
    assert expected <= visits  # every (tile, part) overlap is an item; the extra ones are unused (tail) items
    assert all(p == 9 for t, p in visits - expected)
    assert np.all(np.diff(item_tile) >= 0) and np.all(np.diff(item_part) >= 0)  # consecutive visits


def test_moe_layer_with_pallas_matches_ragged_dot():
  """MoE output and gradients (bf16 compute, jitted) agree between matmul_impl='pallas' and 'ragged_dot'."""
  base = get_config('k2_tiny').moe
  x = jax.random.normal(jax.random.key(7), (2, 16, base.hidden_size), jnp.float32)
  outputs, grads = {}, {}
  for impl in ('pallas', 'ragged_dot'):
    moe = MoE(base, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, matmul_impl=impl)

    @nnx.jit
    def loss_and_grads(moe, x):
      def loss(moe):
        y, _ = moe(x)
        return jnp.mean(y.astype(jnp.float32) ** 2), y
      return nnx.value_and_grad(loss, has_aux=True)(moe)

    (_, outputs[impl]), grads[impl] = loss_and_grads(moe, x)
  assert outputs['pallas'].dtype == jnp.bfloat16
  assert _relative_error(outputs['pallas'], outputs['ragged_dot']) < 1e-2
  for name in ('gate_proj', 'up_proj', 'down_proj', 'router'):
    actual, expected = grads['pallas'][name][...], grads['ragged_dot'][name][...]
    assert float(jnp.abs(expected).max()) > 0
    assert _relative_error(actual, expected) < 2e-2, name
