"""Multi-turn agentic RL episodes (k2.rl.agentic): the token row of a trajectory and its loss mask, and the RL
iteration over tool-domain prompts with a real model."""

import dataclasses

import numpy as np
import pytest

from k2 import chat, gym
from k2.config import get_config
from k2.rl import agentic, trainer
from k2.synth.backends import Completion


@pytest.fixture(scope='module')
def tokenizer():
  from k2.data import pipeline
  return pipeline.tokenizer()  # the cached BPE of the embedded corpus (has the chat special tokens)


def turn_tokens(message, tokenizer):
  """The ids a model emits for `message` after the generation prompt (its closing <|im_end|> included)."""
  history = [chat.Message('user', 'x')]
  before = chat.render(history, tokenizer, add_generation_prompt=True).tokens
  after = chat.render(history + [message], tokenizer).tokens
  assert after[:len(before)] == before
  return after[len(before):]


class ExpertBackend:
  """Stands in for k2.synth.backends.ModelBackend: answers each row with the scripted expert's next message of the
  task whose prompt the row starts with (cut at the row's budget), recording every row it was asked to continue."""
  rows: list = []

  def __init__(self, model, tokenizer, **kwargs):
    del kwargs
    self.prompts, self.tokenizer, self.turns = model, tokenizer, {}

  def complete_tokens(self, rows, budgets, seed):
    del seed
    out = []
    for row, budget in zip(rows, budgets):
      ExpertBackend.rows.append(list(row))
      prompt = next(p for p in self.prompts if tuple(row[:len(p.tokens)]) == p.tokens)
      turn = self.turns.get(prompt.tokens, 0)
      self.turns[prompt.tokens] = turn + 1
      plan = gym.expert_messages(prompt.task.task)
      message = plan[turn]
      earlier = sum(len(m.tool_calls) for m in plan[:turn])  # the template numbers calls across the conversation
      message = dataclasses.replace(message, tool_calls=tuple(
          dataclasses.replace(call, id=f'functions.{call.name}:{earlier + j}')
          for j, call in enumerate(message.tool_calls)))
      tokens = turn_tokens(message, self.tokenizer)
      finish = 'stop' if len(tokens) <= budget else 'length'
      tokens = tokens[:budget]
      out.append(Completion(chat.decode(tokens, self.tokenizer), list(row), tokens, [-0.5] * len(tokens), finish))
    return out


@pytest.mark.parametrize('domain', ['retail', 'calculator'])
def test_trajectory_row_is_the_rendered_conversation_and_the_mask_covers_exactly_the_agent(domain, tokenizer,
                                                                                         monkeypatch):
  monkeypatch.setattr(agentic, 'ModelBackend', ExpertBackend)
  ExpertBackend.rows = []
  prompts = agentic.prompts([domain], 3, seed=0, split='heldout', tokenizer=tokenizer, max_tokens=2000)
  sampler = agentic.EpisodeSampler(tokenizer)
  groups = sampler(prompts, prompts, [0, 1, 2], samples=1, temperature=1.0, seed=0)  # the fake reads prompts
  for prompt, (trajectory,) in zip(prompts, groups):
    assert trajectory.reward == 1.0 and trajectory.reason == 'success' and trajectory.finish == 'stop'
    # The same episode played by the expert directly: its conversation through the agent's last message, rendered
    # in one go, is exactly the row built turn by turn (sampled ids never re-encoded, the environment's spliced in).
    env = gym.ToolEnv(gym.domains.get(domain))
    episode = gym.run_episode(env, gym.ExpertAgent(prompt.task.task), prompt.task.task, seed=prompt.task.user_seed)
    last = max(i for i, m in enumerate(episode.messages) if m.role == 'assistant')
    reference = chat.render(episode.messages[:last + 1], tokenizer, tools=env.tool_specs)
    row = list(prompt.tokens) + trajectory.tokens
    assert row == reference.tokens
    # The loss mask is the template's own assistant mask on the part after the prompt.
    assert trajectory.mask == list(reference.loss_mask[len(prompt.tokens):])
    assert sum(trajectory.mask) > 0 and 0 in trajectory.mask  # several turns with the environment between them
    assert [lp for lp, m in zip(trajectory.logprobs, trajectory.mask) if not m] == [0.0] * trajectory.mask.count(0)
    # Every turn was sampled in a prefix of that row.
    asked = [r for r in ExpertBackend.rows if r[:len(prompt.tokens)] == list(prompt.tokens)]
    assert len(asked) == sum(m.role == 'assistant' for m in episode.messages)
    assert all(row[:len(r)] == r for r in asked)


