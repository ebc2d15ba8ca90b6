"""Kimi-K2-Instruct's chat format (K2_REFERENCE.md section 5), rendered to text, or to tokens with a loss mask.

    <|im_system|>tool_declare<|im_middle|>[tools as compact JSON]<|im_end|>
    <|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>\n
    <|im_user|>user<|im_middle|>...<|im_end|>
    <|im_assistant|>assistant<|im_middle|>text<|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:0<|tool_call_argument_begin|>{"a": 1}<|tool_call_end|><|tool_calls_section_end|><|im_end|>
    <|im_system|>tool<|im_middle|>## Return of functions.NAME:0
    result text<|im_end|>

Byte for byte what Kimi-K2-Instruct's published chat template (tests/golden/chat/kimi_k2_instruct.jinja, with
its sources) gives; tests/test_chat.py checks it on the golden conversations there. One message per line above;
the messages themselves are joined with nothing between them. The template changed over 2025 and its copies
disagree; this follows the latest revision (Moonshot's October 2025 update, after Kimi-K2 commit 0102674b /
Kimi-K2-Instruct-0905 commit 94a4053e), not the earlier ones, which put default JSON separators (and, in
September's, a `\n  # Tools\n  ` line) in the tool declaration, indented tool results by four spaces and left no
newline after the default system prompt; tests/golden/chat/README.md lists the copies and what each renders
differently. Rules, as in that template:
  * tool declarations (OpenAI function specs, JSON with compact separators, non-ASCII kept) come first, when given;
  * the default system prompt is inserted before the first message when that is not a system message, followed
    by a newline (the template's `{% endif %}` line leaves it; it is the only newline between turns);
  * a header names the message's `name` when it has one, else its role (`<|im_system|>get_weather<|im_middle|>`
    for a tool result sent with the function's name, as K2's tool-call guidance does);
  * an assistant message is its text, then its calls in one section; arguments given as text are written as they
    are, a dict as JSON with the default separators;
  * a tool result is `## Return of ID`, a newline, then its text.
Where the template has nothing to say we choose, and say so: a call without an id gets `functions.NAME:IDX`, IDX
counting the calls of the whole conversation from 0 (the template writes `tool_call['id']` as given, an empty
string when there is none; K2's tool-call guidance fixes only the `functions.NAME:IDX` shape);
a tool message without tool_call_id answers the oldest unanswered call (the template would write an empty id).

`render_text` gives the string; `render` gives token ids and a loss mask that marks what the assistant wrote
(its text, its tool-call section and its closing <|im_end|>, not the `<|im_assistant|>assistant<|im_middle|>`
header). Each message adds its own segments after the earlier ones, never changing them, so rendering the first k
messages is a token prefix of rendering all of them (tests check it): multi-turn training and RL append a turn's
tokens without re-encoding. The published template keeps that property too (it renders each message on its own,
never re-rendering earlier ones, unlike Kimi-K2-Thinking's, which drops reasoning from earlier turns); the two
edges: the default system prompt arrives with the first message (zero messages render no system prompt), and the
generation prompt always says `assistant`, so it is a prefix of the next turn only when that turn has no `name`.
Every text piece sits between special tokens, so encoding piece by piece gives what a tokenizer that splits at
special tokens gives for the whole text. Content given as OpenAI text parts is their texts joined with nothing
between them (the template's `render_content`); image parts are refused (K2 reads text). Any tokenizer with
`encode`, `decode` and a `special_tokens` name -> id dict serves (`Tokenizer`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from k2.data.tokenizer import K2_SPECIAL_TOKENS  # K2_REFERENCE section 5: one table for tokenizer and template

# K2_REFERENCE.md section 5: Kimi K2's special tokens and their ids in its 163840-token vocabulary.
IM_END, IM_USER, IM_ASSISTANT, IM_SYSTEM, IM_MIDDLE = (
    '<|im_end|>', '<|im_user|>', '<|im_assistant|>', '<|im_system|>', '<|im_middle|>')
SECTION_BEGIN, SECTION_END = '<|tool_calls_section_begin|>', '<|tool_calls_section_end|>'
CALL_BEGIN, ARGUMENT_BEGIN, CALL_END = '<|tool_call_begin|>', '<|tool_call_argument_begin|>', '<|tool_call_end|>'
CHAT_SPECIAL_TOKENS = (IM_END, IM_USER, IM_ASSISTANT, IM_SYSTEM, IM_MIDDLE, SECTION_BEGIN, SECTION_END, CALL_BEGIN,
                       ARGUMENT_BEGIN, CALL_END)
DEFAULT_SYSTEM_PROMPT = 'You are Kimi, an AI assistant created by Moonshot AI.'
ROLES = ('system', 'user', 'assistant', 'tool')


class Tokenizer(Protocol):
  """What rendering needs: plain-text encode/decode (special-token strings inside text stay text) and the ids of
  the special tokens by name (at least CHAT_SPECIAL_TOKENS)."""
  special_tokens: Mapping[str, int]

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: Sequence[int]) -> str: ...


@dataclasses.dataclass(frozen=True)
class ToolCall:
  """One call: the tool's name, its arguments (a dict, rendered as JSON, or raw JSON text) and its id."""
  name: str
  arguments: Mapping[str, Any] | str = dataclasses.field(default_factory=dict)
  id: str | None = None

  def arguments_text(self) -> str:
    if isinstance(self.arguments, str):
      return self.arguments
    return json.dumps(self.arguments, ensure_ascii=False)


