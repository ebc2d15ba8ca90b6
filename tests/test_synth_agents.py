"""k2.synth.agents: every evolved domain is a playable k2.gym Domain (generated prompt, sampled tools, a store in the
episode database); its tasks of every type and level are solved by their gold actions and accepted by the judge,
planted bad trajectories are rejected with their reason, rubrics render, train and held-out values are disjoint;
the pipeline plays evolved tasks, resumes, and writes conversations declaring the agent's tools."""

import dataclasses
import json
import os
import random
import subprocess
import sys

import pytest

from k2 import chat, gym, synth
from k2.chat import Message
from k2.data import conversations
from k2.synth import agents

AGENTS = agents.evolved_agents(0, 2)
NAMES = sorted(AGENTS)


def tasks_of(name, n=40, split='train'):
  return AGENTS[name].sample_tasks(n, seed=0, split=split)


def task_type(task):
  return task.task_id.split('-', 3)[3].rsplit('-', 1)[0]


def verdict(task, agent):
  return synth.judge(task, gym.run_episode(gym.ToolEnv(AGENTS[task.domain]), agent, task))


def replay(messages):
  """An agent sending `messages` in order, then saying it is done."""
  def agent(history):
    turn = sum(m.role == 'assistant' for m in history)
    return messages[turn] if turn < len(messages) else Message('assistant', 'All done.')
  return agent


def has_reason(result, fragment):
  return not result.accepted and any(fragment in reason for reason in result.reasons)


def test_agents_are_a_prompt_and_a_sampled_tool_subset():
  assert len(AGENTS) == 2 * len(synth.toolspecs.TAXONOMY)
  strict = 0
  for name, domain in AGENTS.items():
    assert isinstance(domain, gym.Domain) and name == f'evolved.{domain.synthetic.name}'
    specs = domain.tool_specs()
    every = [dict(tool.spec) for tool in domain.synthetic.tools]
    assert specs and all(spec in every for spec in specs)
    for tool in domain.synthetic.tools:  # create and get are always the agent's
      assert tool.operation not in ('create', 'get') or dict(tool.spec) in specs
    strict += len(specs) < len(every)
    assert 'protected' in domain.policy and domain.system_prompt() == domain.policy
  assert strict >= 3  # the subset is drawn, not the whole domain
  assert len({domain.policy.splitlines()[0] for domain in AGENTS.values()}) >= 3  # prompts vary
  rebuilt = agents.AgentDomain(AGENTS[NAMES[0]].synthetic, seed=0)
  assert (rebuilt.policy, rebuilt.tool_specs()) == (AGENTS[NAMES[0]].policy, AGENTS[NAMES[0]].tool_specs())
  assert agents.evolved_agents(1, 2)[next(iter(agents.evolved_agents(1, 2)))].policy  # other seeds build too


def test_tools_act_on_the_episode_database():
  domain = AGENTS[NAMES[0]]
  task = next(t for t in tasks_of(NAMES[0]) if task_type(t) == 'L1-create')
  db = json.loads(json.dumps(task.initial_db))
  tools = domain.tools(db)
  entity, = {tool.collection for tool in domain.agent_tools if tool.name == task.gold_actions[0].name}
  before = db['last_id'][entity]
  result, error = gym.execute(task.gold_actions[0], tools)
  assert error is None and json.loads(result)['id'] in db['records'][entity]
  assert db['last_id'][entity] == before + 1 and db == gym.gold_state(domain, task)


@pytest.mark.parametrize('name', NAMES)
def test_judge_accepts_every_gold_trajectory(name):
  for split in gym.SPLITS:
    for task in tasks_of(name, split=split):
      assert gym.Task.from_dict(json.loads(json.dumps(task.to_dict()))) == task  # round-trips through a shard
      assert verdict(task, gym.ExpertAgent(task)) == synth.Verdict(True), task.task_id
      for seed in range(2):
        assert verdict(task, synth.VariedExpertAgent(task, seed)) == synth.Verdict(True), task.task_id


def test_every_type_level_and_kind_is_drawn():
  tasks = [task for name in NAMES for task in tasks_of(name)]
  assert {task_type(task) for task in tasks} == set(agents.TASK_TYPES)
  assert {task.kind for task in tasks} == set(gym.KINDS)
  by_level = {level: [t for t in tasks if task_type(t).startswith(level)] for level in ('L1', 'L2', 'L3')}
  assert all(len(t.gold_actions) == 1 for t in by_level['L1'])  # simple to complex
  assert all(len(t.gold_actions) == 2 for t in by_level['L3'])
  assert all(len(t.gold_actions) == 2 for t in by_level['L2'] if t.kind == 'act')
  assert len({t.instruction for t in tasks}) > 0.9 * len(tasks)  # phrasings and values vary


