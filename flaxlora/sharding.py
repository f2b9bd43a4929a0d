"""Device meshes, logical->mesh axis rules and shape-first placement.

Model code names *logical* axes on every parameter (`embed`, `mlp`, ...; see
`flaxlora.models.layers`). This module owns the one table that maps them to
the three mesh axes and places arrays straight into their shards:

    mesh = sharding.make_mesh({'data': 1, 'fsdp': -1, 'tensor': 1})
    rules = sharding.resolve_rules(config.get('sharding_rules'))
    base, axes = sharded.init(model, rng, mesh, rules)
    base_shardings = sharding.named_shardings(base, axes, mesh, rules)
    batch = distributed.global_batch(local_numpy_batch, mesh, rules)

(`flaxlora.models.sharded` and `flaxlora.distributed` place arrays; this
module only computes where.)

Mesh axes:
  data: pure data parallelism (params replicated along it).
  fsdp: data parallelism whose replicas also split params along `embed`
    (ZeRO-3 style; XLA all-gathers a kernel just before it is used).
  tensor: model parallelism along `mlp`, `heads` and `vocab`.
Logical axes are held as `PartitionSpec`s of logical names (flax's
convention, what `nn.get_partition_spec` returns), one per param leaf.
"""
import math
from typing import Any, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

MESH_AXES = ('data', 'fsdp', 'tensor')

# The one table: logical axis -> mesh axes (None: replicated). Overridable by
# `resolve_rules`.
RULES = (
    ('batch', ('data', 'fsdp')),
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('vocab', 'tensor'),
    ('lora_rank', None),
    ('prompt', None),
    ('relpos_buckets', None),
    ('relpos_heads', None),
    ('positions', None),
    ('token_types', None),
    ('classes', None),
)

Rules = tuple[tuple[str, Any], ...]
Tree = Any


def _config_get(config: Any, name: str, default: Any) -> Any:
  if config is None:
    return default
  if isinstance(config, Mapping):
    return config.get(name, default)
  return getattr(config, name, default)


def mesh_shape(sizes: Mapping[str, int] | Any,
               num_devices: int) -> tuple[int, int, int]:
  """Resolves mesh sizes (one may be -1, "the rest") against a device count.

  Args:
    sizes: a dict or ml_collections config with some of `data`, `fsdp`,
      `tensor` (missing ones are 1; all missing means all devices on `data`).
    num_devices: the global device count.

  Returns:
    (data, fsdp, tensor), whose product is `num_devices`.
  """
  given = {a: _config_get(sizes, a, None) for a in MESH_AXES}
  if all(v is None for v in given.values()):
    given['data'] = -1
  shape = [1 if v is None else int(v) for v in given.values()]
  text = ', '.join(f'{a}={s}' for a, s in zip(MESH_AXES, shape))
  rest = [i for i, s in enumerate(shape) if s == -1]
  if len(rest) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f'mesh sizes ({text}): each must be positive, and at '
                     'most one may be -1 ("the remaining devices").')
  known = math.prod(s for s in shape if s != -1)
  if rest:
    if num_devices % known:
      raise ValueError(
          f'mesh sizes ({text}): the fixed sizes multiply to {known}, which '
          f'does not divide the {num_devices} devices; pick sizes whose '
          f'product divides {num_devices}.')
    shape[rest[0]] = num_devices // known
  elif known != num_devices:
    raise ValueError(
        f'mesh sizes ({text}) multiply to {known}, but there are '
        f'{num_devices} devices; make the product {num_devices} or set one '
        'size to -1.')
  return tuple(shape)


