"""A finished (or checkpointed) run's adapter, evaluated on any data.

    config = evaluation.override(runs.read_config(workdir),
                                 ['data.eval_file=test.tsv'])
    loaded = evaluation.load(workdir, config, adapter='best')
    result = evaluation.evaluate(loaded, workdir / 'eval' / 'test_best')

`load` rebuilds what the trainer built (`build.model_and_method`: same
seeds, same base) on this host's devices, whatever mesh or process count
the run trained on, and reads the adapter: the final one (`adapter/`), a
checkpointed step, or the best checkpoint by `checkpoint.best_metric`.
Only the eval data is read. `evaluate` writes metrics.json,
predictions.jsonl (and squad_predictions.json for SQuAD data).
"""
import ast
import dataclasses
import json
import pathlib
import time
from typing import Any, Sequence

import jax
import ml_collections

from flaxlora import atomic
from flaxlora import build
from flaxlora import checkpoint
from flaxlora import distributed
from flaxlora import export
from flaxlora import optimizers
from flaxlora import resolved
from flaxlora import run_setup
from flaxlora import sharding
from flaxlora import steps
from flaxlora import tasks
from flaxlora import trainer
from flaxlora import workdir as workdir_lib
from flaxlora.data import task_data

METRICS_FILE = 'metrics.json'
EVAL_DIR = workdir_lib.EVAL_DIR


def _cast(text: str, current: Any, key: str) -> Any:
  if isinstance(current, bool):
    if text.lower() not in ('true', 'false', '1', '0'):
      raise ValueError(f'--config.{key}={text!r} is not a bool.')
    return text.lower() in ('true', '1')
  if isinstance(current, (int, float)):
    try:
      return type(current)(text)
    except ValueError:
      raise ValueError(f'--config.{key}={text!r} is not a '
                       f'{type(current).__name__}.') from None
  if isinstance(current, (list, tuple)):
    value = ast.literal_eval(text) if text[:1] in '([' else text.split(',')
    return tuple(value)
  return text


def override(config: ml_collections.ConfigDict,
             assignments: Sequence[str]) -> ml_collections.ConfigDict:
  """`config` with 'a.b=value' assignments applied (cast to each field's
  type). Setting `data.eval_file` switches the eval data to that file
  (`data.source='files'`, no `data.eval_from_train`)."""
  config = ml_collections.ConfigDict(config.to_dict())
  for assignment in assignments:
    key, has_value, text = assignment.partition('=')
    *parents, name = key.split('.')
    node = config
    for part in parents:
      node = node.get(part, None)
      if not isinstance(node, ml_collections.ConfigDict):
        break
    if not has_value or not isinstance(node, ml_collections.ConfigDict) or (
        name not in node):
      raise ValueError(f'--config.{assignment}: the run config has no field '
                       f'{key!r} (or no value was given); see the run\'s '
                       'config.json for the fields.')
    node[name] = _cast(text, node[name], key)
    if key == 'data.eval_file':
      config.data.source = 'files'
      if 'eval_from_train' in config.data:
        config.data.eval_from_train = 0
  return config


@dataclasses.dataclass
class Loaded:
  """A run rebuilt for evaluation: `run.data` holds the eval data only."""
  run: run_setup.Run
  adapter: Any
  which: str  # 'final', 'best' or 'step'
  step: int


def _mesh(config: Any) -> Any:
  try:
    return sharding.make_mesh(config.mesh)
  except ValueError as e:  # trained on another device count
    print(f'flaxlora: {e} Using all {jax.device_count()} devices on the '
          'data axis.')
    return sharding.make_mesh({'data': -1})


def rebuild(workdir: pathlib.Path, config: Any) -> run_setup.Run:
  """The run's model, base, method, tokenizer and eval data on this host's
  devices."""
  r = resolved.resolve(config, mesh=_mesh(config), reads=('eval',))
  tokenizer = build.tokenizer(r)
  data = task_data.load_eval(config, tokenizer, files=r.files)
  size = config.train.eval_batch_size
  try:
    distributed.process_rows(r.mesh, r.rules, size)
  except ValueError as e:
    raise ValueError(f'train.eval_batch_size={size}: {e} Pass '
                     '--config.train.eval_batch_size=N.') from None
  b = build.model_and_method(r, tokenizer)
  summary = workdir_lib.read_summary(workdir) or {}
  return run_setup.Run(config, workdir, b.model, b.family, tokenizer, data,
                       tasks.make(config, b.model), b.method, r.mesh, r.rules,
                       b.base, b.base_axes, b.adapter_rng, b.state_rng,
                       int(summary.get('step', 1)),
                       distributed.is_main_process(), resolved=r)


