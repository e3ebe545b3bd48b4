"""LIMA data and schedule with P-tuning instead of full fine-tuning.

P-tuning (Liu et al. 2021): 20 virtual tokens produced by an MLP encoder (PEFT's P_TUNING, MLP).
Learning rate as prompt tuning: 3e-2 decayed linearly to 3e-3.

    python -m sft_jax.train --config=configs/lima_p_tuning.py --config.model.path=/path/to/hf_model
"""

import importlib.util
import pathlib

_spec = importlib.util.spec_from_file_location("_lima_config", pathlib.Path(__file__).with_name("lima.py"))
_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mod)
_lima = _mod.get_config


def get_config():
    c = _lima()
    c.peft.method = "p_tuning"
    c.peft.p_tuning.num_virtual_tokens = 20
    c.peft.p_tuning.encoder_hidden_size = 0  # the model's hidden size
    c.train.lr = 3e-2
    c.train.end_lr = 3e-2 / 10
    c.train.weight_decay = 0.0
    c.model.param_dtype = "bfloat16"  # the frozen base may be bf16; the prompt and optimizer stay f32
    return c
