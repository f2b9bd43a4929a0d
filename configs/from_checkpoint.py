"""A run config for a base checkpoint alone (what `experiments.predict
--peft=FOLDER` runs): task and head from its config.json.

  python -m experiments.predict --peft=my_peft --text='...'
"""
import ml_collections

from configs import common


def get_config(model_path: str) -> ml_collections.ConfigDict:
  """A run config for a base checkpoint: task and head from its config.json
  (BERT classification / QA, or T5 text-to-text)."""
  from flaxlora.models import hf_io  # pylint: disable=g-import-not-at-top
  folder = hf_io.resolve(model_path)
  spec = hf_io.read_config(folder)
  c = common.base_config()
  c.model.path, c.tokenizer = str(model_path), str(folder)
  c.model.family = 't5' if spec.get('model_type') in ('t5', 'mt5') else 'bert'
  longest = int(spec.get('max_position_embeddings', 512))
  c.data.update(max_length=min(384, longest), doc_stride=min(128, longest // 4),
                max_source_length=512, max_target_length=64,
                source_prefix='', format='seq2seq', metric='rouge',
                labels=('0', '1'))
  c.data.buckets = (32, 64, 128, 256)  # longer than max_length: dropped
  c.train.eval_batch_size = 8
  if c.model.family == 't5':
    c.task = 'seq2seq'
    return c
  architecture = ' '.join(spec.get('architectures') or [])
  c.task = 'squad' if 'QuestionAnswering' in architecture else (
      'classification')
  c.model.head = 'qa' if c.task == 'squad' else 'classification'
  id2label = spec.get('id2label') or {'0': '0', '1': '1'}
  c.data.labels = tuple(id2label[k] for k in sorted(id2label, key=int))
  c.model.num_labels = len(c.data.labels)
  return c
