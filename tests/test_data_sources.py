"""Readers of local files and the hub: records, and one clear error per bad
input naming the file and line."""
import json
import pathlib
import sys
import types

import pytest

from flaxlora.data import sources

DATA = pathlib.Path(__file__).resolve().parents[1] / '..' / 'shared' / 'data'


def write(tmp_path, name, text, mode='w'):
  path = tmp_path / name
  if mode == 'wb':
    path.write_bytes(text)
  else:
    path.write_text(text, encoding='utf-8')
  return path


def test_tsv_classification_records(tmp_path):
  path = write(tmp_path, 'a.tsv', 'sentence\tlabel\ngood , fine \t1\n'
               'bad "quote\t0\n\n')
  records = sources.read_classification(path, labels=('0', '1'))
  assert [r['label'] for r in records] == [1, 0]
  assert records[1]['text'] == 'bad "quote'  # GLUE TSV has no quoting
  assert records[0]['origin'] == f'{path}:2'
  assert records[0]['text_pair'] is None


def test_csv_pairs_and_jsonl_labels(tmp_path):
  path = write(tmp_path, 'p.csv', 'a,b,y\n"x, with comma","multi\nline",'
               'pos\nq,r,neg\n')
  records = sources.read_classification(
      path, labels=('neg', 'pos'), text_field='a', pair_field='b',
      label_field='y')
  assert records[0]['text_pair'] == 'multi\nline'
  assert records[0]['label'] == 1
  assert records[1]['origin'].endswith(':4')  # after the 2-line record
  path = write(tmp_path, 'j.jsonl', '{"sentence": "s", "label": 1}\n')
  assert sources.read_classification(path, labels=(0, 1))[0]['label'] == 1


def test_seq2seq_jsonl(tmp_path):
  path = write(tmp_path, 'x.jsonl', '{"document": "d", "summary": "s", '
               '"id": 7}\n\n{"document": "e", "summary": "t", "id": 8}\n')
  records = sources.read_seq2seq(path)
  assert [(r['id'], r['source'], r['target']) for r in records] == [
      ('7', 'd', 's'), ('8', 'e', 't')]
  assert records[1]['origin'] == f'{path}:3'


@pytest.mark.parametrize('name, text, message', [
    ('bad.tsv', 'sentence\tlabel\nok\t1\nextra\ttab\t0\n',
     r'bad.tsv:3: 3 fields where the header'),
    ('bad.jsonl', '{"sentence": "a", "label": 0}\n{"sentence": "b", \n',
     r'bad.jsonl:2: malformed JSON'),
    ('bad.jsonl', '{"sentence": "a", "label": 0}\n[1, 2]\n',
     r'bad.jsonl:2: a JSON list'),
    ('col.tsv', 'text\tlabel\nok\t1\n', r"col.tsv:2: no field 'sentence'"),
    ('lab.tsv', 'sentence\tlabel\nok\t1\nno\t2\n',
     r"lab.tsv:3: label '2' is not in the label set"),
    ('empty.tsv', 'sentence\tlabel\n\n', r'holds no examples'),
    ('void.tsv', '', r'is empty'),
    ('blank.jsonl', '\n\n', r'holds no examples'),
    ('data.txt', 'x', r"unknown format '.txt'"),
])
def test_bad_classification_files(tmp_path, name, text, message):
  path = write(tmp_path, name, text)
  with pytest.raises(ValueError, match=message):
    sources.read_classification(path, labels=('0', '1'))


def test_bad_bytes_name_line(tmp_path):
  path = write(tmp_path, 'b.tsv', b'sentence\tlabel\nok\t1\nbad \xff\t0\n',
               mode='wb')
  with pytest.raises(ValueError, match=r'b.tsv:3: not valid UTF-8'):
    sources.read_classification(path, labels=('0', '1'))


def test_missing_file_names_it(tmp_path):
  with pytest.raises(FileNotFoundError, match='nope.tsv'):
    sources.read_classification(tmp_path / 'nope.tsv', labels=('0', '1'))


def squad_json(answer_start=4, text='cat', context='the cat sat'):
  return {'version': '1.1', 'data': [{'title': 'T', 'paragraphs': [{
      'context': context, 'qas': [
          {'id': 'q1', 'question': 'who sat?', 'answers': [
              {'text': text, 'answer_start': answer_start}]},
          {'id': 'q2', 'question': 'what?', 'answers': [
              {'text': 'sat', 'answer_start': 8}]}]}]}]}


def test_squad_records(tmp_path):
  path = write(tmp_path, 's.json', json.dumps(squad_json(), indent=1))
  records = sources.read_squad(path)
  assert [r['id'] for r in records] == ['q1', 'q2']
  assert records[0]['answers'] == [{'text': 'cat', 'start': 4}]
  text = path.read_text().splitlines()
  q2_line = next(i for i, l in enumerate(text, 1) if '"q2"' in l)
  assert records[1]['origin'] == f'{path}:{q2_line} (question id q2)'


