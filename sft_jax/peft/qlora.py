"""QLoRA (`peft.method=qlora`): a quantised frozen base (NF4 or int8, `sft_jax.quant`), LoRA on top.

The frozen base keeps every decoder projection (q/k/v/o, gate/up/down; not the embeddings or the
LM head, as bitsandbytes' `load_in_4bit` / `load_in_8bit`) in bitsandbytes' format: NF4 with block
size `peft.qlora.block_size` and double-quantised block scales (`peft.qlora.double_quant`), or
LLM.int8's row-wise int8. Each projection dequantises its kernel on the fly in the compute dtype
(`model.dtype`, bitsandbytes' `bnb_4bit_compute_dtype`) through the `base_kernel` hook; the
adapter is LoRA with the `peft.lora.*` fields (rank, alpha, dropout, rslora, targets).

Trees: frozen = `{"params": the base without those kernels, "quant": {module path: {"kernel":
NF4Tensor | Int8Tensor}}}` (the second goes to the model's METHOD_FROZEN collection); trainable =
LoRA's `{path: {"A", "B"}}`. Quantisation happens while the base loads (`load_transform`, one tensor
at a time); `frozen_base` also accepts float kernels (a model made in memory) and quantises them on
the host, and `jax.ShapeDtypeStruct` params (giving abstract quantised tensors, for `sft_jax.plan`;
call it directly, not under `jax.eval_shape`: quantisation is host NumPy).

Export: the PEFT adapter is a plain LoRA adapter (what PEFT trains on a bitsandbytes 4-bit base
too: `PeftModel.from_pretrained` on a `BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)` model loads it unchanged); `merge`
gives the dequantised base plus the low-rank update in float32.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

import jax
import numpy as np

from sft_jax import quant
from sft_jax.models.hooks import METHOD, METHOD_FROZEN, LinearCall
from sft_jax.peft.base import MethodConfigError, Params
from sft_jax.peft.lora import Lora, _get, _set, dense_paths, merge_low_rank

BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes' quantize_4bit


def _quantised(x) -> bool:
    return isinstance(x, (quant.NF4Tensor, quant.Int8Tensor))


def base_paths(params: Params) -> list[tuple[str, ...]]:
    """The projections QLoRA quantises: every dense module of the decoder layers (not the LM head)."""
    return [p for p in dense_paths(params) if p[0].startswith("layers")]


@dataclasses.dataclass(frozen=True)
class QLora(Lora):
    """LoRA on a frozen base stored as bitsandbytes NF4 (double-quantised scales) or int8."""

    name: ClassVar[str] = "qlora"
    quant_type: str = "nf4"
    double_quant: bool = True
    block_size: int = 64

    def __post_init__(self):
        super().__post_init__()
        if self.quant_type not in quant.QUANT_TYPES:
            raise MethodConfigError(f"config field 'peft.qlora.quant_type' must be one of {quant.QUANT_TYPES}, "
                                    f"got {self.quant_type!r}")
        if self.block_size not in BLOCK_SIZES:
            raise MethodConfigError(f"config field 'peft.qlora.block_size' must be one of {BLOCK_SIZES} "
                                    f"(bitsandbytes' blocks; transformers' 4-bit base uses 64), got {self.block_size}")

    @classmethod
    def from_config(cls, peft_cfg) -> "QLora":
        lora, q = peft_cfg["lora"], peft_cfg["qlora"]
        return cls(rank=int(lora["rank"]), alpha=float(lora["alpha"]), dropout=float(lora["dropout"]),
                   rslora=bool(lora["rslora"]), targets=str(lora["targets"]), quant_type=str(q["quant_type"]),
                   double_quant=bool(q["double_quant"]), block_size=int(q["block_size"]))

    def run_config(self) -> dict:
        lora_fields = {f.name for f in dataclasses.fields(Lora)}
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {"method": self.name, "lora": {k: v for k, v in fields.items() if k in lora_fields},
                QLora.name: {k: v for k, v in fields.items() if k not in lora_fields}}  # peft.qlora.* (also QDoRA's)

    def describe(self) -> str:
        base = (f"NF4 (block {self.block_size}{', double-quantised scales' if self.double_quant else ''})"
                if self.quant_type == "nf4" else "int8 (row-wise)")
        return f"QLoRA: {base} frozen base + {super().describe()}"

    # ------------------------------------------------------------------ quantisation
    def quantizer(self):
        """Host function `kernel [in, out] -> quantised tensor` of this method's format."""
        if self.quant_type == "nf4":
            return functools.partial(quant.nf4.quantize_kernel, block_size=self.block_size,
                                     double_quant=self.double_quant)
        return quant.int8.quantize_kernel

    def load_transform(self):
        """`hf_io.load_hf(..., transform=...)`: quantise each decoder projection's kernel as it is read."""
        fn = self.quantizer()
        return lambda path: fn if path[-1] == "kernel" and path[0].startswith("layers") else None

    def _quantise(self, kernel) -> Any:
        """A float kernel `[*lead, in, out]` (device or host) -> quantised, layer by layer, placed as it was;
        a `jax.ShapeDtypeStruct` -> the abstract quantised tensor (memory plans)."""
        if _quantised(kernel):
            return kernel
        if isinstance(kernel, jax.ShapeDtypeStruct):
            if self.quant_type == "nf4":
                return quant.nf4.abstract(kernel.shape, self.block_size, self.double_quant)
            return quant.int8.abstract(kernel.shape)
        fn = self.quantizer()
        host = np.asarray(jax.device_get(kernel), np.float32)
        parts = [fn(k) for k in host] if host.ndim == 3 else [fn(host)]
        q = jax.tree.map(lambda *xs: np.stack(xs), *parts) if host.ndim == 3 else parts[0]
        sharding = getattr(kernel, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding):
            return jax.device_put(q, q.shardings_like(sharding))
        return jax.device_put(q)

    # ------------------------------------------------------------------ trees
    def frozen_base(self, params: Params, model_config, rng) -> Params:
        rest = jax.tree.map(lambda x: x, params, is_leaf=_quantised)  # a copy of the dict structure
        quantised: Params = {}
        for path in base_paths(params):
            module = dict(_get(rest, path))
            _set(quantised, path, {"kernel": self._quantise(module.pop("kernel"))})
            _set(rest, path, module)
        return {"params": rest, "quant": quantised}

    def abstract_init(self, abstract_params: Params, model_config, rng) -> tuple[Params, Params]:
        frozen = self.frozen_base(abstract_params, model_config, rng)  # ShapeDtypeStructs -> abstract tensors
        trainable = jax.eval_shape(lambda p, f: self.init_trainable(p, f, model_config, rng), abstract_params, frozen)
        return trainable, frozen

    def variables(self, trainable: Params, frozen: Params) -> dict[str, Params]:
        return {"params": frozen["params"], METHOD: trainable, METHOD_FROZEN: frozen["quant"]}

    def frozen_axes(self, frozen: Params, param_axes: Params) -> Params:
        rest_axes = jax.tree.map(lambda x: x, param_axes, is_leaf=lambda a: isinstance(a, tuple))
        quant_axes: Params = {}
        for path in base_paths(param_axes):
            module = dict(_get(rest_axes, path))
            kernel_axes = module.pop("kernel")
            _set(rest_axes, path, module)
            t = _get(frozen["quant"], path)["kernel"]
            fmt = quant.nf4 if isinstance(t, quant.NF4Tensor) else quant.int8
            _set(quant_axes, path, {"kernel": fmt.logical_axes(t, kernel_axes)})
        return {"params": rest_axes, "quant": quant_axes}

    def dequantized_base(self, frozen: Params, dtype=np.float32) -> Params:
        """The plain params tree with every quantised kernel dequantised in `dtype`."""
        params = jax.tree.map(lambda x: x, frozen["params"])
        for path in _kernel_paths(frozen["quant"]):
            module = dict(_get(params, path))
            module["kernel"] = _get(frozen["quant"], path)["kernel"].dequantize(dtype)
            _set(params, path, module)
        return params

    def merge(self, trainable: Params, frozen: Params, model_config) -> Params:
        """Dequantised base (float32) + scale * A B: the model that was trained, as plain weights."""
        return merge_low_rank(self.dequantized_base(frozen), trainable, self.scale)

    # ------------------------------------------------------------------ hooks
    def base_kernel(self, call: LinearCall) -> jax.Array:
        if call.kernel is not None:
            return super().base_kernel(call)
        t = call.get("kernel", METHOD_FROZEN)
        if t is None:
            return super().base_kernel(call)  # raises: no kernel anywhere
        return t.dequantize(call.dtype)


def _kernel_paths(tree: Params, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Module paths of the `{"kernel": quantised}` entries of a QLoRA `quant` tree."""
    out = []
    for k in sorted(tree):
        v = tree[k]
        if isinstance(v, dict) and _quantised(v.get("kernel")):
            out.append(prefix + (k,))
        elif isinstance(v, dict):
            out.extend(_kernel_paths(v, prefix + (k,)))
    return out
