# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Token efficiency: MuonClip vs AdamW at small scale
#
# Moonlight (arXiv 2502.16982) reports Muon at about 2x the compute efficiency of AdamW (52% of the training FLOPs
# for the same loss). Here: sweep each optimizer's peak learning rate at one token budget (`NUM_STEPS`), take the
# best of each, then train AdamW at its best rate for longer budgets (`ADAMW_BUDGETS` x `NUM_STEPS`, each a complete
# warm-up/stable/decay run, so every point is a finished schedule) and read off how many tokens AdamW needs to reach
# MuonClip's final validation loss (interpolated in log tokens between budgets).
#
# The size file `experiments/ablations/configs/tiny.gin` (k2_tiny, a 2-core CPU) holds the sweep too; set `SIZE`
# to `experiments/ablations/configs/small_gpu.gin` for k2_small on one H200. Finished runs under `ROOT` are reused.

# %%
import os
import sys


def repo_root(path: str) -> str:
  while not os.path.isdir(os.path.join(path, 'k2')):
    if os.path.dirname(path) == path:
      raise RuntimeError('open this notebook inside the k2 repository')
    path = os.path.dirname(path)
  return path


os.chdir(repo_root(os.getcwd()))
sys.path.insert(0, os.getcwd())

from experiments.ablations import ablations  # noqa: E402
from k2.train import recipe  # noqa: E402

# %% tags=["parameters"]
SIZE = ablations.TINY_GIN  # the one file to change, e.g. 'experiments/ablations/configs/small_gpu.gin'
# CI (tests/test_notebooks.py) appends configs/ci.gin: a few steps of a 2-layer k2_tiny.
GIN_FILES = [SIZE] + ([ablations.CI_GIN] if os.environ.get('K2_NOTEBOOK_CI') else [])
ROOT = os.environ.get('K2_ABLATION_ROOT', ablations.DEFAULT_ROOT)
PARALLEL = int(os.environ.get('K2_ABLATION_PARALLEL', '1'))  # training processes at once

# %% [markdown]
# ## The two optimizers and the sweep, in a few lines
# Both arms share everything but the optimizer: MuonClip (`configs/arms/muonclip.gin`: Muon on hidden matrices with
# its update scaled to AdamW's RMS, AdamW on the rest, QK-Clip at `TAU`) and AdamW on every parameter
# (`configs/arms/adamw.gin`), with the same weight decay and WSD schedule.

# %%
settings = ablations.read_settings(GIN_FILES)
with ablations.parsed(GIN_FILES):  # the runs' bindings: warm-up, decay, weight decay, betas
  schedule = recipe.schedule(1.0, settings.num_steps)  # the WSD shape every run shares, times its peak lr
  optimizers = {name: recipe.optimizer(schedule, name=name) for name in ('muonclip', 'adamw')}
print(f'schedule at steps 0, 10%, 50%, 90%, 100%: '
      f'{[round(float(schedule(int(f * settings.num_steps))), 3) for f in (0, 0.1, 0.5, 0.9, 1)]}')
print(f'{settings.model_name}, {settings.num_steps} steps x {settings.tokens_per_step} tokens = '
      f'{settings.num_steps * settings.tokens_per_step:,} tokens per 1x budget')
print(f'MuonClip lrs {settings.muon_lrs}, AdamW lrs {settings.adamw_lrs}, AdamW budgets {settings.adamw_budgets}')
for run in ablations.sweep_runs(settings):
  print('  ' + ' '.join(ablations.command(run, GIN_FILES, settings, ROOT)[2:]))

# %% [markdown]
# ## Sweep, then AdamW's longer budgets (or reuse finished runs)

# %%
results = ablations.token_efficiency_study(GIN_FILES, ROOT, PARALLEL)

# %% [markdown]
# ## Validation loss against tokens, the sweep, the budgets

# %%
figure = ablations.plot_token_efficiency(results)

# %% [markdown]
# ## The numbers

# %%
for optimizer, points in results['sweep'].items():
  for point in sorted(points, key=lambda p: p['learning_rate']):
    best = ' (best)' if point['learning_rate'] == results['best_learning_rate'][optimizer] else ''
    print(f'{optimizer:9s} lr {point["learning_rate"]:<8g} final val loss {point["final_val_loss"]:.4f}{best}')
print(f'MuonClip: {results["muon_final_val_loss"]:.4f} after {results["muon_tokens"]:,} tokens')
for point in results['adamw_budgets']:
  print(f'AdamW   : {point["final_val_loss"]:.4f} after {point["tokens"]:,} tokens')
ratio = results['adamw_over_muon_token_ratio']
print(f'AdamW tokens to reach MuonClip\'s final loss / MuonClip tokens: '
      f'{f"{ratio:.2f}" if ratio else "outside the measured budgets"} ({results["ratio_method"]})')
