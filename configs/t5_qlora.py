r"""T5 + QLoRA (Dettmers et al. 2023): LoRA over an NF4-quantised frozen T5.

  python -m experiments.run --config=configs/t5_qlora.py:runlocal \
      --workdir=workdirs/t5_qlora_runlocal

Every dense kernel of the base is stored in 4-bit NormalFloat (blocks of 64,
double-quantised scales; ~0.13x its fp32 bytes) and dequantised on the fly
in the step; embeddings, norms and the untied lm_head stay fp32. LoRA goes
on all linear layers, with the paper's hyperparameters for models up to
13B: r=64, alpha=16, dropout 0.1, AdamW at a constant 2e-4, max gradient
norm 0.3.

Variants (after ':', comma-separated):
  size=small|base|large   hub checkpoint google-t5/t5-{size} (default small)
  task=summarization|qa|classification   XSum, SQuAD as text, SST-2 as text
  runlocal     tiny random T5, byte tokenizer, a generated task (reverse
               short strings); seconds on a CPU
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
                         runlocal=False)
  if arg.task not in TASKS:
    raise ValueError(f'config variant task={arg.task!r}: use one of {TASKS}.')
  c = common.base_config()
  c.task = 'seq2seq'
  c.model.update(family='t5', path=f'google-t5/t5-{arg.size}')
  c.tokenizer = ''  # the checkpoint's own
  c.peft.update(method='qlora', rank=64, alpha=16.0, dropout=0.1,
                targets=r'.*/(q|k|v|o|wi|wi_0|wi_1|wo)/kernel',
                quantize=r'.*/kernel', keep=r'lm_head/.*')
  c.data.update(source_prefix='', source_field='document',
                target_field='summary', id_field='id', labels=('0', '1'),
                label_names=('negative', 'positive'), text_field='sentence',
                label_field='label', format='seq2seq', metric='rouge',
                max_source_length=512, max_target_length=64,
                target_buckets=(), eval_from_train=0,
                train_articles='', eval_articles='')
  c.data.buckets = (128, 256)
  c.optimizer.update(name='adamw', lr=2e-4, schedule='constant',
                     warmup_steps=0, clip_norm=0.3)
  c.train.update(steps=2000, batch_size=16, eval_batch_size=32,
                 eval_every=500, log_every=50, checkpoint_every=500)
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
  c.model.update(path='', init=dict(TINY_T5))
  c.tokenizer = 'bytes'
  c.peft.update(rank=8, alpha=16.0, dropout=0.0)
  c.optimizer.update(lr=1e-2, warmup_steps=10, schedule='cosine',
                     clip_norm=1.0)
  c.train.update(steps=60, batch_size=16, eval_batch_size=16, eval_every=30,
                 log_every=10, checkpoint_every=30)
  c.eval.update(max_new_tokens=16, max_examples=32)


def get_sweep(arg: str | None = None) -> list[dict]:
  """Learning rate x LoRA rank."""
  del arg
  return common.product(common.sweep('optimizer.lr', [1e-4, 2e-4]),
                        common.sweep('peft.rank', [16, 64]))
