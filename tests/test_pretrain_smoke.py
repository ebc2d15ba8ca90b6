"""End-to-end smoke test of the main job's launcher (absl + gin) on k2_tiny."""

import json
import os
import subprocess
import sys

import numpy as np

from k2.data import stdlib_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(workdir, *bindings):
  command = [sys.executable, '-m', 'experiments.pretrain', '--gin_file=configs/pretrain/tiny.gin',
             f'--workdir={workdir}'] + [f'--gin_bindings={b}' for b in bindings]
  return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_launcher_trains_and_writes_metrics(tmp_path):
  result = launch(tmp_path, 'NUM_STEPS = 4', 'SEQ_LEN = 32', 'BATCH_SIZE = 2', 'train.log_every = 1')
  assert result.returncode == 0, result.stderr[-2000:]
  records = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in records[:-1]] == [1, 2, 3, 4]
  assert all(np.isfinite(r['loss']) and r['loss'] > 0 for r in records[:-1])
  assert np.isfinite(records[-1]['eval_loss'])
  assert 'NUM_STEPS = 4' in (tmp_path / 'operative_config.gin').read_text()


def test_bad_gin_binding_is_one_line_error(tmp_path):
  result = launch(tmp_path / 'run', 'NUM_STPES = 4', 'train.num_stpes = 4')
  assert result.returncode != 0
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('error: bad gin config') and 'num_stpes' in last
  assert not os.path.exists(tmp_path / 'run')


def test_packing_keeps_documents_apart():
  docs = [np.arange(1, 6), np.arange(10, 13), np.arange(20, 30)]
  rows = list(stdlib_text.pack(iter(docs), seq_len=6))
  first = rows[0]
  np.testing.assert_array_equal(first['inputs'], [1, 2, 3, 4, 5, 10])
  np.testing.assert_array_equal(first['targets'], [2, 3, 4, 5, 10, 11])
  np.testing.assert_array_equal(first['segment_ids'], [1, 1, 1, 1, 1, 2])
  np.testing.assert_array_equal(first['mask'], [1, 1, 1, 1, 0, 1])  # no prediction across the boundary
  np.testing.assert_array_equal(rows[1]['positions'][:2], [0, 1])


def test_validation_split_is_disjoint_and_deterministic():
  train, validation = stdlib_text.documents('train'), stdlib_text.documents('validation')
  assert validation and not set(train) & set(validation)
  assert validation == stdlib_text.documents('validation')
