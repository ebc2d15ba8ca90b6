"""Agent evaluation: pass^k, the per-domain scores, episodes stepped together, and our model as the agent."""

import itertools
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from k2 import chat, gym
from k2.chat import Message
from k2.gym import evaluation
from k2.gym.episodes import agents_responder, model_responder, run_episodes
from tests.test_pretrain_smoke import ROOT


def test_pass_hat_k_is_the_chance_that_k_drawn_trials_all_succeed():
  outcomes = [[1, 1, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
  for k in range(1, 5):
    brute = np.mean([np.mean([all(row[i] for i in subset) for subset in itertools.combinations(range(4), k)])
                     for row in outcomes])
    assert evaluation.pass_hat_k([sum(row) for row in outcomes], 4, k) == pytest.approx(brute)
  assert evaluation.pass_hat_k([3, 0], 4, 1) == pytest.approx(3 / 8)
  with pytest.raises(ValueError, match='k must lie'):
    evaluation.pass_hat_k([1], 2, 3)


def _expert_responder(envs, tasks, seeds):
  return agents_responder([gym.ExpertAgent(task) for task in tasks])


def test_the_expert_scores_perfectly_on_every_held_out_domain():
  seen = []
  report = evaluation.evaluate(list(gym.domains.DOMAINS), _expert_responder, tasks_per_domain=5, trials=2,
                               on_episode=lambda domain, task, trial, e: seen.append((domain, task, trial, e)))
  assert set(report) == set(gym.domains.DOMAINS) and 'bank' in report
  assert len(seen) == 5 * 2 * len(gym.domains.DOMAINS) and len({(d, t.task_id, k) for d, t, k, _ in seen}) == len(seen)
  assert all(task.domain == domain and task.split == 'heldout' and e.reward == 1.0 for domain, task, _, e in seen)
  for name, r in report.items():
    assert r['pass^1'] == r['pass^2'] == 1.0, name
    assert r['argument_match'] == 1.0 and r['backend_errors'] == 0, name
    assert r['tool_call_validity'] in (1.0, None), name  # None: five refusals in a row tried no call
  assert '| bank (unseen in SFT) | 1.00 | 1.00 |' in evaluation.table(report, unseen=['bank'])


def test_episodes_stepped_together_equal_episodes_played_alone():
  domain = gym.domains.get('bank')
  tasks = domain.sample_tasks(6, seed=3, split='heldout')
  alone = [gym.run_episode(gym.ToolEnv(domain), gym.ExpertAgent(t), t, seed=s) for t, s in zip(tasks, range(6))]
  together = run_episodes([gym.ToolEnv(domain) for _ in tasks], tasks, list(range(6)), _expert_responder(
      None, tasks, None))
  for a, b in zip(alone, together):
    assert a.messages == b.messages and a.reward == b.reward and a.info == b.info


def test_a_failing_or_malformed_agent_is_scored_not_raised():
  domain = gym.domains.get('retail')
  tasks = domain.sample_tasks(3, seed=0, split='heldout')
  garbage = '<|tool_calls_section_begin|><|tool_call_begin|>functions.get_order:0<|tool_call_argument_begin|>{oops'

  def respond(indices, histories):
    out = []
    for i in indices:
      out.append(RuntimeError('HTTP 503') if i == 0 else garbage if i == 1 else Message(
          'assistant', tool_calls=(chat.ToolCall('no_such_tool', {}),)))
    return out

  episodes = run_episodes([gym.ToolEnv(domain, max_assistant_turns=3) for _ in tasks], tasks, [0, 0, 0], respond)
  assert episodes[0].info['agent_error'] == 'RuntimeError: HTTP 503' and episodes[0].reward == 0.0
  assert episodes[1].info['malformed_outputs'] == 3 and episodes[1].info['truncated']
  assert episodes[2].info['unknown_tools'] == 3
  report = evaluation.score(tasks, [[e] for e in episodes])
  assert report['pass^1'] == 0.0 and report['tool_call_validity'] == 0.0 and report['backend_errors'] == 1
  assert report['tool_calls_tried'] == 6  # three malformed turns and three calls of an unknown tool
  assert (report['malformed_outputs'], report['unknown_tools'], report['invalid_arguments']) == (3, 3, 0)


@pytest.fixture(scope='module')
def tiny_agent(tmp_path_factory):
  """A random k2_tiny-shaped model with a small BPE: (model, tokenizer, the tokenizer's path)."""
  from k2 import model as model_lib
  from k2.config import get_config
  from k2.data import tokenizer as tokenizer_lib
  path = str(tmp_path_factory.mktemp('agent') / 'tokenizer.json')
  tokenizer = tokenizer_lib.train_bpe(lambda: ['get_balance of account AC12345 please'] * 8, vocab_size=300,
                                      path=path)
  config = get_config('k2_tiny', num_layers=2, vocab_size=tokenizer.vocab_size, max_position_embeddings=1024)
  return model_lib.create(config), tokenizer, path


def test_model_backend_returns_the_sampled_ids_and_flags_overflow(tiny_agent):
  from k2 import sample, synth
  model, tokenizer, _ = tiny_agent
  backend = synth.ModelBackend(model, tokenizer, temperature=0.0, max_new_tokens=12, num_slots=4)
  short = [Message('user', 'balance of AC12345?')]
  long = [Message('user', 'get_balance ' * 2000)]
  out = backend.complete_batch([(short, None), (long, None), (short, None)], seed=0)
  assert isinstance(out[1], synth.ContextOverflow)
  prompt = chat.render(short, tokenizer, add_generation_prompt=True).tokens
  greedy = sample.generate(model, [prompt], 12, stop_tokens=[backend.im_end])
  for completion in (out[0], out[2]):
    assert completion.prompt_tokens == prompt and completion.tokens == greedy.tokens[0]
    assert completion.text == chat.decode(greedy.tokens[0], tokenizer)
    np.testing.assert_allclose(completion.logprobs, greedy.logprobs[0], atol=1e-4)


def test_an_untrained_model_plays_episodes_to_the_end(tiny_agent):
  from k2 import synth
  model, tokenizer, _ = tiny_agent
  backend = synth.ModelBackend(model, tokenizer, temperature=1.0, max_new_tokens=8, num_slots=8)
  domain = gym.domains.get('calculator')
  tasks = domain.sample_tasks(3, seed=0, split='heldout')
  envs = [gym.ToolEnv(domain, max_user_turns=2, max_assistant_turns=2) for _ in tasks]
  episodes = run_episodes(envs, tasks, [0, 1, 2], model_responder(backend, [e.tool_specs for e in envs], seed=0))
  for episode in episodes:  # random text: no success, but every episode ended and was scored
    assert episode.reward == 0.0 and episode.info['truncated']
    assert episode.info['assistant_turns'] >= 1 or 'ContextOverflow' in episode.info.get('agent_error', '')


def _eval_agent(*flags):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'} | {'JAX_PLATFORMS': 'cpu'}
  return subprocess.run([sys.executable, '-m', 'experiments.eval_agent', *flags], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_eval_agent_cli_reports_per_domain(tiny_agent, tmp_path):
  from k2.train import recipe
  model, _, tokenizer_path = tiny_agent
  model_dir = str(tmp_path / 'model')  # a run's model/ export: what eval_agent loads
  recipe.export_model(model, model_dir, tokenizer_path)
  out = tmp_path / 'report.json'
  result = _eval_agent('--checkpoint', model_dir, '--domains', 'calculator,bank', '--tasks_per_domain', '2',
                       '--trials', '2', '--max_new_tokens', '8', '--out', str(out),
                       '--transcripts', str(tmp_path / 'episodes.jsonl'))
  assert result.returncode == 0, result.stderr[-2000:]
  episodes = [json.loads(line) for line in (tmp_path / 'episodes.jsonl').read_text().splitlines()]
  assert len(episodes) == 8 and {e['domain'] for e in episodes} == {'calculator', 'bank'}
  assert all(e['messages'][0]['role'] == 'system' and e['messages'][1]['role'] == 'user' for e in episodes)
  report = json.loads(out.read_text())
  assert set(report['domains']) == {'calculator', 'bank'}
  assert report['domains']['bank']['tasks'] == 2 and math.isclose(report['domains']['bank']['pass^1'], 0.0)
  assert '| bank (unseen in SFT) |' in result.stdout and 'turn 1: 8 episodes running' in result.stdout


def test_eval_agent_cli_rejects_bad_flags(tmp_path):
  for flags, message in [(('--domains', 'bank'), 'error: give exactly one of'),
                         (('--checkpoint', str(tmp_path), '--domains', 'nowhere'), "error: unknown domain 'nowhere'"),
                         (('--checkpoint', str(tmp_path / 'missing'), '--model_dtype', 'bfloat16'),
                          f'error: {tmp_path / "missing"}/config.json does not exist')]:
    result = _eval_agent(*flags)
    assert result.returncode != 0 and message in result.stderr + result.stdout, (flags, result.stderr[-500:])
