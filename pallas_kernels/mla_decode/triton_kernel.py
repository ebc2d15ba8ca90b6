"""MLA decode attention as a Pallas Triton kernel (GPU), which Pallas' interpreter also runs on CPU.

Grid (head blocks, splits, batch): a program takes `block_h` heads of one row and one split of its cache slots,
[split * split_len, (split + 1) * split_len), cut at the row's length, and loops over it `block_s` slots at a time
with the online softmax of FlashAttention-2 (Dao 2023, algorithm 1; exp2 with the scale folded in). A split past
the row's length runs no step, so a row costs the slots it holds, not the cache's size. Loads are masked at the
length (masked slots read as 0, never as the garbage or NaN stored there), so the cache needs no padding to whole
blocks. Every slot is read once per head block: with the default one or two head blocks per row the cache is read
from HBM about once (the second read of a slot, by a neighbouring program, hits L2).

The latent (C) and rope (R) parts of a slot are loaded as power-of-two pieces (Triton's tensors have power-of-two
sides): logits = sum over pieces of q_piece . cache_piece^T, and the output accumulates the latent pieces.
Each program writes its split's normalized output and its base-2 log-sum-exp; ops.py merges the splits.
"""

from __future__ import annotations

import functools
import math

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton
import jax.numpy as jnp

from pallas_kernels.flash_attention.triton_kernel import head_dim_pieces
from pallas_kernels.mla_decode.blocks import BlockSizes

LOG2_E = math.log2(math.e)


def _dot(a, b):
  """a @ b, float32 accumulation."""
  return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_nt(a, b):
  """a @ b^T."""
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _kernel(length_ref, q_ref, cache_ref, out_ref, lse_ref, *, latent_dim: int, block_s: int, split_len: int,
            sm_scale: float):
  """q_ref [block_h, C + R]; cache_ref: the row's whole [S, C + R]; out_ref [block_h, C] float32; lse_ref
  [block_h] (base 2, scaled logits)."""
  latent_pieces = head_dim_pieces(latent_dim)
  rope_pieces = tuple((latent_dim + start, size)
                      for start, size in head_dim_pieces(q_ref.shape[-1] - latent_dim))
  pieces = latent_pieces + rope_pieces
  start = pl.program_id(1) * split_len
  stop = jnp.minimum(start + split_len, length_ref[...])
  num_steps = (jnp.maximum(stop - start, 0) + block_s - 1) // block_s
  q = [q_ref[:, pl.ds(*piece)] for piece in pieces]
  scale_log2 = sm_scale * LOG2_E

  def step(index, carry):
    row_max, row_sum, accumulators = carry
    first = start + index * block_s
    valid = first + jnp.arange(block_s) < stop  # [block_s]
    tiles = [pltriton.load(cache_ref.at[pl.ds(first, block_s), pl.ds(*piece)],
                           mask=jnp.broadcast_to(valid[:, None], (block_s, piece[1])), other=0)
             for piece in pieces]
    logits = _dot_nt(q[0], tiles[0])
    for q_piece, tile in zip(q[1:], tiles[1:]):
      logits += _dot_nt(q_piece, tile)
    logits = jnp.where(valid[None, :], logits, -jnp.inf)
    new_max = jnp.maximum(row_max, jnp.max(logits, axis=1))
    shift = jnp.where(new_max == -jnp.inf, 0.0, new_max * scale_log2)  # never -inf + inf
    correction = jnp.exp2(row_max * scale_log2 - shift)
    probs = jnp.exp2(logits * scale_log2 - shift[:, None])
    row_sum = row_sum * correction + jnp.sum(probs, axis=1)
    probs = probs.astype(cache_ref.dtype)
    accumulators = tuple(acc * correction[:, None] + _dot(probs, tile)
                         for acc, tile in zip(accumulators, tiles[:len(latent_pieces)]))
    return new_max, row_sum, accumulators

  block_h = q_ref.shape[0]
  carry = (jnp.full((block_h,), -jnp.inf, jnp.float32), jnp.zeros((block_h,), jnp.float32),
           tuple(jnp.zeros((block_h, size), jnp.float32) for _, size in latent_pieces))
  row_max, row_sum, accumulators = lax.fori_loop(0, num_steps, step, carry)
  empty = row_sum == 0.0  # a split past the row's length
  safe_sum = jnp.where(empty, 1.0, row_sum)
  for acc, piece in zip(accumulators, latent_pieces):
    out_ref[:, pl.ds(*piece)] = acc / safe_sum[:, None]
  lse_ref[...] = jnp.where(empty, -jnp.inf, row_max * scale_log2 + jnp.log2(safe_sum))


def forward(q, cache, lengths, *, latent_dim: int, sm_scale: float, blocks: BlockSizes, num_splits: int,
            interpret):
  """q [B, H, C + R] (H a multiple of block_h), cache [B, S, C + R], lengths [B] -> per split: out
  [B, splits, H, C] float32 (normalized within the split), lse [B, splits, H] (base 2)."""
  batch, num_heads, dim = q.shape
  num_slots = cache.shape[1]
  block_h, block_s = blocks.block_h, blocks.block_s
  split_len = -(-num_slots // (num_splits * block_s)) * block_s
  return pl.pallas_call(
      functools.partial(_kernel, latent_dim=latent_dim, block_s=block_s, split_len=split_len, sm_scale=sm_scale),
      grid=(num_heads // block_h, num_splits, batch),
      in_specs=[pl.BlockSpec((None, None), lambda h, s, b: (b, 0)),
                pl.BlockSpec((None, block_h, dim), lambda h, s, b: (b, h, 0)),
                pl.BlockSpec((None, num_slots, dim), lambda h, s, b: (b, 0, 0))],
      out_specs=[pl.BlockSpec((None, None, block_h, latent_dim), lambda h, s, b: (b, s, h, 0)),
                 pl.BlockSpec((None, None, block_h), lambda h, s, b: (b, s, h))],
      out_shape=[jax.ShapeDtypeStruct((batch, num_splits, num_heads, latent_dim), jnp.float32),
                 jax.ShapeDtypeStruct((batch, num_splits, num_heads), jnp.float32)],
      compiler_params=pltriton.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
      interpret=interpret,
      name='mla_decode',
  )(lengths[:, None], q, cache)
