"""The pure training step every stage shares: `train_step(state, batch, setup) -> (state, metrics)`, jitted with the
state donated.

One step (K2 report, Algorithm 1, plus DeepSeek-V3's aux-loss-free balancing):
  1. forward + backward of the stage's loss over `grad_accum_steps` micro-batches,
  2. optimizer update (MuonClip's optax part: Muon on matrices, AdamW on the rest),
  3. MuonClip's post-update (k2.optim.muonclip.post_update): QK-Clip with this step's per-head max logits (no extra
     forward) on the updated weights, and router bias += rate * sign(mean load - load) per MoE layer.

The loss is the stage's: `setup.loss_fn(model, batch) -> (loss_sum, count, aux)`, a sum of per-token (or per-sequence)
losses, how many terms it sums, and the model's aux plus any values to log. Accumulation sums `loss_sum`'s gradient
and `count` over the micro-batches and divides once, so the update is that of the token-weighted mean over the whole
batch whatever the loss masks (SFT's assistant tokens, RL's responses). Pretraining's next-token loss (plain and
chunked) is one such function (the default). Aux values reduce over micro-batches by a rule per key
(`AUX_REDUCTIONS`, extended by `setup.aux_reductions`): the model's max logits by max, expert loads by sum, means by
their token weight.

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
from k2.optim import muonclip


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array         # int32 [], optimizer steps taken
  params: nnx.State       # nnx.Param variables (trained by the optimizer)
  buffers: nnx.State      # every other variable (the router bias, set by the balancing rule)
  opt_state: optax.OptState


# How each aux value combines over micro-batches. 'token_mean': a mean over the micro-batch's loss terms, combined
# weighted by their count (so it is the mean over the whole batch); 'mean': plain mean over micro-batches.
AUX_REDUCTIONS = {'max_logits': 'max', 'expert_load': 'sum', 'dropped_tokens': 'sum', 'balance_loss': 'token_mean'}
_COMBINE = {'sum': jnp.add, 'mean': jnp.add, 'token_mean': jnp.add, 'max': jnp.maximum, 'min': jnp.minimum}


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
  # The stage's loss (model, batch) -> (loss_sum, count, aux); None: next-token cross entropy (pretraining).
  loss_fn: Callable | None = None
  # Reduction rules ((key, rule), ...) for aux keys of loss_fn beyond AUX_REDUCTIONS; rules as in _COMBINE.
  aux_reductions: tuple[tuple[str, str], ...] = ()

  def loss(self) -> Callable:
    return self.loss_fn or functools.partial(lm_loss, loss_chunk=self.loss_chunk)

  def reductions(self) -> dict[str, str]:
    return {**AUX_REDUCTIONS, **dict(self.aux_reductions)}


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


def lm_loss(model: model_lib.Transformer, batch: dict[str, jax.Array], loss_chunk: int | None = None):
  """Next-token cross entropy: (sum over batch['mask'] tokens, their count, the model's aux).

  batch: 'inputs', 'targets', 'positions', 'segment_ids' [B, T] int32, 'mask' [B, T] float32 (k2.data.pipeline).
  loss_chunk: take the logits that many positions at a time (`chunked_next_token_loss`); None: all at once.
  """
  if loss_chunk is None:
    logits, aux = model(batch['inputs'], batch['positions'], batch['segment_ids'])
    loss_sum, count = next_token_loss(logits, batch['targets'], batch['mask'])
  else:
    x, aux = model.features(batch['inputs'], batch['positions'], batch['segment_ids'])
    loss_sum, count = chunked_next_token_loss(x, model.output_weights(), batch['targets'], batch['mask'],
                                              loss_chunk)
  return loss_sum, count, aux


def _objective(params, buffers, batch, setup: StepSetup):
  """The differentiated function of one micro-batch: loss_sum + count * balance_loss (a mean penalty, weighted
  by the micro-batch's share of loss terms once divided by the batch's total count)."""
  loss_sum, count, aux = setup.loss()(nnx.merge(setup.graphdef, params, buffers), batch)
  count = jax.lax.stop_gradient(count).astype(jnp.float32)
  return loss_sum + count * aux['balance_loss'], (loss_sum, count, aux)


def _reduce_aux(total: dict, aux: dict, count, reductions: dict) -> dict:
  """total (or None) combined with one micro-batch's aux by the rules; token_mean values are weighted by count."""
  unknown = sorted(set(aux) - set(reductions))
  if unknown:
    raise ValueError(f'aux keys {unknown} have no reduction rule; declare them in StepSetup.aux_reductions')
  weighted = {k: v * count if reductions[k] == 'token_mean' else v for k, v in aux.items()}
  if total is None:
    return weighted
  return {k: _COMBINE[reductions[k]](total[k], v) for k, v in weighted.items()}


def _finish_aux(total: dict, count, accum: int, reductions: dict) -> dict:
  return {k: v / jnp.maximum(count, 1.0) if reductions[k] == 'token_mean' else v / accum if reductions[k] == 'mean'
          else v for k, v in total.items()}


def _gradients(state: TrainState, batch, setup: StepSetup):
  """Token-weighted mean loss, float32 gradients of the token-weighted mean objective, and reduced aux over the
  micro-batches of `batch` ([accum * micro, T] rows)."""
  grad_fn = jax.value_and_grad(_objective, has_aux=True)
  accum, reductions = setup.grad_accum_steps, setup.reductions()
  if accum == 1:
    (_, (loss_sum, count, aux)), grads = grad_fn(state.params, state.buffers, batch, setup)
    total_aux = _reduce_aux(None, aux, count, reductions)
  else:
    # Micro-batch i is rows i, i + accum, i + 2 accum, ...: a device's contiguous block of a batch sharded over rows
    # holds an equal share of every micro-batch, so splitting moves no data between devices.
    micro = jax.tree.map(lambda x: sharding.constrain(
        x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1),
        (None, 'batch') + (None,) * (x.ndim - 1)), batch)

    def one(carry, micro_batch):
      loss_sum, count, grad_sum, total_aux = carry
      (_, (micro_loss, micro_count, aux)), grads = grad_fn(state.params, state.buffers, micro_batch, setup)
      grad_sum = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_sum, grads)
      return (loss_sum + micro_loss, count + micro_count, grad_sum,
              _reduce_aux(total_aux, aux, micro_count, reductions)), None

    first = jax.tree.map(lambda x: x[0], micro)
    aux_shapes = jax.eval_shape(lambda: _objective(state.params, state.buffers, first, setup)[1][2])
    zeros = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
             jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params),
             {k: jnp.full(v.shape, -jnp.inf if reductions.get(k) == 'max' else
                          jnp.inf if reductions.get(k) == 'min' else 0, v.dtype) for k, v in aux_shapes.items()})
    (loss_sum, count, grads, total_aux), _ = jax.lax.scan(one, zeros, micro)
  # Divide once: the gradient of the token-weighted mean over the whole batch.
  denominator = jnp.maximum(count, 1.0)
  grads = jax.tree.map(lambda g, p: (g.astype(jnp.float32) / denominator).astype(p.dtype), grads, state.params)
  return loss_sum / denominator, grads, _finish_aux(total_aux, count, accum, reductions)


