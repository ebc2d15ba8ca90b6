"""k2.synth's backends and failure handling (issue 15, acceptance 6): an OpenAI-compatible HTTP backend against a
local fake server that fails in every way (5xx, timeouts, garbage JSON, malformed tool calls) and sometimes answers
well; the LLM judge's pass / fail / unparsable verdicts; an LLM-played user, one that never ends, one whose backend
fails; controlled transient tool failures the expert recovers from; tool specs loaded, evolved and simulated."""

import dataclasses
import http.server
import json
import os
import random
import re
import subprocess
import sys
import threading
import time

import pytest

from k2 import gym, synth
from k2.chat import Message, ToolCall
from k2.config import ConfigError
from k2.synth import toolspecs

SMALL = synth.SynthConfig(tasks_per_domain=4, shard_size=5)  # 16 tasks over the four domains, 4 shards
TIMEOUT_S = 0.3


class FakeServer:
  """An OpenAI-compatible /v1/chat/completions on localhost: `reply(request) -> (status, body bytes, delay_s)`
  answers each request (a thread per request); `requests` keeps what came in."""

  def __init__(self, reply):
    self.reply, self.requests = reply, []
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def log_message(self, *args):
        pass

      def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers['Content-Length'])))
        server.requests.append(request)
        status, body, delay = server.reply(request)
        time.sleep(delay)
        try:
          self.send_response(status)
          self.send_header('Content-Type', 'application/json')
          self.send_header('Content-Length', str(len(body)))
          self.end_headers()
          self.wfile.write(body)
        except OSError:  # the client gave up (timed out) before the answer
          pass

    self.httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    self.httpd.daemon_threads = True
    self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={'poll_interval': 0.02}, daemon=True)
    self.thread.start()
    self.url = f'http://127.0.0.1:{self.httpd.server_address[1]}/v1'

  def backend(self, **kwargs):
    return synth.OpenAIBackend(self.url, 'fake-model', timeout_s=TIMEOUT_S, max_retries=0, **kwargs)

  def close(self):
    self.httpd.shutdown()
    self.httpd.server_close()


@pytest.fixture
def serve():
  servers = []

  def start(reply):
    servers.append(FakeServer(reply))
    return servers[-1]

  yield start
  for server in servers:
    server.close()


def completion(message):
  """A chat.completion body with one choice holding `message` (an OpenAI message dict)."""
  return json.dumps({'id': 'chatcmpl-1', 'object': 'chat.completion', 'created': 0, 'model': 'fake-model',
                     'choices': [{'index': 0, 'message': message, 'finish_reason': 'stop'}]}).encode()


def ok(content='', tool_calls=None):
  message = {'role': 'assistant', 'content': content}
  if tool_calls:
    message['tool_calls'] = tool_calls
  return 200, completion(message), 0.0


def all_tasks(config=SMALL):
  return [task for name in config.domains for task in gym.domains.get(name).sample_tasks(
      config.tasks_per_domain, config.seed, 'train')]


def judged(out, kind):
  return [r for p in sorted((out / 'judged').glob(f'{kind}-*.jsonl')) for r in synth.read_jsonl(p)]


# --- the HTTP backend in a pipeline run ----------------------------------------------------------------------------

FAILURES = {  # task index within its domain -> what the server does on the agent's `turn`-th request
    0: ('500', 0), 1: ('timeout', 1), 2: ('garbage', 0), 3: ('bad arguments', 0)}


