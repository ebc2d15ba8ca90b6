"""End-to-end tests of the main job's launcher (absl + gin + TFDS/grain + orbax) on k2_tiny.

Runs are subprocesses of `python -m experiments.pretrain`, exactly as a user launches them, on one CPU device.
Exact resume is asserted bit for bit: on CPU the same compiled step on the same restored bits gives the same bits.
"""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import gin
import pytest

from experiments import pretrain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ['SEQ_LEN = 32', 'BATCH_SIZE = 2', 'train.log_every = 1', 'train.eval_batches = 2', 'train.sample_tokens = 0']


def command(workdir, *bindings):
  return [sys.executable, '-m', 'experiments.pretrain', '--gin_file=configs/pretrain/tiny.gin',
          f'--workdir={workdir}'] + [f'--gin_bindings={b}' for b in (*SMALL, *bindings)]


def launch(workdir, *bindings):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ''}
  return subprocess.run(command(workdir, *bindings), cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


def start(workdir, *bindings):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ''}
  return subprocess.Popen(command(workdir, *bindings), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=env)


def run_in_process(workdir, *bindings):
  gin.clear_config()
  try:
    return pretrain.run(['configs/pretrain/tiny.gin'], [*SMALL, *bindings], str(workdir))
  finally:
    gin.clear_config()