def test_over_budget_episodes_are_truncated_within_their_budget(tokenizer, monkeypatch):
  monkeypatch.setattr(agentic, 'ModelBackend', ExpertBackend)
  prompts = agentic.prompts(['retail'], 2, seed=0, split='train', tokenizer=tokenizer, max_tokens=40)
  groups = agentic.EpisodeSampler(tokenizer)(prompts, prompts, [0, 1], samples=2, temperature=1.0, seed=0)
  for group in groups:
    for trajectory in group:
      assert trajectory.finish == 'length' and trajectory.reason.startswith('ended: _Truncated')
      assert len(trajectory.tokens) <= 40


def test_episode_batch_and_scores_of_agentic_groups():
  """An agentic group's mask covers only its sampled ids and its reward is the environment's; a single-turn group
  beside it keeps its full-response mask and reward_fn's reward."""
  prompts = [trainer.Prompt(domain='tool/retail', tokens=(7, 8), max_new_tokens=8),
             trainer.Prompt(domain='even', tokens=(9,), max_new_tokens=4)]
  episodes = trainer.Episodes(
      prompt_ids=np.array([0, 1]), tokens=[[[1, 2, 3, 4], [1, 2, 3, 4, 5]], [[6, 6], [6]]],
      sampler_logprobs=[[[-1.0, -2.0, 0.0, -3.0], [-1.0, 0.0, 0.0, 0.0, -4.0]], [[-1.0, -1.0], [-2.0]]],
      finish_reasons=[['stop', 'length'], ['stop', 'stop']],
      masks=[[[1, 1, 0, 1], [1, 0, 0, 0, 1]], None], outcomes=[[(1.0, 'success'), (1.0, 'success')], None])
  config = trainer.RLConfig(prompts_per_iteration=2, samples_per_prompt=2, truncation_penalty=-0.5)
  trainer.score_episodes(episodes, prompts, lambda prompt, response: (len(response) / 10, 'length / 10'), config)
  np.testing.assert_allclose(episodes.rewards, [[1.0, -0.5], [0.2, 0.1]])  # truncated: the penalty
  assert episodes.reasons[0] == ['success', 'truncated at the token budget']
  batch = trainer.episode_batch(episodes, prompts, np.array([True, True]), seq_len=8)
  # Row (0, 0): inputs 7 8 1 2 3, targets 8 1 2 3 4; the response targets start at index 1.
  np.testing.assert_array_equal(batch['mask'][0, 0], [0, 1, 1, 0, 1, 0, 0, 0])
  np.testing.assert_array_equal(batch['mask'][0, 1], [0, 1, 0, 0, 0, 1, 0, 0])
  np.testing.assert_array_equal(batch['sampler_logprobs'][0, 0], [0, -1, -2, 0, -3, 0, 0, 0])
  np.testing.assert_array_equal(batch['mask'][1, 0], [1, 1, 0, 0, 0, 0, 0, 0])
  assert trainer.sampled_tokens(episodes) == 3 + 2 + 2 + 1


