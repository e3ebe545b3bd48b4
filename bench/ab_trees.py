#!/usr/bin/env python
"""Speed of two source trees of sft_jax (e.g. the commit before a redesign and after it), runs interleaved.

    python bench/ab_trees.py --a /path/to/old/tree --b . [--rounds 3] [--sizes medium] [--modes lora,full]
                             [--trl] [--out bench/ab_trees_results.json]

Each round runs `bench/vs_trl.py --quick` once from each tree, in separate processes (a fresh import of that
tree's `sft_jax`), alternating which tree goes first; both use the same model, data, packed batches and
optimizer (vs_trl.py's setup; each tree's own vs_trl.py drives its own train step). On a shared machine the
speed of the whole box drifts within minutes, so the result is the median over rounds of the paired ratio
B / A of sft_jax's steady tokens/s (> 1: B is faster), beside each side's median tokens/s and the load.
`--trl` also runs TRL's layouts in every process and reports each tree's sft_jax / best-TRL ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def git_rev(tree: Path) -> str:
    proc = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    rev = proc.stdout.strip() if proc.returncode == 0 else ""
    stamp = tree / "COMMIT"  # an exported tree (git archive) records its commit here
    if not rev and stamp.exists():
        rev = stamp.read_text().strip()[:12]
    return rev or "?"


def run_tree(tree: Path, args, out: Path) -> dict:
    cmd = [sys.executable, str(tree / "bench" / "vs_trl.py"), "--quick", "--sizes", args.sizes, "--modes", args.modes,
           "--sides", "trl,sft_jax" if args.trl else "sft_jax", "--out", str(out)]
    if args.steps:
        cmd += ["--steps", str(args.steps)]
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device, as vs_trl.py runs
    env["PYTHONPATH"] = str(tree)
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        raise SystemExit(f"{tree}: vs_trl.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--a", required=True, help="tree A (the baseline), a directory with sft_jax/ and bench/")
    ap.add_argument("--b", required=True, help="tree B")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sizes", default="medium")
    ap.add_argument("--modes", default="lora,full")
    ap.add_argument("--steps", type=int, default=None, help="vs_trl.py --steps (default: its --quick 6)")
    ap.add_argument("--trl", action="store_true", help="also run TRL in every process (sft_jax / TRL ratios)")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per vs_trl.py process")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    trees = {"A": Path(a.a).resolve(), "B": Path(a.b).resolve()}
    revs = {k: git_rev(t) for k, t in trees.items()}
    print(f"# bench/ab_trees.py {' '.join(sys.argv[1:])}", flush=True)
    print(f"# A = {trees['A']} ({revs['A']}), B = {trees['B']} ({revs['B']}); nproc {os.cpu_count()}, "
          f"load {loadavg()}", flush=True)
    rounds = []
    work = Path(tempfile.mkdtemp(prefix="ab_trees_"))
    for r in range(a.rounds):
        order = ["A", "B"] if r % 2 == 0 else ["B", "A"]
        got = {}
        for side in order:
            res = run_tree(trees[side], a, work / f"{side}_{r}.json")
            got[side] = {
                f"{row['size']}/{row['mode']}": {
                    "tokens_per_s": row["sft_jax"]["tokens_per_s"],
                    "trl_ratio": row.get("speedup"),
                    "losses": row["sft_jax"]["losses"],
                }
                for row in res["rows"]
            }
            got[side + "_load"] = res["machine"]["loadavg_start"]
            print(f"  round {r} {side}: " + ", ".join(f"{k} {v['tokens_per_s']:.0f} tok/s" + (
                f" (x{v['trl_ratio']:.2f} TRL)" if v["trl_ratio"] else "") for k, v in got[side].items())
                  + f"  load {loadavg()}", flush=True)
        rounds.append(got)
    summary = {}
    print(f"\n# median over {a.rounds} rounds; ratio = B / A sft_jax tokens/s, paired per round")
    print(f"{'row':14s} {'A tok/s':>9s} {'B tok/s':>9s} {'B/A':>6s}  {'B/A per round':24s} "
          f"{'A vs TRL':>8s} {'B vs TRL':>8s}  {'max |lossA-lossB|':>17s}")
    for key in rounds[0]["A"]:
        ta = [g["A"][key]["tokens_per_s"] for g in rounds]
        tb = [g["B"][key]["tokens_per_s"] for g in rounds]
        ratios = [y / x for x, y in zip(ta, tb)]
        trl_a = [g["A"][key]["trl_ratio"] for g in rounds if g["A"][key]["trl_ratio"]]
        trl_b = [g["B"][key]["trl_ratio"] for g in rounds if g["B"][key]["trl_ratio"]]
        dl = max(abs(x - y) for x, y in zip(rounds[0]["A"][key]["losses"], rounds[0]["B"][key]["losses"]))
        summary[key] = {"A_tokens_per_s": ta, "B_tokens_per_s": tb, "ratio_B_over_A": ratios,
                        "median_ratio": statistics.median(ratios), "A_vs_trl": trl_a, "B_vs_trl": trl_b,
                        "max_loss_diff": dl}

        def med(v):
            return f"{statistics.median(v):8.2f}" if v else f"{'-':>8s}"

        print(f"{key:14s} {statistics.median(ta):9.0f} {statistics.median(tb):9.0f} "
              f"{statistics.median(ratios):6.2f}  {' '.join(f'{x:.2f}' for x in ratios):24s} "
              f"{med(trl_a)} {med(trl_b)}  {dl:17.1e}")
    print(f"# load at end {loadavg()}")
    if a.out:
        Path(a.out).write_text(json.dumps({"trees": {k: str(v) for k, v in trees.items()}, "revs": revs,
                                           "argv": sys.argv[1:], "rounds": rounds, "summary": summary}, indent=1))
        print(f"# wrote {a.out}")


if __name__ == "__main__":
    main()
