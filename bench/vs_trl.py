#!/usr/bin/env python
"""sft_jax vs TRL's SFTTrainer: same model, same data, same batches, same optimizer, one script.

    python bench/vs_trl.py [--quick] [--toy] [--out bench/vs_trl_results.json]

What is identical on both sides (and how):
  * model: one random-init Llama (torch.manual_seed), saved with `save_pretrained` to a temp dir;
    TRL loads it with `AutoModelForCausalLM.from_pretrained`, sft_jax with `sft_jax.models.hf_io.load_hf`.
  * tokenizer: one byte-level BPE trained offline on the data (vocab = model vocab), chatml chat
    template with `{% generation %}` markers (so TRL's assistant_only_loss builds exact masks).
  * data + order + packing: TRL prepares the data itself (conversational dataset,
    assistant_only_loss=True, packing=True with its default "bfd" strategy, max_length=T);
    its packed rows (input_ids, labels, seq_lengths) are read back from `trainer.train_dataset`
    and converted, row for row, into sft_jax batches (`inputs`/`targets` shifted per segment,
    `loss_mask` = labels != -100, `segment_ids`, `positions`, padded to T).  Both sides consume
    rows in the same sequential order (TRL: train_sampling_strategy="sequential").
  * LoRA: r=16, alpha=32, dropout 0, all linear layers except lm_head (peft 'all-linear');
    sft_jax starts from *peft's* initial A/B matrices (copied), so the trajectories can agree.
  * optimizer: AdamW b1=.9 b2=.999 eps=1e-8, weight decay 0, constant lr, global-norm clip 1.0;
    loss = sum of token NLL / number of trainable tokens in the global batch.
  * precision: float32 everywhere (TRL's SFTConfig defaults bf16=True; we set bf16=False);
    `--precisions bf16` adds rows with TRL bf16=True (CPU autocast) vs sft_jax model.dtype=bfloat16.
  * TRL batch layouts, both TRL's own code paths: "flat" = per_device_train_batch_size=B (TRL's
    padding-free collator concatenates the B packed rows into one [1, ~B*T] row), "accum" = one
    packed row per micro-batch x B gradient-accumulation steps (same loss normalisation).
    The ratio is taken against the faster one.
  * TRL's SFTConfig turns gradient checkpointing ON by default; we set it OFF (costs ~1/3 on CPU).
  * threads: torch.set_num_threads(NPROC); XLA's CPU backend uses all cores by default.

Throughput counts real tokens only: per step, the non-padding positions of the sft_jax batch
(= sum over packed examples of (len - 1)); the same count is used for TRL's time per step.

Model FLOPs per step (written down, used for both sides):
    N      = matmul parameters = L*(D*H*hd + 2*D*KV*hd + H*hd*D + 3*D*I) + D*V   (lm_head; the
             embedding gather is not a matmul and is excluded)
    dense  = 6*N per token (full fine-tuning), 4*N + 6*N_lora per token (LoRA: the frozen base
             gets activation gradients but no weight gradients)
    attn   = 12*L*(H*hd)*n per token of an example of length n (PaLM's count, not halved for
             causality), i.e. 12*L*H*hd*n^2 per packed example
    %peak  = model FLOPs / step time / (matmul peak measured in this script: a jitted
             2048x2048 @ 2048x2048 matmul, median of 10; re-measured before every row and at the
             end, and the HIGHEST value is used: a conservative denominator on a shared machine).

Modes: default = small (4.95M) + medium (31.4M) models, LoRA + full, 10 steps x 3 reps (median);
--quick = 6 steps x 1 rep (< 15 min on 2 quiet cores); --toy = seconds, for tests/test_bench_vs_trl.py.
--sizes smollm2_135m: SmolLM2-135M's shapes (D 576, 30 layers, 9 / 3 heads, I 1536, V 49152, tied
embeddings), random init, LoRA only.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DISABLE_TQDM", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

NPROC = os.cpu_count() or 1

# --------------------------------------------------------------------------------------------
# Model sizes
# --------------------------------------------------------------------------------------------
SIZES = {
    # for the test only: seconds, not a benchmark
    "toy": dict(hidden=64, layers=2, heads=4, kv=2, inter=172, vocab=512),
    # >= 3M parameters
    "small": dict(hidden=256, layers=4, heads=4, kv=2, inter=688, vocab=4000),
    # >= 20M parameters
    "medium": dict(hidden=512, layers=8, heads=8, kv=4, inter=1376, vocab=8000),
    # the shapes of a real small model, SmolLM2-135M (134.5M parameters, tied embeddings), random init;
    # LoRA only (run it with --sizes smollm2_135m; not part of the default / --quick size lists)
    "smollm2_135m": dict(hidden=576, layers=30, heads=9, kv=3, inter=1536, vocab=49152, tied=True, modes=("lora",)),
    # toy with tied embeddings: the test's check of the tied-lm_head path on both sides
    "toy_tied": dict(hidden=64, layers=2, heads=4, kv=2, inter=172, vocab=512, tied=True),
}

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def log(*a):
    print(*a, flush=True)


# --------------------------------------------------------------------------------------------
# Data: LIMA when ../shared has it, else generated conversations
# --------------------------------------------------------------------------------------------
def load_conversations(max_examples: int | None = None, seed: int = 0) -> tuple[list[list[dict]], str]:
    """A list of conversations ([{role, content}, ...]) in a fixed, seeded order, and their source."""
    path = SHARED / "data" / "lima.json"
    if path.exists():
        rows = json.loads(path.read_text())
        convs = []
        for r in rows:
            msgs = []
            for u, a in r.get("history") or []:
                msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
            user = r["instruction"] + (("\n" + r["input"]) if r.get("input") else "")
            msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": r["output"]}]
            convs.append(msgs)
        source = f"LIMA ({path})"
    else:
        rng = np.random.default_rng(1234)
        words = [
            "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=rng.integers(2, 9)))
            for _ in range(3000)
        ]
        convs = []
        for _ in range(1000):
            q = " ".join(rng.choice(words, size=rng.integers(5, 40)))
            a = " ".join(rng.choice(words, size=rng.integers(20, 400)))
            convs.append([{"role": "user", "content": q}, {"role": "assistant", "content": a}])
        source = "generated (../shared/data/lima.json not found)"
    order = np.random.default_rng(seed).permutation(len(convs))
    convs = [convs[i] for i in order]
    if max_examples:
        convs = convs[:max_examples]
    return convs, source


# --------------------------------------------------------------------------------------------
# Tokenizer: byte-level BPE trained on the data, chatml template with generation markers
# --------------------------------------------------------------------------------------------
def build_tokenizer(convs, vocab_size: int, out_dir: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    _quiet()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator((m["content"] for c in convs for m in c), trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
    )
    hf.chat_template = CHATML_TEMPLATE
    out_dir.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out_dir))
    return hf


# --------------------------------------------------------------------------------------------
# Model: tiny random-init Llama in Hugging Face format
# --------------------------------------------------------------------------------------------
def llama_config(size: dict, max_len: int, eos_token_id=None, pad_token_id=None):
    """The transformers LlamaConfig of a SIZES entry."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=size["vocab"],
        hidden_size=size["hidden"],
        intermediate_size=size["inter"],
        num_hidden_layers=size["layers"],
        num_attention_heads=size["heads"],
        num_key_value_heads=size["kv"],
        head_dim=size["hidden"] // size["heads"],
        max_position_embeddings=max(max_len, 2048),
        rms_norm_eps=1e-5,
        tie_word_embeddings=size.get("tied", False),
        bos_token_id=None,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )


