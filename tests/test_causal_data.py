"""Causal-LM features (flaxlora.data.causal) from users' own files."""
import json

import numpy as np
import pytest

from flaxlora.data import byte_tokenizer
from flaxlora.data import causal
from flaxlora.data import pipeline
from flaxlora.data import sources

TOK = byte_tokenizer.ByteTokenizer()
RECORDS = [{'source': 'abcdef', 'target': 'xy'},
           {'source': 'gh', 'target': 'zzz'},
           {'source': 'ijklmnop', 'target': 'w'}]


def _ids(text):
  return [b + byte_tokenizer.OFFSET for b in text.encode()]


def test_the_loss_mask_covers_the_response_and_eos_only():
  prompt = causal.Prompt(TOK, 'S: {source}\nA: ', chat=False)
  data = causal.tokenize(RECORDS, TOK, prompt, max_source_length=4,
                         max_target_length=8)
  ids, mask = data.sequences['input_ids'][0], data.sequences['loss_mask'][0]
  head = _ids('S: ') + _ids('abcd') + _ids('\nA: ')  # source cut to 4
  assert ids.tolist() == head + _ids('xy') + [TOK.eos_token_id]
  assert mask.tolist() == [0] * len(head) + [1, 1, 1]
  # The target is cut to max_target_length, eos included.
  short = causal.tokenize(RECORDS, TOK, prompt, max_source_length=4,
                          max_target_length=2)
  assert short.sequences['input_ids'][1][-2:].tolist() == [_ids('z')[0], 1]


def test_eval_prompts_are_left_padded_for_generation():
  prompt = causal.Prompt(TOK, '{source}=', chat=False)
  data = causal.tokenize(RECORDS, TOK, prompt, max_source_length=8,
                         max_target_length=4, with_prompts=True)
  batch = next(iter(pipeline.Loader(data, global_batch_size=3,
                                    shuffle=False, num_epochs=1)))
  assert batch['prompt_ids'].shape == (3, 9)
  assert batch['prompt_ids'][1].tolist() == [0] * 6 + _ids('gh=')
  assert batch['prompt_mask'][1].tolist() == [0] * 6 + [1] * 3
  # The full sequences stay right-padded.
  assert batch['input_ids'][1, :4].tolist() == _ids('gh=z')


def test_packing_keeps_every_token_and_restarts_positions():
  prompt = causal.Prompt(TOK, '{source}=', chat=False)
  kwargs = dict(max_source_length=8, max_target_length=4)
  plain = causal.tokenize(RECORDS, TOK, prompt, **kwargs)
  packed = causal.tokenize(RECORDS, TOK, prompt, pack=True, **kwargs)
  # Lengths 10, 7, 11 in rows of 13: each sequence alone but the first two
  # would not fit, so three rows; at 21 the first two share a row.
  assert len(packed) == 3
  rows = causal.pack_rows(*causal.sequences(RECORDS, TOK, prompt, **kwargs),
                          length=21, pad=0)
  assert len(rows) == 2
  row = {k: v[0] for k, v in rows.sequences.items()}
  assert row['segment_ids'].tolist() == [1] * 10 + [2] * 7
  assert row['positions'].tolist() == list(range(10)) + list(range(7))
  np.testing.assert_array_equal(
      row['input_ids'], np.concatenate(plain.sequences['input_ids'][:2]))
  assert sum(int(m.sum()) for m in rows.sequences['loss_mask']) == sum(
      int(m.sum()) for m in plain.sequences['loss_mask'])


class _ChatTokenizer:
  """Bytes plus a chat template, as a Hugging Face tokenizer offers it."""
  chat_template = 'im'
  eos_token_id = byte_tokenizer.EOS_ID
  pad_token_id = byte_tokenizer.PAD_ID

  def __call__(self, texts, add_special_tokens=False):
    return TOK(texts, add_special_tokens=add_special_tokens)

  @staticmethod
  def apply_chat_template(messages, tokenize, add_generation_prompt):
    assert not tokenize and add_generation_prompt
    (message,) = messages
    return f'<user>{message["content"]}</user><bot>'


def test_the_chat_template_wraps_the_prompt():
  prompt = causal.Prompt(_ChatTokenizer(), 'Sum up: {source}', chat=True)
  assert prompt([7]) == _ids('<user>Sum up: ') + [7] + _ids('</user><bot>')
  with pytest.raises(ValueError, match='data.chat_template=False'):
    causal.Prompt(TOK, '{source}', chat=True)
  with pytest.raises(ValueError, match='data.prompt'):
    causal.Prompt(TOK, 'no slot', chat=False)


@pytest.mark.parametrize('suffix', ['jsonl', 'tsv', 'csv'])
def test_users_files_with_their_own_field_names(tmp_path, suffix):
  rows = [{'instruction': 'say hi', 'response': 'hi'},
          {'instruction': 'say, "yo"', 'response': 'yo'}]
  path = tmp_path / f'mine.{suffix}'
  if suffix == 'jsonl':
    path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  elif suffix == 'tsv':
    path.write_text('instruction\tresponse\n' + ''.join(
        f'{r["instruction"]}\t{r["response"]}\n' for r in rows))
  else:
    path.write_text('instruction,response\nsay hi,hi\n"say, ""yo""",yo\n')
  records = sources.read_seq2seq(path, source_field='instruction',
                                 target_field='response', id_field=None)
  assert [(r['source'], r['target']) for r in records] == [
      (r['instruction'], r['response']) for r in rows]
  with pytest.raises(ValueError) as error:
    sources.read_seq2seq(path, source_field='dialogue',
                         target_field='response', id_field=None)
  message = str(error.value)
  assert f'mine.{suffix}:' in message and "'dialogue'" in message
  assert 'data.source_field' in message and '\n' not in message
