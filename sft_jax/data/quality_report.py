"""The quality report: one static HTML page plus PNG plots (matplotlib, Agg), openable from disk.

Sections: summary, length and trainable-token histograms per source, noise counts,
duplicate clusters with examples, contamination, task mix (top root verbs split by their
objects), embedding cluster sizes with the entropy figure, loss and IFD distributions,
and examples of each removal reason.  A small inline script marks images that fail to
load and records ``data-images-loaded="k/n"`` on ``<body>`` (the test reads it through
headless Chromium).
"""

from __future__ import annotations

import pathlib
from collections import Counter, defaultdict

import numpy as np

from sft_jax.data import quality_text
from sft_jax.html_report import IMAGES_SCRIPT as _SCRIPT
from sft_jax.html_report import STYLE as _STYLE
from sft_jax.html_report import escape as _e
from sft_jax.html_report import img as _img
from sft_jax.html_report import plt
from sft_jax.html_report import save_figure as _save
from sft_jax.html_report import table as _table

_EXAMPLE_CHARS = 300


def _snippet(record: dict) -> str:
    return _e(quality_text.conversation_text(record["messages"])[:_EXAMPLE_CHARS])


def _hist_per_source(result, values: np.ndarray, xlabel: str, title: str, path: pathlib.Path) -> str:
    by_source: dict[str, list[float]] = defaultdict(list)
    for r, v in zip(result.records, values):
        by_source[pathlib.Path(quality_text.source_file(r["source"])).name].append(float(v))
    fig, ax = plt.subplots(figsize=(8, 3.2))
    bins = np.histogram_bin_edges(np.asarray(values, np.float64), bins=40)
    for name, vals in sorted(by_source.items()):
        ax.hist(vals, bins=bins, histtype="step", linewidth=1.5, label=f"{name} ({len(vals)})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("rows")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _bar(labels: list[str], values: list[float], title: str, path: pathlib.Path, *, horizontal=False) -> str:
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.28 * len(labels)) if horizontal else 3.2))
    if horizontal:
        ax.barh(range(len(labels)), values)
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.invert_yaxis()
    else:
        ax.bar(range(len(labels)), values)
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_title(title)
    return _save(fig, path)


def _task_mix_plot(task: dict, path: pathlib.Path, top: int = 20, objects: int = 4) -> str:
    """Top root verbs, each bar split into its most common objects (Self-Instruct's figure as bars)."""
    verbs = [v for v, _ in task["verbs"].most_common(top)]
    fig, ax = plt.subplots(figsize=(8, max(3, 0.3 * len(verbs))))
    for y, verb in enumerate(verbs):
        objs = Counter({o: n for (v, o), n in task["verb_objects"].items() if v == verb and o})
        left = 0
        for o, n in objs.most_common(objects):
            ax.barh(y, n, left=left)
            if n >= 2:
                ax.text(left + n / 2, y, o, ha="center", va="center", fontsize=7)
            left += n
        ax.barh(y, task["verbs"][verb] - left, left=left, color="#cccccc")
    ax.set_yticks(range(len(verbs)), verbs, fontsize=8)
    ax.invert_yaxis()
    ent = task["entropy"]
    ax.set_title(f"task mix: root verb (bars split by top objects; grey = other objects); "
                 f"entropy {ent['nats']:.2f} nats, {ent['effective']:.1f} effective verbs", fontsize=9)
    ax.set_xlabel("rows")
    return _save(fig, path)