def _rms(tree) -> jax.Array:
  leaves = jax.tree.leaves(tree)
  total = sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves)
  return jnp.sqrt(total / sum(x.size for x in leaves))


_MODEL_AUX = ('max_logits', 'expert_load', 'dropped_tokens', 'balance_loss')


@functools.partial(jax.jit, donate_argnums=0, static_argnums=2)
def train_step(state: TrainState, batch: dict[str, jax.Array], setup: StepSetup) -> tuple[TrainState, dict]:
  """One MuonClip step (see the module docstring). batch: [rows, ...] arrays the stage's loss reads (pretraining:
  k2.data.pipeline's 'inputs', 'targets', 'positions', 'segment_ids', 'mask' [rows, T])."""
  loss, grads, aux = _gradients(state, batch, setup)
  updates, opt_state = setup.optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  params, buffers, post_stats = muonclip.post_update(
      params, state.buffers, aux, qk_clip_tau=setup.qk_clip_tau, bias_update_rate=setup.bias_update_rate,
      model_config=setup.model_config)
  load = aux['expert_load']
  metrics = {
      'loss': loss,
      'learning_rate': setup.schedule(state.step),
      'grad_norm': optax.tree.norm(grads),
      'param_norm': optax.tree.norm(params),
      'update_rms': _rms(updates),
      'max_logit': jnp.max(aux['max_logits']),  # pre-clip: measured by this step's forward
      'clipped_heads': post_stats['clipped_heads'],
      'dropped_tokens': aux['dropped_tokens'],  # expert parallelism's capacity exchange (0 when dropless)
      'expert_load_max_over_mean': (jnp.max(load / jnp.maximum(jnp.mean(load, axis=-1, keepdims=True), 1e-9))
                                    if load.size else jnp.ones(())),
  }
  # Pre-clip max logit of each layer (max over its heads), for the per-layer spread in experiments/ablations.
  metrics.update({f'max_logit_layer{i}': m for i, m in enumerate(jnp.max(aux['max_logits'], axis=-1))})
  metrics.update({k: v for k, v in aux.items() if k not in _MODEL_AUX and jnp.ndim(v) == 0})  # the stage's own
  if setup.measure_max_logit_after_step:
    _, after = nnx.merge(setup.graphdef, params, buffers)(batch['inputs'], batch['positions'], batch['segment_ids'])
    metrics['max_logit_after_step'] = jnp.max(after['max_logits'])
  return TrainState(step=state.step + 1, params=params, buffers=buffers, opt_state=opt_state), metrics


@functools.partial(jax.jit, static_argnums=2)
def eval_step(state: TrainState, batch: dict[str, jax.Array], setup: StepSetup) -> tuple[jax.Array, jax.Array]:
  """(loss_sum, count) of the stage's loss on one batch, chunked like training (no gradients, no update)."""
  loss_sum, count, _ = setup.loss()(nnx.merge(setup.graphdef, state.params, state.buffers), batch)
  return loss_sum, count
