"""Named variants, config validation, runtime switches apart from the architecture, and parameter counts."""

import subprocess
import sys

import grain
import jax
import numpy as np
import pytest
from flax import nnx

from k2 import model as model_lib
from k2 import params
from k2.config import ConfigError, RuntimeConfig, get_config, make_config
from k2.norms import RMSNorm
from k2.train.checkpoint import Checkpointer


def closed_form_count(c):
  """Parameter count of a DeepSeek-V3-family model, written out from the architecture independently of k2.model."""
  a, m = c.attention, c.moe
  d = c.hidden_size
  q = d * a.num_heads * a.qk_head_dim if a.q_lora_rank is None else (
      d * a.q_lora_rank + a.q_lora_rank + a.q_lora_rank * a.num_heads * a.qk_head_dim)
  attention = (q + d * (a.kv_lora_rank + a.qk_rope_head_dim) + a.kv_lora_rank
               + a.kv_lora_rank * a.num_heads * (a.qk_nope_head_dim + a.v_head_dim) + a.num_heads * a.v_head_dim * d)
  dense = 3 * d * c.dense_intermediate_size
  expert = 3 * d * m.expert_intermediate_size
  moe = d * m.num_experts + m.num_experts * expert + m.num_shared_experts * expert
  layers = c.num_layers * (attention + 2 * d) + c.first_k_dense * dense + c.num_moe_layers * moe
  total = layers + 2 * c.vocab_size * d + d
  activated = total - c.num_moe_layers * (m.num_experts - m.num_experts_per_token) * expert
  return total, activated


@pytest.mark.parametrize('name', ['k2_full', 'k2_small', 'k2_tiny'])
def test_counts_match_closed_form(name):
  config = get_config(name)
  counts = params.count(config)
  assert (counts['total'], counts['activated']) == closed_form_count(config)


def test_k2_full_counts():
  counts = params.count(get_config('k2_full'))
  # The exact K2 architecture (K2_REFERENCE.md section 1, and the released config.json) has 1,026,408,209,408
  # parameters: 1.3% under the report's rounded "1.04T" (see test_deepseek_v3_counts for why the counter is right).
  assert counts['total'] == 1_026_408_209_408
  assert abs(counts['activated'] / 32.6e9 - 1) < 0.02


def test_deepseek_v3_counts():
  """The same counter on DeepSeek-V3's published architecture gives its published 671B total."""
  v3 = make_config(vocab_size=129280, hidden_size=7168, num_layers=61, first_k_dense=3,
                   dense_intermediate_size=18432, num_heads=128, q_lora_rank=1536, kv_lora_rank=512,
                   qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, num_experts=256,
                   num_experts_per_token=8, num_shared_experts=1, expert_intermediate_size=2048,
                   routed_scaling_factor=2.5, rope_theta=10000.0, max_position_embeddings=163840, n_group=8,
                   topk_group=4)
  counts = params.count(v3)
  assert abs(counts['total'] / 671e9 - 1) < 0.001
  assert abs(counts['activated'] / 37e9 - 1) < 0.02


def test_k2_small_size():
  counts = params.count(get_config('k2_small'))
  assert 1e9 <= counts['total'] <= 3e9


def test_params_cli():
  out = subprocess.run([sys.executable, '-m', 'k2.params', '--model', 'k2_full'], capture_output=True, text=True,
                       check=True).stdout
  assert 'total 1026.408B' in out and 'activated per token 32.861B' in out
  bad = subprocess.run([sys.executable, '-m', 'k2.params', '--model', 'k3'], capture_output=True, text=True)
  assert bad.returncode != 0
  assert bad.stderr.strip().splitlines()[-1] == (
      "error: unknown model 'k3'; known models: k2_full, k2_small, k2_tiny")


