"""Can a checkpoint copy from its context? An induction probe: token sequences (random ids or chunks of real code),
each shown twice in a row.

    python -m experiments.probe_copy --checkpoint WORKDIR/model                   # random token ids
    python -m experiments.probe_copy --checkpoint WORKDIR/model --source stdlib   # chunks of this Python's stdlib

A model that copies predicts the second showing from the first: its loss there falls far below the loss on the
first showing (unpredictable for random ids) and its argmax reproduces the sequence. Prints the mean
next-token loss (nats) on each showing and the argmax copy accuracy on the second. Tool-use SFT needs this ability:
ids, names and numbers must be copied from the conversation into tool-call arguments.
"""

from __future__ import annotations

import glob
import os
import sys
import sysconfig

import jax.numpy as jnp
import numpy as np
from absl import app, flags

from k2.probes import copy_scores, repeated_sequences, text_sequences

_CHECKPOINT = flags.DEFINE_string('checkpoint', None, "Model directory (k2.convert.save_orbax: a run's model/).")
_ROWS = flags.DEFINE_integer('rows', 32, 'Random sequences.')
_LENGTH = flags.DEFINE_integer('length', 40, 'Tokens per sequence (each row is the sequence twice).')
_LOW = flags.DEFINE_integer('low_id', 300, 'Token ids are drawn from [low_id, vocab): above the byte-level ids.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the sequences.')
_SOURCE = flags.DEFINE_enum('source', 'random', ['random', 'stdlib'], 'random: uniform ids in [low_id, vocab); '
                            "stdlib: chunks of the running Python's standard library source, in the model's tokenizer "
                            '(likely text: the first showing is partly predictable, the gap to the second is copying).')


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
