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
import sys

from absl import flags
import jax
from ml_collections import config_flags
import numpy as np

from experiments import cli as cli_lib
from flaxlora import build
from flaxlora import errors
from flaxlora import resolved
from flaxlora.data import task_data
from flaxlora.inspect import probe

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'A BERT classification config.', lock_config=True)
_NUM_TRAIN = flags.DEFINE_integer('num_train', 3000,
                                  'Train examples the probe fits on.')
_L2 = flags.DEFINE_float('l2', 1e-2, 'L2 penalty on the probe weights.')


def main(argv):
  del argv
  cli_lib.quiet_logs()
  config = _CONFIG.value
  if config.model.family != 'bert' or config.task != 'classification':
    raise errors.UserError(
        f'--config: model.family={config.model.family!r}, task='
        f'{config.task!r}; the probe reads a BERT classifier\'s vectors: '
        'pass a BERT classification config.')
  r = resolved.resolve(config)
  data = task_data.load(config, build.tokenizer(r), files=r.files)
  model, params, _, _ = build.model_and_params(r, jax.random.PRNGKey(0))
  model = model.clone(head=None, pooling='cls')  # -> (hidden, pooled)
  keep = np.random.default_rng(0).permutation(
      len(data.train.scalars['label']))[:_NUM_TRAIN.value]
  train_ids = [data.train.sequences['input_ids'][i] for i in keep]
  train = probe.features(model, params, train_ids)
  evaluation = probe.features(model, params, data.eval.sequences['input_ids'])
  train_y = data.train.scalars['label'][keep]
  eval_y = data.eval.scalars['label']
  print(f'frozen {config.model.path or "model.init"}: {len(keep)} train, '
        f'{len(eval_y)} eval examples, L2 {_L2.value}')
  for name in train:
    accuracy = probe.accuracy(train[name], train_y, evaluation[name], eval_y,
                              _L2.value)
    print(f'  {name:7s} eval accuracy {accuracy:.4f}')


if __name__ == '__main__':
  sys.exit(errors.cli(main))
