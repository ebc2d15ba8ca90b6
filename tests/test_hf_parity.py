"""Parity with transformers' DeepseekV3ForCausalLM through golden files (tests/golden/make_golden.py writes them)."""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from k2 import hf
from k2.config import ConfigError

GOLDEN = os.path.join(os.path.dirname(__file__), 'golden', 'data')
CASES = ('qlora_yarn', 'noqlora_rope', 'many_experts_mscale', 'fp8_block')


def relative_error(out, ref):
  return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize('case', CASES)
def test_logits_match_transformers(case):
  path = os.path.join(GOLDEN, case)
  model = hf.load(path, dtype=jnp.float32)
  tokens = np.load(os.path.join(path, 'tokens.npy'))
  reference = np.load(os.path.join(path, 'logits.npy'))
  logits, aux = model(jnp.asarray(tokens))
  assert logits.shape == reference.shape
  assert relative_error(np.asarray(logits), reference) <= 1e-4
  assert aux['max_logits'].shape == (model.config.num_layers, model.config.attention.num_heads)


def test_fp8_case_really_is_block_fp8():
  header, _ = hf.read_safetensors_header(os.path.join(GOLDEN, 'fp8_block', 'model-00001-of-00002.safetensors'))
  dtypes = {info['dtype'] for info in header.values()}
  assert 'F8_E4M3' in dtypes and any(name.endswith('weight_scale_inv') for name in header)


def test_dequantize_block_fp8_partial_blocks():
  rng = np.random.default_rng(0)
  weight = rng.normal(size=(130, 260)).astype(np.float32)
  scale_inv = rng.uniform(0.5, 2.0, size=(2, 3)).astype(np.float32)
  out = hf.dequantize_block_fp8(weight, scale_inv)
  expected = weight.copy()
  for i in range(2):
    for j in range(3):
      expected[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] *= scale_inv[i, j]
  np.testing.assert_array_equal(out, expected)


def test_save_then_load_round_trips(tmp_path):
  model = hf.load(os.path.join(GOLDEN, 'qlora_yarn'), dtype=jnp.float32)
  hf.save(model, str(tmp_path / 'out'), max_shard_bytes=200_000)
  assert len([f for f in os.listdir(tmp_path / 'out') if f.endswith('.safetensors')]) > 1
  again = hf.load(str(tmp_path / 'out'), dtype=jnp.float32)
  tokens = jnp.asarray(np.load(os.path.join(GOLDEN, 'qlora_yarn', 'tokens.npy')))
  np.testing.assert_array_equal(np.asarray(model(tokens)[0]), np.asarray(again(tokens)[0]))
  with pytest.raises(hf.CheckpointError, match='not empty'):
    hf.save(model, str(tmp_path / 'out'))


def test_convert_cli_round_trip(tmp_path):
  from k2 import convert
  model = hf.load(os.path.join(GOLDEN, 'noqlora_rope'), dtype=jnp.float32)
  convert.save_orbax(model, str(tmp_path / 'ckpt'))
  restored = convert.load_orbax(str(tmp_path / 'ckpt'), dtype=jnp.float32)
  tokens = jnp.asarray(np.load(os.path.join(GOLDEN, 'noqlora_rope', 'tokens.npy')))
  np.testing.assert_array_equal(np.asarray(model(tokens)[0]), np.asarray(restored(tokens)[0]))


# ------------------------------------------------------------------------------------------ bad checkpoints

@pytest.fixture
def golden_copy(tmp_path):
  path = tmp_path / 'ckpt'
  shutil.copytree(os.path.join(GOLDEN, 'qlora_yarn'), path)
  return path


def test_missing_shard_is_named(golden_copy):
  os.remove(golden_copy / 'model-00002-of-00002.safetensors')
  with pytest.raises(hf.CheckpointError, match='missing shard model-00002-of-00002.safetensors'):
    hf.load(str(golden_copy))


def test_truncated_shard_is_named(golden_copy):
  shard = golden_copy / 'model-00001-of-00002.safetensors'
  data = shard.read_bytes()
  shard.write_bytes(data[:len(data) // 2])
  with pytest.raises(hf.CheckpointError, match='model-00001-of-00002.safetensors is truncated'):
    hf.load(str(golden_copy))


def test_mismatched_shape_is_named(golden_copy):
  config = json.loads((golden_copy / 'config.json').read_text())
  config['kv_lora_rank'] += 8
  (golden_copy / 'config.json').write_text(json.dumps(config))
  with pytest.raises(hf.CheckpointError, match=r'tensor model.layers.0.self_attn.kv_a_\w+.weight has shape .* config.json implies'):
    hf.load(str(golden_copy))


def test_inconsistent_config_json_is_named(golden_copy):
  config = json.loads((golden_copy / 'config.json').read_text())
  config['num_experts_per_tok'] = config['n_routed_experts'] + 1
  (golden_copy / 'config.json').write_text(json.dumps(config))
  with pytest.raises(ConfigError, match='num_experts_per_token=9 exceeds num_experts=8'):
    hf.load(str(golden_copy))


def test_missing_directory_is_named(tmp_path):
  with pytest.raises(hf.CheckpointError, match='does not exist'):
    hf.load(str(tmp_path / 'nowhere'))
