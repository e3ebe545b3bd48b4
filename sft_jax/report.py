"""A training run's report, readable without TensorBoard.

    python -m sft_jax.report --workdir=DIR [--out=DIR (default WORKDIR/report)]

Reads WORKDIR/metrics.jsonl (and run_info.json for the summary) and writes `curves.png` (training
loss with every eval loss, learning rate, gradient norm, tokens/s; the best step marked on each: the
evaluation `train.early_stopping.metric` / `checkpoint.keep_best` pick, e.g. `eval_a/loss` of a named
eval set, with the same rule and `min_delta`) and `index.html` (the figure, a summary and the table of every
evaluation, the best row in bold).  Steps logged twice (a resumed run repeats the steps after its
checkpoint) keep their last row; a truncated last line (a run killed while writing) is skipped
with a warning.  Other bad input prints one line on stderr and exits with code 2.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import sys

from sft_jax.cli import OneLineArgumentParser, UsageError, run_cli
from sft_jax.html_report import IMAGES_SCRIPT, STYLE, escape, img, plt, save_figure, table
from sft_jax.metrics import lower_is_better

PROG = "python -m sft_jax.report"
BEST_METRIC = "eval_loss"


class ReportError(ValueError):
    """Unusable metrics: the message names the file, line and field."""


def read_metrics(path: str | os.PathLike) -> tuple[dict[int, dict], dict[int, dict], list[str]]:
    """metrics.jsonl -> (train rows, eval rows, notes): rows as {step: row} (a repeated step keeps its
    last row); a last line cut short (no newline: a run killed while writing) is skipped with a note."""
    train: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    notes: list[str] = []
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if n == len(lines) and not line.endswith("\n"):
                notes.append(f"{path}:{n}: skipped a truncated last line (a run killed while writing)")
                continue
            raise ReportError(f"{path}:{n}: not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise ReportError(f"{path}:{n}: field 'step' missing or not an integer")
        for k, v in row.items():
            if k != "step" and not isinstance(v, (int, float, str, type(None))):
                raise ReportError(f"{path}:{n}: field {k!r} is not a number or a string")
        step = row["step"]
        if any(k.startswith("eval_") for k in row):
            evals[step] = {k: v for k, v in row.items() if k.startswith("eval_")}
        if "loss" in row:
            train[step] = row
    return train, evals, notes


def best_metric(info: dict, evals: dict[int, dict]) -> tuple[str, float]:
    """-> (the metrics.jsonl key of the eval metric the run picks its best step by, min_delta): run_info.json's
    `best_metric` (the trainer's resolved `train.early_stopping.metric`), else that config field resolved the
    trainer's way ("loss" of a run with only named eval sets = the first set's `NAME/loss`); `eval_loss` when
    run_info.json has neither."""
    cfg = info.get("config") if isinstance(info.get("config"), dict) else {}
    es = ((cfg.get("train") or {}).get("early_stopping") or {}) if isinstance(cfg.get("train"), dict) else {}
    min_delta = float(es.get("min_delta") or 0.0) if isinstance(es, dict) else 0.0
    metric = info.get("best_metric") or (es.get("metric") if isinstance(es, dict) else None) or "loss"
    present = {k for row in evals.values() for k in row}
    if metric == "loss" and BEST_METRIC not in present:
        eval_path = str((cfg.get("data") or {}).get("eval_path") or "") if isinstance(cfg.get("data"), dict) else ""
        first = eval_path.split(",")[0].partition("=")
        named = sorted(k for k in present if k.endswith("/loss"))
        if first[1] and f"eval_{first[0].strip()}/loss" in present:
            metric = f"{first[0].strip()}/loss"
        elif named:
            metric = named[0][len("eval_"):]
    return f"eval_{metric}", min_delta


def best_step(evals: dict[int, dict], metric: str = BEST_METRIC, min_delta: float = 0.0) -> int | None:
    """The best step by `metric` (a metrics.jsonl key), as the trainer's tracker sees it: evaluations in step
    order, a new best only when it beats the best so far by more than `min_delta` (lower is better for losses,
    repetition and length, higher otherwise; so the first of ties); None when never evaluated."""
    lower = lower_is_better(metric[len("eval_"):] if metric.startswith("eval_") else metric)
    best = best_value = None
    for s, v in sorted(evals.items()):
        x = v.get(metric)
        if not isinstance(x, (int, float)) or not math.isfinite(x):
            continue
        if best_value is None or (x < best_value - min_delta if lower else x > best_value + min_delta):
            best, best_value = s, x
    return best


def _eval_loss_keys(evals: dict[int, dict], metric: str = BEST_METRIC) -> list[str]:
    keys = {k for row in evals.values() for k in row if k.endswith("loss")}
    return sorted(keys, key=lambda k: (k != metric, k))


def _series(rows: dict[int, dict], key: str, skip_compile: bool = False) -> tuple[list[int], list[float]]:
    pts = [(s, r[key]) for s, r in sorted(rows.items()) if isinstance(r.get(key), (int, float))
           and not (skip_compile and r.get("compile_time_s"))]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_curves(train: dict[int, dict], evals: dict[int, dict], best: int | None, path: pathlib.Path,
                metric: str = BEST_METRIC) -> str:
    """The 2x2 figure (losses, lr, grad norm, tokens/s) as a PNG; returns its file name.  The star: `best`'s
    `metric` on the loss panel when that is a loss, else the first loss curve at `best` (labelled with the metric)."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    ax = axes[0][0]
    ax.plot(*_series(train, "loss"), label="train loss", linewidth=1)
    loss_keys = _eval_loss_keys(evals, metric)
    for key in loss_keys:
        ax.plot(*_series(evals, key), marker="o", label=key.replace("_", " ", 1))
    star_key = None
    if best is not None:
        star_key = metric if metric in loss_keys else next(
            (k for k in loss_keys if isinstance(evals[best].get(k), (int, float))), None)
    if best is not None and star_key is not None:
        label = f"best step {best}" + ("" if star_key == metric else f" ({metric} {evals[best][metric]:.4g})")
        ax.plot([best], [evals[best][star_key]], marker="*", markersize=16, color="red", linestyle="none",
                label=label)
    ax.set_title("loss")
    ax.legend(fontsize=8)
    panels = [(axes[0][1], "lr", "learning rate", False), (axes[1][0], "grad_norm", "gradient norm (before clipping)",
                                                            False),
              (axes[1][1], "tokens_per_s", "tokens/s (compile steps left out)", True)]
    for ax, key, title, skip in panels:
        ax.plot(*_series(train, key, skip_compile=skip), linewidth=1)
        ax.set_title(title)
    for ax in axes.flat:
        ax.set_xlabel("step")
        if best is not None:
            ax.axvline(best, color="red", linestyle=":", linewidth=1)
    return save_figure(fig, path)


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return escape("" if v is None else v)


