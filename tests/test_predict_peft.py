"""experiments.predict from a PEFT folder plus a base (issue #16): the
class probabilities equal transformers + PEFT's on the same folder, for
each folder kind flaxlora writes (LoRA, IA3, prefix tuning)."""
import helpers
import jax
import numpy as np
import pytest

from configs import from_checkpoint
from flaxlora import models
from flaxlora import predict
from flaxlora.data import synthetic
from flaxlora.peft import base as peft_base
from flaxlora.peft import folders
from flaxlora.peft import ia3
from flaxlora.peft import lora
from flaxlora.peft import prefix
from flaxlora.peft import trainable
from flaxlora.peft.ia3 import folder as ia3_folder
from flaxlora.peft.lora import folder as lora_folder
from flaxlora.peft.prefix import folder as prefix_folder

torch = pytest.importorskip('torch')
peft = pytest.importorskip('peft')
transformers = pytest.importorskip('transformers')

TINY_BERT = dict(model_type='bert', vocab_size=99, hidden_size=32,
                 num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=37, max_position_embeddings=64)
TEXTS = ['good nice great film', 'awful bad sad']
# peft_type -> (method, its writer (folder, model, base, adapter, method,
# **kw)).
KINDS = {
    'LORA': (lambda: lora.lora(rank=4, alpha=8, targets='bert'),
             lora_folder.save_peft),
    'IA3': (ia3.ia3, ia3_folder.save_ia3),
    'PREFIX_TUNING': (lambda: prefix.prefix_tuning(num_tokens=3),
                      lambda folder, model, base, *rest, **kw:
                      prefix_folder.save_prefix(folder, model, *rest, **kw)),
}


@pytest.mark.parametrize('kind', sorted(KINDS))
def test_predict_from_peft_folder_matches_peft(tmp_path, kind):
  base_dir, peft_dir = tmp_path / 'base', tmp_path / 'peft'
  config = models.FAMILIES['bert'].config_from_hf(TINY_BERT)
  model = models.FAMILIES['bert'].build(config, head='classification',
                                        num_labels=2)
  base = models.FAMILIES['bert'].init(model, jax.random.PRNGKey(0))
  models.save(base_dir, model, base)
  tokenizer = synthetic.words_tokenizer()
  tokenizer.save_pretrained(str(base_dir))
  make_method, save = KINDS[kind]
  method = peft_base.chain(make_method(),
                           trainable.trainable(r'classifier/.*'))
  adapter = method.init(jax.random.PRNGKey(1), base)
  adapter = jax.tree.map(  # B != 0, IA3 != 1: the adapter changes the output
      lambda x: x + 0.3 * jax.random.normal(jax.random.PRNGKey(2), x.shape),
      adapter)
  save(peft_dir, model, base, adapter, method,
       base_model_name_or_path=str(base_dir))
  assert folders.peft_type(peft_dir) == kind

  base_path = predict.peft_base_path(peft_dir)
  run_config = from_checkpoint.get_config(
      base_path, *predict.read_checkpoint(base_path))
  assert run_config.task == 'classification'
  run, loaded = predict.from_peft(run_config, peft_dir)
  rows = predict.predict(run, loaded, [{'text': t} for t in TEXTS])
  got = np.array([list(r['probabilities'].values()) for r in rows])

  hf = transformers.BertForSequenceClassification.from_pretrained(
      str(base_dir)).eval()
  plain = _probabilities(hf, tokenizer)
  with_lora = _probabilities(
      peft.PeftModel.from_pretrained(hf, str(peft_dir)).eval(), tokenizer)
  np.testing.assert_allclose(got, with_lora, atol=1e-5)
  assert np.abs(with_lora - plain).max() > 1e-3
  assert [r['prediction'] for r in rows] == [
      f'LABEL_{i}' for i in with_lora.argmax(-1)]  # config.json's id2label


def _probabilities(hf, tokenizer):
  encoded = tokenizer(TEXTS, padding=True, return_tensors='pt')
  with torch.no_grad():
    config = getattr(hf, 'active_peft_config', None)
    if config is not None and config.peft_type == 'PREFIX_TUNING':
      logits = torch.from_numpy(helpers.peft_bert_prefix_logits(
          hf, encoded['input_ids'], encoded['attention_mask'],
          encoded['token_type_ids']))
    else:
      logits = hf(**encoded).logits
  return torch.softmax(logits, -1).numpy()


def test_unknown_peft_type_is_named(tmp_path):
  (tmp_path / 'adapter_config.json').write_text('{"peft_type": "LOHA"}')
  with pytest.raises(ValueError, match=r"adapter_config.json: peft_type "
                     r"'LOHA' is not one flaxlora reads; it reads \['IA3'"):
    folders.load(tmp_path, None, {})
  with pytest.raises(FileNotFoundError, match='pass a PEFT folder'):
    predict.peft_base_path(tmp_path / 'missing')
