"""sft_jax.synth filters and parsers: the fast ROUGE-L pool equals rouge_score; the heuristics,
the elimination rules and the teacher-output parsers on crafted outputs."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from rouge_score import rouge_scorer

from sft_jax.synth import distill, evol_instruct, filters, self_instruct

VOCAB = "the a cat dog runs fast slow blue sky write poem about list three ways to make tea why is".split()


def _sentence(r: random.Random, lo=2, hi=14) -> str:
    return " ".join(r.choice(VOCAB) for _ in range(r.randint(lo, hi))) + r.choice(["", ".", "?", "!"])


def test_rouge_l_f_equals_rouge_score():
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    tok = scorer._tokenizer
    r = random.Random(0)
    for _ in range(300):
        a, b = _sentence(r), _sentence(r)
        assert filters.rouge_l_f(tok.tokenize(a), tok.tokenize(b)) == scorer.score(a, b)["rougeL"].fmeasure


def test_pool_decisions_equal_brute_force_rouge_score():
    """most_similar() finds exactly the entries rouge_score puts at or above the threshold."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    r = random.Random(1)
    texts = [_sentence(r) for _ in range(300)]
    pool = filters.RougeLPool(0.7, texts)
    queries = [_sentence(r) for _ in range(150)] + [t + " now" for t in texts[:50]] + ["", "!!!"]
    hits = 0
    for q in queries:
        scores = [scorer.score(q, t)["rougeL"].fmeasure for t in texts]
        best = max(scores)
        got = pool.most_similar(q)
        if best >= 0.7:
            hits += 1
            assert got is not None and got[1] == best and scores[got[0]] == best, q
        else:
            assert got is None, q
    assert hits >= 50  # the near-copies are all found
    assert pool.exact_checks < len(queries) * len(texts) / 20  # the prefilter skips most exact LCS


def test_pool_grows_and_threshold_checked():
    pool = filters.RougeLPool(0.7)
    assert pool.most_similar("write a poem about the sea") is None
    pool.add("Write a poem about the sea.")
    idx, f = pool.most_similar("write a short poem about the sea")
    assert idx == 0 and f == pytest.approx(2 * 6 / 13)
    assert pool.most_similar("list three ways to make tea") is None
    with pytest.raises(ValueError):
        filters.RougeLPool(0.0)


@pytest.mark.parametrize("text,why", [
    ("Sum it up.", "too_short"),
    (" ".join(["word"] * 151), "too_long"),
    ("Describe the image below in two sentences.", "unsuitable_for_text_model"),
    ("Plot the function y = x squared for me.", "unsuitable_for_text_model"),
    ("Tell me how to go to the station quickly.", "unsuitable_for_text_model"),
    ("Write a program that sorts a list of names.", "write_a_program"),
    ("- Give three reasons to learn Spanish.", "starts_with_punctuation"),
    ("Écris un poème sur la mer, s'il te plaît.", "non_english"),
    ("Give three reasons to learn Spanish today.", None),
    ("Explain why the sky looks blue during the day.", None),
])
def test_instruction_problem(text, why):
    assert filters.instruction_problem(text) == why


def test_non_english_only_when_asked():
    assert filters.instruction_problem("Écris un poème sur la mer.", english=False) is None


def test_response_eliminations():
    assert filters.is_sorry_response("Sorry, I cannot do that.")
    assert not filters.is_sorry_response("sorry " + "word " * 90)  # long answers may apologise
    assert filters.is_only_punctuation_and_stop_words("... it is the, and of a!")
    assert filters.is_only_punctuation_and_stop_words("")
    assert not filters.is_only_punctuation_and_stop_words("The answer is 42.")
    assert evol_instruct.response_problem("I'm sorry, but I can't.") == "response_sorry"
    assert evol_instruct.response_problem("Yes, it is.") == "response_no_content"
    assert evol_instruct.response_problem("Paris is the capital of France.") is None


def test_evolution_eliminations():
    assert evol_instruct.evolution_problem("") == "empty_evolution"
    assert evol_instruct.evolution_problem("As in the given prompt, list tea types.") == "copied_prompt_words"
    assert evol_instruct.evolution_problem("List five tea types #Rewritten Prompt# with origins.") == "copied_prompt_words"
    assert evol_instruct.evolution_problem("List five tea types with their origins.") is None
    assert evol_instruct.parse_evolved("#Rewritten Prompt#: List five teas.") == "List five teas."
    assert evol_instruct.parse_evolved("Created Prompt: List five teas.") == "List five teas."
    assert evol_instruct.parse_equal("Equal") is True
    assert evol_instruct.parse_equal("Not Equal.") is False
    assert evol_instruct.parse_equal(" Different: the second adds a constraint") is False
    assert evol_instruct.parse_equal("Hmm, hard to say") is None


