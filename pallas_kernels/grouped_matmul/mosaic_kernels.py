"""Grouped matmul kernels for TPU (Pallas on Mosaic); tested on CPU in TPU interpret mode (no TPU was available).

Mosaic runs the grid in order on one core and BlockSpecs address whole blocks, so rows are cut into tiles aligned
to block_m and visited by work items (tiling.aligned_tile_items): one item per (tile, part) overlap, a part being a
group or the ownerless tail. The work-item tables are scalar-prefetched into SMEM and steer the index maps.

  grouped_product     grid (N tiles, items, K slices). The float32 accumulator in VMEM sums the K slices of one
                      item; at the last slice the item writes only its part's rows of the output tile, keeping the
                      rows already written by earlier items of the same tile (they are consecutive, so the output
                      block stays in VMEM between them). Tail items contribute zeros.
  transposed_product  grid (K tiles, N tiles, items). The accumulator sums lhs^T @ dout over all items of one group
                      (consecutive), each masked to the group's rows, and is stored at the group's last item.
                      Groups with no rows are never visited; the op zeroes their outputs.

Items of the tail and unused items skip the matmul, and their index maps pin the K slice to 0 so the pipeline
does not fetch new blocks for them.
"""

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp

from pallas_kernels.grouped_matmul.tiling import ProductBlocks
from pallas_kernels.grouped_matmul.tiling import aligned_tile_items


def _rows_in_part(tile, part_start, part_end, shape):
  """[block_m, width] bool: rows of the tile that lie in [part_start, part_end)."""
  rows = tile * shape[0] + lax.broadcasted_iota(jnp.int32, shape, 0)
  return (rows >= part_start) & (rows < part_end)


def _grouped_product_kernel(item_part_ref, item_tile_ref, part_start_ref, part_end_ref, lhs_ref, rhs_ref,
                            out_ref, accumulator_ref, *, num_groups: int, transpose_rhs: bool):
  item, contract_step = pl.program_id(1), pl.program_id(2)
  part = item_part_ref[item]

  @pl.when(contract_step == 0)
  def _():
    accumulator_ref[...] = jnp.zeros_like(accumulator_ref)

  @pl.when(part < num_groups)
  def _():
    contracting = (1,) if transpose_rhs else (0,)
    accumulator_ref[...] += lax.dot_general(lhs_ref[...], rhs_ref[...], (((1,), contracting), ((), ())),
                                            preferred_element_type=jnp.float32)

  @pl.when(contract_step == pl.num_programs(2) - 1)
  def _():
    tile = item_tile_ref[item]
    keep = _rows_in_part(tile, part_start_ref[part], part_end_ref[part], out_ref.shape)
    value = accumulator_ref[...].astype(out_ref.dtype)
    first_visit = (item == 0) | (item_tile_ref[jnp.maximum(item - 1, 0)] != tile)

    @pl.when(first_visit)
    def _():
      out_ref[...] = jnp.where(keep, value, jnp.zeros_like(value))

    @pl.when(jnp.logical_not(first_visit))
    def _():
      out_ref[...] = jnp.where(keep, value, out_ref[...])


def grouped_product(lhs, rhs, group_sizes, *, transpose_rhs: bool, blocks: ProductBlocks, interpret):
  """lhs [M, K], rhs [G, K, N] or [G, N, K] (M, K, N multiples of block_m, block_k, block_n) -> [M, N]."""
  num_rows, contract = lhs.shape
  num_groups = rhs.shape[0]
  cols = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  block_m, block_n, block_k = blocks.block_m, blocks.block_n, blocks.block_k
  assert num_rows % block_m == 0 and contract % block_k == 0 and cols % block_n == 0, (lhs.shape, rhs.shape)
  tables = aligned_tile_items(group_sizes, num_rows, block_m)

  def contract_index(k, parts, w):  # pin the slice for items without a matmul (see module docstring)
    return jnp.where(parts[w] < num_groups, k, 0)

  def group_index(parts, w):
    return jnp.minimum(parts[w], num_groups - 1)

  def lhs_map(n, w, k, parts, tiles, *_):
    return tiles[w], contract_index(k, parts, w)

  if transpose_rhs:
    rhs_spec = pl.BlockSpec((None, block_n, block_k),
                            lambda n, w, k, parts, *_: (group_index(parts, w), n, contract_index(k, parts, w)))
  else:
    rhs_spec = pl.BlockSpec((None, block_k, block_n),
                            lambda n, w, k, parts, *_: (group_index(parts, w), contract_index(k, parts, w), n))
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=len(tables),
      grid=(cols // block_n, tables[0].shape[0], contract // block_k),
      in_specs=[pl.BlockSpec((block_m, block_k), lhs_map), rhs_spec],
      out_specs=pl.BlockSpec((block_m, block_n), lambda n, w, k, parts, tiles, *_: (tiles[w], n)),
      scratch_shapes=[pltpu.VMEM((block_m, block_n), jnp.float32)],
  )
  return pl.pallas_call(
      functools.partial(_grouped_product_kernel, num_groups=num_groups, transpose_rhs=transpose_rhs),
      out_shape=jax.ShapeDtypeStruct((num_rows, cols), lhs.dtype),
      grid_spec=grid_spec,
      compiler_params=pltpu.CompilerParams(dimension_semantics=('parallel', 'arbitrary', 'arbitrary')),
      interpret=interpret,
      name='grouped_matmul',
  )(*tables, lhs, rhs)


