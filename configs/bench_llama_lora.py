r"""SmolLM2-135M-shaped LoRA: the Llama config `experiments.benchmark lora`
times.

  python -m experiments.run --config=configs/bench_llama_lora.py:quick \
      --workdir=workdirs/bench_llama_quick

A random Llama of SmolLM2-135M's shape (hidden 576, 30 layers, 9 query / 3
key-value heads, MLP 1536, vocab 49152, tied output), the byte tokenizer
and generated data (copy 128 letters: prompt and response fill 512 tokens
per row): no files. Batch 8; LoRA r=16, alpha 32 on all seven projections
(q, k, v, o, gate, up, down); AdamW (lr 1e-3, weight decay 0.01, linear
decay), gradients clipped to norm 1.0. The output layer and loss run 128
positions at a time and attention 256 queries at a time (`model.loss_chunk`,
`model.attention='chunked'`): the fp32 step's temporaries fall from 16.8 GB
to 9.3 GB (XLA's memory analysis), which a 16-24 GB CPU host needs, and the
step is no slower.
`python -m experiments.benchmark lora --only llama` times the train step
that `experiments.run` compiles for this config and its variants.

Variants (after ':', comma-separated):
  quick    tiny Llama (configs/llama_lora.py's), 64 tokens per row: seconds
  mixed    bf16 products, fp32 params, adapter and optimizer
"""
import ml_collections

from configs import common
from configs import llama_lora

SMOLLM2_135M = dict(llama_lora.TINY_LLAMA, vocab_size=49152, hidden_size=576,
                    intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3,
                    max_position_embeddings=8192, rope_theta=100000.0,
                    rms_norm_eps=1e-5)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The config; see the module docstring for the variants."""
  arg = common.parse_arg(arg, quick=False, mixed=False)
  c = llama_lora.get_config('runlocal')
  c.model.update(init=dict(llama_lora.TINY_LLAMA if arg.quick else
                           SMOLLM2_135M))
  c.peft.trainable = ''
  c.model.update(loss_chunk=128, attention='chunked')
  c.peft.update(rank=16, alpha=32.0, dropout=0.0)
  # 'a b c ...' of n letters is 2n - 1 bytes; '=' ends the prompt and eos
  # the response: 2 * 2n tokens per row.
  letters = 16 if arg.quick else 128
  c.data.update(max_source_length=2 * letters, max_target_length=2 * letters)
  c.data.buckets = (4 * letters,)
  c.data.generated.update(kind='copy', num_train=64, num_eval=8,
                          min_len=letters, max_len=letters)
  c.optimizer.update(lr=1e-3, weight_decay=0.01, schedule='linear',
                     warmup_steps=0, clip_norm=1.0, grad_accum_steps=1)
  c.train.update(steps=20, batch_size=8, eval_batch_size=8, eval_every=0,
                 log_every=5, checkpoint_every=0)
  c.eval.update(max_new_tokens=8, max_examples=8)
  common.benchmark_variants(c, arg.mixed, False, False)
  return c
