"""Benchmark: the MLA decode kernel (pallas_kernels/mla_decode) alone, against the plain-jnp reference under XLA.

    python -m experiments.bench_mla_decode --out=mla_decode.md      (also called by experiments/bench_sample.py)

On the GPU, bf16 cache and queries:
  1. correctness of the compiled kernel against the float32 reference, on each model's (C, R, H), ragged lengths
     with NaN stored past them;
  2. per case, one decode step's attention over `layers` separate caches (the model's layers; together they are
     several times the 60 MB L2, so every read comes from HBM): the kernel at its default tiles, the best of a
     few others, and the XLA reference (which reads every slot, filled or not).
Bytes that must be read per layer: the filled slots, sum_b lengths[b] * (C + R) * 2, plus q and out. The
roofline fraction is those bytes over the measured time, over the copy bandwidth measured in the same run
(a 2 GiB device-to-device copy, counting bytes read plus written).
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from pallas_kernels.mla_decode import BlockSizes
from pallas_kernels.mla_decode import mla_decode
from pallas_kernels.mla_decode import mla_decode_reference

SHAPES = {'k2_tiny': (32, 16, 4), 'k2_small': (128, 32, 16), 'k2': (512, 64, 64)}  # (C, R, H)
CHECKED = list(SHAPES)  # shapes of the correctness check
# (model, batch, cache slots, lengths, layers): k2_small at the batches of the sampler benchmark, a long context,
# and K2's shape; 'full' fills every slot, 'ragged' draws lengths uniformly in [1, S] (a rollout batch).
CASES = [('k2_small', 1, 2048, 'full', 12), ('k2_small', 1, 32768, 'full', 12),
         ('k2_small', 64, 2048, 'full', 12), ('k2_small', 64, 2048, 'ragged', 12),
         ('k2_small', 256, 2048, 'full', 12), ('k2', 1, 32768, 'full', 4), ('k2', 64, 4096, 'full', 4),
         ('k2', 64, 4096, 'ragged', 4)]
# Tiles tried beside the defaults: (block_h, block_s, num_warps, num_stages, split multiplier: the automatic
# split count times this).
SWEEP = [(16, 32, 4, 3, 1), (16, 64, 4, 3, 4), (16, 128, 4, 2, 1), (16, 128, 4, 2, 4), (32, 64, 8, 2, 1),
         (64, 64, 8, 2, 1), (64, 32, 8, 2, 1), (64, 64, 8, 2, 4)]

_OUT = flags.DEFINE_string('mla_out', 'mla_decode.md', 'Markdown file the kernel results are written to.')
_SWEEP_FLAG = flags.DEFINE_bool('mla_sweep', True, 'Also time the tiles of SWEEP (standalone runs).')
_CALLS = flags.DEFINE_integer('calls', 40, 'Calls per timing (dispatched back to back), median of 5 timings.')


def copy_bandwidth(numbers: int = 2 ** 30) -> float:
  """Bytes per second of a device-to-device copy of `numbers` bf16 values (2 GiB; read + written)."""
  x = jax.random.normal(jax.random.key(0), (numbers,), jnp.bfloat16)
  copy = jax.jit(lambda x: x + 1)
  seconds = time_call(copy, x)
  return 2 * x.nbytes / seconds


def time_call(fn, *args, calls: int | None = None) -> float:
  """Median seconds per call of `calls` back-to-back calls (the dispatch of one overlaps the run of the last)."""
  calls = calls or _CALLS.value
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(5):
    begin = time.perf_counter()
    for _ in range(calls):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - begin) / calls)
  return statistics.median(times)


def inputs(model, batch, slots, lengths_kind, layers=1, dtype=jnp.bfloat16, seed=0):
  """q, caches (one per layer), lengths; NaN stored past each row's length."""
  latent, rope, heads = SHAPES[model]
  keys = jax.random.split(jax.random.key(seed), layers + 2)
  if lengths_kind == 'full':
    lengths = jnp.full((batch,), slots, jnp.int32)
  else:
    lengths = jax.random.randint(keys[0], (batch,), 1, slots + 1, jnp.int32)
  q = jax.random.normal(keys[1], (batch, heads, latent + rope), jnp.float32).astype(dtype)
  valid = jnp.arange(slots)[None, :, None] < lengths[:, None, None]
  caches = [jnp.where(valid, jax.random.normal(key, (batch, slots, latent + rope), jnp.float32).astype(dtype),
                      jnp.nan) for key in keys[2:]]
  return q, caches, lengths


def relative_error(actual, expected):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def check_correctness() -> list[tuple]:
  """(model, dtype, out relative error, lse max abs error, finite) of the compiled kernel vs the f32 reference."""
  rows = []
  for model, dtype in [(m, d) for m in CHECKED for d in (jnp.float32, jnp.bfloat16)]:
    latent, rope, _ = SHAPES[model]
    q, (cache,), _ = inputs(model, 5, 1000, 'full', dtype=dtype, seed=1)
    lengths = jnp.array([1, 1000, 537, 64, 999], jnp.int32)
    cache = jnp.where(jnp.arange(1000)[None, :, None] < lengths[:, None, None], cache, jnp.nan)
    scale = (latent + rope) ** -0.5
    out, lse = mla_decode(q, cache, lengths, kv_lora_rank=latent, sm_scale=scale)
    with jax.default_matmul_precision('highest'):
      ref_out, ref_lse = mla_decode_reference(q.astype(jnp.float32), cache.astype(jnp.float32), lengths,
                                              kv_lora_rank=latent, sm_scale=scale)
    rows.append((model, jnp.dtype(dtype).name, relative_error(out, ref_out),
                 float(jnp.max(jnp.abs(lse - ref_lse))), bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))))
  return rows


