"""Benchmark: one optimizer step on k2_small's parameters, ours against optax.contrib.muon, in one run.

    python -m experiments.bench_optim --out=BENCHMARKS_optim.md

Timed (median of --iters jitted calls, after warm-up, arrays on the default device):
  * muon/jnp      k2.optim.muon on every Muon-labelled matrix (matrix views, expert stacks batched), jnp NS
  * muon/pallas   the same with the Pallas Newton-Schulz kernel
  * muon/jnp, fp32 NS   the same in float32 (optax iterates in the momentum's dtype, float32 here)
  * optax         optax.contrib.muon on the same matrices (expert stacks as batches via dimension numbers,
                  consistent_rms=0.2 so the update scale is ours)
  * muonclip/*    the whole MuonClip update (Muon + AdamW over the full parameter tree)
Also checked in the same run: ours (jnp vs pallas) agree, and our first step equals optax's first step (their
momentum forms coincide at step 1).
"""

from __future__ import annotations

import datetime
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx

from k2 import model as model_lib
from k2.config import get_config
from k2.optim import muon, muonclip, param_labels
from k2.optim.muonclip import _matrix_shape
from k2.optim.qk_clip import _path_string

_MODEL = flags.DEFINE_string('model', 'k2_small', 'Model variant whose parameters are optimized.')
_ITERS = flags.DEFINE_integer('iters', 10, 'Timed iterations per candidate.')
_OUT = flags.DEFINE_string('out', 'BENCHMARKS_optim.md', 'Markdown file the results are written to.')


def time_ms(fn, *args, iters: int) -> float:
  jax.block_until_ready(fn(*args))  # compile + warm-up
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - start) * 1e3)
  return statistics.median(times)


def random_like(tree, seed):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [0.02 * jax.random.normal(k, x.shape, jnp.float32) for k, x in zip(keys, leaves)])


def main(argv):
  del argv
  config = get_config(_MODEL.value)
  abstract = nnx.state(model_lib.abstract(config), nnx.Param)
  params = nnx.to_pure_dict(random_like(abstract, 0))
  grads = nnx.to_pure_dict(random_like(abstract, 1))
  labels = param_labels(params)

  # The Muon part as matrix views: a flat dict name -> [n, m] or [E, n, m].
  flat_params = {_path_string(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  flat_grads = {_path_string(p): x for p, x in jax.tree_util.tree_flatten_with_path(grads)[0]}
  flat_labels = {_path_string(p): x for p, x in jax.tree_util.tree_flatten_with_path(labels)[0]}
  names = sorted(n for n, label in flat_labels.items() if label == 'muon')
  mat_params = {n: flat_params[n].reshape(_matrix_shape(n, flat_params[n].shape)) for n in names}
  mat_grads = {n: flat_grads[n].reshape(_matrix_shape(n, flat_grads[n].shape)) for n in names}
  num_muon = sum(x.size for x in mat_params.values())

  dims = {n: optax.contrib.MuonDimensionNumbers(reduction_axis=x.ndim - 2, output_axis=x.ndim - 1)
          for n, x in mat_params.items()}
  candidates = {
      'muon/jnp': muon(1e-3, ns_impl='jnp'),
      'muon/pallas': muon(1e-3, ns_impl='pallas'),
      'muon/jnp, fp32 NS': muon(1e-3, ns_impl='jnp', ns_dtype=jnp.float32),
      'optax.contrib.muon': optax.contrib.muon(1e-3, consistent_rms=0.2, eps=1e-7,
                                               muon_weight_dimension_numbers=dims),
  }
  results, updates = {}, {}
  for name, tx in candidates.items():
    state = tx.init(mat_params)
    step = jax.jit(lambda g, s, p, tx=tx: tx.update(g, s, p)[0])
    results[name] = time_ms(step, mat_grads, state, mat_params, iters=_ITERS.value)
    updates[name] = step(mat_grads, state, mat_params)
    print(f'{name:24s} {results[name]:8.2f} ms', flush=True)
  for impl in ('jnp', 'pallas'):
    tx = muonclip(1e-3, ns_impl=impl)
    state = tx.init(params)
    step = jax.jit(lambda g, s, p, tx=tx: tx.update(g, s, p)[0])
    results[f'muonclip/{impl}'] = time_ms(step, grads, state, params, iters=_ITERS.value)
    print(f'muonclip/{impl:15s} {results[f"muonclip/{impl}"]:8.2f} ms', flush=True)

  def rel(a, b):
    a, b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(a)]), np.concatenate(
        [np.ravel(x) for x in jax.tree.leaves(b)])
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))
  pallas_vs_jnp = rel(updates['muon/pallas'], updates['muon/jnp'])
  ours_vs_optax = rel(updates['muon/jnp, fp32 NS'], updates['optax.contrib.muon'])

  device = jax.devices()[0]
  best_ours = min(results['muon/jnp'], results['muon/pallas'])
  lines = [
      f'## Optimizer step, {_MODEL.value} ({datetime.date.today()}, {device.device_kind}, jax {jax.__version__})',
      '',
      f'Muon over {len(names)} matrices ({num_muon / 1e9:.3f}B parameters, expert stacks batched); '
      f'median of {_ITERS.value} jitted steps. Produced by `python -m experiments.bench_optim`.',
      '',
      '| candidate | ms / step | optax time / ours |',
      '|---|---|---|',
  ]
  for name, ms in results.items():
    ratio = results['optax.contrib.muon'] / ms if not name.startswith('muonclip') else float('nan')
    lines.append(f'| {name} | {ms:.2f} | {ratio:.2f} |' if ratio == ratio else f'| {name} | {ms:.2f} | - |')
  lines += [
      '',
      f'Fastest of ours vs optax.contrib.muon: {results["optax.contrib.muon"] / best_ours:.2f}x '
      f'(>1 means ours is faster). Checks in the same run: pallas vs jnp update relative difference '
      f'{pallas_vs_jnp:.2e}; our first step (fp32 NS) vs optax first step {ours_vs_optax:.2e}.',
      '',
  ]
  with open(_OUT.value, 'w') as f:
    f.write('\n'.join(lines))
  print('\n'.join(lines))


if __name__ == '__main__':
  app.run(main)