def build_model(size: dict, tok, out_dir: Path, max_len: int, seed: int = 0) -> dict:
    import torch
    from transformers import LlamaForCausalLM

    vocab = len(tok)
    assert vocab <= size["vocab"], (vocab, size)
    cfg = llama_config(size, max_len, tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tok.save_pretrained(str(out_dir))
    n_total = sum(p.numel() for p in model.parameters())
    return {"config": cfg.to_dict(), "params": n_total}


def matmul_params(size: dict) -> int:
    D, L, H, KV, I, V = size["hidden"], size["layers"], size["heads"], size["kv"], size["inter"], size["vocab"]
    hd = D // H
    per_layer = D * H * hd + 2 * D * KV * hd + H * hd * D + 3 * D * I
    return L * per_layer + D * V


def lora_params(size: dict, r: int = 16) -> int:
    D, L, H, KV, I = size["hidden"], size["layers"], size["heads"], size["kv"], size["inter"]
    hd = D // H
    dims = [(D, H * hd), (D, KV * hd), (D, KV * hd), (H * hd, D), (D, I), (D, I), (I, D)]
    return L * sum(r * (i + o) for i, o in dims)


def step_flops(size: dict, seg_lens: list[int], lora: bool) -> float:
    """Model FLOPs of one optimizer step over examples (segments) of the given lengths."""
    n_tok = sum(seg_lens)
    N = matmul_params(size)
    dense = (4 * N + 6 * lora_params(size)) if lora else 6 * N
    L, D = size["layers"], size["hidden"]  # H*hd == D here
    attn = sum(12 * L * D * n * n for n in seg_lens)
    return dense * n_tok + attn


# --------------------------------------------------------------------------------------------
# Peak: jitted float32 (and bf16) matmul
# --------------------------------------------------------------------------------------------
def measure_matmul_peak(n: int = 2048, reps: int = 10) -> dict:
    import jax
    import jax.numpy as jnp

    out = {}
    for name, dt in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
        a = jax.random.normal(jax.random.key(0), (n, n), dt)
        b = jax.random.normal(jax.random.key(1), (n, n), dt)
        f = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
        f(a, b).block_until_ready()
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            f(a, b).block_until_ready()
            ts.append(time.perf_counter() - t)
        out[name] = 2 * n**3 / statistics.median(ts)
    return out


# --------------------------------------------------------------------------------------------
# Batches: TRL's packed rows -> sft_jax batch dicts (contract in BUILD_NOTES.md)
# --------------------------------------------------------------------------------------------
def rows_to_batch(rows: list[dict], T: int) -> tuple[dict, list[int]]:
    """TRL packed rows (input_ids, labels, seq_lengths) -> sft_jax batch [b, T] + segment lengths.

    Per packed example of n tokens: inputs = ids[:-1], targets = ids[1:], loss_mask = labels[1:] != -100
    (the same (input, target) pairs HF's shifted loss uses; TRL also masks each example's first label).
    """
    b = len(rows)
    batch = {
        "inputs": np.zeros((b, T), np.int32),
        "targets": np.zeros((b, T), np.int32),
        "loss_mask": np.zeros((b, T), np.float32),
        "segment_ids": np.zeros((b, T), np.int32),
        "positions": np.zeros((b, T), np.int32),
    }
    seg_lens = []
    for i, row in enumerate(rows):
        ids = np.asarray(row["input_ids"], np.int32)
        lab = np.asarray(row["labels"], np.int64)
        lens = row.get("seq_lengths") or [len(ids)]
        start = col = 0
        for s, n in enumerate(lens):
            seg_ids, seg_lab = ids[start : start + n], lab[start : start + n]
            m = n - 1
            assert col + m <= T, "packed row longer than max_length"
            batch["inputs"][i, col : col + m] = seg_ids[:-1]
            batch["targets"][i, col : col + m] = seg_ids[1:]
            batch["loss_mask"][i, col : col + m] = seg_lab[1:] != -100
            batch["segment_ids"][i, col : col + m] = s + 1
            batch["positions"][i, col : col + m] = np.arange(m)
            seg_lens.append(m)
            start += n
            col += m
    return batch, seg_lens


# --------------------------------------------------------------------------------------------
# TRL side
# --------------------------------------------------------------------------------------------
def _quiet():
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)