def test_evolve_prompts_carry_instruction_and_operation():
    for op in evol_instruct.OPERATIONS:
        p = evol_instruct.evolve_prompt(op, "List three teas.")
        assert "#Given Prompt#:\nList three teas.\n" in p
    assert evol_instruct.IN_DEPTH_HOW["add_constraints"] in evol_instruct.evolve_prompt("add_constraints", "x")


def test_parse_instructions():
    text = " Name three rivers in Asia.\nTask 10: Translate the sentence into French.\n11. Rate this joke."
    assert self_instruct.parse_instructions(text, "stop") == (
        ["Name three rivers in Asia.", "Translate the sentence into French.", "Rate this joke."], 0)
    got, cut = self_instruct.parse_instructions(text, "length")
    assert cut == 1 and got[-1] == "Translate the sentence into French."
    assert self_instruct.parse_instructions("   \n", "stop") == ([], 0)


def test_generation_prompt_shape():
    p = self_instruct.generation_prompt([f"Instruction number {k}." for k in range(8)])
    assert p.endswith("Task 8: Instruction number 7.\nTask 9:")
    assert p.startswith(self_instruct.GENERATE_HEADER)


def test_parse_classification():
    assert self_instruct.parse_classification(" Yes") is True
    assert self_instruct.parse_classification("no, it is open-ended") is False
    assert self_instruct.parse_classification("Maybe") is None


def test_parse_instances_input_first():
    text = ("Example 1\nInput: 2 + 2\nOutput: 4\n\nExample 2\nOutput: Any number.\n"
            "Example 3\nInput: None\nOutput: 0\n\nTask: Another task\nExample 1\nOutput: nope")
    assert self_instruct.parse_instances(text, False) == [("2 + 2", "4"), ("", "Any number."), ("", "0")]
    assert self_instruct.parse_instances("Just the answer.", False) == [("", "Just the answer.")]
    assert self_instruct.parse_instances("Example 1\nInput: dangling", False) is None
    assert self_instruct.parse_instances("", False) is None


def test_parse_instances_output_first():
    text = "Class label: Positive\nInput: I loved it.\nClass label: Negative\nInput: Awful.\nClass label: Neutral"
    assert self_instruct.parse_instances(text, True) == [("I loved it.", "Positive"), ("Awful.", "Negative"),
                                                         ("", "Neutral")]
    assert self_instruct.parse_instances("no labels here", True) is None


def test_parse_judge_score_and_ranking():
    assert distill.parse_score("Score: 8\nGood.") == 8.0
    assert distill.parse_score("7/10 - fine") == 7.0
    assert distill.parse_score("score = 9.5") == 9.5
    assert distill.parse_score("Score: 11") is None
    assert distill.parse_score("great answer") is None
    a, b, c = {"judge": 7.0, "loglik": -2.0}, {"judge": 7.0, "loglik": -1.0}, {"judge": None, "loglik": -0.1}
    assert max([a, b, c], key=lambda x: distill.rank_key(x, "both")) is b
    assert max([a, b, c], key=lambda x: distill.rank_key(x, "loglik")) is c
    assert max([c, a, b], key=lambda x: distill.rank_key(x, "judge")) is a  # the first of equal scores


def test_instances_filters_and_global_pair_duplicates(tmp_path):
    from sft_jax.synth.inputs import SeedTask
    from sft_jax.synth.jobs import Job
    from sft_jax.synth.teachers import Completion

    seeds = [SeedTask(f"Seed task number {k} here.", (("", "out"),), k % 2 == 0) for k in range(8)]
    si = self_instruct.SelfInstruct(None, seeds, self_instruct.Options(num=3, max_instances=2),
                                    Job(str(tmp_path / "o.jsonl"), {}, progress=False))
    c = Counter()
    text = ("Example 1\nInput: a\nOutput: x\nExample 2\nInput: a\nOutput: y\nExample 3\nOutput: \n"
            "Example 4\nInput: a\nOutput: x\nExample 5\nOutput: z\nExample 6\nOutput: w")
    got = si._instances("Task one.", False, Completion(text), c)
    assert got == [("a", "x"), ("", "z")]
    assert c == Counter({"instances.candidates": 6, "instances.accepted": 2, "instances.rejected.empty_output": 1,
                         "instances.rejected.same_input_other_output": 1, "instances.rejected.duplicate_pair": 1,
                         "instances.rejected.over_max_instances": 1})
    si.pairs.update(got)
    c2 = Counter()
    assert si._instances("Task two.", False, Completion("Example 1\nInput: a\nOutput: x"), c2) == []
    assert c2["instances.rejected.duplicate_pair"] == 1
    c3 = Counter()
    assert si._instances("Task three.", False, Completion("Example 1\nInput: dangling"), c3) == []
    assert c3 == Counter({"instances.candidates": 1, "instances.rejected.unreadable": 1})
    cut = Counter()
    assert si._instances("T.", False, Completion("Output: p\nExample 2\nOutput: q", finish_reason="length"),
                         cut) == [("", "p")]
    assert cut["instances.rejected.cut_by_length"] == 1
