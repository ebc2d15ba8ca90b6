"""OpenAI's chat-completions shapes, converted to and from K2's chat format (k2.chat).

    request = ChatRequest.model_validate(body)                # pydantic: 400 error JSON on anything malformed
    messages, tools = to_chat(request)                        # k2.chat.Message list, tool declarations
    completion = Completion(tokenizer, request.stop_strings)  # .add(token) per generated id -> content delta
    message, finish_reason, rest = completion.finish()        # OpenAI message (content, tool_calls), ...

A tool in the request (`{'type': 'function', 'function': {name, description, parameters}}`) is already the
declaration K2's template renders. A tool call in the model's output keeps K2's id `functions.NAME:IDX` as its
OpenAI id, so a client that answers it with `tool_call_id` renders the same id back (k2.chat.template).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Literal

import pydantic

from k2 import chat
from k2.chat.template import CALL_BEGIN, IM_END, SECTION_BEGIN

# Text from the first of these on is never message content (k2.chat.tool_parser cuts there), so streaming holds
# it back until the whole output is parsed.
_CONTENT_ENDS = (SECTION_BEGIN, CALL_BEGIN, IM_END)
MAX_STOP_STRINGS = 4  # as OpenAI


class _Lenient(pydantic.BaseModel):
  model_config = pydantic.ConfigDict(extra='ignore')  # clients send fields we do not use (user, metadata, ...)


class FunctionSpec(_Lenient):
  model_config = pydantic.ConfigDict(extra='allow')  # kept: the declaration is rendered as sent (strict, ...)
  name: str = pydantic.Field(min_length=1)
  description: str | None = None
  parameters: dict[str, Any] | None = None


class Tool(_Lenient):
  type: Literal['function']
  function: FunctionSpec


class FunctionCall(_Lenient):
  name: str
  arguments: str | dict[str, Any] = ''  # OpenAI sends a JSON string; a dict is accepted too


class ToolCallIn(_Lenient):
  id: str | None = None
  type: Literal['function'] = 'function'
  function: FunctionCall


class ContentPart(_Lenient):
  type: Literal['text']
  text: str


class MessageIn(_Lenient):
  role: Literal['system', 'developer', 'user', 'assistant', 'tool']
  content: str | list[ContentPart] | None = None
  tool_calls: list[ToolCallIn] | None = None
  tool_call_id: str | None = None

  def to_chat(self) -> chat.Message:
    content = self.content if not isinstance(self.content, list) else ''.join(p.text for p in self.content)
    role = 'system' if self.role == 'developer' else self.role  # OpenAI's newer name for the system role
    return chat.Message.from_dict({
        'role': role, 'content': content,
        'tool_calls': [c.model_dump() for c in self.tool_calls or ()] if role == 'assistant' else None,
        'tool_call_id': self.tool_call_id if role == 'tool' else None})


class StreamOptions(_Lenient):
  include_usage: bool = False


class ChatRequest(_Lenient):
  """The fields of POST /v1/chat/completions that the server honours (tool_choice is accepted and ignored)."""
  model: str
  messages: list[MessageIn] = pydantic.Field(min_length=1)
  tools: list[Tool] | None = None
  temperature: float | None = pydantic.Field(None, ge=0.0, le=2.0)
  top_p: float | None = pydantic.Field(None, gt=0.0, le=1.0)
  max_tokens: int | None = pydantic.Field(None, ge=1)
  max_completion_tokens: int | None = pydantic.Field(None, ge=1)  # OpenAI's newer name for max_tokens
  n: int = pydantic.Field(1, ge=1, le=16)
  stop: str | list[str] | None = None
  seed: int | None = None
  stream: bool = False
  stream_options: StreamOptions | None = None
  tool_choice: Any = None

  @pydantic.field_validator('stop')
  @classmethod
  def _check_stop(cls, stop):
    strings = [stop] if isinstance(stop, str) else stop or []
    if len(strings) > MAX_STOP_STRINGS or any(not s for s in strings):
      raise ValueError(f'stop takes at most {MAX_STOP_STRINGS} non-empty strings')
    return stop

  @property
  def stop_strings(self) -> list[str]:
    return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

  @property
  def token_budget(self) -> int | None:
    return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def to_chat(request: ChatRequest) -> tuple[list[chat.Message], list[dict[str, Any]] | None]:
  """The request's messages as k2.chat messages, and its tools as template declarations (None without tools)."""
  tools = [tool.model_dump(exclude_unset=True) for tool in request.tools or ()]
  return [m.to_chat() for m in request.messages], tools or None


