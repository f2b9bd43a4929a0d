r"""T5-small-shaped LoRA: the T5 config `experiments.benchmark lora` times.

  python -m experiments.run --config=configs/bench_t5_lora.py:quick \
      --workdir=workdirs/bench_t5_quick

A random T5 of t5-small's shape (d_model 512, d_ff 2048, 6+6 layers, 8
heads, vocab 32128, model dropout 0.1), the byte tokenizer and generated
data (copy 128 letters, so every batch fills source 256 and target 64
tokens): no files. Batch 8; LoRA r=8, alpha 16 on q and v; AdamW (lr 1e-3,
weight decay 0.01, linear decay), gradients clipped to norm 1.0.
`python -m experiments.benchmark lora` times the train step that
`experiments.run` compiles for this config and its variants (`flax_*` rows).

Variants (after ':', comma-separated):
  quick    tiny T5 (d_model 64, 2+2 layers), source 32, target 8: seconds
           (`experiments.benchmark lora --quick`)
  mixed    bf16 products, fp32 params, adapter and optimizer
  full     full fine-tuning (every param trained)
  nodrop   model dropout 0
"""
import ml_collections

from configs import common

# t5-small's architecture (config.json fields), randomly initialised.
T5_SMALL = dict(common.TINY_T5, vocab_size=32128, d_model=512, d_kv=64,
                d_ff=2048, num_layers=6, num_decoder_layers=6, num_heads=8,
                relative_attention_num_buckets=32,
                relative_attention_max_distance=128)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The config; see the module docstring for the variants."""
  arg = common.parse_arg(arg, quick=False, mixed=False, full=False,
                         nodrop=False)
  c = common.t5_config('summarization', '')
  c.model.update(path='', init=dict(common.TINY_T5 if arg.quick else
                                    T5_SMALL), dropout=0.1)
  c.tokenizer = 'bytes'
  # 'a b c ...' of n letters is 2n - 1 bytes, + eos: exactly the source.
  source, target = (32, 8) if arg.quick else (256, 64)
  c.data.update(source='generated', source_prefix='',
                max_source_length=source, max_target_length=target)
  c.data.buckets, c.data.target_buckets = (source,), (target,)
  c.data.generated.update(kind='copy', num_train=64, num_eval=8,
                          min_len=source // 2, max_len=source // 2)
  c.peft.update(rank=8, alpha=16.0, targets=r'.*/(q|v)/kernel', dropout=0.0)
  c.optimizer.update(lr=1e-3, weight_decay=0.01, schedule='linear',
                     warmup_steps=0, clip_norm=1.0, grad_accum_steps=1)
  c.train.update(steps=20, batch_size=8, eval_batch_size=8, eval_every=0,
                 log_every=5, checkpoint_every=0)
  c.eval.update(max_new_tokens=8, max_examples=8)
  common.benchmark_variants(c, arg.mixed, arg.full, arg.nodrop)
  return c
