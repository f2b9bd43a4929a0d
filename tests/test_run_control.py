"""Runs that continue: a lock against a second run, SIGTERM with a
checkpoint at the signal (resumed to the uninterrupted adapter bytes), a
NaN stop whose message is the command that continues it, compatible changes
that extend a finished run, and a fall-back past a broken checkpoint."""
import json
import os
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

from experiments import run as run_cli
from flaxlora import workdir as workdir_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = f'--config={REPO}/configs/bert_sentiment_lora.py:runlocal'
# Dropout on, so that the rng matters; long enough to signal mid-training.
FLAGS = [CONFIG, '--config.model.dropout=0.1', '--config.peft.dropout=0.2',
         '--config.train.steps=300', '--config.train.checkpoint_every=100',
         '--config.train.eval_every=0', '--config.train.log_every=50']
ADAPTER = 'adapter/adapter.safetensors'


def cli(*args: str) -> int:
  return run_cli.cli(['experiments.run', *args])


def _wait_for(predicate, process, what):
  deadline = time.time() + 300
  while not predicate():
    assert process.poll() is None, f'the run ended before {what}'
    assert time.time() < deadline, what
    time.sleep(0.02)


def test_lock_and_sigterm_then_resume_gives_the_same_bytes(tmp_path,
                                                           capsys):
  straight, stopped = tmp_path / 'straight', tmp_path / 'stopped'
  assert cli(*FLAGS, f'--workdir={straight}') == 0
  process = subprocess.Popen(
      [sys.executable, '-m', 'experiments.run', *FLAGS,
       f'--workdir={stopped}'], cwd=REPO, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)
  try:
    lock = stopped / workdir_lib.LOCK_FILE
    _wait_for(lock.exists, process, 'it took the lock')
    capsys.readouterr()
    assert cli(*FLAGS, f'--workdir={stopped}') == 2  # a second run
    assert f'in use by another run (pid {process.pid}' in (
        capsys.readouterr().err)
    _wait_for((stopped / 'checkpoints' / '100').exists, process,
              'its first checkpoint')
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=300)
  finally:
    process.kill()
  assert process.returncode == 128 + signal.SIGTERM, err[-2000:]
  line = [l for l in err.splitlines() if l.startswith('flaxlora: stopped')]
  assert len(line) == 1, err[-2000:]
  step = int(re.search(r'SIGTERM at step (\d+): saved a checkpoint',
                       line[0]).group(1))
  assert 100 <= step < 300 and (stopped / 'checkpoints' / str(step)).is_dir()
  assert 'resume with: python -m experiments.run' in line[0]
  assert not lock.exists() and not (stopped / 'summary.json').exists()
  capsys.readouterr()
  assert cli(*FLAGS, f'--workdir={stopped}') == 0
  assert f'resuming from step {step}' in capsys.readouterr().out
  assert (straight / ADAPTER).read_bytes() == (stopped / ADAPTER).read_bytes()


SHORT = [CONFIG, '--config.train.steps=4', '--config.train.log_every=1',
         '--config.train.checkpoint_every=2', '--config.train.eval_every=0']


def test_nan_stop_gives_the_command_that_continues(tmp_path, capsys):
  args = [*SHORT, f'--workdir={tmp_path}', '--config.optimizer.lr=1e30',
          '--config.optimizer.clip_norm=0', '--config.optimizer.warmup_steps=0',
          '--config.train.checkpoint_every=1']
  assert cli(*args) == 2
  err = capsys.readouterr().err
  message = [l for l in err.splitlines() if l.startswith('flaxlora: error')]
  assert len(message) == 1 and 'last good checkpoint is step 1' in message[0]
  command = message[0].split('lower learning rate: ')[1].split(' (or ')[0]
  argv = shlex.split(command)
  assert argv[:3] == ['python', '-m', 'experiments.run']
  assert argv[3:] == [a for a in args if 'optimizer.lr' not in a] + [
      '--config.optimizer.lr=1e+29']
  cli(*argv[3:])  # accepted: it continues from step 1 with the lower lr
  assert 'continuing at step 1 with optimizer.lr 1e+30 -> 1e+29' in (
      capsys.readouterr().out)
  changes = json.loads((tmp_path / 'config.json').read_text())['changes']
  assert changes == [{'step': 1, 'key': 'optimizer.lr', 'from': 1e30,
                      'to': 1e29}]


def test_a_finished_run_continues_with_more_steps(tmp_path, capsys):
  assert cli(*SHORT, f'--workdir={tmp_path}') == 0
  # A broken newest checkpoint: the run falls back to step 2 and says so.
  (tmp_path / 'checkpoints' / '4' / 'state' / '_METADATA').write_text('')
  assert cli(*SHORT, f'--workdir={tmp_path}', '--config.train.steps=6',
             '--config.optimizer.lr=0.005') == 0
  out, err = capsys.readouterr()
  warning = [l for l in err.splitlines() if 'warning: checkpoint' in l]
  assert len(warning) == 1 and 'step 4: ' in warning[0], err[-2000:]
  assert 'state/_METADATA: JSONDecodeError' in warning[0]
  assert 'Traceback' not in err and 'resuming from step 2' in out
  assert (tmp_path / 'checkpoints' / '4.unreadable').is_dir()
  summary = json.loads((tmp_path / 'summary.json').read_text())
  assert summary['step'] == 6
  changes = json.loads((tmp_path / 'config.json').read_text())['changes']
  assert {(c['key'], c['step']) for c in changes} == {
      ('optimizer.lr', 2), ('train.steps', 2)}
  steps = [r['step'] for r in workdir_lib.read_metrics(tmp_path)
           if r['split'] == 'train']
  assert steps == [1, 2, 3, 4, 5, 6]
  shutil.rmtree(tmp_path / 'checkpoints')  # keep the tmp folder small


@pytest.mark.slow
def test_many_steps_between_logs_on_eight_host_devices(tmp_path):
  # XLA:CPU collectives abort the process when ~100 steps over 8 host
  # devices are queued unsynced (trainer.STEPS_IN_FLIGHT bounds the queue).
  env = {**os.environ,
         'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
  result = subprocess.run(
      [sys.executable, '-m', 'experiments.run',
       f'--config={REPO}/configs/t5_lora.py:runlocal',
       f'--workdir={tmp_path}', '--config.train.steps=300',
       '--config.train.log_every=1000', '--config.train.eval_every=0',
       '--config.train.checkpoint_every=0'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "mesh {'data': 8" in result.stdout
  assert 'flaxlora: done, step 300' in result.stdout
