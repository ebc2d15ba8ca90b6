"""Pretraining, a stage on the shared loop: documents -> packed batches -> next-token loss -> checkpoints, metrics,
evaluation, samples, and the exported model.

`train(workdir)` is gin-configured (configs/pretrain/*.gin; the knobs are `train.*`). Everything a run could fail on
(the model config, the mesh, the batch split, SEQ_LEN, the workdir, the dataset, the tokenizer, an incompatible
checkpoint in the workdir) is checked before anything is written. A workdir holding checkpoints is resumed from its
latest readable one, the data iterator included, so the losses continue exactly as if the run had never stopped.
SIGTERM (preemption) saves the step in flight and returns normally. `workdir/model` is the final model with its
tokenizer (for `python -m experiments.chat --checkpoint WORKDIR/model`), rewritten whenever a run finishes.
"""

from __future__ import annotations

import os
import time

import gin
import jax
import numpy as np
from absl import logging
from flax import nnx

from k2 import sharding
from k2.config import ConfigError, ModelConfig
from k2.data import pipeline
from k2.train import loop
from k2.train import recipe
from k2.train.step import StepSetup, TrainState, eval_step


def evaluate(state: TrainState, batches: list[dict], setup: StepSetup, mesh) -> float:
  """Mean next-token loss (nats/token) over `batches`."""
  total, count = 0.0, 0.0
  for batch in batches:
    loss_sum, tokens = eval_step(state, loop.global_batch(batch, mesh), setup)
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


def check_shapes(model_config: ModelConfig, num_steps: int, batch_size: int, seq_len: int,
                  loss_chunk: int | None) -> None:
  for name, value in (('NUM_STEPS', num_steps), ('BATCH_SIZE', batch_size), ('SEQ_LEN', seq_len)):
    if not isinstance(value, int) or value < 1:
      raise ConfigError(f'{name} must be a positive integer, got {value!r}')
  if seq_len > model_config.rope.max_position_embeddings:
    raise ConfigError(f'SEQ_LEN={seq_len} exceeds the model max_position_embeddings='
                      f'{model_config.rope.max_position_embeddings}')
  if loss_chunk is not None and (loss_chunk < 1 or seq_len % loss_chunk):
    raise ConfigError(f'train.loss_chunk={loss_chunk} does not divide SEQ_LEN={seq_len}')


@gin.configurable(denylist=['workdir'])
def train(workdir: str, model_config: ModelConfig = gin.REQUIRED, num_steps: int = 100, batch_size: int = 8,
          seq_len: int = 128, learning_rate: float = 3e-3, seed: int = 0, mesh: dict | None = None,
          grad_accum_steps: int = 1, qk_clip_tau: float | None = 100.0, bias_update_rate: float = 1e-3,
          checkpoint_every: int = 100, keep_checkpoints: int = 3, eval_every: int = 100, eval_batches: int = 8,
          log_every: int = 10, sample_prompt: str = 'def ', sample_tokens: int = 48,
          loss_chunk: int | None = None, measure_max_logit_after_step: bool = False,
          init_from: str | None = None, repeat_fraction: float = 0.0) -> dict[str, float]:
  """Trains (or resumes) the run in `workdir`; returns the final metrics, eval_loss and unigram_loss included.

  repeat_fraction: the share of training rows that show their first half twice, to reward copying from the
  context (k2.data.pipeline._RepeatHalf); the validation rows are never changed.

  loss_chunk: take the output logits this many positions at a time in the training loss (None: all at once),
  so only [rows, loss_chunk, vocab] of them are in memory (k2.train.step.chunked_next_token_loss).
  init_from: start from this model instead of a random init (a later stage such as long-context extension): an
  exported model directory, a workdir or checkpoint of this repo, or a published HF directory; fresh optimizer.
  A resumed run ignores it (its own checkpoint is newer)."""
  # 1. Everything that can be wrong is checked before anything is written.
  check_shapes(model_config, num_steps, batch_size, seq_len, loss_chunk)
  loop.check_workdir(workdir)
  run_mesh = loop.make_run_mesh(mesh, model_config, batch_size, grad_accum_steps)
  train_docs, eval_docs = pipeline.documents('train'), pipeline.documents('validation')
  tok = pipeline.tokenizer()
  if tok.vocab_size > model_config.vocab_size:
    raise ConfigError(f'tokenizer {tok} has more ids than the model vocab_size={model_config.vocab_size}')
  # A fixed, shuffled sample of the validation split (the same every evaluation and every resume).
  local_rows = batch_size // jax.process_count()
  shards = dict(process_index=jax.process_index(), process_count=jax.process_count())
  eval_iter = pipeline.lm_batches(eval_docs, tok, batch_size=local_rows, seq_len=seq_len, seed=seed, **shards)
  eval_data = [next(eval_iter) for _ in range(eval_batches)]
  unigram = pipeline.unigram_loss(eval_data, tok.vocab_size)
  if not np.isfinite(unigram) or unigram <= 0:
    raise ConfigError(f'the validation split has no predictable tokens (unigram loss {unigram:.4f}): the dataset '
                      'holds only empty or one-token documents')

  # 2. The run.
  train_data = pipeline.lm_batches(train_docs, tok, batch_size=local_rows, seq_len=seq_len, seed=seed,
                                   repeat_fraction=repeat_fraction, **shards)
  run_start = time.time()
  state, setup, record, preempted = loop.train_stage(
      workdir, model_config=model_config, mesh=run_mesh, batches=train_data, data_iterator=train_data, seed=seed,
      init_from=init_from, **recipe.stage_inputs(
          learning_rate=learning_rate, num_steps=num_steps, log_every=log_every, checkpoint_every=checkpoint_every,
          keep_checkpoints=keep_checkpoints, eval_every=eval_every),
      evaluate=lambda s, setup: {'eval_loss': evaluate(s, eval_data, setup, run_mesh)},
      tokens_per_step=batch_size * seq_len,
      qk_clip_tau=qk_clip_tau, bias_update_rate=bias_update_rate, grad_accum_steps=grad_accum_steps,
      loss_chunk=loss_chunk, measure_max_logit_after_step=measure_max_logit_after_step)
  if preempted:
    return record
  with sharding.use_mesh(run_mesh):
    final = dict(record)
    final['eval_loss'] = record.get('eval_loss') or evaluate(state, eval_data, setup, run_mesh)
    final['unigram_loss'] = unigram
    if jax.process_index() == 0:
      print(f'validation loss {final["eval_loss"]:.4f} nats/token after {num_steps} steps '
            f'(unigram model of the same tokens: {final["unigram_loss"]:.4f}; {time.time() - run_start:.0f}s)',
            flush=True)
    if sample_tokens and jax.process_count() == 1:
      print_samples(state, setup, tok, sample_prompt, sample_tokens)
    if jax.process_count() == 1:
      export_dir = os.path.join(workdir, 'model')
      recipe.export_model(nnx.merge(setup.graphdef, state.params, state.buffers), export_dir, tok.path)
      logging.info('exported the step-%d model to %s', num_steps, export_dir)
  return final
