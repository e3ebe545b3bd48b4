"""GGUF export: a merged Hugging Face Llama-family directory -> one GGUF file (llama.cpp, Ollama).

    write_gguf(hf_dir, "model-f16.gguf", dtype="f16")   # f32 | f16 | bf16 | q8_0

`hf_dir` is what `python -m sft_jax.export --format=merged` writes (config.json, safetensors,
tokenizer.json, tokenizer_config.json, chat_template.jinja, generation_config.json). The file is
written with the `gguf` package (llama.cpp's own writer) the way llama.cpp's
`convert_hf_to_gguf.py` writes these families, so llama.cpp, Ollama and transformers
(`from_pretrained(dir, gguf_file=...)`) read it:

* architecture: llama (also for mistral, as llama.cpp does), qwen2, qwen3; tensor names from
  `gguf.get_tensor_name_map`; a tied model has no `output.weight`.
* q_proj / k_proj rows of the llama architecture permuted as llama.cpp does (its RoPE pairs
  dimensions (2i, 2i+1) of each head where Hugging Face pairs (i, i + head_dim/2));
  transformers' GGUF loader undoes it.
* hyper-parameters: context length, widths, heads / kv heads, head dim, rms eps, rope theta,
  linear rope scaling (type + factor) and Llama 3 rope scaling (the `rope_freqs` factor tensor).
* tokenizer from tokenizer.json: a sentencepiece-style BPE (Metaspace + byte fallback, e.g.
  stories260K's tok512) as the "llama" vocab (tokens, scores, token types, merges), a byte-level
  BPE as the "gpt2" vocab (tokens, token types, merges, pre-tokenizer name); bos / eos / unk / pad
  ids, add_bos / add_eos, the end-of-turn token of generation_config.json as `eot`, and the chat
  template (transformers' `{% generation %}` markers removed: they mean nothing outside training).
* dtypes: 1-D tensors (norms, biases) stay F32 as in llama.cpp; matrices are F32, F16, BF16 or
  Q8_0 (`gguf.quants`); a matrix whose rows are not a multiple of 32 falls back to F16 under Q8_0,
  as llama.cpp's converter does, and is listed in the returned summary.

Tensors are streamed: one is read, converted and written at a time.
Anything this cannot represent faithfully raises `GGUFExportError` naming the file and field.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Callable

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import LlamaFileType, TokenType
from safetensors import safe_open

from sft_jax.models.config import ModelConfig
from sft_jax.models.hf_io import _weight_files

# --dtype -> (matrix type, general.file_type)
GGUF_DTYPES = {
    "f32": (QT.F32, LlamaFileType.ALL_F32),
    "f16": (QT.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (QT.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (QT.Q8_0, LlamaFileType.MOSTLY_Q8_0),
}

# config.json model_type -> llama.cpp architecture (convert_hf_to_gguf.py registers
# MistralForCausalLM under its LlamaModel).
GGUF_ARCHS = {
    "llama": gguf.MODEL_ARCH.LLAMA,
    "mistral": gguf.MODEL_ARCH.LLAMA,
    "qwen2": gguf.MODEL_ARCH.QWEN2,
    "qwen3": gguf.MODEL_ARCH.QWEN3,
}

# tokenizer.json pre-tokenizer Split regexes -> llama.cpp's `tokenizer.ggml.pre` names
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_BY_SPLIT = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}

_GENERATION_TAG = re.compile(r"{%(-?)\s*(?:end)?generation\s*(-?)%}")
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class GGUFExportError(ValueError):
    """A model directory that cannot be written as GGUF faithfully (names the file and field)."""


@dataclasses.dataclass(frozen=True)
class GGUFSummary:
    """What `write_gguf` wrote."""

    path: str
    arch: str
    dtype: str
    tokenizer_model: str  # "llama" | "gpt2"
    n_tokens: int
    tensor_types: dict  # GGUF tensor name -> GGML type name
    f16_fallback: tuple  # matrices written F16 under q8_0 (rows not a multiple of 32)


@dataclasses.dataclass(frozen=True)
class _Tensor:
    name: str  # GGUF name
    shape: tuple
    qtype: QT
    load: Callable[[], np.ndarray]  # float32, HF layout, llama.cpp's q/k row order


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order: per head, rows (i, i + d/2) become (2i, 2i + 1)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(config: ModelConfig) -> np.ndarray:
    """The `rope_freqs` tensor llama.cpp uses for Llama 3 rope scaling: per frequency, the divisor of
    the unscaled inverse frequency (1 for high frequencies, `factor` for low ones, smooth between)."""
    rs = config.rope_scaling
    dim = config.head_dim
    freqs = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor = float(rs.get("factor", 8.0))
    low, high = float(rs.get("low_freq_factor", 1.0)), float(rs.get("high_freq_factor", 4.0))
    old_ctx = float(rs.get("original_max_position_embeddings", 8192))
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def strip_generation_tags(template: str) -> str:
    """The chat template without transformers' `{% generation %}` / `{% endgeneration %}` markers (a
    training-mask extension other Jinja engines reject); a marker with whitespace control (`{%-`, `-%}`)
    becomes an empty `{{- '' -}}` with the same trimming, so the rendered text is unchanged."""
    def repl(m):
        return f"{{{{{m[1]} '' {m[2]}}}}}" if m[1] or m[2] else ""

    return _GENERATION_TAG.sub(repl, template)


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise GGUFExportError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from e


def _config(hf_dir: str) -> tuple[dict, ModelConfig]:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json in {hf_dir}")
    d = _read_json(path)
    mt = d.get("model_type")
    if mt not in GGUF_ARCHS:
        raise GGUFExportError(f"{path}: model_type {mt!r} (architectures={d.get('architectures')}): GGUF export "
                              f"supports the Llama family only: {', '.join(GGUF_ARCHS)}")
    config = ModelConfig.from_hf(d)
    if config.sliding_window is not None and config.sliding_window < config.max_position_embeddings:
        raise GGUFExportError(f"{path}: sliding_window={config.sliding_window} < max_position_embeddings="
                              f"{config.max_position_embeddings}: llama.cpp's {GGUF_ARCHS[mt].name.lower()} "
                              "architecture attends to the whole context")
    rope = (config.rope_scaling or {}).get("rope_type")
    if rope == "llama3" and GGUF_ARCHS[mt] != gguf.MODEL_ARCH.LLAMA:
        raise GGUFExportError(f"{path}: rope_scaling {config.rope_scaling}: llama3 rope scaling is written for "
                              "the llama architecture only (as llama.cpp's rope_freqs tensor)")
    if rope in ("yarn", "dynamic", "longrope"):
        raise GGUFExportError(f"{path}: rope_scaling type {rope!r} is not written to GGUF by sft_jax (only "
                              "linear and llama3); the merged Hugging Face export keeps it")
    return d, config


def _add_hparams(w: gguf.GGUFWriter, config: ModelConfig, name: str, ftype: LlamaFileType) -> None:
    w.add_name(name)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_heads)
    w.add_head_count_kv(config.num_kv_heads)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_rope_dimension_count(config.head_dim)
    w.add_rope_freq_base(config.rope_theta)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_vocab_size(config.vocab_size)
    w.add_file_type(ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    rs = config.rope_scaling or {}
    if rs.get("rope_type") == "linear":  # llama3 scaling is the rope_freqs tensor
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rs["factor"]))


# ----------------------------------------------------------------------------- tokenizer
def _pre_tokenizer_name(pre: dict | None, path: str) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level BPE's tokenizer.json `pre_tokenizer`."""
    if pre and pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    if pre and pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers", [])
        if (len(parts) == 2 and parts[0].get("type") == "Split" and parts[1].get("type") == "ByteLevel"
                and not parts[1].get("use_regex", True)):
            name = _PRE_BY_SPLIT.get(parts[0].get("pattern", {}).get("Regex"))
            if name:
                return name
    raise GGUFExportError(f"{path}: field pre_tokenizer {json.dumps(pre)[:200]}: not a pre-tokenizer llama.cpp "
                          f"names (GPT-2 byte level, Llama 3 or Qwen2 split)")


