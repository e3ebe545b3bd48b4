"""Throughput of the quality command's duplicate stage on synthetic rows, against a baseline.

    python bench/quality_dedup.py [--rows=100000] [--baseline_rows=10000] [--out=bench/quality_dedup.json]

Rows: an instruction of 8-20 words and a response of 30-120 words drawn from 5,000 made-up
words; 1% of the rows are planted exact copies (case / punctuation changed) and 1% near
copies (3 words of the response changed) of earlier rows.  Measured:

- ``find_duplicates`` (what the command runs): exact hashing, then ``MinHash.bulk`` over word
  3-shingles of one row per exact group, ``MinHashLSH`` insertion session, queries and the
  Jaccard check -- rows/s over all rows (wall and this process's CPU time: the machine may be
  shared), and recall against the plants (near copies also counted among those whose true
  shingle Jaccard is >= the 0.7 threshold) and rows clustered that were not planted;
- baseline, in the same process on the first ``--baseline_rows`` rows: the textbook datasketch
  loop (one ``MinHash`` per row, ``update`` per shingle, ``insert`` / ``query`` per row).
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import random
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import app, flags  # noqa: E402
from datasketch import MinHash, MinHashLSH  # noqa: E402

from sft_jax.data import quality_text  # noqa: E402

_ROWS = flags.DEFINE_integer("rows", 100_000, "synthetic rows")
_BASE = flags.DEFINE_integer("baseline_rows", 10_000, "rows for the baseline loop")
_OUT = flags.DEFINE_string("out", "", "write the results as JSON here")


def synthetic(n: int, seed: int = 0) -> tuple[list[dict], list[tuple[int, int]], list[tuple[int, int]]]:
    """Records, planted (original, exact copy) pairs and (original, near copy) pairs."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["".join(rng.choices(letters, k=rng.randint(2, 9))) for _ in range(5000)]
    recs, exact, near = [], [], []
    for i in range(n):
        if i > 100 and i % 100 == 0:
            j = rng.randrange(i - 100)
            m = recs[j]["messages"]
            recs.append({"messages": [{"role": "user", "content": m[0]["content"].upper()},
                                      {"role": "assistant", "content": m[1]["content"].replace(" ", "  ") + "!"}],
                         "source": f"synthetic:{i}"})
            exact.append((j, i))
            continue
        if i > 100 and i % 100 == 50:
            j = rng.randrange(i - 100)
            m = recs[j]["messages"]
            words = m[1]["content"].split()
            for k in rng.sample(range(len(words)), 3):
                words[k] = rng.choice(vocab)
            recs.append({"messages": [dict(m[0]), {"role": "assistant", "content": " ".join(words)}],
                         "source": f"synthetic:{i}"})
            near.append((j, i))
            continue
        recs.append({"messages": [
            {"role": "user", "content": " ".join(rng.choices(vocab, k=rng.randint(8, 20))) + "?"},
            {"role": "assistant", "content": " ".join(rng.choices(vocab, k=rng.randint(30, 120))) + "."}],
            "source": f"synthetic:{i}"})
    return recs, exact, near


def baseline(records: list[dict], threshold: float = 0.7, k: int = 3, num_perm: int = 128) -> tuple[float, float]:
    """The per-row datasketch loop; returns (wall seconds, CPU seconds of this process)."""
    t, c = time.perf_counter(), time.process_time()
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    hashes = []
    for i, r in enumerate(records):
        m = MinHash(num_perm=num_perm, seed=2)
        for s in quality_text.shingles(quality_text.normalise_words(quality_text.conversation_text(r["messages"])), k):
            m.update(s)
        lsh.insert(i, m)
        hashes.append(m)
    pairs = 0
    for i, m in enumerate(hashes):
        pairs += sum(1 for j in lsh.query(m) if j > i and m.jaccard(hashes[j]) >= threshold)
    return time.perf_counter() - t, time.process_time() - c


def main(argv):
    del argv
    t = time.perf_counter()
    records, exact, near = synthetic(_ROWS.value)
    gen_s = time.perf_counter() - t
    t, c = time.perf_counter(), time.process_time()
    clusters = quality_text.find_duplicates(records)
    ours_s, ours_cpu = time.perf_counter() - t, time.process_time() - c
    cluster_of = {i: ci for ci, c in enumerate(clusters) for i in c.members}
    found_exact = sum(1 for a, b in exact if a in cluster_of and cluster_of.get(a) == cluster_of.get(b))
    found_near = sum(1 for a, b in near if a in cluster_of and cluster_of.get(a) == cluster_of.get(b))

    def jaccard(a, b):
        sa, sb = (quality_text.shingles(quality_text.normalise_words(quality_text.conversation_text(
            records[i]["messages"])), 3) for i in (a, b))
        return len(sa & sb) / len(sa | sb)

    near_above = [(a, b) for a, b in near if jaccard(a, b) >= 0.7]
    found_near_above = sum(1 for a, b in near_above if a in cluster_of and cluster_of.get(a) == cluster_of.get(b))
    planted = {i for pair in exact + near for i in pair}
    spurious = sum(1 for c in clusters for i in c.members if i not in planted)
    n_base = min(_BASE.value, len(records))
    base_s, base_cpu = baseline(records[:n_base])
    res = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus",
        "rows": len(records), "generate_s": round(gen_s, 2),
        "ours_s": round(ours_s, 2), "ours_cpu_s": round(ours_cpu, 2), "ours_rows_per_s": round(len(records) / ours_s),
        "ours_rows_per_cpu_s": round(len(records) / ours_cpu),
        "baseline_rows": n_base, "baseline_s": round(base_s, 2), "baseline_cpu_s": round(base_cpu, 2),
        "baseline_rows_per_s": round(n_base / base_s), "baseline_rows_per_cpu_s": round(n_base / base_cpu),
        "speedup_wall": round((len(records) / ours_s) / (n_base / base_s), 2),
        "speedup_cpu": round((len(records) / ours_cpu) / (n_base / base_cpu), 2),
        "planted_exact": len(exact), "found_exact": found_exact, "planted_near": len(near), "found_near": found_near,
        "planted_near_true_jaccard_ge_0.7": len(near_above), "found_near_true_jaccard_ge_0.7": found_near_above,
        "clusters": len(clusters), "rows_in_clusters_not_planted": spurious,
    }
    print(json.dumps(res, indent=1))
    if _OUT.value:
        pathlib.Path(_OUT.value).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    app.run(main)
