"""PEFT methods as pure functional transforms over params pytrees.

    from flaxlora.peft import base, lora, trainable
    method = base.chain(lora.lora(rank=8, targets='bert'),
                        trainable.trainable(r'classifier/.*'))
    adapter = method.init(rng, params)
    params_for_model, kw = method.apply(params, adapter)

Modules: `base` (method protocol, path selection, chain), `trainable`
(modules to save), `lora` (LoRA, rsLoRA, DoRA, PiSSA), `pissa` (PiSSA's
residual base and export), `dora` (DoRA's norm), `merge`, `loraplus`
(optimizer), `describe` (what is trained), `prompt` (prompt tuning),
`prefix` (prefix tuning), `ia3` (IA3), `qlora` (LoRA on an NF4-quantised
base, `nf4`), `nblora` (norm-bounded LoRA),
`scalora` (accumulated high-rank LoRA), `lora_form` (their LoRA folders),
`combine` (adapter combinations), `peft_io` / `prompt_io` / `prefix_io` /
`ia3_io` and `peft_names` (Hugging Face PEFT folders; they import the
models, so import them explicitly).

`METHODS` is the registry configs name methods by.
"""
from flaxlora.peft import ia3
from flaxlora.peft import lora
from flaxlora.peft import nblora
from flaxlora.peft import prefix
from flaxlora.peft import prompt
from flaxlora.peft import qlora
from flaxlora.peft import scalora
from flaxlora.peft import trainable

METHODS = {
    'lora': lora.lora,
    'qlora': qlora.qlora,
    'nblora': nblora.nblora,
    'scalora': scalora.scalora,
    'prompt_tuning': prompt.prompt_tuning,
    'prefix_tuning': prefix.prefix_tuning,
    'ia3': ia3.ia3,
    'trainable': trainable.trainable,
}
