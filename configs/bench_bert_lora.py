r"""MiniLM-shaped LoRA classifier: the BERT config `experiments.benchmark
lora` times.

  python -m experiments.run --config=configs/bench_bert_lora.py:quick \
      --workdir=workdirs/bench_bert_quick

A random BERT of MiniLM-L6's shape (hidden 384, 6 layers, 12 heads, vocab
30522, dropout 0.1) with a 2-class head, the generated word vocabulary and
a generated word-majority task of 127-word texts (every batch fills 128
tokens): no files. Batch 32; LoRA r=8, alpha 16 on query and value, the
classifier trained in full; AdamW (lr 1e-3, weight decay 0.01, linear
decay), gradients clipped to norm 1.0. `python -m experiments.benchmark
lora` times the train step that `experiments.run` compiles for this config
and its variants (`flax_*` rows).

Variants (after ':', comma-separated):
  quick    tiny BERT (hidden 64, 2 layers), batch 8, length 32: seconds
           (`experiments.benchmark lora --quick`)
  mixed    bf16 products, fp32 params, adapter and optimizer
  full     full fine-tuning (every param trained)
  nodrop   model dropout 0
"""
import ml_collections

from configs import common

# MiniLM-L6's architecture (config.json fields), randomly initialised.
MINILM_SHAPE = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6,
                    num_attention_heads=12, intermediate_size=1536,
                    max_position_embeddings=512)
QUICK_SHAPE = dict(common.TINY_BERT, hidden_size=64, num_attention_heads=4,
                   intermediate_size=128)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The config; see the module docstring for the variants."""
  arg = common.parse_arg(arg, quick=False, mixed=False, full=False,
                         nodrop=False)
  c = common.bert_config('classification', 'classification')
  length, batch = (32, 8) if arg.quick else (128, 32)
  # An odd word count (no majority ties) + [CLS] + [SEP] >= length.
  common.bert_runlocal(c, max_length=length, kind='majority', num_train=64,
                       num_eval=16, min_len=length - 1, max_len=length - 1)
  c.model.update(init=dict(QUICK_SHAPE if arg.quick else MINILM_SHAPE),
                 dropout=0.1)
  c.peft.update(rank=8, alpha=16.0, dropout=0.0,
                targets=r'.*/attention/(query|value)/kernel',
                trainable=r'classifier/.*')
  c.optimizer.update(lr=1e-3, weight_decay=0.01, schedule='linear',
                     warmup_steps=0, clip_norm=1.0, grad_accum_steps=1)
  c.train.update(steps=20, batch_size=batch, eval_batch_size=batch,
                 eval_every=0, log_every=5, checkpoint_every=0)
  common.benchmark_variants(c, arg.mixed, arg.full, arg.nodrop)
  return c
