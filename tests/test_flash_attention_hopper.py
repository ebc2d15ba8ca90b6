"""The Hopper (Mosaic GPU) flash-attention kernels on a CPU machine.

They need an H100/H200 to run (their numerics are checked there by `experiments/bench_attention.py`, against the
float32 reference, and they compute the same function as the Triton kernels that tests/test_flash_attention.py
checks in interpret mode). Here: the whole op, forward and backward, lowers to three Mosaic GPU kernels for CUDA
over the shapes and masks the model uses, and the tiling and backend choice are what the kernels assume.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.flash_attention import BlockSizes
from pallas_kernels.flash_attention import flash_attention
from pallas_kernels.flash_attention import hopper_kernel
from pallas_kernels.flash_attention import ops


def _lower_for_cuda(batch, seq, heads, kv_heads, qk_dim, v_dim, causal, segmented):
  def loss(q, k, v, segment_ids):
    out, max_logits = flash_attention(q, k, v, causal=causal, segment_ids=segment_ids if segmented else None,
                                      implementation='hopper')
    return jnp.sum(out.astype(jnp.float32) ** 2) + 0.0 * jnp.sum(max_logits)

  spec = lambda *shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype)
  args = (spec(batch, seq, heads, qk_dim), spec(batch, seq, kv_heads, qk_dim), spec(batch, seq, kv_heads, v_dim),
          spec(batch, seq, dtype=jnp.int32))
  lowered = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).trace(*args).lower(lowering_platforms=('cuda',))
  return lowered.as_text()


@pytest.mark.parametrize('batch,seq,heads,kv_heads,qk_dim,v_dim,causal,segmented', [
    (2, 1024, 4, 4, 192, 128, True, True),  # K2's MLA heads, packed documents
    (1, 1000, 4, 2, 128, 128, True, False),  # grouped heads, a length that is padded to the tiles
    (1, 256, 2, 2, 64, 64, False, False),
    (1, 384, 2, 2, 96, 64, True, True),  # k2_small's heads: padded to 128 / 64
])
def test_forward_and_backward_lower_to_three_mosaic_gpu_kernels(batch, seq, heads, kv_heads, qk_dim, v_dim,
                                                                 causal, segmented):
  text = _lower_for_cuda(batch, seq, heads, kv_heads, qk_dim, v_dim, causal, segmented)
  assert text.count('custom_call @mosaic_gpu') == 3  # forward, dK/dV, dQ
  assert 'triton' not in text.lower()


def test_tiles_and_padding():
  blocks = BlockSizes.for_backend('hopper', 4096, 4096, qk_dim=192, v_dim=128)
  assert (blocks.block_q, blocks.block_q_dq, blocks.block_k_dkv) == (128, 128, 128)  # two warpgroups of 64
  assert blocks.block_k == 64  # qk 192: 128-key tiles overflow shared memory with a 2-slot ring
  assert BlockSizes.for_backend('hopper', 4096, 4096, qk_dim=128, v_dim=128).block_k == 128
  assert blocks.fit('hopper', 100, 100) == blocks  # short sequences are padded, not given smaller tiles
  assert blocks.padded_lengths(1000, 1000) == (1024, 1024)


def test_backend_choice_on_this_machine():
  q = jnp.zeros((1, 128, 2, 192), jnp.bfloat16)
  v = jnp.zeros((1, 128, 2, 128), jnp.bfloat16)
  device = jax.devices()[0]
  hopper = jax.default_backend() == 'gpu' and str(getattr(device, 'compute_capability', '')).startswith('9')
  assert hopper_kernel.supported(q, q, v) == hopper
  assert ops.kernel_backend(None, q, q, v) == ('hopper' if hopper else 'triton')
  assert ops.kernel_backend(True, q, q, v) == 'triton'  # interpret mode
  assert not hopper_kernel.supported(q.astype(jnp.float32), q.astype(jnp.float32), v.astype(jnp.float32))
  with pytest.raises(ValueError, match='implementation must be one of'):
    flash_attention(q, q, v, implementation='cudnn')
