"""A method's parts with chains flattened: its configs, (config, adapter)
pairs, and JSON records of its hyperparameters (what summary.json keeps)."""
import dataclasses
import json
from typing import Any

from flaxlora.peft import base as peft_base


def config_dicts(method: peft_base.PeftMethod) -> list[dict[str, Any]]:
  """JSON-able records of the method's hyperparameters, chains flattened:
  [{'type': 'LoraConfig', 'rank': 8, ..., 'loraplus_ratio': 4.0}, ...]."""
  out = []
  for config in configs(method):
    if dataclasses.is_dataclass(config):
      fields = {f.name: getattr(config, f.name)
                for f in dataclasses.fields(config)}
      out.append({'type': type(config).__name__, **fields})
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
