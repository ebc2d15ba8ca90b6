"""Flash attention as Pallas Mosaic kernels (TPU), tested on CPU in TPU interpret mode (`pltpu.InterpretParams`).

Same maths as triton_kernel.py (read that docstring first); what differs is how the loops are written. Mosaic runs
the grid in order on one core, so the loop over the other sequence is the last ("arbitrary") grid axis and the
running statistics live in VMEM scratch between grid steps. Tiles outside a program's visit range (blocks.py) are
skipped with `pl.when`, and their index maps are clamped into the range so that a skipped step re-uses the block
already in VMEM instead of fetching a new one. The ranges are scalar-prefetched into SMEM.

Layout: heads-major [B, H, T, D] (the op's [B, T, H, D] is transposed on the way in and out), so every block's
last two dims are (sequence tile, head dim). Row statistics are [.., T, 1] columns. Exponentials are natural
(lse in natural-log units of the scaled logits).

  forward  grid (B, H, query blocks, key blocks)
  dK/dV    grid (B, G, key blocks, query heads of the group, query blocks)
  dQ       grid (B, H, query blocks, key blocks)
"""

from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp

from pallas_kernels.flash_attention.blocks import BlockSizes
from pallas_kernels.flash_attention.triton_kernel import Problem


def _dot(a, b):
  return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_nt(a, b):
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_tn(a, b):
  return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _clamp(index, lo, hi):
  """index clamped into [lo, hi - 1] (to lo for an empty range): skipped steps keep the previous block."""
  return jnp.minimum(jnp.maximum(index, lo), jnp.maximum(hi - 1, lo))


def _valid(problem: Problem, q_start, k_start, block_q, block_k, q_ids_ref, kv_ids_ref):
  """[block_q, block_k] mask of valid pairs of one tile."""
  queries = q_start + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)
  keys = k_start + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
  if problem.segmented:
    return problem.valid(queries, keys, q_ids_ref[...], kv_ids_ref[...])  # [block_q, 1] == [1, block_k]
  return problem.valid(queries, keys, None, None)


def _split_refs(refs, segmented: bool):
  if segmented:
    q_ids_ref, kv_ids_ref, *rest = refs
  else:
    q_ids_ref = kv_ids_ref = None
    rest = list(refs)
  return q_ids_ref, kv_ids_ref, rest


def _to_heads_major(x):
  return None if x is None else jnp.swapaxes(x, 1, 2)


def _id_operands(q_ids, kv_ids):
  """Segment ids as a [B, T, 1] column (query side) and a [B, 1, S] row (key side)."""
  return [q_ids[:, :, None], kv_ids[:, None, :]]


# ----------------------------------------------------------------------------------------------------- forward


def _forward_kernel(lo_ref, mid_ref, hi_ref, q_ref, k_ref, v_ref, *refs, problem: Problem, block_q: int,
                    block_k: int):
  q_ids_ref, kv_ids_ref, rest = _split_refs(refs, problem.segmented)
  out_ref, lse_ref, row_max_ref, max_scratch, sum_scratch, acc_scratch = rest
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  lo, mid, hi = lo_ref[b, i], mid_ref[b, i], hi_ref[b, i]
  scale = problem.sm_scale

  @pl.when(j == 0)
  def _():
    max_scratch[...] = jnp.full(max_scratch.shape, -jnp.inf, jnp.float32)
    sum_scratch[...] = jnp.zeros(sum_scratch.shape, jnp.float32)
    acc_scratch[...] = jnp.zeros(acc_scratch.shape, jnp.float32)

  def step(masked: bool):
    logits = _dot_nt(q_ref[...], k_ref[...])
    if masked:
      valid = _valid(problem, i * block_q, j * block_k, block_q, block_k, q_ids_ref, kv_ids_ref)
      logits = jnp.where(valid, logits, -jnp.inf)
    row_max = max_scratch[...]
    new_max = jnp.maximum(row_max, jnp.max(logits, axis=1, keepdims=True))
    shift = jnp.where(new_max == -jnp.inf, 0.0, new_max * scale)  # no -inf + inf for rows with no key yet
    correction = jnp.exp(row_max * scale - shift)
    probs = jnp.exp(logits * scale - shift)
    sum_scratch[...] = sum_scratch[...] * correction + jnp.sum(probs, axis=1, keepdims=True)
    acc_scratch[...] = acc_scratch[...] * correction + _dot(probs.astype(v_ref.dtype), v_ref[...])
    max_scratch[...] = new_max

  pl.when((j >= lo) & (j < mid))(lambda: step(masked=False))
  pl.when((j >= mid) & (j < hi))(lambda: step(masked=True))

  @pl.when(j == pl.num_programs(3) - 1)
  def _():
    row_sum = sum_scratch[...]
    empty = row_sum == 0.0
    safe_sum = jnp.where(empty, 1.0, row_sum)
    out_ref[...] = (acc_scratch[...] / safe_sum).astype(out_ref.dtype)
    lse_ref[...] = jnp.where(empty, jnp.inf, max_scratch[...] * scale + jnp.log(safe_sum))
    row_max_ref[...] = max_scratch[...] * scale


