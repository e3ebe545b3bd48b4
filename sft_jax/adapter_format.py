"""sft_jax's own adapter format: the trained tree of any method with a frozen base, outside a work directory.

    python -m sft_jax.export --workdir=DIR --out=ADAPTER --format=adapter [--dtype=float32|bfloat16]
    python -m sft_jax.generate --model=BASE --adapter=ADAPTER --prompt=...

For methods the PEFT library has no type for (bottleneck adapters) and, generically, for every method whose
base stays frozen (LoRA and its family, IA3, prompt learning, ...). A directory holds:

* `adapter.safetensors`: the method's trainable tree (`Method.init_trainable`'s structure), one tensor per
  leaf named by its tree path joined with "/" (e.g. `layers_0/bottleneck_mlp/down/kernel`,
  `layers_3/attn/q_proj/A`, `prefix`), always in the unscanned layout (`layers_{i}/...`; a scanned run's
  stacked `layers/...` leaves are split per layer, and stacked again when the base loads scanned);
* `sft_jax_adapter.json`: `format` ("sft_jax_adapter"), `format_version` (1), `method` (the method's
  `run_config()`, what `peft.from_run_config` reads), `method_seed` (train.seed: `frozen_base` is recomputed
  from the base with `workdir.method_rng`), `describe`, `trainable_params`, `dtype` (of the tensors; read
  back as float32), `layout` ("unscanned"), `step`, `template` / `eos_ids` (the run's chat template name or ""
  and stop ids) and `base_model`: `path` (the base it was trained on, as recorded), `config` (the model
  shape fields checked on load) and `fingerprint` (`base_fingerprint`: sha256 over every base tensor's
  name, dtype, shape and first 4 KiB of stored bytes);
* the run's tokenizer files (with the chat template used in training), as the PEFT export.

Loading (`load_adapter`) checks the format, the base's shape fields (the first differing field named), its
fingerprint, and every tensor's name and shape against the method's tree on that base; an error is one line
(`AdapterFormatError`). Full fine-tuning has no frozen base: it is refused (use --format=merged).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any

FORMAT = "sft_jax_adapter"
FORMAT_VERSION = 1
CONFIG_FILE = "sft_jax_adapter.json"
WEIGHTS_FILE = "adapter.safetensors"
LAYOUT = "unscanned"
SHAPE_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                "num_kv_heads", "head_dim", "tie_embeddings")
_FINGERPRINT_BYTES = 4096


class AdapterFormatError(ValueError):
    """An sft_jax adapter directory that cannot be written or read; the message (one line) says why."""


def is_adapter_dir(path: str) -> bool:
    """Whether `path` is an sft_jax adapter directory (has sft_jax_adapter.json)."""
    return os.path.isfile(os.path.join(path, CONFIG_FILE))


def base_fingerprint(model_dir: str) -> str:
    """sha256 over every tensor of the base's safetensors files: name, dtype, shape and the first 4 KiB of
    its stored bytes (read raw: independent of the dtype the base is loaded in; cheap for any size)."""
    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if not files:
        raise AdapterFormatError(f"{model_dir}: no *.safetensors files to fingerprint the base model")
    entries = []
    for name in files:
        path = os.path.join(model_dir, name)
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
            start = 8 + n
            for key, meta in header.items():
                if key == "__metadata__":
                    continue
                a, b = meta["data_offsets"]
                f.seek(start + a)
                entries.append((key, meta["dtype"], meta["shape"], f.read(min(b - a, _FINGERPRINT_BYTES))))
    h = hashlib.sha256()
    for key, dt, shape, data in sorted(entries, key=lambda e: e[0]):
        h.update(f"{key}|{dt}|{shape}|".encode())
        h.update(hashlib.sha256(data).digest())
    return "sha256:" + h.hexdigest()


def _shape_config(model_config) -> dict:
    return {k: getattr(model_config, k) for k in SHAPE_FIELDS}


# ---------------------------------------------------------------------------------------------- tree layout

def _flatten(tree, prefix="") -> dict[str, Any]:
    out = {}
    for k in sorted(tree):
        v = tree[k]
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, name + "/"))
        else:
            out[name] = v
    return out


def _unflatten(flat: dict[str, Any]) -> dict:
    tree: dict = {}
    for name, v in flat.items():
        node = tree
        *path, leaf = name.split("/")
        for k in path:
            node = node.setdefault(k, {})
        node[leaf] = v
    return tree


def unstack_layers(tree: dict) -> dict:
    """A scanned tree's `layers` (leaves [L, ...]) as `layers_{i}` (leaves [...])."""
    import numpy as np

    if "layers" not in tree:
        return tree
    out = {k: v for k, v in tree.items() if k != "layers"}
    flat = _flatten(tree["layers"])
    n = {int(np.shape(v)[0]) for v in flat.values()}
    if len(n) != 1:
        raise AdapterFormatError(f"the scanned tree's layer axes differ: {sorted(n)}")
    for i in range(n.pop()):
        out[f"layers_{i}"] = _unflatten({k: v[i] for k, v in flat.items()})
    return out


