"""PEFT methods as pure functional transforms over params pytrees.

    from flaxlora import peft
    method = peft.chain(peft.lora.lora(rank=8, targets='bert'),
                        peft.trainable.trainable(r'classifier/.*'))
    adapter = method.init(rng, params)
    params_for_model, kw = method.apply(params, adapter)

One package per method family, each holding its construction, its kernel
node (if any), its Hugging Face PEFT folder form and its factory: `lora`
(LoRA, rsLoRA, DoRA, PiSSA, LoRA+), `qlora` (LoRA on an NF4 base), `nblora`
(norm-bounded LoRA), `scalora` (accumulated high-rank LoRA), `ia3`,
`prompt` (prompt tuning), `prefix` (prefix tuning).

Shared modules: `base` (the method protocol, path selection, `chain`),
`registry` (the methods by name, below), `trainable` (modules to save),
`method_parts` (a chain's parts), `merge`, `describe` (what is trained),
`combine` (adapter combinations), `multi` (many adapters in one batch),
`hf_folder` and `peft_names` (what every PEFT folder shares; Hugging Face
module names), `folders` (any PEFT folder, by its peft_type).

Every method is registered here, once: adding a method is its package plus
one `registry.register` line.
"""
from flaxlora.peft import base
from flaxlora.peft import combine
from flaxlora.peft import describe
from flaxlora.peft import folders
from flaxlora.peft import ia3
from flaxlora.peft import lora
from flaxlora.peft import merge
from flaxlora.peft import multi
from flaxlora.peft import nblora
from flaxlora.peft import prefix
from flaxlora.peft import prompt
from flaxlora.peft import qlora
from flaxlora.peft import registry
from flaxlora.peft import scalora
from flaxlora.peft import trainable

chain = base.chain
PeftMethod = base.PeftMethod

registry.register('lora', lora.lora, 'LORA', lora.load)
registry.register('qlora', qlora.qlora, 'LORA')
registry.register('nblora', nblora.nblora, 'LORA')
registry.register('scalora', scalora.scalora, 'LORA')
registry.register('ia3', ia3.ia3, 'IA3', ia3.load)
registry.register('prompt_tuning', prompt.prompt_tuning, 'PROMPT_TUNING',
                  prompt.load)
registry.register('prefix_tuning', prefix.prefix_tuning, 'PREFIX_TUNING',
                  prefix.load)
registry.register('trainable', trainable.trainable)
