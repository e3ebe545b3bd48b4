"""Data quality command: planted problems are found with no false positive among clean rows; the
model-based numbers (per-example loss, IFD) match transformers on a tiny random Llama; selection,
outputs and the HTML report (rendered in headless Chromium) work; the CLI runs on alpaca_en_demo
with stories260K and the trainer trains on its clean file."""

from __future__ import annotations

import dataclasses
import json
import random
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

import matplotlib.image

from sft_jax.config import default_config
from sft_jax.data import formats, quality, quality_model, quality_text
from sft_jax.data.testing import CORPUS, tiny_fast_tokenizer, write_jsonl
from sft_jax.models.llama2c import convert_llama2c

from helpers import cli_env

WORDS = sorted({w.strip(".,!?").lower() for w in CORPUS.split()} - {"i"})
VERBS = ["describe", "explain", "write", "list", "summarize", "compare", "tell", "give", "name", "create"]


def _sentence(rng, n):
    words = rng.choices(WORDS, k=n)
    return " ".join(words).capitalize() + "."


def _clean_rows(n=24, seed=0):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        instruction = f"{VERBS[i % len(VERBS)].capitalize()} {_sentence(rng, rng.randint(6, 10))}"
        response = " ".join(_sentence(rng, rng.randint(8, 14)) for _ in range(rng.randint(3, 6)))
        rows.append({"instruction": instruction, "input": "", "output": response})
    return rows


EVAL_PASSAGE = ("the quick brown otter swam across the silver lake before the winter storm "
                "arrived over the northern hills")


def planted_dataset():
    """(rows in alpaca format, {reason: indices that must be flagged with it})."""
    rng = random.Random(1)
    rows = _clean_rows()
    n_clean = len(rows)
    planted: dict[str, list[int]] = {}

    def add(reason, row):
        planted.setdefault(reason, []).append(len(rows))
        rows.append(row)

    src = rows[3]
    add("exact_duplicate", {"instruction": "  " + src["instruction"].upper() + " ", "input": "",
                            "output": src["output"].replace(".", " !")})
    words = rows[5]["output"].split()
    while len(words) < 60:  # a long row: a few changed words leave most shingles intact
        words += rows[6]["output"].split()
    rows[5]["output"] = " ".join(words)
    near = list(words)
    for k in (10, 30, 50):
        near[k] = "zebra"
    add("near_duplicate", {"instruction": rows[5]["instruction"], "input": "", "output": " ".join(near)})
    add("refusal", {"instruction": "Write a poem about the sea.", "input": "",
                    "output": "I'm sorry, but I cannot help with that request."})
    add("refusal", {"instruction": "Tell me a story about a dog.", "input": "",
                    "output": "As an AI language model, I do not have personal experiences with dogs."})
    add("truncated", {"instruction": "Describe the big red ball.", "input": "",
                      "output": _sentence(rng, 12) + " The ball was shiny and round and Lily wanted to play with the"})
    add("truncated", {"instruction": "Explain how the dog jumped.", "input": "",
                      "output": _sentence(rng, 14) + " She saw the fence, the sun, the tide and the waves,"})
    add("contaminated", {"instruction": "Summarize the story.", "input": "",
                         "output": "In short, " + EVAL_PASSAGE + ". It was a fine day."})
    add("empty_response", {"instruction": "Say nothing at all.", "input": "", "output": "   "})
    add("repetition", {"instruction": "Write about the sea.", "input": "",
                       "output": " ".join(["the waves crash on the shore."] * 12)})
    add("unclosed_code_fence", {"instruction": "Give me a python loop.", "input": "",
                                "output": "Here it is:\n```python\nfor i in range(3):\n    print(i)\n"})
    said = "Repeat after me: the dog ran fast and jumped over the tall fence today."
    add("restates_prompt", {"instruction": said, "input": "", "output": said})
    add("wrong_language", {"instruction": "Translate the sentence 'the dog is happy and it likes the sun' into French.",
                           "input": "", "output": "The dog is happy and it likes the sun and the sea."})
    add("short_response", {"instruction": "Is the ball red?", "input": "", "output": "Yes."})
    return rows, planted, n_clean


