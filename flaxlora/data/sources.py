"""Records from local files or the Hugging Face hub.

Every reader returns a list of plain dicts (records) and keeps, in
`record['origin']`, the 'file:line' it came from so later stages can name it
in errors. Record kinds:

  classification: {'text', 'text_pair' (or None), 'label' (int), 'origin'}
  seq2seq:        {'id', 'source', 'target', 'origin'}
  squad:          {'id', 'title', 'question', 'context',
                   'answers': [{'text', 'start'}], 'origin'}

Local formats: `.tsv` (GLUE style: header line, tab-separated, no quoting),
`.csv` (header line, RFC 4180 quoting), `.jsonl` (one JSON object a line),
`.json` (one array of objects, or one object a line) and SQuAD's official
JSON (`read_squad`). Hub datasets ('glue/sst2', 'squad', 'xsum') need the
optional `datasets` package (`pip install flaxlora[data]`) and a network.
"""
import csv
import io
import json
import os
import pathlib
import re
from typing import Any, Iterable, Sequence

Record = dict[str, Any]

# Hub name -> (load_dataset args, record kind, field renames).
HUB = {
    'glue/sst2': (('glue', 'sst2'), 'classification',
                  {'sentence': 'text', 'label': 'label'}),
    'squad': (('rajpurkar/squad',), 'squad', {}),
    'xsum': (('EdinburghNLP/xsum',), 'seq2seq',
             {'document': 'source', 'summary': 'target', 'id': 'id'}),
}


def _read_text(path: str | os.PathLike) -> tuple[pathlib.Path, str]:
  """Reads a UTF-8 file; errors name the file (and the line of bad bytes)."""
  path = pathlib.Path(path).expanduser()
  if path.is_dir():
    raise ValueError(f'data file {str(path)!r} is a folder; name a .tsv, '
                     '.csv or .jsonl file in it (data.*_file).')
  if not path.is_file():
    raise FileNotFoundError(
        f'data file {str(path)!r} does not exist; check the path in the '
        'config (data.*_file), or use a hub dataset name instead.')
  raw = path.read_bytes()
  try:
    text = raw.decode('utf-8')
  except UnicodeDecodeError as e:
    line = raw[:e.start].count(b'\n') + 1
    raise ValueError(f'{path}:{line}: not valid UTF-8 ({e.reason}); '
                     're-save the file as UTF-8.') from None
  return path, text


def read_rows(path: str | os.PathLike) -> list[tuple[str, dict[str, Any]]]:
  """Rows of a .tsv, .csv or .jsonl file as (origin 'file:line', row dict)."""
  path, text = _read_text(path)
  suffix = path.suffix.lower()
  if suffix == '.tsv':
    rows = _delimited_rows(path, text, csv.reader(
        io.StringIO(text, newline=''), delimiter='\t', quoting=csv.QUOTE_NONE))
  elif suffix == '.csv':
    rows = _delimited_rows(path, text, csv.reader(
        io.StringIO(text, newline='')))
  elif suffix == '.json' and text.lstrip().startswith('['):
    rows = _json_array_rows(path, text)
  elif suffix in ('.jsonl', '.json'):
    rows = _jsonl_rows(path, text)
  else:
    raise ValueError(f'data file {str(path)!r}: unknown format {suffix!r}; '
                     'use .tsv, .csv, .json or .jsonl (or read_squad for '
                     'SQuAD).')
  if not rows:
    raise ValueError(f'data file {str(path)!r} holds no examples.')
  return rows


def _delimited_rows(path, text, reader):
  rows = []
  header = None
  end = 0
  csv.field_size_limit(max(csv.field_size_limit(), 1 << 26))
  while True:
    start = end + 1
    try:
      fields = next(reader, None)
    except csv.Error as e:
      raise ValueError(f'{path}:{start}: {e}; fix the line (an unclosed '
                       'quote?).') from None
    if fields is None:
      break
    end = line = reader.line_num
    if header is None:
      header = fields
      continue
    if not fields:  # a blank line (often the last one)
      continue
    if len(fields) != len(header):
      span = (f' (a quote at line {start} opens a field that runs to line '
              f'{end})' if end > start else '')
      raise ValueError(
          f'{path}:{start}: {len(fields)} fields where the header (line 1) '
          f'has {len(header)} ({header}){span}; fix the line (a stray tab '
          'or quote?).')
    rows.append((f'{path}:{line}', dict(zip(header, fields))))
  if header is None:
    raise ValueError(f'data file {str(path)!r} is empty (not even a header).')
  return rows


def _json_array_rows(path, text):
  """Rows of a .json file holding one array of objects."""
  try:
    array = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f'{path}:{e.lineno}: malformed JSON ({e.msg} at column '
                     f'{e.colno}); a .json file holds one array of objects '
                     '(or one object a line).') from None
  rows = []
  for i, row in enumerate(array):
    if not isinstance(row, dict):
      raise ValueError(f'{path}: element {i} of the array is a JSON '
                       f'{type(row).__name__}, not an object.')
    rows.append((f'{path}[{i}]', row))
  return rows


