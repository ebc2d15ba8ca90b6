"""k2.gym: the expert solves every domain's tasks, planted bad trajectories fail, nothing the agent or the user does
makes the environment raise, episodes end, splits are disjoint, and everything is deterministic per seed."""

import copy
import json
import random
import re

import jsonschema
import pytest

from k2 import chat, gym
from k2.chat import Message, ToolCall
from k2.chat.template import ARGUMENT_BEGIN, CALL_BEGIN, CALL_END, IM_END, SECTION_BEGIN, SECTION_END

DOMAINS = sorted(gym.domains.DOMAINS)
N_TASKS = 40


def tasks_of(name, split='train', n=N_TASKS, seed=0):
  return gym.domains.get(name).sample_tasks(n, seed, split)


def play(name, task, agent, **env_kwargs):
  return gym.run_episode(gym.ToolEnv(gym.domains.get(name), **env_kwargs), agent, task)


def scripted(messages):
  """An agent that sends `messages` in order, then keeps saying it is done."""
  def agent(history):
    turn = sum(m.role == 'assistant' for m in history)
    return messages[turn] if turn < len(messages) else Message('assistant', 'All done.')
  return agent


def calls(actions):
  return [Message('assistant', tool_calls=(call,)) for call in actions]


def changes_state(name, task):
  return gym.gold_state(gym.domains.get(name), task) != task.initial_db


def raw_text(message):
  """The model's output text for an assistant message, as k2.chat.decode writes it."""
  section = ''.join(f'{CALL_BEGIN}functions.{call.name}:{i}{ARGUMENT_BEGIN}{json.dumps(call.arguments)}{CALL_END}'
                    for i, call in enumerate(message.tool_calls))
  return message.content + (f'{SECTION_BEGIN}{section}{SECTION_END}' if section else '') + IM_END


@pytest.mark.parametrize('name', DOMAINS)
@pytest.mark.parametrize('split', gym.SPLITS)
def test_expert_solves_every_task(name, split):
  tasks = tasks_of(name, split)
  assert {task.kind for task in tasks} == set(gym.KINDS)
  for task in tasks:
    episode = play(name, task, gym.ExpertAgent(task))
    assert episode.reward == 1.0, (task.instruction, episode.info)
    info = episode.info
    assert info['tool_errors'] == 0 and info['malformed_outputs'] == 0 and not info['truncated']
    assert info['gold_calls_matched'] == info['gold_calls'] == len(task.gold_actions)
    assert episode.messages[-1].role == 'user' and gym.STOP in episode.messages[-1].content
    if task.kind == 'ask':  # the user told the missing fact only after being asked
      withheld = [fact.value for fact in task.facts if fact.name in task.withheld]
      assert not any(gym.fact_told(value, episode.messages[1].content) for value in withheld)
      assert info['revealed'] == sorted(task.withheld)


@pytest.mark.parametrize('name', DOMAINS)
def test_expert_trajectories_render_and_specs_are_json_schema(name):
  domain = gym.domains.get(name)
  for spec in domain.tool_specs():
    jsonschema.Draft202012Validator.check_schema(spec['function']['parameters'])
  for task in tasks_of(name, n=10):
    episode = play(name, task, gym.ExpertAgent(task))
    text = chat.render_text(episode.messages, tools=domain.tool_specs())
    assert text.count('## Return of functions.') == sum(m.role == 'tool' for m in episode.messages)


@pytest.mark.parametrize('name', DOMAINS)
def test_raw_text_outputs_are_parsed_and_solve(name):
  """The expert's messages sent as the text a model writes (special tokens named) solve the task as well."""
  for task in tasks_of(name, n=10):
    plan = gym.expert_messages(task)
    episode = play(name, task, scripted([raw_text(m) for m in plan]))
    assert episode.reward == 1.0, episode.info
    assert episode.info['malformed_outputs'] == 0


def perturb(value):
  if isinstance(value, bool):
    return not value
  if isinstance(value, (int, float)):
    return value + 1
  if isinstance(value, list):
    return value + ['Zed']
  return value + '9'


