"""Rollout engine: continuous batching over a fixed number of decode slots.

    from k2.sample import engine
    result = engine.rollout(model, prompts, max_new_tokens=[...], num_slots=64, temperature=1.0,
                            stop_tokens=[163586], seed=0)
    result.tokens[i], result.logprobs[i], result.finish_reasons[i]   # one list per prompt, in prompt order

`generate` decodes a static batch: every row waits for the longest one, so a batch of rollouts with a few long
answers spends most of its steps on finished rows. Here a batch of `num_slots` sequences decodes together, and
as soon as one finishes (its stop token, or its own budget) its slot is refilled with the next waiting prompt,
prefilled through the model's forward, while the other slots keep their caches and go on decoding. Prompts wait
largest budget first when they outnumber the slots (`admission_order`), so a long answer does not start last.

Device state per slot: the last token, its position (= its cache slot), the remaining budget, its stop tokens,
a done flag, and its row of the per-layer latent caches [num_slots, S, C + R]. Prefill writes a new prompt's
latents into slots 0..P-1 of its row; the slots past them may still hold the previous sequence's latents, which
no query reads (a query at position p reads slots 0..p, all written by its own sequence: the decode kernel is
length-aware). Decoding runs `steps_per_sync` steps per jitted call (a while loop that also stops when every
slot is done), so the host syncs once per chunk, not once per token. Prompts are padded to power-of-two widths
(multiples of 256 past 256) and admitted in groups of `num_slots` (the first fill, split into power-of-two groups
past `max_prefill_tokens`) or `admit_group` rows, so a run compiles a handful of programs whatever its prompt lengths.

Randomness: decode step g (counted over the whole run, from 1) draws with fold_in(key, g), and the first fill's
prefill with the key itself, exactly as `generate` does; so with `num_slots == len(prompts)` (one static batch) and
a power-of-two number of prompts the engine returns `generate`'s tokens and log-probs for the same seed. (Fewer
prompts than `num_slots` get their number of slots rounded up to a power of two, the spare ones idle, so that a
caller whose prompt count shrinks turn by turn compiles a handful of programs.) Later admissions draw from keys of
their own. Greedy decoding gives the full-forward argmax in any composition.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from k2 import sharding
from k2.model import Transformer
from k2.sample.generate import DecodeOptions, GenerateResult, _options, decode_step, prefill

MIN_PROMPT_WIDTH = 16   # prompt widths are powers of two from this up to WIDTH_STEP (few compiled prefills),
WIDTH_STEP = 256        # then multiples of this (a 1100-token prompt is prefilled at 1280, not 2048)
_NUM_STOP_SLOTS = 8    # per-slot stop tokens, padded with -1 (as generate)
_ADMISSION_KEY = 0x5EED  # later admissions' prefill keys: fold_in(fold_in(key, this), admission index)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SlotState:
  """Decode state of every slot. token, position, remaining [N] int32; stops [N, K] int32; done [N] bool (finished
  or empty); cache: per layer [N, S, C + R]."""
  token: jax.Array
  position: jax.Array
  remaining: jax.Array
  stops: jax.Array
  done: jax.Array
  cache: list


@dataclasses.dataclass(frozen=True)
class RolloutResult(GenerateResult):
  """GenerateResult plus what the run cost: decode steps, host syncs (one per chunk), prefill calls."""
  decode_steps: int = 0
  syncs: int = 0
  prefills: int = 0


def _is_stop(tokens, stops):
  return jnp.any(tokens[:, None] == stops, axis=-1)


def _admit(graphdef, params, state: SlotState, tokens, lengths, slot_ids, budgets, stops, key, temperature, *,
           options: DecodeOptions):
  """Prefill prompts [k, P] (right-padded, lengths [k]) and move them into slots slot_ids [k] (an id of N or more
  is a padding row, dropped). Returns (state, first tokens [k], their logprobs [k])."""
  model = nnx.merge(graphdef, params)
  token, logprob, prompt_cache = prefill(model, tokens, lengths, key, temperature, slots=tokens.shape[1],
                                         options=options)
  width = tokens.shape[1]
  cache = [layer.at[slot_ids, :width].set(new, mode='drop') for layer, new in zip(state.cache, prompt_cache)]
  set_rows = lambda x, new: x.at[slot_ids].set(new, mode='drop')
  state = SlotState(token=set_rows(state.token, token), position=set_rows(state.position, lengths),
                    remaining=set_rows(state.remaining, budgets - 1), stops=set_rows(state.stops, stops),
                    done=set_rows(state.done, _is_stop(token, stops) | (budgets <= 1)), cache=cache)
  return state, token, logprob


def _decode_chunk(graphdef, params, state: SlotState, key, temperature, first_step, *, steps: int,
                  options: DecodeOptions):
  """Up to `steps` decode steps of every slot (fewer if all are done). Returns (state, tokens [N, steps] (-1 where
  a slot was not active), logprobs [N, steps], steps taken)."""
  model = nnx.merge(graphdef, params)
  num_slots = state.token.shape[0]

  def not_finished(carry):
    i, state, *_ = carry
    return (i < steps) & ~jnp.all(state.done)

  def step(carry):
    i, state, out_tokens, out_logprobs = carry
    token, logprob, cache = decode_step(model, state.token, state.position, state.cache,
                                        jax.random.fold_in(key, first_step + i), temperature, options=options)
    active = ~state.done
    out_tokens = out_tokens.at[:, i].set(jnp.where(active, token, -1))
    out_logprobs = out_logprobs.at[:, i].set(jnp.where(active, logprob, 0.0))
    remaining = state.remaining - active
    finished = active & (_is_stop(token, state.stops) | (remaining <= 0))
    # A finished slot parks at position 0 until it is refilled: its idle steps then read one cache slot.
    position = jnp.where(finished, 0, state.position + active)
    state = SlotState(token=jnp.where(active, token, state.token), position=position, remaining=remaining,
                      stops=state.stops, done=state.done | finished, cache=cache)
    return i + 1, state, out_tokens, out_logprobs

  carry = (jnp.int32(0), state, jnp.full((num_slots, steps), -1, jnp.int32),
           jnp.zeros((num_slots, steps), jnp.float32))
  taken, state, out_tokens, out_logprobs = jax.lax.while_loop(not_finished, step, carry)
  return state, out_tokens, out_logprobs, taken


_admit_jit = jax.jit(_admit, static_argnames=('graphdef', 'options'), donate_argnames=('state',))
_decode_chunk_jit = jax.jit(_decode_chunk, static_argnames=('graphdef', 'steps', 'options'),
                            donate_argnames=('state',))


def admission_order(budgets: np.ndarray, num_slots: int) -> list[int]:
  """The order prompts wait in: all of them fit the first fill (given order), or the largest budget first (ties in
  the given order). A long-budget prompt admitted last decodes alone while the other slots idle, so the run takes
  about its budget after everything else; admitted first, it decodes beside the others and the run takes about
  max(largest budget, total tokens / slots) steps (longest-processing-time-first scheduling). Outputs are returned
  in prompt order either way."""
  if len(budgets) <= num_slots:
    return list(range(len(budgets)))
  return sorted(range(len(budgets)), key=lambda i: -int(budgets[i]))


def _width(length: int) -> int:
  if length > WIDTH_STEP:
    return -(-length // WIDTH_STEP) * WIDTH_STEP
  return max(MIN_PROMPT_WIDTH, 1 << (length - 1).bit_length())


def _stop_rows(stop_tokens, num_prompts: int) -> np.ndarray:
  """Shared stop tokens (a list of ints) or one list per prompt -> [num_prompts, K] int32 padded with -1."""
  per_prompt = (stop_tokens and not isinstance(stop_tokens[0], (int, np.integer)))
  rows = [list(s) for s in stop_tokens] if per_prompt else [list(stop_tokens)] * num_prompts
  if len(rows) != num_prompts:
    raise ValueError(f'stop_tokens has {len(rows)} lists for {num_prompts} prompts')
  stops = np.full((num_prompts, max([_NUM_STOP_SLOTS] + [len(r) for r in rows])), -1, np.int32)
  for i, row in enumerate(rows):
    stops[i, :len(row)] = row
  return stops


def rollout(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int], *,
            num_slots: int = 64, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
            stop_tokens: Sequence[int] | Sequence[Sequence[int]] = (), seed: int = 0, steps_per_sync: int = 16,
            admit_group: int = 8, max_prefill_tokens: int = 32768, mesh: Mesh | None = None) -> RolloutResult:
  """Generates a continuation of every prompt with continuous batching (see the module docstring).

  prompts: token-id lists of any lengths. max_new_tokens: one budget for all, or one per prompt. stop_tokens: one
  list for all prompts, or one list per prompt (a row stops after emitting one; it is kept in the output).
  num_slots: sequences decoded together. steps_per_sync: decode steps per device call (host syncs once per call).
  admit_group: prompts prefilled together when refilling slots (padded with dummy rows).
  max_prefill_tokens: the first fill is prefilled in power-of-two groups (of at least admit_group) of at most this
  many padded tokens (256 slots of 1,152-token prompts at once overflow the GPU grouped matmul's int32 offsets).
  Returns a RolloutResult (tokens, logprobs, finish_reasons per prompt, in prompt order).
  """
  options = _options(temperature, top_k, top_p)
  if not prompts:
    raise ValueError('rollout needs at least one prompt')
  lengths = np.array([len(p) for p in prompts], np.int32)
  if lengths.min() == 0:
    raise ValueError(f'prompt {int(np.argmin(lengths))} is empty; every prompt needs at least one token')
  if min(min(p) for p in prompts) < 0 or max(max(p) for p in prompts) >= model.config.vocab_size:
    raise ValueError(f'prompt token ids must lie in [0, {model.config.vocab_size})')
  budgets = np.broadcast_to(np.asarray(max_new_tokens, np.int32), lengths.shape).copy()
  if budgets.min() < 1:
    raise ValueError(f'max_new_tokens must be >= 1 for every prompt, got {budgets.tolist()}')
  stops = _stop_rows(stop_tokens, len(prompts))
  # Fewer prompts than slots: the slot count is their number rounded up to a power of two (the spare slots stay
  # empty), so that a caller whose live prompts shrink turn by turn (multi-turn episodes) reuses a few programs.
  num_slots = min(num_slots, 1 << (len(prompts) - 1).bit_length())
  admit_group = min(admit_group, num_slots)
  # Cache slots per sequence: the longest prompt's padded width and the longest prompt + budget, to a power of two
  # (from 64), so that multi-turn callers (an episode's context grows every turn) reuse a few compiled programs; the
  # decode kernel reads only filled slots, so the spare ones cost memory, not time.
  slots_per_row = max(64, 1 << (max(_width(int(lengths.max())), int((lengths + budgets).max())) - 1).bit_length())

  graphdef, params = nnx.split(model)
  key, temp = jax.random.key(seed), np.float32(temperature or 1.0)
  context = sharding.use_mesh(mesh) if mesh is not None else contextlib.nullcontext()
  with context:
    state = SlotState(
        token=jnp.zeros((num_slots,), jnp.int32), position=jnp.zeros((num_slots,), jnp.int32),
        remaining=jnp.zeros((num_slots,), jnp.int32), stops=jnp.full((num_slots, stops.shape[1]), -1, jnp.int32),
        done=jnp.ones((num_slots,), bool), cache=model.init_cache(num_slots, slots_per_row))
    waiting = collections.deque(admission_order(budgets, num_slots))
    owner = [-1] * num_slots  # prompt index decoding in each slot
    out_tokens = [[] for _ in prompts]
    out_logprobs = [[] for _ in prompts]
    step, syncs, prefills, admissions = 1, 0, 0, 0
    while waiting or any(o >= 0 for o in owner):
      admitted = []  # (slot ids, prompt ids, first tokens, logprobs) still on the device
      free = [s for s, o in enumerate(owner) if o < 0]
      fill = len(free) == num_slots  # every slot free (the first fill): large groups, else refills of admit_group
      while free and waiting:
        group = admit_group
        if fill:  # all slots at once, or a power of two of them (>= admit_group) under max_prefill_tokens
          fits = max_prefill_tokens // _width(int(lengths[list(itertools.islice(waiting, num_slots))].max()))
          group = num_slots if fits >= num_slots else max(admit_group, 1 << max(0, fits.bit_length() - 1))
        take = [waiting.popleft() for _ in range(min(group, len(free), len(waiting)))]
        slot_ids, free = free[:len(take)], free[len(take):]
        rows = np.array(take + [take[0]] * (group - len(take)))  # padding rows repeat a prompt, then drop
        width = _width(int(lengths[rows].max()))
        tokens = np.zeros((group, width), np.int32)
        for r, p in enumerate(rows):
          tokens[r, :lengths[p]] = prompts[p]
        admit_key = key if admissions == 0 else jax.random.fold_in(jax.random.fold_in(key, _ADMISSION_KEY),
                                                                      admissions)
        state, first, first_logprob = _admit_jit(
            graphdef, params, state, tokens, lengths[rows], np.array(slot_ids + [num_slots] * (group - len(take)),
                                                                     np.int32),
            budgets[rows], stops[rows], admit_key, temp, options=options)
        admitted.append((slot_ids, take, first, first_logprob))
        for s, p in zip(slot_ids, take):
          owner[s] = p
        admissions += 1
        prefills += 1
      state, chunk_tokens, chunk_logprobs, taken = _decode_chunk_jit(
          graphdef, params, state, key, temp, np.int32(step), steps=steps_per_sync, options=options)
      chunk_tokens, chunk_logprobs, taken, done, admitted = jax.device_get(
          (chunk_tokens, chunk_logprobs, taken, state.done, admitted))
      syncs += 1
      step += int(taken)
      for slot_ids, take, first, first_logprob in admitted:
        for r, (s, p) in enumerate(zip(slot_ids, take)):
          out_tokens[p].append(int(first[r]))
          out_logprobs[p].append(float(first_logprob[r]))
      for s, p in enumerate(owner):
        if p < 0:
          continue
        valid = chunk_tokens[s] >= 0
        out_tokens[p].extend(chunk_tokens[s][valid].tolist())
        out_logprobs[p].extend(chunk_logprobs[s][valid].tolist())
        if done[s]:
          owner[s] = -1
  reasons = ['stop' if row and row[-1] in set(stops[p].tolist()) - {-1} else 'length'
             for p, row in enumerate(out_tokens)]
  return RolloutResult(tokens=out_tokens, logprobs=out_logprobs, finish_reasons=reasons, decode_steps=step - 1,
                       syncs=syncs, prefills=prefills)
