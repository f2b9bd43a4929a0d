"""NB-LoRA: low-rank updates with every singular value explicitly bounded.

    from flaxlora.peft import nblora
    method = nblora.nblora(rank=8, bound=1.0, norm='frobenius')

`method` holds the construction, the kernel node and the factory; the PEFT
folder form is the LoRA of the same update (`lora.form`), read back by
`lora.load`.
"""
from flaxlora.peft.nblora.method import as_lora
from flaxlora.peft.nblora.method import bounds
from flaxlora.peft.nblora.method import cayley
from flaxlora.peft.nblora.method import delta
from flaxlora.peft.nblora.method import EXPONENT
from flaxlora.peft.nblora.method import factors
from flaxlora.peft.nblora.method import frames
from flaxlora.peft.nblora.method import kernels
from flaxlora.peft.nblora.method import make_config
from flaxlora.peft.nblora.method import nblora
from flaxlora.peft.nblora.method import NbLoraConfig
from flaxlora.peft.nblora.method import NORMS
