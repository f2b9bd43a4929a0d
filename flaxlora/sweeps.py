"""Hyper-parameter sweeps over a config's `get_sweep(arg)` points.

A config file may define `get_sweep(arg=None)` returning a list of override
dicts, big_vision style, e.g. (with `configs.common` helpers)

    common.product(common.sweep('optimizer.lr', [1e-3, 3e-3]),
                   common.sweep('peft.rank', [4, 8]))

A point's key 'arg' picks the config's variant string (the text after ':'
in --config) for that point, e.g. {'arg': 'method=dora,local_data'}: points
may differ in whole sections, not just values.

Each point runs in its own sub-workdir `ROOT/<nn>_<overrides>`; a finished
point (summary.json) is skipped, a stopped one resumes. At the end ROOT holds
`results.csv`, `results.md` (a Markdown table of final metrics and
hyper-parameters) and `results.png` (the points compared).
"""
import csv
import importlib.util
import io
import os
import pathlib
import re
import shlex
import sys
from typing import Any, Callable, Mapping, Sequence

from flaxlora import atomic
from flaxlora import claim
from flaxlora import figures
from flaxlora import workdir as workdir_lib

RESULTS_CSV = 'results.csv'
RESULTS_MD = 'results.md'
RESULTS_PNG = 'results.png'
# The point key selecting the config's variant string.
ARG = 'arg'


