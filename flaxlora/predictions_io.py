"""Per-example predictions on disk: predictions.jsonl and SQuAD's format.

  predictions.jsonl        one JSON object per example: id, input,
                           prediction, reference (None when unlabelled) and
                           the task's extras (class probabilities; answer
                           score and character offsets)
  squad_predictions.json   {question id: answer text}, what SQuAD's
                           official v1.1 scorer reads (SQuAD data only)

    predictions_io.write(folder, rows, squad=True)
    rows = predictions_io.read(folder)

A run writes them into its workdir at every eval (the last eval's remain);
`experiments.evaluate` into `eval/<name>/`. Writes are atomic.
"""
import json
import os
import pathlib
from typing import Any, Iterable, Mapping

from flaxlora import atomic

PREDICTIONS_FILE = 'predictions.jsonl'
SQUAD_FILE = 'squad_predictions.json'


def jsonl(rows: Iterable[Mapping[str, Any]]) -> str:
  """One JSON object a line."""
  return ''.join(json.dumps(dict(r), ensure_ascii=False) + '\n'
                 for r in rows)


def write(folder: str | os.PathLike, rows: list[Mapping[str, Any]], *,
          squad: bool = False) -> list[pathlib.Path]:
  """Writes predictions.jsonl (and squad_predictions.json when `squad`)
  into `folder`; returns the paths."""
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  paths = [folder / PREDICTIONS_FILE]
  atomic.write_file(paths[0], jsonl(rows))
  if squad:
    paths.append(folder / SQUAD_FILE)
    answers = {r['id']: r['prediction'] for r in rows}
    atomic.write_file(paths[1], json.dumps(answers, ensure_ascii=False,
                                            indent=1))
  return paths


def read(folder: str | os.PathLike) -> list[dict[str, Any]]:
  """The rows of `folder`'s predictions.jsonl."""
  path = pathlib.Path(folder) / PREDICTIONS_FILE
  return [json.loads(line) for line in path.read_text().splitlines()
          if line.strip()]
