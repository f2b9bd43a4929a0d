"""experiments.compare's per-recipe table over seeds, from synthetic run
records: means and sample stds against numpy, the lead sentence computed
from the data (holds, not shown, no baseline seeds), and an earlier table
with the recipe table under it still read back, only recipes on the
baseline's eval records ranked; `eval.half`'s two halves of the records."""
import json

import numpy as np
import pytest

from experiments import compare
from flaxlora import workdir as workdir_lib
from flaxlora.data import task_data

LORA, SCALORA = 'method=lora,local_data', 'method=scalora,local_data'


def _write_run(folder, evals, seconds=600.0):
  """A finished run's records: eval accuracy at steps 125, 250, ..."""
  folder.mkdir(parents=True)
  lines = [{'step': 125 * (i + 1), 'split': 'eval', 'accuracy': v}
           for i, v in enumerate(evals)]
  lines.append({'step': 1, 'split': 'train', 'loss': 0.7,
                'steps_per_s': 2.0})
  (folder / workdir_lib.METRICS_FILE).write_text(
      ''.join(json.dumps(r) + '\n' for r in lines))
  (folder / workdir_lib.SUMMARY_FILE).write_text(json.dumps(
      {'eval_accuracy': evals[-1], 'seconds': seconds,
       'trainable_params': 10}))
  (folder / workdir_lib.CONFIG_FILE).write_text(json.dumps(
      {'optimizer': {'lr': 1e-3}}))


def _rows(tmp_path, runs):
  """{point name: row} for {name: eval accuracies or None (not run)}."""
  rows = {}
  for i, (name, evals) in enumerate(runs.items()):
    folder = tmp_path / f'{i:02d}'
    if evals is not None:
      _write_run(folder, evals, seconds=60.0 * (i + 1))
    rows[name] = compare.point_row(folder, 'accuracy', 0.85)
  return rows


def test_recipe_drops_only_the_seed():
  assert compare.recipe(SCALORA + ',train.seed=2,optimizer.lr=0.002') == (
      SCALORA + ',optimizer.lr=0.002', 2)
  assert compare.recipe(LORA) == (LORA, 0)


def test_means_and_stds_over_seeds_against_numpy(tmp_path):
  lora = {LORA: [0.85, 0.870], f'{LORA},train.seed=1': [0.86, 0.862],
          f'{LORA},train.seed=2': [0.88, 0.866]}
  sca = {SCALORA: [0.87, 0.881], f'{SCALORA},train.seed=1': [0.89, 0.884],
         f'{SCALORA},train.seed=2': [0.885, 0.880],
         'method=prefix,local_data': None}
  rows = _rows(tmp_path, {**lora, **sca})
  recipes = compare.by_recipe(rows)
  assert list(recipes) == [LORA, SCALORA, 'method=prefix,local_data']
  for key, runs in ((LORA, lora), (SCALORA, sca)):
    finals = [v[-1] for v in runs.values() if v]
    bests = [max(v) for v in runs.values() if v]
    assert recipes[key]['seeds'] == (0, 1, 2)
    np.testing.assert_allclose(recipes[key]['final'],
                               (np.mean(finals), np.std(finals, ddof=1)))
    np.testing.assert_allclose(recipes[key]['best'],
                               (np.mean(bests), np.std(bests, ddof=1)))
  assert recipes['method=prefix,local_data'] == {
      'seeds': (), 'final': None, 'best': None, 'wall': None}
  np.testing.assert_allclose(recipes[LORA]['wall'][0], 2.0)  # 1, 2, 3 min
  # ScaLoRA's mean final 0.8817 leads 0.8660 by 0.0157 > stds .0021, .0040.
  text = compare.seed_table(rows, 'accuracy', LORA)
  assert f'{SCALORA} leads {LORA} by 0.0157' in text
  assert 'the lead holds across seeds' in text
  assert f'| {SCALORA} | 0,1,2 | 0.8817 | 0.0021 | 0.8853 | 0.0045 |' in text


def test_a_lead_within_a_std_is_not_shown(tmp_path):
  rows = _rows(tmp_path, {
      LORA: [0.86], f'{LORA},train.seed=1': [0.88],
      SCALORA: [0.875], f'{SCALORA},train.seed=1': [0.877]})
  text = compare.lead(compare.by_recipe(rows), LORA, 'accuracy')
  assert 'by 0.0060' in text and 'the lead is not shown' in text
  # The data, not the order, picks the best: swapped, LoRA leads nothing.
  rows = _rows(tmp_path / 'b', {LORA: [0.9], f'{LORA},train.seed=1': [0.9],
                                SCALORA: [0.8]})
  assert 'has the best mean' in compare.lead(compare.by_recipe(rows), LORA,
                                             'accuracy')
  rows = _rows(tmp_path / 'c', {LORA: [0.9], SCALORA: [0.8]})
  assert 'has 1 seeds done' in compare.lead(compare.by_recipe(rows), LORA,
                                            'accuracy')


def test_an_earlier_table_reads_back_above_its_recipe_table(tmp_path):
  rows = _rows(tmp_path, {LORA: [0.86], f'{LORA},train.seed=1': [0.88]})
  path = tmp_path / 'compare.md'
  path.write_text(compare.table(rows, 'accuracy', 0.85) + '\n' +
                  compare.seed_table(rows, 'accuracy', LORA))
  back = compare.read_table(path)
  assert list(back) == list(rows)
  for name, row in rows.items():
    assert back[name]['final'] == pytest.approx(row['final'], abs=1e-4)
  assert compare.by_recipe(back)[LORA]['seeds'] == (0, 1)


def test_only_recipes_on_the_baselines_eval_records_are_ranked(tmp_path):
  report = ',eval.half=report'
  rows = _rows(tmp_path, {
      LORA + report: [0.86], f'{LORA}{report},train.seed=1': [0.862],
      SCALORA: [0.95], f'{SCALORA},train.seed=1': [0.95],  # all of dev
      SCALORA + report: [0.87], f'{SCALORA}{report},train.seed=1': [0.872]})
  text = compare.lead(compare.by_recipe(rows), LORA + report, 'accuracy')
  assert text.startswith(f'{SCALORA}{report} leads')


def test_eval_halves_split_the_records_in_two():
  records = list(range(11))
  select, report = (task_data.eval_half(records, h, 0)
                    for h in ('select', 'report'))
  assert sorted(select + report) == records and len(select) == 5
  assert select == sorted(select) and report == sorted(report)
  assert task_data.eval_half(records, 'select', 1) != select  # split_seed
  assert task_data.eval_half(records, '', 0) == records
  with pytest.raises(ValueError, match="eval.half='first'"):
    task_data.eval_half(records, 'first', 0)
