"""Published results are data: committed records, one generator, no paths.

docs/results.md must be exactly what `python -m experiments.results` makes
of the committed records; each record names its point, config, metrics,
hardware, date and commit, and no machine's folders; a point has one
record. Runs write their own provenance (`flaxlora.provenance`) and a
`config.json` without the paths of the machine they ran on.
"""
import json
import os
import pathlib

from experiments import results
from flaxlora import provenance
from flaxlora import workdir as workdir_lib

KEYS = {'point', 'config', 'summary', 'metrics', 'hardware', 'date',
        'commit', 'dirty'}


def _strings(tree):
  if isinstance(tree, dict):
    for value in tree.values():
      yield from _strings(value)
  elif isinstance(tree, list):
    for value in tree:
      yield from _strings(value)
  elif isinstance(tree, str):
    yield tree


def _all_records():
  """Every run record of every study (experiments/results/plan holds
  `experiments.plan` reports, not run records)."""
  return {path: json.loads(path.read_text())
          for study in results.STUDIES
          for path in sorted((results.RECORDS / study).glob('*.json'))}


def test_records_are_whole_and_name_no_machine_path():
  records = _all_records()
  assert records
  for path, record in records.items():
    assert set(record) == KEYS, path
    assert record['hardware'].get('cores') and record['hardware'].get(
        'matmul_peak_gflops'), path
    assert record['date'] and record['commit'], path
    absolute = [s for s in _strings(record) if os.path.isabs(s)]
    assert not absolute, f'{path}: machine paths {absolute[:3]}'


def test_a_point_has_one_record():
  seen = {}
  for path, record in _all_records().items():
    key = (path.parent.name, json.dumps(record['point'], sort_keys=True))
    assert key not in seen, f'{path} and {seen[key]} record one point'
    seen[key] = path


def test_results_page_is_generated_from_the_records(tmp_path):
  assert results.page(results.RECORDS, tmp_path) == results.PAGE.read_text(), (
      'docs/results.md is stale: run python -m experiments.results')
  assert (tmp_path / 'sst2_compare.png').stat().st_size > 0


def _finished_run(folder: pathlib.Path, accuracy: float, peak: float):
  folder.mkdir(parents=True)
  (folder / 'config.json').write_text(json.dumps(
      {'optimizer': {'lr': 0.01}, 'data': {'train_file': 'train.tsv'}}))
  (folder / 'metrics.jsonl').write_text(
      json.dumps({'step': 2, 'split': 'train', 'loss': 1.0,
                  'steps_per_s': 4.0}) + '\n' +
      json.dumps({'step': 2, 'split': 'eval', 'accuracy': accuracy}) + '\n')
  workdir_lib.write_summary(folder, {
      'step': 2, 'eval_accuracy': accuracy, 'trainable_params': 10,
      'hardware': {'cpu_model': 'a CPU', 'cores': 2,
                   'matmul_peak_gflops': peak},
      'date': '2026-12-07T10:00:00+00:00', 'commit': 'abc', 'dirty': False})


def test_add_keeps_one_record_per_point_the_newest(tmp_path, monkeypatch):
  point = {'arg': 'method=lora,runlocal', 'optimizer.lr': 0.01}
  monkeypatch.setattr(results, 'RECORDS', tmp_path / 'records')
  monkeypatch.setattr(results.sweeps, 'points', lambda arg: [point])
  monkeypatch.setattr(results.sweeps, 'point_name',
                      lambda *args: 'some-folder')
  config = results.STUDIES['sst2_compare']['config']
  _finished_run(tmp_path / 'old' / 'some-folder', 0.5, 100.0)
  _finished_run(tmp_path / 'new' / 'some-folder', 0.75, 200.0)
  results.add(tmp_path / 'old', config)
  (written,) = results.add(tmp_path / 'new', config)
  assert list((tmp_path / 'records' / 'sst2_compare').iterdir()) == [written]
  record = json.loads(written.read_text())
  assert record['point'] == point
  assert record['summary']['eval_accuracy'] == 0.75
  assert record['hardware']['matmul_peak_gflops'] == 200.0
  assert 'hardware' not in record['summary']
  row = results.row(record, 'accuracy', 0.7)
  assert (row['final'], row['reach_step'], row['s_per_step']) == (0.75, 2,
                                                                   0.25)
  assert row['hardware'] == 'a CPU, 2 cores, 200 GFLOP/s fp32 matmul'


def test_provenance_measures_this_machine():
  record = provenance.record()
  hardware = record['hardware']
  assert hardware['cores'] >= 1 and hardware['matmul_peak_gflops'] > 0
  assert hardware['platform'] == 'cpu'
  assert record['date'][:2] == '20'
  assert record['commit'] is None or len(record['commit']) == 40


def test_config_json_paths_are_relative_to_where_the_run_started(
    tmp_path, monkeypatch):
  repo = tmp_path / 'flaxlora'
  data = tmp_path / 'shared' / 'train.tsv'
  repo.mkdir()
  data.parent.mkdir()
  data.write_text('x')
  monkeypatch.chdir(repo)
  config = {'data': {'train_file': str(data), 'eval_file': '/no/such/file',
                     'files': [str(data)]}, 'model': {'path': 'pkg:x/y'}}
  recorded = workdir_lib.config_dict(config)
  assert recorded['data']['train_file'] == os.path.join('..', 'shared',
                                                        'train.tsv')
  assert recorded['data']['files'] == [recorded['data']['train_file']]
  assert recorded['data']['eval_file'] == '/no/such/file'  # not a file here
  assert recorded['model']['path'] == 'pkg:x/y'
  # Far from the run's folder, a path stays absolute (it names the data).
  deep = tmp_path / 'a' / 'b'
  deep.mkdir(parents=True)
  monkeypatch.chdir(deep)
  assert workdir_lib.config_dict({'f': str(data)}) == {'f': str(data)}
