"""Sharded Muon (k2.optim.muon, shard_ns) on 8 fake CPU devices: the same update as one device, and no device
running Newton-Schulz on matrices it does not own (read from the compiled per-device HLO).

QK-Clip's max logits need no code of ours to be global: the model reduces them over the batch under jit, and XLA
all-reduces that max across the batch shards; tests/test_sharding.py::test_sharded_forward_matches_one_device
checks them against one device with the batch split over ('data', 'fsdp', 'expert').
"""

import collections
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from k2 import model as model_lib
from k2 import sharding
from k2.config import get_config
from k2.optim import muon
from k2.optim import muon_adamw
from k2.optim.muonclip import _matrix_shape
from k2.optim.muonclip import param_labels
from k2.optim.qk_clip import _path_string

CONFIG = get_config('k2_tiny', vocab_size=512, num_layers=2, dtype='float32')  # a dense and a MoE layer
MESHES = [{'fsdp': 8}, {'fsdp': 2, 'expert': 2, 'tensor': 2}]
NS_STEPS = 5
# Largest element-wise difference of an update from one device's, relative to that update's largest element.
# float32 NS: the same maths on the same matrices, only float32 reductions split or ordered differently (measured
# up to 3e-6, in the AdamW-trained leaves). bfloat16 NS rounds at the same points on every device count (measured
# 5e-8 on CPU); the margin covers a summation-order difference that flips a bf16 rounding inside NS.
TOLERANCE_NS_FLOAT32 = 1e-5
TOLERANCE_NS_BFLOAT16 = 1e-2
# XLA:CPU runs bfloat16 matmuls in float32 and, with excess precision allowed (its default), drops the bfloat16
# roundings between them wherever its fusions let it, differently in the sharded and the one-device programs; the
# bfloat16 comparisons compile both with the roundings Newton-Schulz writes down.
EXACT_ROUNDINGS = {'xla_allow_excess_precision': False}


def _params_and_grads(mesh=None):
  """Random k2_tiny parameters and two steps of random gradients, laid out on `mesh` by k2.sharding's rules (what
  shard_model does; drawn in NumPy from the abstract model, which is much faster than creating it eagerly)."""
  params = nnx.state(model_lib.abstract(CONFIG), nnx.Param)
  layouts = jax.tree.leaves(sharding.state_shardings(params, mesh)) if mesh is not None else None
  rng = np.random.default_rng(0)

  def draw(scale):
    values = [(scale * rng.normal(size=p.shape)).astype(p.dtype) for p in jax.tree.leaves(params)]
    values = [jax.device_put(v, layout) for v, layout in zip(values, layouts)] if layouts else values
    return jax.tree.unflatten(jax.tree.structure(params), values)

  return draw(0.05), [draw(1.0), draw(1.0)]


def _two_steps(optimizer, params, grads_per_step):
  """(updates of each step, the jitted update's compiled executable); params evolve with the updates."""
  state = optimizer.init(params)
  update = jax.jit(optimizer.update)
  compiled = update.lower(grads_per_step[0], state, params).compile()
  all_updates = []
  for grads in grads_per_step:
    updates, state = update(grads, state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
    all_updates.append(updates)
  return all_updates, compiled


@functools.cache
def _run(axes: tuple | None):
  """muon_adamw (float32 Newton-Schulz) on k2_tiny, two steps: on one device (axes None), or with the parameters
  sharded by k2.sharding's rules on the mesh of `axes` ((name, size) pairs, hashable for the cache), active, so
  Muon's shard_ns='auto' splits Newton-Schulz over it. Returns (updates per step, compiled update, params)."""
  optimizer = muon_adamw(0.1, weight_decay=0.1, ns_impl='jnp', ns_dtype=jnp.float32)
  if axes is None:
    params, grads = _params_and_grads()
    return (*_two_steps(optimizer, params, grads), params)
  mesh = sharding.make_mesh(dict(axes))
  params, grads = _params_and_grads(mesh)
  with sharding.use_mesh(mesh):
    return (*_two_steps(optimizer, params, grads), params)


def _assert_same_updates(actual_per_step, expected_per_step, tolerance):
  for actual, expected in zip(actual_per_step, expected_per_step, strict=True):
    for (path, a), e in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected), strict=True):
      a, e = np.asarray(a), np.asarray(e)
      assert np.max(np.abs(a - e)) <= tolerance * np.max(np.abs(e)), _path_string(path)


