r"""The table and plot of a method comparison sweep.

  python -m experiments.compare \
      --config=configs/bert_sentiment_compare.py:local_data \
      --workdir=workdirs/sst2_compare [--metric=accuracy --reach=0.85] \
      [--previous=OLD_ROOT/compare.md] [--baseline=INDEX]

For every point of the config's `get_sweep` (run or not yet run), from its
workdir under --workdir: the final and best dev `--metric`, the first
evaluated step at which it reached `--reach`, trainable parameters, the
median seconds per train step and the run's wall minutes (a resumed run's
last invocation: "23.4 (from step 875)"). Writes
`compare.md` (a Markdown table) and `compare.png` (the metric over steps per
point, and the final metric against the learning rate for the points that
share a variant) to --workdir, and prints the table.

Under it, `compare.md` holds one line per recipe (a point's name without its
`train.seed=N`; no seed override is seed 0): the seeds done, the mean and
sample standard deviation of the final and best metric over them, the mean
wall minutes; and one sentence, computed from those rows, on whether the
recipe with the best mean final metric (among those with 2 seeds or more)
leads the baseline recipe (the recipe of point --baseline, default 0) by
more than each of the two recipes' standard deviations; only recipes
evaluated on the baseline's eval records (the same `eval.half=` in their
names) are ranked.

A sweep whose points ran on several machines: `--previous` names an earlier
`compare.md`; a point not run under --workdir takes that table's row if it
was done there (status `done (previous)`; its curve is not in that table, so
it is missing from the left plot, not from the learning-rate plot).
"""
import collections
import json
import pathlib
import statistics
import sys
from typing import Any, Callable

from absl import app
from absl import flags

from flaxlora import atomic
from flaxlora import errors
from flaxlora import figures
from flaxlora import sweeps
from flaxlora import workdir as workdir_lib

COMPARE_MD = 'compare.md'
COMPARE_PNG = 'compare.png'


def point_row(workdir: pathlib.Path, metric: str, reach: float
              ) -> dict[str, Any]:
  """What one point's workdir says (empty values for what is missing)."""
  records = []
  log = workdir / workdir_lib.METRICS_FILE
  if log.is_file():
    records = [json.loads(line) for line in log.read_text().splitlines()
               if line.strip()]
  evals = [(r['step'], r[metric]) for r in records
           if r['split'] == 'eval' and metric in r]
  rates = [r['steps_per_s'] for r in records
           if r['split'] == 'train' and r.get('steps_per_s')]
  summary = workdir_lib.read_summary(workdir) or {}
  config = workdir / workdir_lib.CONFIG_FILE
  lr = json.loads(config.read_text())['optimizer']['lr'] if (
      config.is_file()) else None
  return {
      'lr': lr,
      'final': summary.get(f'eval_{metric}'),
      'best': max((v for _, v in evals), default=None),
      'reach_step': next((s for s, v in evals if v >= reach), None),
      'trainable': summary.get('trainable_params'),
      's_per_step': 1 / statistics.median(rates) if rates else None,
      # (wall minutes, the step they count from: a resume's, else 0)
      'wall': (summary['seconds'] / 60, summary.get('seconds_from', 0))
              if 'seconds' in summary else None,
      'status': 'done' if summary else (
          'unfinished' if records else 'not run'),
      'curve': evals,
  }


def table(rows: dict[str, dict[str, Any]], metric: str, reach: float) -> str:
  """A Markdown table, one line per point."""
  head = ['point', 'lr', f'final {metric}', f'best {metric}',
          f'steps to {reach:g}', 'trainable params', 's/step', 'wall min',
          'status']
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for name, r in rows.items():
    cells = [name, _fmt(r['lr'], '{:g}'), _fmt(r['final'], '{:.4f}'),
             _fmt(r['best'], '{:.4f}'), _fmt(r['reach_step'], '{}'),
             _fmt(r['trainable'], '{:,}'), _fmt(r['s_per_step'], '{:.2f}'),
             _fmt(r['wall'], _wall), r['status']]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


_SEED = 'train.seed='


def recipe(name: str) -> tuple[str, int]:
  """(the point's name without its train.seed=N part, N; 0 if none)."""
  parts = name.split(',')
  seeds = [p for p in parts if p.startswith(_SEED)]
  rest = ','.join(p for p in parts if not p.startswith(_SEED))
  return rest, int(seeds[-1][len(_SEED):]) if seeds else 0


