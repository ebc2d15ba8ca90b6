"""k2.synth's backends and failure handling (issue 15, acceptance 6): an OpenAI-compatible HTTP backend against a
local fake server that fails in every way (5xx, timeouts, garbage JSON, malformed tool calls) and sometimes answers
well; the LLM judge's pass / fail / unparsable verdicts; an LLM-played user, one that never ends, one whose backend
fails; controlled transient tool failures the expert recovers from; tool specs loaded, evolved and simulated."""

import dataclasses
import http.server
import json
import re
import threading
import time

import jsonschema
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
