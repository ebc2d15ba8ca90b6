"""The RL stage (k2.rl.trainer) on a tiny random model with synthetic rewards, and experiments/rl.py end to end.

The synthetic reward is the share of even token ids in a response: every group has spread, so the k1.5 loss has a
gradient, and the policy can raise it by moving mass to even ids.
"""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from k2 import model as model_lib
from k2.config import get_config
from k2.rl import trainer
from k2.train import recipe

CONFIG = get_config('k2_tiny', vocab_size=64, num_layers=2, dtype='float32')
STOPS = tuple(range(1, 8))  # a random model stops after about 8 tokens


def even_share(prompt, response):
  del prompt
  body = [t for t in response if t not in STOPS]
  return (float(np.mean([t % 2 == 0 for t in body])) if body else 0.0), 'share of even ids'


def make_prompts(count=12, budget=12, seed=0):
  rng = np.random.default_rng(seed)
  return [trainer.Prompt(domain='even' if i % 2 else 'even2', tokens=tuple(int(t) for t in rng.integers(8, 64, 5)),
                         max_new_tokens=budget) for i in range(count)]


def rl_config(**overrides):
  base = dict(prompts_per_iteration=4, samples_per_prompt=4, inner_steps=3, tau=0.5, seq_len=32, num_slots=16,
              pass_threshold=0.6, temperature_decay_iterations=4)
  return trainer.RLConfig(**{**base, **overrides})


OPTIMIZER = recipe.optimizer(3e-3)  # one object, so every test's StepSetup is equal and train_step compiles once


def setup_and_state(config):
  from k2.train.step import init_state
  graphdef, state = init_state(model_lib.create(CONFIG, seed=0), OPTIMIZER)
  return trainer.make_setup(graphdef, CONFIG, config, 3e-3, OPTIMIZER), state


def context(setup, config, reward_fn=even_share, prompts=None, **kwargs):
  from k2.train import loop
  mesh = loop.make_run_mesh({}, CONFIG, config.prompts_per_iteration, 1)
  return trainer.Context(prompts=prompts or make_prompts(), reward_fn=reward_fn, setup=setup, config=config,
                         stop_tokens=STOPS, mesh=mesh, **kwargs)


def test_iteration_starts_at_log_ratio_zero_and_lowers_the_loss():
  config = rl_config()
  setup, state = setup_and_state(config)
  sampler = trainer.PromptSampler(12, seed=0)
  state, metrics, episodes = trainer.iteration(state, sampler, context(setup, config))
  assert metrics['skipped_update'] == 0.0 and metrics['degenerate_group_fraction'] < 1.0
  assert metrics['log_ratio_first_step'] == 0.0  # old log-probs are the training forward's own
  assert metrics['log_ratio_last_step'] > 0.0 and metrics['kl'] > 0.0
  assert metrics['loss'] < metrics['loss_first_step']
  # The sampler's decode path and the training forward agree on the sampled tokens up to float32 rounding.
  assert metrics['logprob_gap_abs_max'] < 1e-3
  assert sampler.iteration == 1 and sampler.tries.sum() == 16
  assert np.all(episodes.rewards >= -0.5) and episodes.rewards.shape == (4, 4)


def test_degenerate_groups_are_dropped_and_an_all_degenerate_batch_skips_the_update():
  config = rl_config(truncation_penalty=1.0)  # every response, truncated or not, scores 1
  setup, state = setup_and_state(config)
  before = jax.device_get(state.params)
  constant = lambda prompt, response: (1.0, 'always right')
  state, metrics, _ = trainer.iteration(state, trainer.PromptSampler(12, 0), context(setup, config, constant))
  assert metrics['degenerate_group_fraction'] == 1.0 and metrics['skipped_update'] == 1.0
  jax.tree.map(np.testing.assert_array_equal, before, jax.device_get(state.params))  # no step on pure noise

  rewards = np.array([[1, 1, 1, 1], [0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5], [0, 0, 0, 1]], np.float32)
  np.testing.assert_array_equal(trainer.kept_groups(rewards), [False, True, False, True])
  episodes = trainer.Episodes(prompt_ids=np.arange(4), tokens=[[[4, 1]] * 4] * 4,
                              sampler_logprobs=[[[0.0, 0.0]] * 4] * 4, finish_reasons=[['stop'] * 4] * 4,
                              rewards=rewards)
  batch = trainer.episode_batch(episodes, make_prompts(), trainer.kept_groups(rewards), seq_len=16)
  assert batch['mask'].sum(axis=(1, 2)).tolist() == [0, 8, 0, 8]  # 2 response tokens x 4 responses, kept only


