"""The OpenAI-compatible server (k2.serve, experiments/serve.py): a real server process on a tiny exported model,
talked to with the official `openai` client, plus the output -> OpenAI conversion on planted model outputs."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import openai
import pytest

from k2 import chat
from k2.serve import loading, protocol

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEATHER_TOOL = {'type': 'function', 'function': {
    'name': 'get_weather', 'description': 'Current weather of a city.',
    'parameters': {'type': 'object', 'properties': {'city': {'type': 'string'}}, 'required': ['city']}}}
GREEDY = {'temperature': 0.0, 'max_tokens': 8, 'seed': 0}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.fixture(scope='module')
def server(tmp_path_factory):
  """One server process for the module: (client, model name, base url, tokenizer)."""
  from k2 import model as model_lib
  from k2.config import get_config
  from k2.data import tokenizer as tokenizer_lib
  from k2.train import recipe
  work = tmp_path_factory.mktemp('serve')
  texts = ['the weather in Paris is sunny', 'hello there, how are you today?', 'call get_weather for Tokyo'] * 4
  tokenizer_path = str(work / 'tokenizer.json')
  tokenizer = tokenizer_lib.train_bpe(lambda: texts, vocab_size=400, path=tokenizer_path)
  model_dir = str(work / 'model')
  # The model's vocabulary is the tokenizer's, so every sampled id decodes to text.
  config = get_config('k2_tiny', num_layers=2, dtype='float32', vocab_size=tokenizer.vocab_size)
  recipe.export_model(model_lib.create(config), model_dir, tokenizer_path)
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'} | {'JAX_PLATFORMS': 'cpu'}
  log = open(work / 'server.log', 'w+')
  process = subprocess.Popen([sys.executable, '-m', 'experiments.serve', '--checkpoint', model_dir, '--host',
                              '127.0.0.1', '--port', str(port)], cwd=ROOT, env=env, stdout=log, stderr=log)
  base_url = f'http://127.0.0.1:{port}/v1'
  client = openai.OpenAI(base_url=base_url, api_key='none', max_retries=0, timeout=120)
  try:
    deadline = time.time() + 180
    while True:
      if process.poll() is not None:
        log.seek(0)
        raise RuntimeError(f'the server exited ({process.returncode}):\n{log.read()[-3000:]}')
      try:
        client.models.list()
        break
      except openai.APIConnectionError:
        if time.time() > deadline:
          raise
        time.sleep(0.5)
    yield client, model_dir, base_url, tokenizer
  finally:
    process.terminate()
    try:
      process.wait(timeout=30)
    except subprocess.TimeoutExpired:
      process.kill()
    log.close()


def _post(url: str, body: bytes) -> tuple[int, dict]:
  request = urllib.request.Request(url, data=body, headers={'Content-Type': 'application/json'})
  try:
    with urllib.request.urlopen(request, timeout=120) as response:
      return response.status, json.loads(response.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


def _assert_serves(client, name):
  reply = client.chat.completions.create(model=name, messages=[{'role': 'user', 'content': 'hello'}], **GREEDY)
  assert len(reply.choices) == 1 and reply.choices[0].message.role == 'assistant'


def test_models_lists_the_checkpoint(server):
  client, name, _, _ = server
  assert [m.id for m in client.models.list().data] == [name]


def test_plain_completion(server):
  client, name, _, tokenizer = server
  messages = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'hello there'}]
  reply = client.chat.completions.create(model=name, messages=messages, **GREEDY)
  assert reply.object == 'chat.completion' and reply.model == name and len(reply.choices) == 1
  choice = reply.choices[0]
  assert choice.message.role == 'assistant' and choice.finish_reason in ('stop', 'length', 'tool_calls')
  prompt = chat.render([chat.Message('system', 'Be brief.'), chat.Message('user', 'hello there')], tokenizer,
                       add_generation_prompt=True).tokens
  assert reply.usage.prompt_tokens == len(prompt)
  assert 1 <= reply.usage.completion_tokens <= GREEDY['max_tokens']
  assert reply.usage.total_tokens == len(prompt) + reply.usage.completion_tokens
  if choice.finish_reason == 'length':
    assert reply.usage.completion_tokens == GREEDY['max_tokens']


def test_streaming_assembles_to_the_greedy_completion(server):
  client, name, _, _ = server
  messages = [{'role': 'user', 'content': 'the weather in Paris'}]
  whole = client.chat.completions.create(model=name, messages=messages, **GREEDY)
  assert whole.choices[0].message.content  # this (untrained, seeded) model writes text here: a real comparison
  chunks = list(client.chat.completions.create(model=name, messages=messages, stream=True,
                                               stream_options={'include_usage': True}, **GREEDY))
  assert all(c.object == 'chat.completion.chunk' for c in chunks)
  deltas = [c.choices[0].delta for c in chunks if c.choices]
  assert deltas[0].role == 'assistant'
  assert ''.join(d.content or '' for d in deltas) == (whole.choices[0].message.content or '')
  finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
  assert finish == [whole.choices[0].finish_reason]
  streamed_calls = [call.function.name for d in deltas for call in d.tool_calls or ()]
  assert streamed_calls == [call.function.name for call in whole.choices[0].message.tool_calls or ()]
  assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
  assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
  two = list(client.chat.completions.create(model=name, messages=messages, stream=True, n=2, **GREEDY))
  for index in (0, 1):  # n > 1 streams each choice under its index
    assert ''.join(c.choices[0].delta.content or '' for c in two
                   if c.choices and c.choices[0].index == index) == whole.choices[0].message.content


def test_n_samples_in_one_request(server):
  client, name, _, _ = server
  reply = client.chat.completions.create(model=name, messages=[{'role': 'user', 'content': 'hello'}], n=3,
                                         temperature=1.0, top_p=0.9, max_tokens=8, seed=2**40)
  assert [c.index for c in reply.choices] == [0, 1, 2]
  assert all(c.message.role == 'assistant' for c in reply.choices)
  assert reply.usage.completion_tokens <= 3 * 8


def test_tools_and_a_tool_call_turn(server):
  """A conversation with declared tools, an assistant tool call and its result; any valid response shape."""
  client, name, _, _ = server
  messages = [
      {'role': 'user', 'content': 'Weather in Paris?'},
      {'role': 'assistant', 'content': None, 'tool_calls': [{'id': 'functions.get_weather:0', 'type': 'function',
                                                              'function': {'name': 'get_weather',
                                                                           'arguments': '{"city": "Paris"}'}}]},
      {'role': 'tool', 'tool_call_id': 'functions.get_weather:0', 'content': 'sunny, 21 C'},
      {'role': 'user', 'content': 'And in Tokyo?'}]
  reply = client.chat.completions.create(model=name, messages=messages, tools=[WEATHER_TOOL], stop=['\n\n'],
                                         **GREEDY)
  choice = reply.choices[0]
  assert choice.finish_reason in ('stop', 'length', 'tool_calls')
  for call in choice.message.tool_calls or ():
    assert call.type == 'function' and call.function.name and isinstance(json.loads(call.function.arguments), dict)
  assert (choice.finish_reason == 'tool_calls') == bool(choice.message.tool_calls) or choice.finish_reason == 'length'


def test_bad_requests_get_error_json_and_the_server_keeps_serving(server):
  client, name, base_url, _ = server
  status, body = _post(f'{base_url}/chat/completions', b'{"model": "x", "messages": [')
  assert status == 400 and set(body['error']) == {'message', 'type', 'param', 'code'}
  assert body['error']['type'] == 'invalid_request_error'
  _assert_serves(client, name)

  status, body = _post(f'{base_url}/chat/completions', json.dumps({'model': name}).encode())
  assert status == 400 and body['error']['param'] == 'messages'

  with pytest.raises(openai.NotFoundError) as missing:
    client.chat.completions.create(model='gpt-nope', messages=[{'role': 'user', 'content': 'hi'}])
  assert missing.value.status_code == 404 and missing.value.body['code'] == 'model_not_found'
  _assert_serves(client, name)

  with pytest.raises(openai.BadRequestError) as too_long:
    client.chat.completions.create(model=name, messages=[{'role': 'user', 'content': 'weather ' * 1100}],
                                   max_tokens=8)
  assert too_long.value.body['code'] == 'context_length_exceeded'
  _assert_serves(client, name)

  for bad in ({'temperature': 7.0}, {'top_p': 0.0}, {'max_tokens': 0}, {'n': 0}, {'stop': ['a', 'b', 'c', 'd', 'e']}):
    with pytest.raises(openai.BadRequestError) as invalid:
      client.chat.completions.create(model=name, messages=[{'role': 'user', 'content': 'hi'}], **bad)
    assert invalid.value.body['param'] == next(iter(bad)), bad
  with pytest.raises(openai.BadRequestError):  # a tool result that answers no call
    client.chat.completions.create(model=name, messages=[{'role': 'tool', 'content': 'sunny'}], max_tokens=8)
  _assert_serves(client, name)


# The conversion of model output to OpenAI messages, on planted outputs (no server).

BYTES = loading.ByteTokenizer()
SPECIAL = BYTES.special_tokens


def _ids(*pieces: str) -> list[int]:
  return [i for p in pieces for i in ([SPECIAL[p]] if p in SPECIAL else BYTES.encode(p))]


def _complete(ids, stop=()):
  completion = protocol.Completion(BYTES, stop)
  streamed = []
  for token in ids:
    streamed.append(completion.add(token))
    if completion.stopped:
      break
  message, reason, rest = completion.finish()
  return message, reason, ''.join(streamed) + rest


def test_requests_become_k2_messages_and_declarations():
  request = protocol.ChatRequest.model_validate({'model': 'm', 'tools': [WEATHER_TOOL], 'messages': [
      {'role': 'developer', 'content': [{'type': 'text', 'text': 'Be '}, {'type': 'text', 'text': 'brief.'}]},
      {'role': 'user', 'content': 'Weather in Paris?'},
      {'role': 'assistant', 'content': None, 'tool_calls': [
          {'id': 'functions.get_weather:0', 'type': 'function',
           'function': {'name': 'get_weather', 'arguments': '{"city": "Paris"}'}}]},
      {'role': 'tool', 'tool_call_id': 'functions.get_weather:0', 'content': 'sunny'}]})
  messages, tools = protocol.to_chat(request)
  assert tools == [WEATHER_TOOL]  # rendered as the client declared them
  assert messages == [
      chat.Message('system', 'Be brief.'), chat.Message('user', 'Weather in Paris?'),
      chat.Message('assistant', '', tool_calls=(chat.ToolCall('get_weather', '{"city": "Paris"}',
                                                              'functions.get_weather:0'),)),
      chat.Message('tool', 'sunny', tool_call_id='functions.get_weather:0')]


def test_tool_call_output_becomes_openai_tool_calls():
  from openai.types.chat import ChatCompletionMessage
  output = _ids('Let me check.', '<|tool_calls_section_begin|>', '<|tool_call_begin|>', 'functions.get_weather:0',
                '<|tool_call_argument_begin|>', '{"city": "Paris"}', '<|tool_call_end|>', '<|tool_call_begin|>',
                'functions.get_time:1', '<|tool_call_argument_begin|>', '{}', '<|tool_call_end|>',
                '<|tool_calls_section_end|>', '<|im_end|>')
  message, reason, streamed = _complete(output)
  assert reason == 'tool_calls' and streamed == message['content'] == 'Let me check.'
  assert message['tool_calls'] == [
      {'id': 'functions.get_weather:0', 'type': 'function',
       'function': {'name': 'get_weather', 'arguments': '{"city": "Paris"}'}},
      {'id': 'functions.get_time:1', 'type': 'function', 'function': {'name': 'get_time', 'arguments': '{}'}}]
  ChatCompletionMessage.model_validate(message)  # the shape the official client reads
  # The ids round-trip: sent back as the next request's history, they render the model's own text.
  history = protocol.ChatRequest.model_validate({'model': 'm', 'messages': [message]})
  rendered = chat.render_text(protocol.to_chat(history)[0])
  assert rendered.endswith(chat.decode(output, BYTES))


def test_malformed_output_returns_what_parsed_as_content():
  cases = {
      'truncated call': (_ids('Hi', '<|tool_calls_section_begin|>', '<|tool_call_begin|>', 'functions.f:0',
                              '<|tool_call_argument_begin|>', '{"a": '), 'Hi', 'length'),
      'arguments not JSON': (_ids('Hm', '<|tool_calls_section_begin|>', '<|tool_call_begin|>', 'functions.f:0',
                                  '<|tool_call_argument_begin|>', 'not json', '<|tool_call_end|>',
                                  '<|tool_calls_section_end|>', '<|im_end|>'), 'Hm', 'stop'),
      'stray markers': (_ids('<|tool_call_end|>', 'x', '<|im_user|>', '<|im_end|>'), '<|tool_call_end|>x<|im_user|>',
                        'stop'),
      'bytes cut mid-character': (BYTES.encode('caf\u00e9')[:-1], 'caf\ufffd', 'length'),
  }
  for name, (ids, content, reason) in cases.items():
    message, got_reason, streamed = _complete(ids)
    assert (message['content'], got_reason, streamed) == (content, reason, content), name
    assert 'tool_calls' not in message, name


def test_ids_the_tokenizer_cannot_decode_are_left_out():
  class SmallVocabulary(loading.ByteTokenizer):
    def decode(self, ids):
      if any(i >= 256 for i in ids):
        raise KeyError(f'unknown ids {[i for i in ids if i >= 256]}')
      return super().decode(ids)

  completion = protocol.Completion(SmallVocabulary(), ())
  deltas = [completion.add(t) for t in BYTES.encode('ab') + [3000] + BYTES.encode('c') + [SPECIAL['<|im_end|>']]]
  message, reason, rest = completion.finish()
  assert (message['content'], reason, ''.join(deltas) + rest) == ('abc', 'stop', 'abc')
  assert len(completion.ids) == 5 and 'token 3000 does not decode' in completion.errors[0]


def test_stop_strings_cut_the_output_and_are_held_back_while_streaming():
  completion = protocol.Completion(BYTES, stop=['world'])
  deltas = [completion.add(t) for t in BYTES.encode('Hello wor')]
  assert ''.join(deltas) == 'Hello '  # 'wor' could begin the stop string
  deltas += [completion.add(t) for t in BYTES.encode('ld and more')]
  assert completion.stopped
  message, reason, rest = completion.finish()
  assert (message['content'], reason, ''.join(deltas) + rest) == ('Hello ', 'stop', 'Hello ')