def _merge_pairs(merges: list, path: str) -> list[tuple[str, str]]:
    out = []
    for i, m in enumerate(merges):
        pair = tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
        if len(pair) != 2:
            raise GGUFExportError(f"{path}: field model.merges[{i}] = {m!r} is not a pair")
        out.append(pair)
    return out


def _sentencepiece_scores(vocab: dict, merges: list[tuple[str, str]], n: int) -> list[float]:
    """sentencepiece-BPE scores from the merge ranks: a merged piece scores -(first merge making it),
    so llama.cpp's score-ordered merging follows the tokenizer's merge order; the other pieces
    (characters, bytes, specials) score below every merge, as in a sentencepiece model."""
    first = {}
    for rank, (a, b) in enumerate(merges):
        first.setdefault(a + b, rank)
    scores = [-float(len(merges) + i) for i in range(n)]
    for token, i in vocab.items():
        if token in first and i < n:
            scores[i] = -float(first[token])
    return scores


def _add_vocab(w: gguf.GGUFWriter, hf_dir: str, config: ModelConfig) -> tuple[str, int]:
    path = os.path.join(hf_dir, "tokenizer.json")
    if not os.path.isfile(path):
        raise GGUFExportError(f"no tokenizer.json in {hf_dir}: GGUF export needs a fast (tokenizers) tokenizer")
    tj = _read_json(path)
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise GGUFExportError(f"{path}: field model.type = {model.get('type')!r}: only BPE tokenizers are exported")
    pre = tj.get("pre_tokenizer")
    kinds = {pre.get("type")} | {p.get("type") for p in pre.get("pretokenizers", [])} if pre else set()
    if model.get("byte_fallback") and "Metaspace" in kinds:
        kind = "llama"
    elif "ByteLevel" in kinds:
        kind = "gpt2"
    else:
        raise GGUFExportError(f"{path}: field pre_tokenizer {json.dumps(pre)[:200]}: neither a sentencepiece-style "
                              "(Metaspace + byte_fallback) nor a byte-level BPE")

    tc_path = os.path.join(hf_dir, "tokenizer_config.json")
    tc = _read_json(tc_path) if os.path.isfile(tc_path) else {}
    unk = model.get("unk_token") or tc.get("unk_token")
    unk = unk.get("content") if isinstance(unk, dict) else unk

    n = config.vocab_size
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [TokenType.UNUSED] * n
    vocab = dict(model.get("vocab", {}))
    for token, i in vocab.items():
        if i >= n:
            raise GGUFExportError(f"{path}: token {token!r} has id {i} >= the model's vocab_size {n}")
        tokens[i] = token
        if kind == "llama" and _BYTE_TOKEN.fullmatch(token):
            types[i] = TokenType.BYTE
        elif kind == "llama" and token == unk:
            types[i] = TokenType.UNKNOWN
        else:
            types[i] = TokenType.NORMAL
    for at in tj.get("added_tokens", []):
        i = at["id"]
        if i >= n:
            raise GGUFExportError(f"{path}: added token {at['content']!r} has id {i} >= the model's vocab_size {n}")
        tokens[i] = at["content"]
        vocab[at["content"]] = i
        if kind == "llama" and at["content"] == unk:
            types[i] = TokenType.UNKNOWN
        else:
            types[i] = TokenType.CONTROL if at.get("special") else TokenType.USER_DEFINED

    w.add_tokenizer_model(kind)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if kind == "gpt2":
        w.add_tokenizer_pre(_pre_tokenizer_name(pre, path))
    else:
        w.add_tokenizer_pre("default")
        w.add_token_scores(_sentencepiece_scores(vocab, _merge_pairs(model.get("merges", []), path), n))
        if tc.get("add_prefix_space") is not None:
            w.add_add_space_prefix(bool(tc["add_prefix_space"]))
        norms = (tj.get("normalizer") or {}).get("normalizers", [])
        if any(nm.get("type") == "Replace" and nm.get("pattern", {}).get("Regex") == " {2,}" for nm in norms):
            w.add_remove_extra_whitespaces(True)

    # bos/eos/unk/pad ids, add_bos/add_eos, merges and the chat template as llama.cpp's converter reads them
    special = gguf.SpecialVocab(hf_dir, load_merges=True, n_vocab=n)
    if special.chat_template is not None:
        if not isinstance(special.chat_template, str):
            raise GGUFExportError(f"{hf_dir}: several named chat templates; GGUF export writes a single one")
        special.chat_template = strip_generation_tags(special.chat_template)
    special.add_to_gguf(w, quiet=True)
    gen_path = os.path.join(hf_dir, "generation_config.json")
    if os.path.isfile(gen_path):
        eos = _read_json(gen_path).get("eos_token_id")
        eos = eos if isinstance(eos, list) else [eos]
        eot = [i for i in eos if isinstance(i, int) and i != special.special_token_ids.get("eos")]
        if eot:
            w.add_eot_token_id(eot[0])
    return kind, n


