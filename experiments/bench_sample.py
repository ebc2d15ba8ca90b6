"""Benchmark: decode speed against the HBM roofline, the MLA decode kernel, and continuous vs static batching.

    python -m experiments.bench_sample --out=BENCHMARKS_sample.md

One run on the GPU, k2_small with random bf16 weights (parts stop starting after --budget_s seconds; the file is
rewritten after every part):
  1. checks (k2_tiny, float32, the kernels the model picks on this device): cached decoding vs the full forward
     (logits of ragged prompts, teacher-forced), greedy `generate` and the rollout engine (with slot refills) vs
     the full forward's argmax;
  2. decode: `steps` greedy decode steps in one jitted loop per batch size, every row at --context filled slots,
     with the decode kernel (pallas_kernels/mla_decode, reads the filled slots) and with the plain-jnp reference
     under XLA (the previous path: reads every slot of the cache). Must-read bytes per step: the weights a step
     touches (everything but the embedding table, whose B rows count; routed experts by the expected number hit,
     E (1 - (1 - k/E)^B) per MoE layer for uniform routing) plus the filled cache slots; roofline fraction = those
     bytes / step time / the copy bandwidth measured in the same run;
  3. a rollout mix: --rollout_prompts prompts of mixed lengths with long-tailed budgets (most stop early, one per
     group of --slots runs to the cap, as the truncated answers of an RL batch), sampled at temperature 1,
     through `generate` in static batches of --slots prompts and through the rollout engine (continuous batching,
     k2/sample/engine.py) with --slots slots; each timed on a second pass (the first compiles), generated tokens/s;
  4. the kernel alone against XLA (experiments/bench_mla_decode.py).
"""

from __future__ import annotations

import datetime
import statistics
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from experiments import bench_mla_decode
from k2 import model as model_lib
from k2 import sample
from k2.config import get_config
from k2.sample import engine

_MODEL = flags.DEFINE_string('model', 'k2_small', 'Model variant to time.')
_BATCHES = flags.DEFINE_list('batches', ['64', '1', '256'], 'Batch sizes to time (in this order).')
_CONTEXT = flags.DEFINE_integer('context', 1024, 'Filled cache slots per row when decoding starts.')
_STEPS = flags.DEFINE_integer('steps', 64, 'Decode steps per timed call.')
_REPS = flags.DEFINE_integer('reps', 3, 'Timed calls per candidate (median).')
_ROLLOUT_PROMPTS = flags.DEFINE_integer('rollout_prompts', 256, 'Prompts in the rollout mix.')
_SLOTS = flags.DEFINE_integer('slots', 64, 'Rollout mix: engine slots and static batch size.')
_MAX_NEW = flags.DEFINE_integer('max_new', 512, 'Rollout mix: token budget cap.')
_MAX_PROMPT = flags.DEFINE_integer('max_prompt', 512, 'Rollout mix: longest prompt.')
_BUDGET = flags.DEFINE_float('budget_s', 1e9, 'Stop starting new parts after this many seconds.')
_OUT = flags.DEFINE_string('out', 'BENCHMARKS_sample.md', 'Markdown file the results are written to.')
_COMMIT = flags.DEFINE_string('commit', '', 'The code version to report (default: git rev-parse HEAD).')
_IDENTICAL = flags.DEFINE_bool('identical_rows', False, 'The setup of the bench before 2026-12-01 (77ac251): an all-zero '
                                'cache of --context slots and token 0 in every row, so all rows route alike.')
_SMOKE = flags.DEFINE_bool('smoke', False, 'Tiny shapes, to check the script itself on a CPU.')


# ------------------------------------------------------------------------------------------------------- checks


