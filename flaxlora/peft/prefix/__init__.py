"""Prefix tuning (Li & Liang 2021): trained key/value prefixes per layer.

    from flaxlora.peft import prefix
    method = prefix.prefix_tuning(num_tokens=20, projection=True)
    method, adapter = prefix.load('path/to/peft', model)

Modules: `core` (the table, its layout over the layers, inits and axes),
`folder` (PEFT PREFIX_TUNING folders; they share the prompt-learning file
helpers of `prompt.folder`), `method` (the factory and the folder loader).
"""
from flaxlora.peft.prefix.core import INITS
from flaxlora.peft.prefix.core import layout
from flaxlora.peft.prefix.core import PrefixConfig
from flaxlora.peft.prefix.core import table
from flaxlora.peft.prefix.method import load
from flaxlora.peft.prefix.method import prefix_tuning
