"""The training loop every stage shares: batches -> `train_step` -> checkpoints, metrics, evaluation.

    state, record = loop.run(workdir, state, setup, batches, mesh, loop.LoopConfig(num_steps=1000),
                             data_iterator=train_data, evaluate=..., tokens_per_step=...)

A stage (k2/train/pretrain.py; SFT and RL alike) builds its model state, its `StepSetup` (its loss) and an iterator of
process-local numpy batches, and hands them here. The loop
  * resumes from the latest complete checkpoint in `workdir/checkpoints` (the data iterator too, when the stage
    passes one); a checkpoint that cannot be read is named in one line, moved to `workdir/corrupt_checkpoints/`
    (never deleted) and the previous one is used; with none left it stops with advice;
  * places each batch on the mesh, split over the batch axes;
  * saves asynchronously every `checkpoint_every` steps, at the end, and on SIGTERM (preemption) right after the
    step in flight, then returns so the stage exits 0;
  * writes metrics.jsonl and TensorBoard events, and prints a progress line with the metrics the stage reports;
  * calls the stage's `evaluate(state) -> {name: value}` every `eval_every` steps and at the end.
`initial_model` starts a stage from a random init, a checkpoint of this repo (a workdir, its `checkpoints/<step>`, or
an exported `model/` directory) or a published (HF) directory.
"""

from __future__ import annotations

import dataclasses
import fcntl
import math
import os
import signal
import tempfile
import time
from collections.abc import Callable, Iterator

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from k2 import model as model_lib
from k2 import sharding
from k2.config import ConfigError, ModelConfig
from k2.train import checkpoint as checkpoint_lib
from k2.train import metrics as metrics_lib
from k2.train.step import StepSetup, TrainState, init_state, train_step

BATCH_AXES = ('data', 'fsdp', 'expert')  # the batch is split over every data-like mesh axis


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  num_steps: int
  log_every: int = 10
  checkpoint_every: int = 100
  keep_checkpoints: int = 3
  eval_every: int = 100