def _half(name: str) -> str:
  """The eval records a point's name says it used (its `eval.half=`)."""
  return next((p for p in name.split(',') if p.startswith('eval.half=')), '')


def by_recipe(rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
  """Recipe -> {'seeds', 'final', 'best', 'wall'}: the done seeds, and per
  value (mean, sample std or None with one seed); an undone recipe has
  seeds () and None values."""
  done = {}
  for name, r in rows.items():
    key, seed = recipe(name)
    runs = done.setdefault(key, [])
    if r['status'].startswith('done') and r['final'] is not None:
      runs.append((seed, r))
  out = {}
  for key, runs in done.items():
    out[key] = {'seeds': tuple(sorted(seed for seed, _ in runs))}
    for value in ('final', 'best', 'wall'):
      got = [(r[value][0] if value == 'wall' else r[value])
             for _, r in runs if r[value] is not None]
      out[key][value] = (statistics.mean(got), statistics.stdev(got)
                         if len(got) > 1 else None) if got else None
  return out


def lead(recipes: dict[str, dict[str, Any]], baseline: str,
         metric: str) -> str:
  """One sentence: does the best recipe (by mean final `metric`, over the
  recipes with >= 2 seeds evaluated on `baseline`'s eval records) lead
  `baseline` by more than both stds?"""
  ranked = {k: r for k, r in recipes.items() if len(r['seeds']) > 1 and
            _half(k) == _half(baseline)}
  base = ranked.get(baseline)
  if base is None:
    return (f'No lead is stated: the baseline {baseline} has '
            f'{len(recipes.get(baseline, {}).get("seeds", ()))} seeds done '
            '(2 or more needed).')
  best = max(ranked, key=lambda k: ranked[k]['final'][0])
  if best == baseline:
    return (f'The baseline {baseline} has the best mean final {metric} of '
            f'the {len(ranked)} recipes with 2 or more seeds.')
  (m_best, s_best), (m_base, s_base) = ranked[best]['final'], base['final']
  gap = m_best - m_base
  holds = gap > max(s_best, s_base)
  return (f'{best} leads {baseline} by {gap:.4f} in mean final {metric} '
          f'({len(ranked[best]["seeds"])} and {len(base["seeds"])} seeds), '
          f'{"more" if holds else "not more"} than both standard '
          f'deviations ({s_best:.4f} and {s_base:.4f}): the lead '
          f'{"holds" if holds else "is not shown"} across seeds.')


def seed_table(rows: dict[str, dict[str, Any]], metric: str,
               baseline: str) -> str:
  """The per-recipe Markdown table over seeds and the `lead` sentence."""
  recipes = by_recipe(rows)
  head = ['recipe', 'seeds done', f'final {metric} mean', 'std',
          f'best {metric} mean', 'std', 'wall min mean']
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for key, r in recipes.items():
    cells = [key, ','.join(map(str, r['seeds'])) or '-']
    for value in ('final', 'best'):
      mean, std = r[value] or (None, None)
      cells += [_fmt(mean, '{:.4f}'), _fmt(std, '{:.4f}')]
    cells.append(_fmt(r['wall'] and r['wall'][0], '{:.1f}'))
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n\n' + lead(recipes, baseline, metric) + '\n'


def _fmt(value: Any, spec: str | Callable[[Any], str]) -> str:
  if value is None:
    return '-'
  return spec(value) if callable(spec) else spec.format(value)


_FROM = ' (from step '  # a resumed run's minutes: its last invocation's


def _wall(wall: tuple[float, int]) -> str:
  minutes, start = wall
  return f'{minutes:.1f}' + (f'{_FROM}{start})' if start else '')


def _read_wall(cell: str) -> tuple[float, int]:
  minutes, _, start = cell.partition(_FROM)
  return float(minutes), int(start.rstrip(')') or 0)


# The table's value columns (after the point's name), as `point_row` keys,
# and how a cell reads back.
_COLUMNS = (('lr', float), ('final', float), ('best', float),
            ('reach_step', int),
            ('trainable', lambda cell: int(cell.replace(',', ''))),
            ('s_per_step', float), ('wall', _read_wall))


def read_table(path: pathlib.Path) -> dict[str, dict[str, Any]]:
  """The done rows of an earlier `table` (point name -> row, no curve)."""
  rows = {}
  lines = path.read_text().splitlines()
  for number, line in enumerate(lines[2:], start=3):
    if not line.strip():  # the end of the points table
      break
    cells = [c.strip() for c in line.strip().strip('|').split('|')]
    if len(cells) != len(_COLUMNS) + 2:
      raise ValueError(f'{path}:{number}: not a row of experiments.compare\'s '
                       f'table ({len(cells)} cells, want '
                       f'{len(_COLUMNS) + 2}); pass its compare.md.')
    if not cells[-1].startswith('done'):
      continue
    try:
      row = {key: None if cell == '-' else read(cell)
             for (key, read), cell in zip(_COLUMNS, cells[1:-1])}
    except ValueError as e:
      raise ValueError(f'{path}:{number}: unreadable cell ({e}); pass '
                       'experiments.compare\'s compare.md.') from None
    rows[cells[0]] = dict(row, status='done (previous)', curve=[])
  return rows


def plot(rows: dict[str, dict[str, Any]], variants: dict[str, str],
         metric: str, path: pathlib.Path) -> None:
  """The metric over steps per point; final metric against lr per variant
  that was run at more than one rate."""
  fig, (curves, sweep) = figures.grid(2, width=6, height=4.5)
  for name, r in rows.items():
    if r['curve']:
      steps, values = zip(*r['curve'])
      curves.plot(steps, values, marker='.', label=name)
  curves.set(xlabel='step', ylabel=f'dev {metric}', title='per point')
  if curves.lines:
    curves.legend(fontsize=6)
  by_variant = collections.defaultdict(list)
  for name, r in rows.items():
    if r['final'] is not None:
      by_variant[variants[name]].append((r['lr'], r['final']))
  for variant, points in sorted(by_variant.items()):
    if len(points) > 1:
      lrs, finals = zip(*sorted(points))
      sweep.plot(lrs, finals, marker='o', label=variant)
  sweep.set(xscale='log', xlabel='learning rate', ylabel=f'final {metric}',
            title='learning-rate sweep')
  if sweep.lines:
    sweep.legend(fontsize=7)
  figures.save(fig, path)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config_arg = flags.FLAGS.config
  root = pathlib.Path(flags.FLAGS.workdir)
  previous = read_table(pathlib.Path(flags.FLAGS.previous)) if (
      flags.FLAGS.previous) else {}
  rows, variants = {}, {}
  for point in sweeps.points(config_arg):
    folder = root / sweeps.point_name(point)
    name = ','.join(str(v) if k == sweeps.ARG else f'{k}={v}'
                    for k, v in point.items())
    rows[name] = point_row(folder, flags.FLAGS.metric, flags.FLAGS.reach)
    if rows[name]['status'] == 'not run' and name in previous:
      rows[name] = previous[name]
    variants[name] = str(point.get(sweeps.ARG, ''))
  if not 0 <= flags.FLAGS.baseline < len(rows):
    raise ValueError(f'--baseline={flags.FLAGS.baseline}: the sweep has points 0 '
                     f'to {len(rows) - 1}.')
  baseline = recipe(list(rows)[flags.FLAGS.baseline])[0]
  text = (table(rows, flags.FLAGS.metric, flags.FLAGS.reach) + '\n' +
          seed_table(rows, flags.FLAGS.metric, baseline))
  atomic.write_file(root / COMPARE_MD, text)
  plot(rows, variants, flags.FLAGS.metric, root / COMPARE_PNG)
  print(text, end='')
  print(f'compare: wrote {root / COMPARE_MD} and {root / COMPARE_PNG}')


def cli(argv=None) -> int:
  """Runs main with `argv` (default sys.argv); the exit code (errors.cli)."""
  return errors.cli(main, argv, required=('config', 'workdir'))


def define_flags():
  """The command's flags, defined only when it runs as a command, so
  tests import this module beside other commands that have a --config."""
  flags.DEFINE_string(
      'config', None, 'The sweep config file and variant, e.g. '
      'configs/bert_sentiment_compare.py:local_data.')
  flags.DEFINE_string('workdir', None, 'The sweep root folder.')
  flags.DEFINE_string('metric', 'accuracy', 'The eval metric.')
  flags.DEFINE_float('reach', 0.85,
                     'The level whose first step is reported.')
  flags.DEFINE_string(
      'previous', None, 'An earlier compare.md whose done rows stand in for '
      'points not run under --workdir.')
  flags.DEFINE_integer(
      'baseline', 0, 'The sweep point (its index) whose recipe the best '
      'recipe is compared with.')


if __name__ == '__main__':
  define_flags()
  sys.exit(cli())