def expert_server(tasks):
  """The server's reply: the scripted expert's next message for the task whose request it is (found by its
  opening user message), unless FAILURES says that this task's request fails: the tasks of every other domain
  fail, one way each (at the expert's last message if it has fewer turns); the others answer well."""
  by_request = {task.instruction: task for task in tasks}
  assert len(by_request) == len(tasks)
  failing = {task.task_id: (FAILURES[i % 4][0], min(FAILURES[i % 4][1], len(gym.expert_messages(task)) - 1))
             for i, task in enumerate(tasks) if i % 8 < 4}

  def reply(request):
    messages = [Message.from_dict(m) for m in request['messages']]
    task = by_request[messages[1].content]
    turn = sum(m.role == 'assistant' for m in messages)
    mode, at = failing.get(task.task_id, (None, None))
    if turn == at:
      if mode == '500':
        return 500, b'{"error": {"message": "overloaded", "type": "server_error"}}', 0.0
      if mode == 'timeout':
        return 200, b'{}', 3 * TIMEOUT_S
      if mode == 'garbage':
        return 200, b'{"choices": [{"message": ', 0.0
      if mode == 'bad arguments':  # a known tool, arguments that are not JSON
        name = sorted(gym.domains.get(task.domain).tools({}))[0]
        return ok(tool_calls=[{'id': 'functions.x:0', 'type': 'function',
                               'function': {'name': name, 'arguments': '{"id": oops'}}])
    answer = synth.VariedExpertAgent(task, seed=request['seed'])(messages)
    return 200, completion(synth.message_dict(answer)), 0.0

  return reply, failing


def test_pipeline_over_a_failing_http_backend(serve, tmp_path):
  tasks = all_tasks()
  reply, failing = expert_server(tasks)
  server = serve(reply)
  start = time.perf_counter()
  summary = synth.run(tmp_path, SMALL, backend=server.backend())
  assert time.perf_counter() - start < 20
  assert summary['trajectories'] == 16 and len(failing) == 8
  rejected = {r['task_id']: r['reasons'] for r in judged(tmp_path, 'rejected')}
  assert set(rejected) == set(failing)  # every failed episode rejected, every other one accepted
  expected = {'500': 'backend error: InternalServerError', 'timeout': 'backend error: APITimeoutError',
              'garbage': 'backend error: JSONDecodeError', 'bad arguments': '0 unknown tool, 1 invalid arguments'}
  for task_id, (mode, _) in failing.items():
    assert any(expected[mode] in reason for reason in rejected[task_id]), (mode, rejected[task_id])
  assert summary['accepted'] == 8
  # the agent saw what a deployed model sees: the domain's tools, the history, the run's seed; nothing of the task
  for request in server.requests:
    domain = request['messages'][0]['content']
    assert request['tools'] in [gym.domains.get(name).tool_specs() for name in SMALL.domains]
    assert request['model'] == 'fake-model' and request['seed'] == SMALL.seed and domain
    assert set(request) <= {'model', 'messages', 'tools', 'temperature', 'seed', 'max_tokens'}
  manifest = json.loads((tmp_path / 'manifest.json').read_text())
  assert manifest['config']['backend'] == 'openai:fake-model@T=0.0' and manifest['config']['judge'] == 'programmatic'


def test_openai_backend_complete(serve):
  server = serve(lambda request: ok('Hello!', tool_calls=[
      {'id': 'functions.get_order:0', 'type': 'function', 'function': {'name': 'get_order',
                                                                        'arguments': '{"order_id": "#W1"}'}}]))
  backend = server.backend(temperature=0.7, max_tokens=64)
  history = [Message('system', 'policy'), Message('user', 'hi'),
             Message('assistant', tool_calls=(ToolCall('f', {'a': 1}, 'functions.f:0'),)),
             Message('tool', '{"ok": true}', tool_call_id='functions.f:0')]
  answer = backend.complete(history)
  assert answer == Message('assistant', 'Hello!', tool_calls=(
      ToolCall('get_order', '{"order_id": "#W1"}', 'functions.get_order:0'),))
  request = server.requests[-1]
  assert request['messages'] == [synth.message_dict(m) for m in history]
  assert request['temperature'] == 0.7 and request['max_tokens'] == 64 and 'tools' not in request
  with pytest.raises(ValueError, match='timeout_s'):
    synth.OpenAIBackend(server.url, 'm', timeout_s=0)


def test_openai_backend_answer_without_choices_raises(serve):
  server = serve(lambda request: (200, b'{"id": "x", "object": "chat.completion", "choices": []}', 0.0))
  with pytest.raises(ValueError, match='without a choice'):
    server.backend().complete([Message('user', 'hi')])


# --- the LLM judge -------------------------------------------------------------------------------------------------

