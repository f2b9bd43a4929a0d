"""Prefix tuning's factory and folder loader.

    method = prefix.prefix_tuning(num_tokens=20, projection=True)
    method, adapter = prefix.load('path/to/peft', model)
"""
import os
from typing import Any, Mapping

from flaxlora.peft import base as peft_base
from flaxlora.peft import trainable
from flaxlora.peft.prefix import core
from flaxlora.peft.prefix import folder as prefix_folder


def _write_peft(folder, model, base, adapter, method, **kwargs):
  del base  # a PREFIX_TUNING folder holds the table (and head copies) only
  return prefix_folder.save_prefix(folder, model, adapter, method, **kwargs)


EXPORT = peft_base.Export(_write_peft, needs_base=False)


def prefix_tuning(num_tokens: int = 20, projection: bool = False,
                  hidden: int = 0, init: str = 'random'
                  ) -> peft_base.PeftMethod:
  """Trained key/value prefixes for every self-attention layer.

  Args:
    num_tokens: P, the prefix length.
    projection: reparameterise through a two-layer tanh MLP while training
      (PEFT's prefix_projection; Li & Liang's choice).
    hidden: the MLP's hidden size (PEFT's encoder_hidden_size); 0 takes the
      key width W.
    init: 'random' or 'zero' (see `core.PrefixConfig`).

  Returns:
    PeftMethod; adapter {'prefix': [P, 2LW]} or, with projection,
    {'embedding': [P, W], 'w1': [W, E], 'b1': [E], 'w2': [E, 2LW],
    'b2': [2LW]}; apply -> (base, {'prefix_kv': ...}).
  """
  config = core.make_config(num_tokens, projection, hidden, init)

  def init_fn(rng, base):
    return core.init(config, rng, base)

  def apply_fn(base, adapter):
    return base, core.apply(config, base, adapter)

  return peft_base.PeftMethod(init_fn, apply_fn, config,
                              logical_axes=core.adapter_logical_axes,
                              export=EXPORT)


def load(folder: str | os.PathLike, model: Any,
         base: Mapping[str, Any] | None = None
         ) -> tuple[peft_base.PeftMethod, Any]:
  """(method, adapter) of a PEFT PREFIX_TUNING folder (written by PEFT or
  `folder.save_prefix`) for `model`: prefix_tuning(P) with adapter
  {'prefix': table}, chained with `trainable` when the folder holds modules
  to save. `base` is not read."""
  del base
  kwargs, adapter, copies = prefix_folder.read_prefix(folder, model)
  return trainable.with_copies(prefix_tuning(**kwargs), adapter, copies)
