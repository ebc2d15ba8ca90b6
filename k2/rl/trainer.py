"""The RL stage on the shared training core: K2's policy optimization (K2 report 3.2; Kimi k1.5 2.3), synchronous.

One iteration (`iteration`):
  1. pick `prompts_per_iteration` prompts (`PromptSampler`: favours prompts the policy often fails, in an order that
     depends only on the seed, the iteration and the recorded pass counts, so a resumed run picks the same ones);
  2. sample `samples_per_prompt` responses to each with the CURRENT parameters (`k2.sample.engine.rollout` on the
     live model, no copy through disk), at this iteration's temperature (`temperature`: decays from exploration to
     exploitation), each within its prompt's token budget;
  3. score them (`reward_fn`; budget control: a response that hit its budget gets `truncation_penalty` and stays in
     the loss), optionally adding the policy's own pairwise rubric judgement (k2.rl.critic), and drop the groups
     whose rewards are all equal (they carry no gradient: POSTTRAINING.md, pitfalls);
  4. old log-probs of the sampled token ids (never re-encoded text) with the training forward at the start of the
     iteration, so the log-ratio is exactly 0 at the first inner step; their gap to the sampler's own log-probs is
     logged;
  5. `inner_steps` MuonClip steps (`k2.train.step.train_step`: QK-Clip and router balancing stay on) on the k1.5
     loss (`k2.rl.k15_loss`) plus `ptx_weight` times the next-token loss of a curated data stream (PTX), with the
     optimizer state reset at the iteration start (`reset_optimizer`, k1.5).

`train` runs iterations with the core's checkpoints and metrics: workdir/checkpoints/<iteration> holds the TrainState
and the prompt-order state (`RLDataState`: the sampler's pass counts and the PTX stream's position), so a run killed
mid-iteration resumes at that iteration's start, picks the same prompts and samples the same episodes (the rollout
seed is a function of the run seed and the iteration). Each iteration's episodes go to workdir/episodes/<i>.jsonl.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from k2 import model as model_lib
from k2 import rl, sharding
from k2.config import ConfigError, ModelConfig
from k2.sample import engine
from k2.train import checkpoint as checkpoint_lib
from k2.train import loop
from k2.train import metrics as metrics_lib
from k2.train import step as step_lib
from k2.train.step import StepSetup, TrainState, init_state, train_step

# A reward function reads a prompt and the sampled token ids of one response (its stop token included) and returns
# (value, reason); it never raises (a malformed answer scores 0 with a reason).
RewardFn = Callable[['Prompt', list[int]], tuple[float, str]]


@dataclasses.dataclass(frozen=True)
class Prompt:
  """One RL prompt. tokens: the rendered prompt (generation prompt included); max_new_tokens: its budget (budget
  control); task: what the reward function reads; question, rubric: the text the self-critique reads (k2.rl.critic)."""
  domain: str
  tokens: tuple[int, ...]
  max_new_tokens: int
  task: Any = None
  question: str = ''
  rubric: str = ''


@dataclasses.dataclass(frozen=True)
class RLConfig:
  """The knobs of an iteration. Numbers K2 does not publish (K, tau, budgets, penalty, PTX weight, temperatures)
  are ours (POSTTRAINING.md)."""
  prompts_per_iteration: int = 8
  samples_per_prompt: int = 8          # K
  inner_steps: int = 2                 # optimizer steps per iteration on the same episodes
  grad_accum_steps: int = 1            # an update's groups in this many micro-batches (memory), one optimizer step
  tau: float = 0.5                     # k1.5's trust region: one iteration moves log-ratios by about (r - rbar) / tau
  seq_len: int = 256                   # rows of the update: prompt + response, padded
  reset_optimizer: bool = True         # fresh optimizer state at each iteration start (k1.5)
  truncation_penalty: float = -0.5     # the reward of a response that hit its budget
  pass_threshold: float = 1.0          # a response passes (pass@k, the sampler's failure rate) at reward >= this
  temperature_start: float = 1.0
  temperature_end: float = 0.6         # K2's recommended inference temperature
  temperature_decay_iterations: int = 100
  ptx_weight: float = 0.0              # weight of the PTX next-token loss (0: no PTX rows)
  ptx_rows: int = 4                    # PTX rows of seq_len tokens per update
  critic_weight: float = 0.0           # weight of the self-critique win rate added to the reward (0: off)
  num_slots: int = 64                  # rollout decode slots (continuous batching)
  min_sampling_weight: float = 0.1     # every prompt keeps this much of a chance, however often it passes
  # Partial rollout (k1.5 2.6.1, K2 3.3): at most this many new tokens per response and iteration; a group with an
  # unfinished response is carried to the next iteration (and the checkpoint) and resumed there. 0: off.
  rollout_segment_tokens: int = 0

  def __post_init__(self):
    if self.prompts_per_iteration < 1 or self.samples_per_prompt < 2:
      raise ConfigError(f'RL needs prompts_per_iteration >= 1 and samples_per_prompt >= 2 (a group baseline), got '
                        f'{self.prompts_per_iteration} and {self.samples_per_prompt}')
    if self.grad_accum_steps < 1 or self.prompts_per_iteration % self.grad_accum_steps or (
        self.ptx_weight and self.ptx_rows % self.grad_accum_steps):
      raise ConfigError(f'grad_accum_steps={self.grad_accum_steps} must divide prompts_per_iteration='
                        f'{self.prompts_per_iteration} (and ptx_rows={self.ptx_rows} with PTX)')
    if self.inner_steps < 1 or self.tau <= 0:
      raise ConfigError(f'inner_steps must be >= 1 and tau > 0, got {self.inner_steps} and {self.tau}')
    if not 0 < self.temperature_end <= self.temperature_start:
      raise ConfigError(f'temperatures must satisfy 0 < end <= start, got start={self.temperature_start} '
                        f'end={self.temperature_end}')


def temperature(config: RLConfig, iteration: int) -> float:
  """The sampling temperature of `iteration` (1-based): cosine decay from temperature_start to temperature_end over
  temperature_decay_iterations, then constant (exploration early, exploitation late; K2 3.2.3)."""
  progress = min(1.0, (iteration - 1) / max(1, config.temperature_decay_iterations))
  return config.temperature_end + (config.temperature_start - config.temperature_end) * 0.5 * (
      1 + math.cos(math.pi * progress))


class PromptSampler:
  """Which prompts an iteration trains on. Weights are a prompt's estimated failure rate, 1 - (passes + 1) /
  (tries + 2), floored at `min_weight` (k1.5 2.3.4's prioritized sampling); iteration i draws without replacement
  from a generator seeded by (seed, i). The state (iteration, passes, tries) is all a resumed run needs."""

  def __init__(self, num_prompts: int, seed: int, min_weight: float = 0.1):
    self.seed, self.min_weight = seed, min_weight
    self.iteration = 0
    self.passes = np.zeros(num_prompts, np.int64)
    self.tries = np.zeros(num_prompts, np.int64)
    self.in_flight: list[dict] = []  # partial rollout: groups with unfinished responses (`sample_episodes`)

  def weights(self) -> np.ndarray:
    failure = 1.0 - (self.passes + 1) / (self.tries + 2)
    return np.maximum(failure, self.min_weight)

  def select(self, count: int) -> np.ndarray:
    """The new prompt ids of the next iteration ([count - groups in flight] int64; never one in flight), without
    advancing."""
    if count > len(self.passes):
      raise ConfigError(f'prompts_per_iteration={count} exceeds the {len(self.passes)} training prompts')
    weights = self.weights()
    weights[[g['prompt_id'] for g in self.in_flight]] = 0.0
    count -= len(self.in_flight)
    rng = np.random.default_rng([self.seed, self.iteration + 1])
    return rng.choice(len(weights), size=count, replace=False, p=weights / weights.sum())

  def record(self, prompt_ids: np.ndarray, passed: np.ndarray) -> None:
    """After an iteration: passed [count, K] bool of its responses; moves to the next iteration."""
    np.add.at(self.passes, prompt_ids, passed.sum(axis=1))
    np.add.at(self.tries, prompt_ids, passed.shape[1])
    self.iteration += 1

  def get_state(self) -> dict:
    return {'iteration': self.iteration, 'passes': self.passes.tolist(), 'tries': self.tries.tolist(),
            'in_flight': self.in_flight}

  def set_state(self, state: dict) -> None:
    if len(state['passes']) != len(self.passes):
      raise ConfigError(f'the checkpoint\'s prompt sampler has {len(state["passes"])} prompts, this run '
                        f'{len(self.passes)}; resume with the same prompts')
    self.iteration = int(state['iteration'])
    self.passes = np.asarray(state['passes'], np.int64)
    self.tries = np.asarray(state['tries'], np.int64)
    self.in_flight = state['in_flight']


class RLDataState:
  """The prompt order and the PTX stream's position, saved with each checkpoint (grain's checkpoint handler calls
  get_state/set_state with bytes)."""

  def __init__(self, sampler: PromptSampler, ptx_batches=None):
    self.sampler, self.ptx_batches = sampler, ptx_batches

  def get_state(self) -> bytes:
    ptx = None if self.ptx_batches is None else self.ptx_batches.get_state().decode()
    return json.dumps({'sampler': self.sampler.get_state(), 'ptx': ptx}).encode()

  def set_state(self, state: bytes) -> None:
    saved = json.loads(state.decode())
    self.sampler.set_state(saved['sampler'])
    if (saved['ptx'] is None) != (self.ptx_batches is None):
      raise ConfigError('the checkpoint and this run disagree on the PTX stream (ptx_weight); resume with the same '
                        'configuration')
    if self.ptx_batches is not None:
      self.ptx_batches.set_state(saved['ptx'].encode())

  def start_prefetch(self) -> None:
    if self.ptx_batches is not None:
      self.ptx_batches.start_prefetch()


# ----------------------------------------------------------------------------------------------------------------
# The update: the stage's loss_fn on sampled responses (k2.rl's k1.5 loss) plus the PTX next-token loss.

@functools.partial(jax.jit, static_argnums=0)
def old_logprobs(graphdef: nnx.GraphDef, params: nnx.State, buffers: nnx.State,
                 batch: dict[str, jax.Array]) -> jax.Array:
  """The training forward's log-probs of the sampled tokens at the iteration start, [P, K, T] (0 off the mask):
  `k2.rl.token_logprobs`, the function the loss calls, so the first inner step's log-ratio is 0."""
  logprobs, _ = rl.token_logprobs(nnx.merge(graphdef, params, buffers), batch)
  return logprobs * batch['mask']


