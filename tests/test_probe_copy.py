"""The copy probe's scores: an exact copier scores 1.0 and a near-zero second-showing loss; a model that ignores the
context does not."""

import jax
import jax.numpy as jnp
import numpy as np

from experiments import probe_copy


def test_a_perfect_copier_scores_one_and_a_context_blind_model_does_not():
  tokens = probe_copy.repeated_sequences(rows=4, length=10, low=3, high=50, seed=1)
  assert tokens.shape == (4, 20) and (tokens[:, :10] == tokens[:, 10:]).all()

  def copier(t):  # position p predicts the sequence's token (p + 1) mod length: exact in the second showing
    once = jnp.roll(t[:, :t.shape[1] // 2], -1, axis=1)
    return 30.0 * jax.nn.one_hot(jnp.concatenate([once, once], axis=1), 50)

  scores = probe_copy.copy_scores(copier, tokens)
  assert scores['copy_accuracy'] == 1.0 and scores['loss_second'] < 1e-6
  blind = probe_copy.copy_scores(lambda t: jnp.zeros(t.shape + (50,)), tokens)
  np.testing.assert_allclose([blind['loss_first'], blind['loss_second']], np.log(50), rtol=1e-6)
  assert blind['copy_accuracy'] < 0.5


def test_text_sequences_are_chunks_of_the_texts_shown_twice():
  texts = ['short', 'a much longer text than the others, long enough for chunks', 'tiny']
  tokens = probe_copy.text_sequences(texts, lambda s: [ord(c) for c in s], rows=5, length=8, seed=2)
  assert tokens.shape == (5, 16) and (tokens[:, :8] == tokens[:, 8:]).all()
  for row in tokens:
    assert ''.join(map(chr, row[:8])) in texts[1]
