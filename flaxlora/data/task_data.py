"""Records and features of a run's train and eval data, from its config.

Three record kinds (see `flaxlora.data.sources`): 'classification',
'squad' and 'seq2seq'. BERT tasks tokenize the first two directly; T5
(task 'seq2seq') and decoder-only LMs (task 'causal_lm',
`flaxlora.data.causal`) turn any kind into source/target text first
(`data.format` names the kind read: SQuAD becomes 'question: .. context:
..' -> answer, classification becomes sentence -> label name). Source and
target are read from any JSONL / TSV / CSV columns (data.source_field,
data.target_field, data.id_field: e.g. document/summary,
instruction/response).

Sources (`data.source`):
  files      data.train_file / data.eval_file (or `data.eval_from_train`
             held out of the train file by `data.split_seed`)
  hub        data.hub_name ('glue/sst2', 'squad', 'xsum'); needs `datasets`
  generated  `flaxlora.data.synthetic` (data.generated.*), for runlocal
"""
import dataclasses
import pathlib
from typing import Any, Mapping, Sequence

import numpy as np

from flaxlora.data import buckets
from flaxlora.data import causal
from flaxlora.data import classification
from flaxlora.data import seq2seq
from flaxlora.data import sources
from flaxlora.data import squad
from flaxlora.data import synthetic

KINDS = ('classification', 'squad', 'seq2seq')
# Tasks that read any kind as source/target text.
TEXT_TASKS = ('seq2seq', 'causal_lm')
# How `data.max_train_examples` picks its records.
SUBSETS = ('random', 'longest')
# What a run reads (`data_files`).
READS = ('train', 'eval')
GENERATED_KIND = {'majority': 'classification', 'lookup': 'squad',
                  **{k: 'seq2seq' for k in synthetic.SEQ2SEQ}}


@dataclasses.dataclass
class Data:
  """A run's data.

  Attributes:
    train: tokenized train features.
    eval: tokenized eval features.
    eval_records: the eval records (references, contexts, ids).
    kind: the kind of records read (before any text-to-text conversion).
  """
  train: buckets.Tokenized
  eval: buckets.Tokenized
  eval_records: list[dict[str, Any]]
  kind: str


def record_kind(config: Any) -> str:
  kind = (config.data.get('format', '') if config.task in TEXT_TASKS else
          config.task)
  if kind not in KINDS:
    raise ValueError(f'data.format={kind!r} (task {config.task!r}): use one '
                     f'of {KINDS}.')
  return kind


def _articles(text: str, option: str) -> slice | None:
  if not text:
    return None
  try:
    parts = [int(p) if p.strip() else None for p in text.split(':')]
    return slice(*parts)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{option}={text!r}: use a slice like '0:40' or "
                     "'40:'.") from e


def _check_file(path: str, option: str) -> str:
  if not path:
    raise ValueError(f'{option} is empty; data.source="files" needs it.')
  if pathlib.Path(path).expanduser().is_dir():
    raise ValueError(f'{option}={path!r} is a folder; name a data file in '
                     f'it (--config.{option}=...).')
  if not pathlib.Path(path).expanduser().is_file():
    hint = ('; the :local_data variants read ../shared/data next to the '
            'repository, which this machine lacks' if 'shared/data' in path
            else '')
    raise FileNotFoundError(f'{option}={path!r} does not exist{hint}. Fix '
                            f'the path (--config.{option}=...).')
  return path


def data_files(config: Any, reads: Sequence[str] = READS
               ) -> dict[str, pathlib.Path]:
  """The data files a run reads for `reads` (of READS), by field
  ('train_file', 'eval_file'; `data.eval_from_train` reads the eval records
  from the train file), checked to exist, with '~' expanded; {} unless
  `data.source` is 'files'. `resolved.resolve` calls it once per run; a
  missing file is one line naming the field and the fix."""
  d = config.data
  if d.source != 'files':
    return {}
  held_out = int(d.get('eval_from_train', 0))
  fields = []
  if 'train' in reads or (held_out and 'eval' in reads):
    fields.append('train_file')
  if 'eval' in reads and not held_out:
    fields.append('eval_file')
  return {f: pathlib.Path(_check_file(d[f], f'data.{f}')).expanduser()
          for f in fields}


