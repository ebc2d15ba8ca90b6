"""Turns an assistant's output text into its message text and structured tool calls, never raising.

The output (special tokens written as their names, as `k2.chat.template.decode` gives them) reads
    text<|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>{...}
    <|tool_call_end|>...<|tool_calls_section_end|><|im_end|>
Whatever does not fit (a truncated section or call, an unreadable id, arguments that are not a JSON object,
stray text inside the section) is reported in `ParsedOutput.errors`, one line each, and the calls that did parse
are still returned. The parser is lenient where the meaning is clear: a call section with no begin marker, an
id without the `functions.` prefix or without an index.
"""

from __future__ import annotations

import dataclasses
import json
import re

from k2.chat.template import (ARGUMENT_BEGIN, CALL_BEGIN, CALL_END, IM_END, SECTION_BEGIN, SECTION_END,
                              ToolCall)

_CALL_ID = re.compile(r'(?:functions\.)?(?P<name>[A-Za-z0-9_\-.]+?)(?::(?P<index>\d+))?')
_SNIPPET = 80


@dataclasses.dataclass(frozen=True)
class ParsedOutput:
  """content: the text before the call section; tool_calls: the calls that parsed (arguments as dicts);
  errors: one line per thing that could not be parsed (empty when the output is well formed)."""
  content: str
  tool_calls: list[ToolCall]
  errors: list[str]


def _snippet(text: str) -> str:
  return repr(text if len(text) <= _SNIPPET else text[:_SNIPPET] + '...')


def _parse_call(chunk: str, errors: list[str]) -> ToolCall | None:
  """chunk: what follows one <|tool_call_begin|>, up to the next one or the section's end."""
  if ARGUMENT_BEGIN not in chunk:
    errors.append(f'call without {ARGUMENT_BEGIN}: {_snippet(chunk)}')
    return None
  raw_id, rest = chunk.split(ARGUMENT_BEGIN, 1)
  call_id = raw_id.strip()
  match = _CALL_ID.fullmatch(call_id)
  if CALL_END in rest:
    arguments_text, trailing = rest.split(CALL_END, 1)
    if trailing.strip():
      errors.append(f'text after {CALL_END} ignored: {_snippet(trailing)}')
  else:
    arguments_text = rest
    errors.append(f'call {_snippet(call_id)} is truncated (no {CALL_END})')
  if match is None:
    errors.append(f'cannot read the call id {_snippet(call_id)} (expected functions.NAME:IDX)')
    return None
  try:
    arguments = json.loads(arguments_text)
  except (ValueError, RecursionError) as e:
    errors.append(f'arguments of {call_id} are not JSON ({str(e)[:_SNIPPET]}): {_snippet(arguments_text)}')
    return None
  if not isinstance(arguments, dict):
    errors.append(f'arguments of {call_id} are not a JSON object: {_snippet(arguments_text)}')
    return None
  return ToolCall(name=match.group('name'), arguments=arguments, id=call_id)


def _parse(text: str) -> ParsedOutput:
  errors: list[str] = []
  if IM_END in text:
    text, after = text.split(IM_END, 1)
    if after.strip():
      errors.append(f'text after {IM_END} ignored: {_snippet(after)}')
  if SECTION_BEGIN in text:
    content, section = text.split(SECTION_BEGIN, 1)
  elif CALL_BEGIN in text:
    errors.append(f'tool calls without {SECTION_BEGIN}')
    content, section = text.split(CALL_BEGIN, 1)
    section = CALL_BEGIN + section
  else:
    return ParsedOutput(content=text, tool_calls=[], errors=errors)
  if SECTION_END in section:
    section, after = section.split(SECTION_END, 1)
    if after.strip():
      errors.append(f'text after {SECTION_END} ignored: {_snippet(after)}')
  else:
    errors.append(f'tool-call section is truncated (no {SECTION_END})')
  if SECTION_BEGIN in section:
    errors.append(f'nested {SECTION_BEGIN} ignored')
    section = section.replace(SECTION_BEGIN, '')
  before, *chunks = section.split(CALL_BEGIN)
  if before.strip():
    errors.append(f'text in the tool-call section outside any call ignored: {_snippet(before)}')
  calls = [call for call in (_parse_call(chunk, errors) for chunk in chunks) if call is not None]
  return ParsedOutput(content=content, tool_calls=calls, errors=errors)


def parse_tool_calls(text: str) -> ParsedOutput:
  """Parses one assistant output (see the module docstring). Never raises."""
  try:
    return _parse(text if isinstance(text, str) else str(text))
  except Exception as e:  # noqa: BLE001 (the contract is never to raise; tests check this branch never runs)
    return ParsedOutput(content='', tool_calls=[], errors=[f'internal parser error: {type(e).__name__}: {e}'])