@pytest.mark.parametrize('name', DOMAINS)
def test_planted_bad_trajectories_fail(name):
  domain = gym.domains.get(name)
  tasks = tasks_of(name, n=60)
  checked = dict(wrong_tool=0, wrong_arguments=0, missing_fact=0, acted_on_refusal=0, asked_nothing=0)
  for task in tasks:
    plan = gym.expert_messages(task)
    final = plan[-1]
    if task.kind != 'refuse' and changes_state(name, task):
      *reads, write = task.gold_actions
      others = [n for n in domain.tools({}) if n != write.name]
      for other in others:  # any other tool with the same arguments
        episode = play(name, task, scripted(calls([*reads, ToolCall(other, write.arguments)]) + [final]))
        assert episode.reward == 0.0, (task.task_id, other)
        checked['wrong_tool'] += 1
      for key in write.arguments:  # each argument changed in turn
        arguments = dict(write.arguments, **{key: perturb(write.arguments[key])})
        episode = play(name, task, scripted(calls([*reads, ToolCall(write.name, arguments)]) + [final]))
        assert episode.reward == 0.0, (task.task_id, key)
        assert not episode.info['state_match']
        assert episode.info['gold_calls_matched'] == len(task.gold_actions) - 1
        checked['wrong_arguments'] += 1
    if task.required_facts and task.kind != 'refuse':
      episode = play(name, task, scripted(plan[:-1] + [Message('assistant', 'All done, anything else?')]))
      assert episode.reward == 0.0 and not episode.info['facts_told']
      checked['missing_fact'] += 1
    if task.kind == 'refuse':
      assert task.forbidden_actions
      for closing in (Message('assistant', 'Done, it is taken care of.'), final):  # acting, with or without a refusal
        episode = play(name, task, scripted(calls(task.gold_actions + task.forbidden_actions) + [closing]))
        assert episode.reward == 0.0 and not episode.info['state_match'], task.task_id
      episode = play(name, task, scripted(calls(task.gold_actions) + [Message('assistant', 'Done!')]))
      assert episode.reward == 0.0 and not episode.info['refused']  # neither acting nor refusing is not enough
      checked['acted_on_refusal'] += 1
    if task.kind == 'ask':  # the gold actions straight away, as if the agent had guessed the missing argument
      episode = play(name, task, scripted(calls(task.gold_actions) + [final]))
      assert episode.reward == 0.0 and episode.info['state_match'] and episode.info['revealed'] == []
      asking_late = calls(task.gold_actions) + [Message('assistant', task.expert_ask), final]
      episode = play(name, task, scripted(asking_late))
      assert episode.reward == 0.0 and episode.info['acted_before_asking'] and episode.info['revealed']
      checked['asked_nothing'] += 1
  assert all(checked.values()), checked


def test_user_reveals_only_when_asked_and_confirms_when_asked_to():
  task = next(t for t in tasks_of('calculator') if t.kind == 'ask')
  user = gym.ScriptedUser(task)
  assert user.first_message() == task.instruction
  assert user.respond('Let me look into that.', goal_met=False).revealed == ()
  turn = user.respond('How many people are sharing the bill?', goal_met=False)
  assert turn.revealed == ('people',) and not turn.done and task.facts[0].value in turn.content
  assert 'yes' in user.respond('Shall I save it now?', goal_met=False).content.lower()
  assert user.respond('I cannot do that, sorry.', goal_met=False).done
  assert gym.ScriptedUser(task).respond('Done.', goal_met=True).done


def test_malformed_outputs_and_tool_errors_never_raise():
  domain = gym.domains.get('retail')
  task = next(t for t in tasks_of('retail') if t.kind == 'act' and changes_state('retail', t))
  env = gym.ToolEnv(domain, max_assistant_turns=100)
  env.reset(task)
  order_id = task.gold_actions[1].arguments['order_id']
  bad_outputs = [
      f'{SECTION_BEGIN}{CALL_BEGIN}functions.get_order:0{ARGUMENT_BEGIN}{{"order_id": ',   # truncated JSON
      f'{SECTION_BEGIN}{CALL_BEGIN}functions.get_order:0{ARGUMENT_BEGIN}[1, 2]{CALL_END}{SECTION_END}',  # not an object
      f'{CALL_BEGIN}???{CALL_END}',                                                         # no argument marker
      f'text {SECTION_BEGIN}garbage',
      '\x00\uffff' * 50 + IM_END + 'trailing',
      Message('assistant', tool_calls=(ToolCall('drop_database', {}),)),                    # unknown tool
      Message('assistant', tool_calls=(ToolCall('get_order', {'order_id': 7}),)),           # wrong type
      Message('assistant', tool_calls=(ToolCall('get_order', {'order_id': order_id, 'x': 1}),)),  # extra argument
      Message('assistant', tool_calls=(ToolCall('get_order', {}),)),                        # missing argument
      Message('assistant', tool_calls=(ToolCall('get_order', '{not json'),)),               # raw text arguments
      Message('assistant', tool_calls=(ToolCall('get_order', {'order_id': '#W0'}),)),       # the tool raises
      Message('assistant', tool_calls=(ToolCall('cancel_order', {'order_id': order_id, 'reason': 'because'}),)),
      Message('user', 'not an assistant message'),
      None,
  ]
  for output in bad_outputs:
    result = env.step(output)
    assert not result.done and result.reward == 0.0
    assert all(isinstance(m, Message) for m in result.messages) and result.messages
  info = env.info
  assert info['malformed_outputs'] == 7 and info['unknown_tools'] == 1 and info['invalid_arguments'] == 5
  assert len(info['parse_errors']) >= 7 and any('truncated' in e for e in info['parse_errors'])
  assert any('not a JSON object' in e for e in info['parse_errors'])
  assert info['tool_errors'] == 7 and env.db == task.initial_db
  assert chat.render_text(env.messages, tools=env.tool_specs)  # the history still renders