def test_dropped_groups_do_not_change_the_loss():
  """The loss over kept groups equals the loss of a batch holding only them (dropped ones add exact zeros)."""
  config = rl_config()
  setup, state = setup_and_state(config)
  model = nnx.merge(setup.graphdef, state.params, state.buffers)
  rng = np.random.default_rng(0)
  shape = (4, 4, 16)
  batch = {key: rng.integers(2, 64, shape).astype(np.int32) for key in ('inputs', 'targets')}
  batch['positions'] = np.broadcast_to(np.arange(16, dtype=np.int32), shape).copy()
  batch['segment_ids'] = np.ones(shape, np.int32)
  batch['mask'] = np.zeros(shape, np.float32)
  batch['mask'][[1, 3], :, 5:12] = 1.0
  batch['rewards'] = np.array([[1, 1, 1, 1], [0, 1, 0, 1], [2, 2, 2, 2], [0, 0, 0, 1]], np.float32)
  batch['old_logprobs'] = rng.normal(size=shape).astype(np.float32) * batch['mask']
  loss_sum, count, _ = trainer.rl_loss(model, batch, tau=0.5, ptx_weight=0.0)
  only_kept = {key: value[[1, 3]] for key, value in batch.items()}
  kept_sum, kept_count, _ = trainer.rl_loss(model, only_kept, tau=0.5, ptx_weight=0.0)
  assert float(count) == 8.0 and float(kept_count) == 8.0
  np.testing.assert_allclose(float(loss_sum) / float(count), float(kept_sum) / float(kept_count), rtol=1e-5)


def test_accumulated_update_equals_the_whole_batch_update():
  """grad_accum_steps splits an update's groups into micro-batches: the same loss and gradient."""
  from k2.train import step as step_lib
  whole, accumulated = rl_config(), rl_config(grad_accum_steps=2)
  setup, state = setup_and_state(whole)
  state, _, episodes = trainer.iteration(state, trainer.PromptSampler(12, seed=0), context(setup, whole))
  batch = trainer.episode_batch(episodes, make_prompts(), trainer.kept_groups(episodes.rewards), whole.seq_len,
                                whole.prompts_per_iteration)
  batch.pop('sampler_logprobs')
  batch['old_logprobs'] = trainer.old_logprobs(setup.graphdef, state.params, state.buffers, batch)
  outcomes = []
  for config in (whole, accumulated):
    step_setup = trainer.make_setup(setup.graphdef, CONFIG, config, 3e-3, OPTIMIZER)
    loss, grads, _ = jax.jit(step_lib._gradients, static_argnums=2)(state, batch, step_setup)
    outcomes.append((float(loss), jax.device_get(grads)))
  (loss_a, grads_a), (loss_b, grads_b) = outcomes
  assert loss_a != 0.0
  np.testing.assert_allclose(loss_b, loss_a, rtol=1e-5)
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads_a))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6 * scale), grads_a, grads_b)
  with pytest.raises(Exception, match='must divide prompts_per_iteration'):
    rl_config(grad_accum_steps=3)


def test_truncated_responses_are_penalized_and_kept_in_the_loss():
  config = rl_config(truncation_penalty=-0.5)
  setup, state = setup_and_state(config)
  prompts = make_prompts(budget=3)  # most responses hit the 3-token budget
  sampler = trainer.PromptSampler(12, seed=0)
  _, metrics, episodes = trainer.iteration(state, sampler, context(setup, config, prompts=prompts))
  truncated = np.array([[f == 'length' for f in group] for group in episodes.finish_reasons])
  assert truncated.mean() == metrics['truncation_rate'] > 0.25
  assert np.all(episodes.rewards[truncated] == -0.5)
  assert all(reason == 'truncated at the token budget' for group, flags in zip(episodes.reasons, truncated)
             for reason, flag in zip(group, flags) if flag)
  kept = trainer.kept_groups(episodes.rewards)
  batch = trainer.episode_batch(episodes, prompts, kept, config.seq_len)
  for p, i in zip(*np.nonzero(truncated & kept[:, None])):
    assert batch['mask'][p, i].sum() == 3  # all 3 budget tokens train


def test_prompt_sampler_favours_failed_prompts_and_its_state_round_trips():
  sampler = trainer.PromptSampler(4, seed=0)
  sampler.record(np.array([0, 1]), np.array([[True] * 8, [False] * 8]))
  weights = sampler.weights()
  assert weights[1] > weights[2] > weights[0]  # often failed > unseen > often passed
  counts = np.zeros(4)
  for _ in range(200):
    counts[sampler.select(1)] += 1
    sampler.iteration += 1
  assert counts[1] > counts[0] * 3
  copy = trainer.PromptSampler(4, seed=0)
  copy.set_state(json.loads(json.dumps(sampler.get_state())))
  np.testing.assert_array_equal(copy.select(3), sampler.select(3))


