"""The pure training step: `train_step(state, batch, setup) -> (state, metrics)`, jitted with the state donated.

One step (K2 report, Algorithm 1, plus DeepSeek-V3's aux-loss-free balancing):
  1. forward + backward over `grad_accum_steps` micro-batches (gradients summed in float32, max logits maxed,
     expert loads summed),
  2. optimizer update (MuonClip: Muon on matrices, AdamW on the rest),
  3. QK-Clip with this step's per-head max logits (no extra forward), on the updated weights,
  4. router bias += rate * sign(mean load - load), per MoE layer.

`TrainState` holds plain pytrees (nnx.State of the parameters, of the other variables, the optax state, the step),
so orbax saves and restores it directly and jit shards it by its arrays' shardings.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from k2 import model as model_lib
from k2 import sharding
from k2.config import ModelConfig
from k2.optim import qk_clip


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array         # int32 [], optimizer steps taken
  params: nnx.State       # nnx.Param variables (trained by the optimizer)
  buffers: nnx.State      # every other variable (the router bias, set by the balancing rule)
  opt_state: optax.OptState


@dataclasses.dataclass(frozen=True)
class StepSetup:
  """Everything static about a step (hashable, so it is a static jit argument)."""
  graphdef: nnx.GraphDef
  model_config: ModelConfig
  optimizer: optax.GradientTransformation
  schedule: Callable[[jax.Array], jax.Array]
  qk_clip_tau: float | None = 100.0  # None: no QK-Clip (vanilla Muon / AdamW arms of ablations)
  bias_update_rate: float = 1e-3
  grad_accum_steps: int = 1
  loss_chunk: int | None = None  # take the logits `loss_chunk` positions at a time (chunked_next_token_loss)
  # Also report `max_logit_after_step`: the max logit of a forward with the step's final (updated, clipped) weights on
  # the same batch, a measurement of what QK-Clip left (one extra forward per step; for ablations).
  measure_max_logit_after_step: bool = False


def init_state(model: model_lib.Transformer, optimizer: optax.GradientTransformation) -> tuple[nnx.GraphDef,
                                                                                            TrainState]:
  graphdef, params, buffers = nnx.split(model, nnx.Param, ...)
  return graphdef, TrainState(step=jnp.zeros((), jnp.int32), params=params, buffers=buffers,
                              opt_state=optimizer.init(params))


def next_token_loss(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sum of cross entropy over unmasked positions, their count). logits [B, T, V] float32, targets/mask [B, T]."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  return jnp.sum(losses * mask), jnp.sum(mask)


def chunked_next_token_loss(x: jax.Array, lm_head: jax.Array, targets: jax.Array, mask: jax.Array,
                            chunk: int) -> tuple[jax.Array, jax.Array]:
  """`next_token_loss` of the logits x @ lm_head, taken `chunk` positions of the sequence at a time.

  Only one chunk's [B, chunk, V] float32 logits exist at once, forward and backward (the backward recomputes
  them from x and the saved per-token log-sum-exp), instead of the whole [B, T, V] and its gradient: for K2's
  163840-token vocabulary that is 20 GiB per chip at 16384 tokens per chip (WORKSPACE.md, plans). Same numerics as
  `output_logits` + `next_token_loss`: float32 logits and softmax, the logits' gradient cast to x's dtype before
  the two backward products. x [B, T, D], lm_head [D, V], targets/mask [B, T]; chunk divides T.
  """
  if x.shape[1] % chunk:
    raise ValueError(f'loss_chunk {chunk} does not divide the sequence length {x.shape[1]}')
  return _chunked_loss(x, lm_head, targets, mask, chunk), jnp.sum(mask)


def _by_chunk(a: jax.Array, chunk: int) -> jax.Array:
  """[B, T, ...] -> [T / chunk, B, chunk, ...]: scanned over the first axis, each slice split like the batch."""
  return jnp.moveaxis(a.reshape(a.shape[0], a.shape[1] // chunk, chunk, *a.shape[2:]), 1, 0)


def _chunk_logits(x, lm_head):
  return jnp.einsum('BTD,DV->BTV', x, lm_head, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _chunked_loss(x, lm_head, targets, mask, chunk):
  return _chunked_loss_fwd(x, lm_head, targets, mask, chunk)[0]


def _chunked_loss_fwd(x, lm_head, targets, mask, chunk):
  def one(total, xs):
    x_c, targets_c, mask_c = xs
    logits = _chunk_logits(x_c, lm_head)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logits = jnp.take_along_axis(logits, targets_c[..., None], axis=-1)[..., 0]
    return total + jnp.sum((lse - target_logits) * mask_c), lse

  total, lse = jax.lax.scan(one, jnp.zeros((), jnp.float32),
                            (_by_chunk(x, chunk), _by_chunk(targets, chunk), _by_chunk(mask, chunk)))
  return total, (x, lm_head, targets, mask, lse)


def _chunked_loss_bwd(chunk, residuals, g):
  x, lm_head, targets, mask, lse = residuals

  def one(d_lm_head, xs):
    x_c, targets_c, mask_c, lse_c = xs
    probs = jnp.exp(_chunk_logits(x_c, lm_head) - lse_c[..., None])
    d_logits = probs - jax.nn.one_hot(targets_c, lm_head.shape[1], dtype=jnp.float32)
    d_logits = (d_logits * (g * mask_c)[..., None]).astype(x.dtype)
    d_x = jnp.einsum('BTV,DV->BTD', d_logits, lm_head, preferred_element_type=jnp.float32).astype(x.dtype)
    return d_lm_head + jnp.einsum('BTD,BTV->DV', x_c, d_logits, preferred_element_type=jnp.float32), d_x

  d_lm_head, d_x = jax.lax.scan(one, jnp.zeros(lm_head.shape, jnp.float32),
                                (_by_chunk(x, chunk), _by_chunk(targets, chunk), _by_chunk(mask, chunk), lse))
  d_x = jnp.moveaxis(d_x, 0, 1).reshape(x.shape)
  return d_x, d_lm_head.astype(lm_head.dtype), None, None


_chunked_loss.defvjp(_chunked_loss_fwd, _chunked_loss_bwd)


def _loss(params, buffers, graphdef, batch, loss_chunk: int | None = None):
  model = nnx.merge(graphdef, params, buffers)
  if loss_chunk is None:
    logits, aux = model(batch['inputs'], batch['positions'], batch['segment_ids'])
    loss_sum, count = next_token_loss(logits, batch['targets'], batch['mask'])
  else:
    x, aux = model.features(batch['inputs'], batch['positions'], batch['segment_ids'])
    loss_sum, count = chunked_next_token_loss(x, model.output_weights(), batch['targets'], batch['mask'],
                                              loss_chunk)
  loss = loss_sum / jnp.maximum(count, 1.0)
  return loss + aux['balance_loss'], (loss, aux)


def _gradients(state: TrainState, batch, setup: StepSetup):
  """Mean loss, float32 gradients and aux over the micro-batches of `batch` ([accum * micro, T] rows)."""
  grad_fn = jax.value_and_grad(functools.partial(_loss, loss_chunk=setup.loss_chunk), has_aux=True)
  accum = setup.grad_accum_steps
  if accum == 1:
    (_, (loss, aux)), grads = grad_fn(state.params, state.buffers, setup.graphdef, batch)
    return loss, grads, aux
  # Micro-batch i is rows i, i + accum, i + 2 accum, ...: a device's contiguous block of a batch sharded over rows
  # holds an equal share of every micro-batch, so splitting moves no data between devices.
  micro = jax.tree.map(lambda x: sharding.constrain(
      x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1),
      (None, 'batch') + (None,) * (x.ndim - 1)), batch)

  def one(carry, micro_batch):
    (_, (loss, aux)), grads = grad_fn(state.params, state.buffers, setup.graphdef, micro_batch)
    loss_sum, grad_sum, max_logits, load, dropped = carry
    grad_sum = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_sum, grads)
    return (loss_sum + loss, grad_sum, jnp.maximum(max_logits, aux['max_logits']), load + aux['expert_load'],
            dropped + aux['dropped_tokens']), None

  config = setup.model_config
  zeros = (jnp.zeros((), jnp.float32), jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params),
           jnp.full((config.num_layers, config.attention.num_heads), -jnp.inf, jnp.float32),
           jnp.zeros((config.num_moe_layers, config.moe.num_experts), jnp.float32), jnp.zeros((), jnp.int32))
  (loss_sum, grad_sum, max_logits, load, dropped), _ = jax.lax.scan(one, zeros, micro)
  grads = jax.tree.map(lambda g, p: (g / accum).astype(p.dtype), grad_sum, state.params)
  return loss_sum / accum, grads, {'max_logits': max_logits, 'expert_load': load, 'dropped_tokens': dropped}


def _update_router_bias(buffers: nnx.State, graphdef, params, expert_load: jax.Array, rate: float) -> nnx.State:
  """Aux-loss-free balancing (DeepSeek-V3 section 2.1.2): bias += rate * sign(mean load - load) per MoE layer."""
  model = nnx.merge(graphdef, params, buffers)
  moe_layers = [layer.ffn for layer in model.layers if layer.is_moe]
  for moe, load in zip(moe_layers, expert_load):
    moe.router_bias[...] = moe.router_bias[...] + rate * jnp.sign(jnp.mean(load) - load)
  return nnx.state(model, nnx.Not(nnx.Param))


def _rms(tree) -> jax.Array:
  leaves = jax.tree.leaves(tree)
  total = sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves)
  return jnp.sqrt(total / sum(x.size for x in leaves))


@functools.partial(jax.jit, donate_argnums=0, static_argnums=2)
def train_step(state: TrainState, batch: dict[str, jax.Array], setup: StepSetup) -> tuple[TrainState, dict]:
  """One MuonClip step (see the module docstring). batch: [rows, T] arrays from k2.data.pipeline."""
  loss, grads, aux = _gradients(state, batch, setup)
  updates, opt_state = setup.optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  clipped_heads = jnp.zeros((), jnp.int32)
  if setup.qk_clip_tau is not None:
    params, clip_stats = qk_clip(params, aux['max_logits'], setup.qk_clip_tau, setup.model_config)
    clipped_heads = clip_stats['clipped_heads']
  buffers = state.buffers
  load = aux['expert_load']
  if load.size:
    buffers = _update_router_bias(buffers, setup.graphdef, params, load, setup.bias_update_rate)
  metrics = {
      'loss': loss,
      'learning_rate': setup.schedule(state.step),
      'grad_norm': optax.tree.norm(grads),
      'update_rms': _rms(updates),
      'max_logit': jnp.max(aux['max_logits']),
      'clipped_heads': clipped_heads,
      'dropped_tokens': aux['dropped_tokens'],  # expert parallelism's capacity exchange (0 when dropless)
      'expert_load_max_over_mean': (jnp.max(load / jnp.maximum(jnp.mean(load, axis=-1, keepdims=True), 1e-9))
                                    if load.size else jnp.ones(())),
  }
  # Pre-clip max logit of each layer (max over its heads), for the per-layer spread in experiments/ablations.
  metrics.update({f'max_logit_layer{i}': m for i, m in enumerate(jnp.max(aux['max_logits'], axis=-1))})
  if setup.measure_max_logit_after_step:
    _, after = nnx.merge(setup.graphdef, params, buffers)(batch['inputs'], batch['positions'], batch['segment_ids'])
    metrics['max_logit_after_step'] = jnp.max(after['max_logits'])
  return TrainState(step=state.step + 1, params=params, buffers=buffers, opt_state=opt_state), metrics


@functools.partial(jax.jit, static_argnums=2)
def eval_step(state: TrainState, batch: dict[str, jax.Array], setup: StepSetup) -> tuple[jax.Array, jax.Array]:
  """(sum of next-token cross entropy, number of predicted tokens) on one batch."""
  model = nnx.merge(setup.graphdef, state.params, state.buffers)
  logits, _ = model(batch['inputs'], batch['positions'], batch['segment_ids'])
  return next_token_loss(logits, batch['targets'], batch['mask'])
