"""What an operator and a new user hit: preemption, exports, corrupt checkpoints, bad inputs, start-up output.

The launcher runs as a user runs it (`python -m experiments.pretrain`, in a subprocess) where its output or exit code
matters, and in-process (`pretrain.run`) where only the files do.
"""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from k2 import convert
from k2 import model as model_lib
from k2 import sharding
from k2.config import get_config
from k2.train import loop
from k2.train import step as step_lib
from tests.test_pretrain_smoke import ROOT, checkpoint_steps, command, launch, records, run_in_process, start, wait_for

QUIET = ['train.sample_tokens = 0', 'EVAL_EVERY = 100']


def test_sigterm_saves_the_step_in_flight_whatever_log_every():
  """The signal arrives while step 3's batch is read (log_every 1000): step 3 is saved and the loop stops."""
  config = get_config('k2_tiny', num_layers=2, vocab_size=256)
  tx = optax.sgd(0.1)
  mesh = sharding.make_mesh({}, jax.devices()[:1])
  graphdef, state = step_lib.init_state(model_lib.create(config), tx)
  setup = step_lib.StepSetup(graphdef=graphdef, model_config=config, optimizer=tx, schedule=lambda s: 0.1)
  rng = np.random.default_rng(0)

  def batches():
    for step in range(1, 100):
      if step == 3:
        signal.raise_signal(signal.SIGTERM)
      tokens = rng.integers(0, 256, (2, 8)).astype(np.int32)
      yield {'inputs': tokens, 'targets': tokens, 'positions': np.tile(np.arange(8, dtype=np.int32), (2, 1)),
             'segment_ids': np.ones((2, 8), np.int32), 'mask': np.ones((2, 8), np.float32)}

  import tempfile
  with tempfile.TemporaryDirectory() as workdir:
    _, record, preempted = loop.run(workdir, state, setup, batches(), mesh,
                                    loop.LoopConfig(num_steps=50, log_every=1000, checkpoint_every=1000))
    assert preempted and checkpoint_steps(workdir) == [3]
    assert [r['step'] for r in records(workdir)] == [1, 3]  # the first step, then the preempted one
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the loop's handler is gone again


