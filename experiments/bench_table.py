r"""The benchmark tables of docs/benchmarks.md, generated from records.

    python -m experiments.benchmark lora --out /tmp/lora.json
    python -m experiments.bench_table --add=/tmp/lora.json   # keep the record
    python -m experiments.bench_table                        # write the page

A record is the JSON a benchmark wrote (`lora`, or `generate` of T5 or of
a Llama), kept as `experiments/results/bench/<kind>_<cpu>.json`: one per
benchmark and CPU model, the newest replacing the older; it carries the
run's date, commit and hardware (`provenance.record()`). The page's tables, between its
markers, are made from the records and nothing else: the train step and
generation side by side with PyTorch (ratios > 1: flaxlora faster) and the
matmul peaks measured in the same run.
"""
import json
import pathlib
import re
import sys
from typing import Any

from absl import app
from absl import flags

from flaxlora import atomic
from flaxlora import errors

ROOT = pathlib.Path(__file__).resolve().parents[1]
RECORDS = ROOT / 'experiments' / 'results' / 'bench'
PAGE = ROOT / 'docs' / 'benchmarks.md'
BEGIN, END = '<!-- bench_table: begin -->', '<!-- bench_table: end -->'
FAMILIES = {'t5': 'T5-small', 'bert': 'MiniLM-BERT', 'llama': 'SmolLM2-135M'}


def kind(report: dict[str, Any]) -> str:
  """'lora', 'generate_t5' or 'generate_llama': which benchmark wrote it."""
  if 'configs' in report and 'summary' in report:
    return 'lora'
  if report.get('model') in ('t5', 'llama') and 'tokens_per_s' in report:
    return f'generate_{report["model"]}'
  raise ValueError('not the JSON of `experiments.benchmark lora` or '
                   '`generate` (no configs/summary or tokens_per_s); give '
                   'the file its --out wrote.')


def cpu_of(report: dict[str, Any]) -> str:
  return (report.get('cpu_model') or report.get('hardware', {}).get(
      'cpu_model') or 'unknown CPU')


def record_path(report: dict[str, Any]) -> pathlib.Path:
  slug = re.sub(r'[^a-z0-9]+', '-', cpu_of(report).lower()).strip('-')
  return RECORDS / f'{kind(report)}_{slug}.json'


def add(path: str) -> pathlib.Path:
  """Keeps the benchmark JSON at `path` as a record; returns where."""
  try:
    report = json.loads(pathlib.Path(path).read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f'--add={path}: {e}') from e
  kind(report)  # a benchmark's JSON, or a one-line error
  if 'date' not in report:
    raise ValueError(f'--add={path}: no date, commit or hardware (written '
                     'before benchmarks recorded them); run the benchmark '
                     'again.')
  target = record_path(report)
  target.parent.mkdir(parents=True, exist_ok=True)
  atomic.write_file(target, json.dumps(report, indent=2) + '\n')
  return target


def _ms(row: dict[str, Any] | None) -> str:
  return f'{row["median_s"] * 1e3:.0f}' if row else '—'


def _x(value: float | None) -> str:
  return f'{value:.2f}x' if value else '—'


def _share(row: dict[str, Any] | None) -> str:
  share = row and row.get('fraction_of_matmul_peak')
  return f'{share:.2f}' if share else '—'


def _machine(report: dict[str, Any]) -> str:
  cores = report.get('cpus') or report.get('hardware', {}).get('cores')
  return f'{cpu_of(report)} ({cores})'


def _load(report: dict[str, Any]) -> str:
  """The 1-minute load average when the run ended (the benchmark's own
  two busy cores make about 2)."""
  load = report.get('hardware', {}).get('load_average')
  return f'{load[0]:.1f}' if load else '—'


def train_rows(report: dict[str, Any]) -> list[str]:
  """One row per model family of a `lora` record."""
  rows, results, summary = [], report['results'], report['summary']
  for family, label in FAMILIES.items():
    if f'{family}/flax_fp32' not in results:
      continue
    get = lambda name, f=family: results.get(f'{f}/{name}')
    rows.append(' | '.join([
        '', _machine(report), label, _ms(get('flax_fp32')),
        _ms(get('flax_mixed')), _ms(get('peft_fp32')), _ms(get('peft_bf16')),
        _x(summary.get(f'{family}_flax_fp32_vs_peft_fp32')),
        _x(summary.get(f'{family}_fastest_vs_fastest')),
        _share(get('flax_fp32')), _share(get('flax_mixed')), _load(report),
        report['date'][:10], '']).strip())
  return rows