def _transposed_product_kernel(item_part_ref, item_tile_ref, part_start_ref, part_end_ref, lhs_ref, dout_ref,
                               out_ref, accumulator_ref, *, num_groups: int):
  item, num_items = pl.program_id(2), pl.num_programs(2)
  part = item_part_ref[item]
  first_of_group = (item == 0) | (item_part_ref[jnp.maximum(item - 1, 0)] != part)
  last_of_group = (item == num_items - 1) | (item_part_ref[jnp.minimum(item + 1, num_items - 1)] != part)

  @pl.when(first_of_group)
  def _():
    accumulator_ref[...] = jnp.zeros_like(accumulator_ref)

  @pl.when(part < num_groups)
  def _():
    keep = _rows_in_part(item_tile_ref[item], part_start_ref[part], part_end_ref[part], lhs_ref.shape)
    lhs = jnp.where(keep, lhs_ref[...], jnp.zeros_like(lhs_ref))
    accumulator_ref[...] += lax.dot_general(lhs, dout_ref[...], (((0,), (0,)), ((), ())),
                                            preferred_element_type=jnp.float32)

  @pl.when(last_of_group & (part < num_groups))
  def _():
    out_ref[...] = accumulator_ref[...].astype(out_ref.dtype)


def transposed_product(lhs, dout, group_sizes, *, out_dtype, blocks: ProductBlocks, interpret):
  """lhs [M, K], dout [M, N] (M, K, N multiples of block_m, block_k, block_n) -> [G, K, N]."""
  num_rows, contract = lhs.shape
  cols = dout.shape[1]
  num_groups = group_sizes.shape[0]
  block_m, block_n, block_k = blocks.block_m, blocks.block_n, blocks.block_k
  assert num_rows % block_m == 0 and contract % block_k == 0 and cols % block_n == 0, (lhs.shape, dout.shape)
  tables = aligned_tile_items(group_sizes, num_rows, block_m)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=len(tables),
      grid=(contract // block_k, cols // block_n, tables[0].shape[0]),
      in_specs=[pl.BlockSpec((block_m, block_k), lambda k, n, w, parts, tiles, *_: (tiles[w], k)),
                pl.BlockSpec((block_m, block_n), lambda k, n, w, parts, tiles, *_: (tiles[w], n))],
      out_specs=pl.BlockSpec((None, block_k, block_n),
                             lambda k, n, w, parts, *_: (jnp.minimum(parts[w], num_groups - 1), k, n)),
      scratch_shapes=[pltpu.VMEM((block_k, block_n), jnp.float32)],
  )
  out = pl.pallas_call(
      functools.partial(_transposed_product_kernel, num_groups=num_groups),
      out_shape=jax.ShapeDtypeStruct((num_groups, contract, cols), out_dtype),
      grid_spec=grid_spec,
      compiler_params=pltpu.CompilerParams(dimension_semantics=('parallel', 'parallel', 'arbitrary')),
      interpret=interpret,
      name='grouped_matmul_drhs',
  )(*tables, lhs, dout)
  # Blocks of groups without rows are never written (or hold an unused item's leftovers): zero them.
  return jnp.where((group_sizes > 0)[:, None, None], out, jnp.zeros_like(out))
