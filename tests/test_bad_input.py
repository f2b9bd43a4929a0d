"""Every bad input is a one-line error (exit 2) and nothing is lost.

Each case runs `experiments.run` in-process (`run.cli(argv)`) from a scratch
current directory, next to a real finished run (a tiny BERT, 4 steps) and
checks the message, the exit code, and that sha256 listings of that run and
of the current directory are unchanged. Most cases fail before anything is
compiled. Then: two runs in one workdir (one refused), SIGTERM (a checkpoint
at the signal; the resumed run ends with the uninterrupted adapter bytes),
a NaN stop whose message is a command that continues the run, and the
compatible changes that continue a finished run.
"""
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from experiments import run as run_cli
from flaxlora import claim
from flaxlora import errors

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = f'--config={REPO}/configs/bert_sentiment_lora.py:runlocal'
T5_CONFIG = f'--config={REPO}/configs/t5_lora.py:runlocal'
SHORT = ['--config.train.steps=4', '--config.train.checkpoint_every=2',
         '--config.train.eval_every=4', '--config.train.log_every=2']


def listing(folder: pathlib.Path) -> dict[str, str]:
  """{relative path: sha256} of every file under `folder`."""
  return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes())
          .hexdigest() for p in sorted(folder.rglob('*')) if p.is_file()}


def cli(*args: str) -> int:
  return run_cli.cli(['experiments.run', *args])


@pytest.fixture(scope='module')
def finished(tmp_path_factory) -> pathlib.Path:
  """A finished 4-step run (checkpoints 2 and 4)."""
  workdir = tmp_path_factory.mktemp('seed') / 'run'
  assert cli(CONFIG, f'--workdir={workdir}', *SHORT) == 0
  return workdir


def _data(folder: pathlib.Path, name: str, text: str) -> str:
  path = folder / name
  path.write_text(text)
  return str(path)


def _files(train: str) -> list[str]:
  return ['--config.data.source=files', f'--config.data.train_file={train}',
          f'--config.data.eval_file={train}']


