"""One row per parameter: shape, dtype, bytes, sharding, trainable, owner.

    s = summary.summary(base, adapter, method_names=method)
    print(s)          # plain text: leaves, totals by module, overall
    s                 # in Jupyter: an HTML table, one collapsible module each
    summary.tree_view({'base': base, 'adapter': adapter})   # treescope

`tree` holds the frozen base params; `adapter` the trainable ones (they live
apart: the optimizer sees the adapter only). With no adapter, every leaf of `tree` counts as
trainable (full fine-tuning). An NF4-quantised kernel (QLoRA's base,
`nf4.Nf4Kernel`) is one row of dtype 'nf4' with the kernel's [in, out] shape
and in*out params, and the bytes of the arrays it stores.
"""
import dataclasses
import math
import re
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding

from flaxlora.inspect import table
from flaxlora.inspect import tree as tree_lib
from flaxlora.peft import base as peft_base
from flaxlora.peft import lora
from flaxlora.peft import method_parts
from flaxlora.peft.qlora import nf4

BASE_OWNER = 'base'
LEAF_HEADERS = ('path', 'shape', 'dtype', 'params', 'bytes', 'bytes/device',
                'sharding', 'status', 'owner')
TOTAL_HEADERS = ('module', 'leaves', 'params', 'bytes', 'bytes/device',
                 'trainable', 'trainable %')


@dataclasses.dataclass(frozen=True)
class Row:
  """One parameter leaf.

  Attributes:
    path: "/"-joined tree path.
    shape: its shape.
    dtype: its dtype name ('nf4' for an NF4 kernel).
    size: number of elements (in * out for an NF4 kernel).
    nbytes: bytes stored, all shards together: size * itemsize (for an NF4
      kernel, its codes and scales).
    device_bytes: bytes of the largest shard one device holds.
    sharding: mesh PartitionSpec (`P(fsdp, tensor)`) for a NamedSharding
      that splits the array; else 'replicated', 'single device' or 'host'.
    trainable: whether the optimizer updates it (an adapter leaf).
    owner: 'base' or the name of the PEFT method the leaf belongs to.
  """
  path: str
  shape: tuple[int, ...]
  dtype: str
  size: int
  nbytes: int
  device_bytes: int
  sharding: str
  trainable: bool
  owner: str


@dataclasses.dataclass(frozen=True)
class Total:
  """Sums over a group of rows (a module, or everything)."""
  name: str
  leaves: int
  size: int
  nbytes: int
  device_bytes: int
  trainable_size: int
  trainable_nbytes: int

  @property
  def trainable_fraction(self) -> float:
    return self.trainable_size / self.size if self.size else 0.0


def sharding_of(leaf: Any) -> tuple[str, int]:
  """(readable sharding, bytes of the largest per-device shard) of a leaf."""
  shape, dtype = tree_lib.shape_dtype(leaf)
  nbytes = math.prod(shape) * dtype.itemsize
  sharding = getattr(leaf, 'sharding', None)
  if sharding is None:
    return ('host' if isinstance(leaf, np.ndarray) else '-'), nbytes
  shard_bytes = math.prod(sharding.shard_shape(shape)) * dtype.itemsize
  if isinstance(sharding, NamedSharding) and any(
      axis is not None for axis in sharding.spec):
    entries = []
    for axis in sharding.spec:
      if isinstance(axis, tuple):
        entries.append('(' + ', '.join(axis) + ')')
      else:
        entries.append(str(axis))
    return f'P({", ".join(entries)})', shard_bytes
  if len(sharding.device_set) == 1:
    return 'single device', shard_bytes
  if sharding.is_fully_replicated:
    return 'replicated', shard_bytes
  return str(sharding), shard_bytes


def method_name(config: Any, part: Any) -> str:
  """A short name for one (config, adapter) part of a PEFT method."""
  if isinstance(config, lora.LoraConfig):
    kinds = (['dora'] if config.use_dora else ['lora'])
    kinds += ['rslora'] if config.use_rslora else []
    kinds += [config.init] if config.init != 'default' else []
    return '+'.join(kinds)
  if config is not None:
    return type(config).__name__.removesuffix('Config').lower()
  leaves = list(tree_lib.flatten(part))
  return 'prompt' if leaves == ['prompt'] else 'adapter'