def _records(tmp_path, rows):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(rows, indent=1))
    return str(path), formats.load_conversations(str(path))


def _eval_file(tmp_path):
    return write_jsonl(str(tmp_path / "eval.jsonl"), [
        {"question": "What happened at the lake? " + EVAL_PASSAGE + "?", "answer": "An otter swam."},
        {"question": "Who is Lily?", "answer": "A little girl who liked to play outside in the sun."},
    ])


def test_planted_problems_found_with_no_false_positive(tmp_path):
    rows, planted, n_clean = planted_dataset()
    _, records = _records(tmp_path, rows)
    opts = quality.QualityOptions(eval_paths=(_eval_file(tmp_path),))
    result = quality.analyse(records, opts)
    flagged = {r: sorted(i for i, rs in enumerate(result.reasons) if r in rs) for r in quality.REASONS}
    for reason, idx in planted.items():
        assert flagged[reason] == idx, (reason, flagged[reason], [result.reasons[i] for i in flagged[reason]])
    for i in range(n_clean):
        assert result.reasons[i] == {}, (i, result.reasons[i])
    # the duplicate clusters pair each copy with its original; the original (first) is kept
    pairs = {tuple(c.members): c.exact for c in result.clusters}
    assert pairs == {(3, planted["exact_duplicate"][0]): True, (5, planted["near_duplicate"][0]): False}
    # every planted row except the soft short answer is removed, with its reason; the clean rows stay
    removed = set(result.removed)
    soft = set(planted["short_response"])
    assert removed == {i for idx in planted.values() for i in idx} - soft
    assert set(result.kept) == set(range(n_clean)) | soft
    assert "contaminated" in result.reasons[planted["contaminated"][0]]
    assert EVAL_PASSAGE.split()[0] in result.reasons[planted["contaminated"][0]]["contaminated"]


def test_keep_policies_and_drop_list(tmp_path):
    rows = _clean_rows(6)
    rows.append(dict(rows[2], output=rows[2]["output"] + " " + _sentence(random.Random(3), 3)))  # longer copy
    rows.append(dict(rows[2]))
    _, records = _records(tmp_path, rows)
    first = quality.analyse(records, quality.QualityOptions(keep="first"))
    assert first.keepers == {0: 2} and 6 in first.removed and 7 in first.removed
    assert "near_duplicate" in first.reasons[6] and "exact_duplicate" in first.reasons[7]
    longest = quality.analyse(records, quality.QualityOptions(keep="longest"))
    assert longest.keepers == {0: 6} and {2, 7} <= set(longest.removed)
    kept_all = quality.analyse(records, quality.QualityOptions(drop=()))
    assert kept_all.kept == list(range(8)) and kept_all.removed == []
    with pytest.raises(quality.QualityError, match="--drop: unknown reason"):
        quality.analyse(records, quality.QualityOptions(drop=("typo",)))
    with pytest.raises(quality.QualityError, match="--keep=best"):
        quality.analyse(records, quality.QualityOptions(keep="best"))


def test_tool_call_rows_are_kept_whole(tmp_path):
    """A turn that only calls a tool is not an empty response; tools and calls survive into --out."""
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    row = {"tools": tools, "messages": [
        {"role": "user", "content": "What is the weather in Paris today?"},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
            "name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny, 21 C"},
        {"role": "assistant", "content": "It is sunny and 21 degrees in Paris today."}]}
    path = write_jsonl(str(tmp_path / "tools.jsonl"), [row])
    records = formats.load_conversations(path)
    result = quality.analyse(records, quality.QualityOptions())
    assert result.reasons == [{}] and result.kept == [0]
    quality.write_outputs(result, str(tmp_path / "clean.jsonl"))
    back = formats.load_conversations(str(tmp_path / "clean.jsonl"))
    assert back[0]["messages"] == records[0]["messages"] and back[0]["tools"] == records[0]["tools"]


