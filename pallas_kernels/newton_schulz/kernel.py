"""Pallas kernels for the Newton-Schulz steps of Muon, on GPU (Triton) and TPU (Mosaic).

One Newton-Schulz step on a wide matrix X [n, m] (n <= m) is three matrix products:

    A  = X X^T              [n, n]
    B  = b A + c A A        [n, n]
    X' = a X + B X          [n, m]

Two ways to run the steps on a stack X [batch, n, m] (already normalized, padded and in the iteration dtype):
  * fused: one program per matrix holds X, A and B on chip and runs all the steps (small matrices only);
  * tiled: each product is one pallas_call over output tiles, with the linear combination (b A + c .., a X + ..)
    fused into the epilogue, so every step is three passes over HBM and no separate element-wise pass.
Products accumulate in float32; A, B and X are rounded to the iteration dtype between products, as the jnp
reference does (it computes each product in that dtype).

The backends differ only in the tiled product: Triton programs run in parallel, so each one loops over the
contraction inside the kernel; Mosaic runs the grid in order, so the contraction is the last ("arbitrary") grid
axis and a VMEM scratch accumulates across it.
"""

import dataclasses
import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton
import jax.numpy as jnp

TRITON = 'triton'
MOSAIC = 'mosaic'


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes of the Newton-Schulz kernels; all powers of two.

  Attributes:
    block_rows: rows of one output tile (of A, B or X').
    block_cols: columns of one output tile.
    block_contract: length of the contraction slice multiplied at a time.
    fused_max_dim: a stack whose padded n and m are both <= this runs the fused kernel (one program per matrix,
      all steps on chip); larger ones run the tiled kernels.
    num_warps: Triton only: warps per program of the tiled kernels.
    num_stages: Triton only: software-pipelining depth of the contraction loop.
  """
  block_rows: int = 128
  block_cols: int = 128
  block_contract: int = 64
  fused_max_dim: int = 64
  num_warps: int = 8
  num_stages: int = 3

  @classmethod
  def for_backend(cls, backend: str) -> 'BlockSizes':
    if backend == MOSAIC:
      # MXU-sized tiles; a fused 512 x 512 problem keeps X, A, A A and B well inside VMEM.
      return cls(block_rows=256, block_cols=256, block_contract=512, fused_max_dim=512)
    # Triton tiles: 128 x 128 outputs, 3-stage pipelined 64-wide slices (96 KiB of shared memory in bf16). On an
    # H200, 8 x [2048, 7168] bf16: 11.4 ms (128 x 256 outputs: 10.6 ms; XLA's cuBLAS reference: 9.5 ms).
    return cls()

  @property
  def largest_block(self) -> int:
    return max(self.block_rows, self.block_cols, self.block_contract)


def min_tile(backend: str) -> int:
  """Smallest side a padded matrix gets: 16 for Triton's tl.dot, a 128-lane vreg row for Mosaic."""
  return 128 if backend == MOSAIC else 16


def padded_size(size: int, backend: str, block_sizes: BlockSizes) -> int:
  """`size` rounded up so that every tile clamped to it, min(block, padded), divides it.

  Small sides go to the next power of two (Triton arrays must have power-of-two shapes); large ones to a multiple
  of the largest block, which every (power-of-two) block divides.
  """
  power_of_two = pl.next_power_of_2(max(size, min_tile(backend)))
  tile = min(block_sizes.largest_block, power_of_two)
  return pl.cdiv(size, tile) * tile


def _combine(product, residual, residual_scale: float, product_scale: float):
  """product_scale * product + residual_scale * residual, in float32 (the epilogue of every product)."""
  combined = product_scale * product
  if residual is not None:
    combined = combined + residual_scale * residual.astype(jnp.float32)
  return combined


def _dot(lhs, rhs, *, transpose_rhs: bool):
  """lhs @ rhs (or lhs @ rhs^T) accumulated in float32."""
  contracting = ((1,), (1,)) if transpose_rhs else ((1,), (0,))
  return lax.dot_general(lhs, rhs, (contracting, ((), ())), preferred_element_type=jnp.float32)


def _fused_steps_kernel(x_ref, out_ref, *, steps: int, coeffs: tuple[float, float, float]):
  """All Newton-Schulz steps on one matrix held on chip. x_ref, out_ref: [n, m]."""
  a, b, c = coeffs
  x = x_ref[...]
  dtype = x.dtype
  for _ in range(steps):
    gram = _dot(x, x, transpose_rhs=True).astype(dtype)
    polynomial = _combine(_dot(gram, gram, transpose_rhs=False), gram, b, c).astype(dtype)
    x = _combine(_dot(polynomial, x, transpose_rhs=False), x, a, 1.0).astype(dtype)
  out_ref[...] = x


def fused_steps(x, *, steps, coeffs, backend, block_sizes, interpret):
  """All steps in one pallas_call, one program per matrix. x: [batch, n, m] -> [batch, n, m]."""
  batch, n, m = x.shape
  if backend == MOSAIC:
    compiler_params = pltpu.CompilerParams(dimension_semantics=('parallel',))
  else:
    compiler_params = pltriton.CompilerParams(num_warps=4, num_stages=1)
  matrix_spec = pl.BlockSpec((None, n, m), lambda i: (i, 0, 0))
  return pl.pallas_call(
      functools.partial(_fused_steps_kernel, steps=steps, coeffs=coeffs),
      out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
      grid=(batch,),
      in_specs=[matrix_spec],
      out_specs=matrix_spec,
      compiler_params=compiler_params,
      interpret=interpret,
      name='newton_schulz_fused',
  )(x)


# Tiled products: out = product_scale * (lhs @ rhs) + residual_scale * residual, tile by tile.
# lhs [batch, rows, K]; rhs [batch, K, cols], or [batch, cols, K] with transpose_rhs; residual [batch, rows, cols].


def _triton_product_kernel(lhs_ref, rhs_ref, *refs, transpose_rhs, residual_scale, product_scale, block_contract):
  """One output tile; loops over the contraction. lhs_ref: [rows_tile, K]; rhs_ref: [K, cols_tile] or transposed."""
  *residual_ref, out_ref = refs
  contract_size = lhs_ref.shape[-1]

  def accumulate(index, accumulator):
    window = pl.ds(index * block_contract, block_contract)
    rhs = rhs_ref[:, window] if transpose_rhs else rhs_ref[window, :]
    return accumulator + _dot(lhs_ref[:, window], rhs, transpose_rhs=transpose_rhs)

  accumulator = lax.fori_loop(0, contract_size // block_contract, accumulate,
                              jnp.zeros(out_ref.shape, jnp.float32))
  residual = residual_ref[0][...] if residual_ref else None
  out_ref[...] = _combine(accumulator, residual, residual_scale, product_scale).astype(out_ref.dtype)


def _mosaic_product_kernel(lhs_ref, rhs_ref, *refs, transpose_rhs, residual_scale, product_scale):
  """One (output tile, contraction slice) grid point; the contraction is grid axis 3, run in order."""
  *residual_ref, out_ref, accumulator_ref = refs
  contract_index = pl.program_id(3)

  @pl.when(contract_index == 0)
  def _():
    accumulator_ref[...] = jnp.zeros_like(accumulator_ref)

  accumulator_ref[...] += _dot(lhs_ref[...], rhs_ref[...], transpose_rhs=transpose_rhs)

  @pl.when(contract_index == pl.num_programs(3) - 1)
  def _():
    residual = residual_ref[0][...] if residual_ref else None
    out_ref[...] = _combine(accumulator_ref[...], residual, residual_scale, product_scale).astype(out_ref.dtype)


def tiled_product(lhs, rhs, residual=None, *, transpose_rhs=False, residual_scale=0.0, product_scale=1.0,
                  backend, block_sizes, interpret):
  """product_scale * (lhs @ rhs) + residual_scale * residual, batched; shapes as in the comment above."""
  batch, rows, contract_size = lhs.shape
  cols = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  rows_tile = min(block_sizes.block_rows, rows)
  cols_tile = min(block_sizes.block_cols, cols)
  contract_tile = min(block_sizes.block_contract, contract_size)
  out_shape = jax.ShapeDtypeStruct((batch, rows, cols), lhs.dtype)
  operands = (lhs, rhs) if residual is None else (lhs, rhs, residual)
  scales = dict(transpose_rhs=transpose_rhs, residual_scale=residual_scale, product_scale=product_scale)

  if backend == TRITON:
    # Grid (batch, row tile, col tile); each program reads full-K row/column slabs slice by slice.
    rhs_block = (None, cols_tile, contract_size) if transpose_rhs else (None, contract_size, cols_tile)
    rhs_index = (lambda b, i, j: (b, j, 0)) if transpose_rhs else (lambda b, i, j: (b, 0, j))
    tile_spec = pl.BlockSpec((None, rows_tile, cols_tile), lambda b, i, j: (b, i, j))
    in_specs = [pl.BlockSpec((None, rows_tile, contract_size), lambda b, i, j: (b, i, 0)),
                pl.BlockSpec(rhs_block, rhs_index)]
    if residual is not None:
      in_specs.append(tile_spec)
    return pl.pallas_call(
        functools.partial(_triton_product_kernel, block_contract=contract_tile, **scales),
        out_shape=out_shape,
        grid=(batch, rows // rows_tile, cols // cols_tile),
        in_specs=in_specs,
        out_specs=tile_spec,
        compiler_params=pltriton.CompilerParams(num_warps=block_sizes.num_warps,
                                                num_stages=block_sizes.num_stages),
        interpret=interpret,
        name='newton_schulz_product',
    )(*operands)

  # Mosaic: grid (batch, row tile, col tile, contraction slice); the last axis accumulates into VMEM.
  rhs_block = (None, cols_tile, contract_tile) if transpose_rhs else (None, contract_tile, cols_tile)
  rhs_index = (lambda b, i, j, k: (b, j, k)) if transpose_rhs else (lambda b, i, j, k: (b, k, j))
  tile_spec = pl.BlockSpec((None, rows_tile, cols_tile), lambda b, i, j, k: (b, i, j))
  in_specs = [pl.BlockSpec((None, rows_tile, contract_tile), lambda b, i, j, k: (b, i, k)),
              pl.BlockSpec(rhs_block, rhs_index)]
  if residual is not None:
    in_specs.append(tile_spec)
  return pl.pallas_call(
      functools.partial(_mosaic_product_kernel, **scales),
      out_shape=out_shape,
      grid=(batch, rows // rows_tile, cols // cols_tile, contract_size // contract_tile),
      in_specs=in_specs,
      out_specs=tile_spec,
      scratch_shapes=[pltpu.VMEM((rows_tile, cols_tile), jnp.float32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=('parallel', 'parallel', 'parallel', 'arbitrary')),
      interpret=interpret,
      name='newton_schulz_product',
  )(*operands)


def tiled_steps(x, *, steps, coeffs, backend, block_sizes, interpret):
  """The steps as three tiled products each. x: [batch, n, m] -> [batch, n, m]."""
  a, b, c = coeffs
  product = functools.partial(tiled_product, backend=backend, block_sizes=block_sizes, interpret=interpret)

  def step(_, x):
    gram = product(x, x, transpose_rhs=True)  # A = X X^T
    polynomial = product(gram, gram, gram, residual_scale=b, product_scale=c)  # B = b A + c A A
    return product(polynomial, x, x, residual_scale=a)  # X' = a X + B X

  # A loop, not unrolled: each step is three kernel launches anyway, and one traced step compiles 5x faster.
  return lax.fori_loop(0, steps, step, x)
