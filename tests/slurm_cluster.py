"""A real single-node Slurm on localhost, for tests: munged, slurmctld and
slurmd with their own key, ports, state and logs under one folder.

    cluster = slurm_cluster.start(tmp_path)   # or pytest.skip(reason)
    env = cluster.env                          # SLURM_CONF=... for clients
    cluster.stop()

Needs Debian's `slurm-wlm` and `munge` (`.ci/run` installs them) and root
(slurmd runs jobs as their user). `FLAXLORA_TEST_SLURM_CONF` names the
slurm.conf of a running cluster to use instead (its default partition runs
the test jobs). The node has 2 CPUs, no accounting (sacct answers "disabled",
so `--status` reads squeue, which keeps finished jobs for MinJobAge).
"""
import dataclasses
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import time

BINARIES = ('munged', 'slurmctld', 'slurmd', 'sbatch', 'srun', 'squeue',
            'scontrol', 'sinfo')
CONF_ENV = 'FLAXLORA_TEST_SLURM_CONF'
_CONF = '''ClusterName=flaxlora_test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/munge
AuthInfo=socket={dir}/munge/socket
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerParameters=sched_interval=1
ReturnToService=2
MpiDefault=none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MinJobAge=600
KillWait=60
NodeName={host} NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN
PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP
'''


@dataclasses.dataclass
class Cluster:
  env: dict[str, str]  # the environment for Slurm's clients and jobs
  folder: pathlib.Path | None  # None: a running cluster, left as it is

  def stop(self) -> None:
    """Cancels the test's jobs and stops the daemons it started."""
    if self.folder is None:
      return
    subprocess.run(['scancel', '--user=root'], env=self.env, check=False,
                   capture_output=True)
    deadline = time.time() + 90  # jobs end (their slurmstepd exits) first
    while time.time() < deadline and subprocess.run(
        ['squeue', '--noheader', '--states=PD,R,CG,S'], env=self.env,
        capture_output=True, text=True, check=False).stdout.strip():
      time.sleep(1)
    for name in ('slurmd.pid', 'slurmctld.pid', 'munge/munged.pid'):
      try:
        os.kill(int((self.folder / name).read_text()), signal.SIGTERM)
      except (OSError, ValueError):
        pass


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def missing() -> str:
  """Why no Slurm can be started here ('' when one can)."""
  if os.environ.get(CONF_ENV):
    return ''
  absent = [b for b in BINARIES if shutil.which(b) is None]
  if absent:
    return (f'Slurm is not installed ({", ".join(absent)} missing): '
            'apt-get install slurm-wlm munge')
  if os.geteuid() != 0:
    return ('starting a test Slurm needs root (slurmd runs jobs as their '
            f'user); or set {CONF_ENV} to a running cluster\'s slurm.conf')
  return ''


def _check(argv, **kwargs):
  result = subprocess.run(argv, capture_output=True, text=True, check=False,
                          timeout=60, **kwargs)
  if result.returncode:
    raise RuntimeError(f'{" ".join(argv)} failed: {result.stderr.strip()}')
  return result.stdout


def start(folder: pathlib.Path, timeout: float = 60) -> Cluster:
  """Starts munged, slurmctld and slurmd under `folder`; returns when the
  node is idle (RuntimeError with the daemons' logs otherwise)."""
  running = os.environ.get(CONF_ENV)
  if running:
    return Cluster(dict(os.environ, SLURM_CONF=running), None)
  folder = pathlib.Path(folder)
  for sub in ('munge', 'state', 'spool'):
    (folder / sub).mkdir(parents=True, exist_ok=True)
  (folder / 'munge').chmod(0o700)
  key = folder / 'munge' / 'munge.key'
  key.write_bytes(os.urandom(1024))
  key.chmod(0o400)
  munge = folder / 'munge'
  _check(['munged', '--force', f'--socket={munge}/socket',
          f'--key-file={key}', f'--log-file={munge}/munged.log',
          f'--pid-file={munge}/munged.pid', f'--seed-file={munge}/seed'])
  conf = folder / 'slurm.conf'
  conf.write_text(_CONF.format(host=socket.gethostname().split('.')[0],
                               ctld_port=_free_port(), d_port=_free_port(),
                               dir=folder))
  env = dict(os.environ, SLURM_CONF=str(conf))
  cluster = Cluster(env, folder)
  try:
    _check(['slurmctld', '-c', '-f', str(conf)], env=env)
    _check(['slurmd', '-f', str(conf)], env=env)
    deadline = time.time() + timeout
    state = ''
    while time.time() < deadline:
      state = subprocess.run(['sinfo', '--noheader', '--format=%t'],
                             env=env, capture_output=True, text=True,
                             check=False).stdout.strip()
      if state == 'idle':
        return cluster
      time.sleep(0.5)
    logs = '\n'.join(f'{p.name}: {p.read_text()[-1500:]}'
                     for p in folder.glob('*.log'))
    raise RuntimeError(f'the test Slurm node is {state!r}, not idle, after '
                       f'{timeout}s:\n{logs}')
  except BaseException:
    cluster.stop()
    raise
