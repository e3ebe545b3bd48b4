"""Llama-3.1-8B(-Instruct) QLoRA at 8192 tokens: the recipe of `llama3_8b_lora.py` on an NF4 base.

The frozen projections are quantised while they load to bitsandbytes NF4 (block 64, double-quantised
scales: ~4.13 bits a weight, 3.5 GB for the 7B of projection weights instead of 14 GB in bf16);
embeddings, norms and the LM head stay bf16. LoRA r=16 on all linear layers, float32 adapters and Adam
state, bf16 compute (the dequantised kernels are bf16). Fits one 16 GB device (fsdp=1) or shards like
the LoRA recipe.

    python -m sft_jax.train --config=configs/llama3_8b_qlora.py --config.model.path=/path/to/Llama-3.1-8B-Instruct
    python -m sft_jax.plan  --config=configs/llama3_8b_qlora.py --target=tpu-v5e-8    # memory/FLOPs plan, no weights
"""

import importlib.util
import pathlib

_spec = importlib.util.spec_from_file_location("_lora_8b", pathlib.Path(__file__).with_name("llama3_8b_lora.py"))
_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mod)
SHAPES = _mod.SHAPES


def get_config():
    c = _mod.get_config()
    c.peft.method = "qlora"
    c.peft.qlora.quant_type = "nf4"
    c.peft.qlora.double_quant = True
    c.peft.qlora.block_size = 64
    return c
