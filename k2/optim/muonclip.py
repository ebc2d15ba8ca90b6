"""MuonClip for a K2 model (K2 report section 2.1, Algorithm 1): an optax update plus a post-update hook.

    optimizer = muon_adamw(wsd_schedule(...), weight_decay=0.1)   # Muon on hidden matrices, AdamW on the rest
    ... params = optax.apply_updates(params, optimizer.update(grads, opt_state, params)[0])
    params, buffers, stats = post_update(params, buffers, aux, qk_clip_tau=100.0, bias_update_rate=1e-3,
                                         model_config=config)   # QK-Clip + aux-loss-free router balancing

`post_update` is everything MuonClip does after the optimizer, from the same forward's aux (no extra pass): QK-Clip
rescales the q/k weights of heads whose max logit passed tau (k2.optim.qk_clip), and the router bias moves toward
balanced expert load (DeepSeek-V3 section 2.1.2). Every training stage's step calls it.

Choices K2 does not state, taken from Moonlight's reference setup: Nesterov momentum (on), and the MoE router's
weight is a hidden matrix trained by Muon (only the router *bias* is excluded: it is set by the balancing rule).

Which leaf goes where is decided from its path by `LABEL_RULES`. Every leaf must match exactly one rule or the
optimizer's init fails, so a new parameter cannot silently land in the wrong group:
  muon   hidden matrices: attention projections, dense/shared MLPs, routed expert stacks [E, ., .], the router
  adamw  embeddings, output head, norm scales, biases
  frozen the router bias (set by the balancing rule, never by gradients), if it is passed at all

Muon sees each weight as the matrix it is in the published layout: q_b_proj [Q, H, K] as [Q, H*K], o_proj
[H, V, D] as [H*V, D]; expert stacks [E, D, F] stay 3-D, a batch of E matrices orthogonalized one by one.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from k2.optim.muon import muon
from k2.config import ModelConfig
from k2.optim.qk_clip import _path_string, qk_clip

_ROUTER_BIAS = re.compile(r'(?:^|/)layers/(\d+)/ffn/router_bias$')

# label -> regex over the leaf's path ('layers/3/attn/q_b_proj'); each leaf must match exactly one.
LABEL_RULES = {
    'muon': r'(attn/(q_a_proj|q_b_proj|q_proj|kv_a_proj|kv_b_proj|o_proj|k_proj|v_proj)'
            r'|ffn/(shared/)?(gate_proj|up_proj|down_proj)|ffn/router)$',
    'adamw': r'(^|/)(embed|lm_head|scale|bias)$',
    'frozen': r'(^|/)router_bias$',
}


def _matrix_shape(path: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The shape Muon orthogonalizes: 2-D matrices, or a 3-D [E, n, m] stack of experts."""
  if re.search(r'attn/o_proj$', path):  # [H, V, D] -> [H*V, D]
    return (math.prod(shape[:-1]), shape[-1])
  if re.search(r'attn/', path):  # [in, H, K] -> [in, H*K]
    return (shape[0], math.prod(shape[1:]))
  return shape


def param_labels(params) -> object:
  """The label pytree for `params`. Raises ValueError naming any leaf with no label, two labels, or a non-matrix
  leaf sent to Muon."""
  def label(path, leaf):
    name = _path_string(path)
    matches = [label for label, rule in LABEL_RULES.items() if re.search(rule, name)]
    if len(matches) != 1:
      raise ValueError(f'parameter {name} matched {len(matches)} optimizer groups {matches}; '
                       'exactly one is required (see k2.optim.muonclip.LABEL_RULES)')
    if matches[0] == 'muon' and len(leaf.shape) < 2:
      raise ValueError(f'parameter {name} has shape {tuple(leaf.shape)}; Muon needs a matrix')
    return matches[0]
  return jax.tree_util.tree_map_with_path(label, params)


