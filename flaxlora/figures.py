"""Matplotlib figures without pyplot: no global backend switch.

    fig, axes = figures.grid(3, width=4, height=3)
    axes[0].plot(steps, losses)
    figures.save(fig, workdir / 'loss.png')   # atomic

Library code draws on `Figure`s with an Agg canvas of their own, so a
notebook user's backend is never changed (`matplotlib.use` belongs to entry
points only).
"""
import os

from matplotlib import figure as figure_lib
from matplotlib.backends import backend_agg

from flaxlora import atomic


def new(width: float, height: float) -> figure_lib.Figure:
  """A `width` x `height` inch figure with its own Agg canvas."""
  fig = figure_lib.Figure(figsize=(width, height), layout='constrained')
  backend_agg.FigureCanvasAgg(fig)
  return fig


def grid(count: int, *, width: float, height: float):
  """(figure, [axes] * count): one row of `count` panels, each
  `width` x `height` inches (at most 20 inches wide in all)."""
  fig = new(min(width * count, 20), height)
  return fig, list(fig.subplots(1, count, squeeze=False)[0])


def save(fig: figure_lib.Figure, path: str | os.PathLike,
         dpi: int = 80) -> None:
  """Writes `fig` as a PNG at `path`, atomically."""
  atomic.write_file(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format='png'))