def _combine_model_aux(a: dict, b: dict) -> dict:
  """The model's aux of two forwards as one (max logits by max, loads and drops by sum, the balance penalty by
  mean), by the training step's reduction rules."""
  rules = step_lib.AUX_REDUCTIONS
  return {k: jnp.maximum(a[k], b[k]) if rules[k] == 'max' else a[k] + b[k] if rules[k] == 'sum' else (a[k] + b[k]) / 2
          for k in a}


def rl_loss(model: model_lib.Transformer, batch: dict[str, jax.Array], *, tau: float, ptx_weight: float):
  """The stage's loss_fn (k2.train.step.StepSetup): (loss_sum, count, aux) with loss_sum / count = the k1.5 loss
  averaged over the kept groups' responses + ptx_weight * the PTX next-token loss (nats per token).

  batch: 'inputs', 'targets', 'positions', 'segment_ids' [P, K, T] int32 (prompt + sampled response), 'mask'
  [P, K, T] float32 (1 on the response targets of kept groups), 'old_logprobs' [P, K, T], 'rewards' [P, K]; with
  PTX also 'ptx_inputs', 'ptx_targets', 'ptx_positions', 'ptx_segment_ids', 'ptx_mask' [B, T]. A dropped group has
  an all-zero mask and equal rewards, so its k1.5 terms are exactly 0 and dividing by the kept responses averages
  over the kept groups. The PTX rows take a forward of their own (the responses' forward stays the one that gave
  the old log-probs); the model's aux (max logits for QK-Clip, expert loads for balancing) covers both. The k1.5
  part and its metrics (kl, log_ratio, abs_log_ratio: 0 at an iteration's first inner step) are rl.k15_loss_fn's.
  """
  loss_sum, count, aux = rl.k15_loss_fn(model, batch, tau=tau)
  stats = {'rl_loss': loss_sum / jnp.maximum(count, 1.0)}
  if ptx_weight:
    ptx = {key: batch[f'ptx_{key}'] for key in ('inputs', 'targets', 'positions', 'segment_ids', 'mask')}
    ptx_loss_sum, ptx_count, ptx_aux = step_lib.lm_loss(model, ptx)
    ptx_loss = ptx_loss_sum / jnp.maximum(ptx_count, 1.0)
    loss_sum = loss_sum + ptx_weight * ptx_loss * count
    aux = {**aux, **_combine_model_aux({k: aux[k] for k in ptx_aux}, ptx_aux)}
    stats['ptx_loss'] = ptx_loss
  return loss_sum, count, {**aux, **stats}


