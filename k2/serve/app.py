"""An OpenAI-compatible HTTP server over k2.sample: `/v1/models` and `/v1/chat/completions` (FastAPI).

    app = create_app(model, tokenizer, model_name='k2')      # then uvicorn.run(app, host=..., port=...)

A request is rendered with K2's chat template (k2.chat.render, with the generation prompt), generated with
`k2.sample.generate` (n samples of the prompt in one batch) or `k2.sample.stream` (server-sent events in OpenAI's
chunk format), stopped at <|im_end|>, and its tool calls parsed (k2.chat.parse_tool_calls, never raising) into
OpenAI tool_calls (k2.serve.protocol). One generation (or one streamed decode step) runs at a time, under a lock:
the model and the host's devices are shared, and JAX programs would queue anyway.

Errors come back as OpenAI's error JSON ({"error": {"message", "type", "param", "code"}}): malformed JSON or
parameters 400, an unknown model or path 404, a prompt beyond the model's positions 400
(code 'context_length_exceeded'), anything unexpected 500; the server keeps serving after each.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import fastapi
from fastapi import exceptions as fastapi_exceptions
from fastapi import responses
from starlette import exceptions as starlette_exceptions

from k2 import chat, sample
from k2.model import Transformer
from k2.serve import protocol

logger = logging.getLogger('k2.serve')

DEFAULT_TEMPERATURE = 0.6  # K2's recommended sampling temperature (Kimi-K2-Instruct model card)


class RequestError(Exception):
  """A request the server cannot serve: becomes OpenAI error JSON with `status`."""

  def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
               error_type: str = 'invalid_request_error'):
    super().__init__(message)
    self.status, self.param, self.code, self.error_type = status, param, code, error_type


def _error(status: int, message: str, **kwargs) -> responses.JSONResponse:
  return responses.JSONResponse(protocol.error_body(message, **kwargs), status_code=status)


class Server:
  """The model, its tokenizer and the generation lock behind the routes."""

  def __init__(self, model: Transformer, tokenizer: chat.Tokenizer, model_name: str, max_tokens: int):
    chat.check_tokenizer(tokenizer)
    self.model, self.tokenizer, self.model_name = model, tokenizer, model_name
    self.max_positions = model.config.rope.max_position_embeddings
    self.default_max_tokens = max_tokens
    self.im_end = tokenizer.special_tokens[chat.template.IM_END]
    self.created = int(time.time())
    self.lock = threading.Lock()

  def prepare(self, request: protocol.ChatRequest) -> tuple[list[int], int, dict[str, Any]]:
    """(prompt tokens, token budget, sampling arguments), or RequestError."""
    if request.model != self.model_name:
      raise RequestError(404, f'The model {request.model!r} does not exist; this server serves '
                         f'{self.model_name!r} (GET /v1/models).', param='model', code='model_not_found')
    try:
      messages, tools = protocol.to_chat(request)
      prompt = chat.render(messages, self.tokenizer, tools=tools, add_generation_prompt=True).tokens
    except ValueError as e:  # e.g. a tool message that answers no call
      raise RequestError(400, str(e), param='messages') from None
    room = self.max_positions - len(prompt)
    budget = request.token_budget
    if room < 1 or (budget is not None and budget > room):
      raise RequestError(
          400, f"This model's maximum context length is {self.max_positions} tokens. However, you requested "
          f'{len(prompt) + (budget or 1)} tokens ({len(prompt)} in the messages, {budget or 1} in the completion). '
          'Please reduce the length of the messages or completion.', param='messages', code='context_length_exceeded')
    temperature = DEFAULT_TEMPERATURE if request.temperature is None else request.temperature
    sampling = {'temperature': temperature, 'top_p': 1.0 if request.top_p is None else request.top_p,
                'stop_tokens': [self.im_end],
                'seed': request.seed % 2**31 if request.seed is not None else secrets.randbits(31)}  # any int
    return prompt, budget if budget is not None else min(room, self.default_max_tokens), sampling

  def complete(self, request: protocol.ChatRequest) -> dict[str, Any]:
    """A whole chat.completion object."""
    prompt, budget, sampling = self.prepare(request)
    with self.lock:
      result = sample.generate(self.model, [prompt] * request.n, budget, **sampling)
    choices, completion_tokens = [], 0
    for index, tokens in enumerate(result.tokens):
      completion = protocol.Completion(self.tokenizer, request.stop_strings)
      for token in tokens:
        completion.add(token)
        if completion.stopped:
          break
      message, finish_reason, _ = completion.finish()
      self._log_errors(completion)
      completion_tokens += len(completion.ids)
      choices.append({'index': index, 'message': message, 'finish_reason': finish_reason, 'logprobs': None})
    return {'id': _completion_id(), 'object': 'chat.completion', 'created': int(time.time()),
            'model': self.model_name, 'choices': choices,
            'usage': _usage(len(prompt), completion_tokens)}

  def stream(self, request: protocol.ChatRequest) -> Iterator[str]:
    """chat.completion.chunk events; prepare() runs first, so request errors come back before streaming starts."""
    prompt, budget, sampling = self.prepare(request)
    return self._stream_events(request, prompt, budget, sampling)

  def _stream_events(self, request, prompt, budget, sampling) -> Iterator[str]:
    base = {'id': _completion_id(), 'object': 'chat.completion.chunk', 'created': int(time.time()),
            'model': self.model_name}
    chunk = lambda index, delta, reason=None: protocol.sse(
        base | {'choices': [{'index': index, 'delta': delta, 'finish_reason': reason, 'logprobs': None}]})
    completion_tokens = 0
    for index in range(request.n):
      yield chunk(index, {'role': 'assistant', 'content': ''})
      completion = protocol.Completion(self.tokenizer, request.stop_strings)
      seed = sampling['seed'] + index  # choices after the first: their own stream of samples
      try:
        tokens = sample.stream(self.model, prompt, budget, **(sampling | {'seed': seed}))
        for token, _ in self._locked(tokens):
          delta = completion.add(token)
          if delta:
            yield chunk(index, {'content': delta})
          if completion.stopped:
            break
        message, finish_reason, rest = completion.finish()
      except Exception:  # noqa: BLE001 (the status line is sent: the error goes in the stream, as OpenAI does)
        logger.exception('generation failed mid-stream')
        yield protocol.sse(protocol.error_body('generation failed', 'server_error'))
        return
      self._log_errors(completion)
      completion_tokens += len(completion.ids)
      if rest:
        yield chunk(index, {'content': rest})
      if 'tool_calls' in message:
        yield chunk(index, {'tool_calls': [call | {'index': i} for i, call in enumerate(message['tool_calls'])]})
      yield chunk(index, {}, finish_reason)
    if request.stream_options is not None and request.stream_options.include_usage:
      yield protocol.sse(base | {'choices': [], 'usage': _usage(len(prompt), completion_tokens)})
    yield protocol.sse('[DONE]')

  def _locked(self, tokens: Iterator[tuple[int, float]]) -> Iterator[tuple[int, float]]:
    """`tokens`, each decode step under the lock (never held while a client reads: a client that stops
    reading cannot block the others)."""
    while True:
      with self.lock:
        item = next(tokens, None)
      if item is None:
        return
      yield item

  def _log_errors(self, completion: protocol.Completion) -> None:
    for error in completion.errors:
      logger.warning('model output: %s', error)


def _completion_id() -> str:
  return f'chatcmpl-{uuid.uuid4().hex}'


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
  """OpenAI's token counts: the prompt once however many choices, completion tokens summed over choices."""
  return {'prompt_tokens': prompt_tokens, 'completion_tokens': completion_tokens,
          'total_tokens': prompt_tokens + completion_tokens}