def openai_tool_calls(calls: Sequence[chat.ToolCall]) -> list[dict[str, Any]]:
  """Parsed K2 calls as OpenAI tool_calls: arguments as a JSON string, the K2 id kept (see the module docstring)."""
  return [{'id': call.id if call.id is not None else f'functions.{call.name}:{index}', 'type': 'function',
           'function': {'name': call.name, 'arguments': call.arguments_text()}}
          for index, call in enumerate(calls)]


def _held_back(text: str, markers: Sequence[str]) -> int:
  """How many trailing characters of `text` could begin one of `markers` (not yet safe to show)."""
  longest = 0
  for marker in markers:
    for size in range(min(len(marker) - 1, len(text)), longest, -1):
      if marker.startswith(text[-size:]):
        longest = size
        break
  return longest


class Completion:
  """One choice's output, fed a token at a time: stop strings, the content safe to stream, and the final message.

  Streaming and non-streaming responses both go through it, so the streamed deltas always assemble to the
  non-streamed content. Malformed output never raises: whatever does not parse as a tool call stays out of
  tool_calls (k2.chat.parse_tool_calls), the content is what parsed as content, and an id the tokenizer cannot
  decode (a model vocabulary larger than the tokenizer's) is left out of the text.
  """

  def __init__(self, tokenizer: chat.Tokenizer, stop: Sequence[str] = ()):
    self.tokenizer = tokenizer
    self.stop = list(stop)
    self.im_end = tokenizer.special_tokens[IM_END]
    self.ids: list[int] = []   # every generated id (the usage count)
    self.text_ids: list[int] = []  # those that decode
    self.text = ''        # the output decoded (special tokens by name), cut before a stop string
    self.shown = ''       # the content streamed so far
    self.stopped = False  # ended by <|im_end|> or a stop string
    self.errors: list[str] = []  # what did not decode or parse (for the server log)

  def add(self, token: int) -> str:
    """Takes one generated token; returns the content that became safe to show (often '')."""
    if self.stopped:
      return ''
    self.ids.append(int(token))
    if token == self.im_end:
      self.stopped = True
      return ''
    try:
      self.text = chat.decode(self.text_ids + [int(token)], self.tokenizer)
      self.text_ids.append(int(token))
    except Exception as e:  # noqa: BLE001 (any tokenizer's failure on one id must not fail the request)
      self.errors.append(f'token {token} does not decode ({type(e).__name__}: {e}); left out')
      return ''
    cuts = [self.text.find(s) for s in self.stop if s in self.text]
    if cuts:
      self.text, self.stopped = self.text[:min(cuts)], True
      return ''
    content = self.text
    for end in _CONTENT_ENDS:
      content = content.split(end, 1)[0]
    content = content[:len(content) - _held_back(content, list(_CONTENT_ENDS) + self.stop)]
    if content.endswith('\ufffd') or not content.startswith(self.shown):  # a partial UTF-8 character
      return ''
    delta, self.shown = content[len(self.shown):], content
    return delta

  def finish(self) -> tuple[dict[str, Any], str, str]:
    """(OpenAI assistant message, finish_reason, the content not yet streamed). Call once generation ended."""
    parsed = chat.parse_tool_calls(self.text)
    self.errors += parsed.errors
    content = parsed.content
    rest = content[len(self.shown):] if content.startswith(self.shown) else ''
    message: dict[str, Any] = {'role': 'assistant', 'content': content}
    if parsed.tool_calls:
      message['tool_calls'] = openai_tool_calls(parsed.tool_calls)
      message['content'] = content or None
    if not self.stopped:
      reason = 'length'
    else:
      reason = 'tool_calls' if parsed.tool_calls else 'stop'
    return message, reason, rest


def error_body(message: str, error_type: str = 'invalid_request_error', param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
  """OpenAI's error JSON."""
  return {'error': {'message': message, 'type': error_type, 'param': param, 'code': code}}


def sse(data: dict[str, Any] | str) -> str:
  """One server-sent event as OpenAI streams them."""
  return f'data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n'
