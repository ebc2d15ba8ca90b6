"""K2 chat format: byte-for-byte rendering, tokens and loss mask, tool-call round trip, a parser that never raises."""

import json
import os
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from k2 import chat, synth

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ByteTokenizer:
  """Stand-in tokenizer: UTF-8 bytes are ids 0-255; special tokens get the given ids."""

  def __init__(self, special_tokens):
    self.special_tokens = dict(special_tokens)

  def encode(self, text):
    return list(text.encode('utf-8'))

  def decode(self, ids):
    return bytes(ids).decode('utf-8', errors='replace')


SMALL_IDS = ByteTokenizer({name: 256 + i for i, name in enumerate(chat.K2_SPECIAL_TOKENS)})
K2_IDS = ByteTokenizer(chat.K2_SPECIAL_TOKENS)

TOOLS = [{'type': 'function', 'function': {
    'name': 'get_weather', 'description': 'Get the weather of a city.',
    'parameters': {'type': 'object', 'properties': {'city': {'type': 'string'}}, 'required': ['city']}}}]

CONVERSATION = [
    chat.Message('user', 'What is the weather in Paris and in Rome?'),
    chat.Message('assistant', 'Let me check.', tool_calls=(
        chat.ToolCall('get_weather', {'city': 'Paris'}), chat.ToolCall('get_weather', {'city': 'Rome'}))),
    chat.Message('tool', 'Sunny, 24 C'),
    chat.Message('tool', 'Rain, 18 C', tool_call_id='functions.get_weather:1'),
    chat.Message('assistant', 'Paris: sunny, 24 C. Rome: rain, 18 C.'),
    chat.Message('user', 'Thanks! And Oslo?'),
    chat.Message('assistant', tool_calls=(chat.ToolCall('get_weather', {'city': 'Oslo'}),)),
    chat.Message('tool', '{"weather": "Snow", "celsius": -3}'),
    chat.Message('assistant', 'Snow in Oslo, -3 C.'),
]

GOLDEN = os.path.join(ROOT, 'tests', 'golden', 'chat')
with open(os.path.join(GOLDEN, 'conversations.json'), encoding='utf-8') as f:
  GOLDEN_CASES = {case['name']: case for case in json.load(f)}


def golden_text(name):
  """What Kimi-K2-Instruct's published template renders for the golden case (tests/golden/chat/README.md)."""
  with open(os.path.join(GOLDEN, 'rendered', f'{name}.txt'), encoding='utf-8', newline='') as f:
    return f.read()


def golden_messages(name):
  return [chat.Message.from_dict(m) for m in GOLDEN_CASES[name]['messages']]


# The golden case `multi_turn_tool_rounds` is CONVERSATION with every call id and tool_call_id written out.
EXPECTED_TEXT = golden_text('multi_turn_tool_rounds')
ASSISTANT_OUTPUTS = [
    EXPECTED_TEXT.split('<|im_assistant|>assistant<|im_middle|>')[i].split('<|im_end|>')[0] + '<|im_end|>'
    for i in (1, 2, 3, 4)]


@pytest.mark.parametrize('name', sorted(GOLDEN_CASES))
def test_renders_byte_for_byte_as_the_published_template(name):
  case = GOLDEN_CASES[name]
  expected = golden_text(name)
  messages = golden_messages(name)
  assert chat.render_text(messages, tools=case.get('tools'),
                          add_generation_prompt=case['add_generation_prompt']) == expected
  for tokenizer in (SMALL_IDS, K2_IDS):
    rendered = chat.render(messages, tokenizer, tools=case.get('tools'),
                           add_generation_prompt=case['add_generation_prompt'])
    assert rendered.text == expected
    assert chat.decode(rendered.tokens, tokenizer) == expected
    for token_name in chat.CHAT_SPECIAL_TOKENS:  # each special token is its one id, never spelled out in text
      assert rendered.tokens.count(tokenizer.special_tokens[token_name]) == expected.count(token_name), token_name


def test_default_call_ids_and_tool_call_ids_match_the_written_out_ones():
  assert CONVERSATION[0].role == 'user' and GOLDEN_CASES['multi_turn_tool_rounds']['tools'] == TOOLS
  assert chat.render_text(CONVERSATION, tools=TOOLS) == EXPECTED_TEXT


