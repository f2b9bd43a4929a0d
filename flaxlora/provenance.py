"""Where and when a run ran: hardware, date and commit, for its records.

    provenance.record()   # {'hardware': {...}, 'date': '...', 'commit': ...}

`summary.json` carries this record, so every published number can name the
machine it came from by what was measured on it, never by a nickname:

  hardware  `cpu_model`, its matmul ISA features (`cpu_features`: AVX2,
            AVX-512, AVX512-BF16, AMX) and `cores` (from /proc/cpuinfo and
            the OS), `peak_rss_gb` (this process's peak resident memory), the
            JAX `platform` and `devices` (device kinds and count), and
            `matmul_peak_gflops`: the fastest of a few [1024, 1024] fp32
            matmuls on the default device, measured once per process.
  date      UTC, ISO 8601, when the record was made.
  commit    the flaxlora git commit the code came from (None outside a git
            checkout), with `dirty` when the checkout had local changes.
"""
import datetime
import functools
import os
import pathlib
import platform
import resource
import subprocess
import time
from typing import Any

import jax
import jax.numpy as jnp

ROOT = pathlib.Path(__file__).resolve().parents[1]
PEAK_SIZE = 1024  # n of the n x n x n matmul the peak is measured on
PEAK_REPEATS = 5


def cpu_model() -> str | None:
  """The CPU's model name (/proc/cpuinfo; the platform's name elsewhere)."""
  try:
    for line in pathlib.Path('/proc/cpuinfo').read_text().splitlines():
      if line.startswith('model name'):
        return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or None


# /proc/cpuinfo flags that decide how fast fp32 and bf16 matmuls can be.
MATMUL_FEATURES = ('avx2', 'fma', 'avx512f', 'avx512_vnni', 'avx512_bf16',
                   'amx_tile', 'amx_bf16', 'amx_int8')
BF16_FEATURES = ('avx512_bf16', 'amx_bf16')


@functools.cache
def cpu_features() -> tuple[str, ...]:
  """The MATMUL_FEATURES this CPU has (empty where /proc/cpuinfo is not)."""
  try:
    text = pathlib.Path('/proc/cpuinfo').read_text()
  except OSError:
    return ()
  flags = set()
  for line in text.splitlines():
    if line.startswith('flags'):
      flags.update(line.split(':', 1)[1].split())
      break
  return tuple(f for f in MATMUL_FEATURES if f in flags)


def has_bf16_matmul() -> bool:
  """Whether the CPU has bf16 matmul instructions (AVX512-BF16 or AMX)."""
  return any(f in cpu_features() for f in BF16_FEATURES)


def peak_rss_gb() -> float:
  """This process's peak resident memory so far, in GB (Linux: ru_maxrss is
  in KiB)."""
  return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
               / 1e9, 2)


def cores() -> int:
  """CPU cores this process may run on."""
  if hasattr(os, 'sched_getaffinity'):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


@functools.cache
def matmul_peak_gflops(n: int = PEAK_SIZE) -> float:
  """fp32 GFLOP/s of the fastest of PEAK_REPEATS [n, n] x [n, n] matmuls
  on the default device (the closest to peak on a shared machine)."""
  x = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  mm = jax.jit(lambda a: a @ a)
  mm(x).block_until_ready()  # compile
  best = float('inf')
  for _ in range(PEAK_REPEATS):
    start = time.perf_counter()
    mm(x).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return round(2 * n**3 / best / 1e9, 1)


@functools.cache
def hardware() -> dict[str, Any]:
  """This process's hardware (see the module docstring); measured once."""
  devices = jax.local_devices()
  return {
      'cpu_model': cpu_model(),
      'cpu_features': list(cpu_features()),
      'cores': cores(),
      'platform': devices[0].platform,
      'devices': f'{len(devices)} x {devices[0].device_kind}',
      'matmul_peak_gflops': matmul_peak_gflops(),
  }


def commit() -> dict[str, Any]:
  """{'commit': hash or None, 'dirty': bool} of the flaxlora checkout."""
  def git(*args):
    return subprocess.run(['git', '-C', str(ROOT), *args], check=True,
                          capture_output=True, text=True).stdout.strip()
  try:
    return {'commit': git('rev-parse', 'HEAD'),
            'dirty': bool(git('status', '--porcelain', '--untracked-files=no'))}
  except (OSError, subprocess.CalledProcessError):
    return {'commit': None, 'dirty': False}


def record() -> dict[str, Any]:
  """{'hardware', 'date', 'commit', 'dirty'} for a run's summary."""
  return {'hardware': {**hardware(), 'peak_rss_gb': peak_rss_gb(),
                       'load_average': [round(x, 1) for x in os.getloadavg()]},
          'date': datetime.datetime.now(datetime.timezone.utc).isoformat(
              timespec='seconds'),
          **commit()}
