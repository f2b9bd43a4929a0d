"""Sweeps: a 2x2 grid runs each point in its own workdir (named from the
point, not its place), --dry_run prints one command per point,
results.csv/.md/.png list every point, a rerun (--parallel=2) skips finished
points with identical metrics; --launch=tpu's commands run through a
stand-in gcloud; --status reads the workdirs."""
import csv
import json
import os
import pathlib
import shlex
import shutil
import socket
import subprocess
import sys

import pytest

from flaxlora import sweep_status
from flaxlora import sweeps

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = '''
"""A 2x2 sweep over a shortened BERT runlocal."""
from configs import bert_sentiment_lora
from configs import common


def get_config(arg=None):
  c = bert_sentiment_lora.get_config('runlocal')
  c.train.update(steps=4, eval_every=0, log_every=2, checkpoint_every=0)
  c.data.generated.update(num_train=64, num_eval=16)
  return c


def get_sweep(arg=None):
  # Seeds only change values, not shapes: every point runs the same
  # programs, which the persistent compilation cache compiles once.
  return common.product(common.sweep('train.seed', [0, 1]),
                        common.sweep('data.generated.seed', [0, 1]))
'''


@pytest.fixture
def config_file(tmp_path):
  path = tmp_path / 'sweep_config.py'
  path.write_text(CONFIG)
  return path


