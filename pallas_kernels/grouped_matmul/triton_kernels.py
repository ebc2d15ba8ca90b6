"""Grouped matmul kernels for GPU (Pallas on Triton), also run by Pallas' interpreter on CPU.

Two kernels cover the forward pass and both backward products:

  grouped_product     out [M, N] = lhs [M, K] @ w[g] for the rows of each group g, where w is rhs [G, K, N] or,
                      with transpose_rhs, rhs [G, N, K] transposed (the dlhs product dout @ rhs[g]^T).
                      Grid (N tiles, row tiles); row tiles are group-aligned (tiling.group_aligned_tiles), so each
                      program owns rows [start, end) of one group and loops over K in block_k slices with masked
                      row loads. N tiles vary fastest, so programs running together share their lhs rows and
                      stream one group's weights, which stay in L2 (a K2 expert matrix is 29 MB of a 60 MB L2).
  transposed_product  out[g] [K, N] = lhs[rows of g]^T @ dout[rows of g] (the drhs product). Grid
                      (N tiles, K tiles, G); each program loops over its group's rows block_m at a time (a dynamic
                      trip count; zero for an empty group, which writes zeros).

Both accumulate in float32 and round once at the store; on Hopper, Triton lowers the bf16 dots to wgmma.
Triton arrays need power-of-two shapes: the op pads K and N to whole blocks; M needs no padding (rows are masked).
"""

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton
import jax.numpy as jnp

from pallas_kernels.grouped_matmul.tiling import ProductBlocks
from pallas_kernels.grouped_matmul.tiling import group_aligned_tiles
from pallas_kernels.grouped_matmul.tiling import group_bounds
from pallas_kernels.grouped_matmul.tiling import num_row_tiles


def _dot(lhs, rhs, lhs_contract: int, rhs_contract: int):
  return lax.dot_general(lhs, rhs, (((lhs_contract,), (rhs_contract,)), ((), ())),
                         preferred_element_type=jnp.float32)


def _check_int32_offsets(*arrays):
  """Pallas' Triton lowering addresses elements with int32 offsets."""
  for array in arrays:
    if array.size >= 2 ** 31:
      raise ValueError(f'grouped_matmul on GPU: an operand of shape {array.shape} has {array.size} >= 2^31 elements, '
                       'past the int32 offsets of the Triton kernels; split the groups over several calls')


def _row_mask(first_row, end, block_m: int, width: int):
  """[block_m, width] bool: rows first_row + i < end."""
  rows = first_row + jnp.arange(block_m, dtype=jnp.int32)
  return jnp.broadcast_to((rows < end)[:, None], (block_m, width))


def _grouped_product_kernel(tile_part_ref, tile_start_ref, tile_end_ref, lhs_ref, rhs_ref, out_ref, *,
                            num_groups: int, blocks: ProductBlocks, transpose_rhs: bool):
  """One [block_m, block_n] output tile of one group (or of the zero tail when part == num_groups)."""
  block_m, block_n, block_k = blocks.block_m, blocks.block_n, blocks.block_k
  col_block, tile = pl.program_id(0), pl.program_id(1)
  part, start, end = tile_part_ref[tile], tile_start_ref[tile], tile_end_ref[tile]
  cols = pl.ds(pl.multiple_of(col_block * block_n, block_n), block_n)
  out_tile = out_ref.at[pl.ds(start, block_m), cols]
  store_mask = _row_mask(start, end, block_m, block_n)

  @pl.when((start < end) & (part < num_groups))
  def _():
    load_mask = _row_mask(start, end, block_m, block_k)

    def accumulate(step, accumulator):
      window = pl.ds(pl.multiple_of(step * block_k, block_k), block_k)
      lhs = pltriton.load(lhs_ref.at[pl.ds(start, block_m), window], mask=load_mask, other=0)
      if transpose_rhs:
        product = _dot(lhs, rhs_ref[part, cols, window], 1, 1)
      else:
        product = _dot(lhs, rhs_ref[part, window, cols], 1, 0)
      return accumulator + product

    accumulator = lax.fori_loop(0, lhs_ref.shape[1] // block_k, accumulate,
                                jnp.zeros((block_m, block_n), jnp.float32))
    pltriton.store(out_tile, accumulator.astype(out_ref.dtype), mask=store_mask)

  @pl.when((start < end) & (part >= num_groups))
  def _():
    pltriton.store(out_tile, jnp.zeros((block_m, block_n), out_ref.dtype), mask=store_mask)