# (id, args (callable of a dict of paths), message substring, exit code).
# Paths: new (absent), run (a copy of the finished run), file, cwd, tmp.
CASES = [
    # --- flags and the command line
    ('empty_workdir', lambda p: [CONFIG, '--workdir='], 'is empty', 2),
    ('blank_workdir', lambda p: [CONFIG, '--workdir=  '], 'is empty', 2),
    ('empty_overwrite', lambda p: [CONFIG, '--workdir=', '--overwrite'],
     'is empty', 2),
    ('workdir_is_file', lambda p: [CONFIG, f'--workdir={p["file"]}'],
     'is a file, not a folder', 2),
    ('workdir_under_file', lambda p: [CONFIG, f'--workdir={p["file"]}/x'],
     'is under the file', 2),
    ('mistyped_key', lambda p: [CONFIG, f'--workdir={p["new"]}',
                                '--config.train.stepz=3'],
     '--config.train.stepz: no such config key', 2),
    ('bad_int', lambda p: [CONFIG, f'--workdir={p["new"]}',
                           '--config.train.steps=abc'],
     "invalid literal for int() with base 10: 'abc'", 2),
    ('unknown_variant', lambda p: [CONFIG + 'z', f'--workdir={p["new"]}'],
     "unknown config variant 'runlocalz'", 2),
    ('missing_config_file', lambda p: [
        f'--config={p["tmp"]}/nope.py', f'--workdir={p["new"]}'],
     'nope.py', 2),
    ('positional_arg', lambda p: [CONFIG, f'--workdir={p["new"]}', 'extra'],
     "unexpected arguments: ['extra']", 2),
    ('unknown_flag', lambda p: [CONFIG, f'--wrkdir={p["new"]}'],
     "Unknown command line flag 'wrkdir'", 2),
    # --- config values
    ('batch_size_0', lambda p: [CONFIG, f'--workdir={p["new"]}',
                                '--config.train.batch_size=0'],
     'train.batch_size=0 must be >= 1', 2),
    ('batch_size_negative', lambda p: [CONFIG, f'--workdir={p["new"]}',
                                       '--config.train.batch_size=-4'],
     'train.batch_size=-4 must be >= 1', 2),
    ('eval_batch_size_0', lambda p: [CONFIG, f'--workdir={p["new"]}',
                                     '--config.train.eval_batch_size=0'],
     'train.eval_batch_size=0 must be >= 1', 2),
    ('steps_negative', lambda p: [CONFIG, f'--workdir={p["new"]}',
                                  '--config.train.steps=-1'],
     'train.steps=-1 must be >= 0', 2),
    ('no_steps', lambda p: [CONFIG, f'--workdir={p["new"]}',
                            '--config.train.steps=0'],
     'train.steps and train.epochs are both 0', 2),
    ('keep_0', lambda p: [CONFIG, f'--workdir={p["new"]}',
                          '--config.checkpoint.keep=0'],
     'checkpoint.keep=0 must be >= 1', 2),
    ('best_mode', lambda p: [CONFIG, f'--workdir={p["new"]}',
                             '--config.checkpoint.best_mode=avg'],
     "checkpoint.best_mode='avg'", 2),
    ('best_metric', lambda p: [CONFIG, f'--workdir={p["new"]}',
                               '--config.checkpoint.best_metric=rouge1'],
     "best_metric='rouge1' is not an eval metric", 2),
    ('grad_accum', lambda p: [CONFIG, f'--workdir={p["new"]}',
                              '--config.optimizer.grad_accum_steps=3'],
     'grad_accum_steps=3 must divide train.batch_size=16', 2),
    ('lr_negative', lambda p: [CONFIG, f'--workdir={p["new"]}',
                               '--config.optimizer.lr=-1'],
     'optimizer.lr=-1.0 must be >= 0', 2),
    ('clip_negative', lambda p: [CONFIG, f'--workdir={p["new"]}',
                                 '--config.optimizer.clip_norm=-1'],
     'optimizer.clip_norm=-1.0 must be >= 0', 2),
    ('schedule', lambda p: [CONFIG, f'--workdir={p["new"]}',
                            '--config.optimizer.schedule=bogus'],
     "optimizer.schedule='bogus'", 2),
    ('optimizer_name', lambda p: [CONFIG, f'--workdir={p["new"]}',
                                  '--config.optimizer.name=sgd'],
     "optimizer.name='sgd'", 2),
    ('rank_too_large', lambda p: [CONFIG, f'--workdir={p["new"]}',
                                  '--config.peft.rank=1000'],
     'lora rank 1000 for', 2),
    ('targets_match_nothing', lambda p: [CONFIG, f'--workdir={p["new"]}',
                                         '--config.peft.targets=nothing'],
     "lora targets 'nothing' matched no parameter", 2),
    ('peft_method', lambda p: [CONFIG, f'--workdir={p["new"]}',
                               '--config.peft.method=bogus'],
     "peft.method='bogus' is not known", 2),
    ('peft_field_of_another_method', lambda p: [
        CONFIG, f'--workdir={p["new"]}', '--config.peft.method=ia3',
        '--config.peft.rank=16'],
     "peft.rank=16 is not an argument of peft method 'ia3'; its arguments "
     "are ['targets', 'feedforward']", 2),
    ('dtype', lambda p: [CONFIG, f'--workdir={p["new"]}',
                         '--config.model.dtype=float16'],
     "model.dtype='float16'", 2),
    ('pooling', lambda p: [CONFIG, f'--workdir={p["new"]}',
                           '--config.model.pooling=max'],
     "model.pooling='max': use one of", 2),
    ('pooling_of_qa', lambda p: [CONFIG, f'--workdir={p["new"]}',
                                 '--config.model.pooling=mean',
                                 '--config.model.head=qa'],
     "model.pooling='mean' with model.head='qa'", 2),
    ('pooling_of_t5', lambda p: [T5_CONFIG, f'--workdir={p["new"]}',
                                 '--config.model.pooling=mean'],
     "model.pooling='mean' is for BERT classifiers", 2),
    ('batch_vs_mesh', lambda p: [CONFIG, f'--workdir={p["new"]}',
                                 '--config.train.batch_size=12'],
     'train.batch_size=12: global batch size 12 must divide by the 8', 2),
    ('task', lambda p: [CONFIG, f'--workdir={p["new"]}',
                        '--config.task=bogus'],
     "task='bogus': use one of", 2),
    ('few_examples', lambda p: [CONFIG, f'--workdir={p["new"]}',
                                '--config.data.generated.num_train=8'],
     'fewer than train.batch_size=16', 2),
    # --- data files
    ('train_file_missing', lambda p: [CONFIG, f'--workdir={p["new"]}',
                                      *_files(f'{p["tmp"]}/none.tsv')],
     'none.tsv\' does not exist', 2),
    ('train_file_folder', lambda p: [CONFIG, f'--workdir={p["new"]}',
                                     *_files(p['tmp'])], 'is a folder', 2),
    ('json_array_item', lambda p: [CONFIG, f'--workdir={p["new"]}', *_files(
        _data(p['tmp'], 'a.json', '[{"sentence": "a", "label": "0"}, 3]'))],
     'element 1 of the array is a JSON int', 2),
    ('jsonl_null', lambda p: [CONFIG, f'--workdir={p["new"]}', *_files(
        _data(p['tmp'], 'n.jsonl', '{"sentence": null, "label": "0"}\n'))],
     "n.jsonl:1: field 'sentence' is null", 2),
    ('csv_stray_quote', lambda p: [CONFIG, f'--workdir={p["new"]}', *_files(
        _data(p['tmp'], 'q.csv', 'sentence,label\na,0\n"b,1\n' +
              'c,0\n' * 50))],
     'q.csv:3: 1 fields where the header (line 1) has 2', 2),
    ('tsv_huge_field', lambda p: [CONFIG, f'--workdir={p["new"]}', *_files(
        _data(p['tmp'], 'h.tsv', 'sentence\tlabel\n' + 'a' * 200_000 +
              '\t0\nb\n'))],
     'h.tsv:3: 1 fields where the header', 2),
    ('bad_utf8', lambda p: [CONFIG, f'--workdir={p["new"]}', *_files(
        str(_bytes(p['tmp'] / 'u.tsv', b'sentence\tlabel\n\xff\t0\n')))],
     'u.tsv:2: not valid UTF-8', 2),
    # --- the workdir
    ('overwrite_cwd', lambda p: [CONFIG, f'--workdir={p["cwd"]}',
                                 '--overwrite'],
     'is the current directory', 2),
    ('overwrite_dot', lambda p: [CONFIG, '--workdir=.', '--overwrite'],
     'is the current directory', 2),
    ('overwrite_parent_of_runs', lambda p: [
        CONFIG, f'--workdir={p["run"].parent}', '--overwrite'],
     'is a folder of runs (run/', 2),
    ('overwrite_foreign', lambda p: [CONFIG, f'--workdir={p["foreign"]}',
                                     '--overwrite'],
     'files flaxlora did not write: notes.txt', 2),
    ('overwrite_git', lambda p: [CONFIG, f'--workdir={p["git"]}',
                                 '--overwrite'], 'is a git checkout', 2),
    ('overwrite_home', lambda p: [CONFIG, f'--workdir={p["home"]}',
                                  '--overwrite'], 'is your home folder', 2),
    ('foreign_no_overwrite', lambda p: [CONFIG, f'--workdir={p["foreign"]}'],
     'a run needs a new or empty folder', 2),
    ('incompatible_change', lambda p: [CONFIG, f'--workdir={p["run"]}',
                                       *SHORT, '--config.peft.rank=4'],
     '1 incompatible keys: peft.rank: 8 -> 4', 2),
    ('fewer_steps', lambda p: [CONFIG, f'--workdir={p["run"]}',
                               '--config.train.steps=2'],
     'already trained 4 steps, more than the 2', 2),
    ('corrupt_config_json', lambda p: [
        CONFIG, f'--workdir={_bytes(p["run"] / "config.json", b"{").parent}',
        *SHORT], 'config.json is not valid JSON', 2),
    ('locked', lambda p: [CONFIG, f'--workdir={_lock(p["run"])}', *SHORT,
                          '--config.train.steps=6'],
     f'is in use by another run (pid {os.getpid()}', 2),
    ('no_intact_checkpoint', lambda p: [
        CONFIG, f'--workdir={_break_checkpoints(p["run"])}', *SHORT,
        '--config.train.steps=6'], 'no intact checkpoint in', 2),
    # --- model and adapter folders
    ('model_path_missing', lambda p: [CONFIG, f'--workdir={p["new"]}',
                                      f'--config.model.path={p["tmp"]}/m'],
     '/m', 2),
    ('model_path_pkg', lambda p: [CONFIG, f'--workdir={p["new"]}',
                                  '--config.model.path=pkg:no_such_pkg/x'],
     'no_such_pkg', 2),
]


