"""Benchmark: flash attention with per-head max logits on K2 shapes, against cuDNN (+ a max-logit pass) and XLA.

    python -m experiments.bench_attention --out=BENCHMARKS_attention.md

Writes its BENCHMARKS.md section (between the bench_attention markers) to --out. One run, on the GPU (bf16,
causal, MHA as in K2's MLA):
  1. a sweep of the Hopper kernels' tiles on one shape per head layout (by forward+backward time), whose winners
     are used below;
  2. correctness: ours against the float32 reference (pallas_kernels/flash_attention/reference.py) on a small
     problem with packed documents and grouped heads, output, max logits and q/k/v gradients, both head layouts;
  3. the table (rows stop starting after --budget_s seconds): forward and forward+backward per shape, for
       ours        pallas_kernels.flash_attention (returns out and max_logits): its Hopper kernels (Mosaic GPU)
       Triton      the same op forced onto its Pallas Triton kernels (the previous GPU path)
       cuDNN       cuDNN flash attention, no max logits (MLA head dims through jax's cuDNN call when it accepts
                   qk != v; else jax.nn.dot_product_attention(implementation='cudnn') with v zero-padded to qk)
       cuDNN+max   cuDNN plus the max logits as a separate XLA pass (q.k^T in float32, causal mask, max)
       XLA         the plain-jnp reference (materializes the logits; what the model runs without the kernel)
TFLOP/s count useful work only: causal pairs P = B H T (T + 1) / 2; forward 2 P (K + V), backward 2 P (3 K + 2 V)
(S, dP, dV, dQ, dK; the same count for every candidate, whatever it actually computes).
"""

from __future__ import annotations

import dataclasses
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments.bench_common import section_title, time_ms
from pallas_kernels.flash_attention import BlockSizes
from pallas_kernels.flash_attention import flash_attention
from pallas_kernels.flash_attention import flash_attention_reference
from pallas_kernels.flash_attention import hopper_kernel

_OUT = flags.DEFINE_string('out', 'BENCHMARKS_attention.md', 'Markdown file the results are written to.')
_ITERS = flags.DEFINE_integer('iters', 10, 'Timed calls per candidate (median reported).')
_SWEEP = flags.DEFINE_bool('sweep', True, 'Sweep tile sizes before timing the table.')
_BUDGET = flags.DEFINE_float('budget_s', 330.0, 'Stop starting new table rows after this many seconds.')
_LOG = flags.DEFINE_string('log', '', 'Optional file that gets every line printed (for a partial run).')
_SMOKE = flags.DEFINE_bool('smoke', False, 'Tiny shapes, to check the script itself on a CPU (interpreted kernels).')

# (batch, seq, heads): 16k tokens per step, K2's 64 heads down to 8 (K2_REFERENCE: 64 heads; seq 4k pretraining,
# longer after context extension).
SHAPES = [(8, 2048, 64), (4, 4096, 32), (2, 8192, 8)]
LAYOUTS = [(192, 128), (128, 128)]  # (qk head dim, v head dim): MLA's 128 nope + 64 rope / 128 v, and plain
SWEEP_SHAPE = (4, 4096, 32)
CHECK_LEN = 1024  # correctness check: B=2, T=CHECK_LEN, 4 query heads on 2 key heads
# Hopper tiles swept: (forward keys per step, ring slots); the programs' own sides are fixed at 128 rows.
HOPPER_TILES = [(64, 2), (64, 3), (128, 2)]

NAMES = ('ours', 'triton', 'cudnn', 'cudnn+max', 'xla')  # the candidates, in table order
_lines: list[str] = []


def log(*parts):
  line = ' '.join(str(p) for p in parts)
  print(line, flush=True)
  if _LOG.value:
    with open(_LOG.value, 'a') as f:
      f.write(line + '\n')


def flops(batch, seq, heads, qk_dim, v_dim):
  pairs = batch * heads * seq * (seq + 1) / 2
  forward = 2 * pairs * (qk_dim + v_dim)
  return forward, forward + 2 * pairs * (3 * qk_dim + 2 * v_dim)


