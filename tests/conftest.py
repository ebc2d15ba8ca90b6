"""Tests run on CPU with 8 fake devices, so mesh tests work on any laptop."""

import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402  (after the flags above)

jax.config.update('jax_default_matmul_precision', 'highest')


def pytest_addoption(parser):
  parser.addoption('--runslow', action='store_true', help='also run tests marked slow (minutes each)')


def pytest_configure(config):
  config.addinivalue_line('markers', 'slow: takes minutes on 2 cores; runs with --runslow')


def pytest_collection_modifyitems(config, items):
  import pytest
  if config.getoption('--runslow'):
    return
  skip = pytest.mark.skip(reason='slow: run with --runslow')
  for item in items:
    if 'slow' in item.keywords:
      item.add_marker(skip)
