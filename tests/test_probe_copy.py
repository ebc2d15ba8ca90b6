"""The copy probe's scores: an exact copier scores 1.0 and a near-zero second-showing loss; a model that ignores the
context does not."""

import jax
import jax.numpy as jnp
import numpy as np

from k2 import probes as probe_copy


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


def test_probe_copy_cli_runs_on_an_exported_model_and_rejects_bad_flags(tmp_path):
  import os
  import subprocess
  import sys
  from k2 import model as model_lib
  from k2.config import get_config
  from k2.data import tokenizer as tokenizer_lib
  from k2.train import recipe
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'} | {'JAX_PLATFORMS': 'cpu'}
  run = lambda *flags: subprocess.run([sys.executable, '-m', 'experiments.probe_copy', *flags], cwd=root, env=env,
                                      capture_output=True, text=True, timeout=300)
  path = str(tmp_path / 'tokenizer.json')
  tokenizer_lib.train_bpe(lambda: ['def copy(x):\n    return x\n'] * 8, vocab_size=300, path=path)
  recipe.export_model(model_lib.create(get_config('k2_tiny', num_layers=2, vocab_size=512)), str(tmp_path / 'm'), path)
  result = run('--checkpoint', str(tmp_path / 'm'), '--rows', '4', '--length', '16')
  assert result.returncode == 0 and 'copy accuracy' in result.stdout, result.stderr[-1000:]
  result = run('--checkpoint', str(tmp_path / 'm'), '--low_id', '600')
  assert result.returncode != 0 and 'error: need 0 <= --low_id < 512' in result.stderr + result.stdout
