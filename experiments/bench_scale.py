"""Benchmark: k2_small training throughput on the GPUs of one host, sharded, against one GPU (scale-out).

    python -m experiments.bench_scale --meshes="{'expert': 2};{'fsdp': 2}" --out=BENCHMARKS_scale.md

For one GPU and then each mesh: the trainer's sharded path (`k2.sharding.shard_model` under `use_mesh`, the batch
split over data x fsdp x expert, `k2.train.step.train_step` with MuonClip and QK-Clip), with the same work per
GPU (--micro_batch rows of --seq_len tokens per GPU per micro-step, --accum micro-steps per update). Perfect
scaling is N times one GPU's tokens/s. Expert parallelism takes the MoE layer's `ep_impl='auto'` path (dropless
ragged all-to-all on GPU). Writes its BENCHMARKS.md section (between the bench_scale markers) to --out, with the
JSON beside it. --smoke runs k2_tiny on fake CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8).
"""

from __future__ import annotations

import ast
import datetime
import json
import math
import os
import time
import traceback

import jax
import optax
from absl import app, flags
from jax.sharding import NamedSharding, PartitionSpec

from experiments import bench_common
from k2 import model as model_lib
from k2 import sharding
from k2.config import get_config
from k2.optim import muon_adamw
from k2.train.step import StepSetup, init_state, train_step

_MESHES = flags.DEFINE_string('meshes', "{'expert': 2};{'fsdp': 2}", 'Meshes to time after one GPU, ";"-separated.')
_MICRO = flags.DEFINE_integer('micro_batch', 4, 'Rows per GPU per micro-step.')
_ACCUM = flags.DEFINE_integer('accum', 4, 'Micro-steps per optimizer update.')
_STEPS = flags.DEFINE_integer('steps', 6, 'Timed steps per mesh (after 2 warm-up steps).')
_SCALE_OUT = flags.DEFINE_string('scale_out', 'BENCHMARKS_scale.md', 'Markdown file the section is written to.')
_MODEL = flags.DEFINE_string('bench_model', 'k2_small', 'Model variant (--model is k2.params\' flag).')
_SEQ_LEN = flags.DEFINE_integer('seq_len', 4096, 'Tokens per row.')
_DOCS = flags.DEFINE_integer('docs_per_row', 4, 'Documents packed into each row.')
_SMOKE = flags.DEFINE_bool('smoke', False, 'k2_tiny, seq 64, on fake CPU devices: checks that the script runs.')

_BATCH_SPEC = PartitionSpec(('data', 'fsdp', 'expert'))


def run_mesh(axis_sizes: dict[str, int], config, seq_len: int, flops_per_token: float, peak: float) -> dict:
  """Compiles and times train_step on a mesh of the first prod(axis_sizes) devices."""
  devices = jax.devices()[:math.prod(sharding.mesh_shape(axis_sizes).values())]
  mesh = sharding.make_mesh(axis_sizes, devices)
  rows = _MICRO.value * len(devices) * _ACCUM.value
  tx = muon_adamw(bench_common.LEARNING_RATE)
  result = {'mesh': axis_sizes, 'devices': len(devices), 'rows': rows, 'seq_len': seq_len}
  with sharding.use_mesh(mesh):
    model = model_lib.create(config, seed=0)
    sharding.shard_model(model, mesh)
    graphdef, state = init_state(model, tx)
    del model
    setup = StepSetup(graphdef=graphdef, model_config=config, optimizer=tx,
                      schedule=optax.constant_schedule(bench_common.LEARNING_RATE), qk_clip_tau=100.0,
                      bias_update_rate=1e-3, grad_accum_steps=_ACCUM.value)
    batch = bench_common.synthetic_batch(rows, seq_len, config.vocab_size, _DOCS.value)
    batch = jax.device_put(batch, NamedSharding(mesh, _BATCH_SPEC))
    start = time.perf_counter()
    state, metrics = train_step(state, batch, setup)
    jax.block_until_ready(metrics)
    result['compile_s'] = time.perf_counter() - start
    state, metrics = train_step(state, batch, setup)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(_STEPS.value):
      state, metrics = train_step(state, batch, setup)
    jax.block_until_ready((state, metrics))
    step_s = (time.perf_counter() - start) / _STEPS.value
  tokens = rows * seq_len
  result.update({
      'ms_per_step': step_s * 1e3, 'tokens_per_s': tokens / step_s, 'tokens_per_s_per_device': tokens / step_s
      / len(devices), 'mfu_per_device': flops_per_token * tokens / step_s / len(devices) / 1e12 / peak,
      'loss': float(metrics['loss']), 'dropped_tokens': float(metrics.get('dropped_tokens', 0.0)),
      'peak_memory_gib': _peak_memory_gib(devices)})
  print(f'{axis_sizes or "one device"}: {result["ms_per_step"]:.1f} ms/step, {result["tokens_per_s"]:,.0f} tokens/s '
        f'({result["tokens_per_s_per_device"]:,.0f} per device), MFU/device {100 * result["mfu_per_device"]:.1f}%',
        flush=True)
  del state, batch
  return result


