"""Self-Instruct (Wang et al. 2022, arXiv:2212.10560): instructions bootstrapped from seed tasks.

One iteration (one committed unit of the job):

1. `prompts_per_iteration` generation prompts, each listing 8 in-context instructions (6 sampled
   from the human seed tasks, 2 from the instructions generated so far; seeds fill in while fewer
   than 2 exist) and asking the teacher to continue the numbered list.
2. The continuations are split into new instructions (the last one is dropped when the teacher
   stopped at its token limit: it may be cut), then filtered: length, words a text model cannot act
   on, "write a program", a leading punctuation or non-English character, and ROUGE-L >= threshold
   against every instruction in the pool (the seeds, every accepted instruction and the ones already
   kept in this iteration).
3. Classification-task identification (few-shot, from the seeds' labels; an unreadable answer counts
   as not classification and is counted).
4. Instance generation: input-first for other tasks, output-first (class label, then input) for
   classification; the instances are parsed and filtered (empty output, the same non-empty input
   with different outputs, an exact duplicate of an input/output pair already written, for any instruction).
5. An instruction with at least one instance is accepted and joins the pool.

The loop stops when `num` instructions are accepted or after `max_iterations` iterations.  The prompt
texts are this project's own, written from the paper's description.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections import Counter

from sft_jax.synth import filters
from sft_jax.synth.inputs import SeedTask, to_row
from sft_jax.synth.jobs import Job, usage_delta
from sft_jax.synth.teachers import Completion, Teacher

GENERATE_HEADER = (
    "Write new, diverse tasks that someone could ask an AI assistant to do. The tasks below are examples.\n"
    "Vary the verbs and the kind of task: open questions, writing, rewriting, classification, editing, "
    "reasoning, advice, explanations. Each task must be doable by a language model that only reads and "
    "writes text, in English, in one or two sentences. Some tasks come with an input, some do not; "
    "do not write the input here.\n\n"
)
CLASSIFY_HEADER = "Decide whether each task is a classification task: its output is one label from a small, fixed set.\n\n"
INPUT_FIRST_HEADER = (
    "For each task, write one or more examples. An example is an input (leave it out when the task needs "
    "none) followed by the correct output.\n\n"
)
OUTPUT_FIRST_HEADER = (
    "For each classification task, list its possible class labels and, for each label, write an input "
    "whose correct answer is that label.\n\n"
)
_NONE_INPUTS = {"", "none", "n/a", "<noinput>", "no input", "null", "-", "(none)", "none."}


@dataclasses.dataclass(frozen=True)
class Options:
    num: int
    prompts_per_iteration: int = 4
    max_iterations: int = 0  # 0: 4 * ceil(num / prompts_per_iteration), at least 10
    rouge_threshold: float = 0.7
    max_instances: int = 3
    english: bool = True
    temperature: float = 0.7
    top_p: float = 0.5
    max_tokens: int = 512
    seed: int = 0
    format: str = "alpaca"

    def iterations(self) -> int:
        if self.max_iterations > 0:
            return self.max_iterations
        return max(10, 4 * -(-self.num // self.prompts_per_iteration))


# ------------------------------------------------------------------------------ prompts


def generation_prompt(instructions: list[str]) -> str:
    body = "".join(f"Task {k}: {ins}\n" for k, ins in enumerate(instructions, 1))
    return GENERATE_HEADER + body + f"Task {len(instructions) + 1}:"


def classification_prompt(instruction: str, examples: list[SeedTask]) -> str:
    shots = "".join(f"Task: {t.instruction}\nClassification: {'Yes' if t.is_classification else 'No'}\n\n"
                    for t in examples)
    return CLASSIFY_HEADER + shots + f"Task: {instruction}\nClassification:"


def instance_prompt(instruction: str, examples: list[SeedTask], classification: bool) -> str:
    parts = []
    for t in examples:
        lines = [f"Task: {t.instruction}"]
        for k, (inp, out) in enumerate(t.instances, 1):
            if classification:
                lines += [f"Class label: {out}"] + ([f"Input: {inp}"] if inp.strip() else [])
            else:
                lines += [f"Example {k}"] + ([f"Input: {inp}"] if inp.strip() else []) + [f"Output: {out}"]
        parts.append("\n".join(lines) + "\n\n")
    header = OUTPUT_FIRST_HEADER if classification else INPUT_FIRST_HEADER
    return header + "".join(parts) + f"Task: {instruction}\n"


# ------------------------------------------------------------------------------ parsers

_TASK_SPLIT = re.compile(r"(?:^|\n)\s*(?:Task\s*\d+\s*[:.)]|\d+\s*[.)])\s*", re.IGNORECASE)
_NEXT_TASK = re.compile(r"\n\s*Task\s*\d*\s*:", re.IGNORECASE)
_EXAMPLE_SPLIT = re.compile(r"(?:^|\n)\s*Example\s*\d+\s*:?\s*", re.IGNORECASE)
_LABEL_SPLIT = re.compile(r"(?:^|\n)\s*Class\s*label\s*:\s*", re.IGNORECASE)
_INPUT = re.compile(r"^\s*Input\s*:\s*", re.IGNORECASE)
_OUTPUT = re.compile(r"\n?\s*Output\s*:\s*", re.IGNORECASE)
_INPUT_ANY = re.compile(r"(?:^|\n)\s*Input\s*:\s*", re.IGNORECASE)


def parse_instructions(text: str, finish_reason: str) -> tuple[list[str], int]:
    """The teacher's continuation of "Task 9:" -> (instructions, how many were dropped as cut off)."""
    pieces = [" ".join(p.split()) for p in _TASK_SPLIT.split(text)]
    pieces = [p for p in pieces if p]
    if finish_reason == "length" and pieces:
        return pieces[:-1], 1
    return pieces, 0


