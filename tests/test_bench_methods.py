"""bench/methods.py without training: every method of `sft_jax.peft.METHODS` has a default row, and every row
whose preset is in the tree resolves to a valid config at its preset's learning rate (no stale field names)."""

from __future__ import annotations

import argparse
import importlib.util

from sft_jax import peft


def _load_bench(repo_dir):
    spec = importlib.util.spec_from_file_location("bench_methods", repo_dir / "bench" / "methods.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_method_has_a_row_at_its_preset_lr(repo_dir, tmp_path):
    bench = _load_bench(repo_dir)
    a = argparse.Namespace(steps=3, batch=2, max_length=64, data=str(tmp_path / "data.json"))
    covered, problems = set(), []
    for name in bench.DEFAULT_ROWS.split(","):
        preset, extra = bench.ROWS[name]
        r = bench.resolve(name, preset, extra, a, str(tmp_path / "model"))
        if "skipped" in r:
            if (repo_dir / "configs" / f"{preset}.py").exists():
                problems.append(f"{name}: {r['skipped']}")
            continue
        covered.add(r["method"])
        assert r["lr"] == float(bench.load_preset(preset).train.lr), name  # the preset's lr, not a bench-wide one
        assert f"--config=configs/{preset}.py" in r["argv"] and "--config.train.steps=3" in r["argv"], name
        if r["method"] in ("lora", "dora", "pissa", "qlora", "qdora"):
            assert f"r={bench.LORA_RANK} " in r["describe"], (name, r["describe"])
    assert not problems, problems
    assert covered == set(peft.METHODS), f"methods without a default row: {sorted(set(peft.METHODS) - covered)}"
