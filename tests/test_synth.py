"""k2.synth: the judge accepts every expert trajectory and rejects every planted bad one with its reason; a killed
run resumes from its last complete shard to the same files as an uninterrupted run, never rewriting a complete
shard; failing backends, malformed output and a user who never ends do not stop a run; the output is SFT data."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from k2 import chat, gym, synth
from k2.chat import Message
from k2.config import ConfigError
from k2.data import conversations

DOMAINS = sorted(gym.domains.DOMAINS)
SMALL = synth.SynthConfig(tasks_per_domain=10, shard_size=8)  # 40 tasks, 5 shards (the last one of 8 as well)


def tasks_of(name, n=30):
  return gym.domains.get(name).sample_tasks(n, seed=0, split='train')


def verdict(task, agent, user_factory=None):
  env = gym.ToolEnv(gym.domains.get(task.domain), user_factory=user_factory)
  return synth.judge(task, gym.run_episode(env, agent, task))


def replay(messages):
  """An agent sending `messages` in order, then saying it is done."""
  def agent(history):
    turn = sum(m.role == 'assistant' for m in history)
    return messages[turn] if turn < len(messages) else Message('assistant', 'All done.')
  return agent


def with_first_call(task, change, has_arguments=False):
  """The expert's plan with its first tool call (with arguments, if asked) replaced by change(call)."""
  plan = synth.varied_expert_messages(task, seed=0)
  i = next(i for i, m in enumerate(plan) if m.tool_calls and (m.tool_calls[0].arguments or not has_arguments))
  plan[i] = dataclasses.replace(plan[i], tool_calls=(change(plan[i].tool_calls[0]),))
  return replay(plan)


def other_arguments(arguments):
  """Every argument changed: strings get a suffix, numbers grow by one."""
  def change(value):
    return value + 'x' if isinstance(value, str) else value + 1 if isinstance(value, (int, float)) else value
  return {key: change(value) for key, value in arguments.items()}


def has_reason(result, fragment):
  return not result.accepted and any(fragment in reason for reason in result.reasons)


@pytest.mark.parametrize('name', DOMAINS)
def test_judge_accepts_every_expert_trajectory(name):
  for task in tasks_of(name):
    assert synth.judge(task, gym.run_episode(gym.ToolEnv(gym.domains.get(name)), gym.ExpertAgent(task), task)) \
        == synth.Verdict(True)
    for seed in range(3):
      assert verdict(task, synth.VariedExpertAgent(task, seed)) == synth.Verdict(True), task.task_id


@pytest.mark.parametrize('name', DOMAINS)
def test_judge_rejects_planted_bad_trajectories(name):
  tools = sorted(gym.domains.get(name).tools({}))
  for task in tasks_of(name):
    if any(call.arguments for call in task.gold_actions):
      wrong_tool = with_first_call(task, lambda call: dataclasses.replace(
          call, name=next(tool for tool in tools if tool != call.name)))
      assert has_reason(verdict(task, wrong_tool), 'tool-use pattern'), task.task_id
      wrong_arguments = with_first_call(task, lambda call: dataclasses.replace(
          call, arguments=other_arguments(call.arguments)), has_arguments=True)
      assert has_reason(verdict(task, wrong_arguments), 'tool-use pattern'), task.task_id
    if task.required_facts:  # the work done, but the closing message tells nothing
      plan = synth.varied_expert_messages(task, seed=0)
      plan[-1] = Message('assistant', 'Done.')
      assert has_reason(verdict(task, replay(plan)), 'required facts not told'), task.task_id
    if task.forbidden_actions:  # carrying out what the policy forbids
      plan = [Message('assistant', tool_calls=(call,)) for call in task.forbidden_actions]
      assert has_reason(verdict(task, replay(plan + [Message('assistant', 'Done.')])), 'gold state'), task.task_id
    if task.kind == 'ask':  # guessing the withheld fact instead of asking
      plan = [m for m in gym.expert_messages(task) if m.tool_calls] + [Message('assistant', task.expert_final)]
      assert not verdict(task, replay(plan)).accepted, task.task_id
    # never finishing: the user gives up after its turn limit
    assert not verdict(task, replay([Message('assistant', 'Hmm, let me think about it.')] * 30)).accepted
    # a user who never ends the conversation: cut at the environment's turn limit, even though the state is right
    result = verdict(task, synth.VariedExpertAgent(task), user_factory=NeverDone)
    assert has_reason(result, 'never ended the conversation within the turn limit'), task.task_id
    # a backend that fails before its last message (a timeout, a 5xx)
    last = len(synth.varied_expert_messages(task, seed=0)) - 1
    assert has_reason(verdict(task, FailingAfter(task, last)), 'backend error: TimeoutError'), task.task_id
    # output the parser cannot read, then the expert's plan
    garbled = '<|tool_calls_section_begin|><|tool_call_begin|>functions.x:0<|tool_call_argument_begin|>{oops'
    plan = [garbled] + synth.varied_expert_messages(task, seed=0)
    assert has_reason(verdict(task, lambda h, plan=plan: plan[sum(m.role == 'assistant' for m in h)]),
                      'malformed output'), task.task_id


