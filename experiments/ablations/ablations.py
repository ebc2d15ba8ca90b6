"""MuonClip's claims at small scale: the runs, collecting their metrics.jsonl, the numbers and the plots.

Two studies (K2 report section 2.1; Moonlight, arXiv 2502.16982), each a set of `Run`s of the ordinary
pretraining launcher (`python -m experiments.pretrain`) on one size file (configs/tiny.gin, configs/small_gpu.gin)
plus one arm file (configs/arms/{muon,muonclip,adamw}.gin):

  qk_clip            vanilla Muon, MuonClip(TAU) and AdamW at one aggressive peak lr (QK_CLIP_LR): every step's
                     pre-clip max logit (largest head, and per layer), clipped heads, loss, validation loss; for
                     MuonClip also `max_logit_after_step`, the max logit of a forward with the weights the step
                     ended with (updated, then clipped) on the step's own batch (configs/arms/muonclip.gin).
  token_efficiency   MuonClip and AdamW each swept over peak lrs (MUON_LRS, ADAMW_LRS) at the 1x budget
                     (NUM_STEPS), then AdamW at its best lr for ADAMW_BUDGETS x NUM_STEPS, each a complete
                     warm-up/stable/decay run; the ratio is the tokens AdamW needs to reach MuonClip's best final
                     validation loss (interpolated in log tokens between budgets) over MuonClip's tokens.

Every run gets its own workdir, named by the run and a digest of its gin files and bindings, under a root
(default /tmp/k2_ablations); a finished workdir (`done.json`) is reused, so the driver and the notebooks share
runs. `python -m experiments.ablations.run` runs both studies and writes results/*.json and *.png.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys
import time

import gin

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join('experiments', 'ablations', 'configs')
TINY_GIN = os.path.join(CONFIGS, 'tiny.gin')
CI_GIN = os.path.join(CONFIGS, 'ci.gin')
ARMS = ('muon', 'muonclip', 'adamw')
DEFAULT_ROOT = '/tmp/k2_ablations'
COMPILATION_CACHE = os.path.expanduser('~/.cache/k2/jax_compilation_cache')


@dataclasses.dataclass(frozen=True)
class Settings:
  """What the size file (and any file after it) says: the trainer's shape of a run and the studies' knobs."""
  num_steps: int
  batch_size: int
  seq_len: int
  tau: float
  qk_clip_lr: float
  muon_lrs: tuple[float, ...]
  adamw_lrs: tuple[float, ...]
  adamw_budgets: tuple[float, ...]
  model_name: str
  model_config: object  # k2.config.ModelConfig

  @property
  def tokens_per_step(self) -> int:
    return self.batch_size * self.seq_len


@contextlib.contextmanager
def parsed(gin_files: list[str]):
  """The gin files parsed as the launcher parses them, for the duration of the block (gin-configured calls such
  as `recipe.schedule` and `recipe.optimizer` see the run's bindings); the config is cleared afterwards."""
  from k2 import gin_setup
  from k2.train import pretrain  # noqa: F401  (registers the pretraining stage's configurables)
  try:
    gin_setup.parse([os.path.join(ROOT, f) for f in gin_files], [])
    yield
  finally:
    gin.clear_config()


def read_settings(gin_files: list[str]) -> Settings:
  """Parses the gin files as the launcher would and reads the macros the studies need."""
  with parsed(gin_files):
    macro = lambda name: gin.query_parameter(f'%{name}')
    return Settings(num_steps=int(macro('NUM_STEPS')), batch_size=int(macro('BATCH_SIZE')),
                    seq_len=int(macro('SEQ_LEN')), tau=float(macro('TAU')), qk_clip_lr=float(macro('QK_CLIP_LR')),
                    muon_lrs=tuple(map(float, macro('MUON_LRS'))), adamw_lrs=tuple(map(float, macro('ADAMW_LRS'))),
                    adamw_budgets=tuple(map(float, macro('ADAMW_BUDGETS'))),
                    model_name=gin.query_parameter('model_config.name'),
                    model_config=gin.get_configurable('model_config')())


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run: an arm (configs/arms/<arm>.gin) at a peak learning rate for budget x NUM_STEPS steps."""
  arm: str
  learning_rate: float
  budget: float = 1.0

  def __post_init__(self):
    if self.arm not in ARMS:
      raise ValueError(f'arm must be one of {ARMS}, got {self.arm!r}')

  @property
  def name(self) -> str:
    return f'{self.arm}_lr{self.learning_rate:g}' + (f'_x{self.budget:g}' if self.budget != 1 else '')

  def num_steps(self, settings: Settings) -> int:
    return int(round(self.budget * settings.num_steps))

  def gin_files(self, gin_files: list[str]) -> list[str]:
    return [*gin_files, os.path.join(CONFIGS, 'arms', f'{self.arm}.gin')]

  def bindings(self, settings: Settings) -> list[str]:
    return [f'LEARNING_RATE = {self.learning_rate!r}', f'NUM_STEPS = {self.num_steps(settings)}']


def qk_clip_runs(settings: Settings) -> dict[str, Run]:
  return {arm: Run(arm, settings.qk_clip_lr) for arm in ARMS}


def sweep_runs(settings: Settings) -> list[Run]:
  return ([Run('muonclip', lr) for lr in settings.muon_lrs] + [Run('adamw', lr) for lr in settings.adamw_lrs])


def budget_runs(settings: Settings, adamw_lr: float) -> list[Run]:
  return [Run('adamw', adamw_lr, budget) for budget in settings.adamw_budgets]


# ---------------------------------------------------------------------------------------------------- running


STUDY_MACROS = ('QK_CLIP_LR', 'MUON_LRS', 'ADAMW_LRS', 'ADAMW_BUDGETS')  # read by the studies, not the trainer


def _trainer_lines(path: str) -> list[str]:
  """The lines of a gin file that can change a run: no blank or comment lines, no study macros."""
  with open(os.path.join(ROOT, path)) as f:
    lines = [line.strip() for line in f]
  return [line for line in lines if line and not line.startswith('#')
          and line.split('=')[0].strip() not in STUDY_MACROS]


def workdir(run: Run, gin_files: list[str], settings: Settings, root: str) -> str:
  """root/<run name>-<digest of the gin files and bindings>: a changed config never reuses a run (included files
  and the code are not part of the digest: start from a fresh root after changing those)."""
  digest = hashlib.sha1()
  for name in run.gin_files(gin_files):
    digest.update(repr(_trainer_lines(name)).encode())
  digest.update(repr(run.bindings(settings)).encode())
  return os.path.join(root, f'{run.name}-{digest.hexdigest()[:8]}')


def command(run: Run, gin_files: list[str], settings: Settings, root: str) -> list[str]:
  """The launcher command line of one run (cwd: the repo root)."""
  return ([sys.executable, '-m', 'experiments.pretrain', f'--workdir={workdir(run, gin_files, settings, root)}']
          + [f'--gin_file={f}' for f in run.gin_files(gin_files)]
          + [f'--gin_bindings={b}' for b in run.bindings(settings)])


def _env() -> dict[str, str]:
  env = dict(os.environ)
  # Every run compiles the same model init and eval step: share compiled executables through JAX's persistent
  # cache (keyed by the program, so a stale entry is never used).
  env.setdefault('JAX_COMPILATION_CACHE_DIR', COMPILATION_CACHE)
  env.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
  env['PYTHONPATH'] = os.pathsep.join(p for p in (ROOT, env.get('PYTHONPATH')) if p)
  return env


def code_version() -> str | None:
  """The repo's commit, marked when the code or configs differ from it (None outside a git checkout)."""
  try:
    commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.strip()
    changed = subprocess.run(['git', 'status', '--porcelain', '--', 'k2', 'experiments', 'configs'], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return None
  return commit + (' with uncommitted changes' if changed else '')


def run_all(runs: list[Run], gin_files: list[str], settings: Settings, root: str = DEFAULT_ROOT,
            parallel: int = 1, echo=print) -> dict[str, str]:
  """Runs (at most `parallel` at a time) every run whose workdir is not finished; returns {run name: workdir}.

  Each run's console output goes to <workdir>/train.log; a failed run raises with the end of its log."""
  workdirs = {run.name: workdir(run, gin_files, settings, root) for run in runs}
  pending = [run for run in dict.fromkeys(runs) if not os.path.exists(os.path.join(workdirs[run.name], 'done.json'))]
  active: list[tuple[Run, subprocess.Popen, float]] = []
  commit = code_version() if pending else None
  while pending or active:
    while pending and len(active) < parallel:
      run = pending.pop(0)
      os.makedirs(workdirs[run.name], exist_ok=True)
      log = open(os.path.join(workdirs[run.name], 'train.log'), 'w')
      process = subprocess.Popen(command(run, gin_files, settings, root), cwd=ROOT, env=_env(), stdout=log,
                                 stderr=subprocess.STDOUT)
      log.close()
      active.append((run, process, time.time()))
      echo(f'started {run.name} ({run.num_steps(settings)} steps) in {workdirs[run.name]}')
    time.sleep(0.5)
    for entry in list(active):
      run, process, start = entry
      pid, status, usage = os.wait4(process.pid, os.WNOHANG)  # like poll(), plus the run's CPU time
      if not pid:
        continue
      active.remove(entry)
      path, exit_code = workdirs[run.name], os.waitstatus_to_exitcode(status)
      if exit_code:
        for _, other, _ in active:
          other.terminate()
        with open(os.path.join(path, 'train.log')) as f:
          tail = f.read()[-3000:]
        raise RuntimeError(f'{run.name} failed (exit {exit_code}); end of {path}/train.log:\n{tail}')
      wall, cpu = time.time() - start, usage.ru_utime + usage.ru_stime
      with open(os.path.join(path, 'done.json'), 'w') as f:
        json.dump({'run': dataclasses.asdict(run), 'wall_seconds': wall, 'cpu_seconds': cpu, 'commit': commit,
                   'command': command(run, gin_files, settings, root)}, f, indent=1)
      echo(f'finished {run.name} in {wall:.0f}s ({cpu:.0f} CPU-s)')
  return workdirs


# ------------------------------------------------------------------------------------------------- collecting


def read_metrics(path: str) -> list[dict]:
  with open(os.path.join(path, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]


def collect(path: str, run: Run, settings: Settings) -> dict:
  """One run's metrics.jsonl as lists (every logged step; validation at EVAL_EVERY steps and the last step).

  `max_logit` at step s is measured by step s's own forward, before that step's update and clip: the weights step
  s - 1 ended with, on a new batch. `max_logit_after_step` (runs that measure it) is a forward with the weights step
  s ended with, on step s's batch."""
  records = read_metrics(path)
  steps = [r for r in records if 'loss' in r]
  evals = [r for r in records if 'eval_loss' in r]
  layers = sorted(int(k[len('max_logit_layer'):]) for k in steps[0] if k.startswith('max_logit_layer'))
  with open(os.path.join(path, 'done.json')) as f:
    done = json.load(f)
  result = {
      'optimizer': run.arm, 'learning_rate': run.learning_rate, 'budget': run.budget,
      'num_steps': run.num_steps(settings), 'tokens': run.num_steps(settings) * settings.tokens_per_step,
      'commit': done.get('commit'),
      'wall_seconds': round(done['wall_seconds'], 1),
      'cpu_seconds': round(done['cpu_seconds'], 1) if 'cpu_seconds' in done else None,
      'step': [r['step'] for r in steps],
      'loss': [r['loss'] for r in steps],
      'max_logit': [r['max_logit'] for r in steps],
      # [layer][step]: the largest pre-clip logit over the heads of each layer.
      'max_logit_per_layer': [[r[f'max_logit_layer{i}'] for r in steps] for i in layers],
      'clipped_heads': [int(r['clipped_heads']) for r in steps],
      'val_step': [r['step'] for r in evals],
      'val_tokens': [r['step'] * settings.tokens_per_step for r in evals],
      'val_loss': [r['eval_loss'] for r in evals],
      'final_val_loss': evals[-1]['eval_loss'],
  }
  if 'max_logit_after_step' in steps[0]:
    result['max_logit_after_step'] = [r['max_logit_after_step'] for r in steps]
  return result


def _device() -> str:
  import jax
  device = jax.devices()[0]
  cores = f', {os.cpu_count()} cores' if device.platform == 'cpu' else ''
  return f'{jax.device_count()} x {device.platform} ({device.device_kind}{cores})'


def run_config(gin_files: list[str], settings: Settings) -> dict:
  return {'gin_files': list(gin_files), 'model': settings.model_name,
          'num_layers': settings.model_config.num_layers, 'num_heads': settings.model_config.attention.num_heads,
          'num_steps': settings.num_steps, 'batch_size': settings.batch_size, 'seq_len': settings.seq_len,
          'tokens_per_step': settings.tokens_per_step, 'tokens': settings.num_steps * settings.tokens_per_step,
          'device': _device()}


def qk_clip_summary(arm: dict, tau: float) -> dict:
  """Peaks and threshold crossings of one arm's measured max logits.

  Every number is of measured forwards. `steps_over_tau` counts the steps whose own forward (before their update
  and clip) passed tau: from step 2 on, the weights the previous step ended with, on a new batch.
  `steps_over_tau_after_step` counts the steps whose final weights passed tau on their own batch; the
  `clipping_steps_*` counts are of the steps that clipped: their final weights over tau on their own batch, and
  the next step's forward (a new batch) over tau."""
  logits = arm['max_logit']
  over = [s for s, m in zip(arm['step'], logits) if m > tau]
  peak = max(range(len(logits)), key=lambda i: logits[i])
  clipped = [m for m, c in zip(logits, arm['clipped_heads']) if c]
  summary = {'peak_max_logit': logits[peak], 'peak_step': arm['step'][peak],
             'peak_over_tau_percent': 100 * (logits[peak] / tau - 1),
             'steps_over_tau': len(over), 'first_step_over_tau': over[0] if over else None,
             'mean_max_logit_last_10_steps': sum(logits[-10:]) / len(logits[-10:]),
             'clipped_head_steps': sum(arm['clipped_heads']),
             'steps_with_clipping': len(clipped),
             'mean_max_logit_of_clipping_steps': sum(clipped) / len(clipped) if clipped else None,
             'last_step_with_clipping': max((s for s, c in zip(arm['step'], arm['clipped_heads']) if c),
                                            default=None),
             'clipping_steps_next_forward_over_tau': sum(1 for c, m in zip(arm['clipped_heads'], logits[1:])
                                                         if c and m > tau)}
  if 'max_logit_after_step' in arm:
    after = arm['max_logit_after_step']
    summary['peak_max_logit_after_step'] = max(after)
    summary['steps_over_tau_after_step'] = sum(1 for m in after if m > tau)
    summary['clipping_steps_over_tau_after_step'] = sum(1 for c, m in zip(arm['clipped_heads'], after)
                                                        if c and m > tau)
  return summary


def qk_clip_study(gin_files: list[str], root: str = DEFAULT_ROOT, parallel: int = 1, echo=print) -> dict:
  """Runs (or reuses) the three QK-Clip arms and returns results/qk_clip.json's content."""
  settings = read_settings(gin_files)
  runs = qk_clip_runs(settings)
  workdirs = run_all(list(runs.values()), gin_files, settings, root, parallel, echo)
  arms = {arm: collect(workdirs[run.name], run, settings) for arm, run in runs.items()}
  for arm in arms.values():
    arm['summary'] = qk_clip_summary(arm, settings.tau)
  return {'tau': settings.tau, 'learning_rate': settings.qk_clip_lr, 'config': run_config(gin_files, settings),
          'arms': arms}


def tokens_to_reach(points: list[tuple[float, float]], target: float) -> tuple[float | None, str]:
  """(tokens, how) at which (tokens, final loss) points, sorted by tokens, first reach `target`: linear in
  log(tokens) between the two budgets around the crossing; None with a bound when outside the measured range."""
  points = sorted(points)
  if points[0][1] <= target:
    return None, f'<= {points[0][0]:.0f} (the smallest budget already reaches it)'
  for (t0, l0), (t1, l1) in zip(points, points[1:]):
    if l1 <= target:
      fraction = (l0 - target) / (l0 - l1)
      return math.exp(math.log(t0) + fraction * (math.log(t1) - math.log(t0))), (
          f'interpolated in log tokens between budgets {t0:.0f} and {t1:.0f}')
  return None, f'> {points[-1][0]:.0f} (not reached at the largest budget)'


def token_efficiency_study(gin_files: list[str], root: str = DEFAULT_ROOT, parallel: int = 1, echo=print) -> dict:
  """Sweeps, then AdamW's longer budgets; returns results/token_efficiency.json's content."""
  settings = read_settings(gin_files)
  sweep = sweep_runs(settings)
  workdirs = run_all(sweep, gin_files, settings, root, parallel, echo)
  runs = {run.name: collect(workdirs[run.name], run, settings) for run in sweep}
  best = {}
  for optimizer in ('muonclip', 'adamw'):
    candidates = [r for r in runs.values() if r['optimizer'] == optimizer]
    best[optimizer] = min(candidates, key=lambda r: r['final_val_loss'])['learning_rate']
  longer = budget_runs(settings, best['adamw'])
  workdirs.update(run_all(longer, gin_files, settings, root, parallel, echo))
  runs.update({run.name: collect(workdirs[run.name], run, settings) for run in longer})

  muon = runs[Run('muonclip', best['muonclip']).name]
  adamw_points = [(r['tokens'], r['final_val_loss']) for r in runs.values()
                  if r['optimizer'] == 'adamw' and r['learning_rate'] == best['adamw']]
  adamw_tokens, how = tokens_to_reach(adamw_points, muon['final_val_loss'])
  for r in runs.values():  # the curves are what the plots need; per-step logs stay in the workdirs
    r['peak_max_logit'], r['clipped_head_steps'] = max(r['max_logit']), sum(r['clipped_heads'])
    for key in ('step', 'loss', 'max_logit', 'max_logit_per_layer', 'clipped_heads', 'max_logit_after_step'):
      r.pop(key, None)
  return {
      'tau': settings.tau, 'config': run_config(gin_files, settings),
      'sweep': {opt: [{'learning_rate': r['learning_rate'], 'final_val_loss': r['final_val_loss']}
                      for r in runs.values() if r['optimizer'] == opt and r['budget'] == 1]
                for opt in ('muonclip', 'adamw')},
      'best_learning_rate': best,
      'muon_tokens': muon['tokens'], 'muon_final_val_loss': muon['final_val_loss'],
      'adamw_budgets': [{'tokens': t, 'final_val_loss': v} for t, v in sorted(adamw_points)],
      'adamw_tokens_to_match_muon': adamw_tokens,
      'adamw_over_muon_token_ratio': adamw_tokens / muon['tokens'] if adamw_tokens else None,
      'ratio_method': how,
      'runs': runs,
  }


def save_json(results: dict, path: str) -> None:
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  with open(path, 'w') as f:
    json.dump(results, f, indent=1)
    f.write('\n')


# ---------------------------------------------------------------------------------------------------- plotting

COLORS = {'muon': 'tab:red', 'muonclip': 'tab:blue', 'adamw': 'tab:green'}
LABELS = {'muon': 'vanilla Muon', 'muonclip': 'MuonClip', 'adamw': 'AdamW'}


def smooth(values: list[float], window: int) -> list[float]:
  """Trailing mean over `window` steps (the per-step training loss of packed source files is noisy)."""
  out, total = [], 0.0
  for i, v in enumerate(values):
    total += v - (values[i - window] if i >= window else 0.0)
    out.append(total / min(i + 1, window))
  return out


def plot_qk_clip(results: dict):
  """Top: max logit of every arm (largest head); MuonClip's around tau, with the forward of each step's final
  weights; clipped heads per step; loss. Bottom: each arm's per-layer max."""
  import matplotlib.pyplot as plt
  tau, arms = results['tau'], results['arms']
  fig, axes = plt.subplots(2, 4, figsize=(20, 8.5), constrained_layout=True)
  ax = axes[0, 0]
  for name, arm in arms.items():
    ax.plot(arm['step'], arm['max_logit'], color=COLORS[name], label=LABELS[name], lw=1)
  ax.axhline(tau, color='k', ls='--', lw=1, label=f'tau = {tau:g}')
  ax.set(title='max attention logit (largest head), step\'s own forward', xlabel='step', ylabel='max logit',
         yscale='log')
  ax.legend(fontsize=8)
  ax = axes[0, 1]
  for name, arm in arms.items():
    if 'max_logit_after_step' in arm:
      ax.plot(arm['step'], arm['max_logit'], color=COLORS[name], lw=1,
              label=f'{LABELS[name]}: step\'s own forward (weights of the step before, new batch)')
      ax.plot(arm['step'], arm['max_logit_after_step'], color='tab:orange', lw=1, alpha=0.8,
              label=f'{LABELS[name]}: the step\'s final weights on its own batch')
  ax.axhline(tau, color='k', ls='--', lw=1, label=f'tau = {tau:g}')
  ax.set(title='around tau: what the weights a step ended with produce', xlabel='step', ylabel='max logit')
  ax.legend(fontsize=7, loc='lower right')
  ax = axes[0, 2]
  for name, arm in arms.items():
    ax.plot(arm['step'], arm['clipped_heads'], color=COLORS[name], label=LABELS[name], lw=1)
  heads = results['config']['num_layers'] * results['config']['num_heads']
  ax.set(title=f'heads clipped per step (of {heads})', xlabel='step', ylabel='clipped heads')
  ax.legend(fontsize=8)
  ax = axes[0, 3]
  window = max(1, len(next(iter(arms.values()))['step']) // 20)
  for name, arm in arms.items():
    ax.plot(arm['step'], smooth(arm['loss'], window), color=COLORS[name], lw=1,
            label=f'{LABELS[name]} train ({window}-step mean)')
    ax.plot(arm['val_step'], arm['val_loss'], 'o--', color=COLORS[name], ms=3, lw=0.8,
            label=f'{LABELS[name]} val (final {arm["final_val_loss"]:.3f})')
  ax.set(title='loss (nats/token)', xlabel='step', ylabel='loss')
  ax.legend(fontsize=7)
  logits = [v for arm in arms.values() for layer in arm['max_logit_per_layer'] for v in layer]
  for ax, (name, arm) in zip(axes[1], arms.items()):
    for i, layer in enumerate(arm['max_logit_per_layer']):
      ax.plot(arm['step'], layer, lw=1, label=f'layer {i}' + (' (dense)' if i == 0 else ''))
    ax.axhline(tau, color='k', ls='--', lw=1)
    ax.set(title=f'{LABELS[name]}: max logit per layer (step\'s forward)', xlabel='step', ylabel='max logit',
           yscale='log', ylim=(0.9 * min(logits), 1.1 * max(logits)))
    ax.legend(fontsize=8)
  fig.delaxes(axes[1, 3])
  fig.suptitle(f'QK-Clip ablation: {results["config"]["model"]}, peak lr {results["learning_rate"]:g}, '
               f'{results["config"]["num_steps"]} steps x {results["config"]["tokens_per_step"]} tokens')
  return fig


def plot_token_efficiency(results: dict):
  """Validation loss against tokens (every run), the lr sweep, and AdamW's budgets against MuonClip's loss."""
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.8), constrained_layout=True)
  ax = axes[0]
  best = results['best_learning_rate']
  for name, run in results['runs'].items():
    is_best = run['learning_rate'] == best[run['optimizer']]
    ax.plot(run['val_tokens'], run['val_loss'], color=COLORS[run['optimizer']], marker='o', ms=2.5,
            lw=2 if is_best else 0.8, alpha=1 if is_best else 0.45,
            ls='-' if run['budget'] == 1 else '--', label=name)
  ax.axhline(results['muon_final_val_loss'], color='k', lw=0.8, ls=':')
  ax.set(title='validation loss vs training tokens', xlabel='tokens', ylabel='val loss (nats/token)')
  finals = [r['final_val_loss'] for r in results['runs'].values()]
  ax.set_ylim(min(finals) - 0.1, min(finals) + 1.5)
  ax.legend(fontsize=6, ncol=2)
  ax = axes[1]
  for optimizer, points in results['sweep'].items():
    points = sorted((p['learning_rate'], p['final_val_loss']) for p in points)
    ax.plot(*zip(*points), 'o-', color=COLORS[optimizer], label=f'{LABELS[optimizer]} (best {best[optimizer]:g})')
  ax.set(xscale='log', title=f'lr sweep: final val loss at {results["config"]["tokens"]:,} tokens',
         xlabel='peak learning rate', ylabel='final val loss')
  ax.legend(fontsize=8)
  ax = axes[2]
  tokens, losses = zip(*[(b['tokens'], b['final_val_loss']) for b in results['adamw_budgets']])
  ax.plot(tokens, losses, 'o-', color=COLORS['adamw'], label=f'AdamW, lr {best["adamw"]:g}, full schedule per budget')
  ax.plot([results['muon_tokens']], [results['muon_final_val_loss']], '*', ms=12, color=COLORS['muonclip'],
          label=f'MuonClip, lr {best["muonclip"]:g}')
  ax.axhline(results['muon_final_val_loss'], color=COLORS['muonclip'], lw=0.8, ls=':')
  ratio = results['adamw_over_muon_token_ratio']
  if ratio:
    ax.axvline(results['adamw_tokens_to_match_muon'], color='k', lw=0.8, ls='--',
               label=f'AdamW matches at {ratio:.2f}x the tokens')
  ax.set(xscale='log', title='tokens to reach MuonClip\'s final loss', xlabel='training tokens',
         ylabel='final val loss')
  ax.legend(fontsize=8)
  return fig