def test_partial_rollout_carries_unfinished_groups_and_resumes_them_where_they_stopped():
  config = rl_config(rollout_segment_tokens=4)
  setup, state = setup_and_state(config)
  sampler = trainer.PromptSampler(12, seed=0)
  ctx = context(setup, config)
  state, metrics, first = trainer.iteration(state, sampler, ctx)
  carried = json.loads(json.dumps(sampler.get_state()))['in_flight']  # what the checkpoint stores
  assert metrics['groups_in_flight'] == len(carried) > 0
  assert all(len(t) == 4 for g in carried for t, f in zip(g['tokens'], g['finish']) if f is None)
  assert len(first.prompt_ids) + len(carried) == 4
  new_ids = sampler.select(4)
  assert len(new_ids) == 4 - len(carried) and not set(new_ids) & {g['prompt_id'] for g in carried}
  state, metrics, second = trainer.iteration(state, sampler, ctx)
  assert metrics['groups_resumed'] == len(carried)
  finished_now = {int(p): tokens for p, tokens in zip(second.prompt_ids, second.tokens)}
  for group in carried:
    if group['prompt_id'] in finished_now:  # resumed: the stored tokens are the prefix of the final response
      for before, after in zip(group['tokens'], finished_now[group['prompt_id']]):
        assert after[:len(before)] == before and len(after) <= 12


def test_temperature_decays_from_exploration_to_exploitation():
  config = rl_config(temperature_start=1.2, temperature_end=0.6, temperature_decay_iterations=10)
  values = [trainer.temperature(config, i) for i in range(1, 15)]
  assert values[0] == 1.2 and values[10] == values[-1] == 0.6
  assert all(a >= b for a, b in zip(values, values[1:]))


def run_training(workdir, num_iterations, reward_fn=even_share, config=None, **kwargs):
  config = config or rl_config()
  from k2.train import loop
  return trainer.train(str(workdir), model_config=CONFIG, config=config, prompts=make_prompts(), reward_fn=reward_fn,
                       stop_tokens=STOPS, num_iterations=num_iterations, learning_rate=3e-3, optimizer=OPTIMIZER,
                       mesh=loop.make_run_mesh({}, CONFIG, config.prompts_per_iteration, 1), checkpoint_every=1,
                       **kwargs)


def episodes_of(workdir):
  return {name: open(os.path.join(workdir, 'episodes', name)).read()
          for name in sorted(os.listdir(os.path.join(workdir, 'episodes')))}


@pytest.mark.parametrize('segment', [0, 4])  # without and with partial rollout (groups carried over iterations)
def test_a_run_killed_mid_iteration_resumes_with_the_same_prompts_and_episodes(tmp_path, segment):
  config = rl_config(rollout_segment_tokens=segment)
  straight, _, _ = run_training(tmp_path / 'straight', 4, config=config)

  class Killed(Exception):
    pass

  finished = {'iterations': 0}

  def dies_in_iteration_3(prompt, response):  # the process dies while iteration 3 is being scored
    if finished['iterations'] == 2:
      raise Killed()
    return even_share(prompt, response)

  with pytest.raises(Killed):
    run_training(tmp_path / 'killed', 4, reward_fn=dies_in_iteration_3, config=config,
                 on_iteration=lambda number, record: finished.update(iterations=number))
  assert sorted(os.listdir(tmp_path / 'killed' / 'episodes')) == ['1.jsonl', '2.jsonl']
  resumed, _, _ = run_training(tmp_path / 'killed', 4, config=config)
  assert episodes_of(tmp_path / 'straight') == episodes_of(tmp_path / 'killed')  # same prompts, same samples
  jax.tree.map(np.testing.assert_allclose, jax.device_get(nnx.state(straight)), jax.device_get(nnx.state(resumed)))
  steps = [json.loads(line)['step'] for line in open(tmp_path / 'killed' / 'metrics.jsonl')]
  assert steps == [1, 2, 3, 4]


