"""Two processes on localhost (4 CPU devices each) train via jax.distributed.

They run `multihost_worker.py`: the same sharded LoRA steps as
`test_sharding.py`, on a (data 2, fsdp 2, tensor 2) mesh over all 8 devices
of both processes, and write an orbax checkpoint together. This process (8
devices of its own) checks their losses and adapter against a single-device
run and restores their checkpoint on other mesh shapes.
"""
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import multihost_worker
from flaxlora import distributed
from flaxlora import sharding

WORKER = pathlib.Path(__file__).with_name('multihost_worker.py')
PROCESSES = 2


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """Runs the two worker processes once and, meanwhile, the same steps on one
  device here; returns (their output folder, (losses, adapter) here)."""
  out = tmp_path_factory.mktemp('multihost')
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=4')
  address = f'127.0.0.1:{_free_port()}'
  procs = [subprocess.Popen(
      [sys.executable, str(WORKER), '--coordinator', address,
       '--num_processes', str(PROCESSES), '--process_id', str(i),
       '--mesh', '2,2,2', '--families', 't5', '--out', str(out)],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(PROCESSES)]
  logs = []
  try:
    one = sharding.make_mesh({}, devices=jax.devices()[:1])
    losses, state, _, _ = multihost_worker.train('t5', one)
    reference = losses, multihost_worker.flat_arrays(
        distributed.to_host(state['adapter']))
    for proc in procs:
      logs.append(proc.communicate(timeout=240)[0])
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  for i, proc in enumerate(procs):
    assert proc.returncode == 0, f'process {i} failed:\n{logs[i][-4000:]}'
  return out, reference


def test_two_processes_match_single_device(runs):
  workdir, (losses, adapter) = runs
  result = np.load(workdir / 'result_t5.npz')
  assert int(result['processes']) == PROCESSES
  assert int(result['devices']) == 8
  np.testing.assert_allclose(result['losses'], losses, atol=1e-5, rtol=0)
  for key, value in adapter.items():
    np.testing.assert_allclose(result[key], value, atol=1e-5, rtol=0,
                               err_msg=key)
  assert losses[-1] < losses[0]  # the steps did train


@pytest.mark.parametrize('shape', [(1, 2, 4), (8, 1, 1)])
def test_checkpoint_restores_in_one_process_on_another_mesh(runs, shape):
  workdir, _ = runs
  result = np.load(workdir / 'result_t5.npz')
  mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape)))
  abstract, shardings, _ = multihost_worker.state_shardings('t5', mesh)
  with ocp.StandardCheckpointer() as checkpointer:
    state = checkpointer.restore(
        workdir / 'ckpt_t5', sharding.abstract_sharded(abstract, shardings))
  adapter = multihost_worker.flat_arrays(distributed.to_host(state['adapter']))
  assert adapter
  for key, value in adapter.items():
    np.testing.assert_array_equal(value, result[key], err_msg=key)
  for leaf, target in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)):
    assert leaf.sharding.is_equivalent_to(target, leaf.ndim)
  assert int(state['opt_state'][0].count) == multihost_worker.STEPS


@pytest.fixture
def no_launcher_env(monkeypatch):
  for name in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES',
               'JAX_PROCESS_ID', 'SLURM_JOB_ID', 'SLURM_NTASKS',
               'SLURM_STEP_NODELIST', 'SLURM_PROCID', 'OMPI_COMM_WORLD_SIZE'):
    monkeypatch.delenv(name, raising=False)


@pytest.mark.usefixtures('no_launcher_env')
def test_initialize_distributed_single_process_is_a_no_op():
  assert not distributed.initialize_distributed()
  assert not jax.distributed.is_initialized()
  assert distributed.is_main_process()
  distributed.sync('single')  # no barrier needed, must not hang


@pytest.mark.usefixtures('no_launcher_env')
def test_initialize_distributed_errors_name_the_missing_setting(monkeypatch):
  with pytest.raises(ValueError, match=r'num_processes \(JAX_NUM_PROCESSES, '
                     r'got None\)'):
    distributed.initialize_distributed('127.0.0.1:1234', process_id=0)
  monkeypatch.setenv('JAX_NUM_PROCESSES', '2')
  with pytest.raises(ValueError, match=r'process_id 2 must be in \[0, '
                     r'num_processes=2\)'):
    distributed.initialize_distributed('127.0.0.1:1234', process_id=2)
  monkeypatch.setenv('JAX_PROCESS_ID', 'one')
  with pytest.raises(ValueError, match="JAX_PROCESS_ID='one' must be an "
                     'integer'):
    distributed.initialize_distributed('127.0.0.1:1234')
  assert not jax.distributed.is_initialized()


@pytest.mark.usefixtures('no_launcher_env')
def test_slurm_step_of_several_tasks_is_detected(monkeypatch):
  # A batch script (no step yet) and a one-task step run one process; a
  # step of several tasks (srun) is a multi-process job JAX joins itself.
  monkeypatch.setattr(distributed, 'tpu_attached', lambda: False)
  monkeypatch.setenv('SLURM_JOB_ID', '12')
  monkeypatch.setenv('SLURM_NTASKS', '2')
  assert not distributed._auto_detectable()  # pylint: disable=protected-access
  monkeypatch.setenv('SLURM_STEP_NODELIST', 'node[01-02]')
  monkeypatch.setenv('SLURM_PROCID', '1')
  assert distributed._auto_detectable()  # pylint: disable=protected-access
  monkeypatch.setenv('SLURM_NTASKS', '1')
  assert not distributed._auto_detectable()  # pylint: disable=protected-access