def inputs(batch, seq, heads, qk_dim, v_dim, kv_heads=None, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  kv_heads = kv_heads or heads
  q = jax.random.normal(keys[0], (batch, seq, heads, qk_dim), jnp.bfloat16)
  k = jax.random.normal(keys[1], (batch, seq, kv_heads, qk_dim), jnp.bfloat16)
  v = jax.random.normal(keys[2], (batch, seq, kv_heads, v_dim), jnp.bfloat16)
  d_out = jax.random.normal(keys[3], (batch, seq, heads, v_dim), jnp.bfloat16)
  return q, k, v, d_out


def forward_and_backward(attention):
  """jit of (outputs, q/k/v gradients) for the cotangent d_out on the attention output."""
  def run(q, k, v, d_out):
    outputs, vjp = jax.vjp(attention, q, k, v)
    out = outputs[0] if isinstance(outputs, tuple) else outputs
    cotangent = (d_out, jnp.zeros_like(outputs[1])) if isinstance(outputs, tuple) else d_out
    return outputs, vjp(cotangent)
  return jax.jit(run)


def max_logit_pass(q, k, scale):
  """The max logits without the kernel: float32 logits of every pair, causal mask, max over queries and keys."""
  seq = q.shape[1]
  logits = jnp.einsum('BTHK,BSHK->BHTS', q, k, preferred_element_type=jnp.float32) * scale
  causal = jnp.tril(jnp.ones((seq, seq), bool))
  return jax.lax.stop_gradient(jnp.max(jnp.where(causal, logits, -jnp.inf), axis=(2, 3)))


def cudnn_attention(qk_dim, v_dim, scale):
  """cuDNN flash attention and a label saying how it was called."""
  if qk_dim != v_dim:
    try:
      from jax._src.cudnn import fused_attention_stablehlo as cudnn  # MLA head dims (cuDNN >= 9.10, Hopper)
      attention = lambda q, k, v: cudnn.dot_product_attention(q, k, v, scale=scale,
                                                              mask_type=cudnn.MaskType.CAUSAL)
      q, k, v, _ = inputs(1, 256, 2, qk_dim, v_dim)
      jax.block_until_ready(jax.jit(attention)(q, k, v))
      return attention, 'cuDNN (qk != v)'
    except Exception as error:  # noqa: BLE001  (any refusal: fall back to the public API)
      log('cuDNN with qk != v refused:', str(error).splitlines()[0][:200])

  def padded(q, k, v):
    v_padded = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, qk_dim - v_dim))) if v_dim < qk_dim else v
    out = jax.nn.dot_product_attention(q, k, v_padded, scale=scale, is_causal=True, implementation='cudnn')
    return out[..., :v_dim]
  return padded, 'cuDNN' + (' (v padded)' if v_dim < qk_dim else '')


def relative_error(actual, expected):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def check_correctness(blocks_by_layout):
  """Ours against the float32 reference: packed documents, 4 query heads per 2 key heads, both layouts."""
  rows = []
  for qk_dim, v_dim in LAYOUTS:
    q, k, v, d_out = inputs(2, CHECK_LEN, 4, qk_dim, v_dim, kv_heads=2, seed=1)
    starts = jax.random.bernoulli(jax.random.key(2), 1 / 200, (2, CHECK_LEN))
    segment_ids = jnp.cumsum(starts, axis=1).astype(jnp.int32)
    ours = lambda q, k, v: flash_attention(q, k, v, causal=True, segment_ids=segment_ids,
                                           block_sizes=blocks_by_layout[(qk_dim, v_dim)])
    reference = lambda q, k, v: flash_attention_reference(q, k, v, causal=True, segment_ids=segment_ids)
    (out, max_logits), grads = forward_and_backward(ours)(q, k, v, d_out)
    upcast = lambda x: x.astype(jnp.float32)
    with jax.default_matmul_precision('float32'):
      (ref_out, ref_max), ref_grads = forward_and_backward(reference)(upcast(q), upcast(k), upcast(v), upcast(d_out))
    errors = {'out': relative_error(out, ref_out), 'max_logits': float(jnp.max(jnp.abs(max_logits - ref_max))),
              'dq': relative_error(grads[0], ref_grads[0]), 'dk': relative_error(grads[1], ref_grads[1]),
              'dv': relative_error(grads[2], ref_grads[2])}
    finite = all(bool(jnp.all(jnp.isfinite(x))) for x in (out, max_logits, *grads))
    ok = finite and max(errors[n] for n in ('out', 'dq', 'dk', 'dv')) < 1e-2 and errors['max_logits'] < 1e-3
    log(f'correctness qk {qk_dim} / v {v_dim}:', {n: f'{e:.1e}' for n, e in errors.items()}, 'finite', finite,
        'PASS' if ok else 'FAIL')
    rows.append((qk_dim, v_dim, errors, ok))
  return rows


