"""Adapter arithmetic (sft_jax.peft.combine) against PEFT's `add_weighted_adapter` on a tiny random HF Llama.

Three LoRA adapters made with PEFT itself (random non-zero A and B; ranks 4, 4, 2; different alphas).
For every combination type: our A/B tensors == PEFT's (f32, <= 1e-5 relative; SVD types: the same up
to each singular vector's sign, which LAPACK may choose differently, and the products B A), and
PeftModel's logits with our combined adapter == with PEFT's (<= 1e-4). DARE: PEFT's masks are torch
random numbers, so both sides get the same deterministic mask (a function of each entry's value)
and everything else (rescaling, sign election, disjoint merge, weights) is compared; density=1 is
compared unpatched. Clamp and the `*_svd` types: PEFT's SVD answered by numpy's (see `numpy_svd`). CLI: one subprocess (cat, PEFT output), the merged export in-process (vs
PEFT's merge_and_unload), a work-directory input (rsLoRA), error cases.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from sft_jax.cli import run_cli
from sft_jax.models import hf_io
from sft_jax.peft import combine as C
from sft_jax.peft import load_peft_adapter
from sft_jax.peft.lora import adapter_leaves, adapter_to_peft_tensors

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDS = np.array([[1, 17, 40, 9, 25, 7, 3, 30, 12, 41, 5, 60], [1, 9, 8, 7, 6, 5, 4, 3, 2, 10, 20, 39]])
TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj", "up_proj"]
SPECS = {"a": dict(r=4, lora_alpha=8, seed=1), "b": dict(r=4, lora_alpha=16, seed=2), "c": dict(r=2, lora_alpha=4, seed=3)}


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _hf(base_dir):
    return transformers.LlamaForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32,
                                                         attn_implementation="eager").eval()


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids)).logits.numpy()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5,
                                   max_position_embeddings=64, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).float()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(5.0 if p.ndim == 2 else 1.0)
    d = tmp_path_factory.mktemp("tiny_llama_combine")
    model.save_pretrained(str(d), safe_serialization=True)
    return d


def _make_adapter(base_dir, out, r, lora_alpha, seed, targets=TARGETS, **kw):
    pm = peft.get_peft_model(_hf(base_dir), peft.LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=targets, **kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(0.4 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(str(out))
    return str(out)


@pytest.fixture(scope="module")
def dirs(base_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {k: _make_adapter(base_dir, root / k, **v) for k, v in SPECS.items()}


@pytest.fixture(scope="module")
def pm(base_dir, dirs):
    """One PeftModel holding a, b, c; each test adds its combinations under new names."""
    m = peft.PeftModel.from_pretrained(_hf(base_dir), dirs["a"], adapter_name="a")
    for k in ("b", "c"):
        m.load_adapter(dirs[k], adapter_name=k)
    return m.eval()


@pytest.fixture(scope="module")
def config(base_dir):
    return hf_io.read_config(str(base_dir))


@pytest.fixture(scope="module")
def ours(dirs, config):
    return {k: C.load_adapter_dir(d, config) for k, d in dirs.items()}


def _peft_tensors(pm, name):
    sd = peft.get_peft_model_state_dict(pm, adapter_name=name)
    return {k: v.numpy() for k, v in sd.items()}


def _content_mask(t, density):
    """A deterministic DARE mask: keep an entry when a hash of its value falls below `density`."""
    x = np.abs(np.asarray(t, np.float64)) * 1e4
    return ((x - np.floor(x)) < density).astype(np.float32)


@pytest.fixture
def fixed_masks(monkeypatch):
    from peft.utils import merge_utils

    def peft_random_pruning(tensor, density, rescale):
        out = tensor * torch.from_numpy(_content_mask(tensor.detach().numpy(), density))
        return out / density if rescale else out

    monkeypatch.setattr(merge_utils, "random_pruning", peft_random_pruning)
    monkeypatch.setattr(C, "random_mask", lambda t, density, rng: _content_mask(t, density))


@pytest.fixture
def numpy_svd(monkeypatch):
    """PEFT's torch.linalg.svd answered by numpy's with our sign convention (`canonical_signs`),
    for two cases where two LAPACKs (torch: MKL, numpy: OpenBLAS) legitimately differ: `svd_clamp`
    clips at a quantile of the factors' entries, which depends on the signs chosen for the singular
    vectors (MKL's are not ours); and the pruned updates of the
    `*_svd` types are full rank, their spectrum can have near-equal values at the cut, where the
    two float32 truncations differ by ~1e-5 (seen: dare_ties_svd, 1.2e-5). Plain `svd` (a low-rank
    sum) is compared with PEFT's own SVD."""
    def svd(x, full_matrices=True, driver=None):
        u, s, vh = C.canonical_signs(*np.linalg.svd(x.detach().numpy(), full_matrices=False))
        return torch.from_numpy(u), torch.from_numpy(s), torch.from_numpy(vh)

    monkeypatch.setattr(torch.linalg, "svd", svd)


CASES = [  # (type, adapters, weights, our kwargs)
    ("linear", "ab", [0.7, -0.4], {}),
    ("cat", "ac", [0.6, 0.5], {}),
    ("cat", "abc", [1.0, -0.5, 2.0], {}),
    ("svd", "abc", [0.5, 0.3, 0.8], {"rank": 3}),
    ("svd", "ac", [1.0, 1.0], {}),
    ("svd", "ab", [0.9, -0.6], {"rank": 4, "clamp": 0.9, "numpy_svd": True}),
    ("ties", "ab", [0.7, 0.5], {"density": 0.5}),
    ("ties", "ab", [0.7, -0.5], {"density": 0.6, "majority_sign_method": "frequency"}),
    ("magnitude_prune", "ab", [0.8, 0.4], {"density": 0.4}),
    ("ties_svd", "abc", [0.6, 0.3, 0.9], {"density": 0.7, "rank": 4, "numpy_svd": True}),
    ("magnitude_prune_svd", "ac", [0.6, 0.3], {"density": 0.5, "rank": 2, "numpy_svd": True}),
    ("dare_linear", "ab", [0.7, 0.4], {"density": 1.0}),  # density 1: no masks, unpatched
    ("dare_ties", "ab", [0.7, 0.4], {"density": 1.0}),
    ("dare_linear", "ab", [0.7, 0.4], {"density": 0.5, "masks": True}),
    ("dare_ties", "ab", [0.7, -0.4], {"density": 0.6, "masks": True}),
    ("dare_linear_svd", "abc", [0.7, 0.4, 0.5], {"density": 0.5, "masks": True, "rank": 3, "numpy_svd": True}),
    ("dare_ties_svd", "ab", [0.7, 0.4], {"density": 0.6, "masks": True, "majority_sign_method": "frequency",
                                          "numpy_svd": True}),
]


def _peft_kwargs(kw):
    out = {"density": kw.get("density"), "majority_sign_method": kw.get("majority_sign_method", "total")}
    if "rank" in kw:
        out["svd_rank"] = kw["rank"]
    if "clamp" in kw:
        out["svd_clamp"] = kw["clamp"]
    return out


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{c[0]}-{c[1]}" + ("-mask" if c[3].get("masks") else "") + ("-clamp" if "clamp" in c[3] else "")
                                                          for c in CASES])
