"""Pallas (Mosaic, TPU) kernels for the Newton-Schulz steps of Muon.

One Newton-Schulz step on a wide matrix X [n, m] (n <= m) is three matrix products:

    A  = X X^T                    [n, n]
    P  = a I + b A + c (A A)      [n, n]
    X' = P X                      [n, m]   (= a X + (b A + c A A) X)

Two ways to run the steps on a stack X [batch, n, m] (already normalized, padded and in the iteration dtype):
  * fused: one program per matrix holds X, A and P in VMEM and runs all the steps (small matrices only);
  * tiled: each product is one pallas_call over output tiles, with the linear combination (a I + b A + c ..)
    fused into the epilogue, so every step is three passes over HBM and no separate element-wise pass. The grid
    runs in order, so the contraction is the last ("arbitrary") grid axis and a VMEM scratch accumulates across it.
Products accumulate in float32; A, A A, P and X are rounded to the iteration dtype where the jnp reference
(reference.py) rounds them.

There is no GPU (Triton) backend: on an H200, XLA's batched cuBLAS matmuls beat the Triton kernels at Muon's shapes
(BENCHMARKS.md, bench_optim), so Muon runs the jnp reference there.
"""

import dataclasses
import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp

# Smallest side of a padded matrix: one 128-lane vreg row.
MIN_TILE = 128


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes of the Newton-Schulz kernels; all powers of two.

  Attributes:
    block_rows: rows of one output tile (of A, P or X').
    block_cols: columns of one output tile.
    block_contract: length of the contraction slice multiplied at a time (one grid step).
    fused_max_dim: a stack whose padded n and m are both <= this runs the fused kernel (one program per matrix,
      all steps in VMEM); larger ones run the tiled kernels. MXU-sized tiles; a fused 512 x 512 problem keeps X,
      A, A A and P well inside VMEM.
  """
  block_rows: int = 256
  block_cols: int = 256
  block_contract: int = 512
  fused_max_dim: int = 512

  @property
  def largest_block(self) -> int:
    return max(self.block_rows, self.block_cols, self.block_contract)


def padded_size(size: int, block_sizes: BlockSizes) -> int:
  """`size` rounded up so that every tile clamped to it, min(block, padded), divides it.

  Small sides go to the next power of two (at least MIN_TILE); large ones to a multiple of the largest block,
  which every (power-of-two) block divides.
  """
  power_of_two = pl.next_power_of_2(max(size, MIN_TILE))
  tile = min(block_sizes.largest_block, power_of_two)
  return pl.cdiv(size, tile) * tile


def _epilogue(product, residual, *, product_scale: float, residual_scale: float, identity_scale: float,
              row_offset=0, col_offset=0):
  """product_scale * product + residual_scale * residual + identity_scale * I, in float32, for an output tile
  whose first element sits at (row_offset, col_offset) of the whole matrix. With a residual (forming P), the
  reference's rounding points (`reference._polynomial_by_product`, a cuBLAS GEMM's on a GPU): the product rounded
  to the residual's dtype and scaled (rounded again), and the other terms rounded once, before they are added."""
  rows = row_offset + lax.broadcasted_iota(jnp.int32, product.shape, 0)
  cols = col_offset + lax.broadcasted_iota(jnp.int32, product.shape, 1)
  identity = jnp.where(rows == cols, identity_scale, 0.0) if identity_scale else 0.0
  if residual is None:
    return product_scale * product + identity
  dtype = residual.dtype  # the scale too is in the iteration dtype (c = 2.0315 is 2.03125 in bfloat16)
  scaled = (jnp.asarray(product_scale, dtype).astype(jnp.float32) * product.astype(dtype).astype(jnp.float32))
  scaled = scaled.astype(dtype)
  others = (residual_scale * residual.astype(jnp.float32) + identity).astype(dtype)
  return scaled.astype(jnp.float32) + others.astype(jnp.float32)


def _dot(lhs, rhs, *, transpose_rhs: bool):
  """lhs @ rhs (or lhs @ rhs^T) accumulated in float32."""
  contracting = ((1,), (1,)) if transpose_rhs else ((1,), (0,))
  return lax.dot_general(lhs, rhs, (contracting, ((), ())), preferred_element_type=jnp.float32)


def _fused_steps_kernel(x_ref, out_ref, *, steps: int, coeffs: tuple[float, float, float]):
  """All Newton-Schulz steps on one matrix held in VMEM. x_ref, out_ref: [n, m]."""
  a, b, c = coeffs
  x = x_ref[...]
  dtype = x.dtype
  for _ in range(steps):
    gram = _dot(x, x, transpose_rhs=True).astype(dtype)
    polynomial = _epilogue(_dot(gram, gram, transpose_rhs=False), gram, product_scale=c, residual_scale=b,
                           identity_scale=a).astype(dtype)
    x = _dot(polynomial, x, transpose_rhs=False).astype(dtype)
  out_ref[...] = x


