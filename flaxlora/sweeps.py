"""Hyper-parameter sweeps over a config's `get_sweep(arg)` points.

A config file may define `get_sweep(arg=None)` returning a list of override
dicts, big_vision style, e.g. (with `configs.common` helpers)

    common.product(common.sweep('optimizer.lr', [1e-3, 3e-3]),
                   common.sweep('peft.rank', [4, 8]))

A point's key 'arg' picks the config's variant string (the text after ':'
in --config) for that point, e.g. {'arg': 'method=dora,local_data'}: points
may differ in whole sections, not just values.

Each point runs in its own sub-workdir `ROOT/<name>`, named from the point
itself (`point_name`: a readable slug and a hash of its overrides), so that
adding or reordering points keeps every other point's folder. A finished
point (summary.json) is skipped, a stopped one resumes. At the end ROOT holds
`results.csv`, `results.md` (a Markdown table of final metrics and
hyper-parameters) and `results.png` (the points compared). Where the points
run (this process, N subprocesses, a Slurm array, TPU slices) is the
launcher's business (`experiments.sweep --launch`); a launched point writes
its output to `ROOT/logs/<name>.log`.
"""
import ast
import csv
import dataclasses
import hashlib
import importlib.util
import io
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
import time
from typing import Any, Callable, Mapping, Sequence

from flaxlora import atomic
from flaxlora import claim
from flaxlora import errors
from flaxlora import figures
from flaxlora import workdir as workdir_lib

RESULTS_CSV = 'results.csv'
RESULTS_MD = 'results.md'
RESULTS_PNG = 'results.png'
# The point key selecting the config's variant string.
ARG = 'arg'
LOG_DIR = 'logs'  # ROOT/logs/<point name>.log: a launched point's output
_SLUG = 100  # characters of a point name before its hash


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


def launch_settings(config_arg: str, name: str, settings: Any,
                    overrides: Mapping[str, Any]) -> Any:
  """The launch section `name` ('slurm', 'tpu'): `settings` (its defaults)
  updated by the config file's optional `get_launch(arg)[name]`, then by
  the command line's `overrides` (--<name>.<field> flags)."""
  module = load_module(config_arg)
  arg = config_arg.split(':', 1)[1] if ':' in config_arg else None
  section = (module.get_launch(arg) if hasattr(module, 'get_launch')
             else {}).get(name, {})
  typed = {}
  for key, text in overrides.items():
    default = settings.get(key) if key in settings else ''
    typed[key] = parse_value(text, default) if isinstance(text, str) else text
  for values in (section, typed):
    try:
      settings = apply(settings, values)
    except ValueError as e:
      raise ValueError(f'{name} settings: {e}') from None
  return settings


def parse_value(text: str, like: Any) -> Any:
  """Command-line `text` as the type of the default `like`: bool
  (true/false/1/0), int, float, tuple ('a,b' or a Python tuple literal) or
  str."""
  if isinstance(like, bool):
    if text.lower() not in ('true', 'false', '1', '0'):
      raise ValueError(f'{text!r} is not a boolean; give true or false.')
    return text.lower() in ('true', '1')
  if isinstance(like, (int, float)):
    try:
      return type(like)(text)
    except ValueError:
      raise ValueError(f'{text!r} is not {type(like).__name__}.') from None
  if isinstance(like, tuple):
    if text.startswith(('(', '[')):
      return tuple(ast.literal_eval(text))
    return tuple(t for t in text.split(',') if t)
  return text


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


def point_name(overrides: Mapping[str, Any]) -> str:
  """The folder name of a point: a readable slug of its overrides ('arg'
  first, then the keys sorted) and 8 hex digits of a hash of them, e.g.
  'method=lora,runlocal,optimizer.lr=0.05-1a2b3c4d'. It depends on the point
  only, never on its place in the sweep."""
  keys = sorted(overrides, key=lambda k: (k != ARG, k))
  text = ','.join(str(overrides[k]) if k == ARG else f'{k}={overrides[k]}'
                  for k in keys)
  slug = re.sub(r'[^A-Za-z0-9_.,=+-]', '_', text)[:_SLUG]
  canonical = json.dumps(dict(overrides), sort_keys=True, default=str)
  digest = hashlib.sha256(canonical.encode()).hexdigest()[:8]
  return f'{slug}-{digest}' if slug else digest


