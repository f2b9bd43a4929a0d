"""The PEFT method protocol, path selection, `chain` and `trainable`.

A PEFT method is a pair of pure functions (optax's shape):

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
import re
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp

Params = Mapping[str, Any]
Adapter = Any
PRNGKey = jax.Array


class PeftMethod(NamedTuple):
  """A PEFT method: `init(rng, base) -> adapter`, `apply(base, adapter)`.

  Attributes:
    init: builds the adapter (the trainable state) from base params; pure, so
      it also runs on abstract params under `jax.eval_shape`.
    apply: `(base, adapter) -> (params, kwargs)`: params for the model and
      extra keyword arguments for `model.apply` ({} for LoRA).
    config: the method's hyperparameters (a frozen dataclass) for `describe`
      and checkpoint export; None for ad hoc methods.
  """
  init: Callable[[PRNGKey, Params], Adapter]
  apply: Callable[[Params, Adapter], tuple[Params, dict]]
  config: Any = None


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
  model kwargs (two methods giving the same kwarg is an error).

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

  return PeftMethod(init, apply, ChainConfig(tuple(methods)))


def configs(method: PeftMethod) -> list[Any]:
  """The configs of `method`, with chains flattened, in order."""
  if isinstance(method.config, ChainConfig):
    return [c for m in method.config.methods for c in configs(m)]
  return [method.config]


# --------------------------------------------------------------- trainable ---


@dataclasses.dataclass(frozen=True)
class TrainableConfig:
  patterns: tuple[str, ...]


def trainable(patterns: str | Iterable[str]) -> PeftMethod:
  """Fully trained copies of selected params ("modules to save").

  The adapter holds fp32 copies of the matched leaves (e.g. a classifier head
  or biases); `apply` swaps them in. Base params stay untouched.

  Args:
    patterns: regexes over "/"-joined param paths, e.g. r'classifier/.*'.
  """
  patterns = as_patterns(patterns, 'trainable patterns')

  def init(rng, base):
    del rng  # copies, not fresh values
    paths = select(base, patterns, what='trainable patterns')
    # A real copy: a donated adapter buffer must never alias the base.
    return unflatten({p: jnp.array(get(base, p), jnp.float32, copy=True)
                      for p in paths})

  def apply(base, adapter):
    updates = flatten(adapter)
    for path in updates:
      current = get(base, path)
      if hasattr(current, 'needs_rng'):  # an adapted kernel
        raise ValueError(
            f'trainable({list(patterns)}) would replace {path}, which an '
            'earlier chained method already adapted; exclude it from one of '
            'the two.')
    return replace(base, updates), {}

  return PeftMethod(init, apply, TrainableConfig(patterns))