def _bytes(path: pathlib.Path, content: bytes) -> pathlib.Path:
  path.write_bytes(content)
  return path


def _lock(workdir: pathlib.Path) -> pathlib.Path:
  """A lock of this (live) process, as a second run would see it."""
  (workdir / 'run.lock').write_text(json.dumps(
      {'pid': os.getpid(), 'host': os.uname().nodename, 'since': 'now'}))
  return workdir


def _break_checkpoints(workdir: pathlib.Path) -> pathlib.Path:
  for step in ('2', '4'):
    (workdir / 'checkpoints' / step / 'state' / '_METADATA').write_text('')
  return workdir


def _paths(tmp: pathlib.Path, finished: pathlib.Path) -> dict:
  paths = {'tmp': tmp, 'new': tmp / 'new_run', 'cwd': tmp / 'cwd'}
  paths['run'] = tmp / 'runs' / 'run'
  shutil.copytree(finished, paths['run'])
  paths['file'] = tmp / 'a_file'
  paths['file'].write_text('x')
  for name, extra in (('foreign', 'notes.txt'), ('git', '.git/HEAD'),
                      ('home', '.bashrc')):
    paths[name] = tmp / name
    (paths[name] / extra).parent.mkdir(parents=True)
    (paths[name] / extra).write_text('keep me')
  (paths['git'] / 'config.json').write_text('{}')
  (paths['home'] / 'config.json').write_text('{}')
  paths['cwd'].mkdir()
  (paths['cwd'] / 'source.py').write_text('keep me')
  return paths