@dataclasses.dataclass(frozen=True)
class Message:
  """role: 'system' | 'user' | 'assistant' | 'tool'. tool_calls for assistant messages, tool_call_id for tool
  results (None: the oldest unanswered call); name, when set, replaces the role in the header (the template's
  `message.get('name') or message['role']`). weight (assistant messages; OpenAI's fine-tuning format): 0 keeps
  the message in the context but out of the SFT loss (a synthesized slip the next message recovers from); it
  changes nothing in the rendered text."""
  role: str
  content: str = ''
  tool_calls: tuple[ToolCall, ...] = ()
  tool_call_id: str | None = None
  name: str | None = None
  weight: int = 1

  def __post_init__(self):
    if self.role not in ROLES:
      raise ValueError(f'unknown role {self.role!r}; known roles: {", ".join(ROLES)}')
    if self.tool_calls and self.role != 'assistant':
      raise ValueError(f'only assistant messages carry tool calls, not {self.role!r}')
    if self.weight not in (0, 1) or (self.weight == 0 and self.role != 'assistant'):
      raise ValueError(f'weight is 0 or 1, and 0 only on assistant messages; got {self.weight!r} on {self.role!r}')
    object.__setattr__(self, 'tool_calls', tuple(self.tool_calls))

  @classmethod
  def from_dict(cls, message: Mapping[str, Any]) -> 'Message':
    """From the OpenAI chat shape: {'role', 'content', 'tool_calls': [{'id', 'function': {'name', 'arguments'}}],
    'tool_call_id', 'name', 'weight'}."""
    calls = tuple(ToolCall(name=c['function']['name'], arguments=c['function'].get('arguments', {}), id=c.get('id'))
                  for c in message.get('tool_calls') or ())
    return cls(role=message['role'], content=_content_text(message.get('content')), tool_calls=calls,
               tool_call_id=message.get('tool_call_id'), name=message.get('name'),
               weight=message.get('weight', 1))


def _content_text(content: str | Sequence[Mapping[str, Any]] | None) -> str:
  """OpenAI message content as text: None is empty, text parts are joined with nothing between them."""
  if content is None or isinstance(content, str):
    return content or ''
  texts = []
  for part in content:
    if not (isinstance(part, Mapping) and part.get('type') == 'text' and isinstance(part.get('text'), str)):
      raise ValueError(f'content parts must be {{"type": "text", "text": <string>}} (images are not supported); '
                       f'got {str(part)[:80]}')
    texts.append(part['text'])
  return ''.join(texts)


@dataclasses.dataclass(frozen=True)
class Segment:
  """A piece of the rendering: one special token, or plain text; trainable marks what the assistant wrote."""
  text: str
  special: bool
  trainable: bool = False


@dataclasses.dataclass(frozen=True)
class Rendered:
  """text, and its tokens with loss_mask[i] True where token i is assistant output."""
  text: str
  tokens: list[int]
  loss_mask: list[bool]


def _header(role_token: str, role_name: str) -> list[Segment]:
  return [Segment(role_token, True), Segment(role_name, False), Segment(IM_MIDDLE, True)]