def _jsonl_rows(path, text):
  rows = []
  for line, content in enumerate(text.splitlines(), start=1):
    if not content.strip():
      continue
    try:
      row = json.loads(content)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path}:{line}: malformed JSON ({e.msg} at column '
                       f'{e.colno}); each line must be one JSON object.'
                      ) from None
    if not isinstance(row, dict):
      raise ValueError(f'{path}:{line}: a JSON {type(row).__name__} where a '
                       'JSON object was expected.')
    rows.append((f'{path}:{line}', row))
  return rows


def _field(row: dict[str, Any], name: str, origin: str,
           option: str = 'data.*_field') -> Any:
  """row[name]; a missing or null field is an error naming `origin` and
  the config option that names the field."""
  if row.get(name, '') is None:
    raise ValueError(f'{origin}: field {name!r} is null; give it a value '
                     'or drop the example.')
  if name not in row:
    raise ValueError(f'{origin}: no field {name!r} (fields: {sorted(row)}); '
                     f'set {option} to the right column.')
  return row[name]


def read_classification(path: str | os.PathLike, *, labels: Sequence[str],
                        text_field: str = 'sentence',
                        pair_field: str | None = None,
                        label_field: str = 'label') -> list[Record]:
  """Classification records; labels map to their index in `labels`.

  Args:
    path: a .tsv, .csv or .jsonl file.
    labels: the label set as strings, e.g. ('0', '1') or ('neg', 'pos');
      a row whose label (as a string) is not in it is an error.
    text_field: column of the (first) sentence.
    pair_field: column of the second sentence for sentence-pair tasks.
    label_field: column of the label.
  """
  labels = [str(label) for label in labels]
  if not labels:
    raise ValueError('read_classification: `labels` is empty; pass the label '
                     "set, e.g. labels=('0', '1').")
  records = []
  for origin, row in read_rows(path):
    label = str(_field(row, label_field, origin, 'data.label_field'))
    if label not in labels:
      raise ValueError(f'{origin}: label {label!r} is not in the label set '
                       f'{labels}; fix the row or the data.labels option.')
    records.append({
        'text': str(_field(row, text_field, origin, 'data.text_field')),
        'text_pair': (None if pair_field is None else
                      str(_field(row, pair_field, origin,
                                 'data.pair_field'))),
        'label': labels.index(label),
        'origin': origin,
    })
  return records


def read_seq2seq(path: str | os.PathLike, *, source_field: str = 'document',
                 target_field: str = 'summary',
                 id_field: str | None = 'id') -> list[Record]:
  """Source/target text records (XSum's JSONL by default) from any
  .jsonl / .json / .tsv / .csv columns, e.g. source_field='instruction',
  target_field='response' (id_field None: the row number)."""
  records = []
  for index, (origin, row) in enumerate(read_rows(path)):
    records.append({
        'id': (str(index) if id_field is None else
               str(_field(row, id_field, origin, 'data.id_field'))),
        'source': str(_field(row, source_field, origin,
                             'data.source_field')),
        'target': str(_field(row, target_field, origin,
                             'data.target_field')),
        'origin': origin,
    })
  return records


def read_squad(path: str | os.PathLike, *,
               articles: slice | None = None) -> list[Record]:
  """Question records from a SQuAD v1.1-format JSON file.

  Args:
    path: the official SQuAD JSON ({'data': [{'title', 'paragraphs': [...]}]}).
    articles: a slice of articles to keep, e.g. slice(0, 40) to train on the
      first 40 of dev and slice(40, None) to evaluate on the rest (split by
      article: questions on one paragraph share their context).

  Raises:
    ValueError: malformed JSON, a missing field, an answer span outside its
      context or not equal to the context's text there, or no questions.
  """
  path, text = _read_text(path)
  try:
    document = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f'{path}:{e.lineno}: malformed JSON ({e.msg}).') from None
  if not isinstance(document, dict) or 'data' not in document:
    raise ValueError(f'{path}:1: not SQuAD JSON (no top-level "data" list).')
  first = (articles or slice(None)).indices(len(document['data']))[0]
  lines = _id_lines(text)
  records = []
  for a, article in enumerate(document['data'][articles or slice(None)],
                              start=first):
    where = f'{path}: data[{a}]'
    for p, paragraph in enumerate(_get(article, 'paragraphs', where)):
      where = f'{path}: data[{a}].paragraphs[{p}]'
      context = _get(paragraph, 'context', where)
      for q, question in enumerate(_get(paragraph, 'qas', where)):
        qid = str(_get(question, 'id', f'{where}.qas[{q}]'))
        origin = f'{path}:{lines.get(qid, 1)} (question id {qid})'
        records.append({
            'id': qid,
            'title': article.get('title', f'article {a}'),
            'question': _get(question, 'question', origin),
            'context': context,
            'answers': [check_answer(answer, context, origin)
                        for answer in _get(question, 'answers', origin)],
            'origin': origin,
        })
  if not records:
    raise ValueError(f'data file {str(path)!r} holds no SQuAD questions'
                     + (f' in articles {articles}' if articles else '') + '.')
  return records


