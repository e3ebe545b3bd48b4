"""LoRA and rsLoRA (`peft.method=lora`, `peft.lora.rslora`): `y = x W (+ b) + s * dropout(x) A B`.

Trees: trainable `{..module path..: {"A": [*lead, in, r], "B": [*lead, r, out]}}` (float32; `lead`
is the layer axis of a scanned base) for the modules `peft.lora.targets` selects; frozen = the base
params unchanged. The scale s is alpha / r, or alpha / sqrt(r) with rsLoRA (peft's `use_rslora`).

Initialisation follows peft: A ~ kaiming_uniform(a=sqrt(5)) on peft's [r, in] weight, i.e.
U(-1/sqrt(in), 1/sqrt(in)), stored transposed as [in, r]; B = 0, so the first forward equals the
base model exactly.

Hooks: `linear` adds the low-rank term at the adapted projections; `low_rank` states it as
`LowRank`, so the CPU kernels fold it into the base dot (kernels/fused.py).

PEFT format (`save_peft` / `load_peft`): `adapter_config.json` (peft_type LORA, r, lora_alpha,
use_rslora, target_modules, ...) and `adapter_model.safetensors` with keys
`base_model.model.<HF module>.lora_A.weight` [r, in] and `...lora_B.weight` [out, r]; peft's update
is `scaling * B @ A` with the same scaling rules, so A_peft = A.T and B_peft = B.T.
`target_modules` is written as a list of module names (["q_proj", "v_proj"]) when the adapter
covers those modules in every layer, else as a regex that peft full-matches against module names
(exactly the adapted ones). Reading accepts both, and the "all-linear" shorthand.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from sft_jax.models.hooks import LinearCall, LowRank, dropout
from sft_jax.peft.base import Method, MethodConfigError, Params, PeftFormatError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."


def lora_scale(alpha: float, rank: int, rslora: bool = False) -> float:
    """alpha / r (LoRA) or alpha / sqrt(r) (rsLoRA)."""
    return float(alpha) / (math.sqrt(rank) if rslora else rank)


# ------------------------------------------------------------------ module selection
def _is_dense(node) -> bool:
    return isinstance(node, dict) and "kernel" in node and not isinstance(node["kernel"], dict)


def dense_paths(params: Params, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Paths (tuples of keys) of every module holding a `kernel` leaf, in sorted key order."""
    out = []
    for k in sorted(params):
        v = params[k]
        if _is_dense(v):
            out.append(prefix + (k,))
        elif isinstance(v, dict):
            out.extend(dense_paths(v, prefix + (k,)))
    return out


