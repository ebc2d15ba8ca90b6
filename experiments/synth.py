"""Agentic data synthesis on the embedded gym domains: tasks -> expert trajectories -> judged SFT conversations.

    python -m experiments.synth --out /tmp/k2_synth --tasks_per_domain 600 --shard_size 200
    python -m experiments.sft ... --gin_bindings="CONVERSATIONS = '/tmp/k2_synth/judged/accepted-*.jsonl'"

Rerunning the same command on the same --out resumes from its last complete shard (k2.synth.shards); another
config on an existing --out is an error. Layout of --out and the judge's rules: k2/synth/pipeline.py, judging.py.
Prints a JSON summary: counts per step, per domain, per rejection reason, and the wall time.
"""

from __future__ import annotations

import json
import sys
import time

from absl import app, flags

from k2 import synth
from k2.config import ConfigError

_OUT = flags.DEFINE_string('out', None, 'Output directory (created; a run there of the same config is resumed).')
_TASKS = flags.DEFINE_integer('tasks_per_domain', 600, "'train' tasks drawn per domain.")
_SHARD = flags.DEFINE_integer('shard_size', 200, 'Records per JSONL shard (the unit of resumption).')
_SEED = flags.DEFINE_integer('seed', 0, "Seed of the tasks, the expert's wording and the simulated user.")
_DOMAINS = flags.DEFINE_list('domains', list(synth.SynthConfig.domains), 'k2.gym domains to synthesize.')


def main(argv):
  del argv
  if not _OUT.value:
    sys.exit('error: --out DIR is required')
  try:
    config = synth.SynthConfig(tasks_per_domain=_TASKS.value, shard_size=_SHARD.value, seed=_SEED.value,
                               domains=tuple(_DOMAINS.value))
    start = time.perf_counter()
    summary = synth.run(_OUT.value, config)
  except (ConfigError, KeyError, ValueError) as e:
    sys.exit(f'error: {e}')
  summary['seconds'] = round(time.perf_counter() - start, 2)
  print(json.dumps(summary, indent=1))


if __name__ == '__main__':
  app.run(main)
