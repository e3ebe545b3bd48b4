"""Import of llama2.c checkpoints (Karpathy's legacy `.bin` format, e.g. tinyllamas stories260K).

Format (llama2.c `export.py`, legacy version 0): a header of 7 int32
`(dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len)` — a negative
`vocab_size` means the classifier is stored separately (unshared) — then float32
weights: token embeddings [V, D], attention norms [L, D], wq [L, D, D], wk [L, KVD, D],
wv [L, KVD, D], wo [L, D, D], ffn norms [L, D], w1 [L, H, D], w2 [L, D, H],
w3 [L, H, D], final norm [D], freq_cis real/imag [seq_len, hd/2] each (unused),
then the classifier [V, D] when unshared.  Linear weights are torch `[out, in]`.

llama2.c/Meta use interleaved RoPE pairs; our layout (and Hugging Face's) is
rotate-half, so q and k rows are permuted per head: reshape
(heads, hd/2, 2, D) -> swap the middle axes.  rope_theta 10000, RMSNorm eps 1e-5.
"""

from __future__ import annotations

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np

from sft_jax.models.config import ModelConfig

_HEADER = 7


def read_header(path: str) -> dict:
    with open(path, "rb") as f:
        raw = f.read(_HEADER * 4)
    if len(raw) < _HEADER * 4:
        raise ValueError(f"{path}: too short for a llama2.c checkpoint header")
    dim, hidden, layers, heads, kv_heads, vocab, seq_len = np.frombuffer(raw, np.int32).tolist()
    return dict(dim=dim, hidden_dim=hidden, n_layers=layers, n_heads=heads, n_kv_heads=kv_heads,
                vocab_size=vocab, seq_len=seq_len)


