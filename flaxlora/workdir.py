"""What a run leaves in its workdir.

  config.json     the resolved config (`flaxlora.claim`: a later run of
                  another config is refused, a compatible change continues
                  the run and is recorded under 'changes')
  metrics.jsonl   one JSON object per logged step ({'step', 'split', ...})
  summary.json    the final metrics, written last (a finished run has it),
                  with what the run resolved ('resolved': model path as
                  given, family, method, dtypes, mesh, data;
                  `flaxlora.resolved`) and where it ran (`provenance`)
  loss.png, eval.png  curves drawn from metrics.jsonl (matplotlib Agg)
  checkpoints/    orbax checkpoints (`flaxlora.checkpoint`)
  adapter/        the final adapter in flaxlora's format (`flaxlora.export`)
  peft/           the final adapter as a Hugging Face PEFT folder
  run.lock        pid and host of the run using the workdir (`flaxlora.lock`)
  predictions.jsonl  per-example predictions of the last eval (and, for
                  SQuAD data, squad_predictions.json: {id: answer});
                  see `flaxlora.predictions_io`
  events.out.tfevents.*  TensorBoard scalars (`flaxlora.metric_writers`)
  eval/<name>/    metrics.json and predictions of `experiments.evaluate`
  wandb/          the offline Weights & Biases run, when log.wandb is on

Only the main process writes (callers check); every write is atomic (a
temporary file renamed into place), so a killed run never leaves half a file.
"""
import json
import math
import os
import pathlib
from typing import Any, Callable, Iterable, Mapping

from flaxlora import atomic
from flaxlora import figures
from flaxlora import predictions_io

CONFIG_FILE = 'config.json'
METRICS_FILE = 'metrics.jsonl'
SUMMARY_FILE = 'summary.json'
LOSS_PLOT = 'loss.png'
EVAL_PLOT = 'eval.png'
CHECKPOINT_DIR = 'checkpoints'
ADAPTER_DIR = 'adapter'
PEFT_DIR = 'peft'
LOCK_FILE = 'run.lock'
# Everything a run (and experiments.inspect_run) writes in a workdir: only a
# folder holding nothing else is a run that --overwrite may delete. A new
# writer adds its names here.
EVAL_DIR = 'eval'  # experiments.evaluate's results, one folder each
RUN_FILES = (CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, CHECKPOINT_DIR,
             ADAPTER_DIR, PEFT_DIR, LOCK_FILE, EVAL_DIR,
             predictions_io.PREDICTIONS_FILE, predictions_io.SQUAD_FILE,
             'wandb')  # metric_writers' offline W&B folder
RUN_PATTERNS = ('*.png', 'events.out.tfevents.*')


def config_dict(config: Any) -> dict[str, Any]:
  """The config as plain JSON types (tuples become lists), with the paths
  of existing files under the current directory or beside it made relative
  to it (`portable_path`), so that a record names no machine's folders."""
  as_dict = config.to_dict() if hasattr(config, 'to_dict') else dict(config)
  plain = json.loads(json.dumps(as_dict, sort_keys=True, default=str))
  return _map_strings(plain, portable_path)


def portable_path(value: str) -> str:
  """An existing absolute path under the current directory or its parent
  ('/work/flaxlora/../shared/data/x.tsv' -> '../shared/data/x.tsv', run
  from /work/flaxlora), relative to the current directory; anything else
  unchanged."""
  if not os.path.isabs(value) or not os.path.exists(value):
    return value
  relative = os.path.relpath(value)
  return value if relative.startswith(os.path.join('..', '..')) else relative


def _map_strings(tree: Any, fn: Callable[[str], str]) -> Any:
  if isinstance(tree, dict):
    return {k: _map_strings(v, fn) for k, v in tree.items()}
  if isinstance(tree, list):
    return [_map_strings(v, fn) for v in tree]
  return fn(tree) if isinstance(tree, str) else tree


