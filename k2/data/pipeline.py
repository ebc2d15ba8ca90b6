"""Text -> packed next-token batches, through grain.

    source (tfds.data_source, or documents from local files)
      -> [this process's share] -> shuffle(seed) -> repeat -> tokenize (+[BOS], +[EOS])
      -> pack into rows of seq_len (grain ConcatThenSplit: documents are concatenated, cut at row boundaries)
      -> shuffle rows within a window (a long document fills many consecutive rows; without this one batch
         would hold a single document and steps would see wildly different data)
      -> [repeat_fraction of the rows: the row's first half, shown twice; see _RepeatHalf]
      -> batch [batch_size, seq_len]

Each batch holds int32 `inputs`, `targets` (inputs shifted by one inside each document), `positions` (position in
the document), `segment_ids` (1, 2, ... per document in the row; 0 is padding) and float32 `mask` (1 where the
target is real). Packed documents never attend across each other: the model masks by segment id.

The iterator is a grain `DatasetIterator`, so `get_state()` / `set_state()` (and orbax, through
grain.checkpoint) resume it at exactly the next batch.

Datasets by name (`dataset=` below, a gin knob):
  'stdlib'               the embedded default (k2.data.stdlib_corpus, prepared on first use)
  'tfds:NAME[/CONFIG]'   any prepared TFDS dataset in data_dir (read with tfds.data_source; `text_key` field)
  a path or glob         local .txt files (one document per file) or .jsonl files (one per line, `text_key` field)
"""

from __future__ import annotations

import ast
import glob
import json
import os
from collections.abc import Sequence

import gin
import grain
import numpy as np

from k2.config import ConfigError
from k2.data import tokenizer as tokenizer_lib

DEFAULT_DATA_DIR = '~/.cache/k2/tensorflow_datasets'
DEFAULT_TOKENIZER_CACHE = '~/.cache/k2/tokenizers'


def _local_documents(pattern: str, text_key: str) -> list[str]:
  paths = sorted(glob.glob(os.path.expanduser(pattern)))
  if not paths:
    raise ConfigError(f'dataset {pattern!r}: no such file')
  docs = []
  for path in paths:
    with open(path, encoding='utf-8', errors='replace') as f:
      if path.endswith('.jsonl'):
        for number, line in enumerate(f, 1):
          if line.strip():
            try:
              docs.append(str(json.loads(line)[text_key]))
            except (json.JSONDecodeError, KeyError, TypeError):
              raise ConfigError(f'{path}:{number} is not a JSON object with a {text_key!r} field') from None
      else:
        docs.append(f.read())
  non_empty = [doc for doc in docs if doc.strip()]
  if not non_empty:
    raise ConfigError(f'dataset {pattern!r}: its {len(paths)} file(s) hold no non-empty documents')
  if len(non_empty) == 1:
    raise ConfigError(f'dataset {pattern!r} holds one document; it needs at least two (the last 5% of the '
                      'documents, at least one, are the validation split): split the text into several files or '
                      '.jsonl lines')
  return non_empty


class _TfdsText:
  """A tfds.data_source viewed as documents (decoded `text_key` strings)."""

  def __init__(self, source, text_key: str):
    self._source, self._text_key = source, text_key

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> str:
    if not 0 <= index < len(self._source):
      raise IndexError(index)
    value = self._source[index][self._text_key]
    return value.decode('utf-8', errors='replace') if isinstance(value, bytes) else str(value)


@gin.configurable
def documents(split: str, dataset: str = 'stdlib', data_dir: str = DEFAULT_DATA_DIR, text_key: str = 'text',
              validation_fraction: float = 0.05) -> Sequence[str]:
  """The split's documents as a random-access sequence of strings. Raises ConfigError when missing or empty.

  Local files have no splits: the last `validation_fraction` of their documents (at least one) is 'validation'.
  """
  if split not in ('train', 'validation'):
    raise ConfigError(f"split must be 'train' or 'validation', got {split!r}")
  data_dir = os.path.expanduser(data_dir)
  if dataset == 'stdlib' or dataset.startswith('tfds:'):
    import tensorflow_datasets as tfds
    tfds.disable_progress_bar()
    if dataset == 'stdlib':
      from k2.data import stdlib_corpus
      name = stdlib_corpus.prepare(data_dir)
    else:
      name = dataset[len('tfds:'):]
    try:
      source = tfds.data_source(name, split=split, data_dir=data_dir)
    except Exception as e:  # DatasetNotFoundError, unknown split, unsupported file format, ...
      raise ConfigError(f'dataset {dataset!r} split {split!r} cannot be read from {data_dir}: '
                        f'{str(e).splitlines()[0]}') from None
    docs = _TfdsText(source, text_key)
  else:
    all_docs = _local_documents(dataset, text_key)
    num_validation = max(1, int(len(all_docs) * validation_fraction)) if len(all_docs) > 1 else 0
    docs = all_docs[len(all_docs) - num_validation:] if split == 'validation' else all_docs[:len(all_docs) -
                                                                                            num_validation]
  if len(docs) == 0:
    raise ConfigError(f'dataset {dataset!r} has no documents in split {split!r}')
  return docs


