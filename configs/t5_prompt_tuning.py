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


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The config; see the module docstring for the variants."""
  arg = common.parse_arg(arg, size='base', task='summarization',
                         runlocal=False)
  c = common.t5_config(arg.task, f'google/t5-{arg.size}-lm-adapt')
  c.model.dropout = 0.1
  c.peft = dict(method='prompt_tuning', num_tokens=100, init='vocab_sample',
                vocab_range=5000, init_text='', init_range=0.5, trainable='')
  # Lester et al.: Adafactor, constant lr 0.3, no parameter scaling, decay
  # rate 0.8, weight decay 1e-5; Adafactor clips its own updates.
  # (A new section: AdamW's b1, b2 and eps mean nothing to Adafactor.)
  c.optimizer = dict(name='adafactor', lr=0.3, schedule='constant',
                     warmup_steps=0, weight_decay=1e-5, clip_norm=0.0,
                     grad_accum_steps=1, adafactor_decay_rate=0.8,
                     adafactor_parameter_scale=False)
  c.train.update(steps=30000, batch_size=32, eval_batch_size=32,
                 eval_every=1000, log_every=100, checkpoint_every=1000)
  if arg.runlocal:
    common.t5_runlocal(c, arg.task, num_train=512)
    c.model.dropout = 0.0
    c.peft.update(num_tokens=8, vocab_range=0)
    c.train.update(steps=60, batch_size=16, eval_batch_size=16,
                   eval_every=30, log_every=10, checkpoint_every=30)
  return c


def get_sweep(arg: str | None = None) -> list[dict]:
  """Prompt length x learning rate."""
  del arg
  return common.product(common.sweep('peft.num_tokens', [20, 100]),
                        common.sweep('optimizer.lr', [0.1, 0.3]))
