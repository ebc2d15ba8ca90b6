"""Muon, the matrix optimizer inside K2's MuonClip (K2 report Algorithm 1; Moonlight, arXiv 2502.16982).

For every matrix W of shape [n, m] (or every matrix of a stack [batch, n, m], e.g. the experts of a MoE layer, which
are orthogonalized one by one), each step:

    M_t = mu * M_{t-1} + G_t                                      # momentum, mu = 0.95
    O_t = NewtonSchulz(mu * M_t + G_t) * rms_scale * sqrt(max(n, m))  # Nesterov form; rms_scale = 0.2
    W_t = W_{t-1} - lr_t * (O_t + weight_decay * W_{t-1})         # decoupled weight decay

`rms_scale * sqrt(max(n, m))` makes the update RMS about 0.2, AdamW's typical update RMS (Moonlight section 2.2), so
Muon and AdamW parameters can share one learning-rate schedule and weight decay. Non-matrix parameters (embeddings,
output head, norms, biases) are not Muon's business: K2 trains them with AdamW, and `muon` refuses them.

QK-Clip (the "Clip" of MuonClip) runs after this update and lives in its own module.
"""

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

# (a, b, c) of the quintic Newton-Schulz step X <- a X + (b A + c A^2) X, A = X X^T (Keller Jordan's coefficients,
# used unchanged by Moonlight and K2): they maximise the slope at zero, so small singular values grow fast; the
# singular values end in roughly [0.7, 1.2] rather than exactly 1, which does not hurt training.
NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_IMPLS = ('auto', 'jnp', 'pallas')


def normalized_wide_matrices(x: jax.Array, eps: float, dtype: jnp.dtype) -> tuple[jax.Array, bool]:
  """The Newton-Schulz starting point X0 = x / (||x||_F + eps), per matrix, in the wide orientation.

  Args:
    x: [..., n, m]; leading axes are a batch of independent matrices.
    eps: keeps an all-zero matrix at zero instead of NaN.
    dtype: dtype of the returned X0 (the norm itself is taken in float32).

  Returns:
    (X0, transposed): X0 is [..., min(n, m), max(n, m)]; `transposed` says whether x was tall (n > m) and was
    transposed, so the caller transposes the result back.
  """
  transposed = x.shape[-2] > x.shape[-1]
  # Wide orientation: A = X X^T is then the smaller of the two Gram matrices (min(n, m)^2 entries).
  wide = jnp.swapaxes(x, -1, -2) if transposed else x
  wide = wide.astype(jnp.float32)
  frobenius_norm = jnp.sqrt(jnp.sum(jnp.square(wide), axis=(-2, -1), keepdims=True))
  return (wide / (frobenius_norm + eps)).astype(dtype), transposed


def _f32(x: jax.Array) -> jax.Array:
  return x.astype(jnp.float32)


def _matmul_f32(lhs: jax.Array, rhs: jax.Array) -> jax.Array:
  return jnp.matmul(lhs, rhs, preferred_element_type=jnp.float32)