def expert_episode(task, **env_kwargs):
  env = gym.ToolEnv(gym.domains.get(task.domain), **env_kwargs)
  return gym.run_episode(env, synth.VariedExpertAgent(task), task)


@pytest.mark.parametrize('answer, accepted, reason', [
    ('{"pass": true, "reasons": []}', True, None),
    ('Verdict:\n```json\n{"pass": true}\n```', True, None),
    ('{"pass": false, "reasons": ["did not tell the total"]}', False, 'llm judge: did not tell the total'),
    ('{"pass": false}', False, 'llm judge: failed, no reason given'),
    ('It looks fine to me.', False, 'llm judge: unparsable verdict'),
    ('{"pass": "yes", "reasons": []}', False, 'llm judge: unparsable verdict'),
    ('{"pass": true, "reasons": [', False, 'llm judge: unparsable verdict'),
    (None, False, 'llm judge: backend error: InternalServerError')])
def test_llm_judge_verdicts(serve, answer, accepted, reason):
  server = serve(lambda request: (500, b'{"error": {"message": "down"}}', 0.0) if answer is None else ok(answer))
  task = next(t for t in gym.domains.get('retail').sample_tasks(20, 0, 'train') if t.kind == 'ask')
  episode = expert_episode(task)
  llm = synth.LLMJudge(server.backend())
  result = llm(task, episode)
  assert result.accepted == accepted
  assert accepted or any(reason in r for r in result.reasons), result.reasons
  # what the judge was shown: the rubric (goal, expected calls, checkpoints) and the whole transcript
  system, user = server.requests[-1]['messages']
  assert system['content'] == synth.RUBRIC and '"pass"' in system['content']
  for call in task.gold_actions:
    assert f'{call.name}({call.arguments_text()})' in user['content']
  assert task.instruction in user['content'] and 'Checkpoint: the agent asks the user for' in user['content']
  assert episode.messages[-1].content in user['content']
  # ANDed with the programmatic judge
  both = synth.all_of(synth.judge, llm)
  assert both.name == 'programmatic+llm:openai:fake-model@T=0.0'
  assert both(task, episode) == result


def test_task_rubric_and_transcript():
  for name in sorted(gym.domains.DOMAINS):
    for task in gym.domains.get(name).sample_tasks(12, 0, 'train'):
      rubric = synth.task_rubric(task)
      assert rubric.startswith(f'User goal: {task.instruction}\n')
      assert all(f'Checkpoint: the agent tells the user {fact}.' in rubric for fact in task.required_facts)
      assert ('refuse the request' in rubric) == (task.kind == 'refuse')
      assert all(f'never calls {c.name}({c.arguments_text()})' in rubric for c in task.forbidden_actions[:1])
      assert 'Expected tool calls, in order: ' + ('; '.join(
          f'{c.name}({c.arguments_text()})' for c in task.gold_actions) or 'none') in rubric
  messages = [Message('user', 'hi'), Message('assistant', 'ok', tool_calls=(ToolCall('f', {'a': 1}),)),
              Message('tool', '{"b": 2}')]
  assert synth.transcript(messages) == '[user] hi\n[assistant] ok\n[assistant calls] f({"a": 1})\n[tool] {"b": 2}'


def test_all_of_short_circuits_on_the_programmatic_judge(serve):
  server = serve(lambda request: ok('{"pass": true}'))
  task = gym.domains.get('calendar').sample_tasks(1, 0, 'train')[0]
  env = gym.ToolEnv(gym.domains.get(task.domain))
  bad = gym.run_episode(env, lambda history: Message('assistant', 'Hmm.'), task)
  result = synth.all_of(synth.judge, synth.LLMJudge(server.backend()))(task, bad)
  assert result == synth.judge(task, bad) and not result.accepted and server.requests == []
  with pytest.raises(ValueError, match='at least one'):
    synth.all_of()