def fused_steps(x, *, steps, coeffs, block_sizes, interpret):
  """All steps in one pallas_call, one program per matrix. x: [batch, n, m] -> [batch, n, m]."""
  del block_sizes
  batch, n, m = x.shape
  matrix_spec = pl.BlockSpec((None, n, m), lambda i: (i, 0, 0))
  return pl.pallas_call(
      functools.partial(_fused_steps_kernel, steps=steps, coeffs=coeffs),
      out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
      grid=(batch,),
      in_specs=[matrix_spec],
      out_specs=matrix_spec,
      compiler_params=pltpu.CompilerParams(dimension_semantics=('parallel',)),
      interpret=interpret,
      name='newton_schulz_fused',
  )(x)


# Tiled products: out = product_scale * (lhs @ rhs) + residual_scale * residual + identity_scale * I, tile by tile.
# lhs [batch, rows, K]; rhs [batch, K, cols], or [batch, cols, K] with transpose_rhs; residual [batch, rows, cols].


def _product_kernel(lhs_ref, rhs_ref, *refs, transpose_rhs, product_scale, residual_scale, identity_scale):
  """One (output tile, contraction slice) grid point; the contraction is grid axis 3, run in order."""
  *residual_ref, out_ref, accumulator_ref = refs
  contract_index = pl.program_id(3)
  row_offset = pl.program_id(1) * out_ref.shape[0]
  col_offset = pl.program_id(2) * out_ref.shape[1]

  @pl.when(contract_index == 0)
  def _():
    accumulator_ref[...] = jnp.zeros_like(accumulator_ref)

  accumulator_ref[...] += _dot(lhs_ref[...], rhs_ref[...], transpose_rhs=transpose_rhs)

  @pl.when(contract_index == pl.num_programs(3) - 1)
  def _():
    residual = residual_ref[0][...] if residual_ref else None
    out_ref[...] = _epilogue(accumulator_ref[...], residual, product_scale=product_scale,
                             residual_scale=residual_scale, identity_scale=identity_scale,
                             row_offset=row_offset, col_offset=col_offset).astype(out_ref.dtype)


def tiled_product(lhs, rhs, residual=None, *, transpose_rhs=False, product_scale=1.0, residual_scale=0.0,
                  identity_scale=0.0, block_sizes, interpret):
  """product_scale * (lhs @ rhs) + residual_scale * residual + identity_scale * I, batched; shapes as above."""
  batch, rows, contract_size = lhs.shape
  cols = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  rows_tile = min(block_sizes.block_rows, rows)
  cols_tile = min(block_sizes.block_cols, cols)
  contract_tile = min(block_sizes.block_contract, contract_size)
  operands = (lhs, rhs) if residual is None else (lhs, rhs, residual)
  # Grid (batch, row tile, col tile, contraction slice); the last axis accumulates into VMEM.
  rhs_block = (None, cols_tile, contract_tile) if transpose_rhs else (None, contract_tile, cols_tile)
  rhs_index = (lambda b, i, j, k: (b, j, k)) if transpose_rhs else (lambda b, i, j, k: (b, k, j))
  tile_spec = pl.BlockSpec((None, rows_tile, cols_tile), lambda b, i, j, k: (b, i, j))
  in_specs = [pl.BlockSpec((None, rows_tile, contract_tile), lambda b, i, j, k: (b, i, k)),
              pl.BlockSpec(rhs_block, rhs_index)]
  if residual is not None:
    in_specs.append(tile_spec)
  return pl.pallas_call(
      functools.partial(_product_kernel, transpose_rhs=transpose_rhs, product_scale=product_scale,
                        residual_scale=residual_scale, identity_scale=identity_scale),
      out_shape=jax.ShapeDtypeStruct((batch, rows, cols), lhs.dtype),
      grid=(batch, rows // rows_tile, cols // cols_tile, contract_size // contract_tile),
      in_specs=in_specs,
      out_specs=tile_spec,
      scratch_shapes=[pltpu.VMEM((rows_tile, cols_tile), jnp.float32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=('parallel', 'parallel', 'parallel', 'arbitrary')),
      interpret=interpret,
      name='newton_schulz_product',
  )(*operands)


def tiled_steps(x, *, steps, coeffs, block_sizes, interpret):
  """The steps as three tiled products each. x: [batch, n, m] -> [batch, n, m]."""
  a, b, c = coeffs
  product = functools.partial(tiled_product, block_sizes=block_sizes, interpret=interpret)

  def step(_, x):
    gram = product(x, x, transpose_rhs=True)  # A = X X^T
    polynomial = product(gram, gram, gram, product_scale=c, residual_scale=b, identity_scale=a)  # P
    return product(polynomial, x)  # X' = P X

  # A loop, not unrolled: each step is three kernel launches anyway, and one traced step compiles 5x faster.
  return lax.fori_loop(0, steps, step, x)
