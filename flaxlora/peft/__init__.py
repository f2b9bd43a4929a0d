"""PEFT methods as pure functional transforms over params pytrees.

    from flaxlora.peft import base, lora, merge
    method = base.chain(lora.lora(rank=8, targets='bert'),
                        base.trainable(r'classifier/.*'))
    adapter = method.init(rng, params)
    params_for_model, kw = method.apply(params, adapter)

Modules: `base` (protocol, path selection, chain, trainable), `lora` (LoRA,
rsLoRA, DoRA, PiSSA), `dora` (DoRA's norm), `merge`, `loraplus` (optimizer),
`describe` (what is trained), `prompt` (prompt tuning), `qlora` (LoRA on
an NF4-quantised base, `nf4`), `nblora` (norm-bounded LoRA), `scalora`
(accumulated high-rank LoRA), `lora_form` (their LoRA folders), `peft_io` (Hugging Face PEFT folders; imports
the models, so import it explicitly).

`METHODS` is the registry configs name methods by.
"""
from flaxlora.peft import base
from flaxlora.peft import lora
from flaxlora.peft import nblora
from flaxlora.peft import prompt
from flaxlora.peft import qlora
from flaxlora.peft import scalora

METHODS = {
    'lora': lora.lora,
    'qlora': qlora.qlora,
    'nblora': nblora.nblora,
    'scalora': scalora.scalora,
    'prompt_tuning': prompt.prompt_tuning,
    'trainable': base.trainable,
}
