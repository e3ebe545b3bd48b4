"""Text-only quality checks over normalised conversations (no model, no tokenizer).

Each check looks at a record ``{"messages": [...], "source": "file:line"}`` as read by
:mod:`sft_jax.data.formats` (so it covers every format the trainer reads):

- duplicates: exact (hash of the normalised text) and near (MinHash + LSH over word
  shingles, ``datasketch``), grouped into clusters with union-find;
- noise: empty / very short responses, refusal boilerplate, responses cut mid-sentence,
  responses that restate the prompt, heavy repetition (repeated n-gram share), unclosed
  code fences, a response in another language than the one the prompt asks for;
- decontamination: word n-gram overlap (default n = 13, as GPT-3) with eval sets;
- task mix: the root verb and its object of each instruction (a heuristic parser, see
  BUILD_NOTES.md "Data quality (issue 25)" for why not spaCy / NLTK).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import unicodedata
import zlib
from collections import Counter

import numpy as np
from datasketch import MinHash, MinHashLSH

from sft_jax.data import formats
from sft_jax.data.formats import DataError

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff"  # kana and Han: written without spaces, one word a character
_WORD_RE = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+(?:'[^\W{_CJK}]+)?")


def normalise_words(text: str) -> list[str]:
    """NFKC, lower case, words only (punctuation and whitespace differences vanish); each
    Chinese / Japanese character counts as a word."""
    return _WORD_RE.findall(unicodedata.normalize("NFKC", text).lower())


def source_file(source: str) -> str:
    """``file:line`` -> ``file``."""
    return source.rsplit(":", 1)[0]


def message_text(m: dict) -> str:
    """A message's text as the model sees it: reasoning, content and tool calls."""
    parts = [m.get("reasoning_content") or "", m.get("content") or ""]
    parts += [json.dumps(c["function"], sort_keys=True) for c in m.get("tool_calls") or ()]
    return "\n".join(p for p in parts if p)


def conversation_text(messages: list[dict]) -> str:
    return "\n".join(message_text(m) for m in messages)


def first_instruction(messages: list[dict]) -> str:
    users = [m["content"] for m in messages if m["role"] == "user"]
    return users[0] if users else ""


def responses(messages: list[dict]) -> list[tuple[int, str]]:
    """(message index, content) of every assistant turn."""
    return [(i, m["content"]) for i, m in enumerate(messages) if m["role"] == "assistant"]


def exact_key(messages: list[dict]) -> str:
    """Hash of the role-tagged normalised text: equal for rows that differ only in case,
    punctuation or whitespace."""
    parts = [f"{m['role']}:{' '.join(normalise_words(message_text(m)))}" for m in messages]
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()


# ------------------------------------------------------------------------ duplicates


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def shingles(words: list[str], k: int) -> set[bytes]:
    if len(words) < k:
        return {" ".join(words).encode()} if words else set()
    return {" ".join(words[i:i + k]).encode() for i in range(len(words) - k + 1)}


LSH_SLACK = 0.85  # LSH candidate threshold relative to the verified one


def shingle_hashes(words: list[str], k: int, cache: dict[str, int]) -> list[int]:
    """The distinct 32-bit hashes of the word ``k``-grams (CRC32 per word, combined as a
    polynomial mod 2^32): the same set as hashing :func:`shingles`, without a Python-level
    hash call per shingle."""
    if not words:
        return []
    wh = np.fromiter((cache.setdefault(w, zlib.crc32(w.encode())) for w in words), np.uint64, len(words))
    n = max(len(words) - k + 1, 1)
    h = np.zeros(n, np.uint64)
    for j in range(min(k, len(words))):
        h = (h * np.uint64(1_000_003) + wh[j:j + n]) & np.uint64(0xFFFFFFFF)
    return np.unique(h).tolist()


@dataclasses.dataclass
class DuplicateCluster:
    """Rows (indices into the record list) that are exact or near copies of each other."""

    members: list[int]
    exact: bool  # every member has the same normalised text