@pytest.mark.slow
def test_sigterm_in_a_real_run_saves_long_before_the_next_logged_step(tmp_path):
  workdir = tmp_path / 'run'
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ''}
  process = subprocess.Popen(command(workdir, 'NUM_STEPS = 100000', 'CHECKPOINT_EVERY = 50000',
                                     'train.log_every = 50000'),
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
  deadline = time.time() + 300
  while not (os.path.exists(workdir / 'metrics.jsonl') and records(workdir)):  # step 1 done: training is on
    assert process.poll() is None and time.time() < deadline
    time.sleep(0.1)
  time.sleep(3)
  process.send_signal(signal.SIGTERM)
  stdout, stderr = process.communicate(timeout=120)
  assert process.returncode == 0, stderr[-3000:]
  saved = checkpoint_steps(workdir)
  assert len(saved) == 1 and 1 < saved[0] < 50000, saved
  assert f'preempted: saved step {saved[0]}' in stdout
  assert records(workdir)[-1]['step'] == saved[0]


def exported_embed(workdir):
  return np.asarray(convert.load_orbax(str(workdir / 'model')).embed[...])


def test_extending_a_finished_run_updates_the_export_and_the_export_carries_its_tokenizer(tmp_path):
  run_in_process(tmp_path / 'run', 'NUM_STEPS = 2', *QUIET)
  first = exported_embed(tmp_path / 'run')
  assert sorted(os.listdir(tmp_path / 'run' / 'model')) == ['config.json', 'state', 'tokenizer.json']
  run_in_process(tmp_path / 'run', 'NUM_STEPS = 3', *QUIET)
  extended = exported_embed(tmp_path / 'run')
  run_in_process(tmp_path / 'straight', 'NUM_STEPS = 3', *QUIET)
  assert not np.array_equal(first, extended)
  np.testing.assert_array_equal(extended, exported_embed(tmp_path / 'straight'))  # the step-3 weights
  assert not [name for name in os.listdir(tmp_path / 'run') if name.startswith('.model-')]  # no staging left

  # The chat reads the tokenizer from the model directory: readable text with no other flag.
  chat = subprocess.run([sys.executable, '-m', 'experiments.chat', f'--checkpoint={tmp_path / "run" / "model"}',
                         '--prompt=def f(x):', '--max_new_tokens=12', '--temperature=0'], cwd=ROOT,
                        capture_output=True, text=True, timeout=300, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert chat.returncode == 0, chat.stderr[-3000:]
  reply = chat.stdout.split('kimi> ', 1)[1]
  assert reply.strip() and all(c.isprintable() or c in '\n\t' for c in reply), repr(reply)
  assert 'holds no tokenizer' not in chat.stderr


def corrupt(checkpoint_dir):
  """Truncates every data file of a checkpoint's state to half its size (what a full disk or a bad copy leaves)."""
  for root, _, files in os.walk(checkpoint_dir / 'state'):
    for name in files:
      path = os.path.join(root, name)
      with open(path, 'r+b') as f:
        f.truncate(os.path.getsize(path) // 2)


def test_a_corrupt_latest_checkpoint_is_named_set_aside_and_the_previous_one_resumed(tmp_path):
  workdir = tmp_path / 'run'
  assert launch(workdir, 'NUM_STEPS = 4', 'CHECKPOINT_EVERY = 2', *QUIET).returncode == 0
  reference = records(workdir)
  corrupt(workdir / 'checkpoints' / '4')
  result = launch(workdir, 'NUM_STEPS = 5', 'CHECKPOINT_EVERY = 2', *QUIET)
  assert result.returncode == 0, result.stderr[-3000:]
  warnings = [line for line in result.stdout.splitlines() if 'checkpoint 4 is unreadable' in line]
  assert len(warnings) == 1 and 'corrupt_checkpoints' in warnings[0], result.stdout
  assert f'resumed from {workdir}/checkpoints/2' in result.stdout
  assert os.path.isdir(workdir / 'corrupt_checkpoints' / '4' / 'state')  # kept, not deleted
  assert checkpoint_steps(workdir) == [2, 4, 5]
  assert [r['step'] for r in records(workdir)] == [1, 2, 3, 4, 5]
  assert [r['loss'] for r in records(workdir)[:4]] == [r['loss'] for r in reference]  # steps 3, 4 redone exactly

  # With every checkpoint unreadable: one error line with advice, exit != 0, nothing deleted.
  for step in checkpoint_steps(workdir):
    corrupt(workdir / 'checkpoints' / str(step))
  result = launch(workdir, 'NUM_STEPS = 6', 'CHECKPOINT_EVERY = 2', *QUIET)
  assert result.returncode != 0
  errors = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
  assert len(errors) == 1 and 'no readable checkpoint left' in errors[0], result.stderr[-2000:]
  assert len(os.listdir(workdir / 'corrupt_checkpoints')) == 4


def read_only_dir(tmp_path):
  if os.geteuid() == 0:  # root writes through permission bits; /sys refuses even root
    return '/sys/k2_workdir'
  path = tmp_path / 'read_only'
  path.mkdir()
  path.chmod(0o555)
  return str(path / 'run')


@pytest.mark.parametrize('case, message', [
    (['SEQ_LEN = 0'], 'SEQ_LEN must be a positive integer'),
    (['SEQ_LEN = -5'], 'SEQ_LEN must be a positive integer'),
    (['BATCH_SIZE = 0'], 'BATCH_SIZE must be a positive integer'),
    (['NUM_STEPS = 0'], 'NUM_STEPS must be a positive integer'),
    (["MESH = {'data': 16}"], '--xla_force_host_platform_device_count'),
    ('workdir_is_a_file', 'is a file'),
    ('read_only_workdir', 'not writable'),
    ('empty_files', 'no non-empty documents'),
    ('single_file', 'holds one document'),
])
def test_bad_input_is_one_error_line_and_writes_nothing(tmp_path, case, message):
  workdir, bindings = tmp_path / 'run', list(case) if isinstance(case, list) else []
  if case == 'workdir_is_a_file':
    workdir = tmp_path / 'file'
    workdir.write_text('not a directory')
  elif case == 'read_only_workdir':
    workdir = read_only_dir(tmp_path)
  elif case in ('empty_files', 'single_file'):
    corpus = tmp_path / 'corpus'
    corpus.mkdir()
    for i in range(1 if case == 'single_file' else 3):
      (corpus / f'{i}.txt').write_text('some text ' * 20 if case == 'single_file' else '')
    bindings = [f"documents.dataset = '{corpus}/*.txt'", f"tokenizer.dataset = '{corpus}/*.txt'"]
  before = sorted(os.listdir(tmp_path))
  with pytest.raises(SystemExit) as exit_info:
    run_in_process(workdir, *bindings)
  error = str(exit_info.value.code)
  assert error.startswith('error: ') and '\n' not in error and message in error, error
  assert sorted(os.listdir(tmp_path)) == before
  if case == 'workdir_is_a_file':
    assert workdir.read_text() == 'not a directory'


@pytest.mark.slow
def test_start_up_line_within_5s_and_eta_within_half_of_the_real_remaining_time(tmp_path):
  """Every stdout line timestamped as it arrives: the first within 5 s; the ETA of the second logged step (the
  first is compilation) against the time the remaining steps really took."""
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': '', 'PYTHONUNBUFFERED': '1'}
  start = time.time()
  process = subprocess.Popen(command(tmp_path / 'run', 'NUM_STEPS = 120', 'train.log_every = 20', *QUIET),
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
  lines = [(time.time() - start, line) for line in process.stdout]
  assert process.wait() == 0
  assert lines[0][0] < 5.0, lines[0]
  steps = [(t, line) for t, line in lines if line.startswith('step ')]
  second_time, second = steps[1]
  eta_text = second.split('eta ')[1].split()[0]
  eta = int(eta_text.split('m')[0]) * 60 + int(eta_text.split('m')[1].rstrip('s'))
  real = steps[-1][0] - second_time
  assert 0.5 * real <= eta <= 1.5 * real, (eta, real)


@pytest.mark.slow
def test_init_from_a_workdir_an_export_or_an_hf_directory(tmp_path):
  """A later stage starts from earlier weights with a fresh optimizer: at lr 0 (no bias moves) the weights pass
  through unchanged; a different architecture is refused in one line."""
  run_in_process(tmp_path / 'base', 'NUM_STEPS = 2', *QUIET)
  base = exported_embed(tmp_path / 'base')
  for source in (tmp_path / 'base', tmp_path / 'base' / 'model', tmp_path / 'base' / 'checkpoints' / '2'):
    workdir = tmp_path / f'from_{source.name}'
    run_in_process(workdir, 'NUM_STEPS = 1', 'LEARNING_RATE = 0.0', 'train.bias_update_rate = 0.0',
                   f"train.init_from = '{source}'", *QUIET)
    np.testing.assert_array_equal(exported_embed(workdir), base)
  with pytest.raises(SystemExit) as exit_info:
    run_in_process(tmp_path / 'other', 'NUM_STEPS = 1', 'model_config.num_layers = 2',
                   f"train.init_from = '{tmp_path / 'base'}'", *QUIET)
  assert 'different model' in str(exit_info.value.code) and 'num_layers' in str(exit_info.value.code)

  from k2 import hf
  golden = os.path.join(ROOT, 'tests', 'golden', 'data', 'qlora_yarn')
  config = hf.read_config(golden, dtype='float32', param_dtype='float32')
  model = loop.initial_model(config, init_from=golden)
  reference = hf.load(golden, dtype=jnp.float32)
  np.testing.assert_array_equal(np.asarray(model.lm_head[...]), np.asarray(reference.lm_head[...]))


def test_initial_model_reads_an_export_and_refuses_another_architecture(tmp_path):
  config = get_config('k2_tiny', num_layers=2, vocab_size=256, dtype='float32')
  saved = model_lib.create(config, seed=3)
  convert.save_orbax(saved, str(tmp_path / 'model'))
  loaded = loop.initial_model(config.replace(attention_impl='reference', remat_policy='full'),
                              init_from=str(tmp_path / 'model'))
  np.testing.assert_array_equal(np.asarray(loaded.embed[...]), np.asarray(saved.embed[...]))
  with pytest.raises(Exception, match='different model.*num_layers'):
    loop.initial_model(config.replace(num_layers=3), init_from=str(tmp_path / 'model'))
  with pytest.raises(Exception, match='no such directory'):
    loop.initial_model(config, init_from=str(tmp_path / 'nothing'))


def test_a_second_run_on_a_workdir_in_use_stops_with_one_line_and_touches_nothing(tmp_path):
  """Another process holds the workdir (as a live run does): this run stops before writing; once that process is
  gone (killed: the kernel drops its lock), the same command trains."""
  workdir = tmp_path / 'run'
  holder = subprocess.Popen(
      [sys.executable, '-c', 'import sys, time; from k2.train import loop; loop.claim_workdir(sys.argv[1]); '
       'print("held", flush=True); time.sleep(600)', str(workdir)],
      cwd=ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  try:
    assert holder.stdout.readline().strip() == 'held'
    before = sorted(os.listdir(workdir))
    with pytest.raises(SystemExit) as exit_info:
      run_in_process(workdir, 'NUM_STEPS = 1', *QUIET)
    error = str(exit_info.value.code)
    assert error.startswith('error: ') and '\n' not in error and 'in use by another run' in error, error
    assert f'pid {holder.pid}' in error
    assert sorted(os.listdir(workdir)) == before == ['.lock']
  finally:
    holder.kill()
    holder.wait()
  run_in_process(workdir, 'NUM_STEPS = 1', *QUIET)
  assert checkpoint_steps(workdir) == [1]


def test_sigusr1_prints_every_threads_stack_and_the_run_goes_on(tmp_path):
  """What an operator does with a run that seems stuck: `kill -USR1 PID` says where each thread is; training goes
  on (a later step is logged), and SIGTERM still ends it with a save."""
  workdir = tmp_path / 'run'
  process = start(workdir, 'NUM_STEPS = 100000', 'CHECKPOINT_EVERY = 100000', *QUIET)
  try:
    wait_for(lambda: os.path.exists(workdir / 'metrics.jsonl') and records(workdir), process)
    process.send_signal(signal.SIGUSR1)
    seen = len(records(workdir))
    wait_for(lambda: len(records(workdir)) > seen, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
  finally:
    process.kill()
  assert process.returncode == 0, stderr[-3000:]
  assert 'Current thread' in stderr and 'Thread 0x' in stderr, stderr[-3000:]
  assert 'k2/train/' in stderr or 'experiments/pretrain.py' in stderr, stderr[-3000:]
  assert checkpoint_steps(workdir)  # the SIGTERM save
