"""The synthesis pipeline: tasks -> trajectories -> judged SFT conversations, as resumable sharded steps.

    summary = run('/tmp/synth', SynthConfig(tasks_per_domain=600, shard_size=200))
    k2.data.conversations.read('/tmp/synth/judged/accepted-*.jsonl')      # the SFT set

Steps (each a directory of JSONL shards under `out`, listed in out/manifest.json; k2.synth.shards):
  tools/tools-00000.jsonl                 only when the config asks for tool specs (K2's step 1): the tools of the
                                          `tool_specs` files (checked; k2.synth.toolspecs.load_tool_specs) and of
                                          `evolved_domains_per_category` evolved domains per category, one record
                                          {source (the file, or 'evolved'), category, domain, operation, spec}
                                          each: the catalog for agents over synthetic tools (ToolSimulator runs
                                          them).
  tasks/tasks-NNNNN.jsonl                 Task.to_dict() of `tasks_per_domain` 'train' tasks per gym domain, then
                                          of `evolved_tasks_per_domain` per evolved domain (its agent: a generated
                                          system prompt and a sampled subset of its tools; k2.synth.agents), seeded,
                                          domains in order, cut into shards of `shard_size`.
  trajectories/trajectories-NNNNN.jsonl   one episode per task of the same-numbered task shard: the backend's agent
                                          against k2.gym.ToolEnv (with `failure_rate` of transient tool errors)
                                          and the simulated user; {task_id, domain, kind, messages (OpenAI shape),
                                          reward, info}. An evolved domain is rebuilt from (seed,
                                          evolved_domains_per_category): the catalog's domains, the same agents.
  judged/accepted-NNNNN.jsonl             the passing ones (by the run's judge) as SFT conversations {messages,
                                          tools, task_id, domain, kind} (k2.synth.judging.conversation), and
  judged/rejected-NNNNN.jsonl             the failing ones with their reasons and full messages, for inspection.
Each step reads only the previous step's files, so a step can be rerun alone (a new judge over old trajectories, in
a new directory). Everything is a pure function of the config, so a killed run rerun with the same arguments
finishes with the same files as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

from k2 import gym
from k2.chat import Message
from k2.synth.agents import evolved_agents
from k2.synth.backends import Backend, ExpertBackend
from k2.synth.judging import Judge, conversation, judge, message_dict
from k2.synth.shards import Manifest, read_jsonl, write_jsonl
from k2.synth.toolspecs import evolve_domains, load_tool_specs

STEPS = ('tools', 'tasks', 'trajectories', 'judged')


@dataclasses.dataclass(frozen=True)
class SynthConfig:
  """tasks_per_domain: 'train' tasks drawn per domain; shard_size: records per shard; seed: for the tasks, the
  expert's wording, the user and the failures; domains: k2.gym domain names; max_user_turns, max_assistant_turns:
  ToolEnv caps; failure_rate: ToolEnv's share of tool calls failing transiently (the expert retries them);
  slip_rate: the default expert's share of calls preceded by a slip it recovers from (k2.synth.backends.with_slips;
  the slips stay out of the SFT loss);
  tool_specs: JSON spec files, evolved_domains_per_category: evolved domains per category, for the tools step;
  evolved_tasks_per_domain: 'train' tasks drawn per evolved domain (0: none; needs evolved_domains_per_category)."""
  tasks_per_domain: int = 600
  shard_size: int = 200
  seed: int = 0
  domains: tuple[str, ...] = ('retail', 'calendar', 'files', 'calculator')
  max_user_turns: int = 8
  max_assistant_turns: int = 24
  failure_rate: float = 0.0
  slip_rate: float = 0.0
  tool_specs: tuple[str, ...] = ()
  evolved_domains_per_category: int = 0
  evolved_tasks_per_domain: int = 0

  def __post_init__(self):
    if self.tasks_per_domain < 1 or self.shard_size < 1:
      raise ValueError(f'tasks_per_domain and shard_size must be >= 1, got {self.tasks_per_domain}, {self.shard_size}')
    if not 0.0 <= self.failure_rate < 1.0:
      raise ValueError(f'failure_rate must be in [0, 1), got {self.failure_rate}')
    if not 0.0 <= self.slip_rate <= 1.0:
      raise ValueError(f'slip_rate must be in [0, 1], got {self.slip_rate}')
    for name in self.domains:
      gym.domains.get(name)  # KeyError naming the known domains
    for path in self.tool_specs:
      load_tool_specs(path)  # ValueError naming the file and the tool, before any work
    if self.evolved_domains_per_category:
      evolve_domains(self.seed, self.evolved_domains_per_category)  # ValueError if out of range
    if self.evolved_tasks_per_domain < 0:
      raise ValueError(f'evolved_tasks_per_domain must be >= 0, got {self.evolved_tasks_per_domain}')
    if self.evolved_tasks_per_domain and not self.evolved_domains_per_category:
      raise ValueError('evolved_tasks_per_domain needs evolved_domains_per_category >= 1 (the domains to play)')

  def evolved(self) -> Mapping[str, gym.Domain]:
    """name -> the evolved domains' agents whose tasks the run plays (none when evolved_tasks_per_domain is 0)."""
    return evolved_agents(self.seed, self.evolved_domains_per_category) if self.evolved_tasks_per_domain else {}

  def domain(self, name: str) -> gym.Domain:
    """The domain of a task of this run: an evolved one, or a k2.gym one (KeyError naming the known ones)."""
    return self.evolved().get(name) or gym.domains.get(name)

  def tool_catalog(self) -> list[dict[str, Any]]:
    """The tools step's records (see the module docstring), loaded files first."""
    records = [{'source': path, 'category': None, 'domain': None, 'operation': None, 'spec': spec}
               for path in self.tool_specs for spec in load_tool_specs(path)]
    if self.evolved_domains_per_category:
      records += [{'source': 'evolved', 'category': domain.category, 'domain': domain.name,
                   'operation': tool.operation, 'spec': dict(tool.spec)}
                  for domain in evolve_domains(self.seed, self.evolved_domains_per_category) for tool in domain.tools]
    return records