def test_pipeline_with_the_llm_judge(serve, tmp_path):
  """The LLM judge (failing every calendar task) ANDed with the programmatic one; its name keeps runs apart."""
  calendar_policy = gym.domains.get('calendar').system_prompt()

  def reply(request):
    return ok(json.dumps({'pass': calendar_policy not in request['messages'][1]['content'],
                          'reasons': ['wrong calendar']}))
  server = serve(reply)
  judge = synth.all_of(synth.judge, synth.LLMJudge(server.backend()))
  summary = synth.run(tmp_path, SMALL, judge=judge)
  assert summary['per_domain']['calendar'] == {'accepted': 0, 'rejected': 4}
  assert summary['accepted'] == 12 and summary['rejection_reasons'] == {'llm judge': 4}
  assert len(server.requests) == 16
  with pytest.raises(ConfigError, match='another config'):
    synth.run(tmp_path, SMALL)  # the programmatic judge alone is another config


# --- LLM-played users ----------------------------------------------------------------------------------------------

class FollowsThePrompt:
  """A stand-in for a model playing the user as BackendUser's prompt says: it reads its goal and facts from the
  system prompt, tells a fact only when the assistant (its 'user' turns) asks for it, else says goodbye with STOP."""
  name = 'follows-the-prompt'

  def __init__(self, task):
    self.task, self.prompts = task, []

  def complete(self, messages, tools=None):
    self.prompts.append(messages)
    asked = messages[-1].content.lower()
    facts = [f for f in self.task.facts if any(word in asked for word in f.keywords)
             and f'- {f.name}: {f.value}' in messages[0].content]
    if facts:
      return Message('assistant', ' '.join(f.reply for f in facts))
    return Message('assistant', f'Great, thanks! {gym.STOP}')


class NeverEnds:
  name = 'never-ends'

  def __init__(self):
    self.calls = 0

  def complete(self, messages, tools=None):
    self.calls += 1
    return Message('assistant', 'Hmm, and what about the other thing?')


class Broken:
  name = 'broken'

  def complete(self, messages, tools=None):
    raise ConnectionError('the user model is down')


def play_with_user(task, user_backend, **env_kwargs):
  env = gym.ToolEnv(gym.domains.get(task.domain), user_factory=gym.backend_user_factory(user_backend), **env_kwargs)
  return gym.run_episode(env, synth.VariedExpertAgent(task), task)


@pytest.mark.parametrize('name', sorted(gym.domains.DOMAINS))
def test_backend_user_plays_the_task(name):
  for task in gym.domains.get(name).sample_tasks(12, 0, 'train'):
    backend = FollowsThePrompt(task)
    episode = play_with_user(task, backend)
    assert synth.judge(task, episode) == synth.Verdict(True), (task.task_id, synth.judge(task, episode))
    assert episode.messages[-1].content.endswith(gym.STOP)
    system, opening, first = backend.prompts[0][:3]
    assert system.role == 'system' and f'Your goal, which the assistant only knows from what you write: ' \
        f'{task.instruction}' in system.content and gym.STOP in system.content
    assert gym.user.STYLES.get(task.persona, task.persona) in system.content
    assert (opening.role, first.role, first.content) == ('user', 'assistant', task.instruction)
    # roles swap: the assistant's messages are the user model's 'user' turns
    said = [m.content for m in episode.messages if m.role == 'assistant' and not m.tool_calls]
    assert [m.content for m in backend.prompts[-1][3::2]] == said
    if task.kind == 'ask':
      assert set(task.withheld) <= set(episode.info['revealed'])


def test_user_that_never_ends_is_cut_and_rejected(serve, tmp_path):
  task = gym.domains.get('retail').sample_tasks(1, 0, 'train')[0]
  backend = NeverEnds()
  episode = play_with_user(task, backend, max_user_turns=3)
  assert backend.calls == 3 and episode.info['user_turns'] == 3 and episode.info['truncated']
  assert 'the user never ended the conversation within the turn limit' in synth.judge(task, episode).reasons
  # the same over HTTP, in a pipeline run
  server = serve(lambda request: ok('Hmm, and what about the other thing?'))
  summary = synth.run(tmp_path, SMALL, user_factory=gym.backend_user_factory(server.backend()))
  assert summary['accepted'] == 0 and summary['rejected'] == 16
  assert summary['rejection_reasons']['the user never ended the conversation within the turn limit'] == 16
  assert json.loads((tmp_path / 'manifest.json').read_text())['config']['user'] == 'llm_user:openai:fake-model@T=0.0'