@pytest.mark.parametrize('start, text, message', [
    (9, 'cat', r'outside its context of 11 characters'),
    (-1, 'cat', r'outside its context'),
    (0, 'cat', r"does not match the context at answer_start=0 \(it reads "
               r"'the'\)"),
])
def test_squad_bad_answers_name_question_and_line(tmp_path, start, text,
                                                  message):
  path = write(tmp_path, 's.json',
               json.dumps(squad_json(start, text), indent=1))
  q1_line = next(i for i, l in enumerate(path.read_text().splitlines(), 1)
                 if '"q1"' in l)
  with pytest.raises(ValueError,
                     match=rf's.json:{q1_line} \(question id q1\): .*' +
                     message):
    sources.read_squad(path)


def test_squad_bad_structure(tmp_path):
  path = write(tmp_path, 's.json', '{"data": [\n{"title": "T",\n "x": 1,}]}')
  with pytest.raises(ValueError, match=r's.json:3: malformed JSON'):
    sources.read_squad(path)
  broken = squad_json()
  del broken['data'][0]['paragraphs'][0]['qas']
  path = write(tmp_path, 's.json', json.dumps(broken))
  with pytest.raises(ValueError, match=r"data\[0\].paragraphs\[0\]: SQuAD "
                     r"entry lacks 'qas'"):
    sources.read_squad(path)
  path = write(tmp_path, 's.json', json.dumps({'data': []}))
  with pytest.raises(ValueError, match='holds no SQuAD questions'):
    sources.read_squad(path)


def test_hub_without_datasets_says_pass_local_files(monkeypatch):
  monkeypatch.setitem(sys.modules, 'datasets', None)
  with pytest.raises(ImportError, match='pass local files'):
    sources.load_hub('glue/sst2', 'train')
  with pytest.raises(ValueError, match="'imdb' is not supported"):
    sources.load_hub('imdb', 'train')


def test_hub_unreachable_and_rows(monkeypatch):
  fake = types.ModuleType('datasets')

  def offline(*args, split):
    raise ConnectionError(f'no network for {args} {split}')

  fake.load_dataset = offline
  monkeypatch.setitem(sys.modules, 'datasets', fake)
  with pytest.raises(OSError, match=r"'xsum' split 'test'.*pass local files"):
    sources.load_hub('xsum', 'test')
  fake.load_dataset = lambda *a, split: [
      {'id': 'a', 'title': 't', 'question': 'q', 'context': 'the cat',
       'answers': {'text': ['cat', 'the'], 'answer_start': [4, 0]}}]
  records = sources.load_hub('squad', 'validation')
  assert records[0]['answers'] == [{'text': 'cat', 'start': 4},
                                   {'text': 'the', 'start': 0}]
  fake.load_dataset = lambda *a, split: [{'sentence': 's', 'label': -1,
                                          'idx': 0}]
  with pytest.raises(ValueError, match=r'glue/sst2\[0\]: no label'):
    sources.load_hub('glue/sst2', 'test')


@pytest.mark.skipif(not DATA.is_dir(), reason=f'{DATA} is absent')
def test_real_files_read():
  dev = sources.read_classification(DATA / 'sst2' / 'dev.tsv',
                                    labels=('0', '1'))
  assert len(dev) == 872 and sum(r['label'] for r in dev) == 444
  xsum = sources.read_seq2seq(DATA / 'xsum' / 'xsum_1000.jsonl')
  assert len(xsum) == 1000 and len({r['id'] for r in xsum}) == 1000
  squad = sources.read_squad(DATA / 'squad_v1.1' / 'dev-v1.1.json',
                             articles=slice(40, None))
  assert {r['title'] for r in squad}.isdisjoint(
      {r['title'] for r in sources.read_squad(
          DATA / 'squad_v1.1' / 'dev-v1.1.json', articles=slice(0, 40))})


def test_load_dispatches_to_file_or_hub(tmp_path, monkeypatch):
  path = write(tmp_path, 'a.tsv', 'sentence\tlabel\nok\t1\n')
  assert sources.load('classification', path, labels=('0', '1'))[0][
      'label'] == 1
  with pytest.raises(ValueError, match="'xsum' holds seq2seq records"):
    sources.load('classification', 'xsum', split='train')
  with pytest.raises(ValueError, match='needs a split'):
    sources.load('squad', 'squad')
  with pytest.raises(ValueError, match="kind 'ner' is unknown"):
    sources.load('ner', path)
  monkeypatch.setitem(sys.modules, 'datasets', None)
  with pytest.raises(ImportError, match='pass local files'):
    sources.load('seq2seq', 'xsum', split='train')
