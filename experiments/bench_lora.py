"""LoRA train-step benchmark: flaxlora vs PEFT + PyTorch, side by side.

    python -m experiments.benchmark lora            # full (minutes)
    python -m experiments.benchmark lora --quick    # tiny shapes, seconds
    python -m experiments.bench_lora --out /tmp/bench_lora.json

One process times the train step of two configs, each runnable with
`experiments.run` (random-init models, generated data, no files):
  * configs/bench_t5_lora.py: a T5-small-shaped model (d_model 512, d_ff
    2048, 6+6 layers, 8 heads, vocab 32128; batch 8, source 256, target 64;
    r=8, alpha 16 on q, v; model dropout 0.1), as flaxlora fp32, flaxlora
    mixed (`:mixed`, bf16 products), flaxlora full fine-tuning (`:full`),
    flaxlora without model dropout (`:nodrop`), PEFT fp32 and PEFT under
    bf16 autocast;
  * configs/bench_bert_lora.py: a MiniLM-shaped BERT classifier (hidden
    384, 6 layers, 12 heads; batch 32, length 128; r=8 on query, value;
    classifier head trained), flaxlora (LoRA, full) vs PEFT, fp32;
  * configs/bench_llama_lora.py: a SmolLM2-135M-shaped Llama (hidden 576,
    30 layers, 9/3 heads, MLP 1536, vocab 49152; batch 8 x 512; r=16 on
    all seven projections), flaxlora fp32 and mixed vs PEFT fp32 and bf16
    autocast (`--only llama`).
The flaxlora rows time exactly the step `experiments.run` compiles for the
config (`run_setup.train_step_fn`); the PEFT rows start from the same model
and adapter and do the same work per step (see
`experiments.lora_contenders`). `--quick` uses the configs' `:quick`
variants. Without `--only`, each family runs in a process of its own
(`each_family_apart`) and the reports are merged.
The `*_fp32_dp` rows run the same flaxlora fp32 step data-parallel over
`--cpu_devices` XLA CPU devices (default: one per core; the config's mesh
over them, as `experiments.run --cpu_devices` trains): XLA:CPU runs each
batched attention product on one thread, so one device per core lets two of
them run at once. The other flaxlora rows use one device.
It prints medians, speed ratios, peak RSS and achieved FLOP/s as a fraction
of a measured fp32 matmul peak, and writes everything to JSON. Step flops
come from XLA's cost analysis of the flaxlora step (PEFT does the same math,
so its FLOP/s uses the same count).
"""
import argparse
import gc
import importlib
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import psutil

from experiments import lora_contenders
from experiments import peaks
from flaxlora import host_memory
from flaxlora import provenance

# family -> config module under configs/.
CONFIGS = {'t5': 'bench_t5_lora', 'bert': 'bench_bert_lora',
           'llama': 'bench_llama_lora'}
# family -> rows: (name, config variant, side). Sides: 'flax' (one device),
# 'flax_dp' (--cpu_devices devices), 'peft' (fp32), 'peft_bf16' (autocast).
ROWS = {
    't5': (('flax_fp32', '', 'flax'), ('flax_mixed', 'mixed', 'flax'),
           ('flax_full', 'full', 'flax'),
           ('flax_fp32_nodrop', 'nodrop', 'flax'),
           ('peft_fp32', '', 'peft'), ('peft_bf16', '', 'peft_bf16'),
           ('flax_fp32_dp', '', 'flax_dp')),
    'bert': (('flax_fp32', '', 'flax'), ('flax_mixed', 'mixed', 'flax'),
             ('flax_full', 'full', 'flax'), ('peft_fp32', '', 'peft'),
             ('peft_bf16', '', 'peft_bf16'), ('flax_fp32_dp', '', 'flax_dp')),
    'llama': (('flax_fp32', '', 'flax'), ('flax_mixed', 'mixed', 'flax'),
              ('peft_fp32', '', 'peft'), ('peft_bf16', '', 'peft_bf16')),
}


def config_name(family: str, variant: str, quick: bool) -> str:
  """'configs/bench_t5_lora.py:quick,mixed' (what `experiments.run` takes)."""
  arg = ','.join(filter(None, ('quick' if quick else '', variant)))
  return f'configs/{CONFIGS[family]}.py' + (f':{arg}' if arg else '')


def load_config(family: str, variant: str, quick: bool) -> Any:
  """The config of one row, as `config_name` names it."""
  module = importlib.import_module(f'configs.{CONFIGS[family]}')
  arg = config_name(family, variant, quick).partition(':')[2]
  return module.get_config(arg or None)


