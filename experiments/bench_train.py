"""Benchmark: tokens/s and MFU of one k2_small MuonClip training step on one device, reference paths vs kernels.

    python -m experiments.bench_train --out=DIR/bench_train.md --trace_dir=DIR   # on one GPU (~3 min on an H200)
    python -m experiments.bench_train --from_json=DIR/bench_train.json --out=section.md   # rewrite the section
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
back-to-back products) is measured in the same process. Also timed, on the first variant's state: the MuonClip
update alone (optimizer.update + apply_updates, jitted, random gradients), and with --trace_dir one profiled step
whose GPU kernel time is split by phase (forward, backward, update = optimizer + QK-Clip + bias + metrics) and by
component and source line (from the profiler trace and the compiled HLO's stack-frame metadata); the trace
(xplane.pb.gz) and the HLO text are written to --trace_dir.

Model FLOPs per token (training = forward + backward = 3 x forward; a multiply-add is 2 FLOPs):
  6 * N_matmul + 3 * L * H * (d_qk + d_v) * T
N_matmul: parameters that multiply activations, per token: every nnx.Param of 2+ dimensions except the embedding
table (a lookup), with routed expert stacks counted at top_k / num_experts (the experts a token uses), the router
and lm_head included (norm scales are not matmuls). Attention: per layer and head, QK^T and PV cost 2 * (d_qk + d_v)
FLOPs per (query, key) pair forward; causal attention over a row of T has T(T+1)/2 ~ T^2/2 pairs, i.e. T/2 keys
per query on average, times 3 for training. MFU counts every row as one causal sequence of T (the usual
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
import glob
import gzip
import json
import math
import os
import re
import shutil
import statistics
import sys
import time
import traceback
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx

from k2 import model as model_lib
from k2 import params as params_lib
from k2.config import ModelConfig, get_config
from k2.optim import muonclip
from k2.train.step import StepSetup, TrainState, init_state, train_step

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
_CODE = flags.DEFINE_string('code', '', 'Which code ran (a commit), named in the section header.')
_FROM_JSON = flags.DEFINE_string('from_json', '', 'Only rewrite --out from this earlier run\'s JSON (no device).')
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


# ----------------------------------------------------------------------------------------------------- FLOPs


def matmul_params_per_token(config: ModelConfig) -> int:
  """N_matmul of the module docstring, from the model's abstract shapes."""
  params = nnx.state(model_lib.abstract(config), nnx.Param)
  moe = config.moe
  total = 0
  for path, variable in nnx.to_flat_state(params):
    shape = variable.shape
    if path[-1] == 'embed' or len(shape) < 2:
      continue
    size = math.prod(shape)
    if path[-2:-1] == ('ffn',) and path[-1] in ('gate_proj', 'up_proj', 'down_proj') and len(shape) == 3:
      size = size * moe.num_experts_per_token // moe.num_experts  # a routed [E, ., .] stack
    total += size
  return total


def flops_per_token(config: ModelConfig, seq_len: int) -> dict[str, float]:
  att = config.attention
  matmul = 6 * matmul_params_per_token(config)
  attention = 3 * config.num_layers * att.num_heads * (att.qk_head_dim + att.v_head_dim) * seq_len
  return {'matmul': float(matmul), 'attention': float(attention), 'total': float(matmul + attention)}


# ------------------------------------------------------------------------------------------------ the inputs


