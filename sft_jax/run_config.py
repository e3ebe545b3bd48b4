"""The validated config as typed, frozen sections: what everything below the trainer's entry point reads.

`RunConfig.parse(cfg)` runs once, after `config.validate(cfg)`, and turns the `ml_collections.ConfigDict`
into a frozen dataclass with one frozen dataclass per section (`model`, `data`, `train`, `peft`, `neftune`,
`mesh`, `checkpoint`, `eval`) and per sub-section (`model.tiny`, `peft.lora`, `train.early_stopping`, ...).

The section classes are generated from the schema (`config.default_config()`), so a field added there is
typed here without a second list to keep in step: each field's type is its default's type (`int`, `float`,
`bool`, `str`), and a value of another type was already refused by `validate`.  Sections read like the
ConfigDict they replace (`rc.train.lr`, and `section["lora"]` for the method registry's `from_config`),
cannot be changed (`dataclasses.replace` makes a changed copy: the trainer fills in the tiny run's data
paths that way) and are picklable (grain workers receive the data section).

`rc.to_dict()` is the plain nested dict written to run.json, run_info.json and the checkpoints' meta.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import ml_collections

from sft_jax.config import default_config


class Section:
    """Base of every generated section: attribute reads, `section[name]`, `to_dict()`, `replace(**kw)`."""

    def __getitem__(self, name: str) -> Any:
        try:
            return getattr(self, name)
        except AttributeError:
            raise KeyError(name) from None

    def get(self, name: str, default: Any = None) -> Any:
        return getattr(self, name, default)

    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.to_dict() if isinstance(v, Section) else v
        return out

    def replace(self, **changes) -> "Section":
        return dataclasses.replace(self, **changes)


def _class_name(path: str) -> str:
    if not path:
        return "RunConfig"
    return "".join(p.title().replace("_", "") for p in path.split(".")) + "Section"


def _make_section(path: str, schema: ml_collections.ConfigDict) -> type:
    """A frozen dataclass for the section at `path` (e.g. "train.early_stopping"), registered in this
    module under a stable name so that pickling works."""
    fields = []
    for name, default in schema.items():
        if isinstance(default, ml_collections.ConfigDict):
            fields.append((name, _make_section(f"{path}.{name}" if path else name, default)))
        else:
            fields.append((name, type(default)))
    cls = dataclasses.make_dataclass(_class_name(path), fields, bases=(Section,), frozen=True)
    cls.__module__ = __name__
    setattr(sys.modules[__name__], cls.__name__, cls)
    return cls


def _build(cls: type, values: ml_collections.ConfigDict) -> Section:
    kwargs = {}
    for f in dataclasses.fields(cls):
        v = values[f.name]
        if isinstance(f.type, type) and issubclass(f.type, Section):
            kwargs[f.name] = _build(f.type, v)
        elif f.type is float:
            kwargs[f.name] = float(v)  # validate accepts an int for a float field
        else:
            kwargs[f.name] = v
    return cls(**kwargs)


RunConfig = _make_section("", default_config())
RunConfig.__doc__ = "The whole validated config (see the module doc); `RunConfig.parse(cfg)` builds it."


def parse(cfg: ml_collections.ConfigDict | dict) -> Section:
    """The validated ConfigDict (or its `to_dict()`) -> a frozen `RunConfig` (call after `validate`)."""
    if not isinstance(cfg, ml_collections.ConfigDict):
        cfg = ml_collections.ConfigDict(cfg)
    return _build(RunConfig, cfg)


RunConfig.parse = staticmethod(parse)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """A nested config dict -> {"section.field": value}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