def build(config: Any, side: str, devices: int, scratch: pathlib.Path):
  """The contender of one row: a callable step (with `flops` for flaxlora)."""
  if side in ('flax', 'flax_dp'):
    return lora_contenders.FlaxStep(config, devices if side == 'flax_dp'
                                    else 1, scratch)
  return lora_contenders.TorchStep(config, scratch,
                                   autocast=side == 'peft_bf16')


class PeakRss:
  """Samples this process's RSS in a thread; `peak` is the max seen (bytes)."""

  def __init__(self, interval: float = 0.005):
    self.interval, self.peak = interval, 0
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._process = psutil.Process()

  def _run(self):
    while not self._stop.is_set():
      self.peak = max(self.peak, self._process.memory_info().rss)
      time.sleep(self.interval)

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()


def time_steps(step: Callable[[], Any], steps: int, warmup: int
               ) -> dict[str, Any]:
  """Median seconds of `step()` (which blocks) after `warmup` calls."""
  for _ in range(warmup):
    step()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return {'median_s': statistics.median(times), 'times_s': times}


def matmul_peak(n: int) -> dict[str, float]:
  """Measured matmul FLOP/s of JAX and torch on [n, n] x [n, n], fp32 and
  bf16 (keys 'jax_flops_per_s', 'jax_bf16_flops_per_s', 'torch_...').

  The fastest of 7 runs: on a shared machine that is the closest to peak.
  """
  import torch  # pylint: disable=g-import-not-at-top
  mm = jax.jit(lambda a: a @ a)
  peak = {}
  for suffix, jax_dtype, torch_dtype in (('', jnp.float32, torch.float32),
                                         ('_bf16', jnp.bfloat16,
                                          torch.bfloat16)):
    x = jax.random.normal(jax.random.PRNGKey(0), (n, n), jax_dtype)
    jax_t = min(time_steps(lambda: mm(x).block_until_ready(), 7, 2)
                ['times_s'])
    tx = torch.randn(n, n, dtype=torch_dtype)
    torch_t = min(time_steps(lambda: tx @ tx, 7, 2)['times_s'])
    peak[f'jax{suffix}_flops_per_s'] = 2 * n**3 / jax_t
    peak[f'torch{suffix}_flops_per_s'] = 2 * n**3 / torch_t
  return peak


def measure(contenders: dict[str, Callable[[], Any]], steps: int,
            warmup: int) -> dict[str, Any]:
  """Builds all contenders (`build()` -> a step callable, with `flops` for
  flaxlora), then times them round-robin.

  Interleaving the steps (A, B, C, A, B, C, ...) spreads the load of a
  shared machine evenly over the contenders. Memory of a contender is the
  peak RSS growth while it is built and warmed up (params, optimizer state,
  peak activations).
  """
  built = {}
  for name, build_step in contenders.items():
    gc.collect()
    before = psutil.Process().memory_info().rss
    with PeakRss() as rss:
      step = build_step()
      for _ in range(warmup):
        step()
    built[name] = (step, getattr(step, 'flops', None),
                   (rss.peak - before) / 2**20)
    print(f'  built {name:<18} +{built[name][2]:7.0f} MB', flush=True)
  times = {name: [] for name in built}
  for _ in range(steps):
    for name, (step, _, _) in built.items():
      start = time.perf_counter()
      step()
      times[name].append(time.perf_counter() - start)
  results = {}
  for name, (_, flops, memory) in built.items():
    results[name] = {'median_s': statistics.median(times[name]),
                     'min_s': min(times[name]), 'times_s': times[name],
                     'peak_rss_growth_mb': memory, 'step_flops': flops}
    print(f'  {name:<18} median {results[name]["median_s"] * 1e3:9.1f} ms',
          flush=True)
  return results


def run_rows(args: argparse.Namespace, scratch: pathlib.Path
             ) -> tuple[dict[str, Any], dict[str, str]]:
  """(results, {row: config name}) of every row `args` selects."""
  results, names = {}, {}
  for family, rows in ROWS.items():
    if args.only not in (None, family):
      continue
    contenders = {}
    for row, variant, side in rows:
      if side == 'flax_dp' and args.cpu_devices < 2:
        continue
      name = f'{family}/{row}'
      names[name] = config_name(family, variant, args.quick)
      config = load_config(family, variant, args.quick)
      folder = scratch / name.replace('/', '_')
      contenders[name] = (
          lambda c=config, s=side, f=folder: build(c, s, args.cpu_devices, f))
    print(f'{family}:', flush=True)
    results.update(measure(contenders, args.steps, args.warmup))
    gc.collect()
  return results, names


