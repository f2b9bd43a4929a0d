"""Ahead-of-time plan of a config's train step on a TPU slice or the host.

    report = plan.plan(config, chips.target('v5e-16'))
    print(plan_tables.table([report]))

The real train step (`run_setup.train_step_fn`: the task's loss, the PEFT
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
           the step traced without rematerialisation (`model.remat` 'none')
           and unrolled, so recomputed forward passes are not counted as
           useful work; with scans over layers (`model.scan_layers`) the
           layers a cost analysis leaves out are added (`plan_cost`);
  time     the roofline: max(FLOPs / peak, HBM bytes accessed / bandwidth)
           and the MFU it implies (useful FLOPs / (roofline time x peak)).

`largest_batch` bisects the global batch size over compiles. The targets
and their chips' figures are `flaxlora.chips`; `flaxlora.plan_tables` prints
the reports.
"""
import dataclasses
import math
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from flaxlora import build
from flaxlora import chips
from flaxlora import optimizers
from flaxlora import plan_cost
from flaxlora import resolved
from flaxlora import run_setup
from flaxlora import sharding
from flaxlora import steps
from flaxlora import tasks
from flaxlora.models import presets
from flaxlora.peft import base as peft_base


def without_weights(config: Any) -> ml_collections.ConfigDict:
  """A copy of `config` whose model is built from `model.init`: a
  `model.path` is replaced by its config.json (`presets.CONFIGS` for a known
  hub id, offline), so no weight is read."""
  config = ml_collections.ConfigDict(config.to_dict())
  path = config.model.path
  if path:
    spec = presets.config_json(path)
    if spec is None:
      spec = resolved.checkpoint(path)[2]
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
  """The run's train step (`run_setup.train_step_fn`) on shapes only."""
  config = without_weights(config)
  r = resolved.resolve(config, devices=device_list, reads=())
  mesh, rules = r.mesh, r.rules
  kept = {}

  def built_arrays():
    built = build.model_and_method(r)
    kept['built'] = built
    return built.base, built.adapter_rng, built.state_rng

  base, adapter_rng, state_rng = jax.eval_shape(built_arrays)
  b = kept.pop('built')
  axes = (b.base_axes if b.method.prepare_base is peft_base.same_base else
          b.method.prepared_axes(b.base_axes, base))
  base = sharding.abstract_sharded(
      base, sharding.named_shardings(base, axes, mesh, rules))
  total_steps = max(int(config.train.steps), 1)
  run = run_setup.Run(config, None, b.model, b.family, None, None,
                    tasks.make(config, b.model), b.method, mesh, rules, base,
                    b.base_axes, adapter_rng, state_rng, total_steps, True)
  tx = optimizers.optimizer(config.optimizer, total_steps, b.method)
  shardings = run_setup.state_shardings(run, tx)
  state = jax.eval_shape(
      lambda r, s, base: steps.create(s, b.method.init(r, base), tx),
      adapter_rng, state_rng, base)
  state = sharding.abstract_sharded(state, shardings)
  batch = abstract_batch(config, int(config.train.batch_size), mesh, rules)
  return Step(run_setup.train_step_fn(run, tx, shardings), state, base, batch,
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


def lowered_cost(config: Any, **model: Any) -> dict[str, float]:
  """XLA's cost analysis of the whole (unpartitioned) step, with the
  `model` fields changed (e.g. remat='none'): `plan_cost.cost`'s keys.

  Lowered for one CPU device: the unpartitioned program does not depend on
  the backend, and the TPU compiler gives no cost analysis before it
  partitions.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  config.mesh = {'data': 1, 'fsdp': 1, 'tensor': 1}
  config.model.update(model)
  return plan_cost.cost(abstract_step(config, jax.devices('cpu')[:1]).lower())


def useful_flops(config: Any, num_chips: int) -> float:
  """The model's useful FLOPs per chip: the step without rematerialisation
  and unrolled (`lowered_cost`), over `num_chips`."""
  return lowered_cost(config, remat='none', scan_layers=False)['flops'] / (
      num_chips)


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


def plan(config: Any, t: chips.Target,
         device_list: Sequence[Any] | None = None) -> dict[str, Any]:
  """Compiles the config's train step for target `t`; the per-chip figures
  (see the module docstring) as a JSON-ready dict. `fits` is False, with
  the compiler's message in `error` (its largest allocations), when the
  compiler refuses the step for memory."""
  device_list = chips.devices(t) if device_list is None else device_list
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
      'scan_layers': bool(config.model.get('scan_layers', False)),
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
  cost = plan_cost.cost(compiled)
  if report['scan_layers']:
    cost = plan_cost.scanned(cost, lowered_cost(config),
                             lowered_cost(config, scan_layers=False))
  report.update(cost, useful_flops=useful_flops(config, len(device_list)))
  if t.chip.peak_flops and 'flops' in report:
    report.update(plan_cost.roofline(report, t.chip))
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


def search_batch(config: Any, t: chips.Target, limit: int,
                 device_list: Sequence[Any] | None = None
                 ) -> dict[str, Any]:
  """{'max_batch': the largest global batch whose step fits the target's
  chips (`largest_batch` over compiles, from the config's batch size),
  'batch_tries': [[size, fits], ...]}."""
  device_list = chips.devices(t) if device_list is None else device_list
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
