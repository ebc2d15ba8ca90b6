"""Reinforcement learning with K2's policy-optimization objective (from Kimi k1.5; K2 report 3.2).

`loss`: the k1.5 loss (`k15_loss`), its form for the shared training core (`k15_loss_fn`: (loss_sum, count, aux)),
per-token log-probs from the training forward (`token_logprobs`, or a chunk of positions at a time by
`chunked_token_logprobs`) and the KL estimate (`kl_estimate`).
"""

from k2.rl.loss import (AUX_REDUCTIONS, chunked_token_logprobs, k15_loss, k15_loss_fn, kl_estimate,
                        sequence_log_ratio, token_logprobs)

__all__ = ['AUX_REDUCTIONS', 'chunked_token_logprobs', 'k15_loss', 'k15_loss_fn', 'kl_estimate', 'sequence_log_ratio',
           'token_logprobs']
