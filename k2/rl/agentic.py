"""Multi-turn agentic RL episodes in the k2.gym tool domains: the policy talks to the simulated user and calls the
domain's tools over several turns; the episode's verifiable reward (k2.gym.env: the final database and the facts
told) scores the whole trajectory.

    prompts = agentic.prompts(['calculator', 'retail'], 64, seed=0, split='train', tokenizer=tok, max_tokens=1024)
    sampler = agentic.EpisodeSampler(tok, turn_tokens=128)   # k2.rl.trainer.train(..., agentic=sampler)

One trajectory is ONE token row: the rendered prompt (policy, tool declarations, the user's first request), then
for every turn the ids the sampler produced (loss mask 1, with their sampler log-probs) followed by the environment's
answer (tool results, the user's reply) and the next generation prompt (mask 0). The environment's part is cut from
a fresh render of the conversation at the point where the agent's last message ends (K2's template renders a
conversation's first messages as a token prefix of the whole, tests/test_chat.py), so what was sampled is never
re-encoded and the row the update trains on is exactly the context each turn was sampled in.
A turn that hits `turn_tokens` without closing its message, or an episode whose row would pass the prompt's
`max_new_tokens`, ends the episode as truncated (budget control: the truncation penalty, kept in the loss).
Episodes of every prompt and sample are stepped together (k2.gym.run_episodes), one batched sample per turn.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from k2 import chat, gym
from k2.rl.trainer import Prompt
from k2.synth.backends import ContextOverflow, ModelBackend


@dataclasses.dataclass(frozen=True)
class ToolTask:
  """What an agentic Prompt's `task` holds: the gym domain, the task, and the simulated user's seed."""
  domain: str
  task: gym.Task
  user_seed: int


def prompts(domain_names: Sequence[str], count: int, seed: int, split: str, tokenizer: chat.Tokenizer,
            max_tokens: int) -> list[Prompt]:
  """`count` tasks of each domain from `split` (k2.gym: 'train' and 'heldout' share no entity), each a Prompt of
  domain 'tool/<name>' whose tokens are the episode's opening (system policy + first user request, tools declared,
  generation prompt) and whose max_new_tokens bounds the rest of the trajectory (sampled and environment tokens)."""
  out = []
  for name in domain_names:
    domain = gym.domains.get(name)
    for i, task in enumerate(domain.sample_tasks(count, seed, split)):
      opening = gym.ToolEnv(domain).reset(task, seed=seed + i)
      tokens = chat.render(opening, tokenizer, tools=domain.tool_specs(), add_generation_prompt=True).tokens
      out.append(Prompt(domain=f'tool/{name}', tokens=tuple(tokens), max_new_tokens=max_tokens,
                        task=ToolTask(name, task, seed + i), question=opening[-1].content))
  return out


@dataclasses.dataclass
class Trajectory:
  """One episode after its prompt: tokens, the loss mask (1 on sampled ids), the sampler's log-probs (0 elsewhere),
  'stop' (the episode ended) or 'length' (truncated), and the environment's reward with a reason."""
  tokens: list[int]
  mask: list[int]
  logprobs: list[float]
  finish: str = 'stop'
  reward: float = 0.0
  reason: str = ''


class _Truncated(Exception):
  """A turn or the episode ran out of tokens (ends the episode; scored by budget control)."""


def _reason(info: dict) -> str:
  """Why an episode scored what it did, from its info (the first failed check)."""
  if info.get('agent_error'):
    return f'ended: {info["agent_error"]}'
  if info['success']:
    return 'success'
  if info['malformed_outputs'] or info['unknown_tools'] or info['invalid_arguments']:
    return (f'invalid tool calls ({info["malformed_outputs"]} unparsable, {info["unknown_tools"]} unknown tools, '
            f'{info["invalid_arguments"]} invalid arguments)')
  if not info['state_match']:
    return 'the final database differs from the gold one'
  return 'the user was not told what they asked, or the turn limit was reached'


