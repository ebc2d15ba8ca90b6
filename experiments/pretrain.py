"""Pretraining launcher: gin files + bindings -> k2.train.pretrain.train(workdir).

    python -m experiments.pretrain --gin_file=configs/pretrain/tiny.gin --workdir=/tmp/k2_tiny \
        [--gin_bindings="NUM_STEPS = 50"] [--gin_bindings="MESH = {'fsdp': 2}"]

Rerunning the same command on the same workdir resumes from its latest checkpoint.
"""

import faulthandler
import signal
import sys

from absl import app, flags, logging

from k2.config import ConfigError

_GIN_FILE = flags.DEFINE_multi_string('gin_file', ['configs/pretrain/tiny.gin'], 'Gin config files.')
_GIN_BINDINGS = flags.DEFINE_multi_string('gin_bindings', [], 'Gin bindings, e.g. "NUM_STEPS = 10".')
_WORKDIR = flags.DEFINE_string('workdir', '/tmp/k2_tiny', 'Checkpoints, metrics and the operative config go here.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0, for multi-process jobs '
                                   'the environment (TPU pod, SLURM, MPI) does not describe.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'With --coordinator_address: processes in the job.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'With --coordinator_address: this process, 0-based.')


def run(gin_files, gin_bindings, workdir: str, stage: str = 'pretrain') -> dict:
  """Parses the config and runs the stage (k2.train.pretrain.train, or k2.train.sft.sft with stage='sft'); any
  configuration problem exits with a one-line `error: ...`."""
  from k2 import gin_setup
  from k2.train import pretrain, sft  # register the stages' gin configurables (and import JAX, grain, TFDS)
  try:
    gin_setup.parse(gin_files, gin_bindings)
    return pretrain.train(workdir) if stage == 'pretrain' else sft.sft(workdir)
  except ConfigError as e:  # gin appends 'In call to configurable ...' lines
    sys.exit(f'error: {str(e).splitlines()[0]}')


def announce(stage: str) -> None:
  """What every stage launcher does first: quiet logging, a first line at once, and `kill -USR1 PID` printing every
  thread's Python stack to stderr (a run that seems stuck says where it is, and goes on)."""
  if not flags.FLAGS['verbosity'].present:  # orbax logs every file it writes at INFO
    logging.set_verbosity(logging.WARNING)
  faulthandler.register(signal.SIGUSR1, all_threads=True)
  print(f'k2 {stage}: {" ".join(_GIN_FILE.value)} -> {_WORKDIR.value} (loading JAX, the data and the config)',
        flush=True)


def launch(stage: str) -> None:
  """What a stage launcher's main does: `announce`, the distributed start-up, the stage."""
  announce(stage)
  from k2 import distributed
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  run(_GIN_FILE.value, _GIN_BINDINGS.value, _WORKDIR.value, stage)


def main(argv):
  del argv
  launch('pretrain')


if __name__ == '__main__':
  app.run(main)
