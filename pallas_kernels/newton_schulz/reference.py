"""Plain-jnp Newton-Schulz: the definition the Pallas kernel is tested against, and Muon's path on GPU and CPU.

Muon (k2/optim/muon.py) orthogonalizes with it wherever the kernel is not used: on an H200, XLA's batched cuBLAS
matmuls beat the Pallas kernels (BENCHMARKS.md, bench_optim), so this is the fast path there too. Each of the
three products of a step is one matmul accumulated in float32 and rounded to the iteration dtype, as a bf16 GEMM
does; the second one carries P's other terms in its epilogue (`_polynomial_by_product`).
"""

import jax
import jax.numpy as jnp

# (a, b, c) of the quintic Newton-Schulz step X <- a X + (b A + c A^2) X, A = X X^T (Keller Jordan's coefficients,
# used unchanged by Moonlight and K2): they maximise the slope at zero, so small singular values grow fast; the
# singular values end in roughly [0.7, 1.2] rather than exactly 1, which does not hurt training.
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def normalized_matrices(x: jax.Array, eps: float, dtype: jnp.dtype) -> jax.Array:
  """The Newton-Schulz starting point X0 = x / (||x||_F + eps) per matrix ([..., n, m], leading axes a batch),
  the norm and the division taken in float32 and rounded once to `dtype`; eps keeps a zero matrix at zero."""
  x = x.astype(jnp.float32)
  frobenius_norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=(-2, -1), keepdims=True))
  return (x / (frobenius_norm + eps)).astype(dtype)


def step_polynomial(gram: jax.Array, gram_squared: jax.Array, coeffs: tuple[float, float, float]) -> jax.Array:
  """P = a I + b A + c A^2 in float32 ([..., n, n]) from A and A^2, so that one step is the single product X <- P X.

  Folding a X into P (a X + B X = (a I + B) X) saves the element-wise pass over X [n, m] that the residual would
  need; P is the smaller [n, n] matrix.
  """
  a, b, c = coeffs
  return _scaled_identity(gram.shape[-1], a) + b * gram.astype(jnp.float32) + c * gram_squared.astype(jnp.float32)


def _scaled_identity(n: int, scale: float) -> jax.Array:
  return jnp.where(jnp.arange(n)[:, None] == jnp.arange(n)[None, :], scale, 0.0)


def _polynomial_by_product(gram: jax.Array, coeffs: tuple[float, float, float]) -> jax.Array:
  """P = c (A A) + (a I + b A) in A's dtype, written as one matmul plus a same-shape addend: XLA's GPU GEMM
  rewriter turns that into one cuBLAS call with alpha = c and beta = 1 (the addend read in its epilogue), so A^2 is
  never written out and read back by a separate element-wise pass. c is taken in A's dtype (2.0315 is 2.03125 in
  bfloat16), as the GEMM's alpha."""
  a, b, c = coeffs  # the Pallas kernel's epilogue (kernel._epilogue) rounds where this does
  addend = (_scaled_identity(gram.shape[-1], a) + b * gram.astype(jnp.float32)).astype(gram.dtype)
  return jnp.matmul(gram, gram, preferred_element_type=gram.dtype) * c + addend


def _is_tall(x: jax.Array) -> bool:
  return x.shape[-2] > x.shape[-1]


def _gram(x: jax.Array, dtype: jnp.dtype) -> jax.Array:
  """X X^T, or X^T X for a tall X (the short side), accumulated in float32 and rounded to `dtype`."""
  transposed = jnp.swapaxes(x, -1, -2)
  return jnp.matmul(transposed, x, preferred_element_type=dtype) if _is_tall(x) else jnp.matmul(
      x, transposed, preferred_element_type=dtype)


def _apply(polynomial: jax.Array, x: jax.Array) -> jax.Array:
  """P X, or X P for a tall X: the same iteration on X^T (P is symmetric), without moving X through a transpose."""
  return jnp.matmul(x, polynomial, preferred_element_type=x.dtype) if _is_tall(x) else jnp.matmul(
      polynomial, x, preferred_element_type=x.dtype)


