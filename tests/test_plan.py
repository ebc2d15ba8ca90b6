"""k2.plan: per-chip memory from abstract shapes and the sharding rules, checked against shards worked out by hand."""

import math
import subprocess
import sys

import pytest

from k2 import plan as plan_lib
from k2 import sharding
from k2.config import ConfigError, get_config

TINY = get_config('k2_tiny')
SMALL = get_config('k2_small')

# k2_tiny by hand (D 128, vocab 4096, 4 layers: 1 dense then 3 MoE; H 4, q_lora 64, kv_lora 32, qk 32+16, v 32;
# 8 experts of width 96, one shared expert, dense width 384). Elements whose shape has an 'embed' dimension, which
# the default rules split over fsdp:
TINY_EMBED_SPLIT = (2 * 4096 * 128                            # embed, lm_head
                    + 4 * (128 * 64 + 128 * 48 + 4 * 32 * 128)  # q_a_proj, kv_a_proj, o_proj per layer
                    + 3 * 128 * 384                             # dense gate, up, down
                    + 3 * (128 * 8 + 3 * 8 * 128 * 96 + 3 * 128 * 96))  # router, expert stacks, shared expert
# ... q_b_proj and kv_b_proj, split over fsdp on their latent side ('q_lora' 64, 'kv_lora' 32):
TINY_LORA_SPLIT = 4 * (64 * 4 * 48 + 32 * 4 * 64)
# ... and the rest, split by no fsdp/expert axis: the norms (q, kv, attn, ffn; final).
TINY_UNSPLIT = 4 * (64 + 32 + 128 + 128) + 128
TINY_EXPERTS = 3 * 3 * 8 * 128 * 96  # the routed expert stacks, split over 'expert'
TINY_ADAMW = 2 * 4096 * 128 + 4 * (64 + 32 + 128 + 128) + 128  # embed, lm_head, norm scales: two Adam moments


def tiny_plan(mesh, **kwargs):
  kwargs = {'batch': 32, 'seq': 64, 'hbm_gib': 16, 'remat': 'none', **kwargs}
  return plan_lib.plan(kwargs.pop('config', TINY), mesh, **kwargs)


def test_hand_counts_add_up_to_the_model():
  assert TINY_EMBED_SPLIT + TINY_LORA_SPLIT + TINY_UNSPLIT == 2_400_768
  unsharded = tiny_plan({})['unsharded']
  assert unsharded['params'] == 4 * 2_400_768
  # Muon keeps one momentum buffer per matrix, AdamW two moments for embeddings, head and norms (float32).
  assert unsharded['opt_state'] == 4 * ((2_400_768 - TINY_ADAMW) + 2 * TINY_ADAMW)


