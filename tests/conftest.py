"""Tests run on CPU with 8 fake devices, so mesh tests work on any laptop."""

import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402  (after the flags above)

jax.config.update('jax_default_matmul_precision', 'highest')
