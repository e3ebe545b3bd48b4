"""LIMA data and schedule with prompt tuning instead of full fine-tuning.

Prompt tuning (Lester et al. 2021): 20 learned virtual tokens, the rest of the model frozen.
Prompt tuning wants a large learning rate: 3e-2 (the paper uses 0.3 with Adafactor on T5), decayed linearly
to 3e-3, no weight decay on the prompt.

    python -m sft_jax.train --config=configs/lima_prompt_tuning.py --config.model.path=/path/to/hf_model
"""

import importlib.util
import pathlib

_spec = importlib.util.spec_from_file_location("_lima_config", pathlib.Path(__file__).with_name("lima.py"))
_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mod)
_lima = _mod.get_config


def get_config():
    c = _lima()
    c.peft.method = "prompt_tuning"
    c.peft.prompt_tuning.num_virtual_tokens = 20
    c.peft.prompt_tuning.init_from = "vocab"  # sampled token embeddings: the paper's better-than-random init
    c.train.lr = 3e-2
    c.train.end_lr = 3e-2 / 10
    c.train.weight_decay = 0.0
    c.model.param_dtype = "bfloat16"  # the frozen base may be bf16; the prompt and optimizer stay f32
    return c
