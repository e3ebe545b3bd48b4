"""Adapter arithmetic: combine LoRA adapters of one base into one, as PEFT's `add_weighted_adapter`.

    python -m sft_jax.peft.combine --adapter=DIR[:W] [--adapter=DIR[:W] ...] [--workdir=DIR[@STEP][:W] ...]
        --type=linear|cat|svd|ties|dare_linear|dare_ties|magnitude_prune|ties_svd|dare_linear_svd|dare_ties_svd|
               magnitude_prune_svd
        [--rank=R] [--clamp=Q] [--density=D] [--majority_sign_method=total|frequency] [--seed=S]
        --out=DIR [--format=peft|merged] [--model=BASE] [--dtype=float32|bfloat16] [--overwrite]

Inputs, in command-line order (the order matters for `cat` and for the result's config, which
PEFT copies from the first adapter): PEFT LoRA adapter directories (`--adapter`, e.g. what
`sft_jax.export --format=peft` writes) and/or trained work directories (`--workdir`, a step as in
`sft_jax.export --step`: N, latest, best), each with a weight W (default 1; negative subtracts).

Output: `--format=peft` (default) a PEFT LoRA adapter directory (`PeftModel.from_pretrained`,
`sft_jax.generate --model=BASE --adapter=DIR`), `--format=merged` the base with the combined update
merged in, as an HF model directory (transformers, `sft_jax.generate --model=DIR`). The base is
`--model`, else the first work directory's base, else the first adapter's `base_model_name_or_path`
when that is a local directory.

Types (PEFT's names and math; s_i = alpha_i / r_i, or alpha_i / sqrt(r_i) with rsLoRA):

* `linear` (equal ranks): A = sum_i sqrt(|w_i s_i|) sign(w_i s_i) A_i, B = sum_i sqrt(|w_i s_i|) B_i
  (a rough approximation: the cross terms A_i B_j stay; PEFT says so too);
* `cat`: ranks concatenated (r = sum r_i), A = [w_i s_i A_i], B = [B_i]: exactly sum_i w_i s_i A_i B_i;
* `svd`: the SVD of sum_i w_i s_i A_i B_i truncated to `--rank` (default: the largest r_i), optional
  `--clamp` (PEFT's `svd_clamp`: the quantile of the factors' entries they are clipped to);
* `ties`, `dare_linear`, `dare_ties`, `magnitude_prune` (equal ranks): PEFT's merge_utils functions on
  the A's and on the B's with the weights of `linear` and `--density`; `ties`/`dare_ties` elect signs
  by `--majority_sign_method`; DARE's random masks come from `--seed` (numpy, not torch's generator:
  the same seed does not draw PEFT's masks);
* `*_svd`: the same functions on the full updates w_i s_i A_i B_i, then the SVD as `svd`.

One adapter is combined `linear`ly whatever the type (as PEFT). The result's config is PEFT's:
r = lora_alpha = the new rank (scale 1: the input scales are folded into A and B), dropout and
`base_model_name_or_path` of the first adapter, the same target modules, and `use_rslora=False`
(peft 0.21.2 copies the first adapter's `use_rslora`, which scales the result by sqrt(r); fixed
upstream by huggingface/peft#3449; the A/B tensors are PEFT's either way).

Refused (`CombineError`, one line naming the adapter): adapters of different bases (module shapes,
or `base_model_name_or_path`s that differ and are not two local directories of equal weights), different sets of adapted modules, DoRA adapters (PEFT's
combination would keep a freshly initialised magnitude vector), other PEFT types, unequal ranks for
the equal-rank types, a new rank above a module's min(in, out) for the SVD types.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import sys
import tempfile
from typing import Sequence

import numpy as np

from sft_jax.peft.base import Params, PeftFormatError
from sft_jax.peft.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, Lora, adapter_leaves, lora_scale

TYPES = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune",
         "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
SAME_RANK = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
DENSITY_TYPES = ("ties", "dare_linear", "dare_ties", "magnitude_prune",
                 "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
SIGN_METHODS = ("total", "frequency")
COMBINE_JSON = "combine.json"


class CombineError(PeftFormatError):
    """Adapters that cannot be combined (or bad combination arguments); one line, CLI exit 2."""


@dataclasses.dataclass(frozen=True)
class Adapter:
    """One LoRA adapter: our tree `{path: {"A": [*lead, in, r], "B": [*lead, r, out]}}` and its scale."""

    tree: Params
    rank: int
    alpha: float
    rslora: bool = False
    dropout: float = 0.0
    name: str = "adapter"  # for messages: the directory (or workdir@step) it came from
    base: str = ""  # base_model_name_or_path ("" unknown)

    @property
    def scale(self) -> float:
        return lora_scale(self.alpha, self.rank, self.rslora)

    @classmethod
    def from_lora(cls, tree: Params, lora: Lora, name: str = "adapter", base: str = "") -> "Adapter":
        return cls(tree, int(lora.rank), float(lora.alpha), bool(lora.rslora), float(lora.dropout), name, base or "")


# ------------------------------------------------------------------ PEFT's merge_utils, numpy float32
def random_mask(tensor: np.ndarray, density: float, rng: np.random.Generator) -> np.ndarray:
    """DARE's keep-mask (Bernoulli(density) per entry; torch.bernoulli in PEFT). Tests replace it."""
    return (rng.random(tensor.shape) < density).astype(tensor.dtype)


