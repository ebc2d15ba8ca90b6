"""Convert between published checkpoints (config.json + safetensors) and orbax checkpoints.

    python -m k2.convert --from_hf DIR --to CKPT_DIR            # published -> orbax
    python -m k2.convert --from_ckpt CKPT_DIR --to_hf DIR       # orbax -> published

An orbax checkpoint directory holds `config.json` (the published format, so one reader serves both) and `state/`
(the model's nnx.State as a pure dict). Neither direction overwrites a non-empty destination.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import app, flags
from flax import nnx

from k2 import hf
from k2 import model as model_lib
from k2.config import ConfigError

_FROM_HF = flags.DEFINE_string('from_hf', None, 'Published checkpoint directory to read.')
_TO = flags.DEFINE_string('to', None, 'Orbax checkpoint directory to write (with --from_hf).')
_FROM_CKPT = flags.DEFINE_string('from_ckpt', None, 'Orbax checkpoint directory to read.')
_TO_HF = flags.DEFINE_string('to_hf', None, 'Published checkpoint directory to write (with --from_ckpt).')
_DTYPE = flags.DEFINE_enum('dtype', 'bfloat16', ['float32', 'bfloat16'], 'Parameter dtype to store.')


def _require_empty(path: str) -> None:
  if os.path.exists(path) and os.listdir(path):
    raise hf.CheckpointError(f'{path} is not empty; refusing to overwrite it')


def save_orbax(model: model_lib.Transformer, path: str) -> None:
  """Writes config.json and the model state under `path` (which must be empty or absent)."""
  path = os.path.abspath(path)
  _require_empty(path)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.join(path, 'state'), nnx.to_pure_dict(nnx.state(model)))
    checkpointer.wait_until_finished()
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump(hf.config_to_hf(model.config), f, indent=2)


def load_orbax(path: str, dtype=jnp.float32) -> model_lib.Transformer:
  """Reads a checkpoint written by `save_orbax` into a Transformer with parameters and compute in `dtype`."""
  path = os.path.abspath(path)
  dtype_name = jnp.dtype(dtype).name
  config = hf.read_config(path, dtype=dtype_name, param_dtype=dtype_name)
  graphdef, abstract_state = nnx.split(model_lib.abstract(config))
  target = nnx.to_pure_dict(abstract_state)
  with ocp.StandardCheckpointer() as checkpointer:
    try:
      restored = checkpointer.restore(os.path.join(path, 'state'), target)
    except (ValueError, FileNotFoundError, KeyError) as e:
      raise hf.CheckpointError(f'cannot restore {path}/state for its config.json: {str(e).splitlines()[0]}') from None
  nnx.replace_by_pure_dict(abstract_state, restored)
  return nnx.merge(graphdef, abstract_state)


def main(argv):
  del argv
  dtype = jnp.dtype(_DTYPE.value)
  try:
    if _FROM_HF.value and _TO.value:
      save_orbax(hf.load(_FROM_HF.value, dtype=dtype), _TO.value)
      print(f'wrote orbax checkpoint {_TO.value}')
    elif _FROM_CKPT.value and _TO_HF.value:
      _require_empty(_TO_HF.value)
      hf.save(load_orbax(_FROM_CKPT.value, dtype=dtype), _TO_HF.value)
      print(f'wrote published checkpoint {_TO_HF.value}')
    else:
      sys.exit('error: give --from_hf DIR --to CKPT_DIR, or --from_ckpt CKPT_DIR --to_hf DIR')
  except (ConfigError, hf.CheckpointError) as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  jax.config.update('jax_platforms', 'cpu')
  app.run(main)