class _StepClock:
    """TrainerCallback-like timing: wall time at train begin and at every step end."""

    def __init__(self):
        self.t0 = None
        self.ends = []
        self.cpu = []


def make_trl_trainer(model_dir, tok, convs, *, lora, B, T, lr, steps, layout, seed, out_dir, bf16=False):
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    torch.set_num_threads(NPROC)
    _quiet()
    clock = _StepClock()

    class Cb(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            clock.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            clock.ends.append(time.perf_counter())
            clock.cpu.append(time.process_time())

    class Trainer(SFTTrainer):
        bench_losses: list

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            self.bench_losses.append(float((loss[0] if return_outputs else loss).detach()))
            return loss

    # layout "flat": per_device_train_batch_size=B, TRL's padding-free collator flattens the B packed
    # rows into one [1, ~B*T] row (TRL's default with packing=True).  "accum": one packed row per
    # micro-batch, B accumulation steps (loss still normalised over the global batch).
    per_dev, accum = (B, 1) if layout == "flat" else (1, B)
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.float32, attn_implementation="sdpa"
    )
    args = SFTConfig(
        output_dir=str(out_dir),
        max_steps=steps,
        per_device_train_batch_size=per_dev,
        gradient_accumulation_steps=accum,
        learning_rate=lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        max_grad_norm=1.0,
        optim="adamw_torch",
        gradient_checkpointing=False,
        bf16=bf16,  # SFTConfig's default is True; the f32 rows set False
        fp16=False,
        use_cpu=True,
        packing=True,
        packing_strategy="bfd",
        max_length=T,
        assistant_only_loss=True,
        train_sampling_strategy="sequential",
        logging_steps=max(steps, 1),
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=seed,
        shuffle_dataset=True,  # shuffles the examples and then the packed rows (seeded)
    )
    peft_config = (
        LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
        if lora
        else None
    )
    ds = Dataset.from_list([{"messages": c} for c in convs])
    trainer = Trainer(
        model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=peft_config, callbacks=[Cb()]
    )
    trainer.bench_losses = []
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer, clock


def trl_rows(trainer, n_rows: int) -> list[dict]:
    ds = trainer.train_dataset
    assert len(ds) >= n_rows, f"TRL packed only {len(ds)} rows, need {n_rows}: use fewer steps/batch"
    return [ds[i] for i in range(n_rows)]


