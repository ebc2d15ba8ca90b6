"""JAX's multi-controller runtime: one process per host (TPU pod worker, GPU node or SLURM task).

`initialize()` starts it when this process is one of several, from explicit flags or from the environment
(`jax.distributed.initialize` itself detects TPU pods, SLURM and Open MPI). After it, `jax.devices()` lists every
chip of the job, meshes span hosts, each process feeds its share of the batch
(`jax.make_array_from_process_local_data` in k2.train.loop) and orbax writes and restores checkpoints sharded.
"""

from __future__ import annotations

import os

import jax


def _cluster_size_from_env() -> int:
  """Processes the environment says this job has (1 when it says nothing)."""
  for name in ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE', 'PMI_SIZE'):
    if os.environ.get(name, '').isdigit():
      return int(os.environ[name])
  hosts = os.environ.get('TPU_WORKER_HOSTNAMES', '')
  return len(hosts.split(',')) if hosts else 1


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
  """Starts the multi-controller runtime if this job has several processes; returns whether it did.

  coordinator_address ('host:port'), num_processes and process_id are given explicitly on clusters the
  environment does not describe; otherwise JAX reads them from the TPU / SLURM / MPI environment.
  """
  if coordinator_address is None and _cluster_size_from_env() <= 1:
    return False
  if os.environ.get('JAX_PLATFORMS', '').startswith('cpu'):
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # CPU hosts talk over gloo
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id)
  return True
