"""Helpers shared by the benchmarks in experiments/: timing, the matmul peak, the model FLOP count, synthetic
packed batches, a profiler-trace summary, and the header and markers of a BENCHMARKS.md section.

Every benchmark writes one BENCHMARKS.md section between `<!-- <name>:start -->` and `<!-- <name>:end -->` markers
(`write_section`), headed by the device, the date, the JAX version and the commit that ran (`section_title`, from
--code: the device copies of the tree carry no .git).
"""

from __future__ import annotations

import datetime
import glob
import gzip
import math
import os
import re
import shutil
import statistics
import time
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from k2 import model as model_lib
from k2.config import ModelConfig

CODE = flags.DEFINE_string('code', '', 'Which code ran (a commit), named in the section header.')
# The learning rate of the benchmarks' MuonClip (any value: only the timing matters).
LEARNING_RATE = 2e-4


# ------------------------------------------------------------------------------------------------ the section


def section_title(title: str) -> str:
  """'## <title> (<date>, <device>, jax <version>, code <commit>)' for the default device."""
  code = f', code {CODE.value}' if CODE.value else ''
  return f'## {title} ({datetime.date.today()}, {jax.devices()[0].device_kind}, jax {jax.__version__}{code})'


def write_section(path: str, name: str, lines: list[str]) -> str:
  """Writes `lines` between the section markers of benchmark `name` to `path`; returns the text written."""
  text = '\n'.join([f'<!-- {name}:start -->', *lines, f'<!-- {name}:end -->', ''])
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    f.write(text)
  return text


# ---------------------------------------------------------------------------------------------------- timing


def time_ms(fn, *args, iters: int) -> float:
  """Median ms per call of back-to-back calls of `fn(*args)` after a compile + warm-up call; fast calls run
  several at a time (in flight together, hiding the dispatch), slow ones get fewer samples (about 1 s each)."""
  jax.block_until_ready(fn(*args))  # compile + warm-up
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  once = time.perf_counter() - start
  iters = max(2, min(iters, int(1.0 / max(once, 1e-6))))
  batch = max(1, min(20, int(0.02 / max(once, 1e-6))))
  samples = []
  for _ in range(iters):
    start = time.perf_counter()
    outs = [fn(*args) for _ in range(batch)]
    jax.block_until_ready(outs)
    samples.append((time.perf_counter() - start) * 1e3 / batch)
  return statistics.median(samples)


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
  """The default device's memory limit in bytes (None on CPU)."""
  try:
    return int(jax.devices()[0].memory_stats()['bytes_limit'])
  except Exception:  # CPU has no memory_stats
    return None


# ----------------------------------------------------------------------------------------- FLOPs and inputs


def matmul_params_per_token(config: ModelConfig) -> int:
  """N_matmul, parameters that multiply activations, per token: every nnx.Param of 2+ dimensions except the
  embedding table (a lookup), with routed expert stacks counted at top_k / num_experts (the experts a token uses),
  the router and lm_head included (norm scales are not matmuls). From the model's abstract shapes."""
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
  """Model FLOPs per trained token: 6 N_matmul + 3 L H (d_qk + d_v) T (forward + backward = 3 x forward; causal
  attention over a row of T sees T/2 keys per query on average, 2 (d_qk + d_v) FLOPs per (query, key) pair)."""
  att = config.attention
  matmul = 6 * matmul_params_per_token(config)
  attention = 3 * config.num_layers * att.num_heads * (att.qk_head_dim + att.v_head_dim) * seq_len
  return {'matmul': float(matmul), 'attention': float(attention), 'total': float(matmul + attention)}


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
    ('newton_schulz/', '', 'MuonClip + QK-Clip'),
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


def capture_trace(compiled, *args, trace_dir: str, name: str):
  """Runs `compiled(*args)` once under the profiler; writes the trace (<name>.xplane.pb.gz) and the compiled HLO
  (<name>_hlo.txt.gz) to trace_dir for `summarize_trace`. Returns (outputs, wall ms of the call)."""
  os.makedirs(trace_dir, exist_ok=True)
  with gzip.open(os.path.join(trace_dir, f'{name}_hlo.txt.gz'), 'wt') as f:
    f.write(compiled.as_text())
  log_dir = os.path.join('/tmp', f'{name}_trace')
  shutil.rmtree(log_dir, ignore_errors=True)
  jax.profiler.start_trace(log_dir)
  t0 = time.perf_counter()
  outputs = jax.block_until_ready(compiled(*args))
  wall_ms = (time.perf_counter() - t0) * 1e3
  jax.profiler.stop_trace()
  paths = glob.glob(os.path.join(log_dir, '**', '*.xplane.pb'), recursive=True)
  if not paths:
    raise RuntimeError('the profiler wrote no xplane.pb')
  with open(paths[0], 'rb') as src, gzip.open(os.path.join(trace_dir, f'{name}.xplane.pb.gz'), 'wb') as dst:
    shutil.copyfileobj(src, dst)
  return outputs, wall_ms


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
  if kernel.startswith(('flash_attention', 'grouped_matmul', 'newton_schulz')):
    return 'pallas'
  return ''


def summarize_trace(trace_dir: str, name: str) -> dict:
  """GPU kernel time of capture_trace's trace, by phase, component, source line and kernel name (ms).

  XLA runs most of the step as CUDA graphs (command buffers), so a kernel's `hlo_op` names the graph, not the HLO
  instruction. Kernels of XLA fusions are named after their instruction ('loop_add_fusion_3' is
  'loop_add_fusion.3'); the others (cuBLAS, Pallas, CUB) are matched to the next custom call of their kind in the
  entry computation's schedule after the last named kernel.
  """
  from jax.profiler import ProfileData
  with gzip.open(os.path.join(trace_dir, f'{name}_hlo.txt.gz'), 'rt') as f:
    hlo_text = f.read()
  meta = _hlo_metadata(hlo_text)
  schedule = _entry_schedule(hlo_text)
  position = {name: i for i, (name, _) in enumerate(schedule)}
  with gzip.open(os.path.join(trace_dir, f'{name}.xplane.pb.gz'), 'rb') as f:
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


# ---------------------------------------------------------------------------------------------------- errors


def error_line(e: BaseException) -> str:
  """One line for a failed candidate: the out-of-memory line if there is one, else the first line."""
  text = f'{type(e).__name__}: {e}'
  for line in text.splitlines():
    if 'RESOURCE_EXHAUSTED' in line or 'out of memory' in line.lower():
      return line.strip()[:300]
  return text.splitlines()[0][:300] if text else type(e).__name__
