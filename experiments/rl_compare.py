"""Paired held-out comparison of two checkpoints (e.g. an SFT'd model and its RL'd successor) on verifiable prompts.

    python -m experiments.rl_compare --before /tmp/k2_sft_instr/checkpoints/400 --after /tmp/k2_rl_instr \
        --model k2_tiny --domain instructions --level 3 --budget 96
    python -m experiments.rl_compare --before /tmp/r/sft/model --after /tmp/r/rl/model --domain arithmetic

Exported models (a run's model/) are read with their own architecture; training workdirs and checkpoints need
`--model`.

Both models answer the same held-out prompts (`--seed` draws them, so a set the RL run never evaluated on can be
used): per prompt, the sampled pass rate over `--samples` responses at `--temperature` and the greedy pass. Printed:
each model's sampled pass@1 and greedy accuracy, and the per-prompt difference's mean with its standard error over
prompts (the paired comparison: both models on the same prompts, so prompt difficulty cancels out).
"""

import sys

import numpy as np
from absl import app, flags, logging

_BEFORE = flags.DEFINE_string('before', None, 'The first model: a workdir, checkpoint or exported model.', required=True)
_AFTER = flags.DEFINE_string('after', None, 'The second model, the same way.', required=True)
_MODEL = flags.DEFINE_string('model', None, "Model variant of both (k2.config.VARIANTS); default: each exported "
                             "model's own config.json (name one for training workdirs and checkpoints).")
_TOKENIZER = flags.DEFINE_string('tokenizer', None, "Tokenizer file; default: the one saved with --after's model.")
_DOMAIN = flags.DEFINE_string('domain', 'instructions', 'k2.gym.verifiable domain.')
_LEVEL = flags.DEFINE_list('level', None, 'Level(s) of the domain, e.g. 3 or 1,2,3 (--prompts of each); default: '
                           'its levels mixed.')
_BUDGET = flags.DEFINE_integer('budget', 96, 'Token budget of a response (a truncated one fails).')
_PROMPTS = flags.DEFINE_integer('prompts', 512, 'Held-out prompts.')
_SAMPLES = flags.DEFINE_integer('samples', 16, 'Sampled responses per prompt.')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.6, 'Sampling temperature.')
_SEED = flags.DEFINE_integer('seed', 1, 'Seed of the held-out draw and the sampling.')


def _load(path, loop, get_config):
  """The model at `path`: with --model, any init_from path (loop.initial_model); without, an exported model
  directory read with its own architecture (config.json)."""
  import os
  from k2 import convert
  from k2.config import ConfigError
  if _MODEL.value:
    return loop.initial_model(get_config(_MODEL.value), 0, path)
  if not os.path.isdir(path):
    raise ConfigError(f'{path}: no such directory')
  if not os.path.isfile(os.path.join(path, 'config.json')):
    raise ConfigError(f'{path} is not an exported model directory (config.json + state/): name its --model')
  return convert.load_orbax(path)


def main(argv):
  del argv
  if not flags.FLAGS['verbosity'].present:  # orbax logs every file it reads at INFO
    logging.set_verbosity(logging.WARNING)
  from k2.config import ConfigError, get_config
  from k2.gym import verifiable
  from k2.rl import tasks, trainer
  from k2.train import loop, sft
  try:
    tok = sft.model_tokenizer(_AFTER.value, _TOKENIZER.value)
    held_out = [task for level in (_LEVEL.value or [None])
                for task in verifiable.sample_tasks(_DOMAIN.value, _PROMPTS.value, seed=_SEED.value, split='heldout',
                                                    level=None if level is None else int(level))]
    prompts = tasks.prompts(held_out, tok, {_DOMAIN.value: _BUDGET.value})
    models = [(path, _load(path, loop, get_config)) for path in (_BEFORE.value, _AFTER.value)]
  except (ConfigError, ValueError) as e:
    sys.exit(f'error: {e}')
  print(f'{len(prompts)} held-out prompts ({len({t.prompt for t in held_out})} distinct) of {_DOMAIN.value} level '
        f'{",".join(_LEVEL.value or ["mixed"])}; {_SAMPLES.value} samples each at T {_TEMPERATURE.value}', flush=True)
  reward_fn, stop = tasks.reward_fn(tok), [tok.special_tokens['<|im_end|>']]
  config = trainer.RLConfig(samples_per_prompt=_SAMPLES.value, num_slots=256)
  results = []
  for path, model in models:
    sampled, _ = trainer.sample_episodes(model, prompts, np.arange(len(prompts)), config, _TEMPERATURE.value, stop,
                                         _SEED.value, None)
    trainer.score_episodes(sampled, prompts, reward_fn, config)
    rates = np.array([[r >= 1.0 for r in row] for row in sampled.rewards], float).mean(axis=1)
    greedy_pass = np.array(trainer.greedy_passes(model, prompts, reward_fn, stop_tokens=stop, num_slots=256), float)
    results.append((rates, greedy_pass))
    print(f'{path}: sampled pass@1 {rates.mean():.3f}, greedy accuracy {greedy_pass.mean():.3f}', flush=True)
  (rates0, greedy0), (rates1, greedy1) = results
  for name, diff in (('sampled pass@1', rates1 - rates0), ('greedy accuracy', greedy1 - greedy0)):
    print(f'{name}: {diff.mean():+.3f} (standard error over prompts {diff.std(ddof=1) / np.sqrt(len(diff)):.3f}); '
          f'{int((diff > 0).sum())} prompts better, {int((diff < 0).sum())} worse')


if __name__ == '__main__':
  app.run(main)