@pytest.mark.parametrize('axes', MESHES, ids=str)
def test_sharded_update_matches_one_device(axes):
  assert jax.device_count() == 8
  expected, _, _ = _run(None)
  actual, _, params = _run(tuple(axes.items()))
  _assert_same_updates(actual, expected, TOLERANCE_NS_FLOAT32)
  # The updates come back in the parameters' own layout (FSDP/expert/tensor), ready to be added.
  for update, param in zip(jax.tree.leaves(actual[-1]), jax.tree.leaves(params), strict=True):
    assert update.sharding.is_equivalent_to(param.sharding, param.ndim)


def _ns_groups() -> dict[tuple[int, int], int]:
  """{matrix shape [n, m]: number of matrices of that shape} over k2_tiny's Muon parameters (Muon stacks each
  shape into one Newton-Schulz batch)."""
  params = nnx.state(model_lib.abstract(CONFIG), nnx.Param)
  groups: dict[tuple[int, int], int] = {}
  for (path, param), label in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(param_labels(params))):
    if label == 'muon':
      shape = _matrix_shape(_path_string(path), param.shape)
      groups[shape[-2:]] = groups.get(shape[-2:], 0) + math.prod(shape[:-2])
  return groups


def _ns_flops(shape: tuple[int, int]) -> int:
  """Matmul flops of Newton-Schulz on one matrix [n, m], short side s, long side l: per step the Gram matrix of the
  short side (2 s^2 l), its square (2 s^3) and the new X (2 s^2 l)."""
  short, long = min(shape), max(shape)
  return NS_STEPS * (2 * short * short * long + 2 * short ** 3 + 2 * short * short * long)


def _dots(hlo: str) -> list[tuple[tuple[int, ...], int]]:
  """(output shape, flops) of every dot in a compiled (per-device) HLO module."""
  shapes = {name: tuple(int(d) for d in dims.split(',') if d)
            for name, dims in re.findall(r'%([\w.\-]+) = \w+\[([\d,]*)\]', hlo)}
  dots = []
  for out_dims, lhs, contracting in re.findall(
      r'= \w+\[([\d,]*)\]\S* dot\(%([\w.\-]+), %[\w.\-]+\).*?lhs_contracting_dims=\{([\d,]*)\}', hlo):
    out = tuple(int(d) for d in out_dims.split(',') if d)
    depth = math.prod(shapes[lhs][int(d)] for d in contracting.split(','))
    dots.append((out, 2 * math.prod(out) * depth))
  return dots


def _expected_dots(batches: dict[tuple[int, int], int]) -> collections.Counter:
  """Output shapes of the matmuls of Newton-Schulz on `batches[shape]` stacked matrices of each shape: per step
  the Gram matrix of the short side and its square ([short, short]) and the new X (P X or, tall, X P: [n, m]), a
  batch of 1 squeezed away."""
  expected = collections.Counter()
  for shape, batch in batches.items():
    short = min(shape)
    lead = (batch,) if batch > 1 else ()
    expected[lead + (short, short)] += 2 * NS_STEPS
    expected[lead + tuple(shape)] += NS_STEPS
  return expected


