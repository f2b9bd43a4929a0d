"""The PEFT method protocol, path selection and `chain`.

A PEFT method is a pair of pure functions (optax's shape), plus the pure
hooks a run needs of it, each with a default (see `PeftMethod`):

    method = lora.lora(rank=8, targets='t5')
    adapter = method.init(rng, base)          # works under jax.eval_shape
    params, kw = method.apply(base, adapter)  # params for the model
    logits = model.apply({'params': params}, *inputs, **kw)

Base params are never modified. The adapter is a plain nested dict that
mirrors the param paths it touches, so it is the whole trainable state: the
optimizer sees the adapter only, and XLA computes no gradient for the base.

Parameters are selected by regexes over "/"-joined paths
(`encoder/block_0/attention/q/kernel`) with `re.fullmatch`.
"""
import dataclasses
import pathlib
import re
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

import jax
import optax


Params = Mapping[str, Any]
Adapter = Any
PRNGKey = jax.Array
# make_tx(lr_multiplier) -> the run's optimizer (its schedule scaled).
TxFactory = Callable[[float], optax.GradientTransformation]


class Export(NamedTuple):
  """How a method's adapter is written as a Hugging Face PEFT folder.

  Attributes:
    write: `write(folder, model, base, adapter, method, *,
      base_model_name_or_path) -> folder`, or None when the adapter has no
      PEFT form. `method` is the whole (possibly chained) method.
    needs_base: `write` reads host copies of the base params (modules to
      save are written whole); when False it gets None.
    reason: why there is no PEFT form (when `write` is None).
  """
  write: Callable[..., pathlib.Path] | None = None
  needs_base: bool = False
  reason: str = 'it has no Hugging Face PEFT form'


def same_base(base: Params) -> Params:
  """`prepare_base` default: the base as given."""
  return base


def same_axes(base_axes: Any, prepared: Any) -> Any:
  """`prepared_axes` default: the prepared base has the base's axes."""
  del prepared
  return base_axes


def follow_base_axes(base_axes: Any, adapter: Any) -> Any:
  """`logical_axes` default: each adapter leaf takes the axes of the base
  param at its path (a fully trained copy is split like its original)."""
  flat_axes = flatten(base_axes)
  out = {}
  for path in flatten(adapter):
    if path not in flat_axes:
      raise ValueError(f'adapter path {path} has no logical axes in the base '
                       'axes tree; give the method a logical_axes hook.')
    out[path] = flat_axes[path]
  return unflatten(out)


def plain_optimizer(make_tx: TxFactory) -> optax.GradientTransformation:
  """`optimizer` default: the run's optimizer, one learning rate."""
  return make_tx(1.0)


def no_after_step(adapter: Adapter, opt_state: Any, base: Params,
                  step: jax.Array) -> tuple[Adapter, Any]:
  """`after_step` default: nothing changes between steps."""
  del base, step
  return adapter, opt_state


def no_before_update(adapter: Adapter, opt_state: Any, grads: Any,
                     base: Params, step: jax.Array
                     ) -> tuple[Adapter, Any, Any, dict]:
  """`before_update` default: the optimizer sees the state as it is; no
  metrics."""
  del base, step
  return adapter, opt_state, grads, {}


NO_EXPORT = Export()


class PeftMethod(NamedTuple):
  """A PEFT method: two pure functions and the pure hooks a run needs.

  A run (the trainer, the build step, the export path) asks a method
  everything through these fields and never which method it is; each hook
  has a default, so a method sets only what it changes.

  Attributes:
    init: `init(rng, base) -> adapter`, the trainable state; pure, so it
      also runs on abstract params under `jax.eval_shape`.
    apply: `apply(base, adapter) -> (params, kwargs)`: params for the model
      and extra keyword arguments for `model.apply` ({} for LoRA).
    config: the method's hyperparameters (a frozen dataclass), recorded
      and shown by `describe`; None for ad hoc methods.
    prepare_base: `prepare_base(base) -> base`, run once (jitted, sharded)
      before training: QLoRA quantises kernels to NF4, PiSSA subtracts
      W's top-R part. `apply` must give the same outputs on an unprepared
      base.
    prepared_axes: `prepared_axes(base_axes, prepared) -> axes`: logical
      axes of the prepared base (`prepared` may be abstract).
    logical_axes: `logical_axes(base_axes, adapter) -> axes` of every
      adapter leaf, for the sharding rules.
    optimizer: `optimizer(make_tx) -> tx` over the adapter, where
      `make_tx(m)` is the run's optimizer at m x its learning rate: LoRA+
      gives B `ratio` x A's rate with `optax.multi_transform`.
    after_step: `after_step(adapter, opt_state, base, step) -> (adapter,
      opt_state)`, applied inside the jitted train step after each update
      (`step` counts updates done). Base params are read-only: state a
      method accumulates lives in its adapter, frozen by its `optimizer`.
    before_update: `before_update(adapter, opt_state, grads, base, step) ->
      (adapter, opt_state, grads, metrics)`, applied inside the jitted train
      step between the (clipped, mean) gradient and the optimizer update,
      for a method that re-parameterises its adapter from the current
      gradient (ScaLoRA); `grads` must stay the gradient w.r.t. the returned
      adapter. `metrics` ({name: scalar}) join the step's metrics, which
      the run logs with the loss.
    export: `Export`: how the adapter becomes a Hugging Face PEFT folder.
  """
  init: Callable[[PRNGKey, Params], Adapter]
  apply: Callable[[Params, Adapter], tuple[Params, dict]]
  config: Any = None
  prepare_base: Callable[[Params], Params] = same_base
  prepared_axes: Callable[[Any, Any], Any] = same_axes
  logical_axes: Callable[[Any, Adapter], Any] = follow_base_axes
  optimizer: Callable[[TxFactory], optax.GradientTransformation] = (
      plain_optimizer)
  after_step: Callable[..., tuple[Adapter, Any]] = no_after_step
  export: Export = NO_EXPORT
  before_update: Callable[..., tuple[Adapter, Any, Any]] = no_before_update