@pytest.mark.parametrize('name, args, message, code', CASES,
                         ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_loses_nothing(
    tmp_path, finished, monkeypatch, capsys, name, args, message, code):
  paths = _paths(tmp_path, finished)
  monkeypatch.chdir(paths['cwd'])
  monkeypatch.setenv('HOME', str(paths['home']))
  argv = args(paths)  # may set up a broken file in a copied run
  before = listing(tmp_path)
  assert cli(*argv) == code, name
  err = capsys.readouterr().err
  lines = [l for l in err.splitlines() if l.startswith('flaxlora: error')]
  assert len(lines) == 1 and message in lines[0], err[-2000:]
  assert 'Traceback' not in err, err[-2000:]
  assert listing(tmp_path) == before
  assert not paths['new'].exists()


def test_traceback_flag_shows_the_traceback(tmp_path, capsys):
  assert cli(CONFIG, f'--workdir={tmp_path / "x"}', '--traceback',
             '--config.train.batch_size=0') == 2
  err = capsys.readouterr().err
  assert 'Traceback' in err and 'flaxlora/validate.py' in err
  assert err.splitlines()[-1].startswith('flaxlora: error: train.batch_size')


def test_internal_errors_exit_1_with_their_traceback(capsys):
  def main(argv):
    del argv
    raise ValueError('not ours')  # raised here, outside flaxlora's code
  assert errors.guarded(lambda: main([])) == 1
  assert 'Traceback' in capsys.readouterr().err


def _subprocess(args, **kw):
  return subprocess.run([sys.executable, '-m', *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300, **kw)


@pytest.mark.parametrize('args, message', [
    (['experiments.sweep', CONFIG, '--workdir='], '--workdir=\'\' is empty'),
    (['experiments.inspect_run', '--workdir=/nonexistent/run'],
     'run in /nonexistent/run has not finished'),
    (['experiments.benchmark', 'nope'], 'usage: python -m experiments'),
    (['experiments.evaluate', '--workdir=/nonexistent/run',
      '--config.eval.num_beams=2'], '--workdir must be the folder'),
    (['experiments.predict', '--text=hi'], 'pass --workdir=RUN or --peft'),
], ids=['sweep', 'inspect_run', 'benchmark', 'evaluate', 'predict'])
def test_other_entry_points(args, message):
  result = _subprocess(args)
  assert result.returncode == 2, result.stderr[-2000:]
  assert message in result.stderr and 'Traceback' not in result.stderr


def test_overwrite_deletes_a_run_and_only_a_run(tmp_path, finished):
  workdir = tmp_path / 'run'
  shutil.copytree(finished, workdir)
  (workdir / 'lora_heatmap.png').write_bytes(b'png')  # inspect_run's
  (workdir / '.config.json.tmp123').write_text('{')  # a killed write
  assert claim.foreign(workdir) == []
  (workdir / 'mine.txt').write_text('x')
  with pytest.raises(errors.UserError, match='did not write: mine.txt'):
    claim.prepare(workdir, {}, overwrite=True)
  (workdir / 'mine.txt').unlink()
  claim.prepare(workdir, {'a': 1}, overwrite=True)
  assert sorted(p.name for p in workdir.iterdir()) == ['config.json']


def test_entry_points_in_one_process_need_only_their_own_flags(capsys):
  # Tests import several entry points into one process; none may demand
  # another's flags (absl's required-flag validators are global).
  from experiments import gguf_to_hf  # pylint: disable=g-import-not-at-top
  assert gguf_to_hf.cli(['x', '--gguf=/nonexistent.gguf', '--out=o']) == 2
  assert 'is not a .gguf file' in capsys.readouterr().err
  assert cli(CONFIG) == 2
  assert capsys.readouterr().err.strip() == (
      'flaxlora: error: --workdir must be given; run with --help for the '
      'flags.')
