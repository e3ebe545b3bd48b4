"""LIMA data and schedule with PiSSA (principal singular values and vectors adaptation, Meng et al. 2024,
peft's `init_lora_weights="pissa"`).

PiSSA trains the principal components themselves, so it uses a full-fine-tuning-sized learning rate: the
paper's recipe (GraphPKU/PiSSA scripts) is lr 2e-5, lora_alpha = lora_r (scale 1), no dropout, no weight
decay, all linear layers (rank 128 there; 16 here, as the LoRA preset), decayed linearly to 2e-6 here.
For 7-8B models set --config.peft.pissa.niter=4 (randomised SVD; the paper initialises with pissa_niter_16).

    python -m sft_jax.train --config=configs/lima_pissa.py --config.model.path=/path/to/hf_model
"""

import importlib.util
import pathlib

_spec = importlib.util.spec_from_file_location("_lima_config", pathlib.Path(__file__).with_name("lima.py"))
_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mod)
_lima = _mod.get_config


def get_config():
    c = _lima()
    c.peft.method = "pissa"
    c.peft.lora.rank = 16
    c.peft.lora.alpha = 16.0  # alpha = r: scale 1, as the paper
    c.peft.lora.dropout = 0.0
    c.peft.lora.targets = "all-linear"
    c.peft.pissa.niter = 0  # exact SVD
    c.train.lr = 2e-5
    c.train.end_lr = 2e-6
    c.train.weight_decay = 0.0
    c.model.param_dtype = "bfloat16"  # the frozen residual base may be bf16; the adapter and optimizer stay f32
    return c
