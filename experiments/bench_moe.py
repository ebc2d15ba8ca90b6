"""Benchmark: the Pallas grouped matmul against dense matmul, jax.lax.ragged_dot and tokamax, on expert shapes.

    python -m experiments.bench_moe --out=BENCHMARKS_moe.md [--sweep]

Problems (bf16 in, bf16 out, float32 accumulation), from the model configs:
  * k2_small: all 64 experts on one device, 16384 tokens x top-6 = 98304 rows; gate/up (K=1024, N=512) and
    down (K=512, N=1024) projections.
  * K2: 32 of the 384 experts on one device (expert parallelism over 12), 65536 rows (2048 per expert on
    average); gate/up (K=7168, N=2048) and down (K=2048, N=7168).
Group sizes: balanced (equal), or skewed (Zipf: expert i's load is proportional to 1/(i+1), every 8th expert
empty, order shuffled). Every problem uses all M rows, so its FLOPs are 2 M K N whatever the split.

Timed, as the median over --iters of back-to-back calls of one jitted function (async dispatch keeps the GPU
busy), after a warm-up call:
  * fwd: out = op(lhs, rhs, group_sizes)
  * fwd+bwd: out and the VJP (dlhs, drhs) for a random dout: three products, 6 M K N FLOPs
for: pallas (ours), jax.lax.ragged_dot, tokamax.ragged_dot (if it imports), and the dense bf16 matmul
[M, K] @ [K, N] with the same FLOPs (fwd+bwd: its two gradient matmuls too).
With --sweep, it first times candidate block sizes of each of our three products on the balanced K2 problems
and k2_small's gate/up, and benchmarks with the fastest (by geometric mean over the problems); the defaults in
pallas_kernels/grouped_matmul/tiling.py are then set from that table by hand.
Checks in the same run: our forward and both gradients against the float32 reference on the GPU (empty groups, a
group holding every row, rows past the groups), ours against ragged_dot at every benchmark problem, and the MoE
layer (bf16, jit, grad) with matmul_impl='pallas' against 'ragged_dot'.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import statistics
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from experiments.bench_common import section_title, time_ms
from k2.config import get_config
from k2.moe import MoE
from pallas_kernels.grouped_matmul import BlockSizes
from pallas_kernels.grouped_matmul import ProductBlocks
from pallas_kernels.grouped_matmul import grouped_matmul
from pallas_kernels.grouped_matmul import grouped_matmul_reference
from pallas_kernels.grouped_matmul import ops as grouped_matmul_ops
from pallas_kernels.grouped_matmul import tiling

_ITERS = flags.DEFINE_integer('iters', 10, 'Timed calls per candidate (fewer for slow ones: at most ~1 s each).')
_OUT = flags.DEFINE_string('out', 'BENCHMARKS_moe.md', 'Markdown file the results section is written to.')
_SWEEP = flags.DEFINE_bool('sweep', False, 'Sweep block sizes of the three products first and use the fastest.')
_K2_LOCAL_EXPERTS = flags.DEFINE_integer('k2_local_experts', 32, 'K2 experts held by one device.')
_K2_ROWS = flags.DEFINE_integer('k2_rows', 65536, 'Rows (token-expert pairs) of the K2 problems.')
_SMALL_TOKENS = flags.DEFINE_integer('small_tokens', 16384, 'Tokens of the k2_small problems (times top-k rows).')
_SMOKE = flags.DEFINE_bool('smoke', False, 'Tiny problems and tiles: checks that the script runs (CPU, interpreted).')


@dataclasses.dataclass(frozen=True)
class Problem:
  name: str
  num_rows: int
  contract: int
  cols: int
  num_groups: int

  @property
  def flops(self) -> int:
    return 2 * self.num_rows * self.contract * self.cols


def problems() -> list[Problem]:
  small, full = get_config('k2_small').moe, get_config('k2_full').moe
  small_rows = _SMALL_TOKENS.value * small.num_experts_per_token
  problem_list = [
      Problem('k2_small gate/up', small_rows, small.hidden_size, small.expert_intermediate_size, small.num_experts),
      Problem('k2_small down', small_rows, small.expert_intermediate_size, small.hidden_size, small.num_experts),
      Problem('K2 gate/up', _K2_ROWS.value, full.hidden_size, full.expert_intermediate_size, _K2_LOCAL_EXPERTS.value),
      Problem('K2 down', _K2_ROWS.value, full.expert_intermediate_size, full.hidden_size, _K2_LOCAL_EXPERTS.value),
  ]
  if _SMOKE.value:
    problem_list = [dataclasses.replace(p, num_rows=256, contract=p.contract // 64, cols=p.cols // 64,
                                        num_groups=8) for p in problem_list]
  return problem_list


def group_sizes(num_rows: int, num_groups: int, case: str, seed: int = 0) -> jax.Array:
  if case == 'balanced':
    sizes = np.full(num_groups, num_rows // num_groups)
  else:  # skewed: Zipf loads, every 8th expert empty, shuffled
    load = 1.0 / np.arange(1, num_groups + 1)
    load[7::8] = 0.0
    sizes = np.floor(load / load.sum() * num_rows).astype(np.int64)
    np.random.default_rng(seed).shuffle(sizes)
  sizes[np.argmax(sizes)] += num_rows - sizes.sum()  # every row in some group
  return jnp.asarray(sizes, jnp.int32)


def operands(problem: Problem, seed: int = 0):
  keys = jax.random.split(jax.random.key(seed), 3)
  lhs = jax.random.normal(keys[0], (problem.num_rows, problem.contract), jnp.bfloat16)
  rhs = (jax.random.normal(keys[1], (problem.num_groups, problem.contract, problem.cols), jnp.bfloat16)
         * problem.contract ** -0.5).astype(jnp.bfloat16)
  dout = jax.random.normal(keys[2], (problem.num_rows, problem.cols), jnp.bfloat16)
  return lhs, rhs, dout


def forward_and_backward(op):
  """(lhs, rhs, group_sizes, dout) -> (out, dlhs, drhs) for a grouped op(lhs, rhs, group_sizes)."""
  def run(lhs, rhs, sizes, dout):
    out, vjp = jax.vjp(lambda a, b: op(a, b, sizes), lhs, rhs)
    return (out, *vjp(dout))
  return jax.jit(run)


def candidates(block_sizes: BlockSizes) -> dict:
  """name -> grouped op(lhs, rhs, group_sizes)."""
  ops = {
      'pallas': functools.partial(grouped_matmul, block_sizes=block_sizes),
      'jax.lax.ragged_dot': jax.lax.ragged_dot,
  }
  tokamax = import_tokamax()
  if tokamax is not None:
    ops['tokamax.ragged_dot'] = tokamax.ragged_dot
  return ops


@functools.cache
def import_tokamax():
  """tokamax if it imports (its wheel and missing dependencies are carried to the device), else None."""
  try:
    import xprof.cli.tools  # noqa: F401
  except ImportError:
    # tokamax imports xprof (a 32 MB profiler wheel) only for its own benchmarking helpers: stand in for it.
    for name in ('xprof', 'xprof.cli', 'xprof.cli.tools'):
      sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules['xprof.cli.tools'].get_kernel_stats_tool = None
  try:
    import tokamax
    return tokamax
  except Exception as error:  # noqa: BLE001 (any import failure means: not available)
    print(f'tokamax unavailable: {type(error).__name__}: {error}', flush=True)
    return None


def relative_error(actual, expected) -> float:
  actual, expected = jnp.asarray(actual, jnp.float32), jnp.asarray(expected, jnp.float32)
  return float(jnp.linalg.norm(actual - expected) / jnp.linalg.norm(expected))


def correctness_checks(block_sizes: BlockSizes) -> list[str]:
  """Our three products against the float32 reference (and its VJP) on the device; raises on a mismatch."""
  lines = []
  ours = forward_and_backward(functools.partial(grouped_matmul, block_sizes=block_sizes))
  reference = forward_and_backward(grouped_matmul_reference)
  scale = 10 if _SMOKE.value else 1
  for name, sizes in [('empty groups, rows past the groups', [700, 0, 1230, 10, 0, 900, 10, 100]),
                      ('one group holds every row', [0, 0, 0, 3000, 0, 0, 0, 0])]:
    problem = Problem(name, 3000 // scale, 1024 // scale, 768 // scale, 8)
    sizes = [size // scale for size in sizes]
    lhs, rhs, dout = operands(problem, seed=1)
    sizes = jnp.asarray(sizes, jnp.int32)
    actual = ours(lhs, rhs, sizes, dout)
    with jax.default_matmul_precision('highest'):
      expected = reference(*(x.astype(jnp.float32) for x in (lhs, rhs)), sizes, dout.astype(jnp.float32))
    errors = [relative_error(a, e) for a, e in zip(actual, expected)]
    total = int(sizes.sum())
    tail_zero = not bool(jnp.any(actual[0][total:])) and not bool(jnp.any(actual[1][total:]))
    empty_zero = not bool(jnp.any(actual[2][np.asarray(sizes) == 0]))
    ok = max(errors) < 1e-2 and tail_zero and empty_zero and all(
        bool(jnp.all(jnp.isfinite(a.astype(jnp.float32)))) for a in actual)
    lines.append(f'{name}: relative error fwd {errors[0]:.1e}, dlhs {errors[1]:.1e}, drhs {errors[2]:.1e}; '
                 f'zeros where expected: {tail_zero and empty_zero}')
    print(lines[-1], flush=True)
    if not ok:
      raise AssertionError(f'grouped matmul check failed: {lines[-1]}')

  # The MoE layer, bf16, jitted and differentiated, with the kernel and with ragged_dot.
  config = get_config('k2_tiny' if _SMOKE.value else 'k2_small').moe
  x = jax.random.normal(jax.random.key(3), (2, 256 // scale, config.hidden_size), jnp.bfloat16)
  results = {}
  for impl in ('pallas', 'ragged_dot'):
    moe = MoE(config, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, matmul_impl=impl)

    @nnx.jit
    def loss_and_grads(moe, x):
      return nnx.value_and_grad(lambda m: jnp.mean(m(x)[0].astype(jnp.float32) ** 2))(moe)

    results[impl] = loss_and_grads(moe, x)
  (loss_p, grads_p), (loss_r, grads_r) = results['pallas'], results['ragged_dot']
  grad_errors = {name: relative_error(grads_p[name][...], grads_r[name][...])
                 for name in ('gate_proj', 'up_proj', 'down_proj')}
  lines.append(f'{"k2_tiny" if _SMOKE.value else "k2_small"} MoE layer (bf16, jit, grad), pallas vs ragged_dot: loss {float(loss_p):.5f} vs '
               f'{float(loss_r):.5f}; grad relative differences ' +
               ', '.join(f'{k} {v:.1e}' for k, v in grad_errors.items()))
  print(lines[-1], flush=True)
  if max(grad_errors.values()) > 2e-2:
    raise AssertionError(lines[-1])
  return lines


def sweep(problem_list: list[Problem], iters: int) -> tuple[BlockSizes, list[str]]:
  """Times candidate tiles of each product on the balanced problems; returns the fastest and a table."""
  grouped = [ProductBlocks(128, 256, 64, 8, 3), ProductBlocks(128, 128, 64, 4, 4),
             ProductBlocks(256, 128, 64, 8, 3), ProductBlocks(64, 256, 64, 4, 4), ProductBlocks(128, 128, 64, 8, 5)]
  transposed = [ProductBlocks(64, 256, 128, 8, 3), ProductBlocks(64, 128, 128, 4, 4),
                ProductBlocks(32, 256, 128, 8, 4), ProductBlocks(64, 128, 256, 8, 3)]
  if _SMOKE.value:
    grouped, transposed = [ProductBlocks(16, 16, 16)], [ProductBlocks(16, 16, 16)]
  backend, interpret = tiling.TRITON, jax.default_backend() == 'cpu'
  lines = ['| product | tiles (m, n, k, warps, stages) | ' + ' | '.join(p.name for p in problem_list) +
           ' | geomean ms |', '|---' * (len(problem_list) + 3) + '|']
  best = {}
  for product, options in [('forward', grouped), ('dlhs', grouped), ('drhs', transposed)]:
    timings = {}
    for blocks in options:
      row = []
      for problem in problem_list:
        lhs, rhs, dout = operands(problem)
        sizes = group_sizes(problem.num_rows, problem.num_groups, 'balanced')
        if product == 'forward':
          fn = jax.jit(functools.partial(grouped_matmul_ops.grouped_product, transpose_rhs=False,
                                         backend=backend, blocks=blocks, interpret=interpret))
          args = (lhs, rhs, sizes)
        elif product == 'dlhs':
          fn = jax.jit(functools.partial(grouped_matmul_ops.grouped_product, transpose_rhs=True,
                                         backend=backend, blocks=blocks, interpret=interpret))
          args = (dout, rhs, sizes)
        else:
          fn = jax.jit(functools.partial(grouped_matmul_ops.transposed_product, out_dtype=rhs.dtype,
                                         backend=backend, blocks=blocks, interpret=interpret))
          args = (lhs, dout, sizes)
        try:
          row.append(time_ms(fn, *args, iters=iters))
        except Exception as error:  # noqa: BLE001 (a tile that does not compile, e.g. out of shared memory)
          print(f'{product} {blocks}: {type(error).__name__}: {str(error)[:200]}', flush=True)
          row.append(float('inf'))
      timings[blocks] = row
      geomean = math.exp(statistics.fmean(math.log(t) for t in row))
      lines.append(f'| {product} | {blocks.block_m}, {blocks.block_n}, {blocks.block_k}, {blocks.num_warps}, '
                   f'{blocks.num_stages} | ' + ' | '.join(f'{t:.3f}' for t in row) + f' | {geomean:.3f} |')
      print(lines[-1], flush=True)
    best[product] = min(timings, key=lambda b: sum(math.log(t) for t in timings[b]))
  return BlockSizes(**best), lines


def tflops(flops: int, ms: float) -> float:
  return flops / (ms * 1e-3) / 1e12


def main(argv):
  del argv
  device = jax.devices()[0]
  print(f'{device.device_kind}, jax {jax.__version__}', flush=True)
  problem_list = problems()
  block_sizes = BlockSizes.for_backend(tiling.TRITON)
  if _SMOKE.value:
    block_sizes = BlockSizes(*[ProductBlocks(16, 16, 16)] * 3)
  check_lines = correctness_checks(block_sizes)  # fail before the long part
  sweep_lines = []
  if _SWEEP.value:
    # Sweep on the K2 problems and k2_small's gate/up (its down projection has the same tiles' shapes).
    swept, sweep_lines = sweep([p for p in problem_list if p.name != 'k2_small down'], max(3, _ITERS.value // 2))
    print(f'fastest: {swept}', flush=True)
    if swept != block_sizes:
      block_sizes = swept
      check_lines = correctness_checks(block_sizes)

  dense_square = jax.jit(lambda a, b: a @ b)
  square = jax.random.normal(jax.random.key(9), (8192, 8192), jnp.bfloat16)
  square_ms = time_ms(dense_square, square, square, iters=_ITERS.value)
  print(f'dense 8192^3: {tflops(2 * 8192 ** 3, square_ms):.0f} TFLOP/s', flush=True)

  ops = candidates(block_sizes)
  rows, agreement = [], []
  for problem in problem_list:
    lhs, rhs, dout = operands(problem)
    dense_rhs = rhs[0]
    dense_fwd = jax.jit(lambda a, b: a @ b)
    dense_both = jax.jit(lambda a, b, d: (a @ b, d @ b.T, a.T @ d))
    dense = (time_ms(dense_fwd, lhs, dense_rhs, iters=_ITERS.value),
             time_ms(dense_both, lhs, dense_rhs, dout, iters=_ITERS.value))
    for case in ('balanced', 'skewed'):
      sizes = group_sizes(problem.num_rows, problem.num_groups, case)
      results = {}
      for name, op in ops.items():
        try:
          fwd = jax.jit(op)
          results[name] = (time_ms(fwd, lhs, rhs, sizes, iters=_ITERS.value),
                           time_ms(forward_and_backward(op), lhs, rhs, sizes, dout, iters=_ITERS.value))
        except Exception as error:  # noqa: BLE001 (tokamax may not support this device or shape)
          print(f'{name} failed on {problem.name}: {type(error).__name__}: {str(error)[:300]}', flush=True)
          results[name] = (float('nan'), float('nan'))
        if name == 'jax.lax.ragged_dot':
          agreement.append(relative_error(jax.jit(ops['pallas'])(lhs, rhs, sizes), fwd(lhs, rhs, sizes)))
      ours_fwd, ours_both = results['pallas']
      rows.append((problem, case, dense, results))
      print(f'{problem.name:18s} {case:8s} ' + '  '.join(
          f'{name} {tflops(problem.flops, f):.0f}/{tflops(3 * problem.flops, b):.0f}'
          for name, (f, b) in results.items()) +
          f'  dense {tflops(problem.flops, dense[0]):.0f}/{tflops(3 * problem.flops, dense[1]):.0f} TFLOP/s '
          f'(fwd/fwd+bwd); ours/dense fwd {dense[0] / ours_fwd:.2f}', flush=True)

  names = list(ops)
  lines = [
      section_title('Grouped matmul, MoE expert shapes'),
      '',
      'bf16 operands, float32 accumulation. TFLOP/s as fwd / fwd+bwd (fwd+bwd = out, dlhs and drhs: 3 products); '
      'median of back-to-back jitted calls. "dense" is one bf16 matmul [M, K] @ [K, N] of the same FLOPs (fwd+bwd: '
      'plus its two gradient matmuls). k2_small: 64 experts, 16384 tokens x top-6 = 98304 rows; K2: 32 local '
      f'experts, {_K2_ROWS.value} rows. Skewed: Zipf loads (expert i ~ 1/(i+1)), every 8th expert empty. Produced '
      'by `python -m experiments.bench_moe' + (' --sweep' if _SWEEP.value else '') + '`.',
      '',
      '| problem (M, K, N, G) | groups | ' + ' | '.join(names) + ' | dense | pallas / dense | pallas / ragged_dot |',
      '|---' * (len(names) + 5) + '|',
  ]
  for problem, case, dense, results in rows:
    cells = [f'{tflops(problem.flops, f):.0f} / {tflops(3 * problem.flops, b):.0f}' for f, b in results.values()]
    ours_fwd, ours_both = results['pallas']
    ragged_fwd, ragged_both = results['jax.lax.ragged_dot']
    lines.append(
        f'| {problem.name} ({problem.num_rows}, {problem.contract}, {problem.cols}, {problem.num_groups}) | {case} | '
        + ' | '.join(cells) +
        f' | {tflops(problem.flops, dense[0]):.0f} / {tflops(3 * problem.flops, dense[1]):.0f}'
        f' | {dense[0] / ours_fwd:.2f} / {dense[1] / ours_both:.2f}'
        f' | {ragged_fwd / ours_fwd:.0f}x / {ragged_both / ours_both:.0f}x |')
  lines += [
      '',
      f'Dense bf16 8192^3 on this device: {tflops(2 * 8192 ** 3, square_ms):.0f} TFLOP/s. Tiles used: {block_sizes}.',
      f'Checks in the same run: {"; ".join(check_lines)}; pallas vs ragged_dot forward at every problem above: '
      f'relative difference at most {max(agreement):.1e}.',
  ]
  if sweep_lines:
    lines += ['', 'Tile sweep (ms, balanced groups; the fastest by geometric mean is used above):', ''] + sweep_lines
  section = '\n'.join(lines) + '\n'
  with open(_OUT.value, 'w') as f:
    f.write(section)
  print(section)


if __name__ == '__main__':
  app.run(main)