def describe_split(params) -> str:
  """A printable table: how many leaves and parameters each optimizer group holds."""
  labels = jax.tree.leaves(param_labels(params))
  sizes = [math.prod(leaf.shape) for leaf in jax.tree.leaves(params)]
  lines = []
  for group in LABEL_RULES:
    count = sum(size for lab, size in zip(labels, sizes) if lab == group)
    lines.append(f'{group:>6}: {labels.count(group):4d} tensors {count:>16,d} parameters')
  return '\n'.join(lines)


def _as_matrices(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """Runs `inner` on each leaf reshaped to its Muon matrix shape, and reshapes the updates back."""
  def to_matrices(tree):
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x.reshape(_matrix_shape(_path_string(path), x.shape)), tree)

  def init(params):
    return inner.init(to_matrices(params))

  def update(updates, state, params=None):
    new_updates, state = inner.update(to_matrices(updates), state,
                                      None if params is None else to_matrices(params))
    return jax.tree.map(lambda new, old: new.reshape(old.shape), new_updates, updates), state

  return optax.GradientTransformation(init, update)


def muon_adamw(learning_rate: float | Callable, *, weight_decay: float = 0.1, momentum: float = 0.95,
             nesterov: bool = True, ns_steps: int = 5, rms_scale: float = 0.2, adam_b1: float = 0.9,
             adam_b2: float = 0.95, adam_eps: float = 1e-8, ns_impl: str = 'auto',
             ns_dtype=jnp.bfloat16) -> optax.GradientTransformation:
  """The optimizer part of MuonClip over the model's nnx.Param state (see the module docstring); QK-Clip and router
  balancing follow in `post_update`, since they need the forward's max logits and expert loads."""
  matrix_muon = _as_matrices(muon(learning_rate, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                                  weight_decay=weight_decay, rms_scale=rms_scale, ns_impl=ns_impl,
                                  ns_dtype=ns_dtype))
  adamw = optax.adamw(learning_rate, b1=adam_b1, b2=adam_b2, eps=adam_eps, weight_decay=weight_decay)
  transforms = {'muon': matrix_muon, 'adamw': adamw, 'frozen': optax.set_to_zero()}

  return optax.multi_transform(transforms, param_labels)


def balance_router_bias(buffers, expert_load: jax.Array, rate: float, first_k_dense: int):
  """Aux-loss-free balancing (DeepSeek-V3 section 2.1.2): bias += rate * sign(mean load - load), per MoE layer.

  buffers: a pytree holding .../layers/<i>/ffn/router_bias [E] leaves; expert_load [num_moe_layers, E] (MoE layer k
  is model layer first_k_dense + k)."""
  def update(path, bias):
    match = _ROUTER_BIAS.search(_path_string(path))
    if match is None:
      return bias
    load = expert_load[int(match.group(1)) - first_k_dense]
    return (bias + rate * jnp.sign(jnp.mean(load) - load)).astype(bias.dtype)
  return jax.tree_util.tree_map_with_path(update, buffers)


def post_update(params, buffers, aux: dict, *, qk_clip_tau: float | None, bias_update_rate: float,
                model_config: ModelConfig):
  """MuonClip after the optimizer update: returns (params, buffers, {'clipped_heads': int32}).

  aux: the step's forward aux reduced over the whole batch: 'max_logits' [num_layers, H] (pre-clip, max over the
  global batch) and 'expert_load' [num_moe_layers, E]. qk_clip_tau None: no QK-Clip (vanilla Muon, AdamW arms).
  """
  clipped_heads = jnp.zeros((), jnp.int32)
  if qk_clip_tau is not None:
    params, clip_stats = qk_clip(params, aux['max_logits'], qk_clip_tau, model_config)
    clipped_heads = clip_stats['clipped_heads']
  if aux['expert_load'].size:
    buffers = balance_router_bias(buffers, aux['expert_load'], bias_update_rate, model_config.first_k_dense)
  return params, buffers, {'clipped_heads': clipped_heads}
