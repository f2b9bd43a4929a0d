r"""LoRA / QLoRA of large checkpoints on TPU slices: what `experiments.plan`
compiles for the pod-scale table (docs/pod_scale.md).

  python -m experiments.run --config=configs/pod_lora.py:runlocal \
      --workdir=workdirs/pod_runlocal
  python -m experiments.plan --config=configs/pod_lora.py:model=flan-t5-xxl \
      --target=v5e-16

`model=` names a checkpoint (`MODELS`); a run downloads it, while
`experiments.plan` builds its shapes from `flaxlora.models.presets` (no
download). The base is sharded FSDP-style over every chip (mesh fsdp=-1)
and stored in bf16, products in bf16, every block rematerialised
(model.remat=block) and each stack's blocks one scan (model.scan_layers),
LoRA r=16 (alpha 32) on every attention and MLP kernel, AdamW. T5: XSum,
inputs 512 / targets 128 tokens, global batch 128. BERT: SST-2
classification, 128 tokens, global batch 256. Llama-shaped decoders: XSum
as prompt -> summary, rows of 2048 tokens (1920 + 128, packed), global
batch 32, the loss 128 positions at a time (model.loss_chunk) and chunked
attention.

Variants (after ':', comma-separated):
  model=flan-t5-xxl|flan-t5-xl|t5-v1_1-xxl|bert-large|llama-3-8b|qwen2-7b
  method=lora|qlora   qlora: every dense kernel of the base in NF4
  batch=N      the global batch size (default: the model's)
  runlocal     a tiny random T5 (whatever model=), byte tokenizer, a
               generated task; seconds on a CPU
"""
import ml_collections

from configs import common

# model= -> (hub id, family, global batch).
MODELS = {
    'flan-t5-xxl': ('google/flan-t5-xxl', 't5', 128),
    'flan-t5-xl': ('google/flan-t5-xl', 't5', 128),
    't5-v1_1-xxl': ('google/t5-v1_1-xxl', 't5', 128),
    'bert-large': ('google-bert/bert-large-uncased', 'bert', 256),
    'llama-3-8b': ('meta-llama/Meta-Llama-3-8B', 'llama', 32),
    'qwen2-7b': ('Qwen/Qwen2-7B', 'llama', 32),
}
TARGETS = {'t5': r'.*/(q|k|v|o|wi|wi_0|wi_1|wo)/kernel',
           'bert': r'.*/(attention|mlp)/\w+/kernel',
           'llama': common.LLAMA_PROJECTIONS}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The config; see the module docstring for the variants."""
  arg = common.parse_arg(arg, model='flan-t5-xxl', method='lora', batch=0,
                         runlocal=False)
  if arg.model not in MODELS:
    raise ValueError(f'config variant model={arg.model!r}: use one of '
                     f'{sorted(MODELS)}.')
  if arg.method not in ('lora', 'qlora'):
    raise ValueError(f'config variant method={arg.method!r}: use lora or '
                     'qlora.')
  path, family, batch = MODELS[arg.model]
  if arg.runlocal:
    family = 't5'
  if family == 't5':
    c = common.t5_config('summarization', path)
    c.data.update(max_source_length=512, max_target_length=128)
    c.data.buckets = ()
  elif family == 'llama':
    c = common.causal_config('llama', path)
    # Rows of 2048 tokens, several examples packed in each.
    c.data.update(prompt='{source}', chat_template=False, pack=True,
                  max_source_length=1920, max_target_length=128)
    c.data.buckets = ()
    # The output layer and loss 128 positions at a time, attention 256
    # queries at a time: the [B, T, V] logits and [B, N, T, T] scores of
    # 2048-token rows never live whole (docs/memory.md).
    c.model.update(loss_chunk=128, attention='chunked')
  else:
    c = common.bert_config('classification', 'classification')
    c.model.path = path
    common.sst2_data(c)
    c.data.buckets = ()
  # bf16 products, the frozen base stored in bf16 (the adapter, its
  # optimizer state and updates in fp32), every block rematerialised, the
  # blocks of a stack one scan (one block's program whatever the depth).
  c.model.update(dtype='bfloat16', base_dtype='bfloat16', remat='block',
                 scan_layers=True)
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  c.peft.update(method=arg.method, rank=16, alpha=32.0,
                targets=TARGETS[family])
  if arg.method == 'qlora':
    c.peft.update(quantize=r'.*/kernel', keep=r'(lm_head|classifier)/.*')
  c.optimizer.update(name='adamw', lr=1e-4, schedule='linear',
                     warmup_steps=100)
  c.train.update(epochs=0.0, steps=2000, batch_size=arg.batch or batch,
                 eval_batch_size=arg.batch or batch, eval_every=500,
                 log_every=50, checkpoint_every=500)
  if arg.runlocal:
    common.t5_runlocal(c, 'summarization', num_train=256)
    c.model.init = dict(common.TINY_T5, feed_forward_proj='gated-gelu',
                        tie_word_embeddings=False)
    c.peft.targets = TARGETS['t5']
    c.train.update(steps=20, batch_size=arg.batch or 16,
                   eval_batch_size=arg.batch or 16, eval_every=10,
                   log_every=5, checkpoint_every=10)
  return c
