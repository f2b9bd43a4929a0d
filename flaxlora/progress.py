"""Train-loop bookkeeping: the progress line (steps/s, ETA) and the check
that the training loss stays finite."""
import math
import time

from flaxlora import checkpoint
from flaxlora import errors


class Progress:
  """Steps/s (train steps only: eval and checkpoint time is left out) and
  ETA for the progress line. The first logged step, which compiles, starts
  the clock."""

  def __init__(self, total: int):
    self.total = total
    self.mark = None  # (step, time) of the previous log
    self.excluded = 0.0
    self.rate = None

  def exclude(self, seconds: float) -> None:
    self.excluded += seconds

  def update(self, step: int) -> dict[str, float]:
    now = time.perf_counter()
    if self.mark is not None and step > self.mark[0]:
      elapsed = max(now - self.mark[1] - self.excluded, 1e-9)
      self.rate = (step - self.mark[0]) / elapsed
    self.mark, self.excluded = (step, now), 0.0
    return {} if self.rate is None else {'steps_per_s': self.rate}

  def line(self, step: int, loss: float) -> str:
    text = f'step {step}/{self.total} loss {loss:.4f}'
    if self.rate:
      eta = (self.total - step) / self.rate
      text += f' {self.rate:.2f} steps/s ETA {eta:.0f}s'
    return text


class NonFiniteLossError(errors.UserError, FloatingPointError):
  """The training loss became NaN or infinite."""


def check_finite(pending: list, ckpt: checkpoint.Checkpointer,
                  lr: float) -> float:
  """Raises at the first non-finite loss of `pending` [(step, loss)],
  with the command that continues from the last good checkpoint at a
  lower learning rate `lr` / 10."""
  last = float('nan')
  for step, loss in pending:
    last = float(loss)
    if not math.isfinite(last):
      good = ckpt.latest_step()
      kept = (f'the last good checkpoint is step {good} in {ckpt.directory}'
              if good is not None else 'no checkpoint was written yet')
      lower = {'optimizer.lr': f'{lr / 10:g}'}
      again = errors.command(lower) or (
          f'the same config with optimizer.lr={lower["optimizer.lr"]}')
      raise NonFiniteLossError(
          f'training loss is {last} at step {step}; stopped ({kept}). '
          f'Continue with a lower learning rate: {again} (or enable '
          'optimizer.clip_norm, or check the data).')
  pending.clear()
  return last
