"""Host memory and throughput of the data pipeline on a corpus of a few GB: streamed
(``data.streaming=True``: JSONL line offsets, Parquet row groups) vs today's in-memory readers.

    python bench/data_streaming.py [--gb=2] [--batches=200] [--dir=/tmp/sft_jax_stream_bench] [--keep] [--reuse]

Writes a synthetic messages-format corpus (distinct ~1 KB rows, 1-3 turns) as one JSONL file of
``--gb`` GB and as Parquet shards of the same rows, then runs each case in a fresh process and
reports its peak RSS (``ru_maxrss``):

- ``pipeline``: ``build_train_iterator`` (chatml, tiny BPE tokenizer, packed rows of 1024, batch
  8, shuffled) -> the first ``--batches`` batches: open seconds (sources indexed / loaded),
  examples/s and tokens/s after it.
- ``epoch``: every row of the corpus through the streaming block shuffle and the readers
  (parsed and validated records, no tokenization): rows/s -- a whole pass in bounded memory.

The in-memory baseline (today's default) cannot hold the full corpus on this 24 GiB machine
shared by several engineers, so it runs on a 1/16 slice; the streamed reader runs on the same
slice (same-size throughput) and on the full corpus.  The corpus is deleted afterwards.
"""

import argparse
import json
import os
import pathlib
import platform
import random
import resource
import shutil
import subprocess
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SLICE = 16  # the in-memory baseline reads 1/SLICE of the corpus


