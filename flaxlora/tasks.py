"""Per task: batch -> model inputs, the loss as (sum, weight), eval metrics.

A task is a small class built from (config, model); the trainer needs only

  loss(params, kwargs, batch, rng) -> (loss_sum, weight)   rng None: eval
  eval_outputs(params, kwargs, batch) -> dict of [B, ...] arrays (jittable)
  predict(data, outputs, generate) -> one prediction dict per eval record
  score(data, outputs, predictions) -> dict of floats (the eval metrics)
  metrics(data, outputs, generate) -> score of predict's predictions
  rows(records, predictions) -> per-example rows {id, input, prediction,
      reference, ...} (reference None for unlabelled records)

`outputs` are the host (numpy) eval outputs of every eval batch, each with
the batch's global 'index' and 'weight' (weight 0 marks padding rows;
see `flaxlora.steps.eval_step`).
Losses are sums over labelled positions with their count, so sharded and
accumulated reductions stay exact.

Registry: TASKS = {'classification': ..., 'squad': ..., 'seq2seq': ...,
'causal_lm': ...}.
"""
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flaxlora import metrics as metrics_lib
from flaxlora.data import squad as squad_data
from flaxlora.models import causal


def _apply(model, params, kwargs, inputs, rng):
  """model.apply with dropout when `rng` is given, deterministic without."""
  if rng is None:
    return model.apply({'params': params}, *inputs, deterministic=True,
                       **kwargs)
  return model.apply({'params': params}, *inputs, deterministic=False,
                     rngs={'dropout': rng}, **kwargs)


def _ce(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels)


