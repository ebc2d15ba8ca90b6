"""Resumable steps on disk: JSONL shards written atomically and a manifest of the complete ones.

    manifest = Manifest.open(out, config)           # ConfigError if `out` holds a run of another config
    if not manifest.complete('trajectories', 3):
      files = [write_jsonl(out / 'trajectories/trajectories-00003.jsonl', records)]
      manifest.record('trajectories', 3, files)     # the shard counts as done only from here on

A shard is written to `<path>.tmp`, flushed, fsynced and renamed over `<path>` (os.replace is atomic), so a reader
sees the whole shard or none of it; the manifest (`manifest.json`: the config, and per step and shard index the
files with their line count and sha256) is replaced the same way after each shard. A run killed at any point
restarts from its manifest: a leftover `.tmp` file, or a shard file the manifest does not list (killed between the
rename and the manifest update), is simply written again, and a listed shard is never rewritten. Shard contents are
a pure function of the config, so the rewrite is byte-identical to what the uninterrupted run would have written.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from k2.config import ConfigError

MANIFEST = 'manifest.json'


def _fsync_dir(path: pathlib.Path) -> None:
  """Makes a rename in `path` durable (the directory entry is data too)."""
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def write_atomic(path: pathlib.Path, data: bytes) -> None:
  """Writes `data` to `path` through `<path>.tmp` + fsync + os.replace: after a crash, `path` is old or new, whole."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + '.tmp')
  with open(tmp, 'wb') as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  _fsync_dir(path.parent)


def sha256(path: pathlib.Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


def write_jsonl(path: pathlib.Path, records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
  """One JSON object per line, written atomically; the manifest entry {'path' (relative name), 'count', 'sha256'}."""
  lines = [json.dumps(record, ensure_ascii=False, sort_keys=True) + '\n' for record in records]
  data = ''.join(lines).encode('utf-8')
  write_atomic(path, data)
  return {'path': path.name, 'count': len(lines), 'sha256': hashlib.sha256(data).hexdigest()}


def read_jsonl(path: pathlib.Path) -> list[dict[str, Any]]:
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f if line.strip()]


class Manifest:
  """`out/manifest.json`: {'config': ..., 'steps': {step: {str(index): [file entries]}}}. Paths in file entries
  are relative to the step's directory `out/<step>/`."""

  def __init__(self, out: pathlib.Path, data: dict[str, Any]):
    self.out = out
    self.data = data

  @classmethod
  def open(cls, out: str | os.PathLike, config: Mapping[str, Any]) -> 'Manifest':
    """The manifest of the run in `out` (a new one if there is none). A run of another config there is an error:
    mixing shards of two configs would make a dataset neither config describes."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads(json.dumps(dict(config)))  # as it reads back from JSON (tuples -> lists)
    path = out / MANIFEST
    if not path.exists():
      manifest = cls(out, {'config': config, 'steps': {}})
      manifest.save()
      return manifest
    data = json.loads(path.read_text())
    if data['config'] != config:
      raise ConfigError(f'{out} holds a synthesis run of another config ({data["config"]}, asked for {config}); '
                        'use a new --out directory or delete that one')
    return cls(out, data)

  def save(self) -> None:
    write_atomic(self.out / MANIFEST, json.dumps(self.data, indent=1, sort_keys=True).encode('utf-8'))

  def files(self, step: str, index: int) -> list[dict[str, Any]] | None:
    return self.data['steps'].get(step, {}).get(str(index))

  def complete(self, step: str, index: int) -> bool:
    """Whether shard `index` of `step` is done; ConfigError if a listed file is gone or no longer matches."""
    files = self.files(step, index)
    if files is None:
      return False
    for entry in files:
      path = self.out / step / entry['path']
      if not path.exists() or sha256(path) != entry['sha256']:
        raise ConfigError(f'{path} is listed complete in {self.out / MANIFEST} but is missing or changed; '
                          'delete the directory to start over')
    return True

  def record(self, step: str, index: int, files: Sequence[Mapping[str, Any]]) -> None:
    self.data['steps'].setdefault(step, {})[str(index)] = [dict(entry) for entry in files]
    self.save()

  def paths(self, step: str, name_prefix: str = '') -> list[pathlib.Path]:
    """The complete shard files of `step` (those whose name starts with `name_prefix`), in shard order."""
    shards = self.data['steps'].get(step, {})
    return [self.out / step / entry['path'] for index in sorted(shards, key=int) for entry in shards[index]
            if entry['path'].startswith(name_prefix)]

  def count(self, step: str, name_prefix: str = '') -> int:
    shards = self.data['steps'].get(step, {})
    return sum(entry['count'] for files in shards.values() for entry in files if entry['path'].startswith(name_prefix))
