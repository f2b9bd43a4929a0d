r"""Which pooled vector of a frozen BERT reads a classification task best.

  python -m experiments.probe_pooling \
      --config=configs/bert_sentiment_compare.py:local_data --num_train=3000

Runs the config's base model, frozen (no adapter), over `--num_train`
examples of its train data (its own subset: SST-2's 20k longest phrases for
the comparison) and all of its eval data, and fits a logistic regression
(standardised features, L2 `--l2`, L-BFGS) on each of three sentence
vectors: the [CLS] state, the pooler's output (tanh dense over [CLS], what
`model.pooling='cls'` classifies) and the masked mean of the token states
(what `model.pooling='mean'` feeds the pooler). It prints the eval accuracy
of each: a cheap look, before training, at which pooling the checkpoint was
trained for.
"""
from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np
import optax

from experiments import cli as cli_lib
from flaxlora import build
from flaxlora import sharding
from flaxlora.data import task_data

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'A BERT classification config.', lock_config=True)
_NUM_TRAIN = flags.DEFINE_integer('num_train', 3000,
                                  'Train examples the probe fits on.')
_L2 = flags.DEFINE_float('l2', 1e-2, 'L2 penalty on the probe weights.')
_BATCH = 128


def features(model, params, ids: list[np.ndarray]) -> dict[str, np.ndarray]:
  """{'cls', 'pooler', 'mean'}: [N, H] fp32 vectors of the N token rows."""
  apply = jax.jit(lambda ids, mask: model.apply({'params': params}, ids,
                                                mask))
  out = {'cls': [], 'pooler': [], 'mean': []}
  for start in range(0, len(ids), _BATCH):
    rows = ids[start:start + _BATCH]
    width = max(len(r) for r in rows)
    batch = np.zeros((len(rows), width), np.int32)  # [B, T]
    for i, row in enumerate(rows):
      batch[i, :len(row)] = row
    mask = (np.arange(width) < np.array([len(r) for r in rows])[:, None])
    hidden, pooled = apply(batch, mask.astype(np.int32))  # [B, T, H], [B, H]
    weights = mask[..., None].astype(np.float32)
    out['cls'].append(np.asarray(hidden[:, 0], np.float32))
    out['pooler'].append(np.asarray(pooled, np.float32))
    out['mean'].append((np.asarray(hidden, np.float32) * weights).sum(1)
                       / weights.sum(1))
  return {k: np.concatenate(v) for k, v in out.items()}


def probe_accuracy(train_x, train_y, eval_x, eval_y, l2: float) -> float:
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


def main(argv):
  del argv
  cli_lib.quiet_logs()
  config = _CONFIG.value
  if config.model.family != 'bert' or config.task != 'classification':
    raise app.UsageError('--config: a BERT classification config, please.')
  data = task_data.load(config, build.tokenizer(config))
  mesh = sharding.make_mesh(config.mesh)
  model, params, _, _ = build.model_and_params(
      config, jax.random.PRNGKey(0), mesh,
      sharding.resolve_rules(config.get('sharding_rules', None)))
  model = model.clone(head=None, pooling='cls')  # -> (hidden, pooled)
  keep = np.random.default_rng(0).permutation(
      len(data.train.scalars['label']))[:_NUM_TRAIN.value]
  train_ids = [data.train.sequences['input_ids'][i] for i in keep]
  train = features(model, params, train_ids)
  evaluation = features(model, params, data.eval.sequences['input_ids'])
  train_y = data.train.scalars['label'][keep]
  eval_y = data.eval.scalars['label']
  print(f'frozen {config.model.path or "model.init"}: {len(keep)} train, '
        f'{len(eval_y)} eval examples, L2 {_L2.value}')
  for name in train:
    accuracy = probe_accuracy(train[name], train_y, evaluation[name], eval_y,
                              _L2.value)
    print(f'  {name:7s} eval accuracy {accuracy:.4f}')


if __name__ == '__main__':
  app.run(main)
