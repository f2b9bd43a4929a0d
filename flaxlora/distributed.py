"""Running one program over several processes (hosts) with `jax.distributed`.

Every process runs the same program. Call `initialize_distributed()` first
thing, before any other JAX call:

  * TPU pod slices, Slurm job steps (`srun`, e.g. a multi-node task of
    `experiments.sweep --launch=slurm`) and Open MPI jobs: no arguments;
    JAX finds the coordinator, the process count and this process's id
    itself (on Slurm from SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID and the
    first node of SLURM_STEP_NODELIST).
  * Anything else (several GPU hosts, several CPU processes): pass, or set in
    the environment, the coordinator's `host:port` (JAX_COORDINATOR_ADDRESS),
    the number of processes (JAX_NUM_PROCESSES) and this process's id
    (JAX_PROCESS_ID, 0 on the coordinator).

Afterwards `jax.devices()` lists the devices of all processes, and
`sharding.make_mesh` builds a mesh over them. The rest of this module moves
arrays between hosts and such a mesh: `host_to_global` and `global_batch`
(host numpy -> global arrays, each device reading only its slice) and
`to_host` (global arrays -> numpy on every process). Sharded model init and
slice-wise checkpoint loading are `flaxlora.models.sharded`.
"""
import importlib.util
import math
import os
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from flaxlora import sharding

Tree = Any

def _env_int(name: str, value: int | None) -> int | None:
  """`value`, else the integer in environment variable `name`, else None."""
  if value is not None:
    return int(value)
  text = os.environ.get(name, '')
  if not text:
    return None
  try:
    return int(text)
  except ValueError:
    raise ValueError(f'environment variable {name}={text!r} must be an '
                     'integer.') from None


def tpu_attached() -> bool:
  """Whether this host is a TPU VM: libtpu installed and TPU chips on its
  PCI bus. libtpu alone (`pip install "flaxlora[tpu]"` on a CPU machine,
  for `experiments.plan`'s ahead-of-time compiles) is not a TPU host."""
  if importlib.util.find_spec('libtpu') is None:
    return False
  # pylint: disable-next=g-import-not-at-top
  from jax._src import hardware_utils  # what jax's own TPU detection reads
  return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0


def _auto_detectable() -> bool:
  """Whether JAX can find the job by itself: a TPU VM (`tpu_attached`), a
  task of a Slurm job step (`srun`) of several tasks, or an Open MPI launch
  of several processes."""
  if tpu_attached():
    return True
  if os.environ.get('SLURM_STEP_NODELIST') and os.environ.get('SLURM_PROCID'):
    # JAX reads SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID and the step's
    # first node (SLURM_STEP_NODELIST), the coordinator.
    return (_env_int('SLURM_NTASKS', None) or 1) > 1
  return (_env_int('OMPI_COMM_WORLD_SIZE', None) or 1) > 1


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None,
                           local_device_ids: Any = None) -> bool:
  """Joins this process to a multi-process JAX job, when there is one.

  Arguments left None come from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES
  and JAX_PROCESS_ID. With none of them set, JAX's own detection runs on a
  TPU pod slice, SLURM or Open MPI; otherwise this is a single-process run
  and nothing happens.

  Args:
    coordinator_address: 'host:port' of process 0, reachable by all.
    num_processes: number of processes in the job.
    process_id: this process's index in [0, num_processes).
    local_device_ids: restricts this process to some local devices (e.g.
      one process per GPU).

  Returns:
    True when the job spans several processes.
  """
  if jax.distributed.is_initialized():
    return jax.process_count() > 1
  address = coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS')
  count = _env_int('JAX_NUM_PROCESSES', num_processes)
  index = _env_int('JAX_PROCESS_ID', process_id)
  explicit = (address, count, index)
  if all(v is None for v in explicit):
    if not _auto_detectable():
      return False
    jax.distributed.initialize(local_device_ids=local_device_ids)
    return jax.process_count() > 1
  if any(v is None for v in explicit):
    raise ValueError(
        'multi-process run needs all of coordinator_address '
        f'(JAX_COORDINATOR_ADDRESS, got {address!r}), num_processes '
        f'(JAX_NUM_PROCESSES, got {count!r}) and process_id '
        f'(JAX_PROCESS_ID, got {index!r}); set the missing ones, or none '
        'of them for a single process.')
  if not 0 <= index < count:
    raise ValueError(f'process_id {index} must be in [0, num_processes='
                     f'{count}).')
  jax.distributed.initialize(coordinator_address=address,
                             num_processes=count, process_id=index,
                             local_device_ids=local_device_ids)
  return count > 1


def is_main_process() -> bool:
  """True on the process that writes logs, summaries and exports."""
  return jax.process_index() == 0


def sync(name: str) -> None:
  """Waits until every process reaches the barrier `name`."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def to_host(tree: Any) -> Any:
  """Full numpy copies of (possibly multi-process) global arrays, on every
  process. Collective: all processes must call it with the same tree."""
  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
  return jax.tree.map(one, tree)


def host_to_global(host: Tree, shardings: Tree,
                   dtype: Any = np.float32) -> Tree:
  """Places host arrays into sharded global arrays, one slice per device.

  Each device's callback reads only its own slice (`host[index]`), so a
  memory-mapped numpy array or a lazy slicer (see `models.sharded.load`) is never
  copied whole onto one device. Every process must hold (or be able to
  read) the full host tree.

  Args:
    host: numpy arrays, or objects with `.shape` and `__getitem__(slices)`.
    shardings: same structure, NamedShardings.
    dtype: dtype of the result.
  """
  def one(value, target):
    return jax.make_array_from_callback(
        tuple(value.shape), target,
        lambda index: np.asarray(value[index], dtype))
  return jax.tree.map(one, host, shardings,
                      is_leaf=lambda x: hasattr(x, 'shape'))


def global_batch(local_batch: Tree, mesh: Mesh,
                 rules: sharding.Rules) -> Tree:
  """Global [B, ...] arrays from each process's local [B / processes, ...].

  Each process passes the rows its own devices hold (its share of the global
  batch, in process order); `jax.make_array_from_process_local_data` joins
  them without any cross-host copy.
  """
  def one(x):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(
        sharding.batch_sharding(mesh, rules, x.ndim), x)
  return jax.tree.map(one, local_batch)


def process_rows(mesh: Mesh, rules: sharding.Rules,
                 global_batch_size: int) -> slice:
  """The rows of a global batch that this process feeds to `global_batch`.

  Args:
    mesh: the device mesh.
    rules: logical -> mesh axes table (the `batch` rule splits rows).
    global_batch_size: B, summed over all processes.
  """
  target = sharding.batch_sharding(mesh, rules, 1)
  axes = target.spec[0] or ()
  axes = axes if isinstance(axes, tuple) else (axes,)
  parts = math.prod(mesh.shape[a] for a in axes)
  if global_batch_size % parts:
    raise ValueError(f'global batch size {global_batch_size} must divide by '
                     f'the {parts} batch shards of mesh {dict(mesh.shape)} '
                     "(the 'batch' rule's axes).")
  rows = set()
  for index in target.addressable_devices_indices_map(
      (global_batch_size,)).values():
    rows.update(range(*index[0].indices(global_batch_size)))
  lo, hi = min(rows), max(rows) + 1
  if len(rows) != hi - lo:
    raise ValueError(f'mesh {dict(mesh.shape)} gives this process '
                     'non-contiguous batch rows; put the batch axes first '
                     'in the mesh device order.')
  return slice(lo, hi)
