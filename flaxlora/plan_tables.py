"""Readable tables of `plan.plan` reports: text for a terminal, Markdown for
the docs (docs/pod_scale.md), one row per report, memory in GiB per chip.

    print(plan_tables.table([plan.plan(config, chips.target('v5e-16'))]))
"""
import re
from typing import Any, Sequence

from flaxlora import chips


def table(reports: Sequence[dict[str, Any]]) -> str:
  """A readable table of `plan` reports, one row each (GiB per chip)."""
  head = ('target', 'model', 'batch', 'base', 'adapter', 'opt', 'temp',
          'total', 'HBM', 'free', 'TFLOP', 'roofline', 'MFU', 'max batch',
          'compile')
  rows = [head]
  gib = lambda n: f'{n / chips.GIB:.2f}' if n is not None else '-'
  for r in reports:
    b = r['bytes']
    rows.append((
        r['target'], r['model'], str(r['batch_size']),
        gib(b['base']), gib(b['adapter']), gib(b['opt_state']),
        gib(b.get('temp')), gib(b.get('total')), gib(r['hbm_bytes']),
        f"{r['headroom']:.0%}" if 'headroom' in r else 'OOM',
        f"{r['flops'] / 1e12:.1f}" if 'flops' in r else '-',
        f"{r['roofline_seconds'] * 1e3:.0f} ms" if 'roofline_seconds' in r
        else '-',
        f"{r['mfu']:.0%}" if 'mfu' in r else '-',
        str(r.get('max_batch', '-')), f"{r['compile_seconds']:.0f} s"))
  widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
  lines = ['  '.join(c.rjust(w) for c, w in zip(row, widths))
           for row in rows]
  lines.insert(1, '  '.join('-' * w for w in widths))
  return '\n'.join(lines)


def markdown(reports: Sequence[dict[str, Any]]) -> str:
  """A Markdown table of `plan` reports: which configuration fits which
  slice, with its per-chip memory, roofline step time and MFU."""
  lines = ['| model | PEFT | batch | remat | base | target | mesh | '
           'GiB / chip (HBM) | free | fits | roofline step | MFU | max batch |',
           '|' + '---|' * 13]
  for r in reports:
    total = r['bytes'].get('total')
    hbm = f"{r['hbm_bytes'] / chips.GIB:.0f}"
    used = (f'{total / chips.GIB:.1f} ({hbm})' if total else
            f'temps {refused_temps(r)} ({hbm})')
    lines.append('| ' + ' | '.join([
        r['model'].split('/')[-1], r['peft'],
        f"{r['batch_size']} x {r['sequence']}" + _micro(r),
        r['remat'] + (', scan' if r.get('scan_layers') else ''),
        r['base_dtype'], r['target'], _mesh(r), used,
        f"{r['headroom']:.0%}" if 'headroom' in r else '-',
        'yes' if r['fits'] else 'no',
        _seconds(r['roofline_seconds']) if 'roofline_seconds' in r else '-',
        f"{r['mfu']:.0%}" if 'mfu' in r else '-',
        str(r.get('max_batch', '-'))]) + ' |')
  return '\n'.join(lines)


def _mesh(report: dict[str, Any]) -> str:
  """'data x fsdp x tensor' sizes, e.g. '1x4x2'."""
  m = report['mesh']
  return 'x'.join(str(m.get(a, 1)) for a in ('data', 'fsdp', 'tensor'))


def _micro(report: dict[str, Any]) -> str:
  """' (2 x 16)': the micro-batches of an accumulated step, else ''."""
  steps = int(report.get('grad_accum_steps', 1))
  if steps <= 1:
    return ''
  return f" ({steps} x {report['batch_size'] // steps})"


def refused_temps(report: dict[str, Any]) -> str:
  """The temporaries a refusing compiler asked for ('20.02G'), '-' when
  the report has no such message."""
  found = re.search(r'HLO temporaries \(([\d.]+\w?)\)',
                    report.get('error', ''))
  return found.group(1) if found else '-'


def _seconds(t: float) -> str:
  return f'{t:.2f} s' if t >= 1 else f'{t * 1e3:.2g} ms'
