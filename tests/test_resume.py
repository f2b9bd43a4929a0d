"""A run killed with SIGKILL at an arbitrary moment and restarted ends with
exactly the adapter bytes of an uninterrupted run (CPU)."""
import json
import pathlib
import signal
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
# Dropout on (model and LoRA) so that the rng really matters; 40 steps with
# checkpoints every 5 and an eval at 20.
FLAGS = ['--config=configs/bert_sentiment_lora.py:runlocal',
         '--config.model.dropout=0.1', '--config.peft.dropout=0.2',
         '--config.train.steps=40', '--config.train.checkpoint_every=5',
         '--config.train.eval_every=20', '--config.train.log_every=5']


def _command(workdir):
  return [sys.executable, '-m', 'experiments.run', f'--workdir={workdir}',
          *FLAGS]


def _run(workdir):
  result = subprocess.run(_command(workdir), cwd=REPO,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def _steps(workdir):
  folder = workdir / 'checkpoints'
  if not folder.is_dir():
    return []
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def _kill_after_checkpoint(workdir, step):
  """Starts a run and SIGKILLs it once checkpoint `step` is complete."""
  process = subprocess.Popen(_command(workdir), cwd=REPO,
                             stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 600
    while not any(s >= step for s in _steps(workdir)):
      assert process.poll() is None, 'the run ended before it was killed'
      assert time.time() < deadline
      time.sleep(0.05)
  finally:
    process.send_signal(signal.SIGKILL)
    process.wait()


def test_sigkill_and_resume_give_the_same_adapter_bytes(tmp_path):
  straight, killed = tmp_path / 'straight', tmp_path / 'killed'
  _run(straight)
  _kill_after_checkpoint(killed, step=10)
  stopped_at = _steps(killed)[-1]
  assert stopped_at < 40 and not (killed / 'summary.json').exists()
  output = _run(killed)
  assert f'resuming from step {stopped_at}' in output
  adapter = 'adapter/adapter.safetensors'
  assert (straight / adapter).read_bytes() == (killed / adapter).read_bytes()
  summaries = [json.loads((w / 'summary.json').read_text())
               for w in (straight, killed)]
  assert summaries[0].pop('seconds') > 0 < summaries[1].pop('seconds')
  assert [s.pop('seconds_from') for s in summaries] == [0, stopped_at]
  for s in summaries:  # when and where each invocation ran
    assert s.pop('date') and s.pop('hardware')
  assert summaries[0] == summaries[1]  # all but the wall time
  # Logged metrics agree too (minus timing), with no duplicated steps.
  def metrics(workdir):
    lines = (workdir / 'metrics.jsonl').read_text().splitlines()
    records = [json.loads(line) for line in lines]
    for r in records:
      r.pop('steps_per_s', None)
    return records
  assert metrics(straight) == metrics(killed)
  # A finished run is not run again.
  assert 'nothing to do' in _run(killed)
