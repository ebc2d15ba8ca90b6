"""Tile sizes of the flash-attention kernels, and which tiles of the [T, S] logit plane each program visits.

Both backends cut queries into blocks of `block_q` rows and keys into blocks of `block_k`. A (query block, key
block) tile is
  * skipped when no pair in it is valid (above the causal diagonal, or in a different packed document),
  * "full" when every pair is valid (it runs without building a mask),
  * "masked" otherwise (it builds the [block_q, block_k] mask: causal diagonal, key padding, segment ids).
`visit_ranges` turns that into contiguous block ranges per program, so every kernel loops over
[lo, mid) and [mid, hi) with one mask decision per range instead of per element.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

TRITON = 'triton'
MOSAIC = 'mosaic'
HOPPER = 'hopper'  # Mosaic GPU kernels for H100/H200 (hopper_kernel.py)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes and launch parameters of the three kernels. Triton needs powers of two (>= 16); Mosaic multiples
  of 128 (or the whole, 8-aligned, sequence when it is shorter); Hopper 128 rows per program (two warpgroups of 64)
  on the side each kernel owns, multiples of 64 on the streamed side, and `num_stages` is its ring depth.

  Attributes:
    block_q, block_k: forward: query rows per program, keys per step of its loop.
    block_q_dkv, block_k_dkv: dK/dV kernel: query rows per step of its loop, keys per program.
    block_q_dq, block_k_dq: dQ kernel: query rows per program, keys per step.
    num_warps*, num_stages*: Triton only: warps per program and software-pipelining depth of the kernel's loop.
  """
  block_q: int = 128
  block_k: int = 64
  num_warps: int = 8
  num_stages: int = 4
  block_q_dkv: int = 64
  block_k_dkv: int = 64
  num_warps_dkv: int = 4
  num_stages_dkv: int = 2
  block_q_dq: int = 128
  block_k_dq: int = 64
  num_warps_dq: int = 8
  num_stages_dq: int = 2

  @classmethod
  def for_backend(cls, backend: str, q_len: int, kv_len: int, qk_dim: int = 128, v_dim: int = 128,
                  itemsize: int = 2) -> 'BlockSizes':
    """Defaults per backend and head dims, shrunk to the sequence lengths.

    Triton: the H200 sweep's winners (bf16, BENCHMARKS.md, bench_attention), on B x T x H = 4 x 4096 x 32:
      forward 128 x 64 tiles, 8 warps, 4 stages (3 stages: 8% slower; 64 x 64 with 4 warps: 14-40% slower);
      dK/dV 64 x 64 tiles with 4 warps for qk <= 128, 64 queries x 128 keys with 8 warps for larger qk (qk 192:
        11% faster than 64 x 64, which spills its 64 x 320 float32 accumulators);
      dQ 128 x 64 tiles, 8 warps (64 x 64 with 4 warps: the same time).
    The forward's pipelining depth is cut when its q tile and `num_stages` k/v tiles would not fit in 220 KiB
    of shared memory (larger head dims or float32 inputs). Float32 inputs hold the q tile twice: on an H100
    (2026-12-07) qk 96 / v 64 float32 at 4 stages asked for 262,144 bytes, which is that count exactly.
    """
    if backend == HOPPER:
      # Two compute warpgroups of 64 rows per program; a two-slot ring of streamed tiles. 128-key forward tiles
      # fit shared memory up to qk 128 (qk 192 / v 128: 64-key tiles; 160 KiB).
      return cls(block_q=128, block_k=128 if qk_dim <= 128 else 64, num_stages=2, block_q_dkv=64,
                 block_k_dkv=128, block_q_dq=128, block_k_dq=64)
    if backend == MOSAIC:
      blocks = cls(block_q=128, block_k=128, block_q_dkv=128, block_k_dkv=128, block_q_dq=128, block_k_dq=128)
      return blocks.fit(backend, q_len, kv_len)
    blocks = cls()
    if qk_dim > 128:
      blocks = dataclasses.replace(blocks, block_k_dkv=128, num_warps_dkv=8)
    q_copies = 2 if itemsize == 4 else 1
    forward_bytes = lambda stages: (q_copies * blocks.block_q * qk_dim
                                    + stages * blocks.block_k * (qk_dim + v_dim)) * itemsize
    stages = blocks.num_stages
    while stages > 1 and forward_bytes(stages) > 220 * 1024:
      stages -= 1
    return dataclasses.replace(blocks, num_stages=stages).fit(backend, q_len, kv_len)

  def fit(self, backend: str, q_len: int, kv_len: int) -> 'BlockSizes':
    """These sizes capped to the (rounded-up) sequence lengths, so short sequences are not padded to a tile.
    (Hopper tiles are fixed by its warpgroups: short sequences are padded.)"""
    if backend == HOPPER:
      return self
    q_cap, kv_cap = _largest_block(backend, q_len), _largest_block(backend, kv_len)
    return dataclasses.replace(
        self, block_q=min(self.block_q, q_cap), block_k=min(self.block_k, kv_cap),
        block_q_dkv=min(self.block_q_dkv, q_cap), block_k_dkv=min(self.block_k_dkv, kv_cap),
        block_q_dq=min(self.block_q_dq, q_cap), block_k_dq=min(self.block_k_dq, kv_cap))

  def padded_lengths(self, q_len: int, kv_len: int) -> tuple[int, int]:
    """Query and key lengths rounded up to a multiple of every block that tiles them."""
    q_multiple = math.lcm(self.block_q, self.block_q_dkv, self.block_q_dq)
    kv_multiple = math.lcm(self.block_k, self.block_k_dkv, self.block_k_dq)
    return -(-q_len // q_multiple) * q_multiple, -(-kv_len // kv_multiple) * kv_multiple


def _largest_block(backend: str, length: int) -> int:
  """The largest useful block for a sequence of `length`: one block covering it (Triton: a power of two >= 16;
  Mosaic: a multiple of 8, allowed as a whole-array block), or no cap for sequences longer than one tile."""
  if backend == MOSAIC:
    return -(-length // 8) * 8 if length <= 128 else 1 << 30
  return max(16, 1 << (length - 1).bit_length())


class VisitRanges(NamedTuple):
  """Per-program block ranges, int32.

  by_query: (lo, mid, hi), each [B, num_q_blocks]: a query-block program (forward, dQ) visits key blocks
    [lo, mid) without a mask, then [mid, hi) with one.
  by_key: (lo, mid, hi), each [B, num_k_blocks]: a key-block program (dK/dV) visits query blocks [lo, mid) with a
    mask, then [mid, hi) without one.
  Empty ranges are (0, 0, 0).
  """
  by_query: tuple[jax.Array, jax.Array, jax.Array]
  by_key: tuple[jax.Array, jax.Array, jax.Array]


def visit_ranges(*, q_len: int, kv_len: int, padded_q_len: int, padded_kv_len: int, block_q: int, block_k: int,
                 causal: bool, segment_ids: jax.Array | None, batch: int) -> VisitRanges:
  """Block ranges for one tiling (see the module docstring). segment_ids: [B, T] (T == S) or None.

  With segment ids no tile counts as full (the mask is always built), but tiles whose query and key blocks hold
  disjoint ranges of ids are skipped, so packed short documents cost only the tiles near the diagonal. For ids
  that are not sorted this is still exact, just less selective: blocks between the first and last overlapping one
  are visited and masked.
  """
  num_q_blocks, num_k_blocks = padded_q_len // block_q, padded_kv_len // block_k
  q_start = jnp.arange(num_q_blocks) * block_q
  q_last = jnp.minimum(q_start + block_q, q_len) - 1  # last real query row of the block
  k_start = jnp.arange(num_k_blocks) * block_k
  offset = kv_len - q_len  # causal: query t sees key s iff s <= t + offset
  any_valid = jnp.ones((num_q_blocks, num_k_blocks), bool)
  all_valid = jnp.broadcast_to((k_start + block_k <= kv_len)[None, :], (num_q_blocks, num_k_blocks))
  if causal:
    any_valid = k_start[None, :] <= q_last[:, None] + offset
    all_valid = all_valid & (k_start[None, :] + block_k - 1 <= q_start[:, None] + offset)
  any_valid = jnp.broadcast_to(any_valid, (batch, num_q_blocks, num_k_blocks))
  all_valid = jnp.broadcast_to(all_valid, (batch, num_q_blocks, num_k_blocks))
  if segment_ids is not None:
    big = jnp.iinfo(jnp.int32).max
    ids = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, max(padded_q_len, padded_kv_len) - q_len)))
    real = jnp.arange(ids.shape[1]) < q_len

    def block_range(block, padded):
      blocks = ids[:, :padded].reshape(batch, padded // block, block)
      real_blocks = real[:padded].reshape(padded // block, block)
      return (jnp.min(jnp.where(real_blocks, blocks, big), axis=-1),
              jnp.max(jnp.where(real_blocks, blocks, -big), axis=-1))

    q_min, q_max = block_range(block_q, padded_q_len)
    k_min, k_max = block_range(block_k, padded_kv_len)
    overlap = (q_min[:, :, None] <= k_max[:, None, :]) & (k_min[:, None, :] <= q_max[:, :, None])
    any_valid = any_valid & overlap
    all_valid = jnp.zeros_like(all_valid)
  all_valid = all_valid & any_valid

  def ranges(axis, full_first: bool):
    count = any_valid.shape[axis]
    index = jnp.arange(count).reshape([-1 if a == axis else 1 for a in range(3)])
    has_any = jnp.any(any_valid, axis=axis)
    lo = jnp.min(jnp.where(any_valid, index, count), axis=axis)
    hi = jnp.max(jnp.where(any_valid, index + 1, 0), axis=axis)
    num_full = jnp.sum(all_valid, axis=axis)
    # Full tiles form a prefix of the key range (causal: left of the diagonal) and a suffix of the query range
    # (below it); with segment ids there are none.
    mid = lo + num_full if full_first else hi - num_full
    lo, mid, hi = (jnp.where(has_any, x, 0).astype(jnp.int32) for x in (lo, mid, hi))
    return lo, mid, hi

  return VisitRanges(by_query=ranges(2, full_first=True), by_key=ranges(1, full_first=False))
