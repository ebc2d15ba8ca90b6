"""Picking the next token from logits: greedy, or temperature sampling restricted by top-k and top-p.

The log-probability returned with each token is that of the *model* distribution, log_softmax(logits) at
temperature 1 with no top-k/top-p truncation: the quantity log pi(y | x) that the RL objective (K2_REFERENCE.md
section 4) compares between policies. Tokens are drawn from the tempered, truncated distribution.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def choose_tokens(logits: jax.Array, key: jax.Array, temperature: jax.Array | float, *, greedy: bool,
                  top_k: int = 0, top_p: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """logits [B, V] float32 -> (tokens [B] int32, logprobs [B] float32).

  greedy: argmax (temperature is ignored). Otherwise sample softmax(logits / temperature) restricted to the
  top_k most likely tokens (0: no limit) and then to the smallest set whose probability reaches top_p (1.0: no
  limit; the most likely token is always kept). top_k and top_p are static; temperature may be traced.
  """
  logits = logits.astype(jnp.float32)
  model_logprobs = jax.nn.log_softmax(logits, axis=-1)
  if greedy:
    tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  else:
    scaled = logits / jnp.asarray(temperature, jnp.float32)
    vocab = logits.shape[-1]
    if top_k or top_p < 1.0:
      # Candidates in descending order: the k best, or the whole vocabulary sorted when only top_p is set.
      candidates, candidate_ids = jax.lax.top_k(scaled, min(top_k, vocab) if top_k else vocab)
      if top_p < 1.0:
        probs = jax.nn.softmax(candidates, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability of the better candidates
        candidates = jnp.where(mass_before < top_p, candidates, -jnp.inf)
      picked = jax.random.categorical(key, candidates, axis=-1)
      tokens = jnp.take_along_axis(candidate_ids, picked[:, None], axis=-1)[:, 0].astype(jnp.int32)
    else:
      tokens = jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)
  logprobs = jnp.take_along_axis(model_logprobs, tokens[:, None], axis=-1)[:, 0]
  return tokens, logprobs
