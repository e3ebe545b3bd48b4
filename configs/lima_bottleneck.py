"""LIMA data and schedule with bottleneck adapters (Houlsby et al. 2019: after attention and after the MLP).

AdapterHub's `DoubleSeqBnConfig` defaults: reduction factor 16 (m = hidden / 16: 256 on a 4096-wide model,
the size LLM-Adapters (Hu et al. 2023) used for series adapters on LLaMA-7B), SiLU ("swish"). Learning rate
3e-4 decayed linearly to 3e-5: Houlsby et al. swept 3e-5..3e-3 (best mostly 1e-4..1e-3 with sizes 8..256),
Pfeiffer et al. / AdapterHub use 1e-4, LLM-Adapters 3e-4. `--config.peft.bottleneck.style=pfeiffer` puts one
adapter after the MLP only (ReLU, half the parameters).

    python -m sft_jax.train --config=configs/lima_bottleneck.py --config.model.path=/path/to/hf_model
"""

import importlib.util
import pathlib

_spec = importlib.util.spec_from_file_location("_lima_config", pathlib.Path(__file__).with_name("lima.py"))
_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mod)
_lima = _mod.get_config


def get_config():
    c = _lima()
    c.peft.method = "bottleneck"
    c.peft.bottleneck.style = "houlsby"
    c.peft.bottleneck.size = 0  # hidden_size // reduction_factor
    c.peft.bottleneck.reduction_factor = 16.0
    c.peft.bottleneck.activation = "auto"  # houlsby: silu (AdapterHub's "swish")
    c.train.lr = 3e-4
    c.train.end_lr = 3e-5
    c.train.weight_decay = 0.0  # AdapterHub / Houlsby: no weight decay on the adapters
    c.model.param_dtype = "bfloat16"  # the frozen base may be bf16; the adapters and optimizer stay f32
    return c