def _peak_memory_gib(devices) -> float | None:
  try:
    return max(d.memory_stats()['peak_bytes_in_use'] for d in devices) / 2 ** 30
  except Exception:  # noqa: BLE001  (CPU devices have no memory_stats)
    return None


def report(results: list[dict], config_name: str, seq_len: int, peak: float, seconds: float) -> list[str]:
  base = next((r for r in results if r.get('devices') == 1 and 'tokens_per_s' in r), None)
  lines = [
      bench_common.section_title(f'Scale-out: {config_name} training on {jax.device_count()} devices'),
      '',
      f'One `train_step` (MuonClip, QK-Clip, router bias; bf16 compute) with {_MICRO.value} rows x {seq_len} tokens '
      f'per device per micro-step and {_ACCUM.value} micro-steps per update, parameters and optimizer state placed '
      'by `k2.sharding.shard_model`, the batch split over data x fsdp x expert. Mean of '
      f'{_STEPS.value} steps after compile and one warm-up step; MFU per device is over the bf16 matmul peak '
      f'measured in the same run ({peak:.0f} TFLOP/s). Produced by `python -m experiments.bench_scale`.',
      '',
      '| mesh | devices | rows x seq | ms / step | tokens / s | tokens / s per device | total vs one device | '
      'MFU / device | peak memory GiB / device | loss |',
      '|---|---|---|---|---|---|---|---|---|---|',
  ]
  for r in results:
    if 'error' in r:
      lines.append(f"| {r['mesh']} | {r['devices']} | - | failed: {r['error']} | | | | | | |")
      continue
    speedup = '-' if base is None else f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x"
    memory = '-' if r['peak_memory_gib'] is None else f"{r['peak_memory_gib']:.1f}"
    lines.append(f"| {r['mesh'] or 'one device'} | {r['devices']} | {r['rows']} x {r['seq_len']} | "
                 f"{r['ms_per_step']:.1f} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s_per_device']:,.0f} | "
                 f"{speedup} | {100 * r['mfu_per_device']:.1f}% | {memory} | {r['loss']:.4f} |")
  lines += ['', f'Run time {seconds:.0f} s.']
  return lines


def main(argv):
  del argv
  begin = time.perf_counter()
  smoke = _SMOKE.value
  config_name = 'k2_tiny' if smoke else _MODEL.value
  seq_len = 64 if smoke else _SEQ_LEN.value
  config = get_config(config_name, dtype='bfloat16')
  flops = bench_common.flops_per_token(config, seq_len)['total']
  peak = bench_common.matmul_peak(256 if smoke else 8192)['best_tflops']
  meshes = [{}] + [ast.literal_eval(text) for text in _MESHES.value.split(';') if text.strip()]
  results = []
  for axis_sizes in meshes:
    try:
      results.append(run_mesh(axis_sizes, config, seq_len, flops, peak))
    except Exception as error:  # noqa: BLE001  (report the mesh as failed and go on)
      traceback.print_exc()
      results.append({'mesh': axis_sizes, 'devices': math.prod(sharding.mesh_shape(axis_sizes).values()),
                      'error': str(error).splitlines()[0][:200]})
    text = bench_common.write_section(_SCALE_OUT.value, 'bench_scale',
                                      report(results, config_name, seq_len, peak, time.perf_counter() - begin))
    with open(os.path.splitext(_SCALE_OUT.value)[0] + '.json', 'w') as f:
      json.dump({'results': results, 'peak': peak, 'device_kind': jax.devices()[0].device_kind,
                 'date': str(datetime.date.today())}, f, indent=1, default=str)
  print(text)


if __name__ == '__main__':
  app.run(main)
