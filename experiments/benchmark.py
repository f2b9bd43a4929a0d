"""Benchmarks, one subcommand each.

    python -m experiments.benchmark {generate,lora,qlora,sharding} [--quick] [--out FILE]

The registry is a plain dict: a new benchmark is one module with
`main(argv) -> results` and one entry here.
"""
import sys

from experiments import bench_generate
from experiments import bench_lora
from experiments import bench_qlora
from experiments import bench_sharding

SUBCOMMANDS = {
    'generate': bench_generate.main,
    'lora': bench_lora.main,
    'qlora': bench_qlora.main,
    'sharding': bench_sharding.main,
}


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if not argv or argv[0] not in SUBCOMMANDS:
    print(f'usage: python -m experiments.benchmark '
          f'{{{",".join(sorted(SUBCOMMANDS))}}} [flags]; got {argv[:1]}',
          file=sys.stderr)
    return 2
  SUBCOMMANDS[argv[0]](argv[1:])
  return 0


if __name__ == '__main__':
  sys.exit(main())
