"""k2.gin_setup: command-line bindings may only set the macros the gin files define; the stage configs parse and
describe K2's recipe (plain RoPE at 4096 for pretraining, YaRN x32 at 32k for the long-context stage)."""

import os
import subprocess
import sys

import gin
import pytest

from k2 import gin_setup
from k2.config import K2_YARN, ConfigError, get_config
from k2.train import pretrain, recipe  # noqa: F401  (pretrain registers the stage configurables)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def model_config():
  """The ModelConfig the parsed gin config gives the pretraining stage."""
  return gin.get_configurable('model_config')()


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


def test_pretraining_uses_plain_rope_at_4096():
  gin_setup.parse(['configs/pretrain/k2_full.gin'], ["model_config.attention_impl = 'reference'"])
  config = model_config()
  assert config.rope.yarn is None and config.rope.max_position_embeddings == 4096
  # Runtime switches bound by name land in config.runtime.
  assert (config.runtime.remat_policy, config.runtime.attention_impl) == ('dots', 'reference')
  assert macro('SEQ_LEN') == 4096
  # Otherwise the released architecture (HF parity is tested on it).
  released = get_config('k2_full')
  assert config.replace(yarn=released.rope.yarn, max_position_embeddings=131072).architecture() == (
      released.architecture())


def test_long_context_stage_extends_with_yarn_at_32k():
  gin_setup.parse(['configs/pretrain/k2_full_long_context.gin'], ["INIT_FROM = '/tmp/pretrained'"])
  config = model_config()
  assert config.rope.yarn == K2_YARN  # factor 32 from 4096, beta_fast 1, beta_slow 1, mscale 1
  assert config.rope.max_position_embeddings == 131072 == K2_YARN.factor * K2_YARN.original_max_position_embeddings
  assert config.architecture() == get_config('k2_full').architecture()
  assert config.runtime.remat_policy == 'full'
  num_steps = macro('NUM_STEPS')
  assert macro('SEQ_LEN') == 32768 and macro('INIT_FROM') == '/tmp/pretrained'
  lr = recipe.schedule(macro('LEARNING_RATE'), num_steps)
  assert float(lr(0)) == pytest.approx(2e-5) and float(lr(num_steps)) == pytest.approx(7e-6)


@pytest.mark.parametrize('path', sorted(
    os.path.relpath(os.path.join(d, f), ROOT) for stage in ('pretrain', 'sft', 'rl')
    for d, _, files in os.walk(os.path.join(ROOT, 'configs', stage)) for f in files if f.endswith('.gin')))
def test_every_stage_config_parses(path):
  """Every launcher's gin file parses against the registered configurables (a renamed parameter breaks it)."""
  from k2.rl import stage as rl_stage  # noqa: F401  (registers rl, RLConfig)
  from k2.train import sft  # noqa: F401
  gin_setup.parse([path], [])
  assert gin.query_parameter('NUM_STEPS/gin.macro.value' if 'rl' not in path.split(os.sep)[1]
                             else 'NUM_ITERATIONS/gin.macro.value') > 0
