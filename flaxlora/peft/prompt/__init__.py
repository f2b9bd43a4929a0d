"""Prompt tuning (Lester et al. 2021): a trained soft prompt [P, H].

    from flaxlora.peft import prompt
    method = prompt.prompt_tuning(num_tokens=100, init='vocab_sample')
    method, adapter = prompt.load('path/to/peft', model)

Modules: `core` (where the prompt goes, its inits and axes), `folder` (PEFT
PROMPT_TUNING folders), `method` (the factory and the folder loader).
"""
from flaxlora.peft.prompt.core import embedding_table
from flaxlora.peft.prompt.core import INITS
from flaxlora.peft.prompt.core import insert_prompt
from flaxlora.peft.prompt.core import PromptConfig
from flaxlora.peft.prompt.core import remove_prompt
from flaxlora.peft.prompt.method import load
from flaxlora.peft.prompt.method import prompt_tuning
