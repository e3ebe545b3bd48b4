"""Data quality and selection: LIMA's curation dimensions measured on your data before training.

    python -m sft_jax.data.quality --data=FILE[,FILE] [--model=HF_DIR] [--template=chatml]
        [--out=clean.jsonl] [--report=DIR] [--eval=EVAL_FILE,...] [--select=N] [--drop=reason,...]
    python -m sft_jax.data.quality --config=configs/alpaca.py --config.model.path=HF_DIR --out=...

Reads every row of ``data.path`` (any format the trainer reads) and finds:

- duplicates: exact (normalised text hash) and near (MinHash + LSH over word shingles), in
  clusters, one member kept per ``--keep`` (first | longest | best);
- noise: each a counted reason (see ``quality_text.NOISE_REASONS``);
- contamination: word n-gram overlap (``--ngram``, default 13) with ``--eval`` sets;
- diversity: the task mix (root verb + object of each instruction) and, with a model,
  k-means clusters of the base model's mean-pooled prompt states with an entropy figure;
- difficulty (with a model): per-example assistant loss and IFD, batched on the mesh.

Writes ``--out`` (messages JSONL the trainer reads, each row with a ``quality`` field saying
why it was kept), ``<out>.removed.jsonl`` (every other row with its reasons), and with
``--report`` a static HTML page with PNG plots.  ``--select=N`` keeps N rows LIMA-style
(after the drops: the best-scored rows of each diversity cluster in turn).  A one-line JSON
summary goes to stdout.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sys
from collections import Counter

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from sft_jax.config import default_config, validate
from sft_jax.data import formats, pipeline, quality_model, quality_report, quality_text, templates
from sft_jax.data.formats import DataError
from sft_jax.data.quality_text import NOISE_REASONS, NoiseOptions

REASONS = ("exact_duplicate", "near_duplicate", *NOISE_REASONS, "contaminated", "ifd_above_1")
# Soft reasons are counted and reported but not dropped unless asked: a one-word answer is
# often right ("Negative"), and IFD >= 1 is only meaningful under a real base model.
SOFT_REASONS = ("short_response", "ifd_above_1")
DEFAULT_DROP = tuple(r for r in REASONS if r not in SOFT_REASONS)
KEEP = ("first", "longest", "best")


class QualityError(ValueError):
    """Bad options for the quality command; the message names the flag."""


@dataclasses.dataclass
class QualityOptions:
    near_threshold: float = 0.7  # estimated Jaccard of word shingles for a near duplicate
    shingle: int = 3  # words per shingle
    num_perm: int = 128  # MinHash permutations
    keep: str = "first"  # which member of a duplicate cluster stays
    eval_paths: tuple[str, ...] = ()
    ngram: int = 13  # words per n-gram for decontamination (GPT-3's 13)
    noise: NoiseOptions = dataclasses.field(default_factory=NoiseOptions)
    drop: tuple[str, ...] = DEFAULT_DROP
    select: int = 0  # 0 = write every row that has no reason in `drop`
    clusters: int = 0  # k-means k; 0 = about sqrt(n / 2), between 2 and 64
    batch_size: int = 8  # rows per model batch (rounded up to the mesh's data-parallel size)
    seed: int = 0

    def check(self) -> None:
        unknown = [r for r in self.drop if r not in REASONS]
        if unknown:
            raise QualityError(f"--drop: unknown reason(s) {unknown}; known: {list(REASONS)}")
        if self.keep not in KEEP:
            raise QualityError(f"--keep={self.keep!r} is not one of {list(KEEP)}")
        if not 0.0 < self.near_threshold <= 1.0:
            raise QualityError(f"--near_threshold={self.near_threshold} must be in (0, 1]")
        if self.shingle < 1 or self.ngram < 1:
            raise QualityError("--shingle and --ngram must be >= 1")
        if self.select < 0:
            raise QualityError(f"--select={self.select} must be >= 0")


@dataclasses.dataclass
class QualityResult:
    """Everything the command found; ``reasons[i]`` maps reason -> detail for record i."""

    records: list[dict]
    reasons: list[dict[str, str]]
    clusters: list[quality_text.DuplicateCluster]
    keepers: dict[int, int]  # duplicate cluster index -> kept record
    task: dict
    kept: list[int]  # rows written to --out, in order
    kept_why: dict[int, str]
    removed: list[int]
    tokens: np.ndarray | None = None  # per record: tokens of the rendered conversation
    trainable: np.ndarray | None = None  # per record: trainable tokens
    scores: object | None = None  # quality_model.ModelScores
    model_path: str = ""
    options: QualityOptions = dataclasses.field(default_factory=QualityOptions)

    @property
    def counts(self) -> dict[str, int]:
        c = Counter(r for rs in self.reasons for r in rs)
        out = {r: c.get(r, 0) for r in REASONS}
        if self.options.select:
            out["not_selected"] = c.get("not_selected", 0)
        return out

    def summary(self) -> dict:
        out = {
            "rows": len(self.records), "kept": len(self.kept), "removed": len(self.removed),
            "reasons": self.counts, "dropped_reasons": list(self.options.drop),
            "duplicate_clusters": len(self.clusters),
            "rows_in_duplicate_clusters": sum(len(c.members) for c in self.clusters),
            "task_verbs": len(self.task["verbs"]), "task_entropy": self.task["entropy"],
            "top_verbs": self.task["verbs"].most_common(10),
        }
        if self.tokens is not None:
            out["tokens"] = int(self.tokens.sum())
            out["trainable_tokens"] = int(self.trainable.sum())
        if self.scores is not None:
            s = self.scores
            sizes = np.bincount(s.cluster, minlength=s.num_clusters)
            ifd = s.ifd[np.isfinite(s.ifd)]
            out["model"] = {
                "path": self.model_path, "clusters": s.num_clusters, "cluster_sizes": sizes.tolist(),
                "cluster_entropy": quality_text.entropy(sizes.astype(np.float64)),
                "loss_mean": float(np.nanmean(s.loss)), "ifd_median": float(np.median(ifd)) if ifd.size else None,
                "ifd_above_1": int((ifd >= 1).sum()), "tokens_per_second": s.tokens_per_second,
            }
        return out


def response_words(messages: list[dict]) -> int:
    return sum(len(quality_text.normalise_words(t)) for _, t in quality_text.responses(messages))


def selection_scores(result: QualityResult) -> np.ndarray:
    """Higher is better.  With a model: IFD where it is below 1 (Li et al. keep the
    highest-IFD rows, and IFD >= 1 means the instruction does not help predict the
    response, so those rank last); without: the response length in words."""
    if result.scores is None:
        return np.asarray([response_words(r["messages"]) for r in result.records], np.float64)
    ifd = np.asarray(result.scores.ifd, np.float64)
    return np.where(np.isfinite(ifd) & (ifd < 1), ifd, -np.inf)


def _dedup(result: QualityResult, opts: QualityOptions) -> None:
    """Pick the keeper of each duplicate cluster, mark the others with a reason."""
    keys = {i: quality_text.exact_key(result.records[i]["messages"]) for c in result.clusters for i in c.members}
    score = selection_scores(result) if opts.keep == "best" else None
    other_drops = set(opts.drop) - {"exact_duplicate", "near_duplicate"}
    for ci, c in enumerate(result.clusters):
        clean = [i for i in c.members if not other_drops & set(result.reasons[i])] or c.members
        if opts.keep == "first":
            keeper = clean[0]
        elif opts.keep == "longest":
            keeper = max(clean, key=lambda i: (response_words(result.records[i]["messages"]), -i))
        else:
            keeper = max(clean, key=lambda i: (score[i], -i))
        result.keepers[ci] = keeper
        src = result.records[keeper]["source"]
        for i in c.members:
            if i == keeper:
                continue
            if keys[i] == keys[keeper]:
                result.reasons[i]["exact_duplicate"] = f"copy of {src} (cluster {ci}, kept by --keep={opts.keep})"
            else:
                result.reasons[i]["near_duplicate"] = (f"near copy of {src} (cluster {ci}, {len(c.members)} rows, "
                                                       f"kept by --keep={opts.keep})")


def _select(result: QualityResult, candidates: list[int], n: int) -> tuple[list[int], dict[int, str]]:
    """LIMA-style: round-robin over diversity clusters (embedding clusters with a model,
    else task verbs), each round taking the best-scored row left in every cluster."""
    score = selection_scores(result)
    if result.scores is not None:
        group = {i: f"cluster {int(result.scores.cluster[i])}" for i in candidates}
    else:
        group = {i: f"task '{result.task['pairs'][i][0]}'" for i in candidates}
    by_group: dict[str, list[int]] = {}
    for i in sorted(candidates, key=lambda i: (-score[i], i)):
        by_group.setdefault(group[i], []).append(i)
    order = sorted(by_group, key=lambda g: (-len(by_group[g]), g))
    chosen, why, rnd = [], {}, 0
    what = "IFD" if result.scores is not None else "response words"
    while len(chosen) < n and any(rnd < len(by_group[g]) for g in order):
        for g in order:
            if rnd < len(by_group[g]) and len(chosen) < n:
                i = by_group[g][rnd]
                chosen.append(i)
                why[i] = (f"selected: rank {rnd + 1} of {len(by_group[g])} in {g} by {what} "
                          f"({score[i]:.4g})")
        rnd += 1
    return sorted(chosen), why


def analyse(records: list[dict], opts: QualityOptions, *, tokenizer=None, template: str = "", cfg=None,
            model_path: str = "") -> QualityResult:
    """Run every stage over ``records`` (``formats.load_conversations`` output)."""
    opts.check()
    if opts.keep == "best" and not model_path:
        raise QualityError("--keep=best ranks rows by the model's IFD: give --model (or model.path)")
    if not records:
        raise DataError("no rows to analyse")
    reasons: list[dict[str, str]] = [quality_text.noise_reasons(r["messages"], opts.noise) for r in records]
    if opts.eval_paths:
        index = quality_text.EvalIndex(list(opts.eval_paths), n=opts.ngram)
        for r, rs in zip(records, reasons):
            hit = index.overlap(quality_text.conversation_text(r["messages"]))
            if hit:
                rs["contaminated"] = f"{opts.ngram}-gram overlap with {hit[0]}: {hit[1][:120]!r}"
    result = QualityResult(records=records, reasons=reasons, clusters=[], keepers={},
                           task=quality_text.task_mix(records), kept=[], kept_why={}, removed=[],
                           model_path=model_path, options=opts)
    if model_path and tokenizer is None:
        raise QualityError("the model stages need the model's tokenizer (data.tokenizer or model.path)")
    if tokenizer is not None:
        cfg = cfg if cfg is not None else default_config()
        tok = [quality_model.tokenize(tokenizer, template, r, cfg.data.train_on) for r in records]
        result.tokens = np.asarray([len(t.ids) for t in tok], np.int64)
        result.trainable = np.asarray([int(t.trainable.sum()) for t in tok], np.int64)
        if model_path:
            k = opts.clusters or int(np.clip(round(np.sqrt(len(records) / 2)), 2, 64))
            result.scores = quality_model.score(model_path, cfg, tok, tokenizer, batch_size=opts.batch_size,
                                                num_clusters=k, seed=opts.seed)
            for i, v in enumerate(result.scores.ifd):
                if np.isfinite(v) and v >= 1:
                    reasons[i]["ifd_above_1"] = f"IFD {v:.3f}: the instruction does not make the response likelier"
    result.clusters = quality_text.find_duplicates(records, threshold=opts.near_threshold, shingle=opts.shingle,
                                                   num_perm=opts.num_perm, seed=opts.seed + 1)
    _dedup(result, opts)
    drop = set(opts.drop)
    passing = [i for i, rs in enumerate(reasons) if not drop & set(rs)]
    for i in range(len(records)):
        if drop & set(reasons[i]):
            continue
        flagged = sorted(reasons[i])
        note = f" (flagged, not dropped: {', '.join(flagged)})" if flagged else ""
        result.kept_why[i] = "no reason in --drop" + note
    if opts.select:
        chosen, why = _select(result, passing, opts.select)
        for i in passing:
            if i not in why:
                reasons[i]["not_selected"] = "not among the --select rows (lower score in its cluster)"
        result.kept_why = why
        result.kept = chosen
    else:
        result.kept = passing
    kept = set(result.kept)
    result.removed = [i for i in range(len(records)) if i not in kept]
    return result


def write_outputs(result: QualityResult, out: str) -> str:
    """``out``: the kept rows (messages JSONL with a ``quality`` field); next to it
    ``<stem>.removed.jsonl``: every other row with its reasons.  ``row`` is the row's
    0-based position in the input (``source`` is ``file:line`` of the row's start, which
    several rows share when a JSON array sits on one line).  Returns the removed path."""
    p = pathlib.Path(out)
    p.parent.mkdir(parents=True, exist_ok=True)
    removed_path = p.with_name(p.name.removesuffix(".jsonl") + ".removed.jsonl")
    with open(p, "w", encoding="utf-8") as f:
        for i in result.kept:
            r = result.records[i]
            row = {"messages": r["messages"], **({"tools": r["tools"]} if r.get("tools") else {}),
                   "quality": {"source": r["source"], "row": i, "kept": result.kept_why[i]}}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    with open(removed_path, "w", encoding="utf-8") as f:
        for i in result.removed:
            r = result.records[i]
            f.write(json.dumps({"source": r["source"], "row": i, "reasons": result.reasons[i],
                                "messages": r["messages"]},
                               ensure_ascii=False) + "\n")
    return str(removed_path)


# -------------------------------------------------------------------------------- CLI

def define_flags() -> None:
    """Define the command's flags.  Called only when run as a program, so that importing this
    module (tests, other tools) registers no absl flag (``--config`` is also the inspector's)."""
    config_flags.DEFINE_config_file("config", None, "trainer config file (its data.* and model.* are used)")
    flags.DEFINE_string("data", None, "data file(s)/directory (overrides data.path)")
    flags.DEFINE_string("format", None, "row format (overrides data.format; default auto)")
    flags.DEFINE_string("model", None, "base model, a Hugging Face directory (overrides model.path); "
                        "enables the embedding clusters, loss and IFD")
    flags.DEFINE_string("tokenizer", None, "tokenizer (overrides data.tokenizer; default the model's)")
    flags.DEFINE_string("template", None, "chat template (overrides data.template)")
    flags.DEFINE_integer("max_length", None, "tokens per packed row (overrides data.max_length)")
    flags.DEFINE_string("out", None, "where to write the kept rows (messages JSONL)")
    flags.DEFINE_string("report", None, "directory for the HTML report and its PNG plots")
    flags.DEFINE_list("eval", [], "eval set file(s) to decontaminate against (any trainer format, or "
                      "rows of string fields such as question/answer)")
    flags.DEFINE_integer("ngram", 13, "words per n-gram for decontamination")
    flags.DEFINE_float("near_threshold", 0.7, "near-duplicate Jaccard threshold (word shingles)")
    flags.DEFINE_integer("shingle", 3, "words per shingle for near duplicates")
    flags.DEFINE_enum("keep", "first", list(KEEP), "which member of a duplicate cluster is kept")
    flags.DEFINE_list("drop", list(DEFAULT_DROP), f"reasons that remove a row; known: {', '.join(REASONS)}")
    flags.DEFINE_integer("select", 0, "keep N rows LIMA-style (0 = all that pass --drop)")
    flags.DEFINE_integer("clusters", 0, "k-means clusters of the embeddings (0 = auto)")
    flags.DEFINE_integer("batch_size", None, "rows per model batch (default train.batch_size)")
    flags.DEFINE_integer("min_response_words", 2, "fewer words = short_response")
    flags.DEFINE_float("repetition", 0.5, "repeated word-3-gram share that counts as repetition")


def config_from_flags(f=flags.FLAGS):
    """The trainer's config (``--config`` or the defaults) with this command's overrides."""
    cfg = f.config if f.config is not None else default_config()
    for value, field in ((f.data, "path"), (f.format, "format"), (f.tokenizer, "tokenizer"),
                         (f.template, "template"), (f.max_length, "max_length")):
        if value is not None:
            cfg.data[field] = value
    if f.model is not None:
        cfg.model.init = "pretrained"
        cfg.model.path = f.model
    validate(cfg)
    if not cfg.data.path:
        raise QualityError("no data: pass --data=FILE or a --config with data.path")
    return cfg


def load_tokenizer(cfg):
    """The trainer's tokenizer and template, or (None, "") when neither data.tokenizer nor
    model.path is set.  Template markers the vocabulary lacks are NOT added (the base
    model has no rows for them): they tokenize as text."""
    path = cfg.data.tokenizer or (cfg.model.path if cfg.model.init == "pretrained" else "")
    if not path:
        return None, ""
    tok = pipeline.load_tokenizer(path)
    tok, _ = templates.prepare_tokenizer(tok, cfg.data.template, add_tokens=False)
    return tok, templates.resolve_template(tok, cfg.data.template)


def run(cfg, opts: QualityOptions, *, out: str | None = None, report: str | None = None) -> QualityResult:
    """The whole command for a validated config."""
    records = []
    for entry in [p.strip() for p in cfg.data.path.split(",") if p.strip()]:
        records.extend(formats.load_conversations(entry, cfg.data.format, cfg.data.system_prompt,
                                                  columns=cfg.data.columns, reasoning=cfg.data.reasoning))
    tokenizer, template = load_tokenizer(cfg)
    model_path = cfg.model.path if cfg.model.init == "pretrained" else ""
    if model_path and not os.path.isfile(os.path.join(model_path, "config.json")):
        raise QualityError(f"--model / model.path={model_path!r} has no config.json (a Hugging Face directory)")
    result = analyse(records, opts, tokenizer=tokenizer, template=template, cfg=cfg, model_path=model_path)
    if out:
        write_outputs(result, out)
    if report:
        quality_report.write_report(result, report)
    return result


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    cfg = config_from_flags(f)
    opts = QualityOptions(
        near_threshold=f.near_threshold, shingle=f.shingle, keep=f.keep, eval_paths=tuple(f.eval),
        ngram=f.ngram, drop=tuple(f.drop), select=f.select, clusters=f.clusters,
        batch_size=f.batch_size or cfg.train.batch_size, seed=cfg.train.seed,
        noise=NoiseOptions(min_response_words=f.min_response_words, repetition_threshold=f.repetition))
    result = run(cfg, opts, out=f.out, report=f.report)
    print(json.dumps(result.summary(), default=float))


if __name__ == "__main__":
    from sft_jax.cli import run_absl

    define_flags()
    sys.exit(run_absl(main, None, "python -m sft_jax.data.quality"))  # the shared error-to-exit path
