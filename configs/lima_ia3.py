"""LIMA data and schedule with IA3 (peft's Llama defaults: k_proj, v_proj scaled on the output, down_proj on
the input).

IA3 trains only ~0.01-0.1% of the weights (scaling vectors initialised to 1) and wants a much larger learning
rate than LoRA: 3e-3 (the (IA)^3 paper's T-Few recipe), decayed linearly to 3e-4.

    python -m sft_jax.train --config=configs/lima_ia3.py --config.model.path=/path/to/hf_model
"""

import importlib.util
import pathlib

_spec = importlib.util.spec_from_file_location("_lima_config", pathlib.Path(__file__).with_name("lima.py"))
_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mod)
_lima = _mod.get_config


def get_config():
    c = _lima()
    c.peft.method = "ia3"
    c.peft.ia3.targets = "k_proj,v_proj,down_proj"
    c.peft.ia3.feedforward = "down_proj"
    c.train.lr = 3e-3
    c.train.end_lr = 3e-4
    c.train.weight_decay = 0.0  # the vectors start at 1: decay would pull them towards 0
    c.model.param_dtype = "bfloat16"  # the frozen base may be bf16; the vectors and optimizer stay f32
    return c