class NeverDone:
  """A user simulator that never ends the conversation and never reveals anything."""

  def __init__(self, task, seed=0):
    self.task = task

  def first_message(self):
    return self.task.instruction

  def respond(self, assistant_text, goal_met):
    return gym.UserTurn('Hmm, and what else?')


class FailingAfter:
  """The expert, whose backend fails (by default, times out) from its `turns`-th message on."""

  def __init__(self, task, turns, error=TimeoutError('the endpoint did not answer in 30 s')):
    self.expert, self.turns, self.error = synth.VariedExpertAgent(task), turns, error

  def __call__(self, history):
    if sum(m.role == 'assistant' for m in history) >= self.turns:
      raise self.error
    return self.expert(history)


class FlakyBackend:
  """Every third task's agent raises a 5xx on its first message; the rest are the expert."""
  name = 'flaky'

  def agent(self, task, tools, seed):
    if int(task.task_id.split('-')[2]) % 3 == 0:
      return FailingAfter(task, 0, RuntimeError('HTTP 503 Service Unavailable'))
    return synth.VariedExpertAgent(task, seed)


class GarbageBackend:
  """A model that writes an unterminated tool-call section every time."""
  name = 'garbage'

  def agent(self, task, tools, seed):
    return lambda history: '<|tool_calls_section_begin|><|tool_call_begin|>functions.get_order:0'


def test_slips_are_refused_recovered_from_kept_out_of_the_loss_and_accepted(tmp_path):
  config = dataclasses.replace(SMALL, slip_rate=0.5)
  summary = synth.run(tmp_path, config)
  assert summary['accepted'] == 40 and summary['rejected'] == 0
  records = [r for p in sorted((tmp_path / 'trajectories').glob('*.jsonl')) for r in synth.read_jsonl(p)]
  convs = conversations.read(str(tmp_path / 'judged' / 'accepted-*.jsonl'))
  slips = 0
  for record, conv in zip(records, convs):
    messages = conv['messages']
    assert [m.weight for m in messages] == [m.get('weight', 1) for m in record['messages'][:len(messages)]]
    for i, message in enumerate(messages):
      if message.weight:
        continue
      slips += 1
      (slip,), (result,), (fix,) = message.tool_calls, [messages[i + 1]], messages[i + 2].tool_calls
      tools = {spec['function']['name'] for spec in conv['tools']}
      assert result.role == 'tool' and result.content.startswith(('error: unknown tool', 'error: invalid arguments'))
      assert fix.name in tools and messages[i + 2].weight == 1   # the right call follows the refused one
      assert (slip.name not in tools and slip.arguments == fix.arguments) or \
          (slip.name == fix.name and set(slip.arguments) < set(fix.arguments))
    rendered = chat.render(messages, Tokens(), conv['tools'])  # the slips' text is there, out of the loss
    trained = ''.join(t for t, keep in zip(rendered.tokens, rendered.loss_mask) if keep)
    for message in messages:
      for call in message.tool_calls:
        assert (f'>{call.id}<' in trained) == bool(message.weight) and call.id in rendered.text
  assert slips > 20
  # every task's gold calls are still all made; a slip that the environment runs (a valid call marked weight 0) is
  # not a slip: the judge rejects it
  task = next(t for t in tasks_of('retail') if t.kind == 'act')
  plan = synth.varied_expert_messages(task, seed=0)
  plan.insert(0, dataclasses.replace(plan[0], weight=0))
  assert has_reason(verdict(task, replay(plan)), 'planted slip')
  # slips and transient failures together: a slip that failed transiently is retried as a slip, still refused
  mixed = synth.run(tmp_path / 'mixed', dataclasses.replace(config, failure_rate=0.3))
  assert mixed['accepted'] > 20 and not any('slip' in reason for reason in mixed['rejection_reasons'])