def peft_lora_state(trainer) -> dict:
    """peft's initial LoRA matrices, keyed 'layers_{i}/{attn|mlp}/{proj}' -> {A: [in, r], B: [r, out]}."""
    out = {}
    for name, p in trainer.model.named_parameters():
        if "lora_A" not in name and "lora_B" not in name:
            continue
        parts = name.split(".")
        li = parts[parts.index("layers") + 1]
        proj = parts[parts.index("layers") + 3]
        group = "attn" if parts[parts.index("layers") + 2] == "self_attn" else "mlp"
        key = f"layers_{li}/{group}/{proj}"
        w = p.detach().cpu().numpy().astype(np.float32)
        out.setdefault(key, {})["A" if "lora_A" in name else "B"] = w.T.copy()
    return out


def run_trl(trainer, clock, steps, B) -> dict:
    trainer.train()
    accum = trainer.args.gradient_accumulation_steps
    micro = trainer.bench_losses
    losses = [sum(micro[i * accum : (i + 1) * accum]) for i in range(len(micro) // accum)]
    ends = clock.ends
    return {
        "first_step_s": ends[0] - clock.t0,
        "step_s": [ends[i] - ends[i - 1] for i in range(1, len(ends))],
        "cpu_s": [clock.cpu[i] - clock.cpu[i - 1] for i in range(1, len(ends))],
        "losses": losses[:steps],
    }


# --------------------------------------------------------------------------------------------
# sft_jax side
# --------------------------------------------------------------------------------------------
def tokenization_check(tok, convs) -> str:
    """sft_jax's template+mask encoder vs the HF/TRL one (apply_chat_template with assistant masks)."""
    from sft_jax.data import masking, templates

    tmpl = templates.resolve_template(tok)
    bad = 0
    for c in convs:
        ids, mask = masking.encode(tok, tmpl, c, "all_assistant")
        d = tok.apply_chat_template(c, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        bad += list(ids) != list(d["input_ids"]) or list(mask) != list(d["assistant_masks"])
    return (f"tokenization check: sft_jax data.masking.encode == TRL/HF apply_chat_template "
            f"(ids and assistant masks) for {len(convs) - bad}/{len(convs)} conversations")


def sft_jax_available() -> str | None:
    """None when sft_jax's model + train step can be used, else why not."""
    need = ["sft_jax/models/llama.py", "sft_jax/train_step.py"]  # hf_io optional (fallback loader)
    missing = [p for p in need if not (REPO / p).exists()]
    if missing:
        return "not yet in the tree: " + ", ".join(missing)
    try:
        from sft_jax import train_step  # noqa: F401

        if not hasattr(train_step, "make_train_step"):
            return "sft_jax.train_step has no make_train_step"
    except Exception as e:  # noqa: BLE001
        return f"import failed: {type(e).__name__}: {e}"
    return None


def _load_params_fallback(model_dir):
    """HF safetensors -> sft_jax params tree (used only until sft_jax.models.hf_io lands)."""
    from safetensors.numpy import load_file

    from sft_jax.models.config import ModelConfig

    hf = json.loads((Path(model_dir) / "config.json").read_text())
    mc = ModelConfig.from_hf(hf)
    sd = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        sd.update(load_file(str(f)))
    p: dict = {"embed": {"embedding": sd["model.embed_tokens.weight"]}, "final_norm": {"scale": sd["model.norm.weight"]}}
    if "lm_head.weight" in sd:
        p["lm_head"] = {"kernel": sd["lm_head.weight"].T.copy()}
    for i in range(mc.num_layers):
        pre = f"model.layers.{i}."
        p[f"layers_{i}"] = {
            "input_norm": {"scale": sd[pre + "input_layernorm.weight"]},
            "post_attn_norm": {"scale": sd[pre + "post_attention_layernorm.weight"]},
            "attn": {k: {"kernel": sd[pre + f"self_attn.{k}.weight"].T.copy()} for k in ("q_proj", "k_proj", "v_proj", "o_proj")},
            "mlp": {k: {"kernel": sd[pre + f"mlp.{k}.weight"].T.copy()} for k in ("gate_proj", "up_proj", "down_proj")},
        }
    return mc, p


def load_sft_jax_params(model_dir, **policy):
    """(ModelConfig, params) via sft_jax.models.hf_io.load_hf when present."""
    try:
        from sft_jax.models.hf_io import load_hf
    except ImportError:
        load_hf = None
    if load_hf is not None:
        return load_hf(str(model_dir), param_dtype=policy.get("param_dtype", "float32"),
                       dtype=policy.get("dtype", "float32"), scan_layers=policy.get("scan_layers", False),
                       remat=policy.get("remat", "none"))
    assert not policy.get("scan_layers"), "scan_layers needs sft_jax.models.hf_io"
    mc, params = _load_params_fallback(model_dir)
    return mc.replace(**policy) if policy else mc, params


def setup_sft_jax(model_dir, *, batch_size, lora, lora_init=None, lr, steps, seed, policy=None, step_opts=None):
    """sft_jax state + jitted step for `model_dir`: (steps, trainable, frozen, opt_state).

    Same optimizer as the TRL side: AdamW(b1 .9, b2 .999, eps 1e-8, wd 0), constant lr, clip 1.0.
    `lora_init`: peft's initial adapters ({'layers_i/attn/q_proj': {A, B}}) copied in."""
    import jax

    from sft_jax import config as config_lib
    from sft_jax import optim
    from sft_jax import peft
    from sft_jax import sharding as sharding_lib
    from sft_jax import train_step as ts

    mc, params = load_sft_jax_params(model_dir, **(policy or {}))
    cfg = config_lib.default_config()
    cfg.train.lr = lr
    cfg.train.schedule = "constant"
    cfg.train.warmup_steps = 0
    cfg.train.weight_decay = 0.0
    cfg.train.grad_clip = 1.0
    cfg.train.b1, cfg.train.b2, cfg.train.eps = 0.9, 0.999, 1e-8
    method = peft.Lora(rank=16, alpha=32.0, dropout=0.0, targets="all-linear") if lora else peft.Full()
    trainable, frozen = method.init(params, mc, jax.random.key(seed))
    if lora and lora_init is not None:
        flat = {}

        def walk(node, path):
            if isinstance(node, dict) and "A" in node and not isinstance(node["A"], dict):
                flat["/".join(path)] = node
            elif isinstance(node, dict):
                for k, v in node.items():
                    walk(v, path + [k])

        walk(trainable, [])
        assert set(flat) == set(lora_init), (sorted(flat)[:4], sorted(lora_init)[:4])
        for k, node in flat.items():
            for ab in ("A", "B"):
                assert node[ab].shape == lora_init[k][ab].shape, (k, ab, node[ab].shape, lora_init[k][ab].shape)
                node[ab] = jax.numpy.asarray(lora_init[k][ab])
    optimizer, sched = optim.make_optimizer(cfg.train, steps)
    mesh = sharding_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    st = ts.make_train_step(
        mc, mesh, trainable=trainable, frozen=frozen, optimizer=optimizer, schedule=sched, method=method,
        opts=step_opts or ts.StepOptions(), batch_size=batch_size,
    )
    trainable = jax.device_put(trainable, st.shardings.trainable)
    frozen = jax.device_put(frozen, st.shardings.frozen) if frozen else frozen
    opt_state = sharding_lib.init_opt_state(optimizer, trainable, st.shardings.opt_state)
    jax.block_until_ready((trainable, frozen, opt_state))
    return st, trainable, frozen, opt_state


def sft_jax_steps(st, trainable, frozen, opt_state, batches, seed=0):
    """Run the jitted step over `batches`; yields (loss, wall seconds, cpu seconds, batch) per step."""
    import jax

    from sft_jax import train_step as ts

    rng = jax.random.key(seed)
    for i, b in enumerate(batches):
        t, c = time.perf_counter(), time.process_time()
        batch = jax.device_put({k: b[k] for k in ts.BATCH_KEYS}, st.shardings.batch)
        trainable, opt_state, m = st.train_step(trainable, frozen, opt_state, batch, jax.random.fold_in(rng, i))
        loss = float(m["loss"])
        yield loss, time.perf_counter() - t, time.process_time() - c, b


def run_sft_jax(model_dir, batches, *, lora, lora_init, lr, steps, seed, policy=None, step_opts=None) -> dict:
    """Train `steps` steps on `batches` (sft_jax batch dicts) with sft_jax's own train step."""
    state = setup_sft_jax(model_dir, batch_size=batches[0]["inputs"].shape[0], lora=lora, lora_init=lora_init,
                          lr=lr, steps=steps, seed=seed, policy=policy, step_opts=step_opts)
    losses, wall, cpu = [], [], []
    for loss, w, c, _ in sft_jax_steps(*state, batches[:steps], seed=seed):
        losses.append(loss)
        wall.append(w)
        cpu.append(c)
    return {"first_step_s": wall[0], "step_s": wall[1:], "cpu_s": cpu[1:], "losses": losses}


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------
def summarize(res: dict, tokens: list[int], flops: list[float], peak: float) -> dict:
    if "error" in res:
        return res
    # steady state: steps 2..N (the first one carries compilation / warm-up)
    st = res["step_s"]
    tok_s = sum(tokens[1 : 1 + len(st)]) / sum(st) if st else float("nan")
    fl_s = sum(flops[1 : 1 + len(st)]) / sum(st) if st else float("nan")
    return {
        **res,
        "tokens_per_s": tok_s,
        "model_flops_per_s": fl_s,
        "peak_fraction": fl_s / peak,
        "median_step_s": statistics.median(st) if st else float("nan"),
    }


def uptime_load() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0:3].__str__()
    except OSError:
        return "?"


def machine_info() -> dict:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import jax
    import peft
    import torch
    import transformers
    import trl

    return {
        "nproc": NPROC,
        "cpu": cpu,
        "python": platform.python_version(),
        "jax": jax.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "peft": peft.__version__,
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "loadavg_start": uptime_load(),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps/repetitions (< 15 min on 2 cores)")
    ap.add_argument("--toy", action="store_true", help="toy model and data: a correctness run for tests")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--sizes", default=None, help="comma list of " + ",".join(SIZES))
    ap.add_argument("--modes", default="lora,full")
    ap.add_argument("--layouts", default=None, help="TRL batch layouts: flat,accum")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--max-length", type=int, default=None)
    ap.add_argument("--lr-lora", type=float, default=None, help="default 1e-3 (toy: 1e-2)")
    ap.add_argument("--lr-full", type=float, default=None, help="default 3e-4 (toy: 3e-3)")
    ap.add_argument("--sides", default="trl,sft_jax")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--precisions", default="f32", help="comma list of f32,bf16 (bf16: TRL bf16=True autocast, "
                    "sft_jax model.dtype=bfloat16 with float32 params; ratio to the bf16 matmul peak)")
    ap.add_argument("--jax-policy", default="", help="extra sft_jax model policy, e.g. scan_layers=1,remat=full,"
                    "attention=dense,attention_block=64")
    ap.add_argument("--jax-micro", default="1", help="sft_jax gradient-accumulation micro-batches per step; a "
                    "comma list runs one sft_jax side per value (the first is the 'sft_jax' column, the others "
                    "'sft_jax:mN', listed under the table)")
    a = ap.parse_args(argv)

    if a.toy:
        sizes, steps, reps, B, T, n_ex = ["toy"], 6, 1, 4, 128, 120
        layouts = ["flat"]
        a.lr_lora = a.lr_lora or 1e-2
        a.lr_full = a.lr_full or 3e-3
    elif a.quick:
        sizes, steps, reps, B, T, n_ex = ["small", "medium"], 6, 1, 8, 512, None
        layouts = ["flat", "accum"]
    else:
        sizes, steps, reps, B, T, n_ex = ["small", "medium"], 10, 3, 8, 512, None
        layouts = ["flat", "accum"]
    sizes = a.sizes.split(",") if a.sizes else sizes
    steps = a.steps or steps
    reps = a.reps or reps
    B = a.batch or B
    T = a.max_length or T
    layouts = a.layouts.split(",") if a.layouts else layouts
    a.lr_lora = a.lr_lora or 1e-3
    a.lr_full = a.lr_full or 3e-4
    modes = a.modes.split(",")
    sides = a.sides.split(",")
    precisions = a.precisions.split(",")
    micros = [int(m) for m in a.jax_micro.split(",")]
    jax_sides = {"sft_jax": micros[0], **{f"sft_jax:m{m}": m for m in micros[1:]}}
    jax_policy = {}
    for kv in filter(None, a.jax_policy.split(",")):
        k, v = kv.split("=")
        jax_policy[k] = bool(int(v)) if k == "scan_layers" else int(v) if v.isdigit() else v

    info = machine_info()
    log(f"# bench/vs_trl.py {' '.join(sys.argv[1:])}")
    log(f"# machine: nproc={info['nproc']} cpu={info['cpu']} load(1,5,15m)={info['loadavg_start']}")
    log(
        f"# versions: jax {info['jax']} torch {info['torch']} transformers {info['transformers']} "
        f"trl {info['trl']} peft {info['peft']}  date {info['date_utc']}"
    )
    peak = measure_matmul_peak(512 if a.toy else 2048)
    log(
        f"# JAX matmul peak (2048^2 f32): {peak['float32'] / 1e9:.1f} GFLOP/s"
        f"   (bf16 in, f32 acc: {peak['bfloat16'] / 1e9:.1f} GFLOP/s)"
    )
    why_not = sft_jax_available() if "sft_jax" in sides else "not requested"
    if why_not:
        log(f"# sft_jax side unavailable: {why_not}")
    if jax_policy:
        log(f"# sft_jax policy: {jax_policy}")
    if micros != [1]:
        log(f"# sft_jax micro-batches per step: {jax_sides}")

    convs, source = load_conversations(n_ex, seed=a.seed)
    log(f"# data: {source}, {len(convs)} conversations; B={B} rows x T={T}, {steps} steps, {reps} reps")
    results = {"machine": info, "peak_flops": peak, "data": source, "B": B, "T": T, "steps": steps,
               "reps": reps, "peak_samples": [dict(peak)], "jax_policy": jax_policy, "jax_micro": jax_sides, "argv": sys.argv[1:], "rows": []}
    work = Path(tempfile.mkdtemp(prefix="bench_vs_trl_"))
    for size_name in sizes:
        size = SIZES[size_name]
        tok = build_tokenizer(convs, size["vocab"], work / f"tok_{size_name}")
        mdir = work / f"model_{size_name}"
        minfo = build_model(size, tok, mdir, T, seed=a.seed)
        log(
            f"\n## model {size_name}: {minfo['params'] / 1e6:.2f}M params "
            f"(matmul N={matmul_params(size) / 1e6:.2f}M, LoRA r16 {lora_params(size) / 1e6:.2f}M), "
            f"D={size['hidden']} L={size['layers']} H={size['heads']} KV={size['kv']} I={size['inter']} "
            f"V={size['vocab']}{' tied embeddings' if size.get('tied') else ''}"
        )
        if not why_not:
            log("# " + tokenization_check(tok, convs[:200]))
        size_modes = [m for m in modes if m in size.get("modes", modes)]
        if size_modes != modes:
            log(f"# {size_name}: modes {size_modes} only (of {modes})")
        for mode, prec in [(m, p) for p in precisions for m in size_modes]:
            lora = mode == "lora"
            lr = a.lr_lora if lora else a.lr_full
            bf16 = prec == "bf16"
            pk = peak["bfloat16" if bf16 else "float32"]
            policy = dict(jax_policy, dtype="bfloat16" if bf16 else "float32")
            again = measure_matmul_peak(512 if a.toy else 2048)
            results["peak_samples"].append(again)
            for kk in peak:
                peak[kk] = max(peak[kk], again[kk])
            sides_here = [f"trl:{lay}" for lay in layouts if "trl" in sides] + (
                list(jax_sides) if "sft_jax" in sides else [])
            runs = {k: [] for k in sides_here}
            batches = None
            for rep in range(reps):
                trainers = {}
                for lay in layouts if "trl" in sides else ["flat"]:
                    trainers[lay] = make_trl_trainer(
                        mdir, tok, convs, lora=lora, B=B, T=T, lr=lr, steps=steps, layout=lay,
                        seed=a.seed, out_dir=work / "trl_out", bf16=bf16,
                    )
                first = next(iter(trainers.values()))[0]
                if batches is None:
                    rows = trl_rows(first, B * steps)
                    bs = [rows_to_batch(rows[i * B : (i + 1) * B], T) for i in range(steps)]
                    batches = [b for b, _ in bs]
                    seg_lens = [s for _, s in bs]
                    tokens = [sum(s) for s in seg_lens]
                    flops = [step_flops(size, s, lora) for s in seg_lens]
                    log(
                        f"### {mode} {prec} (lr {lr}): real tokens/step {statistics.mean(tokens):.0f} of {B * T} "
                        f"slots ({statistics.mean(tokens) / (B * T):.1%}), model GFLOP/step "
                        f"{statistics.mean(flops) / 1e9:.1f}; load {uptime_load()}"
                    )
                lora_init = peft_lora_state(first) if lora else None
                order = list(sides_here) if rep % 2 == 0 else list(reversed(sides_here))
                for side in order:
                    if side.startswith("trl:"):
                        trainer, clock = trainers[side[4:]]
                        r = run_trl(trainer, clock, steps, B)
                    elif why_not:
                        r = {"error": why_not}
                    else:
                        from sft_jax import train_step as ts

                        r = run_sft_jax(mdir, batches, lora=lora, lora_init=lora_init, lr=lr, steps=steps,
                                        seed=a.seed, policy=policy,
                                        step_opts=ts.StepOptions(micro_batches=jax_sides[side]))
                    r = summarize(r, tokens, flops, pk)
                    runs[side].append(r)
                    if "error" not in r:
                        log(
                            f"  rep {rep} {side:10s} first step {r['first_step_s']:7.2f}s  "
                            f"steady {r['tokens_per_s']:8.0f} tok/s  "
                            f"{r['model_flops_per_s'] / 1e9:6.1f} GFLOP/s ({r['peak_fraction']:.1%} of {prec} peak)  "
                            f"loss {r['losses'][0]:.5f} -> {r['losses'][-1]:.5f}  load {uptime_load()}"
                        )
                del trainers, first
            row = {"size": size_name, "params": minfo["params"], "mode": mode, "precision": prec, "lr": lr,
                   "tokens_per_step": tokens, "flops_per_step": flops, "runs": runs}
            for side in sides_here:
                ok = [r for r in runs[side] if "error" not in r]
                if ok:
                    row[side] = {
                        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in ok),
                        "first_step_s": statistics.median(r["first_step_s"] for r in ok),
                        "peak_fraction": statistics.median(r["peak_fraction"] for r in ok),
                        "losses": ok[0]["losses"],
                    }
            trl_keys = [k for k in sides_here if k.startswith("trl:") and k in row]
            if trl_keys:
                row["trl_best"] = max(trl_keys, key=lambda k: row[k]["tokens_per_s"])
            if trl_keys and "sft_jax" in row:
                best = row[row["trl_best"]]
                row["speedup"] = row["sft_jax"]["tokens_per_s"] / best["tokens_per_s"]
                lt, lj = best["losses"], row["sft_jax"]["losses"]
                row["loss_abs_diff"] = [abs(x - y) for x, y in zip(lt, lj)]
            results["rows"].append(row)
    again = measure_matmul_peak(512 if a.toy else 2048)
    results["peak_samples"].append(again)
    for kk in peak:
        peak[kk] = max(peak[kk], again[kk])
    # %peak against the highest peak seen during the run (a conservative denominator on a shared machine)
    for row in results["rows"]:
        pk = peak["bfloat16" if row["precision"] == "bf16" else "float32"]
        for side, rs in row["runs"].items():
            for r in rs:
                if "model_flops_per_s" in r:
                    r["peak_fraction"] = r["model_flops_per_s"] / pk
            ok = [r for r in rs if "error" not in r]
            if ok:
                row[side]["peak_fraction"] = statistics.median(r["peak_fraction"] for r in ok)
    results["machine"]["loadavg_end"] = uptime_load()
    print_table(results)
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=1))
        log(f"# wrote {a.out}")
    return results