def parse_classification(text: str) -> bool | None:
    m = re.match(r"\W*(yes|no)\b", text, re.IGNORECASE)
    return None if m is None else m.group(1).lower() == "yes"


def _clean_input(s: str) -> str:
    s = s.strip()
    return "" if s.lower() in _NONE_INPUTS else s


def parse_instances(text: str, classification: bool) -> list[tuple[str, str]] | None:
    """The teacher's examples -> [(input, output)]; None when they cannot be read."""
    m = _NEXT_TASK.search("\n" + text)  # the teacher went on to a next task: stop there
    if m:
        text = ("\n" + text)[: m.start()]
    out = []
    if classification:
        chunks = [c for c in _LABEL_SPLIT.split(text)[1:] if c.strip()]
        for c in chunks:
            parts = _INPUT_ANY.split(c, maxsplit=1)
            label = parts[0].strip()
            out.append((_clean_input(parts[1]) if len(parts) > 1 else "", label))
        return out or None
    chunks = [c for c in _EXAMPLE_SPLIT.split(text) if c.strip()]
    for c in chunks:
        parts = _OUTPUT.split(c, maxsplit=1)
        if len(parts) == 2:
            out.append((_clean_input(_INPUT.sub("", parts[0], count=1)), parts[1].strip()))
        elif _INPUT.match(c):
            return None  # an input without its output
        else:
            out.append(("", c.strip()))  # no labels: the whole text is the output of a task without input
    return out or None


# ------------------------------------------------------------------------------ the loop


