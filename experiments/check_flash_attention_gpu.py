"""GPU correctness check of the flash-attention kernels: Hopper (Mosaic GPU) and Triton against the float32 reference.

    python -m experiments.check_flash_attention_gpu --check_out=check_flash_attention.txt

The Hopper kernels cannot run on a CPU (tests/test_flash_attention_hopper.py only lowers them), so this script is
their test on an H100/H200: outputs, max logits and q/k/v gradients (bf16 inputs) against
`flash_attention_reference` in float32, over the cases the kernels treat specially: MLA and plain head dims, GQA,
packed documents (few and many per row), lengths padded to the tiles, more keys than queries, more queries than
keys (rows that see no key), non-causal. A case passes when every relative error is below 1e-2, the max logits are
within 1e-4 of the reference (with -inf in the same heads) and nothing is NaN. One line per case and kernel; exits
non-zero if any case fails.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
from absl import app, flags

from experiments.bench_attention import forward_and_backward, inputs, relative_error
from pallas_kernels.flash_attention import flash_attention, flash_attention_reference

_OUT = flags.DEFINE_string('check_out', 'check_flash_attention.txt', 'File the results are written to.')

# (batch, q_len, kv_len, heads, kv_heads, qk_dim, v_dim, causal, documents per row or 0 for no segment ids)
CASES = [
    (2, 1024, 1024, 4, 4, 192, 128, True, 0),
    (2, 1024, 1024, 4, 2, 192, 128, True, 3),
    (2, 1000, 1000, 4, 4, 128, 128, True, 3),  # padded to 1024
    (1, 512, 512, 2, 2, 128, 128, False, 0),
    (1, 384, 384, 4, 1, 64, 64, True, 0),
    (1, 256, 512, 2, 2, 192, 128, True, 0),  # more keys than queries
    (1, 512, 256, 2, 2, 192, 128, True, 0),  # the first 256 queries see no key
    (1, 384, 640, 2, 1, 128, 128, False, 0),
    (2, 2048, 2048, 2, 2, 192, 128, True, 40),
    (1, 4096, 4096, 1, 1, 128, 128, True, 400),
]


def check(batch, q_len, kv_len, heads, kv_heads, qk_dim, v_dim, causal, docs) -> dict:
  q, _, _, d_out = inputs(batch, q_len, heads, qk_dim, v_dim, kv_heads=kv_heads, seed=1)
  _, k, v, _ = inputs(batch, kv_len, heads, qk_dim, v_dim, kv_heads=kv_heads, seed=2)
  segment_ids = None
  if docs:
    starts = jax.random.bernoulli(jax.random.key(3), docs / q_len, (batch, q_len))
    segment_ids = jnp.cumsum(starts, axis=1).astype(jnp.int32)
  upcast = lambda *xs: [x.astype(jnp.float32) for x in xs]
  reference = forward_and_backward(
      lambda q, k, v: flash_attention_reference(q, k, v, causal=causal, segment_ids=segment_ids))
  with jax.default_matmul_precision('float32'):
    (ref_out, ref_max), ref_grads = reference(*upcast(q, k, v, d_out))
  results = {}
  for implementation in ('hopper', 'triton'):
    ours = forward_and_backward(lambda q, k, v, i=implementation: flash_attention(
        q, k, v, causal=causal, segment_ids=segment_ids, implementation=i))
    try:
      (out, max_logits), grads = ours(q, k, v, d_out)
    except Exception as error:  # noqa: BLE001  (a kernel that fails to build is a failed case)
      results[implementation] = {'error': str(error).splitlines()[0][:300], 'pass': False}
      continue
    finite = jnp.isfinite(ref_max)
    errors = {'out': relative_error(out, ref_out),
              'max_logits': float(jnp.max(jnp.where(finite, jnp.abs(max_logits - ref_max), 0.0))),
              'dq': relative_error(grads[0], ref_grads[0]), 'dk': relative_error(grads[1], ref_grads[1]),
              'dv': relative_error(grads[2], ref_grads[2])}
    same_empty_heads = bool(jnp.all(jnp.isfinite(max_logits) == finite))
    no_nan = not any(bool(jnp.any(jnp.isnan(x))) for x in (out, *grads))
    ok = (max(errors[n] for n in ('out', 'dq', 'dk', 'dv')) < 1e-2 and errors['max_logits'] < 1e-4
          and same_empty_heads and no_nan)
    results[implementation] = {**{n: float(f'{e:.2e}') for n, e in errors.items()}, 'no_nan': no_nan,
                               'same_empty_heads': same_empty_heads, 'pass': ok}
  return results


def main(argv):
  del argv
  lines = [f'{jax.devices()[0].device_kind}, jax {jax.__version__}']
  all_pass = True
  for case in CASES:
    results = check(*case)
    all_pass &= all(r['pass'] for r in results.values())
    names = 'B, T, S, H, G, qk, v, causal, docs'
    lines.append(f'({names}) = {case}: {json.dumps(results)}')
    print(lines[-1], flush=True)
    with open(_OUT.value, 'w') as f:
      f.write('\n'.join(lines) + '\n')
  lines.append('ALL PASS' if all_pass else 'SOME CASES FAILED')
  with open(_OUT.value, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  print(lines[-1])
  sys.exit(0 if all_pass else 1)


if __name__ == '__main__':
  app.run(main)