@pytest.mark.parametrize('change, message', [
    ({'qk_rope_head_dim': 7}, 'qk_rope_head_dim=7 must be even'),
    ({'num_experts_per_token': 9}, 'num_experts_per_token=9 exceeds num_experts=8'),
    ({'n_group': 3}, 'num_experts=8 is not divisible by n_group=3'),
    ({'kv_lora_rank': 0}, 'kv_lora_rank must be a positive integer'),
    ({'q_lora_rank': -4}, 'q_lora_rank must be a positive integer or None'),
    ({'first_k_dense': 5}, r'first_k_dense=5 must lie in \[0, num_layers=4\]'),
])
def test_inconsistent_config_is_named(change, message):
  fields = dict(vocab_size=64, hidden_size=32, num_layers=4, first_k_dense=1, dense_intermediate_size=64,
                num_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                v_head_dim=8, num_experts=8, num_experts_per_token=2, num_shared_experts=1,
                expert_intermediate_size=16, routed_scaling_factor=1.0, rope_theta=10000.0,
                max_position_embeddings=128)
  with pytest.raises(ConfigError, match=message):
    make_config(**{**fields, **change})


def test_unknown_model_name():
  with pytest.raises(ConfigError, match="unknown model 'k2_huge'"):
    get_config('k2_huge')


def test_overrides_reach_their_component():
  config = get_config('k2_tiny', attention_impl='flash', remat_policy='dots', dtype='bfloat16', num_experts=16,
                      hidden_size=64, rms_norm_eps=1e-5)
  assert config.runtime == RuntimeConfig(dtype='bfloat16', attention_impl='flash', remat_policy='dots')
  assert (config.moe.num_experts, config.attention.hidden_size, config.moe.hidden_size) == (16, 64, 64)
  assert config.rms_norm_eps == 1e-5 and not hasattr(config.attention, 'rms_norm_eps')
  assert 'runtime' not in config.architecture()
  with pytest.raises(ConfigError, match="unknown model config field 'num_expert'"):
    get_config('k2_tiny', num_expert=16)
  with pytest.raises(ConfigError, match="ep_impl must be 'auto', 'ragged' or 'capacity', got 'x'"):
    get_config('k2_tiny', ep_impl='x')


def test_one_rms_norm_eps_reaches_every_norm():
  """ModelConfig.rms_norm_eps is the eps of the layer norms, the final norm and MLA's q and kv latent norms."""
  model = model_lib.abstract(get_config('k2_tiny', num_layers=2, rms_norm_eps=1e-3))
  norms = {'/'.join(map(str, path)): module.eps for path, module in nnx.iter_modules(model)
           if isinstance(module, RMSNorm)}
  assert len(norms) == 2 * 4 + 1 and set(norms.values()) == {1e-3}, norms
  assert norms['layers/1/attn/kv_a_norm'] == norms['layers/1/attn/q_a_norm'] == 1e-3


def test_checkpoint_restores_under_another_runtime(tmp_path):
  """Kernels, remat, expert exchange and compute dtype are no part of what a checkpoint stores."""
  saved_config = get_config('k2_tiny', vocab_size=64, num_layers=2, attention_impl='reference', remat_policy='none',
                            ep_impl='capacity', matmul_impl='ragged_dot', dtype='float32')
  params_state = nnx.state(model_lib.create(saved_config), nnx.Param)
  checkpointer = Checkpointer(str(tmp_path), every=1, async_save=False)
  data = iter(grain.MapDataset.source(list(range(4))).to_iter_dataset())
  assert checkpointer.save(1, params_state, data, saved_config, force=True)
  checkpointer.wait()
  resumed_config = saved_config.replace(attention_impl='flash', remat_policy='dots', ep_impl='ragged',
                                        ep_capacity_factor=2.0, matmul_impl='pallas', dtype='bfloat16')
  checkpointer.check_compatible(resumed_config)
  target = nnx.state(model_lib.abstract(resumed_config), nnx.Param)
  restored = checkpointer.restore(1, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), target), data)
  for (path, saved), (_, value) in zip(nnx.to_flat_state(params_state), nnx.to_flat_state(restored)):
    np.testing.assert_array_equal(np.asarray(value.get_value()), np.asarray(saved.get_value()), err_msg=str(path))
  for change, field in (({'num_layers': 3}, 'num_layers'), ({'rms_norm_eps': 1e-5}, 'rms_norm_eps'),
                        ({'param_dtype': 'bfloat16'}, 'param_dtype')):
    with pytest.raises(ConfigError, match=f'different model .*{field}'):
      checkpointer.check_compatible(saved_config.replace(**change))
  checkpointer.close()
