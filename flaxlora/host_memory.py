"""Keeping freed host memory in the process: XLA:CPU steps stop page-faulting.

On CPU, XLA allocates one temporary buffer per call of a compiled function:
for a T5-small LoRA train step (batch 8, 256/64 tokens) that is 783 MB. The
call runs on an XLA worker thread, and glibc serves a request that large on a
thread's own malloc arena with a fresh `mmap`, which `free` unmaps again. So
every step maps 783 MB anew and the kernel zero-fills it page by page: ~200k
page faults and ~0.45 s of kernel time per step on two cores, and twice that
for the MiniLM classifier step.

`keep_freed_memory()` switches glibc's malloc (process-wide) to one arena
that grows with `brk`, never `mmap`s, and never gives freed memory back to
the system. After the first step the buffer's pages stay mapped and later
steps reuse them: no page faults, and on this repository's 2-core machines
the T5 and MiniLM LoRA train steps ran ~15% and ~20% faster in isolated step
loops (`python -m experiments.benchmark [--release_freed_memory] lora` shows
it side by side with PEFT, which gains too). The price: the process keeps
its peak host memory until it exits, and all threads share one malloc arena.

Call it first thing, before JAX starts its CPU backend (the first array,
`jax.devices()`, ...): threads that already have an arena keep it.
The heap grows for the first few steps (a freed buffer's memory gets split
by small allocations until enough free chunks exist), then stays put.
`experiments.benchmark` calls it unless given `--release_freed_memory`;
`experiments.run` calls it when the machine has more than KEEP_MIN_GB of
memory (`keep_by_default`) and `--release_freed_memory` is not given: a
60-step MiniLM SQuAD run peaks at 9.3 GB resident with kept memory and 4.0
GB without, so a 16 GB laptop releases and a larger host keeps
(`--norelease_freed_memory` keeps anywhere). Both it and `--cpu_devices` are for CPU-only
hosts: where JAX will run on a GPU or TPU (`cpu_only()` is False) they do
nothing (`cpu_settings`).
"""
import ctypes
import ctypes.util
import os
import pkgutil

from flaxlora import distributed

# mallopt(3) parameter numbers, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

_kept = False
# Hosts with more memory than this keep freed memory by default.
KEEP_MIN_GB = 20.0
# Top-level modules of JAX's GPU plugins (CUDA, ROCm).
GPU_PLUGIN_PREFIXES = ('jax_cuda', 'jax_rocm')


def cpu_only() -> bool:
  """Whether JAX will run on the CPU, decided without starting a backend:
  JAX_PLATFORMS, when set, names cpu first; otherwise no GPU plugin
  (jax-cuda*-plugin, jax-rocm*-plugin) is installed and no TPU is attached
  (libtpu alone compiles for TPUs ahead of time: `experiments.plan`)."""
  platforms = os.environ.get('JAX_PLATFORMS', '').strip()
  if platforms:
    return platforms.split(',')[0].strip() == 'cpu'
  if any(m.name.startswith(GPU_PLUGIN_PREFIXES)
         for m in pkgutil.iter_modules()):
    return False
  return not distributed.tpu_attached()


def total_memory_gb() -> float | None:
  """The host's physical memory in GB (None where the OS does not say)."""
  try:
    return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 1e9
  except (ValueError, OSError, AttributeError):
    return None


def keep_by_default() -> bool:
  """Whether `experiments.run` keeps freed memory when not told: on hosts
  with more than KEEP_MIN_GB of memory."""
  total = total_memory_gb()
  return total is not None and total > KEEP_MIN_GB


def cpu_settings(keep_freed: bool, cpu_devices: int | None) -> str | None:
  """The CPU-host settings of the entry points, applied before JAX starts
  its backend: keep freed memory, split the host into `cpu_devices` XLA
  devices. On a GPU/TPU host nothing changes and the returned note says so
  (None otherwise)."""
  if not cpu_only():
    return ('flaxlora: JAX will run on an accelerator, so the CPU-host '
            'settings (kept freed memory, --cpu_devices) are not applied.')
  if keep_freed:
    keep_freed_memory()
  if cpu_devices:
    import jax  # pylint: disable=g-import-not-at-top
    jax.config.update('jax_num_cpu_devices', int(cpu_devices))
  return None


def glibc() -> ctypes.CDLL | None:
  """The C library if it is glibc (whose `mallopt` settings this module
  uses), else None (macOS, musl)."""
  name = ctypes.util.find_library('c')
  if name is None:
    return None
  libc = ctypes.CDLL(name)
  return libc if hasattr(libc, 'gnu_get_libc_version') else None


def keep_freed_memory() -> bool:
  """Makes glibc malloc keep freed memory; returns whether it could.

  Returns False, changing nothing, where the C library is not glibc: there
  `mallopt` does not exist or means something else; and where JAX will not
  run on the CPU (`cpu_only()`): accelerator hosts allocate on the device.
  """
  if not cpu_only():
    return False
  libc = glibc()
  if libc is None:
    return False
  # One arena: worker threads allocate from the main heap, which grows with
  # brk; off it (per-thread arenas) glibc mmaps large requests regardless.
  # No mmap at all, and trimming off (-1): freed memory stays mapped.
  global _kept
  _kept = all(libc.mallopt(param, value) == 1 for param, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))
  return _kept


def kept() -> bool:
  """Whether `keep_freed_memory()` took effect in this process."""
  return _kept