class SelfInstruct:
    def __init__(self, teacher: Teacher, seeds: list[SeedTask], opts: Options, job: Job):
        if len(seeds) < 8:
            raise ValueError(f"Self-Instruct needs at least 8 seed tasks, got {len(seeds)}")
        self.teacher, self.seeds, self.opts, self.job = teacher, seeds, opts, job
        self.pool = filters.RougeLPool(opts.rouge_threshold, [t.instruction for t in seeds])
        self.generated: list[str] = []
        self.pairs: set[tuple[str, str]] = set()  # every (input, output) written
        for row in job.rows():  # resume: the state is the rows already written
            meta = row["synth"]
            if not self.generated or self.generated[-1] != meta["instruction"]:
                self.generated.append(meta["instruction"])
                self.pool.add(meta["instruction"])
            self.pairs.add((meta["input"], meta["output"]))
        self.cls_seeds = [t for t in seeds if t.is_classification]
        self.gen_seeds = [t for t in seeds if not t.is_classification]

    def run(self) -> dict:
        o = self.opts
        self.job.bar.total = o.num
        self.job.bar.update(min(len(self.generated), o.num))
        it = 0
        while len(self.generated) < o.num and it < o.iterations():
            unit = f"iteration:{it}"
            if not self.job.done(unit):
                before = self.teacher.usage.as_dict()
                counts, rows, n_new = self.iteration(it)
                self.job.commit(unit, rows, counts, usage_delta(before, self.teacher.usage.as_dict()), advance=n_new)
            it += 1
        stop = "num reached" if len(self.generated) >= o.num else f"max_iterations={o.iterations()} reached"
        return {"instructions": len(self.generated), "stopped": stop}

    def _shots(self, rng: random.Random) -> list[str]:
        machine = rng.sample(self.generated, 2) if len(self.generated) >= 2 else []
        human = rng.sample([t.instruction for t in self.seeds], 8 - len(machine))
        shots = human + machine
        rng.shuffle(shots)
        return shots

    def iteration(self, it: int) -> tuple[Counter, list[dict], int]:
        o = self.opts
        rng = random.Random(f"self-instruct:{o.seed}:{it}")
        base_seed = (o.seed * 1_000_003 + it * 10_007) % (2 ** 31)
        c: Counter = Counter()
        prompts = [generation_prompt(self._shots(rng)) for _ in range(o.prompts_per_iteration)]
        outs = self.teacher.complete(prompts, seed=base_seed, max_tokens=o.max_tokens, temperature=o.temperature,
                                     top_p=o.top_p)
        batch_pool = filters.RougeLPool(o.rouge_threshold)
        kept: list[str] = []
        room = o.num - len(self.generated)
        for out in outs:
            if out.error is not None:
                c["requests.failed.generate"] += 1
                continue
            found, cut = parse_instructions(out.text, out.finish_reason)
            c["instructions.candidates"] += len(found) + cut
            c["instructions.rejected.cut_by_length"] += cut
            for ins in found:
                why = filters.instruction_problem(ins, english=o.english)
                if why is None and (self.pool.most_similar(ins) or batch_pool.most_similar(ins)):
                    why = "rouge_l_similar"
                if why is None and len(kept) >= room:
                    why = "unused_target_reached"
                if why is not None:
                    c[f"instructions.rejected.{why}"] += 1
                    continue
                batch_pool.add(ins)
                kept.append(ins)
        if not kept:
            return c, [], 0
        # classification identification
        cls_prompts = [classification_prompt(ins, rng.sample(self.seeds, min(12, len(self.seeds)))) for ins in kept]
        cls_outs = self.teacher.complete(cls_prompts, seed=base_seed + 1, max_tokens=4, temperature=0.0)
        labels = []
        for out in cls_outs:
            v = parse_classification(out.text) if out.error is None else None
            if out.error is not None:
                c["requests.failed.classify"] += 1
            c["classification." + ("unreadable_as_no" if v is None else "yes" if v else "no")] += 1
            labels.append(bool(v))
        # instance generation
        inst_prompts = []
        for ins, cls in zip(kept, labels):
            src = self.cls_seeds if cls and self.cls_seeds else self.gen_seeds or self.seeds
            inst_prompts.append(instance_prompt(ins, rng.sample(src, min(2, len(src))), cls))
        inst_outs = self.teacher.complete(inst_prompts, seed=base_seed + 2, max_tokens=o.max_tokens,
                                          temperature=0.0)
        rows: list[dict] = []
        n_new = 0
        for ins, cls, out in zip(kept, labels, inst_outs):
            if out.error is not None:
                c["requests.failed.instances"] += 1
                c["instructions.rejected.teacher_error"] += 1
                continue
            got = self._instances(ins, cls, out, c)
            if not got:
                c["instructions.rejected.no_valid_instance"] += 1
                continue
            c["instructions.accepted"] += 1
            n_new += 1
            self.generated.append(ins)
            self.pool.add(ins)
            for inp, output in got:
                self.pairs.add((inp, output))
                meta = {"method": "self-instruct", "iteration": it, "is_classification": cls, "instruction": ins,
                        "input": inp, "output": output}
                rows.append(to_row(ins, output, o.format, meta, input_text=inp))
        return c, rows, n_new

    def _instances(self, ins: str, cls: bool, out: Completion, c: Counter) -> list[tuple[str, str]]:
        parsed = parse_instances(out.text, cls)
        if parsed is None:  # the answer counts as one candidate
            c["instances.candidates"] += 1
            c["instances.rejected.unreadable"] += 1
            return []
        c["instances.candidates"] += len(parsed)
        if out.finish_reason == "length" and len(parsed) > 1:  # the last example may be cut
            parsed = parsed[:-1]
            c["instances.rejected.cut_by_length"] += 1
        got: list[tuple[str, str]] = []
        outputs_by_input: dict[str, str] = {}
        for inp, output in parsed:
            if not output.strip():
                why = "empty_output"
            elif (inp, output) in self.pairs or (inp, output) in got:
                why = "duplicate_pair"
            elif not cls and inp and outputs_by_input.get(inp, output) != output:  # no input: outputs may vary
                why = "same_input_other_output"
            elif len(got) >= self.opts.max_instances:
                why = "over_max_instances"
            else:
                why = None
            if why:
                c[f"instances.rejected.{why}"] += 1
                continue
            outputs_by_input[inp] = output
            got.append((inp, output))
        c["instances.accepted"] += len(got)
        return got