def test_system_message_generation_prompt_and_openai_dicts():
  messages = [chat.Message.from_dict(m) for m in [
      {'role': 'system', 'content': 'Be brief.'},
      {'role': 'user', 'content': 'hi'},
      {'role': 'assistant', 'content': None, 'tool_calls': [
          {'id': 'functions.f:7', 'type': 'function', 'function': {'name': 'f', 'arguments': '{"x": [1, 2]}'}}]},
      {'role': 'tool', 'tool_call_id': 'functions.f:7', 'content': 'ok'},
  ]]
  assert chat.render_text(messages, add_generation_prompt=True) == (
      '<|im_system|>system<|im_middle|>Be brief.<|im_end|>'
      '<|im_user|>user<|im_middle|>hi<|im_end|>'
      '<|im_assistant|>assistant<|im_middle|><|tool_calls_section_begin|><|tool_call_begin|>functions.f:7'
      '<|tool_call_argument_begin|>{"x": [1, 2]}<|tool_call_end|><|tool_calls_section_end|><|im_end|>'
      '<|im_system|>tool<|im_middle|>## Return of functions.f:7\nok<|im_end|>'
      '<|im_assistant|>assistant<|im_middle|>')


@pytest.mark.parametrize('part', [
    {'type': 'image_url', 'image_url': {'url': 'https://example.com/cat.png'}}, {'type': 'text'}, 'plain string'])
def test_content_parts_other_than_text_are_a_one_line_error(part):
  # Text parts are joined as the template joins them (golden case `content_parts`); K2 here reads no images.
  with pytest.raises(ValueError, match='content parts must be'):
    chat.Message.from_dict({'role': 'user', 'content': [{'type': 'text', 'text': 'look: '}, part]})


@pytest.mark.parametrize('tokenizer', [SMALL_IDS, K2_IDS], ids=['small_ids', 'k2_ids'])
def test_tokens_and_loss_mask_match_the_text(tokenizer):
  rendered = chat.render(CONVERSATION, tokenizer, tools=TOOLS)
  assert rendered.text == EXPECTED_TEXT
  assert len(rendered.tokens) == len(rendered.loss_mask)
  assert chat.decode(rendered.tokens, tokenizer) == EXPECTED_TEXT
  # Every special token is its single id (K2's ids when the tokenizer has them).
  for name, token_id in tokenizer.special_tokens.items():
    assert rendered.tokens.count(token_id) == EXPECTED_TEXT.count(name), name
  if tokenizer is K2_IDS:
    assert rendered.tokens[0] == 163594 and rendered.tokens[-1] == 163586
  # The masked tokens are exactly the assistant outputs, each ending with its <|im_end|>.
  runs, current = [], []
  for token, trainable in zip(rendered.tokens, rendered.loss_mask):
    if trainable:
      current.append(token)
    elif current:
      runs.append(current)
      current = []
  runs += [current] if current else []
  assert [chat.decode(run, tokenizer) for run in runs] == ASSISTANT_OUTPUTS


def test_weight_zero_keeps_an_assistant_message_in_the_text_and_out_of_the_loss():
  # OpenAI's fine-tuning shape: {"role": "assistant", ..., "weight": 0}. Only the first assistant message is
  # weighted out; the text is unchanged, and so are the other messages' masks.
  dicts = [synth.message_dict(m) for m in CONVERSATION]
  first = next(i for i, m in enumerate(dicts) if m['role'] == 'assistant')
  dicts[first]['weight'] = 0
  weighted = [chat.Message.from_dict(m) for m in dicts]
  assert [synth.message_dict(m) for m in weighted] == dicts
  plain = chat.render(CONVERSATION, SMALL_IDS, tools=TOOLS)
  rendered = chat.render(weighted, SMALL_IDS, tools=TOOLS)
  assert rendered.text == plain.text and rendered.tokens == plain.tokens
  dropped = [t for t, a, b in zip(rendered.tokens, plain.loss_mask, rendered.loss_mask) if a and not b]
  assert chat.decode(dropped, SMALL_IDS) == ASSISTANT_OUTPUTS[0]
  assert sum(plain.loss_mask) - sum(rendered.loss_mask) == len(dropped) > 0
  for bad in ({'role': 'user', 'content': 'hi', 'weight': 0}, {'role': 'assistant', 'content': 'x', 'weight': 2}):
    with pytest.raises(ValueError, match='weight is 0 or 1'):
      chat.Message.from_dict(bad)


