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
the results (`sweep_results`: results.csv, .md, .png). Where the points run
is the launcher's business (`experiments.sweep --launch`): this process or
N subprocesses (`local_launch`), a Slurm array (`slurm`), TPU slices
(`tpu_launch`); a launched point writes its output to `ROOT/logs/<name>.log`.
"""
import ast
import dataclasses
import hashlib
import importlib.util
import json
import os
import pathlib
import re
import shlex
import sys
from typing import Any, Mapping

from flaxlora import claim
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
