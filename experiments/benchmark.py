"""Benchmarks, one subcommand each.

    python -m experiments.benchmark [--release_freed_memory] \
        {generate,lora,multi,qlora,sharding} [--quick] [--out FILE] [--traceback]

Before anything else the process keeps freed host memory mapped
(`flaxlora.host_memory`: XLA:CPU's per-step temporary buffer is then not
page-faulted in anew every step; PyTorch's large tensors benefit alike, as
both sides share the process). `--release_freed_memory` leaves glibc's
malloc as it is, to measure the difference.

The registry is a plain dict: a new benchmark is one module with
`main(argv) -> results` and one entry here.
"""
import sys

from flaxlora import errors
from flaxlora import host_memory

from experiments import bench_generate
from experiments import bench_lora
from experiments import bench_multi
from experiments import bench_qlora
from experiments import bench_sharding

SUBCOMMANDS = {
    'generate': bench_generate.main,
    'lora': bench_lora.main,
    'multi': bench_multi.main,
    'qlora': bench_qlora.main,
    'sharding': bench_sharding.main,
}


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv[:1] == ['--release_freed_memory']:
    argv = argv[1:]
  else:
    host_memory.keep_freed_memory()
  if not argv or argv[0] not in SUBCOMMANDS:
    print(f'usage: python -m experiments.benchmark [--release_freed_memory] '
          f'{{{",".join(sorted(SUBCOMMANDS))}}} [flags]; got {argv[:1]}',
          file=sys.stderr)
    return 2
  show = errors.wants_traceback(argv)
  rest = [a for a in argv[1:] if a != '--traceback']
  return errors.guarded(lambda: SUBCOMMANDS[argv[0]](rest), show)


if __name__ == '__main__':
  sys.exit(main())
