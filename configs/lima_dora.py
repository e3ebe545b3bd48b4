"""LIMA data and schedule with DoRA (weight-decomposed LoRA, Liu et al. 2024, peft's `use_dora=True`).

The DoRA paper's LLaMA / LLaMA-2 commonsense recipe (NVlabs/DoRA, commonsense_reasoning): rank 16, alpha 32
(alpha = 2 r), dropout 0.05 on q, k, v, up and down projections, lr 2e-4 (1e-4 at rank 32 and for
LLaMA-3-8B), decayed linearly to 2e-5 here (LIMA's schedule).

    python -m sft_jax.train --config=configs/lima_dora.py --config.model.path=/path/to/hf_model
"""

import importlib.util
import pathlib

_spec = importlib.util.spec_from_file_location("_lima_config", pathlib.Path(__file__).with_name("lima.py"))
_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mod)
_lima = _mod.get_config


def get_config():
    c = _lima()
    c.peft.method = "dora"
    c.peft.lora.rank = 16
    c.peft.lora.alpha = 32.0
    c.peft.lora.dropout = 0.05
    c.peft.lora.targets = "q_proj,k_proj,v_proj,up_proj,down_proj"
    c.train.lr = 2e-4
    c.train.end_lr = 2e-5
    c.model.param_dtype = "bfloat16"  # the frozen base may be bf16; adapter, magnitudes and optimizer stay f32
    return c