def find_duplicates(records: list[dict], *, threshold: float = 0.7, shingle: int = 3,
                    num_perm: int = 128, seed: int = 1) -> list[DuplicateCluster]:
    """Clusters (size >= 2) of exact duplicates and near duplicates.

    Exact copies are grouped by :func:`exact_key`; one representative per group then gets
    a MinHash over its word ``shingle``-grams (:func:`shingle_hashes`), and ``MinHashLSH``
    (tuned to ``LSH_SLACK * threshold``) proposes candidate pairs.  A candidate pair joins a
    cluster only when the exact Jaccard similarity of its shingle sets is >= ``threshold``."""
    n = len(records)
    uf = _UnionFind(n)
    first_of: dict[str, int] = {}
    keys = [exact_key(r["messages"]) for r in records]
    for i, k in enumerate(keys):
        if k in first_of:
            uf.union(first_of[k], i)
        else:
            first_of[k] = i
    reps = sorted(first_of.values())
    word_hash: dict[str, int] = {}
    docs = [shingle_hashes(normalise_words(conversation_text(records[i]["messages"])), shingle, word_hash)
            for i in reps]
    # the shingles arrive hashed (32-bit): MinHash only applies its permutations (hashfunc=int)
    hashes = MinHash.bulk(docs, num_perm=num_perm, seed=seed, hashfunc=int)
    # LSH proposes candidates, tuned below the threshold and towards recall; the exact Jaccard
    # of the shingle sets decides.  At threshold 0.7: datasketch's default weights at 0.595 give
    # b=18, r=7 and miss a fifth of the pairs at J = 0.7; weights (0.2, 0.8) give b=24, r=5:
    # P(candidate) = 0.988 at J = 0.7, 0.9985 at 0.75, 0.057 at 0.3.
    lsh = MinHashLSH(threshold=LSH_SLACK * threshold, num_perm=num_perm, weights=(0.2, 0.8))
    with lsh.insertion_session() as session:
        for j, m in enumerate(hashes):
            session.insert(j, m, check_duplication=False)
    sets: dict[int, set[int]] = {}

    def shingle_set(j: int) -> set[int]:
        if j not in sets:
            sets[j] = set(docs[j])
        return sets[j]

    for j, m in enumerate(hashes):
        for other in lsh.query(m):
            if other > j and uf.find(reps[j]) != uf.find(reps[other]):
                a, b = shingle_set(j), shingle_set(other)
                if len(a & b) >= threshold * len(a | b):
                    uf.union(reps[j], reps[other])
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(uf.find(i), []).append(i)
    out = [DuplicateCluster(members=g, exact=len({keys[i] for i in g}) == 1) for g in groups.values() if len(g) > 1]
    out.sort(key=lambda c: (-len(c.members), c.members[0]))
    return out


# ----------------------------------------------------------------------------- noise

_CAPABILITY = (r"(?:help|assist|provide|answer|fulfill|comply|create|generate|access|browse|display|give|perform|"
               r"retrieve|estimate|determine|complete|write|draw|show|see|predict|do that|do this)\b")
REFUSAL_PATTERNS = (
    r"\bas an ai(?: language)? model\b",
    r"\bas an ai assistant\b",
    r"\bas an ai,? i (?:am not|cannot|can't|do not|don't)\b",
    r"\bas a (?:large )?language model\b",
    # "I'm sorry, but I cannot <do what an assistant does>" (not "I'm sorry, but I'm unable to come
    # into work today" in a requested sick-day email, nor HAL's "I'm afraid I can't let you do that")
    r"\bi(?:'m| am) (?:sorry|afraid),? but (?:i|as an ai)\b[^.]{0,40}\b(?:can(?:not|'t)|unable to|not able to) "
    + _CAPABILITY,
    r"\bi(?:'m| am) (?:sorry|afraid),? (?:i|but i) (?:can(?:not|'t)|am unable to|'m unable to) " + _CAPABILITY,
    r"\bi can(?:not|'t) (?:fulfill|comply with|assist with|help with) (?:that|this|your) request\b",
    r"\bi(?:'m| am) not able to (?:provide|assist|help|fulfill)\b",
    r"\bi do not have (?:personal )?(?:opinions|feelings|the ability to)\b",
)
_REFUSAL_RE = re.compile("|".join(REFUSAL_PATTERNS), re.IGNORECASE)
# a line that opens or closes a fenced block: starts with ``` / ~~~ and has no second fence
# on the same line (LIMA writes inline code as ```x```, which is not a block)
_FENCE_RE = re.compile(r"^[ \t]*(```|~~~)(?:(?!```|~~~).)*$", re.MULTILINE)
_LIST_LINE_RE = re.compile(r"^\s*(?:[-*+•>]|\d+[.)]|#+|\|)\s*")  # list item, quote, heading, table row
_URL_END_RE = re.compile(r"(?:https?://|www\.)\S+$")


