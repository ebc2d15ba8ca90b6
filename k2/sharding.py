"""Logical axis names -> mesh axes.

Every parameter carries `logical_axes` metadata (e.g. ('embed', 'heads', 'head_dim')) and key activations are
constrained with `constrain(x, ('batch', 'seq', 'act_embed'))`. A rules table maps each logical name to mesh axes
(`data`, `fsdp`, `expert`, `tensor`). Outside `use_mesh(...)` nothing is constrained, so one device runs unchanged.

Mesh axes that are missing from the mesh, of size 1, already used by an earlier dimension, or that do not divide
the dimension are dropped (that dimension is replicated over them) rather than failing inside XLA.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from k2.config import ConfigError

MESH_AXES = ('data', 'fsdp', 'expert', 'tensor')

# logical name -> mesh axes, tried in order. Parameters: 'embed' is FSDP-sharded (ZeRO-3), heads/mlp/vocab are
# tensor-parallel, expert stacks are expert-parallel. Activations: the batch is split over every data-like axis.
DEFAULT_RULES: dict[str, tuple[str, ...]] = {
    # parameters
    'vocab': ('tensor',),
    'embed': ('fsdp',),
    'heads': ('tensor',),
    'mlp': ('tensor',),
    'expert': ('expert',),
    'q_lora': ('fsdp',),  # q_b_proj / kv_b_proj: their heads go to 'tensor', their latent side to fsdp
    'kv_lora': ('fsdp',),
    'head_dim': (),
    'norm': (),
    # activations
    'batch': ('data', 'fsdp', 'expert'),
    'seq': (),
    'act_embed': (),
    'act_heads': ('tensor',),
    'act_vocab': ('tensor',),
    'tokens': ('data', 'fsdp', 'expert'),
}


def mesh_shape(axis_sizes: Mapping[str, int]) -> dict[str, int]:
  """{axis: size} over all four K2 axes (absent ones get size 1). Raises ConfigError on unknown axes or sizes < 1."""
  unknown = set(axis_sizes) - set(MESH_AXES)
  if unknown:
    raise ConfigError(f'unknown mesh axes {sorted(unknown)}; known axes: {", ".join(MESH_AXES)}')
  sizes = {name: int(axis_sizes.get(name, 1)) for name in MESH_AXES}
  if any(size < 1 for size in sizes.values()):
    raise ConfigError(f'mesh {dict(axis_sizes)} has a non-positive axis size')
  return sizes


def make_mesh(axis_sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh with all four K2 axes (absent ones get size 1). Raises ConfigError if it does not fit the devices."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = list(mesh_shape(axis_sizes).values())
  if math.prod(sizes) != len(devices):
    raise ConfigError(f'mesh {dict(axis_sizes)} needs {math.prod(sizes)} devices but {len(devices)} are available')
  return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_to_mesh_axes(logical_axes: Sequence[str | None], shape: Sequence[int], axis_sizes: Mapping[str, int],
                         rules: Mapping[str, Sequence[str]] = DEFAULT_RULES) -> tuple[tuple[str, ...], ...]:
  """The mesh axes each dimension of an array of `shape` named `logical_axes` is split over, given only the mesh's
  axis sizes (no devices needed: `k2.plan` sizes meshes far larger than this machine). Dimension i is split into
  prod(axis_sizes[a] for a in result[i]) equal shards; () means replicated."""
  if len(logical_axes) != len(shape):
    raise ValueError(f'logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}')
  used: set[str] = set()
  result = []
  for name, size in zip(logical_axes, shape):
    chosen = []
    for axis in (rules.get(name, ()) if name is not None else ()):
      axis_size = axis_sizes.get(axis, 1)
      if axis in used or axis_size == 1:
        continue
      if size % (math.prod(axis_sizes[a] for a in chosen) * axis_size):
        continue
      chosen.append(axis)
    used.update(chosen)
    result.append(tuple(chosen))
  return tuple(result)


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Mapping[str, Sequence[str]] = DEFAULT_RULES) -> PartitionSpec:
  """PartitionSpec for an array of `shape` whose dimensions are named `logical_axes`."""
  return PartitionSpec(*(axes if len(axes) > 1 else (axes[0] if axes else None)
                         for axes in logical_to_mesh_axes(logical_axes, shape, dict(mesh.shape), rules)))


def variable_sharding(variable: nnx.Variable, mesh: Mesh,
                      rules: Mapping[str, Sequence[str]] = DEFAULT_RULES) -> NamedSharding:
  """NamedSharding of one Variable from its `logical_axes` metadata (replicated if it has none)."""
  axes = variable.get_metadata().get('logical_axes')
  if axes is None:
    return NamedSharding(mesh, PartitionSpec())
  return NamedSharding(mesh, logical_to_spec(axes, variable.shape, mesh, rules))


def state_shardings(state: nnx.State, mesh: Mesh, rules: Mapping[str, Sequence[str]] = DEFAULT_RULES) -> nnx.State:
  """The State's structure with each Variable's value replaced by its NamedSharding (for jit in/out shardings)."""
  return nnx.from_flat_state([(path, variable.replace(variable_sharding(variable, mesh, rules)))
                              for path, variable in nnx.to_flat_state(state)])


def shard_model(model: nnx.Module, mesh: Mesh, rules: Mapping[str, Sequence[str]] = DEFAULT_RULES) -> None:
  """Places every variable of `model` on `mesh` according to its logical axes (in place)."""
  state = nnx.state(model)
  nnx.update(model, nnx.from_flat_state([
      (path, variable.replace(jax.device_put(variable[...], variable_sharding(variable, mesh, rules))))
      for path, variable in nnx.to_flat_state(state)]))


class _Context(threading.local):
  mesh: Mesh | None = None
  rules: Mapping[str, Sequence[str]] = DEFAULT_RULES


_CONTEXT = _Context()


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Mapping[str, Sequence[str]] = DEFAULT_RULES):
  """Activates `mesh` and `rules` for `constrain` (and JAX's own mesh context) inside the block."""
  previous = (_CONTEXT.mesh, _CONTEXT.rules)
  _CONTEXT.mesh, _CONTEXT.rules = mesh, rules
  try:
    with jax.set_mesh(mesh):
      yield mesh
  finally:
    _CONTEXT.mesh, _CONTEXT.rules = previous


def active_mesh() -> tuple[Mesh | None, Mapping[str, Sequence[str]]]:
  """(mesh, rules) of the enclosing `use_mesh` block; mesh is None outside one."""
  return _CONTEXT.mesh, _CONTEXT.rules


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """with_sharding_constraint by logical names; the identity when no mesh is active."""
  mesh = _CONTEXT.mesh
  if mesh is None:
    return x
  spec = logical_to_spec(logical_axes, x.shape, mesh, _CONTEXT.rules)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def param(rngs: nnx.Rngs | None, shape: Sequence[int], logical_axes: Sequence[str | None], dtype,
          stddev: float | None = None, value: float | None = None) -> nnx.Param:
  """A parameter named by logical axes: normal(0, stddev) (default 1/sqrt(fan_in)), or a constant `value`."""
  if len(logical_axes) != len(shape):
    raise ValueError(f'logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}')
  if value is not None:
    data = jax.numpy.full(shape, value, dtype)
  else:
    if stddev is None:
      stddev = shape[0] ** -0.5 if len(shape) > 1 else 1.0
    data = stddev * jax.random.normal(rngs.params(), shape, dtype)
  return nnx.Param(data, logical_axes=tuple(logical_axes))
