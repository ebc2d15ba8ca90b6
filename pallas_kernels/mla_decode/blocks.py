"""Tile sizes of the MLA decode kernels and how the cache slots are split between programs."""

from __future__ import annotations

import dataclasses

TRITON = 'triton'
MOSAIC = 'mosaic'

# Programs a GPU launch aims for: a few per multiprocessor (the H200 has 132), so that a small batch still reads
# the cache with every multiprocessor and a ragged one is balanced by the scheduler.
_GPU_PROGRAMS = 4 * 132
# Each split writes, and the merge reads back, a float32 [H, C] partial output: splits are capped so that this
# traffic stays under a quarter of the cache bytes a row reads.
_MAX_PARTIAL_TRAFFIC = 0.25


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiles and launch parameters.

  Attributes:
    block_h: query heads per program (Triton: a power of two >= 16; the op pads the heads to a multiple).
    block_s: cache slots per step of a program's loop (Triton: a power of two >= 16; Mosaic: a multiple of 8).
    num_splits: programs per row along the slots (split-K; their partial outputs are merged with their
      log-sum-exps); None picks enough to fill the chip.
    num_warps, num_stages: Triton only: warps per program and software-pipelining depth of its loop.
  """
  block_h: int = 16
  block_s: int = 64
  num_splits: int | None = None
  num_warps: int = 4
  num_stages: int = 3

  @classmethod
  def for_backend(cls, backend: str, num_heads: int, latent_dim: int, itemsize: int = 2,
                  batch: int = 64) -> 'BlockSizes':
    """Defaults per backend. Triton, from the H200 sweeps (BENCHMARKS.md, bench_sample's kernel section):
      k2_small (16 heads): one program of 4 warps per row and split, 64-slot steps;
      K2 (64 heads, latent 512), batch >= 32, bf16: all 64 heads in one program of 8 warps, so each slot is read
        once rather than once per 16-head block (batch 64: 1.34x faster than 16-head programs); in float32 its
        query and two stages of slots exceed the 227 KiB of shared memory;
      K2 at small batches: 16-head programs over 32-slot steps (batch 1: four times the programs, 1.5x faster than
        64-head ones).
    Mosaic: every head in one program (the MXU wants tall tiles) and 128-slot steps."""
    if backend == MOSAIC:
      return cls(block_h=num_heads, block_s=128, num_splits=1)
    heads = max(16, 1 << (num_heads - 1).bit_length())
    if latent_dim >= 512:
      if heads >= 64 and itemsize <= 2 and batch >= 32:
        return cls(block_h=64, block_s=64, num_warps=8, num_stages=2)
      return cls(block_h=16, block_s=32, num_warps=4, num_stages=3)
    return cls(block_h=min(heads, 64), block_s=64, num_warps=4, num_stages=3)

  def splits(self, batch: int, num_heads: int, latent_dim: int, num_slots: int) -> int:
    """num_splits, or (None) enough splits for about _GPU_PROGRAMS programs, at most one per slot block and few
    enough that the partial outputs cost under _MAX_PARTIAL_TRAFFIC of the cache read."""
    blocks = -(-num_slots // self.block_s)
    if self.num_splits is not None:
      return max(1, min(self.num_splits, blocks))
    wanted = -(-_GPU_PROGRAMS // (batch * (num_heads // self.block_h)))
    cache_bytes = num_slots * latent_dim * 2  # about: bf16 latent part
    partial_bytes = num_heads * latent_dim * 4 * 2  # float32, written then read
    traffic_cap = int(_MAX_PARTIAL_TRAFFIC * cache_bytes / partial_bytes)
    return max(1, min(wanted, blocks, traffic_cap))
