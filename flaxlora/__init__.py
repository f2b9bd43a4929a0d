"""flaxlora: PEFT methods as pure transforms over Flax params pytrees.

    import flaxlora
    model, params, _ = flaxlora.models.load('google-t5/t5-small')
    method = flaxlora.peft.lora.lora(rank=8, targets='t5')
    adapter = method.init(jax.random.PRNGKey(0), params)
    merged = flaxlora.peft.merge.merge(params, adapter, method)

`models` and `peft` (the public API) load on first use, so `import
flaxlora` stays as light as the command lines' `--help` needs (JAX and the
models load only when a program uses them).
"""
import importlib

_PUBLIC = ('models', 'peft')


def __getattr__(name: str):
  if name in _PUBLIC:
    return importlib.import_module(f'{__name__}.{name}')
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
