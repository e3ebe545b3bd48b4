"""PiSSA (principal singular values and vectors adaptation, Meng et al. 2024) as pure JAX functions, as peft's
`init_lora_weights="pissa"` / `"pissa_niter_K"`.

PiSSA is LoRA with another initialisation: the r principal singular triplets of the base weight go into the
adapter and the rest stays in the frozen base.  With peft's orientation W_hf = kernel^T [out, in] = V S U^T:

    lora_A = sqrt(S_r / s) U_r^T  [r, in],   lora_B = V_r sqrt(S_r / s)  [out, r],
    W_res  = W - s B A                        (so that W_res + s B A = W: the first forward equals the base)

stored here in our layout as A = lora_A^T [in, r], B = lora_B^T [r, out], residual kernel [in, out].
`pissa_niter_K` replaces the full SVD by torch's randomised `svd_lowrank(W_hf, q=r, niter=K)` (Halko et al.
2009, algorithms 4.4 + 5.1), reimplemented below with a JAX random matrix.

Export: the trained adapter belongs to the residual base.  peft's documented conversion to a plain LoRA on the
original base (`save_pretrained(..., path_initial_model_for_weight_conversion=...)`, `subtract_mutated_init`)
uses W + dW = W_res + s B A = W + s (B A - B0 A0), i.e. the rank-2r adapter A' = [A | A0], B' = [B ; -B0] with
alpha doubled (rsLoRA: alpha * sqrt(2)) so that the scale stays s.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from sft_jax.models.hooks import METHOD
from sft_jax.peft.base import MethodConfigError, Params
from sft_jax.peft.lora import Lora, _get, _set, adapter_axes, adapter_leaves, merge_low_rank, target_paths


def _t(x: jax.Array) -> jax.Array:
    return jnp.swapaxes(x, -1, -2)


def svd_lowrank_from(w: jax.Array, r_init: jax.Array, niter: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """torch's `svd_lowrank(w, q, niter)` with its random test matrix given: `r_init` [*lead, n', q], where n' is
    the smaller of w's last two dimensions ([*lead, m, n]).  Returns U [*lead, m, q], S [*lead, q],
    V [*lead, n, q] with w ~ U diag(S) V^T."""
    tall = w.shape[-2] >= w.shape[-1]
    a = w if tall else _t(w)
    q_mat = jnp.linalg.qr(a @ r_init).Q
    for _ in range(niter):
        q_mat = jnp.linalg.qr(_t(a) @ q_mat).Q
        q_mat = jnp.linalg.qr(a @ q_mat).Q
    u, s, vh = jnp.linalg.svd(_t(q_mat) @ a, full_matrices=False)
    u = q_mat @ u
    v = _t(vh)
    return (u, s, v) if tall else (v, s, u)


def svd_lowrank(w: jax.Array, q: int, niter: int, key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Randomised rank-q SVD of w [*lead, m, n] (torch's `svd_lowrank`; standard-normal test matrices from
    `key`)."""
    r_init = jax.random.normal(key, (*w.shape[:-2], min(w.shape[-2:]), q), jnp.float32)
    return svd_lowrank_from(w, r_init, niter)


