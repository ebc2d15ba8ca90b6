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
# # QK-Clip at small scale
#
# The K2 report (section 2.1) trains with MuonClip: Muon, then after every update each attention head whose
# largest pre-softmax logit `S_max` passed `tau` has its query/key weights rescaled by `gamma = tau / S_max`
# (`k2/optim/qk_clip.py`). Its claims: with vanilla Muon max logits grow without bound (past 1000 in a 9B-activated
# MoE); QK-Clip holds them at `tau`, and at the aggressive `tau = 30` a 0.5B-activated MoE showed no loss difference.
#
# Three arms, same model, data, schedule and peak learning rate (`QK_CLIP_LR`, chosen aggressive so that logits
# grow): **vanilla Muon**, **MuonClip** (`tau = TAU`) and **AdamW**. Everything comes from one size file:
# `experiments/ablations/configs/tiny.gin` (k2_tiny, a 2-core CPU); set `SIZE` to
# `experiments/ablations/configs/small_gpu.gin` for k2_small on one H200. Runs already finished under `ROOT`
# (for instance by `python -m experiments.ablations.run`) are reused, so then this notebook only collects and plots.

# %%
import collections
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

import jax  # noqa: E402
from flax import nnx  # noqa: E402

from experiments.ablations import ablations  # noqa: E402
from k2 import model as model_lib  # noqa: E402
from k2.optim import param_labels  # noqa: E402
from k2.train import recipe  # noqa: E402

# %% tags=["parameters"]
SIZE = ablations.TINY_GIN  # the one file to change, e.g. 'experiments/ablations/configs/small_gpu.gin'
# CI (tests/test_notebooks.py) appends configs/ci.gin: a few steps of a 2-layer k2_tiny.
GIN_FILES = [SIZE] + ([ablations.CI_GIN] if os.environ.get('K2_NOTEBOOK_CI') else [])
ROOT = os.environ.get('K2_ABLATION_ROOT', ablations.DEFAULT_ROOT)
PARALLEL = int(os.environ.get('K2_ABLATION_PARALLEL', '1'))  # training processes at once

# %% [markdown]
# ## The model, the optimizer and one arm, in a few lines
# The size file gives the model config; `param_labels` splits the parameters between Muon (hidden matrices) and
# AdamW (embeddings, head, norms); `recipe.optimizer` builds MuonClip's optax transform. Each arm is one
# ordinary launcher command: the size file, an arm file (`configs/arms/*.gin`), the learning rate.
#
# Two choices the K2 report does not state, made by this code: Muon's momentum is Nesterov's (`k2/optim/muon.py`,
# `nesterov=True`: it orthogonalizes `mu * M_t + G_t`), and each MoE layer's router weight is a hidden matrix
# trained by Muon (`k2/optim/muonclip.py` `LABEL_RULES`; the router bias is set by the balancing rule only).

# %%
settings = ablations.read_settings(GIN_FILES)
params = nnx.state(model_lib.abstract(settings.model_config), nnx.Param)  # shapes only, nothing allocated
sizes, router_labels = collections.Counter(), set()
for (path, label), leaf in zip(jax.tree_util.tree_leaves_with_path(param_labels(params)), jax.tree.leaves(params)):
  sizes[label] += leaf.size
  if jax.tree_util.keystr(path).endswith("['router'].value"):
    router_labels.add(label)
with ablations.parsed(GIN_FILES):  # the runs' bindings: warm-up, decay, weight decay, momentum
  optimizer = recipe.optimizer(recipe.schedule(settings.qk_clip_lr, settings.num_steps), name='muonclip')
print(f'{settings.model_name}: {settings.model_config.num_layers} layers x {settings.model_config.attention.num_heads} '
      f'heads; parameters trained by Muon {sizes["muon"]:,}, by AdamW {sizes["adamw"]:,}')
print(f'router weights trained by: {sorted(router_labels)}')
print(f'{settings.num_steps} steps x {settings.tokens_per_step} tokens, peak lr {settings.qk_clip_lr:g}, '
      f'tau {settings.tau:g}')
runs = ablations.qk_clip_runs(settings)
print(' '.join(ablations.command(runs['muonclip'], GIN_FILES, settings, ROOT)))

# %% [markdown]
# ## Run the three arms (or reuse finished runs)

# %%
results = ablations.qk_clip_study(GIN_FILES, ROOT, PARALLEL)

# %% [markdown]
# ## Max logits, clipped heads, loss
# Everything plotted is measured by a forward pass. First panel: each step's largest logit (over all layers and
# heads) in the step's own forward, before its update and clip; from step 2 on that is the weights the previous step
# ended with, on a new batch. Second panel (MuonClip): the same series around tau, and a forward with the weights
# the step ended with (updated, then clipped) on the step's own batch (`train.measure_max_logit_after_step`).
# Bottom: each layer's largest logit in the step's own forward, per arm.

# %%
figure = ablations.plot_qk_clip(results)

# %% [markdown]
# ## The numbers

# %%
tau = results['tau']
print(f'tau = {tau:g}; "> tau": steps whose own forward (the previous step\'s final weights, a new batch) passed it')
print(f'{"arm":10s} {"peak max logit":>15s} {"steps > tau":>12s} {"first":>6s} {"peak after step":>16s} '
      f'{"after step > tau":>17s} {"clipped head-steps":>19s} {"final val loss":>15s}')
for name, arm in results['arms'].items():
  s = arm['summary']
  after = s.get('peak_max_logit_after_step')
  print(f'{name:10s} {s["peak_max_logit"]:15.2f} {s["steps_over_tau"]:12d} {str(s["first_step_over_tau"]):>6s} '
        f'{"-" if after is None else f"{after:.2f}":>16s} {str(s.get("steps_over_tau_after_step", "-")):>17s} '
        f'{s["clipped_head_steps"]:19d} {arm["final_val_loss"]:15.4f}')
clip, muon = results['arms']['muonclip']['summary'], results['arms']['muon']['summary']
print(f'peak max logit: MuonClip {clip["peak_max_logit"]:.2f} ({clip["peak_over_tau_percent"]:+.1f}% over tau), '
      f'vanilla Muon {muon["peak_max_logit"]:.2f} ({muon["peak_over_tau_percent"]:+.1f}%)')
print(f'MuonClip: of the {clip["steps_with_clipping"]} steps that clipped, '
      f'{clip["clipping_steps_over_tau_after_step"]} ended with weights over tau on their own batch and '
      f'{clip["clipping_steps_next_forward_over_tau"]} were followed by a forward over tau')
clip, muon = results['arms']['muonclip'], results['arms']['muon']
print(f'MuonClip final val loss vs vanilla Muon: '
      f'{100 * (clip["final_val_loss"] / muon["final_val_loss"] - 1):+.2f}%')