def sweep(qk_dim, v_dim):
  """The Hopper tiles with the best forward+backward time (a tile that does not fit shared memory is skipped)."""
  batch, seq, heads = SWEEP_SHAPE
  q, k, v, d_out = inputs(batch, seq, heads, qk_dim, v_dim)
  results = []
  best, best_ms = BlockSizes.for_backend('hopper', seq, seq, qk_dim, v_dim), float('inf')
  for block_k, slots in HOPPER_TILES:
    blocks = dataclasses.replace(BlockSizes.for_backend('hopper', seq, seq, qk_dim, v_dim), block_k=block_k,
                                 num_stages=slots)
    attention = lambda q, k, v, b=blocks: flash_attention(q, k, v, block_sizes=b, implementation='hopper')
    try:
      forward_ms = time_ms(jax.jit(attention), q, k, v, iters=_ITERS.value)
      total_ms = time_ms(forward_and_backward(attention), q, k, v, d_out, iters=_ITERS.value)
    except Exception as error:  # noqa: BLE001
      log('  tiles', (block_k, slots), 'failed:', str(error).splitlines()[0][:200])
      continue
    results.append((describe(blocks), forward_ms, total_ms))
    log(f'  {describe(blocks)}: {forward_ms:.3f} ms fwd, {total_ms:.3f} ms fwd+bwd')
    if total_ms < best_ms:
      best, best_ms = blocks, total_ms
  return best, results


def bench_row(batch, seq, heads, qk_dim, v_dim, blocks):
  scale = qk_dim ** -0.5
  q, k, v, d_out = inputs(batch, seq, heads, qk_dim, v_dim)
  forward_flops, total_flops = flops(batch, seq, heads, qk_dim, v_dim)
  cudnn, cudnn_label = cudnn_attention(qk_dim, v_dim, scale)
  candidates = {
      'ours': lambda q, k, v: flash_attention(q, k, v, causal=True, sm_scale=scale, block_sizes=blocks),
      'triton': lambda q, k, v: flash_attention(q, k, v, causal=True, sm_scale=scale, implementation='triton'),
      'cudnn': cudnn,
      'cudnn+max': lambda q, k, v: (cudnn(q, k, v), max_logit_pass(q, k, scale)),
      'xla': lambda q, k, v: flash_attention_reference(q, k, v, causal=True, sm_scale=scale),
  }
  row = {'shape': (batch, seq, heads, qk_dim, v_dim), 'cudnn_label': cudnn_label}
  outputs = {}
  for name, attention in candidates.items():
    iters = 3 if name == 'xla' else _ITERS.value
    for mode in ('fwd', 'fwd+bwd'):
      try:
        if mode == 'fwd':
          fn, args = jax.jit(attention), (q, k, v)
        else:
          fn, args = forward_and_backward(attention), (q, k, v, d_out)
        ms = time_ms(fn, *args, iters=iters)
        outputs[(name, mode)] = fn(*args)
        row[(name, mode)] = ms
        tflops = (forward_flops if mode == 'fwd' else total_flops) / ms / 1e9
        log(f'  {name:10s} {mode:8s} {ms:8.3f} ms {tflops:7.1f} TFLOP/s')
      except Exception as error:  # noqa: BLE001
        log(f'  {name:10s} {mode:8s} failed:', str(error).splitlines()[0][:300])
        row[(name, mode)] = None
  # Agreement with cuDNN and the max-logit pass on the benchmark inputs (bf16 level).
  try:
    ours_out, ours_max = outputs[('ours', 'fwd')]
    ref_out, ref_max = outputs[('cudnn+max', 'fwd')]
    (_, _), ours_grads = outputs[('ours', 'fwd+bwd')]
    _, cudnn_grads = outputs[('cudnn', 'fwd+bwd')]
    row['agreement'] = {
        'out': relative_error(ours_out, ref_out), 'max_logits': float(jnp.max(jnp.abs(ours_max - ref_max))),
        'grads': max(relative_error(a, b) for a, b in zip(ours_grads, cudnn_grads))}
    log('  ours vs cuDNN(+max):', {n: f'{e:.1e}' for n, e in row['agreement'].items()})
  except Exception as error:  # noqa: BLE001
    log('  agreement check skipped:', str(error).splitlines()[0][:200])
  del outputs
  row['flops'] = (forward_flops, total_flops)
  return row


