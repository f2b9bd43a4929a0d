"""Sweeps: a 2x2 grid runs each point in its own workdir, --dry_run prints
one command per point, results.csv/.md/.png list every point, and a rerun
skips finished points with identical metrics."""
import csv
import json
import pathlib
import subprocess
import sys

import pytest

from flaxlora import sweeps
from flaxlora import trainer

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
  return common.product(common.sweep('train.seed', [0, 1]),
                        common.sweep('peft.rank', [2, 4]))
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
  assert '--config.train.seed=1 --config.peft.rank=4' in commands[3]
  assert not (tmp_path / 'root').exists()


def test_grid_runs_writes_results_and_skips_finished_points(
    tmp_path, config_file, capsys):
  module = sweeps.load_module(str(config_file))
  root = tmp_path / 'root'
  rows = sweeps.run(module.get_config(), str(config_file), root,
                    train_fn=trainer.train_and_evaluate)
  assert len(rows) == 4
  with open(root / 'results.csv') as f:
    table = list(csv.DictReader(f))
  assert [(r['train.seed'], r['peft.rank']) for r in table] == [
      ('0', '2'), ('0', '4'), ('1', '2'), ('1', '4')]
  assert all(float(r['eval_accuracy']) >= 0 for r in table)
  markdown = (root / 'results.md').read_text().splitlines()
  assert markdown[0].startswith('| point | train.seed | peft.rank | eval_')
  assert len(markdown) == 2 + 4
  assert (root / 'results.png').stat().st_size > 0
  points = sorted(p.name for p in root.iterdir() if p.is_dir())
  assert len(points) == 4 and points[0].startswith('00_train.seed=0')
  # Different hyper-parameters give different adapters (rank 2 vs 4).
  sizes = {r['peft.rank']: r['trainable_params'] for r in rows}
  assert sizes[2] < sizes[4]
  # A rerun skips every finished point and reports the same metrics.
  capsys.readouterr()
  again = sweeps.run(module.get_config(), str(config_file), root,
                     train_fn=trainer.train_and_evaluate)
  assert capsys.readouterr().out.count('skipped') == 4
  assert again == rows
  # The same point run again from scratch gives identical metrics.
  fresh = trainer.train_and_evaluate(
      sweeps.apply(module.get_config(), {'train.seed': 1, 'peft.rank': 2}),
      tmp_path / 'fresh')
  assert fresh == json.loads(
      (root / points[2] / 'summary.json').read_text())


def test_bad_sweep_override_is_named(tmp_path, config_file):
  module = sweeps.load_module(str(config_file))
  with pytest.raises(ValueError, match=r"'peft.rnak'.*known there: "):
    sweeps.apply(module.get_config(), {'peft.rnak': 2})
  with pytest.raises(ValueError, match=r'peft.rank=.four.'):
    sweeps.apply(module.get_config(), {'peft.rank': 'four'})
  with pytest.raises(ValueError, match='defines no get_sweep'):
    sweeps.points(str(REPO / 'configs/bert_squad_lora.py'))
