"""Orbax checkpoints of a training run: the TrainState, the grain iterator's position, and the model config.

    workdir/checkpoints/<step>/{state, data, meta}

Saves are asynchronous (the step loop continues while files are written) and only every `every` steps or when
forced (preemption, the end of the run); the last `keep` are kept. Orbax writes each checkpoint into a temporary
directory and renames it when complete, so a process killed mid-save leaves no directory that `latest_step`
would pick: resume always starts from the last complete checkpoint.
"""

from __future__ import annotations

import os

import grain
import jax
import orbax.checkpoint as ocp

from k2.config import ConfigError, ModelConfig

def _flatten(tree: dict, prefix: str = '') -> dict:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


class Checkpointer:
  """Saves and restores {state, data iterator, meta} under `directory`."""

  def __init__(self, directory: str, *, every: int, keep: int = 3, async_save: bool = True):
    self.directory, self.every = os.path.abspath(directory), max(1, every)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={'state': ocp.StandardCheckpointHandler(), 'data': grain.checkpoint.CheckpointHandler(),
                       'meta': ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def check_compatible(self, config: ModelConfig) -> None:
    """Raises ConfigError when the latest checkpoint holds another architecture (it is left untouched); the
    runtime (kernels, remat, compute dtype) may differ."""
    step = self.latest_step()
    if step is None:
      return
    try:
      meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
    except Exception as e:  # missing or corrupt files
      raise ConfigError(f'checkpoint {self.directory}/{step} is unreadable: {str(e).splitlines()[0]}') from None
    # Keys only the saved config has are runtime fields of checkpoints written before RuntimeConfig existed.
    saved, ours = _flatten(meta['model_config']), _flatten(config.architecture())
    differences = [f'{key} {saved.get(key)!r} != {value!r}' for key, value in sorted(ours.items())
                   if saved.get(key) != value]
    if differences:
      raise ConfigError(f'{self.directory} holds a checkpoint of a different model ({", ".join(differences[:3])}); '
                        'use another --workdir')

  def save(self, step: int, state, data_iterator, config: ModelConfig, *,
           force: bool = False) -> bool:
    """Starts saving (asynchronously) when `step` is a multiple of `every` or `force`; returns whether it did."""
    if not (force or step % self.every == 0) or step in self._manager.all_steps():
      return False
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=grain.checkpoint.CheckpointSave(data_iterator),
                              meta=ocp.args.JsonSave({'step': step, 'model_config': config.architecture()}))
    return self._manager.save(step, args=args, force=True)

  def restore(self, step: int, abstract_state, data_iterator):
    """The state saved at `step` (placed like `abstract_state`'s shardings); moves data_iterator to that step."""
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=grain.checkpoint.CheckpointRestore(data_iterator)))
    except Exception as e:
      raise ConfigError(f'checkpoint {self.directory}/{step} cannot be restored: {str(e).splitlines()[0]}') from None
    return restored['state']

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def abstract_like(state):
  """ShapeDtypeStructs (with shardings) of `state`, the restore target."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