def _owners(adapter: Any, method_names: Any) -> list[tuple[str, str, Any]]:
  """(path, owner, leaf) for every adapter leaf.

  `method_names` is None, the `PeftMethod` that made the adapter (names come
  from its configs), a name for the whole adapter, a sequence of names (one
  per element of a chained adapter, a tuple or list; the element index is
  dropped from the paths) or {path regex: name} (`fullmatch`).
  """
  if isinstance(method_names, peft_base.PeftMethod):
    return [(path, method_name(config, part), leaf)
            for config, part in method_parts.parts(method_names, adapter)
            for path, leaf in tree_lib.flatten(part).items()]
  if isinstance(adapter, (tuple, list)) and not isinstance(method_names,
                                                           (str, Mapping)):
    names = (list(method_names) if method_names is not None else
             [f'adapter[{i}]' for i in range(len(adapter))])
    if len(names) != len(adapter):
      raise ValueError(
          f'method_names has {len(names)} names but the chained adapter has '
          f'{len(adapter)} parts; pass one name per part.')
    return [(path, name, leaf)
            for name, part in zip(names, adapter)
            for path, leaf in tree_lib.flatten(part).items()]
  flat = tree_lib.flatten(adapter)
  if method_names is None or isinstance(method_names, str):
    return [(p, method_names or 'adapter', x) for p, x in flat.items()]
  if not isinstance(method_names, Mapping):
    raise ValueError('method_names must be a name, one name per chained '
                     'adapter part, or {path regex: name}; got '
                     f'{type(method_names).__name__}.')
  rows = []
  for path, leaf in flat.items():
    owner = next((name for pattern, name in method_names.items()
                  if re.fullmatch(pattern, path)), None)
    if owner is None:
      raise ValueError(f'adapter leaf {path} matches no regex of '
                       f'method_names {list(method_names)}; add a pattern '
                       'for it (e.g. ".*": "lora").')
    rows.append((path, owner, leaf))
  return rows


def _leaves(tree: Any) -> dict[str, Any]:
  """{"a/b/c": leaf} in tree order, an `Nf4Kernel` counting as one leaf."""
  tree = nn.meta.unbox(tree)
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=nf4.is_nf4)[0]
  return {tree_lib.path_str(path): leaf for path, leaf in flat
          if leaf is not None}


def _nf4_row(path: str, kernel: nf4.Nf4Kernel, trainable: bool,
             owner: str) -> Row:
  """The [in, out] kernel's params, its stored arrays' bytes; the codes'
  sharding (the block scales follow their out axis)."""
  arrays = (kernel.codes, kernel.scale_codes, kernel.scale_scales,
            kernel.scale_offset)
  spec, _ = sharding_of(kernel.codes)
  device_bytes = sum(sharding_of(a)[1] for a in arrays)
  return Row(path, tuple(kernel.shape), 'nf4', math.prod(kernel.shape),
             kernel.nbytes(), device_bytes, spec, trainable, owner)


def _row(path: str, leaf: Any, trainable: bool, owner: str) -> Row:
  if nf4.is_nf4(leaf):
    return _nf4_row(path, leaf, trainable, owner)
  shape, dtype = tree_lib.shape_dtype(leaf)
  size = math.prod(shape)
  spec, device_bytes = sharding_of(leaf)
  return Row(path, shape, dtype.name, size, size * dtype.itemsize,
             device_bytes, spec, trainable, owner)


def _total(name: str, rows: Sequence[Row]) -> Total:
  return Total(
      name=name, leaves=len(rows), size=sum(r.size for r in rows),
      nbytes=sum(r.nbytes for r in rows),
      device_bytes=sum(r.device_bytes for r in rows),
      trainable_size=sum(r.size for r in rows if r.trainable),
      trainable_nbytes=sum(r.nbytes for r in rows if r.trainable))


def module_of(path: str, depth: int) -> str:
  return '/'.join(path.split('/')[:depth])


