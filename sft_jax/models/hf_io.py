"""Hugging Face checkpoints (config.json + safetensors) <-> sft_jax params.

Safetensors only: no pickle, no remote code.  Loading checks every key and shape
from the file headers first, then reads one tensor at a time with
`safe_open(framework="numpy")`, converts it to our layout (kernels `[in, out]`) and
casts it to `param_dtype`.  When `shardings` is given, each leaf is built with
`jax.make_array_from_callback` whose callback reads only that device's slice from the
file (`get_slice`), so no full host copy of a sharded tensor is made (bfloat16 files:
safetensors 0.8's numpy `get_slice` cannot read BF16, so such a tensor is read whole
once, sliced per device, and dropped).  Without
shardings, a scanned leaf is assembled layer by layer into one host buffer.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from typing import Any, Callable, Iterator

import dataclasses
import logging

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from sft_jax.models.config import ModelConfig
from sft_jax.models.llama import abstract_params

log = logging.getLogger(__name__)

# HF tensors that are buffers, not weights: ignored when loading.
_IGNORED = (re.compile(r".*rotary_emb\.inv_freq$"), re.compile(r".*\.masked_bias$"), re.compile(r".*attn\.bias$"))

_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


class CheckpointMismatchError(ValueError):
    """Checkpoint keys do not match the architecture its config.json describes."""


def _np_dtype(name) -> np.dtype:
    if isinstance(name, str):
        return np.dtype(_NP_DTYPES[name])
    return np.dtype(name)


# ------------------------------------------------------------------ name mapping
def _layer_entries(config: ModelConfig) -> list[tuple[tuple[str, ...], str, bool]]:
    """(our path inside a layer, HF name inside `model.layers.{i}.`, transpose?) for one layer."""
    out = [
        (("input_norm", "scale"), "input_layernorm.weight", False),
        (("post_attn_norm", "scale"), "post_attention_layernorm.weight", False),
    ]
    if config.gemma:  # Gemma 2/3: post-attention and pre/post-feedforward norms
        out += [(("pre_ffw_norm", "scale"), "pre_feedforward_layernorm.weight", False),
                (("post_ffw_norm", "scale"), "post_feedforward_layernorm.weight", False)]
    if config.fused_projections:  # Phi-3: the checkpoint's fused modules are the model's own
        out.append((("attn", "qkv_proj", "kernel"), "self_attn.qkv_proj.weight", True))
        out.append((("attn", "o_proj", "kernel"), "self_attn.o_proj.weight", True))
        out.append((("mlp", "gate_up_proj", "kernel"), "mlp.gate_up_proj.weight", True))
        out.append((("mlp", "down_proj", "kernel"), "mlp.down_proj.weight", True))
        return out
    for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
        out.append((("attn", p, "kernel"), f"self_attn.{p}.weight", True))
    if config.attention_bias:
        for p in ("q_proj", "k_proj", "v_proj"):
            out.append((("attn", p, "bias"), f"self_attn.{p}.bias", False))
    if config.attention_out_bias:
        out.append((("attn", "o_proj", "bias"), "self_attn.o_proj.bias", False))
    if config.qk_norm:
        out.append((("attn", "q_norm", "scale"), "self_attn.q_norm.weight", False))
        out.append((("attn", "k_norm", "scale"), "self_attn.k_norm.weight", False))
    for p in ("gate_proj", "up_proj", "down_proj"):
        out.append((("mlp", p, "kernel"), f"mlp.{p}.weight", True))
        if config.mlp_bias:
            out.append((("mlp", p, "bias"), f"mlp.{p}.bias", False))
    return out


# The language model's names inside a multimodal checkpoint (ModelConfig.hf_wrapper): (prefix, lm_head name)
# per layout. "modules": transformers 5's module names (Gemma3ForConditionalGeneration.model.language_model),
# what PEFT targets; "legacy": what the published checkpoints hold and transformers 5.24's save_pretrained
# still writes (its conversion mapping renames them on load).
_LAYOUTS = {"modules": ("model.language_model.", "lm_head.weight"),
            "legacy": ("language_model.model.", "language_model.lm_head.weight")}
# tensors of a multimodal checkpoint that are not the language model's (not loaded; copied by save_hf)
_OTHER_PARTS = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


def _prefixes(config: ModelConfig, layout: str | None) -> tuple[str, str]:
    if not config.hf_wrapper:
        return "model.", "lm_head.weight"
    return _LAYOUTS[layout or "modules"]


def checkpoint_layout(config: ModelConfig) -> str | None:
    """The language model's name layout in the checkpoint this config was read from (None: a text model)."""
    return (config.hf_wrapper or {}).get("layout") or ("modules" if config.hf_wrapper else None)