def _prune(t: np.ndarray, density: float, method: str, rng=None) -> np.ndarray:
    if density >= 1:
        return t
    if method == "magnitude":
        k = int(density * t.size)
        mask = np.zeros(t.size, t.dtype)
        if k > 0:
            flat = np.abs(t).reshape(-1)
            mask[np.argpartition(-flat, k - 1)[:k]] = 1
        return t * mask.reshape(t.shape)
    return t * random_mask(t, density, rng) / np.float32(density)


def _weighted(ts: np.ndarray, w: np.ndarray) -> np.ndarray:
    return ts * w.reshape(w.shape + (1,) * (ts.ndim - 1))


def _sign_mask(ts: np.ndarray, method: str) -> np.ndarray:
    sign = np.sign(ts)
    mag = ts.sum(axis=0) if method == "total" else sign.sum(axis=0)
    return sign == np.where(mag >= 0, 1, -1).astype(ts.dtype)


def _disjoint(weighted: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return (weighted * mask).sum(axis=0) / np.maximum(mask.sum(axis=0), 1).astype(weighted.dtype)


def _merge_tensors(kind: str, tensors: list[np.ndarray], w: np.ndarray, density, sign_method, rng) -> np.ndarray:
    """PEFT's task_arithmetic / ties / dare_linear / dare_ties / magnitude_prune on one module's tensors."""
    if kind in ("linear", "svd"):
        return _weighted(np.stack(tensors), w).sum(axis=0)
    method = "random" if kind.startswith("dare") else "magnitude"
    ts = np.stack([_prune(t, density, method, rng) for t in tensors])
    if kind in ("ties", "dare_ties"):
        return _disjoint(_weighted(ts, w), _sign_mask(ts, sign_method))
    return _weighted(ts, w).sum(axis=0)


def canonical_signs(u: np.ndarray, s: np.ndarray, vh: np.ndarray):
    """Singular vectors with a sign convention (the largest-magnitude entry of each row of vh is
    positive; u's column flipped with it): LAPACKs choose signs differently (numpy's OpenBLAS and
    torch's MKL disagree on most vectors), and `svd_clamp`'s quantile depends on them."""
    k = min(u.shape[1], vh.shape[0])
    u, vh = u[:, :k], vh[:k]
    flip = np.where(vh[np.arange(k), np.argmax(np.abs(vh), axis=1)] < 0, -1, 1).astype(vh.dtype)
    return u * flip[None, :], s[:k], vh * flip[:, None]


def _low_rank_svd(bs: list[np.ndarray], as_: list[np.ndarray]):
    """SVD of sum_i b_i @ a_i (b_i [out, r_i], a_i [r_i, in]) without forming the [out, in] matrix:
    QR of [b_1 .. b_n] and of [a_1; ..; a_n]^T, then the SVD of the small R x R core (R = sum r_i).
    Equal to the dense SVD's leading R triplets (up to float rounding; signs by `canonical_signs`)
    at O((in + out) R^2) instead of O(in out min(in, out))."""
    qb, rb = np.linalg.qr(np.concatenate(bs, axis=1).astype(np.float64))  # float64: O((in + out) R^2)
    qa, ra = np.linalg.qr(np.concatenate(as_, axis=0).T.astype(np.float64))
    um, s, vmh = np.linalg.svd(rb @ ra.T, full_matrices=False)
    return canonical_signs((qb @ um).astype(np.float32), s.astype(np.float32), (vmh @ qa.T).astype(np.float32))


def _combine_module(kind: str, As, Bs, scales, weights, new_rank, density, sign_method, clamp, rng):
    """One module (2-D A_i [in, r_i], B_i [r_i, out]) -> (A [in, R], B [R, out]); PEFT's orientation
    (A [r, in], B [out, r]) inside so that every reduction runs as PEFT's does."""
    f32 = np.float32
    Ap = [np.asarray(a, f32).T for a in As]
    Bp = [np.asarray(b, f32).T for b in Bs]
    if kind == "cat":
        a = np.concatenate([x * f32(w) * f32(s) for x, w, s in zip(Ap, weights, scales)], axis=0)
        b = np.concatenate(Bp, axis=1)
        return a.T, b.T
    if kind in SVD_TYPES:
        if kind == "svd" and new_rank <= sum(x.shape[0] for x in Ap):
            u, s, vh = _low_rank_svd([x * (f32(w) * f32(s)) for x, w, s in zip(Bp, weights, scales)], Ap)
        else:  # the pruned updates are full rank: SVD of the dense [out, in] matrix, as PEFT
            deltas = [(b @ a) * f32(s) for a, b, s in zip(Ap, Bp, scales)]
            delta = _merge_tensors(kind[: -len("_svd")] or "svd", deltas, np.asarray(weights, f32), density,
                                   sign_method, rng)
            u, s, vh = canonical_signs(*np.linalg.svd(delta, full_matrices=False))
        u = u[:, :new_rank] * s[:new_rank]
        vh = vh[:new_rank, :]
        if clamp is not None:
            hi = f32(np.quantile(np.concatenate([u.reshape(-1), vh.reshape(-1)]), clamp))
            u, vh = np.clip(u, -hi, hi), np.clip(vh, -hi, hi)
        return vh.T, u.T  # A = Vh, B = U S
    ws = [w * s for w, s in zip(weights, scales)]
    wa = np.asarray([math.sqrt(abs(x)) * (1 if x >= 0 else -1) for x in ws], f32)
    wb = np.asarray([math.sqrt(abs(x)) for x in ws], f32)
    a = _merge_tensors(kind, Ap, wa, density, sign_method, rng)
    b = _merge_tensors(kind, Bp, wb, density, sign_method, rng)
    return a.T, b.T


# ------------------------------------------------------------------ checks
def _norm_base(name: str) -> str:
    return os.path.realpath(name) if name and os.path.exists(name) else name


def _same_base(a: str, b: str) -> bool:
    """Two base names are one base when they name the same path, or two local model directories whose
    weights have the same fingerprint (every trainer run that adds template tokens saves its own copy of the
    resized base in WORKDIR/base_model: two runs of one base name two directories holding equal weights)."""
    if _norm_base(a) == _norm_base(b):
        return True
    if not (os.path.isdir(a) and os.path.isdir(b)):
        return False
    from sft_jax.adapter_format import AdapterFormatError, base_fingerprint

    try:
        return base_fingerprint(a) == base_fingerprint(b)
    except AdapterFormatError:  # no safetensors to compare: not provably one base
        return False


def check_adapters(adapters: Sequence[Adapter], weights: Sequence[float], combination_type: str, *,
                   rank=None, clamp=None, density=None, majority_sign_method="total") -> tuple[str, int]:
    """Validate a combination; returns (effective type, new rank). Raises CombineError (one line)."""
    if not adapters:
        raise CombineError("no adapters to combine")
    if len(weights) != len(adapters):
        raise CombineError(f"{len(adapters)} adapters but {len(weights)} weights")
    if combination_type not in TYPES:
        raise CombineError(f"combination type {combination_type!r} is not one of {', '.join(TYPES)}")
    for w in weights:
        if not math.isfinite(float(w)):
            raise CombineError(f"weight {w!r} is not a finite number")
    kind = "linear" if len(adapters) == 1 else combination_type  # PEFT: one adapter is combined linearly
    if rank is not None and combination_type not in SVD_TYPES:
        raise CombineError(f"a new rank ({rank}) applies to the SVD types ({', '.join(SVD_TYPES)}), "
                           f"not {combination_type!r}")
    if clamp is not None and (combination_type not in SVD_TYPES or not 0.0 <= float(clamp) <= 1.0):
        raise CombineError(f"clamp={clamp!r}: a quantile in [0, 1], for the SVD types only")
    if combination_type in DENSITY_TYPES:
        if density is None or not 0.0 < float(density) <= 1.0:
            raise CombineError(f"combination type {combination_type!r} needs a density in (0, 1] "
                               f"(the fraction of entries kept), got {density!r}")
    elif density is not None:
        raise CombineError(f"density applies to {', '.join(DENSITY_TYPES)}, not {combination_type!r}")
    if majority_sign_method not in SIGN_METHODS:
        raise CombineError(f"majority_sign_method={majority_sign_method!r} is not one of {', '.join(SIGN_METHODS)}")

    first = adapters[0]
    ref = {p: leaf for p, leaf in adapter_leaves(first.tree)}
    if not ref:
        raise CombineError(f"adapter {first.name} has no LoRA modules")
    for a in adapters[1:]:
        if first.base and a.base and not _same_base(first.base, a.base):
            raise CombineError(f"adapter {a.name} was trained on base {a.base!r}, adapter {first.name} on "
                               f"{first.base!r}: only adapters of one base can be combined")
        mods = {p: leaf for p, leaf in adapter_leaves(a.tree)}
        if set(mods) != set(ref):
            only_a = sorted("/".join(p) for p in set(mods) - set(ref))
            only_f = sorted("/".join(p) for p in set(ref) - set(mods))
            raise CombineError(f"adapter {a.name} adapts other modules than {first.name} (only in {a.name}: "
                               f"{only_a[:4]}, only in {first.name}: {only_f[:4]}): every adapter must adapt the same modules")
        for p, leaf in mods.items():
            sa, sb = np.shape(leaf["A"]), np.shape(leaf["B"])
            ra, rb = np.shape(ref[p]["A"]), np.shape(ref[p]["B"])
            if sa[:-1] != ra[:-1] or sb[:-2] + sb[-1:] != rb[:-2] + rb[-1:]:
                raise CombineError(f"adapter {a.name} module {'/'.join(p)} maps {sa[-2]} -> {sb[-1]} features, "
                                   f"{first.name} {ra[-2]} -> {rb[-1]}: the adapters are of different bases")
    ranks = [int(a.rank) for a in adapters]
    if kind in SAME_RANK:
        if len(set(ranks)) != 1:
            listed = ", ".join(f"{a.name}: r={a.rank}" for a in adapters)
            raise CombineError(f"combination type {kind!r} needs adapters of one rank ({listed}); "
                               "use cat or svd for different ranks")
        new_rank = ranks[0]
    elif kind == "cat":
        new_rank = sum(ranks)
    else:
        new_rank = int(rank) if rank else max(ranks)
        if new_rank <= 0:
            raise CombineError(f"new rank {rank!r} must be > 0")
        for p, leaf in ref.items():
            lim = min(np.shape(leaf["A"])[-2], np.shape(leaf["B"])[-1])
            if new_rank > lim:
                raise CombineError(f"new rank {new_rank} exceeds min(in, out) = {lim} of module {'/'.join(p)}")
    return kind, new_rank


# ------------------------------------------------------------------ the combination
def combine(adapters: Sequence[Adapter], weights: Sequence[float], combination_type: str, *, rank: int | None = None,
            clamp: float | None = None, density: float | None = None, majority_sign_method: str = "total",
            seed: int = 0) -> tuple[Params, Lora]:
    """(tree, Lora) of the combination (PEFT's `add_weighted_adapter`; see the module doc). The
    Lora has r = alpha = the new rank (scale 1), the first adapter's dropout, and targets = exactly
    the adapted modules. Scanned trees ([layers, ...] leaves) are combined layer by layer."""
    kind, new_rank = check_adapters(adapters, weights, combination_type, rank=rank, clamp=clamp, density=density,
                                    majority_sign_method=majority_sign_method)
    rng = np.random.default_rng(seed)
    scales = [a.scale for a in adapters]
    weights = [float(w) for w in weights]
    leaves = [{p: leaf for p, leaf in adapter_leaves(a.tree)} for a in adapters]
    out: Params = {}
    for path in sorted(leaves[0]):
        As = [np.asarray(lv[path]["A"], np.float32) for lv in leaves]
        Bs = [np.asarray(lv[path]["B"], np.float32) for lv in leaves]
        lead = As[0].shape[:-2]
        a_out = np.zeros(lead + (As[0].shape[-2], new_rank), np.float32)
        b_out = np.zeros(lead + (new_rank, Bs[0].shape[-1]), np.float32)
        for idx in np.ndindex(*lead):
            a_out[idx], b_out[idx] = _combine_module(kind, [x[idx] for x in As], [x[idx] for x in Bs], scales,
                                                     weights, new_rank, density, majority_sign_method, clamp, rng)
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = {"A": a_out, "B": b_out}
    targets = "^(" + "|".join(re.escape("/".join(p)) for p in sorted(leaves[0])) + ")$"
    return out, Lora(rank=new_rank, alpha=float(new_rank), dropout=adapters[0].dropout, rslora=False, targets=targets)


# ------------------------------------------------------------------ inputs
def load_adapter_dir(path: str, model_config, name: str | None = None) -> Adapter:
    """A PEFT LoRA adapter directory as an `Adapter` (trees in `model_config`'s layout)."""
    cfg_path = os.path.join(path, ADAPTER_CONFIG)
    if not os.path.isfile(cfg_path):
        raise CombineError(f"{cfg_path} not found (a PEFT adapter directory needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    with open(cfg_path) as f:
        try:
            ac = json.load(f)
        except json.JSONDecodeError as e:
            raise CombineError(f"{cfg_path}: not JSON ({e})") from None
    name = name or path
    if ac.get("peft_type", "LORA") != "LORA":
        raise CombineError(f"adapter {name}: peft_type {ac.get('peft_type')!r} is not LORA: only LoRA adapters "
                           "can be combined")
    if ac.get("use_dora"):
        raise CombineError(f"adapter {name} is DoRA (use_dora=True): its magnitude vectors have no weighted "
                           "combination (PEFT's add_weighted_adapter keeps a freshly initialised one); export the "
                           "merged model of each run instead")
    try:
        tree, lora = Lora.load_peft(path, model_config)
    except PeftFormatError as e:
        raise CombineError(f"adapter {name}: {e}") from None
    return Adapter.from_lora(tree, lora, name=name, base=str(ac.get("base_model_name_or_path") or ""))


@dataclasses.dataclass
class _Input:
    kind: str  # "adapter" | "workdir"
    path: str
    weight: float
    step: str | None = None

    @property
    def label(self) -> str:
        return f"{self.path}@{self.step}" if self.step is not None else self.path


def _split_weight(spec: str, flag: str) -> tuple[str, float]:
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    if not spec:
        from sft_jax.cli import UsageError

        raise UsageError(f"{flag}: empty")
    return spec, 1.0


def parse_input(kind: str):
    """argparse type for --adapter=DIR[:W] / --workdir=DIR[@STEP][:W]."""

    def parse(spec: str) -> _Input:
        path, w = _split_weight(spec, f"--{kind}")
        step = None
        if kind == "workdir":
            head, sep, tail = path.rpartition("@")
            if sep and head and (tail.isdigit() or tail in ("latest", "best")):
                path, step = head, tail
        return _Input(kind, path, w, step)

    return parse


def _workdir_adapter(inp: _Input, tmp: str, model_config=None):
    """(Adapter, Run) of a work directory: its method's PEFT export, read back as LoRA."""
    from sft_jax.workdir import load_run

    run = load_run(inp.path, inp.step, param_dtype="float32", dtype="float32", load_tokenizer=False)
    d = tempfile.mkdtemp(dir=tmp, prefix="workdir-")
    try:
        run.method.save_peft(d, run.trainable, run.frozen, run.model_config, base_model_name_or_path=run.base_model)
    except (PeftFormatError, NotImplementedError, ValueError) as e:
        raise CombineError(f"workdir {inp.label} ({run.method.describe()}) has no LoRA adapter to combine: {e}") from None
    return load_adapter_dir(d, model_config or run.model_config.replace(scan_layers=False), name=inp.label), run


def _tokenizer_files(src: str) -> list[str]:
    if not src or not os.path.isdir(src):
        return []
    rx = re.compile(r"(tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\..*|merges\.txt|.*\.model|"
                    r"chat_template\.(jinja|json))")
    return [os.path.join(src, n) for n in sorted(os.listdir(src))
            if rx.fullmatch(n) and os.path.isfile(os.path.join(src, n))]


# ------------------------------------------------------------------ CLI
def _parser():
    from sft_jax.cli import OneLineArgumentParser

    p = OneLineArgumentParser(prog="python -m sft_jax.peft.combine",
                              description="Combine LoRA adapters of one base (PEFT's add_weighted_adapter).")
    p.add_argument("--adapter", dest="inputs", action="append", type=parse_input("adapter"), default=[],
                   help="a PEFT LoRA adapter directory, optionally :WEIGHT (default 1)")
    p.add_argument("--workdir", dest="inputs", action="append", type=parse_input("workdir"),
                   help="a training work directory, optionally @STEP (N, latest, best) and :WEIGHT")
    p.add_argument("--type", required=True, help=" | ".join(TYPES))
    p.add_argument("--rank", type=int, default=None, help="SVD types: the new rank (default: the largest input rank)")
    p.add_argument("--clamp", type=float, default=None, help="SVD types: PEFT's svd_clamp quantile")
    p.add_argument("--density", type=float, default=None, help="ties/dare/magnitude_prune: fraction of entries kept")
    p.add_argument("--majority_sign_method", default="total", help="ties/dare_ties: total | frequency")
    p.add_argument("--seed", type=int, default=0, help="dare types: seed of the random masks")
    p.add_argument("--out", required=True, help="output directory (must be empty or new, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out whole")
    p.add_argument("--format", default="peft", help="peft (an adapter directory, default) | merged (an HF model)")
    p.add_argument("--model", default=None, help="the base HF directory (default: the first workdir's base, else "
                   "the first adapter's base_model_name_or_path when it is a local directory)")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 (written tensors)")
    p.add_argument("--max_shard_mb", type=float, default=5 * 1024, help="merged: shard size limit in MiB")
    return p


def _resolve_base(args, inputs: list[_Input]) -> str:
    from sft_jax.cli import UsageError

    if args.model:
        if not os.path.isfile(os.path.join(args.model, "config.json")):
            raise UsageError(f"--model={args.model}: not an HF model directory (no config.json)")
        return args.model
    for inp in inputs:
        if inp.kind == "workdir":
            from sft_jax.workdir import check_workdir

            return check_workdir(inp.path, inp.step)[2]
    for inp in inputs:
        try:
            with open(os.path.join(inp.path, ADAPTER_CONFIG)) as f:
                base = json.load(f).get("base_model_name_or_path") or ""
        except (OSError, ValueError):
            base = ""
        if base and os.path.isfile(os.path.join(base, "config.json")):
            return base
    raise UsageError("--model=BASE is needed: no work directory given and the first adapter's "
                     "base_model_name_or_path is not a local model directory")


def main(argv: list[str] | None = None) -> int:
    from sft_jax.cli import UsageError
    from sft_jax.staged_dir import check_target, staged_dir

    args = _parser().parse_args(argv)
    inputs: list[_Input] = [i for i in (args.inputs or []) if i is not None]
    if not inputs:
        raise UsageError("give at least one --adapter=DIR[:W] or --workdir=DIR[@STEP][:W]")
    if args.type not in TYPES:
        raise UsageError(f"--type={args.type!r} is not one of {', '.join(TYPES)}")
    if args.format not in ("peft", "merged"):
        raise UsageError(f"--format={args.format!r} is not one of peft, merged")
    if args.dtype not in ("float32", "bfloat16"):
        raise UsageError(f"--dtype={args.dtype!r} is not one of float32, bfloat16")
    if args.max_shard_mb <= 0:
        raise UsageError("--max_shard_mb must be > 0")
    for inp in inputs:
        if inp.kind == "adapter" and not os.path.isdir(inp.path):
            raise UsageError(f"--adapter={inp.path}: not a directory")
        if inp.kind == "workdir":
            from sft_jax.workdir import check_workdir

            check_workdir(inp.path, inp.step)  # one line before jax loads
    check_target(args.out, args.overwrite)
    base_dir = _resolve_base(args, inputs)
    _check_args(args)  # cheap argument checks first (combine() checks again, with the adapters)

    from sft_jax.models import hf_io

    model_config = hf_io.read_config(base_dir)  # unscanned: trees keyed layers_i
    adapters: list[Adapter] = []
    runs = []
    with tempfile.TemporaryDirectory(prefix="sft_jax_combine_") as tmp:
        for inp in inputs:
            if inp.kind == "adapter":
                adapters.append(load_adapter_dir(inp.path, model_config, name=inp.path))
            else:
                a, run = _workdir_adapter(inp, tmp, model_config)
                adapters.append(a)
                runs.append(run)
    _check_base_shapes(adapters[0], model_config, base_dir)
    weights = [i.weight for i in inputs]
    tree, lora = combine(adapters, weights, args.type, rank=args.rank, clamp=args.clamp, density=args.density,
                         majority_sign_method=args.majority_sign_method, seed=args.seed)
    kind = "linear" if len(adapters) == 1 else args.type
    record = {"type": kind, "requested_type": args.type, "rank": lora.rank,
              "inputs": [{"source": i.label, "kind": i.kind, "weight": i.weight, "r": a.rank, "lora_alpha": a.alpha,
                          "use_rslora": a.rslora} for i, a in zip(inputs, adapters)],
              "density": args.density, "majority_sign_method": args.majority_sign_method, "clamp": args.clamp,
              "seed": args.seed if kind.startswith("dare") else None}
    tok_dirs = iter(r.tokenizer_path for r in runs)  # the first input's tokenizer files travel with the result
    tok_src = next((d for d in (next(tok_dirs) if i.kind == "workdir" else i.path for i in inputs)
                    if _tokenizer_files(d)), None)
    with staged_dir(args.out, overwrite=args.overwrite) as out:
        if args.format == "peft":
            modules = lora.save_peft(out, tree, {}, model_config, base_model_name_or_path=adapters[0].base,
                                     dtype=args.dtype)
            what = f"peft LoRA adapter r={lora.rank}, {len(modules)} modules"
        else:
            from sft_jax.export import generation_config

            _, params = hf_io.load_hf(base_dir, param_dtype="float32", dtype="float32")
            merged = lora.merge(tree, params, model_config)
            files = hf_io.save_hf(out, model_config, merged, dtype=args.dtype,
                                  max_shard_bytes=int(args.max_shard_mb * 2**20))
            tok_src = tok_src or base_dir
            if runs:
                with open(os.path.join(out, "generation_config.json"), "w") as f:
                    json.dump(generation_config(runs[0].model_config, runs[0].eos_ids), f, indent=2)
            elif os.path.isfile(os.path.join(base_dir, "generation_config.json")):
                shutil.copyfile(os.path.join(base_dir, "generation_config.json"),
                                os.path.join(out, "generation_config.json"))
            what = f"merged {model_config.model_type} model on {base_dir} ({len(files)} safetensors file(s))"
        for src in _tokenizer_files(tok_src):
            shutil.copyfile(src, os.path.join(out, os.path.basename(src)))
        with open(os.path.join(out, COMBINE_JSON), "w") as f:
            json.dump(record, f, indent=2)
    note = f" (one adapter: linear, as PEFT)" if kind != args.type else ""
    print(f"wrote {what} to {args.out}: {kind}{note} of {len(adapters)} adapter(s), {args.dtype}")
    return 0


def _check_args(args) -> None:
    """The argument checks of `check_adapters` that need no adapter (one line before anything loads)."""
    a = Adapter({"m": {"A": np.zeros((1, 1)), "B": np.zeros((1, 1))}}, 1, 1.0, name="-")
    try:
        check_adapters([a, a], [1.0, 1.0], args.type, rank=args.rank, clamp=args.clamp, density=args.density,
                       majority_sign_method=args.majority_sign_method)
    except CombineError as e:
        if "exceeds min(in, out)" not in str(e):  # the real modules decide that one
            from sft_jax.cli import UsageError

            raise UsageError(str(e)) from None


def _check_base_shapes(adapter: Adapter, model_config, base_dir: str) -> None:
    """The adapter's modules have the base's shapes (else: an adapter of another base)."""
    from sft_jax.models import llama

    abstract = llama.abstract_params(model_config)
    for path, leaf in adapter_leaves(adapter.tree):
        node = abstract
        for k in path:
            node = node.get(k) if isinstance(node, dict) else None
        kernel = node.get("kernel") if isinstance(node, dict) else None
        if kernel is None:
            raise CombineError(f"adapter {adapter.name}: module {'/'.join(path)} is not in the base {base_dir}")
        want = tuple(kernel.shape[-2:])
        got = (np.shape(leaf["A"])[-2], np.shape(leaf["B"])[-1])
        if want != got:
            raise CombineError(f"adapter {adapter.name}: module {'/'.join(path)} maps {got[0]} -> {got[1]} features, "
                               f"the base {base_dir} {want[0]} -> {want[1]}: not an adapter of this base")


if __name__ == "__main__":
    from sft_jax.cli import run_cli

    sys.exit(run_cli(main, sys.argv[1:], "python -m sft_jax.peft.combine"))
