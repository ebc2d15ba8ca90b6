"""Probes of what a trained model can do, independent of any task: `copy_scores` (induction: does it predict a
sequence's second showing from its first?). experiments/probe_copy.py runs it on a checkpoint."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


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
