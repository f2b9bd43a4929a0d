"""Checkpoint folder I/O: each kind of bad input gives one clear error."""
import json
import pathlib
import time

import helpers
import jax
import numpy as np
import pytest
from safetensors import numpy as st_numpy
from safetensors import torch as st_torch

from flaxlora import models
from flaxlora.models import hf_io


@pytest.fixture(scope='module')
def good(tmp_path_factory):
  """A tiny BertModel checkpoint: (folder, its tensors)."""
  folder, _ = helpers.save_tiny_bert(tmp_path_factory.mktemp('ckpt') / 'bert')
  return folder, st_numpy.load_file(str(folder / hf_io.WEIGHTS_FILE))


def _copy(good, tmp_path, tensors=None, config=None):
  """A copy of the good folder with replaced tensors and/or config text."""
  folder, good_tensors = good
  out = tmp_path / 'copy'
  out.mkdir()
  (out / hf_io.CONFIG_FILE).write_text(
      config if config is not None else
      (folder / hf_io.CONFIG_FILE).read_text())
  st_numpy.save_file(good_tensors if tensors is None else tensors,
                     str(out / hf_io.WEIGHTS_FILE))
  return out


def test_missing_folder(tmp_path):
  missing = tmp_path / 'nope'
  with pytest.raises(FileNotFoundError, match='does not exist') as e:
    models.load(missing)
  assert str(missing) in str(e.value)


def test_missing_config(good, tmp_path):
  folder = _copy(good, tmp_path)
  (folder / hf_io.CONFIG_FILE).unlink()
  with pytest.raises(FileNotFoundError, match='config.json is missing'):
    models.load(folder)


def test_other_model_type(good, tmp_path):
  config = json.loads((good[0] / hf_io.CONFIG_FILE).read_text())
  config['model_type'] = 'mamba'
  folder = _copy(good, tmp_path, config=json.dumps(config))
  with pytest.raises(ValueError, match=r"config.json: model_type 'mamba' is "
                     'not supported'):
    models.load(folder)


def test_no_model_type(good, tmp_path):
  folder = _copy(good, tmp_path, config='{"hidden_size": 32}')
  with pytest.raises(ValueError, match='has no "model_type"'):
    models.load(folder)


def test_malformed_config_names_line(good, tmp_path):
  text = '{\n  "model_type": "bert",\n  "hidden_size": 32,,\n}\n'
  folder = _copy(good, tmp_path, config=text)
  with pytest.raises(ValueError, match=r'config.json, line 3: not valid JSON'):
    models.load(folder)


def test_wrong_shape_names_tensor(good, tmp_path):
  tensors = dict(good[1])
  name = 'encoder.layer.1.intermediate.dense.weight'
  tensors[name] = np.zeros((36, 32), np.float32)
  folder = _copy(good, tmp_path, tensors)
  with pytest.raises(ValueError, match=rf"tensor '{name}' has shape \(36, 32\)"
                     r'.*needs \(32, 37\)'):
    models.load(folder)


def test_missing_tensor_named(good, tmp_path):
  tensors = dict(good[1])
  del tensors['encoder.layer.0.attention.self.key.bias']
  folder = _copy(good, tmp_path, tensors)
  with pytest.raises(ValueError, match=r"missing tensors \['encoder.layer.0."
                     r"attention.self.key.bias'\]"):
    models.load(folder)


def test_extra_tensor_named(good, tmp_path):
  tensors = dict(good[1], **{'encoder.layer.0.extra.weight':
                             np.ones((2,), np.float32)})
  folder = _copy(good, tmp_path, tensors)
  with pytest.raises(ValueError, match=r"not used by the model: \['encoder."
                     r"layer.0.extra.weight'\]"):
    models.load(folder)


def test_pickle_only_folder_is_refused(good, tmp_path):
  folder = _copy(good, tmp_path)
  (folder / hf_io.WEIGHTS_FILE).unlink()
  # Never a real pickle: flaxlora must refuse before opening it.
  (folder / 'pytorch_model.bin').write_bytes(b'not read')
  with pytest.raises(FileNotFoundError, match='never reads pickle') as e:
    models.load(folder)
  assert 'safe_serialization=True' in str(e.value)


