"""SFT launcher: gin files + bindings -> k2.train.sft.sft(workdir), with the pretraining launcher's flags.

    python -m experiments.sft --gin_file=configs/sft/tiny.gin --workdir=/tmp/k2_sft \
        --gin_bindings="INIT_FROM = '/tmp/k2_tiny'" --gin_bindings="CONVERSATIONS = '/tmp/trajectories/*.jsonl'"

Rerunning the same command on the same workdir resumes from its latest checkpoint.
"""

from absl import app

from experiments import pretrain as launcher  # --gin_file, --gin_bindings, --workdir, the distributed flags


def main(argv):
  del argv
  launcher.launch('sft')


if __name__ == '__main__':
  app.run(main)