def test_text_helpers():
    verb_object = quality_text.root_verb_object
    assert verb_object("Can you please describe a process of making crepes?") == ("describe", "process")
    assert verb_object("Write a short poem about the sea.") == ("write", "poem")
    assert verb_object("How do I open the console?") == ("question:how", "")
    assert verb_object("I have a problem with my code.") == ("other", "")
    assert quality_text.asked_language("Translate this from German to Spanish.") == "spanish"
    assert quality_text.asked_language("In Greek mythology, who was Cronus?") is None
    assert quality_text.language_matches("Le chat est sur la table et il dort dans le soleil.", "french") is True
    assert quality_text.language_matches("The cat is on the table and it sleeps in the sun.", "french") is False
    assert quality_text.language_matches("猫在桌子上睡觉，太阳很暖和。今天天气很好。", "chinese") is True
    assert not quality_text.is_truncated("Inline ```code``` and a full sentence that ends properly with a period here.")
    assert not quality_text.is_truncated("A quote from a book that is long enough to count as prose here -C.S. Lewis")
    assert quality_text.normalise_words("Don't STOP, 我的家乡!") == ["don't", "stop", "我", "的", "家", "乡"]
    e = quality_text.entropy(np.array([10.0, 10.0, 10.0, 10.0]))
    assert abs(e["nats"] - np.log(4)) < 1e-9 and abs(e["effective"] - 4) < 1e-9 and abs(e["normalised"] - 1) < 1e-9


def test_pack_and_kmeans():
    rng = np.random.default_rng(0)
    items = [{"inputs": np.arange(n, dtype=np.int32) + 1, "w": np.full(n, 0.5, np.float32)}
             for n in rng.integers(1, 30, size=40)]
    batches, where = quality_model.pack(items, length=32, batch_size=4, max_segments=3)
    for i, (b, r, s) in enumerate(where):
        seg = batches[b]["segment_ids"][r]
        np.testing.assert_array_equal(batches[b]["inputs"][r][seg == s], items[i]["inputs"])
        np.testing.assert_array_equal(batches[b]["positions"][r][seg == s], np.arange(len(items[i]["inputs"])))
        assert batches[b]["w"].dtype == np.float32
    assert all(b["segment_ids"].max() <= 3 for b in batches)
    centres = np.eye(4, 16) * 10
    x = np.concatenate([c + rng.normal(size=(25, 16)) for c in centres])
    labels, _ = quality_model.kmeans(x, 4, seed=0)
    for j in range(4):
        assert len(set(labels[25 * j:25 * (j + 1)])) == 1
    assert len(set(labels)) == 4


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny random Hugging Face Llama (float32) with the project's tiny byte-level BPE tokenizer."""
    torch = pytest.importorskip("torch")
    import transformers

    d = tmp_path_factory.mktemp("tiny_llama")
    tok = tiny_fast_tokenizer()
    tok.save_pretrained(str(d))
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                   tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                                   eos_token_id=tok.eos_token_id)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(str(d), safe_serialization=True)
    return str(d), model


def _cfg(model_dir, data_path, max_length=256):
    c = default_config()
    c.model.path = model_dir
    c.data.path = data_path
    c.data.template = "chatml"
    c.data.max_length = max_length
    return c


@pytest.fixture(scope="module")
def scored(tiny_model, tmp_path_factory):
    model_dir, _ = tiny_model
    tmp = tmp_path_factory.mktemp("scored")
    rows, planted, n_clean = planted_dataset()
    data_path, _ = _records(tmp, rows)
    cfg = _cfg(model_dir, data_path)
    opts = quality.QualityOptions(eval_paths=(_eval_file(tmp),), clusters=4, batch_size=8)
    result = quality.run(cfg, opts, out=str(tmp / "clean.jsonl"), report=str(tmp / "report"))
    return result, cfg, tmp, planted, n_clean