def checks() -> dict:
  """k2_tiny in float32 with the kernels this device picks: max |logit difference| of cached decoding vs the full
  forward over ragged prompts; whether greedy `generate` and the engine (2 slots, refills) give its argmax."""
  config = get_config('k2_tiny', vocab_size=512, num_layers=2, dtype='float32')
  model = model_lib.create(config, seed=0)
  prompts = [[11, 12, 13], [21, 22, 23, 24, 25, 26, 27, 28, 29], [31, 32, 33, 34, 35, 36]]
  continuation = [[41, 42, 43, 44], [51, 52, 53, 54], [61, 62, 63, 64]]
  width, steps = 16, 4
  full = nnx.jit(lambda m, t: m(t)[0])
  run = jax.jit(lambda t, p, c, decode: sample.forward(model, t, p, c, decode=decode), static_argnames='decode')
  with jax.default_matmul_precision('highest'):
    lengths = np.array([len(p) for p in prompts], np.int32)
    padded, sequences = np.zeros((3, width), np.int32), np.zeros((3, width), np.int32)
    for row, prompt in enumerate(prompts):
      padded[row, :len(prompt)] = prompt
      sequences[row, :len(prompt) + steps] = prompt + continuation[row]
    expected = np.asarray(full(model, jnp.asarray(sequences)))
    positions = np.broadcast_to(np.arange(width, dtype=np.int32), padded.shape)
    logits, cache = run(padded, positions, model.init_cache(3, width + steps), decode=False)
    worst = max(float(np.abs(np.asarray(logits[r, :len(p)]) - expected[r, :len(p)]).max())
                for r, p in enumerate(prompts))
    for step in range(steps):
      tokens = np.array([[c[step]] for c in continuation], np.int32)
      step_logits, cache = run(tokens, (lengths + step)[:, None], cache, decode=True)
      worst = max(worst, max(float(np.abs(np.asarray(step_logits[r, 0]) - expected[r, len(p) + step]).max())
                             for r, p in enumerate(prompts)))
    sequences = [list(p) for p in prompts]
    for _ in range(6):
      padded = np.zeros((3, width), np.int32)
      for row, seq in enumerate(sequences):
        padded[row, :len(seq)] = seq
      last = np.asarray(full(model, jnp.asarray(padded)))
      for row, seq in enumerate(sequences):
        seq.append(int(np.argmax(last[row, len(seq) - 1])))
    reference = [seq[len(p):] for seq, p in zip(sequences, prompts)]
    greedy = sample.generate(model, prompts, 6).tokens == reference
    rolled = engine.rollout(model, prompts, [6, 3, 5], num_slots=2, steps_per_sync=2, admit_group=1).tokens
    engine_greedy = rolled == [r[:b] for r, b in zip(reference, [6, 3, 5])]
  return {'cached_vs_full_max_abs': worst, 'greedy_matches': greedy, 'engine_greedy_matches': engine_greedy}


# ------------------------------------------------------------------------------------------------------- decode


def decode_loop(graphdef, state, cache, token, start, *, steps: int, options: sample.DecodeOptions):
  """`steps` greedy decode steps from position `start`: the generation loop without prefill or bookkeeping."""
  model = nnx.merge(graphdef, state)

  def body(i, carry):
    token, cache = carry
    positions = jnp.full(token.shape, start + i, jnp.int32)
    token, _, cache = sample.decode_step(model, token, positions, cache, jax.random.key(0), 1.0, options=options)
    return token, cache

  return jax.lax.fori_loop(0, steps, body, (token, cache))


_decode_loop = jax.jit(decode_loop, static_argnames=('graphdef', 'steps', 'options'), donate_argnames=('cache',))


def weight_bytes_per_step(model, batch: int) -> float:
  """Bytes of weights one decode step of `batch` rows must read (see the module docstring)."""
  moe = model.config.moe
  hit = 1.0 - (1.0 - moe.num_experts_per_token / moe.num_experts) ** batch  # expected fraction of experts used
  total = 0.0
  for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param)):
    names = [str(getattr(p, 'key', getattr(p, 'name', p))) for p in path]
    if names[0] == 'embed':
      total += batch * leaf.shape[-1] * leaf.dtype.itemsize
    elif leaf.ndim == 3 and leaf.shape[0] == moe.num_experts and names[-2] in ('gate_proj', 'up_proj', 'down_proj'):
      total += hit * leaf.nbytes
    else:
      total += leaf.nbytes
  return total