class Tokens:
  """A tokenizer of one-character tokens plus the chat specials written out in angle brackets (<name>)."""
  special_tokens = {name: f'<{name}>' for name in chat.CHAT_SPECIAL_TOKENS}

  def encode(self, text):
    return list(text)


def test_varied_expert_keeps_the_calls_and_varies_the_words():
  for name in DOMAINS:
    texts = set()
    for task in tasks_of(name, n=10):
      gold = gym.expert_messages(task)
      for seed in range(4):
        plan = synth.varied_expert_messages(task, seed)
        assert [(c.name, c.arguments) for m in plan for c in m.tool_calls] == \
            [(c.name, c.arguments) for m in gold for c in m.tool_calls]
        ids = [c.id for m in plan for c in m.tool_calls]
        assert ids == [f'functions.{c.name}:{k}' for k, c in enumerate(c for m in plan for c in m.tool_calls)]
        assert gold[-1].content in plan[-1].content
        texts.add(plan[-1].content)
      assert synth.varied_expert_messages(task, 1) == synth.varied_expert_messages(task, 1)
    assert len(texts) > 15  # 10 tasks x 4 seeds: the wording differs across seeds, not only across tasks


def shard_files(out):
  return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob('*.jsonl*'))}


def test_killed_run_resumes_to_the_same_files(tmp_path):
  reference = synth.run(tmp_path / 'a', SMALL)
  assert reference['tasks'] == reference['trajectories'] == reference['accepted'] == 40

  class Killed(Exception):
    pass

  def kill_after_second_trajectory_shard(step, index):
    if (step, index) == ('trajectories', 1):
      raise Killed

  out = tmp_path / 'b'
  with pytest.raises(Killed):
    synth.run(out, SMALL, on_shard=kill_after_second_trajectory_shard)
  manifest = json.loads((out / 'manifest.json').read_text())
  assert sorted(manifest['steps']) == ['tasks', 'trajectories'] and sorted(manifest['steps']['trajectories']) == ['0', '1']
  # what a kill in the middle of writing leaves: a half-written temp file, and a shard renamed into place whose
  # manifest entry was never written
  (out / 'trajectories' / 'trajectories-00002.jsonl.tmp').write_text('{"task_id": "retail-tr')
  (out / 'trajectories' / 'trajectories-00003.jsonl').write_text('{"half": true}\n')
  complete = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob('*.jsonl')
              if p.name != 'trajectories-00003.jsonl'}
  assert len(complete) == 5 + 2
  resumed_shards = []
  summary = synth.run(out, SMALL, on_shard=lambda step, index: resumed_shards.append((step, index)))
  assert summary | {'out': ''} == reference | {'out': ''}
  assert resumed_shards == [('trajectories', i) for i in (2, 3, 4)] + [('judged', i) for i in range(5)]
  for path, (mtime, data) in complete.items():  # complete shards were not rewritten
    assert path.stat().st_mtime_ns == mtime and path.read_bytes() == data
  assert shard_files(out) == shard_files(tmp_path / 'a')  # no .tmp left, every shard byte-identical
  assert (out / 'manifest.json').read_text() == (tmp_path / 'a' / 'manifest.json').read_text()
  # a finished run rerun does nothing; another config in the same directory is refused
  assert synth.run(out, SMALL, on_shard=lambda *_: pytest.fail('rewrote a shard')) == summary
  with pytest.raises(ConfigError, match='another config'):
    synth.run(out, dataclasses.replace(SMALL, seed=1))
  (out / 'judged' / 'accepted-00000.jsonl').write_text('')
  with pytest.raises(ConfigError, match='missing or changed'):
    synth.run(out, SMALL)


