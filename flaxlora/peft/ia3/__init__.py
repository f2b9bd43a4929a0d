"""IA3 (Liu et al. 2022): learned vectors scaling activations.

    from flaxlora.peft import ia3
    method = ia3.ia3()
    method, adapter = ia3.load('path/to/peft', model, base)

Modules: `kernel` (`Ia3Kernel`, the node the models' dense op multiplies,
and the adapter's construction), `folder` (PEFT IA3 folders), `method` (the
factory and the folder loader).
"""
from flaxlora.peft.ia3.kernel import FEEDFORWARD
from flaxlora.peft.ia3.kernel import Ia3Config
from flaxlora.peft.ia3.kernel import Ia3Kernel
from flaxlora.peft.ia3.kernel import TARGETS
from flaxlora.peft.ia3.kernel import targeted
from flaxlora.peft.ia3.method import ia3
from flaxlora.peft.ia3.method import load
