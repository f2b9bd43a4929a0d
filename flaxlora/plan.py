"""Ahead-of-time plan of a config's train step on a TPU slice or the host.

    report = plan.plan(config, plan.target('v5e-16'))
    print(plan.table([report]))

The real train step (`trainer.train_step_fn`: the task's loss, the PEFT
method, the optimizer, accumulation and clipping, the config's mesh and
sharding rules) is lowered on abstract params (`jax.eval_shape` of the same
`build.model_and_method` a run calls: no weight read, nothing allocated) and
compiled by the target's own compiler: for a TPU slice, the TPU compiler of
libtpu over the slice's compile-only devices
(`jax.experimental.topologies`), which runs on a CPU-only machine. The
compiler's figures give, per chip:

  memory   base params, adapter, optimizer state, batch (the arguments),
           temporaries (activations, gradients, workspace), and the total
           the compiler places in HBM, vs the chip's HBM;
  FLOPs    of the compiled (partitioned) step, and the model's useful FLOPs:
           the step traced without rematerialisation (`model.remat` 'none'),
           so recomputed forward passes are not counted as useful work;
  time     the roofline: max(FLOPs / peak, HBM bytes accessed / bandwidth)
           and the MFU it implies (useful FLOPs / (roofline time x peak)).

`largest_batch` bisects the global batch size over compiles. Chip figures
(`CHIPS`) are Google's published per-chip specs (bf16 peak, HBM size and
bandwidth): cloud.google.com/tpu/docs/v5e, /v5p, /v4.
"""
import dataclasses
import importlib.util
import math
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from flaxlora import build
from flaxlora import errors
from flaxlora import optimizers
from flaxlora import sharding
from flaxlora import tasks
from flaxlora import trainer
from flaxlora.models import hf_io
from flaxlora.models import presets
from flaxlora.peft import base as peft_base

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
    return f'{self.kind}:' + 'x'.join(map(str, self.shape)) if self.shape else ''


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


def without_weights(config: Any) -> ml_collections.ConfigDict:
  """A copy of `config` whose model is built from `model.init`: a
  `model.path` is replaced by its config.json (`presets.CONFIGS` for a known
  hub id, offline), so no weight is read."""
  config = ml_collections.ConfigDict(config.to_dict())
  path = config.model.path
  if path:
    spec = presets.config_json(path)
    if spec is None:
      folder = hf_io.resolve(build.resolve_path(path))
      spec = hf_io.read_config(folder)
    config.model.init = spec
    config.model.path = ''
  return config


# The train batch of each task (flaxlora.data): name -> (its length: a
# field of config.data, 'sequence' for a causal LM's prompt + response
# (max_source_length + max_target_length; the prompt template's own tokens
# left out), None for one value per row; dtype). Every batch also has
# 'index' (int32) and 'weight' (float32) per row; packed causal rows
# (data.pack) add 'segment_ids' and 'positions'.
BATCHES = {
    'seq2seq': {'input_ids': ('max_source_length', jnp.int32),
                'attention_mask': ('max_source_length', jnp.int32),
                'decoder_input_ids': ('max_target_length', jnp.int32),
                'decoder_attention_mask': ('max_target_length', jnp.int32),
                'labels': ('max_target_length', jnp.int32)},
    'causal_lm': {'input_ids': ('sequence', jnp.int32),
                  'attention_mask': ('sequence', jnp.int32),
                  'loss_mask': ('sequence', jnp.int32)},
    'classification': {'input_ids': ('max_length', jnp.int32),
                       'attention_mask': ('max_length', jnp.int32),
                       'token_type_ids': ('max_length', jnp.int32),
                       'label': (None, jnp.int32)},
    'squad': {'input_ids': ('max_length', jnp.int32),
              'attention_mask': ('max_length', jnp.int32),
              'token_type_ids': ('max_length', jnp.int32),
              'start_positions': (None, jnp.int32),
              'end_positions': (None, jnp.int32)},
}
PACKED = {'segment_ids': ('sequence', jnp.int32),
          'positions': ('sequence', jnp.int32)}


def sequence_length(config: Any) -> int:
  """The longest row of the config's train batches (tokens)."""
  d = config.data
  if config.task == 'causal_lm':
    return int(d.max_source_length) + int(d.max_target_length)
  return int(d.get('max_length', 0) or d.max_source_length)


