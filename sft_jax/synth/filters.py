"""Filters shared by the synthesis methods.

`RougeLPool` answers "does this instruction have ROUGE-L F >= threshold with any instruction in
the pool?" exactly as `rouge_score.RougeScorer(["rougeL"])` would (same tokenizer, same
F-measure arithmetic), but fast enough for a pool of 50K+ instructions: every instruction is
tokenized once and kept as integer ids, and an inverted index gives, in one vectorised pass,
the bag-of-tokens overlap of the candidate with every pool entry.  The longest common
subsequence can never exceed that overlap, so `2 * overlap / (m + n)` is an upper bound of
the F-measure; only entries whose bound reaches the threshold get the exact LCS.  The
prefilter therefore cannot change a decision (tests compare it with brute-force rouge_score).

The other functions are the Self-Instruct and Evol-Instruct heuristics; each returns the reason
(a short snake_case string, counted in the job summary) or None when the text passes.
"""

from __future__ import annotations

import re

import numpy as np
from rouge_score import scoring, tokenizers

# Things a text-only model cannot see or do (Self-Instruct, section 2.3); matched as whole words.
UNSUITABLE_WORDS = ("image", "images", "picture", "pictures", "photo", "photos", "graph", "graphs", "file", "files",
                    "map", "maps", "draw", "drawing", "plot", "plots", "go to", "video", "videos", "audio",
                    "music", "flowchart", "diagram", "diagrams", "chart", "charts")
_UNSUITABLE_RE = re.compile(r"\b(" + "|".join(re.escape(w) for w in UNSUITABLE_WORDS) + r")\b", re.IGNORECASE)
_PROGRAM_RE = re.compile(r"^\s*write a program\b", re.IGNORECASE)

# A small English stop-word list (for "the response is only punctuation and stop words").
STOP_WORDS = frozenset("""
a an the and or but if then else of to in on at by for with from as is are was were be been being it its this
that these those i you he she we they me him her us them my your his our their there here so not no yes do does
did have has had will would can could should may might must shall just than too very also oh ok okay well
""".split())


def _lcs_length(a: list[int], b: list[int]) -> int:
    """Length of the longest common subsequence (row-by-row dynamic programming)."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l_f(target: list, prediction: list) -> float:
    """ROUGE-L F-measure of two token lists, with rouge_score's arithmetic."""
    if not target or not prediction:
        return 0.0
    lcs = _lcs_length(list(target), list(prediction))
    return scoring.fmeasure(lcs / len(prediction), lcs / len(target))


class _Postings:
    """Growable (pool index, count) arrays of one token."""

    __slots__ = ("ids", "counts", "size")

    def __init__(self):
        self.ids = np.empty(4, np.int32)
        self.counts = np.empty(4, np.int16)
        self.size = 0

    def append(self, i: int, c: int) -> None:
        if self.size == len(self.ids):
            self.ids = np.resize(self.ids, 2 * self.size)
            self.counts = np.resize(self.counts, 2 * self.size)
        self.ids[self.size] = i
        self.counts[self.size] = min(c, 32767)
        self.size += 1


class RougeLPool:
    """A growing set of texts; `most_similar(text)` finds an entry with ROUGE-L F >= threshold."""

    def __init__(self, threshold: float = 0.7, texts=()):
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"ROUGE-L threshold must be in (0, 1], got {threshold}")
        self.threshold = float(threshold)
        self._tokenizer = tokenizers.DefaultTokenizer(use_stemmer=False)
        self._vocab: dict[str, int] = {}
        self._seqs: list[list[int]] = []
        self._lengths = np.zeros(1024, np.int32)
        self._postings: dict[int, _Postings] = {}
        self.texts: list[str] = []
        self.exact_checks = 0  # how many exact LCS computations the prefilter let through
        for t in texts:
            self.add(t)

    def __len__(self) -> int:
        return len(self._seqs)

    def tokens(self, text: str) -> list[str]:
        return self._tokenizer.tokenize(text)

    def add(self, text: str) -> None:
        ids = [self._vocab.setdefault(t, len(self._vocab)) for t in self.tokens(text)]
        i = len(self._seqs)
        self._seqs.append(ids)
        self.texts.append(text)
        if i == len(self._lengths):
            self._lengths = np.resize(self._lengths, 2 * i)
        self._lengths[i] = len(ids)
        counts: dict[int, int] = {}
        for t in ids:
            counts[t] = counts.get(t, 0) + 1
        for t, c in counts.items():
            p = self._postings.get(t)
            if p is None:
                p = self._postings[t] = _Postings()
            p.append(i, c)

    def most_similar(self, text: str) -> tuple[int, float] | None:
        """(pool index, F) of the most similar entry with F >= threshold, or None."""
        n = len(self._seqs)
        q = [self._vocab.get(t, -1) for t in self.tokens(text)]
        m = len(q)
        if n == 0 or m == 0:
            return None
        counts: dict[int, int] = {}
        for t in q:
            if t >= 0:
                counts[t] = counts.get(t, 0) + 1
        overlap = np.zeros(n, np.int32)
        for t, c in counts.items():
            p = self._postings[t]
            ids = p.ids[: p.size]
            overlap[ids] += np.minimum(p.counts[: p.size], c)
        total = self._lengths[:n] + m
        # 2 * LCS / (m + n) <= 2 * overlap / (m + n); the margin keeps float ties on the safe side
        cand = np.nonzero(2.0 * overlap >= self.threshold * total * (1.0 - 1e-9))[0]
        best: tuple[int, float] | None = None
        for i in cand.tolist():
            self.exact_checks += 1
            f = rouge_l_f(q, self._seqs[i])
            if f >= self.threshold and (best is None or f > best[1]):
                best = (i, f)
        return best


# ------------------------------------------------------------------------ heuristics


def instruction_problem(text: str, *, min_words: int = 3, max_words: int = 150, english: bool = True) -> str | None:
    """Self-Instruct's instruction filters -> the reason, or None when the instruction passes."""
    s = text.strip()
    words = s.split()
    if len(words) <= min_words:
        return "too_short"
    if len(words) > max_words:
        return "too_long"
    if _UNSUITABLE_RE.search(s):
        return "unsuitable_for_text_model"
    if _PROGRAM_RE.match(s):
        return "write_a_program"
    if not s[0].isalnum():
        return "starts_with_punctuation"
    if english and not s[0].isascii():
        return "non_english"
    return None


def is_sorry_response(text: str, max_words: int = 80) -> bool:
    """Evol-Instruct elimination: a short response that apologises (the teacher could not do it)."""
    return len(text.split()) < max_words and "sorry" in text.lower()


def is_only_punctuation_and_stop_words(text: str) -> bool:
    """Evol-Instruct elimination: nothing but punctuation and stop words (or empty)."""
    words = re.findall(r"[^\W_]+", text.lower())
    return all(w in STOP_WORDS for w in words)


def copied_scaffolding(text: str, scaffolding: tuple[str, ...]) -> str | None:
    """Evol-Instruct elimination: the evolved instruction copies the evolving prompt's own words."""
    low = text.lower()
    for w in scaffolding:
        if w.lower() in low:
            return w
    return None