def _hf_mean_ce(model, ids, mask):
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    ce = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="none").numpy()
    m = np.asarray(mask[1:], np.float64)
    return float((ce * m).sum() / m.sum())


def test_model_scores_match_transformers(scored, tiny_model):
    """Packed, sharded sft_jax passes == one-sequence-at-a-time transformers, per example."""
    result, cfg, _, _, _ = scored
    _, hf = tiny_model
    tok, template = quality.load_tokenizer(cfg)
    s = result.scores
    assert s.loss.shape == (len(result.records),) and s.embedding.shape == (len(result.records), 32)
    for i in (0, 7, 20, len(result.records) - 1):
        tk = quality_model.tokenize(tok, template, result.records[i], cfg.data.train_on)
        ids = [int(t) for t in tk.ids]
        assert len(ids) <= cfg.data.max_length
        np.testing.assert_allclose(s.loss[i], _hf_mean_ce(hf, ids, tk.trainable), rtol=1e-4)
        last = np.zeros(len(ids))
        last[tk.last[0]:tk.last[1]] = 1
        np.testing.assert_allclose(s.loss_last[i], _hf_mean_ce(hf, ids, last), rtol=1e-4)
        alone = [tok.bos_token_id] + ids[tk.last[0]:tk.last[1]]
        np.testing.assert_allclose(s.loss_alone[i], _hf_mean_ce(hf, alone, [0] + [1] * (len(alone) - 1)), rtol=1e-4)
        np.testing.assert_allclose(s.ifd[i], s.loss_last[i] / s.loss_alone[i], rtol=1e-6)
    assert set(s.cluster.tolist()) <= set(range(4)) and s.num_clusters == 4


def test_outputs_have_a_reason_for_every_row(scored):
    result, _, tmp, planted, n_clean = scored
    kept = [json.loads(x) for x in open(tmp / "clean.jsonl")]
    removed = [json.loads(x) for x in open(tmp / "clean.removed.jsonl")]
    assert len(kept) + len(removed) == len(result.records)
    assert all(r["quality"]["kept"] and r["messages"][-1]["role"] == "assistant" for r in kept)
    assert all(r["reasons"] and all(r["reasons"].values()) for r in removed)
    by_row = {r["row"]: r for r in removed}
    for reason, idx in planted.items():
        if reason in quality.DEFAULT_DROP:
            for i in idx:
                assert reason in by_row[i]["reasons"] and by_row[i]["source"] == result.records[i]["source"]
    assert {r["quality"]["row"] for r in kept} == set(result.kept)
    # the clean file is read back by the trainer's reader
    assert len(formats.load_conversations(str(tmp / "clean.jsonl"))) == len(kept)


def test_keep_best_keeps_the_best_scored_copy(scored):
    result, _, _, _, _ = scored
    best = dataclasses.replace(
        result, keepers={}, options=dataclasses.replace(result.options, keep="best"),
        reasons=[{k: v for k, v in rs.items() if not k.endswith("_duplicate")} for rs in result.reasons])
    quality._dedup(best, best.options)
    score = quality.selection_scores(best)
    assert len(best.keepers) == len(best.clusters) == 2
    for ci, c in enumerate(best.clusters):
        keeper = best.keepers[ci]
        assert score[keeper] == max(score[i] for i in c.members)
        for i in c.members:
            assert (i == keeper) != any(k.endswith("_duplicate") for k in best.reasons[i])


def test_select_round_robin_over_clusters(scored):
    result, _, _, _, _ = scored
    chosen, why = quality._select(result, list(result.kept), 6)
    assert len(chosen) == 6 and set(chosen) <= set(result.kept)
    clusters = [int(result.scores.cluster[i]) for i in chosen]
    populated = len({int(result.scores.cluster[i]) for i in result.kept})
    assert len(set(clusters)) == min(populated, 6)  # one per cluster before any second pick
    assert all(why[i].startswith("selected: rank") for i in chosen)
    score = quality.selection_scores(result)
    for i in chosen:  # each cluster's first pick is its best-scored row
        c = result.scores.cluster[i]
        if "rank 1 " in why[i]:
            assert score[i] == max(score[j] for j in result.kept if result.scores.cluster[j] == c)


