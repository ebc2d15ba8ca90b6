"""200 MuonClip steps of k2_tiny through the pretraining stage: the loss falls, and a step clips exactly when a head's max
logit passed tau."""

import json

import gin
import numpy as np
import pytest

from k2.config import get_config
from k2.train import pretrain


@pytest.mark.slow  # 200 steps; the ablation notebooks cover MuonClip training in CI
def test_200_muonclip_steps(tmp_path):
  config = get_config('k2_tiny', num_layers=2)
  tau = 4.0  # low enough that QK-Clip really fires on this tiny model
  gin.clear_config()
  gin.bind_parameter('schedule.warmup_steps', 10)
  try:
    final = pretrain.train(str(tmp_path), model_config=config, num_steps=200, batch_size=4, seq_len=32,
                          learning_rate=3e-3, qk_clip_tau=tau, log_every=1, eval_batches=2, sample_tokens=0)
  finally:
    gin.clear_config()
  records = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in records] == list(range(1, 201))
  losses = np.array([r['loss'] for r in records])
  assert losses[-20:].mean() < losses[:20].mean() - 1.0, (losses[:20].mean(), losses[-20:].mean())
  assert np.isfinite(final['eval_loss']) and final['eval_loss'] < final['unigram_loss']
  clipped = np.array([r['clipped_heads'] for r in records])
  max_logit = np.array([r['max_logit'] for r in records])
  assert clipped.sum() > 0
  assert np.all((max_logit > tau) == (clipped > 0))  # a step clips exactly when some head passed tau