def is_truncated(text: str, min_words: int = 12) -> bool:
    """Cut mid-sentence: a response of >= ``min_words`` words whose last line is prose
    (not a list item, heading, table row or code) and that stops on a lower-case word or
    a comma instead of closing punctuation."""
    stripped = text.rstrip()
    if len(normalise_words(stripped)) < min_words:
        return False
    if len(_FENCE_RE.findall(stripped)) % 2:  # inside an open code block: reported as its own reason
        return False
    last_line = stripped.rsplit("\n", 1)[-1]
    if _LIST_LINE_RE.match(last_line) or _URL_END_RE.search(last_line):
        return False
    last = stripped[-1]
    if last in ",(":
        return True
    last_word = last_line.split()[-1].lstrip("\"'“‘(-—–")
    if (not last.islower() or not last_word or last_word[0].isupper() or last_word.startswith(("#", "@"))
            or any(c.isdigit() for c in last_word)):
        # closing punctuation, a name / title / citation, a number, a hashtag: complete
        return False
    lines = [ln.strip() for ln in stripped.split("\n") if ln.strip()]
    open_lines = sum(1 for ln in lines if ln[-1].isalnum() or ln[-1] == ",")
    if len(lines) >= 4 and open_lines / len(lines) >= 0.5:  # verse: lines end on a word or a comma
        return False
    # a short label line after a full sentence ("Answer: paris") is complete
    return len(normalise_words(last_line)) >= 6


def repeated_ngram_share(words: list[str], n: int = 3) -> float:
    """Share of the word n-grams that repeat an earlier n-gram (0 = none repeat)."""
    if len(words) < n + 1:
        return 0.0
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams)


def restates_prompt(prompt: str, response: str, threshold: float = 0.8) -> bool:
    """The response is (nearly) the prompt itself: Jaccard of word 3-gram sets >= threshold."""
    a = shingles(normalise_words(prompt), 3)
    b = shingles(normalise_words(response), 3)
    if not a or not b:
        return False
    return len(a & b) / len(a | b) >= threshold


# Languages a prompt may ask for, with how to recognise them: a Unicode script
# (non-Latin), or frequent function words (Latin-script languages).
_SCRIPTS = {
    "chinese": r"[\u4e00-\u9fff]", "japanese": r"[\u3040-\u30ff]", "korean": r"[\uac00-\ud7af]",
    "russian": r"[\u0400-\u04ff]", "ukrainian": r"[\u0400-\u04ff]", "greek": r"[\u0370-\u03ff]",
    "arabic": r"[\u0600-\u06ff]", "hebrew": r"[\u0590-\u05ff]", "hindi": r"[\u0900-\u097f]",
    "thai": r"[\u0e00-\u0e7f]",
}
_STOPWORDS = {
    "english": "the and is are of to in that it for you with this was not be have".split(),
    "french": "le la les et est des une un du que pour dans pas vous avec sont je nous".split(),
    "spanish": "el la los las y es de que en un una por para con no se del al".split(),
    "german": "der die das und ist nicht ein eine zu mit sich auf den dem ich sie".split(),
    "italian": "il la le e di che è un una per non con sono del della gli".split(),
    "portuguese": "o a os as e de que em um uma para com não do da são".split(),
    "dutch": "de het een en van is dat niet op te zijn met voor ik".split(),
}
_LANGS = sorted(set(_SCRIPTS) | set(_STOPWORDS))
# "into French." / "in Spanish, please" / "to German:" -- the language word ends the clause
# ("in Greek mythology" or "Japanese politics" ask for nothing)
_ASK_RE = re.compile(
    r"\b(?:in|into|to)\s+(" + "|".join(_LANGS) + r")\b(?=\s*(?:$|[.,;:!?\"')\]]|\s(?:please|language|only)\b))",
    re.IGNORECASE | re.MULTILINE)