def test_matches_add_weighted_adapter(case, pm, ours, config, tmp_path, request):
    kind, names, weights, kw = CASES[case]
    kw = dict(kw)
    for fixture in ("masks", "numpy_svd"):
        if kw.pop(fixture, False):
            request.getfixturevalue("fixed_masks" if fixture == "masks" else fixture)
    name = f"peft_{case}"
    pm.add_weighted_adapter(list(names), weights, name, combination_type=kind, **_peft_kwargs(kw))
    tree, lora = C.combine([ours[n] for n in names], weights, kind, **kw)
    ref = _peft_tensors(pm, name)
    got = adapter_to_peft_tensors(tree, config)
    assert sorted(got) == sorted(ref)
    pc = pm.peft_config[name]
    assert lora.rank == pc.r and lora.alpha == pc.lora_alpha and lora.scale == 1.0
    for k in sorted(k for k in ref if k.endswith("lora_A.weight")):
        kb = k.replace("lora_A", "lora_B")
        a, b, ra, rb = got[k], got[kb], ref[k], ref[kb]
        assert a.shape == ra.shape and b.shape == rb.shape, k
        if kind.endswith("svd"):  # singular vectors are defined up to sign: align, then compare
            s = np.sign(np.sum(a * ra, axis=1))
            a, b = a * s[:, None], b * s[None, :]
            assert rel(b @ a, rb @ ra) < 1e-5, k
        assert rel(a, ra) < 1e-5, k
        assert rel(b, rb) < 1e-5, kb
    # PeftModel's logits: our adapter directory vs PEFT's combination
    out = tmp_path / "ours"
    lora.save_peft(str(out), tree, {}, config, base_model_name_or_path=ours["a"].base)
    pm.load_adapter(str(out), adapter_name=f"ours_{case}")
    pm.set_adapter(name)
    want = _logits(pm)
    pm.set_adapter(f"ours_{case}")
    assert rel(_logits(pm), want) < 1e-4
    pm.set_adapter("a")