@pytest.mark.slow
def test_rl_iteration_on_tool_prompts_with_a_real_model(tokenizer, monkeypatch):
  """Real sampling: a random model's turns run out of tokens (budget control scores them); the update runs on the
  sampled ids with the log-ratio 0 at the first inner step and the sampler agreeing with the training forward."""
  from k2 import model as model_lib
  from k2.train import loop, recipe
  from k2.train.step import init_state
  model_config = get_config('k2_tiny', num_layers=2, dtype='float32', max_position_embeddings=2048)
  prompts = agentic.prompts(['calculator'], 4, seed=0, split='train', tokenizer=tokenizer, max_tokens=48)
  config = trainer.RLConfig(prompts_per_iteration=2, samples_per_prompt=2, inner_steps=2, seq_len=656, num_slots=4,
                            truncation_penalty=-0.5)
  optimizer = recipe.optimizer(1e-3)
  graphdef, state = init_state(model_lib.create(model_config, seed=0), optimizer)
  setup = trainer.make_setup(graphdef, model_config, config, 1e-3, optimizer)
  mesh = loop.make_run_mesh({}, model_config, config.prompts_per_iteration, 1)
  sampler = agentic.EpisodeSampler(tokenizer, turn_tokens=12)
  # The reward of an agentic prompt is the environment's; reward_fn is never called for them.
  never = lambda prompt, response: pytest.fail('reward_fn called on an agentic prompt')  # noqa: E731
  context = trainer.Context(prompts=prompts, reward_fn=never, setup=setup, config=config, stop_tokens=(0,),
                            mesh=mesh, agentic=sampler)
  rewards = iter([[1.0, 0.0], [0.0, 0.0]])  # give the first group spread so that it is kept

  def scored(episodes, prompts_, reward_fn, config_):
    trainer_score(episodes, prompts_, reward_fn, config_)
    assert np.all(episodes.rewards == -0.5)  # every turn hit its 12 tokens
    episodes.rewards = np.asarray([next(rewards) for _ in episodes.prompt_ids], np.float32)

  trainer_score = trainer.score_episodes
  monkeypatch.setattr(trainer, 'score_episodes', scored)
  state, metrics, episodes = trainer.iteration(state, trainer.PromptSampler(len(prompts), seed=0), context)
  assert [len(t) for g in episodes.tokens for t in g] == [12] * 4 and episodes.masks[0] == [[1] * 12] * 2
  # Old log-probs are the training forward's own: the first step's log-ratio is 0 up to float32 rounding (the
  # update's compiled forward over these long rows may sum in another order than the old log-probs' program).
  assert metrics['skipped_update'] == 0.0 and metrics['log_ratio_first_step'] < 1e-5
  assert metrics['logprob_gap_abs_max'] < 1e-3
  assert 'reward/tool/calculator' in metrics and metrics['truncation_rate'] == 1.0


def test_rl_tool_tasks_are_not_the_synthesized_sft_tasks(tokenizer):
  """RL's tool-domain training tasks (rl.tool_task_seed's default) share no task with what the default synthesis
  (experiments.synth: seed 0) turned into SFT trajectories, and its held-out prompts come from the held-out split."""
  import inspect
  from k2.rl import stage
  from k2.synth import pipeline as synth_pipeline
  synth_seed = synth_pipeline.SynthConfig().seed
  default_seed = inspect.signature(stage.rl).parameters['tool_task_seed'].default
  train, held_out = stage.prompt_sets({}, ['calculator'], tokenizer, budgets={}, seed=0, tool_task_seed=default_seed,
                                      num_train=64, num_eval=8, tool_episode_tokens=384)
  synthesized = gym.domains.get('calculator').sample_tasks(1800, synth_seed, 'train')
  key = lambda task: (task.instruction, repr(task.gold_actions))
  assert not {key(p.task.task) for p in train} & {key(t) for t in synthesized}
  assert {p.task.task.split for p in held_out} == {'heldout'} and len(train) == 64
  same, _ = stage.prompt_sets({}, ['calculator'], tokenizer, budgets={}, seed=0, tool_task_seed=synth_seed,
                              num_train=64, num_eval=8, tool_episode_tokens=384)
  assert {key(p.task.task) for p in same} <= {key(t) for t in synthesized}  # what the default avoids