def test_output_is_sft_data(tmp_path):
  summary = synth.run(tmp_path, SMALL)
  assert summary['per_domain'] == {name: {'accepted': 10, 'rejected': 0} for name in SMALL.domains}
  convs = conversations.read(str(tmp_path / 'judged' / 'accepted-*.jsonl'))
  assert len(convs) == 40
  records = [r for p in sorted((tmp_path / 'judged').glob('accepted-*.jsonl')) for r in synth.read_jsonl(p)]
  for record, conv in zip(records, convs):
    assert record['tools'] == gym.domains.get(record['domain']).tool_specs()
    assert conv['messages'][0].role == 'system' and conv['messages'][-1].role == 'assistant'
    calls = [c for m in conv['messages'] for c in m.tool_calls]
    assert [m.tool_call_id for m in conv['messages'] if m.role == 'tool'] == [c.id for c in calls]
    text = chat.render_text(conv['messages'], tools=conv['tools'])
    assert text.count('## Return of functions.') == len(calls)
  # a task shard reads back as the tasks sampled
  tasks = [gym.Task.from_dict(r) for r in synth.read_jsonl(tmp_path / 'tasks' / 'tasks-00000.jsonl')]
  assert [t.task_id for t in tasks] == [t.task_id for t in gym.domains.get('retail').sample_tasks(8, 0, 'train')]


@pytest.mark.parametrize('backend, user, reason', [
    (FlakyBackend(), None, 'backend error: RuntimeError: HTTP 503'),
    (GarbageBackend(), None, 'malformed output'),
    (None, NeverDone, 'never ended the conversation within the turn limit')])
def test_failures_do_not_stop_a_run(tmp_path, backend, user, reason):
  summary = synth.run(tmp_path, SMALL, backend=backend, user_factory=user)
  assert summary['trajectories'] == 40 and summary['accepted'] + summary['rejected'] == 40
  rejected = [r for p in sorted((tmp_path / 'judged').glob('rejected-*.jsonl')) for r in synth.read_jsonl(p)]
  assert rejected and all(any(reason in x for x in r['reasons']) for r in rejected)
  if isinstance(backend, FlakyBackend):  # tasks 0, 3, 6, 9 of each domain failed; the others are kept
    assert summary['rejected'] == 16 and summary['accepted'] == 24
  else:
    assert summary['accepted'] == 0


def test_atomic_write_leaves_old_or_new(tmp_path, monkeypatch):
  path = tmp_path / 'x.jsonl'
  entry = synth.write_jsonl(path, [{'a': 1}, {'b': 2}])
  assert entry['count'] == 2 and synth.read_jsonl(path) == [{'a': 1}, {'b': 2}]

  def crash(*args):
    raise OSError('killed during the rename')

  monkeypatch.setattr(os, 'replace', crash)
  with pytest.raises(OSError):
    synth.write_jsonl(path, [{'c': 3}])
  assert synth.read_jsonl(path) == [{'a': 1}, {'b': 2}]  # the old shard, whole


def test_launcher(tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  command = [sys.executable, '-m', 'experiments.synth', f'--out={tmp_path}', '--tasks_per_domain=3', '--shard_size=5']
  done = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  summary = json.loads(done.stdout)
  assert summary['tasks'] == summary['accepted'] == 12 and summary['seconds'] > 0
  done = subprocess.run(command[:-1] + ['--shard_size=4'], cwd=root, capture_output=True, text=True, timeout=120)
  assert done.returncode != 0 and 'another config' in done.stderr
