r"""Mutation check: small semantic bugs planted one at a time must fail tests.

    nice -n 19 python -m experiments.mutants            # every mutant
    nice -n 19 python -m experiments.mutants clip_noop  # some of them

Each mutant replaces one exact snippet of one library file (the snippet must
occur exactly once, so a refactor that moves it fails loudly here instead of
silently testing nothing) in a copy of the repository (flaxlora/, configs/,
tests/, setup.cfg under a temporary folder), then runs only the tests that
should catch it with `python -m pytest -x` in that copy. A mutant is caught
when pytest reports failing tests (exit status 1); any other status (a
collection error, no tests run) counts as not caught. Prints a Markdown
table and exits 1 if any mutant survives. Not part of the default suite: it
takes ~10-20 minutes on 2 cores.

Why not mutmut: it mutates operators and constants at random over whole
files and runs the (given) test command for each, i.e. hundreds of mutants
each costing a JAX compile; on 2 shared cores that is hours, and most of
its mutants (a changed default in an error message) say little. The bugs
that matter here are semantic (a dropped LoRA term in bf16, a no-op
clipping) and each has a few tests that must see it, which a list states.
"""
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

REPO = pathlib.Path(__file__).resolve().parents[1]
COPIED = ('flaxlora', 'configs', 'tests', 'setup.cfg')
EFFECTS = 'tests/test_config_effects.py::test_changing_the_field_changes_' \
          'what_it_should'
BEHAVIOUR = 'tests/test_trainer_behaviour.py'


class Mutant(NamedTuple):
  name: str
  path: str       # a file of the package
  old: str        # an exact snippet, found once
  new: str
  tests: tuple    # pytest node ids / files that must catch it


MUTANTS = (
    Mutant('lora_dropped_in_bf16', 'flaxlora/peft/lora/kernel.py',
           '    if self.magnitude is None:\n      return (y + lora_out)',
           '    if dtype == jnp.bfloat16:\n      lora_out = 0.0 * lora_out\n'
           '    if self.magnitude is None:\n      return (y + lora_out)',
           ('tests/test_bf16.py::test_bf16_adapter_effect_matches_fp32'
            '[bert_lora]',)),
    Mutant('clip_noop', 'flaxlora/steps.py', '  if clip_norm:\n',
           '  if False:\n',
           (f'{BEHAVIOUR}::test_clipping_bounds_the_update',)),
    Mutant('accumulation_repeats_first_micro_batch', 'flaxlora/steps.py',
           '  micro = _micro_batches(batch, accum)\n',
           '  micro = _micro_batches(batch, accum)\n  micro = jax.tree.map('
           'lambda x: jnp.repeat(x[:1], accum, 0), micro)\n',
           (f'{BEHAVIOUR}::test_accumulation_of_k_micro_batches_equals_one_'
            'batch_of_k_times',)),
    Mutant('accumulation_mean_of_means', 'flaxlora/steps.py',
           '  denominator = jnp.maximum(weight, 1.0)\n',
           '  denominator = jnp.maximum(weight, 1.0) * (1.0 if accum == 1 '
           'else 1.5)\n',
           (f'{BEHAVIOUR}::test_accumulation_of_k_micro_batches_equals_one_'
            'batch_of_k_times',)),
    Mutant('dropout_ignored', 'flaxlora/tasks.py',
           "deterministic=False,\n                     rngs={'dropout': rng}",
           "deterministic=True,\n                     rngs={'dropout': rng}",
           (f'{BEHAVIOUR}::test_dropout_changes_the_loss_with_the_rng_and_'
            'only_with_it',)),
    Mutant('num_beams_ignored', 'flaxlora/trainer.py',
           'num_beams=e.num_beams,', 'num_beams=1,',
           (f'{EFFECTS}[eval.num_beams]',)),
    Mutant('length_penalty_ignored', 'flaxlora/trainer.py',
           'length_penalty=e.length_penalty,', 'length_penalty=1.0,',
           (f'{EFFECTS}[eval.length_penalty]',)),
    Mutant('epochs_ignored', 'flaxlora/run_setup.py',
           'math.ceil(t.epochs * steps_per_epoch)', 'steps_per_epoch',
           (f'{EFFECTS}[train.epochs]',)),
    Mutant('best_mode_ignored', 'flaxlora/trainer.py',
           "pick = max if c.checkpoint.best_mode == 'max' else min",
           'pick = max',
           (f'{BEHAVIOUR}::test_best_mode_picks_the_lowest_or_highest_eval',)),
    Mutant('eval_batch_size_ignored', 'flaxlora/run_setup.py',
           'global_batch_size=t.eval_batch_size',
           'global_batch_size=t.batch_size',
           (f'{EFFECTS}[train.eval_batch_size]',)),
    Mutant('sharding_override_ignored', 'flaxlora/run_setup.py',
           "rules = sharding.resolve_rules(config.get('sharding_rules', "
           'None))', 'rules = sharding.resolve_rules(None)',
           (f'{EFFECTS}[sharding_rules.embed]',)),
    Mutant('embed_rule_replicated', 'flaxlora/sharding.py',
           "    ('embed', 'fsdp'),", "    ('embed', None),",
           ('tests/test_sharding.py',)),
    Mutant('weight_decay_ignored', 'flaxlora/optimizers.py',
           'weight_decay=opt.weight_decay)', 'weight_decay=0.0)',
           (f'{EFFECTS}[optimizer.weight_decay]',)),
    Mutant('rslora_scale_ignored', 'flaxlora/peft/lora/kernel.py',
           'math.sqrt(rank) if self.use_rslora else rank', 'rank',
           (f'{EFFECTS}[peft.use_rslora]',)),
    Mutant('split_seed_ignored', 'flaxlora/data/task_data.py',
           "  train = _subset(train, config.data.max_train_examples,\n"
           "                  config.data.split_seed,",
           "  train = _subset(train, config.data.max_train_examples,\n"
           "                  0,",
           (f'{EFFECTS}[data.split_seed]',)),
    Mutant('keep_ignored', 'flaxlora/trainer.py',
           'keep=c.checkpoint.keep,', 'keep=2,',
           (f'{EFFECTS}[checkpoint.keep]',)),
    Mutant('export_base_name_ignored', 'flaxlora/trainer.py',
           'reference = (run.config.peft_export.base_model_name_or_path or',
           'reference = (\'\' or',
           (f'{EFFECTS}[peft_export.base_model_name_or_path]',)),
)