def forward(q, k, v, q_ids, kv_ids, by_query, *, problem: Problem, blocks: BlockSizes, interpret):
  """Padded [B, T, H, D] inputs -> out [B, T, H, V], lse [B, H, T, 1] (natural log), row_max [B, H, T]."""
  q, k, v = map(_to_heads_major, (q, k, v))
  batch, num_heads, q_len, qk_dim = q.shape
  num_kv_heads, kv_len, v_dim = k.shape[1], k.shape[2], v.shape[-1]
  group = num_heads // num_kv_heads
  block_q, block_k = blocks.block_q, blocks.block_k

  def kv_index(b, h, i, j, lo, mid, hi):
    return (b, h // group, _clamp(j, lo[b, i], hi[b, i]), 0)

  in_specs = [pl.BlockSpec((None, None, block_q, qk_dim), lambda b, h, i, j, *_: (b, h, i, 0)),
              pl.BlockSpec((None, None, block_k, qk_dim), kv_index),
              pl.BlockSpec((None, None, block_k, v_dim), kv_index)]
  operands = [q, k, v]
  if problem.segmented:
    in_specs += [pl.BlockSpec((None, block_q, 1), lambda b, h, i, j, *_: (b, i, 0)),
                 pl.BlockSpec((None, 1, block_k),
                              lambda b, h, i, j, lo, mid, hi: (b, 0, _clamp(j, lo[b, i], hi[b, i])))]
    operands += _id_operands(q_ids, kv_ids)
  row_spec = pl.BlockSpec((None, None, block_q, 1), lambda b, h, i, j, *_: (b, h, i, 0))
  out, lse, row_max = pl.pallas_call(
      functools.partial(_forward_kernel, problem=problem, block_q=block_q, block_k=block_k),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3,
          grid=(batch, num_heads, q_len // block_q, kv_len // block_k),
          in_specs=in_specs,
          out_specs=[pl.BlockSpec((None, None, block_q, v_dim), lambda b, h, i, j, *_: (b, h, i, 0)), row_spec,
                     row_spec],
          scratch_shapes=[pltpu.VMEM((block_q, 1), jnp.float32), pltpu.VMEM((block_q, 1), jnp.float32),
                          pltpu.VMEM((block_q, v_dim), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct((batch, num_heads, q_len, v_dim), v.dtype),
                 jax.ShapeDtypeStruct((batch, num_heads, q_len, 1), jnp.float32),
                 jax.ShapeDtypeStruct((batch, num_heads, q_len, 1), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=('parallel', 'parallel', 'parallel', 'arbitrary')),
      interpret=interpret,
      name='flash_attention_forward',
  )(*by_query, *operands)
  return jnp.swapaxes(out, 1, 2), lse, row_max[..., 0]


# ---------------------------------------------------------------------------------------------------- backward


def _dkv_kernel(lo_ref, mid_ref, hi_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, problem: Problem,
                block_q: int, block_k: int):
  q_ids_ref, kv_ids_ref, (dk_ref, dv_ref, dk_scratch, dv_scratch) = _split_refs(refs, problem.segmented)
  b, j, head, i = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)
  lo, mid, hi = lo_ref[b, j], mid_ref[b, j], hi_ref[b, j]

  @pl.when((head == 0) & (i == 0))
  def _():
    dk_scratch[...] = jnp.zeros(dk_scratch.shape, jnp.float32)
    dv_scratch[...] = jnp.zeros(dv_scratch.shape, jnp.float32)

  def step(masked: bool):
    q, do = q_ref[...], do_ref[...]
    logits = _dot_nt(q, k_ref[...])  # [block_q, block_k]
    probs = jnp.exp(logits * problem.sm_scale - lse_ref[...])
    if masked:
      valid = _valid(problem, i * block_q, j * block_k, block_q, block_k, q_ids_ref, kv_ids_ref)
      probs = jnp.where(valid, probs, 0.0)
    dv_scratch[...] += _dot_tn(probs.astype(do.dtype), do)
    dlogits = probs * (_dot_nt(do, v_ref[...]) - delta_ref[...])
    dk_scratch[...] += _dot_tn(dlogits.astype(q.dtype), q)

  pl.when((i >= lo) & (i < mid))(lambda: step(masked=True))
  pl.when((i >= mid) & (i < hi))(lambda: step(masked=False))

  @pl.when((head == pl.num_programs(3) - 1) & (i == pl.num_programs(4) - 1))
  def _():
    dk_ref[...] = (dk_scratch[...] * problem.sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_scratch[...].astype(dv_ref.dtype)


def _dq_kernel(lo_ref, mid_ref, hi_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, problem: Problem,
               block_q: int, block_k: int):
  q_ids_ref, kv_ids_ref, (dq_ref, dq_scratch) = _split_refs(refs, problem.segmented)
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  lo, mid, hi = lo_ref[b, i], mid_ref[b, i], hi_ref[b, i]

  @pl.when(j == 0)
  def _():
    dq_scratch[...] = jnp.zeros(dq_scratch.shape, jnp.float32)

  def step(masked: bool):
    k = k_ref[...]
    probs = jnp.exp(_dot_nt(q_ref[...], k) * problem.sm_scale - lse_ref[...])
    if masked:
      valid = _valid(problem, i * block_q, j * block_k, block_q, block_k, q_ids_ref, kv_ids_ref)
      probs = jnp.where(valid, probs, 0.0)
    dlogits = probs * (_dot_nt(do_ref[...], v_ref[...]) - delta_ref[...])
    dq_scratch[...] += _dot(dlogits.astype(k.dtype), k)

  pl.when((j >= lo) & (j < mid))(lambda: step(masked=False))
  pl.when((j >= mid) & (j < hi))(lambda: step(masked=True))

  @pl.when(j == pl.num_programs(3) - 1)
  def _():
    dq_ref[...] = (dq_scratch[...] * problem.sm_scale).astype(dq_ref.dtype)


def backward(q, k, v, q_ids, kv_ids, delta, lse, d_out, by_query, by_key, *, problem: Problem, blocks: BlockSizes,
             interpret):
  """Padded [B, T, H, D] inputs, delta and lse [B, H, T] -> (dq, dk, dv) in [B, T, H, D]."""
  delta = delta[..., None]
  q, k, v, d_out = map(_to_heads_major, (q, k, v, d_out))
  batch, num_heads, q_len, qk_dim = q.shape
  num_kv_heads, kv_len, v_dim = k.shape[1], k.shape[2], v.shape[-1]
  group = num_heads // num_kv_heads
  block_q, block_k = blocks.block_q_dkv, blocks.block_k_dkv
  num_q_blocks, num_k_blocks = q_len // block_q, kv_len // block_k
  id_operands = _id_operands(q_ids, kv_ids) if problem.segmented else []

  # dK, dV: grid (B, G, key blocks, heads of the group, query blocks); the last two accumulate in VMEM.
  def query_index(b, g, j, head, i, lo, mid, hi):
    return (b, g * group + head, _clamp(i, lo[b, j], hi[b, j]), 0)

  key_spec = lambda dim: pl.BlockSpec((None, None, block_k, dim), lambda b, g, j, *_: (b, g, j, 0))
  in_specs = [pl.BlockSpec((None, None, block_q, qk_dim), query_index), key_spec(qk_dim), key_spec(v_dim),
              pl.BlockSpec((None, None, block_q, v_dim), query_index),
              pl.BlockSpec((None, None, block_q, 1), query_index),
              pl.BlockSpec((None, None, block_q, 1), query_index)]
  if problem.segmented:
    in_specs += [pl.BlockSpec((None, block_q, 1),
                              lambda b, g, j, head, i, lo, mid, hi: (b, _clamp(i, lo[b, j], hi[b, j]), 0)),
                 pl.BlockSpec((None, 1, block_k), lambda b, g, j, *_: (b, 0, j))]
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, problem=problem, block_q=block_q, block_k=block_k),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3,
          grid=(batch, num_kv_heads, num_k_blocks, group, num_q_blocks),
          in_specs=in_specs,
          out_specs=[key_spec(qk_dim), key_spec(v_dim)],
          scratch_shapes=[pltpu.VMEM((block_k, qk_dim), jnp.float32), pltpu.VMEM((block_k, v_dim), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=('parallel', 'parallel', 'parallel', 'arbitrary', 'arbitrary')),
      interpret=interpret,
      name='flash_attention_dkv',
  )(*by_key, q, k, v, d_out, lse, delta, *id_operands)

  # dQ: grid (B, H, query blocks, key blocks).
  block_q, block_k = blocks.block_q_dq, blocks.block_k_dq
  num_q_blocks, num_k_blocks = q_len // block_q, kv_len // block_k

  def kv_index(b, h, i, j, lo, mid, hi):
    return (b, h // group, _clamp(j, lo[b, i], hi[b, i]), 0)

  query_spec = lambda dim: pl.BlockSpec((None, None, block_q, dim), lambda b, h, i, j, *_: (b, h, i, 0))
  in_specs = [query_spec(qk_dim), pl.BlockSpec((None, None, block_k, qk_dim), kv_index),
              pl.BlockSpec((None, None, block_k, v_dim), kv_index), query_spec(v_dim), query_spec(1),
              query_spec(1)]
  if problem.segmented:
    in_specs += [pl.BlockSpec((None, block_q, 1), lambda b, h, i, j, *_: (b, i, 0)),
                 pl.BlockSpec((None, 1, block_k),
                              lambda b, h, i, j, lo, mid, hi: (b, 0, _clamp(j, lo[b, i], hi[b, i])))]
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, problem=problem, block_q=block_q, block_k=block_k),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3,
          grid=(batch, num_heads, num_q_blocks, num_k_blocks),
          in_specs=in_specs,
          out_specs=query_spec(qk_dim),
          scratch_shapes=[pltpu.VMEM((block_q, qk_dim), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=('parallel', 'parallel', 'parallel', 'arbitrary')),
      interpret=interpret,
      name='flash_attention_dq',
  )(*by_query, q, k, v, d_out, lse, delta, *id_operands)
  return tuple(map(_to_heads_major, (dq, dk, dv)))
