"""Generation: cached decoding equals the full forward, absorbed MLA equals the naive form, sampling, mesh.

One forward: the sampler runs the model's own forward over a latent cache, so full-forward logits, prefill logits
and token-by-token decode logits must agree. Tolerances (float32 on CPU, default matmul precision 'highest' from
conftest): within 2e-5 absolute + 2e-5 relative (decoding changes only the summation order: absorbed attention
contracts q with W_k before the latent, softmax runs over padded key ranges).
"""

import contextlib
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from k2 import attention
from k2 import hf
from k2 import model as model_lib
from k2 import sample
from k2 import sharding
from k2.config import get_config

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


def one_forward_logits(model, prompts, continuation, mesh=None):
  """Logits of `prompts` + `continuation` three ways through the model's one forward: (full, prefill, decode).

  full: no cache; prefill: right-padded prompts into an empty cache; decode: then the continuation teacher-forced one
  token per step at each row's own positions. Lists per row of [T, V] float32 arrays.
  """
  width, steps = 16, len(continuation[0])
  lengths = np.array([len(p) for p in prompts], np.int32)
  tokens = np.zeros((len(prompts), width), np.int32)
  for row, prompt in enumerate(prompts):
    tokens[row, :len(prompt)] = prompt
  positions = np.broadcast_to(np.arange(width, dtype=np.int32), tokens.shape)
  graphdef, state = nnx.split(model)

  @functools.partial(jax.jit, static_argnames='decode')
  def run(state, tokens, positions, cache, decode):
    return sample.forward(nnx.merge(graphdef, state), tokens, positions, cache, decode=decode)

  context = sharding.use_mesh(mesh) if mesh is not None else contextlib.nullcontext()
  with context:
    cache = jax.jit(lambda state: nnx.merge(graphdef, state).init_cache(len(prompts), width + steps))(state)
    prefill, cache = run(state, tokens, positions, cache, decode=False)
    decoded = []
    for step in range(steps):
      step_tokens = np.array([[c[step]] for c in continuation], np.int32)
      step_logits, cache = run(state, step_tokens, (lengths + step)[:, None], cache, decode=True)
      decoded.append(np.asarray(step_logits[:, 0]))
    full = full_logits(model, [p + c for p, c in zip(prompts, continuation)])
  return (full, [np.asarray(prefill[row, :len(p)]) for row, p in enumerate(prompts)],
          [np.stack([d[row] for d in decoded]) for row in range(len(prompts))])


CONTINUATION = [[41, 42, 43, 44], [51, 52, 53, 54], [61, 62, 63, 64]]


def assert_one_forward_agrees(full, prefill, decoded, prompts, tol=TOL):
  for row, prompt in enumerate(prompts):
    np.testing.assert_allclose(prefill[row], full[row][:len(prompt)], **tol)
    np.testing.assert_allclose(decoded[row], full[row][len(prompt):], **tol)


def test_full_forward_equals_prefill_equals_decode(model):
  """Right-padded ragged prompts through prefill, then teacher-forced decode steps at per-row positions."""
  assert_one_forward_agrees(*one_forward_logits(model, PROMPTS, CONTINUATION), PROMPTS)


def test_full_forward_equals_prefill_equals_decode_on_a_mesh():
  """The same on a data x fsdp x tensor mesh (the embedding is gathered over fsdp, heads split over tensor)."""
  mesh = sharding.make_mesh({'data': 1, 'fsdp': 2, 'tensor': 2, 'expert': 2})
  model = model_lib.create(CONFIG, seed=0)
  sharding.shard_model(model, mesh)
  prompts, continuation = PROMPTS + [[71, 72]], CONTINUATION + [[81, 82, 83, 84]]
  assert_one_forward_agrees(*one_forward_logits(model, prompts, continuation, mesh), prompts)


def test_full_forward_equals_prefill_equals_decode_for_an_hf_checkpoint():
  """A transformers-written checkpoint (q LoRA, YaRN; golden files of tests/test_hf_parity.py) through the cache."""
  model = hf.load(os.path.join(os.path.dirname(__file__), 'golden', 'data', 'qlora_yarn'), dtype=jnp.float32)
  vocab = model.config.vocab_size
  prompts = [[t % vocab for t in p] for p in PROMPTS]
  continuation = [[t % vocab for t in c] for c in CONTINUATION]
  assert_one_forward_agrees(*one_forward_logits(model, prompts, continuation), prompts)


def test_absorbed_attention_equals_attention_over_expanded_keys():
  """The decode form over the latent cache equals plain attention over per-head keys/values built by definition
  (k^h = [c W_k^h | k_rope], v^h = c W_v^h) from the same cache, on a ragged mask."""
  rng = np.random.default_rng(0)
  batch, new, slots, heads, rank, nope, rope, value = 2, 3, 7, 4, 16, 8, 4, 6
  q_nope = rng.normal(size=(batch, new, heads, nope)).astype(np.float32)
  q_rope = rng.normal(size=(batch, new, heads, rope)).astype(np.float32)
  cache = rng.normal(size=(batch, slots, rank + rope)).astype(np.float32)
  kv_b_proj = (rng.normal(size=(rank, heads, nope + value)) / 4).astype(np.float32)
  positions = np.array([[2, 3, 4], [4, 5, 6]])
  w_k, w_v = kv_b_proj[..., :nope], kv_b_proj[..., nope:]
  q = np.concatenate([np.einsum('bthn,chn->bthc', q_nope, w_k), q_rope], -1)
  out_latent = attention.latent_attention(jnp.asarray(q), jnp.asarray(cache), jnp.asarray(positions), rank, 0.3,
                                          impl='reference')
  absorbed = np.einsum('bthc,chv->bthv', np.asarray(out_latent), w_v)
  keys = np.concatenate([np.einsum('bsc,chn->bshn', cache[..., :rank], w_k),
                         np.broadcast_to(cache[:, :, None, rank:], (batch, slots, heads, rope))], -1)
  values = np.einsum('bsc,chv->bshv', cache[..., :rank], w_v)
  logits = np.einsum('bthk,bshk->bhts', np.concatenate([q_nope, q_rope], -1), keys) * 0.3
  logits = np.where((np.arange(slots)[None, None, :] <= positions[:, :, None])[:, None], logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  expected = np.einsum('bhts,bshv->bthv', probs, values)
  np.testing.assert_allclose(absorbed, expected, rtol=1e-5, atol=1e-5)


def test_latent_cache_is_c_plus_r_per_token(model):
  cache = model.init_cache(2, 5)
  att = CONFIG.attention
  assert len(cache) == CONFIG.num_layers
  assert cache[0].shape == (2, 5, att.kv_lora_rank + att.qk_rope_head_dim)


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
