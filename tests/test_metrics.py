"""Metrics against hand-checked values and independent references."""
import numpy as np
import pytest
from rouge_score import rouge_scorer

from flaxlora import metrics


def reference_f1(predictions, labels, c):
  """F1 of class c from a confusion matrix (sklearn's definition)."""
  size = max(predictions.max(), labels.max()) + 1
  confusion = np.zeros((size, size))
  np.add.at(confusion, (labels, predictions), 1)
  tp = confusion[c, c]
  fp = confusion[:, c].sum() - tp
  fn = confusion[c, :].sum() - tp
  precision = tp / (tp + fp) if tp + fp else 0.0
  recall = tp / (tp + fn) if tp + fn else 0.0
  return 2 * precision * recall / (precision + recall) if tp else 0.0


def test_accuracy_and_f1_match_reference():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 3, 200)
  predictions = np.where(rng.random(200) < 0.6, labels,
                         rng.integers(0, 3, 200))
  assert metrics.accuracy(predictions, labels) == pytest.approx(
      np.mean(predictions == labels))
  macro = np.mean([reference_f1(predictions, labels, c) for c in range(3)])
  assert metrics.f1(predictions, labels, average='macro') == pytest.approx(
      macro)
  binary_labels, binary_predictions = labels % 2, predictions % 2
  assert metrics.f1(binary_predictions, binary_labels) == pytest.approx(
      reference_f1(binary_predictions, binary_labels, 1))
  assert metrics.f1(binary_predictions, binary_labels, positive=0) != \
      metrics.f1(binary_predictions, binary_labels)


def test_hand_checked_classification_and_weights():
  # tp=2, fp=1, fn=1 -> precision 2/3, recall 2/3, F1 2/3.
  predictions, labels = [1, 1, 1, 0, 0], [1, 1, 0, 1, 0]
  assert metrics.accuracy(predictions, labels) == pytest.approx(0.6)
  assert metrics.f1(predictions, labels) == pytest.approx(2 / 3)
  # Weight 0 rows (padding) are ignored; weight 2 counts a row twice.
  padded_p, padded_l = predictions + [0, 1], labels + [1, 1]
  weights = [1, 1, 1, 1, 1, 0, 0]
  assert metrics.accuracy(padded_p, padded_l, weights) == pytest.approx(0.6)
  assert metrics.f1(padded_p, padded_l, weights=weights) == pytest.approx(
      2 / 3)
  doubled = metrics.accuracy(predictions, labels, [2, 1, 1, 1, 1])
  assert doubled == pytest.approx(
      metrics.accuracy(predictions + [1], labels + [1]))
  # A class absent from both counts as 0 in a fixed-size macro average.
  assert metrics.f1([0, 1], [0, 1], average='macro', num_classes=3) == \
      pytest.approx(2 / 3)
  with pytest.raises(ValueError, match='shape'):
    metrics.accuracy([1, 2], [1])
  with pytest.raises(ValueError, match="average='micro'"):
    metrics.f1([1], [1], average='micro')


@pytest.mark.parametrize('text, normalized', [
    ('The Cat!', 'cat'),
    ('  an   apple, a pear ', 'apple pear'),
    ('Theater anthem', 'theater anthem'),  # articles only as words
    ("Levi's   Stadium.", 'levis stadium'),
    ('A-ha', 'aha'),
    ('the', ''),
])
def test_squad_normalize(text, normalized):
  assert metrics.squad_normalize(text) == normalized


def test_squad_em_and_f1_hand_checked():
  assert metrics.squad_exact_match('The Denver Broncos.', ['denver broncos'])
  assert not metrics.squad_exact_match('Broncos', ['Denver Broncos'])
  # pred {cat, sat}, gold {cat, sat, on, mat}: P 1, R 1/2, F1 2/3.
  assert metrics.squad_f1('the cat sat', ['cat sat on the mat']) == \
      pytest.approx(2 / 3)
  # max over gold answers.
  assert metrics.squad_f1('cat sat', ['dog', 'cat sat on the mat', 'cat']) \
      == pytest.approx(max(2 / 3, 2 * 0.5 * 1 / 1.5))
  # tokens count with multiplicity: pred {x: 2}, gold {x: 1}.
  assert metrics.squad_f1('x x', ['x']) == pytest.approx(2 / 3)
  assert metrics.squad_f1('nothing', ['else']) == 0.0
  score = metrics.squad({'1': 'Denver', '2': 'cat sat'},
                        {'1': ['Denver', 'Broncos'],
                         '2': ['cat sat on the mat'], '3': ['missing']})
  assert score['exact_match'] == pytest.approx(100 / 3)
  assert score['f1'] == pytest.approx(100 * (1 + 2 / 3) / 3)
  with pytest.raises(ValueError, match="question '1' has no gold"):
    metrics.squad({}, {'1': []})


PAIRS = [
    ('the cat sat on the mat.\nit was happy.',
     'a cat was sitting on the mat.\nthe cat was happy.'),
    ('Police arrested two men in Leeds.', 'Two men were arrested by police.'),
    ('completely different words here', 'nothing shared at all'),
]


def test_rouge_equals_rouge_score():
  predictions, references = zip(*PAIRS)
  got = metrics.rouge(predictions, references)
  scorer = rouge_scorer.RougeScorer(list(metrics.ROUGE_TYPES),
                                    use_stemmer=True)
  for name in metrics.ROUGE_TYPES:
    expected = np.mean([scorer.score(r, p)[name].fmeasure
                        for p, r in PAIRS]) * 100
    assert got[name] == pytest.approx(expected)
  assert got['rouge1'] > got['rouge2'] > 0
  # Lsum differs from L when sentences are on separate lines.
  first = metrics.rouge(predictions[:1], references[:1])
  assert first['rougeLsum'] != first['rougeL']


def test_rouge_sentence_splitting():
  assert metrics.sentence_lines('One. Two!  Three? four') == \
      'One.\nTwo!\nThree?\nfour'
  prediction = 'the cat sat. it was happy.'
  reference = 'it was happy. the cat sat.'
  split = metrics.rouge([prediction], [reference], split_sentences=True)
  plain = metrics.rouge([prediction], [reference])
  assert split['rougeLsum'] > plain['rougeLsum']
  assert split['rougeL'] == plain['rougeL']
  with pytest.raises(ValueError, match='2 predictions but 1 references'):
    metrics.rouge(['a', 'b'], ['a'])
  with pytest.raises(ValueError, match="unknown rouge_types \\['rouge9'\\]"):
    metrics.rouge(['a'], ['a'], rouge_types=['rouge9'])
