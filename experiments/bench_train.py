"""Benchmark: tokens/s and MFU of one k2_small MuonClip training step on one device, reference paths vs kernels.

    python -m experiments.bench_train --out=DIR/bench_train.md --trace_dir=DIR   # on one GPU (~3 min on an H200)
    python -m experiments.bench_train --smoke --out=/tmp/bench_train.md   # k2_tiny on CPU: checks the script runs

The step is `k2.train.step.train_step` itself (forward + backward over `grad_accum_steps` micro-batches, MuonClip
update, QK-Clip, router-bias update), compiled ahead of time with the state donated, on synthetic packed rows:
random tokens, each row of --seq_len tokens cut into --docs_per_row documents at random points (segment ids and
positions restart per document, so the segment mask is exercised; the last token of each document is masked out
of the loss, as k2.data.pipeline does). Variants (--variants picks them and their order):
  * reference  attention_impl='reference' (materialized logits), matmul_impl='ragged_dot' (jax.lax.ragged_dot)
  * kernels    attention_impl='flash' (pallas_kernels/flash_attention), matmul_impl='pallas'
               (pallas_kernels/grouped_matmul); also with gradient accumulation (more tokens per optimizer step)
If `kernels`' compiled memory says twice its rows fit, `kernels, 8 rows` is added. A variant that does not fit
(compiled memory over the device's limit, or an out-of-memory error) is recorded and the next one runs.

Compiling: every step is compiled ahead of time from abstract shapes. The first variant compiles and runs alone;
the others then compile together in threads and run one by one after all have compiled (no compile shares the GPU
with a timed step). --budget_s and --run_budget_s skip what would not finish in the time given.
Timing: two warm-up steps, then n back-to-back steps (n from the warm-up time: about --target_s seconds, 3 to
--iters) and one block at the end; ms/step is their mean. The bf16 matmul peak (8192^3, best of 5 runs of 10
back-to-back products) is measured in the same process. With --trace_dir, one step of the first variant is
profiled and its GPU kernel time split by phase (forward, backward, update = optimizer + QK-Clip + bias + metrics)
and by component and source line (experiments.bench_common.summarize_trace); the trace (xplane.pb.gz) and the HLO
text are written to --trace_dir. The MuonClip update alone is timed by experiments.bench_optim.

Model FLOPs per token (experiments.bench_common.flops_per_token; training = forward + backward = 3 x forward):
  6 * N_matmul + 3 * L * H * (d_qk + d_v) * T
MFU counts every row as one causal sequence of T (the usual
convention, and the work the reference path does); the flash kernel skips tiles whose query and key blocks hold
disjoint documents, so "MFU, in-doc" also gives the figure with attention counted over same-document causal pairs
only (sum over documents of L(L+1)/2, from the batch's segment ids). The optimizer's FLOPs (Newton-Schulz) are not
model FLOPs and are not counted. MFU = model FLOPs / step time / measured bf16 matmul peak.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import gc
import json
import os
import sys
import time
import traceback

import jax
import numpy as np
import optax
from absl import app, flags

from experiments.bench_common import (CODE, LEARNING_RATE, capture_trace, error_line, flops_per_token,
                                      matmul_params_per_token, matmul_peak, memory_limit, same_document_pairs,
                                      section_title, summarize_trace, synthetic_batch, write_section)
from k2 import model as model_lib
from k2 import params as params_lib
from k2.config import ModelConfig, get_config
from k2.optim import muon_adamw
from k2.train.step import StepSetup, init_state, train_step

_MODEL = flags.DEFINE_string('bench_model', 'k2_small', 'Model variant (--model is k2.params\' flag).')
_SEQ_LEN = flags.DEFINE_integer('seq_len', 4096, 'Tokens per row (k2_small: its max positions).')
_DOCS = flags.DEFINE_integer('docs_per_row', 4, 'Documents packed into each row.')
_ITERS = flags.DEFINE_integer('iters', 10, 'Most timed steps per variant.')
_TARGET_S = flags.DEFINE_float('target_s', 4.0, 'Aim for this many seconds of timed steps per variant.')
_BUDGET_S = flags.DEFINE_float('budget_s', 240.0, 'Compile no variant after the first after this many seconds.')
_RUN_BUDGET_S = flags.DEFINE_float('run_budget_s', 300.0, 'Time no variant after this many seconds.')
_VARIANTS = flags.DEFINE_list('variants', ['kernels', 'reference', 'kernels_accum4'],
                              'Variants to run, in order (see VARIANTS; also kernels_accum8, kernels_dots).')
_OUT = flags.DEFINE_string('out', 'BENCHMARKS_train.md', 'Markdown file the results section is written to.')
_TRACE_DIR = flags.DEFINE_string('trace_dir', '', 'If set: profile one step of the first variant; trace + HLO here.')
_SMOKE = flags.DEFINE_bool('smoke', False, 'k2_tiny, seq 64, tiny peak matmul: checks that the script runs (CPU).')


@dataclasses.dataclass(frozen=True)
class Variant:
  name: str
  attention_impl: str
  matmul_impl: str
  micro_batch: int          # rows per forward/backward
  grad_accum_steps: int = 1
  remat_policy: str = 'none'

  @property
  def rows(self) -> int:
    return self.micro_batch * self.grad_accum_steps


# Reference at 2 rows x 2 micro-batches: its [B, H, T, T] float32 logits (2.1 GB per layer at B=2) are kept for
# the backward pass in every layer, so 4 rows at once would not fit; 2 x 2 gives it the same tokens per optimizer
# step as `kernels`.
VARIANTS = {
    'reference': Variant('reference', 'reference', 'ragged_dot', micro_batch=2, grad_accum_steps=2),
    'kernels': Variant('kernels', 'flash', 'pallas', micro_batch=4),
    'kernels_accum4': Variant('kernels, accum 4', 'flash', 'pallas', micro_batch=4, grad_accum_steps=4),
    'kernels_accum8': Variant('kernels, accum 8', 'flash', 'pallas', micro_batch=4, grad_accum_steps=8),
    'kernels_dots': Variant('kernels, remat dots', 'flash', 'pallas', micro_batch=8, remat_policy='dots'),
    # Added after `kernels` when its compiled memory says twice its rows fit.
    'kernels_rows8': Variant('kernels, 8 rows', 'flash', 'pallas', micro_batch=8),
}
SMOKE_VARIANTS = {
    'reference': Variant('reference', 'reference', 'ragged_dot', micro_batch=2, grad_accum_steps=2),
    'kernels': Variant('kernels', 'flash', 'pallas', micro_batch=4),
    'kernels_accum4': Variant('kernels, accum 2', 'flash', 'pallas', micro_batch=2, grad_accum_steps=2),
    'kernels_accum8': Variant('kernels, accum 8', 'flash', 'pallas', micro_batch=1, grad_accum_steps=8),
    'kernels_rows8': Variant('kernels, 8 rows', 'flash', 'pallas', micro_batch=8),
}


def variant_config(variant: Variant, base: ModelConfig) -> ModelConfig:
  return base.replace(remat_policy=variant.remat_policy, attention_impl=variant.attention_impl,
                      matmul_impl=variant.matmul_impl)


def lower(variant: Variant, base: ModelConfig, seq_len: int):
  """(setup, lowered step) from abstract shapes: nothing is allocated, so several can compile at once."""
  config = variant_config(variant, base)
  tx = muon_adamw(LEARNING_RATE)
  graphdef, state = jax.eval_shape(lambda: init_state(model_lib.create(config, seed=0), tx))
  setup = StepSetup(graphdef=graphdef, model_config=config, optimizer=tx,
                    schedule=optax.constant_schedule(LEARNING_RATE), qk_clip_tau=100.0, bias_update_rate=1e-3,
                    grad_accum_steps=variant.grad_accum_steps)
  batch = jax.eval_shape(lambda: synthetic_batch(variant.rows, seq_len, base.vocab_size, 1))
  return setup, train_step.lower(state, batch, setup)


def compile_lowered(lowered) -> tuple[object, float]:
  start = time.perf_counter()
  compiled = lowered.compile()
  return compiled, time.perf_counter() - start


def run_variant(variant: Variant, setup: StepSetup, compiled, compile_s: float, seq_len: int, flops: dict,
                peak: float, extras: dict | None = None) -> dict:
  """Times one compiled variant; with `extras` (a dict) and --trace_dir it also captures one profiled step."""
  result = _describe(variant, seq_len)
  result['compile_s'] = compile_s
  stats = compiled.memory_analysis()
  if stats is not None:
    need = stats.argument_size_in_bytes + stats.temp_size_in_bytes + stats.output_size_in_bytes \
        - stats.alias_size_in_bytes
    result['memory_gib'] = need / 2 ** 30
    result['argument_gib'] = stats.argument_size_in_bytes / 2 ** 30
    result['temp_gib'] = stats.temp_size_in_bytes / 2 ** 30
    limit = memory_limit()
    if limit is not None and need > limit:
      raise MemoryError(f'needs {need / 2 ** 30:.1f} GiB (arguments + temporaries), device limit '
                        f'{limit / 2 ** 30:.1f} GiB')
  model = model_lib.create(setup.model_config, seed=0)
  _, state = init_state(model, setup.optimizer)
  del model
  batch = synthetic_batch(variant.rows, seq_len, setup.model_config.vocab_size, _DOCS.value)
  for _ in range(2):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    warm_s = time.perf_counter() - t0
  iters = int(min(_ITERS.value, max(3, round(_TARGET_S.value / warm_s))))
  t0 = time.perf_counter()
  for _ in range(iters):
    state, metrics = compiled(state, batch)
  jax.block_until_ready((state, metrics))
  step_s = (time.perf_counter() - t0) / iters
  tokens = variant.rows * seq_len
  att, config = setup.model_config.attention, setup.model_config
  in_doc_pairs = same_document_pairs(np.asarray(batch['segment_ids']))
  in_doc_flops = (flops['matmul'] * tokens
                  + 6 * config.num_layers * att.num_heads * (att.qk_head_dim + att.v_head_dim) * in_doc_pairs)
  result.update({
      'in_doc_pairs_fraction': in_doc_pairs / (variant.rows * seq_len * (seq_len + 1) / 2),
      'mfu_in_doc': in_doc_flops / step_s / 1e12 / peak,
      'iters': iters, 'warm_ms': warm_s * 1e3, 'ms_per_step': step_s * 1e3, 'tokens_per_step': tokens,
      'tokens_per_s': tokens / step_s, 'model_tflops': flops['total'] * tokens / step_s / 1e12,
      'mfu': flops['total'] * tokens / step_s / 1e12 / peak,
      'loss': float(metrics['loss']), 'max_logit': float(metrics['max_logit']),
      'expert_load_max_over_mean': float(metrics['expert_load_max_over_mean']),
  })
  print(f'{variant.name}: {result["ms_per_step"]:.1f} ms/step, {result["tokens_per_s"]:,.0f} tokens/s, '
        f'MFU {100 * result["mfu"]:.1f}%', flush=True)
  if extras is not None and _TRACE_DIR.value:
    try:
      (state, metrics), extras['profiled_step_wall_ms'] = capture_trace(compiled, state, batch,
                                                                        trace_dir=_TRACE_DIR.value, name='train_step')
      extras['trace_dir'] = _TRACE_DIR.value
    except Exception as e:  # noqa: BLE001 (report and go on)
      extras['profile_error'] = error_line(e)
      traceback.print_exc()
  del state, batch
  return result


def _describe(variant: Variant, seq_len: int) -> dict:
  return {'variant': variant.name, 'rows': variant.rows, 'micro_batch': variant.micro_batch,
          'grad_accum_steps': variant.grad_accum_steps, 'seq_len': seq_len, 'remat': variant.remat_policy,
          'attention_impl': variant.attention_impl, 'matmul_impl': variant.matmul_impl}


# ---------------------------------------------------------------------------------------------------- report


def report(results: list[dict], extras: dict, peak: dict, flops: dict, config_name: str, counts: dict,
           n_matmul: int, seq_len: int, seconds: float) -> list[str]:
  """The lines of the BENCHMARKS.md section (without its markers)."""
  argv = ' '.join(sys.argv[1:])
  lines = [
      section_title(f'Training step, {config_name} with MuonClip'),
      '',
      f'One `k2.train.step.train_step` (forward + backward, MuonClip update, QK-Clip, router-bias update; bf16 '
      f'compute, float32 parameters and optimizer state, state donated) on synthetic packed rows of {seq_len} '
      f'random tokens ({_DOCS.value} documents per row, segment mask on). Mean of n back-to-back steps after '
      f'compile and 2 warm-up steps. Produced by `python -m experiments.bench_train{" " + argv if argv else ""}`.',
      '',
      '| variant | attention / MoE matmul | rows x seq (micro x accum) | ms / step | tokens / s | model TFLOP/s | '
      'MFU | MFU, in-doc | memory GiB | compile s | n |',
      '|---|---|---|---|---|---|---|---|---|---|---|',
  ]
  for r in results:
    shape = f'{r["rows"]} x {r["seq_len"]} ({r["micro_batch"]} x {r["grad_accum_steps"]})'
    impls = f'{r["attention_impl"]} / {r["matmul_impl"]}' + (f', remat {r["remat"]}' if r['remat'] != 'none' else '')
    if 'error' in r:
      lines.append(f'| {r["variant"]} | {impls} | {shape} | {r["error"]} | | | | | | | |')
      continue
    memory = f'{r["memory_gib"]:.1f}' if 'memory_gib' in r else '-'
    lines.append(f'| {r["variant"]} | {impls} | {shape} | {r["ms_per_step"]:.1f} | {r["tokens_per_s"]:,.0f} | '
                 f'{r["model_tflops"]:.1f} | {100 * r["mfu"]:.1f}% | {100 * r["mfu_in_doc"]:.1f}% | {memory} | '
                 f'{r["compile_s"]:.0f} | '
                 f'{r["iters"]} |')
  att = get_config(config_name).attention
  lines += [
      '',
      f'Peak: bf16 {peak["n"]}^3 matmul on this device in the same run, best {peak["best_tflops"]:.0f} TFLOP/s '
      f'(median {peak["median_tflops"]:.0f}); MFU is over the best.',
      f'Model FLOPs per token = 6 N_matmul + 3 L H (d_qk + d_v) T = 6 x {n_matmul / 1e6:.1f}M + 3 x '
      f'{get_config(config_name).num_layers} x {att.num_heads} x ({att.qk_head_dim} + {att.v_head_dim}) x '
      f'{seq_len} = {flops["matmul"] / 1e9:.3f} + {flops["attention"] / 1e9:.3f} = {flops["total"] / 1e9:.3f} '
      f'GFLOP. N_matmul = active parameters ({counts["activated"] / 1e6:.1f}M) minus the embedding table and '
      f'norm scales, with lm_head, the router and the experts a token uses (top-k of the routed stacks); '
      f'attention counts the causal half of T^2 per row (packed documents not discounted). Optimizer FLOPs are '
      f'not counted.',
  ]
  fractions = [r['in_doc_pairs_fraction'] for r in results if 'in_doc_pairs_fraction' in r]
  if fractions:
    lines.append(f'Same-document causal pairs are {100 * min(fractions):.0f}-{100 * max(fractions):.0f}% of the '
                 f'rows\' causal pairs in these batches ({_DOCS.value} documents per row at random cuts); "MFU, '
                 f'in-doc" counts attention over those pairs only (the flash kernel skips most cross-document '
                 f'tiles, the reference computes every pair).')
  ok = {r['variant']: r for r in results if 'error' not in r}
  split = []
  accum = [r for r in ok.values() if r['attention_impl'] == 'flash' and r['remat'] == 'none']
  one = [r for r in accum if r['grad_accum_steps'] == 1]
  more = [r for r in accum if r['grad_accum_steps'] > 1 and r['micro_batch'] == (one[0]['micro_batch'] if one else 0)]
  if one and more:
    r1, rk = one[0], max(more, key=lambda r: r['grad_accum_steps'])
    per_micro = (rk['ms_per_step'] - r1['ms_per_step']) / (rk['grad_accum_steps'] - 1)
    rest = r1['ms_per_step'] - per_micro
    tokens = r1['tokens_per_step']
    fwd_bwd_mfu = flops['total'] * tokens / (per_micro / 1e3) / 1e12 / peak['best_tflops']
    extrapolated = ', '.join(f'k={k}: {100 * fwd_bwd_mfu * k * per_micro / (k * per_micro + rest):.1f}%'
                             for k in (8, 16, 64))
    split.append(f'From the accumulation runs (kernels, {r1["grad_accum_steps"]} and {rk["grad_accum_steps"]} '
                 f'micro-batches): one forward + backward of {r1["micro_batch"]} x {seq_len} costs {per_micro:.1f} ms '
                 f'(MFU of forward + backward alone {100 * fwd_bwd_mfu:.1f}%); the rest of the step (update, '
                 f'QK-Clip, bias, metrics) {rest:.1f} ms. MFU with k micro-batches per update ~ k x {per_micro:.0f} '
                 f'/ (k x {per_micro:.0f} + {rest:.0f}) x {100 * fwd_bwd_mfu:.1f}% (extrapolated, not measured: '
                 f'{extrapolated}).')
  profile = extras.get('profile')
  if profile and 'by_phase' in profile:
    phases = ', '.join(f'{name} {ms:.1f}' for name, ms in profile['by_phase'])
    first = results[0]
    split.append(f'Profiled step ({first["variant"]}, {first["rows"]} x {first["seq_len"]}; '
                 f'trace in {extras["trace_dir"]}): wall '
                 f'{extras["profiled_step_wall_ms"]:.1f} ms, GPU kernel time '
                 f'{profile["gpu_kernel_ms"]:.1f} ms over a {profile["gpu_span_ms"]:.1f} ms span '
                 f'({profile.get("matched_ms", 0):.1f} ms matched to HLO instructions); by phase (ms): {phases}.')
  if split:
    lines += [''] + split
  if profile and 'by_component' in profile:
    lines += ['', 'GPU kernel time of the profiled step by phase (forward, backward, update = MuonClip + QK-Clip + '
              'router bias + metrics) and component:', '',
              '| phase / component | ms | share |', '|---|---|---|']
    for name, ms in profile['by_component'][:24]:
      lines.append(f'| {name} | {ms:.2f} | {100 * ms / profile["gpu_kernel_ms"]:.1f}% |')
    lines += ['', 'Largest source lines of the profiled step (phase | innermost frame in this repo | op):', '',
              '| phase / source / op | ms |', '|---|---|']
    for name, ms in profile['by_line'][:14]:
      lines.append(f'| {name.replace("|", "/")} | {ms:.2f} |')
  if extras.get('profile_error'):
    lines += ['', f'Not measured: {extras["profile_error"]}']
  lines += ['', f'Run time {seconds:.0f} s.']
  return lines


def main(argv):
  del argv
  begin = time.perf_counter()
  smoke = _SMOKE.value
  config_name = 'k2_tiny' if smoke else _MODEL.value
  seq_len = 64 if smoke else _SEQ_LEN.value
  base = get_config(config_name, dtype='bfloat16')
  if seq_len > base.rope.max_position_embeddings:
    raise SystemExit(f'error: seq_len {seq_len} exceeds {config_name} positions {base.rope.max_position_embeddings}')
  counts = params_lib.count(base)
  n_matmul = matmul_params_per_token(base)
  flops = flops_per_token(base, seq_len)
  print(f'{config_name}: activated {counts["activated"] / 1e6:.1f}M, N_matmul {n_matmul / 1e6:.1f}M; '
        f'FLOPs/token {flops["total"] / 1e9:.3f}G (matmul {flops["matmul"] / 1e9:.3f}G, attention '
        f'{flops["attention"] / 1e9:.3f}G)', flush=True)
  peak = matmul_peak(256 if smoke else 8192)
  print(f'bf16 matmul peak: best {peak["best_tflops"]:.1f} TFLOP/s, median {peak["median_tflops"]:.1f}', flush=True)

  table = SMOKE_VARIANTS if smoke else VARIANTS
  variants = [table[key] for key in _VARIANTS.value]
  results, extras = [], {}
  json_path = os.path.splitext(_OUT.value)[0] + '.json'

  def write() -> str:
    text = write_section(_OUT.value, 'bench_train', report(results, extras, peak, flops, config_name, counts,
                                                            n_matmul, seq_len, time.perf_counter() - begin))
    with open(json_path, 'w') as f:
      json.dump({'peak': peak, 'flops_per_token': flops, 'results': results, 'extras': extras, 'code': CODE.value,
                 'argv': ' '.join(sys.argv[1:]),
                 'device_kind': jax.devices()[0].device_kind, 'date': str(datetime.date.today()),
                 'seconds': time.perf_counter() - begin}, f, indent=1, default=str)
    return text

  def record(result):
    results.append(result)
    print(json.dumps(result), flush=True)
    write()

  def failed(variant, e):
    traceback.print_exc()
    record({**_describe(variant, seq_len), 'error': error_line(e)})

  # The first variant compiles and runs alone (it autotunes XLA's fusions on an idle GPU; its figures are safe
  # early). The others then compile together in threads (XLA compiles outside the
  # GIL and reuses the first's autotuning for shared fusions), and run one by one once all have compiled, so no
  # compile shares the GPU with a timed step. The trace is summarized last (CPU work).
  first, rest = variants[0], variants[1:]
  try:
    setup, lowered = lower(first, base, seq_len)
    compiled, compile_s = compile_lowered(lowered)
    print(f'{first.name}: compiled in {compile_s:.0f} s', flush=True)
    record(run_variant(first, setup, compiled, compile_s, seq_len, flops, peak['best_tflops'], extras))
    del compiled, lowered
  except Exception as e:  # noqa: BLE001 (an OOM in one variant must not stop the others)
    failed(first, e)
  gc.collect()
  first_result = results[-1] if results else {}
  limit = memory_limit() or (2 ** 40 if smoke else 0)
  doubled = table['kernels_rows8']
  if ('temp_gib' in first_result and first.attention_impl == 'flash' and first.grad_accum_steps == 1
      and first.micro_batch * 2 == doubled.micro_batch and doubled not in rest
      and (first_result['argument_gib'] + 2.1 * first_result['temp_gib']) * 2 ** 30 < 0.95 * limit):
    rest.append(doubled)
  if rest and time.perf_counter() - begin > _BUDGET_S.value:
    for variant in rest:
      record({**_describe(variant, seq_len), 'error': 'skipped (time budget)'})
    rest = []
  pending = []
  for variant in rest:
    try:
      pending.append((variant, *lower(variant, base, seq_len)))
    except Exception as e:  # noqa: BLE001
      failed(variant, e)
  with concurrent.futures.ThreadPoolExecutor(max(1, len(pending))) as pool:
    futures = [pool.submit(compile_lowered, lowered) for _, _, lowered in pending]
    concurrent.futures.wait(futures)
  print(f'compiled {len(pending)} more variants at {time.perf_counter() - begin:.0f} s', flush=True)
  for (variant, setup, _), future in zip(pending, futures):
    if time.perf_counter() - begin > _RUN_BUDGET_S.value:
      record({**_describe(variant, seq_len), 'error': 'skipped (time budget)'})
      continue
    try:
      compiled, compile_s = future.result()
      record(run_variant(variant, setup, compiled, compile_s, seq_len, flops, peak['best_tflops']))
      del compiled
    except Exception as e:  # noqa: BLE001
      failed(variant, e)
    gc.collect()
  if extras.get('trace_dir') and time.perf_counter() - begin < _RUN_BUDGET_S.value + 25:
    try:
      extras['profile'] = summarize_trace(_TRACE_DIR.value, 'train_step')
    except Exception as e:  # noqa: BLE001
      extras['profile_error'] = error_line(e)
      traceback.print_exc()
  print(write())
  profile = extras.get('profile') or {}
  for key in ('by_line', 'by_kernel'):
    if key in profile:
      print(f'\n{key} (ms):')
      for name, ms in profile[key]:
        print(f'  {ms:8.2f}  {name}')


if __name__ == '__main__':
  app.run(main)
