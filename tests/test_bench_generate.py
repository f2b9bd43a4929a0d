"""Smoke run of `python -m experiments.benchmark generate --quick`."""
import math

from experiments import bench_generate


def test_quick_generate_benchmark_agrees_and_splits_encoder_from_loop():
  results = bench_generate.run_benchmark(bench_generate.QUICK, repeats=1,
                                         cpu_devices=2)
  assert results['fp32_token_agreement'] == 1.0
  assert results['fp32_tp_token_agreement_with_fp32'] == 1.0
  for name in ('torch_fp32', 'flaxlora_fp32'):
    split = results['split'][name]  # tiny shapes: sub-ms, so no ordering
    assert split['encoder_s'] > 0
    assert math.isfinite(split['loop_ms_per_step'])
  assert set(results['ratios']) >= {'flaxlora_fp32/torch_fp32',
                                    'flaxlora_fp32_tp/torch_fp32'}


def test_quick_llama_generate_benchmark_agrees():
  results = bench_generate.run_llama(bench_generate.LLAMA_QUICK, repeats=1)
  assert results['fp32_token_agreement'] == 1.0
  assert results['fastest_vs_fastest'] > 0
