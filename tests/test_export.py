"""Export: merged HF directory and peft adapter give sft_jax's logits in transformers/peft (<= 1e-4, f32);
peft -> sft_jax -> peft round trip is exact; bad CLI arguments get one line on stderr and exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sft_jax.export import main as export_main
from sft_jax.export import run_cli
from sft_jax.models import llama
from sft_jax.peft import Lora
from sft_jax.peft.lora import adapter_leaves, adapter_to_peft_tensors, target_paths
from sft_jax.workdir import load_run
from test_workdir import make_tiny_run, shared_lora_run

torch = pytest.importorskip("torch")

IDS = np.array([[1, 17, 40, 99, 250, 7, 3, 300, 12, 401, 5, 64], [1, 9, 8, 7, 6, 5, 4, 3, 2, 100, 200, 399]])


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    return shared_lora_run(tmp_path_factory)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    wd = tmp_path_factory.mktemp("wd_full_exp")
    return wd, make_tiny_run(wd, rank=0, steps=2, save_steps=(2,))


def _jax_logits(params, config, method=None, trainable=None):
    if method is None:
        return np.asarray(llama.forward(params, config, jnp.asarray(IDS)))
    return np.asarray(method.forward(trainable, params, config, jnp.asarray(IDS)))


def _hf_logits(model):
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.float().numpy()


def test_merged_export_matches_transformers(lora_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    wd, made = lora_run
    out = tmp_path / "merged"
    assert export_main([f"--workdir={wd}", f"--out={out}", "--format=merged", "--dtype=float32"]) == 0
    ref = _jax_logits(made["base"], made["config"], made["method"], made["trainable"])
    base = _jax_logits(made["base"], made["config"])
    assert np.abs(ref - base).max() > 1e-3  # the adapter visibly changed the model
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    np.testing.assert_allclose(_hf_logits(hf), ref, atol=1e-4, rtol=0)
    gen = json.load(open(out / "generation_config.json"))
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.convert_ids_to_tokens(gen["eos_token_id"]) == ["<|im_end|>", "</s>"]
    assert hf.generation_config.eos_token_id == gen["eos_token_id"]
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert json.load(open(out / "config.json"))["architectures"] == ["LlamaForCausalLM"]
    # generate --model=<export> renders/stops/generates as generate --workdir=<run>
    from sft_jax.generate import load_model_dir, load_workdir

    g_m, g_w = load_model_dir(str(out)), load_workdir(str(wd))
    assert g_m.eos_ids == g_w.eos_ids and g_m.template == g_w.template
    p = g_m.encode_prompt("What is two plus two?", system="Be brief.")
    assert p == g_w.encode_prompt("What is two plus two?", system="Be brief.")
    assert g_m.generate_ids([p], max_new_tokens=12) == g_w.generate_ids([p], max_new_tokens=12)


def test_merged_export_shards_and_bf16(lora_run, tmp_path):
    from sft_jax.models.hf_io import load_hf

    wd, made = lora_run
    out = tmp_path / "sharded"
    assert export_main([f"--workdir={wd}", f"--out={out}", "--format=merged", "--dtype=bfloat16",
                        "--max_shard_mb=0.05"]) == 0
    assert (out / "model.safetensors.index.json").exists()
    config, params = load_hf(str(out))
    run = load_run(wd, load_tokenizer=False)
    want = jax.tree.map(lambda x: np.asarray(x.astype(jnp.bfloat16).astype(jnp.float32)), run.merged_params())
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), b)), params, want))


def test_peft_export_matches_peft_and_round_trips(lora_run, tmp_path):
    from peft import PeftModel
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    wd, made = lora_run
    out = tmp_path / "adapter"
    assert export_main([f"--workdir={wd}", f"--out={out}", "--format=peft", "--dtype=float32"]) == 0
    ac = json.load(open(out / "adapter_config.json"))
    assert (ac["r"], ac["lora_alpha"], ac["use_rslora"], ac["peft_type"], ac["task_type"]) == (4, 8, True, "LORA",
                                                                                              "CAUSAL_LM")
    assert sorted(ac["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj"])
    assert ac["base_model_name_or_path"] == str(wd / "base_model")
    tensors = load_file(str(out / "adapter_model.safetensors"))
    a = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert a.shape == (4, 64) and b.shape == (64, 4)

    base = AutoModelForCausalLM.from_pretrained(wd / "base_model", dtype=torch.float32)
    pm = PeftModel.from_pretrained(base, out).eval()
    ref = _jax_logits(made["base"], made["config"], made["method"], made["trainable"])
    np.testing.assert_allclose(_hf_logits(pm), ref, atol=1e-4, rtol=0)

    # peft -> sft_jax -> peft: identical tensors; the imported tree equals the trained one
    tree, lcfg = Lora.load_peft(str(out), made["base"])
    assert (lcfg.rank, lcfg.alpha, lcfg.rslora, lcfg.scale) == (4, 8.0, True, made["method"].scale)
    assert jax.tree.all(jax.tree.map(lambda x, y: bool(np.array_equal(np.asarray(x), np.asarray(y))), tree,
                                     made["trainable"]))
    again = adapter_to_peft_tensors(tree, made["config"])
    assert sorted(again) == sorted(tensors)
    assert all(np.array_equal(again[k], tensors[k]) for k in tensors)
    # the imported method's targets select exactly the adapted modules
    assert {"/".join(p) for p in target_paths(made["base"], lcfg.targets)} == {"/".join(p) for p, _ in adapter_leaves(tree)}

    # an adapter on some modules of some layers: target_modules becomes an exact regex peft full-matches
    sub = {"layers_1": {"attn": {k: tree["layers_1"]["attn"][k] for k in ("q_proj", "v_proj")}}}
    sub_cfg = Lora(rank=4, alpha=8.0, rslora=True, targets="layers_1/attn/(q|v)_proj")
    sub_cfg.save_peft(str(tmp_path / "sub"), sub, made["base"], made["config"])
    assert json.load(open(tmp_path / "sub" / "adapter_config.json"))["target_modules"].startswith("^(")
    base2 = AutoModelForCausalLM.from_pretrained(wd / "base_model", dtype=torch.float32)
    pm2 = PeftModel.from_pretrained(base2, tmp_path / "sub").eval()
    sub_ref = _jax_logits(made["base"], made["config"], sub_cfg, sub)
    assert np.abs(sub_ref - _jax_logits(made["base"], made["config"])).max() > 1e-3
    np.testing.assert_allclose(_hf_logits(pm2), sub_ref, atol=1e-4, rtol=0)
    sub_back, _ = Lora.load_peft(str(tmp_path / "sub"), made["base"])
    assert jax.tree.all(jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), sub_back, sub))

    # a scanned tree writes the same tensors and reads back stacked
    scanned = {"layers": jax.tree.map(lambda *xs: jnp.stack(xs), tree["layers_0"], tree["layers_1"])}
    sc = adapter_to_peft_tensors(scanned, made["config"].replace(scan_layers=True))
    assert all(np.array_equal(sc[k], tensors[k]) for k in tensors) and sorted(sc) == sorted(tensors)
    tree_s, _ = Lora.load_peft(str(out), made["config"].replace(scan_layers=True))
    assert jax.tree.all(jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), tree_s, scanned))


def test_full_finetune_merged_and_no_peft(full_run, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    wd, made = full_run
    out = tmp_path / "full"
    assert export_main([f"--workdir={wd}", f"--out={out}", "--format=merged", "--dtype=float32"]) == 0
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ref = _jax_logits(made["trainable"], made["config"])
    assert np.abs(ref - _jax_logits(made["base"], made["config"])).max() > 1e-3
    np.testing.assert_allclose(_hf_logits(hf), ref, atol=1e-4, rtol=0)
    capsys.readouterr()
    rc = run_cli(export_main, [f"--workdir={wd}", f"--out={tmp_path / 'p'}", "--format=peft"], "export")
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "no adapter" in err


def test_cli_bad_arguments_one_line(lora_run, tmp_path):
    """Every bad argument: exit code 2 and exactly one line on stderr (subprocesses run in parallel)."""
    wd, _ = lora_run
    nomodel = tmp_path / "empty_model"
    nomodel.mkdir()
    cases = {
        "export missing workdir": ["sft_jax.export", f"--workdir={tmp_path / 'nope'}", f"--out={tmp_path / 'o'}",
                                   "--format=merged"],
        "export step not found": ["sft_jax.export", f"--workdir={wd}", "--step=99", f"--out={tmp_path / 'o'}",
                                  "--format=merged"],
        "export unknown format": ["sft_jax.export", f"--workdir={wd}", f"--out={tmp_path / 'o'}", "--format=onnx"],
        "export missing --out": ["sft_jax.export", f"--workdir={wd}", "--format=merged"],
        "generate neither": ["sft_jax.generate", "--prompt=hi"],
        "generate unreadable model": ["sft_jax.generate", f"--model={nomodel}", "--prompt=hi"],
        "generate step not found": ["sft_jax.generate", f"--workdir={wd}", "--step=99", "--prompt=hi"],
        "generate missing workdir": ["sft_jax.generate", f"--workdir={tmp_path / 'nope'}", "--prompt=hi"],
    }
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    procs = {k: subprocess.Popen([sys.executable, "-m", *v], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, env=env) for k, v in cases.items()}
    errs = {}
    for name, p in procs.items():
        _, err = p.communicate(timeout=120)
        errs[name] = err
        lines = err.strip().splitlines()
        assert p.returncode == 2, (name, p.returncode, err)
        assert len(lines) == 1 and "error:" in lines[0], (name, err)
    assert "step 99 not found" in errs["generate step not found"] and "available: 2, 3" in errs["generate step not found"]
    assert "'onnx'" in errs["export unknown format"]
    assert "exactly one of --model" in errs["generate neither"]
    assert "config.json not found" in errs["generate unreadable model"]
    assert "work directory not found" in errs["export missing workdir"]
