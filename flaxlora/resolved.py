"""What a run is, decided once from its config at the entry.

    r = resolved.resolve(config)       # run_setup.setup, evaluation, plan...
    tokenizer = build.tokenizer(r)
    data = task_data.load(config, tokenizer, files=r.files)
    built = build.model_and_method(r, tokenizer)
    summary['resolved'] = r.record()   # summary.json

`resolve` locates `config.model.path` (a folder, a 'pkg:' path, a GGUF file
or a hub id, fetched or found in the cache; '' builds `config.model.init`)
and reads its config.json once, checks the family against it, settles the
PEFT method's arguments, the compute and base dtypes, the mesh and the
sharding rules, and checks the data files the run reads (`files`).
`flaxlora.build` and `task_data.load` take the `Resolved` (its files) and
never resolve a path or read config.json themselves, so what a run does is
decided here and recorded from here (`record`): the path as the config
gives it (never the machine's absolute folder), where it was found, the
family, method, dtypes, mesh and data.
"""
import dataclasses
import pathlib
import types
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from flaxlora import build
from flaxlora import errors
from flaxlora import models
from flaxlora import sharding
from flaxlora.data import task_data
from flaxlora.models import gguf

# Where `model.path` was found ('init': built from `model.init`).
SOURCES = ('init', 'folder', 'package', 'gguf', 'hub')


@dataclasses.dataclass(frozen=True, eq=False)
class Resolved:
  """A run's config with its paths, family, method and mesh resolved
  (its mappings read-only).

  Attributes:
    config: the ml-collections config it was resolved from.
    model_path: `model.path` as the config gives it ('' for `model.init`).
    source: one of SOURCES.
    local: the folder or GGUF file `model_path` resolved to (None for
      `model.init`).
    spec: the checkpoint's config.json dict (read once), or `model.init`'s
      fields with the family's `model_type`.
    family: the model family's name (a key of `models.FAMILIES`).
    tokenizer: 'bytes', 'words', or the folder, GGUF file or hub id to load
      (`local` when the tokenizer is the model's own; '' when there is none:
      `build.tokenizer` refuses it).
    method: the PEFT method's registry name.
    peft: its arguments (`build.peft_arguments`).
    dtype: the model's compute dtype (`build.compute_dtype`).
    base_dtype: the dtype the frozen base is stored in.
    mesh: the device mesh.
    rules: the logical -> mesh axis rules.
    data: the data source and the files or hub dataset it reads, as given.
    files: the data files it reads, checked (`task_data.data_files`: by
      field, 'train_file', 'eval_file'), for `task_data.load(..., files=)`.
  """
  config: Any
  model_path: str
  source: str
  local: pathlib.Path | None
  spec: Mapping[str, Any]
  family: str
  tokenizer: str
  method: str
  peft: Mapping[str, Any]
  dtype: Any
  base_dtype: Any
  mesh: jax.sharding.Mesh
  rules: sharding.Rules
  data: Mapping[str, Any]
  files: Mapping[str, pathlib.Path]

  def record(self) -> dict[str, Any]:
    """The resolved facts for summary.json (JSON; paths as given)."""
    out = {'model_path': self.model_path or 'model.init',
           'source': self.source, 'model_type': self.spec.get('model_type'),
           'family': self.family, 'method': self.method,
           'tokenizer': self.config.tokenizer or self.model_path,
           'dtype': jnp.dtype(self.dtype).name,
           'base_dtype': jnp.dtype(self.base_dtype).name,
           'mesh': {k: int(v) for k, v in self.mesh.shape.items()},
           'data': dict(self.data)}
    if self.source == 'hub':  # the hub cache's snapshots/<commit> folder
      out['revision'] = self.local.name
    return out


def checkpoint(path: str, flag: str = '--config.model.path'
               ) -> tuple[str, pathlib.Path, dict[str, Any]]:
  """(source, local folder or GGUF file, config.json dict) of the
  checkpoint `path` (see SOURCES); a failure is one errors.UserError
  line naming `flag` (where the path came from) and the fix."""
  try:
    local, spec = models.locate(path)
  except (OSError, ValueError) as e:
    why = ' '.join(str(e).split())
    raise errors.UserError(
        f'{flag}={path!r}: {why} Set {flag} to a checkpoint folder, a '
        "'pkg:' path, a .gguf file or a hub id.") from None
  if path.startswith('pkg:'):
    source = 'package'
  elif gguf.is_gguf(local):
    source = 'gguf'
  elif pathlib.Path(path).expanduser().is_dir():
    source = 'folder'
  else:
    source = 'hub'
  return source, local, spec


def _init_spec(m: Any, family: Any) -> dict[str, Any]:
  if not m.init:
    raise errors.UserError('model.path is empty and model.init gives no '
                           'config; set one of them.')
  spec = dict(m.init.to_dict() if hasattr(m.init, 'to_dict') else m.init)
  spec.setdefault('model_type', family.MODEL_TYPES[0])
  return spec


def _tokenizer(config: Any, local: pathlib.Path | None) -> str:
  name = config.tokenizer
  if name in ('bytes', 'words'):
    return name
  if not name or name == config.model.path:
    return '' if local is None else str(local)
  return build.resolve_path(name, 'tokenizer')


def _data(d: Any) -> dict[str, Any]:
  if d.source == 'files':
    held_out = int(d.get('eval_from_train', 0))
    return {'source': 'files', 'train_file': d.train_file,
            **({'eval_from_train': held_out} if held_out else
               {'eval_file': d.eval_file})}
  if d.source == 'hub':
    return {'source': 'hub', 'hub_name': d.hub_name}
  return {'source': d.source}


def resolve(config: Any, *, devices: Sequence[jax.Device] | None = None,
            mesh: jax.sharding.Mesh | None = None,
            reads: Sequence[str] = task_data.READS) -> Resolved:
  """The run `config` describes, resolved (see the module docstring).

  Args:
    config: the run's ml-collections config.
    devices: the mesh's devices (default all); unused with `mesh`.
    mesh: a mesh made elsewhere (a rebuilt run's fallback mesh).
    reads: the data the run reads, of `task_data.READS` (('eval',) for
      evaluation, () for the tools that read none); their files are
      checked first, so a missing one fails before anything else.
  """
  files = task_data.data_files(config, reads)
  m = config.model
  if m.family not in models.FAMILIES:
    raise errors.UserError(f'model.family={m.family!r}: use one of '
                           f'{sorted(models.FAMILIES)}.')
  family = models.FAMILIES[m.family]
  if m.path:
    source, local, spec = checkpoint(m.path)
    found = models.family_of(spec, models.config_source(local))
    if found is not family:
      raise errors.UserError(
          f'model.path={m.path!r} holds a {spec.get("model_type")!r} model, '
          f'not model.family={m.family!r}; fix model.family.')
  else:
    source, local, spec = 'init', None, _init_spec(m, family)
  frozen = types.MappingProxyType
  return Resolved(
      config=config, model_path=m.path, source=source, local=local,
      spec=frozen(spec), family=m.family,
      tokenizer=_tokenizer(config, local), method=config.peft.method,
      peft=frozen(build.peft_arguments(config.peft, m.family)),
      dtype=build.compute_dtype(m.dtype), base_dtype=build.base_dtype(config),
      mesh=mesh if mesh is not None else sharding.make_mesh(config.mesh,
                                                            devices),
      rules=sharding.resolve_rules(config.get('sharding_rules', None)),
      data=frozen(_data(config.data)), files=frozen(files))
