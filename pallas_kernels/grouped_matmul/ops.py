"""Public grouped matmul op: jax.lax.ragged_dot's semantics on Pallas kernels, with a custom VJP.

    out = grouped_matmul(lhs, rhs, group_sizes)

lhs [M, K] holds rows sorted by group (group g owns the next group_sizes[g] rows), rhs [G, K, N] one matrix per
group, and out [M, N] = lhs[rows of g] @ rhs[g] for every g; rows past sum(group_sizes) are zero. The VJP is two
more kernels: dlhs = dout @ rhs[g]^T per group (the forward kernel with rhs transposed) and
drhs[g] = lhs[rows of g]^T @ dout[rows of g] (a kernel that reduces over each group's rows).

Backends: Triton on GPU (triton_kernels.py), Mosaic on TPU (mosaic_kernels.py), and Pallas' interpreter on CPU,
which runs the Triton kernels (interpret=True) or the Mosaic ones in TPU interpret mode
(interpret=pltpu.InterpretParams()). Sides that do not fill whole tiles are zero-padded here, which is exact.
"""

import functools

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp

from pallas_kernels.grouped_matmul import mosaic_kernels
from pallas_kernels.grouped_matmul import triton_kernels
from pallas_kernels.grouped_matmul.tiling import MOSAIC
from pallas_kernels.grouped_matmul.tiling import TRITON
from pallas_kernels.grouped_matmul.tiling import BlockSizes
from pallas_kernels.grouped_matmul.tiling import ProductBlocks


def _kernel_backend(interpret) -> str:
  """Mosaic on TPU and for TPU interpret mode (pltpu.InterpretParams); Triton on GPU and for plain interpret mode."""
  if jax.default_backend() == 'tpu' or isinstance(interpret, pltpu.InterpretParams):
    return MOSAIC
  return TRITON


def _round_up(size: int, multiple: int) -> int:
  return pl.cdiv(size, multiple) * multiple


def _fit(blocks: ProductBlocks, backend: str, rows: int, contract: int, cols: int) -> ProductBlocks:
  """Shrinks tiles that are larger than (the padded) problem; `contract`/`cols` name the kernel's K/N sides."""
  if backend == TRITON:  # powers of two, at least 16 (tl.dot's smallest side)
    fit = lambda block, size: min(block, pl.next_power_of_2(max(size, 16)))
  else:  # Mosaic: rows in multiples of 16 (bf16 sublane pairs), columns in multiples of 128 lanes
    fit_rows = lambda block, size: min(block, _round_up(size, 16))
    fit = lambda block, size: min(block, _round_up(size, 128))
  return ProductBlocks(
      block_m=fit(blocks.block_m, rows) if backend == TRITON else fit_rows(blocks.block_m, rows),
      block_n=fit(blocks.block_n, cols), block_k=fit(blocks.block_k, contract),
      num_warps=blocks.num_warps, num_stages=blocks.num_stages)


def _pad(x: jax.Array, axis: int, multiple: int) -> jax.Array:
  padding = _round_up(x.shape[axis], multiple) - x.shape[axis]
  if not padding:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, padding)
  return jnp.pad(x, widths)


def grouped_product(lhs, rhs, group_sizes, *, transpose_rhs, backend, blocks, interpret):
  """lhs [M, K] @ rhs[g] per group, rhs [G, K, N] (or [G, N, K] with transpose_rhs) -> [M, N].

  One product of the op (the forward, or dlhs with transpose_rhs), not differentiable; exposed for benchmarks.
  """
  num_rows, contract = lhs.shape
  cols = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  blocks = _fit(blocks, backend, num_rows, contract, cols)
  rhs_contract_axis, rhs_cols_axis = (2, 1) if transpose_rhs else (1, 2)
  lhs = _pad(lhs, 1, blocks.block_k)
  rhs = _pad(_pad(rhs, rhs_contract_axis, blocks.block_k), rhs_cols_axis, blocks.block_n)
  if backend == MOSAIC:  # whole row blocks; the padded rows fall in the ownerless tail and come out zero
    out = mosaic_kernels.grouped_product(_pad(lhs, 0, blocks.block_m), rhs, group_sizes,
                                         transpose_rhs=transpose_rhs, blocks=blocks, interpret=interpret)
  else:
    out = triton_kernels.grouped_product(lhs, rhs, group_sizes, transpose_rhs=transpose_rhs, blocks=blocks,
                                         interpret=interpret)
  return out[:num_rows, :cols]


