"""Pretraining launcher.

    python -m experiments.pretrain --gin_file=configs/pretrain/tiny.gin --workdir=/tmp/k2_tiny \
        [--gin_bindings="NUM_STEPS = 50"]
"""

import sys

import gin
from absl import app, flags

from k2.config import ConfigError
from k2.train import trainer

_GIN_FILE = flags.DEFINE_multi_string('gin_file', ['configs/pretrain/tiny.gin'], 'Gin config files.')
_GIN_BINDINGS = flags.DEFINE_multi_string('gin_bindings', [], 'Gin bindings, e.g. "NUM_STEPS = 10".')
_WORKDIR = flags.DEFINE_string('workdir', '/tmp/k2_tiny', 'Where metrics and the operative config go.')


def main(argv):
  del argv
  try:
    gin.parse_config_files_and_bindings(_GIN_FILE.value, _GIN_BINDINGS.value)
  except (ValueError, OSError, KeyError) as e:
    sys.exit(f'error: bad gin config: {str(e).splitlines()[0]}')
  try:
    trainer.train(_WORKDIR.value)
  except ConfigError as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  app.run(main)
