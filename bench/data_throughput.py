"""Preprocessing throughput of the data pipeline on LIMA (read -> template -> tokenize+mask ->
pack -> batch), in process and with 1 and 2 grain worker processes.

    python bench/data_throughput.py [--max_length=2048] [--template=chatml]

Needs ../shared (LIMA + stories260K's tok512).  Each configuration runs one full epoch
(1,029 rows) through `build_train_iterator` and reports examples/s and tokens/s (real
tokens, i.e. non-padding input tokens) plus the packing efficiency it achieved.
"""

import os
import pathlib
import platform
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import app, flags  # noqa: E402

_MAX_LEN = flags.DEFINE_integer("max_length", 2048, "packed row length")
_TEMPLATE = flags.DEFINE_string("template", "chatml", "built-in template")
_WORKERS = flags.DEFINE_list("workers", ["0", "1", "2"], "worker counts to run")

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared"


def run(num_workers: int, epochs: int) -> dict:
    from sft_jax.config import default_config
    from sft_jax.data import pipeline, templates

    cfg = default_config().data
    cfg.path = str(SHARED / "data" / "lima.json")
    cfg.template = _TEMPLATE.value
    cfg.max_length = _MAX_LEN.value
    cfg.eval_fraction = 0.0
    cfg.num_workers = num_workers
    tok = pipeline.load_tokenizer(str(SHARED / "assets" / "stories260K" / "tok512.model"))
    tok, _ = templates.prepare_tokenizer(tok, cfg.template, add_tokens=False)
    t0 = time.perf_counter()
    it = pipeline.build_train_iterator(cfg, tok, global_batch_size=8, seed=0, process_index=0, process_count=1,
                                       epochs=epochs)
    real = slots = batches = 0
    for b in it:
        batches += 1
        used = b["segment_ids"].max(axis=1) > 0
        slots += int(used.sum()) * b["inputs"].shape[1]
        real += int((b["segment_ids"] > 0).sum())
    dt = time.perf_counter() - t0
    it.close()
    s = it.stats
    return {"workers": num_workers, "seconds": dt, "rows": s.rows, "examples": s.examples,
            "tokens": s.tokens, "real": real, "batches": batches, "eff": real / max(slots, 1)}


def tokenize_stage(num_workers: int, epochs: int) -> dict:
    """rows -> template + tokenize + mask through grain (mp_prefetch when workers > 0), no packing."""
    import grain
    from absl import flags as absl_flags
    from sft_jax.config import default_config
    from sft_jax.data import pipeline, templates

    cfg = default_config().data
    cfg.path = str(SHARED / "data" / "lima.json")
    cfg.template, cfg.max_length, cfg.eval_fraction = _TEMPLATE.value, _MAX_LEN.value, 0.0
    tok = pipeline.load_tokenizer(str(SHARED / "assets" / "stories260K" / "tok512.model"))
    tok, _ = templates.prepare_tokenizer(tok, cfg.template, add_tokens=False)
    groups = pipeline.split_records(cfg, "train")
    t0 = time.perf_counter()
    ds = pipeline._row_dataset(groups, None, seed=0, shuffle=True, epochs=epochs)
    ds = ds.map(pipeline.TokenizeFn(tok, templates.get_template(cfg.template), max_length=cfg.max_length,
                                    truncation=cfg.truncation, train_on=cfg.train_on))
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1 if num_workers else 2, prefetch_buffer_size=64))
    if num_workers:
        if not absl_flags.FLAGS.is_parsed():
            absl_flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=8))
    it = iter(ds)
    n = tokens = 0
    t_first = None
    for ex in it:
        if t_first is None:
            t_first = time.perf_counter()
        else:
            n += 1
            tokens += len(ex["inputs"])
    t_end = time.perf_counter()
    it.close()
    return {"startup": t_first - t0, "steady_s": t_end - t_first, "examples": n, "tokens": tokens}


def main(argv):
    del argv
    if not (SHARED / "data" / "lima.json").exists():
        print(f"skipped: {SHARED} not found")
        return
    print(f"data pipeline throughput, LIMA (1,029 rows), template={_TEMPLATE.value}, tok512 (markers as text), "
          f"max_length={_MAX_LEN.value}, packed first_fit, batch 8")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs visible, python {platform.python_version()}")
    print(f"{'workers':>7} {'epochs':>6} {'seconds':>8} {'rows/s':>8} {'examples/s':>10} {'tokens/s':>10} {'batches':>7} "
          f"{'packing eff':>11}")
    for w in [int(x) for x in _WORKERS.value]:
        r = run(w, 1)
        print(f"{r['workers']:>7} {1:>6} {r['seconds']:>8.2f} {r['rows'] / r['seconds']:>8.0f} "
              f"{r['examples'] / r['seconds']:>10.0f} {r['tokens'] / r['seconds']:>10.0f} {r['batches']:>7} "
              f"{r['eff']:>11.4f}")
    print("(end to end: seconds = iterator creation to exhaustion, worker start-up included; tokens = real input tokens)")
    print()
    print("tokenize stage alone (template + tokenize + mask + shift through grain, 2 epochs = 2,058 rows):")
    print(f"{'workers':>7} {'start-up s':>10} {'examples/s':>10} {'tokens/s':>10}")
    for w in [int(x) for x in _WORKERS.value]:
        r = tokenize_stage(w, 2)
        print(f"{w:>7} {r['startup']:>10.2f} {r['examples'] / r['steady_s']:>10.0f} {r['tokens'] / r['steady_s']:>10.0f}")
    print("(start-up = time to the first example: worker processes import the stack; rates after it)")


if __name__ == "__main__":
    app.run(main)