def _read_file(d: Any, kind: str, path: pathlib.Path, option: str,
               articles: str):
  if kind == 'classification':
    return sources.read_classification(
        path, labels=tuple(d.labels), text_field=d.text_field,
        pair_field=d.get('pair_field', '') or None,
        label_field=d.label_field)
  if kind == 'squad':
    return sources.read_squad(
        path, articles=_articles(articles, option.replace('file',
                                                          'articles')))
  return sources.read_seq2seq(path, source_field=d.source_field,
                              target_field=d.target_field,
                              id_field=d.get('id_field', '') or None)


def _split(records: list, held_out: int, seed: int, path: str):
  if held_out >= len(records):
    raise ValueError(f'data.eval_from_train={held_out} leaves no training '
                     f'examples of the {len(records)} in {path}.')
  order = np.random.default_rng(seed).permutation(len(records))
  train = [records[i] for i in order[:-held_out]]
  held = [records[i] for i in sorted(order[-held_out:])]
  return train, held


def read_records(config: Any, files: Mapping[str, pathlib.Path] | None = None
                 ) -> tuple[list, list, str]:
  """(train records, eval records, their kind); `files` as `data_files`
  gives them (`Resolved.files`; default: resolved here)."""
  d, kind = config.data, record_kind(config)
  if d.source == 'generated':
    g = d.generated
    if GENERATED_KIND.get(g.kind) != kind:
      fits = [k for k, v in GENERATED_KIND.items() if v == kind]
      raise ValueError(f'data.generated.kind={g.kind!r} does not make '
                       f'{kind!r} records; use one of {fits}.')
    make = lambda n, split: synthetic.generate(  # pylint: disable=g-long-lambda
        g.kind, n, seed=g.seed, min_len=g.min_len, max_len=g.max_len,
        split=split)
    return make(g.num_train, 'train'), make(g.num_eval, 'eval'), kind
  if d.source == 'hub':
    return (sources.load_hub(d.hub_name, d.train_split),
            sources.load_hub(d.hub_name, d.eval_split), kind)
  if d.source != 'files':
    raise ValueError(f"data.source={d.source!r}: use 'files', 'hub' or "
                     "'generated'.")
  files = data_files(config) if files is None else files
  train = _read_file(d, kind, files['train_file'], 'data.train_file',
                     d.get('train_articles', ''))
  held_out = int(d.get('eval_from_train', 0))
  if held_out and (d.eval_file or d.get('eval_articles', '')):
    raise ValueError(
        f'data.eval_from_train={held_out} holds the eval records out of '
        f'data.train_file, so data.eval_file={d.eval_file!r} and '
        f"data.eval_articles={d.get('eval_articles', '')!r} would be "
        "ignored; set them to '' or data.eval_from_train to 0.")
  if held_out:
    return (*_split(train, held_out, d.split_seed, d.train_file), kind)
  return train, _read_file(d, kind, files['eval_file'], 'data.eval_file',
                           d.get('eval_articles', '')), kind


# `eval.half`: '' all eval records, or one of two disjoint halves drawn by
# `data.split_seed` (choose hyperparameters on one, report on the other).
HALVES = ('', 'select', 'report')


def eval_half(records: list, half: str, seed: int) -> list:
  """The records of `half` (see HALVES), in file order."""
  if half not in HALVES:
    raise ValueError(f"eval.half={half!r}: use '' (all), 'select' or "
                     "'report'.")
  if not half:
    return records
  order = np.random.default_rng(seed).permutation(len(records))
  cut = len(records) // 2
  chosen = order[:cut] if half == 'select' else order[cut:]
  return [records[i] for i in sorted(chosen)]


def _eval_records(records: list, config: Any) -> list:
  """`eval.half` of the records, then at most `eval.max_examples`."""
  records = eval_half(records, config.eval.get('half', ''),
                      config.data.split_seed)
  return _subset(records, config.eval.max_examples, None)


def _text_length(record: dict) -> int:
  if 'text' not in record:
    raise ValueError("data.train_subset='longest' needs classification "
                     "records (a 'text' field); use 'random'.")
  return len(record['text']) + len(record.get('text_pair') or '')