def flatten(tree: Params, is_leaf: Callable[[Any], bool] | None = None
            ) -> dict[str, Any]:
  """Nested mappings -> {"a/b/c": leaf}; anything not a mapping is a leaf.

  Adapted kernels (pytree nodes) therefore stay whole leaves.
  """
  flat = {}

  def visit(prefix, node):
    if isinstance(node, Mapping) and not (is_leaf and is_leaf(node)):
      for key, value in node.items():
        visit(f'{prefix}/{key}' if prefix else str(key), value)
    else:
      flat[prefix] = node

  visit('', tree)
  return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """{"a/b/c": leaf} -> nested dicts."""
  tree = {}
  for path, value in flat.items():
    node = tree
    *parents, name = path.split('/')
    for parent in parents:
      node = node.setdefault(parent, {})
    node[name] = value
  return tree


def get(tree: Params, path: str) -> Any:
  for name in path.split('/'):
    tree = tree[name]
  return tree


def replace(tree: Params, updates: Mapping[str, Any]) -> dict[str, Any]:
  """A copy of `tree` with leaves at "/"-paths replaced; `tree` is untouched.

  Only the dicts on the replaced paths are copied; other subtrees are shared.
  """
  tree = dict(tree)
  children = {}
  for path, value in updates.items():
    head, _, rest = path.partition('/')
    if head not in tree:
      raise KeyError(f'no parameter at {path!r} (missing {head!r}).')
    if rest:
      children.setdefault(head, {})[rest] = value
    else:
      tree[head] = value
  for head, sub_updates in children.items():
    tree[head] = replace(tree[head], sub_updates)
  return tree


def as_patterns(patterns: str | Iterable[str], what: str) -> tuple[str, ...]:
  """Normalises one regex or a list of them; compiles each to fail early."""
  patterns = (patterns,) if isinstance(patterns, str) else tuple(patterns)
  if not patterns:
    raise ValueError(f'{what}: give at least one regex.')
  for pattern in patterns:
    try:
      re.compile(pattern)
    except re.error as e:
      raise ValueError(f'{what}: {pattern!r} is not a valid regex ({e}).'
                       ) from e
  return patterns


def first_match(patterns: Iterable[str], path: str) -> str | None:
  """The first pattern (in order) that fullmatches `path`, or None."""
  for pattern in patterns:
    if re.fullmatch(pattern, path):
      return pattern
  return None


def select(params: Params, patterns: Sequence[str], *, what: str,
           ndim: int | None = None) -> list[str]:
  """Sorted paths of `params` that some pattern fullmatches.

  Args:
    params: nested dict of arrays (or ShapeDtypeStructs).
    patterns: regexes over "/"-joined paths.
    what: names the caller in errors, e.g. 'lora targets'.
    ndim: when set, every matched leaf must have this many dimensions.

  Raises:
    ValueError: a pattern matches nothing (the error shows sample paths), or
      a match has the wrong number of dimensions.
  """
  flat = flatten(params)
  paths = sorted(flat)
  selected = []
  for pattern in patterns:
    hits = [p for p in paths if re.fullmatch(pattern, p)]
    if not hits:
      raise ValueError(
          f'{what} {pattern!r} matched no parameter (re.fullmatch over '
          f'"/"-joined paths); paths look like {_samples(paths)}.')
    selected.extend(h for h in hits if h not in selected)
  if ndim is not None:
    for path in selected:
      shape = tuple(getattr(flat[path], 'shape', ()))
      if len(shape) != ndim:
        raise ValueError(
            f'{what} {list(patterns)} matched {path} of shape {shape}, which '
            f'is not {ndim}-D; narrow the regex to {ndim}-D parameters.')
  return sorted(selected)


def _samples(paths: Sequence[str], count: int = 4) -> list[str]:
  if len(paths) <= count:
    return list(paths)
  step = len(paths) // count
  return [paths[i * step] for i in range(count)]


def num_params(tree: Any) -> int:
  """Number of scalars in a pytree of arrays or ShapeDtypeStructs."""
  sizes = [int(getattr(x, 'size', 1)) for x in jax.tree.leaves(tree)]
  return sum(sizes)