# ----------------------------------------------------------------------------- tensors
def _tensor_plan(hf_dir: str, config: ModelConfig, arch, qtype: QT) -> tuple[list[_Tensor], list[str]]:
    files = _weight_files(hf_dir)
    name_map = gguf.get_tensor_name_map(arch, config.num_layers)
    plan, fallback = [], []
    for hf_name, file in files.items():
        if hf_name == "lm_head.weight" and config.tie_embeddings:
            continue  # llama.cpp reads a missing output.weight as tied
        gg = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gg is None:
            raise GGUFExportError(f"{file}: tensor {hf_name!r} has no GGUF {gguf.MODEL_ARCH_NAMES[arch]} name")
        with safe_open(file, framework="numpy") as f:
            shape = tuple(f.get_slice(hf_name).get_shape())
        heads = None
        if arch == gguf.MODEL_ARCH.LLAMA:
            if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
                heads = config.num_heads
            elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
                heads = config.num_kv_heads
        q = QT.F32 if len(shape) <= 1 else qtype
        if q == QT.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[QT.Q8_0][0]:
            q = QT.F16
            fallback.append(gg)

        def load(file=file, hf_name=hf_name, heads=heads):
            with safe_open(file, framework="numpy") as f:
                x = f.get_tensor(hf_name).astype(np.float32)
            return llama_cpp_permute(x, heads) if heads else x

        plan.append(_Tensor(gg, shape, q, load))
    if arch == gguf.MODEL_ARCH.LLAMA and (config.rope_scaling or {}).get("rope_type") == "llama3":
        factors = llama3_rope_factors(config)
        plan.append(_Tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors.shape, QT.F32,
                            lambda factors=factors: factors))
    return plan, fallback


