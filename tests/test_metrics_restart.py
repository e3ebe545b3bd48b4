"""metrics.jsonl on (re)start (issue 19 item 4): a run from step 0 starts fresh files (the old ones
kept as metrics.jsonl.<n> / tb.<n>); a resume drops later rows and skips a truncated last line."""

from __future__ import annotations

import logging

from sft_jax import metrics as M
from test_metrics import read_rows


def _steps(path) -> list[int]:
    return [r["step"] for r in read_rows(path)]


def test_restart_from_zero_keeps_the_old_files_aside(tmp_path):
    for run in range(3):
        with M.MetricsWriter(tmp_path, True, progress=False) as w:
            for step in range(1, 3 + run):
                w.write(step, {"loss": float(run)})
    assert _steps(tmp_path / "metrics.jsonl") == [1, 2, 3, 4]  # no duplicated rows
    assert _steps(tmp_path / "metrics.jsonl.1") == [1, 2] and _steps(tmp_path / "metrics.jsonl.2") == [1, 2, 3]
    assert (tmp_path / "tb.1").is_dir() and (tmp_path / "tb.2").is_dir() and (tmp_path / "tb").is_dir()


def test_resume_skips_a_truncated_last_line_with_a_warning(tmp_path, caplog):
    with M.MetricsWriter(tmp_path, True, tensorboard=False, progress=False) as w:
        for step in range(1, 6):
            w.write(step, {"loss": 1.0})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "time": 17.5, "lo')  # kill -9 in the middle of a write
    with caplog.at_level(logging.WARNING, logger="sft_jax.metrics"):
        with M.MetricsWriter(tmp_path, True, resume_step=4, tensorboard=False, progress=False) as w:
            w.write(5, {"loss": 0.5})
    assert "skipped 1 line(s)" in caplog.text and "line 6" in caplog.text
    assert _steps(tmp_path / "metrics.jsonl") == [1, 2, 3, 4, 5]
    assert read_rows(tmp_path / "metrics.jsonl")[-1]["loss"] == 0.5
    assert not (tmp_path / "metrics.jsonl.1").exists()
