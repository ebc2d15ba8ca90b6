"""Tile sizes and the row-tile tables that map each program of a grouped matmul to its group.

Rows of lhs [M, K] are sorted by group: group g owns rows [start_g, end_g) with end_g = start_g + group_sizes[g],
and the rows from sum(group_sizes) to M belong to no group (their output is zero). The kernels cut these rows into
tiles in one of two ways:

  * group-aligned tiles (GPU, Triton): every group is cut from its own first row into tiles of `block_m` rows, the
    last one partial; the ownerless tail is cut the same way as an extra part (index G) whose tiles write zeros.
    A tile never straddles two groups, so programs write disjoint rows and run in any order; rows are read and
    written with masks (Triton loads and stores at any row offset).
  * aligned tiles with work items (TPU, Mosaic): BlockSpecs can only address whole blocks, so M is cut at
    multiples of `block_m` and each (tile, part) pair that overlaps becomes one work item; a tile that straddles
    a group boundary is visited once per part, consecutively, and each visit keeps only its part's rows.

Both tables have a static length (the grid is static) with a bound reached only in the worst case; unused entries
are empty tiles (GPU) or inactive work items (TPU). All tables are int32 and built by XLA from `group_sizes`
inside the jitted op, so they cost a few tiny ops per call.
"""

import dataclasses

import jax
from jax.experimental import pallas as pl
import jax.numpy as jnp

TRITON = 'triton'
MOSAIC = 'mosaic'


@dataclasses.dataclass(frozen=True)
class ProductBlocks:
  """Tiles of one product, in the kernel's own terms.

  grouped product (forward, dlhs): out [M, N] = lhs [M, K] @ w[g] [K, N]; an output tile is [block_m, block_n]
    and the contraction runs block_k at a time.
  transposed product (drhs): out[g] [K, N] = lhs[rows of g]^T @ dout[rows of g]; an output tile is
    [block_k, block_n] and the group's rows are reduced block_m at a time.
  Triton needs powers of two; Mosaic needs block_m a multiple of 16 and block_k, block_n multiples of 128.
  num_warps and num_stages are Triton's (warps per program, software-pipelining depth); Mosaic ignores them.
  """
  block_m: int
  block_n: int
  block_k: int
  num_warps: int = 8
  num_stages: int = 3


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiles of the three products of a grouped matmul and its VJP.

  Attributes:
    forward: out = lhs @ rhs[g].
    dlhs: dlhs = dout @ rhs[g]^T (a grouped product whose contraction is N and whose output columns are K).
    drhs: drhs[g] = lhs[rows of g]^T @ dout[rows of g].
  """
  forward: ProductBlocks
  dlhs: ProductBlocks
  drhs: ProductBlocks

  @classmethod
  def for_backend(cls, backend: str) -> 'BlockSizes':
    if backend == MOSAIC:
      # MXU-sized tiles (untuned: no TPU was available); ~2 MiB of double-buffered VMEM per product.
      grouped = ProductBlocks(block_m=128, block_n=512, block_k=512)
      return cls(forward=grouped, dlhs=grouped, drhs=ProductBlocks(block_m=128, block_n=512, block_k=512))
    # Triton on Hopper, the fastest of experiments/bench_moe.py's sweep on an H200 (BENCHMARKS.md): 128 x 256
    # output tiles, 64-wide contraction slices, 3 stages (144 KiB of shared memory) for the grouped products
    # (K2 gate/up forward: 3.09 ms, 577 TFLOP/s, vs 4.24 ms with 128 x 128 tiles); drhs reduces 32 rows at a time
    # into 128 x 256 tiles, 4 stages (96 KiB).
    grouped = ProductBlocks(block_m=128, block_n=256, block_k=64, num_warps=8, num_stages=3)
    return cls(forward=grouped, dlhs=grouped, drhs=ProductBlocks(block_m=32, block_n=256, block_k=128,
                                                                 num_warps=8, num_stages=4))


def group_bounds(group_sizes: jax.Array, num_rows: int) -> tuple[jax.Array, jax.Array]:
  """[G + 1] first and past-the-end rows of each group, then of the ownerless tail [sum(group_sizes), M).

  Sums past M are clipped to M (jax.lax.ragged_dot requires sum <= M).
  """
  ends = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), num_rows)
  starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
  part_starts = jnp.concatenate([starts, ends[-1:]])
  part_ends = jnp.concatenate([ends, jnp.full((1,), num_rows, jnp.int32)])
  return part_starts, part_ends


def num_row_tiles(num_rows: int, num_groups: int, block_m: int) -> int:
  """Static bound on the tiles (or work items) of either scheme: one per block_m rows plus one per boundary."""
  return pl.cdiv(num_rows, block_m) + num_groups


def group_aligned_tiles(group_sizes: jax.Array, num_rows: int, block_m: int):
  """Tiles that start at each group's first row (GPU scheme).

  Returns three int32 [T] arrays, T = num_row_tiles(M, G, block_m):
    tile_part: the group of the tile, or G for a tile of the ownerless tail (its output rows are zero);
    tile_start, tile_end: the tile's rows [tile_start, tile_end), at most block_m of them; an unused tile has
      tile_start == tile_end == 0.
  """
  num_groups = group_sizes.shape[0]
  part_starts, part_ends = group_bounds(group_sizes, num_rows)
  part_tiles = -(-(part_ends - part_starts) // block_m)
  tile_ends = jnp.cumsum(part_tiles)  # [G + 1] past-the-end tile index of each part
  tiles = jnp.arange(num_row_tiles(num_rows, num_groups, block_m), dtype=jnp.int32)
  part = jnp.minimum(jnp.searchsorted(tile_ends, tiles, side='right').astype(jnp.int32), num_groups)
  used = tiles < tile_ends[-1]
  first_tile = tile_ends[part] - part_tiles[part]
  start = part_starts[part] + (tiles - first_tile) * block_m
  end = jnp.minimum(start + block_m, part_ends[part])
  return part, jnp.where(used, start, 0), jnp.where(used, end, 0)


def aligned_tile_items(group_sizes: jax.Array, num_rows: int, block_m: int):
  """Work items over tiles aligned to multiples of block_m (TPU scheme).

  Returns int32 arrays:
    item_part [W]: the part (group, or G for the ownerless tail) whose rows the item keeps;
    item_tile [W]: the row tile (rows [tile * block_m, (tile + 1) * block_m)).
    Unused items are (part G, last tile), a repeat of the tail's last visit: they change nothing, and the kernels'
    output block stays where it was.
    part_starts, part_ends [G + 1]: row bounds of each part (see group_bounds).
  Items run tile by tile and, within a tile, part by part, so all visits of one output tile are consecutive and
  so are all items of one group.
  """
  num_groups = group_sizes.shape[0]
  part_starts, part_ends = group_bounds(group_sizes, num_rows)
  nonempty = part_ends > part_starts
  first_tile = part_starts // block_m
  last_tile = (part_ends - 1) // block_m
  part_items = jnp.where(nonempty, last_tile - first_tile + 1, 0)
  item_ends = jnp.cumsum(part_items)
  items = jnp.arange(num_row_tiles(num_rows, num_groups, block_m), dtype=jnp.int32)
  part = jnp.minimum(jnp.searchsorted(item_ends, items, side='right').astype(jnp.int32), num_groups)
  used = items < item_ends[-1]
  tile = first_tile[part] + items - (item_ends[part] - part_items[part])
  last_tile_index = pl.cdiv(num_rows, block_m) - 1
  return (jnp.where(used, part, num_groups), jnp.where(used, tile, last_tile_index), part_starts, part_ends)
