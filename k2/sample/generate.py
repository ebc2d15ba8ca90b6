"""Batched autoregressive generation for a K2 model: a jitted prefill, then a jitted decode loop over an MLA cache.

    from k2 import sample
    result = sample.generate(model, [[5, 6, 7], [8, 9]], max_new_tokens=32, temperature=0.6, top_p=0.95,
                             stop_tokens=[163586], seed=0)
    result.tokens[i], result.logprobs[i], result.finish_reasons[i]   # one list per prompt

Ragged prompts are RIGHT-padded to a common width P (rounded up to a multiple of 16, so batches of similar
lengths share compiled code). A token's position is also its cache slot: prompt b fills slots 0..len_b-1, its
padding writes slots len_b..P-1 that no query sees (a query at position p attends to slots <= p), and its i-th
generated token overwrites slot len_b + i. So every row keeps its natural positions, and one decode step serves
rows at different lengths. The first new token comes from the prefill logits at slot len_b - 1.

Prefill and decode are the model's own forward (`Transformer.features` with a cache, k2.model): prefill runs the
training attention over the prompt (the flash kernel on GPU/TPU) and stores each token's MLA latent; decode attends to
the latent cache in the weight-absorbed form. Rollouts and training therefore compute log-probs with the same code.

Each row stops after emitting one of `stop_tokens` (kept in its output: RL trains on it) or after its own
`max_new_tokens` budget; `finish_reasons` says which ('stop' or 'length', the truncation that K2's budget control
penalizes). Logprobs are those of the model distribution (see k2.sample.sampling).

On a mesh: place the model with `k2.sharding.shard_model(model, mesh)` and pass the same `mesh`; activations and
the cache are split over the batch by the logical rules ('batch', 'act_heads').
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from k2 import sharding
from k2.model import Transformer
from k2.sample.sampling import choose_tokens

PROMPT_BUCKET = 16  # prompt widths round up to a multiple of this, so similar batches reuse compiled code
_NUM_STOP_SLOTS = 8  # stop tokens travel as a fixed-size array (padded with -1), so changing them never recompiles


@dataclasses.dataclass(frozen=True)
class GenerateResult:
  """Per prompt: generated token ids, the model's log-probability of each, and 'stop' or 'length'."""
  tokens: list[list[int]]
  logprobs: list[list[float]]
  finish_reasons: list[str]


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
  """Static choices (each distinct value compiles once)."""
  greedy: bool = True
  top_k: int = 0
  top_p: float = 1.0


def forward(model: Transformer, tokens: jax.Array, positions: jax.Array, cache: list, *, decode: bool,
            logit_index: jax.Array | None = None):
  """The model over a cache: tokens, positions [B, T] (positions are cache slots) -> (logits, updated cache).

  decode=False is a prefill (the cache is empty; the new tokens attend to each other), decode=True attends to the
  cache. logit_index [B]: take logits only at that time index of each row ([B, V]); else all ([B, T, V]), float32.
  """
  x, aux = model.features(tokens, positions, cache=cache, decode=decode)
  if logit_index is not None:
    x = jnp.take_along_axis(x, logit_index[:, None, None].astype(jnp.int32), axis=1)
  logits = model.logits(x)
  return (logits[:, 0] if logit_index is not None else logits), aux['cache']


def prefill(model, tokens, lengths, key, temperature, *, slots: int, options: DecodeOptions):
  """Prompts [B, P] right-padded, lengths [B] -> (first token [B], its logprob [B], a cache of `slots` tokens)."""
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
  logits, cache = forward(model, tokens, positions, model.init_cache(tokens.shape[0], slots), decode=False,
                          logit_index=lengths - 1)
  token, logprob = choose_tokens(logits, jax.random.fold_in(key, 0), temperature, greedy=options.greedy,
                                 top_k=options.top_k, top_p=options.top_p)
  return token, logprob, cache


def decode_step(model, token, positions, cache, key, temperature, *, options: DecodeOptions):
  """One step: token [B] at positions [B] -> (next token [B], its logprob [B], cache)."""
  logits, cache = forward(model, token[:, None], positions[:, None], cache, decode=True)
  next_token, logprob = choose_tokens(logits[:, 0], key, temperature, greedy=options.greedy, top_k=options.top_k,
                                      top_p=options.top_p)
  return next_token, logprob, cache


def _generate(graphdef, state, tokens, lengths, budgets, stop_tokens, key, temperature, *, max_new: int,
              options: DecodeOptions):
  """Prefill and the whole decode loop in one program. Returns tokens [B, max_new], logprobs, counts [B]."""
  model = nnx.merge(graphdef, state)
  batch, width = tokens.shape
  token, logprob, cache = prefill(model, tokens, lengths, key, temperature, slots=width + max_new,
                                   options=options)
  is_stop = lambda t: jnp.any(t[:, None] == stop_tokens[None, :], axis=-1)
  out_tokens = jnp.zeros((batch, max_new), jnp.int32).at[:, 0].set(token)
  out_logprobs = jnp.zeros((batch, max_new), jnp.float32).at[:, 0].set(logprob)
  done = is_stop(token) | (budgets <= 1)
  counts = jnp.ones((batch,), jnp.int32)

  def not_finished(carry):
    step, _, done, *_ = carry
    return (step < max_new) & ~jnp.all(done)

  def step_fn(carry):
    step, token, done, counts, out_tokens, out_logprobs, cache = carry
    token, logprob, cache = decode_step(model, token, lengths + step - 1, cache, jax.random.fold_in(key, step),
                                    temperature, options=options)
    active = ~done
    out_tokens = out_tokens.at[:, step].set(token)
    out_logprobs = out_logprobs.at[:, step].set(logprob)
    counts = counts + active.astype(jnp.int32)
    done = done | is_stop(token) | (step + 1 >= budgets)
    return step + 1, token, done, counts, out_tokens, out_logprobs, cache

  carry = (jnp.int32(1), token, done, counts, out_tokens, out_logprobs, cache)
  _, _, _, counts, out_tokens, out_logprobs, _ = jax.lax.while_loop(not_finished, step_fn, carry)
  return out_tokens, out_logprobs, counts


