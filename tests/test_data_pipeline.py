"""Shuffling, sharding, eval padding, buckets and iterator state."""
import numpy as np
import pytest

from flaxlora.data import buckets
from flaxlora.data import pipeline


def make_data(size=23, seed=0):
  """Example i has input_ids [i+1] * length_i and label i."""
  lengths = np.random.default_rng(seed).integers(1, 13, size)
  ids = [np.full((n,), i + 1, np.int32) for i, n in enumerate(lengths)]
  return buckets.Tokenized(
      sequences={'input_ids': ids, 'labels': [x[:2] for x in ids]},
      scalars={'label': np.arange(size, dtype=np.int32)},
      groups={'input_ids': 'source', 'labels': 'target'},
      buckets={'source': buckets.make_buckets(12, (4, 8)),
               'target': (2,)},
      pad={'input_ids': -7})


def labels_of(loader, steps):
  return [next(loader)['label'].tolist() for _ in range(steps)]


def test_shuffle_is_deterministic_and_differs_per_epoch():
  data = make_data()
  a = pipeline.Loader(data, global_batch_size=5, seed=3)
  b = pipeline.Loader(data, global_batch_size=5, seed=3)
  assert a.steps_per_epoch == 4  # 23 // 5, remainder dropped
  first, second = labels_of(a, 4), labels_of(a, 4)
  assert first == labels_of(b, 4)
  assert first != second
  for epoch in (first, second):
    seen = np.concatenate(epoch)
    assert len(set(seen.tolist())) == 20  # no repeats within an epoch
  other = pipeline.Loader(data, global_batch_size=5, seed=4)
  assert labels_of(other, 4) != first
  ordered = pipeline.Loader(data, global_batch_size=5, shuffle=False)
  assert labels_of(ordered, 1) == [[0, 1, 2, 3, 4]]


def test_shards_are_disjoint_and_make_the_global_batch():
  data = make_data()
  single = pipeline.Loader(data, global_batch_size=8, seed=1)
  shards = [pipeline.Loader(data, global_batch_size=8, seed=1,
                            process_index=p, process_count=4)
            for p in range(4)]
  for _ in range(5):  # crosses an epoch boundary (2 steps per epoch)
    whole = next(single)
    parts = [next(s) for s in shards]
    for name in whole:
      assert {p[name].shape for p in parts} == {
          (2,) + whole[name].shape[1:]}  # same bucket on every process
      np.testing.assert_array_equal(
          np.concatenate([p[name] for p in parts]), whole[name])
    indices = [set(p['index'].tolist()) for p in parts]
    assert all(a.isdisjoint(b) for i, a in enumerate(indices)
               for b in indices[i + 1:])


def test_eval_pads_remainder_with_zero_weight_rows():
  data = make_data()
  for count in (1, 3):
    seen = []
    for p in range(count):
      loader = pipeline.Loader(data, global_batch_size=6, shuffle=False,
                               drop_remainder=False, num_epochs=1,
                               process_index=p, process_count=count)
      batches = list(loader)
      assert len(batches) == 4  # ceil(23 / 6)
      for batch in batches:
        real = batch['weight'] > 0
        seen += batch['index'][real].tolist()
        assert (batch['index'][~real] == -1).all()
        assert (batch['input_ids'][~real] == -7).all()  # all-pad rows
        assert (batch['label'][~real] == 0).all()
    assert sorted(seen) == list(range(23))  # every example exactly once


def test_batches_use_smallest_fitting_bucket():
  data = make_data()
  lengths = data.lengths('source')
  loader = pipeline.Loader(data, global_batch_size=2, seed=0, num_epochs=1)
  widths = set()
  for batch in loader:
    longest = lengths[batch['index']].max()
    width = batch['input_ids'].shape[1]
    assert width == min(b for b in (4, 8, 12) if b >= longest)
    assert batch['labels'].shape[1] == 2
    np.testing.assert_array_equal(
        batch['input_ids'][0, :lengths[batch['index'][0]]],
        batch['index'][0] + 1)
    widths.add(width)
  assert len(widths) > 1


def test_state_round_trip():
  data = make_data()
  loader = pipeline.Loader(data, global_batch_size=4, seed=7)
  labels_of(loader, 9)  # into the second epoch (5 steps per epoch)
  state = loader.state()
  assert state == {'epoch': 1, 'index': 4}
  expected = labels_of(loader, 8)
  fresh = pipeline.Loader(data, global_batch_size=4, seed=7)
  fresh.restore({k: np.int64(v) for k, v in state.items()})  # as restored
  assert labels_of(fresh, 8) == expected
  assert fresh.state() == loader.state()
  with pytest.raises(ValueError, match='an epoch has 5 batches'):
    fresh.restore({'epoch': 0, 'index': 5})
  with pytest.raises(ValueError, match='exactly the keys epoch and index'):
    fresh.restore({'epoch': 0})


def test_bad_arguments():
  data = make_data()
  with pytest.raises(ValueError, match='multiple of the process count 4'):
    pipeline.Loader(data, global_batch_size=6, process_count=4)
  with pytest.raises(ValueError, match='fewer than global_batch_size=32'):
    pipeline.Loader(data, global_batch_size=32)
  with pytest.raises(ValueError, match=r'process_index=2 is outside'):
    pipeline.Loader(data, global_batch_size=4, process_index=2,
                    process_count=2)
  with pytest.raises(ValueError, match='exceeds the largest bucket 12'):
    buckets.pick(13, (4, 12))
  assert buckets.make_buckets(10, (16, 4, 4)) == (4, 10)
  with pytest.raises(ValueError, match='max_length=0'):
    buckets.make_buckets(0)
  with pytest.raises(ValueError, match='no examples after tokenisation'):
    buckets.Tokenized({'input_ids': []}, {}, {'input_ids': 'source'},
                      {'source': (4,)})
