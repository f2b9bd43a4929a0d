r"""Runs the three real-data configs on ../shared/data and prints a table.

  python -m experiments.run_real_data --workdir=workdirs/real_data

  sst2   configs/bert_sentiment_lora.py:local_data  MiniLM + LoRA r=8 on
         <= 20k SST-2 train sentences; target dev accuracy >= 87%, < 20 min
  squad  configs/bert_squad_lora.py:local_data      MiniLM + LoRA, train on
         the first 40 SQuAD v1.1 dev articles, eval on the last 8; target
         F1 >= 65 after one pass, < 45 min
  xsum   configs/t5_lora.py:local_data              tiny random T5, XSum
         800/200 split; target: the train loss falls; ROUGE reported
  sst2_prompt  configs/bert_sentiment_prompt.py:local_data  prompt tuning
  sst2_qlora   configs/bert_sentiment_qlora.py:local_data   QLoRA
         both with the sst2 run's data and budget; accuracy reported beside
         LoRA's (no target)

Each run has its own workdir (ROOT/<name>) and resumes if stopped. --only
picks some of them (e.g. --only=sst2,xsum); the default is the first three.
"""
import importlib
import pathlib
import time

from absl import app
from absl import flags

_WORKDIR = flags.DEFINE_string('workdir', 'workdirs/real_data',
                               'Root folder; each run writes ROOT/<name>.')
_ONLY = flags.DEFINE_list('only', [], 'Runs to do (default: sst2, squad, '
                          'xsum).')
_OVERWRITE = flags.DEFINE_bool('overwrite', False,
                               'Discard earlier runs of other configs.')

# name -> (config module, variant, metric, target: (summary, records) -> bool)
RUNS = {
    'sst2': ('configs.bert_sentiment_lora', 'local_data', 'eval_accuracy',
             '>= 0.87', lambda s, r: s['eval_accuracy'] >= 0.87),
    'squad': ('configs.bert_squad_lora', 'local_data', 'eval_f1', '>= 65',
              lambda s, r: s['eval_f1'] >= 65),
    'xsum': ('configs.t5_lora', 'local_data', 'eval_rougeL',
             'loss falls', lambda s, r: _loss_falls(r)),
    'sst2_prompt': ('configs.bert_sentiment_prompt', 'local_data',
                    'eval_accuracy', 'reported', lambda s, r: True),
    'sst2_qlora': ('configs.bert_sentiment_qlora', 'local_data',
                   'eval_accuracy', 'reported', lambda s, r: True),
}
DEFAULT = ('sst2', 'squad', 'xsum')


def _loss_falls(records) -> bool:
  losses = [r['loss'] for r in records if r['split'] == 'train']
  return len(losses) > 1 and losses[-1] < losses[0]


def _first_loss(records) -> float:
  losses = [r['loss'] for r in records if r['split'] == 'train']
  return losses[0] if losses else float('nan')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  # pylint: disable=g-import-not-at-top
  from flaxlora import trainer
  from flaxlora import workdir as workdir_lib
  unknown = set(_ONLY.value) - set(RUNS)
  if unknown:
    raise app.UsageError(f'--only: unknown runs {sorted(unknown)}; use '
                         f'{sorted(RUNS)}.')
  rows = []
  for name, (module, variant, metric, target, check) in RUNS.items():
    if name not in (_ONLY.value or DEFAULT):
      continue
    config = importlib.import_module(module).get_config(variant)
    workdir = pathlib.Path(_WORKDIR.value) / name
    print(f'=== {name}: {module.replace(".", "/")}.py:{variant} -> {workdir}',
          flush=True)
    start = time.time()
    summary = trainer.train_and_evaluate(config, workdir,
                                         overwrite=_OVERWRITE.value)
    records = workdir_lib.read_metrics(workdir)
    rows.append((name, metric, summary.get(metric, float('nan')),
                 _first_loss(records), summary.get('train_loss'),
                 (time.time() - start) / 60, target,
                 'yes' if check(summary, records) else 'NO'))
  print('\n| run | metric | value | first loss | last loss | minutes | '
        'target | met |\n|---|---|---|---|---|---|---|---|')
  for row in rows:
    print('| {} | {} | {:.4g} | {:.4g} | {:.4g} | {:.1f} | {} | {} |'.format(
        *row))


if __name__ == '__main__':
  app.run(main)
