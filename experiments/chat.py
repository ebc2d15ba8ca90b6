"""Chat with a K2 checkpoint in the terminal: streams tokens, runs tool calls against local Python tools.

    python -m experiments.chat --checkpoint WORKDIR/model                          # interactive
    python -m experiments.chat --checkpoint WORKDIR/model --prompt "What is 17 * 23?" --tools calculator

--checkpoint: a directory written by k2.convert.save_orbax (config.json + state/), e.g. the pretraining export.
--tokenizer: a `tokenizers` tokenizer.json or a tiktoken rank file (k2.data.tokenizer.load); by default the one
  saved beside the model (the pretraining export holds it); with neither, text is UTF-8 bytes (ids 0-255) and the
  chat special tokens take ids 256, 257, ... in K2's order.
--tools: names from k2.chat.LOCAL_TOOLS; they are declared to the model, and each call it makes is run and its
  result appended as a tool message before the model continues (at most --max_tool_rounds times per turn).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Sequence

from absl import app, flags, logging

from k2 import chat, hf, sample
from k2.config import ConfigError
from k2.serve import loading
from k2.serve.loading import ByteTokenizer  # noqa: F401  (the CLI's byte fallback; tests script the loop with it)

_CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'Model directory written by k2.convert.save_orbax.')
_TOKENIZER = flags.DEFINE_string('tokenizer', None, 'tokenizer.json or tiktoken file; default: the one in '
                                 '--checkpoint, else bytes.')
_PROMPT = flags.DEFINE_string('prompt', None, 'One user message: answer it and exit (no interactive loop).')
_SYSTEM = flags.DEFINE_string('system', None, 'System prompt (K2 default when absent).')
_TOOLS = flags.DEFINE_list('tools', [], f'Local tools to offer: {", ".join(chat.LOCAL_TOOLS)}.')
_MAX_NEW_TOKENS = flags.DEFINE_integer('max_new_tokens', 512, 'Token budget of each assistant message.')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.6, 'Sampling temperature (0 is greedy; K2 recommends 0.6).')
_TOP_P = flags.DEFINE_float('top_p', 1.0, 'Nucleus sampling mass.')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')
_DTYPE = flags.DEFINE_enum('model_dtype', 'float32', ['float32', 'bfloat16'], 'Parameter and compute dtype.')
_MAX_TOOL_ROUNDS = flags.DEFINE_integer('max_tool_rounds', 4, 'Tool calls answered per user turn before stopping.')


# (prompt tokens, max new tokens, stop tokens, seed) -> the (token, logprob) pairs as they are decoded.
StreamFn = Callable[[list[int], int, Sequence[int], int], Iterable[tuple[int, float]]]


def respond(conversation: list[chat.Message], stream_fn: StreamFn, tokenizer: chat.Tokenizer,
            tools: dict[str, Callable], *, max_new_tokens: int, max_tool_rounds: int, seed: int = 0,
            write: Callable[[str], None] = lambda text: None) -> list[chat.Message]:
  """Runs the assistant until it answers without tool calls; appends (and returns) the new messages.

  Each assistant message streams through `write`; its tool calls (parsed from the decoded output, never raising)
  are run against `tools` and answered with tool messages, up to max_tool_rounds rounds.
  """
  declarations = [chat.declaration(fn) for fn in tools.values()] or None
  stop = [tokenizer.special_tokens['<|im_end|>']]
  new_messages = []
  for round_index in range(max_tool_rounds + 1):
    prompt = chat.render(conversation, tokenizer, tools=declarations, add_generation_prompt=True).tokens
    ids, shown = [], ''
    for token, _ in stream_fn(prompt, max_new_tokens, stop, seed + round_index):
      ids.append(token)
      text = chat.decode([t for t in ids if t not in stop], tokenizer)
      if text.startswith(shown) and not text.endswith('\ufffd'):  # hold back a partial UTF-8 character
        write(text[len(shown):])
        shown = text
    parsed = chat.parse_tool_calls(chat.decode(ids, tokenizer))
    write('\n')
    for error in parsed.errors:
      write(f'[tool-call parse: {error}]\n')
    calls = parsed.tool_calls if tools else []
    message = chat.Message('assistant', parsed.content, tool_calls=tuple(calls))
    conversation.append(message)
    new_messages.append(message)
    if not calls or round_index == max_tool_rounds:
      return new_messages
    for call in calls:
      result = chat.run_call(call, tools)
      write(f'[tool {call.id} -> {result}]\n')
      conversation.append(chat.Message('tool', result, tool_call_id=call.id))
      new_messages.append(conversation[-1])
  return new_messages


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every restore step at INFO
  if not _CHECKPOINT.value:
    sys.exit('error: --checkpoint DIR is required (a directory written by k2.convert.save_orbax)')
  unknown = [name for name in _TOOLS.value if name not in chat.LOCAL_TOOLS]
  if unknown:
    sys.exit(f'error: unknown tools {unknown}; available: {", ".join(chat.LOCAL_TOOLS)}')
  try:
    model, tokenizer = loading.load(_CHECKPOINT.value, _TOKENIZER.value, _DTYPE.value)
  except (ConfigError, hf.CheckpointError, ValueError, OSError) as e:
    sys.exit(f'error: {e}')

  def stream_fn(prompt, max_new_tokens, stop, seed):
    return sample.stream(model, prompt, max_new_tokens, temperature=_TEMPERATURE.value, top_p=_TOP_P.value,
                         stop_tokens=stop, seed=seed)

  tools = {name: chat.LOCAL_TOOLS[name] for name in _TOOLS.value}
  conversation = [chat.Message('system', _SYSTEM.value)] if _SYSTEM.value else []
  write = lambda text: (sys.stdout.write(text), sys.stdout.flush())
  prompts = [_PROMPT.value] if _PROMPT.value is not None else None
  turn = 0
  while True:
    if prompts is not None:
      if turn == len(prompts):
        return
      user = prompts[turn]
    else:
      try:
        user = input('you> ')
      except EOFError:
        return
      if user.strip() in ('/exit', '/quit'):
        return
    conversation.append(chat.Message('user', user))
    write('kimi> ')
    respond(conversation, stream_fn, tokenizer, tools, max_new_tokens=_MAX_NEW_TOKENS.value,
            max_tool_rounds=_MAX_TOOL_ROUNDS.value, seed=_SEED.value + 1000 * turn, write=write)
    turn += 1


if __name__ == '__main__':
  app.run(main)
