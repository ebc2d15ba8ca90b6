"""Flash attention as Pallas Triton kernels (GPU), which Pallas' interpreter also runs on CPU (`interpret=True`).

Layout: q [B, T, H, K], k [B, S, G, K], v [B, S, G, V] (G key heads, H = group * G query heads), padded by the op
to whole blocks. Notation: a tile is block_q queries x block_k keys; logits are raw q.k (the softmax scale is
folded into the exponent), probabilities are computed with exp2, so the row log-sum-exp `lse` kept for the
backward is in base-2 units of the scaled logits.

  forward   grid (H, B, query blocks, heaviest first). Loops over key blocks with the online softmax of
            FlashAttention-2 (Dao 2023, algorithm 1) and also keeps the running row max of the raw logits:
            it is what the softmax needs anyway, so QK-Clip's max logit costs one [block_q] store.
  dK/dV     grid (G, B, key blocks). Loops over the query heads of the group and their query blocks,
            recomputing P = exp2(scale * log2(e) * q.k - lse); dV += P^T dO, dP = dO V^T, dS = P (dP - delta),
            dK += dS^T Q.
  dQ        grid (H, B, query blocks): recomputes P and dS over key blocks, dQ += dS K.
The backward does seven matrix products per tile instead of FlashAttention-2's five (algorithm 2 adds dQ from
the dK/dV loop with atomics): on the H200, float32 atomic adds of dQ from Pallas Triton (even relaxed) made the
whole forward+backward 40-45% slower than recomputing in a dQ kernel (BENCHMARKS.md, bench_attention).

Triton tensors must have power-of-two sides >= 16, so head dims are handled as power-of-two pieces
(192 = 128 + 64): q.k is a sum of products over the pieces, and each piece of dK/dQ/out has its accumulator.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton
import jax.numpy as jnp

from pallas_kernels.flash_attention.blocks import BlockSizes

LOG2_E = math.log2(math.e)


def head_dim_pieces(dim: int) -> tuple[tuple[int, int], ...]:
  """(start, size) power-of-two pieces of a head dim, largest first: 192 -> ((0, 128), (128, 64))."""
  if dim % 16:
    raise ValueError(f'Triton head dims must be multiples of 16 (the op pads them), got {dim}')
  pieces, start = [], 0
  for bit in reversed(range(dim.bit_length())):
    if dim & (1 << bit):
      pieces.append((start, 1 << bit))
      start += 1 << bit
  return tuple(pieces)


@dataclasses.dataclass(frozen=True)
class Problem:
  """What a kernel needs to know besides its tiles (all static)."""
  q_len: int  # real (unpadded) lengths: masks use them
  kv_len: int
  causal: bool
  segmented: bool
  sm_scale: float

  def valid(self, queries, keys, q_ids, kv_ids):
    """Mask of valid pairs; queries/keys are broadcastable position arrays, ids likewise (or None)."""
    valid = keys < self.kv_len
    if self.causal:
      valid = valid & (keys <= queries + (self.kv_len - self.q_len))
    if self.segmented:
      valid = valid & (q_ids == kv_ids)
    return valid


def _dot(a, b):
  """a @ b, float32 accumulation."""
  return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_nt(a, b):
  """a @ b^T."""
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _split_refs(refs, segmented: bool):
  if segmented:
    q_ids_ref, kv_ids_ref, *rest = refs
  else:
    q_ids_ref = kv_ids_ref = None
    rest = list(refs)
  return q_ids_ref, kv_ids_ref, rest


# ----------------------------------------------------------------------------------------------------- forward


def _forward_kernel(q_ref, k_ref, v_ref, *refs, problem: Problem, block_q: int, block_k: int, num_q_blocks: int):
  """One query block of one head. q_ref/out_ref: [block_q, K/V]; k_ref/v_ref: the head's whole [S, K/V]."""
  q_ids_ref, kv_ids_ref, (lo_ref, mid_ref, hi_ref, out_ref, lse_ref, row_max_ref) = _split_refs(
      refs, problem.segmented)
  qk_pieces, v_pieces = head_dim_pieces(q_ref.shape[-1]), head_dim_pieces(v_ref.shape[-1])
  q_start = (num_q_blocks - 1 - pl.program_id(2)) * block_q
  q = [q_ref[:, pl.ds(start, size)] for start, size in qk_pieces]
  q_ids = q_ids_ref[...] if problem.segmented else None
  scale_log2 = problem.sm_scale * LOG2_E

  def step(index, carry, masked: bool):
    row_max, row_sum, accumulators = carry
    k_start = pl.multiple_of(index * block_k, block_k)
    keys = pl.ds(k_start, block_k)
    logits = _dot_nt(q[0], k_ref[keys, pl.ds(*qk_pieces[0])])
    for q_piece, piece in zip(q[1:], qk_pieces[1:]):
      logits += _dot_nt(q_piece, k_ref[keys, pl.ds(*piece)])
    if masked:
      valid = problem.valid(q_start + jnp.arange(block_q)[:, None], k_start + jnp.arange(block_k)[None, :],
                            q_ids[:, None] if problem.segmented else None,
                            kv_ids_ref[keys][None, :] if problem.segmented else None)
      logits = jnp.where(valid, logits, -jnp.inf)
    new_max = jnp.maximum(row_max, jnp.max(logits, axis=1))
    # A row with no valid key yet has max -inf; shift it by 0 so exp2 sees -inf - 0 (= 0), never -inf + inf.
    shift = jnp.where(new_max == -jnp.inf, 0.0, new_max * scale_log2)
    correction = jnp.exp2(row_max * scale_log2 - shift)
    probs = jnp.exp2(logits * scale_log2 - shift[:, None])
    row_sum = row_sum * correction + jnp.sum(probs, axis=1)
    probs = probs.astype(v_ref.dtype)
    accumulators = tuple(acc * correction[:, None] + _dot(probs, v_ref[keys, pl.ds(*piece)])
                         for acc, piece in zip(accumulators, v_pieces))
    return new_max, row_sum, accumulators

  carry = (jnp.full((block_q,), -jnp.inf, jnp.float32), jnp.zeros((block_q,), jnp.float32),
           tuple(jnp.zeros((block_q, size), jnp.float32) for _, size in v_pieces))
  lo, mid, hi = lo_ref[...], mid_ref[...], hi_ref[...]
  carry = lax.fori_loop(lo, mid, functools.partial(step, masked=False), carry)
  carry = lax.fori_loop(mid, hi, functools.partial(step, masked=True), carry)
  row_max, row_sum, accumulators = carry

  empty = row_sum == 0.0  # the query sees no key: output 0, lse +inf (so the backward's P is 0), max -inf
  safe_sum = jnp.where(empty, 1.0, row_sum)
  inverse = 1.0 / safe_sum
  for acc, piece in zip(accumulators, v_pieces):
    out_ref[:, pl.ds(*piece)] = (acc * inverse[:, None]).astype(out_ref.dtype)
  lse_ref[...] = jnp.where(empty, jnp.inf, row_max * scale_log2 + jnp.log2(safe_sum))
  row_max_ref[...] = row_max * problem.sm_scale


