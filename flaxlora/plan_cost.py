"""The cost side of a plan (`flaxlora.plan`): a compiled step's FLOPs and
HBM bytes per chip, with every layer of its scans counted, and the roofline
step time and MFU they imply.

    report.update(plan_cost.cost(compiled))
    report.update(plan_cost.roofline(report, chips.CHIPS['v5e']))

XLA's cost analysis counts a loop's body once: a step whose layers are one
scan (`model.scan_layers`) reports one layer of each stack. `scanned`
scales the compiled step's figures by what the same step unrolled costs
over the scanned one, both lowered unpartitioned (before optimisation):
exact for the FLOPs of the layers, an estimate for their bytes (it assumes
the compiler fuses the layers as it fuses the rest of the step).
"""
from typing import Any


def cost(compiled: Any) -> dict[str, float]:
  """{'flops', 'bytes_accessed'} of a compiled or lowered step (XLA's
  analysis)."""
  analysis = compiled.cost_analysis()
  return {'flops': float(analysis['flops']),
          'bytes_accessed': float(analysis['bytes accessed'])}


def scanned(compiled: dict[str, float], lowered: dict[str, float],
            unrolled: dict[str, float]) -> dict[str, float]:
  """The `cost` of a step with scans over layers, every layer counted.

  Args:
    compiled: the compiled (partitioned) step's `cost`: one layer a scan.
    lowered: the same step lowered unpartitioned: one layer a scan.
    unrolled: the step with its layers unrolled, lowered unpartitioned.

  Returns:
    `compiled` scaled by unrolled / lowered, per key; the compiler's own
    figures under 'compiled_flops' and 'compiled_bytes_accessed'.
  """
  out = {f'compiled_{k}': v for k, v in compiled.items()}
  out.update({k: compiled[k] * unrolled[k] / lowered[k] for k in compiled})
  return out


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