def flatten(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  """{'a': {'b': 1}} -> {'a.b': 1}."""
  flat = {}
  for key, value in tree.items():
    name = f'{prefix}{key}'
    if isinstance(value, Mapping) and value:
      flat.update(flatten(value, name + '.'))
    else:
      flat[name] = value
  return flat


def _jsonable(value: Any) -> Any:
  if hasattr(value, 'item'):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
  """The records of metrics.jsonl (a torn last line is ignored)."""
  path = pathlib.Path(workdir) / METRICS_FILE
  if not path.exists():
    return []
  records = []
  for line in path.read_text().splitlines():
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      break  # A run killed mid-write; later steps are rewritten on resume.
  return records


class MetricsLog:
  """Appends records to metrics.jsonl; on resume, drops records past `step`.

  A run resumed from the checkpoint of step k repeats steps k+1.. exactly,
  so their records are dropped and logged again rather than duplicated.
  """

  def __init__(self, workdir: pathlib.Path, resume_step: int,
               write: bool = True, writer: Any = None):
    self.path = pathlib.Path(workdir) / METRICS_FILE
    self.write = write
    self.writer = writer  # also gets every record (`metric_writers`)
    self.resume_step = resume_step
    kept = [r for r in read_metrics(workdir) if r['step'] <= resume_step]
    self.records = kept
    if write:
      atomic.write_file(self.path, ''.join(json.dumps(r) + '\n' for r in kept))

  def log(self, step: int, split: str, metrics: Mapping[str, Any]) -> None:
    record = {'step': int(step), 'split': split}
    record.update({k: _jsonable(v) for k, v in metrics.items()})
    self.records.append(record)
    if self.write:
      with open(self.path, 'a') as f:
        f.write(json.dumps(record) + '\n')
        f.flush()
    if self.writer is not None:
      self.writer.write(step, split, record)

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()


def write_summary(workdir: pathlib.Path, summary: Mapping[str, Any]) -> None:
  atomic.write_file(pathlib.Path(workdir) / SUMMARY_FILE,
               json.dumps({k: _jsonable(v) for k, v in summary.items()},
                          indent=2, sort_keys=True))


def read_summary(workdir: str | os.PathLike) -> dict[str, Any] | None:
  path = pathlib.Path(workdir) / SUMMARY_FILE
  return json.loads(path.read_text()) if path.exists() else None


def _curves(records: Iterable[Mapping[str, Any]], split: str
            ) -> dict[str, tuple[list[int], list[float]]]:
  curves = {}
  for record in records:
    if record.get('split') != split:
      continue
    for key, value in record.items():
      if key in ('step', 'split') or not isinstance(value, (int, float)):
        continue
      steps, values = curves.setdefault(key, ([], []))
      steps.append(record['step'])
      values.append(value)
  return curves


def plot(workdir: pathlib.Path) -> list[pathlib.Path]:
  """Draws loss.png (train loss) and eval.png (every eval metric).

  The train loss is drawn on a log scale, so the first steps' high losses
  do not squash the rest of the curve; evals are drawn as points.
  """
  records = read_metrics(workdir)
  written = []
  for split, keys, name in (('train', ('loss',), LOSS_PLOT),
                            ('eval', None, EVAL_PLOT)):
    curves = _curves(records, split)
    keys = [k for k in (keys or sorted(curves)) if k in curves]
    if not keys:
      continue
    fig, axes = figures.grid(len(keys), width=4, height=3)
    for ax, key in zip(axes, keys):
      steps, values = curves[key]
      ax.plot(steps, values, marker='o' if split == 'eval' else None)
      if split == 'train' and min(values) > 0:
        ax.set_yscale('log')
      ax.set_title(f'{split} {key}')
      ax.set_xlabel('step')
    path = pathlib.Path(workdir) / name
    figures.save(fig, path)
    written.append(path)
  return written


def result_line(summary: dict[str, Any], workdir: pathlib.Path,
                wall_s: float, has_peft: bool) -> str:
  """The run's last line: final and best eval metrics, wall time, and where
  the adapter and PEFT folder are."""
  final = ', '.join(f'{k[5:]} {float(v):.4g}' for k, v in summary.items()
                    if k.startswith('eval_'))
  text = f'flaxlora: done, step {summary["step"]}: eval {final}'
  best = [k for k in summary if k.startswith('best_') and k != 'best_step']
  if best:
    text += (f'; best {best[0][5:]} {float(summary[best[0]]):.4g} at step '
             f'{summary["best_step"]}')
  peft = f', PEFT folder {workdir / PEFT_DIR}' if has_peft else ''

  return (f'{text}; {wall_s:.1f}s; adapter {workdir / ADAPTER_DIR}'
          f'{peft}')
