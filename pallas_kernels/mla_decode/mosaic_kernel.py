"""MLA decode attention as a Pallas Mosaic kernel (TPU), tested on CPU in TPU interpret mode.

Same maths as triton_kernel.py (read that docstring first). Mosaic runs the grid in order on one core, so the loop
over slots is the last ("arbitrary") grid axis and the running softmax statistics live in VMEM scratch:
grid (batch, head blocks, splits, slot blocks of the split). The lengths are scalar-prefetched into SMEM; a slot
block at or past a row's length is skipped with `pl.when`, and its index map is clamped to the row's last filled
block, so a skipped step re-uses the block already in VMEM instead of fetching one: a row reads only its filled
slots. The last block of a row is masked (slots past the length are zeroed before any product, so NaN garbage
there cannot leak into the output). Exponentials are natural here (the lse is in natural-log units).
"""

from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp

from pallas_kernels.mla_decode.blocks import BlockSizes


def _dot(a, b):
  return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_nt(a, b):
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _last_block(length, block_s: int):
  """Index of a row's last filled slot block (0 for an empty row)."""
  return jnp.maximum((length + block_s - 1) // block_s - 1, 0)


def _kernel(lengths_ref, q_ref, cache_ref, out_ref, lse_ref, max_scratch, sum_scratch, acc_scratch, *,
            latent_dim: int, block_s: int, blocks_per_split: int, sm_scale: float):
  """q_ref [block_h, C + R]; cache_ref [block_s, C + R]; out_ref [block_h, C] float32; lse_ref [block_h, 1]."""
  b, split, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  length = lengths_ref[b]
  first = (split * blocks_per_split + j) * block_s

  @pl.when(j == 0)
  def _():
    max_scratch[...] = jnp.full(max_scratch.shape, -jnp.inf, jnp.float32)
    sum_scratch[...] = jnp.zeros(sum_scratch.shape, jnp.float32)
    acc_scratch[...] = jnp.zeros(acc_scratch.shape, jnp.float32)

  @pl.when(first < length)
  def _():
    valid = first + lax.broadcasted_iota(jnp.int32, (block_s, 1), 0) < length
    tile = jnp.where(valid, cache_ref[...], jnp.zeros((), cache_ref.dtype))
    logits = _dot_nt(q_ref[...], tile) * sm_scale  # [block_h, block_s]
    logits = jnp.where(first + lax.broadcasted_iota(jnp.int32, logits.shape, 1) < length, logits, -jnp.inf)
    row_max = max_scratch[...]
    new_max = jnp.maximum(row_max, jnp.max(logits, axis=1, keepdims=True))  # finite: slot `first` is valid
    correction = jnp.exp(row_max - new_max)
    probs = jnp.exp(logits - new_max)
    sum_scratch[...] = sum_scratch[...] * correction + jnp.sum(probs, axis=1, keepdims=True)
    acc_scratch[...] = acc_scratch[...] * correction + _dot(probs.astype(tile.dtype), tile[:, :latent_dim])
    max_scratch[...] = new_max

  @pl.when(j == pl.num_programs(3) - 1)
  def _():
    row_sum = sum_scratch[...]
    empty = row_sum == 0.0
    safe_sum = jnp.where(empty, 1.0, row_sum)
    out_ref[...] = acc_scratch[...] / safe_sum
    lse_ref[...] = jnp.where(empty, -jnp.inf, max_scratch[...] + jnp.log(safe_sum))


def forward(q, cache, lengths, *, latent_dim: int, sm_scale: float, blocks: BlockSizes, num_splits: int,
            interpret):
  """q [B, H, C + R] (H a multiple of block_h), cache [B, S, C + R], lengths [B] -> per split: out
  [B, splits, H, C] float32 (normalized within the split), lse [B, splits, H] (natural log)."""
  batch, num_heads, dim = q.shape
  num_slots = cache.shape[1]
  block_h, block_s = blocks.block_h, min(blocks.block_s, -(-num_slots // 8) * 8)
  blocks_per_split = -(-num_slots // (num_splits * block_s))

  def cache_index(b, h, s, j, lengths):
    block = jnp.minimum(s * blocks_per_split + j, _last_block(lengths[b], block_s))
    return (b, block, 0)

  out, lse = pl.pallas_call(
      functools.partial(_kernel, latent_dim=latent_dim, block_s=block_s, blocks_per_split=blocks_per_split,
                        sm_scale=sm_scale),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(batch, num_heads // block_h, num_splits, blocks_per_split),
          in_specs=[pl.BlockSpec((None, block_h, dim), lambda b, h, s, j, lengths: (b, h, 0)),
                    pl.BlockSpec((None, block_s, dim), cache_index)],
          out_specs=[pl.BlockSpec((None, None, block_h, latent_dim), lambda b, h, s, j, lengths: (b, s, h, 0)),
                     pl.BlockSpec((None, None, block_h, 1), lambda b, h, s, j, lengths: (b, s, h, 0))],
          scratch_shapes=[pltpu.VMEM((block_h, 1), jnp.float32), pltpu.VMEM((block_h, 1), jnp.float32),
                          pltpu.VMEM((block_h, latent_dim), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct((batch, num_splits, num_heads, latent_dim), jnp.float32),
                 jax.ShapeDtypeStruct((batch, num_splits, num_heads, 1), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=('parallel', 'parallel', 'parallel', 'arbitrary')),
      interpret=interpret,
      name='mla_decode',
  )(lengths, q, cache)
  return out, lse[..., 0]
