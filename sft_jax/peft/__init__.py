"""Fine-tuning methods behind one interface (`base.Method`); one module per method.

`METHODS` maps `peft.method` names to their classes; `from_config(cfg.peft)` builds the method of
a run, `from_run_config(run_json["peft"])` the method recorded in a work directory. A new method
is one module here plus one line in `METHODS`.
"""

from __future__ import annotations

import ml_collections

from sft_jax.peft.base import Method, MethodConfigError, NotMergeable, PeftFormatError, count_params
from sft_jax.peft.full import Full
from sft_jax.peft.lora import Lora

METHODS: dict[str, type[Method]] = {
    Full.name: Full,
    Lora.name: Lora,
}


def config_section() -> ml_collections.ConfigDict:
    """The `peft` section of the config schema: `method` plus every method's sub-section."""
    c = ml_collections.ConfigDict()
    c.method = "full"  # one of METHODS
    for name, cls in METHODS.items():
        section = cls.config_section()
        if len(section):
            c[name] = section
    return c


def get(name: str) -> type[Method]:
    """The method class named `name`; MethodConfigError listing the known names otherwise."""
    if name not in METHODS:
        raise MethodConfigError(f"config field 'peft.method' = {name!r} is not one of {sorted(METHODS)}")
    return METHODS[name]


def from_config(peft_cfg) -> Method:
    """The method of a run from its `peft` ConfigDict (or a dict of the same shape)."""
    return get(str(peft_cfg["method"])).from_config(peft_cfg)


def from_run_config(d: dict) -> Method:
    """The method recorded in run.json (`Method.run_config()`)."""
    return from_config(d)


__all__ = ["METHODS", "Method", "MethodConfigError", "NotMergeable", "PeftFormatError", "config_section",
           "count_params", "from_config", "from_run_config", "get"]
