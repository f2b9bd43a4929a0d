"""Train and eval scalars to TensorBoard and, optionally, Weights & Biases.

    writer = metric_writers.create(config, workdir, is_main)
    writer.write(step, 'train', {'loss': 0.5, 'lr': 1e-3})  # 'train/loss'
    writer.close()

The config's `log` section chooses the writers:

  tensorboard  (default True) event files in the workdir, through
               `tensorboardX` (a small pure-Python writer: numpy, protobuf,
               packaging; no TensorFlow): `tensorboard --logdir=WORKDIR`
  wandb        (default False) a Weights & Biases run (`pip install
               "flaxlora[wandb]"`); `wandb_mode` 'offline' (default: files
               under WORKDIR/wandb, `wandb sync` uploads them later) or
               'online'; `wandb_project` names the project

Only the main process writes (others get None). Every record of
`flaxlora.workdir.MetricsLog` reaches the writer: train loss, grad norm,
lr and steps/s at each log step, every eval metric at each eval.
"""
import math
import pathlib
from typing import Any, Mapping

SKIP = ('step', 'split')


def _scalars(split: str, record: Mapping[str, Any]) -> dict[str, float]:
  out = {}
  for key, value in record.items():
    if key in SKIP or isinstance(value, (str, bool)):
      continue
    try:
      value = float(value)
    except (TypeError, ValueError):
      continue
    if math.isfinite(value):
      out[f'{split}/{key}'] = value
  return out


class TensorBoard:
  """Scalars as TensorBoard event files in `logdir`."""

  def __init__(self, logdir: pathlib.Path):
    try:
      import tensorboardX  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ImportError(
          'log.tensorboard=True needs tensorboardX (pip install tensorboardX, '
          'a flaxlora dependency); or pass --config.log.tensorboard=False.'
      ) from None
    self._writer = tensorboardX.SummaryWriter(logdir=str(logdir))

  def write(self, step: int, split: str, record: Mapping[str, Any]) -> None:
    for tag, value in _scalars(split, record).items():
      self._writer.add_scalar(tag, value, global_step=step)
    self._writer.flush()  # a log step is rare: a killed run loses nothing

  def close(self) -> None:
    self._writer.close()


class Wandb:
  """Scalars to a Weights & Biases run (offline by default)."""

  def __init__(self, log: Any, workdir: pathlib.Path, config: Any):
    try:
      import wandb  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ImportError(
          'log.wandb=True needs wandb: pip install "flaxlora[wandb]" (or '
          'pass --config.log.wandb=False).') from None
    as_dict = config.to_dict() if hasattr(config, 'to_dict') else None
    self._run = wandb.init(
        project=log.get('wandb_project', 'flaxlora'), dir=str(workdir),
        mode=log.get('wandb_mode', 'offline'), name=workdir.name,
        config=as_dict)

  def write(self, step: int, split: str, record: Mapping[str, Any]) -> None:
    self._run.log(_scalars(split, record), step=step)

  def close(self) -> None:
    self._run.finish()


class Writers:
  """Several writers as one."""

  def __init__(self, writers: list[Any]):
    self.writers = writers

  def write(self, step: int, split: str, record: Mapping[str, Any]) -> None:
    for w in self.writers:
      w.write(step, split, record)

  def close(self) -> None:
    for w in self.writers:
      w.close()


def create(config: Any, workdir: str | pathlib.Path,
           is_main: bool) -> Writers | None:
  """The writers the config's `log` section asks for (None: none, or not
  the main process). A config without a `log` section gets TensorBoard."""
  if not is_main:
    return None
  log = config.get('log', None) or {}
  workdir = pathlib.Path(workdir)
  writers = []
  if log.get('tensorboard', True):
    writers.append(TensorBoard(workdir))
  if log.get('wandb', False):
    writers.append(Wandb(log, workdir, config))
  return Writers(writers) if writers else None
