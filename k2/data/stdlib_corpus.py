"""The embedded default corpus as a TFDS dataset: the Python standard library's source files of the running
interpreter. Real text that every machine running this code already has.

Each example is one `.py` file: {'text': its source, 'path': its path relative to the stdlib root}. Files go to
'validation' when the first byte of md5(relative path) mod 20 is 0 (about 5%), else to 'train': deterministic on
every machine with the same Python. The builder config is named after the interpreter version, so two Pythons
never share a prepared copy. `prepare(data_dir)` writes ArrayRecord files once (seconds); after that
`tfds.data_source('stdlib_source/py3_12_1', split=..., data_dir=...)` reads them with no TensorFlow installed.
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig

import tensorflow_datasets as tfds

from k2.config import ConfigError

_SKIP_DIRS = ('site-packages', '__pycache__', 'test', 'tests', 'idlelib')
CONFIG_NAME = 'py{}_{}_{}'.format(*sys.version_info[:3])


def split_of(relative_path: str) -> str:
  return 'validation' if hashlib.md5(relative_path.encode()).digest()[0] % 20 == 0 else 'train'


def source_files(root: str | None = None) -> list[str]:
  """Relative paths of the stdlib's .py files (tests and site-packages excluded), sorted."""
  root = root or sysconfig.get_paths()['stdlib']
  paths = []
  for directory, subdirs, files in os.walk(root):
    subdirs[:] = sorted(d for d in subdirs if d not in _SKIP_DIRS)
    paths += [os.path.relpath(os.path.join(directory, name), root) for name in sorted(files) if name.endswith('.py')]
  return paths


class StdlibSource(tfds.core.GeneratorBasedBuilder):
  """Python standard library source, one example per file."""

  VERSION = tfds.core.Version('1.0.0')
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=CONFIG_NAME, description=f'Python {sys.version.split()[0]}')]

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({'text': tfds.features.Text(), 'path': tfds.features.Text()}),
        description=__doc__)

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    root = sysconfig.get_paths()['stdlib']
    files = source_files(root)
    if not files:
      raise ConfigError(f'no .py files under {root}')
    return {split: self._generate_examples(root, [p for p in files if split_of(p) == split])
            for split in ('train', 'validation')}

  def _generate_examples(self, root: str, paths: list[str]):
    for path in paths:
      with open(os.path.join(root, path), 'rb') as f:
        text = f.read().decode('utf-8', errors='replace')
      if text.strip():
        yield path, {'text': text, 'path': path}


def prepare(data_dir: str) -> str:
  """Writes the corpus under data_dir once (a no-op when present); returns the TFDS name to read it by."""
  builder = StdlibSource(config=CONFIG_NAME, data_dir=os.path.expanduser(data_dir), file_format='array_record')
  if not builder.is_prepared():
    print(f'preparing the corpus (the Python standard library source, as a TFDS dataset in {data_dir}; once)',
          flush=True)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(verify_ssl=False))
  return f'stdlib_source/{CONFIG_NAME}'
