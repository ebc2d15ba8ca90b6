"""Muon, the matrix optimizer inside K2's MuonClip (K2 report Algorithm 1; Moonlight, arXiv 2502.16982).

For every matrix W of shape [n, m] (or every matrix of a stack [batch, n, m], e.g. the experts of a MoE layer, which
are orthogonalized one by one), each step:

    M_t = mu * M_{t-1} + G_t                                      # momentum, mu = 0.95
    O_t = NewtonSchulz(mu * M_t + G_t) * rms_scale * sqrt(max(n, m))  # Nesterov form; rms_scale = 0.2
    W_t = W_{t-1} - lr_t * (O_t + weight_decay * W_{t-1})         # decoupled weight decay

`rms_scale * sqrt(max(n, m))` makes the update RMS about 0.2, AdamW's typical update RMS (Moonlight section 2.2), so
Muon and AdamW parameters can share one learning-rate schedule and weight decay. Non-matrix parameters (embeddings,
output head, norms, biases) are not Muon's business: K2 trains them with AdamW, and `muon` refuses them.

On a mesh (`k2.sharding.use_mesh`), Newton-Schulz is split over the devices (`shard_ns`, on by default there): the
matrices of each shape are dealt out, whole, to the devices with all-to-alls, each device orthogonalizes only its
own share, and the results go back to the parameters' layout (`_orthogonalize_split`). Without the split, every
device would gather and orthogonalize every matrix.

QK-Clip (the "Clip" of MuonClip) runs after this update and lives in its own module.
"""

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from k2.sharding import DEFAULT_RULES

# (a, b, c) of the quintic Newton-Schulz step X <- a X + (b A + c A^2) X, A = X X^T (Keller Jordan's coefficients,
# used unchanged by Moonlight and K2): they maximise the slope at zero, so small singular values grow fast; the
# singular values end in roughly [0.7, 1.2] rather than exactly 1, which does not hurt training.
NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_IMPLS = ('auto', 'jnp', 'pallas')
SHARD_NS_OPTIONS = ('auto', True, False)
# Mesh axes that split the leading dim of expert stacks [E, n, m] (k2.sharding's 'expert' rule). Sharded Newton-
# Schulz keeps them on that dim and adds the others after them, so expert stacks never move over these axes. Only
# a layout hint: any mesh gives the same update.
STACK_AXES = tuple(DEFAULT_RULES['expert'])


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


def orthogonalize_by_shape(tree: optax.Updates, orthogonalize: Callable[[jax.Array], jax.Array],
                           mesh: jax.sharding.AbstractMesh | None = None) -> optax.Updates:
  """Applies `orthogonalize` ([batch, n, m] -> same) once per distinct matrix shape [n, m], to every matrix of
  that shape in `tree` stacked together: a model's layers repeat the same shapes, so a few large batched
  Newton-Schulz calls replace one small call per leaf (which leaves an accelerator mostly idle).

  With a `mesh` (see `ns_mesh`), each stack is split over all its devices and every device orthogonalizes only
  its own whole matrices (`_orthogonalize_split`); without one, the whole stack is orthogonalized where it is.
  """
  leaves, treedef = jax.tree.flatten(tree)
  groups: dict[tuple[int, ...], list[int]] = {}
  for i, leaf in enumerate(leaves):
    groups.setdefault(leaf.shape[-2:], []).append(i)
  out = list(leaves)
  for shape, indices in groups.items():
    dtype = jnp.result_type(*(leaves[i].dtype for i in indices))
    stacks = [leaves[i].reshape(-1, *shape).astype(dtype) for i in indices]
    if mesh is None:
      results = jnp.split(orthogonalize(jnp.concatenate(stacks)), np.cumsum([len(s) for s in stacks])[:-1])
    else:
      results = _orthogonalize_split(stacks, orthogonalize, mesh)
    for i, result in zip(indices, results):
      out[i] = result.reshape(leaves[i].shape)
  return jax.tree.unflatten(treedef, out)


def ns_mesh(shard_ns: bool | str = 'auto') -> jax.sharding.AbstractMesh | None:
  """The mesh Newton-Schulz is split over: JAX's current mesh (`k2.sharding.use_mesh` / `jax.set_mesh`), or None
  (every device runs Newton-Schulz on the matrices it is given, as on one device).

  shard_ns: True needs a mesh whose axes are all Auto (k2.sharding.make_mesh's); 'auto' splits when such a mesh
  with more than one device is active; False never splits.
  """
  if shard_ns not in SHARD_NS_OPTIONS:
    raise ValueError(f'muon: shard_ns must be one of {SHARD_NS_OPTIONS}, got {shard_ns!r}')
  mesh = jax.sharding.get_abstract_mesh()
  usable = not mesh.empty and all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  if shard_ns is True and not usable:
    raise ValueError('muon: shard_ns=True needs an active mesh with Auto axes (k2.sharding.use_mesh(mesh)); '
                     f'the current mesh is {mesh}')
  return mesh if shard_ns and usable and mesh.size > 1 else None