def time_decode(model, batch: int, bandwidth: float) -> dict:
  graphdef, state = nnx.split(model)
  context, steps = _CONTEXT.value, _STEPS.value
  att = model.config.attention
  keys = jax.random.split(jax.random.key(1), len(model.layers))
  # Random latents (never zeros: they can time faster than real data), every row filled up to `context`.
  cache = [jax.random.normal(k, (batch, context + steps, att.kv_lora_rank + att.qk_rope_head_dim),
                             jnp.float32).astype(model.config.runtime.dtype) for k in keys]
  token = jnp.zeros((batch,), jnp.int32)
  if _IDENTICAL.value:  # identical rows pick the same experts: far fewer weights read than a real batch
    cache, context = model.init_cache(batch, context), context - steps - 1
  options = sample.DecodeOptions()
  begin = time.perf_counter()
  token, cache = jax.block_until_ready(_decode_loop(graphdef, state, cache, token, context, steps=steps,
                                                    options=options))
  compile_s = time.perf_counter() - begin
  times = []
  for _ in range(_REPS.value):
    begin = time.perf_counter()
    token, cache = jax.block_until_ready(_decode_loop(graphdef, state, cache, token, context, steps=steps,
                                                      options=options))
    times.append(time.perf_counter() - begin)
  seconds = statistics.median(times) / steps
  cache_bytes = len(model.layers) * batch * (context + steps / 2) * (att.kv_lora_rank + att.qk_rope_head_dim) * 2
  weights = weight_bytes_per_step(model, batch)
  return {'ms_per_step': 1e3 * seconds, 'tokens_per_s': batch / seconds, 'weight_mb': weights / 1e6,
          'cache_mb': cache_bytes / 1e6, 'roofline': (weights + cache_bytes) / seconds / bandwidth,
          'floor_ms': 1e3 * (weights + cache_bytes) / bandwidth, 'first_call_s': compile_s}


# ------------------------------------------------------------------------------------------------- rollout mix


