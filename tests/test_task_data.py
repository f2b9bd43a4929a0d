"""How `data.max_train_examples` picks train records (flaxlora.task_data)."""
import pytest

from flaxlora import task_data


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
