"""Tokenizers: K2's tiktoken BPE file with K2's special tokens, or a small byte-level BPE trained on a corpus.

Both are wrapped in `Tokenizer`, which the data pipeline, the chat template and the sampler use:
`encode(text) -> list[int]`, `decode(ids) -> str`, `vocab_size`, `special_tokens` (name -> id), `eos_id`.

K2 (`tiktoken.model` in Kimi-K2's release) is a tiktoken rank file (one `base64(token) rank` per line, 163840 - 256
ranks) followed by 256 reserved special ids; the named ones are `shared/K2_REFERENCE.md` section 5. The embedded
default trains a 4096-token byte-level BPE with HuggingFace `tokenizers` on the training split and caches it, keyed
by corpus and vocabulary size, so later runs load it in milliseconds.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable

from k2.config import ConfigError

# K2's named special tokens (K2_REFERENCE section 5); the rest of the 256 reserved ids are <|reserved_token_N|>.
K2_SPECIAL_TOKENS = {
    '[BOS]': 163584, '[EOS]': 163585, '<|im_end|>': 163586, '<|im_user|>': 163587, '<|im_assistant|>': 163588,
    '<|im_system|>': 163594, '<|tool_calls_section_begin|>': 163595, '<|tool_calls_section_end|>': 163596,
    '<|tool_call_begin|>': 163597, '<|tool_call_argument_begin|>': 163598, '<|tool_call_end|>': 163599,
    '<|im_middle|>': 163601,
}
K2_NUM_RESERVED = 256

# Kimi's pre-tokenizer: runs of Han characters, cased words with English contractions, numbers in threes,
# punctuation runs, newlines and other whitespace.
K2_PATTERN = '|'.join([
    r"""[\p{Han}]+""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"""
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"""
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])

# Special tokens of the small trained BPE: the same names as K2's, so the chat template works with either.
SMALL_SPECIAL_TOKENS = tuple(K2_SPECIAL_TOKENS)


class Tokenizer:
  """A text <-> ids mapping with named special tokens. Special tokens are never produced from plain text."""

  def __init__(self, encode: Callable[[str], list[int]], decode: Callable[[list[int]], str], vocab_size: int,
               special_tokens: dict[str, int], name: str, path: str | None = None):
    self._encode, self._decode = encode, decode
    self.vocab_size, self.special_tokens, self.name = vocab_size, dict(special_tokens), name
    self.path = path  # the file it was loaded from (a model export copies it), or None

  @property
  def eos_id(self) -> int:
    return self.special_tokens['[EOS]']

  @property
  def bos_id(self) -> int:
    return self.special_tokens['[BOS]']

  def encode(self, text: str) -> list[int]:
    return self._encode(text)

  def decode(self, ids: Iterable[int]) -> str:
    return self._decode([int(i) for i in ids])

  def __repr__(self) -> str:
    return f'Tokenizer({self.name}, vocab_size={self.vocab_size})'


def load_tiktoken(path: str) -> Tokenizer:
  """K2's tokenizer from its `tiktoken.model` rank file, with K2's 256 reserved special ids after the ranks."""
  import tiktoken
  from tiktoken.load import load_tiktoken_bpe
  if not os.path.isfile(path):
    raise ConfigError(f'tokenizer file {path} does not exist')
  try:
    ranks = load_tiktoken_bpe(path)
  except Exception as e:  # a malformed line raises ValueError / binascii.Error
    raise ConfigError(f'{path} is not a tiktoken BPE file: {e}') from None
  first_special = len(ranks)
  # K2's named ids are given relative to its 163584 ranks; keep them at the same offsets for any rank file.
  offset = first_special - min(K2_SPECIAL_TOKENS.values())
  named = {name: token_id + offset for name, token_id in K2_SPECIAL_TOKENS.items()}
  taken = set(named.values())
  special = dict(named)
  for i in range(K2_NUM_RESERVED):
    if first_special + i not in taken:
      special[f'<|reserved_token_{i}|>'] = first_special + i
  encoding = tiktoken.Encoding(name=os.path.basename(path), pat_str=K2_PATTERN, mergeable_ranks=ranks,
                               special_tokens=special)
  return Tokenizer(lambda text: encoding.encode(text, disallowed_special=()), encoding.decode,
                   first_special + K2_NUM_RESERVED, named, f'tiktoken:{path}', path)


def _from_hf_file(path: str) -> Tokenizer:
  import tokenizers
  hf = tokenizers.Tokenizer.from_file(path)
  hf.encode_special_tokens = True  # '[EOS]' written in a document is text, not the end-of-sequence id
  special = {name: hf.token_to_id(name) for name in SMALL_SPECIAL_TOKENS if hf.token_to_id(name) is not None}
  if '[EOS]' not in special:
    raise ConfigError(f'{path} has no [EOS] token')
  return Tokenizer(lambda text: hf.encode(text, add_special_tokens=False).ids,
                   lambda ids: hf.decode(ids, skip_special_tokens=False), hf.get_vocab_size(), special,
                   f'bpe:{path}', path)


def train_bpe(texts: Callable[[], Iterable[str]], vocab_size: int, path: str) -> Tokenizer:
  """Trains a byte-level BPE with `tokenizers` (GPT-2 style byte alphabet, K2's special token names first).

  texts: a callable returning an iterable of documents. The file is written atomically to `path`.
  """
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers
  bpe = tokenizers.Tokenizer(models.BPE())
  bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SMALL_SPECIAL_TOKENS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  bpe.train_from_iterator(texts(), trainer=trainer)
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  tmp = f'{path}.tmp.{os.getpid()}'
  bpe.save(tmp)
  os.replace(tmp, path)
  return _from_hf_file(path)


def load(path: str) -> Tokenizer:
  """A tokenizer file: `tokenizer.json` (HuggingFace tokenizers) or a tiktoken rank file (K2's tiktoken.model)."""
  if not os.path.isfile(path):
    raise ConfigError(f'tokenizer file {path} does not exist')
  if path.endswith('.json'):
    return _from_hf_file(path)
  return load_tiktoken(path)


def cached_bpe(corpus_key: str, texts: Callable[[], Iterable[str]], vocab_size: int, cache_dir: str) -> Tokenizer:
  """Loads the BPE trained on `corpus_key` with `vocab_size` from cache_dir, training it on first use."""
  digest = hashlib.sha256(json.dumps([corpus_key, vocab_size]).encode()).hexdigest()[:12]
  path = os.path.join(os.path.expanduser(cache_dir), f'bpe_{vocab_size}_{digest}.json')
  if os.path.isfile(path):
    return _from_hf_file(path)
  print(f'training a {vocab_size}-token BPE tokenizer on {corpus_key.split(":")[0]} (once; cached as {path})',
        flush=True)
  return train_bpe(texts, vocab_size, path)
