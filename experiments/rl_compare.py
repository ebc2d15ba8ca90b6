"""Paired held-out comparison of two checkpoints (e.g. an SFT'd model and its RL'd successor) on verifiable prompts
or tool-domain episodes.

    python -m experiments.rl_compare --before /tmp/k2_sft_instr/checkpoints/400 --after /tmp/k2_rl_instr \
        --model k2_tiny --domain instructions --level 3 --budget 96
    python -m experiments.rl_compare --before /tmp/r/sft/model --after /tmp/r/rl/model --domain arithmetic
    python -m experiments.rl_compare --before /tmp/k2_sft/model --after /tmp/k2_rl/model --domain calculator \
        --prompts 64 --samples 4 --temperature 0.3      # tool episodes, as configs/rl/tiny_calculator.gin plays them

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
_DOMAIN = flags.DEFINE_string('domain', 'instructions', 'k2.gym.verifiable domain, or a k2.gym tool domain (e.g. '
                              'calculator: multi-turn episodes with the simulated user, as RL plays them).')
_LEVEL = flags.DEFINE_list('level', None, 'Level(s) of the domain, e.g. 3 or 1,2,3 (--prompts of each); default: '
                           'its levels mixed.')
_BUDGET = flags.DEFINE_integer('budget', 96, 'Token budget of a response (a truncated one fails).')
_EPISODE_TOKENS = flags.DEFINE_integer('episode_tokens', 384, 'Tool domains: token budget of an episode after its '
                                      'prompt (rl.tool_episode_tokens).')
_TURN_TOKENS = flags.DEFINE_integer('turn_tokens', 128, 'Tool domains: token budget of one assistant turn.')
_MAX_TURNS = flags.DEFINE_integer('max_assistant_turns', 6, 'Tool domains: assistant turns before the episode ends.')
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
  from k2 import gym
  from k2.gym import verifiable
  from k2.rl import agentic as agentic_lib
  from k2.rl import tasks, trainer
  from k2.train import loop, sft
  try:
    tok = sft.model_tokenizer(_AFTER.value, _TOKENIZER.value)
    agentic = None
    if _DOMAIN.value in gym.domains.DOMAINS:  # a tool domain: episodes, as k2.rl.stage plays them
      prompts = agentic_lib.prompts([_DOMAIN.value], _PROMPTS.value, _SEED.value, 'heldout', tok,
                                    _EPISODE_TOKENS.value)
      questions = [p.question for p in prompts]
      agentic = agentic_lib.EpisodeSampler(tok, turn_tokens=_TURN_TOKENS.value, max_assistant_turns=_MAX_TURNS.value)
    else:
      held_out = [task for level in (_LEVEL.value or [None])
                  for task in verifiable.sample_tasks(_DOMAIN.value, _PROMPTS.value, seed=_SEED.value,
                                                      split='heldout', level=None if level is None else int(level))]
      prompts, questions = tasks.prompts(held_out, tok, {_DOMAIN.value: _BUDGET.value}), [t.prompt for t in held_out]
    models = [(path, _load(path, loop, get_config)) for path in (_BEFORE.value, _AFTER.value)]
  except (ConfigError, ValueError) as e:
    sys.exit(f'error: {e}')
  print(f'{len(prompts)} held-out prompts ({len(set(questions))} distinct) of {_DOMAIN.value} '
        f'{"episodes" if agentic else "level " + ",".join(_LEVEL.value or ["mixed"])}; {_SAMPLES.value} samples '
        f'each at T {_TEMPERATURE.value}', flush=True)
  reward_fn, stop = tasks.reward_fn(tok), [tok.special_tokens['<|im_end|>']]
  config = trainer.RLConfig(samples_per_prompt=_SAMPLES.value, num_slots=256)
  results = []
  for path, model in models:
    ids = np.arange(len(prompts))
    sampled, _ = trainer.sample_episodes(model, prompts, ids, config, _TEMPERATURE.value, stop, _SEED.value, None,
                                         agentic=agentic)
    trainer.score_episodes(sampled, prompts, reward_fn, config)
    rates = np.array([[r >= 1.0 for r in row] for row in sampled.rewards], float).mean(axis=1)
    if agentic:
      greedy_pass = np.array(trainer.greedy_episode_passes(model, prompts, ids, agentic, seed=_SEED.value,
                                                           num_slots=256), float)
    else:
      greedy_pass = np.array(trainer.greedy_passes(model, prompts, reward_fn, stop_tokens=stop, num_slots=256), float)
    results.append((rates, greedy_pass))
    print(f'{path}: sampled pass@1 {rates.mean():.3f}, greedy accuracy {greedy_pass.mean():.3f}', flush=True)
  (rates0, greedy0), (rates1, greedy1) = results
  for name, diff in (('sampled pass@1', rates1 - rates0), ('greedy accuracy', greedy1 - greedy0)):
    print(f'{name}: {diff.mean():+.3f} (standard error over prompts {diff.std(ddof=1) / np.sqrt(len(diff)):.3f}); '
          f'{int((diff > 0).sum())} prompts better, {int((diff < 0).sum())} worse')


if __name__ == '__main__':
  app.run(main)