def forward(q, k, v, q_ids, kv_ids, by_query, *, problem: Problem, blocks: BlockSizes, interpret):
  """Padded inputs -> out [B, T, H, V], lse [B, H, T] (base 2), row_max [B, H, T] (scaled logits)."""
  batch, q_len, num_heads, qk_dim = q.shape
  kv_len, num_kv_heads, v_dim = k.shape[1], k.shape[2], v.shape[-1]
  group = num_heads // num_kv_heads
  block_q, block_k = blocks.block_q, blocks.block_k
  num_q_blocks = q_len // block_q
  flip = lambda i: num_q_blocks - 1 - i  # heaviest (causal: last) query blocks launch first

  in_specs = [
      pl.BlockSpec((None, block_q, None, qk_dim), lambda h, b, i: (b, flip(i), h, 0)),
      pl.BlockSpec((None, kv_len, None, qk_dim), lambda h, b, i: (b, 0, h // group, 0)),
      pl.BlockSpec((None, kv_len, None, v_dim), lambda h, b, i: (b, 0, h // group, 0)),
  ]
  operands = [q, k, v]
  if problem.segmented:
    in_specs += [pl.BlockSpec((None, block_q), lambda h, b, i: (b, flip(i))),
                 pl.BlockSpec((None, kv_len), lambda h, b, i: (b, 0))]
    operands += [q_ids, kv_ids]
  in_specs += [pl.BlockSpec((None, None), lambda h, b, i: (b, flip(i)))] * 3
  operands += list(by_query)
  row_spec = pl.BlockSpec((None, None, block_q), lambda h, b, i: (b, h, flip(i)))
  return pl.pallas_call(
      functools.partial(_forward_kernel, problem=problem, block_q=block_q, block_k=block_k,
                        num_q_blocks=num_q_blocks),
      grid=(num_heads, batch, num_q_blocks),
      in_specs=in_specs,
      out_specs=[pl.BlockSpec((None, block_q, None, v_dim), lambda h, b, i: (b, flip(i), h, 0)), row_spec,
                 row_spec],
      out_shape=[jax.ShapeDtypeStruct((batch, q_len, num_heads, v_dim), v.dtype),
                 jax.ShapeDtypeStruct((batch, num_heads, q_len), jnp.float32),
                 jax.ShapeDtypeStruct((batch, num_heads, q_len), jnp.float32)],
      compiler_params=pltriton.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
      interpret=interpret,
      name='flash_attention_forward',
  )(*operands)


# ---------------------------------------------------------------------------------------------------- backward


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, problem: Problem, block_q: int,
                block_k: int, group: int):
  """One key block of one key head, over its query heads. k_ref/v_ref/dk_ref/dv_ref: [block_k, K/V]; q_ref,
  do_ref: the group's whole [T, group, K/V]; lse_ref, delta_ref: [group, T]."""
  q_ids_ref, kv_ids_ref, (lo_ref, mid_ref, hi_ref, dk_ref, dv_ref) = _split_refs(refs, problem.segmented)
  qk_pieces, v_pieces = head_dim_pieces(k_ref.shape[-1]), head_dim_pieces(v_ref.shape[-1])
  k_start = pl.program_id(2) * block_k
  k = [k_ref[:, pl.ds(*piece)] for piece in qk_pieces]
  v = [v_ref[:, pl.ds(*piece)] for piece in v_pieces]
  kv_ids = kv_ids_ref[...] if problem.segmented else None
  scale_log2 = problem.sm_scale * LOG2_E
  dtype = k_ref.dtype

  def step(index, carry, head, masked: bool):
    dk, dv = carry
    q_start = pl.multiple_of(index * block_q, block_q)
    rows = pl.ds(q_start, block_q)
    q = [q_ref[rows, head, pl.ds(*piece)] for piece in qk_pieces]
    do = [do_ref[rows, head, pl.ds(*piece)] for piece in v_pieces]
    lse, delta = lse_ref[head, rows], delta_ref[head, rows]
    logits_t = _dot_nt(k[0], q[0])  # [block_k, block_q]: transposed, so dK and dV come out row-major
    for k_piece, q_piece in zip(k[1:], q[1:]):
      logits_t += _dot_nt(k_piece, q_piece)
    probs_t = jnp.exp2(logits_t * scale_log2 - lse[None, :])
    if masked:
      valid = problem.valid(q_start + jnp.arange(block_q)[None, :], k_start + jnp.arange(block_k)[:, None],
                            q_ids_ref[rows][None, :] if problem.segmented else None,
                            kv_ids[:, None] if problem.segmented else None)
      probs_t = jnp.where(valid, probs_t, 0.0)
    dv = tuple(acc + _dot(probs_t.astype(dtype), do_piece) for acc, do_piece in zip(dv, do))
    dprobs_t = _dot_nt(v[0], do[0])
    for v_piece, do_piece in zip(v[1:], do[1:]):
      dprobs_t += _dot_nt(v_piece, do_piece)
    dlogits_t = (probs_t * (dprobs_t - delta[None, :])).astype(dtype)
    dk = tuple(acc + _dot(dlogits_t, q_piece) for acc, q_piece in zip(dk, q))
    return dk, dv

  def head_loop(head, carry):
    lo, mid, hi = lo_ref[...], mid_ref[...], hi_ref[...]
    carry = lax.fori_loop(lo, mid, functools.partial(step, head=head, masked=True), carry)
    return lax.fori_loop(mid, hi, functools.partial(step, head=head, masked=False), carry)

  carry = (tuple(jnp.zeros((block_k, size), jnp.float32) for _, size in qk_pieces),
           tuple(jnp.zeros((block_k, size), jnp.float32) for _, size in v_pieces))
  dk, dv = head_loop(jnp.int32(0), carry) if group == 1 else lax.fori_loop(0, group, head_loop, carry)
  for acc, piece in zip(dk, qk_pieces):
    dk_ref[:, pl.ds(*piece)] = (acc * problem.sm_scale).astype(dk_ref.dtype)
  for acc, piece in zip(dv, v_pieces):
    dv_ref[:, pl.ds(*piece)] = acc.astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, problem: Problem, block_q: int,
               block_k: int):
  """One query block of one head. q_ref/do_ref/dq_ref: [block_q, K/V]."""
  q_ids_ref, kv_ids_ref, (lo_ref, mid_ref, hi_ref, dq_ref) = _split_refs(refs, problem.segmented)
  qk_pieces, v_pieces = head_dim_pieces(q_ref.shape[-1]), head_dim_pieces(v_ref.shape[-1])
  q_start = pl.program_id(2) * block_q
  q = [q_ref[:, pl.ds(*piece)] for piece in qk_pieces]
  do = [do_ref[:, pl.ds(*piece)] for piece in v_pieces]
  lse, delta = lse_ref[...], delta_ref[...]
  q_ids = q_ids_ref[...] if problem.segmented else None
  scale_log2 = problem.sm_scale * LOG2_E
  dtype = q_ref.dtype

  def step(index, dq, masked: bool):
    k_start = pl.multiple_of(index * block_k, block_k)
    keys = pl.ds(k_start, block_k)
    k = [k_ref[keys, pl.ds(*piece)] for piece in qk_pieces]
    logits = _dot_nt(q[0], k[0])
    for q_piece, k_piece in zip(q[1:], k[1:]):
      logits += _dot_nt(q_piece, k_piece)
    probs = jnp.exp2(logits * scale_log2 - lse[:, None])
    if masked:
      valid = problem.valid(q_start + jnp.arange(block_q)[:, None], k_start + jnp.arange(block_k)[None, :],
                            q_ids[:, None] if problem.segmented else None,
                            kv_ids_ref[keys][None, :] if problem.segmented else None)
      probs = jnp.where(valid, probs, 0.0)
    dprobs = _dot_nt(do[0], v_ref[keys, pl.ds(*v_pieces[0])])
    for do_piece, piece in zip(do[1:], v_pieces[1:]):
      dprobs += _dot_nt(do_piece, v_ref[keys, pl.ds(*piece)])
    dlogits = (probs * (dprobs - delta[:, None])).astype(dtype)
    return tuple(acc + _dot(dlogits, k_piece) for acc, k_piece in zip(dq, k))

  dq = tuple(jnp.zeros((block_q, size), jnp.float32) for _, size in qk_pieces)
  lo, mid, hi = lo_ref[...], mid_ref[...], hi_ref[...]
  dq = lax.fori_loop(lo, mid, functools.partial(step, masked=False), dq)
  dq = lax.fori_loop(mid, hi, functools.partial(step, masked=True), dq)
  for acc, piece in zip(dq, qk_pieces):
    dq_ref[:, pl.ds(*piece)] = (acc * problem.sm_scale).astype(dq_ref.dtype)


def backward(q, k, v, q_ids, kv_ids, delta, lse, d_out, by_query, by_key, *, problem: Problem, blocks: BlockSizes,
             interpret):
  """Padded inputs, delta and lse [B, H, T] -> (dq, dk, dv), each like its input."""
  batch, q_len, num_heads, qk_dim = q.shape
  kv_len, num_kv_heads, v_dim = k.shape[1], k.shape[2], v.shape[-1]
  group = num_heads // num_kv_heads
  block_q, block_k = blocks.block_q_dkv, blocks.block_k_dkv

  # dK, dV: grid (key heads, batch, key blocks).
  group_spec = lambda dim: pl.BlockSpec((None, q_len, group, dim), lambda g, b, j: (b, 0, g, 0))
  key_spec = lambda dim: pl.BlockSpec((None, block_k, None, dim), lambda g, b, j: (b, j, g, 0))
  rows_spec = pl.BlockSpec((None, group, q_len), lambda g, b, j: (b, g, 0))
  in_specs = [group_spec(qk_dim), key_spec(qk_dim), key_spec(v_dim), group_spec(v_dim), rows_spec, rows_spec]
  operands = [q, k, v, d_out, lse, delta]
  if problem.segmented:
    in_specs += [pl.BlockSpec((None, q_len), lambda g, b, j: (b, 0)),
                 pl.BlockSpec((None, block_k), lambda g, b, j: (b, j))]
    operands += [q_ids, kv_ids]
  in_specs += [pl.BlockSpec((None, None), lambda g, b, j: (b, j))] * 3
  operands += list(by_key)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, problem=problem, block_q=block_q, block_k=block_k, group=group),
      grid=(num_kv_heads, batch, kv_len // block_k),
      in_specs=in_specs,
      out_specs=[key_spec(qk_dim), key_spec(v_dim)],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=pltriton.CompilerParams(num_warps=blocks.num_warps_dkv, num_stages=blocks.num_stages_dkv),
      interpret=interpret,
      name='flash_attention_dkv',
  )(*operands)

  # dQ: grid (heads, batch, query blocks).
  block_q, block_k = blocks.block_q_dq, blocks.block_k_dq
  query_spec = lambda dim: pl.BlockSpec((None, block_q, None, dim), lambda h, b, i: (b, i, h, 0))
  head_spec = lambda dim: pl.BlockSpec((None, kv_len, None, dim), lambda h, b, i: (b, 0, h // group, 0))
  rows_spec = pl.BlockSpec((None, None, block_q), lambda h, b, i: (b, h, i))
  in_specs = [query_spec(qk_dim), head_spec(qk_dim), head_spec(v_dim), query_spec(v_dim), rows_spec, rows_spec]
  operands = [q, k, v, d_out, lse, delta]
  if problem.segmented:
    in_specs += [pl.BlockSpec((None, block_q), lambda h, b, i: (b, i)),
                 pl.BlockSpec((None, kv_len), lambda h, b, i: (b, 0))]
    operands += [q_ids, kv_ids]
  in_specs += [pl.BlockSpec((None, None), lambda h, b, i: (b, i))] * 3
  operands += list(by_query)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, problem=problem, block_q=block_q, block_k=block_k),
      grid=(num_heads, batch, q_len // block_q),
      in_specs=in_specs,
      out_specs=query_spec(qk_dim),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=pltriton.CompilerParams(num_warps=blocks.num_warps_dq, num_stages=blocks.num_stages_dq),
      interpret=interpret,
      name='flash_attention_dq',
  )(*operands)
  return dq, dk, dv
