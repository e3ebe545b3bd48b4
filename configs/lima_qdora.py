"""LIMA data with QDoRA: DoRA on the frozen NF4 base (peft's `use_dora=True` on a bitsandbytes 4-bit model).

QDoRA has no paper of its own: Answer.AI's FSDP-QDoRA runs (referenced by NVlabs/DoRA's QDoRA/README.md) use
the QLoRA defaults of fsdp_qlora (rank 64, alpha 16, dropout 0.1, all linear layers, constant schedule), so
this preset is configs/lima_qlora.py (lr 2e-4, grad norm 0.3) with the DoRA adapter.

    python -m sft_jax.train --config=configs/lima_qdora.py --config.model.path=/path/to/hf_model
"""

import importlib.util
import pathlib

_spec = importlib.util.spec_from_file_location("_lima_qlora_config", pathlib.Path(__file__).with_name("lima_qlora.py"))
_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mod)
_lima_qlora = _mod.get_config


def get_config():
    c = _lima_qlora()
    c.peft.method = "qdora"
    return c