def param_mapping(config: ModelConfig, scan_layers: bool | None = None, layout: str | None = None):
    """List of (our param path, [HF names (one per stacked layer, or one)], transpose?). For the text part
    of a multimodal checkpoint the names are `layout`'s (default: the transformers module names)."""
    scan = config.scan_layers if scan_layers is None else scan_layers
    pre, head = _prefixes(config, layout)
    out = [(("embed", "embedding"), [f"{pre}embed_tokens.weight"], False),
           (("final_norm", "scale"), [f"{pre}norm.weight"], False)]
    if not config.tie_embeddings:
        out.append((("lm_head", "kernel"), [head], True))
    for sub, hf, tr in _layer_entries(config):
        if scan:
            out.append((("layers",) + sub, [f"{pre}layers.{i}.{hf}" for i in range(config.num_layers)], tr))
        else:
            for i in range(config.num_layers):
                out.append(((f"layers_{i}",) + sub, [f"{pre}layers.{i}.{hf}"], tr))
    return out


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _set(tree, path, value):
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


# ------------------------------------------------------------------ load
def _weight_files(path: str) -> dict[str, str]:
    """HF tensor name -> file holding it."""
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(index):
        with open(index) as f:
            wm = json.load(f)["weight_map"]
        return {k: os.path.join(path, v) for k, v in wm.items()}
    if os.path.exists(single):
        with safe_open(single, framework="numpy") as f:
            return {k: single for k in f.keys()}
    bins = [n for n in os.listdir(path) if n.endswith((".bin", ".pt", ".pth"))]
    hint = f" (found pickle files {bins}: convert them to safetensors first; pickle is not loaded)" if bins else ""
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}{hint}")


def read_config(path: str, **policy) -> ModelConfig:
    """The ModelConfig of an HF directory; for a multimodal checkpoint (its text part) also the layout of
    its language-model names and the directory (`hf_wrapper`), read from the weight index / headers."""
    with open(os.path.join(path, "config.json")) as f:
        config = ModelConfig.from_hf(json.load(f), **policy)
    if config.hf_wrapper:
        names = set(_weight_files(path))
        layout = next((k for k, (pre, _) in _LAYOUTS.items() if any(n.startswith(pre) for n in names)), None)
        if layout is None:
            raise CheckpointMismatchError(
                f"checkpoint {path} ({config.multimodal}) holds no language model tensors "
                f"({' or '.join(p + '*' for p, _ in _LAYOUTS.values())})")
        config = dataclasses.replace(config, hf_wrapper={**config.hf_wrapper, "layout": layout,
                                                         "source": os.path.abspath(path)})
    return config


def _sharding_for(shardings, path):
    if shardings is None:
        return None
    if callable(shardings) and not isinstance(shardings, dict):
        return shardings(path)
    return _get(shardings, path)