def grouped_product(lhs, rhs, group_sizes, *, transpose_rhs: bool, blocks: ProductBlocks, interpret):
  """lhs [M, K] (K a multiple of block_k), rhs [G, K, N] or [G, N, K] (N a multiple of block_n) -> [M, N]."""
  num_rows, contract = lhs.shape
  num_groups = rhs.shape[0]
  cols = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  _check_int32_offsets(lhs, rhs)
  tile_part, tile_start, tile_end = group_aligned_tiles(group_sizes, num_rows, blocks.block_m)
  assert contract % blocks.block_k == 0 and cols % blocks.block_n == 0, (lhs.shape, rhs.shape, blocks)
  return pl.pallas_call(
      functools.partial(_grouped_product_kernel, num_groups=num_groups, blocks=blocks,
                        transpose_rhs=transpose_rhs),
      out_shape=jax.ShapeDtypeStruct((num_rows, cols), lhs.dtype),
      grid=(cols // blocks.block_n, num_row_tiles(num_rows, num_groups, blocks.block_m)),
      compiler_params=pltriton.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
      interpret=interpret,
      name='grouped_matmul',
  )(tile_part, tile_start, tile_end, lhs, rhs)


def _transposed_product_kernel(part_start_ref, part_end_ref, lhs_ref, dout_ref, out_ref, *,
                               blocks: ProductBlocks):
  """One [block_k, block_n] tile of out[g], reducing over the group's rows."""
  block_m, block_n, block_k = blocks.block_m, blocks.block_n, blocks.block_k
  col_block, contract_block, group = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  start, end = part_start_ref[group], part_end_ref[group]
  cols = pl.ds(pl.multiple_of(col_block * block_n, block_n), block_n)
  window = pl.ds(pl.multiple_of(contract_block * block_k, block_k), block_k)

  def accumulate(step, accumulator):
    first_row = start + step * block_m
    rows = pl.ds(first_row, block_m)
    lhs = pltriton.load(lhs_ref.at[rows, window], mask=_row_mask(first_row, end, block_m, block_k), other=0)
    dout = pltriton.load(dout_ref.at[rows, cols], mask=_row_mask(first_row, end, block_m, block_n), other=0)
    return accumulator + _dot(lhs, dout, 0, 0)

  accumulator = lax.fori_loop(0, pl.cdiv(end - start, block_m), accumulate,
                              jnp.zeros((block_k, block_n), jnp.float32))
  out_ref[group, window, cols] = accumulator.astype(out_ref.dtype)


def transposed_product(lhs, dout, group_sizes, *, out_dtype, blocks: ProductBlocks, interpret):
  """lhs [M, K], dout [M, N] (K, N multiples of block_k, block_n) -> [G, K, N]."""
  num_rows, contract = lhs.shape
  cols = dout.shape[1]
  num_groups = group_sizes.shape[0]
  _check_int32_offsets(lhs, dout, jax.ShapeDtypeStruct((num_groups, contract, cols), out_dtype))
  part_starts, part_ends = group_bounds(group_sizes, num_rows)
  assert contract % blocks.block_k == 0 and cols % blocks.block_n == 0, (lhs.shape, dout.shape, blocks)
  return pl.pallas_call(
      functools.partial(_transposed_product_kernel, blocks=blocks),
      out_shape=jax.ShapeDtypeStruct((num_groups, contract, cols), out_dtype),
      grid=(cols // blocks.block_n, contract // blocks.block_k, num_groups),
      compiler_params=pltriton.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
      interpret=interpret,
      name='grouped_matmul_drhs',
  )(part_starts, part_ends, lhs, dout)