def test_dare_seed_and_single_adapter(ours):
    a, b = ours["a"], ours["b"]
    t1, _ = C.combine([a, b], [0.5, 0.5], "dare_linear", density=0.5, seed=1)
    t2, _ = C.combine([a, b], [0.5, 0.5], "dare_linear", density=0.5, seed=1)
    t3, _ = C.combine([a, b], [0.5, 0.5], "dare_linear", density=0.5, seed=2)
    leaf = lambda t: next(adapter_leaves(t))[1]["A"]  # noqa: E731
    assert np.array_equal(leaf(t1), leaf(t2)) and not np.array_equal(leaf(t1), leaf(t3))
    # one adapter with weight 1 is itself (PEFT: any type is linear for one adapter)
    t, lora = C.combine([a], [1.0], "svd", rank=None)
    for (p, x), (_, y) in zip(adapter_leaves(t), adapter_leaves(a.tree)):
        assert rel(lora.scale * x["A"] @ x["B"], a.scale * np.asarray(y["A"]) @ np.asarray(y["B"])) < 1e-6, p


def test_scanned_trees_and_low_rank_svd(ours):
    """A scanned tree ([layers, ...] leaves) combines layer by layer as the unscanned one; the
    low-rank SVD path of `svd` (QR of the factors) == the dense SVD of the summed update."""

    def scan(tree):
        layers = [tree[f"layers_{i}"] for i in range(2)]
        return {"layers": jax.tree.map(lambda *x: np.stack(x), *layers)}

    adapters = [ours[k] for k in "abc"]
    scanned = [C.Adapter(scan(a.tree), a.rank, a.alpha, name=a.name, base=a.base) for a in adapters]
    for kind, kw in (("svd", {"rank": 3}), ("cat", {}), ("ties_svd", {"density": 0.5})):
        t1, _ = C.combine(adapters, [0.5, 0.3, 0.8], kind, **kw)
        t2, _ = C.combine(scanned, [0.5, 0.3, 0.8], kind, **kw)
        for (p, x), (_, y) in zip(adapter_leaves(scan(t1)), adapter_leaves(t2)):
            assert rel(y["A"], x["A"]) < 1e-6 and rel(y["B"], x["B"]) < 1e-6, (kind, p)
    rng = np.random.default_rng(0)
    bs = [rng.standard_normal((40, r)).astype(np.float32) for r in (4, 2)]
    as_ = [rng.standard_normal((r, 24)).astype(np.float32) for r in (4, 2)]
    u, s, vh = C._low_rank_svd(bs, as_)
    du, ds, dvh = C.canonical_signs(*np.linalg.svd(sum(b @ a for b, a in zip(bs, as_)), full_matrices=False))
    assert u.shape == (40, 6) and vh.shape == (6, 24)
    assert rel(s, ds[:6]) < 1e-5 and rel(u, du[:, :6]) < 1e-4 and rel(vh, dvh[:6]) < 1e-4
    assert rel((u * s) @ vh, sum(b @ a for b, a in zip(bs, as_))) < 1e-5


def test_rslora_inputs_give_the_unscaled_combination(base_dir, tmp_path, config):
    """peft 0.21.2 gives a combination of rsLoRA adapters use_rslora=True with r = alpha = R, i.e. a
    scale sqrt(R) (huggingface/peft#3449); ours writes use_rslora=False: the tensors are PEFT's and
    the combined update is sum_i w_i s_i A_i B_i."""
    d1 = _make_adapter(base_dir, tmp_path / "r1", r=4, lora_alpha=8, seed=5, use_rslora=True)
    d2 = _make_adapter(base_dir, tmp_path / "r2", r=2, lora_alpha=8, seed=6)
    a1, a2 = C.load_adapter_dir(d1, config), C.load_adapter_dir(d2, config)
    assert a1.rslora and a1.scale == 4.0 and a2.scale == 4.0
    m = peft.PeftModel.from_pretrained(_hf(base_dir), d1, adapter_name="r1")
    m.load_adapter(d2, adapter_name="r2")
    m.add_weighted_adapter(["r1", "r2"], [0.5, 1.5], "mix", combination_type="cat")
    tree, lora = C.combine([a1, a2], [0.5, 1.5], "cat")
    ref, got = _peft_tensors(m, "mix"), adapter_to_peft_tensors(tree, config)
    assert all(rel(got[k], ref[k]) < 1e-6 for k in ref)
    assert lora.rank == 6 and not lora.rslora and lora.scale == 1.0
    l1, l2 = dict(adapter_leaves(a1.tree)), dict(adapter_leaves(a2.tree))
    for p, x in adapter_leaves(tree):
        want = 0.5 * 4.0 * np.asarray(l1[p]["A"]) @ np.asarray(l1[p]["B"]) \
            + 1.5 * 4.0 * np.asarray(l2[p]["A"]) @ np.asarray(l2[p]["B"])
        assert rel(x["A"] @ x["B"], want) < 1e-6, p


