"""Supervised fine-tuning, a stage on the shared loop: chat conversations -> K2 chat tokens -> next-token loss on the
assistant's tokens only (its text, tool calls and closing <|im_end|>) -> checkpoints, metrics, evaluation, export.

`sft(workdir)` is gin-configured (configs/sft/*.gin; the knobs are `sft.*`). It starts from a pretrained model
(`sft.init_from`: a pretraining workdir, its `model/` export, a checkpoint, or an HF directory) with a fresh
optimizer, trains with MuonClip exactly as pretraining does (QK-Clip and router balancing stay on; K2 report 3.1),
holds out the last `eval_fraction` of the conversations for the validation loss, and exports `workdir/model` with the
tokenizer. The data is JSONL conversations in the OpenAI chat shape (k2.data.conversations); the tokenizer is the
pretrained model's own (the one its export carries) unless `sft.tokenizer_path` names another.
"""

from __future__ import annotations

import os
import time

import gin
import jax
import numpy as np
from flax import nnx

from k2 import sharding
from k2.config import ConfigError, ModelConfig
from k2.data import conversations as conversations_lib
from k2.data import tokenizer as tokenizer_lib
from k2.serve.loading import MODEL_TOKENIZER_FILES
from k2.train import loop, pretrain, recipe


def model_tokenizer(init_from: str | None, path: str | None) -> tokenizer_lib.Tokenizer:
  """`path`, else the tokenizer saved with the model `init_from` points at (its export, or a workdir's `model/`)."""
  if path:
    return tokenizer_lib.load(path)
  if init_from:
    for directory in (init_from, os.path.join(init_from, 'model'), os.path.join(init_from, '..', '..', 'model')):
      for name in MODEL_TOKENIZER_FILES:
        if os.path.isfile(os.path.join(directory, name)):
          return tokenizer_lib.load(os.path.join(directory, name))
  raise ConfigError(f'no tokenizer found with init_from={init_from!r} (no such model, or it was saved without one); '
                    'set the stage\'s tokenizer_path (sft.tokenizer_path, rl.tokenizer_path)')


@gin.configurable(denylist=['workdir'])
def sft(workdir: str, model_config: ModelConfig = gin.REQUIRED, conversations: str = gin.REQUIRED,
        init_from: str | None = None, tokenizer_path: str | None = None, num_steps: int = 100, batch_size: int = 8,
        seq_len: int = 512, learning_rate: float = 1e-3, seed: int = 0, mesh: dict | None = None,
        grad_accum_steps: int = 1, qk_clip_tau: float | None = 100.0, bias_update_rate: float = 1e-3,
        checkpoint_every: int = 100, keep_checkpoints: int = 3, eval_every: int = 100, eval_fraction: float = 0.05,
        log_every: int = 10, loss_on: str = 'assistant') -> dict[str, float]:
  """Fine-tunes (or resumes) the run in `workdir`; returns the final metrics with eval_loss (nats per assistant
  token of the held-out conversations, whatever `loss_on`). loss_on: 'assistant' (SFT: what the assistant wrote)
  or 'all' (every token of the conversations, as in pretraining: user turns, tool results and the system prompt
  too, where the entities the assistant must copy first appear)."""
  # 1. Everything that can be wrong is checked before anything is written.
  pretrain.check_shapes(model_config, num_steps, batch_size, seq_len, None)
  loop.check_workdir(workdir)
  run_mesh = loop.make_run_mesh(mesh, model_config, batch_size, grad_accum_steps)
  tok = model_tokenizer(init_from, tokenizer_path)
  if tok.vocab_size > model_config.vocab_size:
    raise ConfigError(f'tokenizer {tok} has more ids than the model vocab_size={model_config.vocab_size}')
  every = conversations_lib.read(conversations)
  lengths = conversations_lib.rendered_lengths(every, tok)
  fits = [c for c, n in zip(every, lengths) if n <= seq_len + 1]
  if len(fits) < 2:
    raise ConfigError(f'{len(fits)} of {len(every)} conversations fit in SEQ_LEN={seq_len} (longest '
                      f'{int(lengths.max())} tokens); at least 2 are needed (one held out)')
  num_eval = max(1, int(len(fits) * eval_fraction))
  train_convs, eval_convs = fits[:-num_eval], fits[-num_eval:]
  print(f'sft: {len(train_convs)} training and {len(eval_convs)} held-out conversations ({len(every) - len(fits)} '
        f'longer than SEQ_LEN={seq_len} left out)', flush=True)
  local_rows = batch_size // jax.process_count()
  shards = dict(process_index=jax.process_index(), process_count=jax.process_count())
  eval_iter = conversations_lib.sft_batches(eval_convs, tok, batch_size=local_rows, seq_len=seq_len, seed=seed,
                                            shuffle=False, **shards)
  eval_data = [next(eval_iter) for _ in range(max(1, -(-len(eval_convs) // local_rows)))]

  # 2. The run.
  train_data = conversations_lib.sft_batches(train_convs, tok, batch_size=local_rows, seq_len=seq_len, seed=seed,
                                             loss_on=loss_on, **shards)
  run_start = time.time()
  state, setup, record, preempted = loop.train_stage(
      workdir, model_config=model_config, mesh=run_mesh, batches=train_data, data_iterator=train_data, seed=seed,
      init_from=init_from, **recipe.stage_inputs(
          learning_rate=learning_rate, num_steps=num_steps, log_every=log_every, checkpoint_every=checkpoint_every,
          keep_checkpoints=keep_checkpoints, eval_every=eval_every),
      evaluate=lambda s, setup: {'eval_loss': pretrain.evaluate(s, eval_data, setup, run_mesh)},
      tokens_per_step=batch_size * seq_len,
      qk_clip_tau=qk_clip_tau, bias_update_rate=bias_update_rate, grad_accum_steps=grad_accum_steps)
  if preempted:
    return record
  with sharding.use_mesh(run_mesh):
    final = dict(record)
    final['eval_loss'] = record.get('eval_loss') or pretrain.evaluate(state, eval_data, setup, run_mesh)
    final['assistant_token_fraction'] = float(np.mean([b['mask'].mean() for b in eval_data]))
    if jax.process_index() == 0:
      print(f'held-out loss {final["eval_loss"]:.4f} nats per assistant token after {num_steps} steps '
            f'({time.time() - run_start:.0f}s)', flush=True)
    if jax.process_count() == 1:
      recipe.export_model(nnx.merge(setup.graphdef, state.params, state.buffers), os.path.join(workdir, 'model'),
                          tok.path)
  return final
