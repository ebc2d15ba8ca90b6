"""Pretraining loop: a pure jitted MuonClip `train_step`, aux-loss-free router balancing, metrics.jsonl, console.

The embedded default trains k2_tiny on the Python standard library's source (k2.data.stdlib_text) on a CPU.
"""

from __future__ import annotations

import json
import os
import time

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from k2 import model as model_lib
from k2.config import ConfigError, get_config
from k2.data import stdlib_text
from k2.optim import muonclip, qk_clip, wsd_schedule

gin.external_configurable(get_config, 'model_config')


def next_token_loss(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean cross entropy over unmasked positions. logits [B, T, V] float32, targets/mask [B, T]."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def loss_fn(model: model_lib.Transformer, batch: dict[str, jax.Array]):
  logits, aux = model(batch['inputs'], batch['positions'], batch['segment_ids'])
  loss = next_token_loss(logits, batch['targets'], batch['mask'])
  return loss + aux['balance_loss'], (loss, aux)


def update_router_bias(model: model_lib.Transformer, expert_load: jax.Array, rate: float) -> None:
  """Aux-loss-free balancing (DeepSeek-V3 section 2.1.2): bias += rate * sign(mean load - load), per MoE layer."""
  moe_layers = [layer.ffn for layer in model.layers if layer.is_moe]
  for moe, load in zip(moe_layers, expert_load):
    moe.router_bias[...] = moe.router_bias[...] + rate * jnp.sign(jnp.mean(load) - load)


@nnx.jit(donate_argnums=(0, 1), static_argnames=('qk_clip_tau', 'bias_update_rate'))
def train_step(model, optimizer, batch, qk_clip_tau: float = 100.0, bias_update_rate: float = 1e-3):
  """One MuonClip step: gradients w.r.t. the nnx.Params, optimizer update, QK-Clip with this step's max logits
  (no extra forward), router-bias update."""
  grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.Param), has_aux=True)
  (_, (loss, aux)), grads = grad_fn(model, batch)
  optimizer.update(model, grads)
  clipped, clip_stats = qk_clip(nnx.state(model, nnx.Param), aux['max_logits'], qk_clip_tau, model.config)
  nnx.update(model, clipped)
  update_router_bias(model, aux['expert_load'], bias_update_rate)
  load = aux['expert_load']
  return {
      'loss': loss, 'grad_norm': optax.tree.norm(grads),
      'max_logit': jnp.max(aux['max_logits']), 'clipped_heads': clip_stats['clipped_heads'],
      'expert_load_max_over_mean': jnp.max(load / jnp.mean(load, axis=-1, keepdims=True)) if load.size else 1.0,
  }


@nnx.jit
def eval_step(model, batch):
  return loss_fn(model, batch)[1][0]


@gin.configurable(denylist=['workdir'])
def train(workdir: str, model_config=gin.REQUIRED, num_steps: int = 100, batch_size: int = 8, seq_len: int = 128,
          learning_rate: float = 3e-3, warmup_steps: int = 20, decay_fraction: float = 0.2,
          weight_decay: float = 0.1, qk_clip_tau: float = 100.0, seed: int = 0, log_every: int = 10,
          eval_batches: int = 4):
  """Trains a freshly initialized model and returns its final validation loss."""
  if seq_len > model_config.rope.max_position_embeddings:
    raise ConfigError(f'SEQ_LEN={seq_len} exceeds the model max_position_embeddings='
                      f'{model_config.rope.max_position_embeddings}')
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'operative_config.gin'), 'w') as f:
    f.write(gin.operative_config_str())
  model = model_lib.create(model_config, seed=seed)
  warmup_steps = min(warmup_steps, num_steps // 2)
  decay_steps = max(1, int(num_steps * decay_fraction))
  schedule = wsd_schedule(learning_rate, warmup_steps, max(0, num_steps - warmup_steps - decay_steps), decay_steps,
                          learning_rate / 10)
  optimizer = nnx.Optimizer(model, muonclip(schedule, weight_decay=weight_decay), wrt=nnx.Param)
  train_data = stdlib_text.batches('train', batch_size, seq_len, seed)
  start, tokens_seen = time.time(), 0
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as metrics_file:
    for step in range(1, num_steps + 1):
      batch = jax.tree.map(jnp.asarray, next(train_data))
      metrics = train_step(model, optimizer, batch, qk_clip_tau=qk_clip_tau)
      tokens_seen += batch_size * seq_len
      if step % log_every == 0 or step == num_steps:
        metrics = {key: float(value) for key, value in metrics.items()}
        elapsed = time.time() - start
        record = {'step': step, 'learning_rate': float(schedule(step)), 'tokens_per_second': tokens_seen / elapsed,
                  **metrics}
        metrics_file.write(json.dumps(record) + '\n')
        metrics_file.flush()
        eta = elapsed / step * (num_steps - step)
        print(f'step {step:5d}/{num_steps}  loss {metrics["loss"]:.4f}  max_logit {metrics["max_logit"]:.1f}  '
              f'clipped {metrics["clipped_heads"]:.0f}  '
              f'{record["tokens_per_second"]:,.0f} tok/s  eta {eta:.0f}s', flush=True)
    eval_data = stdlib_text.batches('validation', batch_size, seq_len, seed)
    eval_loss = float(np.mean([eval_step(model, jax.tree.map(jnp.asarray, next(eval_data)))
                               for _ in range(eval_batches)]))
    metrics_file.write(json.dumps({'step': num_steps, 'eval_loss': eval_loss}) + '\n')
  print(f'validation loss {eval_loss:.4f} after {num_steps} steps ({time.time() - start:.0f}s)')
  logging.info('workdir %s', workdir)
  return eval_loss
