r"""Per-chip memory plan for training a K2 model on a mesh, from abstract shapes and the sharding rules.

    python -m k2.plan --model k2_full --mesh "{'data': 1, 'fsdp': 256, 'expert': 16, 'tensor': 1}" \
        --chips 4096 --hbm_gib 95 --batch 16384 --seq 4096 --grad_accum 1 --remat full

WORKSPACE.md ('Plans for full K2') has the output for a TPU v5p slice and an H200 cluster.

Nothing is allocated and no devices are needed: each variable's shard is its abstract shape (`k2.model.abstract`)
divided along the mesh axes its `logical_axes` map to (`k2.sharding.logical_to_mesh_axes`, the same resolution
`logical_to_spec` uses on a real mesh). Rows of the report, per chip:

  parameters       every nnx.Param in `param_dtype`, sharded by the rules (replicated over axes no dim maps to).
  gradients        one param-sized buffer in `param_dtype`, sharded like the parameters; with grad_accum > 1 also
                   the float32 accumulator `k2.train.step` keeps across micro-batches.
  optimizer state  MuonClip (`k2.optim.muonclip`): one momentum buffer per Muon parameter, AdamW's two moments
                   for the rest, in the parameter dtype (muon's mu_dtype=None and optax.adamw's defaults keep the
                   parameter dtype), sharded like the parameters (ZeRO-3).
  gathered weights the FSDP working set: the largest layer's weights all-gathered over `fsdp`/`data` in the
                   compute dtype plus that layer's not yet reduce-scattered gradient in the parameter dtype.
  activations      an ESTIMATE for one micro-batch (below).
  buffers          other variables (the router bias).

Activations (estimate). Each tensor the backward pass keeps is listed with its logical axes, so the batch is split
over the mesh axes of 'batch'/'tokens' and heads/mlp over 'tensor' exactly as the model constrains them; t is the
tokens of the micro-batch on one chip, sizes in elements per token of one layer, compute dtype unless noted:
  attention  kept by 'none': layer input D, attn norm D, q latent Q (+ its norm Q), q H*K, kv latent C+R
             (+ its norm C), kv up-projection H*(N+V), roped q and k 2*H*K, attention out H*V, its log-sum-exp H
             (float32), o_proj out D, residual D, ffn norm D.  Flash attention is assumed (no T x T logits).
  MoE        router scores E (float32), dispatched tokens k*D, expert gate/up/hidden 3*k*F, expert out k*D,
             shared expert gate/up/hidden 3*S, shared out D (k = experts per token, F expert width,
             S = F * shared experts); a dense layer keeps gate/up/hidden 3*I and its out D.
  'dots'     keeps only outputs of plain matmuls (q latent, q, kv latent, kv up, o_proj out, router scores,
             shared/dense gate, up and out) plus the layer input; grouped expert matmuls and attention are
             recomputed. 'full' keeps only each layer's input.
  With 'dots' or 'full' the backward pass rematerializes one layer at a time: add one layer's 'none' set.
  Logits t x vocab (float32, 'act_vocab' -> tensor) and their gradient: 2 * t * V / tensor * 4 bytes; with a
  chunked loss (`loss_chunk` positions at a time, k2.train.step.chunked_next_token_loss) one chunk of each,
  2 * (t / seq * loss_chunk) * V / tensor * 4, plus the per-token log-sum-exp (4 t).
Not counted: XLA temporaries and fragmentation, collective buffers beyond the gathered layer, expert-load
imbalance (a hot expert receives more than k*t/experts tokens), the reference attention's T x T logits (CPU).
Leave headroom accordingly; the compiled memory analysis of a real run is the ground truth.
"""

from __future__ import annotations

import ast
import math
import sys
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx

from k2 import model as model_lib
from k2 import sharding
from k2.config import ConfigError, ModelConfig, get_config
from k2.optim.muonclip import param_labels

# k2.params defines the same --model flag; whichever module is imported first owns it.
if 'model' not in flags.FLAGS:
  flags.DEFINE_string('model', 'k2_full', 'Model variant (k2_full, k2_small, k2_tiny).')
_MESH = flags.DEFINE_string('mesh', "{'fsdp': 1}", "Mesh axis sizes, e.g. \"{'fsdp': 256, 'expert': 16}\".")
_CHIPS = flags.DEFINE_integer('chips', 1, 'Number of chips; must equal the product of the mesh axes.')
_HBM_GIB = flags.DEFINE_float('hbm_gib', 95.0, 'Usable HBM per chip in GiB (TPU v5p 95, H200 ~139).')
_BATCH = flags.DEFINE_integer('batch', 16384, 'Global batch in rows per optimizer step (K2: 16384).')
_SEQ = flags.DEFINE_integer('seq', 4096, 'Sequence length in tokens (K2: 4096).')
_GRAD_ACCUM = flags.DEFINE_integer('grad_accum', 1, 'Micro-batches per step; activations are for one of them.')
_LOSS_CHUNK = flags.DEFINE_integer('loss_chunk', None, 'Chunked loss: positions per chunk of the logits '
                                   '(train.loss_chunk); default: all at once.')
