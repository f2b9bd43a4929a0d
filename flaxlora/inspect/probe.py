"""Linear probes of a frozen BERT's sentence vectors.

    vectors = probe.features(model, params, token_rows)  # {'cls', ...}
    probe.accuracy(vectors['mean'][:n], labels[:n], vectors['mean'][n:],
                   labels[n:], l2=1e-2)

Which pooled vector of a checkpoint reads a task best, before any training
(`experiments/probe_pooling.py` runs it over a config's data).
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from flaxlora.models import bert

_BATCH = 128


def features(model, params, ids: list[np.ndarray]) -> dict[str, np.ndarray]:
  """{'cls', 'pooler', 'mean'}: [N, H] fp32 vectors of N token rows.

  Args:
    model: a bare BERT (`head=None`, [CLS] pooling): it returns (hidden
      [B, T, H], pooled [B, H]).
    params: its params.
    ids: N 1-D int token rows of any lengths (batched and padded here).
  """
  apply = jax.jit(lambda ids, mask: model.apply({'params': params}, ids,
                                                mask))
  out = {'cls': [], 'pooler': [], 'mean': []}
  for start in range(0, len(ids), _BATCH):
    rows = ids[start:start + _BATCH]
    width = -(-max(len(r) for r in rows) // 16) * 16  # few compiled shapes
    batch = np.zeros((len(rows), width), np.int32)  # [B, T]
    for i, row in enumerate(rows):
      batch[i, :len(row)] = row
    mask = (np.arange(width) < np.array([len(r) for r in rows])[:, None])
    hidden, pooled = apply(batch, mask.astype(np.int32))  # [B, T, H], [B, H]
    out['cls'].append(np.asarray(hidden[:, 0], np.float32))
    out['pooler'].append(np.asarray(pooled, np.float32))
    out['mean'].append(np.asarray(bert.masked_mean(hidden, mask)))
  return {k: np.concatenate(v) for k, v in out.items()}


def accuracy(train_x, train_y, eval_x, eval_y, l2: float) -> float:
  """Eval accuracy of an L2 logistic regression fitted on standardised
  train features [N, H] (labels [N])."""
  mean, std = train_x.mean(0), train_x.std(0) + 1e-6
  train_x, eval_x = (train_x - mean) / std, (eval_x - mean) / std
  classes = int(max(train_y.max(), eval_y.max())) + 1

  def loss(w):
    logits = train_x @ w['kernel'] + w['bias']
    return (optax.softmax_cross_entropy_with_integer_labels(
        logits, train_y).mean() + l2 * jnp.sum(w['kernel'] ** 2))

  w = {'kernel': jnp.zeros((train_x.shape[1], classes)),
       'bias': jnp.zeros(classes)}
  solver = optax.lbfgs()
  state = solver.init(w)
  value_and_grad = optax.value_and_grad_from_state(loss)

  @jax.jit
  def step(w, state):
    value, grad = value_and_grad(w, state=state)
    updates, state = solver.update(grad, state, w, value=value, grad=grad,
                                   value_fn=loss)
    return optax.apply_updates(w, updates), state

  for _ in range(300):
    w, state = step(w, state)
  predicted = np.argmax(eval_x @ w['kernel'] + w['bias'], -1)
  return float(np.mean(predicted == eval_y))
