"""llama2.c import of the real pretrained stories260K: exact greedy text, through sft_jax and transformers."""

from __future__ import annotations

import numpy as np
import pytest

from sft_jax.convert import main as convert_main
from sft_jax.models.hf_io import load_hf
from sft_jax.models.llama2c import load_llama2c, read_header
from test_kv_cache import greedy_cached, greedy_full

STEPS = 200
BOS = 1


@pytest.fixture(scope="module")
def assets(shared_dir):
    d = shared_dir / "assets" / "stories260K"
    return d / "stories260K.bin", d / "tok512.model", (d / "expected_greedy_200.txt").read_text()


@pytest.fixture(scope="module")
def converted(assets, tmp_path_factory):
    ckpt, tok, _ = assets
    out = tmp_path_factory.mktemp("stories260K_hf")
    assert convert_main(["llama2c", f"--checkpoint={ckpt}", f"--tokenizer={tok}", f"--out={out}"]) == 0
    return out


@pytest.fixture(scope="module")
def sp(assets):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(assets[1]))


@pytest.fixture(scope="module")
def model(converted):
    return load_hf(str(converted))


def _llama2c_text(sp, tokens):
    """llama2.c run.c stops early if BOS is sampled; its text is the decoded pieces."""
    if BOS in tokens:
        tokens = tokens[: tokens.index(BOS)]
    return sp.decode(tokens)


def test_header_and_config(assets, model):
    h = read_header(str(assets[0]))
    assert h == dict(dim=64, hidden_dim=172, n_layers=5, n_heads=8, n_kv_heads=4, vocab_size=512, seq_len=512)
    config, _ = model
    assert (config.num_layers, config.head_dim, config.tie_embeddings, config.rms_norm_eps) == (5, 8, True, 1e-5)


def test_greedy_no_cache_matches_llama2c(assets, model, sp):
    config, params = model
    toks = greedy_full(params, config, [[BOS]], STEPS, buf_len=STEPS + 8)[0]
    assert _llama2c_text(sp, toks) == assets[2]


def test_greedy_kv_cache_matches_llama2c(assets, model, sp):
    config, params = model
    toks = greedy_cached(params, config, [[BOS]], STEPS, max_len=STEPS + 8)[0]
    assert _llama2c_text(sp, toks) == assets[2]
    # the directly imported params (no HF round trip) give the same tokens
    config2, params2 = load_llama2c(str(assets[0]))
    assert greedy_cached(params2, config2, [[BOS]], STEPS, max_len=STEPS + 8)[0] == toks


def test_transformers_loads_converted_and_generates_same(converted, assets, sp):
    torch = pytest.importorskip("torch")
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    ids = torch.tensor([[BOS]])
    with torch.no_grad():
        out = hf.generate(ids, max_new_tokens=STEPS, do_sample=False, eos_token_id=None, pad_token_id=0)
    toks = out[0, 1:].tolist()
    assert len(toks) == STEPS
    assert _llama2c_text(sp, toks) == assets[2]


def test_autotokenizer_roundtrips_like_sentencepiece(converted, sp, assets):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(converted)
    assert (tok.bos_token_id, tok.eos_token_id, len(tok)) == (1, 2, 512)
    texts = [assets[2], "Hello world\nOnce upon a time", "  two  spaces  ", "a\tb \n c  \n\n d", "\n lead",
             "é ünïcode 日本 🙂", ""]
    for t in texts:
        ids = tok(t)["input_ids"]
        assert ids == [sp.bos_id()] + sp.encode(t), repr(t)
        assert tok.decode(ids, skip_special_tokens=True) == sp.decode(ids), repr(t)


def test_cli_errors_are_one_line(assets, tmp_path, capsys):
    from sft_jax.convert import PROG, run_cli

    args = ["llama2c", "--checkpoint=/no/such.bin", f"--tokenizer={assets[1]}", f"--out={tmp_path}"]
    assert run_cli(convert_main, args, PROG) == 2
    assert capsys.readouterr().err == "error: --checkpoint: file not found: /no/such.bin\n"
    bad = tmp_path / "bad.bin"
    bad.write_bytes(np.array([64, 172, 5, 8, 4, 512, 512], np.int32).tobytes() + b"\0" * 64)
    args = ["llama2c", f"--checkpoint={bad}", f"--tokenizer={assets[1]}", f"--out={tmp_path / 'o'}"]
    assert run_cli(convert_main, args, PROG) == 2  # a malformed checkpoint is bad input
    err = capsys.readouterr().err
    assert "implies" in err and err.startswith("error: ") and err.count("\n") == 1
