"""Llama-3.1-8B full fine-tuning at 8192 tokens on one 8-device host with >= 80 GB per device
(TPU v5p-8, 8x H100/A100-80G; `python -m sft_jax.plan` says what fits where).

Weights, gradients and Adam state are float32 (8B x 16 bytes = 128 GB, sharded over all devices
by fsdp=-1: 16 GB per device of 8), bf16 compute, scanned layers with full remat, chunked
cross-entropy.  8 packed rows of 8192 tokens per step.

    python -m sft_jax.train --config=configs/llama3_8b_full.py --config.model.path=/path/to/Llama-3.1-8B
    python -m sft_jax.plan  --config=configs/llama3_8b_full.py --target=h100-8
"""

import pathlib

from sft_jax.config import default_config

SHAPES = str(pathlib.Path(__file__).resolve().parent / "shapes" / "llama3_8b")


def get_config():
    c = default_config()
    c.model.init = "pretrained"
    c.model.path = ""  # required for training: the Hugging Face directory of Llama-3.1-8B(-Instruct)
    c.model.param_dtype = "float32"  # full fine-tuning keeps f32 master weights
    c.model.dtype = "bfloat16"
    c.model.scan_layers = True
    c.model.remat = "full"

    c.data.path = ""  # required for training (the planner reads no data)
    c.data.source_help = ("pass --config.data.path=FILE[,FILE...], a directory or a Hugging Face dataset id "
                          "hf:org/name[:config][@split] (e.g. a local LIMA file, as configs/lima.py)")
    c.data.template = ""
    c.data.max_length = 8192
    c.data.packing = True
    c.data.eval_fraction = 0.02

    c.train.batch_size = 8
    c.train.micro_batches = 1
    c.train.steps = 0
    c.train.epochs = 3
    c.train.lr = 1e-5
    c.train.end_lr = 1e-6
    c.train.schedule = "cosine"
    c.train.warmup_steps = 10
    c.train.b2 = 0.95
    c.train.weight_decay = 0.1
    c.train.grad_clip = 1.0
    c.train.loss_chunk_size = 1024

    c.peft.method = "full"

    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1

    c.checkpoint.every_steps = 100
    c.checkpoint.keep = 2
    c.eval.every_steps = 100
    c.eval.num_generations = 3
    return c
