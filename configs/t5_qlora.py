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


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The config; see the module docstring for the variants."""
  arg = common.parse_arg(arg, size='small', task='summarization',
                         runlocal=False)
  c = common.t5_config(arg.task, f'google-t5/t5-{arg.size}')
  c.peft.update(method='qlora', rank=64, alpha=16.0, dropout=0.1,
                targets=r'.*/(q|k|v|o|wi|wi_0|wi_1|wo)/kernel',
                quantize=r'.*/kernel', keep=r'lm_head/.*')
  c.optimizer.update(name='adamw', lr=2e-4, schedule='constant',
                     warmup_steps=0, clip_norm=0.3)
  c.train.update(steps=2000, batch_size=16, eval_batch_size=32,
                 eval_every=500, log_every=50, checkpoint_every=500)
  if arg.runlocal:
    common.t5_runlocal(c, arg.task, num_train=512)
    c.peft.update(rank=8, alpha=16.0, dropout=0.0)
    c.optimizer.update(lr=1e-2, warmup_steps=10, schedule='cosine',
                       clip_norm=1.0)
    c.train.update(steps=60, batch_size=16, eval_batch_size=16,
                   eval_every=30, log_every=10, checkpoint_every=30)
  return c


def get_sweep(arg: str | None = None) -> list[dict]:
  """Learning rate x LoRA rank."""
  del arg
  return common.product(common.sweep('optimizer.lr', [1e-4, 2e-4]),
                        common.sweep('peft.rank', [16, 64]))
