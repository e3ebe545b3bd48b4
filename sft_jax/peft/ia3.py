"""IA3 (Liu et al. 2022, "(IA)^3"), as peft's `IA3Config` (`peft.method=ia3`).

Learned scaling vectors on the projections `peft.ia3.targets` selects (peft's Llama defaults: k_proj,
v_proj, down_proj). A projection also selected by `peft.ia3.feedforward` (default down_proj, peft's
`feedforward_modules`) scales its INPUT: `y = (x * l) W + b` with l [in]; the others scale their OUTPUT:
`y = (x W + b) * l` with l [out]. Initialised to ones (peft's `init_ia3_weights=True`), so the first
forward is the base model exactly.

Trainable tree: `{..module path..: {"scale_in": [*lead, in]}}` or `{"scale_out": [*lead, out]}` (float32;
`lead` = the layer axis of a scanned base); frozen = the base params.

Merge (peft's `merge`): input scaling multiplies the kernel's rows (`W * l[:, None]` in our [in, out]
layout), output scaling its columns and the bias.

PEFT format: `adapter_config.json` (peft_type IA3, target_modules, feedforward_modules) and
`adapter_model.safetensors` with `base_model.model.<HF module>.ia3_l` shaped [1, in] (feedforward) or
[out, 1] (peft's parameter shapes).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from sft_jax.models.hooks import Hooks, LinearCall
from sft_jax.peft.base import Method, MethodConfigError, Params, PeftFormatError
from sft_jax.peft.lora import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, PREFIX, _config_from_params, _get, _is_scanned,
                               _set, _target_modules, module_map, same_language_model, target_paths)

PEFT_LEAF = "ia3_l"


def ia3_leaves(tree, prefix=()):
    """(module path, {"scale_in" | "scale_out": array}) of every scaled module."""
    if isinstance(tree, dict) and ("scale_in" in tree or "scale_out" in tree) and not any(
            isinstance(v, dict) for v in tree.values()):
        yield prefix, tree
        return
    for k in sorted(tree):
        if isinstance(tree[k], dict):
            yield from ia3_leaves(tree[k], prefix + (k,))


@dataclasses.dataclass(frozen=True)
class IA3(Method):
    """IA3 scaling vectors (see the module docstring)."""

    name: ClassVar[str] = "ia3"
    targets: str = "k_proj,v_proj,down_proj"
    feedforward: str = "down_proj"

    @classmethod
    def from_config(cls, peft_cfg) -> "IA3":
        s = peft_cfg["ia3"]
        return cls(targets=str(s["targets"]), feedforward=str(s["feedforward"]))

    def describe(self) -> str:
        return f"IA3 targets={self.targets} feedforward={self.feedforward or '-'}"

    def _paths(self, params: Params) -> tuple[list, set]:
        paths = target_paths(params, self.targets, "peft.ia3.targets")
        ff: set = set()
        if self.feedforward.strip():
            ff = set(target_paths(params, self.feedforward, "peft.ia3.feedforward"))
            extra = sorted("/".join(p) for p in ff - set(paths))
            if extra and not (ff & set(paths)):
                raise MethodConfigError(f"config field 'peft.ia3.feedforward' = {self.feedforward!r} selects no "
                                        f"module of peft.ia3.targets (e.g. {extra[0]}); it must be a subset")
        return paths, ff

    # trees
    def init_trainable(self, params: Params, frozen: Params, model_config, rng) -> Params:
        paths, ff = self._paths(params)
        out: Params = {}
        for path in paths:
            *lead, fan_in, fan_out = _get(params, path)["kernel"].shape
            if path in ff:
                _set(out, path, {"scale_in": jnp.ones((*lead, fan_in), jnp.float32)})
            else:
                _set(out, path, {"scale_out": jnp.ones((*lead, fan_out), jnp.float32)})
        return out

    def trainable_axes(self, trainable: Params, param_axes: Params) -> Params:
        def walk(node, axes):
            if "scale_in" in node and not isinstance(node["scale_in"], dict):
                *lead, ax_in, _ = axes["kernel"]
                return {"scale_in": (*lead, ax_in)}
            if "scale_out" in node and not isinstance(node["scale_out"], dict):
                *lead, _, ax_out = axes["kernel"]
                return {"scale_out": (*lead, ax_out)}
            return {k: walk(v, axes[k]) for k, v in node.items()}

        return walk(trainable, param_axes)

    def merge(self, trainable: Params, frozen: Params, model_config) -> Params:
        def walk(node, ad):
            if ad is None:
                return node
            if "scale_in" in ad and not isinstance(ad["scale_in"], dict):
                w = node["kernel"]
                l = ad["scale_in"].astype(jnp.float32)
                return {**node, "kernel": (w.astype(jnp.float32) * l[..., :, None]).astype(w.dtype)}
            if "scale_out" in ad and not isinstance(ad["scale_out"], dict):
                w = node["kernel"]
                l = ad["scale_out"].astype(jnp.float32)
                new = {**node, "kernel": (w.astype(jnp.float32) * l[..., None, :]).astype(w.dtype)}
                if "bias" in node:
                    new["bias"] = (node["bias"].astype(jnp.float32) * l).astype(node["bias"].dtype)
                return new
            return {k: walk(v, ad.get(k)) if isinstance(v, dict) else v for k, v in node.items()}

        return walk(frozen, trainable)

    # hooks
    def linear(self, call: LinearCall) -> jax.Array:
        dt = call.dtype
        s_in = call.get("scale_in")
        if s_in is not None:
            x = call.x.astype(dt) * s_in.astype(dt)
            return Hooks.linear(self, dataclasses.replace(call, x=x))
        y = Hooks.linear(self, call)
        s_out = call.get("scale_out")
        if s_out is None:
            return y
        return y * s_out.astype(dt)

    # PEFT
    def peft_config(self, model_config, modules: list[str], ff_modules: list[str], base: str = "") -> dict:
        all_modules = [n for names in module_map(model_config, False).values() for n in names]
        return {
            "peft_type": "IA3",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base or None,
            "target_modules": _target_modules(modules, all_modules),
            "feedforward_modules": _target_modules(ff_modules, all_modules) if ff_modules else [],
            "fan_in_fan_out": False,
            "init_ia3_weights": True,
            "inference_mode": True,
            "modules_to_save": None,
            "revision": None,
        }

    def save_peft(self, out_dir: str, trainable: Params, frozen: Params, model_config, *,
                  base_model_name_or_path: str = "", dtype: str = "float32") -> list[str]:
        import ml_dtypes
        from safetensors.numpy import save_file

        npdt = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[dtype]
        mm = module_map(model_config, _is_scanned(trainable))
        tensors, modules, ff = {}, [], []
        for path, leaf in ia3_leaves(trainable):
            if path not in mm:
                raise PeftFormatError(f"IA3 path {'/'.join(path)} is not a dense module of this model")
            kind, val = next(iter(leaf.items()))
            val = np.asarray(val, np.float32)
            names = mm[path]
            per = [val[i] for i in range(len(names))] if val.ndim == 2 else [val]
            for name, v in zip(names, per):
                tensors[f"{PREFIX}{name}.{PEFT_LEAF}"] = np.ascontiguousarray(
                    (v[None, :] if kind == "scale_in" else v[:, None]).astype(npdt))
                modules.append(name)
                if kind == "scale_in":
                    ff.append(name)
        if not tensors:
            raise PeftFormatError("the IA3 tree scales no module")
        os.makedirs(out_dir, exist_ok=True)
        save_file(tensors, os.path.join(out_dir, ADAPTER_WEIGHTS), metadata={"format": "pt"})
        with open(os.path.join(out_dir, ADAPTER_CONFIG), "w") as f:
            json.dump(self.peft_config(model_config, sorted(modules), sorted(ff), base_model_name_or_path), f,
                      indent=2, sort_keys=True)
        return sorted(modules)

    @classmethod
    def load_peft(cls, adapter_dir: str, params_or_config) -> tuple[Params, "IA3"]:
        from safetensors import safe_open

        from sft_jax.models.config import ModelConfig

        cfg_path = os.path.join(adapter_dir, ADAPTER_CONFIG)
        w_path = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
        for p in (cfg_path, w_path):
            if not os.path.isfile(p):
                raise PeftFormatError(f"{p} not found (a peft adapter directory needs {ADAPTER_CONFIG} and "
                                      f"{ADAPTER_WEIGHTS})")
        with open(cfg_path) as f:
            ac = json.load(f)
        if ac.get("peft_type") != "IA3":
            raise PeftFormatError(f"{cfg_path}: peft_type {ac.get('peft_type')!r} is not IA3")
        if ac.get("fan_in_fan_out") or ac.get("modules_to_save"):
            raise PeftFormatError(f"{cfg_path}: fan_in_fan_out / modules_to_save are not supported")
        by_module = {}
        with safe_open(w_path, framework="numpy") as f:
            for k in f.keys():
                m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.ia3_l(?:\.[A-Za-z0-9_]+)?", k)
                if not m:
                    raise PeftFormatError(f"{w_path}: unexpected tensor {k!r} (IA3 reads *.ia3_l)")
                by_module[m.group(1)] = f.get_tensor(k).astype(np.float32)
        if isinstance(params_or_config, ModelConfig):
            config, scanned = params_or_config, params_or_config.scan_layers
        else:
            scanned = _is_scanned(params_or_config)
            config = _config_from_params(params_or_config)
        mm = module_map(config, scanned)
        by_module = same_language_model(by_module, config)
        unknown = sorted(set(by_module) - {n for names in mm.values() for n in names})
        if unknown:
            raise PeftFormatError(f"{w_path}: adapter modules not in this model: {unknown[:5]}")
        tree: Params = {}
        ff_paths = []
        for path, names in mm.items():
            present = [n for n in names if n in by_module]
            if not present:
                continue
            if len(present) != len(names):
                raise PeftFormatError(f"{w_path}: IA3 covers {'/'.join(path)} in only some layers; load it with "
                                      "model.scan_layers=False")
            vals = [by_module[n] for n in names]
            kind = "scale_in" if vals[0].shape[0] == 1 else "scale_out"
            vs = [v.reshape(-1) for v in vals]
            _set(tree, path, {kind: jnp.asarray(np.stack(vs) if path[0] == "layers" else vs[0])})
            if kind == "scale_in":
                ff_paths.append(path)
        adapted = sorted("/".join(p) for p, _ in ia3_leaves(tree))
        ffs = sorted("/".join(p) for p in ff_paths)
        targets = "^(" + "|".join(re.escape(p) for p in adapted) + ")$"
        feedforward = ("^(" + "|".join(re.escape(p) for p in ffs) + ")$") if ffs else ""
        return tree, cls(targets=targets, feedforward=feedforward)