def _shard_name(prefix: str, index: int) -> str:
  return f'{prefix}-{index:05d}.jsonl'


def _all_tasks(config: SynthConfig) -> list[gym.Task]:
  return ([task for name in config.domains
           for task in gym.domains.get(name).sample_tasks(config.tasks_per_domain, config.seed, 'train')]
          + [task for domain in config.evolved().values()
             for task in domain.sample_tasks(config.evolved_tasks_per_domain, config.seed, 'train')])


def play(task: gym.Task, backend: Backend, config: SynthConfig,
         user_factory: Callable[[gym.Task, int], Any] | None = None) -> gym.Episode:
  """One episode of `task` with the backend's agent; never raises for anything the agent or the user does."""
  domain = config.domain(task.domain)
  env = gym.ToolEnv(domain, user_factory=user_factory, max_user_turns=config.max_user_turns,
                    max_assistant_turns=config.max_assistant_turns, failure_rate=config.failure_rate)
  return gym.run_episode(env, backend.agent(task, domain.tool_specs(), config.seed), task, seed=config.seed)


def _trajectory(task: gym.Task, episode: gym.Episode) -> dict[str, Any]:
  return {'task_id': task.task_id, 'domain': task.domain, 'kind': task.kind, 'reward': episode.reward,
          'info': episode.info, 'messages': [message_dict(m) for m in episode.messages]}