def _split_leading(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
  """x [k, n, m] with k split over the mesh `axes` (k % their size == 0); n and m are left open, so they keep the
  mesh axes they had (minus `axes`), as XLA propagates them."""
  open_dims = [jax.P.UNCONSTRAINED] * (x.ndim - 1)
  return jax.lax.with_sharding_constraint(x, jax.P(axes or None, *open_dims))


def _pad_leading(x: jax.Array, size: int) -> jax.Array:
  return jnp.pad(x, [(0, size - x.shape[0])] + [(0, 0)] * (x.ndim - 1)) if size > x.shape[0] else x


def _orthogonalize_split(stacks: list[jax.Array], orthogonalize: Callable[[jax.Array], jax.Array],
                         mesh: jax.sharding.AbstractMesh) -> list[jax.Array]:
  """Orthogonalizes `stacks` (each [k_i, n, m], one matrix shape) with every device of `mesh` running Newton-Schulz
  on its own disjoint share of ceil(sum k_i / devices) whole matrices (zero matrices pad the shares; NS maps 0 to 0).

  Parameters arrive FSDP/tensor-split inside each matrix (and expert stacks expert-split over k), while NS needs
  whole matrices. They are moved there and back one mesh axis at a time: each step takes one axis off the matrix
  dims and puts it on the stack dim, which XLA lowers to one all-to-all over that axis (an axis the matrices are
  replicated over is only sliced). Moving several axes in one constraint would make XLA gather whole stacks on
  every device instead. So each device only ever holds its share of a stack, except where the parameters
  themselves are replicated over an axis: there the way back all-gathers the update over it, as it must (with the
  zero matrices that pad the stack, fewer than `devices` per shape).

  1. Stacks whose leading dim divides the STACK_AXES split X (expert stacks, split that way already) are viewed as
     [X, k_i / X, n, m]; the others (2-D matrices) are joined, padded to a multiple of X and viewed alike. The views
     are joined on their second dim, which moves no data: [X, K, n, m], K padded to a multiple of devices / X.
  2. The [X * K, n, m] stack takes the other mesh axes onto its leading dim, one step each.
  3. Newton-Schulz runs inside shard_map, on each device's [X * K / devices, n, m] share only.
  4. Steps 2 and 1 backwards.
  """
  stack_axes = tuple(a for a in STACK_AXES if mesh.shape.get(a, 1) > 1)
  other_axes = tuple(a for a in mesh.axis_names if a not in stack_axes and mesh.shape[a] > 1)
  stack_split = math.prod(mesh.shape[a] for a in stack_axes)
  other_split = math.prod(mesh.shape[a] for a in other_axes)
  n, m = stacks[0].shape[-2:]

  split_ids = [i for i, stack in enumerate(stacks) if len(stack) % stack_split == 0]
  joined_ids = [i for i, stack in enumerate(stacks) if len(stack) % stack_split]
  pieces = [stacks[i] for i in split_ids]
  if joined_ids:  # their leading dims are not split, so concatenating them is local
    joined = jnp.concatenate([stacks[i] for i in joined_ids])
    pieces.append(_pad_leading(joined, -(-len(joined) // stack_split) * stack_split))
  views = [_split_leading(piece, stack_axes).reshape(stack_split, -1, n, m) for piece in pieces]
  sizes = [view.shape[1] for view in views]
  combined = jnp.concatenate(views, axis=1)  # [X, K, n, m]
  per_split = -(-combined.shape[1] // other_split) * other_split
  combined = jnp.pad(combined, [(0, 0), (0, per_split - combined.shape[1]), (0, 0), (0, 0)])
  combined = _split_leading(combined.reshape(stack_split * per_split, n, m), stack_axes)

  axes = stack_axes
  for axis in other_axes:
    axes += (axis,)
    combined = _split_leading(combined, axes)
  spec = jax.P(axes)
  # check_vma=False: the Pallas kernel's pallas_call does not declare how its output varies over mesh axes; every
  # output block is this device's own (out_specs = in_specs), so there is nothing to check.
  result = jax.shard_map(orthogonalize, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False)(combined)
  for count in reversed(range(len(other_axes))):
    result = _split_leading(result, axes[:len(stack_axes) + count])

  result = result.reshape(stack_split, per_split, n, m)
  bounds = np.cumsum([0] + sizes)
  pieces = [_split_leading(result[:, start:stop].reshape(-1, n, m), stack_axes)
            for start, stop in zip(bounds[:-1], bounds[1:])]
  results = dict(zip(split_ids, pieces))
  if joined_ids:  # all-gathered over the STACK_AXES: a 2-D parameter is replicated over them
    counts = [len(stacks[i]) for i in joined_ids]
    joined = _split_leading(pieces[-1], ())[:sum(counts)]
    results.update(zip(joined_ids, jnp.split(joined, np.cumsum(counts)[:-1])))
  return [results[i] for i in range(len(stacks))]


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
    shard_ns: bool | str = 'auto',
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
    shard_ns: split Newton-Schulz over the devices of the active mesh (`k2.sharding.use_mesh`): each device
      orthogonalizes a disjoint share of the whole matrices, moved there and back by all-to-all, instead of every
      device orthogonalizing every matrix. 'auto' (default): when a mesh of several devices is active at trace
      time; True: always (an error without a mesh); False: never. The update is the same either way.

  Returns:
    A GradientTransformation over a pytree whose leaves are all [n, m] or [batch, n, m]. `update` needs `params`
    (for the weight decay) and returns the final update, to be added to params (`optax.apply_updates`).
  """
  if ns_impl not in NS_IMPLS:
    raise ValueError(f'muon: ns_impl must be one of {NS_IMPLS}, got {ns_impl!r}')
  if shard_ns not in SHARD_NS_OPTIONS:
    raise ValueError(f'muon: shard_ns must be one of {SHARD_NS_OPTIONS}, got {shard_ns!r}')

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
        directions, lambda x: orthogonalize(x, steps=ns_steps, coeffs=ns_coeffs, eps=1e-7, dtype=ns_dtype),
        ns_mesh(shard_ns))

    def leaf_update(direction, param):
      scaled = direction.astype(jnp.float32) * _update_rms_scale(param.shape, rms_scale)
      return (-lr * (scaled + weight_decay * param)).astype(param.dtype)

    updates = jax.tree.map(leaf_update, orthogonalized, params)
    return updates, MuonState(count=optax.safe_increment(state.count), momentum=new_momentum)

  return optax.GradientTransformation(init_fn, update_fn)
