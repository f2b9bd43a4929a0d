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

TINY_T5 = dict(vocab_size=259, d_model=64, d_kv=16, d_ff=128, num_layers=2,
               num_decoder_layers=2, num_heads=4,
               relative_attention_num_buckets=16,
               relative_attention_max_distance=32, dropout_rate=0.0,
               feed_forward_proj='relu', tie_word_embeddings=True,
               pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
TASKS = ('summarization', 'qa', 'classification')


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The config; see the module docstring for the variants."""
  arg = common.parse_arg(arg, size='small', task='summarization',
                         local_data=False, runlocal=False)
  if arg.task not in TASKS:
    raise ValueError(f'config variant task={arg.task!r}: use one of {TASKS}.')
  c = common.base_config()
  c.task = 'seq2seq'
  c.model.family = 't5'
  c.model.path = f'google-t5/t5-{arg.size}'
  c.tokenizer = ''  # the checkpoint's own
  c.peft.targets = r'.*/(q|v)/kernel'
  c.peft.rank, c.peft.alpha = 8, 16.0
  c.data.update(source_prefix='', source_field='document',
                target_field='summary', id_field='id', labels=('0', '1'),
                label_names=('negative', 'positive'), text_field='sentence',
                label_field='label', format='seq2seq', metric='rouge',
                max_source_length=512, max_target_length=64,
                target_buckets=(), eval_from_train=0,
                train_articles='', eval_articles='')
  c.data.buckets = (128, 256)
  c.optimizer.update(lr=1e-3, schedule='linear', warmup_steps=100)
  c.train.update(steps=2000, batch_size=32, eval_batch_size=32,
                 eval_every=500, log_every=50, checkpoint_every=500)
  c.checkpoint.update(keep=2, best_metric='rouge1', best_mode='max')
  c.eval.update(num_beams=1, max_new_tokens=64, max_examples=500)
  _set_task(c, arg.task)
  if arg.local_data:
    _local_data(c, arg.task)
  if arg.runlocal:
    _runlocal(c, arg.task)
  return c


def _set_task(c: ml_collections.ConfigDict, task: str) -> None:
  if task == 'summarization':
    c.data.update(source='hub', hub_name='xsum', source_prefix='summarize: ',
                  format='seq2seq', metric='rouge')
  elif task == 'qa':
    c.data.update(source='hub', hub_name='squad', format='squad',
                  metric='squad', max_target_length=32)
    c.checkpoint.best_metric = 'f1'
    c.eval.max_new_tokens = 32
  else:
    c.data.update(source='hub', hub_name='glue/sst2', format='classification',
                  metric='accuracy', source_prefix='sst2 sentence: ',
                  max_source_length=128, max_target_length=4)
    c.data.buckets = (32, 64)
    c.checkpoint.best_metric = 'accuracy'
    c.eval.max_new_tokens = 4


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
  c.model.init = dict(TINY_T5, d_model=256, d_kv=32, d_ff=1024, num_heads=8,
                      num_layers=4, num_decoder_layers=4)
  c.tokenizer = 'bytes'
  c.peft.targets = r'.*/(q|k|v|o|wi|wo)/kernel'
  c.peft.rank = 16
  c.data.max_source_length, c.data.max_target_length = 1024, 128
  c.data.buckets, c.data.target_buckets = (512,), (64,)
  c.optimizer.lr = 3e-3
  c.train.update(steps=600, batch_size=16, eval_every=300,
                 checkpoint_every=300)
  c.eval.update(max_new_tokens=96, max_examples=200)


def _runlocal(c: ml_collections.ConfigDict, task: str) -> None:
  """Seconds on a CPU: tiny T5, bytes, generated strings (no files)."""
  c.data.source = 'generated'
  kind = {'summarization': 'copy', 'qa': 'lookup',
          'classification': 'majority'}[task]
  c.data.generated.update(kind=kind, num_train=2048, num_eval=32,
                          min_len=3, max_len=8, seed=0)
  c.data.source_prefix = ''
  c.data.max_source_length, c.data.max_target_length = 48, 16
  c.data.buckets, c.data.target_buckets = (16, 32), (8,)
  if task == 'qa':  # 'question: .. context: ..' must keep its context
    c.data.max_source_length, c.data.buckets = 96, (64,)
  c.model.path = ''
  c.model.init = dict(TINY_T5)
  c.tokenizer = 'bytes'
  c.peft.targets = r'.*/(q|k|v|o|wi|wo)/kernel'
  # A random base: train the embedding table in full (a "module to save")
  # next to LoRA on every kernel, so a few seconds of training show.
  c.peft.trainable = r'shared/embedding'
  c.optimizer.update(lr=1e-2, warmup_steps=10, schedule='cosine')
  c.train.update(steps=400, batch_size=16, eval_batch_size=16,
                 eval_every=200, log_every=50, checkpoint_every=100)
  c.eval.update(max_new_tokens=16, max_examples=32)


def get_sweep(arg: str | None = None) -> list[dict]:
  """A 2x2 grid over learning rate and LoRA rank."""
  del arg
  return common.product(common.sweep('optimizer.lr', [3e-3, 1e-2]),
                        common.sweep('peft.rank', [4, 8]))
