"""The SFT stage end to end on k2_tiny: gym expert trajectories -> SFT from a pretraining run -> export.

The assistant-only loss mask is checked token by token, and the stage is run through its launcher as a user runs it.
"""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from k2 import chat, gym
from k2.data import conversations as conversations_lib
from tests.test_pretrain_smoke import ROOT, records, run_in_process


def write_trajectories(path, per_domain=6, split='train'):
  """Expert episodes of every gym domain as JSONL conversations (the shape the synthesis pipeline writes)."""
  lines = []
  for name in ('retail', 'calendar', 'files', 'calculator'):
    domain = gym.domains.get(name)
    for task in domain.sample_tasks(per_domain, seed=0, split=split):
      episode = gym.run_episode(gym.ToolEnv(domain), gym.ExpertAgent(task), task)
      assert episode.reward == 1.0
      messages = [{'role': m.role, 'content': m.content, 'tool_call_id': m.tool_call_id,
                   'tool_calls': [{'id': c.id, 'function': {'name': c.name, 'arguments': c.arguments}}
                                  for c in m.tool_calls]} for m in episode.messages]
      lines.append(json.dumps({'messages': messages, 'tools': domain.tool_specs()}))
  path.write_text('\n'.join(lines) + '\n')
  return len(lines)


@pytest.fixture(scope='module')
def tokenizer():
  from k2.data import pipeline
  return pipeline.tokenizer()  # the cached BPE of the embedded corpus (trained on first use)


def test_batches_train_on_exactly_the_assistant_tokens(tmp_path, tokenizer):
  write_trajectories(tmp_path / 'data.jsonl', per_domain=2)
  convs = conversations_lib.read(str(tmp_path / 'data.jsonl'))
  batch = next(conversations_lib.sft_batches(convs, tokenizer, batch_size=2, seq_len=1024, seed=0, shuffle=False))
  for row in range(2):
    for segment in set(batch['segment_ids'][row].tolist()) - {0}:
      where = batch['segment_ids'][row] == segment
      tokens = np.concatenate([batch['inputs'][row][where][:1], batch['targets'][row][where]])
      expected = next(c for c in convs if chat.render(c['messages'], tokenizer, tools=c['tools']).tokens ==
                      tokens.tolist())  # each packed segment is one whole conversation
      rendered = chat.render(expected['messages'], tokenizer, tools=expected['tools'])
      np.testing.assert_array_equal(batch['mask'][row][where], np.asarray(rendered.loss_mask[1:], np.float32))
      np.testing.assert_array_equal(batch['positions'][row][where], np.arange(where.sum()))
    assert np.all(batch['mask'][row][batch['segment_ids'][row] == 0] == 0)  # padding never trains


def test_loss_on_all_trains_on_every_token_of_the_same_packed_rows(tmp_path, tokenizer):
  write_trajectories(tmp_path / 'data.jsonl', per_domain=2)
  convs = conversations_lib.read(str(tmp_path / 'data.jsonl'))
  make = lambda **kw: next(conversations_lib.sft_batches(convs, tokenizer, batch_size=2, seq_len=1024, seed=0,
                                                         shuffle=False, **kw))
  assistant, every = make(), make(loss_on='all')
  for key in ('inputs', 'targets', 'segment_ids', 'positions'):
    np.testing.assert_array_equal(assistant[key], every[key])
  np.testing.assert_array_equal(every['mask'], (every['segment_ids'] > 0).astype(np.float32))
  assert 0 < assistant['mask'].sum() < 0.5 * every['mask'].sum()  # tool results and prompts outweigh the assistant
  with pytest.raises(Exception, match="loss_on must be one of"):
    make(loss_on='user')


def test_bad_conversation_files_are_one_line_errors(tmp_path):
  (tmp_path / 'bad.jsonl').write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
  with pytest.raises(Exception, match='bad.jsonl:1 has no assistant message'):
    conversations_lib.read(str(tmp_path / 'bad.jsonl'))
  (tmp_path / 'bad.jsonl').write_text('not json\n')
  with pytest.raises(Exception, match='bad.jsonl:1 is not a conversation'):
    conversations_lib.read(str(tmp_path / 'bad.jsonl'))
  with pytest.raises(Exception, match='no such file'):
    conversations_lib.read(str(tmp_path / 'none*.jsonl'))


def test_several_sources_are_read_once_each(tmp_path):
  line = lambda text: json.dumps({'messages': [{'role': 'user', 'content': 'q'},  # noqa: E731
                                               {'role': 'assistant', 'content': text}]}) + '\n'
  (tmp_path / 'a-1.jsonl').write_text(line('a1'))
  (tmp_path / 'a-2.jsonl').write_text(line('a2') + line('a3'))
  (tmp_path / 'b.jsonl').write_text(line('b'))
  read = conversations_lib.read(f'{tmp_path}/a-*.jsonl, {tmp_path}/b.jsonl,{tmp_path}/a-1.jsonl')
  assert sorted(c['messages'][-1].content for c in read) == ['a1', 'a2', 'a3', 'b']
  with pytest.raises(Exception, match="conversations '.*/c.jsonl': no such file"):  # one source missing is an error
    conversations_lib.read(f'{tmp_path}/a-*.jsonl,{tmp_path}/c.jsonl')


def test_sft_from_a_pretraining_run_lowers_the_held_out_assistant_loss(tmp_path):
  pretrained = tmp_path / 'pretrain'
  run_in_process(pretrained, 'NUM_STEPS = 30', 'train.sample_tokens = 0', 'EVAL_EVERY = 100')
  count = write_trajectories(tmp_path / 'trajectories.jsonl', per_domain=10)
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ''}
  result = subprocess.run(
      [sys.executable, '-m', 'experiments.sft', '--gin_file=configs/sft/tiny.gin', f'--workdir={tmp_path / "sft"}',
       f"--gin_bindings=INIT_FROM = '{pretrained}'", f"--gin_bindings=CONVERSATIONS = '{tmp_path}/*.jsonl'",
       '--gin_bindings=NUM_STEPS = 20', '--gin_bindings=BATCH_SIZE = 4', '--gin_bindings=EVAL_EVERY = 10',
       '--gin_bindings=sft.log_every = 5'],
      cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  trained, held_out, left_out = map(int, re.search(r'sft: (\d+) training and (\d+) held-out conversations \((\d+) '
                                                   r'longer', result.stdout).groups())
  assert trained + held_out + left_out == count and trained >= 10 and held_out >= 1
  rows = records(tmp_path / 'sft')
  evals = [r['eval_loss'] for r in rows if 'eval_loss' in r]
  assert len(evals) == 2 and evals[1] < evals[0], evals
  assert rows[-1]['step'] == 20 and all('clipped_heads' in r and 'max_logit' in r for r in rows)  # MuonClip on
  assert sorted(os.listdir(tmp_path / 'sft' / 'model')) == ['config.json', 'state', 'tokenizer.json']
