"""LIMA data and schedule with prefix tuning instead of full fine-tuning.

Prefix tuning / P-tuning v2 (Li & Liang 2021; Liu et al. 2022): 20 learned key/value slots in
every attention layer. Learning rate 1e-2 (P-tuning v2 uses 5e-3..1e-2) decayed linearly to 1e-3. Set
--config.peft.prefix_tuning.projection=True for Li & Liang's reparametrising MLP.

    python -m sft_jax.train --config=configs/lima_prefix_tuning.py --config.model.path=/path/to/hf_model
"""

import importlib.util
import pathlib

_spec = importlib.util.spec_from_file_location("_lima_config", pathlib.Path(__file__).with_name("lima.py"))
_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mod)
_lima = _mod.get_config


def get_config():
    c = _lima()
    c.peft.method = "prefix_tuning"
    c.peft.prefix_tuning.num_virtual_tokens = 20
    c.peft.prefix_tuning.projection = False
    c.train.lr = 1e-2
    c.train.end_lr = 1e-2 / 10
    c.train.weight_decay = 0.0
    c.model.param_dtype = "bfloat16"  # the frozen base may be bf16; the prompt and optimizer stay f32
    return c