def other_value(domain, task, call):
  """The call with its last argument changed to another valid value: another record's id, or another draw."""
  key = list(call.arguments)[-1]
  arguments = dict(call.arguments)
  if key == 'id':
    entity = arguments['id'].split('-')[0]
    ids = [i for records in task.initial_db['records'].values() for i in records if i.split('-')[0] == entity]
    arguments['id'] = next(i for i in ids if i != call.arguments['id'])
  else:
    entry = next(e for e in domain.collections.values() if call.name in e['ops'].values())
    arguments[key] = agents.draw_other(random.Random(0), key, entry['fields'][key], arguments[key], task.split)
  return dataclasses.replace(call, arguments=arguments)


def with_first_call(task, change):
  plan = synth.varied_expert_messages(task, seed=0)
  i = next(i for i, m in enumerate(plan) if m.tool_calls)
  plan[i] = dataclasses.replace(plan[i], tool_calls=(change(plan[i].tool_calls[0]),))
  return replay(plan)


@pytest.mark.parametrize('name', NAMES)
def test_judge_rejects_planted_bad_trajectories(name):
  domain = AGENTS[name]
  tools = sorted(domain.tools({}))
  for task in tasks_of(name, n=25):
    wrong_tool = with_first_call(task, lambda call: dataclasses.replace(
        call, name=next(tool for tool in tools if tool != call.name)))
    assert has_reason(verdict(task, wrong_tool), 'tool-use pattern'), task.task_id
    wrong_argument = with_first_call(task, lambda call: other_value(domain, task, call))
    assert has_reason(verdict(task, wrong_argument), 'tool-use pattern'), task.task_id
    if task.required_facts:  # the work done, the closing message tells nothing
      plan = synth.varied_expert_messages(task, seed=0)
      plan[-1] = Message('assistant', 'Done.')
      assert has_reason(verdict(task, replay(plan)), 'required facts not told'), task.task_id
    if task.kind == 'ask':  # acting before asking: the gold calls with the withheld value guessed
      plan = [m for m in gym.expert_messages(task) if m.tool_calls] + [Message('assistant', task.expert_final)]
      result = verdict(task, replay(plan))
      assert has_reason(result, 'never asked for'), task.task_id
      if task_type(task) == 'L2-ask-field':
        assert has_reason(result, 'changed the database before asking'), task.task_id
    if task.kind == 'refuse':  # doing what the policy forbids, or not saying no
      forbidden = Message('assistant', tool_calls=task.gold_actions + task.forbidden_actions)
      result = verdict(task, replay([forbidden, Message('assistant', 'Done.')]))
      assert has_reason(result, 'did not refuse') and has_reason(result, 'gold state'), task.task_id
      plan = [Message('assistant', tool_calls=task.gold_actions), Message('assistant', 'Let me know what else.')]
      assert has_reason(verdict(task, replay(plan)), 'did not refuse'), task.task_id


def test_rubrics_render_for_the_llm_judge():
  tasks = {task_type(t): t for name in NAMES for t in tasks_of(name)}
  for kind, task in tasks.items():
    rubric = synth.task_rubric(task)
    calls = [f'{c.name}({c.arguments_text()})' for c in task.gold_actions]
    assert f'User goal: {task.instruction}' in rubric and 'Expected tool calls, in order: ' + '; '.join(calls) in rubric
    assert all(f'Checkpoint: the agent tells the user {fact}.' in rubric for fact in task.required_facts)
    if task.kind == 'ask':
      assert f'asks the user for {task.withheld[0]} before changing anything' in rubric
      assert f'User fact (to tell when asked): {task.withheld[0]} = {task.facts[0].value}' in rubric
    if task.kind == 'refuse':
      assert 'refuse the request' in rubric and 'never calls ' + task.forbidden_actions[0].name in rubric
  seen = []

  class Grader:  # an LLM judge's backend: records the prompt, passes
    name = 'grader'

    def complete(self, messages, tools=None):
      seen.append(messages[1].content)
      return Message('assistant', '{"pass": true, "reasons": []}')

  task = tasks['L2-refuse']
  episode = gym.run_episode(gym.ToolEnv(AGENTS[task.domain]), gym.ExpertAgent(task), task)
  assert synth.LLMJudge(Grader())(task, episode) == synth.Verdict(True)
  assert synth.task_rubric(task) in seen[0] and task.expert_final in seen[0]


