"""Public Newton-Schulz op: normalize, orient, pad, then run the Pallas kernels of `kernel.py`.

Muon never differentiates through Newton-Schulz (it orthogonalizes a gradient-momentum buffer), so, unlike most
ops in pallas_kernels/, this one has no custom_vjp and no backward kernel; jax.grad through it raises.
"""

import functools

import jax
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp

from k2.optim.muon import NS_COEFFS
from k2.optim.muon import normalized_wide_matrices
from pallas_kernels.newton_schulz import kernel
from pallas_kernels.newton_schulz.kernel import BlockSizes


def _kernel_backend(interpret) -> str:
  """Mosaic on TPU and for TPU interpret mode (pltpu.InterpretParams); Triton on GPU and for plain interpret mode."""
  if jax.default_backend() == 'tpu' or isinstance(interpret, pltpu.InterpretParams):
    return kernel.MOSAIC
  return kernel.TRITON


@functools.partial(jax.jit, static_argnames=('steps', 'coeffs', 'eps', 'interpret', 'block_sizes', 'dtype'))
def newton_schulz(
    x: jax.Array,
    steps: int = 5,
    coeffs: tuple[float, float, float] = NS_COEFFS,
    eps: float = 1e-7,
    interpret: bool | pltpu.InterpretParams | None = None,
    block_sizes: BlockSizes | None = None,
    dtype: jnp.dtype = jnp.bfloat16,
) -> jax.Array:
  """Newton-Schulz orthogonalization of a stack of matrices with fused Pallas kernels.

  Same maths as `k2.optim.newton_schulz` (the reference): X0 = x / (||x||_F + eps) per matrix in the wide
  orientation, then `steps` times X <- a X + (b A + c A A) X with A = X X^T. Tall matrices are transposed; sides
  are zero-padded to the tile sizes, which is exact because each step is a polynomial in X X^T applied to X: zero
  rows and columns of X stay zero and never touch the others.

  Args:
    x: [..., n, m]; leading axes are a batch of independent matrices.
    steps: Newton-Schulz steps.
    coeffs: (a, b, c) of the quintic step.
    eps: added to the Frobenius norm.
    interpret: None runs the compiled kernel on GPU (Triton) and TPU (Mosaic) and the interpreter on CPU; True
      interprets the Triton kernel; a `pltpu.InterpretParams()` runs the Mosaic kernel in TPU interpret mode.
    block_sizes: tile sizes; None takes the backend's defaults.
    dtype: dtype the iteration runs in (bfloat16, the reference precision, or float32); products accumulate in
      float32.

  Returns:
    [..., n, m] in x's dtype.
  """
  if x.ndim < 2:
    raise ValueError(f'newton_schulz needs [..., n, m] matrices, got shape {x.shape}')
  backend = _kernel_backend(interpret)
  if interpret is None:
    interpret = jax.default_backend() == 'cpu'
  block_sizes = block_sizes or BlockSizes.for_backend(backend)

  matrices, transposed = normalized_wide_matrices(x, eps, dtype)
  *batch_shape, rows, cols = matrices.shape
  padded_rows, padded_cols = (kernel.padded_size(size, backend, block_sizes) for size in (rows, cols))
  stack = jnp.pad(matrices.reshape(-1, rows, cols), ((0, 0), (0, padded_rows - rows), (0, padded_cols - cols)))

  fits_on_chip = max(padded_rows, padded_cols) <= block_sizes.fused_max_dim
  run_steps = kernel.fused_steps if fits_on_chip else kernel.tiled_steps
  stack = run_steps(stack, steps=steps, coeffs=coeffs, backend=backend, block_sizes=block_sizes,
                    interpret=interpret)

  matrices = stack[:, :rows, :cols].reshape(*batch_shape, rows, cols)
  if transposed:
    matrices = jnp.swapaxes(matrices, -1, -2)
  return matrices.astype(x.dtype)
