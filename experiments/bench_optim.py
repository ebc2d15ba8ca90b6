"""Benchmark: one optimizer step on k2_small's parameters, ours against optax.contrib.muon, in one run.

    python -m experiments.bench_optim --out=BENCHMARKS_optim.md [--trace_dir=DIR] [--code=COMMIT]

Timed (median of back-to-back jitted calls after warm-up, bench_common.time_ms; arrays on the default device):
  * muon               k2.optim.muon on every Muon-labelled matrix (matrix views, expert stacks batched), bf16 NS
  * muon, fp32 NS      the same with Newton-Schulz in float32 (optax iterates in the momentum's dtype, float32 here)
  * optax.contrib.muon on the same matrices (expert stacks as batches via dimension numbers, consistent_rms=0.2 so
                       the update scale is ours)
  * muonclip           the whole MuonClip update (Muon + AdamW over the full parameter tree)
  * Newton-Schulz alone: the bf16 steps on the normalized stacks Muon builds (one batch per shape), whose
    matmul FLOPs give its TFLOP/s against the bf16 matmul peak measured in the same run.
The floor of the Muon step is Newton-Schulz's FLOPs at that peak plus one pass over the float32 state at the HBM
bandwidth measured in the same run (a float32 copy): read G, M_{t-1}, W; write M_t and the update (5 x 4 bytes per
parameter), plus the bf16 Newton-Schulz input and output (2 x 2 bytes). XLA's cost analysis of each compiled step
gives the bytes its HLO accesses, for comparison.
Checks in the same run: our first step (fp32 NS) equals optax's first step (their momentum forms coincide at step
1), and bf16 NS differs from fp32 NS by the bf16 rounding only.
"""

from __future__ import annotations

import math
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx

from experiments.bench_common import capture_trace, matmul_peak, section_title, summarize_trace, time_ms
from experiments.bench_common import write_section
from k2 import model as model_lib
from k2.config import get_config
from k2.optim import muon, muon_adamw, param_labels
from k2.optim.muonclip import _matrix_shape
from k2.optim.qk_clip import _path_string
from k2.optim.muon import newton_schulz

_MODEL = flags.DEFINE_string('model', 'k2_small', 'Model variant whose parameters are optimized.')
_ITERS = flags.DEFINE_integer('iters', 10, 'Timed samples per candidate.')
_OUT = flags.DEFINE_string('out', 'BENCHMARKS_optim.md', 'Markdown file the results are written to.')
_TRACE_DIR = flags.DEFINE_string('trace_dir', '', 'If set: profile one Muon step; its trace and HLO go here.')
_SMOKE = flags.DEFINE_bool('smoke', False, 'k2_tiny, a small peak matmul and copy: checks that the script runs.')

NS_STEPS = 5


def random_like(tree, seed):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [0.02 * jax.random.normal(k, x.shape, jnp.float32) for k, x in zip(keys, leaves)])


def ns_groups(matrices: dict[str, jax.Array]) -> dict[tuple[int, int], int]:
  """{shape [n, m]: number of matrices}, as Muon batches them."""
  groups: dict[tuple[int, int], int] = {}
  for x in matrices.values():
    groups[x.shape[-2:]] = groups.get(x.shape[-2:], 0) + math.prod(x.shape[:-2])
  return groups


def ns_flops(groups: dict[tuple[int, int], int]) -> float:
  """Matmul FLOPs of Newton-Schulz, short side s and long side l: per step the Gram matrix (2 s^2 l), its square
  (2 s^3) and the new X (2 s^2 l)."""
  return float(sum(count * NS_STEPS * (4 * min(shape) ** 2 * max(shape) + 2 * min(shape) ** 3)
                   for shape, count in groups.items()))


def hbm_bandwidth(gib: float = 4.0) -> float:
  """Bytes/s of a float32 copy-and-scale (read + write) of `gib` GiB, best of 5."""
  x = jnp.ones((int(gib * 2 ** 30 / 4),), jnp.float32)
  f = jax.jit(lambda x: x * 1.0001)
  ms = min(time_ms(f, x, iters=3) for _ in range(5))
  return 2 * x.size * 4 / (ms / 1e3)


def bytes_accessed(compiled) -> float | None:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, list):
    analysis = analysis[0] if analysis else {}
  return (analysis or {}).get('bytes accessed')


def fused_addend_gemms(compiled) -> tuple[int, int]:
  """(cuBLAS GEMMs whose epilogue adds a matrix (beta = 1), all cuBLAS GEMMs) in the compiled program: Newton-
  Schulz writes P = c (A A) + (a I + b A) for XLA's GPU GEMM rewriter to fuse (0 of 0 on CPU)."""
  text = compiled.as_text()
  gemms = re.findall(r'custom_call_target="__cublas\$(?:lt\$matmul|gemm)".*', text)
  return sum(bool(re.search(r'"beta":\s*1', line)) for line in gemms), len(gemms)