LOSS_REDUCTIONS = rl.AUX_REDUCTIONS + (('rl_loss', 'mean'), ('ptx_loss', 'mean'))


# ----------------------------------------------------------------------------------------------------------------
# Rollouts and their batch.

_ROW_KEYS = ('inputs', 'targets', 'positions', 'segment_ids')

def is_agentic(prompt: Prompt) -> bool:
  """A multi-turn tool-domain prompt (k2.rl.agentic.prompts: domain 'tool/<name>'), sampled as whole episodes."""
  return prompt.domain.startswith('tool/')


@dataclasses.dataclass
class Episodes:
  """One iteration's samples: prompt_ids [P]; per prompt a list of K responses (token ids, the sampler's log-probs,
  'stop' or 'length'); rewards [P, K] (after budget control and the critic) with their reasons.
  For an agentic group (k2.rl.agentic) a response is the whole trajectory after the prompt: masks[p] holds its loss
  mask (1 on sampled ids, 0 on the environment's) and outcomes[p] the environment's (reward, reason) per response;
  both are None for single-turn groups (every response token sampled, the reward from reward_fn)."""
  prompt_ids: np.ndarray
  tokens: list[list[list[int]]]
  sampler_logprobs: list[list[list[float]]]
  finish_reasons: list[list[str]]
  rewards: np.ndarray | None = None
  reasons: list[list[str]] | None = None
  masks: list[list[list[int]] | None] | None = None
  outcomes: list[list[tuple[float, str]] | None] | None = None


