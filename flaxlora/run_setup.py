"""What a run builds once from its config, before it trains.

    run = run_setup.setup(config, workdir)
    state, shardings = run_setup.init_state(run, tx)
    step_fn = run_setup.train_step_fn(run, tx, shardings)

The `Run` holds the resolved config (`flaxlora.resolved`: paths, family,
method, mesh, once), the data, model, base params, task and PEFT method
(`setup`: data first, so input errors surface before any compile); from it
come the train state and its shardings, the jitted train step and the data
loaders, for `trainer.train_and_evaluate` and for the tools that rebuild a
run's pieces (`evaluation`, `predict`, `plan`, the benchmarks).
"""
import dataclasses
import math
import pathlib
import time
from typing import Any, Sequence

import jax

from flaxlora import build
from flaxlora import distributed
from flaxlora import optimizers
from flaxlora import resolved
from flaxlora import sharding
from flaxlora import steps
from flaxlora import tasks
from flaxlora import validate
from flaxlora.data import pipeline
from flaxlora.data import task_data


@dataclasses.dataclass
class Run:
  """Everything a run builds once (see `setup`)."""
  config: Any
  workdir: pathlib.Path
  model: Any
  family: Any
  tokenizer: Any
  data: task_data.Data
  task: Any
  method: Any
  mesh: Any
  rules: Any
  base: Any
  base_axes: Any
  adapter_rng: Any
  state_rng: Any
  total_steps: int
  is_main: bool
  started: float = dataclasses.field(default_factory=time.time)
  resolved: Any = None  # the `resolved.Resolved` it was built from


def _total_steps(config: Any, steps_per_epoch: int) -> int:
  t = config.train
  if (t.steps > 0) == (t.epochs > 0):
    raise ValueError(f'train.steps={t.steps}, train.epochs={t.epochs}: set '
                     'exactly one of them to a positive value (the other '
                     'to 0).')
  if t.steps > 0:
    return int(t.steps)
  return max(1, math.ceil(t.epochs * steps_per_epoch))


def _check_batch(config: Any, mesh: Any, rules: Any) -> None:
  for name in ('batch_size', 'eval_batch_size'):
    size = config.train[name]
    try:
      distributed.process_rows(mesh, rules, size)
    except ValueError as e:
      raise ValueError(f'train.{name}={size}: {e}') from None


def setup(config: Any, workdir: pathlib.Path,
          devices: Sequence[jax.Device] | None = None) -> Run:
  """Resolves the config once (`resolved.resolve`: data files, model path,
  family, method, mesh over `devices`, default all), builds data (first: input
  errors surface before any compile), then the model, base params
  (NF4-quantised once for QLoRA), task and method
  (`build.model_and_method`)."""
  r = resolved.resolve(config, devices=devices)
  tokenizer = build.tokenizer(r)
  data = task_data.load(config, tokenizer, files=r.files)
  steps_per_epoch = len(data.train) // config.train.batch_size
  if not steps_per_epoch:
    raise ValueError(
        f'the train data has {len(data.train)} examples, fewer than '
        f'train.batch_size={config.train.batch_size}; lower the batch size.')
  total_steps = _total_steps(config, steps_per_epoch)
  # The method first: a bad peft section, rank or regex fails before the
  # model is built (traced over abstract params).
  validate.shapes(r, build.make_method(r.method, r.peft, tokenizer),
                  total_steps)
  _check_batch(config, r.mesh, r.rules)
  b = build.model_and_method(r, tokenizer)
  return Run(config, pathlib.Path(workdir), b.model, b.family, tokenizer,
             data, tasks.make(config, b.model), b.method, r.mesh, r.rules,
             b.base, b.base_axes, b.adapter_rng, b.state_rng, total_steps,
             distributed.is_main_process(), resolved=r)


def state_shardings(run: Run, tx: Any) -> steps.TrainState:
  """The train state's shardings: the adapter by its logical axes, the
  optimizer state like the adapter, step and rng replicated (`run.base`
  may be abstract: shapes only)."""
  abstract = jax.eval_shape(run.method.init, run.adapter_rng, run.base)
  axes = run.method.logical_axes(run.base_axes, abstract)
  adapter_shardings = sharding.named_shardings(abstract, axes, run.mesh,
                                               run.rules)
  replicated = jax.sharding.NamedSharding(run.mesh,
                                          jax.sharding.PartitionSpec())
  return steps.TrainState(
      replicated, adapter_shardings,
      sharding.optimizer_shardings(tx, abstract, adapter_shardings, run.mesh),
      replicated)


def init_state(run: Run, tx: Any) -> tuple[steps.TrainState, Any]:
  """A fresh train state and its shardings (shape first: eval_shape, then a
  jit that writes each shard in place)."""
  shardings = state_shardings(run, tx)

  def init(rng, base):
    return steps.create(run.state_rng, run.method.init(rng, base), tx)

  state = jax.jit(init, out_shardings=shardings)(run.adapter_rng, run.base)
  return state, shardings


def train_step_fn(run: Run, tx: Any, state_shardings: Any):
  """The jitted train step of `run` (the one `experiments.benchmark lora`
  times): the task's loss, the method, the config's accumulation and
  clipping; `(state, base, batch) -> (state, metrics)`."""
  o = run.config.optimizer
  return steps.jit_train_step(run.task.loss, run.method, tx,
                              o.grad_accum_steps, state_shardings,
                              clip_norm=optimizers.clip_norm(o),
                              activation_sharding=activation_sharding(run))


def activation_sharding(run: Run) -> tuple[Any, Any] | None:
  """(mesh, rules) that the steps constrain activations by, or None
  (`model.shard_activations`)."""
  if not run.config.model.shard_activations:
    return None
  return run.mesh, run.rules


def loader(run: Run, train: bool) -> pipeline.Loader:
  """The run's train batches (shuffled, endless, from `train.seed`) or its
  eval batches (one pass, in order, the last one padded), this process's
  rows of each global batch."""
  t = run.config.train
  if train:
    return pipeline.Loader(
        run.data.train, global_batch_size=t.batch_size, seed=t.seed,
        shuffle=True, drop_remainder=True,
        process_index=jax.process_index(), process_count=jax.process_count())
  return pipeline.Loader(
      run.data.eval, global_batch_size=t.eval_batch_size, shuffle=False,
      drop_remainder=False, num_epochs=1,
      process_index=jax.process_index(), process_count=jax.process_count())


def device_batch(run: Run, batch: dict) -> dict:
  """A host batch of `loader` as global arrays sharded over the run's mesh."""
  return distributed.global_batch(batch, run.mesh, run.rules)
