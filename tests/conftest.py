"""Test set-up (before jax is imported): 8 simulated CPU devices, and one
persistent compilation cache for the whole session.

The cache folder is made by the first process (the xdist controller, or the
only process) and reaches every worker and every `experiments.*` subprocess
through the environment, so a program compiled by one test (the runlocal
train step that many tests and subprocess runs share) is loaded by the rest.
No size limit: a limit makes every write scan the whole folder under one
lock, which cost more than the cache saves. An entry read while another
process still writes it is a warning and a recompile, never a wrong program.
The folder goes when the session ends; set JAX_COMPILATION_CACHE_DIR
yourself to keep one.
"""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _cache = tempfile.mkdtemp(prefix='flaxlora_test_jax_cache_')
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _cache
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