def rollout_mix(vocab: int, seed: int = 0):
  """Prompts of mixed lengths and long-tailed budgets (see the module docstring): (prompts, budgets)."""
  rng = np.random.default_rng(seed)
  count, group, cap, longest = _ROLLOUT_PROMPTS.value, _SLOTS.value, _MAX_NEW.value, _MAX_PROMPT.value
  lengths = rng.integers(max(1, longest // 8), longest + 1, count)
  budgets = np.clip(rng.exponential(cap / 6, count), 8, cap).astype(np.int32)
  for start in range(0, count, group):  # one truncated answer and one longest prompt per static batch
    budgets[start + rng.integers(min(group, count - start))] = cap
    lengths[start + rng.integers(min(group, count - start))] = longest
  prompts = [rng.integers(0, vocab, n).tolist() for n in lengths]
  return prompts, budgets.tolist()


def time_rollouts(model) -> dict:
  prompts, budgets = rollout_mix(model.config.vocab_size)
  slots = _SLOTS.value

  def static():
    results = [sample.generate(model, prompts[i:i + slots], budgets[i:i + slots], temperature=1.0, seed=i)
               for i in range(0, len(prompts), slots)]
    return sum((r.tokens for r in results), [])

  by_budget = engine.admission_order(np.array(budgets), slots)  # a stronger static baseline: similar budgets batched

  def static_sorted():
    results = [sample.generate(model, [prompts[j] for j in by_budget[i:i + slots]],
                               [budgets[j] for j in by_budget[i:i + slots]], temperature=1.0, seed=i)
               for i in range(0, len(prompts), slots)]
    return sum((r.tokens for r in results), [])

  def continuous():
    result = engine.rollout(model, prompts, budgets, num_slots=slots, temperature=1.0, seed=0, steps_per_sync=16)
    continuous.stats = result
    return result.tokens

  out = {'prompts': len(prompts), 'mean_prompt': float(np.mean([len(p) for p in prompts])),
         'mean_budget': float(np.mean(budgets)),
         'static_steps': sum(max(budgets[i:i + slots]) - 1 for i in range(0, len(prompts), slots)),
         'static_sorted_steps': sum(max(budgets[j] for j in by_budget[i:i + slots]) - 1
                                    for i in range(0, len(prompts), slots))}
  for name, fn in (('static', static), ('static_sorted', static_sorted), ('continuous', continuous)):
    begin = time.perf_counter()
    fn()  # compiles
    first = time.perf_counter() - begin
    begin = time.perf_counter()
    tokens = fn()
    seconds = time.perf_counter() - begin
    generated = sum(len(t) for t in tokens)
    out[name] = {'seconds': seconds, 'first_pass_s': first, 'tokens': generated, 'tokens_per_s': generated / seconds}
    print(f'rollout {name}: {out[name]}', flush=True)
  stats = continuous.stats
  out['engine'] = {'decode_steps': stats.decode_steps, 'syncs': stats.syncs, 'prefills': stats.prefills}
  return out


# ------------------------------------------------------------------------------------------------------ report


def git_commit() -> str:
  if _COMMIT.value:
    return _COMMIT.value
  try:
    return subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True,
                          check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return 'unknown'


def markdown(device, commit: str, bandwidth: float, checks_: dict, decode: dict, rollouts: dict,
             kernel: tuple | None) -> str:
  lines = [
      '<!-- bench_sample:start -->',
      f'## Decode and rollouts, {_MODEL.value} ({datetime.date.today()}, {device.device_kind}, jax {jax.__version__}, '
      f'code {commit})',
      '',
      f'Produced by `python -m experiments.bench_sample` (one run). Random bf16 weights and caches. Copy bandwidth '
      f'measured in the same run: {bandwidth / 1e12:.2f} TB/s (2 GiB device-to-device copy, bytes read + written).',
      '',
  ]
  if checks_:
    lines += [f'Checks (k2_tiny, float32, the kernels this device picks): cached decoding vs the full forward, max '
              f'|logit difference| {checks_["cached_vs_full_max_abs"]:.2e} over ragged prompts; greedy generate equals '
              f'the full-forward argmax: {checks_["greedy_matches"]}; the rollout engine (2 slots, refills) too: '
              f'{checks_["engine_greedy_matches"]}.', '']
  if decode:
    lines += [
        f'### Decode steps ({_STEPS.value} greedy steps in one jitted loop, median of {_REPS.value}; every row at '
        f'{_CONTEXT.value} filled slots)',
        '',
        'Must-read MB: the weights a step touches + the filled cache slots (module docstring). Floor: must-read '
        'bytes / copy bandwidth. XLA attention: the plain-jnp reference over every cache slot (the path before the '
        'kernel).',
        '',
        '| batch | decode attention | ms / step | tokens / s | must-read MB (weights + cache) | floor ms | '
        'roofline |',
        '|---|---|---|---|---|---|---|',
    ]
    for (batch, impl), r in decode.items():
      if 'error' in r:
        lines.append(f'| {batch} | {impl} | failed: {r["error"]} | | | | |')
        continue
      lines.append(f'| {batch} | {impl} | {r["ms_per_step"]:.3f} | {r["tokens_per_s"]:,.0f} | '
                   f'{r["weight_mb"]:,.0f} + {r["cache_mb"]:,.0f} | {r["floor_ms"]:.3f} | {r["roofline"]:.0%} |')
    ratios = [f'batch {b}: {decode[b, "xla"]["ms_per_step"] / decode[b, "kernel"]["ms_per_step"]:.2f}x'
              for b, impl in decode if impl == 'kernel' and 'ms_per_step' in decode.get((b, 'xla'), {})
              and 'ms_per_step' in decode[b, impl]]
    lines += ['', f'Decode step speed-up of the kernel over XLA attention: {", ".join(ratios) or "n/a"}.', '']
  if rollouts:
    s, c, ss = rollouts['static'], rollouts['continuous'], rollouts['static_sorted']
    lines += [
        f'### Rollout mix ({rollouts["prompts"]} prompts, mean prompt {rollouts["mean_prompt"]:.0f} tokens, budgets '
        f'capped at {_MAX_NEW.value} with mean {rollouts["mean_budget"]:.0f}; sampled at temperature 1; '
        f'{_SLOTS.value} slots / static batches of {_SLOTS.value})',
        '',
        '| batching | generated tokens | seconds | tokens / s | decode steps | first pass s (compiles) |',
        '|---|---|---|---|---|---|',
        f'| static (`generate` per batch) | {s["tokens"]:,} | {s["seconds"]:.2f} | {s["tokens_per_s"]:,.0f} | '
        f'{rollouts["static_steps"]:,} | {s["first_pass_s"]:.1f} |',
        f'| static, batches by budget (largest first) | {ss["tokens"]:,} | {ss["seconds"]:.2f} | '
        f'{ss["tokens_per_s"]:,.0f} | {rollouts["static_sorted_steps"]:,} | {ss["first_pass_s"]:.1f} |',
        f'| continuous (`engine.rollout`) | {c["tokens"]:,} | {c["seconds"]:.2f} | {c["tokens_per_s"]:,.0f} | '
        f'{rollouts["engine"]["decode_steps"]:,} | {c["first_pass_s"]:.1f} |',
        '',
        f'Continuous over static: {c["tokens_per_s"] / s["tokens_per_s"]:.2f}x tokens/s (over static batches of '
        f'similar budgets: {c["tokens_per_s"] / ss["tokens_per_s"]:.2f}x). Engine (prompts admitted largest budget '
        f'first): {rollouts["engine"]["syncs"]} host syncs, {rollouts["engine"]["prefills"]} prefill calls.',
        '',
    ]
  if kernel:
    lines += ['### The decode kernel alone', ''] + bench_mla_decode.markdown(*kernel) + ['']
  lines += ['<!-- bench_sample:end -->', '']
  return '\n'.join(lines)


def main(argv):
  del argv
  begin = time.perf_counter()
  device = jax.devices()[0]
  commit = git_commit()
  print(f'device {device.device_kind}, jax {jax.__version__}, code {commit}', flush=True)
  if _SMOKE.value:
    bench_mla_decode.CASES = [('k2_tiny', 2, 64, 'ragged', 2)]
    bench_mla_decode.CHECKED = ['k2_tiny']
  bandwidth = bench_mla_decode.copy_bandwidth(2 ** 20 if _SMOKE.value else 2 ** 30)
  print(f'copy bandwidth {bandwidth / 1e12:.2f} TB/s', flush=True)
  checks_, decode, rollouts, kernel = {}, {}, {}, None

  def write():
    with open(_OUT.value, 'w') as f:
      f.write(markdown(device, commit, bandwidth, checks_, decode, rollouts, kernel))

  def in_budget(part):
    if time.perf_counter() - begin < _BUDGET.value:
      return True
    print(f'skipping {part}: past --budget_s', flush=True)
    return False

  checks_ = checks()
  print(f'checks {checks_} ({time.perf_counter() - begin:.0f} s)', flush=True)
  write()
  overrides = dict(param_dtype='bfloat16', dtype='bfloat16')
  if _SMOKE.value:
    overrides.update(vocab_size=512, num_layers=2)
  config = get_config(_MODEL.value, **overrides)
  model = model_lib.create(config, seed=0)
  # The same weights with the decode attention as the plain-jnp reference (XLA, every slot).
  xla_model = nnx.merge(nnx.split(model_lib.abstract(config.replace(attention_impl='reference')))[0],
                        nnx.state(model))
  for batch in [int(b) for b in _BATCHES.value]:
    for impl, candidate in (('kernel', model), ('xla', xla_model)):
      if not in_budget(f'decode batch {batch} {impl}'):
        continue
      try:
        decode[batch, impl] = time_decode(candidate, batch, bandwidth)
      except Exception as e:  # noqa: BLE001 (report what failed, keep the other rows)
        decode[batch, impl] = {'error': f'{type(e).__name__}: {str(e).splitlines()[0][:200]}'}
      print(f'decode batch {batch} {impl} {decode[batch, impl]} ({time.perf_counter() - begin:.0f} s)', flush=True)
      write()
  if in_budget('rollout mix'):
    rollouts = time_rollouts(model)
    write()
  if in_budget('kernel'):
    kernel = bench_mla_decode.run_all(sweep=False, bandwidth=bandwidth)
    write()
  print(markdown(device, commit, bandwidth, checks_, decode, rollouts, kernel))
  print(f'total {time.perf_counter() - begin:.0f} s')


if __name__ == '__main__':
  app.run(main)
