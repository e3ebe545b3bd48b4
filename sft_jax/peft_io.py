"""PEFT (Hugging Face `peft`) LoRA adapters <-> the sft_jax LoRA tree.

peft's layout for a causal LM: `adapter_config.json` (peft_type LORA, task_type CAUSAL_LM, r,
lora_alpha, use_rslora, target_modules, ...) and `adapter_model.safetensors` with keys
`base_model.model.<HF module>.lora_A.weight` [r, in] and `...lora_B.weight` [out, r]; the
update is `scaling * B @ A` with scaling = lora_alpha / r (or / sqrt(r) with use_rslora).
Ours: `{..path..: {"A": [in, r], "B": [r, out]}}` and `x @ A @ B * scale`, so A_peft = A.T,
B_peft = B.T and the scale rules are identical.

`target_modules` is written as a list of module names (["q_proj", "v_proj"]) when the adapter
covers those modules in every layer, else as a regex that peft full-matches against module
names (exactly the adapted ones).  Reading accepts both, and the "all-linear" shorthand.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import numpy as np

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."


class PeftFormatError(ValueError):
    """An adapter directory sft_jax cannot read (missing files, unsupported peft features)."""


def _module_map(config, scan_layers: bool) -> dict[tuple, list[str]]:
    """Our dense-module path (without 'kernel') -> HF module names (one per stacked layer, or one)."""
    from sft_jax.models.hf_io import param_mapping

    out = {}
    for ours, names, _ in param_mapping(config, scan_layers=scan_layers):
        if ours[-1] == "kernel":
            out[tuple(ours[:-1])] = [n[: -len(".weight")] for n in names]
    return out


def _lora_leaves(tree, prefix=()):
    if isinstance(tree, dict) and "A" in tree and "B" in tree and not isinstance(tree["A"], dict):
        yield prefix, tree
        return
    for k in sorted(tree):
        yield from _lora_leaves(tree[k], prefix + (k,))


def _is_scanned(tree) -> bool:
    return isinstance(tree, dict) and "layers" in tree


def lora_to_peft_tensors(lora: dict, config) -> dict[str, np.ndarray]:
    """The safetensors dict peft expects (float32 unless the tree holds another float dtype)."""
    mm = _module_map(config, _is_scanned(lora))
    out: dict[str, np.ndarray] = {}
    for path, leaf in _lora_leaves(lora):
        if path not in mm:
            raise PeftFormatError(f"LoRA path {'/'.join(path)} is not a dense module of this {config.model_type} model")
        a = np.asarray(leaf["A"])
        b = np.asarray(leaf["B"])
        names = mm[path]
        for i, name in enumerate(names):
            ai, bi = (a[i], b[i]) if len(names) > 1 or a.ndim == 3 else (a, b)
            out[f"{PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(ai.T)
            out[f"{PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(bi.T)
    return out


def _target_modules(modules: list[str], all_modules: list[str]) -> Any:
    """A list of suffix names when it selects exactly `modules`, else an exact full-match regex."""
    names = sorted({m.rsplit(".", 1)[-1] for m in modules})
    chosen = sorted(m for m in all_modules if m.rsplit(".", 1)[-1] in names)
    if chosen == sorted(modules):
        return names
    return "^(" + "|".join(re.escape(m) for m in sorted(modules)) + ")$"


def adapter_config(lora_cfg, config, modules: list[str], base_model_name_or_path: str = "") -> dict:
    all_modules = [n for names in _module_map(config, False).values() for n in names]
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path or None,
        "r": int(lora_cfg.rank),
        "lora_alpha": float(lora_cfg.alpha) if not float(lora_cfg.alpha).is_integer() else int(lora_cfg.alpha),
        "lora_dropout": float(lora_cfg.dropout),
        "use_rslora": bool(lora_cfg.rslora),
        "target_modules": _target_modules(modules, all_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }


def save_peft_adapter(out_dir: str, lora: dict, lora_cfg, config, *, base_model_name_or_path: str = "",
                      dtype: str = "float32") -> list[str]:
    """Write adapter_config.json + adapter_model.safetensors; returns the module names adapted."""
    import ml_dtypes
    from safetensors.numpy import save_file

    if not lora_cfg.enabled:
        raise PeftFormatError("this run is full fine-tuning (lora.rank = 0): there is no adapter to export; "
                              "use --format=merged")
    tensors = lora_to_peft_tensors(lora, config)
    npdt = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[dtype]
    tensors = {k: v.astype(npdt) for k, v in tensors.items()}
    modules = sorted({k[len(PREFIX):].rsplit(".lora_", 1)[0] for k in tensors})
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(out_dir, ADAPTER_CONFIG), "w") as f:
        json.dump(adapter_config(lora_cfg, config, modules, base_model_name_or_path), f, indent=2, sort_keys=True)
    return modules


def _selected(target_modules, all_modules: list[str]) -> list[str]:
    if target_modules is None:
        return []
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            return [m for m in all_modules if m != "lm_head"]
        rx = re.compile(target_modules)
        return [m for m in all_modules if rx.fullmatch(m)]
    names = set(target_modules)
    return [m for m in all_modules if m in names or m.rsplit(".", 1)[-1] in names]


def load_peft_adapter(adapter_dir: str, params_or_config) -> tuple[dict, Any]:
    """Read a peft LoRA adapter -> (sft_jax LoRA tree (float32), sft_jax.lora.LoraConfig).

    `params_or_config`: the base params (the tree layout, scanned or not, is taken from them) or a
    ModelConfig (its `scan_layers` decides).  The returned LoraConfig's `targets` selects exactly
    the adapted modules (so `init_lora`/`target_paths` agree with the tree).  Unsupported peft
    features (DoRA, bias adapters, modules_to_save, rank/alpha patterns) raise PeftFormatError.
    """
    import jax.numpy as jnp
    from safetensors import safe_open

    from sft_jax.lora import LoraConfig
    from sft_jax.models.config import ModelConfig

    cfg_path = os.path.join(adapter_dir, ADAPTER_CONFIG)
    w_path = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
    for p in (cfg_path, w_path):
        if not os.path.isfile(p):
            raise PeftFormatError(f"{p} not found (a peft adapter directory needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    with open(cfg_path) as f:
        ac = json.load(f)
    if ac.get("peft_type", "LORA") != "LORA":
        raise PeftFormatError(f"{cfg_path}: peft_type {ac.get('peft_type')!r} is not LORA")
    for k, bad in (("use_dora", True), ("modules_to_save", None), ("rank_pattern", {}), ("alpha_pattern", {})):
        v = ac.get(k, bad if k != "use_dora" else False)
        if (k == "use_dora" and v) or (k != "use_dora" and v not in (None, {}, [])):
            raise PeftFormatError(f"{cfg_path}: {k}={v!r} is not supported by sft_jax")
    if ac.get("bias", "none") != "none":
        raise PeftFormatError(f"{cfg_path}: bias={ac['bias']!r} is not supported (only 'none')")
    if ac.get("fan_in_fan_out"):
        raise PeftFormatError(f"{cfg_path}: fan_in_fan_out=True is not supported")

    if isinstance(params_or_config, ModelConfig):
        config, scanned = params_or_config, params_or_config.scan_layers
    else:
        scanned = _is_scanned(params_or_config)
        config = None
    rank = int(ac["r"])
    with safe_open(w_path, framework="numpy") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    by_module: dict[str, dict[str, np.ndarray]] = {}
    for k, v in tensors.items():
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[A-Za-z0-9_]+)?\.weight", k)
        if not m:
            raise PeftFormatError(f"{w_path}: unexpected tensor {k!r} (only lora_A/lora_B weights are supported)")
        by_module.setdefault(m.group(1), {})[m.group(2)] = v
    if config is None:
        config = _config_from_params(params_or_config, by_module)
    mm = _module_map(config, scanned)
    hf_to_ours = {name: (path, i) for path, names in mm.items() for i, name in enumerate(names)}
    unknown = sorted(set(by_module) - set(hf_to_ours))
    if unknown:
        raise PeftFormatError(f"{w_path}: adapter modules not in this model: {unknown[:5]}")
    tree: dict = {}
    for path, names in mm.items():
        present = [n for n in names if n in by_module]
        if not present:
            continue
        As, Bs = [], []
        for n in names:
            if n in by_module:
                pair = by_module[n]
                if set(pair) != {"A", "B"}:
                    raise PeftFormatError(f"{w_path}: {n} lacks lora_A or lora_B")
                a, b = pair["A"].astype(np.float32).T, pair["B"].astype(np.float32).T
                if a.shape[1] != rank or b.shape[0] != rank:
                    raise PeftFormatError(f"{w_path}: {n} has rank {a.shape[1]}, adapter_config says r={rank}")
            else:  # scanned tree, adapter on only some layers: zero update for the others
                ref = by_module[present[0]]
                a = np.zeros(ref["A"].T.shape, np.float32)
                b = np.zeros(ref["B"].T.shape, np.float32)
            As.append(a)
            Bs.append(b)
        a, b = (np.stack(As), np.stack(Bs)) if path and path[0] == "layers" else (As[0], Bs[0])
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = {"A": jnp.asarray(a), "B": jnp.asarray(b)}
    if not tree:
        raise PeftFormatError(f"{w_path}: no LoRA tensors")
    adapted = sorted("/".join(p) for p, _ in _lora_leaves(tree))
    targets = "^(" + "|".join(re.escape(p) for p in adapted) + ")$"
    lcfg = LoraConfig(rank=rank, alpha=float(ac.get("lora_alpha", 8)), dropout=float(ac.get("lora_dropout", 0.0)),
                      rslora=bool(ac.get("use_rslora", False)), targets=targets)
    return tree, lcfg


def _config_from_params(params: dict, by_module: dict) -> Any:  # noqa: ARG001
    """A minimal ModelConfig able to name the dense modules of `params` (names only matter)."""
    from sft_jax.models.config import ModelConfig

    scanned = _is_scanned(params)
    if scanned:
        n_layers = int(np.shape(params["layers"]["input_norm"]["scale"])[0])
    else:
        n_layers = sum(1 for k in params if re.fullmatch(r"layers_\d+", k))
    return ModelConfig(num_layers=n_layers, num_heads=1, num_kv_heads=1, hidden_size=8,
                       tie_embeddings="lm_head" not in params, scan_layers=scanned)
