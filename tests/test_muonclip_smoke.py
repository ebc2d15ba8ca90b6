"""200 MuonClip steps of k2_tiny: the loss falls, and every step records clipped heads and the max logit."""

import json

import numpy as np

from k2.config import get_config
from k2.train import trainer


def test_200_muonclip_steps(tmp_path):
  config = get_config('k2_tiny', vocab_size=256, num_layers=2)
  tau = 4.0  # low enough that QK-Clip really fires on this tiny model
  eval_loss = trainer.train(str(tmp_path), model_config=config, num_steps=200, batch_size=4, seq_len=32,
                            learning_rate=3e-3, warmup_steps=10, qk_clip_tau=tau, log_every=1, eval_batches=2)
  records = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  steps = [r for r in records if 'loss' in r]
  assert [r['step'] for r in steps] == list(range(1, 201))
  losses = np.array([r['loss'] for r in steps])
  assert losses[-20:].mean() < losses[:20].mean() - 1.0, (losses[:20].mean(), losses[-20:].mean())
  assert np.isfinite(eval_loss) and eval_loss < losses[:20].mean()
  clipped = np.array([r['clipped_heads'] for r in steps])
  max_logit = np.array([r['max_logit'] for r in steps])
  assert clipped.sum() > 0
  assert np.all((max_logit > tau) == (clipped > 0))  # a step clips exactly when some head passed tau
