"""Evol-Instruct (WizardLM, Xu et al. 2023, arXiv:2304.12244): instructions evolved over rounds.

Every round, each instruction of the population gets one operation chosen at random (uniformly):
four in-depth rewrites (add a constraint, deepen the inquiry, concretise, ask for more reasoning
steps), the in-depth "complicate the input" rewrite (add structured data the prompt refers to),
or in-breadth mutation (a new prompt of the same domain, rarer).  The teacher rewrites it, then
answers it.  An evolution fails, and the instruction stays as it was for the next round, when
(the paper's elimination rules):

- the teacher judges the evolved and the previous instruction equal (no information gain);
- the response is short (< 80 words) and contains "sorry";
- the response is only punctuation and stop words;
- the evolved instruction copies the evolving prompt's scaffolding ("#Given Prompt#", "given prompt",
  "rewritten prompt", ...), or is empty.

Round 0 writes the original instructions (with the data's own response, or the teacher's), so the
output is, as in the paper, the original set merged with every round's evolutions.  Each row keeps
its lineage under `synth`: the original, the parent, the operations applied so far, the round.
The prompt texts are this project's own, written from the paper's description.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections import Counter

from sft_jax.synth import filters
from sft_jax.synth.inputs import PromptRow, to_row
from sft_jax.synth.jobs import Job, usage_delta
from sft_jax.synth.teachers import Teacher

IN_DEPTH = (
    "Rewrite the prompt below into a harder version, one that a strong AI assistant would find more "
    "demanding, while a person could still understand and answer it. {how} Keep everything that is not "
    "plain text in the prompt (tables, code, data) and keep its input. Add no more than 10 to 20 words. "
    "Answer with the rewritten prompt only.\n\n#Given Prompt#:\n{instruction}\n\n#Rewritten Prompt#:\n"
)
IN_DEPTH_HOW = {
    "add_constraints": "Add one more constraint or requirement to it.",
    "deepen": "If it asks about a particular issue, make the question go deeper and broader.",
    "concretize": "Replace its general concepts with more specific ones.",
    "increase_reasoning": "If a few simple thinking steps solve it, make it ask explicitly for reasoning in "
                          "several steps.",
    "complicate_input": "Give it an input in a structured format (a table, JSON, code, a formula or a data "
                        "list) that the rewritten prompt then works on.",
}
IN_BREADTH = (
    "Write a brand-new prompt inspired by the prompt below: in the same domain, but on a rarer topic, "
    "about as long and as hard, and something a person could understand and answer. Answer with the new "
    "prompt only.\n\n#Given Prompt#:\n{instruction}\n\n#Created Prompt#:\n"
)
OPERATIONS = (*IN_DEPTH_HOW, "breadth")
SCAFFOLDING = ("#given prompt#", "#rewritten prompt#", "#created prompt#", "given prompt", "rewritten prompt",
               "created prompt")
EQUAL_PROMPT = (
    "Here are two instructions for an AI assistant. Do they ask for the same thing, with the same "
    "constraints and requirements and the same depth and breadth of inquiry?\n\nFirst instruction:\n{a}\n\n"
    "Second instruction:\n{b}\n\nAnswer with one word, Equal or Different:"
)
_LABEL = re.compile(r"^\s*#?\s*(rewritten|created|new)\s+prompt\s*#?\s*:\s*", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Options:
    rounds: int
    batch: int = 16
    include_original: bool = True
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 512
    seed: int = 0
    format: str = "alpaca"


def evolve_prompt(op: str, instruction: str) -> str:
    if op == "breadth":
        return IN_BREADTH.format(instruction=instruction)
    return IN_DEPTH.format(how=IN_DEPTH_HOW[op], instruction=instruction)


def parse_evolved(text: str) -> str:
    """The teacher's rewrite without a leading "#Rewritten Prompt#:"-style label."""
    return _LABEL.sub("", text.strip(), count=1).strip()


def parse_equal(text: str) -> bool | None:
    """The equality judgement: True (equal: no information gain), False (different), None (unreadable)."""
    m = re.match(r"\W*(equal|same|different|not\s+equal|not\s+the\s+same)\b", text, re.IGNORECASE)
    if m is None:
        return None
    return m.group(1).lower() in ("equal", "same")


def evolution_problem(evolved: str) -> str | None:
    if not evolved:
        return "empty_evolution"
    if filters.copied_scaffolding(evolved, SCAFFOLDING):
        return "copied_prompt_words"
    return None


def response_problem(response: str) -> str | None:
    if filters.is_sorry_response(response):
        return "response_sorry"
    if filters.is_only_punctuation_and_stop_words(response):
        return "response_no_content"
    return None


