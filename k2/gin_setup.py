"""Gin for every stage launcher: parse config files plus command-line bindings, or fail with one line.

    from k2 import gin_setup
    gin_setup.parse(['configs/pretrain/tiny.gin'], ['NUM_STEPS = 50'])   # raises k2.config.ConfigError

Gin treats `NAME = value` as defining a macro, so a typo'd knob (`NUM_STEP = 10`) would silently define a new,
unused macro and the run would use the file's value. Here a binding may only set a macro that the parsed files
define; anything else is an error naming the known ones. Missing files, unknown configurables or parameters and
syntax errors are one-line errors too. The configurables must be registered (their modules imported) first.
"""

from __future__ import annotations

import os

import gin
from gin import config_parser

from k2.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # `include 'configs/...'` resolves from here


def _first_line(error: Exception) -> str:
  return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def defined_macros() -> set[str]:
  """Names of the macros in the current gin config (gin has no public list of them: read its binding table)."""
  bindings = gin.config._CONFIG  # pylint: disable=protected-access
  return {scope for scope, selector in bindings if selector == 'gin.macro'}


def _assigned_macros(binding: str) -> list[str]:
  """Macros that `binding` assigns (`NAME = value` has no parameter name), in order."""
  statements = config_parser.ConfigParser(binding, gin.config.ParserDelegate(skip_unknown=True))
  return [f'{s.scope}/{s.selector}' if s.scope else s.selector for s in statements
          if isinstance(s, config_parser.BindingStatement) and not s.arg_name]


def parse(files: list[str], bindings: list[str]) -> None:
  """Replaces the gin config with `files` (paths as given or from the repo root) then `bindings`, and locks it.

  Raises ConfigError (one line) for a missing file, a gin error in a file or binding, or a binding that assigns a
  macro none of the files define.
  """
  gin.clear_config()
  gin.add_config_file_search_path(ROOT)
  for name in files:
    if not os.path.isfile(name) and not os.path.isfile(os.path.join(ROOT, name)):
      raise ConfigError(f'bad gin config: no gin file {name}')
  try:
    gin.parse_config_files_and_bindings(files, None, finalize_config=False)
    known = defined_macros()
    for binding in bindings:
      unknown = [name for name in _assigned_macros(binding) if name not in known]
      if unknown:
        raise ConfigError(f'bad gin config: binding {binding.strip()!r} sets {unknown[0]}, which no gin file '
                          f'defines; known macros: {", ".join(sorted(known))}')
    gin.parse_config_files_and_bindings(None, bindings)
  except ConfigError:
    raise
  except (ValueError, OSError, KeyError, SyntaxError, NameError, TypeError) as e:
    raise ConfigError(f'bad gin config: {_first_line(e)}') from None