def transposed_product(lhs, dout, group_sizes, *, out_dtype, backend, blocks, interpret):
  """lhs[rows of g]^T @ dout[rows of g] per group: lhs [M, K], dout [M, N] -> [G, K, N] (the drhs product)."""
  num_rows, contract = lhs.shape
  cols = dout.shape[1]
  blocks = _fit(blocks, backend, num_rows, contract, cols)
  lhs, dout = _pad(lhs, 1, blocks.block_k), _pad(dout, 1, blocks.block_n)
  if backend == MOSAIC:
    out = mosaic_kernels.transposed_product(_pad(lhs, 0, blocks.block_m), _pad(dout, 0, blocks.block_m),
                                            group_sizes, out_dtype=out_dtype, blocks=blocks, interpret=interpret)
  else:
    out = triton_kernels.transposed_product(lhs, dout, group_sizes, out_dtype=out_dtype, blocks=blocks,
                                            interpret=interpret)
  return out[:, :contract, :cols]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _grouped_matmul(lhs, rhs, group_sizes, backend, interpret, block_sizes):
  return grouped_product(lhs, rhs, group_sizes, transpose_rhs=False, backend=backend,
                          blocks=block_sizes.forward, interpret=interpret)


def _grouped_matmul_fwd(lhs, rhs, group_sizes, backend, interpret, block_sizes):
  out = _grouped_matmul(lhs, rhs, group_sizes, backend, interpret, block_sizes)
  return out, (lhs, rhs, group_sizes)


def _grouped_matmul_bwd(backend, interpret, block_sizes, residuals, dout):
  lhs, rhs, group_sizes = residuals
  dout = dout.astype(lhs.dtype)
  # Rows past sum(group_sizes) come out zero in dlhs too: the grouped product writes zeros there.
  dlhs = grouped_product(dout, rhs, group_sizes, transpose_rhs=True, backend=backend,
                          blocks=block_sizes.dlhs, interpret=interpret)
  drhs = transposed_product(lhs, dout, group_sizes, out_dtype=rhs.dtype, backend=backend,
                             blocks=block_sizes.drhs, interpret=interpret)
  return dlhs, drhs, None


_grouped_matmul.defvjp(_grouped_matmul_fwd, _grouped_matmul_bwd)


@functools.partial(jax.jit, static_argnames=('interpret', 'block_sizes'))
def grouped_matmul(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    interpret: bool | pltpu.InterpretParams | None = None,
    block_sizes: BlockSizes | None = None,
) -> jax.Array:
  """Grouped (ragged) matmul with jax.lax.ragged_dot's semantics, differentiable in lhs and rhs.

  Args:
    lhs: [M, K], rows sorted by group.
    rhs: [G, K, N], one matrix per group.
    group_sizes: [G] integer rows per group, summing to at most M (a larger sum is clipped at M).
    interpret: None runs the compiled kernels on GPU (Triton) and TPU (Mosaic) and the interpreter on CPU; True
      interprets the Triton kernels; a `pltpu.InterpretParams()` runs the Mosaic kernels in TPU interpret mode.
    block_sizes: tile sizes of the three products; None takes the backend's defaults.

  Returns:
    [M, N] in the promoted dtype of lhs and rhs; products accumulate in float32.
  """
  if lhs.ndim != 2 or rhs.ndim != 3 or group_sizes.ndim != 1:
    raise ValueError(f'grouped_matmul needs lhs [M, K], rhs [G, K, N], group_sizes [G]; got lhs {lhs.shape}, '
                     f'rhs {rhs.shape}, group_sizes {group_sizes.shape}')
  if lhs.shape[1] != rhs.shape[1] or rhs.shape[0] != group_sizes.shape[0]:
    raise ValueError(f'grouped_matmul: lhs {lhs.shape} and rhs {rhs.shape} must share K, and rhs must have '
                     f'one matrix per group ({group_sizes.shape[0]} groups)')
  if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
    raise ValueError(f'group_sizes must be integers, got {group_sizes.dtype}')
  dtype = jnp.result_type(lhs, rhs)
  lhs, rhs = lhs.astype(dtype), rhs.astype(dtype)
  num_rows, num_groups, cols = lhs.shape[0], rhs.shape[0], rhs.shape[2]
  if num_rows == 0 or num_groups == 0 or lhs.shape[1] == 0 or cols == 0:
    return jnp.zeros((num_rows, cols), dtype)
  backend = _kernel_backend(interpret)
  if interpret is None:
    interpret = jax.default_backend() == 'cpu'
  block_sizes = block_sizes or BlockSizes.for_backend(backend)
  return _grouped_matmul(lhs, rhs, group_sizes.astype(jnp.int32), backend, interpret, block_sizes)