_REMAT = flags.DEFINE_enum('remat', None, ['none', 'full', 'dots'], 'Rematerialization; default: the config.')
_PARAM_DTYPE = flags.DEFINE_enum('param_dtype', None, ['float32', 'bfloat16', 'float16'],
                                 'Parameter storage dtype; default: the config (float32).')

GIB = 2 ** 30
# Optimizer buffers per parameter, by MuonClip group (k2.optim.muonclip.LABEL_RULES).
OPTIMIZER_BUFFERS = {'muon': 1, 'adamw': 2, 'frozen': 0}
# Axes a parameter is all-gathered over before use (ZeRO-3); tensor and expert shards are computed on in place.
GATHERED_AXES = ('data', 'fsdp')
ROWS = ('params', 'grads', 'opt_state', 'gathered', 'activations', 'buffers')
LABELS = {'params': 'parameters', 'grads': 'gradients', 'opt_state': 'optimizer state',
          'gathered': 'gathered weights (est.)', 'activations': 'activations (est.)',
          'buffers': 'buffers (router bias)'}


def _split(axes: tuple[tuple[str, ...], ...], axis_sizes: Mapping[str, int], skip: Sequence[str] = ()) -> int:
  """How many shards the per-dimension mesh axes cut an array into (ignoring the axes in `skip`)."""
  return math.prod(axis_sizes[a] for dim in axes for a in dim if a not in skip)


def _shard_elements(shape, logical_axes, axis_sizes, rules, skip=()) -> int:
  """Elements of one chip's shard (exact: the rules only pick axes that divide the dimension)."""
  axes = sharding.logical_to_mesh_axes(logical_axes, shape, axis_sizes, rules)
  return math.prod(shape) // _split(axes, axis_sizes, skip)


def _family(path: tuple) -> str:
  """'layers/*/attn/q_b_proj' for ('layers', 7, 'attn', 'q_b_proj'): one name for a parameter of every layer."""
  return '/'.join('*' if isinstance(key, int) else str(key) for key in path)


def _layer_of(path: tuple) -> tuple:
  """('layers', 7) for a parameter of layer 7; ('embed',), ('lm_head',), ... for the others."""
  return tuple(path[:2]) if path[0] == 'layers' else tuple(path[:1])


def layer_activations(config: ModelConfig, rows: int, seq: int, is_moe: bool) -> list[tuple]:
  """The tensors one decoder layer keeps for its backward pass, for a micro-batch of `rows` x `seq` tokens.

  Returns (name, shape, logical_axes, bytes per element, policies that keep it); the layer input is kept by
  every policy, the rest as the module docstring says."""
  att, moe = config.attention, config.moe
  act = jnp.dtype(config.runtime.dtype).itemsize
  d, heads, qk = config.hidden_size, att.num_heads, att.qk_head_dim
  tokens = rows * seq
  bsd = ('batch', 'seq', 'act_embed')
  bs_ = ('batch', 'seq', None)
  bsh = ('batch', 'seq', 'act_heads', None)
  none, dots, every = ('none',), ('none', 'dots'), ('none', 'dots', 'full')
  terms = [
      ('layer input', (rows, seq, d), bsd, act, every),
      ('attn norm', (rows, seq, d), bsd, act, none),
      ('kv latent', (rows, seq, att.kv_lora_rank + att.qk_rope_head_dim), bs_, act, dots),
      ('kv latent norm', (rows, seq, att.kv_lora_rank), bs_, act, none),
      ('kv up', (rows, seq, heads, att.qk_nope_head_dim + att.v_head_dim), bsh, act, dots),
      ('q', (rows, seq, heads, qk), bsh, act, dots),
      ('roped q, k', (rows, seq, 2 * heads, qk), bsh, act, none),
      ('attention out', (rows, seq, heads, att.v_head_dim), bsh, act, none),
      ('log-sum-exp', (rows, seq, heads, 1), bsh, 4, none),
      ('o_proj out', (rows, seq, d), bsd, act, dots),
      ('residual', (rows, seq, d), bsd, act, none),
      ('ffn norm', (rows, seq, d), bsd, act, none),
  ]
  if att.q_lora_rank is not None:
    terms += [('q latent', (rows, seq, att.q_lora_rank), bs_, act, dots),
              ('q latent norm', (rows, seq, att.q_lora_rank), bs_, act, none)]
  if is_moe:
    top_k, width = moe.num_experts_per_token, moe.expert_intermediate_size
    shared = width * moe.num_shared_experts
    terms += [
        ('router scores', (tokens, moe.num_experts), ('tokens', None), 4, dots),
        ('dispatched tokens', (tokens * top_k, d), ('tokens', 'act_embed'), act, none),
        ('expert gate, up, hidden', (tokens * top_k, 3 * width), ('tokens', 'mlp'), act, none),
        ('expert out', (tokens * top_k, d), ('tokens', 'act_embed'), act, none),
    ]
    if shared:
      terms += [('shared gate, up', (rows, seq, 2 * shared), ('batch', 'seq', 'mlp'), act, dots),
                ('shared hidden', (rows, seq, shared), ('batch', 'seq', 'mlp'), act, none),
                ('shared out', (rows, seq, d), bsd, act, dots)]
  else:
    width = config.dense_intermediate_size
    terms += [('mlp gate, up', (rows, seq, 2 * width), ('batch', 'seq', 'mlp'), act, dots),
              ('mlp hidden', (rows, seq, width), ('batch', 'seq', 'mlp'), act, none),
              ('mlp out', (rows, seq, d), bsd, act, dots)]
  return terms