def layer_loop(attend):
  """One decode step's attention over every layer's cache (independent calls, as the model makes them)."""
  def run(q, caches, lengths):
    return [attend(q, cache, lengths)[0] for cache in caches]
  return jax.jit(run)


def bench_case(model, batch, slots, lengths_kind, layers, sweep: bool) -> dict:
  latent, rope, heads = SHAPES[model]
  q, caches, lengths = inputs(model, batch, slots, lengths_kind, layers)
  scale = (latent + rope) ** -0.5
  must_read = layers * (int(jnp.sum(lengths)) * (latent + rope) * 2 + 2 * q.nbytes)

  def kernel(blocks):
    return layer_loop(lambda q, c, n: mla_decode(q, c, n, kv_lora_rank=latent, sm_scale=scale, block_sizes=blocks))

  default = BlockSizes.for_backend('triton', heads, latent, 2, batch)
  timings = {'default': time_call(kernel(None), q, caches, lengths)}
  if sweep:
    padded_heads = max(16, 1 << (heads - 1).bit_length())
    for block_h, block_s, warps, stages, split_multiplier in SWEEP:
      if block_h > padded_heads:
        continue
      blocks = BlockSizes(block_h=block_h, block_s=block_s, num_warps=warps, num_stages=stages)
      if split_multiplier != 1:
        blocks = dataclasses.replace(
            blocks, num_splits=split_multiplier * blocks.splits(batch, padded_heads, latent, slots))
      try:
        timings[describe(blocks)] = time_call(kernel(blocks), q, caches, lengths)
      except Exception as e:  # noqa: BLE001 (a tile that does not compile is reported, not fatal)
        print(f'  {describe(blocks)} failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}', flush=True)
  best = min(timings, key=timings.get)
  xla = time_call(layer_loop(lambda q, c, n: mla_decode_reference(q, c, n, kv_lora_rank=latent, sm_scale=scale)),
                  q, caches, lengths)
  return {'case': (model, batch, slots, lengths_kind, layers), 'must_read': must_read, 'default_s': timings['default'],
          'default_tiles': describe(default), 'best': best, 'best_s': timings[best], 'xla_s': xla,
          'timings': timings}


def describe(blocks: BlockSizes) -> str:
  splits = 'auto' if blocks.num_splits is None else blocks.num_splits
  return (f'h{blocks.block_h} s{blocks.block_s} w{blocks.num_warps} st{blocks.num_stages} splits {splits}')


def run_all(sweep: bool = True, bandwidth: float | None = None) -> tuple[float, list, list]:
  """(copy bandwidth (measured unless given), correctness rows, timing rows)."""
  if bandwidth is None:
    bandwidth = copy_bandwidth()
    print(f'copy bandwidth {bandwidth / 1e12:.2f} TB/s', flush=True)
  correctness = check_correctness()
  for row in correctness:
    print('check', row, flush=True)
  rows = []
  for case in CASES:
    try:
      row = bench_case(*case, sweep=sweep)
    except Exception as e:  # noqa: BLE001 (report the failure, keep the other cases)
      print(f'{case} failed: {type(e).__name__}: {str(e)[:2000]}', flush=True)
      continue
    print(row, flush=True)
    rows.append(row)
  return bandwidth, correctness, rows


def markdown(bandwidth: float, correctness: list, rows: list) -> list[str]:
  lines = [
      f'MLA decode kernel alone (`experiments/bench_mla_decode.py`), bf16, one decode step\'s attention over '
      f'`layers` caches; copy bandwidth measured in the same run: {bandwidth / 1e12:.2f} TB/s (read + write). '
      'Must-read bytes: the filled slots (C + R numbers each) plus q and out. Roofline = must-read bytes / time / '
      'copy bandwidth. XLA: the plain-jnp reference (reads every slot, filled or not).',
      '',
      '| model (C, R, H) | batch | slots | lengths | layers | must-read MB | kernel default us/layer | roofline | '
      'best tiles | best us/layer | roofline | XLA us/layer | kernel / XLA speed-up |',
      '|---|---|---|---|---|---|---|---|---|---|---|---|---|',
  ]
  for r in rows:
    model, batch, slots, kind, layers = r['case']
    per_layer = lambda s: 1e6 * s / layers
    fraction = lambda s: r['must_read'] / s / bandwidth
    lines.append(
        f'| {model} {SHAPES[model]} | {batch} | {slots} | {kind} | {layers} | {r["must_read"] / layers / 1e6:.1f} | '
        f'{per_layer(r["default_s"]):.1f} | {fraction(r["default_s"]):.0%} | {r["best"]} | '
        f'{per_layer(r["best_s"]):.1f} | {fraction(r["best_s"]):.0%} | {per_layer(r["xla_s"]):.1f} | '
        f'{r["xla_s"] / r["default_s"]:.2f}x |')
  lines += ['', 'Compiled kernel vs the float32 reference (5 rows, 1000 slots, lengths 1..1000 with NaN past them):',
            ', '.join(f'{m} {d}: out rel. err {e:.1e}, lse max err {l:.1e}{"" if ok else " NOT FINITE"}'
                      for m, d, e, l, ok in correctness) + '.']
  return lines


def main(argv):
  del argv
  bandwidth, correctness, rows = run_all(sweep=_SWEEP_FLAG.value)
  text = '\n'.join(markdown(bandwidth, correctness, rows))
  with open(_OUT.value, 'w') as f:
    f.write(text + '\n')
  print(text)


if __name__ == '__main__':
  app.run(main)