def test_refusals(base_dir, dirs, ours, config, tmp_path):
    a, b, c = ours["a"], ours["b"], ours["c"]
    with pytest.raises(C.CombineError, match=r"one rank .*r=4.*r=2.*use cat or svd"):
        C.combine([a, c], [1, 1], "linear")
    with pytest.raises(C.CombineError, match="needs a density"):
        C.combine([a, b], [1, 1], "ties")
    with pytest.raises(C.CombineError, match="exceeds min"):
        C.combine([a, b], [1, 1], "svd", rank=40)
    with pytest.raises(C.CombineError, match="applies to the SVD types"):
        C.combine([a, b], [1, 1], "linear", rank=2)
    other = C.Adapter(a.tree, a.rank, a.alpha, name="other", base="/somewhere/else")
    with pytest.raises(C.CombineError, match="adapter other was trained on base '/somewhere/else'"):
        C.combine([a, other], [1, 1], "cat")
    # two directories holding the same weights (each run's own copy of a resized base) are one base;
    # a directory of other weights is not
    import shutil

    copy = shutil.copytree(base_dir, tmp_path / "base_copy")
    one = C.Adapter(a.tree, a.rank, a.alpha, name="one", base=str(base_dir))
    C.combine([one, C.Adapter(b.tree, b.rank, b.alpha, name="copy", base=str(copy))], [1, 1], "cat")
    changed = tmp_path / "base_changed"
    shutil.copytree(base_dir, changed)
    from safetensors.numpy import load_file, save_file

    (wf,) = [f for f in os.listdir(changed) if f.endswith(".safetensors")]
    t = load_file(str(changed / wf))
    t = {k: (v + 1.0 if k.endswith("q_proj.weight") else v) for k, v in t.items()}
    save_file(t, str(changed / wf), metadata={"format": "pt"})
    with pytest.raises(C.CombineError, match="adapter changed was trained on base"):
        C.combine([one, C.Adapter(b.tree, b.rank, b.alpha, name="changed", base=str(changed))], [1, 1], "cat")
    narrow = jax.tree.map(lambda x: x, a.tree)  # new dicts, same leaves
    path, leaf = next(adapter_leaves(narrow))
    node = narrow
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = {"A": np.zeros((16, 4), np.float32), "B": leaf["B"]}
    with pytest.raises(C.CombineError, match="different bases"):
        C.combine([a, C.Adapter(narrow, 4, 8.0, name="narrow")], [1, 1], "cat")
    dq = C.load_adapter_dir(_make_adapter(base_dir, tmp_path / "q", r=4, lora_alpha=8, seed=7, targets=["q_proj"]),
                            config)
    with pytest.raises(C.CombineError, match=r"adapts other modules .*every adapter must adapt the same modules"):
        C.combine([a, dq], [1, 1], "cat")
    dora = _make_adapter(base_dir, tmp_path / "dora", r=4, lora_alpha=8, seed=8, use_dora=True)
    with pytest.raises(C.CombineError, match=r"is DoRA \(use_dora=True\)"):
        C.load_adapter_dir(dora, config)
    (tmp_path / "ia3").mkdir()
    (tmp_path / "ia3" / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(C.CombineError, match="peft_type 'IA3' is not LORA"):
        C.load_adapter_dir(str(tmp_path / "ia3"), config)


def test_cli_errors_are_one_line_exit_2(dirs, tmp_path, capsys):
    cases = [
        ([f"--adapter={dirs['a']}", f"--adapter={dirs['c']}", "--type=linear"], "needs adapters of one rank"),
        ([f"--adapter={dirs['a']}", f"--adapter={dirs['b']}", "--type=bogus"], "--type='bogus' is not one of"),
        ([f"--adapter={dirs['a']}", f"--adapter={dirs['b']}", "--type=ties"], "needs a density"),
        ([f"--adapter={tmp_path / 'nope'}", "--type=cat"], "not a directory"),
        ([f"--adapter={dirs['a']}", "--type=cat", "--format=gguf"], "--format='gguf'"),
    ]
    for argv, msg in cases:
        code = run_cli(C.main, [*argv, f"--out={tmp_path / 'out'}"], "python -m sft_jax.peft.combine")
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith("error:") and msg in err and "\n" not in err, (argv, err)
    assert not (tmp_path / "out").exists()


def test_cli_peft_output_loads_in_peftmodel_and_sft_jax(base_dir, dirs, pm, config, tmp_path):
    """One subprocess: cat of a:0.6 and c:0.5 (the base from base_model_name_or_path); PeftModel loads
    it with PEFT's logits; sft_jax's loader (generate --adapter) gives the same logits."""
    out = tmp_path / "cat"
    p = subprocess.run([sys.executable, "-m", "sft_jax.peft.combine", f"--adapter={dirs['a']}:0.6",
                        f"--adapter={dirs['c']}:0.5", "--type=cat", f"--out={out}"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "r=6" in p.stdout and "cat" in p.stdout
    ac = json.loads((out / "adapter_config.json").read_text())
    assert ac["r"] == 6 and ac["lora_alpha"] == 6 and ac["use_rslora"] is False
    assert sorted(ac["target_modules"]) == sorted(TARGETS)
    assert ac["base_model_name_or_path"] == str(base_dir)
    rec = json.loads((out / "combine.json").read_text())
    assert rec["type"] == "cat" and [i["weight"] for i in rec["inputs"]] == [0.6, 0.5]
    pm.add_weighted_adapter(["a", "c"], [0.6, 0.5], "cli_cat", combination_type="cat")
    pm.set_adapter("cli_cat")
    want = _logits(pm)
    pm.set_adapter("a")
    loaded = peft.PeftModel.from_pretrained(_hf(base_dir), str(out)).eval()
    assert rel(_logits(loaded), want) < 1e-4
    _, params = hf_io.load_hf(str(base_dir))
    trainable, method = load_peft_adapter(str(out), config)
    assert rel(method.forward(trainable, params, config, jnp.asarray(IDS)), want) < 1e-4


def test_merged_export_equals_merge_and_unload(base_dir, dirs, tmp_path, capsys):
    out = tmp_path / "merged"
    code = run_cli(C.main, [f"--adapter={dirs['a']}:0.7", f"--adapter={dirs['b']}:0.4", f"--adapter={dirs['c']}:0.9",
                            "--type=svd", "--rank=4", "--format=merged", f"--model={base_dir}", f"--out={out}"],
                   "python -m sft_jax.peft.combine")
    assert code == 0, capsys.readouterr().err
    m = peft.PeftModel.from_pretrained(_hf(base_dir), dirs["a"], adapter_name="a")
    for k in ("b", "c"):
        m.load_adapter(dirs[k], adapter_name=k)
    m.add_weighted_adapter(["a", "b", "c"], [0.7, 0.4, 0.9], "mix", combination_type="svd", svd_rank=4)
    want = _logits(m.merge_and_unload(adapter_names=["mix"]).eval())
    assert rel(_logits(_hf(out)), want) < 1e-4


@pytest.mark.slow
def test_workdir_inputs(tmp_path_factory, tmp_path, capsys):
    """Two checkpoints of one rsLoRA work directory (test_workdir's shared run), cat, merged export:
    transformers' logits of it == our forward of base + 0.5 s A2 B2 + 0.5 s A3 B3 (s = 8 / sqrt(4));
    the run's tokenizer and stop ids travel with it."""
    from test_workdir import shared_lora_run

    from sft_jax.peft.lora import merge_low_rank
    from sft_jax.models import llama
    from sft_jax.workdir import load_run

    wd, _ = shared_lora_run(tmp_path_factory)
    merged = tmp_path / "wd_merged"
    code = run_cli(C.main, [f"--workdir={wd}@2:0.5", f"--workdir={wd}@3:0.5", "--type=cat", "--format=merged",
                            f"--out={merged}"], "python -m sft_jax.peft.combine")
    assert code == 0, capsys.readouterr().err
    assert (merged / "tokenizer_config.json").exists()
    assert json.loads((merged / "generation_config.json").read_text())["eos_token_id"]
    rec = json.loads((merged / "combine.json").read_text())
    assert rec["rank"] == 8 and [i["source"] for i in rec["inputs"]] == [f"{wd}@2", f"{wd}@3"]
    assert all(i["use_rslora"] for i in rec["inputs"])
    config, params = hf_io.load_hf(str(wd / "base_model"))
    for s in (2, 3):
        run = load_run(str(wd), s, load_tokenizer=False)
        assert run.method.rslora and run.method.scale == 4.0
        params = merge_low_rank(params, run.trainable, 0.5 * run.method.scale)
    want = llama.forward(params, config, jnp.asarray(IDS))
    assert rel(_logits(_hf(merged)), np.asarray(want)) < 1e-4
