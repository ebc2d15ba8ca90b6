"""Flash attention for Hopper GPUs (H100/H200) as Pallas Mosaic GPU kernels: wgmma, TMA, warp specialization.

Same contract as triton_kernel.py (padded inputs; lse in base 2 of the scaled logits, +inf for a row that sees no
key; row_max in scaled logits, -inf likewise), with the FlashAttention-3 structure (Shah et al. 2024):

  * every program (CTA) runs three warpgroups: two compute warpgroups of 64 rows each, and a memory warpgroup
    that streams the other side's tiles through a ring of `slots` shared-memory buffers with TMA copies. Each
    ring slot has a `ready` barrier per buffer (the copy landed) and a `free` barrier (both compute
    warpgroups are done with it; the forward frees K and V separately);
  * forward: grid (heads, query blocks of 128, batch), heaviest causal blocks first. The two compute warpgroups
    take turns on the tensor cores through a shared `turn` barrier (one's softmax overlaps the other's q.k^T and
    P.V), FA3's ping-pong schedule;
  * dK/dV: grid (query heads, key blocks of 128, batch): each compute warpgroup owns 64 keys and loops over the
    query blocks (q, dO, lse, delta streamed); dQ: grid (heads, query blocks of 128, batch), keys streamed.
    Seven products per tile, as in the Triton backward (no dQ atomics).

Which tiles each program visits comes from blocks.visit_ranges (causal and packed-document skipping) at the
program's granularity; inside it each warpgroup trims the range to its own causal diagonal. Masked logits are a
large finite negative (not -inf), so a row whose first tiles are all masked carries harmless junk that the first
valid tile's correction factor exp2(MASKED - max) = 0 wipes out; a row that never sees a key ends with max ==
MASKED and is written as empty.

Needs: bfloat16/float16 inputs and head dims up to 256 (the op pads them to multiples of 64 and the sequences to
the tiles). On anything else the op uses the Triton kernels.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import jax.numpy as jnp

from pallas_kernels.flash_attention.blocks import BlockSizes

LOG2_E = math.log2(math.e)
ROWS = 64  # rows per compute warpgroup: one wgmma's M
WARPGROUPS = 2  # compute warpgroups per program
MASKED = -1e30  # logit (in exp2 units) of a masked pair
HEAD_DIM_MULTIPLE = 64  # wgmma tiles: the op pads head dims to this


def supported(q: jax.Array, k: jax.Array, v: jax.Array) -> bool:
  """Whether these (unpadded) inputs can run on the Hopper kernels of the default GPU."""
  if jax.default_backend() != 'gpu':
    return False
  capability = getattr(jax.devices()[0], 'compute_capability', '0')
  if not str(capability).startswith('9'):
    return False
  dtypes = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  same_dtype = q.dtype == k.dtype == v.dtype and q.dtype in dtypes
  return same_dtype and q.shape[-1] <= 256 and v.shape[-1] <= 256


def _smem(shape, dtype):
  """A shared-memory buffer laid out for wgmma and TMA (8 x 64 tiles, 128-byte swizzle)."""
  return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))


def _row_layout(axis: int):
  """Layout of a vector broadcast along `axis` of a wgmma accumulator: axis 1 = one value per row."""
  return plgpu.Layout.WGMMA.reduce(axis)


def _zeros(shape):
  return plgpu.layout_cast(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA)


def _full_vector(n, value, axis):
  return plgpu.layout_cast(jnp.full((n,), value, jnp.float32), _row_layout(axis))


def _bcast(vector, shape, dim):
  return lax.broadcast_in_dim(vector, shape, [dim])


def _matmul(a, b, shape):
  """a @ b into a fresh float32 accumulator of `shape` (a in registers or shared memory, b in shared memory)."""
  def scope(acc_ref):
    plgpu.wgmma(acc_ref, a, b)
    return acc_ref[...]
  return pl.run_scoped(scope, plgpu.ACC(shape, jnp.float32))


def _accumulate(acc, a, b):
  """acc + a @ b."""
  return pl.run_state(lambda acc_ref: plgpu.wgmma(acc_ref, a, b))(plgpu.ACC.init(acc))


def _valid(problem, queries, keys, query_ids, key_ids, shape, query_axis: int):
  """`Problem.valid` for a tile: queries/keys are int32 position arrays of `shape`; the ids are vectors (one per
  query / key, along their axis) or None, broadcast explicitly (wgmma register layouts do not broadcast)."""
  if problem.segmented:
    query_ids, key_ids = _bcast(query_ids, shape, query_axis), _bcast(key_ids, shape, 1 - query_axis)
  return problem.valid(queries, keys, query_ids, key_ids)


def _iota(shape, dim, start):
  return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA) + start


def _range(range_ref, batch, block):
  return range_ref[batch, block, 0], range_ref[batch, block, 1], range_ref[batch, block, 2]


class _Dims(NamedTuple):
  batch: int
  q_len: int
  num_heads: int
  qk_dim: int
  kv_len: int
  num_kv_heads: int
  v_dim: int
  group: int  # query heads per key head


def _dims(q, k, v) -> _Dims:
  batch, q_len, num_heads, qk_dim = q.shape
  return _Dims(batch, q_len, num_heads, qk_dim, k.shape[1], k.shape[2], v.shape[-1], num_heads // k.shape[2])


def _with_ids(body, segmented: bool, position: int):
  """The kernel entry for `body(*refs[:position], q_ids_ref, kv_ids_ref, *rest)`: the id refs are operands only
  when `segmented`; otherwise body gets None for them."""
  def entry(*refs):
    if segmented:
      return body(*refs)
    return body(*refs[:position], None, None, *refs[position:])
  return entry


def _stack_ranges(ranges):
  """(lo, mid, hi), each [B, N] -> [B, N, 3] int32 (one scalar-readable table)."""
  return jnp.stack(ranges, axis=-1).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------------- forward


def forward(q, k, v, q_ids, kv_ids, by_query, *, problem, blocks: BlockSizes, interpret):
  """Padded inputs -> out [B, T, H, V], lse [B, H, T] (base 2), row_max [B, H, T] (scaled logits)."""
  del interpret  # compiled only
  batch, q_len, num_heads, qk_dim, _, _, v_dim, group = _dims(q, k, v)
  block_k, slots = blocks.block_k, blocks.num_stages
  assert blocks.block_q == WARPGROUPS * ROWS, blocks
  num_q_blocks = q_len // blocks.block_q
  scale_log2 = problem.sm_scale * LOG2_E
  offset = problem.kv_len - problem.q_len
  segmented = problem.segmented
  dtype = q.dtype

  def body(q_ref, k_ref, v_ref, q_ids_ref, kv_ids_ref, range_ref, out_ref, lse_ref, row_max_ref, scratch):
    (q_smem, o_smem, k_smem, v_smem, q_ids_smem, kv_ids_smem, lse_smem, max_smem), ready, free, turn = scratch
    q_ready, k_ready, v_ready, ids_ready = ready
    k_free, v_free = free
    b, h, wg = lax.axis_index('batch'), lax.axis_index('heads'), lax.axis_index('wg')
    block = num_q_blocks - 1 - lax.axis_index('q_blocks')  # heaviest first
    lo, mid, hi = _range(range_ref, b, block)

    def take_turn():
      plgpu.barrier_arrive(turn)
      plgpu.barrier_wait(turn)

    @pl.when(wg < WARPGROUPS)
    def _compute():
      plgpu.set_max_registers(232, action='increase')
      row0 = block * blocks.block_q + wg * ROWS
      rows = pl.ds(row0, ROWS)
      plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h], q_smem.at[wg], q_ready.at[wg])
      if segmented:
        plgpu.copy_gmem_to_smem(q_ids_ref.at[b, rows], q_ids_smem.at[wg], q_ready.at[WARPGROUPS + wg])
        plgpu.barrier_wait(q_ready.at[WARPGROUPS + wg])
      plgpu.barrier_wait(q_ready.at[wg])
      row_ids = plgpu.load(q_ids_smem.at[wg], layout=_row_layout(1)) if segmented else None
      my_hi = hi
      if problem.causal:  # this warpgroup's last key block is at its own diagonal
        my_hi = jnp.maximum(jnp.minimum(hi, lax.div(row0 + ROWS + offset + block_k - 1, block_k)), mid)

      def step(j, carry, masked: bool):
        acc, row_max, row_sum = carry
        slot = lax.rem(j - lo, slots)
        plgpu.barrier_wait(k_ready.at[slot])
        col_ids = None
        if segmented:
          plgpu.barrier_wait(ids_ready.at[slot])
          col_ids = plgpu.load(kv_ids_smem.at[slot], layout=_row_layout(0))

        def qk(acc_ref):
          plgpu.wgmma(acc_ref, q_smem.at[wg], k_smem.at[slot].transpose((1, 0)))
          take_turn()
          return acc_ref[...]
        logits = pl.run_scoped(qk, plgpu.ACC((ROWS, block_k), jnp.float32)) * scale_log2
        plgpu.barrier_arrive(k_free.at[slot])
        if masked:
          shape = (ROWS, block_k)
          valid = _valid(problem, _iota(shape, 0, row0), _iota(shape, 1, j * block_k), row_ids, col_ids, shape, 0)
          logits = jnp.where(valid, logits, MASKED)
        new_max = jnp.maximum(row_max, logits.max(axis=1))
        correction = jnp.exp2(row_max - new_max)
        probs = jnp.exp2(logits - _bcast(new_max, logits.shape, 0))
        acc = acc * _bcast(correction, acc.shape, 0)
        row_sum = row_sum * correction + probs.sum(axis=1)
        probs = probs.astype(dtype)
        plgpu.barrier_arrive(turn)  # softmax done: the other warpgroup may use the tensor cores
        plgpu.barrier_wait(v_ready.at[slot])
        plgpu.barrier_wait(turn)
        acc = _accumulate(acc, probs, v_smem.at[slot])
        plgpu.barrier_arrive(v_free.at[slot])
        return acc, new_max, row_sum

      def skip(j, _):  # a key block of the program's range that is past this warpgroup's diagonal
        slot = lax.rem(j - lo, slots)
        plgpu.barrier_arrive(k_free.at[slot])
        plgpu.barrier_arrive(v_free.at[slot])
        take_turn()
        take_turn()

      carry = (_zeros((ROWS, v_dim)), _full_vector(ROWS, MASKED, 1), _full_vector(ROWS, 0.0, 1))
      pl.when(wg == 1)(take_turn)
      carry = lax.fori_loop(lo, mid, functools.partial(step, masked=False), carry)
      acc, row_max, row_sum = lax.fori_loop(mid, my_hi, functools.partial(step, masked=True), carry)
      lax.fori_loop(my_hi, hi, skip, None)
      pl.when(wg == 0)(take_turn)

      empty = row_max <= 0.5 * MASKED
      safe_sum = jnp.where(empty, 1.0, row_sum)
      inverse = jnp.where(empty, 0.0, 1.0 / safe_sum)
      o_smem.at[wg][...] = (acc * _bcast(inverse, acc.shape, 0)).astype(dtype)
      lse_smem.at[wg][...] = jnp.where(empty, jnp.inf, row_max + jnp.log2(safe_sum))
      max_smem.at[wg][...] = jnp.where(empty, -jnp.inf, row_max * (1.0 / LOG2_E))
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(o_smem.at[wg], out_ref.at[b, rows, h], commit_group=False)
      plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, h, rows], commit_group=False)
      plgpu.copy_smem_to_gmem(max_smem.at[wg], row_max_ref.at[b, h, rows], commit_group=False)
      plgpu.commit_smem_to_gmem_group()
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == WARPGROUPS)
    def _memory():
      plgpu.set_max_registers(40, action='decrease')
      kv_head = lax.div(h, group)

      def load(j, slot, wait: bool):
        keys = pl.ds(j * block_k, block_k)
        if wait:
          plgpu.barrier_wait(k_free.at[slot])
        plgpu.copy_gmem_to_smem(k_ref.at[b, keys, kv_head], k_smem.at[slot], k_ready.at[slot])
        if segmented:
          plgpu.copy_gmem_to_smem(kv_ids_ref.at[b, keys], kv_ids_smem.at[slot], ids_ready.at[slot])
        if wait:
          plgpu.barrier_wait(v_free.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[b, keys, kv_head], v_smem.at[slot], v_ready.at[slot])

      for slot in range(slots):
        pl.when(lo + slot < hi)(functools.partial(load, lo + slot, slot, False))

      @pl.loop(lo + slots, jnp.maximum(hi, lo + slots))
      def _(j):
        load(j, lax.rem(j - lo, slots), True)

  def entry(q_ref, k_ref, v_ref, q_ids_ref, kv_ids_ref, range_ref, *outs):
    buffers = (_smem((WARPGROUPS, ROWS, qk_dim), dtype), _smem((WARPGROUPS, ROWS, v_dim), dtype),
               _smem((slots, block_k, qk_dim), dtype), _smem((slots, block_k, v_dim), dtype),
               plgpu.SMEM((WARPGROUPS, ROWS), jnp.int32) if segmented else None,
               plgpu.SMEM((slots, block_k), jnp.int32) if segmented else None,
               plgpu.SMEM((WARPGROUPS, ROWS), jnp.float32), plgpu.SMEM((WARPGROUPS, ROWS), jnp.float32))
    ready = (plgpu.Barrier(num_barriers=2 * WARPGROUPS), plgpu.Barrier(num_barriers=slots),
             plgpu.Barrier(num_barriers=slots), plgpu.Barrier(num_barriers=slots))
    free = (plgpu.Barrier(num_arrivals=WARPGROUPS, num_barriers=slots),) * 2
    pl.run_scoped(lambda *scratch: body(q_ref, k_ref, v_ref, q_ids_ref, kv_ids_ref, range_ref, *outs, scratch),
                  buffers, ready, free, plgpu.Barrier(num_arrivals=WARPGROUPS), collective_axes='wg')

  operands = [q, k, v] + ([q_ids, kv_ids] if segmented else []) + [_stack_ranges(by_query)]
  rows_type = jax.ShapeDtypeStruct((batch, num_heads, q_len), jnp.float32)
  return plgpu.kernel(
      _with_ids(entry, segmented, 3),
      out_type=[jax.ShapeDtypeStruct((batch, q_len, num_heads, v_dim), dtype), rows_type, rows_type],
      grid=(num_heads, num_q_blocks, batch),
      grid_names=('heads', 'q_blocks', 'batch'),
      num_threads=WARPGROUPS + 1,
      thread_name='wg',
      compiler_params=plgpu.CompilerParams(approx_math=True),
  )(*operands)


# ---------------------------------------------------------------------------------------------------- backward


def _stream(memory_refs, smem, ready, free, lo, hi, slots: int):
  """The memory warpgroup's loop: copies block j of every (gmem view, its block -> ref) of `memory_refs` into
  ring slot (j - lo) % slots for j in [lo, hi), waiting for the slot's `free` barrier before reusing it."""
  def load(j, slot, wait: bool):
    if wait:
      plgpu.barrier_wait(free.at[slot])
    for (source, block_ref), buffer, barrier in zip(memory_refs, smem, ready):
      plgpu.copy_gmem_to_smem(block_ref(source, j), buffer.at[slot], barrier.at[slot])

  for slot in range(slots):
    pl.when(lo + slot < hi)(functools.partial(load, lo + slot, slot, False))

  @pl.loop(lo + slots, jnp.maximum(hi, lo + slots))
  def _(j):
    load(j, lax.rem(j - lo, slots), True)


