"""A workdir lock: one run at a time in a workdir.

    with lock.Lock(workdir):      # raises errors.UserError when held
      ...train...

The lock is a file (`workdir.LOCK_FILE`) holding the holder's pid and host,
created atomically (O_CREAT | O_EXCL), so of two runs started at once
exactly one gets it. A lock left by a dead process of this host is taken
over with a warning; a lock of another host is never judged stale (its
process cannot be checked from here): the message says how to remove it.
Multi-host runs lock once, on the main process (callers check).
"""
import json
import os
import pathlib
import socket
import sys
import time
from typing import Any

from flaxlora import errors
from flaxlora import workdir as workdir_lib


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's live process
    return True
  return True


def read(path: pathlib.Path) -> dict[str, Any] | None:
  """The holder {'pid', 'host', 'since'} of the lock file `path`; None
  when there is no lock, {} for an unreadable one (a holder that died
  between creating and filling it)."""
  try:
    text = path.read_text()
  except FileNotFoundError:
    return None
  try:
    holder = json.loads(text)
  except json.JSONDecodeError:
    return {}
  return holder if isinstance(holder, dict) else {}


class Lock:
  """Holds `workdir`'s lock from `acquire` (or `with`) until `release`."""

  def __init__(self, workdir: str | os.PathLike):
    self.path = pathlib.Path(workdir) / workdir_lib.LOCK_FILE
    self.mine = {'pid': os.getpid(), 'host': socket.gethostname()}
    self.held = False

  def acquire(self) -> None:
    """Takes the lock, or raises errors.UserError naming its holder."""
    self.path.parent.mkdir(parents=True, exist_ok=True)
    mine = dict(self.mine, since=time.strftime('%Y-%m-%d %H:%M:%S'))
    for _ in range(3):  # a stale lock taken over, then one more try
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        self._take_over_if_stale()
        continue
      with os.fdopen(fd, 'w') as f:
        f.write(json.dumps(mine))
      self.held = True
      return
    self._take_over_if_stale()  # raises: someone else won every race

  def _stale(self, holder: dict[str, Any]) -> bool:
    """A lock of a dead process of this host, or one never filled in."""
    pid, host = holder.get('pid'), holder.get('host')
    if holder == {}:
      return self._old(self.path)
    return (host == self.mine['host'] and isinstance(pid, int) and
            not _alive(pid))

  def check_free(self) -> None:
    """Raises errors.UserError when a live run holds the lock (a check
    before a slow set-up; `acquire` decides)."""
    holder = read(self.path)
    if holder is not None and not self._stale(holder):
      self._refuse(holder)

  def _refuse(self, holder: dict[str, Any]) -> None:
    where = (f'pid {holder.get("pid")} on {holder.get("host")}' if holder
             else 'a starting run')
    raise errors.UserError(
        f'workdir {self.path.parent} is in use by another run ({where}, '
        f'since {holder.get("since", "?")}; lock file {self.path}); wait '
        'for it or use another --workdir (if that run is gone, delete '
        'the lock file).')

  def _take_over_if_stale(self) -> None:
    holder = read(self.path)
    if holder is None:
      return
    if not self._stale(holder):
      self._refuse(holder)
    pid, host = holder.get('pid'), holder.get('host')
    # Rename first: of two runs taking over at once only one succeeds.
    aside = self.path.with_name(f'.{self.path.name}.stale.{os.getpid()}')
    try:
      os.rename(self.path, aside)
    except FileNotFoundError:
      return
    if read(aside) != holder:  # a new holder's lock: put it back
      try:
        os.link(aside, self.path)
      except FileExistsError:
        pass
      aside.unlink(missing_ok=True)
      return
    print(f'flaxlora: warning: took over the stale lock of {self.path.parent}'
          f' (pid {pid} on {host} is no longer running).', file=sys.stderr)
    aside.unlink(missing_ok=True)

  @staticmethod
  def _old(path: pathlib.Path) -> bool:
    try:
      return time.time() - path.stat().st_mtime > 60
    except FileNotFoundError:
      return True

  def release(self) -> None:
    holder = read(self.path) if self.held else None
    if holder and holder.get('pid') == self.mine['pid']:
      self.path.unlink(missing_ok=True)
    self.held = False

  def __enter__(self) -> 'Lock':
    self.acquire()
    return self

  def __exit__(self, *exc: Any) -> None:
    self.release()
