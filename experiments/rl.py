"""RL launcher: gin files + bindings -> k2.rl.stage.rl(workdir), with the pretraining launcher's flags.

    python -m experiments.rl --gin_file=configs/rl/tiny.gin --workdir=/tmp/k2_rl \
        --gin_bindings="INIT_FROM = '/tmp/k2_sft'"

Rerunning the same command on the same workdir resumes from its latest checkpoint (same prompts, same order).
`--demonstrations_out=PATH` instead writes the gold demonstrations of the configured domains' training tasks as SFT
conversations (`--long_share` of them over-long, for budget control; `--column_arithmetic`: sums worked column by
column) and exits.
"""

import sys

from absl import app, flags

from experiments import pretrain as launcher  # --gin_file, --gin_bindings, --workdir, the distributed flags
from k2.config import ConfigError

_DEMONSTRATIONS_OUT = flags.DEFINE_string('demonstrations_out', None, 'Write SFT demonstrations here and exit.')
_NUM_DEMONSTRATIONS = flags.DEFINE_integer('num_demonstrations', 4000, 'Demonstrations per domain.')
_LONG_SHARE = flags.DEFINE_float('long_share', 0.0, 'Share of demonstrations padded past the token budget.')
_COLUMNS = flags.DEFINE_bool('column_arithmetic', False, 'Arithmetic demonstrations worked column by column.')


def main(argv):
  del argv
  launcher.announce('rl')
  import gin
  from k2 import distributed, gin_setup
  from k2.gym import verifiable
  from k2.rl import stage, tasks
  distributed.initialize(launcher._COORDINATOR.value, launcher._NUM_PROCESSES.value, launcher._PROCESS_ID.value)
  try:
    gin_setup.parse(launcher._GIN_FILE.value, launcher._GIN_BINDINGS.value)
    if _DEMONSTRATIONS_OUT.value:
      domains = gin.query_parameter('rl.domains') or {'arithmetic': None}
      count = tasks.write_demonstrations(
          _DEMONSTRATIONS_OUT.value, stage.domain_tasks(domains, _NUM_DEMONSTRATIONS.value, seed=1, split='train'),
          long_share=_LONG_SHARE.value,
          demonstrate=tasks.column_arithmetic if _COLUMNS.value else verifiable.demonstration)
      print(f'wrote {count} demonstrations to {_DEMONSTRATIONS_OUT.value}', flush=True)
      return
    stage.rl(launcher._WORKDIR.value)
  except ConfigError as e:  # gin appends 'In call to configurable ...' lines
    sys.exit(f'error: {str(e).splitlines()[0]}')


if __name__ == '__main__':
  app.run(main)
