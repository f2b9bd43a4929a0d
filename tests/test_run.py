"""`experiments.run` end to end: the README's offline job in a subprocess,
every other `runlocal` variant in-process (shortened), and flag errors.

The QLoRA and prompt tuning configs run here on a 2x2x2 (data, fsdp, tensor)
mesh; tests/test_qlora.py and tests/test_prompt.py run them on the default
mesh."""
import importlib
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from safetensors import numpy as st_numpy

from configs import bert_sentiment_lora
from configs import bert_squad_lora
from configs import t5_lora
from flaxlora import export
from flaxlora import trainer
from flaxlora import workdir as workdir_lib
from flaxlora.inspect import runs
from flaxlora.peft.prompt import folder as prompt_folder

REPO = pathlib.Path(__file__).resolve().parents[1]


def check_workdir(workdir: pathlib.Path, metric: str) -> dict:
  """Asserts that a finished workdir holds everything a run writes."""
  for name in ('config.json', 'metrics.jsonl', 'summary.json', 'loss.png',
               'eval.png', 'adapter/adapter.safetensors',
               'adapter/method.json', 'peft/adapter_config.json',
               'peft/adapter_model.safetensors'):
    assert (workdir / name).is_file(), name
  steps = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir()
                 if p.name.isdigit())
  summary = json.loads((workdir / 'summary.json').read_text())
  assert steps[-1] == summary['step']
  assert f'eval_{metric}' in summary and 'eval_loss' in summary
  records = workdir_lib.read_metrics(workdir)
  assert {r['split'] for r in records} == {'train', 'eval'}
  assert st_numpy.load_file(str(workdir / 'adapter/adapter.safetensors'))
  return summary


def test_cpu_devices_flag_sets_the_mesh(tmp_path):
  """--cpu_devices splits the host into that many devices; the config's
  data axis (-1) spreads over all of them (conftest's XLA flag asks for 8)."""
  result = subprocess.run(
      [sys.executable, '-m', 'experiments.run', '--cpu_devices=2',
       '--config=configs/bert_sentiment_lora.py:runlocal',
       f'--workdir={tmp_path / "bert"}'],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "mesh {'data': 2, 'fsdp': 1, 'tensor': 1} over 2 cpu devices" in (
      result.stdout), result.stdout[-2000:]


def test_readme_job_t5_runlocal(tmp_path):
  """The README's offline main job, exactly as documented."""
  workdir = tmp_path / 't5'
  result = subprocess.run(
      [sys.executable, '-m', 'experiments.run',
       '--config=configs/t5_lora.py:runlocal', f'--workdir={workdir}'],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'steps/s ETA' in result.stdout
  summary = check_workdir(workdir, 'rouge1')
  losses = [r['loss'] for r in workdir_lib.read_metrics(workdir)
            if r['split'] == 'train']
  assert losses[-1] < 0.5 * losses[0], losses  # it learns (from step 1)
  config = json.loads((workdir / 'config.json').read_text())
  assert config['model']['init']['d_model'] == 64
  assert summary['trainable_params'] < summary['base_params']


def _short(config):
  config.train.update(steps=4, eval_every=2, log_every=2, checkpoint_every=2)
  config.eval.max_examples = 16
  return config


@pytest.mark.parametrize('make, metric', [
    (lambda: bert_sentiment_lora.get_config('runlocal'), 'accuracy'),
    (lambda: bert_squad_lora.get_config('runlocal'), 'f1'),
    # ~25 s each: -m slow (T5 seq2seq runs in test_readme_job_t5_runlocal).
    pytest.param(lambda: t5_lora.get_config('task=qa,runlocal'), 'f1',
                 marks=pytest.mark.slow),
    pytest.param(lambda: t5_lora.get_config('task=classification,runlocal'),
                 'accuracy', marks=pytest.mark.slow),
], ids=['bert_sentiment', 'bert_squad', 't5_qa', 't5_classification'])
def test_runlocal_variants(tmp_path, make, metric):
  summary = trainer.train_and_evaluate(_short(make()), tmp_path)
  assert summary == check_workdir(tmp_path, metric)
  assert summary['step'] == 4
  # Rerunning a finished workdir does nothing and returns its summary.
  assert trainer.train_and_evaluate(_short(make()), tmp_path) == summary


# The runlocal models' sizes: a method never changes the base.
BASE_PARAMS = {'t5': 181312, 'bert': 22530}


@pytest.mark.parametrize('name, metric, peft_type, optimizer', [
    # 25-55 s each: -m slow (the one-device runs of these configs are in
    # test_qlora.py and test_prompt.py).
    pytest.param('t5_qlora', 'rouge1', 'LORA', 'adafactor',
                 marks=pytest.mark.slow),
    pytest.param('bert_sentiment_qlora', 'accuracy', 'LORA', 'adafactor',
                 marks=pytest.mark.slow),
    pytest.param('t5_prompt_tuning', 'rouge1', 'PROMPT_TUNING', 'adafactor',
                 marks=pytest.mark.slow),
    ('bert_sentiment_prompt', 'accuracy', 'PROMPT_TUNING', 'adamw'),
])
def test_qlora_and_prompt_runlocal_on_a_sharded_mesh(tmp_path, name, metric,
                                                      peft_type, optimizer):
  """QLoRA's NF4 base and LoRA factors, prompts, head copies and (factored)
  Adafactor state on data, fsdp and tensor axes at once."""
  config = _short(importlib.import_module(f'configs.{name}').get_config(
      'runlocal'))
  config.mesh.update(data=2, fsdp=2, tensor=2)
  config.sharding_rules.vocab = 'None'  # 259 / 67 ids: tensor=2 can't split
  config.optimizer.name = optimizer
  summary = trainer.train_and_evaluate(config, tmp_path)
  assert summary == check_workdir(tmp_path, metric)
  assert summary['step'] == 4 and summary['train_loss'] > 0
  assert summary['base_params'] == BASE_PARAMS[config.model.family]
  assert 0 < summary['trainable_params'] < summary['base_params']
  peft_config = json.loads(
      (tmp_path / 'peft' / prompt_folder.CONFIG_FILE).read_text())
  assert peft_config['peft_type'] == peft_type
  spec = json.loads((tmp_path / 'adapter' / 'method.json').read_text())
  assert spec['peft']['method'] == config.peft.method
  # flaxlora.inspect rebuilds the run (build.model_and_method, as the
  # trainer does) and places the saved adapter on the same mesh.
  loaded = runs.load_run(tmp_path)
  saved = st_numpy.load_file(str(tmp_path / 'adapter/adapter.safetensors'))
  for key, value in export.adapter_tensors(loaded.adapter).items():
    np.testing.assert_array_equal(value, saved[key])
  text = runs.inspect_run(loaded)
  assert ('prompt (' in text) == (peft_type == 'PROMPT_TUNING')
  assert '\n0 changed' not in text and ' changed, ' in text


@pytest.mark.parametrize('flag, message', [
    ('--config.train.stpes=3', 'stpes'),
    ('--config.train.steps=many', 'steps'),
    ('--config=configs/t5_lora.py:runlcoal', "unknown config variant"),
])
def test_bad_flags_fail_before_touching_the_workdir(tmp_path, flag, message):
  workdir = tmp_path / 'run'
  args = [sys.executable, '-m', 'experiments.run', f'--workdir={workdir}']
  if not flag.startswith('--config='):
    args.append('--config=configs/t5_lora.py:runlocal')
  result = subprocess.run(args + [flag], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert message in result.stderr, result.stderr[-2000:]
  assert not workdir.exists()
