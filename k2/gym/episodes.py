"""Many episodes stepped together, so a model backend samples every live episode's next turn in one batch.

    episodes = run_episodes(envs, tasks, seeds, respond)

`respond(indices, histories)` gets the indices of the episodes still running and their histories and returns one
output per episode: an assistant Message, the model's raw text, or an Exception (that episode ends scored as it
stands, with the error in info['agent_error'], as k2.gym.run_episode does for an agent that raises; the others go
on). `agents_responder(agents)` adapts per-episode agents (the scripted expert, an HTTP client), which run one
after another. k2.synth.backends.ModelBackend.complete_batch is the batched responder of our own model
(`model_responder`). Evaluation (experiments/eval_agent.py) and RL rollouts step episodes this way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from k2.chat import Message
from k2.gym.env import Agent, Episode, Task, ToolEnv

Responder = Callable[[list[int], list[list[Message]]], list[Any]]


def agents_responder(agents: Sequence[Agent]) -> Responder:
  """A Responder calling `agents[i](history)` for each live episode i; an agent's exception ends only its episode."""
  def respond(indices: list[int], histories: list[list[Message]]) -> list[Any]:
    out = []
    for i, history in zip(indices, histories):
      try:
        out.append(agents[i](history))
      except Exception as e:  # noqa: BLE001 (a failing backend must not stop the other episodes)
        out.append(e)
    return out
  return respond


def model_responder(backend, tools: Sequence[Sequence[Mapping[str, Any]]], seed: int) -> Responder:
  """A Responder sampling every live episode's turn in one `backend.complete_batch` call (a ModelBackend);
  `tools[i]` are episode i's declarations. The sampling seed changes every turn."""
  turn = [0]

  def respond(indices: list[int], histories: list[list[Message]]) -> list[Any]:
    turn[0] += 1
    completions = backend.complete_batch([(h, tools[i]) for i, h in zip(indices, histories)],
                                         seed=seed * 7919 + turn[0])
    return [c if isinstance(c, Exception) else c.text for c in completions]
  return respond


def run_episodes(envs: Sequence[ToolEnv], tasks: Sequence[Task], seeds: Sequence[int], respond: Responder,
                 on_turn: Callable[[int, int], None] | None = None) -> list[Episode]:
  """Plays episode i (`tasks[i]` in `envs[i]`, user seeded by `seeds[i]`) until every one has ended; episodes in
  the order given. Each env is used by one episode. on_turn(turn, live episodes) is called before each turn."""
  if not len(envs) == len(tasks) == len(seeds):
    raise ValueError(f'{len(envs)} envs, {len(tasks)} tasks and {len(seeds)} seeds: one each per episode')
  if len({id(env) for env in envs}) != len(envs):
    raise ValueError('each episode needs its own ToolEnv')
  for env, task, seed in zip(envs, tasks, seeds):
    env.reset(task, seed)
  results: list[Episode | None] = [None] * len(envs)
  live = list(range(len(envs)))
  turn = 0
  while live:
    turn += 1
    if on_turn is not None:
      on_turn(turn, len(live))
    outputs = respond(live, [list(envs[i].messages) for i in live])
    if len(outputs) != len(live):
      raise ValueError(f'the responder returned {len(outputs)} outputs for {len(live)} episodes')
    for i, output in zip(live, outputs):
      env = envs[i]
      step = env.abort(f'{type(output).__name__}: {output}') if isinstance(output, Exception) else env.step(output)
      if step.done:
        results[i] = Episode(list(env.messages), step.reward, step.info)
    live = [i for i in live if results[i] is None]
  return results