def generate_row(report: dict[str, Any]) -> str:
  """The row of a `generate` record."""
  tps, model = report['tokens_per_s'], report.get('model', 't5')
  ours = max(tps['flaxlora_fp32'], tps['flaxlora_bf16'])
  theirs = max(tps['torch_fp32'], tps['torch_bf16_autocast'])
  cells = [_machine(report), FAMILIES[model]] + [
      f'{tps[n]:.0f}' for n in ('flaxlora_fp32', 'flaxlora_bf16',
                                'torch_fp32', 'torch_bf16_autocast')] + [
      _x(tps['flaxlora_fp32'] / tps['torch_fp32']),
      _x(tps['flaxlora_bf16'] / tps['torch_bf16_autocast']),
      _x(ours / theirs), f'{report["fp32_token_agreement"]:.3f}',
      _load(report), report['date'][:10]]
  return '| ' + ' | '.join(cells) + ' |'


def peak_row(report: dict[str, Any]) -> str:
  peak = report['matmul_peak']
  cells = [_machine(report), ', '.join(report['cpu_features']) or '—'] + [
      f'{peak[k] / 1e9:.0f}' if k in peak else '—' for k in (
          'jax_flops_per_s', 'torch_flops_per_s', 'jax_bf16_flops_per_s',
          'torch_bf16_flops_per_s')]
  return '| ' + ' | '.join(cells) + ' |'


def markdown(records: list[dict[str, Any]]) -> str:
  """The page's generated part from every record."""
  lora = [r for r in records if kind(r) == 'lora']
  generate = [r for r in records if kind(r).startswith('generate')]
  lines = [
      '### Train step: `python -m experiments.benchmark lora`', '',
      'Milliseconds per step (median); ratios are PEFT time over flaxlora '
      'time; a share is FLOP/s over the matmul peak of the same precision, '
      'measured in the same run; load is the 1-minute load average at the '
      'end (on 2 cores the benchmark itself makes about 2: above that other '
      'work shared the machine; the '
      'contenders of a row run interleaved, step by step, so both sides '
      'share it alike).', '',
      '| CPU (cores) | model | flaxlora fp32 | flaxlora mixed bf16 | PEFT '
      'fp32 | PEFT bf16 autocast | fp32 vs fp32 | fastest vs fastest | fp32 '
      'share of peak | mixed share of bf16 peak | load | date |',
      '|' + '---|' * 12]
  lines += [row for r in lora for row in train_rows(r)]
  lines += [
      '', '### Generation: `python -m experiments.benchmark generate '
      '[--only llama]`', '',
      'Generated tokens per second (greedy, 8 prompts, 64 new tokens, key/'
      'value cache); ratios are flaxlora over transformers. Each runner\'s '
      'calls run back to back (not interleaved), so a load that changes '
      'during the run can favour either side.', '',
      '| CPU (cores) | model | flaxlora fp32 | flaxlora bf16 | transformers '
      'fp32 | transformers bf16 autocast | fp32 vs fp32 | bf16 vs bf16 | '
      'fastest vs fastest | fp32 tokens equal | load | date |',
      '|' + '---|' * 12]
  lines += [generate_row(r) for r in generate]
  lines += ['', '### Matmul peaks of those runs (GFLOP/s, [1024, 1024] '
            'products)', '',
            '| CPU (cores) | matmul ISA features | jax fp32 | torch fp32 | '
            'jax bf16 | torch bf16 |', '|' + '---|' * 6]
  lines += [peak_row(r) for r in lora]
  return '\n'.join(lines)


def records() -> list[dict[str, Any]]:
  return [json.loads(p.read_text()) for p in sorted(RECORDS.glob('*.json'))]


def write_page(page: pathlib.Path = PAGE) -> None:
  text = page.read_text()
  head, begin, rest = text.partition(BEGIN)
  _, end, tail = rest.partition(END)
  if not (begin and end):
    raise ValueError(f'{page}: no {BEGIN} ... {END} markers; put them where '
                     'the tables go.')
  atomic.write_file(page, f'{head}{BEGIN}\n{markdown(records())}\n{END}'
                    f'{tail}')


def define_flags() -> None:
  flags.DEFINE_string('add', None, 'a benchmark JSON to keep as a record '
                      'before the page is written')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  if flags.FLAGS.add:
    print(f'kept {add(flags.FLAGS.add).relative_to(ROOT)}')
  write_page()
  print(f'wrote {PAGE.relative_to(ROOT)}')


def cli(argv=None) -> int:
  """Runs main with `argv` (default sys.argv); returns the exit code."""
  return errors.cli(main, argv)


if __name__ == '__main__':
  define_flags()
  sys.exit(cli())
