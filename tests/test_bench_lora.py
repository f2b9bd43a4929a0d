"""`experiments.benchmark lora` times the trainer's step, and its PyTorch
side does the same work (tiny `:quick` configs)."""
import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors import numpy as st_numpy

from configs import bench_bert_lora
from configs import bench_t5_lora
from experiments import bench_lora
from experiments import bench_table
from experiments import lora_contenders
from flaxlora import build
from flaxlora import export
from flaxlora import trainer
from flaxlora import workdir as workdir_lib


REPO = pathlib.Path(__file__).resolve().parents[1]


def test_bench_configs_build_offline_in_every_variant():
  for module in (bench_t5_lora, bench_bert_lora):
    for quick in ('', 'quick,'):
      for variant in ('', 'mixed', 'full', 'nodrop'):
        c = module.get_config(quick + variant or None)
        assert c.model.path == '' and c.data.source == 'generated', variant
        method = build.peft_method(c.peft, c.model.family)
        assert (c.peft.method == 'trainable') == (variant == 'full')
        assert method.init
  code = ('import sys; from configs import bench_t5_lora, bench_bert_lora\n'
          'bench_t5_lora.get_config(); bench_bert_lora.get_config("quick")\n'
          'bad = [m for m in sys.modules if m.split(".")[0] in '
          '("jax", "flax", "flaxlora", "numpy")]\n'
          'assert not bad, bad')
  subprocess.run([sys.executable, '-c', code], cwd=REPO, check=True)


def test_benchmark_step_gives_the_update_of_a_one_step_run(tmp_path):
  config = bench_bert_lora.get_config('quick')
  config.train.steps = 1
  trainer.train_and_evaluate(config, tmp_path / 'run')
  saved = st_numpy.load_file(
      str(tmp_path / 'run' / workdir_lib.ADAPTER_DIR / export.ADAPTER_FILE))
  step = lora_contenders.FlaxStep(config, jax.device_count(),
                                  tmp_path / 'bench')
  initial = export.adapter_tensors(jax.device_get(step.state.adapter))
  step()
  stepped = export.adapter_tensors(jax.device_get(step.state.adapter))
  assert sorted(stepped) == sorted(saved)
  for name, value in saved.items():
    np.testing.assert_array_equal(stepped[name], value, err_msg=name)
  assert any(not np.array_equal(initial[n], saved[n]) for n in saved)


def test_peft_side_does_the_trainers_update(tmp_path):
  # Without dropout both sides compute the same losses from the same model,
  # adapter and batch: step 1 checks the loss and its weighting, step 2 the
  # update (clipping, AdamW with weight decay, the schedule).
  config = bench_t5_lora.get_config('quick,nodrop')
  config.optimizer.update(lr=0.05, clip_norm=0.05, warmup_steps=1)
  flax_step = lora_contenders.FlaxStep(config, 1, tmp_path / 'flax')
  torch_step = lora_contenders.TorchStep(config, tmp_path / 'torch',
                                         autocast=False)
  flax_losses = [float(flax_step()['loss']) for _ in range(3)]
  torch_losses = [torch_step() for _ in range(3)]
  np.testing.assert_allclose(torch_losses, flax_losses, rtol=2e-5)
  # Step 1 (warm-up: lr 0) leaves the adapter as it was; step 2 moves it.
  assert flax_losses[1] == flax_losses[0]
  assert abs(flax_losses[2] - flax_losses[1]) > 1e-3 * flax_losses[1]


def test_family_reports_merge_into_one():
  def report(family, peak, summary):
    return {'configs': {f'{family}/flax_fp32': 'c'},
            'results': {f'{family}/flax_fp32': {'median_s': 1.0}},
            'summary': summary, 'peak_rss_gb': peak,
            'matmul_peak': {'jax_flops_per_s': peak}}
  merged = bench_lora.merge([
      report('t5', 2.0, {'t5_fastest_vs_fastest': 1.5, 'bert_x': None,
                         'bert_fastest': {'flax': None, 'peft': None}}),
      report('bert', 1.0, {'t5_fastest_vs_fastest': None, 'bert_x': 1.2,
                           'bert_fastest': {'flax': 'a', 'peft': 'b'}})])
  assert set(merged['results']) == {'t5/flax_fp32', 'bert/flax_fp32'}
  assert merged['summary'] == {'t5_fastest_vs_fastest': 1.5, 'bert_x': 1.2,
                               'bert_fastest': {'flax': 'a', 'peft': 'b'}}
  assert merged['matmul_peak'] == {'jax_flops_per_s': 2.0}
  assert merged['peak_rss_gb'] == 2.0


@pytest.mark.slow  # ~30 s: every contender of both families
def test_quick_benchmark_writes_rows_and_ratios(tmp_path):
  out = tmp_path / 'bench.json'
  report = bench_lora.main(['--quick', '--only', 'bert', '--steps', '1',
                            '--warmup', '0', '--cpu_devices', '1',
                            '--out', str(out)])
  assert json.loads(out.read_text())['summary'] == report['summary']
  results, peak = report['results'], report['matmul_peak']
  assert set(results) == {'bert/flax_fp32', 'bert/flax_mixed',
                          'bert/flax_full', 'bert/peft_fp32',
                          'bert/peft_bf16'}
  assert report['configs']['bert/flax_mixed'] == (
      'configs/bench_bert_lora.py:quick,mixed')
  assert report['summary']['bert_flax_fp32_vs_peft_fp32'] > 0
  assert report['summary']['bert_fastest_vs_fastest'] > 0
  assert results['bert/flax_fp32']['step_flops'] > 0
  # Each precision's share is of its own peak, measured in the same run.
  for name, key in (('flax_fp32', 'jax_flops_per_s'),
                    ('flax_mixed', 'jax_bf16_flops_per_s'),
                    ('peft_bf16', 'torch_bf16_flops_per_s')):
    row = results[f'bert/{name}']
    assert row['fraction_of_matmul_peak'] == pytest.approx(
        row['flops_per_s'] / peak[key])
  assert report['hardware']['cpu_model'] == report['cpu_model']
  assert report['date'] and 'commit' in report
  # The record renders as the page's MiniLM-BERT row.
  (row,) = bench_table.train_rows(report)
  assert row.startswith(f'| {report["cpu_model"]} (') and 'MiniLM-BERT' in row
