"""The config.json of public checkpoints, by hub id: shapes without a download.

    spec = presets.CONFIGS['google/flan-t5-xxl']   # a config.json dict
    spec = presets.config_json('google/flan-t5-xxl')

`experiments.plan` builds a model whose `model.path` is one of these ids
from this dict, so a pod-scale config (`configs/pod_lora.py`) is planned
offline and without reading any weight, while a run of the same config
downloads the real checkpoint. Values are the architecture fields of each
checkpoint's published config.json (only those flaxlora's families read).
"""
from typing import Any

_T5_V1_1 = dict(model_type='t5', feed_forward_proj='gated-gelu',
                tie_word_embeddings=False, vocab_size=32128, d_kv=64,
                num_layers=24, num_decoder_layers=24,
                relative_attention_num_buckets=32,
                relative_attention_max_distance=128, dropout_rate=0.1,
                layer_norm_epsilon=1e-6, pad_token_id=0, eos_token_id=1,
                decoder_start_token_id=0)
_XXL = dict(_T5_V1_1, d_model=4096, d_ff=10240, num_heads=64)  # 11B
_DECODER = dict(hidden_act='silu', tie_word_embeddings=False,
                attention_dropout=0.0)

CONFIGS: dict[str, dict[str, Any]] = {
    'google/t5-v1_1-xxl': _XXL,
    'google/flan-t5-xxl': _XXL,
    'google/flan-t5-xl': dict(_T5_V1_1, d_model=2048, d_ff=5120,
                              num_heads=32),  # 3B
    'google-bert/bert-large-uncased': dict(
        model_type='bert', vocab_size=30522, hidden_size=1024,
        num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
        hidden_act='gelu', max_position_embeddings=512, type_vocab_size=2,
        layer_norm_eps=1e-12, hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1, pad_token_id=0),  # 335M
    'meta-llama/Meta-Llama-3-8B': dict(
        _DECODER, model_type='llama', attention_bias=False,
        vocab_size=128256, hidden_size=4096,
        intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8,
        max_position_embeddings=8192, rms_norm_eps=1e-5,
        rope_theta=500000.0, bos_token_id=128000, eos_token_id=128001),
    'Qwen/Qwen2-7B': dict(
        _DECODER, model_type='qwen2', vocab_size=152064,  # q, k, v biased
        hidden_size=3584,
        intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4,
        max_position_embeddings=131072, rms_norm_eps=1e-6,
        rope_theta=1000000.0, bos_token_id=151643, eos_token_id=151643),
}


def config_json(hub_id: str) -> dict[str, Any] | None:
  """A copy of the preset config.json of `hub_id`, None when not a preset."""
  spec = CONFIGS.get(hub_id)
  return None if spec is None else dict(spec)