@gin.configurable
def tokenizer(path: str | None = None, vocab_size: int = 4096, cache_dir: str = DEFAULT_TOKENIZER_CACHE,
              dataset: str = 'stdlib') -> tokenizer_lib.Tokenizer:
  """The tokenizer file at `path` (K2's tiktoken.model or a tokenizer.json), else a byte-level BPE of
  `vocab_size` trained on the dataset's training split and cached in cache_dir."""
  if path:
    return tokenizer_lib.load(path)
  docs = documents('train', dataset=dataset)
  # Train on a fixed, spread-out sample: enough for a few thousand merges, seconds on two cores.
  step = max(1, len(docs) // 2000)
  sample = lambda: (docs[i] for i in range(0, len(docs), step))
  return tokenizer_lib.cached_bpe(f'{dataset}:{len(docs)}:{step}', sample, vocab_size, cache_dir)


class _Tokenize(grain.transforms.Map):

  def __init__(self, tok: tokenizer_lib.Tokenizer):
    self._tok = tok

  def map(self, text: str) -> dict[str, np.ndarray]:
    ids = np.asarray([self._tok.bos_id, *self._tok.encode(text), self._tok.eos_id], np.int32)
    return {'inputs': ids[:-1], 'targets': ids[1:]}


def _finish_row(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {
      'inputs': row['inputs'], 'targets': row['targets'],
      'positions': row['inputs_positions'].astype(np.int32),
      'segment_ids': row['inputs_segment_ids'].astype(np.int32),
      'mask': (row['targets_segment_ids'] > 0).astype(np.float32),
  }


class _RepeatHalf(grain.transforms.RandomMap):
  """With probability `fraction`, a row becomes its first half shown twice (one segment, every target counted).

  Copying from the context (induction heads) emerges only after billions of tokens of natural text; a model
  pretrained on a few million, as the embedded defaults are, cannot copy an id or a name it has just read into a
  tool call. Rows whose second half repeats the first reward copying directly. Measured on k2_tiny (README,
  post-training; experiments/probe_copy.py): at 0.5 for 1,200 steps it copies a little, at 0.25 for 400 steps not."""

  def __init__(self, fraction: float):
    self._fraction = fraction

  def random_map(self, row: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    if rng.random() >= self._fraction:
      return row
    seq_len = len(row['inputs'])
    half = row['inputs'][:(seq_len + 1) // 2]
    tokens = np.concatenate([half, half, half])[:seq_len + 1]
    return {'inputs': tokens[:-1], 'targets': tokens[1:], 'positions': np.arange(seq_len, dtype=np.int32),
            'segment_ids': np.ones(seq_len, np.int32), 'mask': np.ones(seq_len, np.float32)}


class Batches:
  """The pipeline's iterator. Its state is the grain iterator's, written as a Python literal: grain's own JSON
  form turns the packer's (start, end) tuples into lists, and a restored packer then resumes at the wrong row."""

  def __init__(self, iterator: grain.DatasetIterator):
    self._iterator = iterator

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._iterator)

  def get_state(self) -> bytes:
    return repr(self._iterator.get_state()).encode()

  def set_state(self, state: bytes) -> None:
    self._iterator.set_state(ast.literal_eval(state.decode()))

  def start_prefetch(self) -> None:  # grain.checkpoint calls it after a restore
    if hasattr(self._iterator, 'start_prefetch'):
      self._iterator.start_prefetch()


def lm_batches(docs: Sequence[str], tok: tokenizer_lib.Tokenizer, *, batch_size: int, seq_len: int, seed: int,
               shuffle: bool = True, repeat: bool = True, process_index: int = 0, process_count: int = 1,
               shuffle_window_rows: int = 1024, repeat_fraction: float = 0.0) -> Batches:
  """A checkpointable iterator of packed batches (see the module docstring). Each process reads a disjoint
  1/process_count of the documents. repeat_fraction: the share of rows that show their first half twice
  (_RepeatHalf; 0 leaves the data as it is)."""
  if not 0.0 <= repeat_fraction <= 1.0:
    raise ConfigError(f'repeat_fraction must lie in [0, 1], got {repeat_fraction!r}')
  dataset = grain.MapDataset.source(docs)[process_index::process_count]
  if shuffle:
    dataset = dataset.shuffle(seed=seed)
  if repeat:
    dataset = dataset.repeat()
  # A short read-ahead: grain's default tokenizes hundreds of documents before the first batch (tens of seconds
  # on a laptop); a few are enough to keep the step fed.
  dataset = dataset.map(_Tokenize(tok)).to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=16))
  dataset = grain.experimental.ConcatThenSplitIterDataset(
      dataset, length_struct={'inputs': seq_len, 'targets': seq_len})
  dataset = dataset.map(_finish_row)
  if shuffle:
    dataset = grain.experimental.WindowShuffleIterDataset(dataset, window_size=shuffle_window_rows, seed=seed)
  if repeat_fraction:
    dataset = dataset.random_map(_RepeatHalf(repeat_fraction), seed=seed)
  return Batches(iter(dataset.batch(batch_size, drop_remainder=True)))


def unigram_loss(batches: Sequence[dict[str, np.ndarray]], vocab_size: int) -> float:
  """Cross entropy (nats/token) of the best unigram model of these targets: their own frequency distribution.

  A floor for any model that ignores context; the README compares the trained model's validation loss with it.
  """
  targets = np.concatenate([b['targets'][b['mask'] > 0] for b in batches])
  counts = np.bincount(targets, minlength=vocab_size).astype(np.float64)
  probs = counts[counts > 0] / counts.sum()
  return float(-(probs * np.log(probs)).sum())