def describe(blocks: BlockSizes) -> str:
  b = blocks
  return (f'fwd {b.block_q}x{b.block_k}; dK/dV {b.block_q_dkv}x{b.block_k_dkv}; dQ {b.block_q_dq}x{b.block_k_dq}; '
          f'{b.num_stages}-slot ring')


def main(argv):
  del argv
  start = time.time()
  if _SMOKE.value:
    global SHAPES, SWEEP_SHAPE, CHECK_LEN
    SHAPES, SWEEP_SHAPE, CHECK_LEN = [(1, 128, 2)], (1, 128, 2), 256
  device = jax.devices()[0]
  log(f'{device.device_kind}, jax {jax.__version__}')
  blocks_by_layout, sweeps = {}, {}
  for layout in LAYOUTS:
    q = jnp.zeros((1, 128, 1, layout[0]), jnp.bfloat16)
    if _SWEEP.value and hopper_kernel.supported(q, q, q[..., :layout[1]]):  # the sweep is over Hopper tiles
      log(f'sweep qk {layout[0]} / v {layout[1]} on {SWEEP_SHAPE}')
      blocks_by_layout[layout], sweeps[layout] = sweep(*layout)
    else:
      blocks_by_layout[layout], sweeps[layout] = None, []  # the op's defaults
    if blocks_by_layout[layout] is not None:
      log('  chosen:', describe(blocks_by_layout[layout]))
  correctness = check_correctness(blocks_by_layout)

  rows = []
  for qk_dim, v_dim in LAYOUTS:
    for batch, seq, heads in SHAPES:
      if time.time() - start > _BUDGET.value:
        log('budget spent: skipping', (batch, seq, heads, qk_dim, v_dim))
        continue
      log(f'B={batch} T={seq} H={heads} qk={qk_dim} v={v_dim}')
      rows.append(bench_row(batch, seq, heads, qk_dim, v_dim, blocks_by_layout[(qk_dim, v_dim)]))
  write_report(device, rows, correctness, blocks_by_layout, sweeps, time.time() - start)


