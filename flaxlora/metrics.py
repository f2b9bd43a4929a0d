"""Evaluation metrics: classification, SQuAD, ROUGE.

Scales follow each metric's customary report: `accuracy` and `f1` are
fractions in [0, 1]; `squad` (exact match, F1) and `rouge` are percentages,
as the official SQuAD script and ROUGE tables print them.
"""
import collections
import re
import string
from typing import Mapping, Sequence

import numpy as np

ROUGE_TYPES = ('rouge1', 'rouge2', 'rougeL', 'rougeLsum')
PUNCTUATION = frozenset(string.punctuation)


def _weights(labels: np.ndarray, weights) -> np.ndarray:
  if weights is None:
    return np.ones(labels.shape, np.float64)
  weights = np.asarray(weights, np.float64)
  if weights.shape != labels.shape:
    raise ValueError(f'weights shape {weights.shape} != labels shape '
                     f'{labels.shape}.')
  return weights


def _as_arrays(predictions, labels):
  predictions, labels = np.asarray(predictions), np.asarray(labels)
  if predictions.shape != labels.shape:
    raise ValueError(f'predictions shape {predictions.shape} != labels shape '
                     f'{labels.shape}.')
  return predictions, labels


def accuracy(predictions: Sequence[int], labels: Sequence[int],
             weights: Sequence[float] | None = None) -> float:
  """Weighted fraction of predictions equal to labels (weight 0: padding)."""
  predictions, labels = _as_arrays(predictions, labels)
  weights = _weights(labels, weights)
  if not weights.sum():
    raise ValueError('accuracy of no examples (all weights are 0).')
  return float((weights * (predictions == labels)).sum() / weights.sum())


def f1(predictions: Sequence[int], labels: Sequence[int], *,
       average: str = 'binary', positive: int = 1,
       num_classes: int | None = None,
       weights: Sequence[float] | None = None) -> float:
  """F1 of one class ('binary', class `positive`) or its mean ('macro').

  A class with no true and no predicted examples has F1 0 (as sklearn's
  default zero_division), so 'macro' over `num_classes` counts it.
  """
  predictions, labels = _as_arrays(predictions, labels)
  weights = _weights(labels, weights)
  if average == 'binary':
    classes = [positive]
  elif average == 'macro':
    if num_classes is None:
      present = np.concatenate([predictions[weights > 0], labels[weights > 0]])
      classes = sorted(set(present.tolist()))
    else:
      classes = range(num_classes)
  else:
    raise ValueError(f"f1 average={average!r}: use 'binary' or 'macro'.")
  scores = []
  for c in classes:
    true_pos = (weights * ((predictions == c) & (labels == c))).sum()
    predicted = (weights * (predictions == c)).sum()
    actual = (weights * (labels == c)).sum()
    denominator = predicted + actual
    scores.append(2 * true_pos / denominator if denominator else 0.0)
  return float(np.mean(scores))


def squad_normalize(text: str) -> str:
  """SQuAD's answer normalisation: lower case, drop punctuation, articles
  (a, an, the) and extra whitespace."""
  text = text.lower()
  text = ''.join(ch for ch in text if ch not in PUNCTUATION)
  text = re.sub(r'\b(a|an|the)\b', ' ', text)
  return ' '.join(text.split())


def squad_exact_match(prediction: str, golds: Sequence[str]) -> float:
  """1.0 when the normalised prediction equals any normalised gold."""
  normalized = squad_normalize(prediction)
  return float(any(normalized == squad_normalize(g) for g in golds))


def squad_f1(prediction: str, golds: Sequence[str]) -> float:
  """Best bag-of-tokens F1 between the prediction and any gold answer."""
  return max(_token_f1(prediction, g) for g in golds)


def _token_f1(prediction: str, gold: str) -> float:
  predicted = squad_normalize(prediction).split()
  wanted = squad_normalize(gold).split()
  common = collections.Counter(predicted) & collections.Counter(wanted)
  same = sum(common.values())
  if not same:
    return 0.0
  precision, recall = same / len(predicted), same / len(wanted)
  return 2 * precision * recall / (precision + recall)


def squad(predictions: Mapping[str, str],
          references: Mapping[str, Sequence[str]]) -> dict[str, float]:
  """Exact match and F1 (percent) over all questions in `references`.

  Args:
    predictions: question id -> predicted answer text; a missing id scores 0
      (as in the official script).
    references: question id -> its gold answers (at least one).
  """
  if not references:
    raise ValueError('squad metrics of no questions.')
  exact, overlap = 0.0, 0.0
  for qid, golds in references.items():
    if not golds:
      raise ValueError(f'question {qid!r} has no gold answers.')
    if qid in predictions:
      exact += squad_exact_match(predictions[qid], golds)
      overlap += squad_f1(predictions[qid], golds)
  return {'exact_match': 100 * exact / len(references),
          'f1': 100 * overlap / len(references)}


def sentence_lines(text: str) -> str:
  """One sentence a line (split after . ! ? and whitespace), for rougeLsum.

  A simple splitter: rougeLsum scores the longest common subsequence per
  sentence, and rouge-score splits sentences on newlines only.
  """
  return '\n'.join(s for s in re.split(r'(?<=[.!?])\s+', text.strip()) if s)


def rouge(predictions: Sequence[str], references: Sequence[str], *,
          rouge_types: Sequence[str] = ROUGE_TYPES, use_stemmer: bool = True,
          split_sentences: bool = False) -> dict[str, float]:
  """Mean ROUGE F-measure (percent) of each type over prediction pairs.

  Args:
    predictions, references: texts, one reference per prediction. For
      rougeLsum, sentences are separated by newlines.
    rouge_types: any of ROUGE_TYPES.
    use_stemmer: Porter-stem words (as in published summarization results).
    split_sentences: first put each sentence on its own line
      (`sentence_lines`), when texts come without newlines.
  """
  from rouge_score import rouge_scorer  # pylint: disable=g-import-not-at-top
  if len(predictions) != len(references):
    raise ValueError(f'{len(predictions)} predictions but '
                     f'{len(references)} references.')
  if not predictions:
    raise ValueError('rouge of no predictions.')
  unknown = set(rouge_types) - set(ROUGE_TYPES)
  if unknown:
    raise ValueError(f'unknown rouge_types {sorted(unknown)}; use '
                     f'{ROUGE_TYPES}.')
  scorer = rouge_scorer.RougeScorer(list(rouge_types), use_stemmer=use_stemmer)
  totals = dict.fromkeys(rouge_types, 0.0)
  for prediction, reference in zip(predictions, references):
    if split_sentences:
      prediction, reference = (sentence_lines(prediction),
                               sentence_lines(reference))
    scores = scorer.score(reference, prediction)  # (target, prediction)
    for name in rouge_types:
      totals[name] += scores[name].fmeasure
  return {name: 100 * total / len(predictions)
          for name, total in totals.items()}
