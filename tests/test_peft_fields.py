"""No peft field is silently ignored, and a run records what trained.

A field the chosen method does not take is an error naming the field and
the method's arguments; the fields a config file wrote for another method
are dropped when the command line switches `peft.method` (the method
takes its defaults), so config.json holds only what the method took.
"""
import json

import pytest

from configs import bert_sentiment_lora
from experiments import run as run_cli
from flaxlora import build
from flaxlora.peft import registry

CONFIG = 'configs/bert_sentiment_lora.py:runlocal'


def _lora_config():
  return bert_sentiment_lora.get_config('runlocal')


def test_a_switch_drops_the_fields_written_for_the_old_method():
  config = _lora_config()
  config.peft.method = 'ia3'
  settled = build.settle_peft(config, {'peft.method'})
  assert sorted(settled.peft.keys()) == ['method', 'trainable']
  assert 'rank' in config.peft  # the input is left as it was
  method = build.peft_method(settled.peft, 'bert')
  assert type(method.config.methods[0].config).__name__ == 'Ia3Config'


def test_a_field_the_user_set_for_another_method_is_an_error():
  config = _lora_config()
  config.peft.update(method='ia3', rank=16)
  settled = build.settle_peft(config, {'peft.method', 'peft.rank'})
  with pytest.raises(ValueError, match=(
      r"^peft.rank=16 is not an argument of peft method 'ia3'; its "
      r"arguments are \['targets', 'feedforward'\]")):
    build.peft_method(settled.peft, 'bert')


def test_a_field_of_the_files_own_method_it_does_not_take_is_an_error():
  config = _lora_config()
  config.peft.feedforward = ''  # an IA3 argument in a LoRA section
  assert build.settle_peft(config, {'peft.rank'}) is config
  with pytest.raises(ValueError, match="peft.feedforward='' is not an "
                     "argument of peft method 'lora'"):
    build.peft_method(config.peft, 'bert')


def test_a_method_missing_a_required_argument_names_it():
  config = _lora_config()
  config.peft.method = 'trainable'
  settled = build.settle_peft(config, {'peft.method'})
  with pytest.raises(ValueError, match="peft method 'trainable' needs "
                     'peft.patterns'):
    build.peft_method(settled.peft, 'bert')


@pytest.mark.parametrize('method', [m for m in registry.names()
                                    if m != 'trainable'])
def test_every_method_builds_from_a_lora_config(method):
  config = _lora_config()
  config.peft.method = method
  settled = build.settle_peft(config, {'peft.method'})
  taken = set(registry.get(method).arguments) | {'method', 'trainable'}
  assert set(settled.peft.keys()) <= taken
  assert build.peft_method(settled.peft, 'bert').init


def test_the_command_line_error_is_one_line(tmp_path, capsys):
  code = run_cli.cli(['experiments.run', f'--config={CONFIG}',
                      f'--workdir={tmp_path / "w"}',
                      '--config.peft.method=ia3', '--config.peft.rank=16'])
  err = capsys.readouterr().err.strip()
  assert code == 2
  assert err.count('\n') == 0 and "peft.rank=16 is not an argument of " \
      "peft method 'ia3'" in err, err
  assert not (tmp_path / 'w').exists()


def test_config_json_records_only_what_trained(tmp_path):
  workdir = tmp_path / 'ia3'
  assert run_cli.cli([
      'experiments.run', f'--config={CONFIG}', f'--workdir={workdir}',
      '--config.peft.method=ia3', '--config.train.steps=2',
      '--config.train.eval_every=0', '--config.train.checkpoint_every=0',
      '--config.train.log_every=1']) == 0
  recorded = json.loads((workdir / 'config.json').read_text())['peft']
  assert sorted(recorded) == ['method', 'trainable']
  summary = json.loads((workdir / 'summary.json').read_text())
  assert summary['peft_method'][0]['type'] == 'Ia3Config'
