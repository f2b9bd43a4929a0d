"""Defaults chosen from the machine: `model.dtype='auto'` picks bf16 products
where the CPU has bf16 matmul instructions, `experiments.run` keeps freed
host memory only on hosts with memory to spare, and run records name the
CPU's matmul features and the peak resident memory."""
import jax.numpy as jnp
import pytest

from flaxlora import build
from flaxlora import host_memory
from flaxlora import provenance


@pytest.mark.parametrize('features, expected', [
    (('avx2', 'fma', 'avx512f', 'avx512_bf16'), jnp.bfloat16),
    (('avx2', 'amx_tile', 'amx_bf16'), jnp.bfloat16),
    (('avx2', 'fma', 'avx512f'), jnp.float32),
    ((), jnp.float32),
])
def test_auto_dtype_follows_the_cpu(monkeypatch, capsys, features, expected):
  monkeypatch.setattr(provenance, 'cpu_features', lambda: features)
  assert build.compute_dtype('auto') == expected
  said = capsys.readouterr().out
  assert ('bfloat16 products' in said) == (expected == jnp.bfloat16)


def test_named_dtypes_stay_and_unknown_is_an_error():
  assert build.compute_dtype('float32') == jnp.float32
  assert build.compute_dtype('bfloat16') == jnp.bfloat16
  with pytest.raises(ValueError, match=r"model.dtype='fp16'.*'auto'"):
    build.compute_dtype('fp16')


@pytest.mark.parametrize('total, keep', [(16.0, False), (24.0, True),
                                         (None, False)])
def test_freed_memory_is_kept_only_on_hosts_with_memory_to_spare(
    monkeypatch, total, keep):
  monkeypatch.setattr(host_memory, 'total_memory_gb', lambda: total)
  assert host_memory.keep_by_default() is keep


def test_records_name_the_cpu_features_and_peak_memory():
  record = provenance.record()['hardware']
  assert set(record['cpu_features']) <= set(provenance.MATMUL_FEATURES)
  assert record['peak_rss_gb'] > 0
  assert provenance.has_bf16_matmul() == any(
      f in record['cpu_features'] for f in provenance.BF16_FEATURES)
