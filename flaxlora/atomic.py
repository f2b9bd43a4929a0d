"""Atomic writes: a file or a whole folder appears complete, or not at all.

    atomic.write_file(workdir / 'summary.json', text)
    atomic.write_file(path, lambda tmp: st_numpy.save_file(tensors, tmp))
    with atomic.folder(out) as staging:      # out is replaced on success
      (staging / 'config.json').write_text(...)

Everything is written beside its destination (same file system) and renamed
into place, so a run killed at any moment leaves either the old content or
the new one, never half of either. Every writer in flaxlora goes through this
module.
"""
import contextlib
import os
import pathlib
import shutil
import tempfile
from typing import Callable, Iterator

Content = str | bytes | Callable[[str], None]


def write_file(path: str | os.PathLike, content: Content) -> pathlib.Path:
  """Writes `content` to `path` through a temporary file renamed into place.

  Args:
    path: the destination file; its folder is created when missing.
    content: text, bytes, or a function that writes the file at the
      temporary path it is given (e.g. `safetensors` `save_file`).
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.')
  try:
    os.fchmod(fd, 0o644)  # mkstemp makes 0600 files
    if callable(content):
      os.close(fd)
      content(tmp)
    else:
      mode = 'wb' if isinstance(content, bytes) else 'w'
      with os.fdopen(fd, mode) as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise
  return path


@contextlib.contextmanager
def folder(path: str | os.PathLike) -> Iterator[pathlib.Path]:
  """Yields an empty staging folder that replaces `path` when the block ends.

  On an exception the staging folder is removed and an earlier `path` is
  left as it was.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  staging = pathlib.Path(tempfile.mkdtemp(dir=path.parent,
                                          prefix=f'.{path.name}.'))
  try:
    staging.chmod(0o755)  # mkdtemp makes a 0700 folder
    yield staging
    _swap_in(staging, path)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise


def _swap_in(staging: pathlib.Path, path: pathlib.Path) -> None:
  """Renames `staging` to `path`; an old `path` survives any failure."""
  old = path.with_name(f'.{path.name}.old')
  had_old = path.exists()
  try:
    if had_old:
      shutil.rmtree(old, ignore_errors=True)
      path.rename(old)
    staging.rename(path)
  except BaseException:
    if had_old and old.exists() and not path.exists():
      old.rename(path)
    raise
  shutil.rmtree(old, ignore_errors=True)
