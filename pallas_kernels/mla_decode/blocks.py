"""Tile sizes of the MLA decode kernels and how the cache slots are split between programs."""

from __future__ import annotations

import dataclasses

TRITON = 'triton'
MOSAIC = 'mosaic'

# Programs a GPU launch aims for: a few per multiprocessor (the H200 has 132), so that a small batch still reads
# the cache with every multiprocessor and a ragged one is balanced by the scheduler.
_GPU_PROGRAMS = 4 * 132


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
  def for_backend(cls, backend: str, num_heads: int, latent_dim: int) -> 'BlockSizes':
    """Defaults per backend. Triton: 16 heads per program for a latent of 512 (K2: the [block_h, C] float32
    accumulator and the [block_h, C + R] query stay in registers), up to 64 for smaller latents. Mosaic: every
    head in one program (the MXU wants tall tiles) and 128-slot steps."""
    if backend == MOSAIC:
      return cls(block_h=num_heads, block_s=128, num_splits=1)
    heads = max(16, 1 << (num_heads - 1).bit_length())
    return cls(block_h=min(heads, 16 if latent_dim >= 512 else 64), block_s=64, num_warps=4, num_stages=3)

  def splits(self, batch: int, num_head_blocks: int, num_slots: int) -> int:
    """num_splits, or (None) enough splits for about _GPU_PROGRAMS programs, at most one per slot block."""
    if self.num_splits is not None:
      return max(1, min(self.num_splits, -(-num_slots // self.block_s)))
    wanted = -(-_GPU_PROGRAMS // (batch * num_head_blocks))
    return max(1, min(wanted, -(-num_slots // self.block_s)))