def load_hf(path: str, *, param_dtype: str = "float32", dtype: str = "float32", shardings=None,
            scan_layers: bool = False, remat: str = "none", transform: Callable | None = None,
            **policy) -> tuple[ModelConfig, dict]:
    """Load a Hugging Face Llama/Mistral/Qwen2/Qwen3/Phi-3 directory -> (ModelConfig, params).

    `shardings`: None (default device), a tree of `jax.sharding.Sharding` with the params'
    structure, or a callable `path_tuple -> Sharding` (path like ('layers_0','attn','q_proj','kernel')).
    `transform`: optional per-tensor transform, `transform(path)` -> None (load as usual) or a
    function `host array (our layout, param dtype) -> host pytree` (e.g. quantisation, `sft_jax.quant`)
    whose result replaces the leaf: each tensor (each layer's, for a stacked leaf, stacked
    afterwards) is read whole, transformed and dropped, so the host holds one untransformed tensor
    at a time; the result is placed with `shardings` at that path: a matching tree of shardings, or the
    kernel's own sharding when the result has `shardings_like(kernel_sharding)` (the `sft_jax.quant` tensors).
    """
    config = read_config(path, dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers, remat=remat, **policy)
    files = _weight_files(path)
    layout = checkpoint_layout(config)
    mapping = param_mapping(config, layout=layout)
    expected = {n for _, names, _ in mapping for n in names}
    present = set(files)
    if config.multimodal:  # only the language model is loaded: the vision tower and projector are left out
        other = {n for n in present if n.startswith(_OTHER_PARTS)}
        present -= other
        log.info("%s: loading the language model only (text training); ignoring %d vision tower / "
                 "multi-modal projector tensors (a merged export copies them back unchanged)",
                 config.multimodal, len(other))
    missing = sorted(expected - present)
    unexpected = sorted(
        n for n in present - expected
        if not any(r.match(n) for r in _IGNORED) and not (config.tie_embeddings and n == _prefixes(config, layout)[1])
    )
    if missing or unexpected:
        msg = [f"checkpoint {path} does not match its config (model_type={config.model_type})"]
        if missing:
            msg.append(f"missing keys ({len(missing)}): {missing}")
        if unexpected:
            msg.append(f"unexpected keys ({len(unexpected)}): {unexpected}")
        raise CheckpointMismatchError("\n  ".join(msg))

    shapes = abstract_params(config)
    pdt = _np_dtype(param_dtype)
    handles: dict[str, Any] = {}

    def handle(name):
        fn = files[name]
        if fn not in handles:
            handles[fn] = safe_open(fn, framework="numpy")
        return handles[fn]

    # shapes first (header only), so a mismatch fails before anything is read
    for ours, names, transpose in mapping:
        target = tuple(_get(shapes, ours).shape)
        want = target[1:] if ours[0] == "layers" else target
        for name in names:
            got = tuple(handle(name).get_slice(name).get_shape())
            got = got[::-1] if transpose else got
            if got != want:
                raise CheckpointMismatchError(
                    f"{name}: shape {got} (after transpose={transpose}) does not match "
                    f"expected {want} for {'/'.join(ours)}"
                )

    whole: dict[str, np.ndarray] = {}  # tensors get_slice cannot read (BF16), for the current leaf

    def read(name, transpose, idx=None):
        """One tensor (or the part `idx` of it, in our layout), cast to param_dtype."""
        if idx is None:
            t = handle(name).get_tensor(name)
        else:
            idx = tuple(idx) + (slice(None),) * (2 - len(idx)) if transpose else tuple(idx)
            hidx = idx[::-1] if transpose else idx
            sl = handle(name).get_slice(name)
            if sl.get_dtype() == "BF16":  # safetensors' numpy slices do not know bfloat16 (0.8.0)
                if name not in whole:
                    whole[name] = handle(name).get_tensor(name)
                t = whole[name][hidx]
            else:
                t = sl[hidx]
        return np.ascontiguousarray(t.T if transpose else t, dtype=pdt)

    params: dict = {}
    try:
        for ours, names, transpose in mapping:
            target = tuple(_get(shapes, ours).shape)
            stacked = ours[0] == "layers"
            sharding = _sharding_for(shardings, ours)
            fn = transform(ours) if transform is not None else None
            if fn is not None:
                parts = [fn(read(name, transpose)) for name in names]
                leaf = jax.tree.map(lambda *xs: np.stack(xs), *parts) if stacked else parts[0]
                del parts
                if isinstance(sharding, jax.sharding.Sharding) and hasattr(leaf, "shardings_like"):
                    sharding = leaf.shardings_like(sharding)  # the kernel's sharding -> its fields'
                _set(params, ours, jax.device_put(leaf, sharding))
                whole.clear()
                continue
            if sharding is None:
                if stacked:
                    host = np.empty(target, pdt)
                    for i, name in enumerate(names):
                        host[i] = read(name, transpose)
                else:
                    host = read(names[0], transpose)
                _set(params, ours, jnp.asarray(host))
                del host
                continue
            # Each device reads only its own slice straight from the file (no full host copy).
            memo: dict = {}

            def part(idx, names=names, transpose=transpose, stacked=stacked, memo=memo):
                key = repr(idx)
                if key not in memo:
                    if stacked:
                        layers = range(len(names))[idx[0]]
                        memo[key] = np.stack([read(names[i], transpose, idx[1:]) for i in layers])
                    else:
                        memo[key] = read(names[0], transpose, idx)
                return memo[key]

            _set(params, ours, jax.make_array_from_callback(target, sharding, part))
            memo.clear()
            whole.clear()
    finally:
        for h in handles.values():
            if hasattr(h, "__exit__"):
                try:
                    h.__exit__(None, None, None)
                except Exception:  # noqa: BLE001
                    pass
    return config, params


