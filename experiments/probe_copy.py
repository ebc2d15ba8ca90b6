"""Can a checkpoint copy from its context? An induction probe: random token sequences, each shown twice in a row.

    python -m experiments.probe_copy --checkpoint WORKDIR/model                   # random token ids
    python -m experiments.probe_copy --checkpoint WORKDIR/model --source stdlib   # chunks of this Python's stdlib

A model that copies predicts the second showing from the first: its loss there falls far below the loss on the
first showing (which is unpredictable by construction) and its argmax reproduces the sequence. Prints the mean
next-token loss (nats) on each showing and the argmax copy accuracy on the second. Tool-use SFT needs this ability:
ids, names and numbers must be copied from the conversation into tool-call arguments.
"""

from __future__ import annotations

import glob
import os
import sys
import sysconfig
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

_CHECKPOINT = flags.DEFINE_string('checkpoint', None, "Model directory (k2.convert.save_orbax: a run's model/).")
_ROWS = flags.DEFINE_integer('rows', 32, 'Random sequences.')
_LENGTH = flags.DEFINE_integer('length', 40, 'Tokens per sequence (each row is the sequence twice).')
_LOW = flags.DEFINE_integer('low_id', 300, 'Token ids are drawn from [low_id, vocab): above the byte-level ids.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the sequences.')
_SOURCE = flags.DEFINE_enum('source', 'random', ['random', 'stdlib'], 'random: uniform ids in [low_id, vocab); '
                            "stdlib: chunks of the running Python's standard library source, in the model's tokenizer "
                            '(likely text: the first showing is partly predictable, the gap to the second is copying).')


def repeated_sequences(rows: int, length: int, low: int, high: int, seed: int = 0) -> np.ndarray:
  """[rows, 2 * length] int32: each row a uniform random sequence of `length` ids in [low, high), twice."""
  seq = np.random.default_rng(seed).integers(low, high, (rows, length))
  return np.concatenate([seq, seq], axis=1).astype(np.int32)


def text_sequences(texts: list[str], encode: Callable[[str], list[int]], rows: int, length: int,
                   seed: int = 0) -> np.ndarray:
  """[rows, 2 * length] int32: random `length`-token chunks of random texts (those long enough), each twice."""
  rng = np.random.default_rng(seed)
  chunks = []
  for _ in range(100 * rows):
    ids = encode(texts[rng.integers(len(texts))])
    if len(ids) > length:
      start = rng.integers(len(ids) - length)
      chunks.append(ids[start:start + length])
      if len(chunks) == rows:
        seq = np.asarray(chunks, np.int32)
        return np.concatenate([seq, seq], axis=1)
  raise ValueError(f'fewer than {rows} texts hold more than {length} tokens')


def copy_scores(logits_fn: Callable[[jax.Array], jax.Array], tokens: np.ndarray) -> dict[str, float]:
  """Next-token loss on the first and second showing of each row's sequence, and argmax copy accuracy on the
  second (every prediction whose target lies in the second showing, its first token included)."""
  length = tokens.shape[1] // 2
  logits = logits_fn(jnp.asarray(tokens))
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  targets = jnp.asarray(tokens[:, 1:])
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  second = slice(length - 1, None)  # position p predicts token p + 1
  return {'loss_first': float(nll[:, :length - 1].mean()), 'loss_second': float(nll[:, second].mean()),
          'copy_accuracy': float((logp[:, second].argmax(-1) == targets[:, second]).mean())}


def main(argv):
  del argv
  if not _CHECKPOINT.value:
    sys.exit('error: --checkpoint DIR is required')
  from k2 import convert  # noqa: PLC0415 (after flag parsing)
  try:
    model = convert.load_orbax(_CHECKPOINT.value, dtype=jnp.float32)
  except (OSError, ValueError) as e:
    sys.exit(f'error: {e}')
  vocab = model.config.vocab_size
  if not 0 <= _LOW.value < vocab or 2 * _LENGTH.value > model.config.rope.max_position_embeddings:
    sys.exit(f'error: need 0 <= --low_id < {vocab} and 2 x --length <= {model.config.rope.max_position_embeddings}')
  if _SOURCE.value == 'random':
    tokens = repeated_sequences(_ROWS.value, _LENGTH.value, _LOW.value, vocab, _SEED.value)
  else:
    from k2.serve import loading  # noqa: PLC0415
    paths = sorted(glob.glob(os.path.join(sysconfig.get_paths()['stdlib'], '*.py')))
    texts = [open(path, encoding='utf-8', errors='ignore').read() for path in paths]
    tokens = text_sequences(texts, loading.load_tokenizer(None, _CHECKPOINT.value).encode, _ROWS.value, _LENGTH.value,
                            _SEED.value)
  scores = copy_scores(lambda t: model(t)[0], tokens)
  print(f'{_CHECKPOINT.value}: loss first showing {scores["loss_first"]:.2f} nats, second {scores["loss_second"]:.2f}; '
        f'copy accuracy {scores["copy_accuracy"]:.2f} ({_ROWS.value} rows x {_LENGTH.value} tokens of {_SOURCE.value})')


if __name__ == '__main__':
  app.run(main)