def write_report(workdir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> str:
    """Write curves.png and index.html into `out_dir` (default WORKDIR/report); returns the HTML path."""
    workdir = pathlib.Path(workdir)
    metrics = workdir / "metrics.jsonl"
    if not metrics.is_file():
        raise UsageError(f"--workdir: {metrics} not found (is {workdir} a training work directory?)")
    train, evals, notes = read_metrics(metrics)
    if not train and not evals:
        raise ReportError(f"{metrics}: no metric rows")
    out = pathlib.Path(out_dir) if out_dir else workdir / "report"
    out.mkdir(parents=True, exist_ok=True)
    info_path = workdir / "run_info.json"
    try:
        info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    except (OSError, json.JSONDecodeError) as e:
        raise ReportError(f"{info_path}: not readable JSON ({e})") from None
    info = info if isinstance(info, dict) else {}
    metric, min_delta = best_metric(info, evals)
    best = best_step(evals, metric, min_delta)
    png = plot_curves(train, evals, best, out / "curves.png", metric)
    last = train[max(train)] if train else {}
    summary = [["work directory", escape(workdir.resolve())],
               ["steps logged", f"{max(train) if train else 0} of {info.get('total_steps', '?')}"],
               ["last training loss", _cell(last.get("loss"))],
               [f"best step ({'lowest' if lower_is_better(metric[5:]) else 'highest'} {escape(metric)})",
                "-" if best is None else f"{best} ({_cell(evals[best][metric])})"]]
    for k in ("model_params", "trainable_params", "base_model"):
        if k in info:
            summary.append([escape(k.replace("_", " ")), _cell(info[k])])
    summary += [["note", escape(n)] for n in notes]
    cols = sorted({k for row in evals.values() for k in row}, key=lambda k: (k != metric, k))
    rows = []
    for s, row in sorted(evals.items()):
        cells = [str(s)] + [_cell(row.get(k)) for k in cols]
        rows.append([f"<b>{c}</b>" for c in cells] if s == best else cells)
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>sft_jax run report</title>", STYLE,
             "</head><body>", f"<h1>Run report: {escape(workdir.resolve().name)}</h1>", table(["", ""], summary),
             "<h2>Curves</h2>", img(png, "loss, eval loss, lr, grad norm and tokens/s curves"),
             "<h2>Evaluations</h2>",
             table(["step"] + cols, rows) if rows else "<p>No evaluations logged.</p>", IMAGES_SCRIPT,
             "</body></html>"]
    path = out / "index.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    for n in notes:
        print(f"warning: {n}", file=sys.stderr)
    return str(path)


def main(argv: list[str] | None = None) -> int:
    p = OneLineArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="a training work directory")
    p.add_argument("--out", default=None, help="output directory (default WORKDIR/report)")
    args = p.parse_args(argv)
    try:
        path = write_report(args.workdir, args.out)
    except ReportError as e:
        raise UsageError(str(e)) from None
    print(f"report: {path} (+ curves.png)")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:], PROG))