def records(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def checkpoint_steps(workdir):
  return sorted(int(name) for name in os.listdir(os.path.join(workdir, 'checkpoints')) if name.isdigit())


def wait_for(predicate, process, timeout=300):
  deadline = time.time() + timeout
  while not predicate():
    assert process.poll() is None, process.communicate()[1][-3000:]
    assert time.time() < deadline, 'timed out'
    time.sleep(0.05)


def test_train_checkpoint_resume_and_outputs(tmp_path):
  workdir = tmp_path / 'run'
  result = launch(workdir, 'NUM_STEPS = 6', 'CHECKPOINT_EVERY = 3', 'EVAL_EVERY = 3', 'train.sample_tokens = 8')
  assert result.returncode == 0, result.stderr[-3000:]
  rows = records(workdir)
  assert [r['step'] for r in rows] == [1, 2, 3, 4, 5, 6]
  for key in ('loss', 'learning_rate', 'grad_norm', 'update_rms', 'max_logit', 'clipped_heads',
              'expert_load_max_over_mean', 'tokens_per_second'):
    assert all(key in r for r in rows), key
  assert 'eval_loss' in rows[2] and 'eval_loss' in rows[5] and 'eval_loss' not in rows[0]
  assert rows[5]['update_rms'] > 0 and rows[5]['grad_norm'] > 0
  assert checkpoint_steps(workdir) == [3, 6]
  assert glob.glob(str(workdir / 'tensorboard' / 'events.out.tfevents.*'))
  assert 'NUM_STEPS = 6' in (workdir / 'operative_config.gin').read_text()
  assert os.path.isfile(workdir / 'model' / 'config.json')  # the exported model, for experiments.chat
  assert os.path.isfile(workdir / 'model' / 'tokenizer.json')  # with its tokenizer
  assert 'sample (temperature 0.0)' in result.stdout and 'unigram model' in result.stdout

  # A process killed while orbax writes step 9 leaves that step's temporary directory behind, half full; it is
  # never resumed from. Running again with more steps resumes from step 6 and continues the same metrics file.
  partial = workdir / 'checkpoints' / '9.orbax-checkpoint-tmp-1764000000'
  shutil.copytree(workdir / 'checkpoints' / '6', partial)
  shutil.rmtree(partial / 'state')
  result = launch(workdir, 'NUM_STEPS = 8', 'CHECKPOINT_EVERY = 3', 'EVAL_EVERY = 3')
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'resumed from {workdir}/checkpoints/6' in result.stdout
  assert [r['step'] for r in records(workdir)] == [1, 2, 3, 4, 5, 6, 7, 8]
  assert records(workdir)[:6] == rows


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run_bit_exactly(tmp_path):
  steps = ['NUM_STEPS = 14', 'CHECKPOINT_EVERY = 4', 'EVAL_EVERY = 100']
  reference = launch(tmp_path / 'reference', *steps)
  assert reference.returncode == 0, reference.stderr[-3000:]

  workdir = tmp_path / 'killed'
  process = start(workdir, *steps)
  wait_for(lambda: os.path.isdir(workdir / 'checkpoints') and checkpoint_steps(workdir), process)
  process.kill()  # SIGKILL: no handler runs
  process.communicate()
  resumed_from = checkpoint_steps(workdir)[-1]
  assert resumed_from < 14
  result = launch(workdir, *steps)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'checkpoints/{resumed_from}' in result.stdout

  expected = {r['step']: r['loss'] for r in records(tmp_path / 'reference')}
  got = {r['step']: r['loss'] for r in records(workdir)}
  assert sorted(got) == list(range(1, 15))
  assert [got[s] for s in range(resumed_from + 1, 15)] == [expected[s] for s in range(resumed_from + 1, 15)]


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_exits_zero(tmp_path):
  workdir = tmp_path / 'run'
  process = start(workdir, 'NUM_STEPS = 10000', 'CHECKPOINT_EVERY = 1000', 'train.log_every = 1000')
  wait_for(lambda: os.path.exists(workdir / 'metrics.jsonl') and len(records(workdir)) >= 1, process)
  process.send_signal(signal.SIGTERM)
  stdout, stderr = process.communicate(timeout=300)
  assert process.returncode == 0, stderr[-3000:]
  last_step = records(workdir)[-1]['step']
  assert checkpoint_steps(workdir) == [last_step]
  assert 'preempted' in stdout


@pytest.mark.parametrize('bindings, message', [
    (['NUM_STPES = 4', 'train.num_stpes = 4'], 'bad gin config'),
    (["MESH = {'fsdp': 3}"], 'needs 3 devices'),
    (["MESH = {'expert': 8}", 'model_config.num_experts = 12'], 'not divisible by the expert axis'),
    (["MESH = {'data': 8}"], 'does not split into 1 micro-batches over 8 batch shards'),
    (['SEQ_LEN = 4096'], 'exceeds the model max_position_embeddings'),
    (['train.loss_chunk = 7'], 'does not divide SEQ_LEN'),
    (["documents.dataset = '/nonexistent/corpus/*.txt'"], 'no such file'),
    (["documents.dataset = 'tfds:no_such_dataset'"], 'cannot be read'),
])
def test_bad_input_is_a_one_line_error_and_writes_nothing(tmp_path, bindings, message):
  with pytest.raises(SystemExit) as exit_info:
    run_in_process(tmp_path / 'run', *bindings)
  error = str(exit_info.value.code)
  assert error.startswith('error: ') and '\n' not in error and message in error, error
  assert not os.path.exists(tmp_path / 'run')


def test_unknown_gin_file_and_empty_dataset(tmp_path):
  with pytest.raises(SystemExit) as exit_info:
    pretrain.run(['configs/nope.gin'], [], str(tmp_path / 'run'))
  assert str(exit_info.value.code).startswith('error: bad gin config')
  empty = tmp_path / 'empty.jsonl'
  empty.write_text('')
  with pytest.raises(SystemExit) as exit_info:
    run_in_process(tmp_path / 'run', f"documents.dataset = '{empty}'")
  assert 'no non-empty documents' in str(exit_info.value.code)
  assert not os.path.exists(tmp_path / 'run')


def test_checkpoint_of_another_model_shape_is_refused_and_kept(tmp_path):
  workdir = tmp_path / 'run'
  run_in_process(workdir, 'NUM_STEPS = 2', 'CHECKPOINT_EVERY = 2', 'EVAL_EVERY = 100')
  before = sorted(str(p) for p in workdir.rglob('*'))
  with pytest.raises(SystemExit) as exit_info:
    run_in_process(workdir, 'NUM_STEPS = 4', 'model_config.num_layers = 2')
  error = str(exit_info.value.code)
  assert error.startswith('error: ') and 'different model' in error and 'num_layers' in error, error
  assert sorted(str(p) for p in workdir.rglob('*')) == before


@pytest.mark.slow
def test_two_processes_train_data_parallel_and_checkpoint(tmp_path):
  """JAX's multi-controller runtime on one machine: two CPU processes, one device each, MESH {'data': 2}."""
  import socket
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  workdir = tmp_path / 'run'
  processes = [subprocess.Popen(
      command(workdir, 'NUM_STEPS = 4', 'CHECKPOINT_EVERY = 2', 'EVAL_EVERY = 4', "MESH = {'data': 2}") +
      [f'--coordinator_address=localhost:{port}', '--num_processes=2', f'--process_id={i}'],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ''}) for i in range(2)]
  outputs = [p.communicate(timeout=600) for p in processes]
  assert [p.returncode for p in processes] == [0, 0], outputs[0][1][-3000:]
  assert [r['step'] for r in records(workdir)] == [1, 2, 3, 4]
  assert checkpoint_steps(workdir) == [2, 4]
  assert 'validation loss' in outputs[0][0] and 'validation loss' not in outputs[1][0]
