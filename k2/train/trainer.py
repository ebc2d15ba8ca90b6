"""The pretraining loop: data -> `train_step` -> checkpoints, metrics, evaluation, samples.

`train(workdir)` is gin-configured (configs/pretrain/*.gin). Everything a run could fail on (the model config, the
mesh, the batch split, SEQ_LEN, the dataset, the tokenizer, an incompatible checkpoint in the workdir) is checked
before anything is written. A workdir holding checkpoints is resumed from its latest complete one, the data
iterator included, so the losses continue exactly as if the run had never stopped. SIGTERM (preemption) saves the
current step and returns normally.
"""

from __future__ import annotations

import math
import os
import signal
import time

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from k2 import model as model_lib
from k2 import sharding
from k2.config import ConfigError, ModelConfig, get_config
from k2.data import pipeline
from k2.optim import muonclip, param_labels, wsd_schedule
from k2.train import checkpoint as checkpoint_lib
from k2.train import metrics as metrics_lib
from k2.train.step import StepSetup, TrainState, eval_step, init_state, train_step

gin.external_configurable(get_config, 'model_config')
BATCH_AXES = ('data', 'fsdp', 'expert')  # the batch is split over every data-like mesh axis


@gin.configurable
def schedule(learning_rate: float, num_steps: int, warmup_steps: int = 500, decay_fraction: float = 0.2,
             end_fraction: float = 0.1) -> optax.Schedule:
  """K2's WSD: linear warm-up, constant peak, cosine decay over the last `decay_fraction` to end_fraction * peak."""
  warmup_steps = min(warmup_steps, num_steps // 2)
  decay_steps = max(1, int(num_steps * decay_fraction))
  return wsd_schedule(learning_rate, warmup_steps, max(0, num_steps - warmup_steps - decay_steps), decay_steps,
                      learning_rate * end_fraction)


@gin.configurable
def optimizer(learning_rate: optax.Schedule, name: str = 'muonclip', weight_decay: float = 0.1,
              momentum: float = 0.95, rms_scale: float = 0.2, adam_b1: float = 0.9, adam_b2: float = 0.95,
              ns_impl: str = 'auto', ns_dtype: str = 'bfloat16') -> optax.GradientTransformation:
  """'muonclip' (Muon on matrices + AdamW on the rest; QK-Clip is `train.qk_clip_tau`) or 'adamw' on everything.
  ns_dtype: Newton-Schulz precision ('bfloat16' as in the reference implementations, or 'float32').

  Both keep the router bias out of the gradient update (it is set by the balancing rule)."""
  if name == 'muonclip':
    return muonclip(learning_rate, weight_decay=weight_decay, momentum=momentum, rms_scale=rms_scale,
                    adam_b1=adam_b1, adam_b2=adam_b2, ns_impl=ns_impl, ns_dtype=jnp.dtype(ns_dtype))
  if name == 'adamw':
    adamw = optax.adamw(learning_rate, b1=adam_b1, b2=adam_b2, weight_decay=weight_decay)
    return optax.multi_transform({'muon': adamw, 'adamw': adamw, 'frozen': optax.set_to_zero()}, param_labels)
  raise ConfigError(f"optimizer name must be 'muonclip' or 'adamw', got {name!r}")


def make_run_mesh(axis_sizes: dict | None, config: ModelConfig, batch_size: int, grad_accum_steps: int):
  """The run's mesh ({} or None: one device), with the batch and expert splits checked against it."""
  axis_sizes = dict(axis_sizes or {})
  if not axis_sizes and jax.process_count() > 1:
    axis_sizes = {'data': jax.device_count()}  # several hosts and no MESH: plain data parallelism
  devices = jax.devices() if axis_sizes else jax.devices()[:1]
  mesh = sharding.make_mesh(axis_sizes, devices)
  if config.moe.num_experts % mesh.shape['expert']:
    raise ConfigError(f'num_experts={config.moe.num_experts} is not divisible by the expert axis '
                      f'({mesh.shape["expert"]}) of mesh {axis_sizes}')
  batch_shards = math.prod(mesh.shape[axis] for axis in BATCH_AXES)
  if batch_size % grad_accum_steps or (batch_size // grad_accum_steps) % batch_shards:
    raise ConfigError(f'BATCH_SIZE={batch_size} does not split into {grad_accum_steps} micro-batches over '
                      f'{batch_shards} batch shards of mesh {axis_sizes}')
  return mesh


class _Preemption:
  """Turns SIGTERM into a flag the loop checks after each step."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


def _global_batch(local: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  spec = NamedSharding(mesh, PartitionSpec(BATCH_AXES))
  return {key: jax.make_array_from_process_local_data(spec, value) for key, value in local.items()}


def evaluate(state: TrainState, batches: list[dict], setup: StepSetup, mesh) -> float:
  """Mean next-token loss (nats/token) over `batches`."""
  total, count = 0.0, 0.0
  for batch in batches:
    loss_sum, tokens = eval_step(state, _global_batch(batch, mesh), setup)
    total, count = total + float(loss_sum), count + float(tokens)
  return total / max(count, 1.0)


def print_samples(state: TrainState, setup: StepSetup, tok, prompt: str, max_new_tokens: int) -> list[str]:
  """Greedy and temperature-0.8 continuations of `prompt`, printed and returned."""
  from k2 import sample  # the sampler is only needed at the end of a run
  model = nnx.merge(setup.graphdef, state.params, state.buffers)
  prompt_ids = [tok.bos_id, *tok.encode(prompt)]
  texts = []
  for temperature in (0.0, 0.8):
    result = sample.generate(model, [prompt_ids], max_new_tokens, temperature=temperature, seed=0)
    texts.append(prompt + tok.decode([t for t in result.tokens[0] if t < tok.vocab_size]))
    print(f'--- sample (temperature {temperature}) ---\n{texts[-1]}\n---', flush=True)
  return texts


@gin.configurable(denylist=['workdir'])
def train(workdir: str, model_config: ModelConfig = gin.REQUIRED, num_steps: int = 100, batch_size: int = 8,
          seq_len: int = 128, learning_rate: float = 3e-3, seed: int = 0, mesh: dict | None = None,
          grad_accum_steps: int = 1, qk_clip_tau: float | None = 100.0, bias_update_rate: float = 1e-3,
          checkpoint_every: int = 100, keep_checkpoints: int = 3, eval_every: int = 100, eval_batches: int = 8,
          log_every: int = 10, sample_prompt: str = 'def ', sample_tokens: int = 48,
          loss_chunk: int | None = None, measure_max_logit_after_step: bool = False) -> dict[str, float]:
  """Trains (or resumes) the run in `workdir`; returns the final metrics, eval_loss and unigram_loss included.

  loss_chunk: take the output logits this many positions at a time in the training loss (None: all at once),
  so only [rows, loss_chunk, vocab] of them are in memory (k2.train.step.chunked_next_token_loss)."""
  # 1. Everything that can be wrong is checked before anything is written.
  if seq_len > model_config.rope.max_position_embeddings:
    raise ConfigError(f'SEQ_LEN={seq_len} exceeds the model max_position_embeddings='
                      f'{model_config.rope.max_position_embeddings}')
  if loss_chunk is not None and (loss_chunk < 1 or seq_len % loss_chunk):
    raise ConfigError(f'train.loss_chunk={loss_chunk} does not divide SEQ_LEN={seq_len}')
  run_mesh = make_run_mesh(mesh, model_config, batch_size, grad_accum_steps)
  train_docs, eval_docs = pipeline.documents('train'), pipeline.documents('validation')
  tok = pipeline.tokenizer()
  if tok.vocab_size > model_config.vocab_size:
    raise ConfigError(f'tokenizer {tok} has more ids than the model vocab_size={model_config.vocab_size}')
  checkpoint_dir = os.path.join(workdir, 'checkpoints')
  if os.path.isdir(checkpoint_dir):
    checkpoint_lib.Checkpointer(checkpoint_dir, every=checkpoint_every).check_compatible(model_config)

  # 2. The run.
  lead = jax.process_index() == 0  # one process writes the workdir's text files; all of them write checkpoints
  os.makedirs(workdir, exist_ok=True)
  if lead:
    with open(os.path.join(workdir, 'operative_config.gin'), 'w') as f:
      f.write(gin.operative_config_str())
  lr_schedule = schedule(learning_rate, num_steps)
  tx = optimizer(lr_schedule)
  local_rows = batch_size // jax.process_count()
  with sharding.use_mesh(run_mesh):
    model = model_lib.create(model_config, seed=seed)
    sharding.shard_model(model, run_mesh)
    graphdef, state = init_state(model, tx)
    del model
    setup = StepSetup(graphdef=graphdef, model_config=model_config, optimizer=tx, schedule=lr_schedule,
                      qk_clip_tau=qk_clip_tau, bias_update_rate=bias_update_rate,
                      grad_accum_steps=grad_accum_steps, loss_chunk=loss_chunk,
                      measure_max_logit_after_step=measure_max_logit_after_step)
    train_data = pipeline.lm_batches(train_docs, tok, batch_size=local_rows, seq_len=seq_len, seed=seed,
                                     process_index=jax.process_index(), process_count=jax.process_count())
    # A fixed, shuffled sample of the validation split (the same every evaluation and every resume).
    eval_iter = pipeline.lm_batches(eval_docs, tok, batch_size=local_rows, seq_len=seq_len, seed=seed,
                                    process_index=jax.process_index(), process_count=jax.process_count())
    eval_data = [next(eval_iter) for _ in range(eval_batches)]

    checkpointer = checkpoint_lib.Checkpointer(checkpoint_dir, every=checkpoint_every, keep=keep_checkpoints)
    start_step = checkpointer.latest_step() or 0
    if start_step:
      state = checkpointer.restore(start_step, checkpoint_lib.abstract_like(state), train_data)
      print(f'resumed from {checkpoint_dir}/{start_step}', flush=True)
    writer = metrics_lib.MetricWriter(workdir, resume_step=start_step) if lead else metrics_lib.NullWriter()
    preemption = _Preemption()
    tokens_per_step = batch_size * seq_len
    record: dict[str, float] = {}
    run_start = last_time = time.time()
    last_step = start_step
    try:
      for step in range(start_step + 1, num_steps + 1):
        state, metrics = train_step(state, _global_batch(next(train_data), run_mesh), setup)
        due_eval = step % eval_every == 0 or step == num_steps
        if step % log_every == 0 or due_eval or preemption.requested:
          record = {key: float(value) for key, value in jax.device_get(metrics).items()}
          now = time.time()
          record['tokens_per_second'] = tokens_per_step * (step - last_step) / (now - last_time)
          if due_eval:
            record['eval_loss'] = evaluate(state, eval_data, setup, run_mesh)
          writer.write(step, record)
          if lead:
            print(metrics_lib.progress_line(step, num_steps, record, now - run_start, step - start_step),
                  flush=True)
          last_time, last_step = time.time(), step
        checkpointer.save(step, state, train_data, model_config, force=preemption.requested or step == num_steps)
        if preemption.requested:
          checkpointer.wait()
          print(f'preempted: saved step {step} to {checkpoint_dir}; rerun the same command to resume', flush=True)
          return record
      checkpointer.wait()
    finally:
      preemption.restore()
      writer.close()
      checkpointer.close()

    final = dict(record)
    final['eval_loss'] = evaluate(state, eval_data, setup, run_mesh)
    final['unigram_loss'] = pipeline.unigram_loss(eval_data, tok.vocab_size)
    if lead:
      print(f'validation loss {final["eval_loss"]:.4f} nats/token after {num_steps} steps '
            f'(unigram model of the same tokens: {final["unigram_loss"]:.4f}; {time.time() - run_start:.0f}s)',
            flush=True)
    if sample_tokens and jax.process_count() == 1:
      print_samples(state, setup, tok, sample_prompt, sample_tokens)
    export_dir = os.path.join(workdir, 'model')
    if not os.path.exists(export_dir) and jax.process_count() == 1:
      from k2 import convert
      convert.save_orbax(nnx.merge(setup.graphdef, state.params, state.buffers), export_dir)
      logging.info('exported the final model to %s', export_dir)
  return final