def test_tokenizer_without_chat_tokens_is_one_line_error():
  with pytest.raises(ValueError, match=r"lacks the chat special tokens \['<\|im_middle\|>'\]"):
    chat.render(CONVERSATION, ByteTokenizer({k: v for k, v in chat.K2_SPECIAL_TOKENS.items() if k != '<|im_middle|>'}))


def test_parser_reads_the_reference_outputs():
  parsed = chat.parse_tool_calls(ASSISTANT_OUTPUTS[0])
  assert parsed.errors == []
  assert parsed.content == 'Let me check.'
  assert parsed.tool_calls == [chat.ToolCall('get_weather', {'city': 'Paris'}, 'functions.get_weather:0'),
                               chat.ToolCall('get_weather', {'city': 'Rome'}, 'functions.get_weather:1')]
  plain = chat.parse_tool_calls(ASSISTANT_OUTPUTS[1])
  assert (plain.content, plain.tool_calls, plain.errors) == ('Paris: sunny, 24 C. Rome: rain, 18 C.', [], [])


@pytest.mark.parametrize('output,expected_calls,error', [
    ('<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>{"a": 1',
     0, 'arguments of functions.f:0 are not JSON'),
    ('<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>[1]<|tool_call_end|>'
     '<|tool_calls_section_end|>', 0, 'not a JSON object'),
    ('<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>{}<|tool_call_end|>',
     1, 'tool-call section is truncated'),
    ('<|tool_calls_section_begin|><|tool_call_begin|>bad id!<|tool_call_argument_begin|>{}<|tool_call_end|>'
     '<|tool_calls_section_end|>', 0, 'cannot read the call id'),
    ('<|tool_calls_section_begin|><|tool_call_begin|>functions.f', 0, 'call without <|tool_call_argument_begin|>'),
    ('hi<|tool_call_begin|>f:3<|tool_call_argument_begin|>{}<|tool_call_end|>', 1, 'tool calls without'),
])
def test_parser_reports_malformed_output(output, expected_calls, error):
  parsed = chat.parse_tool_calls(output)
  assert len(parsed.tool_calls) == expected_calls
  assert any(error in e for e in parsed.errors), parsed.errors


# Text that cannot contain a special-token name (the text format cannot tell them apart; token ids can).
plain_text = st.text(max_size=30).filter(lambda s: '<|' not in s)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | plain_text,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(plain_text, children, max_size=3),
    max_leaves=8)
tool_calls = st.lists(st.builds(
    chat.ToolCall, name=st.from_regex(r'[A-Za-z_][A-Za-z0-9_]{0,15}', fullmatch=True),
    arguments=st.dictionaries(plain_text, json_values, max_size=4)), min_size=1, max_size=3)


def assistant_output(content, calls):
  """What the model would emit for this assistant message: the rendering after the assistant header."""
  text = chat.render_text([chat.Message('user', 'u'), chat.Message('assistant', content, tool_calls=tuple(calls))])
  return text.split('<|im_assistant|>assistant<|im_middle|>', 1)[1]


@settings(max_examples=150, deadline=None)
@given(content=plain_text, calls=tool_calls)
def test_round_trip_render_then_parse(content, calls):
  parsed = chat.parse_tool_calls(assistant_output(content, calls))
  assert parsed.errors == []
  assert parsed.content == content
  assert [(c.name, c.arguments, c.id) for c in parsed.tool_calls] == [
      (c.name, json.loads(json.dumps(c.arguments)), f'functions.{c.name}:{i}') for i, c in enumerate(calls)]
  # The same through tokens: the loss-masked tokens decode to the same output.
  rendered = chat.render([chat.Message('user', 'u'), chat.Message('assistant', content, tool_calls=tuple(calls))],
                         K2_IDS)
  masked = [t for t, m in zip(rendered.tokens, rendered.loss_mask) if m]
  assert chat.parse_tool_calls(chat.decode(masked, K2_IDS)).tool_calls == parsed.tool_calls


pieces = st.sampled_from(list(chat.CHAT_SPECIAL_TOKENS) + [
    'functions.get_weather:0', 'f', ':', '{', '}', '[', ']', '"', '{"a": 1}', '\n', ' ', '\\', 'functions.'])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(pieces, st.text(max_size=12)), max_size=40))
