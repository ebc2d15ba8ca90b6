"""Agent evaluation on the gym domains: every held-out task played `trials` times, scored per domain.

    report = evaluate(domains, responder_for, tasks_per_domain=20, trials=4, seed=0)
    report['bank']['pass^1'], report['bank']['tool_call_validity']

Per domain (tau-bench's definitions where it has them):
  pass^k              mean over tasks of C(c, k) / C(n, k): the chance that k trials drawn from the task's n all
                      succeed (c successes); pass^1 is the success rate. Reported for k = 1 .. trials.
  tool_call_validity  of the tool calls the agent tried, the share that parsed, named a declared tool and had
                      arguments that fit its JSON schema; an assistant turn whose call section could not be parsed
                      counts as one invalid try. None when the agent tried no call. The invalid tries by kind:
                      malformed_outputs (unparsable call sections), unknown_tools, invalid_arguments.
  argument_match      of the tasks' gold tool calls, the share the agent made with exactly the gold arguments.
  turns               assistant messages per episode (tool-call turns included), mean.
  context_overflows   episodes ended because the conversation outgrew the model (part of the failures).
Held-out tasks come from the 'heldout' split: entities, numbers and phrasings disjoint from 'train'
(k2.gym.env.split_pool); the bank domain is never synthesized for SFT by default.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from k2.gym import domains as domains_lib
from k2.gym.env import Episode, Task, ToolEnv
from k2.gym.episodes import Responder, run_episodes


def pass_hat_k(successes: Sequence[int], trials: int, k: int) -> float:
  """tau-bench's pass^k: mean over tasks of C(c, k) / C(trials, k), with c each task's number of successes."""
  if not 1 <= k <= trials:
    raise ValueError(f'k must lie in [1, {trials}], got {k}')
  return sum(math.comb(c, k) for c in successes) / (len(successes) * math.comb(trials, k))


def score(tasks: Sequence[Task], episodes: Sequence[Sequence[Episode]]) -> dict[str, Any]:
  """Metrics of one domain; episodes[t] are task t's trials (all the same number)."""
  trials = len(episodes[0])
  flat = [e for row in episodes for e in row]
  tried = sum(e.info['tool_calls'] + e.info['malformed_outputs'] for e in flat)
  valid = sum(e.info['tool_calls'] - e.info['unknown_tools'] - e.info['invalid_arguments'] for e in flat)
  gold = sum(len(task.gold_actions) for task in tasks) * trials
  matched = sum(e.info['gold_calls_matched'] for e in flat)
  successes = [sum(e.reward == 1.0 for e in row) for row in episodes]
  report = {f'pass^{k}': pass_hat_k(successes, trials, k) for k in range(1, trials + 1)}
  return report | {
      'tasks': len(tasks), 'trials': trials, 'tool_calls_tried': tried,
      'tool_call_validity': valid / tried if tried else None,
      **{kind: sum(e.info[kind] for e in flat) for kind in ('malformed_outputs', 'unknown_tools', 'invalid_arguments')},
      'argument_match': matched / gold if gold else None,
      'turns': sum(e.info['assistant_turns'] for e in flat) / len(flat),
      'context_overflows': sum('ContextOverflow' in e.info.get('agent_error', '') for e in flat),
      'backend_errors': sum(bool(e.info.get('agent_error')) for e in flat)}


def evaluate(domain_names: Sequence[str], responder_for: Callable[[list[ToolEnv], list[Task], list[int]], Responder],
             tasks_per_domain: int = 20, trials: int = 4, seed: int = 0, split: str = 'heldout',
             max_user_turns: int = 8, max_assistant_turns: int = 16,
             on_turn: Callable[[int, int], None] | None = None,
             on_episode: Callable[[str, Task, int, Episode], None] | None = None) -> dict[str, dict[str, Any]]:
  """Plays `tasks_per_domain` tasks of each domain `trials` times (the simulated user seeded per trial) and returns
  {domain: score(...)}. `responder_for(envs, tasks, seeds)` gives the agent for those episodes (a Responder,
  k2.gym.episodes); every episode of every domain is stepped together, so a model samples them in one batch.
  on_turn(turn, live episodes): progress; on_episode(domain, task, trial, episode): every finished episode."""
  tasks = {name: domains_lib.get(name).sample_tasks(tasks_per_domain, seed, split) for name in domain_names}
  plan = [(name, t, trial) for name in domain_names for t in range(tasks_per_domain) for trial in range(trials)]
  envs = [ToolEnv(domains_lib.get(name), max_user_turns=max_user_turns, max_assistant_turns=max_assistant_turns)
          for name, _, _ in plan]
  episode_tasks = [tasks[name][t] for name, t, _ in plan]
  seeds = [seed * 1000 + trial for _, _, trial in plan]
  episodes = run_episodes(envs, episode_tasks, seeds, responder_for(envs, episode_tasks, seeds), on_turn)
  by_domain: dict[str, list[list[Episode]]] = {name: [[] for _ in range(tasks_per_domain)] for name in domain_names}
  for (name, t, trial), episode in zip(plan, episodes):
    by_domain[name][t].append(episode)
    if on_episode:
      on_episode(name, tasks[name][t], trial, episode)
  return {name: score(tasks[name], by_domain[name]) for name in domain_names}


def table(report: Mapping[str, Mapping[str, Any]], unseen: Sequence[str] = ()) -> str:
  """The report as a Markdown table (one row per domain; `unseen` domains marked)."""
  trials = next(iter(report.values()))['trials']
  ks = sorted({1, trials})
  fmt = lambda v: '-' if v is None else f'{v:.2f}' if isinstance(v, float) else str(v)  # noqa: E731
  head = ['domain', *[f'pass^{k}' for k in ks], 'tool-call validity', 'invalid: unparsable / unknown tool / bad args',
          'argument match', 'turns', 'tasks x trials']
  rows = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for name, r in report.items():
    label = f'{name} (unseen in SFT)' if name in unseen else name
    rows.append('| ' + ' | '.join([label, *[fmt(r[f'pass^{k}']) for k in ks], fmt(r['tool_call_validity']),
                                   f'{r["malformed_outputs"]} / {r["unknown_tools"]} / {r["invalid_arguments"]}',
                                   fmt(r['argument_match']), fmt(r['turns']), f'{r["tasks"]} x {r["trials"]}'])
                + ' |')
  return '\n'.join(rows)