class EvolInstruct:
    def __init__(self, teacher: Teacher, data: list[PromptRow], opts: Options, job: Job):
        if not data:
            raise ValueError("evol-instruct: no instructions in --data")
        self.teacher, self.data, self.opts, self.job = teacher, data, opts, job
        # population: index -> (current instruction, operations so far)
        self.current: list[tuple[str, tuple[str, ...]]] = [(d.prompt, ()) for d in data]
        for row in job.rows():  # resume: the latest successful evolution of each instruction
            m = row["synth"]
            self.current[m["source_index"]] = (m["instruction"], tuple(m["operations"]))

    def run(self) -> dict:
        o = self.opts
        n = len(self.data)
        self.job.bar.total = n * (o.rounds + int(o.include_original))  # instructions x rounds
        first = 0 if o.include_original else 1
        for r in range(first, o.rounds + 1):
            for k in range(0, n, o.batch):
                unit = f"round:{r}:from:{k}"
                idx = list(range(k, min(k + o.batch, n)))
                if self.job.done(unit):
                    self.job.bar.update(len(idx))
                    continue
                before = self.teacher.usage.as_dict()
                counts, rows = self.originals(idx) if r == 0 else self.evolve(r, idx)
                self.job.commit(unit, rows, counts, usage_delta(before, self.teacher.usage.as_dict()),
                                advance=len(idx))
        return {"instructions": n, "rounds": o.rounds}

    def _seed(self, r: int, k: int) -> int:
        return (self.opts.seed * 1_000_003 + r * 10_007 + k) % (2 ** 31)

    def _answer(self, prompts: list[str], seed: int) -> list:
        o = self.opts
        return self.teacher.complete(prompts, max_tokens=o.max_tokens, temperature=o.temperature, top_p=o.top_p,
                                     seed=seed)

    def _row(self, i: int, r: int, instruction: str, ops: tuple[str, ...], parent: str | None, response: str) -> dict:
        meta = {"method": "evol-instruct", "round": r, "source_index": i, "source": self.data[i].source,
                "original": self.data[i].prompt, "parent": parent, "operations": list(ops),
                "instruction": instruction}
        return to_row(instruction, response, self.opts.format, meta)

    def originals(self, idx: list[int]) -> tuple[Counter, list[dict]]:
        c: Counter = Counter()
        need = [i for i in idx if self.data[i].response is None]
        answers = dict(zip(need, self._answer([self.data[i].prompt for i in need], self._seed(0, idx[0])))) if need else {}
        rows = []
        for i in idx:
            c["originals.candidates"] += 1
            if i in answers:
                a = answers[i]
                if a.error is not None:
                    c["originals.rejected.teacher_error"] += 1
                    continue
                why = response_problem(a.text)
                if why:
                    c[f"originals.rejected.{why}"] += 1
                    continue
                response = a.text.strip()
            else:
                response = self.data[i].response
            c["originals.accepted"] += 1
            rows.append(self._row(i, 0, self.data[i].prompt, (), None, response))
        return c, rows

    def evolve(self, r: int, idx: list[int]) -> tuple[Counter, list[dict]]:
        c: Counter = Counter()
        ops = [random.Random(f"evol-instruct:{self.opts.seed}:{r}:{i}").choice(OPERATIONS) for i in idx]
        for op in ops:
            c[f"operations.{op}"] += 1
        seed = self._seed(r, idx[0])
        outs = self._answer([evolve_prompt(op, self.current[i][0]) for i, op in zip(idx, ops)], seed)
        live = []  # (i, op, evolved)
        for i, op, out in zip(idx, ops, outs):
            c["evolutions.candidates"] += 1
            why = "teacher_error" if out.error is not None else evolution_problem(parse_evolved(out.text))
            if why:
                c[f"evolutions.rejected.{why}"] += 1
            else:
                live.append((i, op, parse_evolved(out.text)))
        judged = self.teacher.complete([EQUAL_PROMPT.format(a=self.current[i][0], b=e) for i, _, e in live],
                                       max_tokens=4, temperature=0.0, seed=seed + 1) if live else []
        gained = []
        for (i, op, e), j in zip(live, judged):
            eq = parse_equal(j.text) if j.error is None else None
            why = ("teacher_error" if j.error is not None else "gain_judgement_unreadable" if eq is None
                   else "no_information_gain" if eq else None)
            if why:
                c[f"evolutions.rejected.{why}"] += 1
            else:
                gained.append((i, op, e))
        answers = self._answer([e for _, _, e in gained], seed + 2) if gained else []
        rows = []
        for (i, op, e), a in zip(gained, answers):
            why = "teacher_error" if a.error is not None else response_problem(a.text)
            if why:
                c[f"evolutions.rejected.{why}"] += 1
                continue
            parent, done_ops = self.current[i]
            self.current[i] = (e, done_ops + (op,))
            c["evolutions.accepted"] += 1
            rows.append(self._row(i, r, e, done_ops + (op,), parent, a.text.strip()))
        return c, rows