def test_parser_never_raises_on_random_output(parts):
  parsed = chat.parse_tool_calls(''.join(parts))
  assert isinstance(parsed, chat.ParsedOutput)
  assert not any(e.startswith('internal parser error') for e in parsed.errors)
  for call in parsed.tool_calls:
    assert isinstance(call.name, str) and isinstance(call.arguments, dict)


@settings(max_examples=150, deadline=None)
@given(content=plain_text, calls=tool_calls, data=st.data())
def test_parser_on_truncated_output_returns_a_prefix_of_the_calls(content, calls, data):
  full = assistant_output(content, calls)
  cut = data.draw(st.integers(0, len(full)))
  parsed = chat.parse_tool_calls(full[:cut])
  assert not any(e.startswith('internal parser error') for e in parsed.errors)
  expected = chat.parse_tool_calls(full).tool_calls
  assert parsed.tool_calls == expected[:len(parsed.tool_calls)]
  assert full.startswith(parsed.content)
  if '<|tool_calls_section_begin|>' in full[:cut] and '<|tool_calls_section_end|>' not in full[:cut]:
    assert parsed.errors  # a cut inside the call section is always reported


def check_prefix_property_and_loss_mask(messages, tools, tokenizer):
  """Rendering the first k messages is a token (and loss-mask) prefix of rendering them all, for every k; so is the
  generation prompt before an assistant turn. The tokens message k adds are its header, not trained, then its
  body, trained exactly when it is an assistant turn (text, tool calls and the closing <|im_end|>)."""
  special = tokenizer.special_tokens
  renders = [chat.render(messages[:k], tokenizer, tools=tools) for k in range(len(messages) + 1)]
  full = renders[-1]
  for k, part in enumerate(renders):
    assert full.tokens[:len(part.tokens)] == part.tokens, k
    assert full.loss_mask[:len(part.loss_mask)] == part.loss_mask, k
    if k < len(messages) and messages[k].role == 'assistant' and messages[k].name is None:
      prompt = chat.render(messages[:k], tokenizer, tools=tools, add_generation_prompt=True).tokens
      assert full.tokens[:len(prompt)] == prompt, k
  for i, message in enumerate(messages):
    tokens = renders[i + 1].tokens[len(renders[i].tokens):]
    mask = renders[i + 1].loss_mask[len(renders[i].loss_mask):]
    if i == 0 and message.role != 'system':  # the default system prompt comes with the first message
      preamble = ([special['<|im_system|>']] + tokenizer.encode('system') + [special['<|im_middle|>']]
                  + tokenizer.encode(chat.DEFAULT_SYSTEM_PROMPT) + [special['<|im_end|>']] + tokenizer.encode('\n'))
      assert tokens[:len(preamble)] == preamble and not any(mask[:len(preamble)])
      tokens, mask = tokens[len(preamble):], mask[len(preamble):]
    role_token = {'user': '<|im_user|>', 'assistant': '<|im_assistant|>'}.get(message.role, '<|im_system|>')
    header = [special[role_token]] + tokenizer.encode(message.name or message.role) + [special['<|im_middle|>']]
    assert tokens[:len(header)] == header and tokens[-1] == special['<|im_end|>'], i
    assert mask == [False] * len(header) + [message.role == 'assistant'] * (len(tokens) - len(header)), i


@pytest.mark.parametrize('name', sorted(GOLDEN_CASES))
def test_prefix_property_and_loss_mask_on_the_golden_conversations(name):
  case = GOLDEN_CASES[name]
  for tokenizer in (SMALL_IDS, K2_IDS):
    check_prefix_property_and_loss_mask(golden_messages(name), case.get('tools'), tokenizer)


names = st.none() | st.from_regex(r'[a-z_]{1,8}', fullmatch=True)


@st.composite
def conversations(draw):
  """system?, then rounds of user -> assistant (text, or calls answered by tool results, then text)."""
  messages = [chat.Message('system', draw(plain_text))] if draw(st.booleans()) else []
  for _ in range(draw(st.integers(1, 3))):
    messages.append(chat.Message('user', draw(plain_text), name=draw(names)))
    for _ in range(draw(st.integers(0, 2))):
      calls = draw(tool_calls)
      messages.append(chat.Message('assistant', draw(plain_text), tool_calls=tuple(calls)))
      for call in calls:
        messages.append(chat.Message('tool', draw(plain_text), name=draw(st.sampled_from([None, call.name]))))
    messages.append(chat.Message('assistant', draw(plain_text), name=draw(st.none() | st.just('kimi'))))
  return messages


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages=conversations(), with_tools=st.booleans())
def test_prefix_property_and_loss_mask_on_random_conversations(messages, with_tools):
  check_prefix_property_and_loss_mask(messages, TOOLS if with_tools else None, SMALL_IDS)