def test_train_and_heldout_values_are_disjoint():
  entities = {split: set() for split in gym.SPLITS}
  for name in NAMES:
    for split in gym.SPLITS:
      for task in tasks_of(name, n=60, split=split):
        assert task.split == split and task.entities
        entities[split].update(task.entities)
        numbers = [int(i.split('-')[1]) for i in task.entities if '=' not in i]  # record ids
        assert all(((n // 10) % 4 == 3) == (split == 'heldout') for n in numbers), task.task_id  # draw_id * 10 + 5
  assert len(entities['heldout']) > 500 and not entities['train'] & entities['heldout']


def run_config(**changes):
  return synth.SynthConfig(**{'tasks_per_domain': 2, 'domains': ('retail',), 'shard_size': 8,
                              'evolved_domains_per_category': 1, 'evolved_tasks_per_domain': 3} | changes)


def test_pipeline_plays_evolved_tasks_and_resumes(tmp_path):
  config = run_config()
  evolved = agents.evolved_agents(config.seed, 1)
  reference = synth.run(tmp_path / 'a', config)
  total = 2 + 3 * len(evolved)
  assert reference['tasks'] == reference['trajectories'] == reference['accepted'] == total
  assert set(reference['per_domain']) == {'retail', *evolved}

  class Killed(Exception):
    pass

  def kill(step, index):
    if (step, index) == ('trajectories', 1):
      raise Killed

  with pytest.raises(Killed):
    synth.run(tmp_path / 'b', config, on_shard=kill)
  agents.evolved_agents.cache_clear()  # the resumed run rebuilds the domains from the config, as a new process would
  assert synth.run(tmp_path / 'b', config) | {'out': ''} == reference | {'out': ''}
  files = {p.relative_to(tmp_path / 'a'): p.read_bytes() for p in (tmp_path / 'a').rglob('*.jsonl')}
  assert files == {p.relative_to(tmp_path / 'b'): p.read_bytes() for p in (tmp_path / 'b').rglob('*.jsonl')}
  records = [r for p in sorted((tmp_path / 'a' / 'judged').glob('accepted-*.jsonl')) for r in synth.read_jsonl(p)]
  for record in records:  # each conversation declares its agent's sampled tools and uses only those
    domain = config.domain(record['domain'])
    assert record['tools'] == domain.tool_specs()
    names = {spec['function']['name'] for spec in record['tools']}
    assert {c['function']['name'] for m in record['messages'] for c in m.get('tool_calls', ())} <= names
    if record['domain'] in evolved:
      assert record['messages'][0]['content'] == domain.policy
  assert sum(r['domain'] in evolved for r in records) == 3 * len(evolved)
  for conv in conversations.read(str(tmp_path / 'a' / 'judged' / 'accepted-*.jsonl')):  # SFT data, K2's format
    calls = sum(len(m.tool_calls) for m in conv['messages'])
    assert chat.render_text(conv['messages'], tools=conv['tools']).count('## Return of functions.') == calls
  default = synth.SynthConfig()
  assert default.evolved_tasks_per_domain == 0 and default.evolved() == {}


@pytest.mark.parametrize('changes, message', [
    ({'evolved_tasks_per_domain': -1}, 'evolved_tasks_per_domain must be >= 0, got -1'),
    ({'evolved_domains_per_category': 0}, 'evolved_tasks_per_domain needs evolved_domains_per_category >= 1')])
def test_bad_config(changes, message):
  with pytest.raises(ValueError, match=message):
    run_config(**changes)


def test_launcher_bad_evolved_flags(tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for args, message in [(['--evolved_tasks_per_domain=-2', '--evolved_domains=1'],
                         'error: evolved_tasks_per_domain must be >= 0, got -2'),
                        (['--evolved_tasks_per_domain=5'], 'error: evolved_tasks_per_domain needs '
                         'evolved_domains_per_category >= 1 (the domains to play)'),
                        (['--evolved_tasks_per_domain=many'], 'error: flag --evolved_tasks_per_domain=many: '
                         "invalid literal for int() with base 10: 'many'")]:
    done = subprocess.run([sys.executable, '-m', 'experiments.synth', f'--out={tmp_path}', *args], cwd=root,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and done.stderr.strip() == message, done.stderr
