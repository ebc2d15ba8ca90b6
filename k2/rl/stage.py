"""The RL stage as a gin-configured run (configs/rl/*.gin; the knobs are `rl.*` and `RLConfig.*`): the verifiable
gym's tasks as prompts, their rewards, multi-turn episodes in the tool domains (k2.rl.agentic), an optional PTX
stream and self-critique, held-out evaluation before, during and after, and the model exported to workdir/model with
its tokenizer.

    rl(workdir)      # python -m experiments.rl --gin_file=configs/rl/tiny.gin --workdir=/tmp/k2_rl

The run starts from `rl.init_from` (an SFT or pretraining workdir, or a model export; its tokenizer is the model's
own) and resumes from the workdir's own checkpoint when there is one (k2.rl.trainer.train); SIGTERM saves the
iteration in flight and stops without exporting.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import gin
import jax

from k2.config import ConfigError, ModelConfig
from k2.data import conversations as conversations_lib
from k2.gym import verifiable
from k2.rl import agentic as agentic_lib
from k2.rl import critic as critic_lib
from k2.rl import tasks as tasks_lib
from k2.rl import trainer
from k2.train import loop, recipe
from k2.train.sft import model_tokenizer

gin.external_configurable(trainer.RLConfig, 'RLConfig')


def domain_tasks(domains: dict, count: int, seed: int, split: str) -> list[verifiable.Task]:
  """`count` tasks per domain of `domains` ({name: None (all levels mixed), a level, or a list of levels shared
  evenly}) from `split`."""
  out = []
  for name, levels in sorted(domains.items()):
    if isinstance(levels, (list, tuple)):
      out += [t for i, level in enumerate(levels)
              for t in verifiable.sample_tasks(name, count // len(levels) + (i < count % len(levels)), seed=seed,
                                               split=split, level=level)]
    else:
      out += verifiable.sample_tasks(name, count, seed=seed, split=split, level=levels)
  return out


def prompt_sets(domains: dict, tool_domains: Sequence[str], tok, *, budgets: dict, seed: int, tool_task_seed: int,
                num_train: int, num_eval: int, tool_episode_tokens: int) -> tuple[list, list]:
  """(training prompts, held-out prompts): `num_train` / `num_eval` per verifiable domain (drawn with `seed`) and per
  tool domain (training tasks drawn with `tool_task_seed`, held-out ones with `seed`)."""
  train = tasks_lib.prompts(domain_tasks(domains, num_train, seed, 'train'), tok, budgets)
  held_out = tasks_lib.prompts(domain_tasks(domains, num_eval, seed, 'heldout'), tok, budgets)
  if tool_domains:
    train += agentic_lib.prompts(tool_domains, num_train, tool_task_seed, 'train', tok, tool_episode_tokens)
    held_out += agentic_lib.prompts(tool_domains, num_eval, seed, 'heldout', tok, tool_episode_tokens)
  return train, held_out


@gin.configurable(denylist=['workdir'])
def rl(workdir: str, model_config: ModelConfig = gin.REQUIRED, config: trainer.RLConfig = gin.REQUIRED,
       init_from: str | None = None, tokenizer_path: str | None = None, domains: dict | None = None,
       budgets: dict | None = None, tool_domains: tuple = (), tool_episode_tokens: int = 1024,
       tool_turn_tokens: int = 192, tool_max_user_turns: int = 8, tool_max_assistant_turns: int = 12,
       tool_task_seed: int = 1, num_train_prompts: int = 256, num_eval_prompts: int = 64, eval_samples: int = 4,
       eval_temperature: float = 0.6, eval_every: int = 0, num_iterations: int = 20, learning_rate: float = 3e-4,
       seed: int = 0, mesh: dict | None = None, ptx_conversations: str | None = None, checkpoint_every: int = 5,
       keep_checkpoints: int = 3, qk_clip_tau: float | None = 100.0,
       bias_update_rate: float = 1e-3) -> dict[str, float]:
  """Runs (or resumes) RL in `workdir`; returns the last iteration's metrics (eval_* from the held-out tasks).
  domains: {name: levels} (domain_tasks); budgets: {name: max generated tokens}; num_train_prompts / num_eval_prompts:
  per domain (train and held-out splits never share a problem). tool_domains: k2.gym tool domains played as
  multi-turn episodes (k2.rl.agentic), each within tool_episode_tokens after its prompt and tool_turn_tokens a turn;
  their training tasks are drawn with tool_task_seed, not synthesis' seed (experiments.synth --seed 0): with the
  same seed, RL's tasks were the first of the SFT trajectories' own tasks, which the SFT'd model had seen solved
  (a 341M K2, H100, 2026-12-07: pass@1 0.8 on them against 0.26 on held-out tasks, and no held-out gain).
  `domains` may be empty when tool_domains is not."""
  domains = dict({'arithmetic': None} if domains is None else domains)
  if not domains and not tool_domains:
    raise ConfigError('rl needs verifiable domains (rl.domains) or tool domains (rl.tool_domains)')
  budgets = dict(budgets or {})
  loop.check_workdir(workdir)
  run_mesh = loop.make_run_mesh(mesh, model_config, config.prompts_per_iteration, 1)
  tok = model_tokenizer(init_from, tokenizer_path)
  if tok.vocab_size > model_config.vocab_size:
    raise ConfigError(f'tokenizer {tok} has more ids than the model vocab_size={model_config.vocab_size}')
  train_prompts, eval_prompts = prompt_sets(domains, tool_domains, tok, budgets=budgets, seed=seed,
                                            tool_task_seed=tool_task_seed, num_train=num_train_prompts,
                                            num_eval=num_eval_prompts, tool_episode_tokens=tool_episode_tokens)
  agentic = None
  if tool_domains:
    agentic = agentic_lib.EpisodeSampler(tok, turn_tokens=tool_turn_tokens, max_user_turns=tool_max_user_turns,
                                         max_assistant_turns=tool_max_assistant_turns)
  reward_fn = tasks_lib.reward_fn(tok)
  stop_tokens = (tok.special_tokens[tasks_lib.IM_END],)
  ptx_batches = None
  if config.ptx_weight:
    if not ptx_conversations:
      raise ConfigError('RLConfig.ptx_weight > 0 needs rl.ptx_conversations (JSONL conversations, e.g. the SFT data)')
    ptx_batches = conversations_lib.sft_batches(conversations_lib.read(ptx_conversations), tok,
                                                batch_size=config.ptx_rows, seq_len=config.seq_len, seed=seed)
  print(f'rl: {len(train_prompts)} training and {len(eval_prompts)} held-out prompts of '
        f'{sorted(domains) + [f"tool/{name}" for name in tool_domains]}; '
        f'{config.prompts_per_iteration} x {config.samples_per_prompt} responses per iteration', flush=True)
  evaluate = lambda model: trainer.evaluate(
      model, eval_prompts, reward_fn, samples=eval_samples, temperature=eval_temperature, stop_tokens=stop_tokens,
      pass_threshold=config.pass_threshold, seed=seed, num_slots=config.num_slots, mesh=run_mesh, agentic=agentic)
  loop.claim_workdir(workdir)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'operative_config.gin'), 'w') as f:
      f.write(gin.operative_config_str())
  model, record, preempted = trainer.train(
      workdir, model_config=model_config, config=config, prompts=train_prompts, reward_fn=reward_fn,
      stop_tokens=stop_tokens, num_iterations=num_iterations, learning_rate=learning_rate,
      optimizer=recipe.optimizer(learning_rate), mesh=run_mesh, seed=seed, init_from=init_from,
      critic=critic_lib.Critic(tok) if config.critic_weight else None, ptx_batches=ptx_batches, agentic=agentic,
      checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints, evaluate=evaluate,
      eval_every=eval_every, qk_clip_tau=qk_clip_tau, bias_update_rate=bias_update_rate)
  if jax.process_count() == 1 and not preempted:
    recipe.export_model(model, os.path.join(workdir, 'model'), tok.path)
  return record
