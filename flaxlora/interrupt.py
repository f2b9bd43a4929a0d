"""Graceful SIGINT/SIGTERM/SIGUSR1: stop at a step boundary, after a
checkpoint.

    with interrupt.Guard() as guard:
      for step in ...:
        ...one train step...
        if guard.stop(at_log_step):
          save a checkpoint at `step`; raise guard.error(step, resume)

SIGTERM is what TPU/GPU schedulers send on preemption, SIGUSR1 what a
Slurm sweep asks for before the time limit (`flaxlora.slurm`), SIGINT is
Ctrl-C.
The first signal only sets a flag, so a step, an eval or a checkpoint in
progress completes; a second SIGINT stops at once (KeyboardInterrupt). On
several processes the flag is compared at log and checkpoint steps (a small
all-gather), so that every process stops at the same step and the
checkpoint they save together is complete.
"""
import signal
import threading
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from flaxlora import errors

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


class Guard:
  """Catches SIGINT/SIGTERM/SIGUSR1 while active (main thread only;
  elsewhere a no-op, as Python delivers signals to the main thread)."""

  def __init__(self):
    self.signum = None
    self._previous = {}

  def _handle(self, signum: int, frame: Any) -> None:
    del frame
    if self.signum is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C: stop now
    self.signum = signum

  def __enter__(self) -> 'Guard':
    if threading.current_thread() is threading.main_thread():
      for s in SIGNALS:
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc: Any) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous = {}

  def stop(self, boundary: bool) -> bool:
    """Whether to stop after this step. `boundary`: a log or checkpoint
    step (where several processes compare their flags)."""
    if jax.process_count() == 1:
      return self.signum is not None
    if not boundary:
      return False
    flags = multihost_utils.process_allgather(
        np.int32(self.signum or 0))
    self.signum = self.signum or int(np.max(flags)) or None
    return self.signum is not None

  def error(self, step: int, directory: Any) -> errors.Interrupted:
    """The error that ends the run, after checkpoint `step` was saved."""
    name = signal.Signals(self.signum).name
    resume = errors.command()
    how = (f'resume with: {resume}' if resume else
           'resume by running the same config in the same workdir')
    return errors.Interrupted(
        f'{name} at step {step}: saved a checkpoint in {directory}; {how}',
        self.signum)