def synthetic_batch(rows: int, seq_len: int, vocab: int, docs_per_row: int, seed: int = 0) -> dict[str, jax.Array]:
  """Packed rows of random tokens: `docs_per_row` documents per row, cut at random points."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (rows, seq_len + 1), dtype=np.int64).astype(np.int32)
  segment_ids = np.zeros((rows, seq_len), np.int32)
  positions = np.zeros((rows, seq_len), np.int32)
  docs = max(1, min(docs_per_row, seq_len // 2))
  for r in range(rows):
    cuts = np.sort(rng.choice(np.arange(1, seq_len), docs - 1, replace=False)) if docs > 1 else np.array([], int)
    starts = np.concatenate([[0], cuts])
    ends = np.concatenate([cuts, [seq_len]])
    for d, (s, e) in enumerate(zip(starts, ends)):
      segment_ids[r, s:e] = d + 1
      positions[r, s:e] = np.arange(e - s)
  # The last token of a document has no next token in it: masked out of the loss.
  mask = np.ones((rows, seq_len), np.float32)
  mask[:, :-1] = (segment_ids[:, 1:] == segment_ids[:, :-1])
  mask[:, -1] = 0.0
  batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'positions': positions, 'segment_ids': segment_ids,
           'mask': mask}
  return {k: jnp.asarray(v) for k, v in batch.items()}


def same_document_pairs(segment_ids: np.ndarray) -> int:
  """Causal (query, key) pairs within one document, summed over rows: sum of L(L+1)/2 over documents."""
  total = 0
  for row in segment_ids:
    _, lengths = np.unique(row, return_counts=True)
    total += int(np.sum(lengths * (lengths + 1) // 2))
  return total


# ---------------------------------------------------------------------------------------------------- timing


def matmul_peak(n: int, reps: int = 5, calls: int = 10) -> dict[str, float]:
  """bf16 [n, n] @ [n, n] on random data: best and median TFLOP/s over `reps` runs of `calls` back-to-back calls."""
  a = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
  b = jax.random.normal(jax.random.key(2), (n, n), jnp.bfloat16)
  f = jax.jit(lambda a, b: a @ b)
  for _ in range(3):
    jax.block_until_ready(f(a, b))
  rates = []
  for _ in range(reps):
    start = time.perf_counter()
    for _ in range(calls):
      out = f(a, b)
    jax.block_until_ready(out)
    rates.append(2 * n ** 3 * calls / (time.perf_counter() - start) / 1e12)
  return {'n': n, 'best_tflops': max(rates), 'median_tflops': statistics.median(rates)}


def memory_limit() -> int | None:
  try:
    return int(jax.devices()[0].memory_stats()['bytes_limit'])
  except Exception:  # CPU has no memory_stats
    return None


def variant_config(variant: Variant, base: ModelConfig) -> ModelConfig:
  return base.replace(remat_policy=variant.remat_policy, attention_impl=variant.attention_impl,
                      matmul_impl=variant.matmul_impl)


_LEARNING_RATE = 2e-4


def lower(variant: Variant, base: ModelConfig, seq_len: int):
  """(setup, lowered step) from abstract shapes: nothing is allocated, so several can compile at once."""
  config = variant_config(variant, base)
  tx = muonclip(_LEARNING_RATE)
  graphdef, params, buffers = nnx.split(model_lib.abstract(config), nnx.Param, ...)
  state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params, buffers=buffers,
                     opt_state=jax.eval_shape(tx.init, params))
  setup = StepSetup(graphdef=graphdef, model_config=config, optimizer=tx,
                    schedule=optax.constant_schedule(_LEARNING_RATE), qk_clip_tau=100.0, bias_update_rate=1e-3,
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
      state = capture_profile(compiled, state, batch, _TRACE_DIR.value, extras)
    except Exception as e:  # noqa: BLE001 (report and go on)
      extras['profile_error'] = _error_line(e)
      traceback.print_exc()
  del state, batch
  return result


def _describe(variant: Variant, seq_len: int) -> dict:
  return {'variant': variant.name, 'rows': variant.rows, 'micro_batch': variant.micro_batch,
          'grad_accum_steps': variant.grad_accum_steps, 'seq_len': seq_len, 'remat': variant.remat_policy,
          'attention_impl': variant.attention_impl, 'matmul_impl': variant.matmul_impl}


def lower_optimizer(config: ModelConfig):
  """The MuonClip update alone (optimizer.update + apply_updates), lowered from abstract shapes."""
  tx = muonclip(_LEARNING_RATE)
  params = nnx.state(model_lib.abstract(config), nnx.Param)
  opt_state = jax.eval_shape(tx.init, params)

  def update(grads, opt_state, params):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return tx, jax.jit(update).lower(params, opt_state, params)


def time_optimizer(tx: optax.GradientTransformation, compiled, config: ModelConfig) -> float:
  """Median ms of `compiled` (lower_optimizer) on a fresh model's parameters and random float32 gradients."""
  params = nnx.state(model_lib.create(config, seed=0), nnx.Param)
  opt_state = tx.init(params)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(3), len(leaves))
  grads = jax.tree.unflatten(treedef, [1e-3 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])
  for _ in range(2):
    jax.block_until_ready(compiled(grads, opt_state, params))
  times = []
  for _ in range(max(3, _ITERS.value)):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(grads, opt_state, params))
    times.append((time.perf_counter() - t0) * 1e3)
  return statistics.median(times)