def _ratio(results, slow: str, fast: str, stat: str = 'median_s'
           ) -> float | None:
  if slow in results and fast in results:
    return results[slow][stat] / results[fast][stat]
  return None


def summarize(results: dict[str, Any], peak: dict[str, float]
              ) -> dict[str, Any]:
  """Speed-ups (slow time / fast time; > 1: flaxlora faster), the LoRA
  step time as a fraction of full fine-tuning's, dropout's share of the
  step; `add_peak_shares` adds each row's FLOP/s to `results`."""
  summary = {}
  for family in ROWS:
    if f'{family}/flax_fp32' not in results:  # not run (--only)
      continue
    flax_best = _fastest(results, f'{family}/flax_fp32', f'{family}/flax_mixed')
    peft_best = _fastest(results, f'{family}/peft_fp32', f'{family}/peft_bf16')
    summary.update({
        f'{family}_flax_fp32_vs_peft_fp32': _ratio(
            results, f'{family}/peft_fp32', f'{family}/flax_fp32'),
        f'{family}_fastest_vs_fastest': (
            _ratio(results, peft_best, flax_best)
            if flax_best and peft_best else None),
        f'{family}_fastest': {'flax': flax_best, 'peft': peft_best},
        f'{family}_lora_over_full_step': _ratio(
            results, f'{family}/flax_fp32', f'{family}/flax_full'),
        # The same step data-parallel over one XLA CPU device per core.
        f'{family}_flax_fp32_dp_vs_peft_fp32': _ratio(
            results, f'{family}/peft_fp32', f'{family}/flax_fp32_dp'),
        # Fastest steps: the least disturbed by other load on the machine.
        f'{family}_flax_fp32_vs_peft_fp32_min': _ratio(
            results, f'{family}/peft_fp32', f'{family}/flax_fp32', 'min_s'),
    })
  summary['t5_model_dropout_share_of_lora_step'] = (
      1.0 - 1.0 / _ratio(results, 't5/flax_fp32', 't5/flax_fp32_nodrop')
      if 't5/flax_fp32_nodrop' in results else None)
  add_peak_shares(results, peak)
  return summary


def _fastest(results: dict[str, Any], *names: str) -> str | None:
  return min((n for n in names if n in results),
             key=lambda n: results[n]['median_s'], default=None)


def add_peak_shares(results: dict[str, Any], peak: dict[str, float]) -> None:
  """Each row's FLOP/s and its fraction of the matmul peak of its precision
  (JAX's for flaxlora, torch's for PEFT); on accelerators, of the chip's
  bf16 peak too (`experiments.peaks`)."""
  for name, numbers in results.items():
    model = name.split('/')[0]
    # PEFT does the math of flaxlora's LoRA step: count it with its flops.
    flops = numbers['step_flops'] or results.get(f'{model}/flax_fp32',
                                                 {}).get('step_flops')
    if flops:
      rate = flops / numbers['median_s']
      key = 'torch' if 'peft' in name else 'jax'
      precision = '_bf16' if name.endswith(('_mixed', '_bf16')) else ''
      numbers['flops_per_s'] = rate
      numbers['fraction_of_matmul_peak'] = (
          rate / peak[f'{key}{precision}_flops_per_s'])
      bf16 = peaks.fraction(
          flops, numbers['median_s'], jax.devices()[0].device_kind,
          jax.device_count() if name.endswith('_dp') else 1)
      if bf16 is not None:
        numbers['fraction_of_bf16_peak'] = bf16


