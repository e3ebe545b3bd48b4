"""Phi-3.5-mini-instruct (3.8B, longrope to 128k) LoRA fine-tuning at 4096 tokens on one 8-device host.

LoRA r=16 on all linear layers -- Phi-3's own fused modules `qkv_proj`, `o_proj`, `gate_up_proj`,
`down_proj` (the names PEFT adapts on Phi3, so the PEFT export loads in `PeftModel` as is); bf16
frozen base, f32 adapters and Adam state; scanned layers with full remat; chunked cross-entropy.
4096 tokens = `original_max_position_embeddings`: every row uses longrope's short factors (a packed
segment longer than 4096 switches to the long factors, see sft_jax/models/rope.py).

    python -m sft_jax.train --config=configs/phi3_5_mini_lora.py --config.model.path=/path/to/Phi-3.5-mini-instruct
    python -m sft_jax.plan  --config=configs/phi3_5_mini_lora.py --target=tpu-v5e-8   # memory/FLOPs plan, no weights

`SHAPES` is the directory with the published Phi-3.5-mini-instruct config.json (the planner needs
shapes only, never weights).
"""

import pathlib

from sft_jax.config import default_config

SHAPES = str(pathlib.Path(__file__).resolve().parent / "shapes" / "phi3_5_mini")


def get_config():
    c = default_config()
    c.model.init = "pretrained"
    c.model.path = ""  # required for training: the Hugging Face directory of Phi-3.5-mini-instruct
    c.model.param_dtype = "bfloat16"
    c.model.dtype = "bfloat16"
    c.model.scan_layers = True
    c.model.remat = "full"

    c.data.path = ""  # required for training (the planner reads no data)
    c.data.template = ""  # the tokenizer's own Phi-3.5 template (or the built-in "phi3")
    c.data.max_length = 4096
    c.data.packing = True
    c.data.eval_fraction = 0.02

    c.train.batch_size = 8
    c.train.micro_batches = 1
    c.train.steps = 0
    c.train.epochs = 3
    c.train.lr = 2e-4
    c.train.end_lr = 2e-5
    c.train.schedule = "cosine"
    c.train.warmup_steps = 10
    c.train.weight_decay = 0.0
    c.train.grad_clip = 1.0
    c.train.loss_chunk_size = 1024

    c.peft.method = "lora"
    c.peft.lora.rank = 16
    c.peft.lora.alpha = 32.0
    c.peft.lora.dropout = 0.05
    c.peft.lora.targets = "all-linear"

    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1

    c.checkpoint.every_steps = 100
    c.checkpoint.keep = 2
    c.eval.every_steps = 100
    c.eval.num_generations = 3
    return c
