"""PEFT methods as pure functional transforms over params pytrees.

    from flaxlora.peft import base, lora, trainable
    method = base.chain(lora.lora(rank=8, targets='bert'),
                        trainable.trainable(r'classifier/.*'))
    adapter = method.init(rng, params)
    params_for_model, kw = method.apply(params, adapter)

Modules: `base` (method protocol, path selection, chain), `trainable`
(modules to save), `lora` (LoRA, rsLoRA, DoRA, PiSSA), `dora` (DoRA's
norm), `merge`, `loraplus` (optimizer), `describe` (what is trained),
`prompt` (prompt tuning), `qlora` (LoRA on an NF4-quantised base, `nf4`), `combine` (adapter combinations), `peft_io`,
`prompt_io` and `peft_names` (Hugging Face PEFT folders; they import the
models, so import them explicitly).

`METHODS` is the registry configs name methods by.
"""
from flaxlora.peft import lora
from flaxlora.peft import prompt
from flaxlora.peft import qlora
from flaxlora.peft import trainable

METHODS = {
    'lora': lora.lora,
    'qlora': qlora.qlora,
    'prompt_tuning': prompt.prompt_tuning,
    'trainable': trainable.trainable,
}