def run(out: str | pathlib.Path, config: SynthConfig, backend: Backend | None = None,
        user_factory: Callable[[gym.Task, int], Any] | None = None, judge: Judge = judge,
        on_shard: Callable[[str, int], None] | None = None) -> dict[str, Any]:
  """Runs (or resumes) every step into `out`; returns counts per step, per domain and per rejection reason.
  backend: the agent policy (default ExpertBackend); user_factory: the simulated user (default k2.gym.ScriptedUser);
  judge: k2.synth.judging's programmatic judge by default, or any Judge (LLMJudge, all_of(...));
  on_shard(step, index) is called after each shard is recorded complete (progress; tests kill the run there).
  The names of the backend, user and judge go into the manifest's config with `config`."""
  if backend is None:
    decoys = [spec['function']['name'] for name in config.domains for spec in gym.domains.get(name).tool_specs()]
    backend = ExpertBackend(config.slip_rate, decoys)
  out = pathlib.Path(out)
  user = 'scripted' if user_factory is None else getattr(user_factory, '__name__', type(user_factory).__name__)
  manifest = Manifest.open(out, dict(dataclasses.asdict(config), backend=backend.name, user=user, judge=judge.name))
  tasks = _all_tasks(config)
  tools = {name: config.domain(name).tool_specs() for name in (*config.domains, *config.evolved())}

  def tool_shard(index: int) -> list[dict[str, Any]]:
    return [write_jsonl(out / 'tools' / _shard_name('tools', index), config.tool_catalog())]

  def task_shard(index: int) -> list[dict[str, Any]]:
    shard = tasks[index * config.shard_size:(index + 1) * config.shard_size]
    return [write_jsonl(out / 'tasks' / _shard_name('tasks', index), (task.to_dict() for task in shard))]

  def read_tasks(index: int) -> list[gym.Task]:
    return [gym.Task.from_dict(record) for record in read_jsonl(out / 'tasks' / _shard_name('tasks', index))]

  def trajectory_shard(index: int) -> list[dict[str, Any]]:
    return [write_jsonl(out / 'trajectories' / _shard_name('trajectories', index),
                        (_trajectory(task, play(task, backend, config, user_factory)) for task in read_tasks(index)))]

  def judged_shard(index: int) -> list[dict[str, Any]]:
    tasks_by_id = {task.task_id: task for task in read_tasks(index)}
    accepted, rejected = [], []
    for record in read_jsonl(out / 'trajectories' / _shard_name('trajectories', index)):
      messages = [Message.from_dict(m) for m in record['messages']]
      verdict = judge(tasks_by_id[record['task_id']], gym.Episode(messages, record['reward'], record['info']))
      meta = {'task_id': record['task_id'], 'domain': record['domain'], 'kind': record['kind']}
      if verdict.accepted:
        accepted.append(conversation(messages, tools[record['domain']]) | meta)
      else:
        rejected.append(meta | {'reasons': list(verdict.reasons), 'messages': record['messages']})
    return [write_jsonl(out / 'judged' / _shard_name('accepted', index), accepted),
            write_jsonl(out / 'judged' / _shard_name('rejected', index), rejected)]

  n_shards = -(-len(tasks) // config.shard_size)
  makers = {'tools': (tool_shard, int(bool(config.tool_specs or config.evolved_domains_per_category))),
            'tasks': (task_shard, n_shards), 'trajectories': (trajectory_shard, n_shards),
            'judged': (judged_shard, n_shards)}
  for step in STEPS:
    make_shard, count = makers[step]
    for index in range(count):
      if manifest.complete(step, index):
        continue  # a complete shard is never rewritten
      manifest.record(step, index, make_shard(index))
      if on_shard is not None:
        on_shard(step, index)
  return summary(out, manifest)


def summary(out: pathlib.Path, manifest: Manifest) -> dict[str, Any]:
  """Counts of a finished run: tools, tasks, trajectories, accepted and rejected (total, per domain, per reason)."""
  per_domain: dict[str, dict[str, int]] = {}
  reasons: dict[str, int] = {}
  for kind in ('accepted', 'rejected'):
    for path in manifest.paths('judged', kind):
      for record in read_jsonl(path):
        counts = per_domain.setdefault(record['domain'], {'accepted': 0, 'rejected': 0})
        counts[kind] += 1
        for reason in record.get('reasons', ()):
          key = reason.split(':')[0]
          reasons[key] = reasons.get(key, 0) + 1
  return {'out': str(out), 'tools': manifest.count('tools'), 'tasks': manifest.count('tasks'),
          'trajectories': manifest.count('trajectories'),
          'accepted': manifest.count('judged', 'accepted'), 'rejected': manifest.count('judged', 'rejected'),
          'per_domain': per_domain, 'rejection_reasons': reasons}
