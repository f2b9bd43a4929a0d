"""flaxlora.inspect.probe: the frozen vectors and the linear probe; the
experiments.probe_pooling script over a config."""
import pathlib
import re
import subprocess
import sys

import helpers
import numpy as np

from flaxlora import models
from flaxlora.inspect import probe

REPO = pathlib.Path(__file__).resolve().parents[1]


def _probe_pooling(config):
  return subprocess.run(
      [sys.executable, '-m', 'experiments.probe_pooling', f'--config={config}',
       '--num_train=64'], cwd=REPO, capture_output=True, text=True)


def test_features_are_the_pooled_vectors(tmp_path):
  folder, _ = helpers.save_tiny_bert(tmp_path / 'bert')
  model, params, _ = models.load(folder)
  ids, mask, token_types = helpers.batch()
  del token_types
  rows = [row[m == 1] for row, m in zip(ids, mask)]  # unpadded, any length
  got = probe.features(model, params, rows)
  hidden, pooled = model.apply({'params': params}, ids, mask)
  weights = mask[..., None]
  want = {'cls': hidden[:, 0], 'pooler': pooled,
          'mean': (np.asarray(hidden) * weights).sum(1) / weights.sum(1)}
  for name, value in want.items():
    assert helpers.max_diff(got[name], value) < 1e-5, name
  assert helpers.max_diff(got['mean'], got['cls']) > 1e-3


def test_probe_reads_a_linear_signal_and_not_noise():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(400, 16)).astype(np.float32)  # [N, H]
  labels = (x[:, 3] - x[:, 7] > 0).astype(np.int32)
  assert probe.accuracy(x[:300], labels[:300], x[300:], labels[300:],
                        l2=1e-3) > 0.95
  noise = rng.permutation(labels)
  assert probe.accuracy(x[:300], noise[:300], x[300:], noise[300:],
                        l2=1e-3) < 0.7


def test_script_prints_one_accuracy_per_vector_and_refuses_t5():
  done = _probe_pooling('configs/bert_sentiment_lora.py:runlocal')
  assert done.returncode == 0, done.stderr
  found = dict(re.findall(r'^  (\w+) +eval accuracy (\d\.\d{4})$',
                          done.stdout, re.M))
  assert sorted(found) == ['cls', 'mean', 'pooler'], done.stdout
  assert all(0.0 <= float(v) <= 1.0 for v in found.values())
  assert '64 train' in done.stdout
  refused = _probe_pooling('configs/t5_lora.py:runlocal')
  assert refused.returncode == 2
  assert refused.stderr.startswith("flaxlora: error: --config: model.family="
                                   "'t5'"), refused.stderr
  assert refused.stderr.count('\n') == 1