def test_sigterm_saves_the_iteration_in_flight_and_the_rerun_goes_on(tmp_path):
  import signal
  _, _, preempted = run_training(tmp_path / 'straight', 3)
  assert not preempted
  handler = signal.getsignal(signal.SIGTERM)
  terminate = lambda number, record: number == 1 and os.kill(os.getpid(), signal.SIGTERM)  # noqa: E731
  _, _, preempted = run_training(tmp_path / 'stopped', 3, on_iteration=terminate)
  assert preempted and sorted(os.listdir(tmp_path / 'stopped' / 'episodes')) == ['1.jsonl']
  assert signal.getsignal(signal.SIGTERM) == handler  # the run's handler is put back
  _, _, preempted = run_training(tmp_path / 'stopped', 3)
  assert not preempted and episodes_of(tmp_path / 'straight') == episodes_of(tmp_path / 'stopped')



@pytest.fixture(scope='module')
def tokenizer():
  from k2.data import pipeline
  return pipeline.tokenizer()  # the cached BPE of the embedded corpus (has the chat special tokens)


def test_critic_win_rates_are_pairwise_both_orders_and_agreement_is_measured(tokenizer):
  from k2.rl import critic as critic_lib

  class LongerIsBetter(critic_lib.Critic):  # a known critic: prefers the longer response, sure of it
    def prefer_first(self, model, pairs):
      return np.asarray([1.0 if len(a) > len(b) else 0.0 if len(a) < len(b) else 0.5 for _, _, a, b in pairs])

  ids = lambda text: tokenizer.encode(text) + [tokenizer.special_tokens['<|im_end|>']]
  episodes = trainer.Episodes(prompt_ids=np.array([0]), tokens=[[ids('a'), ids('a b c'), ids('a b'), ids('a b c d')]],
                              sampler_logprobs=None, finish_reasons=None, rewards=np.array([[0, 1, 1, 0.0]]))
  prompts = [trainer.Prompt(domain='x', tokens=(1,), max_new_tokens=4, question='q')]
  wins, agreement = LongerIsBetter(tokenizer).judge(None, episodes, prompts)
  np.testing.assert_allclose(wins, [[0, 2 / 3, 1 / 3, 1]])  # share of the other three each one beats
  assert agreement == 0.5  # of the 4 pairs with different rewards, the 2 against 'a b c d' (reward 0) disagree

  model = model_lib.create(get_config('k2_tiny', num_layers=2), seed=0)
  real = critic_lib.Critic(tokenizer)
  first = real.prefer_first(model, [('q', '', 'x', 'y'), ('q', '', 'y', 'x')])
  assert np.all((first > 0) & (first < 1))
  wins, _ = real.judge(model, episodes, prompts)
  np.testing.assert_allclose(wins.sum(), 2.0, rtol=1e-5)  # each pair hands out one win: K / 2 over K - 1 rivals


def write_tiny_model(directory, tokenizer):
  recipe.export_model(model_lib.create(get_config('k2_tiny', num_layers=2), seed=0), str(directory), tokenizer.path)


