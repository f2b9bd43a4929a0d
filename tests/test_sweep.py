"""Sweeps: a 2x2 grid runs each point in its own workdir, --dry_run prints
one command per point, results.csv/.md/.png list every point, and a rerun
skips finished points with identical metrics."""
import csv
import json
import pathlib
import shutil
import subprocess
import sys

import pytest

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
                              f'{config_file} --workdir={tmp_path}/root/0')
    assert '--config.optimizer.lr=0.02' in command
  assert commands[3].endswith(
      '--config.train.seed=1 --config.data.generated.seed=1')
  assert not (tmp_path / 'root').exists()


def _sweep(config_file, root):
  result = subprocess.run(
      [sys.executable, '-m', 'experiments.sweep', f'--config={config_file}',
       f'--workdir={root}'], cwd=REPO, capture_output=True,
      text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def _results_but_wall_time(root):
  with open(root / 'results.csv') as f:
    rows = list(csv.DictReader(f))
  for row in rows:
    assert float(row.pop('seconds')) > 0
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
  points = sorted(p.name for p in root.iterdir() if p.is_dir())
  assert len(points) == 4 and points[0].startswith('00_train.seed=0')
  # Rerun with one point removed: three are skipped, the removed one runs
  # again from scratch and gives identical metrics.
  before = _results_but_wall_time(root)
  shutil.rmtree(root / points[2])
  output = _sweep(config_file, root)
  assert output.count('skipped') == 3
  assert _results_but_wall_time(root) == before
  assert (root / points[2] / 'summary.json').exists()


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


def test_arg_points_pick_variants_and_compare_tabulates(tmp_path):
  config_file = tmp_path / 'arg_config.py'
  config_file.write_text(ARG_CONFIG)
  root = tmp_path / 'root'
  flag = f'--config={config_file}:runlocal'
  _compare(flag, root)
  assert (root / 'compare.md').read_text().count('| not run |') == 3
  _sweep(f'{config_file}:runlocal', root)
  points = sorted(p for p in root.iterdir() if p.is_dir())
  methods = [json.loads((p / 'config.json').read_text())['peft']['method']
             for p in points]
  assert methods == ['lora', 'ia3', 'lora']  # each point's own section
  # Say point 1 was resumed at step 2: its minutes are its last invocation's.
  summary_file = points[1] / 'summary.json'
  summary_file.write_text(json.dumps(dict(
      json.loads(summary_file.read_text()), seconds_from=2)))
  _compare(flag, root)
  lines = (root / 'compare.md').read_text().splitlines()[2:]
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
  again = (root / 'compare.md').read_text().splitlines()[2:]
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