# --------------------------------------------------------------------------------------------------- profile


def _short_path(path: str) -> str:
  """'optax/_src/alias.py' for installed packages, 'k2/moe.py' for this repo's files."""
  if '/site-packages/' in path:
    return path.split('/site-packages/')[-1]
  for package in ('/k2/', '/pallas_kernels/', '/experiments/'):
    if package in path:
      return path[path.rindex(package) + 1:]
  return '/'.join(path.split('/')[-2:])


def _hlo_metadata(hlo_text: str) -> dict[str, tuple[str, str]]:
  """HLO instruction name -> (op_name, Python stack innermost first as 'dir/file.py:line fn; ...').

  Instructions name a `stack_frame_id` in their metadata; the module's FileNames / FunctionNames / FileLocations /
  StackFrames tables resolve it (a frame whose parent is itself, or 0, is the outermost)."""
  tables: dict[str, dict[int, str]] = defaultdict(dict)
  section = None
  for line in hlo_text.splitlines():
    if line in ('FileNames', 'FunctionNames', 'FileLocations', 'StackFrames'):
      section = line
      continue
    if section and not line.strip():
      section = None
      continue
    if section:
      key, _, value = line.partition(' ')
      if key.isdigit():
        tables[section][int(key)] = value
  field = lambda text, name: int(re.search(name + r'=(\d+)', text).group(1))
  files = {k: _short_path(v.strip('"')) for k, v in tables['FileNames'].items()}
  functions = {k: v.strip('"') for k, v in tables['FunctionNames'].items()}
  locations = {k: f'{files.get(field(v, "file_name_id"), "?")}:{field(v, "line")} '
                  f'{functions.get(field(v, "function_name_id"), "?")}' for k, v in tables['FileLocations'].items()}
  frames = {k: (field(v, 'file_location_id'), field(v, 'parent_frame_id')) for k, v in tables['StackFrames'].items()}

  def stack(frame_id: int) -> str:
    out, seen = [], set()
    while frame_id in frames and frame_id not in seen:
      seen.add(frame_id)
      location, parent = frames[frame_id]
      out.append(locations.get(location, '?'))
      frame_id = parent
    return '; '.join(out)

  table = {}
  pattern = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?metadata=\{([^}]*)\}')
  for line in hlo_text.splitlines():
    match = pattern.match(line)
    if not match:
      continue
    meta = match.group(2)
    op_name = re.search(r'op_name="([^"]*)"', meta)
    frame = re.search(r'stack_frame_id=(\d+)', meta)
    table[match.group(1)] = (op_name.group(1) if op_name else '', stack(int(frame.group(1))) if frame else '')
  return table


def _phase(op_name: str) -> str:
  if 'transpose(' in op_name:
    return 'backward'
  if 'jvp(' in op_name:
    return 'forward'
  return 'update'


# (file, function or '') -> component; the innermost frame that matches decides.
_COMPONENTS = [
    ('flash_attention/', '', 'attention core'), ('k2/attention.py', 'attention_reference', 'attention core'),
    ('k2/attention.py', 'attention', 'attention core'), ('grouped_matmul/', '', 'MoE expert matmuls'),
    ('k2/moe.py', 'grouped_matmul', 'MoE expert matmuls'), ('k2/moe.py', 'route', 'MoE router'),
    ('k2/moe.py', '', 'MoE dispatch + combine'), ('k2/attention.py', '', 'MLA projections + rope'),
    ('k2/rope.py', '', 'MLA projections + rope'), ('k2/mlp.py', '', 'dense / shared-expert MLP'),
    ('k2/norms.py', '', 'RMSNorm'), ('train/step.py', 'next_token_loss', 'cross-entropy'),
    ('optax/losses', '', 'cross-entropy'), ('k2/model.py', '', 'embedding + lm_head + residual'),
    ('k2/optim/', '', 'MuonClip + QK-Clip'), ('optax/', '', 'MuonClip + QK-Clip'),
    ('qk_clip/', '', 'MuonClip + QK-Clip'), ('newton_schulz/', '', 'MuonClip + QK-Clip'),
    ('train/step.py', '', 'step (metrics, router bias)'),
]


def _component(stack: str) -> tuple[str, str]:
  """(component, the frame that decided it) for a stack 'file:line fn; ...' (innermost first)."""
  frames = stack.split('; ') if stack else []
  for frame in frames:
    location, _, function = frame.partition(' ')
    for file_key, function_key, name in _COMPONENTS:
      if file_key in location and (not function_key or function == function_key):
        return name, frame
  return 'other', frames[0] if frames else ''


