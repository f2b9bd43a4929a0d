"""`host_memory.keep_freed_memory`: XLA:CPU calls stop page-faulting temps.

Each case runs in a fresh process: the setting is process-wide and must come
before JAX starts its backend.
"""
import json
import os
import subprocess
import sys

import pytest

from flaxlora import host_memory

_PROGRAM = r"""
import json, resource, sys
from flaxlora import host_memory
kept = host_memory.keep_freed_memory() if sys.argv[1] == 'keep' else False
import jax, jax.numpy as jnp

def two_temps(x):  # two materialised 128 MB intermediates
  a = jax.lax.optimization_barrier(jnp.sin(x))
  b = jax.lax.optimization_barrier(jnp.cos(a))
  return jnp.sum(a * b)

step = jax.jit(two_temps)
x = jnp.ones((32 * 2**20,), jnp.float32)
temp = step.lower(x).compile().memory_analysis().temp_size_in_bytes
for _ in range(40):  # the heap settles within the first ~10 calls
  step(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
  step(x).block_until_ready()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4
print(json.dumps({'kept': kept, 'recorded': host_memory.kept(),
                  'temp_pages': temp / 4096, 'faults_per_call': faults}))
"""

def _faults(mode: str) -> dict:
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=repo, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  out = subprocess.run([sys.executable, '-c', _PROGRAM, mode], env=env,
                       capture_output=True, text=True, check=True).stdout
  return json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow  # ~35 s: two subprocess runs of many train steps
@pytest.mark.skipif(host_memory.glibc() is None,
                    reason='mallopt settings exist on glibc only')
def test_keeping_freed_memory_stops_per_call_page_faults():
  default = _faults('default')
  kept = _faults('keep')
  assert default['temp_pages'] >= 2 * 32 * 2**20 * 4 / 4096
  # glibc's default: the temp buffer is mapped anew, page by page, each call.
  assert not default['kept'] and not default['recorded']
  assert default['faults_per_call'] > 0.5 * default['temp_pages'], default
  # Kept: the pages of earlier calls are reused.
  assert kept['kept'] and kept['recorded']
  assert kept['faults_per_call'] < 0.02 * kept['temp_pages'], kept
