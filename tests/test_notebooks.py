"""The ablation notebooks (experiments/notebooks/) run top to bottom on a few steps of k2_tiny and draw their plots.

CI mode (K2_NOTEBOOK_CI=1) appends experiments/ablations/configs/ci.gin: 4 steps of a 2-layer k2_tiny, one learning
rate per optimizer. The token-efficiency notebook runs second in the same run root, so it reuses the QK-Clip
notebook's MuonClip and AdamW runs: three training runs in all, two at a time (most of each run is the trainer's
fixed start-up: imports, the data pipeline's first batches, compilation from JAX's persistent cache when warm).
"""

import json
import os

import jupytext
import pytest
from nbclient import NotebookClient

from experiments.ablations import ablations

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, 'experiments', 'notebooks')
NAMES = ('qk_clip', 'token_efficiency')  # in this order: the second reuses the first's runs


@pytest.mark.parametrize('name', NAMES)
def test_notebook_pairs_match(name):
  """The committed .ipynb holds exactly the cells of its jupytext script (edit the .py, then `jupytext --sync`)."""
  script = jupytext.read(os.path.join(NOTEBOOKS, f'{name}.py'))
  notebook = jupytext.read(os.path.join(NOTEBOOKS, f'{name}.ipynb'))
  assert [(c.cell_type, c.source) for c in script.cells] == [(c.cell_type, c.source) for c in notebook.cells]
  assert not any(c.get('outputs') for c in notebook.cells), 'commit the .ipynb without outputs'


def test_notebooks_execute_and_plot(tmp_path, monkeypatch):
  monkeypatch.setenv('K2_NOTEBOOK_CI', '1')
  monkeypatch.setenv('K2_ABLATION_ROOT', str(tmp_path / 'runs'))
  monkeypatch.setenv('K2_ABLATION_PARALLEL', '2')
  monkeypatch.setenv('XLA_FLAGS', '')  # one CPU device for the runs (conftest asks for 8 fake ones)
  for name in NAMES:
    notebook = jupytext.read(os.path.join(NOTEBOOKS, f'{name}.py'))
    NotebookClient(notebook, timeout=600, kernel_name='python3',
                   resources={'metadata': {'path': NOTEBOOKS}}).execute()  # raises on any failing cell
    outputs = [output for cell in notebook.cells if cell.cell_type == 'code' for output in cell.outputs]
    pngs = [output for output in outputs if 'image/png' in output.get('data', {})]
    assert len(pngs) == 1, (name, [o.get('output_type') for o in outputs])
    text = ''.join(output.get('text', '') for output in outputs)
    assert 'final val loss' in text, text[-2000:]
  runs = sorted(os.listdir(tmp_path / 'runs'))
  assert len([r for r in runs if r.startswith(('muon_', 'muonclip_', 'adamw_'))]) == 3, runs


def test_tokens_to_reach():
  points = [(100.0, 3.0), (200.0, 2.5), (400.0, 2.0)]
  tokens, how = ablations.tokens_to_reach(points, 2.25)
  assert tokens == pytest.approx(200 * 2 ** 0.5) and 'interpolated' in how  # halfway in log tokens
  assert ablations.tokens_to_reach(points, 2.5)[0] == pytest.approx(200.0)
  assert ablations.tokens_to_reach(points, 1.0) == (None, '> 400 (not reached at the largest budget)')
  assert ablations.tokens_to_reach(points, 3.5)[0] is None


def test_collect_reads_metrics_jsonl(tmp_path):
  settings = ablations.Settings(num_steps=3, batch_size=2, seq_len=4, tau=5.0, qk_clip_lr=1e-2, muon_lrs=(),
                                adamw_lrs=(), adamw_budgets=(), model_name='k2_tiny', model_config=None)
  after_step = [5.0, 5.5, 4.0]
  records = [{'step': s, 'loss': 4.0 - s, 'max_logit': 4.0 + s, 'max_logit_after_step': after_step[s - 1],
              'clipped_heads': float(s > 1), 'max_logit_layer0': 4.0 + s, 'max_logit_layer1': 3.0} for s in (1, 2, 3)]
  records[1]['eval_loss'], records[2]['eval_loss'] = 3.5, 3.25
  (tmp_path / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))
  (tmp_path / 'done.json').write_text(json.dumps({'wall_seconds': 1.0, 'commit': 'abc1234'}))
  arm = ablations.collect(str(tmp_path), ablations.Run('muonclip', 1e-2), settings)
  assert arm['step'] == [1, 2, 3] and arm['max_logit_per_layer'] == [[5.0, 6.0, 7.0], [3.0, 3.0, 3.0]]
  assert arm['val_step'] == [2, 3] and arm['val_tokens'] == [16, 24] and arm['final_val_loss'] == 3.25
  assert arm['max_logit_after_step'] == after_step and arm['commit'] == 'abc1234'
  summary = ablations.qk_clip_summary(arm, 5.0)
  assert summary['steps_over_tau'] == 2 and summary['first_step_over_tau'] == 2  # 5.0 is not over tau
  assert summary['peak_max_logit'] == 7.0 and summary['peak_step'] == 3
  assert summary['peak_over_tau_percent'] == pytest.approx(40.0)
  assert summary['clipped_head_steps'] == 2 and summary['last_step_with_clipping'] == 3
  assert summary['mean_max_logit_of_clipping_steps'] == pytest.approx(6.5)
  assert summary['peak_max_logit_after_step'] == 5.5 and summary['steps_over_tau_after_step'] == 1
  # Steps 2 and 3 clipped: step 2's final weights gave 5.5 > tau and step 3's forward 7.0; step 3 is the last.
  assert summary['clipping_steps_over_tau_after_step'] == 1 and summary['clipping_steps_next_forward_over_tau'] == 1
  del arm['max_logit_after_step']  # an arm that does not measure it has no after-step numbers
  assert 'peak_max_logit_after_step' not in ablations.qk_clip_summary(arm, 5.0)
