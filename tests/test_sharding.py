"""The same forward on 8 fake CPU devices, sharded over fsdp x expert x tensor, as on one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from k2 import model as model_lib
from k2 import sharding
from k2.config import ConfigError, get_config

CONFIG = get_config('k2_tiny', vocab_size=512, num_layers=3, dtype='float32')


@pytest.mark.parametrize('axes', [{'fsdp': 2, 'expert': 2, 'tensor': 2}, {'data': 2, 'expert': 4}])
def test_sharded_forward_matches_one_device(axes):
  assert jax.device_count() == 8
  model = model_lib.create(CONFIG, seed=0)
  tokens = jax.random.randint(jax.random.key(0), (8, 16), 0, CONFIG.vocab_size, dtype=jnp.int32)
  forward = nnx.jit(lambda m, t: m(t))
  logits_one, aux_one = forward(model, tokens)

  mesh = sharding.make_mesh(axes)
  with sharding.use_mesh(mesh):
    sharding.shard_model(model, mesh)
    # The parameters really are split: an expert stack is sharded over 'expert' and, with fsdp, over 'fsdp'.
    spec = model.layers[1].ffn.gate_proj[...].sharding.spec
    assert spec[0] == 'expert'
    tokens_sharded = jax.device_put(tokens, jax.NamedSharding(mesh, jax.P(('data', 'fsdp', 'expert'))))
    logits_mesh, aux_mesh = forward(model, tokens_sharded)
  # Tolerance: float32 with reductions split across devices changes summation order only.
  np.testing.assert_allclose(np.asarray(logits_mesh), np.asarray(logits_one), rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(np.asarray(aux_mesh['max_logits']), np.asarray(aux_one['max_logits']), rtol=2e-5)
  np.testing.assert_array_equal(np.asarray(aux_mesh['expert_load']), np.asarray(aux_one['expert_load']))


def test_logical_to_spec_drops_axes_that_do_not_divide():
  mesh = sharding.make_mesh({'fsdp': 2, 'tensor': 4})
  assert sharding.logical_to_spec(('embed', 'mlp'), (6, 8), mesh) == jax.P('fsdp', 'tensor')
  assert sharding.logical_to_spec(('embed', 'mlp'), (6, 6), mesh) == jax.P('fsdp', None)


def test_mesh_that_does_not_fit_devices_is_one_line_error():
  with pytest.raises(ConfigError, match=r"mesh \{'fsdp': 3\} needs 3 devices but 8 are available"):
    sharding.make_mesh({'fsdp': 3})
  with pytest.raises(ConfigError, match='unknown mesh axes'):
    sharding.make_mesh({'fdsp': 8})
