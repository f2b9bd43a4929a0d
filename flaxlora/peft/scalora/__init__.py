"""ScaLoRA: a high-rank update accumulated from optimally scaled LoRA steps.

    from flaxlora.peft import scalora
    method = scalora.scalora(rank=8, alpha=16)

`method` holds the construction, the optimizer hooks and the factory,
`scaling` the optimal scales of a restart (column, scalar fallback); the
PEFT folder form is the merged checkpoint, or with `lora_export=True` the
best rank-R LoRA (`lora.form`), read back by `lora.load`.
"""
from flaxlora.peft.scalora.method import as_lora
from flaxlora.peft.scalora.method import FROZEN
from flaxlora.peft.scalora.method import make_config
from flaxlora.peft.scalora.method import METRICS
from flaxlora.peft.scalora.method import RATES
from flaxlora.peft.scalora.method import RateState
from flaxlora.peft.scalora.method import scalora
from flaxlora.peft.scalora.method import ScaLoraConfig
from flaxlora.peft.scalora.method import total_update
from flaxlora.peft.scalora.scaling import KINDS
from flaxlora.peft.scalora.scaling import scaling