def load_module(config_arg: str):
  """The config module of 'path/to/config.py[:arg]'."""
  path = pathlib.Path(config_arg.split(':', 1)[0])
  if not path.is_file():
    raise FileNotFoundError(f'--config={config_arg!r}: no file {path}.')
  root = str(path.resolve().parents[1])  # configs import `configs.common`
  if root not in sys.path:
    sys.path.insert(0, root)
  spec = importlib.util.spec_from_file_location('flaxlora_sweep_config',
                                                path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def points(config_arg: str) -> list[dict[str, Any]]:
  """The sweep points (override dicts) of a config file."""
  module = load_module(config_arg)
  if not hasattr(module, 'get_sweep'):
    raise ValueError(f'{config_arg.split(":")[0]} defines no get_sweep(arg); '
                     'add one returning a list of override dicts.')
  arg = config_arg.split(':', 1)[1] if ':' in config_arg else None
  result = list(module.get_sweep(arg))
  if not result or not all(isinstance(p, Mapping) for p in result):
    raise ValueError(f'{config_arg}: get_sweep must return a non-empty list '
                     'of override dicts.')
  return [dict(p) for p in result]


def point_config(config: Any, module: Any, overrides: Mapping[str, Any],
                 base_overrides: Mapping[str, Any] | None = None) -> Any:
  """The config of one point: `config`, or for a point with an 'arg' key,
  the config `module`'s get_config(arg) with `base_overrides` (the command
  line's), then the point's other overrides."""
  overrides = dict(overrides)
  if ARG in overrides:
    config = apply(module.get_config(overrides.pop(ARG)),
                   base_overrides or {})
  return apply(config, overrides)


def apply(config: Any, overrides: Mapping[str, Any]) -> Any:
  """A locked copy of `config` with dotted-key `overrides` applied.

  Raises:
    ValueError: a key the config lacks, or a value of the wrong type.
  """
  config = config.copy_and_resolve_references()
  config.unlock()
  for key, value in overrides.items():
    node, parts = config, key.split('.')
    for i, part in enumerate(parts):
      if not hasattr(node, 'keys') or part not in node:
        known = sorted(node.keys()) if hasattr(node, 'keys') else []
        raise ValueError(f'sweep override {key!r}: the config has no '
                         f'{".".join(parts[:i + 1])!r} (known there: '
                         f'{known}).')
      if i < len(parts) - 1:
        node = node[part]
    try:
      node[parts[-1]] = value
    except TypeError as e:
      raise ValueError(f'sweep override {key}={value!r}: {e}') from None
  config.lock()
  return config


def point_name(index: int, overrides: Mapping[str, Any]) -> str:
  text = ','.join(f'{k}={v}' for k, v in overrides.items())
  return f'{index:02d}_' + re.sub(r'[^A-Za-z0-9_.,=+-]', '_', text)[:100]


def command(config_arg: str, workdir: pathlib.Path,
            overrides: Mapping[str, Any],
            base_overrides: Mapping[str, Any] | None = None) -> str:
  """The `experiments.run` command line of one point."""
  overrides = dict(overrides)
  if ARG in overrides:
    config_arg = f'{config_arg.split(":", 1)[0]}:{overrides.pop(ARG)}'
  parts = ['python', '-m', 'experiments.run', f'--config={config_arg}',
           f'--workdir={workdir}']
  merged = {**(base_overrides or {}), **overrides}
  parts += [f'--config.{k}={v}' for k, v in merged.items()]
  return ' '.join(shlex.quote(p) for p in parts)


def run(config: Any, config_arg: str, root: str | os.PathLike, *,
        train_fn: Callable[[Any, pathlib.Path], dict],
        base_overrides: Mapping[str, Any] | None = None,
        dry_run: bool = False) -> list[dict[str, Any]]:
  """Runs (or, with dry_run, prints the command of) every sweep point.

  Args:
    config: the base config (command-line overrides already applied).
    config_arg: the --config value ('path.py:arg').
    root: the sweep's folder; point i runs in root/<point_name>.
    train_fn: (config, workdir) -> summary, e.g. trainer.train_and_evaluate.
    base_overrides: command-line overrides, repeated in printed commands.
    dry_run: only print one command per point.

  Returns:
    One row per point: {'point', **overrides, **summary scalars} (no
    summary on a dry run).
  """
  root = claim.check_path(root)
  rows = []
  todo = points(config_arg)
  module = load_module(config_arg)
  configs = [point_config(config, module, p, base_overrides)
             for p in todo]  # all errors before any run
  for i, (overrides, one_config) in enumerate(zip(todo, configs)):
    workdir = root / point_name(i, overrides)
    if dry_run:
      print(command(config_arg, workdir, overrides, base_overrides))
      continue
    if workdir_lib.read_summary(workdir) is not None:
      print(f'sweep: point {i} is done ({workdir}); skipped.')
    else:
      print(f'sweep: point {i + 1}/{len(todo)}: {overrides}', flush=True)
    summary = train_fn(one_config, workdir)
    scalars = {k: v for k, v in summary.items()
               if isinstance(v, (int, float, str, bool))}
    rows.append({'point': workdir.name, **overrides, **scalars})
  if not dry_run:
    write_results(root, rows, list(todo[0]))
  return rows


def write_results(root: pathlib.Path, rows: Sequence[Mapping[str, Any]],
                  hyper: Sequence[str]) -> None:
  """results.csv, results.md and results.png under `root`."""
  columns = ['point'] + list(hyper)
  columns += sorted({k for row in rows for k in row} - set(columns))
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, columns, lineterminator='\n')
  writer.writeheader()
  writer.writerows(rows)
  atomic.write_file(root / RESULTS_CSV, buffer.getvalue())
  metrics = ([c for c in columns if c.startswith('eval_')] +
             [c for c in columns if c.startswith('best_') and
              c != 'best_step'] +
             [c for c in columns if c == 'train_loss'])
  shown = ['point'] + list(hyper) + metrics
  lines = ['| ' + ' | '.join(shown) + ' |',
           '|' + '---|' * len(shown)]
  for row in rows:
    lines.append('| ' + ' | '.join(_cell(row.get(c, '')) for c in shown) +
                 ' |')
  atomic.write_file(root / RESULTS_MD, '\n'.join(lines) + '\n')
  _plot(root, rows, metrics)


def _cell(value: Any) -> str:
  return f'{value:.4g}' if isinstance(value, float) else str(value)


def _plot(root: pathlib.Path, rows, metrics: Sequence[str]) -> None:
  metrics = [m for m in metrics if m.startswith('eval_')] or list(metrics)
  if not metrics or not rows:
    return
  fig, axes = figures.grid(len(metrics), width=4, height=3.5)
  for ax, metric in zip(axes, metrics):
    ax.bar(range(len(rows)), [float(r.get(metric, 'nan')) for r in rows])
    ax.set_xticks(range(len(rows)), [r['point'][:2] for r in rows])
    ax.set_title(metric)
    ax.set_xlabel('point')
  figures.save(fig, root / RESULTS_PNG)