def test_failing_user_backend_is_rejected_not_raised(tmp_path):
  summary = synth.run(tmp_path, SMALL, user_factory=gym.backend_user_factory(Broken()))
  assert summary['trajectories'] == 16 and summary['accepted'] == 0
  rejected = judged(tmp_path, 'rejected')
  assert all('user simulator error: ConnectionError: the user model is down' in r['reasons'] for r in rejected)
  assert all(not any('never ended' in reason for reason in r['reasons']) for r in rejected)


# --- controlled failures of the gym's tools ------------------------------------------------------------------------

def retry_failed(messages):
  """Whether a retried call failed again (the expert retries once, so the episode cannot succeed)."""
  results = [m for m in messages if m.role in ('assistant', 'tool')]
  failed_before = False
  for i, message in enumerate(results):
    if message.role == 'assistant':
      failed = any(r.content == gym.TRANSIENT_ERROR for r in results[i + 1:i + 1 + len(message.tool_calls)])
      if failed and failed_before:
        return True
      failed_before = failed
  return False


@pytest.mark.parametrize('name', sorted(gym.domains.DOMAINS))
def test_expert_recovers_from_transient_tool_failures(name):
  transient = calls = 0
  for task in gym.domains.get(name).sample_tasks(40, 0, 'train'):
    episode = expert_episode(task, failure_rate=0.3)
    info = episode.info
    transient += info['transient_errors']
    calls += info['tool_calls']
    failures = [m for m in episode.messages if m.content == gym.TRANSIENT_ERROR]
    assert len(failures) == info['transient_errors'] and info['tool_errors'] == 0
    verdict = synth.judge(task, episode)
    # accepted unless a retry failed too; a retry is never a call beyond the gold ones
    assert verdict.accepted != retry_failed(episode.messages), (task.task_id, verdict)
    if verdict.accepted:
      assert info['tool_calls'] == len(task.gold_actions) + info['transient_errors']
    # call ids count the calls, retries included
    ids = [c.id for m in episode.messages for c in m.tool_calls]
    assert ids == [f'functions.{c.name}:{k}' for k, c in enumerate(c for m in episode.messages for c in m.tool_calls)]
    assert episode.messages == expert_episode(task, failure_rate=0.3).messages  # seeded
  assert 0.15 < transient / calls < 0.45  # the rate asked for, 0.3 (80 to 200 calls a domain: 3 sigma)


def test_transient_failures_do_not_touch_the_database():
  task = next(t for t in gym.domains.get('retail').sample_tasks(20, 0, 'train')
              if gym.gold_state(gym.domains.get('retail'), t) != t.initial_db)
  env = gym.ToolEnv(gym.domains.get('retail'), failure_rate=0.99)
  env.reset(task)
  result = env.step(Message('assistant', tool_calls=task.gold_actions))
  assert env.db == task.initial_db and result.info['transient_errors'] == len(task.gold_actions)
  assert [m.content for m in result.messages] == [gym.TRANSIENT_ERROR] * len(task.gold_actions)
  # an agent that does not retry fails the task, and its failed calls are not beyond the gold ones
  no_retry = [Message('assistant', tool_calls=task.gold_actions), Message('assistant', 'Done.')]
  episode = gym.run_episode(gym.ToolEnv(gym.domains.get('retail'), failure_rate=0.99),
                            lambda history: no_retry[min(1, sum(m.role == 'assistant' for m in history))], task)
  reasons = synth.judge(task, episode).reasons
  assert 'final database differs from the gold state' in reasons
  assert not any('beyond the gold ones' in reason for reason in reasons)
  with pytest.raises(ValueError, match='failure_rate'):
    gym.ToolEnv(gym.domains.get('retail'), failure_rate=1.0)