def abstract_batch(config: Any, batch_size: int, mesh: Any,
                   rules: Any) -> dict[str, jax.ShapeDtypeStruct]:
  """The task's train batch at its longest lengths, rows sharded like a
  run's batches (`sharding.batch_sharding`)."""
  if config.task not in BATCHES:
    raise ValueError(f'task={config.task!r}: plan knows the batches of '
                     f'{sorted(BATCHES)}.')
  layout = dict(BATCHES[config.task], index=(None, jnp.int32),
                weight=(None, jnp.float32))
  if config.task == 'causal_lm' and config.data.get('pack', False):
    layout.update(PACKED)
  batch = {}
  for name, (length, dtype) in layout.items():
    shape = ((batch_size,) if length is None else
             (batch_size, sequence_length(config)) if length == 'sequence'
             else (batch_size, int(config.data[length])))
    batch[name] = jax.ShapeDtypeStruct(
        shape, dtype, sharding=sharding.batch_sharding(mesh, rules,
                                                       len(shape)))
  return batch


@dataclasses.dataclass
class Step:
  """A config's train step over a mesh, on abstract arguments.

  Attributes:
    fn: the jitted step `(state, base, batch) -> (state, metrics)`.
    state, base, batch: ShapeDtypeStructs carrying their shardings.
    mesh: the mesh.
    model: the flax model.
  """
  fn: Any
  state: Any
  base: Any
  batch: Any
  mesh: Any
  model: Any

  def lower(self):
    return self.fn.lower(self.state, self.base, self.batch)


def abstract_step(config: Any, device_list: Sequence[Any]) -> Step:
  """The run's train step (`trainer.train_step_fn`) on shapes only."""
  config = without_weights(config)
  mesh = sharding.make_mesh(config.mesh, device_list)
  rules = sharding.resolve_rules(config.get('sharding_rules', None))
  kept = {}

  def built_arrays():
    built = build.model_and_method(config, mesh, rules)
    kept['built'] = built
    return built.base, built.adapter_rng, built.state_rng

  base, adapter_rng, state_rng = jax.eval_shape(built_arrays)
  b = kept.pop('built')
  axes = (b.base_axes if b.method.prepare_base is peft_base.same_base else
          b.method.prepared_axes(b.base_axes, base))
  base = sharding.abstract_sharded(
      base, sharding.named_shardings(base, axes, mesh, rules))
  total_steps = max(int(config.train.steps), 1)
  run = trainer.Run(config, None, b.model, b.family, None, None,
                    tasks.make(config, b.model), b.method, mesh, rules, base,
                    b.base_axes, adapter_rng, state_rng, total_steps, True)
  tx = optimizers.optimizer(config.optimizer, total_steps, b.method)
  shardings = trainer.state_shardings(run, tx)
  state = jax.eval_shape(
      lambda r, s, base: trainer.steps.create(s, b.method.init(r, base), tx),
      adapter_rng, state_rng, base)
  state = sharding.abstract_sharded(state, shardings)
  batch = abstract_batch(config, int(config.train.batch_size), mesh, rules)
  return Step(trainer.train_step_fn(run, tx, shardings), state, base, batch,
              mesh, b.model)


def chip_bytes(tree: Any) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the
  most loaded device: shards are equal)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape)
    total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
  return total


def is_out_of_memory(error: Exception) -> bool:
  """Whether a compile failed because the step does not fit the chip."""
  return 'RESOURCE_EXHAUSTED' in str(error)