# ------------------------------------------------------------------- chain ---


@dataclasses.dataclass(frozen=True)
class ChainConfig:
  methods: tuple[PeftMethod, ...]


def chain(*methods: PeftMethod) -> PeftMethod:
  """Composes PEFT methods; the adapter is a tuple of their adapters.

  `apply` threads params through the methods in order and merges their
  model kwargs (two methods giving the same kwarg is an error); the hooks
  compose part by part (see `_chain_hooks`).

      method = chain(lora.lora(targets='bert'), trainable(r'classifier/.*'))
  """
  if not methods:
    raise ValueError('chain() needs at least one PEFT method.')
  for m in methods:
    if not isinstance(m, PeftMethod):
      raise ValueError(f'chain() takes PeftMethods, got {type(m).__name__}.')

  def init(rng, base):
    rngs = jax.random.split(rng, len(methods))
    return tuple(m.init(r, base) for m, r in zip(methods, rngs))

  def apply(base, adapter):
    if not isinstance(adapter, (tuple, list)) or len(adapter) != len(methods):
      raise ValueError(f'a chain of {len(methods)} methods needs a tuple of '
                       f'{len(methods)} adapters, got {type(adapter).__name__}'
                       '; build it with the same chain(...).init.')
    params, kwargs = base, {}
    for m, sub_adapter in zip(methods, adapter):
      params, kw = m.apply(params, sub_adapter)
      clash = set(kw) & set(kwargs)
      if clash:
        raise ValueError(f'two chained methods both set model kwargs '
                         f'{sorted(clash)}; chain at most one of them.')
      kwargs.update(kw)
    return params, kwargs

  return PeftMethod(init, apply, ChainConfig(tuple(methods)),
                    **_chain_hooks(methods))


def _chain_hooks(methods: Sequence[PeftMethod]) -> dict[str, Any]:
  """The hooks of a chain: the base is prepared by each method in turn, the
  adapter's axes are each part's. When some part shapes its optimizer or
  steps, each part gets its own optimizer (`per_part`) and after-step hook;
  otherwise one optimizer covers the whole tuple."""

  def prepare_base(base):
    for m in methods:
      base = m.prepare_base(base)
    return base

  def prepared_axes(base_axes, prepared):
    for m in methods:
      base_axes = m.prepared_axes(base_axes, prepared)
    return base_axes

  def logical_axes(base_axes, adapter):
    return tuple(m.logical_axes(base_axes, a)
                 for m, a in zip(methods, adapter))

  hooks = dict(prepare_base=prepare_base, prepared_axes=prepared_axes,
               logical_axes=logical_axes, export=_chain_export(methods))
  if all(m.optimizer is plain_optimizer and m.after_step is no_after_step
         and m.before_update is no_before_update for m in methods):
    return hooks

  def optimizer(make_tx):
    return per_part([m.optimizer(make_tx) for m in methods])

  def after_step(adapter, opt_state, base, step):
    pairs = [m.after_step(a, s, base, step)
             for m, a, s in zip(methods, adapter, opt_state)]
    return tuple(a for a, _ in pairs), tuple(s for _, s in pairs)

  def before_update(adapter, opt_state, grads, base, step):
    out = [m.before_update(a, s, g, base, step)
           for m, a, s, g in zip(methods, adapter, opt_state, grads)]
    metrics = {}
    for *_, part in out:
      if set(part) & set(metrics):
        raise ValueError(f'two chained methods both report metrics '
                         f'{sorted(set(part) & set(metrics))}; chain at '
                         'most one of them.')
      metrics.update(part)
    return (*(tuple(o[i] for o in out) for i in range(3)), metrics)

  return dict(hooks, optimizer=optimizer, after_step=after_step,
              before_update=before_update)


def per_part(txs: Sequence[optax.GradientTransformation]
             ) -> optax.GradientTransformation:
  """An optimizer over a tuple of adapters: `txs[i]` updates part i."""

  def init(params):
    return tuple(tx.init(p) for tx, p in zip(txs, params))

  def update(updates, state, params=None):
    params = (None,) * len(txs) if params is None else params
    out = [tx.update(u, s, p)
           for tx, u, s, p in zip(txs, updates, state, params)]
    return tuple(u for u, _ in out), tuple(s for _, s in out)

  return optax.GradientTransformation(init, update)


def _chain_export(methods: Sequence[PeftMethod]) -> Export:
  """The one chained method with a PEFT form writes the whole chain (it
  takes the other parts, e.g. `trainable` copies, as modules to save)."""
  writers = [m.export for m in methods if m.export.write is not None]
  if len(writers) == 1:
    return Export(writers[0].write,
                  any(m.export.needs_base for m in methods))
  if not writers:
    reasons = '; '.join(m.export.reason for m in methods)
    return Export(reason=f'no chained method has a PEFT form ({reasons})')
  return Export(reason=f'{len(writers)} chained methods have a PEFT form, '
                'and a PEFT folder holds one')
