"""Public Newton-Schulz ops: normalize, orient and pad, then run the Pallas (Mosaic) kernels of `kernel.py`.

Muon never differentiates through Newton-Schulz (it orthogonalizes a gradient-momentum buffer), so, unlike most
ops in pallas_kernels/, these have no custom_vjp and no backward kernel; jax.grad through them raises.
"""

import functools

import jax
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp

from pallas_kernels.newton_schulz import kernel
from pallas_kernels.newton_schulz.kernel import BlockSizes
from pallas_kernels.newton_schulz.reference import NS_COEFFS
from pallas_kernels.newton_schulz.reference import from_unnormalized


def _interpret_mode(interpret):
  """The kernel runs compiled on TPU and in TPU interpret mode on CPU (`interpret=True` forces that anywhere)."""
  if interpret is None:
    backend = jax.default_backend()
    if backend == 'gpu':
      raise ValueError('newton_schulz: the Pallas kernel has no GPU backend (XLA\'s batched matmuls are faster on '
                       'an H200; BENCHMARKS.md). Use the jnp path: muon(ns_impl=\'jnp\') or \'auto\'.')
    interpret = backend != 'tpu'
  return pltpu.InterpretParams() if interpret is True else interpret


@functools.partial(jax.jit, static_argnames=('steps', 'coeffs', 'interpret', 'block_sizes'))
def newton_schulz_steps(
    matrices: jax.Array,
    steps: int = 5,
    coeffs: tuple[float, float, float] = NS_COEFFS,
    interpret: bool | pltpu.InterpretParams | None = None,
    block_sizes: BlockSizes | None = None,
) -> jax.Array:
  """The Newton-Schulz steps on normalized matrices [..., n, m] with the Pallas kernels.

  Same maths and rounding points as `newton_schulz_steps_reference`. The kernels work on the wide orientation
  (a tall stack is transposed there and back). Sides are zero-padded to the tile sizes, which is exact because each
  step is a polynomial in X X^T applied to X: zero rows and columns of X stay zero and never touch the others.

  Args:
    matrices: [..., n, m], already divided by their Frobenius norm, in the iteration dtype.
    steps: Newton-Schulz steps.
    coeffs: (a, b, c) of the quintic step.
    interpret: None runs the compiled kernel on TPU and TPU interpret mode on CPU (an error on GPU); True, or a
      `pltpu.InterpretParams()`, interprets it anywhere.
    block_sizes: tile sizes; None takes the defaults.

  Returns:
    [..., n, m] in matrices' dtype.
  """
  interpret = _interpret_mode(interpret)
  block_sizes = block_sizes or BlockSizes()
  if matrices.shape[-2] > matrices.shape[-1]:
    wide = jnp.swapaxes(matrices, -1, -2)
    wide = newton_schulz_steps(wide, steps=steps, coeffs=coeffs, interpret=interpret, block_sizes=block_sizes)
    return jnp.swapaxes(wide, -1, -2)
  *batch_shape, rows, cols = matrices.shape
  padded_rows, padded_cols = (kernel.padded_size(size, block_sizes) for size in (rows, cols))
  stack = jnp.pad(matrices.reshape(-1, rows, cols), ((0, 0), (0, padded_rows - rows), (0, padded_cols - cols)))
  fits_on_chip = max(padded_rows, padded_cols) <= block_sizes.fused_max_dim
  run_steps = kernel.fused_steps if fits_on_chip else kernel.tiled_steps
  stack = run_steps(stack, steps=steps, coeffs=coeffs, block_sizes=block_sizes, interpret=interpret)
  return stack[:, :rows, :cols].reshape(*batch_shape, rows, cols)


def newton_schulz(
    x: jax.Array,
    steps: int = 5,
    coeffs: tuple[float, float, float] = NS_COEFFS,
    eps: float = 1e-7,
    interpret: bool | pltpu.InterpretParams | None = None,
    block_sizes: BlockSizes | None = None,
    dtype: jnp.dtype = jnp.bfloat16,
) -> jax.Array:
  """Newton-Schulz orthogonalization of a stack of matrices with the Pallas kernels.

  Same maths as `newton_schulz_reference`: X0 = x / (||x||_F + eps) per matrix, then `steps` times
  X <- (a I + b A + c A A) X with A = X X^T. The first step, which also normalizes, is the reference's
  (`normalizing_step`, XLA's matmuls); the kernels run the others.

  Args:
    x: [..., n, m]; leading axes are a batch of independent matrices.
    steps, coeffs, interpret, block_sizes: as in `newton_schulz_steps`.
    eps: added to the Frobenius norm.
    dtype: dtype the iteration runs in (bfloat16, the reference precision, or float32); products accumulate in
      float32.

  Returns:
    [..., n, m] in x's dtype.
  """
  if x.ndim < 2:
    raise ValueError(f'newton_schulz needs [..., n, m] matrices, got shape {x.shape}')
  run_steps = functools.partial(newton_schulz_steps, interpret=interpret, block_sizes=block_sizes)
  return from_unnormalized(run_steps, x.astype(dtype), steps=steps, coeffs=coeffs, eps=eps).astype(x.dtype)