def _subset(records: list, limit: int, seed: int | None,
            how: str = 'random') -> list:
  """`limit` records (all when 0), in file order: drawn by `seed` (the
  first `limit` when None), or the `limit` longest texts (how='longest')."""
  if how not in SUBSETS:
    raise ValueError(f'data.train_subset={how!r}: use one of {SUBSETS}.')
  if not limit or limit >= len(records):
    return records
  if how == 'longest':
    order = sorted(range(len(records)),
                   key=lambda i: (-_text_length(records[i]), i))
    return [records[i] for i in sorted(order[:limit])]
  if seed is None:
    return records[:limit]
  keep = np.random.default_rng(seed).permutation(len(records))[:limit]
  return [records[i] for i in sorted(keep)]


def to_text(records: list, kind: str, config: Any) -> list:
  """Records of any kind as seq2seq records for T5."""
  if kind == 'seq2seq':
    return records
  if kind == 'squad':
    return seq2seq.squad_to_text(records)
  names = tuple(config.data.label_names)
  if len(names) < len(config.data.labels):
    raise ValueError(f'data.label_names {names} must name each of the '
                     f'labels {tuple(config.data.labels)}.')
  return [{'id': r.get('id', str(i)), 'source': r['text'] if r.get(
      'text_pair') is None else f'{r["text"]} {r["text_pair"]}',
           'target': names[r['label']], 'references': [names[r['label']]],
           'origin': r['origin']} for i, r in enumerate(records)]


def prompt(config: Any, tokenizer: Any) -> causal.Prompt:
  """The causal-LM prompt of data.prompt and data.chat_template."""
  return causal.Prompt(tokenizer, config.data.prompt,
                       config.data.chat_template)


def tokenize(records: list, config: Any, tokenizer: Any,
             train: bool = False):
  """Features of `records`; causal-LM train data is packed per data.pack,
  eval data carries its prompts for generation."""
  d = config.data
  if config.task == 'causal_lm':
    return causal.tokenize(
        records, tokenizer, prompt(config, tokenizer),
        max_source_length=d.max_source_length,
        max_target_length=d.max_target_length, buckets=tuple(d.buckets),
        pack=train and d.pack, with_prompts=not train)
  if config.task == 'classification':
    return classification.tokenize(records, tokenizer, max_length=d.max_length,
                                   buckets=tuple(d.buckets))
  if config.task == 'squad':
    return squad.tokenize(records, tokenizer, max_length=d.max_length,
                          doc_stride=d.doc_stride, buckets=tuple(d.buckets))
  return seq2seq.tokenize(
      records, tokenizer, max_source_length=d.max_source_length,
      max_target_length=d.max_target_length, prefix=d.source_prefix,
      source_buckets=tuple(d.buckets),
      target_buckets=tuple(d.get('target_buckets', ())))


def load_eval(config: Any, tokenizer: Any,
              files: Mapping[str, pathlib.Path] | None = None) -> Data:
  """Only the eval data (`train` is None), e.g. `data.eval_file` alone: the
  train file is not read (`experiments.evaluate`); `files` as
  `data_files(config, ('eval',))` gives them (default: resolved here)."""
  d, kind = config.data, record_kind(config)
  files = data_files(config, ('eval',)) if files is None else files
  if d.source == 'files' and not int(d.get('eval_from_train', 0)):
    records = _read_file(d, kind, files['eval_file'], 'data.eval_file',
                         d.get('eval_articles', ''))
  else:
    records = read_records(config, files)[1]
  records = _eval_records(records, config)
  if config.task in TEXT_TASKS:
    records = to_text(records, kind, config)
  return Data(None, tokenize(records, config, tokenizer), records, kind)


def load(config: Any, tokenizer: Any,
         files: Mapping[str, pathlib.Path] | None = None) -> Data:
  """Reads, subsets, converts and tokenizes the run's data; `files` as
  `data_files` gives them (`Resolved.files`; default: resolved here)."""
  train, evaluation, kind = read_records(config, files)
  train = _subset(train, config.data.max_train_examples,
                  config.data.split_seed,
                  config.data.get('train_subset', 'random'))
  evaluation = _eval_records(evaluation, config)
  for name, records in (('train', train), ('eval', evaluation)):
    if not records:
      raise ValueError(f'the {name} data is empty; check data.* options.')
  if config.task in TEXT_TASKS:
    train = to_text(train, kind, config)
    evaluation = to_text(evaluation, kind, config)
  return Data(tokenize(train, config, tokenizer, train=True),
              tokenize(evaluation, config, tokenizer), evaluation, kind)
