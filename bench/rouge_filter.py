"""Self-Instruct's ROUGE-L novelty filter against a 50K-instruction pool: sft_jax.synth.filters.RougeLPool
(tokenize once, inverted-index overlap bound, exact LCS only where the bound reaches the threshold)
vs brute-force rouge_score (`RougeScorer(["rougeL"]).score` against every pool entry, as the reference
Self-Instruct code does, there spread over worker processes), in the same run.

    python bench/rouge_filter.py [--pool 50000] [--queries 2000] [--baseline-queries 4] [--threshold 0.7]

The pool is synthetic and deterministic: each entry is one of the 175 Self-Instruct seed instructions
(../shared/data/self_instruct_seed_tasks.jsonl) with about half of its words replaced by words drawn from
the seeds' own word frequencies, so lengths and common-word statistics are those of real instructions.
Queries: half fresh entries made the same way, half near-copies of pool entries (one or two words
changed), so both decisions are exercised.  Every baseline query's decision is checked against the fast
path (the script fails on a mismatch).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import random
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from rouge_score import rouge_scorer  # noqa: E402

from sft_jax.synth.filters import RougeLPool  # noqa: E402

SEEDS = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "self_instruct_seed_tasks.jsonl"


def make_texts(n: int, seed: int) -> tuple[list[str], list[str]]:
    seeds = [json.loads(x)["instruction"] for x in SEEDS.read_text().splitlines() if x.strip()]
    words = [w for s in seeds for w in s.split()]
    r = random.Random(seed)

    def variant(base: str, p: float) -> str:
        return " ".join(r.choice(words) if r.random() < p else w for w in base.split())

    pool = [variant(r.choice(seeds), 0.5) for _ in range(n)]
    return pool, [variant(r.choice(seeds), 0.5) for _ in range(n)] + [variant(r.choice(pool), 0.08) for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pool", type=int, default=50_000)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--baseline-queries", type=int, default=4)
    ap.add_argument("--threshold", type=float, default=0.7)
    a = ap.parse_args()
    pool_texts, extra = make_texts(a.pool, 0)
    r = random.Random(1)
    fresh, near = extra[: a.pool], extra[a.pool:]
    queries = [q for pair in zip(r.sample(fresh, a.queries // 2), r.sample(near, a.queries // 2)) for q in pair]

    t0 = time.perf_counter()
    pool = RougeLPool(a.threshold, pool_texts)
    build = time.perf_counter() - t0
    t0 = time.perf_counter()
    fast = [pool.most_similar(q) for q in queries]
    fast_s = time.perf_counter() - t0
    rejected = sum(x is not None for x in fast)

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    t0 = time.perf_counter()
    for q, got in zip(queries[: a.baseline_queries], fast):
        best = max(scorer.score(q, t)["rougeL"].fmeasure for t in pool_texts)
        if (best >= a.threshold) != (got is not None) or (got is not None and got[1] != best):
            raise SystemExit(f"MISMATCH on {q!r}: brute force {best}, fast {got}")
    base_s = time.perf_counter() - t0
    nb = a.baseline_queries

    print(f"$ python bench/rouge_filter.py --pool {a.pool} --queries {a.queries} --baseline-queries {nb}")
    print(f"machine: {platform.machine()}, python {platform.python_version()}; ROUGE-L threshold {a.threshold}")
    print(f"pool: {a.pool} instructions, mean {sum(len(t.split()) for t in pool_texts) / a.pool:.1f} words; "
          f"built (tokenized + indexed) in {build:.2f} s")
    print(f"{'method':<34}{'queries':>8}{'seconds':>10}{'queries/s':>12}{'ms/query':>10}")
    print(f"{'rouge_score brute force':<34}{nb:>8}{base_s:>10.2f}{nb / base_s:>12.3f}{1000 * base_s / nb:>10.1f}")
    print(f"{'RougeLPool (sft_jax.synth)':<34}{len(queries):>8}{fast_s:>10.2f}{len(queries) / fast_s:>12.1f}"
          f"{1000 * fast_s / len(queries):>10.2f}")
    print(f"speed-up: {(base_s / nb) / (fast_s / len(queries)):.0f}x; decisions identical on the {nb} baseline "
          f"queries; {rejected}/{len(queries)} queries rejected (ROUGE-L >= {a.threshold}); exact LCS computed for "
          f"{pool.exact_checks} of {len(queries) * a.pool} (query, entry) pairs")


if __name__ == "__main__":
    main()