def write_gguf(hf_dir: str, out_path: str, *, dtype: str = "f16", name: str | None = None) -> GGUFSummary:
    """Write the Hugging Face directory `hf_dir` (a Llama / Mistral / Qwen2 / Qwen3 model with a
    tokenizer.json) as the GGUF file `out_path`; `dtype` is one of `GGUF_DTYPES`."""
    if dtype not in GGUF_DTYPES:
        raise GGUFExportError(f"dtype {dtype!r} is not one of {', '.join(GGUF_DTYPES)}")
    qtype, ftype = GGUF_DTYPES[dtype]
    hf, config = _config(hf_dir)
    arch = GGUF_ARCHS[hf["model_type"]]
    plan, fallback = _tensor_plan(hf_dir, config, arch, qtype)

    tmp = out_path + ".partial"  # renamed when complete: a failed export leaves no truncated GGUF
    w = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
    try:
        _add_hparams(w, config, name or os.path.splitext(os.path.basename(out_path))[0], ftype)
        kind, n_tokens = _add_vocab(w, hf_dir, config)
        for t in plan:
            nbytes = math.prod(gguf.quant_shape_to_byte_shape(t.shape, t.qtype))
            w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), nbytes, raw_dtype=t.qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for t in plan:
            w.write_tensor_data(gguf.quants.quantize(t.load(), t.qtype))
        w.close()
    except BaseException:
        w.close()
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, out_path)
    return GGUFSummary(out_path, gguf.MODEL_ARCH_NAMES[arch], dtype, kind, n_tokens,
                       {t.name: t.qtype.name for t in plan}, tuple(fallback))