def capture_profile(compiled, state, batch, trace_dir: str, extras: dict):
  """Profiles one step; writes the trace (xplane.pb.gz) and the compiled HLO to trace_dir. Returns the state."""
  os.makedirs(trace_dir, exist_ok=True)
  with gzip.open(os.path.join(trace_dir, 'train_step_hlo.txt.gz'), 'wt') as f:
    f.write(compiled.as_text())
  log_dir = os.path.join('/tmp', 'bench_train_trace')
  shutil.rmtree(log_dir, ignore_errors=True)
  jax.profiler.start_trace(log_dir)
  t0 = time.perf_counter()
  state, metrics = compiled(state, batch)
  jax.block_until_ready((state, metrics))
  extras['profiled_step_wall_ms'] = (time.perf_counter() - t0) * 1e3
  jax.profiler.stop_trace()
  paths = glob.glob(os.path.join(log_dir, '**', '*.xplane.pb'), recursive=True)
  if not paths:
    raise RuntimeError('the profiler wrote no xplane.pb')
  extras['trace_path'] = os.path.join(trace_dir, 'train_step.xplane.pb.gz')
  with open(paths[0], 'rb') as src, gzip.open(extras['trace_path'], 'wb') as dst:
    shutil.copyfileobj(src, dst)
  return state


# Lines the profiler derives from the kernel lines (they would count each kernel twice).
_DERIVED_LINES = ('XLA Modules', 'XLA Ops', 'XLA TraceMe', 'Steps', 'TensorFlow Ops', 'TensorFlow Name Scope',
                  'Framework Ops', 'Framework Name Scope', 'Source code', 'python')


def _entry_schedule(hlo_text: str) -> list[tuple[str, str]]:
  """The entry computation's instructions in schedule order, as (name, launcher): launcher is 'gemm' (cuBLAS),
  'pallas' (Triton custom call), 'sort' (CUB), or '' for the rest (fusions are found by name instead)."""
  schedule, inside = [], False
  pattern = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+) = ')
  for line in hlo_text.splitlines():
    if line.startswith('ENTRY'):
      inside = True
      continue
    if inside and line.startswith('}'):
      break
    match = pattern.match(line) if inside else None
    if not match:
      continue
    target = re.search(r'custom_call_target="([^"]*)"', line)
    target = target.group(1) if target else ''
    launcher = ('gemm' if 'cublas' in target else 'pallas' if 'triton' in target
                else 'sort' if 'sort' in target else '')
    schedule.append((match.group(1), launcher))
  return schedule


def _launcher(kernel: str) -> str:
  """Which kind of custom call launched an unnamed kernel ('' for copies, memsets and unknown kernels)."""
  if kernel.startswith(('nvjet', 'sm90_', 'sm80_', 'cutlass', 'ampere', 'void cutlass', 'gemv', 'gemmk')):
    return 'gemm'
  if 'cub::' in kernel or 'Sort' in kernel:
    return 'sort'
  if kernel.startswith(('flash_attention', 'grouped_matmul', 'newton_schulz', 'qk_clip')):
    return 'pallas'
  return ''


