"""Serve a K2 checkpoint over HTTP with OpenAI's chat-completions API (any OpenAI client or eval tool can talk to it).

    python -m experiments.serve --checkpoint WORKDIR/model --host 127.0.0.1 --port 8000
    curl localhost:8000/v1/models
    python -c "import openai; c = openai.OpenAI(base_url='http://localhost:8000/v1', api_key='none');
               print(c.chat.completions.create(model='WORKDIR/model', messages=[{'role': 'user', 'content': 'hi'}]))"

--checkpoint: a model directory (config.json + state/ + its tokenizer file), e.g. the pretraining export; the
  tokenizer is found as in experiments/chat.py (k2.serve.loading).
--model_name: the name clients send as `model` (default: --checkpoint as given, as vLLM does).
Routes, request fields and error JSON: k2/serve/app.py.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

from k2 import hf, serve
from k2.config import ConfigError

_CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'Model directory written by k2.convert.save_orbax.')
_TOKENIZER = flags.DEFINE_string('tokenizer', None, 'tokenizer.json or tiktoken file; default: the one in '
                                 '--checkpoint, else bytes.')
_HOST = flags.DEFINE_string('host', '127.0.0.1', 'Address to listen on.')
_PORT = flags.DEFINE_integer('port', 8000, 'Port to listen on.')
_MODEL_NAME = flags.DEFINE_string('model_name', None, 'Model id served (default: --checkpoint as given).')
_MAX_TOKENS = flags.DEFINE_integer('max_tokens', 1024, 'Token budget of a request that sets none.')
_DTYPE = flags.DEFINE_enum('model_dtype', 'float32', ['float32', 'bfloat16'], 'Parameter and compute dtype.')


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every restore step at INFO
  if not _CHECKPOINT.value:
    sys.exit('error: --checkpoint DIR is required (a directory written by k2.convert.save_orbax)')
  try:
    model, tokenizer = serve.load(_CHECKPOINT.value, _TOKENIZER.value, _DTYPE.value)
  except (ConfigError, hf.CheckpointError, ValueError, OSError) as e:
    sys.exit(f'error: {e}')
  import uvicorn  # imported here: only the server needs it
  application = serve.create_app(model, tokenizer, _MODEL_NAME.value or _CHECKPOINT.value, _MAX_TOKENS.value)
  uvicorn.run(application, host=_HOST.value, port=_PORT.value, log_level='info')


if __name__ == '__main__':
  app.run(main)
