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


class CorruptCheckpoint(Exception):
  """A checkpoint whose files cannot be read (truncated, corrupt, half-deleted); the message is one short line."""


def _reason(error: Exception) -> str:
  line = (str(error).strip().splitlines() or [type(error).__name__])[0]
  return line if len(line) <= 160 else line[:157] + '...'


def check_same_architecture(saved, config: ModelConfig, what: str, ignore: tuple[str, ...] = ()) -> None:
  """Raises ConfigError naming up to three differences when `saved` (a ModelConfig or its architecture() dict) is
  not `config`'s architecture; runtime switches (kernels, remat, compute dtype) may differ, and so may the
  components named in `ignore` (a later stage may change the RoPE, which stores no parameters)."""
  saved = _flatten(saved.architecture() if isinstance(saved, ModelConfig) else saved)
  ours = {k: v for k, v in _flatten(config.architecture()).items() if k.split('.')[0] not in ignore}
  # Keys only the saved config has are runtime fields of checkpoints written before RuntimeConfig existed.
  differences = [f'{key} {saved.get(key)!r} != {value!r}' for key, value in sorted(ours.items())
                 if saved.get(key) != value]
  if differences:
    raise ConfigError(f'{what} holds a different model ({", ".join(differences[:3])})')


class Checkpointer:
  """Saves and restores {state, data iterator (optional), meta} under `directory`."""

  def __init__(self, directory: str, *, every: int, keep: int = 3, async_save: bool = True, read_only: bool = False):
    self.directory, self.every = os.path.abspath(directory), max(1, every)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only, read_only=read_only,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={'state': ocp.PyTreeCheckpointHandler(), 'data': grain.checkpoint.CheckpointHandler(),
                       'meta': ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def check_compatible(self, config: ModelConfig, step: int | None = None, ignore: tuple[str, ...] = ()) -> None:
    """Raises ConfigError when checkpoint `step` (default: the latest) holds another architecture (it is left
    untouched; `ignore` as check_same_architecture), CorruptCheckpoint when its metadata cannot be read."""
    step = self.latest_step() if step is None else step
    if step is None:
      return
    try:
      meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
      saved = meta['model_config']
    except Exception as e:  # missing or corrupt files
      raise CorruptCheckpoint(f'{self.directory}/{step}: {_reason(e)}') from None
    check_same_architecture(saved, config, f'{self.directory}/{step}', ignore)

  def save(self, step: int, state, data_iterator, config: ModelConfig, *,
           force: bool = False) -> bool:
    """Starts saving (asynchronously) when `step` is a multiple of `every` or `force`; returns whether it did.
    data_iterator: a grain-checkpointable iterator saved beside the state, or None."""
    if not (force or step % self.every == 0) or step in self._manager.all_steps():
      return False
    items = {'state': ocp.args.PyTreeSave(state),
             'meta': ocp.args.JsonSave({'step': step, 'model_config': config.architecture()})}
    if data_iterator is not None:
      items['data'] = grain.checkpoint.CheckpointSave(data_iterator)
    return self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, step: int, abstract_state, data_iterator):
    """The state saved at `step` (placed like `abstract_state`'s shardings); moves data_iterator (if any) to that
    step. Raises CorruptCheckpoint when the files cannot be read."""
    items = {'state': ocp.args.PyTreeRestore(
        abstract_state, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))}
    if data_iterator is not None:
      items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:
      raise CorruptCheckpoint(f'{self.directory}/{step}: {_reason(e)}') from None
    return restored['state']

  def restore_model(self, step: int, params, buffers):
    """Only the model variables of the TrainState saved at `step` (for a later stage's init): (params, buffers)
    restored into the given abstract nnx.States."""
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # placed on one device; the stage shards it
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          {'params': params, 'buffers': buffers})
    args = ocp.args.PyTreeRestore(target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                  partial_restore=True)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(state=args))['state']
    except Exception as e:
      raise CorruptCheckpoint(f'{self.directory}/{step}: {_reason(e)}') from None
    return restored['params'], restored['buffers']

  def set_aside(self, step: int, destination: str) -> str:
    """Moves checkpoint `step` out of the managed directory into `destination` (never deletes it); returns where."""
    os.makedirs(destination, exist_ok=True)
    target = os.path.join(destination, str(step))
    suffix = 1
    while os.path.exists(target):
      target, suffix = os.path.join(destination, f'{step}.{suffix}'), suffix + 1
    os.rename(os.path.join(self.directory, str(step)), target)
    self._manager.reload()
    return target

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def abstract_like(state):
  """ShapeDtypeStructs (with shardings) of `state`, the restore target."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