_FROM_RE = re.compile(r"\bfrom\s+(" + "|".join(_LANGS) + r")\b", re.IGNORECASE)


def asked_language(prompt: str) -> str | None:
    """The language a prompt asks the answer to be in ("Translate into French", "answer in
    Spanish"), or None.  "from X to Y" asks for Y."""
    asked = [m.group(1).lower() for m in _ASK_RE.finditer(prompt)]
    sources = {m.group(1).lower() for m in _FROM_RE.finditer(prompt)}
    asked = [a for a in asked if a not in sources]
    return asked[-1] if asked else None


def language_matches(text: str, language: str) -> bool | None:
    """Whether ``text`` is in ``language`` (None: too little text to tell)."""
    letters = [c for c in text if c.isalpha()]
    if len(letters) < 8:
        return None
    if language in _SCRIPTS:
        hits = len(re.findall(_SCRIPTS[language], text))
        return hits / len(letters) >= 0.3
    words = normalise_words(text)
    if len(words) < 4:
        return None
    non_latin = sum(1 for c in letters if ord(c) > 0x24F)
    if non_latin / len(letters) > 0.3:
        return False
    scores = {lang: sum(w in sw for w in words) for lang, sw in ((k, set(v)) for k, v in _STOPWORDS.items())}
    best = max(scores.values())
    if best == 0:
        return None
    return scores[language] == best


@dataclasses.dataclass
class NoiseOptions:
    min_response_words: int = 2
    repetition_threshold: float = 0.5  # repeated word-3-gram share that counts as heavy repetition
    repetition_min_words: int = 30
    restate_threshold: float = 0.8
    truncation_min_words: int = 12


NOISE_REASONS = ("empty_response", "short_response", "refusal", "truncated", "restates_prompt", "repetition",
                 "unclosed_code_fence", "wrong_language")


def noise_reasons(messages: list[dict], opts: NoiseOptions) -> dict[str, str]:
    """reason -> detail for one conversation (empty when clean).  Every assistant turn is
    checked; the detail names the turn (message index) and what was seen."""
    out: dict[str, str] = {}
    for idx, text in responses(messages):
        prompt = next((m["content"] for m in reversed(messages[:idx]) if m["role"] == "user"), "")
        words = normalise_words(text)
        turn = f"message {idx}"
        if messages[idx].get("tool_calls") and not text.strip():
            continue  # a turn that only calls tools has no text to judge
        if not text.strip():
            out.setdefault("empty_response", turn)
            continue
        if len(words) < opts.min_response_words:
            out.setdefault("short_response", f"{turn}: {len(words)} word(s): {text.strip()[:60]!r}")
        m = _REFUSAL_RE.search(text)
        if m:
            out.setdefault("refusal", f"{turn}: {m.group(0)!r}")
        if is_truncated(text, opts.truncation_min_words):
            out.setdefault("truncated", f"{turn}: ends {text.rstrip()[-40:]!r}")
        if prompt and restates_prompt(prompt, text, opts.restate_threshold):
            out.setdefault("restates_prompt", turn)
        if len(words) >= opts.repetition_min_words:
            share = repeated_ngram_share(words)
            if share >= opts.repetition_threshold:
                out.setdefault("repetition", f"{turn}: {share:.0%} of word 3-grams repeat")
        fences = len(_FENCE_RE.findall(text))
        if fences % 2:
            out.setdefault("unclosed_code_fence", f"{turn}: {fences} fence line(s)")
        lang = asked_language(prompt) if prompt else None
        if lang and language_matches(text, lang) is False:
            out.setdefault("wrong_language", f"{turn}: {lang} asked")
    return out


# ------------------------------------------------------------------- decontamination


def _eval_texts(path: str) -> list[tuple[str, str]]:
    """(source, text) of every eval row: a conversation in any trainer format, or (for
    benchmark files like ``{"question": ..., "answer": ...}``) the row's string fields."""
    rows = formats.read_rows(path)
    try:
        fmt = formats.detect_format(rows[0][0], f"{path}:{rows[0][1]}")
    except DataError:
        fmt = None
    out = []
    for row, line in rows:
        where = f"{path}:{line}"
        if fmt is None:
            text = "\n".join(v for v in row.values() if isinstance(v, str))
            if not text.strip():
                raise DataError(f"{where}: eval row has no string field to compare against")
        else:
            text = conversation_text(formats.row_to_conversation(row, fmt, where))
        out.append((where, text))
    return out