def sample_episodes(model: model_lib.Transformer, prompts: Sequence[Prompt], prompt_ids: np.ndarray,
                    config: RLConfig, temp: float, stop_tokens: Sequence[int], seed: int, mesh=None,
                    in_flight: Sequence[dict] = (), agentic=None) -> tuple[Episodes, list[dict]]:
  """K responses to each new prompt, and the unfinished responses of the groups `in_flight` continued from where
  they stopped, from `model` (the live parameters) by continuous batching. Returns (the complete groups, the groups
  still unfinished). A group is {'prompt_id', 'tokens', 'logprobs', 'finish'} with K lists each and finish None
  while a response is unfinished; without partial rollout (rollout_segment_tokens 0) every group completes.
  Agentic prompts (`is_agentic`) are played as whole episodes by `agentic` (a k2.rl.agentic.EpisodeSampler) and
  always complete within the iteration (partial rollout covers single-turn prompts)."""
  k = config.samples_per_prompt
  tool_ids = [int(i) for i in prompt_ids if is_agentic(prompts[i])]
  if tool_ids and agentic is None:
    raise ConfigError('agentic (tool-domain) prompts need an episode sampler (k2.rl.agentic.EpisodeSampler)')
  groups = [{key: (value if key == 'prompt_id' else [list(v) if isinstance(v, list) else v for v in value])
             for key, value in g.items()} for g in in_flight]
  groups += [{'prompt_id': int(i), 'tokens': [[] for _ in range(k)], 'logprobs': [[] for _ in range(k)],
              'finish': [None] * k} for i in prompt_ids if not is_agentic(prompts[i])]
  jobs = [(g, r) for g in groups for r in range(k) if g['finish'][r] is None]
  if jobs:
    _continue(model, prompts, jobs, config, temp, stop_tokens, seed, mesh)
  if tool_ids:
    for i, trajectories in zip(tool_ids, agentic(model, prompts, tool_ids, k, temp, seed, config.num_slots, mesh)):
      groups.append({'prompt_id': i, 'tokens': [t.tokens for t in trajectories],
                     'logprobs': [t.logprobs for t in trajectories], 'finish': [t.finish for t in trajectories],
                     'mask': [t.mask for t in trajectories],
                     'outcome': [(t.reward, t.reason) for t in trajectories]})
  complete = [g for g in groups if None not in g['finish']]
  episodes = Episodes(prompt_ids=np.asarray([g['prompt_id'] for g in complete], np.int64),
                      tokens=[g['tokens'] for g in complete], sampler_logprobs=[g['logprobs'] for g in complete],
                      finish_reasons=[g['finish'] for g in complete], masks=[g.get('mask') for g in complete],
                      outcomes=[g.get('outcome') for g in complete])
  return episodes, [g for g in groups if None in g['finish']]


def _continue(model: model_lib.Transformer, prompts: Sequence[Prompt], jobs: list[tuple[dict, int]],
              config: RLConfig, temp: float, stop_tokens: Sequence[int], seed: int, mesh) -> None:
  """Samples (a segment of) each job's response (group, index) in place, by continuous batching."""
  segment = config.rollout_segment_tokens
  remaining = [prompts[g['prompt_id']].max_new_tokens - len(g['tokens'][r]) for g, r in jobs]
  result = engine.rollout(model, [prompts[g['prompt_id']].tokens + tuple(g['tokens'][r]) for g, r in jobs],
                          [min(n, segment) if segment else n for n in remaining], num_slots=config.num_slots,
                          temperature=temp, stop_tokens=list(stop_tokens), seed=seed, mesh=mesh)
  for (g, r), n, tokens, logprobs, finish in zip(jobs, remaining, result.tokens, result.logprobs,
                                                 result.finish_reasons):
    g['tokens'][r] += tokens
    g['logprobs'][r] += logprobs
    g['finish'][r] = 'stop' if finish == 'stop' else 'length' if len(tokens) >= n else None


def score_episodes(episodes: Episodes, prompts: Sequence[Prompt], reward_fn: RewardFn, config: RLConfig) -> None:
  """Sets episodes.rewards [P, K] and reasons: reward_fn's value (an agentic episode's: the environment's), or
  truncation_penalty where the response hit its budget (budget control: it stays in the loss with that reward)."""
  rewards, reasons = [], []
  outcomes = episodes.outcomes or [None] * len(episodes.prompt_ids)
  for prompt_id, responses, finishes, outcome in zip(episodes.prompt_ids, episodes.tokens, episodes.finish_reasons,
                                                      outcomes):
    row, why = [], []
    for i, (response, finish) in enumerate(zip(responses, finishes)):
      if finish == 'length':
        row.append(config.truncation_penalty)
        why.append('truncated at the token budget')
      else:
        value, reason = outcome[i] if outcome is not None else reward_fn(prompts[prompt_id], response)
        row.append(float(value))
        why.append(reason)
    rewards.append(row)
    reasons.append(why)
  episodes.rewards, episodes.reasons = np.asarray(rewards, np.float32), reasons


def kept_groups(rewards: np.ndarray) -> np.ndarray:
  """[P] bool: groups whose rewards are not all equal (the others carry no gradient and are dropped)."""
  return np.ptp(rewards, axis=1) > 0


