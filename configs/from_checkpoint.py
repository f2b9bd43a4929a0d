"""A run config for a base checkpoint alone (what `experiments.predict
--peft=FOLDER` runs): task and head from its config.json.

  python -m experiments.predict --peft=my_peft --text='...'

The caller reads the checkpoint (`flaxlora.predict.read_checkpoint`), so
this file, like every config, loads without JAX.
"""
from typing import Any, Mapping

import ml_collections

from configs import common


def get_config(model_path: str, spec: Mapping[str, Any],
               folder: str) -> ml_collections.ConfigDict:
  """A run config for a base checkpoint: task and head from its config.json
  (BERT classification / QA, or T5 text-to-text).

  Args:
    model_path: the checkpoint as the user named it (folder, hub id, pkg:).
    spec: its config.json.
    folder: the local folder it resolves to (the tokenizer's).
  """
  if spec.get('model_type') in ('t5', 'mt5'):
    c = common.t5_config('summarization', str(model_path))
    c.data.update(source='files', hub_name='', source_prefix='')
  else:
    architecture = ' '.join(spec.get('architectures') or [])
    squad = 'QuestionAnswering' in architecture
    c = common.bert_config('squad' if squad else 'classification',
                           'qa' if squad else 'classification')
    longest = int(spec.get('max_position_embeddings', 512))
    c.model.path = str(model_path)
    c.data.max_length = min(384, longest)
    if squad:
      c.data.doc_stride = min(128, longest // 4)
      c.eval.update(n_best=20, max_answer_length=30)
    else:
      id2label = spec.get('id2label') or {'0': '0', '1': '1'}
      c.data.labels = tuple(id2label[k] for k in sorted(id2label, key=int))
      c.model.num_labels = len(c.data.labels)
  c.tokenizer = str(folder)
  c.data.buckets = (32, 64, 128, 256)  # longer than max_length: dropped
  c.train.eval_batch_size = 8
  return c
