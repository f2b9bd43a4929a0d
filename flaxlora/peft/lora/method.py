"""The LoRA family's factory: LoRA, rsLoRA, DoRA, PiSSA and LoRA+.

    method = lora.lora(rank=8, alpha=16, targets='t5')
    method, adapter = lora.load('path/to/peft', model, base)

`lora` builds the `PeftMethod` from the kernel construction (`kernel`), the
optimizer hook (`loraplus`), PiSSA's base hooks (`pissa`) and the PEFT
folder form (`folder`, `form`); `load` reads a PEFT LORA folder into the
method and adapter `lora` would make.
"""
import os
from typing import Any, Iterable, Mapping

from flaxlora.peft import base as peft_base
from flaxlora.peft import trainable
from flaxlora.peft.lora import folder as lora_folder
from flaxlora.peft.lora import form
from flaxlora.peft.lora import kernel
from flaxlora.peft.lora import loraplus
from flaxlora.peft.lora import pissa

# A LORA folder; modules to save are written whole, so it reads the base.
EXPORT = peft_base.Export(lora_folder.save_peft, needs_base=True)


def lora(rank: int = 8, alpha: float = 16.0,
         targets: str | Iterable[str] | None = None, dropout: float = 0.0,
         rank_pattern: Mapping[str, int] | None = None,
         alpha_pattern: Mapping[str, float] | None = None,
         use_rslora: bool = False, init: str = 'default',
         use_dora: bool = False,
         loraplus_ratio: float = 1.0) -> peft_base.PeftMethod:
  """The LoRA family as a `PeftMethod`.

  Args:
    rank: R of every targeted kernel (unless rank_pattern says otherwise).
    alpha: scale numerator; scale = alpha / R (alpha / sqrt(R) for rsLoRA).
    targets: regexes over "/"-joined kernel paths (re.fullmatch), a key of
      `kernel.TARGETS` ('t5', 'bert', 'llama', 'gpt2': PEFT's defaults), or
      None for the preset matching the params.
    dropout: dropout on the input of A while training.
    rank_pattern: {regex: R} overriding `rank` (first match wins).
    alpha_pattern: {regex: alpha} overriding `alpha` (first match wins).
    use_rslora: rank-stabilised scaling alpha / sqrt(R).
    init: 'default' (A Kaiming-uniform, B = 0), 'gaussian' (A ~ N(0, 1/R),
      B = 0) or 'pissa' (A, B from the top-R SVD of W; the method's
      `prepare_base` makes the base the residual W - scale A B, so the
      output equals the base's at init, and its export is a plain LoRA of
      rank 2R over the original W; see `pissa`).
    use_dora: DoRA; the adapter gains 'magnitude' [out].
    loraplus_ratio: LoRA+: every B trains at this many times the learning
      rate of the other adapter leaves (1.0: plain LoRA).

  Returns:
    A PeftMethod whose adapter maps each targeted kernel path to
    {'a': [in, R], 'b': [R, out]} (+ 'magnitude' [out]).
  """
  config = kernel.make_config(rank, alpha, targets, dropout, rank_pattern,
                              alpha_pattern, use_rslora, init, use_dora,
                              loraplus_ratio)

  def init_fn(rng, base):
    return kernel.init(config, rng, base)

  def apply_fn(base, adapter):
    return kernel.apply(config, base, adapter), {}

  method = peft_base.PeftMethod(
      init_fn, apply_fn, config, logical_axes=kernel.adapter_logical_axes,
      optimizer=loraplus.optimizer_hook(config.loraplus_ratio),
      export=EXPORT)
  if config.init != 'pissa':
    return method
  return method._replace(
      prepare_base=lambda base: pissa.prepare(config, base),
      prepared_axes=pissa.prepared_axes, export=form.PISSA_EXPORT)


def load(folder: str | os.PathLike, model: Any, base: Mapping[str, Any]
         ) -> tuple[peft_base.PeftMethod, Any]:
  """(method, adapter) of a PEFT LORA folder for `model` over `base`: `lora`
  with the folder's arguments, chained with `trainable` when the folder
  holds modules to save."""
  kwargs, adapter, copies = lora_folder.read_peft(folder, model, base)
  return trainable.with_copies(lora(**kwargs), adapter, copies)
