"""QLoRA: LoRA over an NF4-quantised frozen base.

    from flaxlora.peft import qlora
    method = qlora.qlora(rank=8, alpha=16, targets='t5')

Modules: `nf4` (the NF4 kernel node, quantisation and dequantisation),
`method` (the factory, merge and merged export). The PEFT folder form is
LoRA's (`lora.folder`), written against the dequantised base and read back
by `lora.load`.
"""
from flaxlora.peft.qlora.method import merge
from flaxlora.peft.qlora.method import QloraConfig
from flaxlora.peft.qlora.method import qlora
from flaxlora.peft.qlora.method import quantized_lora
from flaxlora.peft.qlora.method import save_merged