def create_app(model: Transformer, tokenizer: chat.Tokenizer, model_name: str, max_tokens: int = 1024
               ) -> fastapi.FastAPI:
  """The FastAPI app serving `model` under `model_name`; max_tokens: the budget when a request sets none."""
  server = Server(model, tokenizer, model_name, max_tokens)
  app = fastapi.FastAPI(title='k2', docs_url=None, redoc_url=None, openapi_url=None)
  app.state.server = server

  @app.exception_handler(RequestError)
  async def request_error(_, e: RequestError):
    return _error(e.status, str(e), error_type=e.error_type, param=e.param, code=e.code)

  @app.exception_handler(fastapi_exceptions.RequestValidationError)
  async def validation_error(_, e: fastapi_exceptions.RequestValidationError):
    first = e.errors()[0] if e.errors() else {}
    if first.get('type') == 'json_invalid':
      return _error(400, f'We could not parse the JSON body of your request: {first.get("msg", "")}',
                    code='invalid_json')
    location = [str(part) for part in first.get('loc', ()) if part != 'body']
    param = '.'.join(location) or None
    if param is None:
      return _error(400, 'The request body must be a JSON object.', code='invalid_json')
    return _error(400, f'Invalid value for {param or "the request body"}: {first.get("msg", "invalid")}',
                  param=param, code='invalid_value')

  @app.exception_handler(starlette_exceptions.HTTPException)
  async def http_error(_, e: starlette_exceptions.HTTPException):
    kind = 'not_found' if e.status_code == 404 else 'invalid_request_error'
    return _error(e.status_code, str(e.detail), error_type=kind)

  @app.exception_handler(Exception)
  async def internal_error(_, e: Exception):
    logger.exception('request failed')
    return _error(500, f'The server failed on this request: {type(e).__name__}', error_type='server_error')

  @app.get('/v1/models')
  def list_models():
    return {'object': 'list', 'data': [{'id': server.model_name, 'object': 'model', 'created': server.created,
                                         'owned_by': 'k2', 'max_model_len': server.max_positions}]}

  @app.post('/v1/chat/completions')
  def chat_completions(request: protocol.ChatRequest):
    if request.stream:
      return responses.StreamingResponse(server.stream(request), media_type='text/event-stream')
    return server.complete(request)

  return app
