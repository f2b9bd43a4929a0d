"""Train subsets (flaxlora.data.task_data) and joined eval rows (flaxlora.tasks)."""
import numpy as np
import pytest

from flaxlora.data import task_data
from flaxlora import tasks


def _records(texts):
  return [{'text': t, 'text_pair': None, 'label': 0, 'origin': f'f:{i}'}
          for i, t in enumerate(texts)]


def test_longest_keeps_the_longest_texts_in_file_order():
  records = _records(['a', 'abcd', 'ab', 'abcde', 'abc'])
  kept = task_data._subset(records, 3, seed=0, how='longest')
  assert [r['text'] for r in kept] == ['abcd', 'abcde', 'abc']


def test_random_is_a_seeded_draw_in_file_order():
  records = _records([str(i) for i in range(100)])
  first = task_data._subset(records, 10, seed=0)
  assert first == task_data._subset(records, 10, seed=0)
  assert first != task_data._subset(records, 10, seed=1)
  origins = [int(r['origin'][2:]) for r in first]
  assert origins == sorted(origins) and len(set(origins)) == 10


def test_bad_subset_names_the_option():
  with pytest.raises(ValueError, match='data.train_subset'):
    task_data._subset(_records(['a', 'b']), 1, seed=0, how='shortest')
  with pytest.raises(ValueError, match="'text' field"):
    task_data._subset([{'question': 'q'}, {'question': 'r'}], 1, seed=0,
                      how='longest')


def test_eval_rows_of_different_buckets_are_joined():
  outputs = [{'index': np.array([0, 1]), 'weight': np.array([1.0, 1.0]),
              'start_logits': np.ones((2, 4))},
             {'index': np.array([2, -1]), 'weight': np.array([1.0, 0.0]),
              'start_logits': np.full((2, 6), 2.0)}]
  index, values = tasks._rows(outputs, 'start_logits')
  assert index.tolist() == [0, 1, 2] and values.shape == (3, 6)
  np.testing.assert_array_equal(values[0], [1, 1, 1, 1, 0, 0])
  np.testing.assert_array_equal(values[2], [2] * 6)