def summarize_trace(trace_dir: str) -> dict:
  """GPU kernel time of capture_profile's trace, by phase, component, source line and kernel name (ms).

  XLA runs most of the step as CUDA graphs (command buffers), so a kernel's `hlo_op` names the graph, not the HLO
  instruction. Kernels of XLA fusions are named after their instruction ('loop_add_fusion_3' is
  'loop_add_fusion.3'); the others (cuBLAS, Pallas, CUB) are matched to the next custom call of their kind in the
  entry computation's schedule after the last named kernel.
  """
  from jax.profiler import ProfileData
  with gzip.open(os.path.join(trace_dir, 'train_step_hlo.txt.gz'), 'rt') as f:
    hlo_text = f.read()
  meta = _hlo_metadata(hlo_text)
  schedule = _entry_schedule(hlo_text)
  position = {name: i for i, (name, _) in enumerate(schedule)}
  with gzip.open(os.path.join(trace_dir, 'train_step.xplane.pb.gz'), 'rb') as f:
    data = ProfileData.from_serialized_xspace(f.read())
  planes = [p for p in data.planes if p.name.startswith('/device:GPU')]
  if not planes:  # CPU (the smoke run): the client's thunks are the "kernels"
    planes = [p for p in data.planes if p.name == '/host:CPU']
  events = []
  for plane in planes:
    lines = list(plane.lines)
    streams = [line for line in lines if line.name.startswith('Stream')]
    for line in streams or [line for line in lines if line.name not in _DERIVED_LINES]:
      for event in line.events:
        stats = dict(event.stats)
        if 'hlo_op' in stats or 'hlo_module' in stats:  # skip what is outside the step's program
          events.append((event.start_ns, event.duration_ns, event.name, stats.get('hlo_op', '')))
  events.sort()
  by_phase, by_component, by_line, by_kernel = (defaultdict(float) for _ in range(4))
  total, cursor, matched = 0.0, 0, 0.0
  for _, duration, kernel, hlo_op in events:
    ms = duration / 1e6
    name = re.sub(r'_(\d+)$', r'.\1', kernel)
    instruction = name if name in meta else kernel if kernel in meta else hlo_op if hlo_op in meta else ''
    if instruction in position:
      cursor = position[instruction]
    elif not instruction and _launcher(kernel):
      kind = _launcher(kernel)
      for i in range(cursor + 1, len(schedule)):
        if schedule[i][1] == kind:
          instruction, cursor = schedule[i][0], i
          break
    op_name, stack = meta.get(instruction, ('', ''))
    component, frame = _component(stack)
    phase = _phase(op_name)
    total += ms
    matched += ms if instruction else 0.0
    by_phase[phase] += ms
    by_component[(phase, component)] += ms
    by_line[(phase, frame or kernel[:40], re.sub(r'^.*?\)/', '', op_name)[-60:])] += ms
    by_kernel[kernel[:80]] += ms
  span = (events[-1][0] + events[-1][1] - events[0][0]) / 1e6 if events else 0.0
  top = lambda d, n: sorted(d.items(), key=lambda kv: -kv[1])[:n]
  return {'gpu_kernel_ms': total, 'gpu_span_ms': span, 'matched_ms': matched,
          'by_phase': top(by_phase, 10),
          'by_component': [(f'{p} / {c}', ms) for (p, c), ms in top(by_component, 40)],
          'by_line': [(f'{p} | {w} | {o}', ms) for (p, w, o), ms in top(by_line, 40)],
          'by_kernel': top(by_kernel, 25)}


# ---------------------------------------------------------------------------------------------------- report


def _error_line(e: BaseException) -> str:
  text = f'{type(e).__name__}: {e}'
  for line in text.splitlines():
    if 'RESOURCE_EXHAUSTED' in line or 'out of memory' in line.lower():
      return line.strip()[:300]
  return text.splitlines()[0][:300] if text else type(e).__name__