def _id_lines(text: str) -> dict[str, int]:
  """Question id -> the line it is on (one pass over the file)."""
  lines, line, last = {}, 1, 0
  for match in re.finditer(r'"id"\s*:\s*"([^"]*)"', text):
    line += text.count('\n', last, match.start())
    last = match.start()
    lines.setdefault(match.group(1), line)
  return lines


def _get(obj, key, where):
  if not isinstance(obj, dict) or key not in obj:
    raise ValueError(f'{where}: SQuAD entry lacks {key!r}; is this the '
                     'official SQuAD v1.1 format?')
  return obj[key]


def check_answer(answer, context: str, origin: str) -> dict[str, Any]:
  """{'text', 'start'} of a SQuAD answer that must lie inside its context."""
  if not isinstance(answer, dict) or not {'text', 'answer_start'} <= set(
      answer):
    raise ValueError(f'{origin}: an answer lacks "text" or "answer_start".')
  start, answer_text = int(answer['answer_start']), answer['text']
  end = start + len(answer_text)
  if start < 0 or end > len(context):
    raise ValueError(
        f'{origin}: answer {answer_text!r} spans characters [{start}, {end}) '
        f'outside its context of {len(context)} characters; fix answer_start.')
  if context[start:end] != answer_text:
    raise ValueError(
        f'{origin}: answer {answer_text!r} does not match the context at '
        f'answer_start={start} (it reads {context[start:end]!r}); fix '
        'answer_start.')
  return {'text': answer_text, 'start': start}


def load_hub(name: str, split: str) -> list[Record]:
  """Records of a hub dataset split ('glue/sst2', 'squad', 'xsum').

  Needs `datasets` (`pip install flaxlora[data]`) and the network or its
  cache; offline, pass local files (data.train_file / data.eval_file).
  """
  if name not in HUB:
    raise ValueError(f'hub dataset {name!r} is not supported; use one of '
                     f'{sorted(HUB)} or local files.')
  args, kind, renames = HUB[name]
  try:
    import datasets  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(
        f'loading {name!r} from the hub needs the `datasets` package '
        '(pip install "flaxlora[data]"); or pass local files instead '
        '(data.train_file / data.eval_file).') from None
  try:
    rows = datasets.load_dataset(*args, split=split)
  except Exception as e:  # datasets raises many kinds; all mean unreachable
    raise OSError(
        f'could not load {name!r} split {split!r} from the hub '
        f'({type(e).__name__}: {e}); offline, pass local files instead '
        '(data.train_file / data.eval_file).') from e
  return _from_hub_rows(name, kind, renames, rows)


def _from_hub_rows(name: str, kind: str, renames: dict[str, str],
                   rows: Iterable[dict[str, Any]]) -> list[Record]:
  records = []
  for i, row in enumerate(rows):
    origin = f'{name}[{i}]'
    if kind == 'squad':
      answers = row['answers']
      records.append({
          'id': row['id'], 'title': row['title'], 'question': row['question'],
          'context': row['context'], 'origin': origin,
          'answers': [check_answer({'text': t, 'answer_start': s},
                                      row['context'], origin)
                      for t, s in zip(answers['text'],
                                      answers['answer_start'])]})
    else:
      record = {new: row[old] for old, new in renames.items()}
      if kind == 'classification':
        if record['label'] < 0:  # GLUE test splits hide their labels as -1
          raise ValueError(f'{origin}: no label (-1); use a labelled split.')
        record['text_pair'] = None
      else:
        record['id'] = str(record['id'])
      record['origin'] = origin
      records.append(record)
  if not records:
    raise ValueError(f'hub dataset {name!r} returned no examples.')
  return records


READERS = {'classification': read_classification, 'seq2seq': read_seq2seq,
           'squad': read_squad}


def load(kind: str, source: str | os.PathLike, *, split: str | None = None,
         **options) -> list[Record]:
  """Records of `kind` from a local file or a hub dataset name.

  Args:
    kind: 'classification', 'seq2seq' or 'squad'.
    source: a file path, or a hub name in HUB ('glue/sst2', 'squad', 'xsum').
    split: the hub split ('train', 'validation', ...); hub sources only.
    **options: the local reader's options (labels=, text_field=, articles=,
      ...); the hub path ignores field options since it knows its columns.
  """
  if kind not in READERS:
    raise ValueError(f'data kind {kind!r} is unknown; use one of '
                     f'{sorted(READERS)}.')
  if isinstance(source, str) and source in HUB:
    if HUB[source][1] != kind:
      raise ValueError(f'hub dataset {source!r} holds {HUB[source][1]} '
                       f'records, not {kind}.')
    if split is None:
      raise ValueError(f'hub dataset {source!r} needs a split (e.g. '
                       "'train' or 'validation').")
    return load_hub(source, split)
  return READERS[kind](source, **options)
