"""Alpaca-style instruction data, LoRA, cosine schedule with warmup, NEFTune alpha 5.

    python -m sft_jax.train --config=configs/alpaca.py --config.model.path=/path/to/hf_model \
        --config.data.path=hf:tatsu-lab/alpaca
"""

from sft_jax.config import default_config

ALPACA_HELP = (
    "alpaca data are not shipped with sft_jax: pass --config.data.path=hf:tatsu-lab/alpaca (Stanford Alpaca, "
    "52K rows, from the Hugging Face hub), hf:yahma/alpaca-cleaned, or a local file in alpaca format "
    "(instruction/input/output, e.g. LLaMA-Factory's data/alpaca_en_demo.json)"
)


def get_config():
    c = default_config()
    c.model.init = "pretrained"
    c.model.path = ""
    c.model.param_dtype = "bfloat16"
    c.model.dtype = "bfloat16"

    c.data.path = ""  # required: an alpaca file or hub id (see ALPACA_HELP)
    c.data.source_help = ALPACA_HELP
    c.data.format = "alpaca"
    c.data.max_length = 1024
    c.data.packing = True
    c.data.eval_fraction = 0.02

    c.train.batch_size = 16
    c.train.epochs = 3
    c.train.lr = 2e-4
    c.train.end_lr = 0.0
    c.train.schedule = "cosine"
    c.train.warmup_steps = 20
    c.train.weight_decay = 0.0

    c.peft.method = "lora"
    c.peft.lora.rank = 16
    c.peft.lora.alpha = 32.0
    c.peft.lora.dropout = 0.05
    c.peft.lora.targets = "all-linear"

    c.neftune.alpha = 5.0

    c.checkpoint.every_steps = 100
    c.eval.every_steps = 100
    return c