def target_paths(params: Params, targets: str, field: str = "peft.lora.targets") -> list[tuple[str, ...]]:
    """Dense-module paths selected by `targets`:

    - "all-linear": every dense except the output head (`lm_head`), as in peft;
    - a comma list of module names ("q_proj,v_proj"): matched against the last path component;
    - anything else is a regex, `re.search`ed over the '/'-joined module path
      (e.g. "layers_[0-3]/attn/(q|v)_proj" or ".*mlp/.*").
    Raises MethodConfigError (naming `field`) when nothing matches.
    """
    spec = targets.strip()
    paths = dense_paths(params)
    if spec == "all-linear":
        chosen = [p for p in paths if p[-1] != "lm_head"]
    elif re.fullmatch(r"[A-Za-z0-9_]+(\s*,\s*[A-Za-z0-9_]+)*", spec):
        names = {s.strip() for s in spec.split(",")}
        chosen = [p for p in paths if p[-1] in names]
    else:
        try:
            rx = re.compile(spec)
        except re.error as e:
            raise MethodConfigError(f"config field '{field}' = {targets!r} is not a valid regex: {e}") from None
        chosen = [p for p in paths if rx.search("/".join(p))]
    if not chosen:
        raise MethodConfigError(
            f"config field '{field}' = {targets!r} matches no dense module; available: "
            + ", ".join(sorted({"/".join(p) for p in paths}))[:500]
        )
    return chosen


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _set(tree: dict, path, value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def adapter_leaves(tree, prefix=()):
    """(module path, {"A", "B", ...}) for every adapted module of a LoRA-family tree."""
    if isinstance(tree, dict) and "A" in tree and "B" in tree and not isinstance(tree["A"], dict):
        yield prefix, tree
        return
    for k in sorted(tree):
        if isinstance(tree[k], dict):
            yield from adapter_leaves(tree[k], prefix + (k,))


def init_adapters(params: Params, targets: str, rank: int, rng: jax.Array) -> Params:
    """peft's initial A (kaiming-uniform) and B (zeros), float32, for the modules `targets` selects."""
    out: Params = {}
    paths = target_paths(params, targets)
    keys = jax.random.split(rng, len(paths))
    for key, path in zip(keys, paths):
        kernel = _get(params, path)["kernel"]
        *lead, fan_in, fan_out = kernel.shape
        bound = 1.0 / math.sqrt(fan_in)
        a = jax.random.uniform(key, (*lead, fan_in, rank), jnp.float32, -bound, bound)
        b = jnp.zeros((*lead, rank, fan_out), jnp.float32)
        _set(out, path, {"A": a, "B": b})
    return out


def adapter_axes(trainable: Params, param_axes: Params) -> Params:
    """Logical axes of a LoRA-family tree from the base kernels': A -> (*lead, in_axis, None),
    B -> (*lead, None, out_axis); other leaves of an adapted module (e.g. DoRA's magnitude [*lead,
    out]) -> (*lead, out_axis)."""

    def walk(node, axes):
        if isinstance(node, dict) and "A" in node and "B" in node and not isinstance(node["A"], dict):
            *lead, ax_in, ax_out = axes["kernel"]
            return {k: (*lead, ax_in, None) if k == "A" else (*lead, None, ax_out) if k == "B" else (*lead, ax_out)
                    for k in node}
        return {k: walk(v, axes[k]) for k, v in node.items()}

    return walk(trainable, param_axes)


def merge_low_rank(base: Params, trainable: Params, scale: float) -> Params:
    """Plain weights: W + scale * A @ B at every adapted module (float32 math, cast back to W's dtype)."""

    def walk(node, lora):
        if lora is None:
            return node
        if isinstance(lora, dict) and "A" in lora and "B" in lora and not isinstance(lora["A"], dict):
            w = node["kernel"]
            delta = jnp.einsum("...ir,...ro->...io", lora["A"].astype(jnp.float32), lora["B"].astype(jnp.float32))
            return {**node, "kernel": (w.astype(jnp.float32) + scale * delta).astype(w.dtype)}
        return {k: walk(v, lora.get(k)) if isinstance(v, dict) else v for k, v in node.items()}

    return walk(base, trainable)


# ------------------------------------------------------------------ the method
@dataclasses.dataclass(frozen=True)
class Lora(Method):
    """LoRA / rsLoRA on the projections `targets` selects (see `target_paths`)."""

    name: ClassVar[str] = "lora"
    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    targets: str = "all-linear"

    def __post_init__(self):
        if self.rank <= 0:
            raise MethodConfigError(f"config field 'peft.lora.rank' must be > 0, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise MethodConfigError(f"config field 'peft.lora.dropout' must be in [0, 1), got {self.dropout}")

    @classmethod
    def from_config(cls, peft_cfg) -> "Lora":
        s = peft_cfg["lora"]
        return cls(rank=int(s["rank"]), alpha=float(s["alpha"]), dropout=float(s["dropout"]),
                   rslora=bool(s["rslora"]), targets=str(s["targets"]))

    @property
    def scale(self) -> float:
        return lora_scale(self.alpha, self.rank, self.rslora)

    def describe(self) -> str:
        return f"{'rsLoRA' if self.rslora else 'LoRA'} r={self.rank} alpha={self.alpha:g} targets={self.targets}"

    # trees
    def init_trainable(self, params: Params, frozen: Params, model_config, rng) -> Params:
        return init_adapters(params, self.targets, self.rank, rng)

    def trainable_axes(self, trainable: Params, param_axes: Params) -> Params:
        return adapter_axes(trainable, param_axes)

    def merge(self, trainable: Params, frozen: Params, model_config) -> Params:
        return merge_low_rank(frozen, trainable, self.scale)

    # hooks
    def low_rank(self, call: LinearCall) -> LowRank | None:
        a = call.get("A")
        if a is None:
            return None
        return LowRank(a, call.get("B"), self.scale, self.dropout)

    def linear(self, call: LinearCall) -> jax.Array:
        y = super().linear(call)
        lr = self.low_rank(call)
        if lr is None:
            return y
        dt = call.dtype
        h = call.matmul(dropout(call.x.astype(dt), lr.dropout, call), lr.a.astype(dt))
        return y + call.matmul(h, lr.b.astype(dt)) * jnp.asarray(lr.scale, dt)

    # PEFT
    def peft_config(self, model_config, modules: list[str], base_model_name_or_path: str = "") -> dict:
        """adapter_config.json for `modules` (the adapted HF module names)."""
        all_modules = [n for names in module_map(model_config, False).values() for n in names]
        alpha = float(self.alpha)
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model_name_or_path or None,
            "r": int(self.rank),
            "lora_alpha": int(alpha) if alpha.is_integer() else alpha,
            "lora_dropout": float(self.dropout),
            "use_rslora": bool(self.rslora),
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

    def save_peft(self, out_dir: str, trainable: Params, frozen: Params, model_config, *,
                  base_model_name_or_path: str = "", dtype: str = "float32") -> list[str]:
        tensors = adapter_to_peft_tensors(trainable, model_config)
        return write_adapter(out_dir, tensors, dtype,
                             lambda modules: self.peft_config(model_config, modules, base_model_name_or_path))

    @classmethod
    def load_peft(cls, adapter_dir: str, params_or_config) -> tuple[Params, "Lora"]:
        ac, tensors = read_adapter(adapter_dir, "LORA", allowed={"lora_A", "lora_B"})
        if ac.get("use_dora"):
            raise PeftFormatError(f"{os.path.join(adapter_dir, ADAPTER_CONFIG)}: use_dora=True is not plain LoRA")
        tree = adapter_from_peft_tensors(tensors, params_or_config, int(ac["r"]), adapter_dir)
        adapted = sorted("/".join(p) for p, _ in adapter_leaves(tree))
        targets = "^(" + "|".join(re.escape(p) for p in adapted) + ")$"
        return tree, cls(rank=int(ac["r"]), alpha=float(ac.get("lora_alpha", 8)),
                         dropout=float(ac.get("lora_dropout", 0.0)), rslora=bool(ac.get("use_rslora", False)),
                         targets=targets)


# ------------------------------------------------------------------ PEFT tensors (shared by the LoRA family)
def module_map(config, scan_layers: bool) -> dict[tuple, list[str]]:
    """Our dense-module path (without 'kernel') -> HF module names (one per stacked layer, or one)."""
    from sft_jax.models.hf_io import param_mapping

    out = {}
    for ours, names, _ in param_mapping(config, scan_layers=scan_layers):
        if ours[-1] == "kernel":
            out[tuple(ours[:-1])] = [n[: -len(".weight")] for n in names]
    return out


def _is_scanned(tree) -> bool:
    return isinstance(tree, dict) and "layers" in tree


def _per_layer(x: np.ndarray, names: list[str], lead: int):
    """Split a leaf with `lead` leading layer dims into one array per HF module name."""
    return [x[i] for i in range(len(names))] if lead else [x]


def adapter_to_peft_tensors(tree: Params, config, rename: dict[str, str] | None = None) -> dict[str, np.ndarray]:
    """The safetensors dict peft expects for a LoRA-family tree: A -> `lora_A.weight` [r, in],
    B -> `lora_B.weight` [out, r]; other leaves via `rename` ({our leaf: (peft suffix)}, e.g. DoRA's
    magnitude -> "lora_magnitude_vector"), written [out] per layer."""
    mm = module_map(config, _is_scanned(tree))
    rename = rename or {}
    out: dict[str, np.ndarray] = {}
    for path, leaf in adapter_leaves(tree):
        if path not in mm:
            raise PeftFormatError(f"adapter path {'/'.join(path)} is not a dense module of this {config.model_type} model")
        names = mm[path]
        a = np.asarray(leaf["A"])
        lead = a.ndim - 2
        for key, val in leaf.items():
            val = np.asarray(val)
            if key in ("A", "B"):
                for name, v in zip(names, _per_layer(val, names, lead)):
                    out[f"{PREFIX}{name}.lora_{key}.weight"] = np.ascontiguousarray(v.T)
            elif key in rename:
                for name, v in zip(names, _per_layer(val, names, lead)):
                    out[f"{PREFIX}{name}.{rename[key]}"] = np.ascontiguousarray(v)
            else:
                raise PeftFormatError(f"adapter leaf {'/'.join(path)}/{key} has no PEFT name")
    return out


def _target_modules(modules: list[str], all_modules: list[str]) -> Any:
    """A list of suffix names when it selects exactly `modules`, else an exact full-match regex."""
    names = sorted({m.rsplit(".", 1)[-1] for m in modules})
    chosen = sorted(m for m in all_modules if m.rsplit(".", 1)[-1] in names)
    if chosen == sorted(modules):
        heads = sorted({m.split("layers.", 1)[0] for m in modules})
        if heads == ["model."]:
            return names
        # the language model of a multimodal checkpoint: suffix names would also select the vision tower's
        # q_proj/k_proj/v_proj in PeftModel, so the module list is a regex anchored at its language model
        return ("^(" + "|".join(re.escape(h) for h in heads) + r")layers\.\d+\.(self_attn|mlp)\.("
                + "|".join(re.escape(n) for n in names) + ")$")
    return "^(" + "|".join(re.escape(m) for m in sorted(modules)) + ")$"


def write_adapter(out_dir: str, tensors: dict[str, np.ndarray], dtype: str, make_config) -> list[str]:
    """Write adapter_model.safetensors (in `dtype`) and adapter_config.json (`make_config(modules)`);
    returns the adapted HF module names."""
    import ml_dtypes
    from safetensors.numpy import save_file

    npdt = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[dtype]
    tensors = {k: v.astype(npdt) for k, v in tensors.items()}
    modules = sorted({k[len(PREFIX):].rsplit(".lora_", 1)[0] for k in tensors})
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(out_dir, ADAPTER_CONFIG), "w") as f:
        json.dump(make_config(modules), f, indent=2, sort_keys=True)
    return modules


def read_adapter(adapter_dir: str, peft_type: str, allowed: set[str]) -> tuple[dict, dict[str, dict[str, np.ndarray]]]:
    """(adapter_config dict, {HF module: {tensor kind: array}}) of a peft adapter directory, with
    the checks shared by the LoRA family. `allowed`: the tensor kinds (`lora_A`, `lora_B`,
    `lora_magnitude_vector`, ...) this method reads; anything else is a PeftFormatError."""
    from safetensors import safe_open

    cfg_path = os.path.join(adapter_dir, ADAPTER_CONFIG)
    w_path = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
    for p in (cfg_path, w_path):
        if not os.path.isfile(p):
            raise PeftFormatError(f"{p} not found (a peft adapter directory needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    with open(cfg_path) as f:
        ac = json.load(f)
    if ac.get("peft_type", "LORA") != peft_type:
        raise PeftFormatError(f"{cfg_path}: peft_type {ac.get('peft_type')!r} is not {peft_type}")
    for k in ("modules_to_save", "rank_pattern", "alpha_pattern"):
        if ac.get(k) not in (None, {}, []):
            raise PeftFormatError(f"{cfg_path}: {k}={ac[k]!r} is not supported by sft_jax")
    if ac.get("bias", "none") != "none":
        raise PeftFormatError(f"{cfg_path}: bias={ac['bias']!r} is not supported (only 'none')")
    if ac.get("fan_in_fan_out"):
        raise PeftFormatError(f"{cfg_path}: fan_in_fan_out=True is not supported")
    by_module: dict[str, dict[str, np.ndarray]] = {}
    with safe_open(w_path, framework="numpy") as f:
        for k in f.keys():
            m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.(lora_[A-Za-z_]+?)(?:\.[A-Za-z0-9_]+)?(?:\.weight)?", k)
            if not m or m.group(2) not in allowed:
                raise PeftFormatError(f"{w_path}: unexpected tensor {k!r} (this method reads {sorted(allowed)})")
            by_module.setdefault(m.group(1), {})[m.group(2)] = f.get_tensor(k)
    if not by_module:
        raise PeftFormatError(f"{w_path}: no adapter tensors")
    return ac, by_module


def adapter_from_peft_tensors(by_module: dict, params_or_config, rank: int, adapter_dir: str,
                              rename: dict[str, str] | None = None) -> Params:
    """Our LoRA-family tree from `read_adapter`'s tensors. `params_or_config`: the base params (the
    layout, scanned or not, is taken from them) or a ModelConfig (its `scan_layers` decides);
    `rename`: {peft kind: our leaf} for leaves besides A/B (read as [out] per layer). Layers of a
    scanned tree the adapter does not cover get a zero update."""
    from sft_jax.models.config import ModelConfig

    w_path = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
    if isinstance(params_or_config, ModelConfig):
        config, scanned = params_or_config, params_or_config.scan_layers
    else:
        scanned = _is_scanned(params_or_config)
        config = _config_from_params(params_or_config)
    mm = module_map(config, scanned)
    by_module = same_language_model(by_module, config)
    known = {name for names in mm.values() for name in names}
    unknown = sorted(set(by_module) - known)
    if unknown:
        raise PeftFormatError(f"{w_path}: adapter modules not in this model: {unknown[:5]}")
    kinds = {"lora_A": "A", "lora_B": "B", **(rename or {})}
    tree: dict = {}
    for path, names in mm.items():
        present = [n for n in names if n in by_module]
        if not present:
            continue
        ref = by_module[present[0]]
        leaves: dict[str, list] = {}
        for n in names:
            got = by_module.get(n)
            if got is not None and not {"lora_A", "lora_B"} <= set(got):
                raise PeftFormatError(f"{w_path}: {n} lacks lora_A or lora_B")
            if got is not None and got["lora_A"].shape[0] != rank:
                raise PeftFormatError(f"{w_path}: {n} has rank {got['lora_A'].shape[0]}, adapter_config says r={rank}")
            for kind, ours in kinds.items():
                if kind not in ref:
                    continue
                v = (got or ref)[kind].astype(np.float32)
                v = v.T if kind in ("lora_A", "lora_B") else v
                if got is None:  # a layer the adapter does not cover: zero update
                    v = np.ones_like(v) if kind not in ("lora_A", "lora_B") else np.zeros_like(v)
                leaves.setdefault(ours, []).append(v)
        stacked = path and path[0] == "layers"
        node = {k: jnp.asarray(np.stack(v) if stacked else v[0]) for k, v in leaves.items()}
        _set(tree, path, node)
    return tree


_LM, _TEXT = "model.language_model.", "model."


def same_language_model(by_module: dict, config) -> dict:
    """An adapter's {HF module: ...} renamed onto this config's module names where they differ only by the
    multimodal wrapper: `model.language_model.*` (a Gemma3ForConditionalGeneration's language model) and
    `model.*` (the same language model as Gemma3ForCausalLM, or params without a config) are one model."""
    if getattr(config, "hf_wrapper", None):
        return {(_LM + k[len(_TEXT):] if k.startswith(_TEXT + "layers.") else k): v for k, v in by_module.items()}
    return {(_TEXT + k[len(_LM):] if k.startswith(_LM) else k): v for k, v in by_module.items()}


def _config_from_params(params: dict):
    """A minimal ModelConfig able to name the dense modules of `params` (names only matter)."""
    from sft_jax.models.config import ModelConfig

    scanned = _is_scanned(params)
    if scanned:
        n_layers = int(np.shape(params["layers"]["input_norm"]["scale"])[0])
    else:
        n_layers = sum(1 for k in params if re.fullmatch(r"layers_\d+", k))
    layer0 = params["layers"] if scanned else params.get("layers_0", {})
    fused = "qkv_proj" in layer0.get("attn", {})  # Phi-3's fused modules
    return ModelConfig(model_type="phi3" if fused else "llama", num_layers=n_layers, num_heads=1, num_kv_heads=1,
                       hidden_size=8, tie_embeddings="lm_head" not in params, scan_layers=scanned)
