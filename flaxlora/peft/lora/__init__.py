"""The LoRA family: LoRA, rsLoRA, DoRA, PiSSA and LoRA+.

    from flaxlora.peft import lora
    method = lora.lora(rank=8, alpha=16, targets='t5')
    method, adapter = lora.load('path/to/peft', model, base)

Modules: `kernel` (`LoraKernel`, the node the models' dense op multiplies,
and the adapter's construction), `dora` (DoRA's norm), `pissa` (PiSSA's
residual base), `loraplus` (LoRA+'s optimizer), `folder` (PEFT LORA
folders), `form` (the LORA folders of PiSSA and of methods with LoRA
factors: NB-LoRA, ScaLoRA), `method` (the factory and the folder loader).
"""
from flaxlora.peft.lora.kernel import adapter_logical_axes
from flaxlora.peft.lora.kernel import INITS
from flaxlora.peft.lora.kernel import is_lora_node
from flaxlora.peft.lora.kernel import kernels
from flaxlora.peft.lora.kernel import LoraConfig
from flaxlora.peft.lora.kernel import LoraKernel
from flaxlora.peft.lora.kernel import make_config
from flaxlora.peft.lora.kernel import TARGETS
from flaxlora.peft.lora.method import load
from flaxlora.peft.lora.method import lora