def test_pipeline_with_failures_keeps_recovered_trajectories(tmp_path):
  config = dataclasses.replace(SMALL, tasks_per_domain=10, failure_rate=0.2)
  summary = synth.run(tmp_path, config)
  accepted = judged(tmp_path, 'accepted')
  recovered = [r for r in accepted if any(m['content'] == gym.TRANSIENT_ERROR for m in r['messages'])]
  assert summary['accepted'] >= 0.9 * 40 and recovered  # the data teaches retrying
  for record in judged(tmp_path, 'rejected'):
    assert retry_failed([Message.from_dict(m) for m in record['messages']])


# --- tool specs: loading, evolution, the simulator -----------------------------------------------------------------

WEATHER = {'type': 'object', 'properties': {'city': {'type': 'string'}, 'unit': {'enum': ['c', 'f']}},
           'required': ['city']}


def write(path, data):
  path.write_text(json.dumps(data) if not isinstance(data, str) else data)
  return path


def test_load_tool_specs_shapes(tmp_path):
  expected = [{'type': 'function', 'function': {'name': 'get_weather', 'description': 'Weather now.',
                                                'parameters': WEATHER}},
              {'type': 'function', 'function': {'name': 'ping', 'description': '',
                                                'parameters': {'type': 'object', 'properties': {}}}}]
  openai_file = write(tmp_path / 'openai.json', [expected[0], {'name': 'ping'}])
  mcp_file = write(tmp_path / 'mcp.json', {'tools': [
      {'name': 'get_weather', 'description': 'Weather now.', 'inputSchema': WEATHER}, {'name': 'ping'}]})
  assert synth.load_tool_specs(openai_file) == synth.load_tool_specs(mcp_file) == expected


@pytest.mark.parametrize('data, message', [
    ('{"tools": [', 'bad.json: not JSON'),
    ({'functions': []}, 'bad.json: expected a list of OpenAI function specs or an MCP tools/list result'),
    ([{'name': 'ok', 'parameters': {'type': 'object', 'properties': {'x': {'type': 'strng'}}}}],
     "bad.json: tool 'ok': invalid parameters schema: "),
    ({'tools': [{'name': 'a'}, {'name': 'b', 'inputSchema': {'type': 'array'}}]},
     "bad.json: tool 'b': parameters must be a JSON schema of type \"object\""),
    ([{'name': 'has space'}], "bad.json: tool 'has space': a name of 1 to 64"),
    ([{'description': 'no name'}], "bad.json: tool '#0': a name of 1 to 64"),
    ([{'name': 'a'}, {'name': 'a'}], "bad.json: tool 'a': declared twice"),
    ([{'type': 'code_interpreter'}], "bad.json: tool '#0': unknown tool type 'code_interpreter'"),
    ([3], "bad.json: tool '#0': a tool must be a JSON object")])
def test_load_tool_specs_bad_files(tmp_path, data, message):
  with pytest.raises(ValueError) as error:
    synth.load_tool_specs(write(tmp_path / 'bad.json', data))
  assert message in str(error.value) and '\n' not in str(error.value)


def schema_kinds(schema):
  """The JSON-schema shapes a parameters schema uses: types, 'enum', 'pattern', bounds."""
  kinds = set()
  for prop in schema['properties'].values():
    kinds.add(prop['type'])
    kinds.update(key for key in ('enum', 'pattern', 'minimum', 'items') if key in prop)
  return kinds


def test_evolved_domains_are_seeded_varied_and_valid(tmp_path):
  domains = synth.evolve_domains(seed=0)
  assert domains == synth.evolve_domains(seed=0) and domains != synth.evolve_domains(seed=1)
  assert {d.category for d in domains} == set(toolspecs.TAXONOMY) and len(domains) == 2 * len(toolspecs.TAXONOMY)
  for domain in domains:  # the hierarchy: each domain from its category, each tool over one of its entities
    assert domain.name in toolspecs.TAXONOMY[domain.category]
    assert {t.collection for t in domain.tools} <= set(toolspecs.TAXONOMY[domain.category][domain.name])
  tools = [t for d in domains for t in d.tools]
  names = [t.name for t in tools]
  assert len(tools) > 40 and len({name.split('_')[0] for name in names}) >= 10  # verbs
  assert {t.operation for t in tools} == set(toolspecs.OPERATIONS)
  kinds = set().union(*(schema_kinds(t.spec['function']['parameters']) for t in tools))
  assert {'string', 'integer', 'number', 'boolean', 'array', 'enum', 'pattern', 'minimum'} <= kinds
  creates = [t.spec['function']['parameters'] for t in tools if t.operation == 'create']
  assert len({len(p['required']) for p in creates}) >= 3 and len({len(p['properties']) for p in creates}) >= 3
  # every evolved spec loads back through the checking loader unchanged
  for domain in domains:
    specs = [dict(t.spec) for t in domain.tools]
    assert synth.load_tool_specs(write(tmp_path / f'{domain.name}.json', specs)) == specs
  with pytest.raises(ValueError, match='domains_per_category'):
    synth.evolve_domains(0, domains_per_category=0)