def _backward_call(body, buffers, ring_buffers, operands, out_type, grid, grid_names, slots):
  """Launches a backward kernel: `body(*refs, own_buffers, ring_buffers, own_ready, ring_ready, free)`.
  own buffers are per compute warpgroup (loaded once), ring buffers are streamed by the memory warpgroup."""
  def entry(*refs):
    pl.run_scoped(
        lambda own, ring, own_ready, ring_ready, free: body(*refs, own, ring, own_ready, ring_ready, free),
        buffers, ring_buffers,
        tuple(plgpu.Barrier(num_barriers=WARPGROUPS) if b is not None else None for b in buffers),
        tuple(plgpu.Barrier(num_barriers=slots) if b is not None else None for b in ring_buffers),
        plgpu.Barrier(num_arrivals=WARPGROUPS, num_barriers=slots),
        collective_axes='wg')

  return plgpu.kernel(entry, out_type=out_type, grid=grid, grid_names=grid_names, num_threads=WARPGROUPS + 1,
                      thread_name='wg', compiler_params=plgpu.CompilerParams(approx_math=True))(*operands)


def _load_own(copies, buffers, barriers, wg):
  """A compute warpgroup's once-per-program copies (gmem view -> its buffers), then waits for all of them."""
  for source, buffer, barrier in zip(copies, buffers, barriers):
    if buffer is not None:
      plgpu.copy_gmem_to_smem(source, buffer.at[wg], barrier.at[wg])
  for buffer, barrier in zip(buffers, barriers):
    if buffer is not None:
      plgpu.barrier_wait(barrier.at[wg])