def stack_layers(tree: dict) -> dict:
    """`layers_{i}` subtrees stacked into one `layers` subtree (the scanned layout)."""
    import numpy as np

    keys = sorted((k for k in tree if re.fullmatch(r"layers_\d+", k)), key=lambda k: int(k.split("_")[1]))
    if not keys:
        return tree
    flats = [_flatten(tree[k]) for k in keys]
    names = set(flats[0])
    if any(set(f) != names for f in flats) or [int(k.split("_")[1]) for k in keys] != list(range(len(keys))):
        raise AdapterFormatError("the adapter does not cover every layer alike; load the base with "
                                 "model.scan_layers=False")
    out = {k: v for k, v in tree.items() if k not in keys}
    out["layers"] = _unflatten({n: np.stack([f[n] for f in flats]) for n in names})
    return out


# ---------------------------------------------------------------------------------------------- write / read

def save_adapter(out_dir: str, *, method, trainable, model_config, base_model: str, seed: int, step: int = 0,
                 template: str = "", eos_ids=(), dtype: str = "float32") -> dict:
    """Write `adapter.safetensors` + `sft_jax_adapter.json` into `out_dir`; returns the JSON written."""
    import ml_dtypes
    import numpy as np
    from safetensors.numpy import save_file

    if not method.needs_base_weights:
        raise AdapterFormatError(f"method {method.name!r} trains every weight (no frozen base): there is no "
                                 "adapter to write; use --format=merged")
    npdt = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}.get(dtype)
    if npdt is None:
        raise AdapterFormatError(f"adapter dtype {dtype!r} is not one of float32, bfloat16")
    host = {k: np.asarray(v, np.float32) for k, v in _flatten(unstack_layers(_to_numpy(trainable))).items()}
    if not host:
        raise AdapterFormatError(f"method {method.name!r}: the trained tree is empty")
    tensors = {k: np.ascontiguousarray(v.astype(npdt)) for k, v in host.items()}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": method.run_config(),
        "method_seed": int(seed),
        "describe": method.describe(),
        "trainable_params": int(sum(v.size for v in host.values())),
        "dtype": dtype,
        "layout": LAYOUT,
        "step": int(step),
        "template": template or "",
        "eos_ids": [int(i) for i in eos_ids],
        "base_model": {"path": os.path.abspath(base_model), "config": _shape_config(model_config),
                       "fingerprint": base_fingerprint(base_model)},
    }
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, WEIGHTS_FILE), metadata={"format": FORMAT})
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    return meta


