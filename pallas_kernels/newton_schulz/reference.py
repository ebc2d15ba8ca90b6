"""Plain-jnp Newton-Schulz: the definition the Pallas kernel is tested against, and Muon's path on GPU and CPU.

Muon (k2/optim/muon.py) orthogonalizes with it wherever the kernel is not used: on an H200, XLA's batched cuBLAS
matmuls beat the Pallas kernels (BENCHMARKS.md, bench_optim), so this is the fast path there too. Each of the
three products of a step is one matmul whose float32 accumulation is rounded once to the iteration dtype, as a
bf16 GEMM with a float32 epilogue does, so the rounding points do not depend on how XLA fuses the element-wise ops.
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
  """P = a I + b A + c A^2 in float32 ([..., n, n]) from A and A^2 in the iteration dtype, so that one step is the
  single product X <- P X.

  Folding a X into P (a X + B X = (a I + B) X) saves the element-wise pass over X [n, m] that the residual would
  need; P is the smaller [n, n] matrix.
  """
  a, b, c = coeffs
  n = gram.shape[-1]
  identity = jnp.arange(n)[:, None] == jnp.arange(n)[None, :]
  return jnp.where(identity, a, 0.0) + b * gram.astype(jnp.float32) + c * gram_squared.astype(jnp.float32)


def newton_schulz_steps_reference(matrices: jax.Array, steps: int = 5,
                                  coeffs: tuple[float, float, float] = NS_COEFFS) -> jax.Array:
  """The Newton-Schulz steps on normalized matrices [..., n, m], in their dtype.

  Per step, every product accumulated in float32 and rounded once to X's dtype, as a plain bf16 implementation
  does: A = X X^T; A A; P = a I + b A + c A A (formed in float32, rounded once); X <- P X. The Gram matrix is taken
  on the short side: a tall X (n > m) takes A = X^T X and X <- X P, which is the same iteration on X^T (P is
  symmetric) without moving X through a transpose.
  """
  dtype = matrices.dtype
  tall = matrices.shape[-2] > matrices.shape[-1]
  transpose = lambda x: jnp.swapaxes(x, -1, -2)
  for _ in range(steps):  # unrolled: `steps` is a small static int
    if tall:
      gram = jnp.matmul(transpose(matrices), matrices, preferred_element_type=dtype)
    else:
      gram = jnp.matmul(matrices, transpose(matrices), preferred_element_type=dtype)
    gram_squared = jnp.matmul(gram, gram, preferred_element_type=dtype)
    polynomial = step_polynomial(gram, gram_squared, coeffs).astype(dtype)
    if tall:
      matrices = jnp.matmul(matrices, polynomial, preferred_element_type=dtype)
    else:
      matrices = jnp.matmul(polynomial, matrices, preferred_element_type=dtype)
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
  X <- a X + (b A + c A A) X with A = X X^T, after X0 = x / (||x||_F + eps).

  Args:
    x: [..., n, m]; leading axes are a batch of independent matrices (e.g. the experts of a stacked MoE weight).
    steps: number of Newton-Schulz steps (5 in Moonlight and K2).
    coeffs: (a, b, c) of the quintic step.
    eps: added to the Frobenius norm before dividing.
    dtype: dtype the iteration runs in; bfloat16 is the reference precision (Moonlight, K2), float32 is allowed.

  Returns:
    [..., n, m] in x's dtype.
  """
  if x.ndim < 2:
    raise ValueError(f'newton_schulz needs [..., n, m] matrices, got shape {x.shape}')
  matrices = newton_schulz_steps_reference(normalized_matrices(x, eps, dtype), steps, coeffs)
  return matrices.astype(x.dtype)