def episode_batch(episodes: Episodes, prompts: Sequence[Prompt], kept: np.ndarray, seq_len: int,
                  num_prompts: int | None = None) -> dict:
  """The update's [P, K, seq_len] rows: prompt + sampled response ids shifted into inputs/targets, the mask on the
  response targets of kept groups (of an agentic trajectory: on its sampled ids only), the sampler's log-probs on
  the same positions, rewards [P, K].
  num_prompts: P, padded with empty groups (mask 0, reward 0) past the episodes' groups (one compiled shape)."""
  num_groups, k = episodes.rewards.shape
  num_prompts = num_prompts or num_groups
  shape = (num_prompts, k, seq_len)
  batch = {key: np.zeros(shape, np.int32) for key in _ROW_KEYS}
  batch['mask'] = np.zeros(shape, np.float32)
  batch['sampler_logprobs'] = np.zeros(shape, np.float32)
  masks = episodes.masks or [None] * num_groups
  for p, prompt_id in enumerate(episodes.prompt_ids):
    prompt = list(prompts[prompt_id].tokens)
    for i, response in enumerate(episodes.tokens[p]):
      sequence = prompt + response
      n = len(sequence) - 1
      if n > seq_len:
        raise ConfigError(f'prompt ({len(prompt)} tokens) + response ({len(response)}) exceed seq_len={seq_len}+1; '
                          'raise seq_len or lower the budgets')
      batch['inputs'][p, i, :n] = sequence[:-1]
      batch['targets'][p, i, :n] = sequence[1:]
      batch['positions'][p, i, :n] = np.arange(n)
      batch['segment_ids'][p, i, :n] = 1
      response_targets = slice(len(prompt) - 1, n)  # target j is token j + 1: the response starts at len(prompt)
      on_response = 1.0 if masks[p] is None else np.asarray(masks[p][i], np.float32)
      batch['mask'][p, i, response_targets] = float(kept[p]) * on_response
      batch['sampler_logprobs'][p, i, response_targets] = episodes.sampler_logprobs[p][i]
  batch['rewards'] = np.zeros((num_prompts, k), np.float32)
  batch['rewards'][:num_groups] = episodes.rewards
  return batch


def episode_metrics(episodes: Episodes, prompts: Sequence[Prompt], config: RLConfig) -> dict[str, float]:
  """Reward per domain, pass@1 / pass@K, response length (mean, p95), truncation rate."""
  lengths = np.asarray([len(r) for group in episodes.tokens for r in group])
  passed = episodes.rewards >= config.pass_threshold
  metrics = {'reward': float(episodes.rewards.mean()), 'pass@1': float(passed.mean()),
             f'pass@{config.samples_per_prompt}': float(passed.any(axis=1).mean()),
             'response_length_mean': float(lengths.mean()), 'response_length_p95': float(np.percentile(lengths, 95)),
             'truncation_rate': float(np.mean([f == 'length' for g in episodes.finish_reasons for f in g]))}
  domains = np.asarray([prompts[i].domain for i in episodes.prompt_ids])
  for domain in sorted(set(domains)):
    metrics[f'reward/{domain}'] = float(episodes.rewards[domains == domain].mean())
    metrics[f'pass@1/{domain}'] = float(passed[domains == domain].mean())
  return metrics


def sampled_tokens(episodes: Episodes) -> int:
  """Tokens the policy generated (an agentic trajectory's environment tokens not counted)."""
  masks = episodes.masks or [None] * len(episodes.tokens)
  return sum(len(r) if mask is None else sum(mask[i]) for group, mask in zip(episodes.tokens, masks)
             for i, r in enumerate(group))


# ----------------------------------------------------------------------------------------------------------------
# One iteration, and the run.

@dataclasses.dataclass(frozen=True)
class Context:
  """What stays fixed over a run: the prompts, the reward, the step's setup, the mesh, the stop tokens, the seed,
  and the optional critic (k2.rl.critic.Critic), PTX batches and agentic episode sampler (k2.rl.agentic)."""
  prompts: Sequence[Prompt]
  reward_fn: RewardFn
  setup: StepSetup
  config: RLConfig
  stop_tokens: tuple[int, ...]
  mesh: Any
  seed: int = 0
  critic: Any = None
  ptx_batches: Iterator | None = None
  agentic: Any = None


def live_model(state: TrainState, setup: StepSetup) -> model_lib.Transformer:
  """The policy with the state's current parameters (the same arrays the optimizer just wrote)."""
  return nnx.merge(setup.graphdef, state.params, state.buffers)


