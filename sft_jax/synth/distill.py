"""Best-of-n distillation: n teacher candidates per prompt, ranked by a pluggable scorer, the best kept.

Scorers (`--scorer`):

- `judge`: a judge model (the teacher, or `--judge`) rates each candidate from 1 to 10 against the
  stated rubric `JUDGE_PROMPT`; an answer without a readable score counts as unscored.
- `loglik`: the teacher's own length-normalised log-likelihood of the candidate given the prompt
  (mean log-probability per token).
- `both`: the judge score first, the log-likelihood breaking ties (and ranking the candidates the
  judge could not score).

Every candidate's text, finish reason and scores are recorded in the row (`synth.candidates`), with the
index of the one chosen.  A prompt with no usable candidate, or none scored, is counted and skipped.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter

from sft_jax.synth.inputs import PromptRow, to_row
from sft_jax.synth.jobs import Job, usage_delta
from sft_jax.synth.teachers import Teacher

SCORERS = ("judge", "loglik", "both")
JUDGE_PROMPT = (
    "You are grading an AI assistant's response to a user's request.\n"
    "Rubric, from 1 to 10:\n"
    "10: correct, complete and directly helpful; clear and well organised; nothing invented.\n"
    "7-9: correct and helpful with small gaps or some unnecessary text.\n"
    "4-6: partly correct or partly relevant; misses important parts of the request.\n"
    "2-3: mostly wrong, off-topic, or unhelpful.\n"
    "1: empty, nonsense, harmful, or refuses without reason.\n\n"
    "[Request]\n{prompt}\n\n[Response]\n{response}\n\n"
    "Reply with the score first, as \"Score: N\", then one sentence of justification."
)
_SCORE = re.compile(r"score\s*[:=]?\s*(\d+(?:\.\d+)?)|^\W*(\d+(?:\.\d+)?)\s*(?:/\s*10)?\b", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Options:
    n: int
    scorer: str = "judge"
    batch: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 512
    seed: int = 0
    format: str = "alpaca"


def parse_score(text: str) -> float | None:
    """A 1-10 score from the judge's answer, or None."""
    m = _SCORE.search(text.strip())
    if m is None:
        return None
    v = float(m.group(1) or m.group(2))
    return v if 1.0 <= v <= 10.0 else None


def rank_key(cand: dict, scorer: str) -> tuple:
    """Larger is better; an unscored value ranks below every scored one."""
    j = cand.get("judge")
    lp = cand.get("loglik")
    js = (1, j) if j is not None else (0, 0.0)
    ls = (1, lp) if lp is not None else (0, 0.0)
    if scorer == "judge":
        return js
    if scorer == "loglik":
        return ls
    return js + ls


class Distill:
    def __init__(self, teacher: Teacher, prompts: list[PromptRow], opts: Options, job: Job,
                 judge: Teacher | None = None):
        if opts.scorer not in SCORERS:
            raise ValueError(f"--scorer={opts.scorer!r} is not one of {', '.join(SCORERS)}")
        if opts.n < 1:
            raise ValueError(f"--n must be >= 1, got {opts.n}")
        self.teacher, self.prompts, self.opts, self.job = teacher, prompts, opts, job
        self.judge = judge or teacher

    def run(self) -> dict:
        o = self.opts
        self.job.bar.total = len(self.prompts)
        for k in range(0, len(self.prompts), o.batch):
            unit = f"prompts:{k}"
            chunk = list(range(k, min(k + o.batch, len(self.prompts))))
            if self.job.done(unit):
                self.job.bar.update(len(chunk))
                continue
            before = self.teacher.usage.as_dict()
            jbefore = self.judge.usage.as_dict()
            counts, rows = self.step(k, chunk)
            usage = usage_delta(before, self.teacher.usage.as_dict())
            if self.judge is not self.teacher:
                usage.update({f"judge_{a}": b for a, b in usage_delta(jbefore, self.judge.usage.as_dict()).items()})
            self.job.commit(unit, rows, counts, usage, advance=len(chunk))
        return {"prompts": len(self.prompts), "n": o.n, "scorer": o.scorer}

    def step(self, k: int, chunk: list[int]) -> tuple[Counter, list[dict]]:
        o = self.opts
        c: Counter = Counter()
        seed = (o.seed * 1_000_003 + k) % (2 ** 31)
        flat = [i for i in chunk for _ in range(o.n)]
        outs = self.teacher.complete([self.prompts[i].prompt for i in flat], max_tokens=o.max_tokens,
                                     temperature=o.temperature, top_p=o.top_p, seed=seed)
        cands: dict[int, list[dict]] = {i: [] for i in chunk}
        for i, out in zip(flat, outs):
            c["candidates.generated"] += 1
            if out.error is not None:
                c["candidates.rejected.teacher_error"] += 1
            elif not out.text.strip():
                c["candidates.rejected.empty"] += 1
            else:
                cands[i].append({"text": out.text.strip(), "finish_reason": out.finish_reason})
        todo = [(i, cd) for i in chunk for cd in cands[i]]
        if o.scorer in ("judge", "both") and todo:
            judged = self.judge.complete([JUDGE_PROMPT.format(prompt=self.prompts[i].prompt, response=cd["text"])
                                          for i, cd in todo], max_tokens=64, temperature=0.0, seed=seed + 1)
            for (_, cd), j in zip(todo, judged):
                cd["judge"] = parse_score(j.text) if j.error is None else None
                cd["judge_answer"] = j.text if j.error is None else None
                c["judge." + ("scored" if cd["judge"] is not None else "unreadable" if j.error is None
                              else "teacher_error")] += 1
        if o.scorer in ("loglik", "both") and todo:
            lls = self.teacher.loglik([(self.prompts[i].prompt, cd["text"]) for i, cd in todo])
            for (_, cd), (total, n) in zip(todo, lls):
                cd["loglik"] = total / n if n > 0 and math.isfinite(total) else None
                c["loglik." + ("scored" if cd["loglik"] is not None else "unscored")] += 1
        rows = []
        for i in chunk:
            cs = cands[i]
            c["prompts.candidates"] += 1
            if not cs:
                c["prompts.rejected.no_candidate"] += 1
                continue
            keys = [rank_key(cd, o.scorer) for cd in cs]
            if not any(any(key[0::2]) for key in keys):  # the (scored?, value) flags: no candidate scored
                c["prompts.rejected.no_score"] += 1
                continue
            best = max(range(len(cs)), key=lambda t: keys[t])  # the first of equals
            c["prompts.accepted"] += 1
            meta = {"method": "distill", "source": self.prompts[i].source, "scorer": o.scorer, "chosen": best,
                    "candidates": cs}
            rows.append(to_row(self.prompts[i].prompt, cs[best]["text"], o.format, meta))
        return c, rows
