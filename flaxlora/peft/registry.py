"""The one registry of PEFT methods: config names, factories, folder types.

    registry.register('lora', lora.lora, 'LORA', lora.load)
    entry = registry.get('lora')      # .factory, .arguments, .peft_type
    method = entry.factory(rank=8)
    method, adapter = registry.loader('LORA')(folder, model, base)

A run config's `peft.method` is a registered name (`flaxlora.build`);
`folders.load` reads a Hugging Face PEFT folder with the loader registered
for its `peft_type`; `describe` and the comparison list `names()`. Several
methods may write one folder type (QLoRA, NB-LoRA and ScaLoRA write LORA
folders); one method, the type's owner, registers its loader.
"""
import dataclasses
import inspect
import os
from typing import Any, Callable, Mapping

from flaxlora.peft import base as peft_base

Factory = Callable[..., peft_base.PeftMethod]
# (folder, model, base params) -> (method, adapter).
Loader = Callable[[str | os.PathLike, Any, Mapping[str, Any]],
                  tuple[peft_base.PeftMethod, Any]]


@dataclasses.dataclass(frozen=True)
class Entry:
  """A registered method.

  Attributes:
    name: what `peft.method` in a config says.
    factory: its arguments -> `PeftMethod`.
    peft_type: the Hugging Face PEFT folder type its export writes (None:
      no PEFT folder, e.g. `trainable` alone).
    loader: reads a folder of `peft_type` back (None when another method
      owns that type's loader).
  """
  name: str
  factory: Factory
  peft_type: str | None = None
  loader: Loader | None = None

  @property
  def arguments(self) -> tuple[str, ...]:
    """The factory's argument names (what a config's peft section sets)."""
    return tuple(inspect.signature(self.factory).parameters)

  def defaults(self) -> dict[str, Any]:
    """{argument: default} of the factory's arguments that have one."""
    return {k: p.default
            for k, p in inspect.signature(self.factory).parameters.items()
            if p.default is not inspect.Parameter.empty}


_ENTRIES: dict[str, Entry] = {}


def register(name: str, factory: Factory, peft_type: str | None = None,
             loader: Loader | None = None) -> Entry:
  """Registers `factory` under `name` (once); returns its entry."""
  if name in _ENTRIES:
    raise ValueError(f'peft method {name!r} is registered already (by '
                     f'{_ENTRIES[name].factory.__module__}); pick another '
                     'name.')
  if loader is not None and peft_type is None:
    raise ValueError(f'peft method {name!r}: a loader needs the peft_type '
                     'of the folders it reads.')
  if loader is not None and peft_type in _loaders():
    raise ValueError(f'peft_type {peft_type!r} already has a loader; '
                     f'register {name!r} with loader=None.')
  entry = Entry(name, factory, peft_type, loader)
  _ENTRIES[name] = entry
  return entry


def unregister(name: str) -> None:
  """Removes `name` (a test's method, once the test is done)."""
  get(name)
  del _ENTRIES[name]


def names() -> tuple[str, ...]:
  """Every registered name, sorted."""
  return tuple(sorted(_ENTRIES))


def get(name: str) -> Entry:
  """The entry of `name`; an error lists the known names."""
  if name not in _ENTRIES:
    raise ValueError(f'peft.method={name!r} is not known; use one of '
                     f'{list(names())}.')
  return _ENTRIES[name]


def _loaders() -> dict[str, Loader]:
  return {e.peft_type: e.loader for e in _ENTRIES.values()
          if e.loader is not None}


def peft_types() -> tuple[str, ...]:
  """The folder types flaxlora reads, sorted."""
  return tuple(sorted(_loaders()))


def loader(peft_type: str) -> Loader:
  """The loader of folders of `peft_type`."""
  loaders = _loaders()
  if peft_type not in loaders:
    raise ValueError(f'peft_type {peft_type!r} is not one flaxlora reads; '
                     f'it reads {list(peft_types())}.')
  return loaders[peft_type]
