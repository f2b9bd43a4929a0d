"""experiments/summarize_compare.py: one recipe, the record and its table."""
import json

import pytest

from experiments import summarize_compare


def _entry(rouge_l, steps=0):
  return {'metrics': {'rouge1': rouge_l + 5, 'rouge2': 1.0,
                      'rougeL': rouge_l, 'rougeLsum': rouge_l},
          'steps': steps, 'seconds': 600.0, 'date': '2026-12-07T15:00:00',
          'hardware': {'cpu': 'AMD EPYC', 'cores': 2,
                       'load_average': [0.5, 0.4, 0.3]}}


def test_the_recipe_is_the_local_data_config_with_overrides():
  config = summarize_compare.recipe(['train.batch_size=4',
                                     'data.max_source_length=64'])
  assert config.model.path.endswith('SmolLM2-135M-Instruct.Q4_1.gguf')
  assert (config.train.batch_size, config.data.max_source_length) == (4, 64)
  assert config.data.eval_from_train == 200 and config.data.chat_template


def test_the_doc_table_is_rendered_from_the_record(tmp_path):
  record = tmp_path / 'record.json'
  record.write_text(json.dumps({'peft': _entry(20.5, 100),
                                'zero_shot': _entry(12.25)}))
  doc = tmp_path / 'doc.md'
  doc.write_text(f'intro\n{summarize_compare.BEGIN}\nold\n'
                 f'{summarize_compare.END}\nafter\n')
  summarize_compare.write_table(record, doc)
  text = doc.read_text()
  assert 'old' not in text and text.startswith('intro\n')
  assert text.endswith('after\n')
  rows = [line for line in text.splitlines() if line.startswith('| ')]
  assert rows[1].startswith('| SmolLM2-135M-Instruct, zero-shot | 17.25 |')
  assert ('| PyTorch PEFT LoRA | 25.50 | 1.00 | 20.50 | 100 | 10.0 | 0.5 |'
          in rows[2])
  doc.write_text('no markers')
  with pytest.raises(ValueError, match='markers'):
    summarize_compare.write_table(record, doc)


def test_the_committed_doc_shows_the_committed_record():
  if not summarize_compare.RECORD.exists():
    pytest.skip('no summarization record committed yet')
  record = json.loads(summarize_compare.RECORD.read_text())
  assert summarize_compare.table(record) in summarize_compare.DOC.read_text()