def newton_schulz(
    x: jax.Array,
    steps: int = 5,
    coeffs: tuple[float, float, float] = NS_COEFFS,
    eps: float = 1e-7,
    dtype: jnp.dtype = jnp.bfloat16,
) -> jax.Array:
  """Approximate orthogonalization U V^T of x = U S V^T by a quintic Newton-Schulz iteration (plain-jnp reference).

  Every step is a polynomial in X X^T applied to X, so it maps the singular values and keeps the singular vectors:
  X <- a X + (b A + c A A) X with A = X X^T. X, A and B are held in `dtype`; each product accumulates in float32
  and its linear combination is formed in float32 before one rounding to `dtype` (what a bf16 matmul with a fused
  epilogue does on GPU/TPU, so the numerics do not depend on how XLA fuses the element-wise ops). This is the
  reference for the Pallas kernel in `pallas_kernels/newton_schulz`, which re-exports it.

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
  a, b, c = coeffs
  matrices, transposed = normalized_wide_matrices(x, eps, dtype)
  for _ in range(steps):  # unrolled: `steps` is a small static int
    gram = _matmul_f32(matrices, jnp.swapaxes(matrices, -1, -2)).astype(dtype)  # A = X X^T, [..., n, n], n <= m
    polynomial = (b * _f32(gram) + c * _matmul_f32(gram, gram)).astype(dtype)  # B = b A + c A^2
    matrices = (a * _f32(matrices) + _matmul_f32(polynomial, matrices)).astype(dtype)  # X <- a X + B X
  if transposed:
    matrices = jnp.swapaxes(matrices, -1, -2)
  return matrices.astype(x.dtype)


def _pallas_newton_schulz(x, steps, coeffs, eps, dtype):
  # Imported here, not at the top: pallas_kernels.newton_schulz.reference re-exports `newton_schulz` from this
  # module, so a top-level import would be circular.
  from pallas_kernels.newton_schulz import ops
  return ops.newton_schulz(x, steps=steps, coeffs=coeffs, eps=eps, dtype=dtype)


def _orthogonalizer(ns_impl: str) -> Callable[..., jax.Array]:
  """The Newton-Schulz implementation for `ns_impl`; 'auto' is the Pallas kernel on TPU and jnp elsewhere (on an
  H200 the batched jnp path beats the Triton kernel: BENCHMARKS.md, 74.8 vs 86.1 ms per k2_small step)."""
  if ns_impl == 'auto':
    ns_impl = 'pallas' if jax.default_backend() == 'tpu' else 'jnp'
  return _pallas_newton_schulz if ns_impl == 'pallas' else newton_schulz


def orthogonalize_by_shape(tree: optax.Updates, orthogonalize: Callable[[jax.Array], jax.Array]) -> optax.Updates:
  """Applies `orthogonalize` ([batch, n, m] -> same) once per distinct matrix shape [n, m], to every matrix of
  that shape in `tree` stacked together: a model's layers repeat the same shapes, so a few large batched
  Newton-Schulz calls replace one small call per leaf (which leaves an accelerator mostly idle)."""
  leaves, treedef = jax.tree.flatten(tree)
  groups: dict[tuple[int, ...], list[int]] = {}
  for i, leaf in enumerate(leaves):
    groups.setdefault(leaf.shape[-2:], []).append(i)
  out = list(leaves)
  for shape, indices in groups.items():
    dtype = jnp.result_type(*(leaves[i].dtype for i in indices))
    stacked = jnp.concatenate([leaves[i].reshape(-1, *shape).astype(dtype) for i in indices])
    result, offset = orthogonalize(stacked), 0
    for i in indices:
      count = math.prod(leaves[i].shape[:-2])
      out[i] = result[offset:offset + count].reshape(leaves[i].shape)
      offset += count
  return jax.tree.unflatten(treedef, out)


class MuonState(NamedTuple):
  """count: [] int32, number of updates done (the schedule is read at it); momentum: M_t, one buffer per param."""
  count: jax.Array
  momentum: optax.Updates


def _check_all_matrices(params: optax.Params) -> None:
  for path, param in jax.tree_util.tree_leaves_with_path(params):
    if jnp.ndim(param) < 2:
      raise ValueError(
          f'muon: parameter {jax.tree_util.keystr(path)} has shape {jnp.shape(param)}; Muon only trains matrices '
          '[n, m] and stacks of them [batch, n, m]. Train vectors and scalars (norms, biases) with AdamW, as K2 does.'
      )


def _update_rms_scale(shape: tuple[int, ...], rms_scale: float) -> float:
  """rms_scale * sqrt(max(n, m)) for a [..., n, m] parameter: brings the update RMS to about `rms_scale`.

  An orthogonal n x m matrix has RMS 1 / sqrt(max(n, m)) (Moonlight section 2.2).
  """
  return rms_scale * max(shape[-2], shape[-1]) ** 0.5


def muon(
    learning_rate: optax.ScalarOrSchedule,
    *,
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_steps: int = 5,
    ns_coeffs: tuple[float, float, float] = NS_COEFFS,
    weight_decay: float = 0.0,
    rms_scale: float = 0.2,
    mu_dtype: Any = None,
    ns_impl: str = 'auto',
    ns_dtype: Any = jnp.bfloat16,
) -> optax.GradientTransformation:
  """Muon as one whole optimizer step (momentum, Newton-Schulz, RMS matching, weight decay, learning rate).

  Args:
    learning_rate: a float or an optax schedule of the step count (read before the count is incremented, so the
      first update uses `learning_rate(0)`, as in optax).
    momentum: mu of M_t = mu M_{t-1} + G_t (a plain sum, no (1 - mu) factor and no bias correction).
    nesterov: orthogonalize mu M_t + G_t (Moonlight, K2) instead of M_t.
    ns_steps: Newton-Schulz steps.
    ns_coeffs: (a, b, c) of the Newton-Schulz step.
    weight_decay: decoupled weight decay, multiplied by the learning rate (0.1 in K2 pre-training).
    rms_scale: target update RMS; the orthogonalized update is scaled by rms_scale * sqrt(max(n, m)).
    mu_dtype: dtype of the momentum buffers; None keeps each parameter's dtype.
    ns_impl: 'jnp' (reference), 'pallas' (fused kernel) or 'auto' (Pallas on TPU, jnp on GPU and CPU).
    ns_dtype: dtype the Newton-Schulz iteration runs in (bfloat16 is the reference precision).

  Returns:
    A GradientTransformation over a pytree whose leaves are all [n, m] or [batch, n, m]. `update` needs `params`
    (for the weight decay) and returns the final update, to be added to params (`optax.apply_updates`).
  """
  if ns_impl not in NS_IMPLS:
    raise ValueError(f'muon: ns_impl must be one of {NS_IMPLS}, got {ns_impl!r}')

  def init_fn(params):
    _check_all_matrices(params)
    momentum_buffers = jax.tree.map(lambda p: jnp.zeros_like(p, dtype=mu_dtype), params)
    return MuonState(count=jnp.zeros([], jnp.int32), momentum=momentum_buffers)

  def update_fn(grads, state, params=None):
    if params is None:
      raise ValueError('muon: update needs params (decoupled weight decay W_t uses W_{t-1}); call '
                       'optimizer.update(grads, state, params)')
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    orthogonalize = _orthogonalizer(ns_impl)

    def momentum_step(grad, momentum_buffer):
      new_momentum = momentum * momentum_buffer + grad  # M_t (promoted dtype, cast down only for storage)
      direction = momentum * new_momentum + grad if nesterov else new_momentum
      return direction, new_momentum.astype(momentum_buffer.dtype)

    pairs = jax.tree.map(momentum_step, grads, state.momentum)
    directions, new_momentum = jax.tree.transpose(jax.tree.structure(params), jax.tree.structure((0, 0)), pairs)
    orthogonalized = orthogonalize_by_shape(
        directions, lambda x: orthogonalize(x, steps=ns_steps, coeffs=ns_coeffs, eps=1e-7, dtype=ns_dtype))

    def leaf_update(direction, param):
      scaled = direction.astype(jnp.float32) * _update_rms_scale(param.shape, rms_scale)
      return (-lr * (scaled + weight_decay * param)).astype(param.dtype)

    updates = jax.tree.map(leaf_update, orthogonalized, params)
    return updates, MuonState(count=optax.safe_increment(state.count), momentum=new_momentum)

  return optax.GradientTransformation(init_fn, update_fn)