def chunked_ce(head: Callable[[jax.Array, jax.Array], jax.Array],
               hidden: jax.Array, labels: jax.Array, chunk: int) -> jax.Array:
  """Cross-entropy [B, T] (fp32) of `labels` [B, T] under the logits
  `head(hidden[:, a:b], i)` [B, b - a, V] of the i-th chunk of `chunk`
  positions (the last one padded), so that at most one chunk's logits and
  their gradient are live: the chunks run in a scan and each is
  rematerialised (`jax.checkpoint`) in the backward pass. Equals
  `_ce(head(hidden), labels)` up to float rounding.

  Args:
    head: (hidden [B, C, H], chunk index int32 []) -> logits [B, C, V].
    hidden: [B, T, H] the final hidden states.
    labels: [B, T] int token ids.
    chunk: C > 0, positions per chunk.
  """
  b, t = labels.shape
  n = -(-t // chunk)
  pad = n * chunk - t
  hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
  labels = jnp.pad(labels, ((0, 0), (0, pad)))
  xs = jnp.swapaxes(hidden.reshape(b, n, chunk, -1), 0, 1)  # [N, B, C, H]
  ys = jnp.swapaxes(labels.reshape(b, n, chunk), 0, 1)  # [N, B, C]

  @jax.checkpoint
  def one(x, y, i):
    return _ce(head(x, i), y)

  _, ce = jax.lax.scan(lambda _, xyi: (None, one(*xyi)), None,
                       (xs, ys, jnp.arange(n, dtype=jnp.int32)))
  return jnp.swapaxes(ce, 0, 1).reshape(b, n * chunk)[:, :t]


def _loss_metrics(outputs: list[dict]) -> dict[str, float]:
  loss_sum = sum(float(o['loss_sum'].sum()) for o in outputs)
  weight = sum(float(o['loss_weight'].sum()) for o in outputs)
  return {'loss': loss_sum / max(weight, 1.0)}


def _rows(outputs: list[dict], name: str) -> tuple[np.ndarray, np.ndarray]:
  """(indices, values) of the real (weight > 0) rows of output `name`.

  Batches of different length buckets ([B, T1, ...], [B, T2, ...]) are
  zero-padded to the longest before they are joined.
  """
  index = np.concatenate([o['index'] for o in outputs])
  parts = [np.asarray(o[name]) for o in outputs]
  if parts[0].ndim > 1:
    longest = max(p.shape[1] for p in parts)
    parts = [np.pad(p, [(0, 0), (0, longest - p.shape[1])] +
                    [(0, 0)] * (p.ndim - 2))
             for p in parts]
  values = np.concatenate(parts)
  real = np.concatenate([o['weight'] for o in outputs]) > 0
  return index[real], values[real]


class _Task:
  """`metrics` from a task's `predict` and `score`."""

  def metrics(self, data, outputs, generate=None) -> dict[str, float]:
    return self.score(data, outputs, self.predict(data, outputs, generate))


class Classification(_Task):
  """BERT sequence classification: loss, accuracy and F1."""

  def __init__(self, config: Any, model: Any):
    self.config, self.model = config, model

  def _logits(self, params, kwargs, batch, rng):
    inputs = (batch['input_ids'], batch['attention_mask'],
              batch['token_type_ids'])
    return _apply(self.model, params, kwargs, inputs, rng)  # [B, C]

  def loss(self, params, kwargs, batch, rng):
    ce = _ce(self._logits(params, kwargs, batch, rng), batch['label'])
    return (ce * batch['weight']).sum(), batch['weight'].sum()

  def eval_outputs(self, params, kwargs, batch):
    logits = self._logits(params, kwargs, batch, None)
    ce = _ce(logits, batch['label'])
    return {'prediction': jnp.argmax(logits, -1), 'label': batch['label'],
            'probabilities': jax.nn.softmax(logits.astype(jnp.float32)),
            'loss_sum': ce * batch['weight'], 'loss_weight': batch['weight']}

  def predict(self, data, outputs, generate=None) -> list[dict[str, Any]]:
    """{'label': name, 'probabilities': {name: p}} per record (names are
    `data.labels`)."""
    del generate
    index, probabilities = _rows(outputs, 'probabilities')
    names = self._names(probabilities.shape[-1])
    by_record = dict(zip(index.tolist(), probabilities))
    out = []
    for i in range(len(data.eval_records)):
      p = by_record[i]
      out.append({'label': names[int(np.argmax(p))],
                  'probabilities': dict(zip(names, map(float, p)))})
    return out

  def _names(self, num_classes: int) -> list[str]:
    """`data.labels`, or the class indices for data without names (the
    generated tasks)."""
    labels = self.config.data.get('labels', None)
    return ([str(n) for n in labels] if labels else
            [str(i) for i in range(num_classes)])

  def rows(self, records, predictions) -> list[dict[str, Any]]:
    names = self._names(len(predictions[0]['probabilities'])
                        if predictions else 0)
    return [{'id': r.get('id', str(i)),
             'input': r['text'] if r.get('text_pair') is None else
                      [r['text'], r['text_pair']],
             'prediction': p['label'],
             'reference': names[r['label']] if 'label' in r else None,
             'probabilities': p['probabilities']}
            for i, (r, p) in enumerate(zip(records, predictions))]

  def score(self, data, outputs, predictions):
    del data, predictions  # scored from the argmax outputs
    _, predictions = _rows(outputs, 'prediction')
    _, labels = _rows(outputs, 'label')
    num_classes = self.model.num_labels
    average = 'binary' if num_classes == 2 else 'macro'
    result = _loss_metrics(outputs)
    result['accuracy'] = metrics_lib.accuracy(predictions, labels)
    result['f1'] = metrics_lib.f1(predictions, labels, average=average,
                                  num_classes=num_classes)
    return result


class Squad(_Task):
  """BERT extractive QA: start/end cross-entropy; SQuAD EM/F1 by n-best."""

  def __init__(self, config: Any, model: Any):
    self.config, self.model = config, model

  def _logits(self, params, kwargs, batch, rng):
    inputs = (batch['input_ids'], batch['attention_mask'],
              batch['token_type_ids'])
    return _apply(self.model, params, kwargs, inputs, rng)  # 2 x [B, T]

  def _ce(self, start, end, batch):
    return 0.5 * (_ce(start, batch['start_positions']) +
                  _ce(end, batch['end_positions']))

  def loss(self, params, kwargs, batch, rng):
    start, end = self._logits(params, kwargs, batch, rng)
    ce = self._ce(start, end, batch)
    return (ce * batch['weight']).sum(), batch['weight'].sum()

  def eval_outputs(self, params, kwargs, batch):
    start, end = self._logits(params, kwargs, batch, None)
    ce = self._ce(start, end, batch)
    return {'start_logits': start, 'end_logits': end,
            'loss_sum': ce * batch['weight'], 'loss_weight': batch['weight']}

  def predict(self, data, outputs, generate=None) -> list[dict[str, Any]]:
    """{'answer', 'score', 'start', 'end'} per record (character offsets
    [start, end) in its context)."""
    del generate
    # Rows are padded to the longest bucket; best_spans reads each row
    # only up to its feature's length.
    index, start = _rows(outputs, 'start_logits')
    _, end = _rows(outputs, 'end_logits')
    spans = squad_data.best_spans(
        data.eval, data.eval_records, index, start, end,
        n_best=self.config.eval.n_best,
        max_answer_length=self.config.eval.max_answer_length)
    return [{'answer': s.text, 'score': s.score, 'start': s.start,
             'end': s.end} for s in spans]

  def rows(self, records, predictions) -> list[dict[str, Any]]:
    return [{'id': r['id'], 'input': r['question'],
             'prediction': p['answer'],
             'reference': [a['text'] for a in r.get('answers', [])] or None,
             'score': p['score'], 'start': p['start'], 'end': p['end']}
            for r, p in zip(records, predictions)]

  def score(self, data, outputs, predictions):
    answers = {r['id']: p['answer']
               for r, p in zip(data.eval_records, predictions)}
    references = {r['id']: [a['text'] for a in r['answers']]
                  for r in data.eval_records}
    result = _loss_metrics(outputs)
    result.update(metrics_lib.squad(answers, references))
    return result


class Seq2Seq(_Task):
  """T5 text-to-text: teacher-forced loss; generated text for the metric
  (data.metric: 'rouge', 'squad' exact match / F1, or 'accuracy')."""

  METRICS = ('rouge', 'squad', 'accuracy')
  # The batch columns generation starts from.
  GENERATE_FROM = ('input_ids', 'attention_mask')

  def __init__(self, config: Any, model: Any):
    self.config, self.model = config, model
    if config.data.metric not in self.METRICS:
      raise ValueError(f'data.metric={config.data.metric!r}: use one of '
                       f'{self.METRICS}.')

  def _logits(self, params, kwargs, batch, rng):
    inputs = (batch['input_ids'], batch['attention_mask'],
              batch['decoder_input_ids'], batch['decoder_attention_mask'])
    return _apply(self.model, params, kwargs, inputs, rng)  # [B, T, V]

  def _token_ce(self, params, kwargs, batch, rng):
    ce = _ce(self._logits(params, kwargs, batch, rng), batch['labels'])
    weights = batch['decoder_attention_mask'] * batch['weight'][:, None]
    return ce * weights, weights

  def loss(self, params, kwargs, batch, rng):
    ce, weights = self._token_ce(params, kwargs, batch, rng)
    return ce.sum(), weights.sum()

  def eval_outputs(self, params, kwargs, batch):
    ce, weights = self._token_ce(params, kwargs, batch, None)
    return {'loss_sum': ce.sum(-1), 'loss_weight': weights.sum(-1)}

  def predict(self, data, outputs, generate: Callable[[], dict[int, str]]
              ) -> list[dict[str, Any]]:
    """{'text': generated text} per record; `generate()` -> {eval record
    index: generated text}."""
    del outputs
    generated = generate()
    return [{'text': generated.get(i, '')}
            for i in range(len(data.eval_records))]

  def rows(self, records, predictions) -> list[dict[str, Any]]:
    return [{'id': r.get('id', str(i)), 'input': r['source'],
             'prediction': p['text'],
             'reference': r.get('references', [r['target']])
                          if r.get('target') is not None else None}
            for i, (r, p) in enumerate(zip(records, predictions))]

  def score(self, data, outputs, predictions):
    result = _loss_metrics(outputs)
    texts = [p['text'] for p in predictions]
    records = data.eval_records
    metric = self.config.data.metric
    if metric == 'rouge':
      result.update(metrics_lib.rouge(texts, [r['target'] for r in records],
                                      split_sentences=True))
    elif metric == 'squad':
      result.update(metrics_lib.squad(
          {str(i): t for i, t in enumerate(texts)},
          {str(i): r.get('references', [r['target']])
           for i, r in enumerate(records)}))
    else:
      correct = [t.strip() == r['target'].strip()
                 for t, r in zip(texts, records)]
      result['accuracy'] = float(np.mean(correct))
    return result


class CausalLM(Seq2Seq):
  """Decoder-only LM on prompt -> response text (`flaxlora.data.causal`):
  next-token loss on the response tokens only (the prompt is masked), also
  on packed rows; generated responses scored like seq2seq (data.metric)."""

  # The batch columns generation starts from (left-padded prompts).
  GENERATE_FROM = ('prompt_ids', 'prompt_mask')
  # Packed rows' columns, passed on to the model when present.
  PACKED = ('segment_ids', 'positions')

  def __init__(self, config: Any, model: Any):
    super().__init__(config, model)
    # Positions per chunk of the output layer and loss (0: all at once).
    model_config = config.get('model', None) or {}
    self.loss_chunk = int(model_config.get('loss_chunk', 0))
    if self.loss_chunk < 0:
      raise ValueError(f'model.loss_chunk={self.loss_chunk}: use 0 (the '
                       'whole sequence at once) or a positive chunk length.')

  def _logits(self, params, kwargs, batch, rng, head=True):
    inputs = {k: batch[k] for k in self.PACKED if k in batch}
    kwargs = dict(kwargs, attention_mask=batch['attention_mask'], **inputs)
    if not head:
      kwargs['head'] = False
    logits = _apply(self.model, params, kwargs, (batch['input_ids'],), rng)
    # A prompt-tuning prefix adds positions in front: keep the tokens'.
    return logits[:, logits.shape[1] - batch['input_ids'].shape[1]:]

  def _next_token_ce(self, params, kwargs, batch, rng):
    """Cross-entropy [B, T-1] of each next token: the logits of the whole
    batch at once, or (model.loss_chunk) `chunked_ce` over the hidden
    states, the full logits never materialised."""
    ids = batch['input_ids']
    if not self.loss_chunk:
      logits = self._logits(params, kwargs, batch, rng)  # [B, T, V]
      return _ce(logits[:, :-1], ids[:, 1:])
    hidden = self._logits(params, kwargs, batch, rng, head=False)

    def head(x, i):
      key = None if rng is None else jax.random.fold_in(rng, i)
      return causal.output_logits(self.model, params, x, key)

    # The last position predicts nothing: its label is a pad, dropped.
    labels = jnp.pad(ids[:, 1:], ((0, 0), (0, 1)))
    return chunked_ce(head, hidden, labels, self.loss_chunk)[:, :-1]

  def _token_ce(self, params, kwargs, batch, rng):
    """Cross-entropy [B, T-1] of each next token and its weight."""
    ce = self._next_token_ce(params, kwargs, batch, rng)
    weights = batch['loss_mask'][:, 1:] * batch['weight'][:, None]
    if 'segment_ids' in batch:  # never predict across two sequences
      segments = batch['segment_ids']
      weights = weights * (segments[:, 1:] == segments[:, :-1])
    return ce * weights, weights


TASKS = {'classification': Classification, 'squad': Squad,
         'seq2seq': Seq2Seq, 'causal_lm': CausalLM}


def metric_names(config: Any) -> tuple[str, ...]:
  """The eval metrics `make(config, model).metrics` returns."""
  _check_task(config)
  if config.task == 'classification':
    return ('loss', 'accuracy', 'f1')
  metric = 'squad' if config.task == 'squad' else config.data.get('metric')
  return ('loss',) + {'rouge': metrics_lib.ROUGE_TYPES,
                      'squad': ('exact_match', 'f1'),
                      'accuracy': ('accuracy',)}.get(metric, ())


def _check_task(config: Any) -> None:
  if config.task not in TASKS:
    raise ValueError(f'task={config.task!r}: use one of {sorted(TASKS)}.')


def make(config: Any, model: Any):
  _check_task(config)
  return TASKS[config.task](config, model)