def print_table(results: dict):
    pk = results["peak_flops"]
    log(
        f"\n# summary: median over {results['reps']} reps; tok/s = real tokens/s over steps 2..{results['steps']}; "
        f"%pk = model FLOP/s / highest JAX matmul peak of the row's precision measured in this run ({len(results['peak_samples'])} samples; f32 {pk['float32'] / 1e9:.1f}, "
        f"bf16 {pk['bfloat16'] / 1e9:.1f} GFLOP/s); ratio = sft_jax / best TRL layout; "
        f"load start {results['machine']['loadavg_start']} end {results['machine']['loadavg_end']}"
    )
    log(
        f"{'model':7s} {'mode':5s} {'prec':4s} {'TRL flat':>9s} {'TRL accum':>9s} {'sft_jax':>9s} {'ratio':>6s} "
        f"{'TRL 1st':>8s} {'jax 1st':>8s} {'TRL %pk':>7s} {'jax %pk':>7s} "
        f"{'TRL loss1':>9s} {'jax loss1':>9s} {'TRL lossN':>9s} {'jax lossN':>9s} {'max|dL|':>8s}"
    )
    nan = float("nan")
    for row in results["rows"]:
        best = row.get(row.get("trl_best", ""), {})
        jx = row.get("sft_jax", {})

        def tps(k):
            v = row.get(k, {}).get("tokens_per_s")
            return f"{v:9.0f}" if v is not None else f"{'-':>9s}"

        lt = best.get("losses") or [nan]
        lj = jx.get("losses") or [nan]
        log(
            f"{row['size']:7s} {row['mode']:5s} {row['precision']:4s} {tps('trl:flat')} {tps('trl:accum')} "
            f"{tps('sft_jax')} {row.get('speedup', nan):6.2f} "
            f"{best.get('first_step_s', nan):7.2f}s {jx.get('first_step_s', nan):7.2f}s "
            f"{100 * best.get('peak_fraction', nan):6.1f}% {100 * jx.get('peak_fraction', nan):6.1f}% "
            f"{lt[0]:9.5f} {lj[0]:9.5f} {lt[-1]:9.5f} {lj[-1]:9.5f} {max(row.get('loss_abs_diff') or [nan]):8.1e}"
        )
    log("(TRL columns other than tok/s are for the faster TRL layout: " + ", ".join(
        f"{r['size']}/{r['mode']}/{r['precision']}: {r.get('trl_best', '-')}" for r in results["rows"]) + ")")
    extra = [k for k in results.get("jax_micro", {}) if k != "sft_jax"]
    for row in results["rows"]:
        best = row.get(row.get("trl_best", ""), {})
        for k in extra:
            if k in row:
                v = row[k]
                log(f"{row['size']:7s} {row['mode']:5s} {row['precision']:4s} {k} ({results['jax_micro'][k]} "
                    f"micro-batches): {v['tokens_per_s']:.0f} tok/s, ratio to best TRL "
                    f"{v['tokens_per_s'] / best.get('tokens_per_s', nan):.2f}, {100 * v['peak_fraction']:.1f}% pk, "
                    f"vs 'sft_jax' {v['tokens_per_s'] / row['sft_jax']['tokens_per_s']:.2f}x, lossN {v['losses'][-1]:.5f}")


if __name__ == "__main__":
    main()