def iteration(state: TrainState, sampler: PromptSampler, context: Context) -> tuple[TrainState, dict, Episodes]:
  """One RL iteration (see the module docstring); returns (state, metrics, episodes) and advances the sampler."""
  config, setup = context.config, context.setup
  number = sampler.iteration + 1
  temp = temperature(config, number)
  prompt_ids = sampler.select(config.prompts_per_iteration)
  start = time.time()
  resumed = len(sampler.in_flight)
  episodes, sampler.in_flight = sample_episodes(
      live_model(state, setup), context.prompts, prompt_ids, config, temp, context.stop_tokens,
      seed=(context.seed * 1_000_003 + number) % 2 ** 31, mesh=context.mesh, in_flight=sampler.in_flight,
      agentic=context.agentic)
  rollout_seconds = time.time() - start
  partial = {'groups_resumed': resumed, 'groups_in_flight': len(sampler.in_flight)}
  if not len(episodes.prompt_ids):  # every group is still being generated (partial rollout)
    sampler.record(episodes.prompt_ids, np.zeros((0, config.samples_per_prompt), bool))
    return state, {**partial, 'temperature': temp, 'skipped_update': 1.0}, episodes
  score_episodes(episodes, context.prompts, context.reward_fn, config)
  metrics = episode_metrics(episodes, context.prompts, config)  # of the verifiable reward, before the critic
  passed = episodes.rewards >= config.pass_threshold
  if context.critic is not None:
    win_rates, agreement = context.critic.judge(live_model(state, setup), episodes, context.prompts)
    metrics['critic_win_rate_spread'] = float(np.mean(np.ptp(win_rates, axis=1)))
    if agreement is not None:
      metrics['critic_agreement'] = agreement
    episodes.rewards = episodes.rewards + config.critic_weight * win_rates.astype(np.float32)
  kept = kept_groups(episodes.rewards)
  batch = episode_batch(episodes, context.prompts, kept, config.seq_len, config.prompts_per_iteration)
  sampler_logprobs = batch.pop('sampler_logprobs')
  generated = sampled_tokens(episodes)
  metrics.update({**partial, 'temperature': temp, 'degenerate_group_fraction': float(1 - kept.mean()),
                  'rollout_seconds': rollout_seconds, 'rollout_tokens_per_second': generated / rollout_seconds})

  start = time.time()
  with sharding.use_mesh(context.mesh):
    device_batch = loop.global_batch(batch, context.mesh)
    old = old_logprobs(setup.graphdef, state.params, state.buffers, device_batch)
    old_host = np.asarray(jax.device_get(old))
    on_response = batch['mask'] > 0
    if on_response.any():  # sampler (decode path) vs trainer (training forward) on the same tokens
      gap = old_host[on_response] - sampler_logprobs[on_response]
      metrics.update({'logprob_gap_mean': float(gap.mean()), 'logprob_gap_abs_max': float(np.abs(gap).max())})
    metrics['old_logprob_seconds'] = time.time() - start
    sampler.record(episodes.prompt_ids, passed)
    if not kept.any():  # nothing to learn from: a step on pure noise would move the policy (POSTTRAINING.md)
      metrics['skipped_update'] = 1.0
      return state, metrics, episodes
    device_batch['old_logprobs'] = old
    if config.ptx_weight:
      ptx = next(context.ptx_batches)
      device_batch.update(loop.global_batch({f'ptx_{key}': ptx[key] for key in (*_ROW_KEYS, 'mask')},
                                            context.mesh))
    if config.reset_optimizer:
      state = state.replace(opt_state=setup.optimizer.init(state.params))
    start = time.time()
    step_metrics = []
    for _ in range(config.inner_steps):
      state, step_record = train_step(state, device_batch, setup)
      step_metrics.append(step_record)
    step_metrics = jax.device_get(step_metrics)
  update_seconds = time.time() - start
  first, last = step_metrics[0], step_metrics[-1]
  train_tokens = config.inner_steps * (float(batch['mask'].sum()) + (
      config.ptx_rows * config.seq_len if config.ptx_weight else 0))
  metrics.update({
      'skipped_update': 0.0, 'loss_first_step': float(first['loss']), 'loss': float(last['loss']),
      'log_ratio_first_step': float(first['abs_log_ratio']), 'log_ratio_last_step':
      float(last['abs_log_ratio']), 'kl': float(last['kl']), 'learning_rate': float(last['learning_rate']),
      'grad_norm': float(last['grad_norm']), 'max_logit': max(float(m['max_logit']) for m in step_metrics),
      'clipped_heads': sum(float(m['clipped_heads']) for m in step_metrics),
      'expert_load_max_over_mean': float(last['expert_load_max_over_mean']),
      'update_seconds': update_seconds, 'train_tokens_per_second': train_tokens / update_seconds})
  if config.ptx_weight:
    metrics['ptx_loss'] = float(first['ptx_loss'])
  return state, metrics, episodes


def greedy_passes(model: model_lib.Transformer, prompts: Sequence[Prompt], reward_fn: RewardFn, *,
                  stop_tokens: Sequence[int], pass_threshold: float = 1.0, num_slots: int = 64,
                  mesh=None) -> list[bool]:
  """Per single-turn prompt: whether the greedy response stops within its budget and scores >= pass_threshold."""
  greedy = engine.rollout(model, [p.tokens for p in prompts], [p.max_new_tokens for p in prompts],
                          num_slots=num_slots, temperature=0.0, stop_tokens=list(stop_tokens), mesh=mesh)
  return [finish == 'stop' and reward_fn(p, tokens)[0] >= pass_threshold
          for p, tokens, finish in zip(prompts, greedy.tokens, greedy.finish_reasons)]


