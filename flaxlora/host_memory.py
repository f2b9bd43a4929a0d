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
`experiments.run` and `experiments.benchmark` call it unless given
`--release_freed_memory`.
"""
import ctypes
import ctypes.util

# mallopt(3) parameter numbers, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

_kept = False


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
  `mallopt` does not exist or means something else.
  """
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
