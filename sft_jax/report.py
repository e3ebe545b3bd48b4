"""A training run's report, readable without TensorBoard.

    python -m sft_jax.report --workdir=DIR [--out=DIR (default WORKDIR/report)]

Reads WORKDIR/metrics.jsonl (and run_info.json for the summary) and writes `curves.png` (training
loss with every eval loss, learning rate, gradient norm, tokens/s; the best step, the lowest
`eval_loss`, marked on each) and `index.html` (the figure, a summary and the table of every
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


def best_step(evals: dict[int, dict], metric: str = BEST_METRIC) -> int | None:
    """The step with the lowest finite `metric` (the first of ties), None when never evaluated."""
    scored = [(v[metric], s) for s, v in sorted(evals.items())
              if isinstance(v.get(metric), (int, float)) and math.isfinite(v[metric])]
    return min(scored)[1] if scored else None


def _eval_loss_keys(evals: dict[int, dict]) -> list[str]:
    keys = {k for row in evals.values() for k in row if k.endswith("loss")}
    return sorted(keys, key=lambda k: (k != BEST_METRIC, k))


def _series(rows: dict[int, dict], key: str, skip_compile: bool = False) -> tuple[list[int], list[float]]:
    pts = [(s, r[key]) for s, r in sorted(rows.items()) if isinstance(r.get(key), (int, float))
           and not (skip_compile and r.get("compile_time_s"))]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_curves(train: dict[int, dict], evals: dict[int, dict], best: int | None, path: pathlib.Path) -> str:
    """The 2x2 figure (losses, lr, grad norm, tokens/s) as a PNG; returns its file name."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    ax = axes[0][0]
    ax.plot(*_series(train, "loss"), label="train loss", linewidth=1)
    for key in _eval_loss_keys(evals):
        ax.plot(*_series(evals, key), marker="o", label=key.replace("_", " ", 1))
    if best is not None:
        ax.plot([best], [evals[best][BEST_METRIC]], marker="*", markersize=16, color="red", linestyle="none",
                label=f"best step {best}")
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
    best = best_step(evals)
    png = plot_curves(train, evals, best, out / "curves.png")

    info_path = workdir / "run_info.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    last = train[max(train)] if train else {}
    summary = [["work directory", escape(workdir.resolve())],
               ["steps logged", f"{max(train) if train else 0} of {info.get('total_steps', '?')}"],
               ["last training loss", _cell(last.get("loss"))],
               ["best step (lowest eval_loss)", "-" if best is None else
                f"{best} ({_cell(evals[best][BEST_METRIC])})"]]
    for k in ("model_params", "trainable_params", "base_model"):
        if k in info:
            summary.append([escape(k.replace("_", " ")), _cell(info[k])])
    summary += [["note", escape(n)] for n in notes]
    cols = sorted({k for row in evals.values() for k in row}, key=lambda k: (k != BEST_METRIC, k))
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
