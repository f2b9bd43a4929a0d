"""BERT's config, its Hugging Face config.json form and checkpoint names.

Used through the `bert` family module (`bert.BertConfig`,
`bert.config_from_hf`, `bert.hf_rules`...).
"""
import dataclasses
from typing import Any, Collection

from flaxlora.models import hf_io

HEADS = (None, 'classification', 'qa')
# `hidden_act` values `bert` implements (it maps each to its function).
ACTIVATIONS = ('gelu', 'gelu_new', 'gelu_pytorch_tanh', 'relu')
_ARCHITECTURES = {None: 'BertModel',
                  'classification': 'BertForSequenceClassification',
                  'qa': 'BertForQuestionAnswering'}
# Non-parameter buffers, and the head/pooler tensors of other architectures:
# a bare model may be loaded from a fine-tuned checkpoint (as transformers
# does); a model that has the head still reads them by its rules.
HF_IGNORE = tuple(
    prefix + name for prefix in ('', 'bert.')
    for name in ('embeddings.position_ids', 'embeddings.token_type_ids',
                 'pooler.dense.weight', 'pooler.dense.bias')) + (
                     'classifier.weight', 'classifier.bias',
                     'qa_outputs.weight', 'qa_outputs.bias')


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """BERT hyper-parameters (the fields of a Hugging Face BertConfig).

  `id2label` is a tuple of label names, index = class id (hashable, unlike
  HF's dict). `head` is the head the checkpoint was saved with (from
  config.json `architectures`); `build` uses it by default.
  """
  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = 'gelu'
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  classifier_dropout: float | None = None
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  pad_token_id: int = 0
  num_labels: int = 2
  id2label: tuple[str, ...] = ()
  head: str | None = None

  def __post_init__(self):
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f'hidden_act {self.hidden_act!r} is not supported; use '
                       f'one of {sorted(ACTIVATIONS)}.')
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(
          f'hidden_size {self.hidden_size} is not a multiple of '
          f'num_attention_heads {self.num_attention_heads}.')
    if self.head not in HEADS:
      raise ValueError(f'head {self.head!r} is not one of {HEADS}.')


def config_from_hf(config_dict: dict[str, Any]) -> BertConfig:
  """A BertConfig from a config.json dict."""
  position_type = config_dict.get('position_embedding_type', 'absolute')
  if position_type != 'absolute':
    raise ValueError(f'config.json: position_embedding_type {position_type!r}'
                     ' is not supported; flaxlora reads \'absolute\' only.')
  fields = {f.name for f in dataclasses.fields(BertConfig)}
  kwargs = {k: v for k, v in config_dict.items()
            if k in fields and k not in ('id2label', 'head', 'num_labels')}
  id2label = config_dict.get('id2label')
  if id2label:
    by_id = {int(k): v for k, v in id2label.items()}
    kwargs['id2label'] = tuple(by_id[i] for i in range(len(by_id)))
    kwargs['num_labels'] = len(by_id)
  elif config_dict.get('num_labels'):
    kwargs['num_labels'] = int(config_dict['num_labels'])
  heads = {arch: head for head, arch in _ARCHITECTURES.items()}
  archs = [heads[a] for a in config_dict.get('architectures') or ()
           if a in heads]
  kwargs['head'] = archs[0] if archs else None
  return BertConfig(**kwargs)


def hf_class_missing(model: Any) -> str:
  """Why transformers has no class computing `model`, or '' if it has."""
  if model.pooling == 'cls':
    return ''
  return (f'pooling={model.pooling!r} has no Hugging Face class '
          '(BertForSequenceClassification pools [CLS]); keep the flaxlora '
          'adapter, or train with model.pooling=\'cls\' to export')


def config_to_hf(model: Any) -> dict[str, Any]:
  """A config.json dict that makes transformers build `model`'s class."""
  if model.pooling != 'cls':
    raise ValueError(hf_class_missing(model))
  cfg = model.config
  out = {k: v for k, v in dataclasses.asdict(cfg).items()
         if k not in ('id2label', 'head', 'num_labels')}
  labels = cfg.id2label
  if len(labels) != model.num_labels:
    labels = tuple(f'LABEL_{i}' for i in range(model.num_labels))
  out.update(
      model_type='bert', architectures=[_ARCHITECTURES[model.head]],
      position_embedding_type='absolute',
      id2label={str(i): name for i, name in enumerate(labels)},
      label2id={name: i for i, name in enumerate(labels)})
  return out


def hf_rules(model: Any,
             keys: Collection[str] | None = None) -> list[hf_io.Rule]:
  """Checkpoint rules for `model`.

  Args:
    model: the `bert.Bert` module.
    keys: the checkpoint's tensor names when loading: they tell the 'bert.'
      prefix of BertFor* checkpoints from bare BertModel names (e.g.
      sentence-transformers) and old 'LayerNorm.gamma/beta' names. None
      (saving): the names transformers writes for `model`'s class.
  """
  if keys is None:
    prefix = '' if model.head is None else 'bert.'
  else:
    prefix = 'bert.' if any(k.startswith('bert.') for k in keys) else ''
  # (flax path, checkpoint module name, kind); heads live outside 'bert.'.
  modules = [(('embeddings', 'norm'), prefix + 'embeddings.LayerNorm', 'norm')]
  for i in range(model.config.num_hidden_layers):
    path, key = ('encoder', f'layer_{i}'), f'{prefix}encoder.layer.{i}'
    modules += [
        (path + ('attention', 'query'), f'{key}.attention.self.query', 'dense'),
        (path + ('attention', 'key'), f'{key}.attention.self.key', 'dense'),
        (path + ('attention', 'value'), f'{key}.attention.self.value', 'dense'),
        (path + ('attention', 'output'), f'{key}.attention.output.dense',
         'dense'),
        (path + ('attention_norm',), f'{key}.attention.output.LayerNorm',
         'norm'),
        (path + ('mlp', 'intermediate'), f'{key}.intermediate.dense', 'dense'),
        (path + ('mlp', 'output'), f'{key}.output.dense', 'dense'),
        (path + ('mlp_norm',), f'{key}.output.LayerNorm', 'norm')]
  if model.head == 'qa':
    optional = [(('qa_outputs',), 'qa_outputs', 'dense')]
  else:
    optional = [(('pooler',), prefix + 'pooler.dense', 'dense')]
  if model.head == 'classification':
    optional.append((('classifier',), 'classifier', 'dense'))

  def name(key):  # a checkpoint's old LayerNorm names, when it has them
    old = key.replace('LayerNorm.weight', 'LayerNorm.gamma').replace(
        'LayerNorm.bias', 'LayerNorm.beta')
    return old if keys is not None and key not in keys and old in keys else key

  rules = [hf_io.Rule(('embeddings', part, 'embedding'),
                      f'{prefix}embeddings.{part}_embeddings.weight')
           for part in ('word', 'position', 'token_type')]
  for (path, key, kind), is_optional in (
      [(m, False) for m in modules] + [(m, True) for m in optional]):
    weight = 'kernel' if kind == 'dense' else 'scale'
    rules.append(hf_io.Rule(path + (weight,), name(f'{key}.weight'),
                            transpose=kind == 'dense', optional=is_optional))
    rules.append(hf_io.Rule(path + ('bias',), name(f'{key}.bias'),
                            optional=is_optional))
  return rules