def test_the_turn_limits_end_every_episode():
  task = tasks_of('calendar')[0]
  stalling = play('calendar', task, lambda history: Message('assistant', 'Hmm, let me think about it.'),
                  max_user_turns=50)
  assert stalling.reward == 0.0 and stalling.info['user_turns'] <= 6  # ScriptedUser's own limit
  assert gym.STOP in stalling.messages[-1].content

  class NeverEndingUser:
    def __init__(self, task, seed):
      self.task = task

    def first_message(self):
      return self.task.instruction

    def respond(self, assistant_text, goal_met):
      return gym.UserTurn('Tell me more.')

  endless = play('calendar', task, gym.ExpertAgent(task), user_factory=NeverEndingUser, max_user_turns=5)
  assert endless.info['user_turns'] == 5 and endless.info['truncated']
  assert endless.reward == 1.0  # success is judged on the final state and what was told, not on a goodbye

  looping = play('calendar', task, lambda history: Message('assistant', tool_calls=(
      ToolCall('list_events', {'date': '2027-03-01'}),)), max_assistant_turns=12)
  assert looping.info['assistant_turns'] == 12 and looping.info['truncated']


def test_a_failing_agent_ends_the_episode_without_raising():
  task = tasks_of('files')[0]

  def broken(history):
    raise TimeoutError('backend timed out')

  episode = play('files', task, broken)
  assert episode.reward == 0.0 and 'TimeoutError' in episode.info['agent_error']
  env = gym.ToolEnv(gym.domains.get('files'))
  env.reset(task)
  while not env.step(Message('assistant', 'Hmm.')).done:
    pass
  assert env.step(Message('assistant', 'still there?')) == gym.StepResult([], 0.0, True, env.info)


@pytest.mark.parametrize('name', DOMAINS)
def test_train_and_heldout_entities_are_disjoint(name):
  train, heldout = tasks_of(name, 'train', n=200), tasks_of(name, 'heldout', n=200)
  train_entities = {e for task in train for e in task.entities}
  heldout_entities = {e for task in heldout for e in task.entities}
  assert train_entities and heldout_entities and not train_entities & heldout_entities
  assert not {t.instruction for t in train} & {t.instruction for t in heldout}


def test_numbers_and_names_split_without_memorizable_training_names():
  rng = random.Random(0)
  for digits in (3, 4, 5):
    train = {gym.env.draw_id(rng, 'train', digits) for _ in range(2000)}
    heldout = {gym.env.draw_id(rng, 'heldout', digits) for _ in range(2000)}
    assert not train & heldout and all(len(str(n)) == digits for n in train | heldout)
    for numbers in (train, heldout):  # both spread over the whole range: the same digits in every position
      assert {str(n)[0] for n in numbers} == set('123456789')
  pool = ['Ana Lima', 'Bo Chen', 'Cleo Martin', 'Dev Rao', 'Ema Novak', 'Finn Berg', 'Gia Russo', 'Hugo Weiss']
  names = [n for _ in range(400) for n in gym.env.sample_names(rng, pool, 'train', 2)]
  invented = {n for n in names if n not in pool}
  assert 0.35 < sum(n in invented for n in names) / len(names) < 0.65 and len(invented) > 300
  assert all(re.fullmatch(r'[A-Z][a-z]+ [A-Z][a-z]+', n) for n in invented)  # shaped like the pool's names
  assert not {n.lower() for n in names} & {n.lower() for n in gym.env.split_pool(pool, 'heldout')}
  assert set(gym.env.sample_names(rng, pool, 'heldout', 2)) <= set(gym.env.split_pool(pool, 'heldout'))


@pytest.mark.parametrize('name', DOMAINS)
def test_deterministic_per_seed(name):
  assert tasks_of(name, seed=3) == tasks_of(name, seed=3)
  assert tasks_of(name, seed=3) != tasks_of(name, seed=4)
  task = tasks_of(name, seed=3)[0]
  wandering = scripted([Message('assistant', 'What exactly do you need? Which one, when, how many?')])
  first, second = (play(name, task, wandering) for _ in range(2))
  assert first.messages == second.messages and first.info == second.info
  assert len({t.instruction for t in tasks_of(name, n=100)}) > 80  # surface variety


@pytest.mark.parametrize('name', DOMAINS)
def test_tasks_round_trip_through_json(name):
  for task in tasks_of(name, n=20):
    assert gym.Task.from_dict(json.loads(json.dumps(task.to_dict()))) == task


def test_tasks_do_not_share_state_across_episodes():
  task = next(t for t in tasks_of('files') if changes_state('files', t))
  before = copy.deepcopy(task.initial_db)
  assert play('files', task, gym.ExpertAgent(task)).reward == 1.0
  assert task.initial_db == before
  assert play('files', task, gym.ExpertAgent(task)).reward == 1.0
