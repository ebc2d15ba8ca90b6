"""Local Python functions as tools: their declarations for the chat template, and running parsed calls.

`declaration(fn)` builds the OpenAI function spec K2 is trained on from a function's signature and docstring;
`run_call(call, functions)` runs one parsed call and returns its result as text, never raising (a failure is
returned as an 'error: ...' result the model can read). `LOCAL_TOOLS` is a small safe set for the chat CLI.
"""

from __future__ import annotations

import ast
import datetime
import inspect
import json
import operator
from collections.abc import Callable, Mapping
from typing import Any

from k2.chat.template import ToolCall

_JSON_TYPES = {int: 'integer', float: 'number', str: 'string', bool: 'boolean', list: 'array', dict: 'object'}


def declaration(fn: Callable) -> dict[str, Any]:
  """{'type': 'function', 'function': {name, description, parameters (JSON schema)}} for `fn`.

  The description is the docstring's first paragraph; parameters come from the annotated signature, required
  when they have no default.
  """
  signature = inspect.signature(fn)
  properties, required = {}, []
  for name, parameter in signature.parameters.items():
    annotation = parameter.annotation
    if isinstance(annotation, str):  # `from __future__ import annotations` leaves names
      annotation = {t.__name__: t for t in _JSON_TYPES}.get(annotation, annotation)
    properties[name] = {'type': _JSON_TYPES.get(annotation, 'string')}
    if parameter.default is inspect.Parameter.empty:
      required.append(name)
  description = (inspect.getdoc(fn) or '').split('\n\n')[0].replace('\n', ' ')
  return {'type': 'function', 'function': {
      'name': fn.__name__, 'description': description,
      'parameters': {'type': 'object', 'properties': properties, 'required': required}}}


def run_call(call: ToolCall, functions: Mapping[str, Callable]) -> str:
  """Runs `call` against `functions` (name -> function); the result as text (JSON unless it is a string)."""
  fn = functions.get(call.name)
  if fn is None:
    return f'error: unknown tool {call.name!r}; available: {", ".join(sorted(functions)) or "none"}'
  arguments = call.arguments
  if isinstance(arguments, str):
    try:
      arguments = json.loads(arguments)
    except ValueError as e:
      return f'error: arguments are not JSON: {e}'
  if not isinstance(arguments, Mapping):
    return 'error: arguments must be a JSON object'
  try:
    result = fn(**arguments)
  except Exception as e:  # noqa: BLE001 (the model reads the failure as the tool's result)
    return f'error: {type(e).__name__}: {e}'
  return result if isinstance(result, str) else json.dumps(result, ensure_ascii=False)


_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
              ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
              ast.USub: operator.neg, ast.UAdd: operator.pos}


def _evaluate(node: ast.AST) -> float | int:
  if isinstance(node, ast.Expression):
    return _evaluate(node.body)
  if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
    return node.value
  if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
    left, right = _evaluate(node.left), _evaluate(node.right)
    if isinstance(node.op, ast.Pow) and abs(right) > 100:
      raise ValueError('exponent too large (at most 100)')
    return _OPERATORS[type(node.op)](left, right)
  if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
    return _OPERATORS[type(node.op)](_evaluate(node.operand))
  raise ValueError(f'unsupported expression: {ast.dump(node)[:60]}')


def calculator(expression: str) -> str:
  """Evaluates an arithmetic expression (numbers, + - * / // % **, parentheses) and returns the result."""
  return str(_evaluate(ast.parse(expression, mode='eval')))


def current_time(timezone_offset_hours: float = 0.0) -> str:
  """Returns the current date and time (ISO 8601) at a UTC offset in hours."""
  zone = datetime.timezone(datetime.timedelta(hours=timezone_offset_hours))
  return datetime.datetime.now(zone).isoformat(timespec='seconds')


def word_count(text: str) -> int:
  """Counts the words (whitespace-separated) in a text."""
  return len(text.split())


LOCAL_TOOLS: dict[str, Callable] = {fn.__name__: fn for fn in (calculator, current_time, word_count)}