def _parse(argv):
  parser = argparse.ArgumentParser(
      prog='bench_lora', description=__doc__,
      formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument('--quick', action='store_true',
                      help="tiny shapes (the configs' :quick variants)")
  parser.add_argument('--steps', type=int, default=None,
                      help='timed steps per contender (default 5; quick 3)')
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--only', choices=tuple(ROWS), default=None)
  parser.add_argument('--cpu_devices', type=int, default=os.cpu_count() or 1,
                      help='XLA CPU devices of the *_fp32_dp rows (default: '
                      'one per core); 1 drops those rows')
  parser.add_argument('--out', default='bench_lora.json', help='JSON file')
  args = parser.parse_args(argv)
  args.steps = args.steps or (3 if args.quick else 5)
  return args


def merge(reports: list[dict[str, Any]]) -> dict[str, Any]:
  """One report of several families' reports (`--only` runs): their rows,
  configs and summaries together, each matmul peak the highest measured
  (every row's share stays that of its own run's peak)."""
  merged = dict(reports[-1])
  for key in ('configs', 'results'):
    merged[key] = {k: v for r in reports for k, v in r[key].items()}
  merged['summary'] = {k: v for r in reports for k, v in r['summary'].items()
                       if v is not None}
  merged['matmul_peak'] = {k: max(r['matmul_peak'][k] for r in reports)
                           for k in reports[-1]['matmul_peak']}
  merged['peak_rss_gb'] = max(r['peak_rss_gb'] for r in reports)
  return merged


def each_family_apart(args: argparse.Namespace) -> dict[str, Any]:
  """Every family's `--only` run in a process of its own, merged.

  A process that keeps freed host memory (`host_memory`) holds the largest
  step's temporaries until it exits; one process for every family would
  hold them all (the SmolLM2-shaped step alone needs 9 GB).
  """
  flags = ['--steps', str(args.steps), '--warmup', str(args.warmup),
           '--cpu_devices', str(args.cpu_devices)] + (
               ['--quick'] if args.quick else [])
  release = [] if host_memory.kept() else ['--release_freed_memory']
  reports = []
  with tempfile.TemporaryDirectory(prefix='bench_lora_') as scratch:
    for family in ROWS:
      out = pathlib.Path(scratch) / f'{family}.json'
      subprocess.run([sys.executable, '-m', 'experiments.benchmark', *release,
                      'lora', *flags, '--only', family, '--out', str(out)],
                     check=True)
      reports.append(json.loads(out.read_text()))
  return merge(reports)


def main(argv=None) -> dict[str, Any]:
  args = _parse(sys.argv[1:] if argv is None else argv)
  if args.only is None:
    report = each_family_apart(args)
    print(json.dumps(report['summary'], indent=2))
    with open(args.out, 'w') as f:
      json.dump(report, f, indent=2)
    print(f'wrote {args.out}')
    return report
  if args.cpu_devices > 1:  # before JAX starts its CPU backend
    jax.config.update('jax_num_cpu_devices', args.cpu_devices)
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count() or 1)
  size = 256 if args.quick else 1024
  peak = matmul_peak(size)
  print(f'matmul peak (GFLOP/s): fp32 jax {peak["jax_flops_per_s"] / 1e9:.1f}'
        f', torch {peak["torch_flops_per_s"] / 1e9:.1f}; bf16 jax '
        f'{peak["jax_bf16_flops_per_s"] / 1e9:.1f}, torch '
        f'{peak["torch_bf16_flops_per_s"] / 1e9:.1f}; '
        f'{os.cpu_count()} CPUs of {provenance.cpu_model()} with '
        f'{", ".join(provenance.cpu_features()) or "no listed ISA features"} '
        '(shared machines make numbers noisy)')
  with tempfile.TemporaryDirectory(prefix='bench_lora_') as scratch:
    results, configs = run_rows(args, pathlib.Path(scratch))
  later = matmul_peak(size)  # the load may have changed meanwhile
  peak = {k: max(v, later[k]) for k, v in peak.items()}
  summary = summarize(results, peak)
  report = {'configs': configs, 'quick': args.quick, 'steps': args.steps,
            'cpus': os.cpu_count(), 'cpu_devices_of_dp_rows': args.cpu_devices,
            'host_memory_kept': host_memory.kept(),
            'cpu_model': provenance.cpu_model(),
            'cpu_features': list(provenance.cpu_features()),
            'peak_rss_gb': provenance.peak_rss_gb(),
            'matmul_peak': peak, 'results': results, 'summary': summary,
            **provenance.record()}
  print(json.dumps(summary, indent=2))
  for name, numbers in results.items():  # GPU/TPU: experiments.peaks
    if 'fraction_of_bf16_peak' in numbers:
      print(f'{name}: {numbers["median_s"] * 1e3:.1f} ms/step, '
            f'{numbers["fraction_of_bf16_peak"]:.1%} of the bf16 peak')
  with open(args.out, 'w') as f:
    json.dump(report, f, indent=2)
  print(f'wrote {args.out}')
  return report


if __name__ == '__main__':
  main()