def write_report(result, out_dir: str) -> str:
    """Write ``index.html`` and its PNGs into ``out_dir``; returns the HTML path."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = result.summary()
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>sft_jax data quality report</title>",
             _STYLE, "</head><body>", "<h1>Data quality report</h1>"]

    # ---- summary
    rows = [["rows read", str(summary["rows"])], ["kept (written)", str(summary["kept"])],
            ["removed", str(summary["removed"])], ["dropped reasons", _e(", ".join(summary["dropped_reasons"]))],
            ["duplicate clusters", f"{summary['duplicate_clusters']} ({summary['rows_in_duplicate_clusters']} rows)"]]
    if "tokens" in summary:
        rows.append(["tokens / trainable tokens", f"{summary['tokens']} / {summary['trainable_tokens']}"])
    if "model" in summary:
        m = summary["model"]
        rows.append(["base model", _e(m["path"])])
        rows.append(["scoring speed", f"{m['tokens_per_second']:.0f} tokens/s (three passes)"])
    parts.append(_table(["", ""], rows))

    # ---- lengths
    parts.append("<h2>Lengths per source</h2>")
    if result.tokens is not None:
        parts.append(_img(_hist_per_source(result, result.tokens, "tokens", "conversation length (tokens)",
                                           out / "lengths.png"), "lengths"))
        parts.append(_img(_hist_per_source(result, result.trainable, "trainable tokens", "trainable tokens per row",
                                           out / "trainable.png"), "trainable tokens"))
    else:
        words = np.asarray([len(quality_text.normalise_words(quality_text.conversation_text(r["messages"])))
                            for r in result.records])
        parts.append("<p>No tokenizer given: lengths in words.</p>")
        parts.append(_img(_hist_per_source(result, words, "words", "conversation length (words)", out / "lengths.png"),
                          "lengths"))

    # ---- noise
    counts = summary["reasons"]
    parts.append("<h2>Reasons (noise, duplicates, contamination)</h2>")
    parts.append(_img(_bar(list(counts), list(counts.values()), "rows per reason", out / "reasons.png"), "reasons"))
    parts.append(_table(["reason", "rows", "dropped"], [[_e(r), str(n), "yes" if r in result.options.drop else "no"]
                                                       for r, n in counts.items()]))

    # ---- duplicates
    parts.append("<h2>Duplicate clusters</h2>")
    if result.clusters:
        sizes = Counter(len(c.members) for c in result.clusters)
        by_size = sorted(sizes)
        parts.append(_img(_bar([str(n) for n in by_size], [sizes[n] for n in by_size], "clusters by size",
                               out / "duplicates.png"), "duplicate cluster sizes"))
        drows = []
        for ci, c in enumerate(result.clusters[:30]):
            keeper = result.keepers[ci]
            ex = "".join(f"<p>{'<b>kept</b> ' if i == keeper else ''}{_e(result.records[i]['source'])}</p>"
                         f"<pre>{_snippet(result.records[i])}</pre>" for i in c.members[:3])
            drows.append([str(ci), str(len(c.members)), "exact" if c.exact else "near", ex])
        parts.append(_table(["cluster", "rows", "kind", "examples (first 3)"], drows))
    else:
        parts.append("<p>No duplicates found.</p>")

    # ---- contamination
    contaminated = [i for i, rs in enumerate(result.reasons) if "contaminated" in rs]
    if result.options.eval_paths:
        parts.append("<h2>Contamination</h2>")
        parts.append(f"<p>{len(contaminated)} row(s) share a {result.options.ngram}-gram with "
                     f"{_e(', '.join(result.options.eval_paths))}.</p>")
        parts.append(_table(["row", "overlap"], [[_e(result.records[i]["source"]),
                                                  _e(result.reasons[i]["contaminated"])] for i in contaminated[:50]]))

    # ---- task mix
    parts.append("<h2>Task mix</h2>")
    parts.append(_img(_task_mix_plot(result.task, out / "task_mix.png"), "task mix"))

    # ---- model
    if result.scores is not None:
        s = result.scores
        m = summary["model"]
        ent = m["cluster_entropy"]
        parts.append("<h2>Embedding clusters (base model, mean-pooled prompt states, k-means)</h2>")
        sizes = m["cluster_sizes"]
        title = (f"cluster sizes: entropy {ent['nats']:.2f} nats ({ent['normalised']:.2f} of max), "
                 f"{ent['effective']:.1f} effective clusters")
        png = _bar([str(i) for i in range(len(sizes))], sizes, title, out / "clusters.png")
        parts.append(_img(png, "cluster sizes"))
        crow = []
        for j in range(len(sizes)):
            members = np.flatnonzero(s.cluster == j)[:2]
            shown = "".join(f"<pre>{_e(quality_text.first_instruction(result.records[i]['messages'])[:160])}</pre>"
                            for i in members)
            crow.append([str(j), str(sizes[j]), shown])
        parts.append(_table(["cluster", "rows", "instructions"], crow))
        parts.append("<h2>Difficulty: loss and IFD under the base model</h2>")
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
        axes[0].hist(s.loss[np.isfinite(s.loss)], bins=40)
        axes[0].set_title("per-example assistant loss")
        ifd = s.ifd[np.isfinite(s.ifd)]
        axes[1].hist(ifd, bins=40)
        axes[1].axvline(1.0, color="r", linestyle="--")
        median = np.median(ifd) if ifd.size else float("nan")
        axes[1].set_title(f"IFD (median {median:.3f}; >= 1: {int((ifd >= 1).sum())})")
        parts.append(_img(_save(fig, out / "difficulty.png"), "loss and IFD"))

    # ---- examples per reason
    parts.append("<h2>Examples per reason</h2>")
    by_reason: dict[str, list[int]] = defaultdict(list)
    for i, rs in enumerate(result.reasons):
        for r in rs:
            by_reason[r].append(i)
    erows = []
    for r in sorted(by_reason):
        for i in by_reason[r][:3]:
            erows.append([_e(r), _e(result.records[i]["source"]), _e(result.reasons[i][r]),
                          f"<pre>{_snippet(result.records[i])}</pre>"])
    parts.append(_table(["reason", "row", "detail", "text"], erows) if erows else "<p>Nothing flagged.</p>")
    parts.append(_SCRIPT)
    parts.append("</body></html>")
    path = out / "index.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return str(path)
