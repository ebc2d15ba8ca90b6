"""Decoupled rotary position embedding with YaRN scaling (DeepSeek-V2 section 2.1.3; YaRN, Peng et al. 2023).

Checkpoints of the DeepSeek-V3 family store the rope slice of q and k with rotation pairs interleaved
(x0, x1), (x2, x3), ...; `apply_rope` rotates those pairs and returns them de-interleaved ([evens | odds]). Queries
and keys get the same permutation, so their dot products are unchanged.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from k2.config import RopeConfig, yarn_mscale


def _yarn_correction_dim(num_rotations: float, dim: int, theta: float, max_positions: int) -> float:
  """The rotary dimension that turns `num_rotations` times over `max_positions` (YaRN section 3.2)."""
  return dim * math.log(max_positions / (num_rotations * 2 * math.pi)) / (2 * math.log(theta))


def rope_frequencies(config: RopeConfig) -> tuple[np.ndarray, float]:
  """Inverse frequencies [head_dim // 2] (float32) and the factor applied to cos/sin.

  With YaRN, high-frequency dimensions (more than beta_fast rotations over the original context) keep their
  frequency, low-frequency ones (fewer than beta_slow) are interpolated by 1/factor, and a linear ramp blends
  between them.
  """
  dim, theta = config.head_dim, config.theta
  exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
  pos_freqs = np.power(np.float32(theta), exponents, dtype=np.float32)
  inv_freq = (1.0 / pos_freqs).astype(np.float32)
  yarn = config.yarn
  if yarn is None:
    return inv_freq, 1.0
  low = math.floor(_yarn_correction_dim(yarn.beta_fast, dim, theta, yarn.original_max_position_embeddings))
  high = math.ceil(_yarn_correction_dim(yarn.beta_slow, dim, theta, yarn.original_max_position_embeddings))
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001  # avoid a zero-width ramp
  ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
  keep = (1 - ramp).astype(np.float32)  # 1: extrapolate (keep the frequency), 0: interpolate
  interpolated = (1.0 / (np.float32(yarn.factor) * pos_freqs)).astype(np.float32)
  inv_freq = (interpolated * (1 - keep) + inv_freq * keep).astype(np.float32)
  if yarn.mscale and yarn.mscale_all_dim:
    attention_factor = yarn_mscale(yarn.factor, yarn.mscale) / yarn_mscale(yarn.factor, yarn.mscale_all_dim)
  else:
    attention_factor = yarn_mscale(yarn.factor, 1.0)
  return inv_freq, attention_factor


def softmax_scale(qk_head_dim: int, config: RopeConfig) -> float:
  """1/sqrt(qk_head_dim), times YaRN's mscale(factor, mscale_all_dim)^2 (DeepSeek-V3's attention correction)."""
  scale = qk_head_dim ** -0.5
  if config.yarn is not None and config.yarn.mscale_all_dim:
    scale *= yarn_mscale(config.yarn.factor, config.yarn.mscale_all_dim) ** 2
  return scale


def apply_rope(x: jax.Array, positions: jax.Array, config: RopeConfig) -> jax.Array:
  """Rotates interleaved pairs. x: [B, T, ..., R] (any head axes), positions: [B, T] -> [B, T, ..., R]."""
  inv_freq, attention_factor = rope_frequencies(config)
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, R/2]
  angles = angles.reshape(angles.shape[:2] + (1,) * (x.ndim - 3) + angles.shape[-1:])
  cos = (jnp.cos(angles) * attention_factor).astype(x.dtype)
  sin = (jnp.sin(angles) * attention_factor).astype(x.dtype)
  x1, x2 = x[..., 0::2], x[..., 1::2]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
