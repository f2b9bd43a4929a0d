"""Generated records for offline `runlocal` runs and tests.

Each generator returns records of the same kinds as `sources` (see there),
determined by `seed`, so a tiny model can learn something in seconds:

  text_to_text('reverse', 64, seed=0)  # {'source': 'kqd', 'target': 'dqk'}
  classification(64, seed=0)           # label 1 when 'a' outnumbers 'b'
  squad(64, seed=0)                    # 'where is X?' over a word list
"""
import numpy as np

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


def classification(num: int, *, seed: int = 0, min_length: int = 3,
                   max_length: int = 8) -> list[dict]:
  """Records over letters 'a'/'b'/'c': label 1 when 'a' outnumbers 'b'."""
  rng = np.random.default_rng(seed)
  return [{'text': text, 'text_pair': None,
           'label': int(text.count('a') > text.count('b')),
           'origin': f'synthetic:classification:{i}'}
          for i, text in enumerate(_strings(rng, num, min_length, max_length,
                                            'abc'))]


def squad(num: int, *, seed: int = 0, words: int = 12) -> list[dict]:
  """SQuAD records: a context of 'k=v' words, 'where is k?' -> 'k=v'."""
  if not 1 <= words <= 16:
    raise ValueError(f'words={words}: use 1 to 16 (one per key letter).')
  rng = np.random.default_rng(seed)
  records = []
  for i in range(num):
    keys = rng.permutation(list('klmnopqrstuvwxyz'))[:words]
    items = [f'{k}={rng.integers(10)}' for k in keys]
    context = ' '.join(items)
    asked = int(rng.integers(words))
    answer = items[asked]
    records.append({
        'id': f'squad-{seed}-{i}', 'title': 'synthetic',
        'question': f'where is {keys[asked]}?', 'context': context,
        'answers': [{'text': answer, 'start': context.index(answer)}],
        'origin': f'synthetic:squad:{i}'})
  return records
