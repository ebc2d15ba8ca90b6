"""The gin-configurable pieces every training stage shares: the model config, the schedule, the optimizer, and the
model export.

    schedule.warmup_steps = 500        optimizer.name = 'muonclip'        model_config.name = 'k2_tiny'
"""

from __future__ import annotations

import os
import shutil
import tempfile

import gin
import jax.numpy as jnp
import optax

from k2.config import ConfigError, get_config
from k2.optim import muon_adamw, param_labels, wsd_schedule

gin.external_configurable(get_config, 'model_config')


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
  """'muonclip' (Muon on matrices + AdamW on the rest; QK-Clip and router balancing follow each update in the step,
  with the stage's `qk_clip_tau`) or 'adamw' on everything. ns_dtype: Newton-Schulz precision ('bfloat16' as in
  the reference implementations, or 'float32').

  Both keep the router bias out of the gradient update (it is set by the balancing rule)."""
  if name == 'muonclip':
    return muon_adamw(learning_rate, weight_decay=weight_decay, momentum=momentum, rms_scale=rms_scale,
                      adam_b1=adam_b1, adam_b2=adam_b2, ns_impl=ns_impl, ns_dtype=jnp.dtype(ns_dtype))
  if name == 'adamw':
    adamw = optax.adamw(learning_rate, b1=adam_b1, b2=adam_b2, weight_decay=weight_decay)
    return optax.multi_transform({'muon': adamw, 'adamw': adamw, 'frozen': optax.set_to_zero()}, param_labels)
  raise ConfigError(f"optimizer name must be 'muonclip' or 'adamw', got {name!r}")


def stage_inputs(*, learning_rate: float, num_steps: int, log_every: int, checkpoint_every: int,
                 keep_checkpoints: int, eval_every: int) -> dict:
  """The gin-configured arguments of `k2.train.loop.train_stage` every stage passes alike: the WSD schedule, the
  optimizer on it, the loop's cadence and the operative config to write into the workdir."""
  from k2.train import loop  # loop does not import gin; the recipe is where gin meets it
  lr_schedule = schedule(learning_rate, num_steps)
  return dict(schedule=lr_schedule, optimizer=optimizer(lr_schedule), operative_config=gin.operative_config_str(),
              config=loop.LoopConfig(num_steps=num_steps, log_every=log_every, checkpoint_every=checkpoint_every,
                                     keep_checkpoints=keep_checkpoints, eval_every=eval_every))


def export_model(model, directory: str, tokenizer_path: str | None) -> None:
  """Writes `model` (config.json + state/, k2.convert.save_orbax) and its tokenizer file to `directory`, replacing
  an earlier export only once the new one is complete (a crash leaves the old one in place)."""
  from k2 import convert
  parent = os.path.dirname(os.path.abspath(directory))
  staging = tempfile.mkdtemp(prefix='.model-', dir=parent)
  new = os.path.join(staging, 'model')
  convert.save_orbax(model, new)
  if tokenizer_path:
    name = 'tokenizer.json' if tokenizer_path.endswith('.json') else 'tiktoken.model'
    shutil.copyfile(tokenizer_path, os.path.join(new, name))
  old = os.path.join(staging, 'old')
  if os.path.exists(directory):
    os.rename(directory, old)
  os.rename(new, directory)
  shutil.rmtree(staging)
