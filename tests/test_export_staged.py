"""Exports are staged beside --out and renamed into place (`sft_jax.staged_dir`): a non-empty --out
is refused unless --overwrite, which replaces it whole; files are 0644; kill -9 during an export
leaves the old target intact."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys

import pytest

from sft_jax.export import main as export_main
from sft_jax.export import run_cli
from sft_jax.staged_dir import TargetExistsError, staged_dir
from test_train import REPO, _env
from test_workdir import shared_lora_run


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    return shared_lora_run(tmp_path_factory)


def _tree(d) -> dict[str, bytes]:
    return {os.path.relpath(os.path.join(r, f), d): open(os.path.join(r, f), "rb").read()
            for r, _, files in os.walk(d) for f in files}


def _siblings(out) -> list[str]:
    return sorted(n for n in os.listdir(os.path.dirname(out)) if n != os.path.basename(out))


def test_staged_dir_refuses_replaces_whole_and_keeps_target_on_failure(tmp_path):
    out = str(tmp_path / "out")
    with staged_dir(out) as d:  # new target
        open(os.path.join(d, "a.txt"), "w").write("one")
    with pytest.raises(TargetExistsError, match="not empty; pass --overwrite"):
        with staged_dir(out) as d:
            pass
    with pytest.raises(RuntimeError, match="boom"):  # a failed export: the old target is untouched
        with staged_dir(out, overwrite=True) as d:
            open(os.path.join(d, "b.txt"), "w").write("two")
            raise RuntimeError("boom")
    assert _tree(out) == {"a.txt": b"one"} and _siblings(out) == []
    old_umask = os.umask(0o077)  # files would be 0600 and the staging directory is 0700
    try:
        with staged_dir(out, overwrite=True) as d:
            os.makedirs(os.path.join(d, "sub"))
            open(os.path.join(d, "sub", "c.bin"), "wb").write(b"\0")
    finally:
        os.umask(old_umask)
    assert _tree(out) == {os.path.join("sub", "c.bin"): b"\0"}  # replaced whole: a.txt is gone
    assert _siblings(out) == []
    assert stat.S_IMODE(os.stat(os.path.join(out, "sub", "c.bin")).st_mode) == 0o644
    assert stat.S_IMODE(os.stat(os.path.join(out, "sub")).st_mode) == 0o755
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o755
    open(tmp_path / "file", "w").write("x")
    with pytest.raises(TargetExistsError, match="not a directory"):
        with staged_dir(str(tmp_path / "file"), overwrite=True):
            pass


def test_cli_refuses_non_empty_out_and_overwrite_leaves_no_stale_files(lora_run, tmp_path, capsys):
    """The issue's case: a PEFT export, then a merged one into the same directory. Without
    --overwrite: one line, exit 2, nothing changed; with it: exactly a fresh merged export's files
    (no adapter_config.json that would make transformers load base + adapter)."""
    wd, _ = lora_run
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    assert export_main([f"--workdir={wd}", f"--out={out}", "--format=peft", "--dtype=float32"]) == 0
    peft_files = _tree(out)
    assert "adapter_config.json" in peft_files
    capsys.readouterr()
    rc = run_cli(export_main, [f"--workdir={wd}", f"--out={out}", "--format=merged"], "export")
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "--overwrite" in err, err
    assert _tree(out) == peft_files
    assert export_main([f"--workdir={wd}", f"--out={out}", "--format=merged", "--dtype=float32", "--overwrite"]) == 0
    assert export_main([f"--workdir={wd}", f"--out={fresh}", "--format=merged", "--dtype=float32"]) == 0
    assert sorted(_tree(out)) == sorted(_tree(fresh)) and "adapter_config.json" not in _tree(out)
    assert _tree(out)["model.safetensors"] == _tree(fresh)["model.safetensors"]
    assert all(stat.S_IMODE(os.stat(out / f).st_mode) == 0o644 for f in _tree(out))
    assert _siblings(out) == ["fresh"]


KILL_AFTER_WEIGHTS = (
    "import os, signal, sys; import sft_jax.export as e\n"
    "def killed(src, out):\n"
    "    os.kill(os.getpid(), signal.SIGKILL)  # kill -9 with the weights written, the export not finished\n"
    "e.copy_tokenizer = killed\n"
    "sys.exit(e.run_cli(e.main, sys.argv[1:], 'export'))\n"
)


def test_kill_9_during_export_leaves_the_old_target_intact(lora_run, tmp_path):
    wd, _ = lora_run
    out = tmp_path / "out"
    assert export_main([f"--workdir={wd}", f"--out={out}", "--format=peft", "--dtype=float32"]) == 0
    before = _tree(out)
    p = subprocess.run([sys.executable, "-c", KILL_AFTER_WEIGHTS, f"--workdir={wd}", f"--out={out}",
                        "--format=merged", "--dtype=float32", "--overwrite"],
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    assert _tree(out) == before
    left = _siblings(out)
    assert len(left) == 1 and left[0].startswith(".out.export-")  # the half-written staging directory
    assert any(f.endswith(".safetensors") for f in _tree(tmp_path / left[0]))  # killed after the weights
    # the next export removes the dead process's staging directory
    assert export_main([f"--workdir={wd}", f"--out={out}", "--format=merged", "--dtype=float32", "--overwrite"]) == 0
    assert _siblings(out) == [] and "config.json" in _tree(out) and "adapter_config.json" not in _tree(out)