def test_corrupt_safetensors_names_file(good, tmp_path):
  folder = _copy(good, tmp_path)
  (folder / hf_io.WEIGHTS_FILE).write_bytes(b'\x10\x00' * 5)
  with pytest.raises(ValueError, match='model.safetensors: not a readable'):
    models.load(folder)


def test_unknown_hub_id_offline_fails_fast(monkeypatch):
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  start = time.monotonic()
  with pytest.raises(OSError, match='pass the local folder') as e:
    hf_io.resolve('flaxlora-test/no-such-model')
  assert time.monotonic() - start < 10
  assert 'flaxlora-test/no-such-model' in str(e.value)


def test_sharded_index_loads_like_single_file(good, tmp_path):
  folder, tensors = good
  sharded = tmp_path / 'sharded'
  sharded.mkdir()
  (sharded / hf_io.CONFIG_FILE).write_text(
      (folder / hf_io.CONFIG_FILE).read_text())
  names = sorted(tensors)
  shards = {'model-00001-of-00002.safetensors': names[::2],
            'model-00002-of-00002.safetensors': names[1::2]}
  for file, part in shards.items():
    st_numpy.save_file({k: tensors[k] for k in part}, str(sharded / file))
  index = {'metadata': {}, 'weight_map': {k: file for file, part in
                                          shards.items() for k in part}}
  (sharded / hf_io.WEIGHTS_INDEX_FILE).write_text(json.dumps(index))
  _, want, _ = models.load(folder)
  _, got, _ = models.load(sharded)
  jax.tree.map(np.testing.assert_array_equal, got, want)
  (sharded / 'model-00002-of-00002.safetensors').unlink()
  with pytest.raises(FileNotFoundError, match='model-00002-of-00002'):
    models.load(sharded)


def test_bf16_checkpoint(good, tmp_path):
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  tensors = {k: torch.from_numpy(v).to(torch.bfloat16) if v.dtype ==
             np.float32 else torch.from_numpy(v) for k, v in good[1].items()}
  folder = _copy(good, tmp_path)
  st_torch.save_file(tensors, str(folder / hf_io.WEIGHTS_FILE))
  read = hf_io.read_tensors(folder)
  name = 'embeddings.word_embeddings.weight'
  assert read[name].dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(read[name].astype(np.float32),
                                tensors[name].float().numpy())
  _, params, _ = models.load(folder)
  word = params['embeddings']['word']['embedding']
  assert 0 < helpers.max_diff(word, good[1][name]) < 1e-2


def _files(folder: pathlib.Path) -> dict[str, bytes]:
  return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_write_folder_is_atomic(tmp_path, monkeypatch):
  out = tmp_path / 'out'
  tensors = {'w': np.arange(6, dtype=np.float32).reshape(2, 3)}
  hf_io.write_folder(out, {'model_type': 'bert'}, tensors)
  before = _files(out)
  assert set(before) == {hf_io.CONFIG_FILE, hf_io.WEIGHTS_FILE}

  def fail_midway(tensor_dict, filename, metadata=None):
    pathlib.Path(filename).write_bytes(b'half a file')
    raise OSError('disk full')

  with monkeypatch.context() as patch:
    patch.setattr(hf_io.st_numpy, 'save_file', fail_midway)
    with pytest.raises(OSError, match='disk full'):
      hf_io.write_folder(out, {'model_type': 'other'}, {'w': tensors['w'] + 1})
  assert _files(out) == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ['out']  # no debris

  # A failure while swapping the new folder in also keeps the old one.
  rename = pathlib.Path.rename

  def fail_staging_rename(self, target):
    if self.name.startswith('.out.') and not self.name.endswith('.old'):
      raise OSError('rename failed')
    return rename(self, target)

  with monkeypatch.context() as patch:
    patch.setattr(pathlib.Path, 'rename', fail_staging_rename)
    with pytest.raises(OSError, match='rename failed'):
      hf_io.write_folder(out, {'model_type': 'other'}, tensors)
  assert _files(out) == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ['out']

  # And a successful write does replace the content.
  hf_io.write_folder(out, {'model_type': 'other'}, {'w': tensors['w'] + 1})
  assert json.loads((out / hf_io.CONFIG_FILE).read_text()) == {
      'model_type': 'other'}
  np.testing.assert_array_equal(
      hf_io.read_tensors(out)['w'], tensors['w'] + 1)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['out']
