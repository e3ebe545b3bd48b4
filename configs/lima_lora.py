"""LIMA data and schedule with LoRA instead of full fine-tuning (r=16 on all linear layers).

LoRA wants a larger learning rate than full fine-tuning: 2e-4 decayed linearly to 2e-5.

    python -m sft_jax.train --config=configs/lima_lora.py --config.model.path=/path/to/hf_model
"""

import importlib.util
import pathlib

_spec = importlib.util.spec_from_file_location("_lima_config", pathlib.Path(__file__).with_name("lima.py"))
_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mod)
_lima = _mod.get_config


def get_config():
    c = _lima()
    c.peft.method = "lora"
    c.peft.lora.rank = 16
    c.peft.lora.alpha = 32.0
    c.peft.lora.dropout = 0.05
    c.peft.lora.targets = "all-linear"
    c.train.lr = 2e-4
    c.train.end_lr = 2e-5
    c.model.param_dtype = "bfloat16"  # the frozen base may be bf16; LoRA and optimizer stay f32
    return c