def write_report(device, rows, correctness, blocks_by_layout, sweeps, seconds):
  def tf(row, name, mode):
    ms = row.get((name, mode))
    if ms is None:
      return None
    return (row['flops'][0] if mode == 'fwd' else row['flops'][1]) / ms / 1e9

  def fmt(x, digits=0):
    return '-' if x is None else f'{x:.{digits}f}'

  def ratio(row, a, b, mode):
    x, y = row.get((a, mode)), row.get((b, mode))
    return None if x is None or y is None else y / x  # time_b / time_a: > 1 means a is faster

  lines = [
      '<!-- bench_attention:start -->',
      section_title('Flash attention with max logits'),
      '',
      'Causal bf16 MHA, 16k tokens per call; TFLOP/s of useful work (causal pairs only; forward 2P(K+V), '
      'backward 2P(3K+2V)). "ours" is `pallas_kernels.flash_attention` on its Hopper (Mosaic GPU) kernels and '
      'returns out and the per-head max logits; "Triton" is the same op on its Pallas Triton kernels; "cuDNN" '
      'returns out only; "cuDNN+max" adds the max logits as a separate XLA pass (float32 q.k^T, causal mask, '
      'max); "XLA" is the materializing jnp reference (the model without the kernel). Ratios are time(other) / '
      f'time(ours), so > 1 means ours is faster. Median of {_ITERS.value} calls. Produced by '
      '`python -m experiments.bench_attention`.',
      '',
      '| B x T x H | qk / v | ours fwd | ours fwd+bwd | Triton fwd | Triton fwd+bwd | cuDNN fwd | cuDNN fwd+bwd | '
      'cuDNN+max fwd | cuDNN+max fwd+bwd | XLA fwd | XLA fwd+bwd | fwd+bwd vs cuDNN | vs cuDNN+max | vs Triton | '
      'vs XLA |',
      '|---|---|' + '---|' * 14,
  ]
  for row in rows:
    batch, seq, heads, qk_dim, v_dim = row['shape']
    cells = [fmt(tf(row, n, m)) for n in NAMES for m in ('fwd', 'fwd+bwd')]
    ratios = [fmt(ratio(row, 'ours', other, 'fwd+bwd'), 2) for other in ('cudnn', 'cudnn+max', 'triton', 'xla')]
    lines.append(f'| {batch} x {seq} x {heads} | {qk_dim} / {v_dim} | ' + ' | '.join(cells + ratios) + ' |')
  lines += ['', 'Forward-only ratios (time(other) / time(ours)):', '',
            '| B x T x H | qk / v | vs cuDNN | vs cuDNN+max | vs Triton | vs XLA | cuDNN call | ours vs '
            'cuDNN(+max): out, max logit, grads |', '|---|---|---|---|---|---|---|---|']
  for row in rows:
    batch, seq, heads, qk_dim, v_dim = row['shape']
    agreement = row.get('agreement')
    agreement = ('-' if agreement is None else
                 f"{agreement['out']:.1e}, {agreement['max_logits']:.1e}, {agreement['grads']:.1e}")
    lines.append(f'| {batch} x {seq} x {heads} | {qk_dim} / {v_dim} | '
                 + ' | '.join(fmt(ratio(row, 'ours', o, 'fwd'), 2) for o in ('cudnn', 'cudnn+max', 'triton', 'xla'))
                 + f" | {row['cudnn_label']} | {agreement} |")
  lines += ['', 'Milliseconds:', '', '| B x T x H | qk / v | ' + ' | '.join(
      f'{n} {m}' for n in ('ours', 'Triton', 'cuDNN', 'cuDNN+max', 'XLA') for m in ('fwd', 'fwd+bwd')) + ' |',
            '|---|---|' + '---|' * 10]
  for row in rows:
    batch, seq, heads, qk_dim, v_dim = row['shape']
    lines.append(f'| {batch} x {seq} x {heads} | {qk_dim} / {v_dim} | ' + ' | '.join(
        fmt(row.get((n, m)), 3) for n in NAMES for m in ('fwd', 'fwd+bwd')) + ' |')
  lines += ['', 'Hopper tiles (chosen by forward+backward time on B x T x H = '
            + ' x '.join(map(str, SWEEP_SHAPE)) + '):', '']
  for layout, blocks in blocks_by_layout.items():
    lines.append(f'- qk {layout[0]} / v {layout[1]}: ' + ('defaults' if blocks is None else describe(blocks)))
    for tiles, forward_ms, total_ms in sweeps[layout]:
      lines.append(f'  - {tiles}: {forward_ms:.3f} ms fwd, {total_ms:.3f} ms fwd+bwd')
  lines += ['', 'Correctness in the same run (ours vs the float32 reference, packed documents, 4 query heads per '
            f'2 key heads, B=2 T={CHECK_LEN}; relative error, max logit absolute error):', '']
  for qk_dim, v_dim, errors, ok in correctness:
    lines.append(f'- qk {qk_dim} / v {v_dim}: ' + ', '.join(f'{n} {e:.1e}' for n, e in errors.items())
                 + (' (pass)' if ok else ' (FAIL)'))
  lines += ['', f'Run time {seconds:.0f} s.', '<!-- bench_attention:end -->', '']
  with open(_OUT.value, 'w') as f:
    f.write('\n'.join(lines))
  print('\n'.join(lines))


if __name__ == '__main__':
  try:
    app.run(main)
  except SystemExit:
    raise
  except Exception:  # noqa: BLE001
    traceback.print_exc()
    raise