def _dkv(q, k, v, q_ids, kv_ids, lse, delta, d_out, by_key, *, problem, blocks: BlockSizes):
  """dK, dV per query head ([B, S, H, K/V]): each compute warpgroup owns 64 keys; query blocks are streamed."""
  batch, _, num_heads, qk_dim, kv_len, _, v_dim, group = _dims(q, k, v)
  block_q, slots = blocks.block_q_dkv, blocks.num_stages
  assert blocks.block_k_dkv == WARPGROUPS * ROWS, blocks
  num_k_blocks = kv_len // blocks.block_k_dkv
  scale_log2 = problem.sm_scale * LOG2_E
  offset = problem.kv_len - problem.q_len
  segmented, dtype = problem.segmented, q.dtype

  def body(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_ids_ref, kv_ids_ref, range_ref, dk_ref, dv_ref,
           own, ring, own_ready, ring_ready, free):
    k_smem, v_smem, key_ids_smem = own
    q_smem, do_smem, lse_smem, delta_smem, query_ids_smem = ring
    q_ready, do_ready, lse_ready, delta_ready, ids_ready = ring_ready
    b, h, wg = lax.axis_index('batch'), lax.axis_index('heads'), lax.axis_index('wg')
    block = lax.axis_index('k_blocks')
    lo, mid, hi = _range(range_ref, b, block)

    @pl.when(wg < WARPGROUPS)
    def _compute():
      plgpu.set_max_registers(232, action='increase')
      row0 = block * blocks.block_k_dkv + wg * ROWS
      keys = pl.ds(row0, ROWS)
      kv_head = lax.div(h, group)
      _load_own((k_ref.at[b, keys, kv_head], v_ref.at[b, keys, kv_head],
                 kv_ids_ref.at[b, keys] if segmented else None), own, own_ready, wg)
      key_ids = plgpu.load(key_ids_smem.at[wg], layout=_row_layout(1)) if segmented else None
      my_lo = lo
      if problem.causal:  # this warpgroup's first query block is at its own diagonal
        my_lo = jnp.minimum(jnp.maximum(lo, lax.div(jnp.maximum(row0 - offset, 0), block_q)), mid)

      def step(i, carry, masked: bool):
        dk, dv = carry
        slot = lax.rem(i - lo, slots)
        plgpu.barrier_wait(q_ready.at[slot])
        plgpu.barrier_wait(lse_ready.at[slot])
        logits_t = _matmul(k_smem.at[wg], q_smem.at[slot].transpose((1, 0)), (ROWS, block_q)) * scale_log2
        lse = plgpu.load(lse_smem.at[slot], layout=_row_layout(0))
        probs_t = jnp.exp2(logits_t - _bcast(lse, logits_t.shape, 1))
        if segmented:  # waited every step, so the barrier's phase stays in step with the ring
          plgpu.barrier_wait(ids_ready.at[slot])
        if masked:
          shape = (ROWS, block_q)
          query_ids = plgpu.load(query_ids_smem.at[slot], layout=_row_layout(0)) if segmented else None
          valid = _valid(problem, _iota(shape, 1, i * block_q), _iota(shape, 0, row0), query_ids, key_ids, shape, 1)
          probs_t = jnp.where(valid, probs_t, 0.0)
        plgpu.barrier_wait(do_ready.at[slot])

        def dv_and_dprobs(refs):
          dv_ref_, dprobs_ref = refs
          plgpu.wgmma(dv_ref_, probs_t.astype(dtype), do_smem.at[slot])
          plgpu.wgmma(dprobs_ref, v_smem.at[wg], do_smem.at[slot].transpose((1, 0)))
        dv, dprobs_t = pl.run_state(dv_and_dprobs)((plgpu.ACC.init(dv), plgpu.ACC.init(_zeros((ROWS, block_q)))))
        plgpu.barrier_wait(delta_ready.at[slot])
        delta = plgpu.load(delta_smem.at[slot], layout=_row_layout(0))
        dlogits_t = probs_t * (dprobs_t - _bcast(delta, dprobs_t.shape, 1))
        dk = _accumulate(dk, dlogits_t.astype(dtype), q_smem.at[slot])
        plgpu.barrier_arrive(free.at[slot])
        return dk, dv

      def skip(i, _):  # a query block before this warpgroup's diagonal: keep the ring's barriers in step
        slot = lax.rem(i - lo, slots)
        for barrier in ring_ready:
          if barrier is not None:
            plgpu.barrier_wait(barrier.at[slot])
        plgpu.barrier_arrive(free.at[slot])

      lax.fori_loop(lo, my_lo, skip, None)
      carry = (_zeros((ROWS, qk_dim)), _zeros((ROWS, v_dim)))
      carry = lax.fori_loop(my_lo, mid, functools.partial(step, masked=True), carry)
      dk, dv = lax.fori_loop(mid, hi, functools.partial(step, masked=False), carry)
      k_smem.at[wg][...] = (dk * problem.sm_scale).astype(dtype)
      v_smem.at[wg][...] = dv.astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(k_smem.at[wg], dk_ref.at[b, keys, h], commit_group=False)
      plgpu.copy_smem_to_gmem(v_smem.at[wg], dv_ref.at[b, keys, h], commit_group=False)
      plgpu.commit_smem_to_gmem_group()
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == WARPGROUPS)
    def _memory():
      plgpu.set_max_registers(40, action='decrease')
      rows = lambda i: pl.ds(i * block_q, block_q)
      sources = [(q_ref, lambda r, i: r.at[b, rows(i), h]), (do_ref, lambda r, i: r.at[b, rows(i), h]),
                 (lse_ref, lambda r, i: r.at[b, h, rows(i)]), (delta_ref, lambda r, i: r.at[b, h, rows(i)])]
      if segmented:
        sources.append((q_ids_ref, lambda r, i: r.at[b, rows(i)]))
      _stream(sources, ring, ring_ready, free, lo, hi, slots)

  own = (_smem((WARPGROUPS, ROWS, qk_dim), dtype), _smem((WARPGROUPS, ROWS, v_dim), dtype),
         plgpu.SMEM((WARPGROUPS, ROWS), jnp.int32) if segmented else None)
  ring = (_smem((slots, block_q, qk_dim), dtype), _smem((slots, block_q, v_dim), dtype),
          plgpu.SMEM((slots, block_q), jnp.float32), plgpu.SMEM((slots, block_q), jnp.float32),
          plgpu.SMEM((slots, block_q), jnp.int32) if segmented else None)
  operands = [q, k, v, d_out, lse, delta] + ([q_ids, kv_ids] if segmented else []) + [_stack_ranges(by_key)]
  out_type = [jax.ShapeDtypeStruct((batch, kv_len, num_heads, qk_dim), dtype),
              jax.ShapeDtypeStruct((batch, kv_len, num_heads, v_dim), dtype)]
  return _backward_call(_with_ids(body, segmented, 6), own, ring, operands, out_type,
                        grid=(num_heads, num_k_blocks, batch),
                        grid_names=('heads', 'k_blocks', 'batch'), slots=slots)


