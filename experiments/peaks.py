"""Dense bf16 peak FLOP/s of accelerators, for 'fraction of peak' numbers.

    peaks.bf16_peak('NVIDIA H100 80GB HBM3')    # 9.89e14
    peaks.fraction(step_flops, step_s, jax.devices()[0].device_kind)

Keys are matched as substrings of JAX's `device.device_kind`, longest first
(so 'H100 PCIe' wins over 'H100', 'TPU v5 lite' over 'TPU v5'). Values are
the vendors' dense (no sparsity) bf16 tensor-core / MXU peaks per JAX
device: a TPU v2/v3 JAX device is one core (half a chip), a v4 and later
device is one chip. CPUs have no entry (their peak is measured, see
`bench_lora`).
"""

BF16_PEAK_FLOPS = {
    'H100 PCIe': 756e12,
    'H100': 989e12,       # SXM
    'H200': 989e12,
    'GH200': 989e12,
    'B200': 2250e12,
    'A100': 312e12,
    'L40S': 362e12,
    'L4': 121e12,
    'TPU v2': 22.5e12,    # per core
    'TPU v3': 61.5e12,    # per core
    'TPU v4': 275e12,
    'TPU v5 lite': 197e12,  # v5e
    'TPU v5': 459e12,     # v5p
    'TPU v6 lite': 918e12,  # v6e (Trillium)
}


def bf16_peak(device_kind: str) -> float | None:
  """The dense bf16 peak FLOP/s of one device of `device_kind` (None when
  the table does not know it)."""
  for key in sorted(BF16_PEAK_FLOPS, key=len, reverse=True):
    if key.lower() in device_kind.lower():
      return BF16_PEAK_FLOPS[key]
  return None


def fraction(flops: float, seconds: float, device_kind: str,
             devices: int = 1) -> float | None:
  """Achieved FLOP/s (`flops` in `seconds`, over `devices` devices) as a
  fraction of their bf16 peak; None for an unknown device."""
  peak = bf16_peak(device_kind)
  if peak is None or seconds <= 0:
    return None
  return flops / seconds / (peak * devices)
