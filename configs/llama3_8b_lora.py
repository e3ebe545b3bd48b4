"""Llama-3.1-8B(-Instruct) LoRA fine-tuning at 8192 tokens on one 8-device host (TPU v5e/v5p/v6e-8, 8 GPUs).

LoRA r=16 on all linear layers; the frozen base is bfloat16 (16 GB), adapters and Adam state
float32 (~170 MB); bf16 compute, scanned layers with full remat (fast compile, small
activations), chunked cross-entropy (the 128k-vocab logits of an 8192-token row would be 4 GB).
Mesh: parameters sharded over every device (fsdp=-1); 8 packed rows of 8192 tokens per step.

    python -m sft_jax.train --config=configs/llama3_8b_lora.py --config.model.path=/path/to/Llama-3.1-8B-Instruct
    python -m sft_jax.plan  --config=configs/llama3_8b_lora.py --target=tpu-v5p-8      # memory/FLOPs plan, no weights

`SHAPES` (below) is the directory with the public Llama-3.1-8B config.json the planner uses when
model.path is empty: the planner needs shapes only, never weights.
"""

import pathlib

from sft_jax.config import default_config

SHAPES = str(pathlib.Path(__file__).resolve().parent / "shapes" / "llama3_8b")


def get_config():
    c = default_config()
    c.model.init = "pretrained"
    c.model.path = ""  # required for training: the Hugging Face directory of Llama-3.1-8B(-Instruct)
    c.model.param_dtype = "bfloat16"  # frozen base in bf16; LoRA weights and optimizer state stay f32
    c.model.dtype = "bfloat16"
    c.model.scan_layers = True
    c.model.remat = "full"

    c.data.path = ""  # required for training (the planner reads no data)
    c.data.source_help = ("pass --config.data.path=FILE[,FILE...], a directory or a Hugging Face dataset id "
                          "hf:org/name[:config][@split] (e.g. a local LIMA file, as configs/lima.py)")
    c.data.template = ""  # the tokenizer's own (Llama 3) chat template
    c.data.max_length = 8192
    c.data.packing = True
    c.data.eval_fraction = 0.02

    c.train.batch_size = 8  # global rows per step: 8 x 8192 = 65k tokens
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
