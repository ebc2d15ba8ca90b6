"""Kimi-K2-Instruct's chat format (K2_REFERENCE.md section 5), rendered to text, or to tokens with a loss mask.

    <|im_system|>tool_declare<|im_middle|>[tools as JSON]<|im_end|>
    <|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>
    <|im_user|>user<|im_middle|>...<|im_end|>
    <|im_assistant|>assistant<|im_middle|>text<|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:0<|tool_call_argument_begin|>{"a": 1}<|tool_call_end|><|tool_calls_section_end|><|im_end|>
    <|im_system|>tool<|im_middle|>## Return of functions.NAME:0
    result text<|im_end|>

The reference prints one message per line; the messages themselves are joined with nothing between them, as
Kimi-K2-Instruct's own template does (its Jinja trims every newline between tags). The one newline the format
holds is the one after `## Return of ID` in a tool result. Rules, as in that template:
  * tool declarations (OpenAI function specs, `json.dumps` with its default separators) come first, when given;
  * the default system prompt above is inserted when the first message is not a system message;
  * an assistant message is its text, then its calls in one section; a call's id defaults to
    `functions.NAME:IDX`, IDX counting the calls of the whole conversation from 0 (K2's tool-call guidance);
  * a tool message answers the call named by its tool_call_id, or, without one, the oldest unanswered call.

`render_text` gives the string; `render` gives token ids and a loss mask that marks what the assistant wrote
(its text, its tool-call section and its closing <|im_end|>, not the `<|im_assistant|>assistant<|im_middle|>`
header). Any tokenizer with `encode`, `decode` and a `special_tokens` name -> id dict serves (`Tokenizer`).
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
  results (None: the oldest unanswered call)."""
  role: str
  content: str = ''
  tool_calls: tuple[ToolCall, ...] = ()
  tool_call_id: str | None = None

  def __post_init__(self):
    if self.role not in ROLES:
      raise ValueError(f'unknown role {self.role!r}; known roles: {", ".join(ROLES)}')
    if self.tool_calls and self.role != 'assistant':
      raise ValueError(f'only assistant messages carry tool calls, not {self.role!r}')
    object.__setattr__(self, 'tool_calls', tuple(self.tool_calls))

  @classmethod
  def from_dict(cls, message: Mapping[str, Any]) -> 'Message':
    """From the OpenAI chat shape: {'role', 'content', 'tool_calls': [{'id', 'function': {'name', 'arguments'}}],
    'tool_call_id'}."""
    calls = tuple(ToolCall(name=c['function']['name'], arguments=c['function'].get('arguments', {}), id=c.get('id'))
                  for c in message.get('tool_calls') or ())
    return cls(role=message['role'], content=message.get('content') or '', tool_calls=calls,
               tool_call_id=message.get('tool_call_id'))


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


def segments(messages: Sequence[Message], tools: Sequence[Mapping[str, Any]] | None = None,
             add_generation_prompt: bool = False) -> list[Segment]:
  """The conversation as special tokens and text pieces, in order (see the module docstring for the rules)."""
  out: list[Segment] = []
  if tools:
    out += _header(IM_SYSTEM, 'tool_declare') + [
        Segment(json.dumps(list(tools), ensure_ascii=False), False), Segment(IM_END, True)]
  if not messages or messages[0].role != 'system':
    out += _header(IM_SYSTEM, 'system') + [Segment(DEFAULT_SYSTEM_PROMPT, False), Segment(IM_END, True)]
  num_calls, unanswered = 0, []
  for message in messages:
    if message.role == 'assistant':
      out += _header(IM_ASSISTANT, 'assistant')
      out.append(Segment(message.content, False, True))
      if message.tool_calls:
        out.append(Segment(SECTION_BEGIN, True, True))
        for call in message.tool_calls:
          call_id = call.id if call.id is not None else f'functions.{call.name}:{num_calls}'
          num_calls += 1
          unanswered.append(call_id)
          out += [Segment(CALL_BEGIN, True, True), Segment(call_id, False, True), Segment(ARGUMENT_BEGIN, True, True),
                  Segment(call.arguments_text(), False, True), Segment(CALL_END, True, True)]
        out.append(Segment(SECTION_END, True, True))
      out.append(Segment(IM_END, True, True))
    elif message.role == 'tool':
      call_id = message.tool_call_id
      if call_id is None:
        if not unanswered:
          raise ValueError('a tool message without tool_call_id follows no unanswered tool call')
        call_id = unanswered[0]
      if call_id in unanswered:
        unanswered.remove(call_id)
      out += _header(IM_SYSTEM, 'tool') + [Segment(f'## Return of {call_id}\n{message.content}', False),
                                           Segment(IM_END, True)]
    else:
      role_token = IM_USER if message.role == 'user' else IM_SYSTEM
      out += _header(role_token, message.role) + [Segment(message.content, False), Segment(IM_END, True)]
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
