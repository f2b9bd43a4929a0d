"""A method's parts with chains flattened: its configs, (config, adapter)
pairs, JSON records of its hyperparameters and the count of what it trains
(what summary.json keeps)."""
import dataclasses
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flaxlora.peft import base as peft_base
from flaxlora.peft import trainable


def config_dicts(method: peft_base.PeftMethod) -> list[dict[str, Any]]:
  """JSON-able records of the method's hyperparameters, chains flattened:
  [{'type': 'LoraConfig', 'rank': 8, ..., 'loraplus_ratio': 4.0}, ...]."""
  out = []
  for config in configs(method):
    if dataclasses.is_dataclass(config):
      # asdict recurses: ScaLoRA's nested LoraConfig is a record too.
      out.append({'type': type(config).__name__,
                  **dataclasses.asdict(config)})
    else:
      out.append({'type': type(config).__name__})
  return json.loads(json.dumps(out, default=str))  # tuples -> lists


def parts(method: peft_base.PeftMethod, adapter: Any) -> list[tuple[Any, Any]]:
  """[(config, sub_adapter)] of a method, with chains flattened."""
  if isinstance(method.config, peft_base.ChainConfig):
    return [p for m, a in zip(method.config.methods, adapter)
            for p in parts(m, a)]
  return [(method.config, adapter)]


def configs(method: peft_base.PeftMethod) -> list[Any]:
  """The configs of `method`, with chains flattened, in order."""
  if isinstance(method.config, peft_base.ChainConfig):
    return [c for m in method.config.methods for c in configs(m)]
  return [method.config]


def one_with_copies(method: peft_base.PeftMethod, adapter: Any,
                    config_type: type, writer: str, factory: str
                    ) -> tuple[Any, Any, dict[str, Any]]:
  """(config, adapter, {path: trained copy}) of a method made of exactly one
  `config_type` part plus `trainable` copies: what a PEFT folder of one
  type holds. `writer` and `factory` name the caller and the method in
  errors, e.g. ('save_ia3', 'ia3()')."""
  found, copies = [], {}
  for config, sub in parts(method, adapter):
    if isinstance(config, config_type):
      found.append((config, sub))
    elif isinstance(config, trainable.TrainableConfig):
      copies.update(peft_base.flatten(sub))
    else:
      raise ValueError(f'{writer} writes {factory} (+ trainable copies) '
                       f'only; {type(config).__name__} has no such PEFT '
                       'form.')
  if len(found) != 1:
    raise ValueError(f'{writer} needs exactly one {factory} in the method, '
                     f'found {len(found)}.')
  return found[0][0], found[0][1], copies


def trained_mask(method: peft_base.PeftMethod, adapter: Any) -> Any:
  """True for each leaf of `adapter` that the method's optimizer moves.

  A leaf the method's `optimizer` hook freezes (ScaLoRA's accumulated update,
  state rather than parameters) is False. `adapter` may hold arrays or
  ShapeDtypeStructs: the hook runs on one-element stand-ins of each leaf
  (the hooks label leaves by their place in the tree, not their values), and
  a leaf is moved when a unit gradient gives it a non-zero SGD update.
  """
  stand_in = jax.tree.map(lambda x: jnp.ones((1,) * len(x.shape)), adapter)
  tx = method.optimizer(lambda multiplier: optax.sgd(multiplier))
  updates, _ = tx.update(stand_in, tx.init(stand_in), stand_in)
  return jax.tree.map(lambda u: bool(np.any(np.asarray(u) != 0)), updates)


def trained_params(method: peft_base.PeftMethod, adapter: Any) -> int:
  """Scalars of `adapter` that the method's optimizer moves (`trained_mask`)."""
  moved = jax.tree.leaves(trained_mask(method, adapter))
  return sum(int(np.prod(x.shape)) for x, m in
             zip(jax.tree.leaves(adapter), moved) if m)
