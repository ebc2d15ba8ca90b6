"""The rollout engine (k2/sample/engine.py): continuous batching gives the same sequences as the full forward and
as `generate`, with per-sequence stop tokens and budgets, while refilling finished slots.

k2_tiny in float32 on CPU (2 layers, default matmul precision 'highest' from conftest).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from k2 import model as model_lib
from k2 import sample
from k2.config import get_config
from k2.sample import engine

CONFIG = get_config('k2_tiny', vocab_size=512, num_layers=2, dtype='float32')
# Six ragged prompts for two or three slots: finished slots must be refilled (stale cache rows reused).
PROMPTS = [[11, 12, 13], [21, 22, 23, 24, 25, 26, 27, 28, 29], [31, 32, 33, 34, 35, 36], [41], [51, 52, 53, 54, 55],
           [61, 62, 63, 64, 65, 66, 67, 68, 69, 70, 71, 72, 73, 74, 75, 76, 77, 78]]
BUDGETS = [3, 7, 2, 5, 1, 4]
_full_forward = nnx.jit(lambda model, tokens: model(tokens)[0])


@pytest.fixture(scope='module')
def model():
  return model_lib.create(CONFIG, seed=0)


def greedy_by_full_forward(model, prompts, budgets, width=32):
  """Greedy continuations re-running the training forward on the growing sequences: [(tokens, logprobs)]."""
  sequences, logprobs = [list(p) for p in prompts], [[] for _ in prompts]
  for _ in range(max(budgets)):
    tokens = np.zeros((len(prompts), width), np.int32)
    for row, sequence in enumerate(sequences):
      tokens[row, :len(sequence)] = sequence
    logits = np.asarray(_full_forward(model, jnp.asarray(tokens)))
    for row, sequence in enumerate(sequences):
      last = logits[row, len(sequence) - 1]
      token = int(np.argmax(last))
      logprobs[row].append(float(jax.nn.log_softmax(last)[token]))
      sequence.append(token)
  return [(s[len(p):len(p) + b], lp[:b]) for s, p, lp, b in zip(sequences, prompts, logprobs, budgets)]


def test_greedy_with_refills_equals_full_forward_argmax(model):
  result = engine.rollout(model, PROMPTS, BUDGETS, num_slots=2, temperature=0.0, steps_per_sync=3, admit_group=2)
  for row, (tokens, logprobs) in enumerate(greedy_by_full_forward(model, PROMPTS, BUDGETS)):
    assert result.tokens[row] == tokens, row
    np.testing.assert_allclose(result.logprobs[row], logprobs, rtol=1e-5, atol=1e-5)
  assert result.finish_reasons == ['length'] * len(PROMPTS)
  # Slots were refilled: six prompts through two slots, and fewer steps than static batches of two (7 + 5 + 4 - 3).
  assert result.prefills >= 3 and result.decode_steps < 13


def test_per_sequence_stop_tokens_and_budgets(model):
  """Each row stops at its own stop token (kept) or at its own budget; another row's stop token does not stop it."""
  reference = greedy_by_full_forward(model, PROMPTS, [8] * len(PROMPTS))
  stops = [[reference[0][0][1]], [], [reference[2][0][0], 7], [reference[3][0][3]], [], [reference[0][0][1]]]
  budgets = [8, 4, 8, 8, 2, 8]
  result = engine.rollout(model, PROMPTS, budgets, num_slots=3, temperature=0.0, stop_tokens=stops,
                          steps_per_sync=4, admit_group=1)
  for row, ((tokens, _), row_stops, budget) in enumerate(zip(reference, stops, budgets)):
    expected = tokens[:budget]
    hits = [i for i, t in enumerate(expected) if t in row_stops]
    if hits:
      expected = expected[:hits[0] + 1]
    assert result.tokens[row] == expected, row
    assert result.finish_reasons[row] == ('stop' if hits else 'length'), row
    assert len(result.logprobs[row]) == len(expected)
  assert result.finish_reasons[0] == 'stop' and len(result.tokens[0]) == 2


@pytest.mark.parametrize('sampling', [dict(temperature=1.0), dict(temperature=0.7, top_p=0.9)])
def test_equals_generate_for_the_same_seed(model, sampling):
  """With one slot per prompt (the batch composition of `generate`), sampled tokens and log-probs are generate's."""
  prompts, budgets = PROMPTS[:4], [6, 3, 5, 6]
  expected = sample.generate(model, prompts, budgets, seed=3, **sampling)
  result = engine.rollout(model, prompts, budgets, num_slots=len(prompts), seed=3, steps_per_sync=4, **sampling)
  assert result.tokens == expected.tokens
  for got, want in zip(result.logprobs, expected.logprobs):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert result.finish_reasons == expected.finish_reasons
  other = engine.rollout(model, prompts, budgets, num_slots=len(prompts), seed=4, steps_per_sync=4, **sampling)
  assert other.tokens != result.tokens


def test_prompt_counts_between_powers_of_two_share_one_decode_program(model):
  """Multi-turn callers shrink the batch turn by turn: 5..8 prompts run in 8 slots, one compiled decode program."""
  engine._decode_chunk_jit.clear_cache()
  results = [engine.rollout(model, PROMPTS[:n] + PROMPTS[:max(0, n - 6)], 2, num_slots=64, temperature=0.0,
                            steps_per_sync=2) for n in (5, 6, 7, 8)]
  assert engine._decode_chunk_jit._cache_size() == 1
  assert [len(r.tokens) for r in results] == [5, 6, 7, 8]
  assert all(len(t) == 2 for r in results for t in r.tokens)


def test_first_fill_is_prefilled_in_groups_under_the_token_cap(model):
  """max_prefill_tokens splits the first fill (six prompts of widths 16-32 under a 64-token cap: groups of 2, never under admit_group)."""
  result = engine.rollout(model, PROMPTS, BUDGETS, num_slots=8, temperature=0.0, steps_per_sync=3,
                          admit_group=2, max_prefill_tokens=64)
  for row, (tokens, logprobs) in enumerate(greedy_by_full_forward(model, PROMPTS, BUDGETS)):
    assert result.tokens[row] == tokens, row
    np.testing.assert_allclose(result.logprobs[row], logprobs, rtol=1e-5, atol=1e-5)
  assert result.prefills == 3


def test_largest_budget_is_admitted_first_so_the_run_takes_about_its_budget(model):
  """Four short prompts given before a long one, two slots: admitted in the given order the long one would start
  after the others (>= 2 + 9 steps); largest budget first, it decodes beside them and the run takes its budget.
  Outputs still come back in prompt order (greedy: any composition gives the full-forward argmax)."""
  prompts, budgets = PROMPTS[:5], [2, 2, 2, 2, 9]
  assert engine.admission_order(np.array(budgets), 2) == [4, 0, 1, 2, 3]
  assert engine.admission_order(np.array(budgets), 8) == [0, 1, 2, 3, 4]  # one fill: the given order
  result = engine.rollout(model, prompts, budgets, num_slots=2, temperature=0.0, steps_per_sync=2, admit_group=1)
  for row, (tokens, _) in enumerate(greedy_by_full_forward(model, prompts, budgets)):
    assert result.tokens[row] == tokens, row
  assert result.decode_steps <= 9