def report(results: list[dict], extras: dict, peak: dict, flops: dict, config_name: str, counts: dict,
           n_matmul: int, seq_len: int, seconds: float, device_kind: str | None = None, date: str | None = None,
           code: str | None = None, argv: str | None = None) -> list[str]:
  device_kind = device_kind or jax.devices()[0].device_kind
  date = date or str(datetime.date.today())
  code = _CODE.value if code is None else code
  argv = ' '.join(sys.argv[1:]) if argv is None else argv
  lines = [
      '<!-- bench_train:start -->',
      f'## Training step, {config_name} with MuonClip ({date}, {device_kind}, jax {jax.__version__}'
      f'{", code " + code if code else ""})',
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
  if 'optimizer_ms' in extras:
    split.append(f'MuonClip update alone (optimizer.update + apply_updates, jitted, not donated): '
                 f'{extras["optimizer_ms"]:.1f} ms.')
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
                 f'{extras.get("profile_note", "summarized in the run")}): wall '
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
  if extras.get('profile_error') or extras.get('optimizer_error'):
    lines += ['', f'Not measured: {extras.get("profile_error", "")} {extras.get("optimizer_error", "")}'.strip()]
  lines += ['', f'Run time {seconds:.0f} s.', '<!-- bench_train:end -->', '']
  return lines


def rewrite_from_json(path: str, flops: dict, config_name: str, counts: dict, n_matmul: int, seq_len: int):
  """Writes --out again from an earlier run's JSON (and its trace, if the trace sits beside it, unsummarized)."""
  with open(path) as f:
    saved = json.load(f)
  extras = saved['extras']
  trace_dir = os.path.dirname(path)
  if os.path.exists(os.path.join(trace_dir, 'train_step.xplane.pb.gz')):
    extras['profile'] = summarize_trace(trace_dir)
    extras['profile_note'] = 'summarized after the run from its trace and HLO (--from_json)'
    extras.pop('profile_error', None)
  lines = report(saved['results'], extras, saved['peak'], flops, config_name, counts, n_matmul, seq_len,
                 saved.get('seconds', 0.0), device_kind=saved.get('device_kind'), date=saved.get('date'),
                 code=saved.get('code', ''), argv=saved.get('argv', ''))
  with open(_OUT.value, 'w') as f:
    f.write('\n'.join(lines))
  print('\n'.join(lines))
  for key in ('by_line', 'by_kernel'):
    for name, ms in extras.get('profile', {}).get(key, []):
      print(f'  {ms:8.2f}  {name}')


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
  if _FROM_JSON.value:
    rewrite_from_json(_FROM_JSON.value, flops, config_name, counts, n_matmul, seq_len)
    return
  peak = matmul_peak(256 if smoke else 8192)
  print(f'bf16 matmul peak: best {peak["best_tflops"]:.1f} TFLOP/s, median {peak["median_tflops"]:.1f}', flush=True)

  table = SMOKE_VARIANTS if smoke else VARIANTS
  variants = [table[key] for key in _VARIANTS.value]
  results, extras = [], {}
  json_path = os.path.splitext(_OUT.value)[0] + '.json'
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)

  def write() -> list[str]:
    with open(json_path, 'w') as f:
      json.dump({'peak': peak, 'flops_per_token': flops, 'results': results, 'extras': extras, 'code': _CODE.value,
                 'argv': ' '.join(sys.argv[1:]),
                 'device_kind': jax.devices()[0].device_kind, 'date': str(datetime.date.today()),
                 'seconds': time.perf_counter() - begin}, f, indent=1, default=str)
    lines = report(results, extras, peak, flops, config_name, counts, n_matmul, seq_len,
                   time.perf_counter() - begin)
    with open(_OUT.value, 'w') as f:
      f.write('\n'.join(lines))
    return lines

  def record(result):
    results.append(result)
    print(json.dumps(result), flush=True)
    write()

  def failed(variant, e):
    traceback.print_exc()
    record({**_describe(variant, seq_len), 'error': _error_line(e)})

  # The first variant compiles and runs alone (it autotunes XLA's fusions on an idle GPU; its figures are safe
  # early). The others and the optimizer-alone update then compile together in threads (XLA compiles outside the
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
  try:
    tx, optimizer_lowered = lower_optimizer(base)
  except Exception as e:  # noqa: BLE001
    optimizer_lowered, extras['optimizer_error'] = None, _error_line(e)
  with concurrent.futures.ThreadPoolExecutor(len(pending) + 1) as pool:
    futures = [pool.submit(compile_lowered, lowered) for _, _, lowered in pending]
    optimizer_future = pool.submit(compile_lowered, optimizer_lowered) if optimizer_lowered else None
    concurrent.futures.wait(futures + ([optimizer_future] if optimizer_future else []))
  print(f'compiled {len(pending)} more variants and the update at {time.perf_counter() - begin:.0f} s', flush=True)
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
  if optimizer_future is not None and time.perf_counter() - begin < _RUN_BUDGET_S.value + 15:
    try:
      extras['optimizer_ms'] = time_optimizer(tx, optimizer_future.result()[0], base)
      print(f'MuonClip update alone: {extras["optimizer_ms"]:.1f} ms', flush=True)
    except Exception as e:  # noqa: BLE001
      extras['optimizer_error'] = _error_line(e)
      traceback.print_exc()
  if extras.get('trace_path') and time.perf_counter() - begin < _RUN_BUDGET_S.value + 25:
    try:
      extras['profile'] = summarize_trace(_TRACE_DIR.value)
    except Exception as e:  # noqa: BLE001
      extras['profile_error'] = _error_line(e)
      traceback.print_exc()
  lines = write()
  print('\n'.join(lines))
  profile = extras.get('profile') or {}
  for key in ('by_line', 'by_kernel'):
    if key in profile:
      print(f'\n{key} (ms):')
      for name, ms in profile[key]:
        print(f'  {ms:8.2f}  {name}')


if __name__ == '__main__':
  app.run(main)
