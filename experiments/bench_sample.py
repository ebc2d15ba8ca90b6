"""Benchmark: decode throughput and KV-cache memory of the MLA latent cache against a naive per-head cache.

    python -m experiments.bench_sample --out=BENCHMARKS_sample.md

Timed, for each cache layout and batch size (k2_small, bf16 parameters and compute, random weights):
  * latent    the MLA cache (C + R numbers per token and layer), weight-absorbed decode (k2.sample)
  * per_head  per-head k and v (H * (K + V) numbers per token and layer), plain attention
decode tokens/s = batch * steps / (time of `steps` jitted greedy decode steps in one fori_loop), median of --reps,
with --context cache slots per sequence (decode attends over every slot of the cache, filled or not, so the
cost does not depend on how full it is). Memory per token is read from the cache arrays themselves.
Checked in the same run, on the device in float32 with k2_tiny: cached decoding vs the full forward (logits of
ragged prompts, teacher-forced), and greedy `generate` with the latent/absorbed and per-head caches vs the full
forward's argmax.
"""

from __future__ import annotations

import datetime
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from k2 import model as model_lib
from k2 import sample
from k2.config import get_config
from k2.sample import mla_cache

_MODEL = flags.DEFINE_string('model', 'k2_small', 'Model variant to time.')
_BATCHES = flags.DEFINE_list('batches', ['1', '64'], 'Batch sizes to time.')
_CONTEXT = flags.DEFINE_integer('context', 1024, 'Cache slots per sequence.')
_STEPS = flags.DEFINE_integer('steps', 128, 'Decode steps per timed call.')
_REPS = flags.DEFINE_integer('reps', 3, 'Timed calls per candidate (median).')
_MATMUL_IMPL = flags.DEFINE_string('matmul_impl', 'auto', "MoE grouped matmul: 'auto', 'pallas' or 'ragged_dot'.")
_OUT = flags.DEFINE_string('out', 'BENCHMARKS_sample.md', 'Markdown file the results are written to.')


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


def time_decode(model, batch: int, layout: str) -> dict:
  graphdef, state = nnx.split(model)
  options = sample.DecodeOptions(cache_layout=layout)
  context, steps = _CONTEXT.value, _STEPS.value
  start = context - steps - 1
  cache = sample.init_cache(model, batch, context, layout)
  cache_bytes = sum(x.nbytes for x in jax.tree.leaves(cache))
  token = jnp.zeros((batch,), jnp.int32)
  begin = time.perf_counter()
  token, cache = jax.block_until_ready(_decode_loop(graphdef, state, cache, token, start, steps=steps,
                                                    options=options))
  compile_s = time.perf_counter() - begin
  times = []
  for _ in range(_REPS.value):
    begin = time.perf_counter()
    token, cache = jax.block_until_ready(_decode_loop(graphdef, state, cache, token, start, steps=steps,
                                                      options=options))
    times.append(time.perf_counter() - begin)
  seconds = statistics.median(times)
  return {'ms_per_step': 1e3 * seconds / steps, 'tokens_per_s': batch * steps / seconds,
          'bytes_per_token': cache_bytes / (batch * context), 'cache_gib': cache_bytes / 2 ** 30,
          'first_call_s': compile_s}


def parity_checks() -> dict:
  """float32 on the device, k2_tiny: max |logit difference| of cached decoding (latent, absorbed) vs the full
  forward over ragged prompts, and whether greedy `generate` equals the full forward's argmax."""
  config = get_config('k2_tiny', vocab_size=512, num_layers=2, dtype='float32', attention_impl='reference')
  model = model_lib.create(config, seed=0)
  prompts = [[11, 12, 13], [21, 22, 23, 24, 25, 26, 27, 28, 29], [31, 32, 33, 34, 35, 36]]
  continuation = [[41, 42, 43, 44], [51, 52, 53, 54], [61, 62, 63, 64]]
  width, steps = 16, 4
  full = nnx.jit(lambda m, t: m(t)[0])
  prefill = jax.jit(lambda t, p, c: sample.forward(model, t, p, c, num_keys=width))
  decode = jax.jit(lambda t, p, c: sample.forward(model, t, p, c, num_keys=width + steps))
  with jax.default_matmul_precision('highest'):
    lengths = np.array([len(p) for p in prompts], np.int32)
    padded, sequences = np.zeros((3, width), np.int32), np.zeros((3, width), np.int32)
    for row, prompt in enumerate(prompts):
      padded[row, :len(prompt)] = prompt
      sequences[row, :len(prompt) + steps] = prompt + continuation[row]
    expected = np.asarray(full(model, jnp.asarray(sequences)))
    positions = np.broadcast_to(np.arange(width, dtype=np.int32), padded.shape)
    logits, cache = prefill(padded, positions, sample.init_cache(model, 3, width + steps))
    worst = max(float(np.abs(np.asarray(logits[r, :len(p)]) - expected[r, :len(p)]).max())
                for r, p in enumerate(prompts))
    for step in range(steps):
      tokens = np.array([[c[step]] for c in continuation], np.int32)
      step_logits, cache = decode(tokens, (lengths + step)[:, None], cache)
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
    greedy_matches = sample.generate(model, prompts, 6).tokens == reference
  return {'cached_vs_full_max_abs': worst, 'greedy_matches': greedy_matches}


