"""sft_jax.report: curves PNG + HTML from metrics.jsonl (best step, eval table, repeated steps after a
resume), rendered in headless Chromium with a screenshot size check; one-line errors for bad metrics."""

from __future__ import annotations

import json
import pathlib
import re
import shutil
import subprocess

import matplotlib.image
import pytest

from sft_jax import report


def _metrics(wd, eval_losses):
    """A 40-step run: train rows every step, evals every 10 steps with `eval_losses`; steps 21-25
    logged twice (a resume from step 20), the second time with loss 0.5."""
    rows = [{"step": 0, "eval_loss": eval_losses[0], "eval_accuracy": 0.1}]
    for s in list(range(1, 26)) + list(range(21, 41)):
        rows.append({"step": s, "loss": 0.5 if s > 20 and len(rows) > 26 else 3.0 - s / 20, "lr": 1e-3,
                     "grad_norm": 1.0 + s % 3, "tokens_per_s": 1000.0 + s, "compile_time_s": 2.0 if s == 1 else 0.0})
        if s % 10 == 0 and (s <= 20 or len(rows) > 26):
            rows.append({"step": s, "eval_loss": eval_losses[s // 10], "eval_accuracy": 0.1 * s})
    wd.mkdir(parents=True, exist_ok=True)
    (wd / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (wd / "run_info.json").write_text(json.dumps({"total_steps": 40, "model_params": 1234}))
    return wd


def test_read_metrics_and_best_step(tmp_path):
    wd = _metrics(tmp_path / "wd", [5.0, 2.0, 1.5, 1.7, 1.9])
    train, evals, notes = report.read_metrics(wd / "metrics.jsonl")
    assert sorted(train) == list(range(1, 41)) and train[22]["loss"] == 0.5  # the resumed rows win
    assert sorted(evals) == [0, 10, 20, 30, 40] and notes == []
    assert report.best_step(evals) == 20
    assert report.best_step({}) is None
    assert report.best_step({3: {"eval_loss": float("nan")}, 5: {"eval_loss": 2.0}}) == 5


def test_bad_metrics_are_one_line_errors(tmp_path, capsys):
    wd = tmp_path / "wd"
    wd.mkdir()
    (wd / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": \n')
    assert report.run_cli(report.main, [f"--workdir={wd}"], report.PROG) == 2
    err = capsys.readouterr().err
    assert "metrics.jsonl:2: not JSON" in err and len(err.strip().splitlines()) == 1
    (wd / "metrics.jsonl").write_text('{"loss": 2.0}\n')
    assert report.run_cli(report.main, [f"--workdir={wd}"], report.PROG) == 2
    assert "metrics.jsonl:1: field 'step'" in capsys.readouterr().err
    assert report.run_cli(report.main, [f"--workdir={tmp_path / 'none'}"], report.PROG) == 2
    assert "metrics.jsonl not found" in capsys.readouterr().err
    (wd / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')  # killed while writing
    assert report.run_cli(report.main, [f"--workdir={wd}"], report.PROG) == 0
    assert "metrics.jsonl:2: skipped a truncated last line" in capsys.readouterr().err
    assert "skipped a truncated last line" in (wd / "report" / "index.html").read_text()


def test_report_renders_in_headless_chromium(tmp_path):
    wd = _metrics(tmp_path / "wd", [5.0, 2.0, 1.5, 1.7, 1.9])
    assert report.main([f"--workdir={wd}", f"--out={tmp_path / 'out'}"]) == 0
    page = (tmp_path / "out" / "index.html").read_text()
    images = re.findall(r"<img src='([^']+)'", page)
    assert images == ["curves.png"]
    data = (tmp_path / "out" / "curves.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10000
    assert "<td><b>20</b></td><td><b>1.5</b></td>" in page  # the best eval row, in bold
    assert page.count("<tr>") == 1 + 5 + 1 + 5  # summary (header + 5 rows), eval table (header + 5 evals)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (Debian package `chromium`); the report is not rendered")
    uri = (tmp_path / "out" / "index.html").as_uri()
    args = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(args + ["--dump-dom", uri], capture_output=True, text=True, timeout=120)
    assert 'data-images-loaded="1/1"' in dom.stdout, dom.stderr[-2000:]
    shot = tmp_path / "shot.png"
    subprocess.run(args + [f"--screenshot={shot}", "--window-size=1000,1400", uri],
                   capture_output=True, text=True, timeout=120)
    pixels = matplotlib.image.imread(str(shot))
    assert pixels.shape[:2] == (1400, 1000)
    assert pixels[..., :3].std() > 0.05  # not a blank page


def test_best_step_reads_the_early_stopping_metric(tmp_path):
    """The star and the bold row follow the metric early stopping / checkpoint.keep_best use: a named eval
    set's `eval_NAME/loss` (run_info.json's resolved `best_metric`, or the config resolved the trainer's
    way for a run without it), a higher-is-better metric, and min_delta (the tracker's rule)."""
    from sft_jax.metrics import lower_is_better
    from sft_jax.train_loop import EarlyStopping

    for m in ("loss", "a/loss", "accuracy", "a/accuracy", "stop_rate", "exact_match", "repetition", "mean_length"):
        assert EarlyStopping(m, 1, 0.0).lower_is_better == lower_is_better(m)
    evals = {10: {"eval_a/loss": 2.0, "eval_b/loss": 1.0, "eval_a/accuracy": 0.5},
             20: {"eval_a/loss": 1.5, "eval_b/loss": 1.2, "eval_a/accuracy": 0.7},
             30: {"eval_a/loss": 1.45, "eval_b/loss": 1.3, "eval_a/accuracy": 0.6}}
    cfg = {"data": {"eval_path": "a=x.jsonl,b=y.jsonl"}, "train": {"early_stopping": {"metric": "loss",
                                                                                          "min_delta": 0.0}}}
    assert report.best_metric({"config": cfg}, evals) == ("eval_a/loss", 0.0)  # only named sets: the first
    assert report.best_step(evals, "eval_a/loss") == 30
    cfg["train"]["early_stopping"]["min_delta"] = 0.1  # 1.45 does not beat 1.5 by more than 0.1
    assert report.best_step(evals, *report.best_metric({"config": cfg}, evals)) == 20
    assert report.best_metric({"best_metric": "b/loss", "config": cfg}, evals) == ("eval_b/loss", 0.1)
    assert report.best_step(evals, "eval_b/loss") == 10
    assert report.best_step(evals, "eval_a/accuracy") == 20  # higher is better
    assert report.best_metric({}, {1: {"eval_loss": 1.0}}) == ("eval_loss", 0.0)

    wd = tmp_path / "wd"
    wd.mkdir()
    rows = [{"step": s, "loss": 3.0 - s / 20, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 100.0} for s in range(1, 31)]
    rows += [{"step": s, **v} for s, v in evals.items()]
    (wd / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (wd / "run_info.json").write_text(json.dumps({"total_steps": 30, "best_metric": "b/loss", "config": cfg}))
    page = pathlib.Path(report.write_report(wd)).read_text()
    assert "best step (lowest eval_b/loss)" in page
    assert "<td><b>10</b></td><td><b>1</b></td>" in page  # the step-10 row in bold, eval_b/loss its first column
    (wd / "run_info.json").write_text(json.dumps({"best_metric": "a/accuracy", "config": cfg}))
    page = pathlib.Path(report.write_report(wd)).read_text()
    assert "best step (highest eval_a/accuracy)" in page and "<td><b>20</b></td><td><b>0.7</b></td>" in page
