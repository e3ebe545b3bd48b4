"""Fine-tuning methods behind one interface (`base.Method`); one module per method.

`METHODS` maps `peft.method` names to their classes; `from_config(cfg.peft)` builds the method of
a run, `from_run_config(run_json["peft"])` the method recorded in a work directory. A new method
is one module here, one line in `METHODS`, and its `peft.<name>` fields in `sft_jax/config.py`
(the schema stays there so that config checks answer before JAX loads) plus the name in
`config.CHOICES["peft.method"]`.
"""

from __future__ import annotations

from sft_jax.peft.base import Method, MethodConfigError, NotMergeable, PeftFormatError, count_params
from sft_jax.peft.bitfit import BitFit
from sft_jax.peft.bottleneck import Bottleneck
from sft_jax.peft.dora import Dora
from sft_jax.peft.full import Full
from sft_jax.peft.ia3 import IA3
from sft_jax.peft.lora import Lora
from sft_jax.peft.p_tuning import PTuning
from sft_jax.peft.prefix_tuning import PrefixTuning
from sft_jax.peft.prompt_tuning import PromptTuning
from sft_jax.peft.pissa import Pissa
from sft_jax.peft.qdora import QDora
from sft_jax.peft.qlora import QLora

METHODS: dict[str, type[Method]] = {
    Full.name: Full,
    Lora.name: Lora,
    QLora.name: QLora,
    Dora.name: Dora,
    Pissa.name: Pissa,
    QDora.name: QDora,
    PromptTuning.name: PromptTuning,
    PTuning.name: PTuning,
    PrefixTuning.name: PrefixTuning,
    IA3.name: IA3,
    BitFit.name: BitFit,
    Bottleneck.name: Bottleneck,
}


def get(name: str) -> type[Method]:
    """The method class named `name`; MethodConfigError listing the known names otherwise."""
    if name not in METHODS:
        raise MethodConfigError(f"config field 'peft.method' = {name!r} is not one of {sorted(METHODS)}")
    return METHODS[name]


def from_config(peft_cfg) -> Method:
    """The method of a run from its `peft` ConfigDict (or a dict of the same shape)."""
    return get(str(peft_cfg["method"])).from_config(peft_cfg)


def load_peft_adapter(adapter_dir: str, params_or_config) -> tuple[dict, Method]:
    """(trainable tree, method) of a PEFT adapter directory, by its adapter_config.json's peft_type
    (LORA, with use_dora -> DoRA; PROMPT_TUNING and P_TUNING -> prompt tuning with the saved
    embeddings; PREFIX_TUNING -> prefix tuning). The frozen tree is the base params."""
    import json
    import os

    path = os.path.join(adapter_dir, "adapter_config.json")
    if not os.path.isfile(path):
        raise PeftFormatError(f"{path} not found (a peft adapter directory needs adapter_config.json)")
    with open(path) as f:
        ac = json.load(f)
    kind = ac.get("peft_type")
    readers = {"LORA": Dora if ac.get("use_dora") else Lora, "PROMPT_TUNING": PromptTuning,
               "P_TUNING": PromptTuning, "PREFIX_TUNING": PrefixTuning}
    if kind not in readers:
        raise PeftFormatError(f"{path}: peft_type {kind!r} is not one of {sorted(readers)}")
    return readers[kind].load_peft(adapter_dir, params_or_config)


def from_run_config(d: dict) -> Method:
    """The method recorded in run.json (`Method.run_config()`)."""
    return from_config(d)


__all__ = ["METHODS", "Method", "MethodConfigError", "NotMergeable", "PeftFormatError",
           "count_params", "from_config", "from_run_config", "get", "load_peft_adapter"]
