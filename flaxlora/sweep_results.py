"""The results of a sweep: one row per finished point, written under the
sweep's root as results.csv, results.md (a Markdown table of final metrics
and hyper-parameters) and results.png (the points compared).

    rows = sweep_results.collect(points, root)   # points: sweeps.plan(...)
"""
import csv
import io
import os
import pathlib
from typing import Any, Mapping, Sequence

from flaxlora import atomic
from flaxlora import figures
from flaxlora import sweeps
from flaxlora import workdir as workdir_lib

RESULTS_CSV = 'results.csv'
RESULTS_MD = 'results.md'
RESULTS_PNG = 'results.png'


def collect(todo: Sequence[sweeps.Point], root: str | os.PathLike
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