def _rows(seed: int = 0):
    """Endless distinct rows of about 1 KB."""
    from sft_jax.data.testing import CORPUS

    rng = random.Random(seed)
    words = CORPUS.replace("\n", " ").split()
    i = 0
    while True:
        msgs = [{"role": "system", "content": "Be nice and helpful."}] if i % 3 == 0 else []
        for t in range(1 + i % 3):
            msgs.append({"role": "user", "content": f"Question {i}.{t}: " + " ".join(rng.choices(words, k=25))})
            msgs.append({"role": "assistant", "content": f"Answer {i}.{t}: " + " ".join(rng.choices(words, k=90 // (1 + i % 3)))})
        yield {"messages": msgs}
        i += 1


def write_corpus(directory: pathlib.Path, gb: float) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory.mkdir(parents=True, exist_ok=True)
    jsonl, part = directory / "corpus.jsonl", directory / f"slice_1_of_{SLICE}.jsonl"
    shards = directory / "parquet"
    shards.mkdir(exist_ok=True)
    target, n, size = gb * 1e9, 0, 0
    batch, shard_rows, shard, writer = [], 0, 0, None
    t0 = time.perf_counter()
    with open(jsonl, "w") as f, open(part, "w") as g:
        for row in _rows():
            line = json.dumps(row) + "\n"
            f.write(line)
            if size < target / SLICE:
                g.write(line)
            size += len(line)
            n += 1
            batch.append(row)
            if len(batch) == 2000:  # one Parquet row group; 4 shards
                if writer is None:
                    table = pa.Table.from_pylist(batch)
                    writer = pq.ParquetWriter(str(shards / f"train-{shard:05d}.parquet"), table.schema)
                else:
                    table = pa.Table.from_pylist(batch, schema=writer.schema)
                writer.write_table(table, row_group_size=2000)
                shard_rows += len(batch)
                batch = []
                if shard_rows >= target / 4 / 1000 and size < target:  # ~1 KB rows
                    writer.close()
                    writer, shard, shard_rows = None, shard + 1, 0
            if size >= target and not batch:
                break
    if writer is not None:
        writer.close()
    pq_bytes = sum(p.stat().st_size for p in shards.iterdir())
    info = {"rows": n, "jsonl_bytes": size, "parquet_bytes": pq_bytes, "parquet_shards": len(list(shards.iterdir())),
            "slice_rows": sum(1 for _ in open(part)), "slice_bytes": part.stat().st_size,
            "write_seconds": time.perf_counter() - t0}
    (directory / "corpus.json").write_text(json.dumps(info))
    return info


# ------------------------------------------------------------------------------ children


def _cfg(path: str, streaming: bool):
    from sft_jax.config import default_config

    c = default_config().data
    c.path, c.template, c.max_length, c.eval_fraction, c.streaming = path, "chatml", 1024, 0.0, streaming
    return c


def child_pipeline(path: str, streaming: bool, batches: int) -> dict:
    from sft_jax.data import pipeline, templates, testing

    tok, _ = templates.prepare_tokenizer(testing.tiny_fast_tokenizer(), "chatml")
    t0 = time.perf_counter()
    it = pipeline.build_train_iterator(_cfg(path, streaming), tok, global_batch_size=8, seed=0, process_index=0,
                                       process_count=1, epochs=None)
    first = next(it)
    t_open = time.perf_counter() - t0
    rss_open = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ex0, tok0 = it.stats.examples, it.stats.tokens
    t1 = time.perf_counter()
    real = int((first["segment_ids"] > 0).sum())
    for _ in range(batches):
        real += int((next(it)["segment_ids"] > 0).sum())
    dt = time.perf_counter() - t1
    return {"open_s": t_open, "rss_after_open_mb": rss_open, "seconds": dt,
            "examples_per_s": (it.stats.examples - ex0) / dt, "tokens_per_s": (it.stats.tokens - tok0) / dt,
            "batches": batches + 1, "real_tokens": real}


def child_epoch(path: str) -> dict:
    from sft_jax.data import pipeline

    cfg = _cfg(path, True)
    t0 = time.perf_counter()
    groups = pipeline.split_records(cfg, "train")
    ds = pipeline._row_dataset(groups, None, seed=0, shuffle=True, epochs=1, window=cfg.shuffle_window)
    t_open = time.perf_counter() - t0
    t1 = time.perf_counter()
    n = turns = 0
    for i in range(len(ds)):
        n += 1
        turns += len(ds[i]["messages"])
    dt = time.perf_counter() - t1
    return {"open_s": t_open, "seconds": dt, "rows": n, "rows_per_s": n / dt, "messages": turns}


def run_child(args: list[str]) -> dict:
    p = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, cwd=REPO)
    if p.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gb", type=float, default=2.0)
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--dir", default="/tmp/sft_jax_stream_bench")
    ap.add_argument("--keep", action="store_true", help="keep the corpus")
    ap.add_argument("--reuse", action="store_true", help="use the corpus a --keep run left in --dir")
    ap.add_argument("--out", default=str(REPO / "bench" / "data_streaming.json"))
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        kind, path, *rest = a.child
        res = child_pipeline(path, rest[0] == "1", int(rest[1])) if kind == "pipeline" else child_epoch(path)
        res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(res))
        return
    d = pathlib.Path(a.dir)
    try:
        done = d / "corpus.json"
        corpus = json.loads(done.read_text()) if a.reuse and done.exists() else write_corpus(d, a.gb)
        print(f"corpus: {corpus['rows']:,} rows, JSONL {corpus['jsonl_bytes'] / 1e9:.2f} GB, Parquet "
              f"{corpus['parquet_bytes'] / 1e9:.2f} GB in {corpus['parquet_shards']} shards (row groups of 2,000); "
              f"slice 1/{SLICE}: {corpus['slice_rows']:,} rows, {corpus['slice_bytes'] / 1e6:.0f} MB "
              f"(written in {corpus['write_seconds']:.0f} s)", flush=True)
        full, part, shards = str(d / "corpus.jsonl"), str(d / f"slice_1_of_{SLICE}.jsonl"), str(d / "parquet")
        cases = [
            ("in-memory (today), JSONL slice", "pipeline", part, "0"),
            ("streaming, JSONL slice", "pipeline", part, "1"),
            ("streaming, JSONL full", "pipeline", full, "1"),
            ("streaming, Parquet full", "pipeline", shards, "1"),
            ("streaming, JSONL full, whole epoch (rows)", "epoch", full, "1"),
            ("streaming, Parquet full, whole epoch (rows)", "epoch", shards, "1"),
        ]
        results = []
        for name, kind, path, streaming in cases:
            args = [kind, path] + ([streaming, str(a.batches)] if kind == "pipeline" else [])
            r = run_child(args)
            r.update(case=name, kind=kind)
            results.append(r)
            print(json.dumps(r), flush=True)
    finally:
        if not a.keep:
            shutil.rmtree(d, ignore_errors=True)
    base = results[0]["peak_rss_mb"] - results[1]["peak_rss_mb"]  # rows held in memory, per slice
    out = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs visible, python {platform.python_version()}",
           "date": time.strftime("%Y-%m-%d"), "corpus": corpus, "batches": a.batches, "results": results,
           "in_memory_full_corpus_rss_estimate_mb": results[1]["peak_rss_mb"] + base * SLICE}
    pathlib.Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"\n{'case':46s} {'open s':>7s} {'peak RSS MB':>11s} {'examples/s':>10s} {'tokens/s':>9s} {'rows/s':>8s}")
    for r in results:
        print(f"{r['case']:46s} {r['open_s']:7.1f} {r['peak_rss_mb']:11.0f} {r.get('examples_per_s', 0):10.0f} "
              f"{r.get('tokens_per_s', 0):9.0f} {r.get('rows_per_s', 0):8.0f}")
    print(f"(in-memory readers on the full corpus: about {out['in_memory_full_corpus_rss_estimate_mb'] / 1024:.1f} GB "
          f"peak RSS, extrapolated from the slice: {base:.0f} MB of rows per 1/{SLICE})")


if __name__ == "__main__":
    main()
