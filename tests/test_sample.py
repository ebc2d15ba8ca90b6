"""Generation: cached decoding equals the full forward, absorbed MLA equals the naive form, sampling, mesh.

Tolerances (float32 on CPU, default matmul precision 'highest' from conftest): logits of cached decoding vs the
full forward within 2e-5 absolute + 2e-5 relative (the cache changes only the summation order: absorbed
attention contracts q with W_k before the latent, softmax runs over padded key ranges).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from k2 import model as model_lib
from k2 import sample
from k2 import sharding
from k2.config import get_config
from k2.sample import mla_cache

CONFIG = get_config('k2_tiny', vocab_size=512, num_layers=2, dtype='float32')
PROMPTS = [[11, 12, 13], [21, 22, 23, 24, 25, 26, 27, 28, 29], [31, 32, 33, 34, 35, 36]]  # ragged
TOL = dict(rtol=2e-5, atol=2e-5)
STEPS = 6
_full_forward = nnx.jit(lambda model, tokens: model(tokens)[0])


@pytest.fixture(scope='module')
def model():
  return model_lib.create(CONFIG, seed=0)


def full_logits(model, sequences, width=16):
  """Logits [T, V] of each unpadded sequence through the training forward (no cache), as a list.

  The sequences are right-padded to one width so one compiled forward serves every call; the padding comes
  after each sequence, so causal attention keeps it from changing the logits of the real tokens.
  """
  tokens = np.zeros((len(sequences), width), np.int32)
  for row, sequence in enumerate(sequences):
    tokens[row, :len(sequence)] = sequence
  logits = np.asarray(_full_forward(model, jnp.asarray(tokens)))
  return [logits[row, :len(sequence)] for row, sequence in enumerate(sequences)]


def reference_greedy(model, prompts, steps):
  """Greedy continuations by re-running the full forward on the growing sequences: [(tokens, logprobs)]."""
  sequences, logprobs = [list(p) for p in prompts], [[] for _ in prompts]
  for _ in range(steps):
    for row, logits in enumerate(full_logits(model, sequences)):
      token = int(np.argmax(logits[-1]))
      logprobs[row].append(float(jax.nn.log_softmax(logits[-1])[token]))
      sequences[row].append(token)
  return [(s[len(p):], lp) for s, p, lp in zip(sequences, prompts, logprobs)]


@pytest.mark.parametrize('layout,form', [('latent', 'absorbed'), ('latent', 'expanded'), ('per_head', 'absorbed')])
def test_cached_decoding_matches_full_forward_on_ragged_prompts(model, layout, form):
  """Right-padded ragged prompts through prefill, then teacher-forced decode steps at per-row positions."""
  continuation = [[41, 42, 43, 44], [51, 52, 53, 54], [61, 62, 63, 64]]
  width, steps = 16, 4
  lengths = np.array([len(p) for p in PROMPTS], np.int32)
  tokens = np.zeros((len(PROMPTS), width), np.int32)
  for row, prompt in enumerate(PROMPTS):
    tokens[row, :len(prompt)] = prompt
  cache = sample.init_cache(model, len(PROMPTS), width + steps, layout)
  positions = np.broadcast_to(np.arange(width, dtype=np.int32), tokens.shape)
  prefill = jax.jit(lambda t, p, c: sample.forward(model, t, p, c, num_keys=width, mla_form=form))
  decode = jax.jit(lambda t, p, c: sample.forward(model, t, p, c, num_keys=width + steps, mla_form=form))
  logits, cache = prefill(tokens, positions, cache)
  decoded = []
  for step in range(steps):
    step_tokens = np.array([[c[step]] for c in continuation], np.int32)
    step_logits, cache = decode(step_tokens, (lengths + step)[:, None], cache)
    decoded.append(np.asarray(step_logits[:, 0]))
  full = full_logits(model, [p + c for p, c in zip(PROMPTS, continuation)])
  for row, prompt in enumerate(PROMPTS):
    expected = full[row]
    np.testing.assert_allclose(np.asarray(logits[row, :len(prompt)]), expected[:len(prompt)], **TOL)
    np.testing.assert_allclose(np.stack([d[row] for d in decoded]), expected[len(prompt):], **TOL)


def test_absorbed_attention_equals_naive_forms():
  """The three attention forms over one cache agree (random weights, a ragged mask)."""
  rng = np.random.default_rng(0)
  batch, new, slots, heads, rank, nope, rope, value = 2, 3, 7, 4, 16, 8, 4, 6
  q_nope = jnp.asarray(rng.normal(size=(batch, new, heads, nope)), jnp.float32)
  q_rope = jnp.asarray(rng.normal(size=(batch, new, heads, rope)), jnp.float32)
  latent = jnp.asarray(rng.normal(size=(batch, slots, rank)), jnp.float32)
  k_rope = jnp.asarray(rng.normal(size=(batch, slots, rope)), jnp.float32)
  kv_b_proj = jnp.asarray(rng.normal(size=(rank, heads, nope + value)) / 4, jnp.float32)
  positions = jnp.asarray([[2, 3, 4], [4, 5, 6]])
  mask = jnp.arange(slots)[None, None, :] <= positions[:, :, None]
  absorbed = mla_cache.absorbed_attention(q_nope, q_rope, latent, k_rope, kv_b_proj, mask, 0.3)
  expanded = mla_cache.expanded_attention(q_nope, q_rope, latent, k_rope, kv_b_proj, mask, 0.3)
  # The per-head cache, built by hand from the definition k^h = [c W_k^h | k_rope], v^h = c W_v^h.
  keys = np.concatenate([np.einsum('bsc,chn->bshn', latent, kv_b_proj[..., :nope]),
                         np.broadcast_to(np.asarray(k_rope)[:, :, None], (batch, slots, heads, rope))], -1)
  values = np.einsum('bsc,chv->bshv', latent, kv_b_proj[..., nope:])
  per_head = mla_cache.per_head_attention(jnp.concatenate([q_nope, q_rope], -1), jnp.asarray(keys),
                                          jnp.asarray(values), mask, 0.3)
  assert absorbed.shape == (batch, new, heads, value)
  np.testing.assert_allclose(np.asarray(absorbed), np.asarray(expanded), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(absorbed), np.asarray(per_head), rtol=1e-5, atol=1e-5)


def test_cache_memory_per_token():
  k2 = get_config('k2_full').attention
  assert mla_cache.cache_bytes_per_token(k2, jnp.bfloat16, 'latent') == (512 + 64) * 2
  assert mla_cache.cache_bytes_per_token(k2, jnp.bfloat16, 'per_head') == 64 * (192 + 128) * 2


def test_greedy_generate_matches_full_forward_with_budgets_and_stops(model):
  result = sample.generate(model, PROMPTS, STEPS, temperature=0.0, seed=0)
  references = reference_greedy(model, PROMPTS, STEPS)
  for got_tokens, got_logprobs, (tokens, logprobs) in zip(result.tokens, result.logprobs, references):
    assert got_tokens == tokens
    np.testing.assert_allclose(got_logprobs, logprobs, rtol=1e-5, atol=1e-5)
  assert result.finish_reasons == ['length'] * 3

  # Per-request budgets and a stop token (kept in the output) taken from row 1's third greedy token.
  stop, budgets = references[1][0][2], [2, 6, 4]
  limited = sample.generate(model, PROMPTS, budgets, temperature=0.0, stop_tokens=[stop], seed=0)
  for row, (tokens, _) in enumerate(references):
    expected = tokens[:budgets[row]]
    if stop in expected:
      expected = expected[:expected.index(stop) + 1]
    assert limited.tokens[row] == expected
    assert limited.finish_reasons[row] == ('stop' if expected[-1] == stop else 'length')
    assert len(limited.logprobs[row]) == len(expected)
  assert limited.finish_reasons[1] == 'stop' and len(limited.tokens[1]) == 3


def test_sampling_is_seeded(model):
  sampled = [sample.generate(model, PROMPTS, STEPS, temperature=1.5, top_p=0.9, seed=seed) for seed in (0, 0, 1)]
  assert sampled[0].tokens == sampled[1].tokens and sampled[0].logprobs == sampled[1].logprobs
  assert sampled[0].tokens != sampled[2].tokens


def test_choose_tokens_greedy_top_k_top_p():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]], jnp.float32))
  many = jnp.broadcast_to(logits, (20000, 4))
  key = jax.random.key(0)
  tokens, logprobs = sample.choose_tokens(many[:2], key, 1.0, greedy=True)
  assert tokens.tolist() == [0, 0]
  np.testing.assert_allclose(np.asarray(logprobs), np.log(0.5), rtol=1e-6)

  def frequencies(**kwargs):
    tokens, logprobs = sample.choose_tokens(many, key, kwargs.pop('temperature', 1.0), greedy=False, **kwargs)
    # Logprobs are the model's (temperature 1, untruncated), whatever the sampling rule.
    np.testing.assert_allclose(np.asarray(logprobs), np.asarray(logits[0])[np.asarray(tokens)], rtol=1e-6)
    return np.bincount(np.asarray(tokens), minlength=4) / len(tokens)

  np.testing.assert_allclose(frequencies(), [0.5, 0.3, 0.15, 0.05], atol=0.015)
  np.testing.assert_allclose(frequencies(top_k=2), [0.5 / 0.8, 0.3 / 0.8, 0, 0], atol=0.015)
  np.testing.assert_allclose(frequencies(top_p=0.75), [0.5 / 0.8, 0.3 / 0.8, 0, 0], atol=0.015)
  np.testing.assert_allclose(frequencies(top_p=0.85), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0], atol=0.015)
  np.testing.assert_allclose(frequencies(top_p=0.01), [1, 0, 0, 0])
  np.testing.assert_allclose(frequencies(top_k=1, temperature=3.0), [1, 0, 0, 0])
  tempered = np.array([0.5, 0.3, 0.15, 0.05]) ** 2
  np.testing.assert_allclose(frequencies(temperature=0.5), tempered / tempered.sum(), atol=0.015)


def test_generate_on_a_mesh_matches_one_device():
  assert jax.device_count() == 8
  prompts = PROMPTS + [[71, 72]]  # a batch of 4 splits over data x fsdp
  one_device = sample.generate(model_lib.create(CONFIG, seed=0), prompts, 4, temperature=0.0)
  mesh = sharding.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  sharded_model = model_lib.create(CONFIG, seed=0)
  sharding.shard_model(sharded_model, mesh)
  on_mesh = sample.generate(sharded_model, prompts, 4, temperature=0.0, mesh=mesh)
  assert on_mesh.tokens == one_device.tokens
  for got, want in zip(on_mesh.logprobs, one_device.logprobs):
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_stream_yields_what_generate_returns(model):
  streamed = list(sample.stream(model, PROMPTS[1], STEPS, temperature=0.0))
  batched = sample.generate(model, PROMPTS, STEPS, temperature=0.0)
  assert [t for t, _ in streamed] == batched.tokens[1]
  np.testing.assert_allclose([lp for _, lp in streamed], batched.logprobs[1], rtol=1e-5, atol=1e-5)


def test_bad_requests_are_one_line_errors(model):
  with pytest.raises(ValueError, match='prompt 1 is empty'):
    sample.generate(model, [[1], []], 3)
  with pytest.raises(ValueError, match='temperature must be >= 0'):
    sample.generate(model, [[1]], 3, temperature=-1.0)
  with pytest.raises(ValueError, match=r'token ids must lie in \[0, 512\)'):
    sample.generate(model, [[1, 600]], 3)
  with pytest.raises(ValueError, match='max_new_tokens must be >= 1'):
    sample.generate(model, [[1], [2]], [3, 0])
