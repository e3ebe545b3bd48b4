"""LIMA data and schedule with BitFit: only the biases of every linear projection train (q/k/v/o,
gate/up/down; zero-initialised where the checkpoint has none, e.g. Llama / Mistral).

BitFit trains ~0.05-0.1% of the weights and wants a much larger learning rate than full fine-tuning: 1e-3 (the
BitFit authors' repository runs BitFit at 1e-3 where full fine-tuning uses 1e-5; Ben Zaken et al. 2022),
decayed linearly to 1e-4, no weight decay (it would pull the biases back to zero, not to the base's).

    python -m sft_jax.train --config=configs/lima_bitfit.py --config.model.path=/path/to/hf_model

The merged export needs a family whose transformers config can hold the trained biases (Llama:
attention_bias / mlp_bias; Qwen3: attention_bias; Qwen2: q/k/v only, so set
--config.peft.bitfit.targets=q_proj,k_proj,v_proj there); others train and generate from the work directory.
"""

import importlib.util
import pathlib

_spec = importlib.util.spec_from_file_location("_lima_config", pathlib.Path(__file__).with_name("lima.py"))
_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mod)
_lima = _mod.get_config


def get_config():
    c = _lima()
    c.peft.method = "bitfit"
    c.peft.bitfit.targets = "all-linear"
    c.train.lr = 1e-3
    c.train.end_lr = 1e-4
    c.train.weight_decay = 0.0
    c.model.param_dtype = "bfloat16"  # the frozen base may be bf16; the biases and optimizer stay f32
    return c