def _permute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Interleaved-pair rows -> rotate-half rows, per head. w [n_heads*hd, D] (torch layout)."""
    out_dim, d = w.shape
    hd = out_dim // n_heads
    return w.reshape(n_heads, hd // 2, 2, d).transpose(0, 2, 1, 3).reshape(out_dim, d)


def load_llama2c(path: str, *, param_dtype: str = "float32", dtype: str = "float32") -> tuple[ModelConfig, dict]:
    """Read a llama2.c legacy `.bin` -> (ModelConfig, params in the sft_jax layout, unscanned)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"llama2.c checkpoint not found: {path}")
    h = read_header(path)
    dim, hidden, L = h["dim"], h["hidden_dim"], h["n_layers"]
    heads, kv_heads, vocab = h["n_heads"], h["n_kv_heads"], h["vocab_size"]
    shared = vocab > 0
    vocab = abs(vocab)
    if min(dim, hidden, L, heads, kv_heads, vocab, h["seq_len"]) <= 0 or dim % heads or heads % kv_heads:
        raise ValueError(f"{path}: implausible llama2.c header {h}")
    hd = dim // heads
    kvd = kv_heads * hd
    data = np.memmap(path, dtype=np.float32, mode="r", offset=_HEADER * 4)
    sizes = [
        ("tok", (vocab, dim)), ("att_norm", (L, dim)), ("wq", (L, dim, dim)), ("wk", (L, kvd, dim)),
        ("wv", (L, kvd, dim)), ("wo", (L, dim, dim)), ("ffn_norm", (L, dim)), ("w1", (L, hidden, dim)),
        ("w2", (L, dim, hidden)), ("w3", (L, hidden, dim)), ("norm", (dim,)),
        ("freq_real", (h["seq_len"], hd // 2)), ("freq_imag", (h["seq_len"], hd // 2)),
    ]
    if not shared:
        sizes.append(("cls", (vocab, dim)))
    need = sum(int(np.prod(s)) for _, s in sizes)
    if data.size != need:
        raise ValueError(
            f"{path}: holds {data.size} float32 values after the header but the header {h} implies {need} "
            "(only the legacy version-0 format is supported)"
        )
    w = {}
    o = 0
    for name, shape in sizes:
        n = int(np.prod(shape))
        w[name] = np.asarray(data[o:o + n]).reshape(shape)
        o += n

    config = ModelConfig(
        model_type="llama", vocab_size=vocab, hidden_size=dim, intermediate_size=hidden, num_layers=L,
        num_heads=heads, num_kv_heads=kv_heads, head_dim=hd, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_embeddings=shared, max_position_embeddings=h["seq_len"], bos_token_id=1, eos_token_id=2,
        pad_token_id=None, dtype=dtype, param_dtype=param_dtype,
    )
    pdt = jnp.dtype(param_dtype)

    def a(x):
        return jnp.asarray(np.ascontiguousarray(x), dtype=pdt)

    params = {"embed": {"embedding": a(w["tok"])}, "final_norm": {"scale": a(w["norm"])}}
    if not shared:
        params["lm_head"] = {"kernel": a(w["cls"].T)}
    for i in range(L):
        params[f"layers_{i}"] = {
            "input_norm": {"scale": a(w["att_norm"][i])},
            "post_attn_norm": {"scale": a(w["ffn_norm"][i])},
            "attn": {
                "q_proj": {"kernel": a(_permute_rope(w["wq"][i], heads).T)},
                "k_proj": {"kernel": a(_permute_rope(w["wk"][i], kv_heads).T)},
                "v_proj": {"kernel": a(w["wv"][i].T)},
                "o_proj": {"kernel": a(w["wo"][i].T)},
            },
            "mlp": {
                "gate_proj": {"kernel": a(w["w1"][i].T)},
                "up_proj": {"kernel": a(w["w3"][i].T)},
                "down_proj": {"kernel": a(w["w2"][i].T)},
            },
        }
    del data
    return config, params


def write_sentencepiece_tokenizer(tokenizer_model: str, out_dir: str, *, model_max_length: int = 2048) -> None:
    """Copy a sentencepiece `.model` as tokenizer.model and write the configs AutoTokenizer needs.

    Then load it with transformers once and `save_pretrained` so a `tokenizer.json` (fast
    tokenizer, with sentencepiece's whitespace normalization) is written too.  (In transformers 5, `LlamaTokenizer(vocab_file=...)` builds an
    empty tokenizer; `AutoTokenizer.from_pretrained(dir)` converts the sentencepiece model.)
    """
    import sentencepiece as spm

    if not os.path.isfile(tokenizer_model):
        raise FileNotFoundError(f"tokenizer model not found: {tokenizer_model}")
    sp = spm.SentencePieceProcessor(model_file=tokenizer_model)
    os.makedirs(out_dir, exist_ok=True)
    shutil.copyfile(tokenizer_model, os.path.join(out_dir, "tokenizer.model"))

    def piece(i):
        return sp.id_to_piece(i) if i >= 0 else None

    cfg = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": piece(sp.bos_id()),
        "eos_token": piece(sp.eos_id()),
        "unk_token": piece(sp.unk_id()),
        "pad_token": piece(sp.pad_id()),
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": True,
        "add_prefix_space": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    special = {k: cfg[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if cfg[k]}
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump(special, f, indent=2)
    _write_fast_tokenizer(tokenizer_model, out_dir)


def _write_fast_tokenizer(tokenizer_model: str, out_dir: str) -> None:
    """Write tokenizer.json reproducing sentencepiece exactly, and point tokenizer_config at it.

    transformers' sentencepiece->tokenizers conversion omits sentencepiece's
    `remove_extra_whitespaces` normalization (strip leading/trailing spaces, collapse runs of
    spaces), so "  a  b" would encode differently; we add it as a normalizer.  `LlamaTokenizer`
    in transformers 5 rebuilds its pipeline and drops a normalizer, so the directory names the
    generic fast class, which loads tokenizer.json as written.
    """
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import Regex, normalizers
    from transformers import AutoTokenizer

    proto = sentencepiece_model_pb2.ModelProto()
    with open(tokenizer_model, "rb") as f:
        proto.ParseFromString(f.read())
    tok = AutoTokenizer.from_pretrained(out_dir)
    if proto.normalizer_spec.remove_extra_whitespaces:
        steps = [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
        if tok.backend_tokenizer.normalizer is not None:
            steps.append(tok.backend_tokenizer.normalizer)
        tok.backend_tokenizer.normalizer = normalizers.Sequence(steps)
    tok.save_pretrained(out_dir)
    path = os.path.join(out_dir, "tokenizer_config.json")
    with open(path) as f:
        cfg = json.load(f)
    for k in ("is_local", "local_files_only"):
        cfg.pop(k, None)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)


def convert_llama2c(checkpoint: str, tokenizer_model: str, out_dir: str, *, dtype: str = "float32") -> ModelConfig:
    """llama2.c `.bin` + sentencepiece `.model` -> a Hugging Face Llama directory."""
    from sft_jax.models.hf_io import save_hf

    config, params = load_llama2c(checkpoint)
    write_sentencepiece_tokenizer(tokenizer_model, out_dir, model_max_length=config.max_position_embeddings)
    save_hf(out_dir, config, params, dtype=dtype)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}, f, indent=2)
    return config