_generate_jit = jax.jit(_generate, static_argnames=('graphdef', 'max_new', 'options'))


def _prefill_state(graphdef, state, tokens, lengths, key, temperature, *, slots, options):
  return prefill(nnx.merge(graphdef, state), tokens, lengths, key, temperature, slots=slots, options=options)


def _decode_state(graphdef, state, token, positions, cache, key, temperature, *, options):
  return decode_step(nnx.merge(graphdef, state), token, positions, cache, key, temperature, options=options)


_prefill_jit = jax.jit(_prefill_state, static_argnames=('graphdef', 'slots', 'options'))
_decode_jit = jax.jit(_decode_state, static_argnames=('graphdef', 'options'), donate_argnames=('cache',))


def _options(temperature, top_k, top_p) -> DecodeOptions:
  if temperature < 0:
    raise ValueError(f'temperature must be >= 0 (0 is greedy), got {temperature}')
  if top_k < 0:
    raise ValueError(f'top_k must be >= 0 (0 is no limit), got {top_k}')
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f'top_p must lie in (0, 1], got {top_p}')
  return DecodeOptions(greedy=temperature == 0, top_k=int(top_k), top_p=float(top_p))


def _stop_array(stop_tokens: Sequence[int]) -> np.ndarray:
  stops = np.full(max(_NUM_STOP_SLOTS, len(stop_tokens)), -1, np.int32)
  stops[:len(stop_tokens)] = list(stop_tokens)
  return stops


def _pad_prompts(prompts: Sequence[Sequence[int]], vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
  if not prompts:
    raise ValueError('generate needs at least one prompt')
  lengths = np.array([len(p) for p in prompts], np.int32)
  if lengths.min() == 0:
    raise ValueError(f'prompt {int(np.argmin(lengths))} is empty; every prompt needs at least one token')
  width = -(-int(lengths.max()) // PROMPT_BUCKET) * PROMPT_BUCKET
  tokens = np.zeros((len(prompts), width), np.int32)
  for row, prompt in enumerate(prompts):
    tokens[row, :len(prompt)] = prompt
  if tokens.min() < 0 or tokens.max() >= vocab_size:
    raise ValueError(f'prompt token ids must lie in [0, {vocab_size}); got {tokens.min()}..{tokens.max()}')
  return tokens, lengths


def generate(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int], *,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, stop_tokens: Sequence[int] = (),
             seed: int = 0, mesh: Mesh | None = None) -> GenerateResult:
  """Generates a continuation of every prompt in one batch (see the module docstring).

  prompts: token-id lists of any lengths. max_new_tokens: one budget for all, or one per prompt.
  temperature 0 is greedy; top_k 0 and top_p 1.0 are no limit. Returns a GenerateResult.
  """
  options = _options(temperature, top_k, top_p)
  tokens, lengths = _pad_prompts(prompts, model.config.vocab_size)
  budgets = np.broadcast_to(np.asarray(max_new_tokens, np.int32), lengths.shape).copy()
  if budgets.min() < 1:
    raise ValueError(f'max_new_tokens must be >= 1 for every prompt, got {budgets.tolist()}')
  graphdef, state = nnx.split(model)
  args = (tokens, lengths, budgets, _stop_array(stop_tokens), jax.random.key(seed), np.float32(temperature or 1.0))
  if mesh is None:
    out = _generate_jit(graphdef, state, *args, max_new=int(budgets.max()), options=options)
  else:
    with sharding.use_mesh(mesh):
      out = _generate_jit(graphdef, state, *args, max_new=int(budgets.max()), options=options)
  out_tokens, out_logprobs, counts = jax.device_get(out)
  stops = set(int(t) for t in stop_tokens)
  result_tokens = [out_tokens[b, :counts[b]].tolist() for b in range(len(prompts))]
  return GenerateResult(
      tokens=result_tokens,
      logprobs=[out_logprobs[b, :counts[b]].tolist() for b in range(len(prompts))],
      finish_reasons=['stop' if row and row[-1] in stops else 'length' for row in result_tokens])


def stream(model: Transformer, prompt: Sequence[int], max_new_tokens: int, *, temperature: float = 0.0,
           top_k: int = 0, top_p: float = 1.0, stop_tokens: Sequence[int] = (),
           seed: int = 0) -> Iterator[tuple[int, float]]:
  """Yields (token, logprob) for one prompt as each is decoded (for interactive use; `generate` for batches).

  The same prefill and decode step as `generate`, driven from Python one token at a time; the stop token, if
  any, is the last one yielded.
  """
  options = _options(temperature, top_k, top_p)
  if max_new_tokens < 1:
    return
  tokens, lengths = _pad_prompts([prompt], model.config.vocab_size)
  graphdef, state = nnx.split(model)
  key, temp = jax.random.key(seed), np.float32(temperature or 1.0)
  stops = set(int(t) for t in stop_tokens)
  token, logprob, cache = _prefill_jit(graphdef, state, tokens, lengths, key, temp,
                                       slots=tokens.shape[1] + max_new_tokens, options=options)
  for step in range(1, max_new_tokens + 1):
    value = int(token[0])
    yield value, float(logprob[0])
    if value in stops or step == max_new_tokens:
      return
    token, logprob, cache = _decode_jit(graphdef, state, token, lengths + step - 1, cache,
                                        jax.random.fold_in(key, step), temp, options=options)
