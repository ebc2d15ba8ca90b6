"""The embedded default corpus: the Python standard library's source files of the running interpreter.

Real text that every machine running this code already has. Files are split into train and validation by a hash
of their relative path (deterministic across machines with the same Python). Tokens are UTF-8 bytes for now;
`pack` turns documents into fixed-length rows with segment ids and positions, so packed documents never attend
across each other.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from collections.abc import Iterator

import numpy as np

from k2.config import ConfigError

EOS = 0  # byte 0 never occurs in source text; it ends every document


def documents(split: str, root: str | None = None) -> list[str]:
  """Paths of the split's .py files under the standard library, sorted. split: 'train' or 'validation'."""
  if split not in ('train', 'validation'):
    raise ConfigError(f"split must be 'train' or 'validation', got {split!r}")
  root = root or sysconfig.get_paths()['stdlib']
  paths = []
  for directory, subdirs, files in os.walk(root):
    subdirs[:] = sorted(d for d in subdirs if d not in ('site-packages', '__pycache__', 'test', 'tests'))
    for name in sorted(files):
      if name.endswith('.py'):
        path = os.path.join(directory, name)
        bucket = hashlib.md5(os.path.relpath(path, root).encode()).digest()[0] % 20
        if (bucket == 0) == (split == 'validation'):
          paths.append(path)
  if not paths:
    raise ConfigError(f'no .py files for split {split!r} under {root}')
  return paths


def tokenize(path: str) -> np.ndarray:
  with open(path, 'rb') as f:
    return np.frombuffer(f.read() + bytes([EOS]), dtype=np.uint8).astype(np.int32)


def pack(docs: Iterator[np.ndarray], seq_len: int) -> Iterator[dict[str, np.ndarray]]:
  """Greedy packing into rows of seq_len + 1 tokens. Yields inputs/targets/positions/segment_ids/mask [seq_len]."""
  tokens, segments, positions, segment = [], [], [], 1
  for doc in docs:
    tokens.append(doc)
    segments.append(np.full(len(doc), segment, np.int32))
    positions.append(np.arange(len(doc), dtype=np.int32))
    segment += 1
    while sum(len(t) for t in tokens) >= seq_len + 1:
      row_tokens, row_segments, row_positions = (np.concatenate(x) for x in (tokens, segments, positions))
      yield {
          'inputs': row_tokens[:seq_len], 'targets': row_tokens[1:seq_len + 1],
          'positions': row_positions[:seq_len], 'segment_ids': row_segments[:seq_len],
          # predict the next token only inside the same document
          'mask': (row_segments[:seq_len] == row_segments[1:seq_len + 1]).astype(np.float32),
      }
      rest = seq_len  # the next row starts where this one's targets ended
      tokens, segments = [row_tokens[rest:]], [row_segments[rest:]]
      positions = [row_positions[rest:] - row_positions[rest] if len(row_positions) > rest else row_positions[rest:]]


def batches(split: str, batch_size: int, seq_len: int, seed: int) -> Iterator[dict[str, np.ndarray]]:
  """Endless batches [batch_size, seq_len]; documents reshuffled with `seed` each epoch."""
  paths = documents(split)
  rng = np.random.default_rng(seed)
  def endless_docs():
    while True:
      for i in rng.permutation(len(paths)):
        yield tokenize(paths[i])
  rows = pack(endless_docs(), seq_len)
  while True:
    chunk = [next(rows) for _ in range(batch_size)]
    yield {key: np.stack([row[key] for row in chunk]) for key in chunk[0]}
