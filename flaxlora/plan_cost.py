"""The cost side of a plan (`flaxlora.plan`): a compiled step's FLOPs and
HBM bytes per chip, with every layer of its scans counted, and the roofline
step time and MFU they imply.

    report.update(plan_cost.cost(compiled))
    report.update(plan_cost.roofline(report, chips.CHIPS['v5e']))

XLA's cost analysis counts a loop's body once: a step whose layers are one
scan (`model.scan_layers`) reports one layer of each stack. `scanned`
compiles the step again with two layers per loop iteration
(`layer_scan.unrolled(2)`): the difference is one layer of each scan, and
L - 1 of them are added.
"""
from typing import Any, Callable, Sequence

from flaxlora.models import layer_scan


def cost(compiled: Any) -> dict[str, float]:
  """{'flops', 'bytes_accessed'} of a compiled step (XLA's analysis)."""
  analysis = compiled.cost_analysis()
  return {'flops': float(analysis['flops']),
          'bytes_accessed': float(analysis['bytes accessed'])}


def scanned(once: dict[str, float], lengths: Sequence[int],
            compile_again: Callable[[], Any]) -> dict[str, Any]:
  """The FLOPs and bytes of a step whose scans over layers have `lengths`.

  Args:
    once: `cost` of the compiled step (each loop's body counted once).
    lengths: its scans' lengths (`layer_scan.unrolled`).
    compile_again: compiles the same step (the compiled step, or a string:
      the compiler refused it); called inside `layer_scan.unrolled(2)`.

  Returns:
    'scan_lengths', 'compiled_flops', 'compiled_bytes_accessed' and, when
    every scan has one length L (1, or even), 'flops' and 'bytes_accessed'
    with L - 1 more layers of each scan; without 'flops' (other lengths, or
    the second compile refused) a report has no roofline.
  """
  report = {'scan_lengths': list(lengths), 'compiled_flops': once['flops'],
            'compiled_bytes_accessed': once['bytes_accessed']}
  length = lengths[0]
  if set(lengths) == {1}:
    return dict(report, **once)
  if len(set(lengths)) != 1 or length % 2:
    return report
  with layer_scan.unrolled(2):
    twice = compile_again()
  if isinstance(twice, str):
    return report
  twice = cost(twice)
  return dict(report, **{k: once[k] + (length - 1) * (twice[k] - once[k])
                         for k in once})


def roofline(report: dict[str, Any], chip: Any) -> dict[str, Any]:
  """The roofline step time of a report's 'flops' and 'bytes_accessed' on
  `chip` (`chips.Chip`), and the MFU of its 'useful_flops' at that time."""
  compute = report['flops'] / chip.peak_flops
  memory_s = report['bytes_accessed'] / chip.hbm_bandwidth
  seconds = max(compute, memory_s)
  return dict(compute_seconds=compute, memory_seconds=memory_s,
              roofline_seconds=seconds,
              bound='compute' if compute >= memory_s else 'memory',
              mfu=round(report['useful_flops'] / (seconds * chip.peak_flops),
                        4))