def normalizing_step(y: jax.Array, coeffs: tuple[float, float, float] = NS_COEFFS, eps: float = 1e-7) -> jax.Array:
  """The first Newton-Schulz step from matrices that are not normalized ([..., n, m], in the iteration dtype):
  X1 of X0 = y / s, s = ||y||_F + eps, without forming X0 or taking norms over y.

  ||y||_F^2 is the trace of the Gram matrix, taken in float32 here, so A = (y y^T) / s^2 (rounded once),
  P = (a I + b A + c A A) / s (formed in float32, rounded once) and X1 = P y. Muon's directions are float32 state:
  cast once to the iteration dtype, they are read once, where normalizing first would read them twice.
  """
  gram = _gram(y, jnp.float32)
  inverse_norm = 1.0 / (jnp.sqrt(jnp.trace(gram, axis1=-2, axis2=-1))[..., None, None] + eps)
  gram = (gram * jnp.square(inverse_norm)).astype(y.dtype)
  gram_squared = jnp.matmul(gram, gram, preferred_element_type=y.dtype)
  return _apply((step_polynomial(gram, gram_squared, coeffs) * inverse_norm).astype(y.dtype), y)


def newton_schulz_steps_reference(matrices: jax.Array, steps: int = 5,
                                  coeffs: tuple[float, float, float] = NS_COEFFS) -> jax.Array:
  """The Newton-Schulz steps on normalized matrices [..., n, m], in their dtype.

  Per step, every product accumulated in float32 and rounded to X's dtype: A = X X^T; P = c (A A) + (a I + b A)
  (`_polynomial_by_product`: c (A A) and a I + b A each rounded, then their sum); X <- P X. The Gram matrix is taken
  on the short side: a tall X (n > m) takes A = X^T X and X <- X P.
  """
  for _ in range(steps):  # unrolled: `steps` is a small static int
    matrices = _apply(_polynomial_by_product(_gram(matrices, matrices.dtype), coeffs), matrices)
  return matrices


def newton_schulz_reference(
    x: jax.Array,
    steps: int = 5,
    coeffs: tuple[float, float, float] = NS_COEFFS,
    eps: float = 1e-7,
    dtype: jnp.dtype = jnp.bfloat16,
) -> jax.Array:
  """Approximate orthogonalization U V^T of x = U S V^T by a quintic Newton-Schulz iteration.

  Every step is a polynomial in X X^T applied to X, so it maps the singular values and keeps the singular vectors:
  X <- a X + (b A + c A A) X with A = X X^T, after X0 = x / (||x||_F + eps) (folded into the first step,
  `normalizing_step`).

  Args:
    x: [..., n, m]; leading axes are a batch of independent matrices (e.g. the experts of a stacked MoE weight).
    steps: number of Newton-Schulz steps (5 in Moonlight and K2; at least 1).
    coeffs: (a, b, c) of the quintic step.
    eps: added to the Frobenius norm before dividing.
    dtype: dtype the iteration runs in; bfloat16 is the reference precision (Moonlight, K2), float32 is allowed.

  Returns:
    [..., n, m] in x's dtype.
  """
  if x.ndim < 2:
    raise ValueError(f'newton_schulz needs [..., n, m] matrices, got shape {x.shape}')
  return from_unnormalized(newton_schulz_steps_reference, x.astype(dtype), steps=steps, coeffs=coeffs,
                           eps=eps).astype(x.dtype)


def from_unnormalized(run_steps, y: jax.Array, *, steps: int, coeffs: tuple[float, float, float],
                      eps: float) -> jax.Array:
  """Newton-Schulz of matrices not normalized yet (in the iteration dtype): `normalizing_step`, then the other
  steps - 1 with `run_steps` (this module's steps, or the Pallas kernel's)."""
  if steps < 1:
    raise ValueError(f'newton_schulz needs at least one step (the first one normalizes), got steps={steps}')
  return run_steps(normalizing_step(y, coeffs, eps), steps=steps - 1, coeffs=coeffs)