def domain_with(operations):
  return next(d for d in synth.evolve_domains(0) if {t.operation for t in d.tools if
                                                   t.collection == d.tools[0].collection} == set(operations))


def valid_record(tool, rng):
  """Arguments that fit a create tool's schema: one value per property, by its type."""
  values = {'string': 'x', 'integer': 30, 'number': 12.5, 'boolean': True, 'array': ['a']}
  out = {}
  for name, schema in tool.spec['function']['parameters']['properties'].items():
    out[name] = rng.choice(schema['enum']) if 'enum' in schema else values[schema['type']]
    if name == 'email':
      out[name] = 'ana@example.com'
    if name == 'date':
      out[name] = '2027-01-31'
  return out


def test_tool_simulator_store_is_consistent():
  domain = domain_with(toolspecs.OPERATIONS)
  tools = {t.operation: t for t in domain.tools if t.collection == domain.tools[0].collection}
  simulator = synth.ToolSimulator(domain.tools)

  def call(op, **arguments):
    result, error = simulator(ToolCall(tools[op].name, arguments))
    return (json.loads(result) if error is None else result), error

  rng = random.Random(0)
  first, error = call('create', **valid_record(tools['create'], rng))
  assert error is None and re.fullmatch(rf'{tools["create"].id_prefix}-1', first['id'])
  second, _ = call('create', **valid_record(tools['create'], rng))
  assert second['id'] != first['id']
  assert call('get', id=first['id']) == (first, None)
  field = next(iter(valid_record(tools['create'], rng)))
  changed, error = call('update', id=first['id'], **{field: valid_record(tools['create'], rng)[field]})
  assert error is None and call('get', id=first['id'])[0] == changed
  listed, _ = call('list')
  assert listed == {'count': 2, 'items': [changed, second]} and call('list', limit=1)[0]['items'] == [changed]
  assert call('delete', id=first['id']) == ({'deleted': first['id']}, None)
  missing = call('get', id=first['id'])
  assert missing[1] == 'tool_error' and missing[0].startswith('error: not found')
  assert call('update', id=first['id'], **{field: changed[field]})[1] == 'tool_error'
  before = json.dumps(simulator.store, sort_keys=True)
  assert call('update', id=second['id'])[1] == 'invalid_arguments'  # nothing to change (minProperties)
  assert call('get', id='nope')[1] == 'invalid_arguments'  # not an id of this collection (pattern)
  assert call('create', unknown_field=1)[1] == 'invalid_arguments'
  assert simulator(ToolCall('no_such_tool', {}))[1] == 'unknown_tool'
  assert json.dumps(simulator.store, sort_keys=True) == before  # rejected calls change nothing


def test_tool_simulator_transient_failures():
  domain = synth.evolve_domains(0)[0]
  create = next(t for t in domain.tools if t.operation == 'create')
  rng = random.Random(0)

  def results(seed):
    simulator = synth.ToolSimulator(domain.tools, seed=seed, failure_rate=0.25)
    out = [simulator(ToolCall(create.name, valid_record(create, rng))) for _ in range(400)]
    return out, simulator

  out, simulator = results(seed=3)
  failed = [r for r in out if r == (gym.TRANSIENT_ERROR, 'transient')]
  assert 0.18 < len(failed) / len(out) < 0.32
  assert all(error is None for text, error in out if text != gym.TRANSIENT_ERROR)
  assert len(simulator.store[create.collection]) == len(out) - len(failed)  # failures stored nothing
  assert [r[1] for r in results(seed=3)[0]] == [r[1] for r in out] != [r[1] for r in results(seed=4)[0]]
  with pytest.raises(ValueError, match='failure_rate'):
    synth.ToolSimulator(domain.tools, failure_rate=-0.1)


