"""The one configuration schema shared by every `configs/*.py` and every CLI.

Configs follow the flax/examples convention: a python file with `get_config()`
returning an `ml_collections.ConfigDict`, overridden on the command line with
`--config.section.field=value`.  `default_config()` below is the schema: every
field that exists, with its type and default.  `validate(cfg)` rejects unknown
fields, wrong types and bad values *before* anything expensive happens.
"""

from __future__ import annotations

from typing import Any

import ml_collections

# Allowed values for enumerated fields.  Used by validate().
CHOICES: dict[str, tuple[Any, ...]] = {
    "data.format": ("auto", "alpaca", "sharegpt", "messages", "prompt_completion"),
    "data.truncation": ("truncate", "drop"),
    "data.train_on": ("all_assistant", "last_assistant", "all"),
    "data.packer": ("first_fit", "best_fit"),
    "data.reasoning": ("keep", "drop"),
    "train.schedule": ("constant", "linear", "cosine"),
    "model.dtype": ("float32", "bfloat16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.remat": ("none", "full", "save_dots"),
    "model.attention": ("flash", "dense", "pallas"),
    "model.kernels": ("auto", "reference", "cpu", "tokamax"),
    "peft.method": ("full", "lora", "qlora", "dora", "pissa", "qdora", "prompt_tuning", "p_tuning", "prefix_tuning", "ia3", "bitfit", "bottleneck"),  # the names of sft_jax.peft.METHODS (a test keeps them equal)
    "checkpoint.resume": ("auto", "none"),
    "model.init": ("pretrained", "tiny"),
    "peft.qlora.quant_type": ("nf4", "int8"),
    "peft.prompt_tuning.init_from": ("random", "vocab", "text"),
    "peft.bottleneck.style": ("houlsby", "pfeiffer"),
    "peft.bottleneck.activation": ("auto", "relu", "silu", "gelu", "tanh"),
    "peft.qlora.block_size": (32, 64, 128, 256, 512, 1024, 2048, 4096),
}


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    # ---------------------------------------------------------------- model
    c.model = ml_collections.ConfigDict()
    c.model.init = "pretrained"  # "pretrained": load model.path; "tiny": the project's own small model
    c.model.path = ""  # a Hugging Face directory (config.json + safetensors)
    c.model.dtype = "float32"  # compute dtype
    c.model.param_dtype = "float32"  # dtype of the (frozen) base weights
    c.model.scan_layers = False
    c.model.remat = "none"
    c.model.attention = "flash"  # training-path attention: flash (block-sparse) | dense (reference) | pallas (GPU kernel)
    c.model.attention_block = 0  # flash block size; 0 = auto
    c.model.kernels = "auto"  # op implementations (sft_jax/kernels): auto | reference | cpu | tokamax
    # Used only when model.path is empty: a small Llama built by the project.
    c.model.tiny = ml_collections.ConfigDict()
    c.model.tiny.hidden_size = 128
    c.model.tiny.intermediate_size = 344
    c.model.tiny.num_layers = 4
    c.model.tiny.num_heads = 4
    c.model.tiny.num_kv_heads = 2
    c.model.tiny.vocab_size = 512
    c.model.tiny.max_position_embeddings = 512
    c.model.tiny.train_rows = 4000  # generated training rows of the tiny tasks (the held-out set: 200)

    # ----------------------------------------------------------------- data
    c.data = ml_collections.ConfigDict()
    c.data.path = ""  # file, comma-separated files, or directory; "" = tiny generated tasks
    c.data.format = "auto"
    c.data.weights = ""  # comma-separated mixing weights, one per path in data.path ("" = concatenate)
    c.data.template = ""  # "" = the tokenizer's own chat_template; else a built-in name (chatml, llama3, ...)
    c.data.tokenizer = ""  # tokenizer directory; "" = model.path (or the tiny built one)
    c.data.max_length = 512
    c.data.packing = True
    c.data.packer = "first_fit"
    c.data.truncation = "truncate"
    c.data.train_on = "all_assistant"
    c.data.max_skip_fraction = 0.5
    c.data.eval_fraction = 0.05  # held-out split taken from the training rows (seeded)
    c.data.eval_path = ""  # explicit held-out file(s); overrides eval_fraction
    c.data.num_workers = 0  # grain worker processes for tokenization (0 = in process)
    c.data.shuffle = True
    c.data.system_prompt = ""  # default system prompt when a row has none ("" = none)
    # (data, issue 4) add a built-in template's missing marker tokens (<|im_start|>, ...) to the
    # tokenizer as special tokens; the model vocab must then be resized to len(tokenizer).
    # False = markers tokenize as plain text pieces (stories260K's 512-piece vocab stays as is).
    c.data.add_template_tokens = True
    # (data, issue 22) column mapping "field:column,..." for non-standard names, e.g.
    # "instruction:question,output:answer" (the instruction is read from column "question").
    c.data.columns = ""
    c.data.reasoning = "keep"  # keep | drop the assistant's reasoning_content / <think> block
    # (reliability, issue 19) a row with nothing right to train on (no assistant turn, not ending on
    # one, an empty assistant turn) is an error naming file:line instead of a counted skip
    c.data.strict = False
    # read sources lazily (JSONL line offsets, Parquet row groups, memory-mapped Arrow) instead of
    # whole; rows are then validated when reached and shuffled by blocks (see shuffle_window)
    c.data.streaming = False
    c.data.shuffle_window = 16  # streaming: blocks (row groups / 1024-row chunks) shuffled together
    # where this config's data come from: the error shown when data.path is empty (the shipped LIMA /
    # alpaca configs leave data.path to the user and say here where to get the data)
    c.data.source_help = ""

    # ---------------------------------------------------------------- train
    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 8  # global sequences per optimizer step
    c.train.micro_batches = 1  # gradient accumulation micro-batches per step
    c.train.steps = 0  # 0 = derive from epochs
    c.train.epochs = 1
    c.train.lr = 1e-4
    c.train.end_lr = 0.0  # floor of linear/cosine decay
    c.train.schedule = "cosine"
    c.train.warmup_steps = 0
    c.train.b1 = 0.9
    c.train.b2 = 0.999
    c.train.eps = 1e-8
    c.train.weight_decay = 0.0
    c.train.grad_clip = 1.0  # global-norm clip; 0 = off
    c.train.seed = 0
    c.train.z_loss = 0.0
    c.train.loss_chunk_size = 0  # >0: chunked cross-entropy over the sequence (large vocabularies)
    c.train.peak_flops = 0.0  # per-device peak FLOP/s for MFU; 0 = from the device-kind table
    c.train.log_every = 10  # metrics are fetched from the device every N steps (one row per step all the same)
    # early stopping on an evaluation metric (counted in evaluations; needs eval.every_steps or eval.every_epoch)
    c.train.early_stopping = ml_collections.ConfigDict()
    c.train.early_stopping.patience = 0  # stop after this many evaluations without improvement; 0 = off
    c.train.early_stopping.min_delta = 0.0  # an improvement must beat the best value by more than this
    c.train.early_stopping.metric = "loss"  # eval metric: loss | accuracy | exact_match | NAME/loss ...
    # loss-spike guard beside the non-finite stop: stop when a step's loss > factor x the running median
    c.train.loss_spike = ml_collections.ConfigDict()
    c.train.loss_spike.factor = 0.0  # 0 = off; e.g. 3.0
    c.train.loss_spike.window = 100  # steps in the running median (the guard starts once it is full)

    # ----------------------------------------------------------------- peft
    # The fine-tuning method (sft_jax/peft: one module per method) and one sub-section per method.
    c.peft = ml_collections.ConfigDict()
    c.peft.method = "full"
    c.peft.lora = ml_collections.ConfigDict()
    c.peft.lora.rank = 16
    c.peft.lora.alpha = 16.0
    c.peft.lora.dropout = 0.0
    c.peft.lora.rslora = False  # rsLoRA: scale alpha / sqrt(rank) instead of alpha / rank
    c.peft.lora.targets = "all-linear"  # "all-linear", a comma list (q_proj,v_proj) or a regex over module paths
    # QLoRA: the frozen base quantised as bitsandbytes does; the adapter is peft.lora's
    c.peft.qlora = ml_collections.ConfigDict()
    c.peft.qlora.quant_type = "nf4"  # nf4 (4-bit NormalFloat) | int8 (LLM.int8 row-wise weights)
    c.peft.qlora.double_quant = True  # nf4: block scales quantised to 8 bits (bnb_4bit_use_double_quant)
    c.peft.qlora.block_size = 64  # nf4 block (bitsandbytes' 4-bit base in transformers uses 64)
    # dora: DoRA on peft.lora's fields (no fields of its own); qdora: DoRA on the peft.qlora base; pissa: LoRA (peft.lora) with PiSSA's init
    c.peft.pissa = ml_collections.ConfigDict()
    c.peft.pissa.niter = 0  # 0: exact SVD; K > 0: randomised SVD with K subspace iterations (peft's pissa_niter_K)
    # prompt learning (peft/prompt_tuning.py, p_tuning.py, prefix_tuning.py)
    c.peft.prompt_tuning = ml_collections.ConfigDict()
    c.peft.prompt_tuning.num_virtual_tokens = 20
    c.peft.prompt_tuning.init_from = "random"  # random (N(0,1)) | vocab (sampled token embeddings) | text (init_text's tokens)
    c.peft.prompt_tuning.init_text = ""  # peft's prompt_tuning_init_text (init=text)
    c.peft.p_tuning = ml_collections.ConfigDict()
    c.peft.p_tuning.num_virtual_tokens = 20
    c.peft.p_tuning.encoder_hidden_size = 0  # MLP encoder width; 0 = the model's hidden size (peft's default)
    c.peft.prefix_tuning = ml_collections.ConfigDict()
    c.peft.prefix_tuning.num_virtual_tokens = 20
    c.peft.prefix_tuning.projection = False  # True: reparametrising MLP (peft's prefix_projection); False: P-tuning v2
    c.peft.prefix_tuning.encoder_hidden_size = 0  # projection MLP width; 0 = num_kv_heads * head_dim (peft's default)
    # IA3: learned scaling vectors (peft's IA3Config; Llama defaults)
    c.peft.ia3 = ml_collections.ConfigDict()
    c.peft.ia3.targets = "k_proj,v_proj,down_proj"  # modules scaled (the lora targets syntax)
    c.peft.ia3.feedforward = "down_proj"  # of those, the ones whose input (not output) is scaled; "" = none
    # BitFit: only biases train (the base's where it has one, else zero-initialised)
    c.peft.bitfit = ml_collections.ConfigDict()
    c.peft.bitfit.targets = "all-linear"  # projections with a trained bias (the lora targets syntax)
    # bottleneck adapters (peft/bottleneck.py), AdapterHub's DoubleSeqBn (houlsby) / SeqBn (pfeiffer) placement
    c.peft.bottleneck = ml_collections.ConfigDict()
    c.peft.bottleneck.style = "houlsby"  # houlsby: after attention and MLP | pfeiffer: after the MLP only
    c.peft.bottleneck.size = 0  # bottleneck width m; 0 = hidden_size // reduction_factor
    c.peft.bottleneck.reduction_factor = 16.0  # AdapterHub's default for both styles
    c.peft.bottleneck.activation = "auto"  # auto = the style's AdapterHub default (houlsby silu, pfeiffer relu)

    # -------------------------------------------------------------- neftune
    c.neftune = ml_collections.ConfigDict()
    c.neftune.alpha = 0.0

    # ----------------------------------------------------------------- mesh
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1

    # ----------------------------------------------------------- checkpoint
    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 0  # 0 = only at the end
    c.checkpoint.keep = 2
    c.checkpoint.resume = "auto"
    c.checkpoint.async_save = True
    c.checkpoint.keep_best = False  # keep the best-eval checkpoint (train.early_stopping.metric) in checkpoint_best/
    # resuming with changed model / peft / data / train.batch_size fields: refused unless True
    c.checkpoint.allow_config_change = False

    # ----------------------------------------------------------------- eval
    c.eval = ml_collections.ConfigDict()
    c.eval.every_steps = 0  # 0 = only at the start and the end
    c.eval.every_epoch = False  # also evaluate at the end of every epoch
    c.eval.max_batches = 0  # 0 = the whole held-out split
    c.eval.num_generations = 3  # sample generations printed at each evaluation
    c.eval.max_new_tokens = 64

    return c


def _flatten(cfg: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, ml_collections.ConfigDict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


class ConfigError(ValueError):
    """A configuration that cannot be run; the message (one line) says which field and why."""


# Numeric fields and the values they must take ("> 0", ">= 0", "[0, 1)"); checked by validate().
BOUNDS: dict[str, str] = {
    "train.lr": "> 0", "train.eps": ">= 0", "train.b1": "[0, 1)", "train.b2": "[0, 1)",
    "train.steps": ">= 0", "train.epochs": ">= 0", "train.warmup_steps": ">= 0", "train.end_lr": ">= 0",
    "train.weight_decay": ">= 0", "train.grad_clip": ">= 0", "train.z_loss": ">= 0",
    "train.loss_chunk_size": ">= 0", "train.peak_flops": ">= 0",
    "data.eval_fraction": "[0, 1)", "data.num_workers": ">= 0",
    "checkpoint.keep": "> 0", "checkpoint.every_steps": ">= 0",
    "eval.every_steps": ">= 0", "eval.max_batches": ">= 0", "eval.num_generations": ">= 0",
    "eval.max_new_tokens": "> 0",
    "model.attention_block": ">= 0", "neftune.alpha": ">= 0", "train.log_every": "> 0",
    "train.early_stopping.patience": ">= 0", "train.early_stopping.min_delta": ">= 0",
    "train.loss_spike.factor": ">= 0", "train.loss_spike.window": "> 0",
    "peft.bottleneck.size": ">= 0", "peft.bottleneck.reduction_factor": "> 0",
    **{f"model.tiny.{k}": "> 0" for k in ("hidden_size", "intermediate_size", "num_layers", "num_heads",
                                           "num_kv_heads", "vocab_size", "max_position_embeddings",
                                           "train_rows")},
}


def _value_problems(given: dict[str, Any]) -> list[str]:
    """Values of well-typed fields that cannot be right: out of BOUNDS, or inconsistent together."""
    ok = {"> 0": lambda v: v > 0, ">= 0": lambda v: v >= 0, "[0, 1)": lambda v: 0 <= v < 1}
    problems = [f"config field '{k}' must be {b.replace('[', 'in [')}, got {given[k]}"
                for k, b in BOUNDS.items() if k in given and not ok[b](given[k])]
    if given["train.schedule"] != "constant" and given["train.end_lr"] > given["train.lr"] > 0:
        problems.append(f"config field 'train.end_lr' = {given['train.end_lr']} is above train.lr = "
                        f"{given['train.lr']} (the floor the {given['train.schedule']} schedule decays to)")
    if 0 < given["train.loss_spike.factor"] <= 1:
        problems.append(f"config field 'train.loss_spike.factor' must be > 1 (or 0 = off), got "
                        f"{given['train.loss_spike.factor']}")
    if given["train.early_stopping.patience"] and not (given["eval.every_steps"] or given["eval.every_epoch"]):
        problems.append("config field 'train.early_stopping.patience' needs evaluations during training: set "
                        "eval.every_steps > 0 or eval.every_epoch=True")
    if given["model.init"] == "tiny" and not problems:
        heads, kv, hidden = (given[f"model.tiny.{k}"] for k in ("num_heads", "num_kv_heads", "hidden_size"))
        if heads % kv:
            problems.append(f"config field 'model.tiny.num_heads' = {heads} is not a multiple of "
                            f"model.tiny.num_kv_heads = {kv}")
        if hidden % heads:
            problems.append(f"config field 'model.tiny.hidden_size' = {hidden} is not a multiple of "
                            f"model.tiny.num_heads = {heads}")
    return problems


def validate(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Check `cfg` against the schema: unknown fields, types, enumerated values and values that
    cannot be right (BOUNDS, and fields inconsistent together); ConfigError, one line."""
    schema = _flatten(default_config())
    given = _flatten(cfg)
    problems: list[str] = []
    for key in sorted(set(given) - set(schema)):
        close = [k for k in schema if k.split(".")[-1] == key.split(".")[-1]]
        hint = f" (did you mean {close[0]}?)" if close else ""
        problems.append(f"unknown config field '{key}'{hint}")
    for key, default in schema.items():
        if key not in given:
            problems.append(f"missing config field '{key}'")
            continue
        val = given[key]
        if isinstance(default, bool):
            ok = isinstance(val, bool)
        elif isinstance(default, int):
            ok = isinstance(val, int) and not isinstance(val, bool)
        elif isinstance(default, float):
            ok = isinstance(val, (int, float)) and not isinstance(val, bool)
        elif isinstance(default, str):
            ok = isinstance(val, str)
        else:
            ok = True
        if not ok:
            problems.append(
                f"config field '{key}' must be {type(default).__name__}, got {type(val).__name__} {val!r}"
            )
        elif key in CHOICES and val not in CHOICES[key]:
            problems.append(f"config field '{key}' = {val!r} is not one of {list(CHOICES[key])}")
    if not problems:
        for key in ("train.batch_size", "train.micro_batches", "data.max_length", "data.shuffle_window"):
            if given[key] <= 0:
                problems.append(f"config field '{key}' must be > 0, got {given[key]}")
        if given["train.batch_size"] % max(given["train.micro_batches"], 1):
            problems.append(
                f"train.batch_size={given['train.batch_size']} is not divisible by "
                f"train.micro_batches={given['train.micro_batches']}"
            )
        if given["peft.lora.rank"] <= 0:
            problems.append(f"config field 'peft.lora.rank' must be > 0, got {given['peft.lora.rank']}")
        if not 0.0 <= given["peft.lora.dropout"] < 1.0:
            problems.append(f"config field 'peft.lora.dropout' must be in [0, 1), got {given['peft.lora.dropout']}")
        if given["train.steps"] <= 0 and given["train.epochs"] <= 0:
            problems.append("set train.steps > 0 or train.epochs > 0")
        if not 0.0 <= given["data.max_skip_fraction"] <= 1.0:
            problems.append("config field 'data.max_skip_fraction' must be in [0, 1]")
        problems += _value_problems(given)
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))
    return cfg