def test_declarations_and_running_calls():
  declaration = chat.declaration(chat.LOCAL_TOOLS['calculator'])
  assert declaration['function']['name'] == 'calculator'
  assert declaration['function']['parameters'] == {
      'type': 'object', 'properties': {'expression': {'type': 'string'}}, 'required': ['expression']}
  assert chat.declaration(chat.LOCAL_TOOLS['current_time'])['function']['parameters']['required'] == []
  assert chat.run_call(chat.ToolCall('calculator', {'expression': '17 * (2 + 1)'}), chat.LOCAL_TOOLS) == '51'
  assert chat.run_call(chat.ToolCall('word_count', '{"text": "a b c"}'), chat.LOCAL_TOOLS) == '3'
  assert chat.run_call(chat.ToolCall('calculator', {'expression': '__import__("os")'}),
                       chat.LOCAL_TOOLS).startswith('error: ValueError')
  assert chat.run_call(chat.ToolCall('calculator', {'wrong': 1}), chat.LOCAL_TOOLS).startswith('error: TypeError')
  assert chat.run_call(chat.ToolCall('nope', {}), chat.LOCAL_TOOLS).startswith("error: unknown tool 'nope'")


def test_respond_runs_tool_calls_and_feeds_results_back():
  """The CLI's loop with a scripted model: a calculator call first, then an answer that uses its result."""
  from experiments import chat as chat_cli
  tokenizer = chat_cli.ByteTokenizer()
  special = tokenizer.special_tokens
  call_turn = ([special['<|tool_calls_section_begin|>'], special['<|tool_call_begin|>']]
               + tokenizer.encode('functions.calculator:0') + [special['<|tool_call_argument_begin|>']]
               + tokenizer.encode('{"expression": "6 * 7"}')
               + [special['<|tool_call_end|>'], special['<|tool_calls_section_end|>'], special['<|im_end|>']])
  answer_turn = tokenizer.encode('It is 42.') + [special['<|im_end|>']]
  prompts = []

  def scripted_stream(prompt, max_new_tokens, stop, seed):
    prompts.append(chat.decode(prompt, tokenizer))
    return [(t, 0.0) for t in (call_turn if len(prompts) == 1 else answer_turn)]

  conversation = [chat.Message('user', 'What is 6 * 7?')]
  shown = []
  new = chat_cli.respond(conversation, scripted_stream, tokenizer, {'calculator': chat.LOCAL_TOOLS['calculator']},
                         max_new_tokens=64, max_tool_rounds=2, write=shown.append)
  assert [m.role for m in new] == ['assistant', 'tool', 'assistant']
  assert new[1].content == '42' and new[2].content == 'It is 42.'
  assert prompts[0].startswith('<|im_system|>tool_declare<|im_middle|>[{"type":"function"')
  assert prompts[1].endswith('## Return of functions.calculator:0\n42<|im_end|><|im_assistant|>assistant<|im_middle|>')
  assert 'It is 42.' in ''.join(shown)


def test_chat_cli_one_shot_on_a_saved_checkpoint(tmp_path):
  from k2 import convert
  from k2 import model as model_lib
  from k2.config import get_config
  convert.save_orbax(model_lib.create(get_config('k2_tiny', vocab_size=512, num_layers=1), seed=0),
                     str(tmp_path / 'model'))
  result = subprocess.run(
      [sys.executable, '-m', 'experiments.chat', f'--checkpoint={tmp_path / "model"}', '--prompt=hello',
       '--tools=calculator,current_time', '--max_new_tokens=8', '--temperature=0'],
      cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.startswith('kimi> ')
  bad = subprocess.run([sys.executable, '-m', 'experiments.chat', f'--checkpoint={tmp_path / "model"}',
                        '--tools=rm_rf'], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert bad.returncode != 0 and bad.stderr.strip().splitlines()[-1].startswith('error: unknown tools')