@pytest.mark.parametrize('fsdp', [1, 2, 4, 8])
def test_parameter_bytes_fall_as_one_over_fsdp(fsdp):
  per_chip = tiny_plan({'fsdp': fsdp})['per_chip']
  assert per_chip['params'] == 4 * ((TINY_EMBED_SPLIT + TINY_LORA_SPLIT) // fsdp + TINY_UNSPLIT)
  assert per_chip['grads'] == per_chip['params']  # gradients are sharded like the parameters


@pytest.mark.parametrize('expert', [2, 4, 8])
def test_parameter_bytes_fall_as_one_over_expert(expert):
  per_chip = tiny_plan({'expert': expert})['per_chip']
  assert per_chip['params'] == 4 * (TINY_EXPERTS // expert + 2_400_768 - TINY_EXPERTS)


def test_k2_small_shards_by_hand_on_fsdp_x_expert():
  # (copies, shape, shards) for {'fsdp': 4, 'expert': 8}: 'embed' (1024) and the q/kv latent sides (384, 128) / 4,
  # expert stacks (64) / 8 more.
  v, d, layers, moe_layers, heads = 163840, 1024, 12, 11, 16
  families = [
      (2, (v, d), 4), (1, (d,), 1),                                   # embed + lm_head, final norm
      (2 * layers, (d,), 1), (layers, (d, 384), 4), (layers, (384,), 1), (layers, (384, heads, 96), 4),
      (layers, (d, 160), 4), (layers, (128,), 1), (layers, (128, heads, 128), 4), (layers, (heads, 64, d), 4),
      (3, (d, 2816), 4),                                              # the dense layer's gate, up, down
      (moe_layers, (d, 64), 4), (3 * moe_layers, (64, d, 512), 32), (3 * moe_layers, (d, 512), 4),
  ]
  expected = sum(copies * math.prod(shape) // shards for copies, shape, shards in families)
  result = tiny_plan({'fsdp': 4, 'expert': 8}, config=SMALL)
  assert result['per_chip']['params'] == 4 * expected
  assert result['unsharded']['params'] == 4 * sum(copies * math.prod(shape) for copies, shape, _ in families)


def test_bfloat16_params_halve_params_grads_and_optimizer_state():
  fp32 = tiny_plan({'fsdp': 2})['per_chip']
  bf16 = tiny_plan({'fsdp': 2}, config=TINY.replace(param_dtype='bfloat16'))['per_chip']
  for row in ('params', 'grads', 'opt_state'):
    assert 2 * bf16[row] == fp32[row]


def test_totals_across_chips_equal_unsharded_when_nothing_is_replicated():
  # Default rules leave the norms unsplit by fsdp; these rules split every parameter.
  rules = {**sharding.DEFAULT_RULES, 'norm': ('fsdp',)}
  result = tiny_plan({'fsdp': 8}, rules=rules)
  assert result['replicated'] == []
  for row in ('params', 'grads', 'opt_state'):
    assert result['all_chips'][row] == result['unsharded'][row]
  # With the default rules, every chip holds its own copy of the unsplit parameters.
  default = tiny_plan({'fsdp': 8})
  assert default['all_chips']['params'] == default['unsharded']['params'] + 7 * 4 * TINY_UNSPLIT
  assert {name for name, _ in default['replicated']} == {'layers/*/attn/q_a_norm/scale', 'layers/*/attn/kv_a_norm/scale',
                                                         'layers/*/attn_norm/scale', 'layers/*/ffn_norm/scale',
                                                         'final_norm/scale'}


def test_gradient_accumulation_adds_a_float32_accumulator_and_divides_activations():
  one = tiny_plan({'fsdp': 2, 'expert': 4})
  four = tiny_plan({'fsdp': 2, 'expert': 4}, grad_accum=4)
  assert four['per_chip']['grads'] == 2 * one['per_chip']['grads']  # float32: 4 bytes + 4 for the accumulator
  assert 4 * four['per_chip']['activations'] == one['per_chip']['activations']


def test_activation_estimate_follows_remat_policy():
  by_policy = {remat: tiny_plan({'fsdp': 2, 'expert': 4}, remat=remat) for remat in ('none', 'dots', 'full')}
  assert by_policy['none']['tokens_per_chip'] == 32 * 64 // 8 == 256
  full = by_policy['full']['activation_parts']
  # 'full' keeps each layer's float32 input [tokens, D]; logits [tokens, vocab] and their gradient are float32.
  assert full['saved'] == 4 * 256 * 128 * 4
  assert full['logits'] == 2 * 256 * 4096 * 4
  totals = [by_policy[remat]['per_chip']['activations'] for remat in ('none', 'dots', 'full')]
  assert totals[0] > totals[1] > totals[2]


def test_chunked_loss_keeps_one_chunk_of_logits_and_the_log_sum_exp():
  whole = tiny_plan({'fsdp': 2, 'expert': 4}, remat='full')
  chunked = tiny_plan({'fsdp': 2, 'expert': 4}, remat='full', loss_chunk=16)
  # 256 tokens per chip = 4 rows x 64: one chunk is 4 x 16 tokens of logits and their gradient, plus 256 float32.
  assert chunked['activation_parts']['logits'] == 2 * (4 * 16) * 4096 * 4 + 256 * 4
  assert whole['per_chip']['total'] - chunked['per_chip']['total'] == (
      whole['activation_parts']['logits'] - chunked['activation_parts']['logits'])


@pytest.mark.parametrize('mesh, kwargs, message', [
    ({'fdsp': 2}, {}, "unknown mesh axes ['fdsp']"),
    ({}, {'loss_chunk': 48}, 'loss_chunk=48 does not divide seq=64'),
    ({'expert': 3}, {}, 'num_experts=8 is not divisible by the expert axis (3)'),
    ({'fsdp': 8}, {'batch': 12}, 'batch=12 does not split into 1 micro-batches over 8 batch shards'),
    ({}, {'seq': 4096}, 'seq=4096 exceeds the model max_position_embeddings=1024'),
])
def test_plan_rejects_bad_input(mesh, kwargs, message):
  with pytest.raises(ConfigError) as error:
    tiny_plan(mesh, **kwargs)
  assert message in str(error.value)


@pytest.mark.parametrize('model, mesh, chips, message', [
    ('k2_tiny', "{'fsdp': 4, 'expert': 2}", 4, "error: mesh {'fsdp': 4, 'expert': 2} has 8 chips but --chips 4"),
    ('k2_tiny', "{'fsdp': 2, 'tensr': 2}", 4, "error: unknown mesh axes ['tensr']"),
    ('k3', "{'fsdp': 8}", 8, "error: unknown model 'k3'"),
    ('k2_tiny', "{'expert': 3}", 3, 'error: num_experts=8 is not divisible by the expert axis (3)'),
    ('k2_tiny', 'fsdp=8', 8, 'error: --mesh must be a dict of axis sizes'),
])
def test_cli_errors_are_one_line(model, mesh, chips, message):
  with pytest.raises(SystemExit) as exit_info:
    plan_lib.report(model, mesh, chips, hbm_gib=95, batch=48, seq=64)
  error = str(exit_info.value.code)
  assert error.startswith(message) and '\n' not in error, error


def test_cli_prints_a_table_and_says_whether_it_fits():
  fits = subprocess.run([sys.executable, '-m', 'k2.plan', '--model', 'k2_tiny', '--mesh', "{'fsdp': 2, 'expert': 4}",
                         '--chips', '8', '--hbm_gib', '16', '--batch', '16', '--seq', '256'],
                        capture_output=True, text=True)
  assert fits.returncode == 0, fits.stderr[-2000:]
  for row in ('parameters', 'gradients', 'optimizer state', 'activations (est.)', 'total'):
    assert row in fits.stdout
  assert fits.stdout.strip().splitlines()[-1].startswith('fits: ') and 'does not fit' not in fits.stdout
  # k2_small (2B parameters, float32, with gradients and optimizer state) on 8 chips of 1 GiB: far too big.
  short = plan_lib.report('k2_small', "{'expert': 8}", 8, hbm_gib=1, batch=8, seq=512, remat='full')
  assert short.splitlines()[-1].startswith('does not fit: ')


@pytest.mark.parametrize('flag', ['--help', '--helpfull'])
def test_cli_help_exits_0(flag):
  result = subprocess.run([sys.executable, '-m', 'k2.plan', flag], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.startswith('Per-chip memory plan') and '--mesh' in result.stdout and '--hbm_gib' in result.stdout
