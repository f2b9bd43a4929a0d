r"""GPT-2 + LoRA on prompt -> response text (XSum summaries by default).

  python -m experiments.run --config=configs/gpt2_lora.py:runlocal \
      --workdir=workdirs/gpt2_runlocal

Variants (after ':', comma-separated):
  runlocal     tiny random GPT-2, byte tokenizer, a generated task (copy
               short strings of letters); offline in well under a minute
               on 2 CPU cores, writing everything a real run writes

The default reads openai-community/gpt2 and XSum from the hub; for your
own files see configs/llama_lora.py and docs/causal_lm.md (GPT-2 has no
chat template, so data.prompt is the whole prompt).
"""
import ml_collections

from configs import common

TINY_GPT2 = dict(model_type='gpt2', vocab_size=259, n_positions=64,
                 n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0,
                 embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None,
                 eos_token_id=1, pad_token_id=0)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The config; see the module docstring for the variants."""
  arg = common.parse_arg(arg, runlocal=False)
  c = common.causal_config('gpt2', 'openai-community/gpt2')
  c.peft.targets = r'.*/attn/c_attn/kernel'  # the fused q, k, v
  c.peft.rank, c.peft.alpha = 16, 32.0
  c.data.update(source='hub', hub_name='xsum', chat_template=False,
                prompt='{source}\nTL;DR: ', max_source_length=384)
  c.optimizer.update(lr=1e-3, schedule='linear', warmup_steps=10)
  c.train.update(epochs=1.0, batch_size=8, eval_batch_size=16,
                 eval_every=0, log_every=10, checkpoint_every=0)
  if arg.runlocal:
    _runlocal(c)
  return c


def _runlocal(c: ml_collections.ConfigDict) -> None:
  """Seconds on a CPU: tiny GPT-2, bytes, generated strings (no files)."""
  c.model.update(path='', init=dict(TINY_GPT2))
  c.tokenizer = 'bytes'
  c.data.update(source='generated', prompt='{source}=',
                max_source_length=12, max_target_length=12)
  c.data.generated.update(kind='copy', num_train=1024, num_eval=16,
                          min_len=3, max_len=8, seed=0)
  c.data.buckets = (16,)
  c.peft.trainable = r'wte/embedding'
  c.optimizer.update(lr=1e-2, warmup_steps=10, schedule='cosine')
  c.train.update(epochs=0.0, steps=150, batch_size=16, eval_batch_size=16,
                 eval_every=75, log_every=25, checkpoint_every=75)
  c.eval.update(max_new_tokens=12, max_examples=16)


def get_sweep(arg: str | None = None) -> list[dict]:
  """A 2x2 grid over learning rate and LoRA rank."""
  del arg
  return common.product(common.sweep('optimizer.lr', [3e-4, 1e-3]),
                        common.sweep('peft.rank', [8, 16]))
