"""Agentic data synthesis on the embedded gym domains: tasks -> expert trajectories -> judged SFT conversations.

    python -m experiments.synth --out /tmp/k2_synth --tasks_per_domain 600 --shard_size 200
    python -m experiments.synth --out /tmp/k2_synth_fail --failure_rate 0.1      # the expert learns to retry
    python -m experiments.synth --out /tmp/k2_synth_slip --slip_rate 0.2         # ... and to recover from slips
    python -m experiments.synth --out /tmp/k2_synth_http --backend openai --base_url http://localhost:8000/v1 \
        --model k2 --judge programmatic+llm                                        # any OpenAI-compatible endpoint
    python -m experiments.synth --out /tmp/k2_synth_tools --tool_specs mcp_tools.json --evolved_domains 2
    python -m experiments.synth --out /tmp/k2_synth_evolved --evolved_domains 2 --evolved_tasks_per_domain 100
    python -m experiments.sft ... --gin_bindings="CONVERSATIONS = '/tmp/k2_synth/judged/accepted-*.jsonl'"

Rerunning the same command on the same --out resumes from its last complete shard (k2.synth.shards); another
config (backend, judge, failure rate, tool specs included) on an existing --out is an error. Layout of --out and
the judge's rules: k2/synth/pipeline.py, judging.py. --backend openai and an LLM judge talk to --base_url/--model
(the judge grades with the same endpoint). Prints a JSON summary: counts per step, per domain, per rejection
reason, and the wall time.
"""

from __future__ import annotations

import json
import sys
import time

from absl import app, flags

from k2 import synth
from k2.config import ConfigError

JUDGES = ('programmatic', 'llm', 'programmatic+llm')

_OUT = flags.DEFINE_string('out', None, 'Output directory (created; a run there of the same config is resumed).')
_TASKS = flags.DEFINE_integer('tasks_per_domain', 600, "'train' tasks drawn per domain.")
_SHARD = flags.DEFINE_integer('shard_size', 200, 'Records per JSONL shard (the unit of resumption).')
_SEED = flags.DEFINE_integer('seed', 0, "Seed of the tasks, the expert's wording, the user and the tool failures.")
_DOMAINS = flags.DEFINE_list('domains', list(synth.SynthConfig.domains), 'k2.gym domains to synthesize.')
_BACKEND = flags.DEFINE_enum('backend', 'expert', ['expert', 'openai'],
                             'The agent: the scripted expert, or a model behind an OpenAI-compatible endpoint.')
_BASE_URL = flags.DEFINE_string('base_url', None, 'OpenAI-compatible endpoint, e.g. http://localhost:8000/v1.')
_MODEL = flags.DEFINE_string('model', None, 'Model name at --base_url.')
_API_KEY = flags.DEFINE_string('api_key', 'none', 'API key for --base_url.')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.0, 'Sampling temperature of the endpoint.')
_TIMEOUT = flags.DEFINE_float('timeout_s', 60.0, 'Seconds per request before it fails (the episode is rejected).')
_RETRIES = flags.DEFINE_integer('max_retries', 2, "Retries of a timed-out or 5xx request (the client's backoff).")
_JUDGE = flags.DEFINE_enum('judge', 'programmatic', JUDGES,
                           'programmatic checks, an LLM judge at --base_url, or both ANDed.')
_FAILURE_RATE = flags.DEFINE_float('failure_rate', 0.0, 'Share of tool calls failing transiently, in [0, 1).')
_SLIP_RATE = flags.DEFINE_float('slip_rate', 0.0, "Share of the expert's calls preceded by a slip it recovers from "
                                '(a wrong tool name or a missing argument, kept out of the SFT loss), in [0, 1].')
_TOOL_SPECS = flags.DEFINE_list('tool_specs', [], 'JSON tool spec files (OpenAI function specs or MCP tools/list) '
                                'for the tools step; checked before anything runs.')
_EVOLVED = flags.DEFINE_integer('evolved_domains', 0, 'Evolved synthetic domains per category for the tools step.')
_EVOLVED_TASKS = flags.DEFINE_integer('evolved_tasks_per_domain', 0, "'train' tasks per evolved domain, played by "
                                      'its agent (generated prompt, sampled tools); needs --evolved_domains.')


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad flag reported in one line (absl adds a help hint on a second)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f'error: {e}')


def main(argv):
  if len(argv) > 1:
    sys.exit(f'error: unexpected arguments {argv[1:]}; flags are --name=value')
  if not _OUT.value:
    sys.exit('error: --out DIR is required')
  uses_endpoint = _BACKEND.value == 'openai' or 'llm' in _JUDGE.value
  if uses_endpoint and not (_BASE_URL.value and _MODEL.value):
    sys.exit('error: --backend openai and --judge with llm need --base_url and --model')
  if not uses_endpoint and (_BASE_URL.value or _MODEL.value):
    sys.exit('error: --base_url and --model are for --backend openai or an llm --judge')
  try:
    config = synth.SynthConfig(tasks_per_domain=_TASKS.value, shard_size=_SHARD.value, seed=_SEED.value,
                               domains=tuple(_DOMAINS.value), failure_rate=_FAILURE_RATE.value,
                               slip_rate=_SLIP_RATE.value, tool_specs=tuple(_TOOL_SPECS.value),
                               evolved_domains_per_category=_EVOLVED.value,
                               evolved_tasks_per_domain=_EVOLVED_TASKS.value)
    endpoint = synth.OpenAIBackend(_BASE_URL.value, _MODEL.value, api_key=_API_KEY.value,
                                   temperature=_TEMPERATURE.value, timeout_s=_TIMEOUT.value,
                                   max_retries=_RETRIES.value) if uses_endpoint else None
    backend = endpoint if _BACKEND.value == 'openai' else None   # None: the expert (with --slip_rate)
    judges = {'programmatic': synth.judge, 'llm': endpoint and synth.LLMJudge(endpoint)}
    judge = synth.all_of(*(judges[name] for name in _JUDGE.value.split('+')))
    start = time.perf_counter()
    summary = synth.run(_OUT.value, config, backend=backend, judge=judge)
  except (ConfigError, KeyError, ValueError) as e:
    sys.exit(f'error: {e}')
  summary['seconds'] = round(time.perf_counter() - start, 2)
  print(json.dumps(summary, indent=1))


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