def _to_numpy(tree):
    import jax
    import numpy as np

    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def read_config(adapter_dir: str) -> dict:
    """The parsed sft_jax_adapter.json (format and version checked)."""
    path = os.path.join(adapter_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise AdapterFormatError(f"{path} not found (an sft_jax adapter directory holds {CONFIG_FILE} and "
                                 f"{WEIGHTS_FILE})")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise AdapterFormatError(f"cannot read {path}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise AdapterFormatError(f"{path}: 'format' is not {FORMAT!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise AdapterFormatError(f"{path}: format_version {meta.get('format_version')!r} is not supported "
                                 f"(this sft_jax reads {FORMAT_VERSION})")
    for k in ("method", "method_seed", "base_model", "layout"):
        if k not in meta:
            raise AdapterFormatError(f"{path}: missing field {k!r}")
    if meta["layout"] != LAYOUT:
        raise AdapterFormatError(f"{path}: layout {meta['layout']!r} is not {LAYOUT!r}")
    return meta


def check_base(meta: dict, model_config, model_dir: str | None, adapter_dir: str = "") -> None:
    """AdapterFormatError unless the base (its shape fields, then its fingerprint) is the adapter's."""
    where = os.path.join(adapter_dir, CONFIG_FILE)
    trained_on = meta["base_model"].get("path", "?")
    want = meta["base_model"].get("config") or {}
    have = _shape_config(model_config)
    for k in SHAPE_FIELDS:
        if k in want and want[k] != have[k]:
            raise AdapterFormatError(f"{where}: the adapter was trained on a base with {k}={want[k]!r} "
                                     f"({trained_on}); this base has {k}={have[k]!r}")
    fp = meta["base_model"].get("fingerprint")
    if fp and model_dir is not None:
        got = base_fingerprint(model_dir)
        if got != fp:
            raise AdapterFormatError(f"{where}: the adapter was trained on another base ({trained_on}, "
                                     f"fingerprint {fp[:19]}...); {model_dir} has the same shapes but other "
                                     f"weights ({got[:19]}...)")


def load_adapter(adapter_dir: str, model_dir: str, model_config, params):
    """(method, trainable, frozen, model_config, meta) of an adapter directory applied to the base loaded from
    `model_dir` as (`model_config`, `params`). A method that quantises its base while loading (QLoRA) reloads
    the base with its transform. Errors: AdapterFormatError (one line)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from safetensors import safe_open

    from sft_jax import peft
    from sft_jax.workdir import method_rng

    meta = read_config(adapter_dir)
    where = os.path.join(adapter_dir, CONFIG_FILE)
    try:
        method = peft.from_run_config(meta["method"])
    except (ValueError, KeyError, TypeError) as e:
        raise AdapterFormatError(f"{where}: bad field 'method': {type(e).__name__}: {e}") from None
    if not method.needs_base_weights:
        raise AdapterFormatError(f"{where}: method {method.name!r} has no frozen base")
    check_base(meta, model_config, model_dir, adapter_dir)
    if method.load_transform() is not None:
        from sft_jax.models import hf_io

        model_config, params = hf_io.load_hf(
            model_dir, transform=method.load_transform(), dtype=model_config.dtype,
            param_dtype=model_config.param_dtype, scan_layers=model_config.scan_layers, kernels=model_config.kernels)
    rng = method_rng({"train": {"seed": int(meta["method_seed"])}})
    frozen = method.frozen_base(params, model_config, rng)
    want = _flatten(jax.eval_shape(lambda p, f: method.init_trainable(p, f, model_config, rng), params, frozen))
    w_path = os.path.join(adapter_dir, WEIGHTS_FILE)
    if not os.path.isfile(w_path):
        raise AdapterFormatError(f"{w_path} not found")
    with safe_open(w_path, framework="numpy") as f:
        flat = {k: f.get_tensor(k).astype(np.float32) for k in f.keys()}
    tree = _unflatten(flat)
    if any(k.startswith("layers/") for k in want):  # the base loads scanned
        tree = stack_layers(tree)
    got = _flatten(tree)
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
        raise AdapterFormatError(f"{w_path}: tensors do not match method {method.name!r} on this base: missing "
                                 f"{missing[:3]}, unexpected {extra[:3]}")
    for k, s in want.items():
        if tuple(got[k].shape) != tuple(s.shape):
            raise AdapterFormatError(f"{w_path}: tensor {k!r} has shape {tuple(got[k].shape)}, the method on this "
                                     f"base needs {tuple(s.shape)}")
    trainable = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)
    return method, trainable, frozen, model_config, meta


__all__ = ["AdapterFormatError", "CONFIG_FILE", "FORMAT", "FORMAT_VERSION", "WEIGHTS_FILE", "base_fingerprint",
           "check_base", "is_adapter_dir", "load_adapter", "read_config", "save_adapter", "stack_layers",
           "unstack_layers"]