def test_dry_run_prints_one_command_per_point(tmp_path, config_file):
  result = subprocess.run(
      [sys.executable, '-m', 'experiments.sweep', f'--config={config_file}',
       f'--workdir={tmp_path / "root"}', '--dry_run',
       '--config.optimizer.lr=0.02'],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  commands = result.stdout.strip().splitlines()
  assert len(commands) == 4
  for command in commands:
    assert command.startswith(f'python -m experiments.run --config='
                              f'{config_file} --workdir={tmp_path}/root/')
    assert '--config.optimizer.lr=0.02' in command
  assert commands[3].endswith(
      '--config.train.seed=1 --config.data.generated.seed=1')
  assert not (tmp_path / 'root').exists()


def _sweep(config_file, root, *more):
  result = subprocess.run(
      [sys.executable, '-m', 'experiments.sweep', f'--config={config_file}',
       f'--workdir={root}', *more], cwd=REPO, capture_output=True,
      text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def _results_but_wall_time(root):
  """results.csv's rows without what depends on when the run ran."""
  with open(root / 'results.csv') as f:
    rows = list(csv.DictReader(f))
  for row in rows:
    assert float(row.pop('seconds')) > 0
    row.pop('date', None)
  return rows


def test_grid_runs_writes_results_and_skips_finished_points(
    tmp_path, config_file):
  root = tmp_path / 'root'
  _sweep(config_file, root)
  with open(root / 'results.csv') as f:
    table = list(csv.DictReader(f))
  assert [(r['train.seed'], r['data.generated.seed']) for r in table] == [
      ('0', '0'), ('0', '1'), ('1', '0'), ('1', '1')]
  # An accuracy over the 16 eval examples: a multiple of 1/16 in [0, 1].
  for r in table:
    hits = float(r['eval_accuracy']) * 16
    assert 0 <= hits <= 16 and abs(hits - round(hits)) < 1e-4, r
  # Different seeds train different adapters.
  assert len({r['train_loss'] for r in table}) == 4
  markdown = (root / 'results.md').read_text().splitlines()
  assert markdown[0].startswith(
      '| point | train.seed | data.generated.seed | eval_')
  assert len(markdown) == 2 + 4
  assert (root / 'results.png').stat().st_size > 0
  points = [r['point'] for r in table]
  assert points[1] == sweeps.point_name(
      {'data.generated.seed': 1, 'train.seed': 0})
  assert sorted(p.name for p in root.iterdir() if p.is_dir()) == sorted(
      points)
  # Rerun with one point removed, 2 at a time: three are skipped, the
  # removed one runs again from scratch (a subprocess) and gives identical
  # metrics.
  before = _results_but_wall_time(root)
  shutil.rmtree(root / points[2])
  output = _sweep(config_file, root, '--parallel=2')
  assert output.count('skipped') == 3
  assert _results_but_wall_time(root) == before
  assert (root / points[2] / 'summary.json').exists()
  assert 'flaxlora: done' in (root / 'logs' / f'{points[2]}.log').read_text()


def test_bad_sweep_override_is_named(tmp_path, config_file):
  module = sweeps.load_module(str(config_file))
  with pytest.raises(ValueError, match=r"'peft.rnak'.*known there: "):
    sweeps.apply(module.get_config(), {'peft.rnak': 2})
  with pytest.raises(ValueError, match=r'peft.rank=.four.'):
    sweeps.apply(module.get_config(), {'peft.rank': 'four'})
  with pytest.raises(ValueError, match='defines no get_sweep'):
    sweeps.points(str(REPO / 'configs/bert_squad_lora.py'))


ARG_CONFIG = '''
"""Points that pick the comparison config's variants, shortened."""
from configs import bert_sentiment_compare


def get_config(arg=None):
  c = bert_sentiment_compare.get_config(arg)
  c.train.update(steps=4, eval_every=2, log_every=2, checkpoint_every=0)
  c.data.generated.update(num_train=64, num_eval=16)
  return c


def get_sweep(arg=None):
  return [{'arg': 'method=lora,runlocal'}, {'arg': 'method=ia3,runlocal'},
          {'arg': 'method=lora,runlocal', 'optimizer.lr': 0.05}]
'''


def _compare(flag, root, *more, ok=True):
  # A subprocess: experiments' CLIs each define --config (absl flags).
  result = subprocess.run(
      [sys.executable, '-m', 'experiments.compare', flag,
       f'--workdir={root}', *more], cwd=REPO, capture_output=True, text=True,
      timeout=120)
  assert (result.returncode == 0) == ok, result.stderr[-2000:]
  return result


def _point_rows(root):
  """The rows of compare.md's first table (one per point)."""
  return (root / 'compare.md').read_text().split('\n\n')[0].splitlines()[2:]


def test_arg_points_pick_variants_and_compare_tabulates(tmp_path):
  config_file = tmp_path / 'arg_config.py'
  config_file.write_text(ARG_CONFIG)
  root = tmp_path / 'root'
  flag = f'--config={config_file}:runlocal'
  _compare(flag, root)
  assert (root / 'compare.md').read_text().count('| not run |') == 3
  _sweep(f'{config_file}:runlocal', root)
  points = [root / sweeps.point_name(p)
            for p in sweeps.points(f'{config_file}:runlocal')]
  assert sorted(points) == sorted(p for p in root.iterdir() if p.is_dir())
  methods = [json.loads((p / 'config.json').read_text())['peft']['method']
             for p in points]
  assert methods == ['lora', 'ia3', 'lora']  # each point's own section
  # Say point 1 was resumed at step 2: its minutes are its last invocation's.
  summary_file = points[1] / 'summary.json'
  summary_file.write_text(json.dumps(dict(
      json.loads(summary_file.read_text()), seconds_from=2)))
  _compare(flag, root)
  lines = _point_rows(root)
  assert len(lines) == 3 and all(line.endswith('| done |') for line in lines)
  assert [line.count(' (from step 2) |') for line in lines] == [0, 1, 0]
  cells = [line.split(' | ') for line in lines]
  assert [c[1] for c in cells] == ['0.01', '0.03', '0.05']  # 10x each lr
  assert cells[0][5] != cells[1][5]  # LoRA and IA3 train other params
  summaries = [json.loads((p / 'summary.json').read_text()) for p in points]
  assert cells[0][2] == f"{summaries[0]['eval_accuracy']:.4f}"
  assert (root / 'compare.png').stat().st_size > 0

  # A point run elsewhere: its row comes from the earlier table.
  earlier = tmp_path / 'earlier.md'
  earlier.write_text((root / 'compare.md').read_text())
  shutil.rmtree(points[1])
  _compare(flag, root, f'--previous={earlier}')
  again = _point_rows(root)
  assert again[0] == lines[0] and again[2] == lines[2]
  assert again[1] == lines[1].replace('| done |', '| done (previous) |')
  _compare(flag, root)  # without it, the point is not run
  assert (root / 'compare.md').read_text().count('| not run |') == 1
  rows = earlier.read_text().splitlines()
  rows[3] += ' x |'  # a tenth cell on its line 4
  earlier.write_text('\n'.join(rows))
  failed = _compare(flag, root, f'--previous={earlier}', ok=False)
  assert f'{earlier}:4: not a row' in failed.stderr


def test_arg_point_commands_name_the_variant(tmp_path):
  config_file = tmp_path / 'arg_config.py'
  config_file.write_text(ARG_CONFIG)
  result = subprocess.run(
      [sys.executable, '-m', 'experiments.sweep',
       f'--config={config_file}:runlocal', f'--workdir={tmp_path / "root"}',
       '--dry_run', '--config.train.seed=3'],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  commands = result.stdout.strip().splitlines()
  assert commands[1].startswith(
      f'python -m experiments.run --config={config_file}:method=ia3,runlocal')
  assert commands[2].endswith(
      '--config.train.seed=3 --config.optimizer.lr=0.05')


def test_point_names_follow_the_point_not_its_place(tmp_path, config_file):
  point = {'arg': 'method=lora,runlocal', 'optimizer.lr': 0.05}
  name = sweeps.point_name(point)
  assert name.startswith('method=lora,runlocal,optimizer.lr=0.05-')
  assert sweeps.point_name(dict(reversed(point.items()))) == name
  assert sweeps.point_name({**point, 'optimizer.lr': 0.5}) != name
  # A point added in front and the others reordered: each keeps its folder.
  grid = {p.name: p.overrides for p in sweeps.plan(
      sweeps.load_module(str(config_file)).get_config(), str(config_file),
      tmp_path)}
  edited = tmp_path / 'edited.py'
  edited.write_text(CONFIG.replace(
      "  return common.product(", "  return [{'train.seed': 7}] + common."
      "product(").replace("[0, 1]))", "[1, 0]))"))
  again = {p.name: p.overrides for p in sweeps.plan(
      sweeps.load_module(str(edited)).get_config(), str(edited), tmp_path)}
  assert len(again) == 5 and grid.items() <= again.items()
  edited.write_text(CONFIG.replace("[0, 1]))", "[0, 1, 0]))"))
  with pytest.raises(ValueError, match='points 0 and 2 are the same'):
    sweeps.plan(sweeps.load_module(str(edited)).get_config(), str(edited),
                tmp_path)


def test_committed_comparison_records_are_points_of_the_sweep():
  names = {sweeps.point_name(p) for p in sweeps.points(
      str(REPO / 'configs/bert_sentiment_compare.py:local_data'))}
  records = sorted((REPO / 'experiments/results/sst2_compare').glob('*.json'))
  recorded = {sweeps.point_name(json.loads(r.read_text())['point'])
              for r in records}
  assert recorded and recorded <= names, recorded - names


FAKE_GCLOUD = """#!/usr/bin/env python3
import json, os, sys
with open(os.environ['GCLOUD_RECORD'], 'a') as f:
  f.write(json.dumps(sys.argv[1:]) + '\\n')
command = sys.argv[-1]
print('all workers ran:', command)
sys.exit(3 if command.endswith('seed=1 --config.data.generated.seed=1')
         else 0)
"""
TPU_LAUNCH = """

def get_launch(arg=None):
  return {'tpu': {'slices': 'slice-a,slice-b', 'setup': 'pip install -e .'}}
"""


def test_tpu_launch_runs_its_commands_through_gcloud(tmp_path, config_file):
  config_file.write_text(CONFIG + TPU_LAUNCH)
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  (bin_dir / 'gcloud').write_text(FAKE_GCLOUD)
  (bin_dir / 'gcloud').chmod(0o755)
  record, root = tmp_path / 'calls.jsonl', tmp_path / 'root'
  env = dict(os.environ, PATH=f'{bin_dir}:{os.environ["PATH"]}',
             GCLOUD_RECORD=str(record))
  argv = [sys.executable, '-m', 'experiments.sweep',
          f'--config={config_file}', f'--workdir={root}', '--launch=tpu',
          '--tpu.zone=us-central2-b']
  shown = subprocess.run(argv, cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120)
  assert shown.returncode == 0, shown.stderr[-2000:]
  printed = [shlex.split(line)[1:] for line in shown.stdout.splitlines()
             if line.strip().startswith('gcloud ')]
  assert not record.exists()  # printing runs nothing
  ran = subprocess.run(argv + ['--execute'], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
  assert ran.returncode == 2
  calls = [json.loads(line) for line in record.read_text().splitlines()]
  assert sorted(map(json.dumps, calls)) == sorted(map(json.dumps, printed))
  names = [p.name for p in sweeps.plan(
      sweeps.load_module(str(config_file)).get_config(), str(config_file),
      root)]
  for k, slice_name in enumerate(['slice-a', 'slice-b']):
    mine = [c for c in calls if c[4] == slice_name]
    assert all(c[:7] == ['compute', 'tpus', 'tpu-vm', 'ssh', slice_name,
                         '--worker=all', '--zone=us-central2-b'] for c in mine)
    commands = [c[-1] for c in mine]
    assert commands[0] == '--command=cd ~/flaxlora && pip install -e .'
    assert [c.split('--workdir=')[1].split()[0] for c in commands[1:]] == [
        str(root / n) for n in names[k::2]]  # points in turn, in order
    assert all(c.startswith('--command=cd ~/flaxlora && python3 -m '
                            f'experiments.run --config={config_file} ')
               for c in commands[1:])
  assert f'{names[3]} failed' in ran.stderr
  assert 'all workers ran:' in (root / 'logs' / f'{names[0]}.log').read_text()


def test_status_reads_each_point_from_its_workdir_and_log(tmp_path):
  root = tmp_path / 'root'
  points = [sweeps.Point(f'p{i}', {'train.seed': i}, None, root / f'p{i}', [])
            for i in range(5)]
  for point in points[:4]:
    point.workdir.mkdir(parents=True)
  (points[0].workdir / 'summary.json').write_text(json.dumps(
      {'eval_accuracy': 0.8125, 'step': 4}))
  metrics = ''.join(json.dumps(r) + '\n' for r in (
      {'step': 2, 'split': 'train', 'loss': 0.7},
      {'step': 2, 'split': 'eval', 'accuracy': 0.5}))
  for point in points[1:4]:
    (point.workdir / 'metrics.jsonl').write_text(metrics)
  (points[1].workdir / 'run.lock').write_text(json.dumps(
      {'pid': os.getpid(), 'host': socket.gethostname()}))
  sweeps.log_path(root, 'p2').parent.mkdir()
  sweeps.log_path(root, 'p2').write_text(
      'step 2/4 loss 0.7\nflaxlora: error: data.files.train: no file x\n')
  rows = sweep_status.rows(points, root, {})
  assert rows == [
      ('p0', 'done', 'eval_accuracy 0.8125'),
      ('p1', 'running', 'step 2, last eval (step 2) accuracy 0.5'),
      ('p2', 'failed', 'flaxlora: error: data.files.train: no file x'),
      ('p3', 'stopped', 'step 2, last eval (step 2) accuracy 0.5'),
      ('p4', 'not started', '')]
  # What squeue says wins over the workdir while Slurm has the task.
  slurm_says = {'p3': {'job': '7_3', 'state': 'PENDING', 'restarts': 1,
                       'reason': 'BeginTime'},
                'p4': {'job': '7_4', 'state': 'PENDING', 'restarts': 0,
                       'reason': 'Resources'}}
  rows = sweep_status.rows(points, root, slurm_says)
  assert rows[3] == ('p3', 'requeued', 'job 7_3: resumes from step 2, last '
                     'eval (step 2) accuracy 0.5')
  assert rows[4] == ('p4', 'queued', 'job 7_4: Resources')
  table = sweep_status.table(rows)
  assert table.splitlines()[-1] == ('1 done, 1 running, 1 failed, '
                                    '1 requeued, 1 queued')


def test_parallel_names_a_failed_point_and_its_error(tmp_path, config_file):
  config_file.write_text(CONFIG.replace(
      "  return common.product(",
      "  return [{'train.batch_size': 0}]\n  common.product("))
  result = subprocess.run(
      [sys.executable, '-m', 'experiments.sweep', f'--config={config_file}',
       f'--workdir={tmp_path / "root"}', '--parallel=2'], cwd=REPO,
      capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr[-2000:]
  name = sweeps.point_name({'train.batch_size': 0})
  assert result.stderr.strip() == (
      f'flaxlora: error: 1 point(s) failed: {name}: flaxlora: error: '
      'train.batch_size=0 must be >= 1 (examples per step); set '
      '--config.train.batch_size to a value >= 1.')
