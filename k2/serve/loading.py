"""A model directory (the pretraining export, `WORKDIR/model`) as a model and its tokenizer, for chat and serving.

    model, tokenizer = loading.load('WORKDIR/model')      # config.json + state/ + tokenizer.json or tiktoken.model

The tokenizer is the file given, else the one saved beside the model (k2.train.recipe.export_model writes it),
else UTF-8 bytes (ids 0-255) with the chat special tokens at ids 256, 257, ... in K2's order.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import jax.numpy as jnp

from k2 import chat, convert, model as model_lib

MODEL_TOKENIZER_FILES = ('tokenizer.json', 'tiktoken.model')  # what k2.train.recipe.export_model writes


class ByteTokenizer:
  """UTF-8 bytes as ids 0-255, the chat special tokens after them."""

  def __init__(self):
    self.special_tokens = {name: 256 + i for i, name in enumerate(chat.K2_SPECIAL_TOKENS)}

  def encode(self, text: str) -> list[int]:
    return list(text.encode('utf-8'))

  def decode(self, ids: Sequence[int]) -> str:
    return bytes(i for i in ids if 0 <= i < 256).decode('utf-8', errors='replace')


def load_tokenizer(path: str | None, model_dir: str | None = None) -> chat.Tokenizer:
  """The tokenizer file `path`, else the one saved in `model_dir`, else bytes (with a warning)."""
  if path is None and model_dir is not None:
    saved = [os.path.join(model_dir, name) for name in MODEL_TOKENIZER_FILES
             if os.path.isfile(os.path.join(model_dir, name))]
    path = saved[0] if saved else None
    if path is None:
      print(f'warning: {model_dir} holds no tokenizer; using UTF-8 bytes (pass --tokenizer)', file=sys.stderr)
  if path is None:
    return ByteTokenizer()
  from k2.data import tokenizer as tokenizer_lib  # imported here: it pulls in tiktoken / tokenizers
  return tokenizer_lib.load(path)


def load(model_dir: str, tokenizer_path: str | None = None,
         dtype: str = 'float32') -> tuple[model_lib.Transformer, chat.Tokenizer]:
  """The model saved in `model_dir` (k2.convert.save_orbax) with parameters in `dtype`, and its chat tokenizer.

  Raises ValueError (or k2.hf.CheckpointError / ConfigError / OSError from reading the files) when the tokenizer
  lacks the chat special tokens or uses ids beyond the model's vocabulary.
  """
  tokenizer = load_tokenizer(tokenizer_path, model_dir)
  chat.check_tokenizer(tokenizer)
  model = convert.load_orbax(model_dir, dtype=jnp.dtype(dtype))
  largest = max(tokenizer.special_tokens[name] for name in chat.CHAT_SPECIAL_TOKENS)
  if largest >= model.config.vocab_size:
    raise ValueError(f'the tokenizer uses id {largest} but the model has only {model.config.vocab_size} tokens')
  return model, tokenizer