class Summary:
  """Rows, totals by module (first `depth` path parts) and overall."""

  def __init__(self, rows: Sequence[Row], depth: int = 2):
    self.rows = list(rows)
    self.depth = depth
    groups: dict[str, list[Row]] = {}
    for row in self.rows:
      groups.setdefault(module_of(row.path, depth), []).append(row)
    self.groups = groups
    self.modules = [_total(name, g) for name, g in groups.items()]
    self.total = _total('total', self.rows)

  @property
  def trainable_paths(self) -> list[str]:
    return [r.path for r in self.rows if r.trainable]

  @property
  def frozen_paths(self) -> list[str]:
    return [r.path for r in self.rows if not r.trainable]

  def _leaf_cells(self, rows: Sequence[Row]) -> list[list[str]]:
    return [[r.path, str(r.shape), r.dtype, f'{r.size:,}',
             table.human_bytes(r.nbytes), table.human_bytes(r.device_bytes),
             r.sharding, 'trainable' if r.trainable else 'frozen', r.owner]
            for r in rows]

  def _total_cells(self, totals: Sequence[Total]) -> list[list[str]]:
    return [[t.name, f'{t.leaves:,}', f'{t.size:,}',
             table.human_bytes(t.nbytes), table.human_bytes(t.device_bytes),
             f'{t.trainable_size:,}', f'{100 * t.trainable_fraction:.2f}%']
            for t in totals]

  def text(self, leaves: bool = True) -> str:
    """Plain-text tables: the leaves (optional), module totals, overall."""
    parts = [table.text(LEAF_HEADERS, self._leaf_cells(self.rows),
                        'parameters')] if leaves else []
    parts += [table.text(TOTAL_HEADERS, self._total_cells(self.modules),
                         f'totals by module (first {self.depth} path parts)'),
              table.text(TOTAL_HEADERS, self._total_cells([self.total]),
                         'overall')]
    return '\n\n'.join(parts)

  def __str__(self) -> str:
    return self.text()

  def _repr_html_(self) -> str:
    parts = ['<b>overall</b>',
             table.html_table(TOTAL_HEADERS, self._total_cells([self.total])),
             f'<b>modules</b> (first {self.depth} path parts; click to open)']
    for total in self.modules:
      line = (f'{total.name}: {total.size:,} params, '
              f'{table.human_bytes(total.nbytes)}, '
              f'{total.trainable_size:,} trainable')
      rows = self._leaf_cells(self.groups[total.name])
      parts.append(table.details(line, table.html_table(LEAF_HEADERS, rows)))
    return '\n'.join(parts)


def summary(tree: Any, adapter: Any = None, method_names: Any = None,
            depth: int = 2) -> Summary:
  """Tabulates every parameter leaf of `tree` and `adapter`.

  Args:
    tree: base params (arrays, ShapeDtypeStructs or flax boxed params; may
      hold adapted kernel nodes after a PEFT method's `apply`).
    adapter: trainable adapter params, or None (then `tree` is trainable).
    method_names: owner of the adapter leaves, see `_owners`.
    depth: number of leading path parts that name a module in the totals.

  Returns:
    A `Summary`; `str()` renders text, Jupyter renders HTML.
  """
  trainable_base = adapter is None
  rows = [_row(path, leaf, trainable_base, BASE_OWNER)
          for path, leaf in _leaves(tree).items()]
  if adapter is not None:
    rows += [_row(path, leaf, True, owner)
             for path, owner, leaf in _owners(adapter, method_names)]
  return Summary(rows, depth)


class _Html:
  """Displays a prepared HTML string in Jupyter."""

  def __init__(self, text: str):
    self.text = text

  def _repr_html_(self) -> str:
    return self.text


def tree_view(tree: Any, compressed: bool = True) -> _Html:
  """A collapsible treescope rendering of `tree` for Jupyter.

  `compressed` zips the page's payload (smaller notebooks; False keeps the
  HTML searchable).

  treescope is imported here, not at module import, so that the rest of
  `flaxlora.inspect` works without it.
  """
  try:
    import treescope  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError('summary.tree_view needs treescope; install it with '
                      '`pip install treescope`, or print summary() '
                      'instead.') from e
  return _Html(treescope.render_to_html(tree, compressed=compressed))
