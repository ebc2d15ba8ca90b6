"""Import and export of published DeepSeek-V3 / Kimi-K2 checkpoints (config.json + safetensors shards).

    from k2 import hf
    model = hf.load('/path/to/Kimi-K2-Instruct', dtype=jnp.float32)   # a k2.model.Transformer
    logits, aux = model(tokens)                                       # tokens [B, T] int32
    hf.save(model, '/path/to/out')                                    # the same format back

Loading streams tensor by tensor through memory-mapped shards, so host memory stays near the model's size plus
one tensor. Block-FP8 weights (float8_e4m3fn plus a `weight_scale_inv` per 128x128 block, as DeepSeek-V3 and K2
release them) are dequantized on the way in.

Safetensors files are read and written here directly (the format is an 8-byte header length, a JSON header and
raw little-endian data): the `safetensors` package's numpy API cannot represent bfloat16 or float8, and ml_dtypes
can.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from absl import logging
from flax import nnx

from k2 import model as model_lib
from k2.config import ConfigError, ModelConfig, RuntimeConfig, YarnConfig, make_config


class CheckpointError(ValueError):
  """A checkpoint directory that cannot be read into the model; the message names the file or tensor."""


# --------------------------------------------------------------------------------------------- config.json

def config_from_hf(hf: dict, *, dtype: str = 'bfloat16', param_dtype: str = 'float32') -> ModelConfig:
  """ModelConfig from a DeepSeek-V3 / Kimi-K2 config.json dict."""
  def get(key, default=None, required=True):
    if key not in hf and required and default is None:
      raise ConfigError(f'config.json is missing {key!r}')
    return hf.get(key, default)
  scaling = hf.get('rope_scaling') or hf.get('rope_parameters')
  yarn = None
  if scaling and scaling.get('type', scaling.get('rope_type')) not in (None, 'default'):
    kind = scaling.get('type', scaling.get('rope_type'))
    if kind != 'yarn':
      raise ConfigError(f'rope scaling type {kind!r} is not supported (only yarn)')
    max_positions = get('max_position_embeddings')
    yarn = YarnConfig(
        factor=float(scaling['factor']),
        original_max_position_embeddings=int(scaling.get('original_max_position_embeddings', max_positions)),
        beta_fast=float(scaling.get('beta_fast') or 32), beta_slow=float(scaling.get('beta_slow') or 1),
        mscale=scaling.get('mscale'), mscale_all_dim=scaling.get('mscale_all_dim'))
  num_heads = get('num_attention_heads')
  if hf.get('num_key_value_heads', num_heads) != num_heads:
    raise ConfigError('MLA needs num_key_value_heads == num_attention_heads, got '
                      f'{hf["num_key_value_heads"]} and {num_heads}')
  if hf.get('hidden_act', 'silu') != 'silu':
    raise ConfigError(f'hidden_act {hf["hidden_act"]!r} is not supported (only silu)')
  if hf.get('tie_word_embeddings'):
    raise ConfigError('tied embeddings are not supported: K2 unties input and output embeddings')
  if hf.get('attention_bias'):
    raise ConfigError('attention_bias is not supported: K2 projections have no bias')
  if hf.get('scoring_func', 'sigmoid') != 'sigmoid':
    raise ConfigError(f'scoring_func {hf["scoring_func"]!r} is not supported (only sigmoid)')
  rope_theta = hf.get('rope_theta') or (scaling or {}).get('rope_theta') or 10000.0
  return make_config(
      vocab_size=get('vocab_size'), hidden_size=get('hidden_size'), num_layers=get('num_hidden_layers'),
      first_k_dense=get('first_k_dense_replace', 0, required=False),
      dense_intermediate_size=get('intermediate_size'), num_heads=num_heads, q_lora_rank=hf.get('q_lora_rank'),
      kv_lora_rank=get('kv_lora_rank'), qk_nope_head_dim=get('qk_nope_head_dim'),
      qk_rope_head_dim=get('qk_rope_head_dim'), v_head_dim=get('v_head_dim'),
      num_experts=get('n_routed_experts'), num_experts_per_token=get('num_experts_per_tok'),
      num_shared_experts=get('n_shared_experts', 0, required=False),
      expert_intermediate_size=get('moe_intermediate_size'),
      routed_scaling_factor=float(get('routed_scaling_factor', 1.0, required=False)),
      rope_theta=float(rope_theta), max_position_embeddings=get('max_position_embeddings'), yarn=yarn,
      n_group=hf.get('n_group') or 1, topk_group=hf.get('topk_group') or 1,
      norm_topk_prob=bool(hf.get('norm_topk_prob', True)), rms_norm_eps=float(hf.get('rms_norm_eps', 1e-6)),
      param_dtype=param_dtype, runtime=RuntimeConfig(dtype=dtype))


def config_to_hf(config: ModelConfig) -> dict:
  """The config.json dict of `config`, in the published DeepSeek-V3 format."""
  att, moe, rope = config.attention, config.moe, config.rope
  yarn = None
  if rope.yarn is not None:
    yarn = {'type': 'yarn', **dataclasses.asdict(rope.yarn)}
  return {
      'architectures': ['DeepseekV3ForCausalLM'], 'model_type': 'deepseek_v3',
      'vocab_size': config.vocab_size, 'hidden_size': att.hidden_size,
      'intermediate_size': config.dense_intermediate_size, 'moe_intermediate_size': moe.expert_intermediate_size,
      'num_hidden_layers': config.num_layers, 'first_k_dense_replace': config.first_k_dense,
      'num_attention_heads': att.num_heads, 'num_key_value_heads': att.num_heads,
      'q_lora_rank': att.q_lora_rank, 'kv_lora_rank': att.kv_lora_rank, 'qk_nope_head_dim': att.qk_nope_head_dim,
      'qk_rope_head_dim': att.qk_rope_head_dim, 'v_head_dim': att.v_head_dim,
      'n_routed_experts': moe.num_experts, 'num_experts_per_tok': moe.num_experts_per_token,
      'n_shared_experts': moe.num_shared_experts, 'routed_scaling_factor': moe.routed_scaling_factor,
      'n_group': moe.n_group, 'topk_group': moe.topk_group, 'norm_topk_prob': moe.norm_topk_prob,
      'scoring_func': 'sigmoid', 'topk_method': 'noaux_tc', 'hidden_act': 'silu',
      'max_position_embeddings': rope.max_position_embeddings, 'rope_theta': rope.theta, 'rope_scaling': yarn,
      'rms_norm_eps': config.rms_norm_eps, 'tie_word_embeddings': False, 'attention_bias': False,
      'num_nextn_predict_layers': 0,
  }


# --------------------------------------------------------------------------------------------- safetensors

_DTYPES = {
    'F64': np.dtype(np.float64), 'F32': np.dtype(np.float32), 'F16': np.dtype(np.float16),
    'BF16': np.dtype(ml_dtypes.bfloat16), 'F8_E4M3': np.dtype(ml_dtypes.float8_e4m3fn),
    'F8_E5M2': np.dtype(ml_dtypes.float8_e5m2), 'I64': np.dtype(np.int64), 'I32': np.dtype(np.int32),
    'I16': np.dtype(np.int16), 'I8': np.dtype(np.int8), 'U8': np.dtype(np.uint8), 'BOOL': np.dtype(np.bool_),
}
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_FLOAT8 = (_DTYPES['F8_E4M3'], _DTYPES['F8_E5M2'])


def read_safetensors_header(path: str) -> tuple[dict, int]:
  """(header without __metadata__, offset of the data section). Raises CheckpointError if corrupt."""
  name = os.path.basename(path)
  try:
    size = os.path.getsize(path)
    with open(path, 'rb') as f:
      header_len = int.from_bytes(f.read(8), 'little')
      if not 0 < header_len <= size - 8:
        raise CheckpointError(f'{name} is not a safetensors file (bad header length)')
      header = json.loads(f.read(header_len))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f'{name} is unreadable or corrupt: {e}') from None
  header.pop('__metadata__', None)
  data_start = 8 + header_len
  for tensor, info in header.items():
    if info.get('dtype') not in _DTYPES:
      raise CheckpointError(f'{name}: tensor {tensor} has unsupported dtype {info.get("dtype")!r}')
    if data_start + info['data_offsets'][1] > size:
      raise CheckpointError(f'{name} is truncated: tensor {tensor} ends past the end of the file')
  return header, data_start


def iter_safetensors(path: str) -> Iterator[tuple[str, np.ndarray]]:
  """(name, memory-mapped array) for every tensor of one file, in file order."""
  header, data_start = read_safetensors_header(path)
  data = np.memmap(path, dtype=np.uint8, mode='r', offset=data_start)
  for name, info in sorted(header.items(), key=lambda item: item[1]['data_offsets'][0]):
    begin, end = info['data_offsets']
    yield name, data[begin:end].view(_DTYPES[info['dtype']]).reshape(info['shape'])


def write_safetensors(path: str, tensors: dict[str, np.ndarray]) -> None:
  """Writes `tensors` as one safetensors file."""
  header, offset = {}, 0
  for name, array in tensors.items():
    header[name] = {'dtype': _DTYPE_NAMES[array.dtype], 'shape': list(array.shape),
                    'data_offsets': [offset, offset + array.nbytes]}
    offset += array.nbytes
  encoded = json.dumps(header, separators=(',', ':')).encode()
  encoded += b' ' * (-len(encoded) % 8)  # the data section starts 8-byte aligned
  with open(path, 'wb') as f:
    f.write(len(encoded).to_bytes(8, 'little'))
    f.write(encoded)
    for array in tensors.values():
      f.write(np.ascontiguousarray(array).tobytes())


def dequantize_block_fp8(weight: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int] = (128, 128)):
  """float8 [out, in] with one inverse scale per block [ceil(out/b0), ceil(in/b1)] -> float32 [out, in]."""
  rows, cols = weight.shape
  expected = (math.ceil(rows / block[0]), math.ceil(cols / block[1]))
  if scale_inv.shape != expected:
    raise CheckpointError(f'weight_scale_inv has shape {scale_inv.shape}, expected {expected} for a '
                          f'{weight.shape} weight in {block} blocks')
  scale = np.repeat(np.repeat(scale_inv.astype(np.float32), block[0], 0), block[1], 1)[:rows, :cols]
  return weight.astype(np.float32) * scale


# --------------------------------------------------------------------------------------------- name mapping

@dataclasses.dataclass(frozen=True)
class _Target:
  """Where a published tensor lands: a variable path, an expert index, and how the layouts relate.

  'linear': published [out, in] = ours.reshape(prod(ours.shape[:in_dims]), -1).T; 'copy': same layout.
  """
  path: tuple
  kind: str = 'linear'
  in_dims: int = 1
  expert: int | None = None


def tensor_map(config: ModelConfig) -> dict[str, _Target]:
  """Published parameter name -> _Target, for every tensor the model needs."""
  targets = {
      'model.embed_tokens.weight': _Target(('embed',), 'copy'),
      'model.norm.weight': _Target(('final_norm', 'scale'), 'copy'),
      'lm_head.weight': _Target(('lm_head',)),
  }
  att = config.attention
  for i in range(config.num_layers):
    hf, ours = f'model.layers.{i}.', ('layers', i)
    targets[hf + 'input_layernorm.weight'] = _Target(ours + ('attn_norm', 'scale'), 'copy')
    targets[hf + 'post_attention_layernorm.weight'] = _Target(ours + ('ffn_norm', 'scale'), 'copy')
    attn = ours + ('attn',)
    if att.q_lora_rank is None:
      targets[hf + 'self_attn.q_proj.weight'] = _Target(attn + ('q_proj',))
    else:
      targets[hf + 'self_attn.q_a_proj.weight'] = _Target(attn + ('q_a_proj',))
      targets[hf + 'self_attn.q_a_layernorm.weight'] = _Target(attn + ('q_a_norm', 'scale'), 'copy')
      targets[hf + 'self_attn.q_b_proj.weight'] = _Target(attn + ('q_b_proj',))
    targets[hf + 'self_attn.kv_a_proj_with_mqa.weight'] = _Target(attn + ('kv_a_proj',))
    targets[hf + 'self_attn.kv_a_layernorm.weight'] = _Target(attn + ('kv_a_norm', 'scale'), 'copy')
    targets[hf + 'self_attn.kv_b_proj.weight'] = _Target(attn + ('kv_b_proj',))
    targets[hf + 'self_attn.o_proj.weight'] = _Target(attn + ('o_proj',), in_dims=2)
    ffn = ours + ('ffn',)
    projections = ('gate_proj', 'up_proj', 'down_proj')
    if i < config.first_k_dense:
      for proj in projections:
        targets[hf + f'mlp.{proj}.weight'] = _Target(ffn + (proj,))
      continue
    targets[hf + 'mlp.gate.weight'] = _Target(ffn + ('router',))
    targets[hf + 'mlp.gate.e_score_correction_bias'] = _Target(ffn + ('router_bias',), 'copy')
    for proj in projections:
      for e in range(config.moe.num_experts):
        targets[hf + f'mlp.experts.{e}.{proj}.weight'] = _Target(ffn + (proj,), expert=e)
      if config.moe.num_shared_experts:
        targets[hf + f'mlp.shared_experts.{proj}.weight'] = _Target(ffn + ('shared', proj))
  return targets


def _published_shape(target: _Target, shape: tuple[int, ...]) -> tuple[int, ...]:
  if target.expert is not None:
    shape = shape[1:]
  if target.kind == 'copy':
    return shape
  return (math.prod(shape[target.in_dims:]), math.prod(shape[:target.in_dims]))


def _to_ours(target: _Target, tensor: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  if target.expert is not None:
    shape = shape[1:]
  return tensor.reshape(shape) if target.kind == 'copy' else tensor.T.reshape(shape)


def _to_published(target: _Target, array: np.ndarray) -> np.ndarray:
  if target.expert is not None:
    array = array[target.expert]
  if target.kind == 'copy':
    return array
  return array.reshape(math.prod(array.shape[:target.in_dims]), -1).T


# --------------------------------------------------------------------------------------------- load / save

_MTP_LAYER = re.compile(r'model\.layers\.(\d+)\.')


def _shard_files(path: str) -> tuple[list[str], dict[str, str] | None]:
  """The shard files of a checkpoint directory and its weight map (None when there is a single file)."""
  if not os.path.isdir(path):
    raise CheckpointError(f'checkpoint directory {path} does not exist')
  index_path = os.path.join(path, 'model.safetensors.index.json')
  if os.path.exists(index_path):
    try:
      with open(index_path) as f:
        weight_map = json.load(f)['weight_map']
    except (json.JSONDecodeError, KeyError) as e:
      raise CheckpointError(f'{index_path} is corrupt: {e}') from None
    files = sorted(set(weight_map.values()))
    missing = [name for name in files if not os.path.exists(os.path.join(path, name))]
    if missing:
      raise CheckpointError(f'missing shard {missing[0]} in {path} (listed in model.safetensors.index.json; '
                            f'{len(missing)} missing in all)')
    return files, weight_map
  files = sorted(name for name in os.listdir(path) if name.endswith('.safetensors'))
  if not files:
    raise CheckpointError(f'no .safetensors files in {path}')
  return files, None


def read_config(path: str, *, dtype: str = 'bfloat16', param_dtype: str = 'float32') -> ModelConfig:
  config_path = os.path.join(path, 'config.json')
  if not os.path.exists(config_path):
    raise CheckpointError(f'{config_path} does not exist')
  with open(config_path) as f:
    try:
      return config_from_hf(json.load(f), dtype=dtype, param_dtype=param_dtype)
    except json.JSONDecodeError as e:
      raise CheckpointError(f'{config_path} is not valid JSON: {e}') from None


def load(path: str, dtype=jnp.float32) -> model_lib.Transformer:
  """Reads a published checkpoint directory into a Transformer whose parameters and compute are in `dtype`."""
  dtype_name = jnp.dtype(dtype).name
  config = read_config(path, dtype=dtype_name, param_dtype=dtype_name)
  with open(os.path.join(path, 'config.json')) as f:
    quantization = json.load(f).get('quantization_config') or {}
  block = tuple(quantization.get('weight_block_size', (128, 128)))
  files, weight_map = _shard_files(path)
  targets = tensor_map(config)
  if weight_map is not None:
    absent = [name for name in targets if name not in weight_map]
    if absent:
      raise CheckpointError(f'tensor {absent[0]} is not in any shard of {path} ({len(absent)} missing in all)')

  graphdef, abstract_state = nnx.split(model_lib.abstract(config))
  shapes = {path_: variable.shape for path_, variable in nnx.to_flat_state(abstract_state)}
  arrays: dict[tuple, np.ndarray] = {}
  seen: set[str] = set()
  scales: dict[str, np.ndarray] = {}
  pending_fp8: dict[str, np.ndarray] = {}

  def place(name: str, tensor: np.ndarray) -> None:
    target = targets[name]
    shape = shapes[target.path]
    expected = _published_shape(target, shape)
    if tuple(tensor.shape) != expected:
      raise CheckpointError(f'tensor {name} has shape {tuple(tensor.shape)} but config.json implies {expected}')
    value = _to_ours(target, tensor.astype(np.float32) if tensor.dtype != np.float32 else tensor, shape)
    if target.path not in arrays:
      arrays[target.path] = np.empty(shape, dtype=jnp.dtype(dtype))
    if target.expert is None:
      arrays[target.path][...] = value
    else:
      arrays[target.path][target.expert] = value
    seen.add(name)

  for file in files:
    for name, tensor in iter_safetensors(os.path.join(path, file)):
      if name.endswith('.weight_scale_inv'):
        weight_name = name[:-len('_scale_inv')]
        if weight_name in pending_fp8:
          place(weight_name, dequantize_block_fp8(pending_fp8.pop(weight_name), tensor, block))
        else:
          scales[weight_name] = tensor
        continue
      if name not in targets:
        layer = _MTP_LAYER.match(name)
        if layer and int(layer.group(1)) >= config.num_layers:
          continue  # multi-token-prediction layers (DeepSeek-V3 layer 61); K2 has none
        raise CheckpointError(f'unexpected tensor {name} in {file}: config.json describes no such parameter')
      if tensor.dtype in _FLOAT8:
        if name in scales:
          place(name, dequantize_block_fp8(tensor, scales.pop(name), block))
        else:
          pending_fp8[name] = tensor
        continue
      place(name, tensor)
  if pending_fp8:
    raise CheckpointError(f'float8 tensor {next(iter(pending_fp8))} has no weight_scale_inv')
  missing = [name for name in targets if name not in seen]
  if missing:
    raise CheckpointError(f'tensor {missing[0]} is missing from {path} ({len(missing)} missing in all)')

  state = nnx.from_flat_state([(p, v.replace(jnp.asarray(arrays[p]))) for p, v in
                               nnx.to_flat_state(abstract_state)])
  logging.info('loaded %s: %d tensors from %d shards', path, len(seen), len(files))
  return nnx.merge(graphdef, state)


def save(model: model_lib.Transformer, path: str, *, dtype=None, max_shard_bytes: int = 4 << 30) -> None:
  """Writes `model` as config.json + safetensors shards + index. Refuses a non-empty `path`."""
  if os.path.exists(path) and os.listdir(path):
    raise CheckpointError(f'{path} is not empty; refusing to overwrite it')
  os.makedirs(path, exist_ok=True)
  config = model.config
  flat = {p: v for p, v in nnx.to_flat_state(nnx.state(model))}
  out_dtype = np.dtype(jnp.dtype(dtype or config.param_dtype))
  shards, current, current_bytes = [], {}, 0
  for name, target in tensor_map(config).items():
    tensor = np.asarray(jax.device_get(flat[target.path][...]))
    tensor = np.ascontiguousarray(_to_published(target, tensor).astype(out_dtype))
    if current and current_bytes + tensor.nbytes > max_shard_bytes:
      shards.append(current)
      current, current_bytes = {}, 0
    current[name] = tensor
    current_bytes += tensor.nbytes
  shards.append(current)
  weight_map = {}
  for i, shard in enumerate(shards):
    file = f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors'
    write_safetensors(os.path.join(path, file), shard)
    weight_map.update({name: file for name in shard})
  with open(os.path.join(path, 'model.safetensors.index.json'), 'w') as f:
    json.dump({'metadata': {'total_size': sum(t.nbytes for s in shards for t in s.values())},
               'weight_map': weight_map}, f, indent=1)
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump(config_to_hf(config), f, indent=2)