def pissa_init(
    kernel: jax.Array, rank: int, scale: float, *, niter: int | None = None, key: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(A [*lead, in, r], B [*lead, r, out], residual kernel [*lead, in, out]) for a base kernel
    [*lead, in, out] (`lead`: the layer axis of a scanned base; every layer is decomposed on its own).

    niter None: the exact SVD (`init_lora_weights="pissa"`); an int K: the randomised one
    (`"pissa_niter_K"`, needs `key`).  The SVD runs in float32; A, B are float32, the residual has the
    kernel's dtype."""
    w_hf = _t(kernel.astype(jnp.float32))  # [*lead, out, in], peft's orientation
    if niter is None:
        v, s, uh = jnp.linalg.svd(w_hf, full_matrices=False)
        v_r, s_r, uh_r = v[..., :rank], s[..., :rank], uh[..., :rank, :]
    else:
        if key is None:
            raise ValueError("pissa_init: the randomised SVD (niter set) needs a key")
        v_r, s_r, u_r = svd_lowrank(w_hf, rank, niter, key)
        uh_r = _t(u_r)
    root = jnp.sqrt(s_r / scale)
    lora_a = root[..., :, None] * uh_r  # [*lead, r, in]
    lora_b = v_r * root[..., None, :]  # [*lead, out, r]
    a, b = _t(lora_a), _t(lora_b)
    residual = kernel.astype(jnp.float32) - scale * (a @ b)
    return a, b, residual.astype(kernel.dtype)


def to_plain_lora(
    a: jax.Array, b: jax.Array, a0: jax.Array, b0: jax.Array, alpha: float, rslora: bool = False
) -> tuple[jax.Array, jax.Array, float]:
    """A trained PiSSA adapter (A, B on the residual base; A0, B0 its initial value) as a plain LoRA adapter on
    the original base: (A' [in, 2r], B' [2r, out], alpha'), peft's `subtract_mutated_init` conversion."""
    a2 = jnp.concatenate([a, a0], axis=-1)
    b2 = jnp.concatenate([b, -b0], axis=-2)
    return a2, b2, alpha * (math.sqrt(2.0) if rslora else 2.0)


def original_kernel(residual: jax.Array, a0: jax.Array, b0: jax.Array, scale: float) -> jax.Array:
    """The base kernel PiSSA started from: W_res + s A0 B0 (exact up to float rounding)."""
    return (residual.astype(jnp.float32) + scale * (a0.astype(jnp.float32) @ b0.astype(jnp.float32))).astype(
        residual.dtype)


# ------------------------------------------------------------------ the method
def _copy_dicts(tree):
    """A copy of the dict structure of `tree` (leaves shared), to replace some leaves without touching `tree`."""
    return {k: _copy_dicts(v) if isinstance(v, dict) else v for k, v in tree.items()}


@dataclasses.dataclass(frozen=True)
class Pissa(Lora):
    """PiSSA (`peft.method=pissa`): LoRA (`peft.lora.*`) initialised from the principal singular triplets of
    each targeted kernel, trained against the residual base; `peft.pissa.niter` > 0 uses the randomised SVD
    with that many subspace iterations (peft's `pissa_niter_K`), 0 the exact SVD.

    Trees: frozen = `{"params": <base with W_res at the targets>, "init": <A0, B0 per target>}` (both
    recomputed from the base by `frozen_base`: the SVD is deterministic, its random test matrix comes from
    the rng); trainable = LoRA's `{"A", "B"}`, starting at A0, B0. The model reads `frozen["params"]`, so the
    first forward equals the base model up to float rounding.

    Export: merged = W_res + s A B (= W + s (A B - A0 B0)); the PEFT adapter is the rank-2r plain LoRA on the
    ORIGINAL base (peft's `path_initial_model_for_weight_conversion`, see pissa.to_plain_lora), so it loads with
    `PeftModel.from_pretrained` on the unchanged base model."""

    name: ClassVar[str] = "pissa"
    niter: int = 0

    def __post_init__(self):
        super().__post_init__()
        if self.niter < 0:
            raise MethodConfigError(f"config field 'peft.pissa.niter' must be >= 0, got {self.niter}")

    @classmethod
    def from_config(cls, peft_cfg) -> "Pissa":
        s = peft_cfg["lora"]
        return cls(rank=int(s["rank"]), alpha=float(s["alpha"]), dropout=float(s["dropout"]),
                   rslora=bool(s["rslora"]), targets=str(s["targets"]), niter=int(peft_cfg["pissa"]["niter"]))

    def run_config(self) -> dict:
        lora_fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(Lora)}
        return {"method": self.name, "lora": lora_fields, "pissa": {"niter": self.niter}}

    def describe(self) -> str:
        svd = f"randomised SVD, niter={self.niter}" if self.niter else "exact SVD"
        return f"PiSSA ({svd}) r={self.rank} alpha={self.alpha:g}{' rsLoRA' if self.rslora else ''} targets={self.targets}"

    # trees
    def frozen_base(self, params: Params, model_config, rng: jax.Array) -> Params:
        paths = target_paths(params, self.targets)
        keys = jax.random.split(rng, len(paths))
        residual, init = _copy_dicts(params), {}
        for key, path in zip(keys, paths):
            node = _get(params, path)
            a, b, res = pissa_init(node["kernel"], self.rank, self.scale, niter=self.niter or None, key=key)
            _set(residual, path, {**node, "kernel": res})
            _set(init, path, {"A": a, "B": b})
        return {"params": residual, "init": init}

    def init_trainable(self, params: Params, frozen: Params, model_config, rng) -> Params:
        return jax.tree.map(lambda x: jnp.array(x, jnp.float32), frozen["init"])

    def variables(self, trainable: Params, frozen: Params) -> dict[str, Params]:
        return {"params": frozen["params"], METHOD: trainable}

    def frozen_axes(self, frozen: Params, param_axes: Params) -> Params:
        return {"params": param_axes, "init": adapter_axes(frozen["init"], param_axes)}

    def merge(self, trainable: Params, frozen: Params, model_config) -> Params:
        return merge_low_rank(frozen["params"], trainable, self.scale)

    # PEFT: the equivalent plain LoRA on the original base
    def plain_lora(self, trainable: Params, frozen: Params) -> tuple[Params, Lora]:
        """(rank-2r LoRA tree, its Lora method) equal to the trained PiSSA adapter on the original base."""
        tree: Params = {}
        alpha2 = self.alpha
        for path, leaf in adapter_leaves(trainable):
            a0b0 = _get(frozen["init"], path)
            a2, b2, alpha2 = to_plain_lora(leaf["A"], leaf["B"], a0b0["A"], a0b0["B"], self.alpha, self.rslora)
            _set(tree, path, {"A": a2, "B": b2})
        lora = Lora(rank=2 * self.rank, alpha=alpha2, dropout=self.dropout, rslora=self.rslora, targets=self.targets)
        return tree, lora

    def save_peft(self, out_dir: str, trainable: Params, frozen: Params, model_config, *,
                  base_model_name_or_path: str = "", dtype: str = "float32") -> list[str]:
        tree, lora = self.plain_lora(trainable, frozen)
        return lora.save_peft(out_dir, tree, frozen["params"], model_config,
                              base_model_name_or_path=base_model_name_or_path, dtype=dtype)

    @classmethod
    def load_peft(cls, adapter_dir: str, params_or_config) -> tuple[Params, Lora]:
        """A PiSSA export is a plain LoRA adapter on the original base: read back as `Lora`."""
        return Lora.load_peft(adapter_dir, params_or_config)