class EvalIndex:
    """Word n-grams of eval sets; eval rows shorter than n words count whole."""

    def __init__(self, paths: list[str], n: int = 13):
        self.n = n
        self.grams: dict[int, dict[tuple, str]] = {}  # length -> gram -> eval source
        self.num_rows = 0
        for path in paths:
            for spec in formats.expand_paths(path):
                for where, text in _eval_texts(spec):
                    self.num_rows += 1
                    words = normalise_words(text)
                    k = min(n, len(words))
                    if k == 0:
                        continue
                    table = self.grams.setdefault(k, {})
                    for i in range(len(words) - k + 1):
                        table.setdefault(tuple(words[i:i + k]), where)

    def overlap(self, text: str) -> tuple[str, str] | None:
        """(eval source, overlapping n-gram) of the first overlap found, or None."""
        words = normalise_words(text)
        for k, table in self.grams.items():
            for i in range(len(words) - k + 1):
                hit = table.get(tuple(words[i:i + k]))
                if hit is not None:
                    return hit, " ".join(words[i:i + k])
        return None


# -------------------------------------------------------------------------- task mix

_LEADING = [  # politeness / framing before the verb, longest first
    "i would like you to", "i'd like you to", "i want you to", "i need you to", "can you please",
    "could you please", "would you please", "will you please", "can you", "could you", "would you", "will you",
    "please", "help me", "let's", "kindly", "now",
]
_QUESTION_WORDS = set("what why how when where who whom whose which is are was were do does did can could "
                      "should would will shall may might has have had am".split())
_NOT_VERBS = set("i you we they he she it there here this that my our your if so as in for on at after "
                 "before since while because although the a an".split())
_SKIP_OBJECT = set("a an the this that these those some any me us him her them it my your our their his its "
                   "following given below above short brief simple new few several one two three list of "
                   "about for to with on in into from up out and or".split())


def root_verb_object(instruction: str) -> tuple[str, str]:
    """(verb, object) of an instruction by position: imperative instructions start with
    their verb ("Describe a process ..." -> ("describe", "process")); framing such as
    "Can you please" is skipped first.  Questions give ("question:<wh-word>", "") and an
    instruction that is not a verb-first sentence gives ("other", "")."""
    words = normalise_words(instruction.split("\n", 1)[0])
    text = " ".join(words)
    changed = True
    while changed:
        changed = False
        for lead in _LEADING:
            if text == lead or text.startswith(lead + " "):
                text = text[len(lead):].strip()
                changed = True
    words = text.split()
    if not words:
        return "other", ""
    verb = words[0]
    if verb in _QUESTION_WORDS:
        return f"question:{verb}", ""
    if not verb.isalpha() or verb in _NOT_VERBS or verb in _SKIP_OBJECT or verb.endswith(("ing", "ed", "ly")):
        return "other", ""
    obj = next((w for w in words[1:] if w not in _SKIP_OBJECT and w.isalpha()), "")
    return verb, obj


def task_mix(records: list[dict]) -> dict:
    """Counts of root verbs and (verb, object) pairs over the first instruction of each record."""
    pairs = [root_verb_object(first_instruction(r["messages"])) for r in records]
    verbs = Counter(v for v, _ in pairs)
    objects = Counter(pairs)
    return {"pairs": pairs, "verbs": verbs, "verb_objects": objects,
            "entropy": entropy(np.asarray(list(verbs.values()), np.float64))}


def entropy(counts: np.ndarray) -> dict:
    """Shannon entropy of a count distribution: nats, normalised by log(k), and exp (the
    effective number of equally used categories)."""
    counts = counts[counts > 0]
    if counts.size == 0:
        return {"nats": 0.0, "normalised": 0.0, "effective": 0.0, "categories": 0}
    p = counts / counts.sum()
    h = float(-(p * np.log(p)).sum())
    return {"nats": h, "normalised": h / np.log(counts.size) if counts.size > 1 else 0.0,
            "effective": float(np.exp(h)), "categories": int(counts.size)}