def _copy(root: pathlib.Path) -> None:
  for name in COPIED:
    source = REPO / name
    if source.is_dir():
      shutil.copytree(source, root / name, ignore=shutil.ignore_patterns(
          '__pycache__'))
    else:
      shutil.copy2(source, root / name)


def run_mutant(mutant: Mutant, root: pathlib.Path) -> tuple[str, float]:
  """('caught' | 'SURVIVED (status N)', seconds) of one mutant in `root`."""
  target = root / mutant.path
  original = target.read_text()
  if original.count(mutant.old) != 1:
    raise ValueError(f'mutant {mutant.name}: its snippet occurs '
                     f'{original.count(mutant.old)} times in {mutant.path} '
                     '(must be once); update MUTANTS in '
                     'experiments/mutants.py.')
  target.write_text(original.replace(mutant.old, mutant.new))
  tic = time.perf_counter()
  try:
    result = subprocess.run(
        [sys.executable, '-m', 'pytest', '-q', '-x', '-n', '0', '-m', 'slow or not slow',
         *mutant.tests], cwd=root,
        capture_output=True, text=True, check=False)
  finally:
    target.write_text(original)
  seconds = time.perf_counter() - tic
  status = ('caught' if result.returncode == 1 else
            f'SURVIVED (pytest status {result.returncode})')
  return status, seconds


def main(names: list[str]) -> int:
  chosen = [m for m in MUTANTS if not names or m.name in names]
  unknown = set(names) - {m.name for m in MUTANTS}
  if unknown:
    raise SystemExit(f'unknown mutants {sorted(unknown)}; known: '
                     f'{[m.name for m in MUTANTS]}')
  with tempfile.TemporaryDirectory(prefix='flaxlora_mutants_') as folder:
    root = pathlib.Path(folder)
    _copy(root)
    rows, survived = [], 0
    for mutant in chosen:
      status, seconds = run_mutant(mutant, root)
      survived += status != 'caught'
      rows.append(f'| {mutant.name} | `{mutant.path}` | '
                  f'{", ".join(t.split("/")[-1] for t in mutant.tests)} | '
                  f'{status} | {seconds:.0f} |')
      print(rows[-1], flush=True)
  print('\n| mutant | file | tests | result | s |\n|---|---|---|---|---|')
  print('\n'.join(rows))
  print(f'\n{len(chosen) - survived}/{len(chosen)} mutants caught.')
  return 1 if survived else 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
