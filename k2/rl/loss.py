"""The k1.5 policy-optimization objective K2 uses for RL (K2 report 3.2.3; Kimi k1.5 section 2.3.2).

For a prompt x with K responses y_i sampled from the policy at the start of the iteration (pi_old), rewards r_i and
their group mean rbar:

    L = mean over prompts and responses of ( r_i - rbar - tau * log( pi_theta(y_i|x) / pi_old(y_i|x) ) )^2

with the sequence-level log-ratio: the sum of per-token log-ratios over the response's tokens (the loss mask). At
theta = theta_old the log-ratio is 0 and the gradient is REINFORCE with the group-mean baseline times 2 tau
(d L / d logprob_{i,t} = -2 tau (r_i - rbar) / N on response tokens); tau is the trust region: one iteration's fixed
point is log-ratio = (r_i - rbar) / tau nats per sequence. No value network, no clipping.

Shapes: P prompts, K responses per prompt, T positions. Per-token log-probs are those of the token each position
predicts (the response token at the next position), zero weight where the mask is 0 (prompt, tool output, padding).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from k2 import model as model_lib
from k2.train import step as step_lib


def sequence_log_ratio(logprobs: jax.Array, old_logprobs: jax.Array, mask: jax.Array) -> jax.Array:
  """log pi_theta(y|x) - log pi_old(y|x) per response: [P, K, T] -> [P, K], summed over the masked tokens."""
  return jnp.sum(mask * (logprobs - old_logprobs), axis=-1)


def _per_response(logprobs, old_logprobs, mask, rewards, tau):
  """The squared k1.5 term of each response, [P, K] (float32)."""
  if not logprobs.shape == old_logprobs.shape == mask.shape or rewards.shape != logprobs.shape[:2]:
    raise ValueError(f'k1.5 loss shapes: logprobs {logprobs.shape}, old_logprobs {old_logprobs.shape} and mask '
                     f'{mask.shape} must all be [prompts, K, T], rewards {rewards.shape} [prompts, K]')
  if isinstance(tau, (int, float)) and tau <= 0:
    raise ValueError(f'tau={tau} must be > 0')
  advantage = rewards - jnp.mean(rewards, axis=-1, keepdims=True)
  log_ratio = sequence_log_ratio(logprobs.astype(jnp.float32), old_logprobs.astype(jnp.float32),
                                 mask.astype(jnp.float32))
  return jnp.square(advantage.astype(jnp.float32) - tau * log_ratio)


def k15_loss(logprobs: jax.Array, old_logprobs: jax.Array, mask: jax.Array, rewards: jax.Array,
             tau: float) -> jax.Array:
  """The k1.5 loss: a scalar, the mean over all P x K responses of the squared term.

  logprobs: [P, K, T] per-token log-probs under the policy being trained (differentiated).
  old_logprobs: [P, K, T] the same under pi_old (the training forward at the iteration start; constants).
  mask: [P, K, T] 1 on the response tokens the loss covers, 0 elsewhere.
  rewards: [P, K] one scalar reward per response; the baseline is the mean over each prompt's K responses.
  tau: the k1.5 regularization weight (> 0).
  """
  return jnp.mean(_per_response(logprobs, jax.lax.stop_gradient(old_logprobs), mask, rewards, tau))


def kl_estimate(logprobs: jax.Array, old_logprobs: jax.Array, mask: jax.Array) -> jax.Array:
  """KL(pi_old || pi_theta) per response in nats, [P, K, T] -> [P, K]: the sum over the response tokens of the
  per-token estimator exp(d) - 1 - d, d = log pi_theta - log pi_old (Schulman's k3). The tokens were sampled from
  pi_old, so each term is an unbiased, non-negative estimate of that token's conditional KL."""
  d = (logprobs - old_logprobs).astype(jnp.float32)
  return jnp.sum(mask * (jnp.expm1(d) - d), axis=-1)


def token_logprobs(model, batch: dict[str, jax.Array], loss_chunk: int | None = None) -> tuple[jax.Array, dict]:
  """(log pi(targets | prefix) per position from the training forward [P, K, T] float32, the model's aux).

  batch: 'inputs', 'targets', 'positions', 'segment_ids' [P, K, T] int32 (the sampler's own token ids; never
  re-encoded text). The same function gives the old log-probs at the iteration start (log-ratio exactly 0 at the
  first inner step) and the trained ones inside the loss. loss_chunk: take the logits that many positions at a
  time (`chunked_token_logprobs`; StepSetup.loss_chunk's role); None: all at once.
  """
  shape = batch['inputs'].shape
  flat = {k: batch[k].reshape(-1, shape[-1]) for k in ('inputs', 'targets', 'positions', 'segment_ids')}
  if loss_chunk is None:
    logits, aux = model(flat['inputs'], flat['positions'], flat['segment_ids'])
    logprobs = -optax.softmax_cross_entropy_with_integer_labels(logits, flat['targets'])
  else:
    x, aux = model.features(flat['inputs'], flat['positions'], flat['segment_ids'])
    logprobs = chunked_token_logprobs(x, model.output_weights(), flat['targets'], loss_chunk)
  return logprobs.reshape(shape), aux


def chunked_token_logprobs(x: jax.Array, lm_head: jax.Array, targets: jax.Array, chunk: int) -> jax.Array:
  """log_softmax(x @ lm_head)[targets] [B, T] float32, `chunk` positions at a time: only one chunk's [B, chunk, V]
  float32 logits exist at once, forward and backward (the backward recomputes them), as in
  k2.train.step.chunked_next_token_loss, but per token (the k1.5 loss sums them per response). x [B, T, D],
  lm_head [D, V], targets [B, T]; chunk divides T."""
  if x.shape[1] % chunk:
    raise ValueError(f'loss_chunk {chunk} does not divide the sequence length {x.shape[1]}')

  @jax.checkpoint
  def one(x_c, targets_c):
    logits = model_lib.output_logits(x_c, lm_head)
    return jnp.take_along_axis(logits, targets_c[..., None], axis=-1)[..., 0] - jax.nn.logsumexp(logits, axis=-1)

  by_chunk = jax.lax.map(lambda xs: one(*xs), (step_lib._by_chunk(x, chunk), step_lib._by_chunk(targets, chunk)))
  return jnp.moveaxis(by_chunk, 0, 1).reshape(targets.shape)


# Reduction rules of k15_loss_fn's aux values for StepSetup.aux_reductions: per-response means, weighted by count.
AUX_REDUCTIONS = (('kl', 'token_mean'), ('log_ratio', 'token_mean'), ('abs_log_ratio', 'token_mean'))


def k15_loss_fn(model, batch: dict[str, jax.Array], tau: float, loss_chunk: int | None = None):
  """The k1.5 loss in the shared training core's contract (k2.train.step.StepSetup.loss_fn): (loss_sum, count, aux).

  batch: token_logprobs' keys plus 'mask', 'old_logprobs' [P, K, T] and 'rewards' [P, K]; P leads every array.
  loss_sum: the sum of the per-response squared terms; count: the number of responses with at least one loss
  token (every real response has one: its closing token). The core divides the summed loss_sum by the summed count once, so the update is k15_loss's mean.
  Accumulation stays exact because the baseline only needs a prompt's own K responses: the core splits the batch
  into micro-batches along the leading axis (rows i, i + accum, ...), which is the prompt axis here, so each
  micro-batch holds whole groups. Batches are padded to a fixed P by whole groups with zero masks and zero rewards:
  their terms are (0 - 0 - 0)^2 = 0 and they are not counted.
  aux: the model's aux plus per-response means (reduce them by AUX_REDUCTIONS): 'kl' (kl_estimate),
  'log_ratio' and 'abs_log_ratio' (the sequence log-ratio; 0 at the first inner step of an iteration).
  Use it as StepSetup(loss_fn=functools.partial(k15_loss_fn, tau=..., loss_chunk=...), aux_reductions=AUX_REDUCTIONS).
  """
  logprobs, aux = token_logprobs(model, batch, loss_chunk)
  old = jax.lax.stop_gradient(batch['old_logprobs'])
  mask = batch['mask'].astype(jnp.float32)
  loss_sum = jnp.sum(_per_response(logprobs, old, mask, batch['rewards'], tau))
  counted = (jnp.sum(mask, axis=-1) > 0).astype(jnp.float32)
  count = jnp.sum(counted)
  log_ratio = jax.lax.stop_gradient(sequence_log_ratio(logprobs, old, mask))
  per_response = {'kl': kl_estimate(jax.lax.stop_gradient(logprobs), old, mask), 'log_ratio': log_ratio,
                  'abs_log_ratio': jnp.abs(log_ratio)}
  aux = {**aux, **{k: jnp.sum(v * counted) / jnp.maximum(count, 1.0) for k, v in per_response.items()}}
  return loss_sum, count, aux