@dataclasses.dataclass(frozen=True)
class Point:
  """One sweep point, ready to run anywhere."""
  name: str  # its folder under the sweep root
  overrides: dict[str, Any]  # as get_sweep gave it
  config: Any  # the resolved config of the point
  workdir: pathlib.Path
  args: list[str]  # experiments.run's arguments for it


def plan(config: Any, config_arg: str, root: str | os.PathLike,
         base_overrides: Mapping[str, Any] | None = None) -> list[Point]:
  """Every point of the sweep with its config and run arguments; checks
  every point's config before anything runs.

  Args:
    config: the base config (command-line overrides already applied).
    config_arg: the --config value ('path.py:arg').
    root: the sweep's folder.
    base_overrides: command-line overrides, repeated in every point's
      arguments.

  Raises:
    ValueError: a bad override, or two points with the same overrides.
  """
  root = claim.check_path(root)
  module = load_module(config_arg)
  result, seen = [], {}
  for index, overrides in enumerate(points(config_arg)):
    name = point_name(overrides)
    if name in seen:
      raise ValueError(f'{config_arg}: get_sweep points {seen[name]} and '
                       f'{index} are the same ({overrides}); drop one.')
    seen[name] = index
    workdir = root / name
    result.append(Point(
        name, overrides, point_config(config, module, overrides,
                                      base_overrides), workdir,
        run_args(config_arg, workdir, overrides, base_overrides)))
  return result


def run_args(config_arg: str, workdir: pathlib.Path,
             overrides: Mapping[str, Any],
             base_overrides: Mapping[str, Any] | None = None) -> list[str]:
  """The `experiments.run` arguments of one point (after `-m
  experiments.run`)."""
  overrides = dict(overrides)
  if ARG in overrides:
    config_arg = f'{config_arg.split(":", 1)[0]}:{overrides.pop(ARG)}'
  merged = {**(base_overrides or {}), **overrides}
  return ([f'--config={config_arg}', f'--workdir={workdir}'] +
          [f'--config.{k}={v}' for k, v in merged.items()])


def command(point: Point) -> str:
  """The shell command line that runs `point`."""
  return shlex.join(['python', '-m', 'experiments.run', *point.args])


def run(todo: Sequence[Point], root: str | os.PathLike, *,
        train_fn: Callable[[Any, pathlib.Path], dict]
        ) -> list[dict[str, Any]]:
  """Runs the points one after the other in this process, then writes the
  results (see `collect`).

  Args:
    todo: the points (`plan`).
    root: the sweep's folder.
    train_fn: (config, workdir) -> summary, e.g. trainer.train_and_evaluate.
  """
  for i, point in enumerate(todo):
    if workdir_lib.read_summary(point.workdir) is not None:
      print(f'sweep: point {point.name} is done; skipped.')
    else:
      print(f'sweep: point {i + 1}/{len(todo)}: {point.overrides}',
            flush=True)
    train_fn(point.config, point.workdir)
  return collect(todo, root)


