"""Parameter counts from abstract shapes (nothing is allocated).

    python -m k2.params --model k2_full

Activated per token = every parameter except routed experts, plus the num_experts_per_token routed experts a
token actually uses in each MoE layer (the embedding and output head are counted, as DeepSeek-V3 and K2 count).
"""

from __future__ import annotations

import math
import sys

import jax
from absl import app, flags
from flax import nnx

from k2 import model as model_lib
from k2.config import ConfigError, ModelConfig, get_config

# k2.plan defines the same --model flag; whichever module is imported first owns it.
if 'model' not in flags.FLAGS:
  flags.DEFINE_string('model', 'k2_full', 'Model variant (k2_full, k2_small, k2_tiny).')

_ROUTED = ('gate_proj', 'up_proj', 'down_proj')


def count(config: ModelConfig) -> dict[str, int]:
  """{'total', 'activated', 'routed_experts', 'embedding'} parameter counts for `config`."""
  params = nnx.state(model_lib.abstract(config), nnx.Param)
  total = routed = embedding = 0
  for path, variable in nnx.to_flat_state(params):
    size = math.prod(variable.shape)
    total += size
    if path[-2:-1] == ('ffn',) and path[-1] in _ROUTED and len(variable.shape) == 3:
      routed += size  # a [E, ., .] stack of routed experts
    if path[-1] in ('embed', 'lm_head'):
      embedding += size
  moe = config.moe
  activated = total - routed + routed * moe.num_experts_per_token // moe.num_experts
  return {'total': total, 'activated': activated, 'routed_experts': routed, 'embedding': embedding}


def main(argv):
  del argv
  try:
    config = get_config(flags.FLAGS.model)
  except ConfigError as e:
    sys.exit(f'error: {e}')
  counts = count(config)
  print(f'{flags.FLAGS.model}: total {counts["total"] / 1e9:.3f}B ({counts["total"]:,}), '
        f'activated per token {counts["activated"] / 1e9:.3f}B ({counts["activated"]:,})')
  print(f'  routed experts {counts["routed_experts"] / 1e9:.3f}B, embedding + output head '
        f'{counts["embedding"] / 1e9:.3f}B')


if __name__ == '__main__':
  jax.config.update('jax_platforms', 'cpu')
  app.run(main)
