"""Inference for K2 models: batched generation over an MLA latent KV cache.

    from k2 import sample
    result = sample.generate(model, prompts, max_new_tokens, temperature=0.0, seed=0)
    result.tokens, result.logprobs, result.finish_reasons

`generate` (batched, one jitted program), `stream` (one prompt, token by token), and the pieces they are made
of: `prefill` / `decode_step` (one jittable step each), `forward` (the model over a cache),
`choose_tokens` (greedy, temperature, top-k, top-p). The model itself keeps the cache (`Transformer.init_cache`,
`Transformer.features(..., cache=...)`). For many prompts (RL rollouts), `engine.rollout` decodes them with
continuous batching over a fixed number of slots (same outputs as `generate` where the batch composition allows).
"""

from k2.sample.generate import (DecodeOptions, GenerateResult, decode_step, forward, generate, prefill, stream)
from k2.sample.sampling import choose_tokens
from k2.sample import engine  # noqa: E402  (after generate, which it builds on)

__all__ = ['DecodeOptions', 'GenerateResult', 'choose_tokens', 'decode_step', 'engine', 'forward', 'generate',
           'prefill', 'stream']