@pytest.mark.parametrize('axes', MESHES, ids=str)
def test_each_device_runs_newton_schulz_on_its_share_only(axes):
  """The per-device program of the sharded update multiplies ceil(N / 8) matrices of each shape, not N."""
  devices = jax.device_count()
  groups = _ns_groups()
  share = {shape: -(-count // devices) for shape, count in groups.items()}
  one_device = _dots(_run(None)[1].as_text())
  per_device = _dots(_run(tuple(axes.items()))[1].as_text())
  # The matmuls of the per-device program are exactly Newton-Schulz on each group's share of matrices.
  assert collections.Counter(out for out, _ in per_device) == _expected_dots(share)
  assert collections.Counter(out for out, _ in one_device) == _expected_dots(groups)
  per_device_flops = sum(flops for _, flops in per_device)
  one_device_flops = sum(flops for _, flops in one_device)
  assert per_device_flops == sum(share[shape] * _ns_flops(shape) for shape in groups)
  assert one_device_flops == sum(count * _ns_flops(shape) for shape, count in groups.items())
  # 1/8 of one device's work, up to the padding of groups whose count 8 does not divide.
  assert one_device_flops / 8 <= per_device_flops < one_device_flops / 8 + sum(_ns_flops(shape) for shape in groups)
  print(f'{axes}: NS matmul flops per device {per_device_flops:,}, one device {one_device_flops:,} '
        f'({per_device_flops / one_device_flops:.3f} of it)')


SMALL = {'wide': ((8, 24), jax.P('fsdp', 'tensor')), 'tall': ((40, 12), jax.P('fsdp')),
         'single': ((24, 40), jax.P()), 'experts': ((4, 16, 20), jax.P('expert', 'fsdp')),
         'odd_stack': ((3, 16, 20), jax.P(None, 'tensor'))}


def _small_tree(seed):
  rng = np.random.default_rng(seed)
  return {name: rng.normal(size=shape).astype(np.float32) for name, (shape, _) in SMALL.items()}


@functools.cache
def _small_one_device(ns_dtype, ns_impl):
  optimizer = muon(0.1, weight_decay=0.1, ns_impl=ns_impl, ns_dtype=ns_dtype)
  params, grads = _small_tree(0), _small_tree(1)
  return jax.jit(optimizer.update, compiler_options=EXACT_ROUNDINGS)(grads, optimizer.init(params), params)[0]


@pytest.mark.parametrize('axes, ns_dtype, ns_impl, tolerance', [
    ({'fsdp': 8}, jnp.float32, 'jnp', TOLERANCE_NS_FLOAT32),
    ({'data': 2, 'expert': 2, 'tensor': 2}, jnp.bfloat16, 'jnp', TOLERANCE_NS_BFLOAT16),
    ({'fsdp': 2, 'expert': 4}, jnp.bfloat16, 'pallas', TOLERANCE_NS_BFLOAT16),  # interpreted on CPU
], ids=['fsdp8-float32', 'data2_expert2_tensor2-bfloat16', 'fsdp2_expert4-bfloat16-pallas'])
def test_fewer_matrices_than_devices_odd_stacks_bfloat16_pallas(axes, ns_dtype, ns_impl, tolerance):
  """One [24, 40] matrix on 8 devices, a stack the expert axis does not divide, leaves of one shape laid out
  differently, an axis ('data') every leaf is replicated over; Newton-Schulz in bfloat16 (the reference precision)
  and with the Pallas kernel, each device's share run by shard_map."""
  mesh = sharding.make_mesh(axes)
  place = lambda tree: {name: jax.device_put(x, jax.NamedSharding(mesh, SMALL[name][1])) for name, x in tree.items()}
  params, grads = place(_small_tree(0)), place(_small_tree(1))
  with sharding.use_mesh(mesh):
    optimizer = muon(0.1, weight_decay=0.1, ns_impl=ns_impl, ns_dtype=ns_dtype, shard_ns=True)
    actual, _ = jax.jit(optimizer.update, compiler_options=EXACT_ROUNDINGS)(grads, optimizer.init(params), params)
  _assert_same_updates([actual], [_small_one_device(ns_dtype, ns_impl)], tolerance)


def test_shard_ns_options_are_checked():
  with pytest.raises(ValueError, match='shard_ns'):
    muon(0.1, shard_ns='always')
  params = {'w': jnp.ones((8, 16))}
  optimizer = muon(0.1, shard_ns=True)
  with pytest.raises(ValueError, match='shard_ns=True needs an active mesh'):
    optimizer.update(params, optimizer.init(params), params)
