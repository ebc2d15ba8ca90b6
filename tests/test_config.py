"""Named variants, config validation and parameter counts."""

import subprocess
import sys

import pytest

from k2 import params
from k2.config import ConfigError, get_config, make_config


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