def test_report_renders_in_headless_chromium(scored, tmp_path):
    result, _, tmp, _, _ = scored
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (Debian package `chromium`); the report is not rendered")
    report = tmp / "report" / "index.html"
    page = report.read_text()
    images = re.findall(r"<img src='([^']+)'", page)
    assert {"lengths.png", "trainable.png", "reasons.png", "duplicates.png", "task_mix.png", "clusters.png",
            "difficulty.png"} <= set(images)
    for name in images:
        data = (report.parent / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    args = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(args + ["--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=120)
    assert f'data-images-loaded="{len(images)}/{len(images)}"' in dom.stdout, dom.stderr[-2000:]
    assert not re.search(r'class="broken">image failed to load: [^<\']+</p>', dom.stdout)
    shot = tmp_path / "shot.png"
    subprocess.run(args + [f"--screenshot={shot}", "--window-size=1200,2400", report.as_uri()],
                   capture_output=True, text=True, timeout=120)
    pixels = matplotlib.image.imread(str(shot))
    assert pixels.shape[:2] == (2400, 1200)
    assert pixels[..., :3].std() > 0.05  # not a blank page


def _env():
    return cli_env(devices=2)


def test_cli_errors_are_one_line(tmp_path, repo_dir):
    p = subprocess.run([sys.executable, "-m", "sft_jax.data.quality", f"--data={tmp_path / 'missing.json'}"],
                       cwd=repo_dir, env=_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "no such file" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.slow
def test_cli_on_alpaca_demo_then_train_on_clean_file(tmp_path, shared_dir, repo_dir):
    """The acceptance run: alpaca_en_demo.json + stories260K -> clean file + report; the trainer
    then trains on the clean file."""
    base = tmp_path / "stories260K"
    convert_llama2c(str(shared_dir / "assets/stories260K/stories260K.bin"),
                    str(shared_dir / "assets/stories260K/tok512.model"), str(base))
    out = tmp_path / "clean.jsonl"
    cmd = [sys.executable, "-m", "sft_jax.data.quality", f"--data={shared_dir / 'data/alpaca_en_demo.json'}",
           f"--model={base}", "--template=chatml", "--max_length=128", f"--out={out}", f"--report={tmp_path / 'r'}",
           "--select=300"]
    p = subprocess.run(cmd, cwd=repo_dir, env=_env(), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["rows"] == 999 and summary["kept"] == 300
    assert summary["reasons"]["exact_duplicate"] >= 10 and summary["reasons"]["refusal"] >= 10
    removed = [json.loads(x) for x in open(tmp_path / "clean.removed.jsonl")]
    assert len(removed) == 699 and all(r["reasons"] for r in removed)
    assert (tmp_path / "r" / "index.html").exists()
    wd = tmp_path / "run"
    cmd = [sys.executable, "-m", "sft_jax.train", "--config=configs/alpaca.py", f"--workdir={wd}",
           f"--config.model.path={base}", f"--config.data.path={out}", "--config.data.template=chatml",
           "--config.data.format=auto", "--config.data.max_length=128", "--config.train.steps=2",
           "--config.train.batch_size=4", "--config.model.dtype=float32", "--config.model.param_dtype=float32",
           "--config.eval.max_batches=1", "--config.eval.num_generations=0", "--config.checkpoint.every_steps=0"]
    p = subprocess.run(cmd, cwd=repo_dir, env=_env(), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    losses = [json.loads(x)["loss"] for x in open(wd / "metrics.jsonl") if '"loss"' in x]
    assert len(losses) >= 2 and all(np.isfinite(losses))
