"""k2.gin_setup: command-line bindings may only set the macros the gin files define."""

import os
import subprocess
import sys

import gin
import pytest

from k2 import gin_setup
from k2.config import ConfigError
from k2.train import trainer  # noqa: F401  (registers the configurables the bindings name)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def macro(name):
  return gin.query_parameter(f'{name}/gin.macro.value')


def test_typo_in_a_macro_binding_is_one_error_line_and_writes_nothing(tmp_path):
  workdir = tmp_path / 'run'
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ''}
  result = subprocess.run([sys.executable, '-m', 'experiments.pretrain', '--gin_file=configs/pretrain/tiny.gin',
                           f'--workdir={workdir}', '--gin_bindings=NUM_STEP=10'], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=env)
  assert result.returncode != 0
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: bad gin config: '), result.stderr
  assert "'NUM_STEP=10' sets NUM_STEP, which no gin file defines" in lines[0]
  assert 'known macros: BATCH_SIZE, CHECKPOINT_EVERY, EVAL_EVERY, LEARNING_RATE, MESH, NUM_STEPS,' in lines[0]
  assert not workdir.exists()


def test_known_macros_and_parameters_bind():
  gin_setup.parse(['configs/pretrain/tiny.gin'], ['NUM_STEPS = 7', "MESH = {'fsdp': 2}", 'train.log_every = 3'])
  assert macro('NUM_STEPS') == 7 and macro('MESH') == {'fsdp': 2}
  assert gin.query_parameter('train.log_every') == 3


@pytest.mark.parametrize('files, bindings, message', [
    (['configs/nope.gin'], [], 'bad gin config: no gin file configs/nope.gin'),
    (['configs/pretrain/tiny.gin'], ['train.num_stpes = 4'], "bad gin config: Configurable 'train' doesn't have"),
    (['configs/pretrain/tiny.gin'], ['trian.num_steps = 4'], "bad gin config: No configurable matching 'trian'"),
    (['configs/pretrain/tiny.gin'], ['NUM_STEPS = = 4'], 'bad gin config: '),
    (['configs/pretrain/tiny.gin'], ['train.seed = 1', 'SEQLEN = 64'], "'SEQLEN = 64' sets SEQLEN"),
])
def test_bad_config_is_one_line(files, bindings, message):
  with pytest.raises(ConfigError) as error:
    gin_setup.parse(files, bindings)
  assert message in str(error.value) and '\n' not in str(error.value), str(error.value)