def _dq(q, k, v, q_ids, kv_ids, lse, delta, d_out, by_query, *, problem, blocks: BlockSizes):
  """dQ: each compute warpgroup owns 64 queries; key blocks are streamed."""
  batch, q_len, num_heads, qk_dim, _, _, v_dim, group = _dims(q, k, v)
  block_k, slots = blocks.block_k_dq, blocks.num_stages
  assert blocks.block_q_dq == WARPGROUPS * ROWS, blocks
  num_q_blocks = q_len // blocks.block_q_dq
  scale_log2 = problem.sm_scale * LOG2_E
  offset = problem.kv_len - problem.q_len
  segmented, dtype = problem.segmented, q.dtype

  def body(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_ids_ref, kv_ids_ref, range_ref, dq_ref,
           own, ring, own_ready, ring_ready, free):
    q_smem, do_smem, lse_smem, delta_smem, query_ids_smem = own
    k_smem, v_smem, key_ids_smem = ring
    k_ready, v_ready, ids_ready = ring_ready
    b, h, wg = lax.axis_index('batch'), lax.axis_index('heads'), lax.axis_index('wg')
    block = num_q_blocks - 1 - lax.axis_index('q_blocks')
    lo, mid, hi = _range(range_ref, b, block)

    @pl.when(wg < WARPGROUPS)
    def _compute():
      plgpu.set_max_registers(232, action='increase')
      row0 = block * blocks.block_q_dq + wg * ROWS
      rows = pl.ds(row0, ROWS)
      _load_own((q_ref.at[b, rows, h], do_ref.at[b, rows, h], lse_ref.at[b, h, rows], delta_ref.at[b, h, rows],
                 q_ids_ref.at[b, rows] if segmented else None), own, own_ready, wg)
      lse = plgpu.load(lse_smem.at[wg], layout=_row_layout(1))
      delta = plgpu.load(delta_smem.at[wg], layout=_row_layout(1))
      query_ids = plgpu.load(query_ids_smem.at[wg], layout=_row_layout(1)) if segmented else None
      my_hi = hi
      if problem.causal:
        my_hi = jnp.maximum(jnp.minimum(hi, lax.div(row0 + ROWS + offset + block_k - 1, block_k)), mid)

      def step(j, dq, masked: bool):
        slot = lax.rem(j - lo, slots)
        plgpu.barrier_wait(k_ready.at[slot])
        logits = _matmul(q_smem.at[wg], k_smem.at[slot].transpose((1, 0)), (ROWS, block_k)) * scale_log2
        probs = jnp.exp2(logits - _bcast(lse, logits.shape, 0))
        if segmented:
          plgpu.barrier_wait(ids_ready.at[slot])
        if masked:
          shape = (ROWS, block_k)
          key_ids = plgpu.load(key_ids_smem.at[slot], layout=_row_layout(0)) if segmented else None
          valid = _valid(problem, _iota(shape, 0, row0), _iota(shape, 1, j * block_k), query_ids, key_ids, shape, 0)
          probs = jnp.where(valid, probs, 0.0)
        plgpu.barrier_wait(v_ready.at[slot])
        dprobs = _matmul(do_smem.at[wg], v_smem.at[slot].transpose((1, 0)), (ROWS, block_k))
        dlogits = probs * (dprobs - _bcast(delta, dprobs.shape, 0))
        dq = _accumulate(dq, dlogits.astype(dtype), k_smem.at[slot])
        plgpu.barrier_arrive(free.at[slot])
        return dq

      def skip(j, _):
        plgpu.barrier_arrive(free.at[lax.rem(j - lo, slots)])

      dq = lax.fori_loop(lo, mid, functools.partial(step, masked=False), _zeros((ROWS, qk_dim)))
      dq = lax.fori_loop(mid, my_hi, functools.partial(step, masked=True), dq)
      lax.fori_loop(my_hi, hi, skip, None)
      q_smem.at[wg][...] = (dq * problem.sm_scale).astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_smem.at[wg], dq_ref.at[b, rows, h])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == WARPGROUPS)
    def _memory():
      plgpu.set_max_registers(40, action='decrease')
      kv_head = lax.div(h, group)
      keys = lambda j: pl.ds(j * block_k, block_k)
      sources = [(k_ref, lambda r, j: r.at[b, keys(j), kv_head]), (v_ref, lambda r, j: r.at[b, keys(j), kv_head])]
      if segmented:
        sources.append((kv_ids_ref, lambda r, j: r.at[b, keys(j)]))
      _stream(sources, ring, ring_ready, free, lo, hi, slots)

  own = (_smem((WARPGROUPS, ROWS, qk_dim), dtype), _smem((WARPGROUPS, ROWS, v_dim), dtype),
         plgpu.SMEM((WARPGROUPS, ROWS), jnp.float32), plgpu.SMEM((WARPGROUPS, ROWS), jnp.float32),
         plgpu.SMEM((WARPGROUPS, ROWS), jnp.int32) if segmented else None)
  ring = (_smem((slots, block_k, qk_dim), dtype), _smem((slots, block_k, v_dim), dtype),
          plgpu.SMEM((slots, block_k), jnp.int32) if segmented else None)
  operands = [q, k, v, d_out, lse, delta] + ([q_ids, kv_ids] if segmented else []) + [_stack_ranges(by_query)]
  return _backward_call(_with_ids(body, segmented, 6), own, ring, operands, jax.ShapeDtypeStruct(q.shape, dtype),
                        grid=(num_heads, num_q_blocks, batch), grid_names=('heads', 'q_blocks', 'batch'),
                        slots=slots)


def backward(q, k, v, q_ids, kv_ids, delta, lse, d_out, by_query, by_key, *, problem, blocks: BlockSizes,
             interpret):
  """Padded inputs, delta and lse [B, H, T] -> (dq, dk, dv), each like its input."""
  del interpret  # compiled only
  batch, kv_len, num_kv_heads = k.shape[:3]
  group = q.shape[2] // num_kv_heads
  args = (q, k, v, q_ids, kv_ids, lse, delta, d_out)
  dk, dv = _dkv(*args, by_key, problem=problem, blocks=blocks)
  dq = _dq(*args, by_query, problem=problem, blocks=blocks)
  if group > 1:  # per query head -> per key head
    fold = lambda x: x.reshape(batch, kv_len, num_kv_heads, group, x.shape[-1]).astype(jnp.float32).sum(3)
    dk, dv = fold(dk).astype(k.dtype), fold(dv).astype(v.dtype)
  return dq, dk, dv
