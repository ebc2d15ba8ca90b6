"""Agent evaluation: a checkpoint (or any OpenAI-compatible endpoint) as the agent on held-out gym tasks.

    python -m experiments.eval_agent --checkpoint /tmp/k2_sft/model --out /tmp/k2_sft/eval_agent.json
    python -m experiments.eval_agent --base_url http://127.0.0.1:8000/v1 --model NAME

Every domain's held-out tasks (entities, numbers and phrasings never in the training split; `bank` is never
synthesized for SFT) are played `--trials` times against the scripted user, seeded per trial. Prints a Markdown
table per domain (pass^1 .. pass^k, tool-call validity, argument exact match, turns; k2/gym/evaluation.py says how
each is computed) and writes the JSON report to --out. A checkpoint's episodes are sampled together in one batch
per turn (k2.synth.ModelBackend); an endpoint is asked one conversation at a time. A backend that fails (a timeout,
a 5xx, a conversation longer than the model) ends that episode as a failure; the evaluation goes on.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags, logging

from k2 import gym
from k2.config import ConfigError
from k2.gym import evaluation
from k2.gym.episodes import agents_responder, model_responder

_CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'Model directory (k2.convert.save_orbax: a run\'s model/).')
_TOKENIZER = flags.DEFINE_string('tokenizer', None, 'Tokenizer file; default: the one saved with --checkpoint.')
_BASE_URL = flags.DEFINE_string('base_url', None, 'OpenAI-compatible endpoint instead of --checkpoint.')
_MODEL = flags.DEFINE_string('model', None, 'Model name sent to --base_url.')
_DOMAINS = flags.DEFINE_list('domains', list(gym.domains.DOMAINS), 'k2.gym domains to evaluate on.')
_UNSEEN = flags.DEFINE_list('unseen', ['bank'], 'Domains the model never saw in SFT (marked in the table).')
_TASKS = flags.DEFINE_integer('tasks_per_domain', 20, 'Held-out tasks per domain.')
_TRIALS = flags.DEFINE_integer('trials', 4, 'Trials per task (pass^k for k up to this).')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the tasks, the simulated user and the sampling.')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.3, 'Sampling temperature (0: greedy).')
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 256, 'Token budget of one assistant turn.')
_MAX_POSITIONS = flags.DEFINE_integer('max_positions', None, "Context the checkpoint may use (default its config's; "
                                      'RoPE has no parameters, so a model pretrained shorter can be given more).')
_SLOTS = flags.DEFINE_integer('num_slots', 64, 'Sequences decoded together (continuous batching).')
_DTYPE = flags.DEFINE_enum('model_dtype', 'float32', ['float32', 'bfloat16'],
                           "The checkpoint's parameters and compute (bfloat16 on a GPU).")
_OUT = flags.DEFINE_string('out', None, 'Write the JSON report here.')
_TRANSCRIPTS = flags.DEFINE_string('transcripts', None, 'Write every episode here (JSONL: domain, task id, trial, '
                                   'reward, info, messages).')


def _responder_for():
  """(responder_for(envs, tasks, seeds), a description of the agent) for the flags."""
  from k2 import synth  # noqa: PLC0415 (after flag parsing: the model backend pulls in JAX)
  if _BASE_URL.value:
    backend = synth.OpenAIBackend(base_url=_BASE_URL.value, model=_MODEL.value, temperature=_TEMPERATURE.value)
    return (lambda envs, tasks, seeds: agents_responder(
        [backend.agent(task, env.tool_specs, seed) for env, task, seed in zip(envs, tasks, seeds)]),
            f'{_MODEL.value} at {_BASE_URL.value}')
  from k2 import serve  # noqa: PLC0415
  model, tokenizer = serve.load(_CHECKPOINT.value, _TOKENIZER.value, dtype=_DTYPE.value)
  backend = synth.ModelBackend(model, tokenizer, temperature=_TEMPERATURE.value, max_new_tokens=_MAX_NEW.value,
                               num_slots=_SLOTS.value, max_positions=_MAX_POSITIONS.value)
  return (lambda envs, tasks, seeds: model_responder(backend, [env.tool_specs for env in envs], _SEED.value),
          f'{_CHECKPOINT.value} ({backend.max_positions} positions)')


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every restore step at INFO
  if bool(_CHECKPOINT.value) == bool(_BASE_URL.value):
    sys.exit('error: give exactly one of --checkpoint DIR and --base_url URL')
  if _BASE_URL.value and not _MODEL.value:
    sys.exit('error: --base_url needs --model NAME')
  if _TASKS.value < 1 or _TRIALS.value < 1:
    sys.exit(f'error: --tasks_per_domain and --trials must be >= 1, got {_TASKS.value}, {_TRIALS.value}')
  for name in _DOMAINS.value:
    if name not in gym.domains.DOMAINS:
      sys.exit(f'error: unknown domain {name!r}; known: {", ".join(gym.domains.DOMAINS)}')
  if _OUT.value and os.path.isdir(_OUT.value):
    sys.exit(f'error: --out {_OUT.value} is a directory; give a file path')
  try:
    responder_for, agent = _responder_for()
  except (ConfigError, ValueError, OSError) as e:
    sys.exit(f'error: {e}')
  start = time.perf_counter()
  progress = lambda turn, live: print(f'turn {turn}: {live} episodes running ({time.perf_counter() - start:.0f}s)',
                                     flush=True)  # noqa: E731
  from k2.synth.judging import message_dict  # noqa: PLC0415 (k2.synth is imported by _responder_for above)
  transcripts = []
  keep = lambda domain, task, trial, e: transcripts.append({  # noqa: E731
      'domain': domain, 'task_id': task.task_id, 'trial': trial, 'reward': e.reward, 'info': e.info,
      'messages': [message_dict(m) for m in e.messages]})
  report = evaluation.evaluate(_DOMAINS.value, responder_for, tasks_per_domain=_TASKS.value, trials=_TRIALS.value,
                               seed=_SEED.value, on_turn=progress, on_episode=keep if _TRANSCRIPTS.value else None)
  seconds = time.perf_counter() - start
  print(f'agent: {agent}; temperature {_TEMPERATURE.value}; {_TASKS.value} held-out tasks x {_TRIALS.value} '
        f'trials per domain; {seconds:.0f}s')
  print(evaluation.table(report, unseen=_UNSEEN.value))
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      json.dump({'agent': agent, 'temperature': _TEMPERATURE.value, 'seconds': round(seconds, 1),
                 'unseen': _UNSEEN.value, 'domains': report}, f, indent=1)
  if _TRANSCRIPTS.value:
    with open(_TRANSCRIPTS.value, 'w') as f:
      f.writelines(json.dumps(record, default=str) + '\n' for record in transcripts)


if __name__ == '__main__':
  app.run(main)
