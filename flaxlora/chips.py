"""The accelerators a train step is planned for: TPU slices, or this host.

    t = chips.target('v5e-16')   # 16 TPU v5e chips, topology 'v5e:4x4'
    device_list = chips.devices(t)

A `Target` names a slice (its chip, its topology) or the host ('cpu');
`devices` gives its devices: the host's, or a slice's compile-only devices
from libtpu (`jax.experimental.topologies`), which a CPU-only machine can
compile for. Chip figures (`CHIPS`) are Google's published per-chip specs
(bf16 peak, HBM size and bandwidth): cloud.google.com/tpu/docs/v5e, /v5p,
/v4.
"""
import dataclasses
import importlib.util
import math
import os
from typing import Any

import jax

from flaxlora import errors

GIB = 2**30
INSTALL = "pip install 'flaxlora[tpu]' (or pip install 'jax[tpu]==0.10.2')"


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator chip (None: not known, e.g. a CPU's peak).

  Attributes:
    name: e.g. 'TPU v5e'.
    peak_flops: bf16 FLOP/s.
    hbm_bandwidth: HBM bytes/s.
    hbm_bytes: HBM capacity.
    dims: the slice topology's dimensions (2 for v5e's 2D torus, 3 for
      v4/v5p's 3D one).
    cores_in_name: whether a slice name counts TensorCores (v4-32 is 16
      chips of 2 cores) rather than chips (v5e-16 is 16 chips).
  """
  name: str
  peak_flops: float | None
  hbm_bandwidth: float | None
  hbm_bytes: int
  dims: int = 2
  cores_in_name: bool = False


CHIPS = {
    'v5e': Chip('TPU v5e', 197e12, 819e9, 16 * GIB),
    'v5p': Chip('TPU v5p', 459e12, 2765e9, 95 * GIB, dims=3,
                cores_in_name=True),
    'v4': Chip('TPU v4', 275e12, 1200e9, 32 * GIB, dims=3,
               cores_in_name=True),
}


@dataclasses.dataclass(frozen=True)
class Target:
  """Where the step is planned: a TPU slice, or this host ('cpu').

  Attributes:
    name: as given, e.g. 'v5e-16'.
    kind: a key of CHIPS, or 'cpu'.
    chip: the chip's figures.
    shape: the slice's chips along each dimension (() for the host).
    chips: number of chips (devices).
  """
  name: str
  kind: str
  chip: Chip
  shape: tuple[int, ...]
  chips: int

  @property
  def topology(self) -> str:
    """libtpu's topology name, e.g. 'v5e:4x4' ('' for the host)."""
    if not self.shape:
      return ''
    return f'{self.kind}:' + 'x'.join(map(str, self.shape))


def topology_shape(chips: int, dims: int) -> tuple[int, ...]:
  """Google's slice shape of `chips` chips: v5e 2D (16 -> 4x4), v4/v5p 3D
  from 2x2x1 (16 -> 2x2x4, 64 -> 4x4x4): the smallest side (the last one
  on ties) doubles."""
  smallest = 1 if dims == 2 else 4
  if chips < smallest or chips & (chips - 1):
    raise ValueError(f'a slice of {chips} chips: use a power of two, at '
                     f'least {smallest}.')
  shape = [1] * dims if dims == 2 else [2, 2, 1]
  while math.prod(shape) < chips:
    side = min(shape)
    shape[max(i for i, s in enumerate(shape) if s == side)] *= 2
  return tuple(shape)


def target(name: str) -> Target:
  """A target from its name: 'cpu', a slice 'v5e-16', 'v5p-128', 'v4-32'
  (v4/v5p names count TensorCores, 2 per chip), or a topology 'v5e:4x4'."""
  if name == 'cpu':
    count = len(jax.devices('cpu'))
    return Target('cpu', 'cpu', _host_chip(count), (), count)
  kind, sep, size = name.partition(':' if ':' in name else '-')
  if not sep or kind not in CHIPS:
    raise ValueError(f'--target={name!r}: use cpu, or a TPU slice such as '
                     f'v5e-16, v5p-128, v4-32 or v5e:4x4 (chips: '
                     f'{sorted(CHIPS)}).')
  chip = CHIPS[kind]
  try:
    if sep == ':':
      shape = tuple(int(s) for s in size.split('x'))
    else:
      count = int(size)
      if chip.cores_in_name and count % 2:
        raise ValueError
      shape = topology_shape(count // 2 if chip.cores_in_name else count,
                             chip.dims)
  except ValueError:
    raise ValueError(f'--target={name!r}: the size must be a power of two '
                     f'(e.g. {kind}-16) or a shape (e.g. {kind}:'
                     f'{"x".join(["2"] * chip.dims)}).') from None
  if len(shape) != chip.dims:
    raise ValueError(f'--target={name!r}: a {chip.name} slice has '
                     f'{chip.dims} dimensions.')
  return Target(name, kind, chip, shape, math.prod(shape))


def _host_chip(num_devices: int) -> Chip:
  """This host as a 'chip': its memory split over its XLA devices."""
  memory = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  return Chip('cpu', None, None, memory // num_devices)


def libtpu_installed() -> bool:
  return importlib.util.find_spec('libtpu') is not None


def devices(t: Target) -> list[Any]:
  """The target's devices: the host's, or a TPU slice's compile-only ones.

  Raises:
    errors.UserError: a TPU target without libtpu (names the install).
  """
  if t.kind == 'cpu':
    return jax.devices('cpu')
  if not libtpu_installed():
    raise errors.UserError(f'--target={t.name} needs the TPU compiler '
                           f'(libtpu), which is not installed: {INSTALL}.')
  # Only compiles: other processes may hold libtpu's lock file, and there is
  # no TPU to describe (the variables keep libtpu's start-up quiet).
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
  os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
  os.environ.setdefault('TPU_ACCELERATOR_TYPE', _accelerator_type(t))
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  options = {}
  if t.chips < 4:  # smaller than libtpu's default host (2x2x1 chips)
    options['chips_per_host_bounds'] = list(t.shape + (1, 1))[:3]
  if t.chip.cores_in_name:
    options['chip_config_name'] = 'megacore'  # one device per chip
  return list(topologies.get_topology_desc(
      platform='tpu', topology_name=t.topology, **options).devices)


def _accelerator_type(t: Target) -> str:
  cores = t.chips * 2 if t.chip.cores_in_name else t.chips
  return f'v5litepod-{t.chips}' if t.kind == 'v5e' else f'{t.kind}-{cores}'