def make_run_mesh(axis_sizes: dict | None, config: ModelConfig, batch_size: int, grad_accum_steps: int):
  """The run's mesh ({} or None: one device), with the batch and expert splits checked against it."""
  axis_sizes = dict(axis_sizes or {})
  if not axis_sizes and jax.process_count() > 1:
    axis_sizes = {'data': jax.device_count()}  # several hosts and no MESH: plain data parallelism
  devices = jax.devices() if axis_sizes else jax.devices()[:1]
  try:
    mesh = sharding.make_mesh(axis_sizes, devices)
  except ConfigError as e:
    hint = (" (on a CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N makes N devices)"
            if jax.default_backend() == 'cpu' else '')
    raise ConfigError(f'{e}{hint}') from None
  if config.moe.num_experts % mesh.shape['expert']:
    raise ConfigError(f'num_experts={config.moe.num_experts} is not divisible by the expert axis '
                      f'({mesh.shape["expert"]}) of mesh {axis_sizes}')
  batch_shards = math.prod(mesh.shape[axis] for axis in BATCH_AXES)
  if batch_size < 1 or batch_size % grad_accum_steps or (batch_size // grad_accum_steps) % batch_shards:
    raise ConfigError(f'BATCH_SIZE={batch_size} does not split into {grad_accum_steps} micro-batches over '
                      f'{batch_shards} batch shards of mesh {axis_sizes}')
  return mesh


def check_workdir(workdir: str) -> None:
  """Raises ConfigError unless `workdir` is (or can be created as) a writable directory. Writes nothing."""
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise ConfigError(f'--workdir {workdir} is a file, not a directory')
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise ConfigError(f'--workdir {workdir} cannot be created: {existing} is a file')
  try:  # a probe, removed at once: permissions alone do not tell (root, read-only mounts)
    handle, probe = tempfile.mkstemp(prefix='.k2-write-probe-', dir=existing)
    os.close(handle)
    os.remove(probe)
  except OSError as e:
    raise ConfigError(f'--workdir {workdir} is not writable ({existing}: {e.strerror})') from None


_CLAIMED: dict[str, object] = {}  # workdir -> its open lock file, held until this process ends


def claim_workdir(workdir: str) -> None:
  """Creates `workdir` (every process) and locks it for this process's lifetime (flock on workdir/.lock, which the
  kernel releases when the process ends, killed or not): a second run on the same workdir, while this one lives,
  stops with a ConfigError before it writes anything, instead of both writing checkpoints and metrics into it. A
  stage calls it right before its first write; calling it again in the same process is a no-op. Only process 0 of a
  multi-process job locks (its processes share the workdir)."""
  path = os.path.abspath(workdir)
  os.makedirs(path, exist_ok=True)
  if jax.process_index() != 0 or path in _CLAIMED:
    return
  handle = open(os.path.join(path, '.lock'), 'a+')
  try:
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError:
    handle.seek(0)
    owner = handle.read().strip() or 'another process'
    handle.close()
    raise ConfigError(f'--workdir {workdir} is in use by another run ({owner}); wait for it to end or choose another '
                      'workdir') from None
  handle.seek(0)
  handle.truncate()
  handle.write(f'pid {os.getpid()}, since {time.strftime("%Y-%m-%d %H:%M:%S")}\n')
  handle.flush()
  _CLAIMED[path] = handle


def initial_model(config: ModelConfig, seed: int = 0, init_from: str | None = None) -> model_lib.Transformer:
  """A random model, or one read from `init_from`: an exported model directory (config.json + state/), a workdir or
  one of its checkpoints (the latest complete one's parameters), or a published HF directory (config.json +
  safetensors). The stored model must have `config`'s parameters: the same architecture up to the RoPE (context
  extension changes it) and the runtime switches."""
  if not init_from:
    return model_lib.create(config, seed=seed)
  from k2 import convert, hf
  path = os.path.abspath(os.path.expanduser(init_from))
  if not os.path.isdir(path):
    raise ConfigError(f'init_from {init_from}: no such directory')
  is_workdir = os.path.isdir(os.path.join(path, 'checkpoints'))
  is_checkpoint = os.path.isdir(os.path.join(path, 'state')) and os.path.isdir(os.path.join(path, 'meta'))
  try:
    if is_workdir or is_checkpoint:  # this repo's training checkpoints: the latest one, or the one named
      model = _model_from_train_checkpoint(path, config)
    elif os.path.isdir(os.path.join(path, 'state')):  # an exported model directory (k2.convert.save_orbax)
      model = convert.load_orbax(path, dtype=config.param_dtype)
    else:  # a published checkpoint: config.json + safetensors
      model = hf.load(path, dtype=config.param_dtype)
  except hf.CheckpointError as e:
    raise ConfigError(f'init_from {init_from}: {e}') from None
  checkpoint_lib.check_same_architecture(model.config, config, f'init_from {init_from}', ignore=('rope',))
  graphdef, state = nnx.split(model_lib.abstract(config))
  nnx.replace_by_pure_dict(state, nnx.to_pure_dict(nnx.state(model)))
  return nnx.merge(graphdef, jax.tree.map(lambda x: jax.numpy.asarray(x, x.dtype), state))


def _model_from_train_checkpoint(path: str, config: ModelConfig) -> model_lib.Transformer:
  directory, step = (os.path.join(path, 'checkpoints'), None) if os.path.isdir(os.path.join(path, 'checkpoints')) \
      else (os.path.dirname(path), int(os.path.basename(path)))
  checkpointer = checkpoint_lib.Checkpointer(directory, every=1, read_only=True)
  step = step if step is not None else checkpointer.latest_step()
  if step is None:
    raise ConfigError(f'init_from {path}: no complete checkpoint')
  checkpointer.check_compatible(config, step, ignore=('rope',))
  graphdef, params, buffers = nnx.split(model_lib.abstract(config), nnx.Param, ...)
  params, buffers = checkpointer.restore_model(step, params, buffers)
  checkpointer.close()
  return nnx.merge(graphdef, params, buffers)


class Preemption:
  """Turns SIGTERM into a flag the loop checks after every step."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


def save_or_stop(checkpointer: checkpoint_lib.Checkpointer, step: int, state, data_state, model_config,
                 preemption: Preemption, *, last: bool, unit: str = 'step') -> bool:
  """Saves `step` when due (forced at the `last` one and after SIGTERM). After SIGTERM it waits for the save, says
  how to resume and returns True: the caller stops (a training step or an RL iteration is never half saved)."""
  checkpointer.save(step, state, data_state, model_config, force=last or preemption.requested)
  if not preemption.requested:
    return False
  checkpointer.wait()
  print(f'preempted: saved {unit} {step} to {checkpointer.directory}; rerun the same command to resume', flush=True)
  return True


def global_batch(local: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  """Process-local rows -> global arrays split over the mesh's batch axes."""
  spec = NamedSharding(mesh, PartitionSpec(BATCH_AXES))
  return {key: jax.make_array_from_process_local_data(spec, value) for key, value in local.items()}


def restore_latest(checkpointer: checkpoint_lib.Checkpointer, state: TrainState, data_iterator, workdir: str,
                   config: ModelConfig) -> tuple[TrainState, int]:
  """The latest readable checkpoint's state (and data position), or (state, 0) when there is none. Unreadable ones
  are named, moved to workdir/corrupt_checkpoints and skipped; ConfigError with advice when none is readable."""
  steps = sorted(checkpointer.all_steps(), reverse=True)
  abstract = checkpoint_lib.abstract_like(state)
  for step in steps:
    try:
      checkpointer.check_compatible(config, step)
      restored = checkpointer.restore(step, abstract, data_iterator)
      return restored, step
    except checkpoint_lib.CorruptCheckpoint as e:
      moved = checkpointer.set_aside(step, os.path.join(workdir, 'corrupt_checkpoints'))
      print(f'warning: checkpoint {step} is unreadable ({e}); moved it to {moved}, trying the previous one',
            flush=True)
  if steps:
    raise ConfigError(f'no readable checkpoint left in {checkpointer.directory} (the unreadable ones are in '
                      f'{os.path.join(workdir, "corrupt_checkpoints")}); restore one from a backup, or delete '
                      'checkpoints/ to start over')
  return state, 0


def run(workdir: str, state: TrainState, setup: StepSetup, batches: Iterator[dict[str, np.ndarray]], mesh,
        config: LoopConfig, *, data_iterator=None, evaluate: Callable[[TrainState], dict] | None = None,
        tokens_per_step: int | None = None, lead: bool = True) -> tuple[TrainState, dict[str, float], bool]:
  """Trains `state` to config.num_steps (resuming from the workdir); returns (state, last record, preempted).

  batches: process-local numpy batches; data_iterator: the checkpointable iterator behind them (saved with each
  checkpoint) or None. evaluate: the stage's evaluation, called every eval_every steps and at the end. lead: this
  process writes the text files (metrics, progress)."""
  checkpoint_dir = os.path.join(workdir, 'checkpoints')
  checkpointer = checkpoint_lib.Checkpointer(checkpoint_dir, every=config.checkpoint_every,
                                             keep=config.keep_checkpoints)
  state, start_step = restore_latest(checkpointer, state, data_iterator, workdir, setup.model_config)
  if start_step:
    print(f'resumed from {checkpoint_dir}/{start_step}', flush=True)
  writer = metrics_lib.MetricWriter(workdir, resume_step=start_step) if lead else metrics_lib.NullWriter()
  preemption = Preemption()
  record: dict[str, float] = {}
  timer = metrics_lib.StepTimer(start_step, config.num_steps)
  preempted = False
  try:
    for step in range(start_step + 1, config.num_steps + 1):
      state, metrics = train_step(state, global_batch(next(batches), mesh), setup)
      due_eval = evaluate is not None and (step % config.eval_every == 0 or step == config.num_steps)
      # The first step is logged too: it ends compilation, so the ETA is timed from it.
      if step % config.log_every == 0 or step == start_step + 1 or due_eval or preemption.requested:
        record = {key: float(value) for key, value in jax.device_get(metrics).items()}
        timer.logged(step, record, tokens_per_step)
        if due_eval:
          eval_start = time.time()
          record.update(evaluate(state))
          timer.exclude(time.time() - eval_start)
        writer.write(step, record)
        if lead:
          print(metrics_lib.progress_line(step, config.num_steps, record, timer.eta(step)), flush=True)
      if save_or_stop(checkpointer, step, state, data_iterator, setup.model_config, preemption,
                      last=step == config.num_steps):
        preempted = True
        break
    checkpointer.wait()
  finally:
    preemption.restore()
    writer.close()
    checkpointer.close()
  return state, record, preempted


def checkpoint_to_resume(workdir: str, config: ModelConfig) -> bool:
  """Whether `workdir` holds a checkpoint to resume; ConfigError (nothing touched) when it is another model's. An
  unreadable latest checkpoint counts: `run` names it, sets it aside and resumes from the one before."""
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    return False
  checkpointer = checkpoint_lib.Checkpointer(directory, every=1, read_only=True)
  try:
    if checkpointer.latest_step() is None:
      return False
    checkpointer.check_compatible(config)
  except checkpoint_lib.CorruptCheckpoint:
    pass
  finally:
    checkpointer.close()
  return True


def train_stage(workdir: str, *, model_config: ModelConfig, mesh, optimizer, schedule, batches, config: LoopConfig,
                seed: int = 0, init_from: str | None = None, data_iterator=None,
                evaluate: Callable[[TrainState, StepSetup], dict] | None = None, tokens_per_step: int | None = None,
                operative_config: str | None = None, **step_options) -> tuple[TrainState, StepSetup, dict, bool]:
  """What every stage does once its inputs are checked: the model (random, `init_from`, or the workdir's own
  checkpoint, which wins), its sharding, the optimizer state, the StepSetup (`step_options`: its other fields, the
  stage's loss_fn among them), the operative config file, and the loop. Returns (state, setup, last record,
  preempted)."""
  resuming = checkpoint_to_resume(workdir, model_config)
  lead = jax.process_index() == 0  # one process writes the workdir's text files; all of them write checkpoints
  model = initial_model(model_config, seed, None if resuming else init_from)
  with sharding.use_mesh(mesh):
    sharding.shard_model(model, mesh)
    graphdef, state = init_state(model, optimizer)
    del model
    setup = StepSetup(graphdef=graphdef, model_config=model_config, optimizer=optimizer, schedule=schedule,
                      **step_options)
    claim_workdir(workdir)
    if lead and operative_config is not None:
      with open(os.path.join(workdir, 'operative_config.gin'), 'w') as f:
        f.write(operative_config)
    state, record, preempted = run(
        workdir, state, setup, batches, mesh, config, data_iterator=data_iterator,
        evaluate=None if evaluate is None else lambda s: evaluate(s, setup), tokens_per_step=tokens_per_step,
        lead=lead)
  return state, setup, record, preempted