def _message_header(message: Message) -> list[Segment]:
  role_token = {'user': IM_USER, 'assistant': IM_ASSISTANT}.get(message.role, IM_SYSTEM)
  return _header(role_token, message.name or message.role)


def segments(messages: Sequence[Message], tools: Sequence[Mapping[str, Any]] | None = None,
             add_generation_prompt: bool = False) -> list[Segment]:
  """The conversation as special tokens and text pieces, in order (see the module docstring for the rules)."""
  out: list[Segment] = []
  if tools:
    out += _header(IM_SYSTEM, 'tool_declare') + [
        Segment(json.dumps(list(tools), ensure_ascii=False, separators=(',', ':')), False), Segment(IM_END, True)]
  if messages and messages[0].role != 'system':
    out += _header(IM_SYSTEM, 'system') + [Segment(DEFAULT_SYSTEM_PROMPT, False), Segment(IM_END, True),
                                           Segment('\n', False)]
  num_calls, unanswered = 0, []
  for message in messages:
    out += _message_header(message)
    if message.role == 'assistant':
      train = message.weight == 1
      out.append(Segment(message.content, False, train))
      if message.tool_calls:
        out.append(Segment(SECTION_BEGIN, True, train))
        for call in message.tool_calls:
          call_id = call.id if call.id is not None else f'functions.{call.name}:{num_calls}'
          num_calls += 1
          unanswered.append(call_id)
          out += [Segment(CALL_BEGIN, True, train), Segment(call_id, False, train),
                  Segment(ARGUMENT_BEGIN, True, train), Segment(call.arguments_text(), False, train),
                  Segment(CALL_END, True, train)]
        out.append(Segment(SECTION_END, True, train))
      out.append(Segment(IM_END, True, train))
    elif message.role == 'tool':
      call_id = message.tool_call_id
      if call_id is None:
        if not unanswered:
          raise ValueError('a tool message without tool_call_id follows no unanswered tool call')
        call_id = unanswered[0]
      if call_id in unanswered:
        unanswered.remove(call_id)
      out += [Segment(f'## Return of {call_id}\n{message.content}', False), Segment(IM_END, True)]
    else:
      out += [Segment(message.content, False), Segment(IM_END, True)]
  if add_generation_prompt:
    out += _header(IM_ASSISTANT, 'assistant')
  return [s for s in out if s.text]


def render_text(messages: Sequence[Message], tools: Sequence[Mapping[str, Any]] | None = None,
                add_generation_prompt: bool = False) -> str:
  """The conversation as K2 chat text."""
  return ''.join(s.text for s in segments(messages, tools, add_generation_prompt))


def check_tokenizer(tokenizer: Tokenizer) -> None:
  """Raises ValueError naming the chat special tokens the tokenizer lacks."""
  missing = [name for name in CHAT_SPECIAL_TOKENS if name not in tokenizer.special_tokens]
  if missing:
    raise ValueError(f'tokenizer lacks the chat special tokens {missing}')


def render(messages: Sequence[Message], tokenizer: Tokenizer, tools: Sequence[Mapping[str, Any]] | None = None,
           add_generation_prompt: bool = False) -> Rendered:
  """The conversation as tokens: each special token is its one id, each text piece is encoded on its own."""
  check_tokenizer(tokenizer)
  pieces = segments(messages, tools, add_generation_prompt)
  tokens: list[int] = []
  loss_mask: list[bool] = []
  for piece in pieces:
    ids = [tokenizer.special_tokens[piece.text]] if piece.special else list(tokenizer.encode(piece.text))
    tokens += ids
    loss_mask += [piece.trainable] * len(ids)
  return Rendered(text=''.join(s.text for s in pieces), tokens=tokens, loss_mask=loss_mask)


def decode(ids: Sequence[int], tokenizer: Tokenizer) -> str:
  """Token ids back to text, special ids written as their names (what `parse_tool_calls` reads)."""
  names = {token_id: name for name, token_id in tokenizer.special_tokens.items()}
  text, run = [], []
  for token_id in ids:
    if token_id in names:
      if run:
        text.append(tokenizer.decode(run))
        run = []
      text.append(names[token_id])
    else:
      run.append(token_id)
  if run:
    text.append(tokenizer.decode(run))
  return ''.join(text)