def useful_flops(config: Any, chips: int) -> float:
  """The model's useful FLOPs per chip: XLA's cost analysis of the whole
  (unpartitioned) step traced without rematerialisation, over `chips`.

  Lowered for one CPU device: FLOPs of the unpartitioned program do not
  depend on the backend, and the TPU compiler gives no cost analysis before
  it partitions.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  config.mesh = {'data': 1, 'fsdp': 1, 'tensor': 1}
  if config.model.get('remat', 'none') != 'none':
    config.model.remat = 'none'
  cost = abstract_step(config, jax.devices('cpu')[:1]).lower().cost_analysis()
  return float(cost['flops']) / chips


def compile_step(step: Step) -> tuple[Any, dict[str, float]]:
  """(the compiled step, or the compiler's message when the step does not
  fit the chip; {'compile_seconds', 'compile_cpu_seconds'}): wall time
  depends on what else the host runs, CPU time less so."""
  tic, cpu = time.perf_counter(), time.process_time()
  try:
    compiled = step.lower().compile()
  except Exception as e:  # pylint: disable=broad-except
    if not is_out_of_memory(e):
      raise
    # The compiler's message: the total, then the largest allocations
    # (shape, op, source line): what to shard or rematerialise.
    compiled = '\n'.join(str(e).strip().splitlines()[:40])
  return compiled, {
      'compile_seconds': round(time.perf_counter() - tic, 1),
      'compile_cpu_seconds': round(time.process_time() - cpu, 1)}


def total_bytes(compiled: Any) -> int:
  """What the compiled step holds in device memory at its peak, per chip:
  arguments, outputs not aliased to (donated) arguments, temporaries and
  code."""
  m = compiled.memory_analysis()
  return (m.argument_size_in_bytes + m.output_size_in_bytes -
          m.alias_size_in_bytes + m.temp_size_in_bytes +
          m.generated_code_size_in_bytes)


def plan(config: Any, t: Target, device_list: Sequence[Any] | None = None
         ) -> dict[str, Any]:
  """Compiles the config's train step for target `t`; the per-chip figures
  (see the module docstring) as a JSON-ready dict. `fits` is False, with
  the compiler's message in `error` (its largest allocations), when the
  compiler refuses the step for memory."""
  device_list = devices(t) if device_list is None else device_list
  step = abstract_step(config, device_list)
  report = {
      'target': t.name, 'topology': t.topology, 'chip': t.chip.name,
      'chips': len(device_list), 'mesh': dict(step.mesh.shape),
      'model': config.model.path or 'model.init',
      'family': config.model.family, 'task': config.task,
      'peft': config.peft.method, 'batch_size': int(config.train.batch_size),
      'sequence': (f'{config.data.max_source_length}+'
                   f'{config.data.max_target_length}'
                   if config.task == 'seq2seq' else
                   str(sequence_length(config))),
      'grad_accum_steps': int(config.optimizer.grad_accum_steps),
      'model_dtype': config.model.dtype,
      'remat': config.model.get('remat', 'none'),
      'base_dtype': config.model.get('base_dtype', 'float32'),
      'bytes': {'base': chip_bytes(step.base),
                'adapter': chip_bytes(step.state.adapter),
                'opt_state': chip_bytes(step.state.opt_state),
                'batch': chip_bytes(step.batch)},
      'hbm_bytes': t.chip.hbm_bytes,
  }
  compiled, seconds = compile_step(step)
  report.update(seconds)
  if isinstance(compiled, str):
    report.update(fits=False, error=compiled)
    return report
  total = total_bytes(compiled)
  report['bytes'].update(temp=compiled.memory_analysis().temp_size_in_bytes,
                         total=total)
  report.update(fits=total <= t.chip.hbm_bytes,
                headroom=round(1 - total / t.chip.hbm_bytes, 4))
  cost = compiled.cost_analysis()
  flops, accessed = float(cost['flops']), float(cost['bytes accessed'])
  report.update(flops=flops, bytes_accessed=accessed,
                useful_flops=useful_flops(config, len(device_list)))
  if t.chip.peak_flops:
    compute, memory_s = (flops / t.chip.peak_flops,
                         accessed / t.chip.hbm_bandwidth)
    roofline = max(compute, memory_s)
    report.update(
        compute_seconds=compute, memory_seconds=memory_s,
        roofline_seconds=roofline,
        bound='compute' if compute >= memory_s else 'memory',
        mfu=round(report['useful_flops'] / (roofline * t.chip.peak_flops),
                  4))
  return report


def with_batch(config: Any, batch_size: int) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(config.to_dict())
  config.train.batch_size = int(batch_size)
  return config


def largest_batch(fits: Callable[[int], bool], unit: int, start: int,
                  limit: int) -> tuple[int, list[tuple[int, bool]]]:
  """The largest multiple of `unit` up to `limit` for which `fits` holds,
  assuming that fitting is monotone in the batch size.

  Doubles from `start` (rounded down to a multiple of `unit`, at least
  `unit`) until a size fails or reaches `limit`, then bisects between the
  last fitting and the first failing size, over multiples of `unit`.

  Returns:
    (the largest fitting size, 0 when not even `unit` fits; the tried
    (size, fits) pairs in order).
  """
  tried = []

  def check(units):
    ok = fits(units * unit)
    tried.append((units * unit, ok))
    return ok

  most = limit // unit
  if most < 1:
    return 0, tried
  low, high, units = 0, None, min(max(start // unit, 1), most)
  while high is None:  # low fits (0: trivially), high does not
    if check(units):
      low = units
      if units == most:
        return low * unit, tried
      units = min(units * 2, most)
    else:
      high = units
  while high - low > 1:
    middle = (low + high) // 2
    if check(middle):
      low = middle
    else:
      high = middle
  return low * unit, tried


def search_batch(config: Any, t: Target, limit: int,
                 device_list: Sequence[Any] | None = None
                 ) -> dict[str, Any]:
  """{'max_batch': the largest global batch whose step fits the target's
  chips (`largest_batch` over compiles, from the config's batch size),
  'batch_tries': [[size, fits], ...]}."""
  device_list = devices(t) if device_list is None else device_list
  unit = batch_unit(config, sharding.make_mesh(config.mesh, device_list))

  def fits(batch_size):
    step = abstract_step(with_batch(config, batch_size), device_list)
    compiled, _ = compile_step(step)
    return (not isinstance(compiled, str) and
            total_bytes(compiled) <= t.chip.hbm_bytes)

  best, tried = largest_batch(fits, unit, int(config.train.batch_size),
                              limit)
  return {'max_batch': best, 'batch_tries': [list(x) for x in tried]}


def batch_unit(config: Any, mesh: Any) -> int:
  """The smallest global batch the step accepts: the devices the batch is
  split over, times the accumulation steps."""
  rules = sharding.resolve_rules(config.get('sharding_rules', None))
  spec = sharding.batch_sharding(mesh, rules, 1).spec[0] or ()
  axes = spec if isinstance(spec, tuple) else (spec,)
  return (math.prod(mesh.shape[a] for a in axes) *
          int(config.optimizer.grad_accum_steps))


def table(reports: Sequence[dict[str, Any]]) -> str:
  """A readable table of `plan` reports, one row each (GiB per chip)."""
  head = ('target', 'model', 'batch', 'base', 'adapter', 'opt', 'temp',
          'total', 'HBM', 'free', 'TFLOP', 'roofline', 'MFU', 'max batch',
          'compile')
  rows = [head]
  gib = lambda n: f'{n / GIB:.2f}' if n is not None else '-'
  for r in reports:
    b = r['bytes']
    rows.append((
        r['target'], r['model'], str(r['batch_size']),
        gib(b['base']), gib(b['adapter']), gib(b['opt_state']),
        gib(b.get('temp')), gib(b.get('total')), gib(r['hbm_bytes']),
        f"{r['headroom']:.0%}" if 'headroom' in r else 'OOM',
        f"{r['flops'] / 1e12:.1f}" if 'flops' in r else '-',
        f"{r['roofline_seconds'] * 1e3:.0f} ms" if 'roofline_seconds' in r
        else '-',
        f"{r['mfu']:.0%}" if 'mfu' in r else '-',
        str(r.get('max_batch', '-')), f"{r['compile_seconds']:.0f} s"))
  widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
  lines = ['  '.join(c.rjust(w) for c, w in zip(row, widths))
           for row in rows]
  lines.insert(1, '  '.join('-' * w for w in widths))
  return '\n'.join(lines)


def markdown(reports: Sequence[dict[str, Any]]) -> str:
  """A Markdown table of `plan` reports: which configuration fits which
  slice, with its per-chip memory, roofline step time and MFU."""
  lines = ['| model | PEFT | batch | remat | base | target | GiB / chip '
           '(HBM) | free | fits | roofline step | MFU | max batch |',
           '|' + '---|' * 12]
  for r in reports:
    total = r['bytes'].get('total')
    used = (f"{total / GIB:.1f} ({r['hbm_bytes'] / GIB:.0f})" if total
            else f"- ({r['hbm_bytes'] / GIB:.0f})")
    lines.append('| ' + ' | '.join([
        r['model'].split('/')[-1], r['peft'],
        f"{r['batch_size']} x {r['sequence']}",
        r['remat'], r['base_dtype'], r['target'], used,
        f"{r['headroom']:.0%}" if 'headroom' in r else '-',
        'yes' if r['fits'] else 'no',
        f"{r['roofline_seconds']:.2f} s" if 'roofline_seconds' in r else '-',
        f"{r['mfu']:.0%}" if 'mfu' in r else '-',
        str(r.get('max_batch', '-'))]) + ' |')
  return '\n'.join(lines)