def greedy_episode_passes(model: model_lib.Transformer, prompts: Sequence[Prompt], prompt_ids: Sequence[int], agentic,
                          *, pass_threshold: float = 1.0, seed: int = 0, num_slots: int = 64, mesh=None) -> list[bool]:
  """Per agentic prompt of `prompt_ids`: whether its greedy episode (played by `agentic`) ends within its budget
  with reward >= pass_threshold."""
  return [group[0].finish == 'stop' and group[0].reward >= pass_threshold
          for group in agentic(model, prompts, prompt_ids, 1, 0.0, seed, num_slots, mesh)]


def evaluate(model: model_lib.Transformer, prompts: Sequence[Prompt], reward_fn: RewardFn, *, samples: int,
             temperature: float, stop_tokens: Sequence[int], pass_threshold: float = 1.0, seed: int = 0,
             num_slots: int = 64, mesh=None, agentic=None) -> dict[str, float]:
  """Held-out quality of `model`: sampled pass@1 (mean over `samples` responses per prompt at `temperature`; also
  per domain), greedy accuracy, mean reward, truncation rate and response length of the sampled responses. Budgets
  as in training; agentic prompts are played as episodes by `agentic` (k2.rl.agentic.EpisodeSampler)."""
  config = RLConfig(samples_per_prompt=samples, num_slots=num_slots, pass_threshold=pass_threshold)
  ids = np.arange(len(prompts))
  sampled, _ = sample_episodes(model, prompts, ids, config, temperature, stop_tokens, seed, mesh, agentic=agentic)
  score_episodes(sampled, prompts, reward_fn, config)
  single = [i for i in ids if not is_agentic(prompts[i])]
  tool = [int(i) for i in ids if is_agentic(prompts[i])]
  greedy_pass = greedy_passes(model, [prompts[i] for i in single], reward_fn, stop_tokens=stop_tokens,
                              pass_threshold=pass_threshold, num_slots=num_slots, mesh=mesh) if single else []
  if tool:
    greedy_pass += greedy_episode_passes(model, prompts, tool, agentic, pass_threshold=pass_threshold, seed=seed,
                                         num_slots=num_slots, mesh=mesh)
  metrics = episode_metrics(sampled, prompts, config)
  return {'pass@1': metrics['pass@1'], 'greedy_accuracy': float(np.mean(greedy_pass)), 'reward': metrics['reward'],
          'truncation_rate': metrics['truncation_rate'], 'response_length_mean': metrics['response_length_mean'],
          **{k: v for k, v in metrics.items() if k.startswith('pass@1/')}}


