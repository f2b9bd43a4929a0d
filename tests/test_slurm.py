"""Sweeps on a real single-node Slurm (`slurm_cluster`): a runlocal sweep as
one job array gives the results of --launch=local, a task requeued mid-run
resumes from its checkpoint and ends bitwise equal, a task warned of its
time limit (SIGUSR1) requeues itself and finishes, a failed point is
reported with its error line while the others finish, `experiments.compare`
reads the sweep, and a 2-task `srun` run (two processes, data parallel)
equals one process. Without Slurm these
skip with the reason (they fail under CI=true). Each runs several runlocal
processes on the 2-CPU node (minutes on 2 cores): all are `slow`, and
`.ci/run` runs them."""
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

import slurm_cluster
from flaxlora import sweeps

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = '''
"""Runlocal seeds; seed 0 runs long enough to be requeued mid-run; the
'with_failure' variant adds a point that fails (batch size 0) and one that
gets the time-limit warning mid-run."""
from configs import bert_sentiment_lora


def get_config(arg=None):
  c = bert_sentiment_lora.get_config('runlocal')
  c.train.update(steps=4, eval_every=0, log_every=1, checkpoint_every=0)
  c.data.generated.update(num_train=64, num_eval=16)
  return c


def get_sweep(arg=None):
  points = [{'train.seed': 0, 'train.steps': 150}, {'train.seed': 1},
            {'train.seed': 2}]
  if arg == 'with_failure':
    points += [{'train.seed': 3, 'train.batch_size': 0},
               {'train.seed': 4, 'train.steps': 150}]
  return points
'''
pytestmark = pytest.mark.slow
# Keys of summary.json that depend on when and where the run ran.
_CIRCUMSTANCES = ('seconds', 'seconds_from', 'date', 'hardware', 'commit',
                  'dirty')


@pytest.fixture(scope='module')
def cluster(tmp_path_factory):
  reason = slurm_cluster.missing()
  if reason:
    if os.environ.get('CI') == 'true':
      pytest.fail(f'CI must run the Slurm tests: {reason}')
    pytest.skip(reason)
  started = slurm_cluster.start(tmp_path_factory.mktemp('slurm'))
  yield started
  started.stop()


def _env(cluster, **more):
  """The jobs' environment: one CPU device per process unless `more`
  says otherwise."""
  return dict(cluster.env, PYTHONPATH=str(REPO), JAX_PLATFORMS='cpu',
              XLA_FLAGS='--xla_force_host_platform_device_count=1', **more)


