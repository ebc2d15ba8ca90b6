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

Newton-Schulz itself lives beside its kernel in `pallas_kernels/newton_schulz`: the jnp reference (XLA's batched
matmuls, the fast path on GPU) and a Pallas kernel for TPU. Same-shape matrices of all layers and experts run as
one batch (`orthogonalize_by_shape`).

QK-Clip (the "Clip" of MuonClip) runs after this update and lives in its own module.
"""

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from k2.sharding import DEFAULT_RULES
from pallas_kernels.newton_schulz import NS_COEFFS
from pallas_kernels.newton_schulz import newton_schulz_steps
from pallas_kernels.newton_schulz import newton_schulz_steps_reference
from pallas_kernels.newton_schulz.reference import from_unnormalized

NS_IMPLS = ('auto', 'jnp', 'pallas')
SHARD_NS_OPTIONS = ('auto', True, False)
# Mesh axes that split the leading dim of expert stacks [E, n, m] (k2.sharding's 'expert' rule). Sharded Newton-
# Schulz keeps them on that dim and adds the others after them, so expert stacks never move over these axes. Only
# a layout hint: any mesh gives the same update.
STACK_AXES = tuple(DEFAULT_RULES['expert'])
# Added to each matrix's Frobenius norm before dividing by it (keeps a zero matrix at zero).
NS_EPS = 1e-7


def _steps_implementation(ns_impl: str) -> Callable[..., jax.Array]:
  """Newton-Schulz for `ns_impl`, as a function (matrices, *, steps, coeffs, eps) of matrices not normalized yet
  (in the iteration dtype): the reference's first step (`normalizing_step`, which also normalizes), then the
  others with the Pallas kernel ('pallas'; 'auto' on TPU) or the jnp reference ('jnp'; 'auto' elsewhere). The
  kernel has no GPU backend: on an H200, XLA's batched cuBLAS matmuls beat it at Muon's shapes (BENCHMARKS.md)."""
  if ns_impl not in NS_IMPLS:
    raise ValueError(f'muon: ns_impl must be one of {NS_IMPLS}, got {ns_impl!r}')
  if ns_impl == 'auto':
    ns_impl = 'pallas' if jax.default_backend() == 'tpu' else 'jnp'
  return functools.partial(from_unnormalized,
                           newton_schulz_steps if ns_impl == 'pallas' else newton_schulz_steps_reference)


def newton_schulz(
    x: jax.Array,
    steps: int = 5,
    coeffs: tuple[float, float, float] = NS_COEFFS,
    eps: float = NS_EPS,
    dtype: jnp.dtype = jnp.bfloat16,
    ns_impl: str = 'auto',
) -> jax.Array:
  """Approximate orthogonalization U V^T of x = U S V^T ([..., n, m], leading axes a batch of matrices), as Muon
  does it: X0 = x / (||x||_F + eps), then `steps` quintic steps in `dtype`
  (`pallas_kernels.newton_schulz.newton_schulz_reference` defines them). Returns [..., n, m] in x's dtype."""
  if x.ndim < 2:
    raise ValueError(f'newton_schulz needs [..., n, m] matrices, got shape {x.shape}')
  matrices = _steps_implementation(ns_impl)(x.astype(dtype), steps=steps, coeffs=coeffs, eps=eps)
  return matrices.astype(x.dtype)


def orthogonalize_by_shape(tree: optax.Updates, run_steps: Callable[[jax.Array], jax.Array], *,
                           dtype: jnp.dtype, mesh: jax.sharding.AbstractMesh | None = None) -> optax.Updates:
  """Newton-Schulz on every matrix of `tree` ([n, m] or [batch, n, m] leaves), returned in `dtype`.

  Each leaf is cast to `dtype` (`run_steps` normalizes every matrix itself), then all matrices of one
  shape [n, m] are stacked and `run_steps` ([k, n, m] -> same) runs once per shape: a model's layers and experts
  repeat the same shapes (k2_small: over two thousand expert matrices in two shapes), so a few large batched
  matmuls replace one small call per leaf, which would leave an accelerator mostly idle. Only the `dtype` copies
  are stacked, never the float32 inputs, and nothing is transposed (tall matrices take the Gram matrix of their
  columns, see `newton_schulz_steps_reference`).

  With a `mesh` (see `ns_mesh`), each stack is split over all its devices and every device orthogonalizes only
  its own whole matrices (`_orthogonalize_split`); without one, the whole stack is orthogonalized where it is.
  """
  leaves, treedef = jax.tree.flatten(tree)
  groups: dict[tuple[int, int], list[int]] = {}
  starts = []
  for i, leaf in enumerate(leaves):
    starts.append(leaf.reshape(-1, *leaf.shape[-2:]).astype(dtype))
    groups.setdefault(leaf.shape[-2:], []).append(i)
  out = list(leaves)
  for indices in groups.values():
    stacks = [starts[i] for i in indices]
    if mesh is None:
      results = jnp.split(run_steps(jnp.concatenate(stacks)), np.cumsum([len(s) for s in stacks])[:-1])
    else:
      results = _orthogonalize_split(stacks, run_steps, mesh)
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
    ns_impl: 'jnp' (the reference, XLA's batched matmuls), 'pallas' (the Mosaic kernel: TPU, or interpreted on
      CPU) or 'auto' (Pallas on TPU, jnp on GPU and CPU).
    ns_dtype: dtype the Newton-Schulz iteration runs in (bfloat16 is the reference precision).
    shard_ns: split Newton-Schulz over the devices of the active mesh (`k2.sharding.use_mesh`): each device
      orthogonalizes a disjoint share of the whole matrices, moved there and back by all-to-all, instead of every
      device orthogonalizing every matrix. 'auto' (default): when a mesh of several devices is active at trace
      time; True: always (an error without a mesh); False: never. The update is the same either way.

  Returns:
    A GradientTransformation over a pytree whose leaves are all [n, m] or [batch, n, m]. `update` needs `params`
    (for the weight decay) and returns the final update, to be added to params (`optax.apply_updates`).
  """
  _steps_implementation(ns_impl)  # checks ns_impl
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
    run_steps = functools.partial(_steps_implementation(ns_impl), steps=ns_steps, coeffs=ns_coeffs, eps=NS_EPS)

    # XLA fuses the element-wise work into two passes over the float32 state: the momentum with the ns_dtype stacks
    # (read G, M_{t-1}; write M_t and the directions, cast); the update (read O_t in ns_dtype and W_{t-1}).
    # Newton-Schulz runs in between and takes the directions' norms from its first Gram matrices.
    def momentum_step(grad, momentum_buffer):
      new_momentum = momentum * momentum_buffer + grad  # M_t (promoted dtype, cast down only for storage)
      direction = momentum * new_momentum + grad if nesterov else new_momentum
      return direction, new_momentum.astype(momentum_buffer.dtype)

    pairs = jax.tree.map(momentum_step, grads, state.momentum)
    directions, new_momentum = jax.tree.transpose(jax.tree.structure(params), jax.tree.structure((0, 0)), pairs)
    orthogonalized = orthogonalize_by_shape(directions, run_steps, dtype=ns_dtype,
                                            mesh=ns_mesh(shard_ns))

    def leaf_update(direction, param):
      scaled = direction.astype(jnp.float32) * _update_rms_scale(param.shape, rms_scale)
      return (-lr * (scaled + weight_decay * param)).astype(param.dtype)

    updates = jax.tree.map(leaf_update, orthogonalized, params)
    return updates, MuonState(count=optax.safe_increment(state.count), momentum=new_momentum)

  return optax.GradientTransformation(init_fn, update_fn)
