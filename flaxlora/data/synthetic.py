"""Generated tasks for `runlocal` configs: tiny, offline, learnable in seconds.

Records follow `flaxlora.data.sources`' kinds, so the rest of the pipeline
cannot tell them from file data:

  reverse, copy, sort  (seq2seq)  'a b c' -> 'c b a' / 'a b c' / sorted
                                  (`text_to_text`'s strings)
  majority   (classification)     'good bad great' -> 1 (more positive words)
  lookup     (squad)              context 'kiwi is red . fig is blue .',
                                  question 'what is fig ?' -> 'blue'

The classification and QA tasks use whole words, so that `words_tokenizer`,
a BERT WordPiece tokenizer over the generated words (no files needed), gives
tiny random BERTs real word-level inputs and offsets.
"""
import string
from typing import Any

import numpy as np


POSITIVE = ('good', 'great', 'fine', 'nice', 'happy')
NEGATIVE = ('bad', 'awful', 'poor', 'sad', 'dull')
KEYS = ('kiwi', 'fig', 'lime', 'plum', 'pear', 'date', 'yam', 'nut', 'bean',
        'corn', 'rice', 'leek')
VALUES = ('red', 'blue', 'green', 'pink', 'gold', 'gray', 'black', 'white')
SEQ2SEQ = ('reverse', 'copy', 'sort')
KINDS = SEQ2SEQ + ('majority', 'lookup')
SPECIAL = ('[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]')
LETTERS = 'abcdefghij'
TASKS = {
    'copy': lambda s: s,
    'reverse': lambda s: s[::-1],
    'sort': lambda s: ''.join(sorted(s)),
}


def _strings(rng, num, min_length, max_length, letters=LETTERS):
  lengths = rng.integers(min_length, max_length + 1, num)
  return [''.join(rng.choice(list(letters), n)) for n in lengths]


def text_to_text(task: str, num: int, *, seed: int = 0, min_length: int = 3,
                 max_length: int = 8) -> list[dict]:
  """Seq2seq records: `task` ('copy', 'reverse', 'sort') of random strings."""
  if task not in TASKS:
    raise ValueError(f'synthetic task {task!r} is unknown; use one of '
                     f'{sorted(TASKS)}.')
  rng = np.random.default_rng(seed)
  return [{'id': f'{task}-{seed}-{i}', 'source': text,
           'target': TASKS[task](text), 'references': [TASKS[task](text)],
           'origin': f'synthetic:{task}:{i}'}
          for i, text in enumerate(_strings(rng, num, min_length, max_length))]


def generate(kind: str, num: int, *, seed: int, min_len: int = 3,
             max_len: int = 8, split: str = 'train') -> list[dict[str, Any]]:
  """`num` records of task `kind`, a pure function of (seed, split)."""
  if kind not in KINDS:
    raise ValueError(f'data.generated.kind={kind!r}: use one of {KINDS}.')
  if num < 1:
    raise ValueError(f'data.generated: {split} needs at least one example '
                     f'(got num_{split}={num}).')
  if not 1 <= min_len <= max_len:
    raise ValueError(f'data.generated: need 1 <= min_len ({min_len}) <= '
                     f'max_len ({max_len}).')
  salt = {'train': 0, 'eval': 1}[split]
  if kind in SEQ2SEQ:
    records = text_to_text(
        kind, num, seed=2 * seed + salt, min_length=min_len,
        max_length=max_len)
    # Letters as words ('f c d' -> 'd c f'), so that ROUGE-1 credits the
    # right letters and ROUGE-2/L their order.
    return [{'id': f'{split}-{i}', 'source': ' '.join(r['source']),
             'target': ' '.join(r['target']),
             'references': [' '.join(r['target'])],
             'origin': f'generated:{kind}:{split}[{i}]'}
            for i, r in enumerate(records)]
  rng = np.random.default_rng([seed, salt])
  make = {'majority': _majority, 'lookup': _lookup}[kind]
  return [dict(make(rng, kind, min_len, max_len),
               origin=f'generated:{kind}:{split}[{i}]', id=f'{split}-{i}')
          for i in range(num)]


def _majority(rng, kind, min_len, max_len):
  del kind
  length = int(rng.integers(min_len, max_len + 1)) | 1  # odd: no ties
  positive = rng.random(length) < rng.random()
  words = [rng.choice(POSITIVE) if p else rng.choice(NEGATIVE)
           for p in positive]
  return {'text': ' '.join(words), 'text_pair': None,
          'label': int(positive.sum() * 2 > length)}


def _lookup(rng, kind, min_len, max_len):
  del kind, max_len
  count = max(2, min(min_len, len(KEYS)))
  keys = rng.choice(KEYS, size=count, replace=False)
  values = rng.choice(VALUES, size=count)
  context = ' '.join(f'{k} is {v} .' for k, v in zip(keys, values))
  asked = int(rng.integers(count))
  answer = str(values[asked])
  start = context.index(f'{keys[asked]} is {answer}') + len(
      f'{keys[asked]} is ')
  return {'title': 'generated', 'question': f'what is {keys[asked]} ?',
          'context': context, 'answers': [{'text': answer, 'start': start}]}


def vocabulary() -> list[str]:
  """Every word the generated tasks use, after BERT's special tokens."""
  words = (POSITIVE + NEGATIVE + KEYS + VALUES +
           ('is', '.', '?', 'what', 'positive', 'negative'))
  return list(SPECIAL) + sorted(set(words)) + list(string.ascii_lowercase)


def words_tokenizer():
  """A lower-casing BERT WordPiece tokenizer over `vocabulary()`."""
  # pylint: disable=g-import-not-at-top
  import tokenizers
  from tokenizers import models, normalizers, pre_tokenizers, processors
  import transformers
  vocab = {word: i for i, word in enumerate(vocabulary())}
  tok = tokenizers.Tokenizer(models.WordPiece(vocab, unk_token='[UNK]'))
  tok.normalizer = normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.post_processor = processors.BertProcessing(
      ('[SEP]', vocab['[SEP]']), ('[CLS]', vocab['[CLS]']))
  return transformers.BertTokenizerFast(
      tokenizer_object=tok, unk_token='[UNK]', sep_token='[SEP]',
      pad_token='[PAD]', cls_token='[CLS]', mask_token='[MASK]')