def make_mesh(sizes: Mapping[str, int] | Any = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over all devices of all processes.

  Axis types are Auto, so `with_sharding_constraint` and jit's
  in/out_shardings behave as in classic GSPMD code (jax>=0.7 defaults to
  Explicit).

  Args:
    sizes: see `mesh_shape`; e.g. {'fsdp': -1} or a config's `mesh` field.
    devices: defaults to `jax.devices()` (every process's devices).
  """
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(sizes, len(devices))
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


# A config's `sharding_rules` value that keeps the table's rule.
DEFAULT_RULE = ''


def _parse_mesh_axes(logical: str, mesh_axes: Any) -> Any:
  """None, a mesh axis name or a tuple of them, from a rule's value.

  Command-line values arrive as text: 'None' (or 'none') replicates, and
  'data,fsdp' names several mesh axes.
  """
  if isinstance(mesh_axes, str):
    names = [n.strip() for n in mesh_axes.split(',') if n.strip()]
    if not names or names in (['None'], ['none']):
      return None
    mesh_axes = names[0] if len(names) == 1 else tuple(names)
  if isinstance(mesh_axes, list):
    mesh_axes = tuple(mesh_axes)
  names = (mesh_axes if isinstance(mesh_axes, tuple) else
           () if mesh_axes is None else (mesh_axes,))
  unknown = [n for n in names if n not in MESH_AXES]
  if unknown:
    raise ValueError(f'sharding rule {logical!r} -> {mesh_axes!r}: mesh '
                     f'axes {unknown} unknown; use {MESH_AXES} or None.')
  return mesh_axes


def resolve_rules(overrides: Mapping[str, Any] | Iterable | None = None
                  ) -> Rules:
  """`RULES` with some entries replaced or added.

  Args:
    overrides: {logical: mesh_axes} (a dict or ConfigDict, e.g. a config's
      `sharding_rules`) or (logical, mesh_axes) pairs, e.g.
      {'vocab': None} to replicate a vocabulary whose size the tensor axis
      does not divide. Mesh axes may be None, a name or a tuple of names,
      or text ('None', 'tensor', 'data,fsdp'); `DEFAULT_RULE` ('') keeps
      the table's rule.
  """
  table = dict(RULES)
  if overrides:
    # A dict or ml_collections.ConfigDict (not a Mapping), or pairs.
    pairs = overrides.items() if hasattr(overrides, 'items') else overrides
    for logical, mesh_axes in pairs:
      if isinstance(mesh_axes, str) and mesh_axes == DEFAULT_RULE:
        continue
      table[logical] = _parse_mesh_axes(logical, mesh_axes)
  return tuple(table.items())


def _mesh_axes_of(logical: str | None, table: dict[str, Any],
                  where: str) -> tuple[str, ...]:
  if logical is None:
    return ()
  if logical not in table:
    raise ValueError(
        f'{where}: logical axis {logical!r} has no sharding rule; add '
        f"({logical!r}, None) or a mesh axis to the rules (known: "
        f'{sorted(table)}).')
  mesh_axes = table[logical]
  if mesh_axes is None:
    return ()
  return mesh_axes if isinstance(mesh_axes, tuple) else (mesh_axes,)


def logical_to_spec(axes: PartitionSpec | Sequence[str | None],
                    rules: Rules, *, shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None, where: str = 'array',
                    drop_indivisible: bool = False) -> PartitionSpec:
  """Maps logical names to a mesh PartitionSpec, checking divisibility.

  A mesh axis already taken by an earlier dimension of the same array leaves
  the later dimension replicated (an array cannot use a mesh axis twice).
  With `shape` and `mesh`, each sharded dimension must divide by the product
  of its mesh axes' sizes; the error names `where` (the parameter path).
  With `drop_indivisible`, mesh axes that do not divide a dimension are
  left out instead (activations: a batch of 3 rows stays whole).
  """
  table = dict(rules)
  used, spec = set(), []
  for dim, logical in enumerate(tuple(axes)):
    mesh_axes = tuple(a for a in _mesh_axes_of(logical, table, where)
                      if a not in used)
    if mesh is not None:
      mesh_axes = tuple(a for a in mesh_axes if mesh.shape[a] > 1)
    if drop_indivisible and shape is not None and mesh is not None:
      kept = []
      for a in mesh_axes:
        if shape[dim] % math.prod(mesh.shape[b] for b in kept + [a]) == 0:
          kept.append(a)
      mesh_axes = tuple(kept)
    used.update(mesh_axes)
    if shape is not None and mesh is not None and mesh_axes:
      parts = math.prod(mesh.shape[a] for a in mesh_axes)
      if shape[dim] % parts:
        sizes = ', '.join(f'{a}={mesh.shape[a]}' for a in mesh_axes)
        raise ValueError(
            f'{where}: dimension {dim} ({logical!r}) has size {shape[dim]}, '
            f'which mesh axes {mesh_axes} ({sizes}) do not divide; shape '
            f'{tuple(shape)}. Change the mesh, or override the rule, e.g. '
            f'resolve_rules({{{logical!r}: None}}).')
    spec.append(mesh_axes[0] if len(mesh_axes) == 1 else
                mesh_axes if mesh_axes else None)
  return PartitionSpec(*spec)


def _path_str(path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)


def logical_axes(boxed: Tree) -> Tree:
  """PartitionSpecs of logical names from a tree of flax boxed params.

  Leaves that carry no names (plain arrays) get a fully replicated spec.
  """
  return nn.get_partition_spec(boxed)


def named_shardings(abstract: Tree, axes: Tree, mesh: Mesh,
                    rules: Rules) -> Tree:
  """NamedSharding per leaf of `abstract` (arrays or ShapeDtypeStructs).

  Args:
    abstract: params (or their shapes).
    axes: same structure, PartitionSpecs of logical names (see
      `logical_axes`).
    mesh: the device mesh.
    rules: logical -> mesh axes table.
  """
  def one(path, leaf, spec):
    where = f'parameter {_path_str(path)}'
    if len(spec) > len(leaf.shape):
      raise ValueError(f'{where}: logical axes {spec} name more dimensions '
                       f'than its shape {tuple(leaf.shape)} has.')
    mesh_spec = logical_to_spec(spec, rules, shape=leaf.shape, mesh=mesh,
                                where=where)
    return NamedSharding(mesh, mesh_spec)
  return jax.tree_util.tree_map_with_path(one, abstract, axes)


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int) -> NamedSharding:
  """Sharding of a [B, ...] batch array: B over the `batch` rule's axes."""
  spec = logical_to_spec(('batch',) + (None,) * (ndim - 1), rules,
                         mesh=mesh, where='batch')
  return NamedSharding(mesh, spec)


def abstract_sharded(tree: Tree, shardings: Tree) -> Tree:
  """ShapeDtypeStructs carrying target shardings (e.g. an orbax restore
  target, which then reads each shard's slice on its own device)."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      tree, shardings)


def optimizer_shardings(tx: Any, params: Tree, params_shardings: Tree,
                        mesh: Mesh) -> Tree:
  """Shardings of `tx.init(params)`: moments like their params, counts and
  other non-param leaves replicated.

  A state leaf belongs to the param whose key path ends its own key path
  (`mu/encoder/.../a` ends in `encoder/.../a`; under `peft.base.per_part`
  after the part index), which holds for optax's states and
  `multi_transform` (LoRA+) alike. A leaf
  whose shape is not its param's (Adafactor's factored row/column
  statistics, [in] and [out] of an [in, out] kernel, or its [1] stand-ins)
  is replicated: the param's spec names more dimensions than it has. Such
  leaves are small.

  Args:
    tx: an optax GradientTransformation.
    params: the params it optimises (arrays or ShapeDtypeStructs).
    params_shardings: same structure, NamedShardings.
    mesh: the device mesh.
  """
  abstract = jax.eval_shape(tx.init, params)
  replicated = NamedSharding(mesh, PartitionSpec())
  by_path = {}
  for (path, param), target in zip(
      jax.tree_util.tree_flatten_with_path(params)[0],
      jax.tree.leaves(params_shardings)):
    by_path[tuple(map(str, path))] = (tuple(param.shape), target)

  def one(path, leaf):
    keys = tuple(map(str, path))
    for start in range(len(keys)):
      # `per_part` states lead with the part index that their params' paths
      # start with.
      owner = by_path.get(keys[start:]) or by_path.get(keys[:1] +
                                                        keys[start:])
      if owner is not None:
        return owner[1] if owner[0] == tuple(leaf.shape) else replicated
    return replicated

  return jax.tree_util.tree_map_with_path(one, abstract)