def _activation_bytes(config, rows, seq, remat, axis_sizes, rules, loss_chunk=None) -> dict[str, int]:
  """Per-chip activation bytes of one micro-batch: {'saved', 'recompute', 'logits', 'total'}."""
  def layer_bytes(is_moe, policy):
    return sum(_shard_elements(shape, axes, axis_sizes, rules) * nbytes
               for _, shape, axes, nbytes, kept in layer_activations(config, rows, seq, is_moe) if policy in kept)

  kinds = {False: config.first_k_dense, True: config.num_moe_layers}
  saved = sum(count * layer_bytes(is_moe, remat) for is_moe, count in kinds.items())
  recompute = 0 if remat == 'none' else max(layer_bytes(is_moe, 'none') for is_moe, n in kinds.items() if n)
  if loss_chunk is None:
    logits = 2 * 4 * _shard_elements((rows, seq, config.vocab_size), ('batch', 'seq', 'act_vocab'), axis_sizes,
                                     rules)
  else:
    logits = (2 * 4 * _shard_elements((rows, loss_chunk, config.vocab_size), ('batch', 'seq', 'act_vocab'),
                                      axis_sizes, rules)
              + 4 * _shard_elements((rows, seq), ('batch', 'seq'), axis_sizes, rules))
  return {'saved': saved, 'recompute': recompute, 'logits': logits, 'total': saved + recompute + logits}