def _final_adapter(run: run_setup.Run) -> Any:
  folder = run.workdir / workdir_lib.ADAPTER_DIR
  if not (folder / export.ADAPTER_FILE).is_file():
    raise FileNotFoundError(
        f'{folder / export.ADAPTER_FILE} does not exist: the run in '
        f'{run.workdir} has not finished. Pass --step=N (a checkpoint) or '
        '--step=best.')
  like = jax.eval_shape(run.method.init, run.adapter_rng, run.base)
  shardings = sharding.named_shardings(
      like, run.method.logical_axes(run.base_axes, like), run.mesh, run.rules)
  return jax.device_put(export.load_adapter(folder, like), shardings)


def _checkpoint_adapter(run: run_setup.Run, step: int | str) -> tuple[Any, int]:
  directory = run.workdir / workdir_lib.CHECKPOINT_DIR
  if not directory.is_dir():
    raise FileNotFoundError(f'{directory} does not exist; use the final '
                            'adapter (no --step).')
  c = run.config.checkpoint
  ckpt = checkpoint.Checkpointer(directory, keep=max(c.keep, 1),
                                 best_metric=c.best_metric,
                                 best_mode=c.best_mode)
  try:
    kept = ckpt.all_steps()
    if step == 'best':  # the summary's (first of ties) when still kept
      named = (workdir_lib.read_summary(run.workdir) or {}).get('best_step')
      step = named if named in kept else ckpt.best_step()
      if step is None:
        raise ValueError(f'--step=best: no checkpoint in {directory} has '
                         f'the metric checkpoint.best_metric='
                         f'{c.best_metric!r}; pass --step=N, one of {kept}.')
    if step not in kept:
      raise ValueError(f'--step={step}: {directory} holds steps {kept}.')
    tx = optimizers.optimizer(run.config.optimizer, run.total_steps,
                              run.method)
    like, _ = run_setup.init_state(run, tx)
    state, _ = ckpt.restore(step, like)
  finally:
    ckpt.close()
  return state.adapter, int(step)


def load(workdir: str | pathlib.Path, config: Any,
         adapter: str | int = 'final') -> Loaded:
  """Rebuilds the run in `workdir` per `config` (its config.json, maybe
  overridden) with its adapter: 'final', 'best' or a checkpoint step."""
  workdir = pathlib.Path(workdir)
  run = rebuild(workdir, config)
  if adapter == 'final':
    return Loaded(run, _final_adapter(run), 'final', run.total_steps)
  which = 'best' if adapter == 'best' else 'step'
  params, step = _checkpoint_adapter(run, adapter)
  return Loaded(run, params, which, step)


def default_name(config: Any, loaded: Loaded) -> str:
  """'<eval file stem or data source>_<final|best|stepN>'."""
  d = config.data
  data = (pathlib.Path(d.eval_file).stem if d.source == 'files' and
          d.eval_file and not d.get('eval_from_train', 0) else d.source)
  which = loaded.which if loaded.which != 'step' else f'step{loaded.step}'
  return f'{data}_{which}'


def evaluate(loaded: Loaded, out_dir: str | pathlib.Path) -> dict[str, Any]:
  """Evaluates, writes metrics.json and the predictions into `out_dir`
  (main process) and returns what metrics.json holds."""
  out_dir = pathlib.Path(out_dir)
  run, tic = loaded.run, time.time()
  eval_step = steps.jit_eval_step(run.task, run.method)
  metrics = trainer.evaluate(run, eval_step, loaded.adapter, out_dir)
  d = run.config.data
  result = {'workdir': str(run.workdir), 'adapter': loaded.which,
            'step': loaded.step, 'examples': len(run.data.eval_records),
            'data': d.eval_file if d.source == 'files' else d.source,
            'metrics': metrics, 'wall_s': round(time.time() - tic, 2)}
  if run.is_main:
    atomic.write_file(out_dir / METRICS_FILE,
                      json.dumps(result, indent=2, default=float))
  distributed.sync('flaxlora_evaluate')
  return result


def result_line(result: dict[str, Any], out_dir: pathlib.Path) -> str:
  metrics = ', '.join(f'{k} {float(v):.4g}'
                      for k, v in result['metrics'].items())
  return (f'flaxlora.evaluate: {result["data"]} ({result["examples"]} '
          f'examples), adapter {result["adapter"]} (step {result["step"]}): '
          f'{metrics}; wrote {out_dir}')