@dataclasses.dataclass(frozen=True)
class EpisodeSampler:
  """Samples agentic episodes for k2.rl.trainer (its `agentic` argument). turn_tokens: the budget of one assistant
  turn; max_user_turns / max_assistant_turns: the environment's caps."""
  tokenizer: chat.Tokenizer
  turn_tokens: int = 256
  max_user_turns: int = 8
  max_assistant_turns: int = 12

  def __call__(self, model, prompts: Sequence[Prompt], prompt_ids: Sequence[int], samples: int, temperature: float,
               seed: int, num_slots: int = 64, mesh=None) -> list[list[Trajectory]]:
    """`samples` episodes of each prompt (same task and user seed; the sampler's randomness differs), stepped
    together; [len(prompt_ids)][samples] Trajectories."""
    jobs = [prompts[int(i)] for i in prompt_ids for _ in range(samples)]
    for prompt in jobs:
      if not isinstance(prompt.task, ToolTask):
        raise ValueError(f'prompt of domain {prompt.domain!r} is not an agentic one (k2.rl.agentic.prompts)')
    backend = ModelBackend(model, self.tokenizer, temperature=temperature, num_slots=num_slots,
                           max_positions=max(len(p.tokens) + p.max_new_tokens for p in jobs) + 1, mesh=mesh)
    envs = [gym.ToolEnv(gym.domains.get(p.task.domain), max_user_turns=self.max_user_turns,
                        max_assistant_turns=self.max_assistant_turns) for p in jobs]
    rows = [list(p.tokens) for p in jobs]
    trajectories = [Trajectory([], [], []) for _ in jobs]
    seen = [0] * len(jobs)  # messages of the history already in the row (through the agent's last message)
    turn = [0]

    def respond(indices: list[int], histories: list[list[chat.Message]]) -> list:
      turn[0] += 1
      asked, budgets, out = [], [], {}
      for i, history in zip(indices, histories):
        tools = envs[i].tool_specs
        if seen[i]:  # the environment's answer and the next generation prompt, cut from a fresh render
          full = chat.render(history, self.tokenizer, tools=tools, add_generation_prompt=True).tokens
          before = len(chat.render(history[:seen[i]], self.tokenizer, tools=tools).tokens)
          if len(trajectories[i].tokens) + len(full) - before >= jobs[i].max_new_tokens:
            trajectories[i].finish = 'length'
            out[i] = _Truncated(f'the episode passed its {jobs[i].max_new_tokens} tokens')
            continue
          self._append(i, rows, trajectories, full[before:], None)
        left = jobs[i].max_new_tokens - len(trajectories[i].tokens)
        asked.append(i)
        budgets.append(min(self.turn_tokens, left))
      completions = backend.complete_tokens([rows[i] for i in asked], budgets, seed=seed * 7919 + turn[0])
      history_of = dict(zip(indices, histories))
      for i, completion in zip(asked, completions):
        if isinstance(completion, ContextOverflow):  # cannot happen: max_positions covers every budget
          out[i] = completion
          continue
        self._append(i, rows, trajectories, completion.tokens, completion.logprobs)
        seen[i] = len(history_of[i]) + 1  # the agent's message is appended by the environment's step
        if completion.finish_reason == 'length':
          trajectories[i].finish = 'length'
          out[i] = _Truncated(f'a turn passed its {self.turn_tokens} tokens')
        else:
          out[i] = completion.text
      return [out[i] for i in indices]

    episodes = gym.run_episodes(envs, [p.task.task for p in jobs], [p.task.user_seed for p in jobs], respond)
    for trajectory, episode in zip(trajectories, episodes):
      trajectory.reward, trajectory.reason = float(episode.reward), _reason(episode.info)
    return [trajectories[g * samples:(g + 1) * samples] for g in range(len(prompt_ids))]

  @staticmethod
  def _append(i: int, rows: list[list[int]], trajectories: list[Trajectory], tokens: Sequence[int],
              logprobs: Sequence[float] | None) -> None:
    """Adds tokens to episode i's row: sampled (mask 1, their log-probs) when logprobs are given, else the
    environment's (mask 0)."""
    trajectory = trajectories[i]
    rows[i] += tokens
    trajectory.tokens += tokens
    trajectory.mask += [1 if logprobs is not None else 0] * len(tokens)
    trajectory.logprobs += list(logprobs) if logprobs is not None else [0.0] * len(tokens)