def write_episodes(path: str, episodes: Episodes, prompts: Sequence[Prompt]) -> None:
  """One JSON line per response: prompt id, domain, token ids, finish reason, reward, reason."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + '.tmp', 'w') as f:
    for p, prompt_id in enumerate(episodes.prompt_ids):
      for i, response in enumerate(episodes.tokens[p]):
        f.write(json.dumps({'prompt_id': int(prompt_id), 'domain': prompts[prompt_id].domain, 'tokens': response,
                            'finish_reason': episodes.finish_reasons[p][i],
                            'reward': float(episodes.rewards[p][i]), 'reason': episodes.reasons[p][i]}) + '\n')
  os.replace(path + '.tmp', path)


@dataclasses.dataclass(frozen=True)
class _RLLoss:
  """rl_loss with its knobs bound; equal by value, so StepSetups of the same run compare equal (one compilation)."""
  tau: float
  ptx_weight: float

  def __call__(self, model, batch):
    return rl_loss(model, batch, tau=self.tau, ptx_weight=self.ptx_weight)


@dataclasses.dataclass(frozen=True)
class _ConstantRate:
  """The learning rate, constant: the optimizer is reset every iteration, so a schedule inside it would restart."""
  learning_rate: float

  def __call__(self, step):
    del step
    return jnp.asarray(self.learning_rate, jnp.float32)


def make_setup(graphdef: nnx.GraphDef, model_config: ModelConfig, config: RLConfig, learning_rate: float,
               optimizer: optax.GradientTransformation, *, qk_clip_tau: float | None = 100.0,
               bias_update_rate: float = 1e-3) -> StepSetup:
  """The StepSetup of the RL update: the RL loss, a constant learning rate, MuonClip's post-update (QK-Clip, router
  balancing) exactly as pretraining. `optimizer` is built on the same constant rate (recipe.optimizer(rate))."""
  return StepSetup(graphdef=graphdef, model_config=model_config, optimizer=optimizer,
                   schedule=_ConstantRate(learning_rate), qk_clip_tau=qk_clip_tau, bias_update_rate=bias_update_rate,
                   grad_accum_steps=config.grad_accum_steps, loss_fn=_RLLoss(config.tau, config.ptx_weight),
                   aux_reductions=LOSS_REDUCTIONS)


def train(workdir: str, *, model_config: ModelConfig, config: RLConfig, prompts: Sequence[Prompt],
          reward_fn: RewardFn, stop_tokens: Sequence[int], num_iterations: int, learning_rate: float,
          optimizer: optax.GradientTransformation, mesh, seed: int = 0, init_from: str | None = None,
          critic=None, ptx_batches=None, agentic=None, checkpoint_every: int = 10, keep_checkpoints: int = 3,
          evaluate: Callable[[model_lib.Transformer], dict] | None = None, eval_every: int = 0,
          qk_clip_tau: float | None = 100.0, bias_update_rate: float = 1e-3,
          on_iteration: Callable[[int, dict], None] | None = None) -> tuple[model_lib.Transformer, dict, bool]:
  """Runs (or resumes) RL to `num_iterations`; returns (the trained model, the last metrics, preempted). SIGTERM
  (preemption) ends the run after the iteration in flight, saved, and returns preempted True. The model starts
  from `init_from` (an SFT or pretraining workdir, a model export, an HF directory) unless the workdir has its own
  checkpoint. agentic: the episode sampler of tool-domain prompts (k2.rl.agentic.EpisodeSampler).
  evaluate(model) -> metrics runs every eval_every iterations (0: never) and at the end, on the live model.
  on_iteration(iteration, metrics) is called after each iteration's metrics are written."""
  if config.ptx_weight and ptx_batches is None:
    raise ConfigError('ptx_weight > 0 needs a PTX data stream (ptx_batches)')
  if config.critic_weight and critic is None:
    raise ConfigError('critic_weight > 0 needs a critic (k2.rl.critic.Critic)')
  longest = max(len(p.tokens) + p.max_new_tokens for p in prompts)
  if longest > config.seq_len + 1:
    raise ConfigError(f'a prompt and its budget take {longest} tokens; seq_len={config.seq_len} holds '
                      f'{config.seq_len + 1}')
  resuming = loop.checkpoint_to_resume(workdir, model_config)
  model = loop.initial_model(model_config, seed, None if resuming else init_from)
  sampler = PromptSampler(len(prompts), seed, config.min_sampling_weight)
  data_state = RLDataState(sampler, ptx_batches if config.ptx_weight else None)
  lead = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  checkpointer = checkpoint_lib.Checkpointer(os.path.join(workdir, 'checkpoints'), every=checkpoint_every,
                                             keep=keep_checkpoints)
  with sharding.use_mesh(mesh):
    sharding.shard_model(model, mesh)
    graphdef, state = init_state(model, optimizer)
    del model
    setup = make_setup(graphdef, model_config, config, learning_rate, optimizer, qk_clip_tau=qk_clip_tau,
                       bias_update_rate=bias_update_rate)
    state, start = loop.restore_latest(checkpointer, state, data_state, workdir, model_config)
  if start:
    print(f'resumed from {workdir}/checkpoints/{start} (prompt sampler at iteration {sampler.iteration})', flush=True)
  context = Context(prompts=prompts, reward_fn=reward_fn, setup=setup, config=config, stop_tokens=tuple(stop_tokens),
                    mesh=mesh, seed=seed, critic=critic, ptx_batches=ptx_batches, agentic=agentic)
  writer = metrics_lib.MetricWriter(workdir, resume_step=start) if lead else metrics_lib.NullWriter()
  record: dict[str, float] = {}
  preemption, preempted = loop.Preemption(), False
  try:
    if evaluate is not None and start == 0:  # the starting point, as iteration 0
      record = {f'eval_{k}': v for k, v in evaluate(live_model(state, setup)).items()}
      writer.write(0, record)
      if lead:
        print(progress_line(0, num_iterations, record), flush=True)
    for number in range(start + 1, num_iterations + 1):
      began = time.time()
      state, record, episodes = iteration(state, sampler, context)
      record['iteration_seconds'] = time.time() - began
      if evaluate is not None and ((eval_every and number % eval_every == 0) or number == num_iterations):
        record.update({f'eval_{k}': v for k, v in evaluate(live_model(state, setup)).items()})
      if lead:
        write_episodes(os.path.join(workdir, 'episodes', f'{number}.jsonl'), episodes, prompts)
        writer.write(number, record)
        print(progress_line(number, num_iterations, record), flush=True)
      if on_iteration is not None:
        on_iteration(number, record)
      if loop.save_or_stop(checkpointer, number, state, data_state, model_config, preemption,
                           last=number == num_iterations, unit='iteration'):
        preempted = True
        break
    checkpointer.wait()
  finally:
    preemption.restore()
    writer.close()
    checkpointer.close()
  return live_model(state, setup), record, preempted


_PROGRESS = (('reward', 'reward {:+.3f}'), ('pass@1', 'pass@1 {:.3f}'), ('truncation_rate', 'trunc {:.3f}'),
             ('degenerate_group_fraction', 'degenerate {:.2f}'), ('kl', 'kl {:.4f}'), ('temperature', 'T {:.2f}'),
             ('response_length_mean', 'len {:.0f}'), ('iteration_seconds', '{:.1f}s'))


def progress_line(number: int, total: int, record: dict) -> str:
  parts = [f'iteration {number:4d}/{total}'] + [fmt.format(record[key]) for key, fmt in _PROGRESS if key in record]
  return '  '.join(parts + [f'{k} {v:.3f}' for k, v in record.items() if k.startswith('eval_')])
