"""LIMA (Zhou et al., 2023): 1,000 curated examples are enough.

The paper's recipe: full fine-tuning, 15 epochs, AdamW beta1 0.9, beta2 0.95, weight decay
0.1, lr 1e-5 decayed linearly to 1e-6 with no warmup, batch 32 sequences, max length 2048.
(The paper also raises residual dropout from 0.0 to 0.3 across layers; sft_jax's model has no
residual dropout, noted in BUILD_NOTES.md.)

    python -m sft_jax.train --config=configs/lima.py --config.model.path=/path/to/hf_model \
        --config.data.path=/path/to/lima.json --workdir=runs/lima
"""

from sft_jax.config import default_config

LIMA_HELP = (
    "LIMA (1,000 curated conversations, Zhou et al. 2023) is not shipped with sft_jax: pass "
    "--config.data.path=FILE, a local copy (e.g. LLaMA-Factory's data/lima.json, alpaca format; the original "
    "is the gated Hugging Face dataset GAIR/lima), or a Hugging Face dataset id in a supported format, "
    "--config.data.path=hf:org/name[:config][@split]"
)


def get_config():
    c = default_config()
    c.model.init = "pretrained"
    c.model.path = ""  # required: a Hugging Face directory (config.json + *.safetensors)
    c.model.param_dtype = "float32"
    c.model.dtype = "bfloat16"
    c.model.remat = "full"

    c.data.path = ""  # required: a LIMA file or hub id (see LIMA_HELP)
    c.data.source_help = LIMA_HELP
    c.data.format = "auto"
    c.data.max_length = 2048
    c.data.packing = True
    c.data.template = ""  # the tokenizer's own chat template; set e.g. "chatml" for a base model
    c.data.eval_fraction = 0.02

    c.train.batch_size = 32
    c.train.micro_batches = 1
    c.train.steps = 0
    c.train.epochs = 15
    c.train.lr = 1e-5
    c.train.end_lr = 1e-6
    c.train.schedule = "linear"
    c.train.warmup_steps = 0
    c.train.b1 = 0.9
    c.train.b2 = 0.95
    c.train.weight_decay = 0.1
    c.train.grad_clip = 1.0

    c.peft.method = "full"  # full fine-tuning, as in the paper

    c.checkpoint.every_steps = 100
    c.checkpoint.keep = 2
    c.eval.every_steps = 100
    return c