# ------------------------------------------------------------------ save
def _hf_tensors(config: ModelConfig, params: dict, np_dtype) -> Iterator[tuple[str, tuple, Callable[[], np.ndarray]]]:
    """Yields (HF name, shape, thunk giving the HF-layout numpy array)."""
    scanned = "layers" in params
    for ours, names, transpose in param_mapping(config, scan_layers=scanned, layout=checkpoint_layout(config)):
        leaf = _get(params, ours)
        for i, name in enumerate(names):
            shape = tuple(leaf.shape[1:] if scanned and ours[0] == "layers" else leaf.shape)
            if transpose:
                shape = shape[::-1]

            def thunk(leaf=leaf, i=i, stacked=scanned and ours[0] == "layers", tr=transpose):
                x = leaf[i] if stacked else leaf
                a = np.asarray(jax.device_get(x)).astype(np_dtype)
                return np.ascontiguousarray(a.T if tr else a)

            yield name, shape, thunk


PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
_ST_SIZES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _other_parts(config: ModelConfig) -> list[tuple[str, tuple, Callable[[], np.ndarray], int]]:
    """The multimodal source checkpoint's non-language tensors (vision tower, projector), to copy verbatim:
    (name, shape, thunk, bytes)."""
    src = config.hf_wrapper.get("source")
    if not src or not os.path.isdir(src):
        raise FileNotFoundError(f"writing a {config.multimodal} checkpoint copies its vision tower and projector from "
                                f"the source checkpoint {src!r}, which is not there")
    out = []
    for name, fn in sorted(_weight_files(src).items()):
        if not name.startswith(_OTHER_PARTS):
            continue
        with safe_open(fn, framework="numpy") as f:
            sl = f.get_slice(name)
            shape, nbytes = tuple(sl.get_shape()), math.prod(sl.get_shape()) * _ST_SIZES.get(sl.get_dtype(), 4)

        def thunk(fn=fn, name=name):
            with safe_open(fn, framework="numpy") as f:
                return f.get_tensor(name)

        out.append((name, shape, thunk, nbytes))
    return out


def save_hf(out_dir: str, config: ModelConfig, params: dict, *, dtype: str = "float32",
            max_shard_bytes: int = 5 * 2**30) -> list[str]:
    """Write config.json + model.safetensors (or shards + model.safetensors.index.json).

    Tied models write no lm_head.  The text part of a multimodal checkpoint (`config.hf_wrapper`) is written
    as that checkpoint: its config.json with this text part, the language model in the source's name layout
    and the source's vision tower / projector tensors copied unchanged (their dtype too), plus its
    image processor files (`PROCESSOR_FILES`).
    Returns the list of safetensors files written.
    """
    os.makedirs(out_dir, exist_ok=True)
    npdt = _np_dtype(dtype)
    entries = [(*e, math.prod(e[1]) * npdt.itemsize) for e in _hf_tensors(config, params, npdt)]
    if config.multimodal:
        if os.path.abspath(out_dir) == config.hf_wrapper.get("source"):
            raise ValueError(f"save_hf: {out_dir} is the source checkpoint of the vision tower; write elsewhere")
        entries += _other_parts(config)
    # plan shards by size
    shards: list[list] = [[]]
    size = 0
    total = 0
    for e in entries:
        n = e[3]
        total += n
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += n
    for old in os.listdir(out_dir):  # stale weights from an earlier save would shadow the new ones
        if old.startswith("model") and (old.endswith(".safetensors") or old.endswith(".safetensors.index.json")):
            os.remove(os.path.join(out_dir, old))
    files = []
    weight_map = {}
    for k, shard in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: thunk() for name, _, thunk, _ in shard}
        save_file(tensors, os.path.join(out_dir, fname), metadata={"format": "pt"})
        del tensors
        files.append(fname)
        weight_map.update({name: fname for name, _, _, _ in shard})
    if len(shards) > 1:
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config.to_hf(torch_dtype=str(np.dtype(npdt).name)), f, indent=2, sort_keys=True)
    if config.multimodal:  # the image processor's files too, so that AutoProcessor loads the directory
        src = config.hf_wrapper["source"]
        for name in PROCESSOR_FILES:
            if os.path.isfile(os.path.join(src, name)):
                shutil.copyfile(os.path.join(src, name), os.path.join(out_dir, name))
    return files
