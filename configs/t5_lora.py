r"""T5 + LoRA on text-to-text tasks (XSum summarization by default).

  python -m experiments.run --config=configs/t5_lora.py:runlocal \
      --workdir=workdirs/t5_runlocal

Variants (after ':', comma-separated):
  size=small|base|large   hub checkpoint google-t5/t5-{size} (default small)
  task=summarization|qa|classification   XSum, SQuAD as text, SST-2 as text
  local_data   read ../shared/data (XSum 800/200 split by a fixed seed,
               SQuAD dev articles 0-40/40-48, SST-2 train/dev) with a tiny
               random T5 and the byte tokenizer (no T5 weights offline)
  runlocal     tiny random T5, byte tokenizer, a generated task (copy short
               strings of letters; task=qa: look a word up in a short
               context; task=classification: the majority sentiment word);
               runs end to end in well under 2 minutes on 2 CPU cores and
               writes everything a real run writes
"""
import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The config; see the module docstring for the variants."""
  arg = common.parse_arg(arg, size='small', task='summarization',
                         local_data=False, runlocal=False)
  c = common.t5_config(arg.task, f'google-t5/t5-{arg.size}')
  c.peft.targets = r'.*/(q|v)/kernel'
  c.peft.rank, c.peft.alpha = 8, 16.0
  c.optimizer.update(lr=1e-3, schedule='linear', warmup_steps=100)
  c.train.update(steps=2000, batch_size=32, eval_batch_size=32,
                 eval_every=500, log_every=50, checkpoint_every=500)
  if arg.local_data:
    _local_data(c, arg.task)
  if arg.runlocal:
    _runlocal(c, arg.task)
  return c


def _local_data(c: ml_collections.ConfigDict, task: str) -> None:
  """../shared/data with a tiny random T5 (no T5 weights exist offline)."""
  c.data.source = 'files'
  if task == 'summarization':
    c.data.train_file = common.shared_data('xsum', 'xsum_1000.jsonl')
    c.data.eval_from_train = 200  # an 800/200 split by `split_seed`
  elif task == 'qa':
    c.data.train_file = common.shared_data('squad_v1.1', 'dev-v1.1.json')
    c.data.eval_file = c.data.train_file
    c.data.train_articles, c.data.eval_articles = '0:40', '40:48'
  else:
    c.data.train_file = common.shared_data('sst2', 'train.tsv')
    c.data.eval_file = common.shared_data('sst2', 'dev.tsv')
  c.model.path = ''
  c.model.init = dict(common.TINY_T5, d_model=256, d_kv=32, d_ff=1024,
                      num_heads=8, num_layers=4, num_decoder_layers=4)
  c.tokenizer = 'bytes'
  c.model.dtype = 'bfloat16'  # bf16 products, fp32 adapter and optimizer
  c.peft.targets = r'.*/(q|k|v|o|wi|wo)/kernel'
  c.peft.rank = 16
  # 512 source bytes: attention over 1024 would be most of the step
  c.data.max_source_length, c.data.max_target_length = 512, 128
  c.data.buckets, c.data.target_buckets = (512,), (64,)
  c.optimizer.lr = 3e-3
  c.train.update(steps=600, batch_size=16, eval_every=300,
                 checkpoint_every=300)
  c.eval.update(max_new_tokens=96, max_examples=200)


def _runlocal(c: ml_collections.ConfigDict, task: str) -> None:
  """Seconds on a CPU: tiny T5, bytes, generated strings (no files)."""
  common.t5_runlocal(c, task, num_train=2048, summarization='copy')
  if task == 'qa':  # 'question: .. context: ..' must keep its context
    c.data.max_source_length, c.data.buckets = 96, (64,)
  c.peft.targets = r'.*/(q|k|v|o|wi|wo)/kernel'
  # A random base: train the embedding table in full (a "module to save")
  # next to LoRA on every kernel, so a few seconds of training show.
  c.peft.trainable = r'shared/embedding'
  c.optimizer.update(lr=1e-2, warmup_steps=10, schedule='cosine')
  c.train.update(steps=400, batch_size=16, eval_batch_size=16,
                 eval_every=200, log_every=50, checkpoint_every=100)


def get_sweep(arg: str | None = None) -> list[dict]:
  """A 2x2 grid over learning rate and LoRA rank."""
  del arg
  return common.product(common.sweep('optimizer.lr', [3e-3, 1e-2]),
                        common.sweep('peft.rank', [4, 8]))
