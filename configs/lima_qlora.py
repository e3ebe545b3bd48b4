"""LIMA data with QLoRA (Dettmers et al. 2023): LoRA on a frozen NF4 base with double-quantised block scales.

The QLoRA paper's recipe for 7B / 13B models (artidoro/qlora, scripts/finetune_guanaco_7b.sh): rank 64,
alpha 16, dropout 0.1 (0.05 for 33B / 65B), all linear layers, lr 2e-4 (1e-4 for 33B / 65B) with a constant
schedule, max grad norm 0.3, Adam beta2 0.999, no weight decay. `--config.peft.qlora.quant_type=int8` stores
the base as LLM.int8 row-wise weights instead.

    python -m sft_jax.train --config=configs/lima_qlora.py --config.model.path=/path/to/hf_model
"""

import importlib.util
import pathlib

_spec = importlib.util.spec_from_file_location("_lima_config", pathlib.Path(__file__).with_name("lima.py"))
_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mod)
_lima = _mod.get_config


def get_config():
    c = _lima()
    c.peft.method = "qlora"
    c.peft.qlora.quant_type = "nf4"
    c.peft.qlora.double_quant = True
    c.peft.qlora.block_size = 64
    c.peft.lora.rank = 64
    c.peft.lora.alpha = 16.0
    c.peft.lora.dropout = 0.1
    c.peft.lora.targets = "all-linear"
    c.train.lr = 2e-4
    c.train.end_lr = 2e-4
    c.train.schedule = "constant"
    c.train.b2 = 0.999
    c.train.grad_clip = 0.3
    c.train.weight_decay = 0.0
    return c