def _sweep(env, *args, ok=True):
  result = subprocess.run([sys.executable, '-m', 'experiments.sweep', *args],
                          cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
  assert (result.returncode == 0) == ok, result.stderr[-3000:]
  return result.stdout


def _wait(env, config, root, timeout=900):
  """Polls --status until no point is queued, running or requeued."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    status = _sweep(env, f'--config={config}', f'--workdir={root}',
                    '--status')
    states = [line.split()[1] for line in status.splitlines()[1:-1]]
    if not {'queued', 'running', 'requeued'} & set(states):
      return status
    time.sleep(3)
  raise AssertionError(f'the sweep did not end in {timeout}s:\n{status}')


def _run_array(cluster, tmp):
  """Runs the 5-point array (one point requeued mid-run, one failing, one warned
  of its time limit mid-run) and the same config's 3 points with
  --launch=local; returns (config file, slurm root, local root, the final
  --status output, (the requeue's process, the step it saw))."""
  config = tmp / 'sweep_config.py'
  config.write_text(CONFIG)
  root, local = tmp / 'slurm_root', tmp / 'local_root'
  env = _env(cluster)
  out = _sweep(env, f'--config={config}:with_failure', f'--workdir={root}',
               '--launch=slurm', '--slurm.max_parallel=2')
  assert 'submitted job array' in out
  job = json.loads((root / 'slurm/jobs.json').read_text())[-1]
  _started(root / job['points'][0])
  requeue = subprocess.run(['scontrol', 'requeue', f'{job["job"]}_0'],
                           env=env, capture_output=True, text=True,
                           check=True)
  stopped_at = max(r['step'] for r in
                   _records(root / job['points'][0] / 'metrics.jsonl'))
  local_run = subprocess.Popen(
      [sys.executable, '-m', 'experiments.sweep', f'--config={config}',
       f'--workdir={local}'], cwd=REPO, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True)
  # What Slurm sends signal_seconds before the time limit, to the steps.
  _started(root / job['points'][4])
  subprocess.run(['scancel', '--signal=USR1', f'{job["job"]}_4'], env=env,
                 check=True)
  status = _wait(env, f'{config}:with_failure', root)
  log = local_run.communicate(timeout=600)[0]
  assert local_run.returncode == 0, log[-3000:]
  return config, root, local, status, (requeue, stopped_at)


def _started(workdir, timeout=600):
  """Waits until the run in `workdir` logged a train step."""
  deadline = time.time() + timeout
  while not any(r['split'] == 'train' for r in
                _records(workdir / 'metrics.jsonl')):
    assert time.time() < deadline, f'{workdir.name} never started'
    time.sleep(0.05)


def _records(path):
  try:
    lines = path.read_text().splitlines()
  except FileNotFoundError:
    return []
  out = []
  for line in lines:
    try:
      out.append(json.loads(line))
    except json.JSONDecodeError:
      break
  return out


def _good_points(config, root):
  return [p for p in sweeps.plan(sweeps.load_module(str(config)).get_config(),
                                 str(config), root)]


def _check_local_results(array):
  config, root, local, status, _ = array
  print(status)  # the report's --status view
  for point in _good_points(config, root):
    there = json.loads((point.workdir / 'summary.json').read_text())
    here = json.loads((local / point.name / 'summary.json').read_text())
    for key in _CIRCUMSTANCES:
      there.pop(key, None)
      here.pop(key, None)
    assert there == here, point.name
    assert 'eval_accuracy' in there and 'train_loss' in there
    assert (point.workdir / 'adapter/adapter.safetensors').read_bytes() == (
        local / point.name / 'adapter/adapter.safetensors').read_bytes()
  assert status.splitlines()[-1] == '4 done, 1 failed'
  # One array, the %N limit asked for.
  script = (root / 'slurm/submit_0.sbatch').read_text()
  assert '#SBATCH --array=0-4%2' in script and '#SBATCH --requeue' in script


def _check_requeued_task_resumed_bitwise(array):
  config, root, local, status, (requeue, stopped_at) = array
  point = _good_points(config, root)[0]
  log = sweeps.log_path(root, point.name).read_text()
  print(f'$ {" ".join(requeue.args)}\n{requeue.stdout}{log}')  # the report
  assert 'restart 0 on' in log and 'restart 1 on' in log
  stop = [line for line in log.splitlines()
          if line.startswith('flaxlora: stopped: SIGTERM at step')]
  assert len(stop) == 1, log[-3000:]
  step = int(stop[0].split('at step ')[1].split(':')[0])
  assert stopped_at <= step < 150  # stopped mid-run, resumed from there
  summary = json.loads((point.workdir / 'summary.json').read_text())
  assert summary['seconds_from'] == step and summary['step'] == 150
  # The resumed run ends exactly as the uninterrupted local one.
  assert (point.workdir / 'adapter/adapter.safetensors').read_bytes() == (
      local / point.name / 'adapter/adapter.safetensors').read_bytes()
  assert point.name in status and 'done' in status.split(point.name)[1]


def _check_failed_point_reported(array):
  _, root, _, status, _ = array
  failed = [line for line in status.splitlines() if '  failed  ' in line]
  assert len(failed) == 1, status
  assert 'train.batch_size=0' in failed[0].split('  failed  ')[0]
  assert ('flaxlora: error: train.batch_size=0 must be >= 1 (examples per '
          'step)') in failed[0]
  assert (root / 'results.md').read_text().count('\n') == 2 + 4


def _check_compare_reads_it(array):
  config, root, _, _, _ = array
  result = subprocess.run(
      [sys.executable, '-m', 'experiments.compare',
       f'--config={config}:with_failure', f'--workdir={root}'],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  table = (root / 'compare.md').read_text().split('\n\n')[0]
  rows = table.splitlines()[2:]  # the per-point table
  assert [r.rstrip(' |').rsplit('| ', 1)[1] for r in rows] == [
      'done', 'done', 'done', 'not run', 'done']


def _check_warned_task_requeued_itself(array):
  config, root, _, _, _ = array
  point = sweeps.plan(sweeps.load_module(str(config)).get_config(),
                      f'{config}:with_failure', root)[4]
  log = sweeps.log_path(root, point.name).read_text()
  stop = [line for line in log.splitlines()
          if line.startswith('flaxlora: stopped: SIGUSR1 at step')]
  assert len(stop) == 1 and 'restart 1 on' in log, log[-3000:]
  step = int(stop[0].split('at step ')[1].split(':')[0])
  summary = json.loads((point.workdir / 'summary.json').read_text())
  assert summary['step'] == 150 and summary['seconds_from'] == step < 150


def test_one_array_of_points_on_slurm(cluster, tmp_path):
  # One test, so that parallel workers (xdist) never run the array twice.
  array = _run_array(cluster, tmp_path)
  _check_local_results(array)  # 3 points done as --launch=local does
  _check_requeued_task_resumed_bitwise(array)  # scontrol requeue mid-run
  _check_warned_task_requeued_itself(array)  # SIGUSR1 before time limit
  _check_failed_point_reported(array)  # its error line, the others finish
  _check_compare_reads_it(array)  # experiments.compare on a launched sweep


def _adapter(workdir):
  return load_file(str(workdir / 'adapter/adapter.safetensors'))


def test_two_task_srun_equals_one_process(cluster, tmp_path):
  config = tmp_path / 'one_point.py'
  config.write_text(CONFIG.replace('return points', 'return points[1:2]'))
  root = tmp_path / 'root'
  env = _env(cluster)
  _sweep(env, f'--config={config}', f'--workdir={root}', '--launch=slurm',
         '--slurm.ntasks_per_node=2')
  reference = tmp_path / 'one_process'
  env_one = dict(env, XLA_FLAGS='')
  one = subprocess.run(
      [sys.executable, '-m', 'experiments.run', f'--config={config}',
       f'--workdir={reference}', '--cpu_devices=2', '--config.train.seed=1'],
      cwd=REPO, env=env_one, capture_output=True, text=True, timeout=600)
  assert one.returncode == 0, one.stderr[-3000:]
  status = _wait(env, config, root)
  assert status.splitlines()[-1] == '1 done', status
  point = _good_points(config, root)[0]
  log = sweeps.log_path(root, point.name).read_text()
  print(log)
  assert log.count('step 1/4 loss') == 2  # two processes, one run
  assert "mesh {'data': 2, 'fsdp': 1, 'tensor': 1} over 2 cpu" in log
  assert 'over 2 cpu' in one.stdout
  two, single = _adapter(point.workdir), _adapter(reference)
  assert two.keys() == single.keys()
  for key, value in single.items():
    np.testing.assert_allclose(two[key], value, atol=1e-6, rtol=1e-6,
                               err_msg=key)
  assert all(np.abs(v).max() > 0 for k, v in two.items() if k.endswith('/b'))
  losses = [[r['loss'] for r in _records(w / 'metrics.jsonl')
             if r['split'] == 'train'] for w in (point.workdir, reference)]
  np.testing.assert_allclose(losses[0], losses[1], rtol=1e-6)