def markdown(config, device, results: dict, checks: dict) -> str:
  att, full = config.attention, get_config('k2_full')
  per_token = {layout: config.num_layers * mla_cache.cache_bytes_per_token(att, jnp.bfloat16, layout)
               for layout in mla_cache.LAYOUTS}
  full_per_token = {layout: full.num_layers * mla_cache.cache_bytes_per_token(full.attention, jnp.bfloat16, layout)
                    for layout in mla_cache.LAYOUTS}
  lines = [
      '<!-- bench_sample:start -->',
      f'## Decode with the MLA latent cache, {_MODEL.value} ({datetime.date.today()}, {device.device_kind}, '
      f'jax {jax.__version__})',
      '',
      f'Greedy decode, random weights, bf16 weights and cache, {_CONTEXT.value} cache slots per sequence; median '
      f'of {_REPS.value} calls of {_STEPS.value} steps in one jitted loop. Produced by '
      '`python -m experiments.bench_sample`.',
      '',
      '| batch | cache | MoE matmul | decode tokens/s | ms / step | cache bytes / token (all layers) | cache GiB |',
      '|---|---|---|---|---|---|---|',
  ]
  for (batch, layout), r in results.items():
    impl = r['impl']
    if impl == 'auto':  # the choice k2.moe.grouped_matmul makes for 'auto'
      impl = f'{"ragged_dot" if jax.default_backend() == "cpu" else "pallas"} (auto)'
    if 'error' in r:
      lines.append(f'| {batch} | {layout} | {impl} | failed: {r["error"]} | | | |')
    else:
      lines.append(f'| {batch} | {layout} | {impl} | {r["tokens_per_s"]:,.0f} | {r["ms_per_step"]:.2f} | '
                   f'{r["bytes_per_token"]:,.0f} | {r["cache_gib"]:.3f} |')
  speedups = [f'batch {b}: {results[b, "latent"]["tokens_per_s"] / results[b, "per_head"]["tokens_per_s"]:.2f}x'
              for b in sorted({b for b, _ in results})
              if 'tokens_per_s' in results.get((b, 'latent'), {}) and 'tokens_per_s' in results.get((b, 'per_head'), {})]
  lines += [
      '',
      f'Cache per token: latent {per_token["latent"]:,} B vs per-head {per_token["per_head"]:,} B '
      f'({per_token["per_head"] / per_token["latent"]:.1f}x smaller; per layer {att.kv_lora_rank} + '
      f'{att.qk_rope_head_dim} numbers vs {att.num_heads} x ({att.qk_head_dim} + {att.v_head_dim}), '
      f'{config.num_layers} layers). For k2_full: {full_per_token["latent"] / 1024:,.1f} KiB vs '
      f'{full_per_token["per_head"] / 2 ** 20:,.2f} MiB per token '
      f'({full_per_token["per_head"] / full_per_token["latent"]:.1f}x). '
      f'Decode speed, latent/absorbed over per-head: {", ".join(speedups) or "n/a"}.',
  ]
  if checks:
    lines.append(
        f'Checks in the same run (k2_tiny, float32, on this device): cached decoding vs the full forward, max '
        f'|logit difference| {checks["cached_vs_full_max_abs"]:.2e} over ragged prompts; greedy generate equals '
        f'the full forward argmax: {checks["greedy_matches"]}.')
  lines += ['<!-- bench_sample:end -->', '']
  return '\n'.join(lines)


def main(argv):
  del argv
  device = jax.devices()[0]
  print(f'device {device.device_kind}, jax {jax.__version__}', flush=True)
  begin = time.perf_counter()
  checks = parity_checks()
  print(f'parity checks {checks} ({time.perf_counter() - begin:.1f} s)', flush=True)

  config = get_config(_MODEL.value, param_dtype='bfloat16', dtype='bfloat16', matmul_impl=_MATMUL_IMPL.value)
  model = model_lib.create(config, seed=0)
  # The same weights with jax.lax.ragged_dot for the MoE, in case the configured grouped matmul fails here.
  fallback = nnx.merge(nnx.split(model_lib.abstract(config.replace(matmul_impl='ragged_dot')))[0],
                       nnx.state(model))
  results = {}
  for batch in [int(b) for b in _BATCHES.value]:
    for layout in ('latent', 'per_head'):
      for impl, candidate in ((_MATMUL_IMPL.value, model), ('ragged_dot', fallback)):
        try:
          results[batch, layout] = {'impl': impl, **time_decode(candidate, batch, layout)}
          break
        except Exception as e:  # noqa: BLE001 (report what failed, keep the other rows)
          results[batch, layout] = {'impl': impl, 'error': f'{type(e).__name__}: {str(e).splitlines()[0][:200]}'}
          if impl == 'ragged_dot':
            break
      print(f'batch {batch:3d} {layout:8s} {results[batch, layout]}', flush=True)
      with open(_OUT.value, 'w') as f:  # after every row, so a run cut short still leaves its table
        f.write(markdown(config, device, results, checks))
  print(markdown(config, device, results, checks))


if __name__ == '__main__':
  app.run(main)