def run_parallel(todo: Sequence[Point], root: str | os.PathLike,
                 parallel: int) -> list[dict[str, Any]]:
  """Runs up to `parallel` points at once, each an `experiments.run`
  subprocess (this interpreter) logging to ROOT/logs/<name>.log; then
  writes the results. The host's GPUs (`nvidia-smi -L`) are split evenly
  over the `parallel` slots through CUDA_VISIBLE_DEVICES; on a CPU host
  the points share the cores.

  Args:
    todo: the points (`plan`).
    root: the sweep's folder.
    parallel: how many points run at once.

  Raises:
    errors.UserError: a point failed (its log's error line is named).
  """
  root = pathlib.Path(root)
  gpus = visible_gpus()
  if gpus and len(gpus) % parallel:
    raise errors.UserError(
        f'--parallel={parallel} does not divide the {len(gpus)} GPUs; pick '
        'a divisor so that every point gets the same devices.')
  share = len(gpus) // parallel
  slots = [gpus[i * share:(i + 1) * share] for i in range(parallel)]
  (root / LOG_DIR).mkdir(parents=True, exist_ok=True)
  queue = []
  for point in todo:
    if workdir_lib.read_summary(point.workdir) is None:
      queue.append(point)
    else:
      print(f'sweep: point {point.name} is done; skipped.')
  running, failed = {}, []
  while queue or running:
    while queue and len(running) < parallel:
      point, slot = queue.pop(0), slots.pop(0)
      env = dict(os.environ)
      if slot:
        env['CUDA_VISIBLE_DEVICES'] = ','.join(slot)
      # Closed when the point ends (below).
      log = open(log_path(root, point.name), 'a')  # pylint: disable=R1732
      print(f'sweep: started {point.name}', flush=True)
      proc = subprocess.Popen(
          [sys.executable, '-m', 'experiments.run', *point.args], env=env,
          stdout=log, stderr=subprocess.STDOUT)
      running[proc] = (point, slot, log)
    time.sleep(0.2)
    for proc in [p for p in running if p.poll() is not None]:
      point, slot, log = running.pop(proc)
      log.close()
      slots.append(slot)
      ok = proc.returncode == 0
      print(f'sweep: {"finished" if ok else "FAILED"} {point.name}',
            flush=True)
      if not ok:
        failed.append(point.name)
  rows = collect(todo, root)
  if failed:
    raise errors.UserError(
        f'{len(failed)} point(s) failed: ' + '; '.join(
            f'{n}: {last_error(log_path(root, n))}' for n in failed))
  return rows


def visible_gpus() -> list[str]:
  """The GPU indices `nvidia-smi -L` lists ([] without NVIDIA GPUs)."""
  try:
    listing = subprocess.run(['nvidia-smi', '-L'], capture_output=True,
                             text=True, check=True, timeout=30).stdout
  except (OSError, subprocess.SubprocessError):
    return []
  return [str(i) for i, line in enumerate(listing.splitlines())
          if line.startswith('GPU ')]


def log_path(root: pathlib.Path, name: str) -> pathlib.Path:
  """Where a launched point's output goes."""
  return pathlib.Path(root) / LOG_DIR / f'{name}.log'


def last_error(log: pathlib.Path) -> str:
  """The one line that says why a run failed: its `flaxlora: error:` or
  `stopped:` line, else the last line of a traceback ('' when none)."""
  try:
    lines = [line.strip() for line in log.read_text(errors='replace')
             .splitlines() if line.strip()]
  except FileNotFoundError:
    return ''
  for line in reversed(lines):
    if line.startswith(('flaxlora: error:', 'flaxlora: stopped:')):
      return line
  traceback_at = max((i for i, line in enumerate(lines)
                      if line.startswith('Traceback ')), default=None)
  if traceback_at is None:
    return ''
  after = [line for line in lines[traceback_at:]
           if re.match(r'[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b', line)]
  return after[-1] if after else lines[-1]


def collect(todo: Sequence[Point], root: str | os.PathLike
            ) -> list[dict[str, Any]]:
  """One row per finished point ({'point', **overrides, **summary
  scalars}), also written to results.csv/.md/.png under `root`."""
  rows = []
  for point in todo:
    summary = workdir_lib.read_summary(point.workdir)
    if summary is None:
      continue
    scalars = {k: v for k, v in summary.items()
               if isinstance(v, (int, float, str, bool))}
    rows.append({'point': point.name, **point.overrides, **scalars})
  if rows:
    write_results(pathlib.Path(root), rows,
                  list(dict.fromkeys(k for p in todo for k in p.overrides)))
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
    ax.set_xticks(range(len(rows)), [str(i) for i in range(len(rows))])
    ax.set_title(metric)
    ax.set_xlabel('point (row of results.md)')
  figures.save(fig, root / RESULTS_PNG)