def rel(a, b) -> float:
  a = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(a)])
  b = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(b)])
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main(argv):
  del argv
  model_name = 'k2_tiny' if _SMOKE.value else _MODEL.value
  config = get_config(model_name)
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
  groups = ns_groups(mat_params)
  flops = ns_flops(groups)

  peak = matmul_peak(256 if _SMOKE.value else 8192)
  bandwidth = hbm_bandwidth(1 / 64 if _SMOKE.value else 4.0)
  print(f'bf16 peak {peak["best_tflops"]:.0f} TFLOP/s, HBM {bandwidth / 1e12:.2f} TB/s', flush=True)

  dims = {n: optax.contrib.MuonDimensionNumbers(reduction_axis=x.ndim - 2, output_axis=x.ndim - 1)
          for n, x in mat_params.items()}
  candidates = {
      'muon': muon(1e-3),
      'muon, fp32 NS': muon(1e-3, ns_dtype=jnp.float32),
      'optax.contrib.muon': optax.contrib.muon(1e-3, consistent_rms=0.2, eps=1e-7,
                                               muon_weight_dimension_numbers=dims),
  }
  results, updates, accessed, fused = {}, {}, {}, (0, 0)
  for name, tx in candidates.items():
    state = tx.init(mat_params)
    step = jax.jit(lambda g, s, p, tx=tx: tx.update(g, s, p)[0]).lower(mat_grads, state, mat_params).compile()
    accessed[name] = bytes_accessed(step)
    if name == 'muon':
      fused = fused_addend_gemms(step)
    results[name] = time_ms(step, mat_grads, state, mat_params, iters=_ITERS.value)
    updates[name] = step(mat_grads, state, mat_params)
    print(f'{name:24s} {results[name]:8.2f} ms', flush=True)
    if name == 'muon' and _TRACE_DIR.value:
      _, wall_ms = capture_trace(step, mat_grads, state, mat_params, trace_dir=_TRACE_DIR.value, name='muon_step')
      profile = summarize_trace(_TRACE_DIR.value, 'muon_step')
      print(f'profiled muon step: wall {wall_ms:.1f} ms, GPU kernels {profile["gpu_kernel_ms"]:.1f} ms')
      for key in ('by_line', 'by_kernel'):
        for line, ms in profile[key][:20]:
          print(f'  {ms:8.2f}  {line}')
    del state
  tx = muon_adamw(1e-3)
  state = tx.init(params)
  results['muonclip (Muon + AdamW)'] = time_ms(jax.jit(lambda g, s, p: tx.update(g, s, p)[0]), grads, state, params,
                                               iters=_ITERS.value)
  del state

  # Newton-Schulz alone, on the bf16 stacks Muon builds (its first step normalizes them).
  stacks = {}
  for x in mat_grads.values():
    stacks.setdefault(x.shape[-2:], []).append(x.reshape(-1, *x.shape[-2:]).astype(jnp.bfloat16))
  stacks = [jnp.concatenate(parts) for parts in stacks.values()]
  ns_ms = time_ms(jax.jit(lambda stacks: [newton_schulz(s, NS_STEPS, ns_impl='jnp') for s in stacks]), stacks,
                  iters=_ITERS.value)
  del stacks
  ns_tflops = flops / (ns_ms / 1e3) / 1e12
  state_bytes = num_muon * (5 * 4 + 2 * 2)
  floor_ms = (flops / (peak['best_tflops'] * 1e12) + state_bytes / bandwidth) * 1e3
  print(f'Newton-Schulz alone {ns_ms:.2f} ms, {ns_tflops:.0f} TFLOP/s; floor {floor_ms:.1f} ms', flush=True)


  ours_vs_optax = rel(updates['muon, fp32 NS'], updates['optax.contrib.muon'])
  bf16_vs_fp32 = rel(updates['muon'], updates['muon, fp32 NS'])
  optax_ms = results['optax.contrib.muon']
  shapes = ', '.join(f'{count} x [{n}, {m}]' for (n, m), count in sorted(groups.items(), key=lambda kv: -kv[1]))
  lines = [
      section_title(f'Optimizer step, {model_name}'),
      '',
      f'Muon over {len(names)} parameters ({num_muon / 1e9:.3f}B, float32 parameters, gradients and momentum), '
      f'batched by shape for Newton-Schulz: {shapes}. Median of back-to-back jitted steps (not donated). '
      f'Produced by `python -m experiments.bench_optim {" ".join(sys.argv[1:])}`.',
      '',
      '| candidate | ms / step | optax time / ours | bytes accessed (XLA cost analysis) |',
      '|---|---|---|---|',
  ]
  for name, ms in results.items():
    ratio = f'{optax_ms / ms:.2f}' if name in candidates else '-'
    gb = f'{accessed[name] / 1e9:.1f} GB' if accessed.get(name) else '-'
    lines.append(f'| {name} | {ms:.2f} | {ratio} | {gb} |')
  lines += [
      '',
      f'Newton-Schulz alone (bf16, {NS_STEPS} steps, float32 accumulation; the stacks above): {ns_ms:.2f} ms for '
      f'{flops / 1e12:.2f} TFLOP = {ns_tflops:.0f} TFLOP/s, against a bf16 matmul peak of '
      f'{peak["best_tflops"]:.0f} TFLOP/s ({peak["n"]}^3) measured in the same run '
      f'({100 * ns_tflops / peak["best_tflops"]:.0f}%).',
      f'Floor of the Muon step: Newton-Schulz at that peak ({flops / peak["best_tflops"] / 1e9:.1f} ms) plus one pass '
      f'over the state, {state_bytes / 1e9:.1f} GB (read G, M, W and write M, the update in float32; the bf16 NS '
      f'input and output) at the {bandwidth / 1e12:.2f} TB/s of a float32 copy ({state_bytes / bandwidth * 1e3:.1f} '
      f'ms): {floor_ms:.1f} ms. Ours: {results["muon"]:.1f} ms ({results["muon"] / floor_ms:.2f}x the floor), '
      f'{optax_ms / results["muon"]:.2f}x faster than optax.contrib.muon. cuBLAS GEMMs of the Muon step that add '
      f'P\'s other terms in their epilogue (beta = 1): {fused[0]} of {fused[1]}.',
      f'Checks in the same run: our first step (fp32 NS) vs optax\'s first step, relative difference '
      f'{ours_vs_optax:.2e}; bf16 vs fp32 Newton-Schulz, {bf16_vs_fp32:.2e}.',
  ]
  text = write_section(_OUT.value, 'bench_optim', lines)
  print(text)


if __name__ == '__main__':
  app.run(main)