@pytest.mark.slow
def test_rl_launcher_end_to_end_with_ptx_and_critic(tmp_path, tokenizer):
  import subprocess
  import sys
  from k2.rl import tasks
  from k2.gym import verifiable
  from tests.test_pretrain_smoke import ROOT
  write_tiny_model(tmp_path / 'model', tokenizer)
  tasks.write_demonstrations(str(tmp_path / 'demo.jsonl'), verifiable.sample_tasks('arithmetic', 16, seed=1, level=1))
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ''}
  bindings = [f"INIT_FROM = '{tmp_path / 'model'}'", 'model_config.num_layers = 2', 'NUM_ITERATIONS = 2',
              'rl.num_train_prompts = 8', 'rl.num_eval_prompts = 4', 'rl.eval_samples = 2',
              "rl.budgets = {'arithmetic': 12}", "rl.domains = {'arithmetic': 1}", 'RLConfig.prompts_per_iteration = 4',
              'RLConfig.samples_per_prompt = 4',
              'RLConfig.seq_len = 96', 'RLConfig.ptx_weight = 0.1', 'RLConfig.ptx_rows = 2',
              'RLConfig.critic_weight = 0.2', f"rl.ptx_conversations = '{tmp_path / 'demo.jsonl'}'"]
  result = subprocess.run([sys.executable, '-m', 'experiments.rl', '--gin_file=configs/rl/tiny.gin',
                           f'--workdir={tmp_path / "rl"}'] + [f'--gin_bindings={b}' for b in bindings],
                          cwd=ROOT, capture_output=True, text=True, timeout=1200, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  records = [json.loads(line) for line in open(tmp_path / 'rl' / 'metrics.jsonl')]
  assert [r['step'] for r in records] == [0, 1, 2]
  assert 'eval_pass@1' in records[0] and 'eval_greedy_accuracy' in records[-1]
  for key in ('reward/arithmetic', 'pass@1', 'pass@4', 'response_length_p95', 'truncation_rate', 'temperature',
              'degenerate_group_fraction', 'critic_win_rate_spread', 'rollout_tokens_per_second'):
    assert key in records[1], key
  updated = [r for r in records[1:] if r['skipped_update'] == 0.0]
  assert all(r['ptx_loss'] > 0 and 'max_logit' in r and 'clipped_heads' in r for r in updated)
  assert os.path.isdir(tmp_path / 'rl' / 'model' / 'state')


def test_rl_compare_of_a_model_with_itself_is_zero_and_a_missing_model_is_one_error_line(tmp_path, tokenizer):
  import subprocess
  import sys
  from tests.test_pretrain_smoke import ROOT
  recipe.export_model(model_lib.create(get_config('k2_tiny'), seed=0), str(tmp_path / 'model'), tokenizer.path)
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ''}
  flags = ['--domain=arithmetic', '--level=1', '--budget=6', '--prompts=6', '--samples=2']
  same = subprocess.run([sys.executable, '-m', 'experiments.rl_compare', f'--before={tmp_path / "model"}',
                         f'--after={tmp_path / "model"}'] + flags, cwd=ROOT, capture_output=True, text=True,
                        timeout=600, env=env)
  assert same.returncode == 0, same.stderr[-3000:]
  assert 'sampled pass@1: +0.000 (standard error over prompts 0.000); 0 prompts better, 0 worse' in same.stdout
  assert 'greedy accuracy: +0.000' in same.stdout
  missing = subprocess.run([sys.executable, '-m', 'experiments.rl_compare', f'--before={tmp_path / "nope"}',
                            f'--after={tmp_path / "model"}'] + flags, cwd=ROOT, capture_output=True, text=True,
                           timeout=600, env=env)
  assert missing.returncode != 0
  assert missing.stderr.strip().splitlines() == [f'error: {tmp_path / "nope"}: no such directory']
  named = subprocess.run([sys.executable, '-m', 'experiments.rl_compare', f'--before={tmp_path / "nope"}',
                          f'--after={tmp_path / "model"}', '--model=k2_tiny'] + flags, cwd=ROOT, capture_output=True,
                         text=True, timeout=600, env=env)
  assert named.stderr.strip().splitlines() == [f'error: init_from {tmp_path / "nope"}: no such directory']
  tool = subprocess.run([sys.executable, '-m', 'experiments.rl_compare', f'--before={tmp_path / "model"}',
                         f'--after={tmp_path / "model"}', '--domain=calculator', '--prompts=2', '--samples=2',
                         '--episode_tokens=24', '--turn_tokens=8', '--max_assistant_turns=2'], cwd=ROOT,
                        capture_output=True, text=True, timeout=600, env=env)
  assert tool.returncode == 0, tool.stderr[-3000:]
  assert '2 held-out prompts (2 distinct) of calculator episodes; 2 samples each' in tool.stdout
  assert 'sampled pass@1: +0.000 (standard error over prompts 0.000); 0 prompts better, 0 worse' in tool.stdout


def test_demonstrations_cli_writes_column_arithmetic_with_long_ones(tmp_path):
  """`experiments.rl --demonstrations_out --column_arithmetic --long_share`: SFT conversations of gold responses worked
  column by column, a share of them padded past the budget, every one scoring 1."""
  import subprocess
  import sys
  from k2.gym import verifiable
  from k2.gym.verifiable import arithmetic
  from tests.test_pretrain_smoke import ROOT
  out = tmp_path / 'demos.jsonl'
  result = subprocess.run([sys.executable, '-m', 'experiments.rl', '--gin_file=configs/rl/tiny.gin', '--workdir=/tmp/x',
                           f'--demonstrations_out={out}', '--num_demonstrations=60', '--column_arithmetic',
                           '--long_share=0.25', "--gin_bindings=rl.domains = {'arithmetic': 2}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert result.returncode == 0, result.stderr[-2000:]
  rows = [json.loads(line)['messages'] for line in open(out)]
  assert len(rows) == 60
  train = {t.prompt: t for t in verifiable.sample_tasks('arithmetic', 60, seed=1, split='train', level=2)}
  padded = 0
  for user, assistant in rows:
    task = train[user['content']]
    assert verifiable.score(task, assistant['content']).value == 1.0
    if assistant['content'] != arithmetic.column_demonstration(task):
      padded += 1
      assert 'Let me check that again.' in assistant['content']
  assert 5 <= padded <= 25
