"""Public flash-attention op: pads to whole tiles, picks the backend's kernels, and wraps them in a custom_vjp.

    out, max_logits = flash_attention(q, k, v, causal=True, segment_ids=None, sm_scale=None, interpret=None)

The forward returns QK-Clip's per-head max logit beside the output at no extra pass (the kernels keep the row max
of the logits for the softmax anyway). max_logits is not differentiated: its cotangent is ignored, as QK-Clip
reads it outside autodiff (K2 report section 2.1).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp

from pallas_kernels.flash_attention import hopper_kernel
from pallas_kernels.flash_attention import mosaic_kernel
from pallas_kernels.flash_attention import triton_kernel
from pallas_kernels.flash_attention.blocks import HOPPER
from pallas_kernels.flash_attention.blocks import MOSAIC
from pallas_kernels.flash_attention.blocks import TRITON
from pallas_kernels.flash_attention.blocks import BlockSizes
from pallas_kernels.flash_attention.blocks import visit_ranges

_KERNELS = {TRITON: triton_kernel, MOSAIC: mosaic_kernel, HOPPER: hopper_kernel}


def kernel_backend(interpret, q=None, k=None, v=None) -> str:
  """Mosaic on TPU and for TPU interpret mode (pltpu.InterpretParams); on GPU the Hopper (Mosaic GPU) kernels
  where the chip and inputs allow (hopper_kernel.supported), else Triton; Triton for plain interpret mode."""
  if jax.default_backend() == 'tpu' or isinstance(interpret, pltpu.InterpretParams):
    return MOSAIC
  if not interpret and q is not None and hopper_kernel.supported(q, k, v):
    return HOPPER
  return TRITON


@dataclasses.dataclass(frozen=True)
class _Static:
  """Everything about one call that is not an array (hashable: it is a nondiff argument of the custom_vjp)."""
  backend: str
  interpret: bool | pltpu.InterpretParams
  blocks: BlockSizes
  problem: triton_kernel.Problem
  padded_q_len: int
  padded_kv_len: int
  qk_dim: int
  v_dim: int
  padded_qk_dim: int
  padded_v_dim: int


@functools.partial(jax.jit, static_argnames=('causal', 'sm_scale', 'interpret', 'block_sizes', 'implementation'))
def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool = True,
                    segment_ids: jax.Array | None = None, sm_scale: float | None = None,
                    interpret: bool | pltpu.InterpretParams | None = None,
                    block_sizes: BlockSizes | None = None,
                    implementation: str | None = None) -> tuple[jax.Array, jax.Array]:
  """Softmax attention with per-head max logits, as fused Pallas kernels (forward and backward).

  Same function as `flash_attention_reference` (pallas_kernels/flash_attention/reference.py).

  Args:
    q: [B, T, H, K] queries (bfloat16 or float32; products accumulate in float32).
    k: [B, S, G, K] keys; G divides H (G < H is grouped-query attention).
    v: [B, S, G, V] values; V may differ from K (MLA: K = 192, V = 128).
    causal: query t sees key s iff s <= t + S - T.
    segment_ids: [B, T] int32 packed-document ids (the same ids for the keys; needs T == S), or None.
    sm_scale: logit scale; None means 1/sqrt(K).
    interpret: None compiles for the default backend (on GPU the Hopper kernels where `hopper_kernel.supported`,
      else Triton; Mosaic on TPU) and interprets the Triton kernels on CPU; True interprets the Triton kernels; a `pltpu.InterpretParams()` runs the Mosaic kernels in
      TPU interpret mode.
    block_sizes: tiles; None takes the backend's defaults. Either way they are capped to the sequence lengths.
    implementation: None picks the kernels as above; 'hopper', 'triton' or 'mosaic' forces them (benchmarks).

  Returns:
    out [B, T, H, V] in v's dtype, and max_logits [B, H] float32: the largest sm_scale * q.k over valid pairs
    (-inf for a head with none).
  """
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f'q, k, v must be [B, T, H, D]; got shapes {q.shape}, {k.shape}, {v.shape}')
  batch, q_len, num_heads, qk_dim = q.shape
  if k.shape[0] != batch or k.shape[3] != qk_dim or v.shape[:3] != k.shape[:3]:
    raise ValueError(f'k {k.shape} and v {v.shape} do not match q {q.shape}: need k [B, S, G, {qk_dim}] and '
                     f'v [B, S, G, V]')
  kv_len, num_kv_heads = k.shape[1], k.shape[2]
  if num_heads % num_kv_heads:
    raise ValueError(f'{num_kv_heads} key heads do not divide {num_heads} query heads')
  if segment_ids is not None and (q_len != kv_len or segment_ids.shape != (batch, q_len)):
    raise ValueError(f'segment_ids {segment_ids.shape} need T == S and shape [B, T] = {(batch, q_len)}')
  if sm_scale is None:
    sm_scale = qk_dim ** -0.5
  if sm_scale <= 0:
    raise ValueError(f'sm_scale must be positive, got {sm_scale}')
  backend = implementation or kernel_backend(interpret, q, k, v)
  if backend not in _KERNELS:
    raise ValueError(f'implementation must be one of {sorted(_KERNELS)} or None, got {implementation!r}')
  if interpret is None:
    interpret = jax.default_backend() == 'cpu'
  blocks = block_sizes or BlockSizes.for_backend(backend, q_len, kv_len, qk_dim, v.shape[-1], q.dtype.itemsize)
  blocks = blocks.fit(backend, q_len, kv_len)
  padded_q_len, padded_kv_len = blocks.padded_lengths(q_len, kv_len)
  # Triton dots need sides of 16 or more; wgmma tiles on Hopper are 64 wide.
  head_multiple = {TRITON: 16, HOPPER: hopper_kernel.HEAD_DIM_MULTIPLE}.get(backend, 1)
  round_up = lambda dim: -(-dim // head_multiple) * head_multiple
  static = _Static(
      backend=backend, interpret=interpret, blocks=blocks,
      problem=triton_kernel.Problem(q_len=q_len, kv_len=kv_len, causal=causal,
                                    segmented=segment_ids is not None, sm_scale=float(sm_scale)),
      padded_q_len=padded_q_len, padded_kv_len=padded_kv_len, qk_dim=qk_dim, v_dim=v.shape[-1],
      padded_qk_dim=round_up(qk_dim), padded_v_dim=round_up(v.shape[-1]))
  return _attention(q, k, v, segment_ids, static)


def _pad(x: jax.Array, length: int, dim: int | None = None) -> jax.Array:
  """Zero-pads axis 1 to `length` and (if given) the last axis to `dim`."""
  widths = [(0, 0)] * x.ndim
  widths[1] = (0, length - x.shape[1])
  if dim is not None:
    widths[-1] = (0, dim - x.shape[-1])
  return jnp.pad(x, widths) if any(w != (0, 0) for w in widths) else x


def _ranges(static: _Static, segment_ids, block_q: int, block_k: int):
  p = static.problem
  return visit_ranges(q_len=p.q_len, kv_len=p.kv_len, padded_q_len=static.padded_q_len,
                      padded_kv_len=static.padded_kv_len, block_q=block_q, block_k=block_k, causal=p.causal,
                      segment_ids=segment_ids, batch=segment_ids.shape[0] if segment_ids is not None else 1)


def _batch_ranges(ranges, batch: int):
  return tuple(jnp.broadcast_to(x, (batch, x.shape[1])) for x in ranges)


def _forward(q, k, v, segment_ids, static: _Static):
  s = static
  batch = q.shape[0]
  q_p = _pad(q, s.padded_q_len, s.padded_qk_dim)
  k_p = _pad(k, s.padded_kv_len, s.padded_qk_dim)
  v_p = _pad(v, s.padded_kv_len, s.padded_v_dim)
  q_ids = kv_ids = None
  if segment_ids is not None:
    q_ids, kv_ids = _pad(segment_ids, s.padded_q_len), _pad(segment_ids, s.padded_kv_len)
  forward_ranges = _ranges(s, segment_ids, s.blocks.block_q, s.blocks.block_k)
  # The backward's ranges: by key for the dK/dV kernel's tiles, by query for the dQ kernel's.
  backward_ranges = (_ranges(s, segment_ids, s.blocks.block_q_dkv, s.blocks.block_k_dkv).by_key,
                     _ranges(s, segment_ids, s.blocks.block_q_dq, s.blocks.block_k_dq).by_query)
  out_p, lse, row_max = _KERNELS[s.backend].forward(
      q_p, k_p, v_p, q_ids, kv_ids, _batch_ranges(forward_ranges.by_query, batch), problem=s.problem,
      blocks=s.blocks, interpret=s.interpret)
  out = out_p[:, :q.shape[1], :, :v.shape[-1]]
  max_logits = jnp.max(row_max[:, :, :q.shape[1]], axis=-1)
  residuals = (q_p, k_p, v_p, q_ids, kv_ids, out_p, lse, backward_ranges)
  return out, max_logits, residuals


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, segment_ids, static: _Static):
  out, max_logits, _ = _forward(q, k, v, segment_ids, static)
  return out, max_logits


def _attention_fwd(q, k, v, segment_ids, static: _Static):
  out, max_logits, residuals = _forward(q, k, v, segment_ids, static)
  return (out, max_logits), residuals


def _attention_bwd(static: _Static, residuals, cotangents):
  q_p, k_p, v_p, q_ids, kv_ids, out_p, lse, (by_key, by_query) = residuals
  d_out, _ = cotangents  # max_logits is not differentiated (QK-Clip reads it outside autodiff)
  batch = q_p.shape[0]
  d_out = _pad(d_out.astype(out_p.dtype), static.padded_q_len, static.padded_v_dim)
  # delta_i = sum_j P_ij dP_ij = rowsum(dO * O) (FlashAttention-2, section 3.1.2), [B, H, T] float32.
  delta = jnp.einsum('BTHV,BTHV->BHT', d_out.astype(jnp.float32), out_p.astype(jnp.float32))
  dq, dk, dv = _KERNELS[static.backend].backward(
      q_p, k_p, v_p, q_ids, kv_ids, delta, lse, d_out, _batch_ranges(by_query, batch),
      _batch_ranges(by_key, batch), problem=static.problem, blocks=static.blocks,
      interpret=static.interpret)
  q_len, kv_len = static.problem.q_len, static.problem.kv_len
  dq = dq[:, :q_len, :, :static.qk_dim].astype(q_p.dtype)
  dk = dk[:, :kv_len, :, :static.qk_dim].astype(k_p.dtype)
  dv = dv[:, :kv_len, :, :static.v_dim].astype(v_p.dtype)
  return dq, dk, dv, None  # segment ids are integers: no cotangent


_attention.defvjp(_attention_fwd, _attention_bwd)