def plan(config: ModelConfig, axis_sizes: Mapping[str, int], *, batch: int, seq: int, remat: str | None = None,
         hbm_gib: float, grad_accum: int = 1, loss_chunk: int | None = None,
         rules: Mapping[str, Sequence[str]] = sharding.DEFAULT_RULES) -> dict:
  """Per-chip and all-chip bytes of training `config` on a mesh of `axis_sizes` (see the module docstring).

  Returns {'mesh': {axis: size} over all four axes, 'chips', 'remat', 'micro_batch_rows', 'tokens_per_chip',
  'per_chip': {row: bytes, 'total'}, 'all_chips': per_chip x chips, 'unsharded': {row: bytes} for the state rows
  (one copy, no replication), 'activation_parts': {'saved', 'recompute', 'logits', 'total'},
  'replicated': [(family, per-chip parameter bytes)] of parameters no mesh axis splits, largest first,
  'hbm_bytes', 'headroom_bytes' (negative when short), 'fits'}.
  Raises ConfigError for unknown axes, experts or micro-batch rows that do not split over their axes.
  """
  sizes = sharding.mesh_shape(axis_sizes)
  chips = math.prod(sizes.values())
  remat = config.runtime.remat_policy if remat is None else remat
  if remat not in ('none', 'full', 'dots'):
    raise ConfigError(f"remat must be 'none', 'full' or 'dots', got {remat!r}")
  if config.moe.num_experts % sizes['expert']:
    raise ConfigError(f'num_experts={config.moe.num_experts} is not divisible by the expert axis '
                      f'({sizes["expert"]}) of mesh {dict(axis_sizes)}')
  for name, value in (('batch', batch), ('seq', seq), ('grad_accum', grad_accum)):
    if value < 1:
      raise ConfigError(f'{name} must be a positive integer, got {value}')
  if loss_chunk is not None and (loss_chunk < 1 or seq % loss_chunk):
    raise ConfigError(f'loss_chunk={loss_chunk} does not divide seq={seq}')
  if seq > config.rope.max_position_embeddings:
    raise ConfigError(f'seq={seq} exceeds the model max_position_embeddings={config.rope.max_position_embeddings}')
  if hbm_gib <= 0:
    raise ConfigError(f'hbm_gib must be positive, got {hbm_gib}')
  batch_shards = math.prod(sizes[a] for a in rules.get('batch', ()))
  if batch % grad_accum or (batch // grad_accum) % batch_shards:
    raise ConfigError(f'batch={batch} does not split into {grad_accum} micro-batches over {batch_shards} batch '
                      f'shards of mesh {dict(axis_sizes)}')
  rows = batch // grad_accum

  model = model_lib.abstract(config)
  params = nnx.state(model, nnx.Param)
  labels = {path: variable.get_value() for path, variable in nnx.to_flat_state(param_labels(params))}
  per_chip = dict.fromkeys(ROWS, 0)
  unsharded = dict.fromkeys(('params', 'grads', 'opt_state', 'buffers'), 0)
  replicated: dict[str, int] = {}
  gathered_by_layer: dict[tuple, int] = {}
  act_bytes = jnp.dtype(config.runtime.dtype).itemsize
  for path, variable in nnx.to_flat_state(nnx.state(model)):
    shape, nbytes = tuple(variable.shape), jnp.dtype(variable.dtype).itemsize
    logical_axes = variable.get_metadata().get('logical_axes') or (None,) * len(shape)
    shard = _shard_elements(shape, logical_axes, sizes, rules)
    if not isinstance(variable, nnx.Param):
      per_chip['buffers'] += shard * nbytes
      unsharded['buffers'] += math.prod(shape) * nbytes
      continue
    buffers = OPTIMIZER_BUFFERS[labels[path]]
    grad_bytes = nbytes + (4 if grad_accum > 1 else 0)
    for row, factor in (('params', nbytes), ('grads', grad_bytes), ('opt_state', buffers * nbytes)):
      per_chip[row] += shard * factor
      unsharded[row] += math.prod(shape) * factor
    if shard == math.prod(shape) and chips > 1:
      replicated[_family(path)] = replicated.get(_family(path), 0) + shard * nbytes
    gathered = _shard_elements(shape, logical_axes, sizes, rules, skip=GATHERED_AXES)
    layer = _layer_of(path)
    gathered_by_layer[layer] = gathered_by_layer.get(layer, 0) + gathered * (act_bytes + nbytes)
  if any(sizes[a] > 1 for a in GATHERED_AXES):
    per_chip['gathered'] = max(gathered_by_layer.values())
  activations = _activation_bytes(config, rows, seq, remat, sizes, rules, loss_chunk)
  per_chip['activations'] = activations['total']
  per_chip['total'] = sum(per_chip[row] for row in ROWS)
  hbm_bytes = int(hbm_gib * GIB)
  return {
      'mesh': sizes, 'chips': chips, 'remat': remat, 'micro_batch_rows': rows,
      'tokens_per_chip': rows * seq // batch_shards,
      'per_chip': per_chip, 'all_chips': {row: value * chips for row, value in per_chip.items()},
      'unsharded': unsharded, 'activation_parts': activations,
      'replicated': sorted(replicated.items(), key=lambda item: -item[1]),
      'hbm_bytes': hbm_bytes, 'headroom_bytes': hbm_bytes - per_chip['total'],
      'fits': per_chip['total'] <= hbm_bytes,
  }


def _unit(nbytes: float) -> tuple[str, int]:
  """The largest of MiB/GiB/TiB that shows `nbytes` as at least 1 (MiB below that)."""
  for name, size in (('TiB', 2 ** 40), ('GiB', GIB)):
    if nbytes >= size:
      return name, size
  return 'MiB', 2 ** 20


def format_plan(result: dict, model_name: str, config: ModelConfig, batch: int, seq: int, grad_accum: int) -> str:
  """The printable report of `plan`'s result."""
  per_chip, all_chips, unsharded = result['per_chip'], result['all_chips'], result['unsharded']
  hbm_gib = result['hbm_bytes'] / GIB
  chip_unit, chip_size = _unit(per_chip['total'])
  all_unit, all_size = _unit(max(all_chips['total'], unsharded['params']))
  lines = [
      f'{model_name} on mesh {result["mesh"]}: {result["chips"]} chips, {hbm_gib:g} GiB HBM each',
      f'params {config.param_dtype}, compute {config.runtime.dtype}; batch {batch} x {seq} tokens, grad_accum '
      f'{grad_accum} (micro-batch {result["micro_batch_rows"]} rows, {result["tokens_per_chip"]} tokens per chip), '
      f'remat {result["remat"]}',
      '',
      f'{"":26}{"per chip " + chip_unit:>14}{"all chips " + all_unit:>15}{"one copy " + all_unit:>15}',
  ]
  for row in ROWS + ('total',):
    one_copy = f'{unsharded[row] / all_size:15.3f}' if row in unsharded else f'{"":15}'
    lines.append(f'{LABELS.get(row, row):26}{per_chip[row] / chip_size:14.2f}{all_chips[row] / all_size:15.3f}'
                 f'{one_copy}'.rstrip())
  parts = result['activation_parts']
  lines += ['', f'activations, {chip_unit} per chip: kept by layers {parts["saved"] / chip_size:.2f}, one layer '
            f'rematerialized {parts["recompute"] / chip_size:.2f}, logits and their gradient '
            f'{parts["logits"] / chip_size:.2f}']
  if result['replicated']:
    total = sum(size for _, size in result['replicated'])
    largest = ', '.join(f'{name} {size / chip_size:.2f}' for name, size in result['replicated'][:2])
    lines.append(f'parameters split by no mesh axis, {chip_unit} per chip: {total / chip_size:.2f} (largest: '
                 f'{largest})')
  need, headroom = per_chip['total'] / GIB, result['headroom_bytes'] / GIB
  if result['fits']:
    lines.append(f'fits: {need:.2f} of {hbm_gib:g} GiB per chip (headroom {headroom:.2f} GiB, '
                 f'{100 * headroom / hbm_gib:.0f}%)')
  else:
    lines.append(f'does not fit: {need:.2f} GiB needed of {hbm_gib:g} GiB per chip (short by {-headroom:.2f} GiB)')
  return '\n'.join(lines)


def parse_mesh(text: str) -> dict[str, int]:
  """"{'fsdp': 8, 'expert': 4}" -> {'fsdp': 8, 'expert': 4}; ConfigError if it is not such a dict."""
  try:
    mesh = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    mesh = None
  if not isinstance(mesh, dict) or not all(isinstance(k, str) and isinstance(v, int) for k, v in mesh.items()):
    raise ConfigError(f"--mesh must be a dict of axis sizes like \"{{'fsdp': 8, 'expert': 4}}\", got {text!r}")
  return mesh


def report(model_name: str, mesh_text: str, chips: int, *, hbm_gib: float, batch: int, seq: int,
           grad_accum: int = 1, remat: str | None = None, param_dtype: str | None = None,
           loss_chunk: int | None = None) -> str:
  """The CLI's whole job: validate, plan, format. Bad input exits with one `error: ...` line."""
  try:
    config = get_config(model_name, **({'param_dtype': param_dtype} if param_dtype else {}))
    mesh = parse_mesh(mesh_text)
    mesh_chips = math.prod(sharding.mesh_shape(mesh).values())
    if mesh_chips != chips:
      raise ConfigError(f'mesh {mesh} has {mesh_chips} chips but --chips {chips}')
    result = plan(config, mesh, batch=batch, seq=seq, remat=remat, hbm_gib=hbm_gib, grad_accum=grad_accum,
                  loss_chunk=loss_chunk)
  except ConfigError as e:
    sys.exit(f'error: {e}')
  return format_plan(result, model_name, config, batch, seq, grad_accum)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, except that asking for help (--help, --helpshort, -?, --helpfull) prints it and exits 0:
  absl ends help with status 1, which reads as a failure to scripts and CI."""
  requested = [arg.lstrip('-') for arg in argv[1:] if arg in ('--help', '-help', '--helpshort', '-?', '--helpfull')]
  if requested:
    app.usage(shorthelp='helpfull' not in requested, writeto_stdout=True, exitcode=0)
  return app.parse_flags_with_usage(argv)


def main(argv):
  del argv
  print(report(flags.FLAGS.model, _MESH.value, _CHIPS.value, hbm_gib=_HBM_GIB.value, batch=_BATCH.value, seq=_SEQ.value,
               grad_accum=_GRAD_ACCUM.value, remat=_REMAT.value, param_dtype=_PARAM_DTYPE.value,
               loss_chunk=_LOSS_CHUNK.value))


if __name__ == '__main__':
  jax.config.update('jax_platforms', 'cpu')
  app.run(main, flags_parser=parse_flags)
