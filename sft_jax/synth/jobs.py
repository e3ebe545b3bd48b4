"""A resumable, append-only JSONL job.

Layout beside the output file `OUT` (the trainer reads `OUT` alone; the side directory holds no
.json/.jsonl file at the top of OUT's folder, so a directory `data.path` does not pick it up):

    OUT                      the rows, JSONL, in the trainer's format
    OUT.synth/params.json    the command, the random seed and every parameter ("params", which a
                             resume must repeat exactly) and the runtime settings ("runtime":
                             concurrency, retries, timeouts, which may change between runs)
    OUT.synth/journal.jsonl  one line per committed unit of work: its key, rows, the byte size of
                             OUT after it, its filter counts and the teacher's token usage
    OUT.synth/summary.json   the totals (written when the job finishes)

A unit commits by appending its rows to OUT (flush + fsync) and then its journal line (flush +
fsync).  After a crash (kill -9 included) the journal's last complete line is the truth: OUT is
truncated back to the size it records (dropping a half-written or uncommitted unit), committed
units are skipped, and the methods rebuild their state from the rows already in OUT.  The unit's
work is redone from the same seed, so no row is duplicated or lost.
"""

from __future__ import annotations

import collections
import json
import os
import sys
from typing import Iterable

from tqdm import tqdm


class JobError(RuntimeError):
    """The output cannot be written or resumed (parameters differ, a foreign file, a broken journal)."""


def _fsync_append(path: str, data: bytes) -> int:
    with open(path, "ab") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
        return f.tell()


class Job:
    """Open (or resume) the job writing `out`; `params` and `runtime` must be JSON-serialisable."""

    def __init__(self, out: str, params: dict, *, runtime: dict | None = None, overwrite: bool = False,
                 unit_name: str = "units", progress: bool = True):
        self.out = out
        self.side = out + ".synth"
        self.params_path = os.path.join(self.side, "params.json")
        self.journal_path = os.path.join(self.side, "journal.jsonl")
        self.summary_path = os.path.join(self.side, "summary.json")
        self.params = json.loads(json.dumps(params))
        self.runtime = runtime or {}
        if overwrite:
            for p in (out, self.params_path, self.journal_path, self.summary_path):
                if os.path.exists(p):
                    os.remove(p)
        self.counts: collections.Counter = collections.Counter()
        self.usage: collections.Counter = collections.Counter()
        self.units: set[str] = set()
        self.n_rows = 0
        self.resumed = False
        self._open()
        self.bar = tqdm(total=None, initial=0, unit=unit_name, file=sys.stderr, disable=not progress,
                        dynamic_ncols=True, desc=os.path.basename(out))

    # ------------------------------------------------------------------ opening
    def _open(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.out)), exist_ok=True)
        params = self.params
        if os.path.exists(self.params_path):
            with open(self.params_path) as f:
                old = json.load(f).get("params", {})
            if old != params:
                diff = sorted(k for k in set(old) | set(params) if old.get(k) != params.get(k))
                raise JobError(f"{self.out}: an earlier job with other parameters wrote it (differ: {', '.join(diff)});"
                               " resume with the same arguments, or pass --overwrite")
            self._replay()
            self.resumed = True
            return
        if os.path.exists(self.out) and os.path.getsize(self.out) > 0:
            raise JobError(f"{self.out}: exists and was not written by a synth job; choose another --out or pass "
                           "--overwrite")
        os.makedirs(self.side, exist_ok=True)
        tmp = self.params_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"params": params, "runtime": self.runtime}, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.params_path)
        open(self.out, "wb").close()

    def _replay(self) -> None:
        size = 0
        good = 0  # bytes of the journal up to its last complete line
        if os.path.exists(self.journal_path):
            with open(self.journal_path, "rb") as f:
                raw = f.read()
            for line in raw.splitlines(keepends=True):
                if not line.endswith(b"\n"):
                    break  # a line cut by the crash
                try:
                    e = json.loads(line)
                except ValueError:
                    lineno = raw[:good].count(b"\n") + 1
                    raise JobError(f"{self.journal_path}:{lineno}: unreadable journal line") from None
                good += len(line)
                self.units.add(e["unit"])
                self.counts.update(e["counts"])
                self.usage.update(e["usage"])
                self.n_rows += e["rows"]
                size = e["bytes"]
            if good < len(raw):
                with open(self.journal_path, "r+b") as f:
                    f.truncate(good)
        if not os.path.exists(self.out):
            if size:
                raise JobError(f"{self.out}: missing, but its journal records {self.n_rows} rows")
            open(self.out, "wb").close()
        have = os.path.getsize(self.out)
        if have < size:
            raise JobError(f"{self.out}: {have} bytes, shorter than the {size} its journal records (edited?)")
        if have > size:  # rows of a unit that did not commit
            with open(self.out, "r+b") as f:
                f.truncate(size)

    # ------------------------------------------------------------------ use
    def rows(self) -> Iterable[dict]:
        """The committed rows (for the methods to rebuild their state on resume)."""
        with open(self.out, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)

    def done(self, unit: str) -> bool:
        return unit in self.units

    def commit(self, unit: str, rows: list[dict], counts: dict, usage: dict, advance: int = 0) -> None:
        """Append `rows` and record the unit as done (atomic with respect to a crash)."""
        if unit in self.units:
            raise JobError(f"unit {unit!r} committed twice")
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
        size = _fsync_append(self.out, data) if data else os.path.getsize(self.out)
        entry = {"unit": unit, "rows": len(rows), "bytes": size, "counts": dict(counts), "usage": dict(usage)}
        _fsync_append(self.journal_path, (json.dumps(entry) + "\n").encode("utf-8"))
        self.units.add(unit)
        self.counts.update(counts)
        self.usage.update(usage)
        self.n_rows += len(rows)
        self.bar.update(advance)

    def finish(self, extra: dict | None = None) -> dict:
        """Write summary.json, print the filter summary; returns the summary."""
        self.bar.close()
        summary = {"out": self.out, "rows": self.n_rows, "units": len(self.units), "counts": dict(sorted(self.counts.items())),
                   "teacher_usage": dict(self.usage), **(extra or {})}
        tmp = self.summary_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(summary, f, indent=1)
        os.replace(tmp, self.summary_path)
        print(format_summary(summary))
        return summary


def format_summary(summary: dict) -> str:
    """The counts as an aligned table: each stage's candidates, what every filter removed, what was kept."""
    lines = [f"wrote {summary['rows']} rows to {summary['out']} ({summary['units']} units)"]
    for k, v in summary.items():
        if k not in ("out", "rows", "units", "counts", "teacher_usage"):
            lines.append(f"  {k}: {v}")
    width = max((len(k) for k in summary["counts"]), default=10)
    lines.append("filter summary:")
    for k, v in summary["counts"].items():
        lines.append(f"  {k:<{width}}  {v:>8}")
    u = summary["teacher_usage"]
    lines.append("teacher: " + ", ".join(f"{k}={u.get(k, 0)}" for k in sorted(u)))
    return "\n".join(lines)


def usage_delta(before: dict, after: dict) -> dict:
    return {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
