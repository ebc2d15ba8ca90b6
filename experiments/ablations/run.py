"""Runs the MuonClip ablations and writes results/{qk_clip,token_efficiency}.{json,png}.

    python -m experiments.ablations.run                                   # k2_tiny on a CPU (RESULTS.md)
    python -m experiments.ablations.run --study=qk_clip                   # only the QK-Clip study
    python -m experiments.ablations.run --gin_file=experiments/ablations/configs/small_gpu.gin \
        --results_dir=/tmp/k2_small_ablations --parallel=1               # k2_small on one H200

Finished runs are reused from --root (see experiments/ablations/ablations.py), so rerunning after an
interruption only trains what is missing.
"""

import os

import matplotlib
from absl import app, flags

from experiments.ablations import ablations

_GIN_FILE = flags.DEFINE_multi_string('gin_file', [ablations.TINY_GIN], 'The size file (and any overrides).')
_STUDY = flags.DEFINE_multi_enum('study', ['qk_clip', 'token_efficiency'], ['qk_clip', 'token_efficiency'],
                                 'Which studies to run.')
_ROOT = flags.DEFINE_string('root', ablations.DEFAULT_ROOT, 'Run workdirs go here (finished ones are reused).')
_PARALLEL = flags.DEFINE_integer('parallel', 1, 'Training processes at once (each one uses every core it gets).')
_RESULTS_DIR = flags.DEFINE_string('results_dir', os.path.join('experiments', 'ablations', 'results'),
                                   'Where the JSON results and PNG plots go.')


def main(argv):
  del argv
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  studies = {'qk_clip': (ablations.qk_clip_study, ablations.plot_qk_clip),
             'token_efficiency': (ablations.token_efficiency_study, ablations.plot_token_efficiency)}
  for name in _STUDY.value:
    study, plot = studies[name]
    results = study(_GIN_FILE.value, _ROOT.value, _PARALLEL.value)
    ablations.save_json(results, os.path.join(_RESULTS_DIR.value, f'{name}.json'))
    figure = plot(results)
    figure.savefig(os.path.join(_RESULTS_DIR.value, f'{name}.png'), dpi=110)
    plt.close(figure)
    print(f'wrote {_RESULTS_DIR.value}/{name}.json and {name}.png')


if __name__ == '__main__':
  app.run(main)
