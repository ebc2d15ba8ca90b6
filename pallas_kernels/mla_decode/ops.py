"""Public MLA decode op: picks the backend's kernel, splits long caches over programs and merges the splits.

    out, lse = mla_decode(q, cache, lengths, kv_lora_rank=C, sm_scale=scale)

Decode is memory bound: a step reads every filled cache slot of every row once and does ~2 H (2C + R) FLOPs per
slot. The kernels read only slots 0..lengths[b]-1 of row b (FlashMLA's variable-length decode, for MLA's
absorbed form), so a batch of ragged rollouts costs its filled slots, not batch x cache size. Inference only: no
gradient is defined.
"""

from __future__ import annotations

import functools

import jax
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp

from pallas_kernels.mla_decode import mosaic_kernel
from pallas_kernels.mla_decode import triton_kernel
from pallas_kernels.mla_decode.blocks import MOSAIC
from pallas_kernels.mla_decode.blocks import TRITON
from pallas_kernels.mla_decode.blocks import BlockSizes

_KERNELS = {TRITON: triton_kernel, MOSAIC: mosaic_kernel}


def kernel_backend(interpret) -> str:
  """Mosaic on TPU and for TPU interpret mode (pltpu.InterpretParams), else Triton (GPU, or interpreted)."""
  if jax.default_backend() == 'tpu' or isinstance(interpret, pltpu.InterpretParams):
    return MOSAIC
  return TRITON


def merge_splits(out: jax.Array, lse: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Split-K merge. out [B, P, H, C] float32, each split normalized over its slots; lse [B, P, H] natural log
  (-inf for an empty split) -> out [B, H, C] float32 over all slots, lse [B, H]."""
  total = jax.nn.logsumexp(lse, axis=1)  # -inf when every split is empty
  weights = jnp.exp(lse - jnp.where(jnp.isfinite(total), total, 0.0)[:, None])  # 0 for empty splits
  # A multiply and a sum (one fusion), not an einsum (a batched matmul call for a [P] contraction).
  return jnp.sum(weights[..., None] * out, axis=1), total


@functools.partial(jax.jit, static_argnames=('kv_lora_rank', 'sm_scale', 'interpret', 'block_sizes',
                                             'implementation'))
def mla_decode(q: jax.Array, cache: jax.Array, lengths: jax.Array, *, kv_lora_rank: int, sm_scale: float,
               interpret: bool | pltpu.InterpretParams | None = None, block_sizes: BlockSizes | None = None,
               implementation: str | None = None) -> tuple[jax.Array, jax.Array]:
  """Absorbed MLA decode attention over the latent cache, as a Pallas kernel.

  Same function as `mla_decode_reference` (pallas_kernels/mla_decode/reference.py).

  Args:
    q: [B, H, C + R] absorbed queries (W_k^h q_nope^h, then the rotated q_rope^h), in the compute dtype.
    cache: [B, S, C + R] per slot the normalized latent (C) then the rotated shared rope key (R); same dtype as q.
    lengths: [B] int32: row b attends to slots 0..lengths[b]-1 (clipped to [0, S]); what the other slots hold
      never matters (NaN included).
    kv_lora_rank: C. Triton needs C and R to be multiples of 16.
    sm_scale: logit scale.
    interpret: None compiles for the default backend (Triton on GPU, Mosaic on TPU) and interprets the Triton
      kernel on CPU; True interprets the Triton kernel; a `pltpu.InterpretParams()` runs the Mosaic kernel in TPU
      interpret mode.
    block_sizes: tiles and splits; None takes the backend's defaults.
    implementation: None picks the kernel as above; 'triton' or 'mosaic' forces it.

  Returns:
    out [B, H, C] in cache's dtype (zero for a row of length 0) and lse [B, H] float32, the natural log-sum-exp
    of the scaled logits over the row's slots (-inf for a row of length 0).
  """
  if q.ndim != 3 or cache.ndim != 3 or q.shape[0] != cache.shape[0] or q.shape[2] != cache.shape[2]:
    raise ValueError(f'q must be [B, H, C + R] and cache [B, S, C + R]; got {q.shape} and {cache.shape}')
  if lengths.shape != (q.shape[0],):
    raise ValueError(f'lengths must be [B] = [{q.shape[0]}], got {lengths.shape}')
  batch, num_heads, dim = q.shape
  rope_dim = dim - kv_lora_rank
  if not 0 < kv_lora_rank < dim:
    raise ValueError(f'kv_lora_rank {kv_lora_rank} must lie in (0, {dim}) for slots of {dim} numbers')
  backend = implementation or kernel_backend(interpret)
  if backend not in _KERNELS:
    raise ValueError(f'implementation must be one of {sorted(_KERNELS)} or None, got {implementation!r}')
  if backend == TRITON and (kv_lora_rank % 16 or rope_dim % 16):
    raise ValueError(f'the Triton kernel needs C and R to be multiples of 16, got C={kv_lora_rank}, R={rope_dim}')
  if interpret is None:
    interpret = jax.default_backend() == 'cpu'
  blocks = block_sizes or BlockSizes.for_backend(backend, num_heads, kv_lora_rank, cache.dtype.itemsize, batch)
  padded_heads = -(-num_heads // blocks.block_h) * blocks.block_h
  if padded_heads != num_heads:  # Triton dots need 16 rows; the padded heads' rows are dropped below
    q = jnp.pad(q, ((0, 0), (0, padded_heads - num_heads), (0, 0)))
  num_splits = blocks.splits(batch, padded_heads, kv_lora_rank, cache.shape[1])
  lengths = jnp.clip(lengths.astype(jnp.int32), 0, cache.shape[1])  # the kernels never read past the cache
  out, lse = _KERNELS[backend].forward(
      q.astype(cache.dtype), cache, lengths, latent_dim=kv_lora_rank, sm_scale=float(sm_scale),
      blocks=blocks, num_splits=num_splits, interpret=interpret)
  if backend == TRITON:
    lse = lse / triton_kernel.LOG2_E  # base 2 -> natural
  if num_splits == 1:
    out, lse = out[:, 0], lse[:, 0]
  else:
    out, lse = merge_splits(out, lse)
  return out[:, :num_heads].astype(cache.dtype), lse[:, :num_heads]
