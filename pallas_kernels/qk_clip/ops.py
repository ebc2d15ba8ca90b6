"""QK-Clip rescale kernel: weight [..., H, K] * scales [H, K], written over the input buffer.

The weight is viewed as a [rows, H*K] matrix and processed in [block_rows, block_cols] tiles, each multiplied by
its slice of the per-column scales in float32. `input_output_aliases` makes the output reuse the weight's buffer,
so under jit with a donated weight no second copy of a (K2-sized: 1536 x 12288) projection is allocated. QK-Clip is
applied outside autodiff, so there is no custom_vjp. Backends: Triton on GPU, Mosaic on TPU, the interpreter on
CPU (plain, or TPU interpret mode with `interpret=pltpu.InterpretParams()`).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Largest tile tried per axis; the op takes the biggest power-of-two divisor of the dimension up to this (or
  the whole dimension when none divides)."""
  block_rows: int = 256
  block_cols: int = 512


def _block(size: int, limit: int, minimum: int) -> int:
  block = limit
  while block >= minimum:
    if size % block == 0:
      return block
    block //= 2
  return size


def _rescale_kernel(weight_ref, scale_ref, out_ref):
  out_ref[...] = (weight_ref[...].astype(jnp.float32) * scale_ref[...]).astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=('interpret', 'block_sizes'), donate_argnums=(0,))
def rescale_heads(weight: jax.Array, scales: jax.Array, *, interpret=None,
                  block_sizes: BlockSizes = BlockSizes()) -> jax.Array:
  """weight [..., H, K] * scales [H, K] -> same shape and dtype as weight (the weight's buffer is reused)."""
  if weight.shape[-2:] != scales.shape:
    raise ValueError(f'scales {scales.shape} do not match the head axes of weight {weight.shape}')
  if interpret is None:
    interpret = jax.default_backend() == 'cpu'
  shape = weight.shape
  rows, cols = math.prod(shape[:-2]), shape[-2] * shape[-1]
  matrix = weight.reshape(rows, cols)
  column_scales = scales.astype(jnp.float32).reshape(1, cols)
  if jax.default_backend() == 'gpu' and not interpret:
    # Triton blocks must be powers of two: pad odd sides up to a whole number of blocks (K2's sides need none).
    block_rows = min(block_sizes.block_rows, pl.next_power_of_2(rows))
    block_cols = min(block_sizes.block_cols, pl.next_power_of_2(cols))
  else:
    # Mosaic tiles are multiples of (8, 128) or whole dimensions.
    block_rows = _block(rows, block_sizes.block_rows, 8)
    block_cols = _block(cols, block_sizes.block_cols, 128)
  padded_rows, padded_cols = -(-rows // block_rows) * block_rows, -(-cols // block_cols) * block_cols
  if (padded_rows, padded_cols) != (rows, cols):
    matrix = jnp.pad(matrix, ((0, padded_rows - rows), (0, padded_cols - cols)))
    column_scales = jnp.pad(column_scales, ((0, 0), (0, padded_cols - cols)))
  compiler_params = None
  if jax.default_backend() == 'tpu' or isinstance(interpret, pltpu.InterpretParams):
    compiler_params = pltpu.CompilerParams(dimension_semantics=('parallel', 'parallel'))
  out = pl.pallas_call(
      _rescale_kernel,
      out_shape=jax.ShapeDtypeStruct(matrix.shape, matrix.dtype),
      grid=(padded_rows // block_rows, padded_cols // block_cols),
      in_specs=[pl.BlockSpec((block_rows, block_cols), lambda i, j: (i, j)),
                pl.BlockSpec((1, block_cols), lambda i, j: (0, j))],
      out_specs=pl.BlockSpec((block_rows, block_cols), lambda i, j: (i, j)),
      input_output_aliases={0: 0},
      compiler_params=compiler_params,
      interpret=interpret,
      name='qk_clip_rescale',
  )(matrix, column_scales)
  out = out[:rows, :cols]
  return out.reshape(shape)