def test_tools_step(tmp_path):
  specs = write(tmp_path / 'mcp.json', {'tools': [{'name': 'get_weather', 'inputSchema': WEATHER}]})
  config = dataclasses.replace(SMALL, tool_specs=(str(specs),), evolved_domains_per_category=1)
  summary = synth.run(tmp_path / 'run', config)
  catalog = synth.read_jsonl(tmp_path / 'run' / 'tools' / 'tools-00000.jsonl')
  evolved = [t for d in synth.evolve_domains(SMALL.seed, 1) for t in d.tools]
  assert summary['tools'] == len(catalog) == 1 + len(evolved) and summary['accepted'] == 16
  assert catalog[0] == {'source': str(specs), 'category': None, 'domain': None, 'operation': None,
                        'spec': synth.load_tool_specs(specs)[0]}
  assert [r['spec'] for r in catalog[1:]] == [t.spec for t in evolved]
  assert synth.run(tmp_path / 'run', config, on_shard=lambda *_: pytest.fail('rewrote a shard')) == summary
  with pytest.raises(ValueError, match="bad.json: tool 'x'"):
    dataclasses.replace(SMALL, tool_specs=(str(write(tmp_path / 'bad.json', [{'name': 'x', 'parameters': {}}])),))


def launch(*args, timeout=60):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return subprocess.run([sys.executable, '-m', 'experiments.synth', *args], cwd=root, capture_output=True, text=True,
                        timeout=timeout)


@pytest.mark.parametrize('args, message', [
    (['--judge=llm'], 'error: --backend openai and --judge with llm need --base_url and --model'),
    (['--backend=sampler'], 'error: flag --backend=sampler: value should be one of <expert|openai>'),
    (['--failure_rate=1.5'], 'error: failure_rate must be in [0, 1), got 1.5'),
    (['--tool_specs=/nonexistent.json'], 'error: /nonexistent.json: cannot read: No such file or directory')])
def test_launcher_bad_flags(tmp_path, args, message):
  done = launch(f'--out={tmp_path}', *args)
  assert done.returncode != 0 and done.stderr.strip() == message


def test_launcher_over_http(serve, tmp_path):
  """--backend openai --judge programmatic+llm --failure_rate: a subprocess against the fake server, which plays
  the expert for the agent's requests and passes everything as the judge."""
  config = synth.SynthConfig(tasks_per_domain=2, domains=('retail', 'files'))
  by_request = {task.instruction: task for task in all_tasks(config)}

  def reply(request):
    messages = [Message.from_dict(m) for m in request['messages']]
    if messages[0].content == synth.RUBRIC:
      return ok('{"pass": true, "reasons": []}')
    return 200, completion(synth.message_dict(synth.VariedExpertAgent(by_request[messages[1].content])(messages))), 0
  server = serve(reply)
  done = launch(f'--out={tmp_path}', '--tasks_per_domain=2', '--domains=retail,files', '--backend=openai',
                f'--base_url={server.url}', '--model=fake-model', '--judge=programmatic+llm', '--failure_rate=0.3',
                '--max_retries=0', '--timeout_s=5')
  assert done.returncode == 0, done.stderr
  summary = json.loads(done.stdout)
  assert summary['trajectories'] == 4 and summary['accepted'] + summary['rejected'] == 4
  judge_requests = [r for r in server.requests if r['messages'][0]['content'] == synth.RUBRIC]
  assert 1 <= len(judge_requests) == summary['accepted']  # the LLM judge saw what the programmatic one passed
  config = json.loads((tmp_path / 'manifest.json').read_text())['config']
  assert config['judge'] == 'programmatic+llm:openai:fake-model@T=0.0' and config['failure_rate'] == 0.3
