r"""T5 + prompt tuning (Lester et al. 2021) on text-to-text tasks.

  python -m experiments.run --config=configs/t5_prompt_tuning.py:runlocal \
      --workdir=workdirs/t5_prompt_runlocal

The paper's recipe: a 100-token prompt initialised from the embeddings of
tokens sampled among the 5000 most frequent (the first 5000 ids of T5's
frequency-ordered SentencePiece vocabulary), the T5 v1.1 "LM-adapted"
checkpoints, Adafactor at a constant learning rate 0.3 (no parameter
scaling, decay rate 0.8, weight decay 1e-5), batch 32, 30k steps. Only the
prompt is trained ([100, H]: 77k parameters for T5-base).

Variants (after ':', comma-separated):
  size=small|base|large   hub checkpoint google/t5-{size}-lm-adapt (base)
  task=summarization|qa|classification   XSum, SQuAD as text, SST-2 as text
  runlocal     tiny random T5, byte tokenizer, a generated task (reverse
               short strings), an 8-token prompt; seconds on a CPU
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
  arg = common.parse_arg(arg, size='base', task='summarization',
                         runlocal=False)
  if arg.task not in TASKS:
    raise ValueError(f'config variant task={arg.task!r}: use one of {TASKS}.')
  c = common.base_config()
  c.task = 'seq2seq'
  c.model.update(family='t5', path=f'google/t5-{arg.size}-lm-adapt',
                 dropout=0.1)
  c.tokenizer = ''  # the checkpoint's own
  c.peft = dict(method='prompt_tuning', num_tokens=100, init='vocab_sample',
                vocab_range=5000, init_text='', init_range=0.5, trainable='')
  c.data.update(source_prefix='', source_field='document',
                target_field='summary', id_field='id', labels=('0', '1'),
                label_names=('negative', 'positive'), text_field='sentence',
                label_field='label', format='seq2seq', metric='rouge',
                max_source_length=512, max_target_length=64,
                target_buckets=(), eval_from_train=0,
                train_articles='', eval_articles='')
  c.data.buckets = (128, 256)
  # Lester et al.: Adafactor, constant lr 0.3, no parameter scaling, decay
  # rate 0.8, weight decay 1e-5; Adafactor clips its own updates.
  c.optimizer.update(name='adafactor', lr=0.3, schedule='constant',
                     warmup_steps=0, weight_decay=1e-5, clip_norm=0.0,
                     adafactor_decay_rate=0.8,
                     adafactor_parameter_scale=False)
  c.train.update(steps=30000, batch_size=32, eval_batch_size=32,
                 eval_every=1000, log_every=100, checkpoint_every=1000)
  c.checkpoint.update(keep=2, best_metric='rouge1', best_mode='max')
  c.eval.update(num_beams=1, max_new_tokens=64, max_examples=500)
  _set_task(c, arg.task)
  if arg.runlocal:
    _runlocal(c, arg.task)
  return c


def _set_task(c: ml_collections.ConfigDict, task: str) -> None:
  if task == 'summarization':
    c.data.update(source='hub', hub_name='xsum', source_prefix='summarize: ')
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


def _runlocal(c: ml_collections.ConfigDict, task: str) -> None:
  """Seconds on a CPU: tiny T5, bytes, generated strings (no files)."""
  c.data.source = 'generated'
  kind = {'summarization': 'reverse', 'qa': 'lookup',
          'classification': 'majority'}[task]
  c.data.generated.update(kind=kind, num_train=512, num_eval=32, min_len=3,
                          max_len=8, seed=0)
  c.data.source_prefix = ''
  c.data.max_source_length, c.data.max_target_length = 48, 16
  c.data.buckets, c.data.target_buckets = (16, 32), (8,)
  c.model.update(path='', init=dict(TINY_T5), dropout=0.0)
  c.tokenizer = 'bytes'
  c.peft.update(num_tokens=8, vocab_range=0)
  c.train.update(steps=60, batch_size=16, eval_batch_size=16, eval_every=30,
                 log_every=10, checkpoint_every=30)
  c.eval.update(max_new_tokens=16, max_examples=32)


def get_sweep(arg: str | None = None) -> list[dict]:
  """Prompt length x learning rate."""
  del arg
  return common.product(common.sweep('peft.num_tokens', [20, 100]),
                        common.sweep('optimizer.lr', [0.1, 0.3]))
