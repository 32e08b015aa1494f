"""
Tests for verify.py: the answer formats models write that it reads (multiple-select letters, an
unfinished trace, the last sentence without a box, answers in several parts, equivalent forms, other
languages, a choice made in prose), the verdict behind each reward, and the audit of a step.

    python -m pytest -q test_verify_formats.py
"""

import sys
import time

import pytest

import verify

# ---------------------------------------------------------------------------
# (completion, reference, expected reward) by kind of format; true and false cases in each

FORMAT_CASES = {
    "multiple select": [
        ("\\boxed{A, C}", "AC", True),
        ("\\boxed{A、C}", "AC", True),
        ("\\boxed{A C D}", "ACD", True),
        ("\\boxed{A\\;C}", "AC", True),
        ("\\boxed{\\text{A, C}}", "AC", True),
        ("\\boxed{\\text{A}, \\text{C}}", "AC", True),
        ("\\boxed{ACD}", "A, C, D", True),
        ("\\boxed{C, A}", "AC", True),
        ("\\boxed{BD}", "B,D", True),
        ("\\boxed{A, C}", "ABC", False),
        ("\\boxed{A, B}", "AC", False),
        ("\\boxed{A}", "AC", False),
        ("\\boxed{ABD}", "AB", False),
        ("\\boxed{A、B、D}", "ABC", False),
        ("\\boxed{B\\ (12)}", "B", True),
        ("\\boxed{B(12)}", "B", True),
        ("\\boxed{\\text{B}(12)}", "B", True),
        ("\\boxed{B（12）}", "B", True),
        ("\\boxed{C\\text{ (the function is even)}}", "C", True),
        ("\\boxed{B\\ (\\frac{1}{2})}", "\\frac12", True),
        ("\\boxed{B(12)}", "A", False),
        ("\\boxed{B\\ (12)}", "13", False),
        ("\\boxed{C\\text{ (the function is even)}}", "D", False),
        ("Hence the answer is option C: $\\boxed{12}$.", "C", True),
        ("So the length is $\\boxed{\\frac{1}{2}}$, which is option (B).", "B", True),
        ("So the length is $\\boxed{\\frac{1}{2}}$, which is option (B).", "C", False),
        ("所以选 D，$\\boxed{-3}$。", "D", True),
        ("所以选 D，$\\boxed{-3}$。", "A", False),
        ("The value is $\\boxed{7}$. Option (A) gives 6, so it is not A.", "A", False),
    ],
    "unfinished reasoning": [
        ("<think>Let me add: 20 + 21 = 41. So it is 41 ... wait, no", "41", False),
        ("<think>6 * 7 = 42, so the answer is \\boxed{42}. Hmm, let me double check", "42", False),
        ("<think>6 * 7 = 42.</think>\nThe answer is \\boxed{42}.", "42", True),
        ("<think>6 * 7 = 42.</think>\nThe answer is \\boxed{41}.", "42", False),
        ("6 * 7 = 42.</think>\n\nSo the product is $\\boxed{42}$.", "42", True),
        ("<think>6 * 7 = 42, so \\boxed{42}</think>", "42", True),    # reasoning closed, answer only inside it
        ("<think>6 * 7 = 42, so \\boxed{41}</think>", "42", False),
        ("<think>first try</think>The answer is 5.<think>hmm, but 6?", "5", False),
        ("<thinking>12 + 30 = 42</thinking>\nAnswer: 42", "42", True),
        ("<thinking>12 + 30 = 42, answer 42", "42", False),
        ("<|begin_of_thought|>so 42<|end_of_thought|><|begin_of_solution|>\\boxed{42}<|end_of_solution|>", "42", True),
        ("<|begin_of_thought|>so \\boxed{42}", "42", False),
        ("<|channel|>analysis<|message|>Compute 6*7=42. Answer 42.<|end|><|start|>assistant<|channel|>final<|message|>The answer is **42**.", "42", True),
        ("<|channel|>analysis<|message|>Compute 6*7=42. Answer 42.<|end|><|start|>assistant<|channel|>final<|message|>The answer is **41**.", "42", False),
        ("<|channel|>analysis<|message|>Compute 6*7=42. So \\boxed{42}", "42", False),
        ("◁think▷6*7=42◁/think▷\\boxed{42}", "42", True),
        ("◁think▷6*7=42, \\boxed{42}", "42", False),
    ],
    "last sentence": [
        ("She starts with 20 apples and gives away 6. That leaves **14** apples.", "14", True),
        ("She starts with 20 apples and gives away 6. That leaves **14** apples.", "20", False),
        ("The trip takes **27 minutes**, which is less than the 30 we allowed.", "27", True),
        ("The trip takes **27 minutes**, which is less than the 30 we allowed.", "30", False),
        ("We square both sides, hence $y^2 = 49$.", "49", True),
        ("We square both sides, hence $y^2 = 49$.", "7", False),
        ("Adding the three legs, 9 + 8 + 10 = 27 minutes in all.", "27", True),
        ("Adding the three legs, 9 + 8 + 10 = 27 minutes in all.", "10", False),
        ("The walk takes 27 minutes in all, 3 fewer than the bus.", "27", True),
        ("The volume is 7/3 * π.", "\\frac{7\\pi}{3}", True),
        ("The volume is 7/3 * π.", "\\frac{7}{3}", False),
        ("So the area is 7π/3 square units.", "\\frac{7\\pi}{3}", True),
        ("So the area is 2√3.", "2\\sqrt{3}", True),
        ("So the area is 2√3.", "3\\sqrt{2}", False),
        ("The volume is 7/3 times π.", "\\frac{7\\pi}{3}", True),
        ("The side is x² = 16, so the area is 16 cm².", "16", True),
        ("So the probability is 2/5.", "\\frac25", True),
        ("So the probability is 2/5.", "5", False),
        ("Hence it equals 3/4 of the total.", "0.75", True),
        ("So Tom keeps **14** apples; Ann keeps the other 6.", "14", True),
        ("So Tom keeps **14** apples; Ann keeps the other 6.", "6", False),
        ("**Step 1:** 20 - 6 = 14.\n**Step 2:** 14 + 3 = 17 in all.", "17", True),
        ("**Step 1:** 20 - 6 = 14.\n**Step 2:** 14 + 3 = 17 in all.", "14", False),
        ("The volume is 7/3 times π.", "\\frac73", False),
        ("The walk takes 27 minutes in all, 3 fewer than the bus.", "3", False),
    ],
    "several parts": [
        ("\\boxed{a = 2 \\text{ 且 } b = 3}", "2, 3", True),
        ("\\boxed{a=2 且 b=3}", "2, 3", True),
        ("\\boxed{a=2 且 b=4}", "2, 3", False),
        ("\\boxed{a = 2 \\quad b = 3}", "2, 3", True),
        ("\\boxed{a = 2,\\quad b = 3}", "2, 3", True),
        ("\\boxed{a = 3 \\quad b = 2}", "2, 3", False),
        ("\\boxed{a = 2 \\text{ and } b = 3}", "a=2, b=3", True),
        ("The first blank is $\\boxed{3}$ and the second is $\\boxed{\\frac{1}{2}}$.", "3, \\frac12", True),
        ("The first blank is $\\boxed{3}$ and the second is $\\boxed{\\frac{1}{2}}$.", "3, \\frac13", False),
        ("(1) $\\boxed{a=3}$; (2) $\\boxed{b=5}$.", "3, 5", True),
        ("(1) $\\boxed{3}$; (2) $\\boxed{5}$.", "3; 5", True),
        ("\\boxed{(\\sin x, \\cos x)}", "(\\sin(x), \\cos(x))", True),
        ("\\boxed{(\\sin x, \\cos x)}", "(\\cos x, \\sin x)", False),
        ("\\boxed{f(x) = x^2, g(x) = 2x}", "(x^2, 2x)", True),
        ("\\boxed{f(x) = x^2, g(x) = 2x}", "(2x, x^2)", False),
        ("\\boxed{(f(x), g(x)) = (x^2, 2x)}", "(x^2, 2x)", True),
        ("\\boxed{-2, 3}", "3 \\text{ and } -2", True),
        ("\\boxed{x = -2, x = 3}", "x=3 \\text{ and } x=-2", True),
        ("\\boxed{-2, 4}", "3 \\text{ and } -2", False),
        ("\\boxed{-2 \\text{ and } 3}", "3 and -2", True),
        ("\\boxed{x = \\frac{\\pi}{4} + k\\pi, k \\in \\mathbb{Z}}", "\\frac{\\pi}{4} + k\\pi", True),
        ("\\boxed{x = \\frac{\\pi}{4} + k\\pi \\ (k \\in \\mathbb{Z})}", "\\frac{\\pi}{4}+k\\pi, k\\in\\mathbb{Z}", True),
        ("\\boxed{\\frac{\\pi}{4} + 2k\\pi, k \\in \\mathbb{Z}}", "\\frac{\\pi}{4} + k\\pi", False),
        ("\\boxed{x = \\frac{\\pi}{4} + n\\pi, n \\in \\mathbb{Z}}", "\\frac{\\pi}{4} + k\\pi, k \\in \\mathbb{Z}", True),
        ("\\boxed{x = \\frac{\\pi}{3} + n\\pi, n \\in \\mathbb{Z}}", "\\frac{\\pi}{4} + k\\pi, k \\in \\mathbb{Z}", False),
        ("\\boxed{x = k\\pi + \\frac{\\pi}{4}, \\text{ where } k \\text{ is an integer}}", "\\frac{\\pi}{4} + k\\pi", True),
        ("\\boxed{x = 7, y = 2}", "x = 2 \\text{ and } y = 7", False),
        ("\\boxed{(1, 2)}", "2 \\text{ and } 1", False),
    ],
    "equivalent forms": [
        ("The edge is \\sqrt[3]{16}/2 inches long.", "\\sqrt[3]{2}", True),
        ("The edge is \\sqrt[3]{16}/2 inches long.", "\\sqrt[3]{4}", False),
        ("So the ratio is \\frac{3}{4} in lowest terms.", "0.75", True),
        ("\\boxed{y \\ne 5}", "y != 5", True),
        ("\\boxed{y \\ne 5}", "y != 6", False),
        ("The domain is all $y \\ne 5$.", "y \\neq 5", True),
        ("\\boxed{2 3/4}", "\\frac{11}{4}", True),
        ("\\boxed{2 3/4}", "2.75", True),
        ("\\boxed{2 3/4}", "\\frac{3}{2}", False),
        ("She needs 2 3/4 cups of flour.", "\\frac{11}{4}", True),
        ("\\boxed{\\begin{pmatrix} 0.6 & -0.8 \\\\ 0.8 & 0.6 \\end{pmatrix}}", "\\begin{pmatrix} \\frac35 & -\\frac45 \\\\ \\frac45 & \\frac35 \\end{pmatrix}", True),
        ("\\boxed{\\begin{pmatrix} 0.6 & 0.8 \\\\ 0.8 & 0.6 \\end{pmatrix}}", "\\begin{pmatrix} \\frac35 & -\\frac45 \\\\ \\frac45 & \\frac35 \\end{pmatrix}", False),
        ("\\boxed{\\begin{pmatrix} 0.25 & 1.5 \\end{pmatrix}}", "\\begin{pmatrix} 1/4 & 3/2 \\end{pmatrix}", True),
        ("\\boxed{2:30:00}", "2:30", True),
        ("\\boxed{14:30:00}", "2:30 \\text{ p.m.}", True),
        ("\\boxed{2:30:15}", "2:30", False),
        ("\\boxed{4:51:06}", "4:51:06", True),
        ("\\boxed{4:51}", "4:51:06", False),
        ("\\boxed{12kg}", "12", True),
        ("\\boxed{12kg}", "13", False),
        ("\\boxed{12\\text{kg}}", "12", True),
        ("\\boxed{45mph}", "45", True),
        ("\\boxed{12ab}", "12", False),
        ("\\boxed{12x}", "12", False),
        ("\\boxed{x + y = 5}", "y = 5 - x", True),
        ("\\boxed{3x + 2 = y}", "y = 3x + 2", True),
        ("\\boxed{x^2 = 25 - y^2}", "x^2 + y^2 = 25", True),
        ("\\boxed{x^2 = 25 - y^2}", "x^2 + y^2 = 5", False),
        ("\\boxed{y - 3 = 2(x - 1)}", "2x - y + 1 = 0", True),
        ("\\boxed{y - 3 = 2(x - 1)}", "2x - y - 1 = 0", False),
    ],
    "other languages": [
        ("所以答案是 12 元。", "12", True),
        ("所以答案是 12 元。", "13", False),
        ("答案：15 千克", "15", True),
        ("故答案为 $15$ 个。", "15", True),
        ("故小明一共走了 3.5 千米。", "3.5", True),
        ("故小明一共走了 3.5 千米。", "35", False),
        ("所以，共需要 24 分钟。", "24", True),
        ("计算可得 x=3，故答案为 8 米。", "3", False),
        ("La réponse est 15 €.", "15", True),
        ("Donc la réponse est 3,50 €.", "3.5", True),
        ("Donc la réponse est 3,50 €.", "350", False),
        ("La respuesta es 20 dólares.", "20", True),
        ("La respuesta es 20 dólares.", "2", False),
        ("Respuesta: 12 metros.", "12", True),
        ("Die Antwort lautet 12 Euro.", "12", True),
        ("Die Antwort ist 4,5 km.", "4.5", True),
        ("Die Antwort ist 4,5 km.", "45", False),
        ("Réponse : 12 m².", "12", True),
        ("La réponse finale est 150 €.", "150", True),
        ("Antwort: 7,20 €", "7.2", True),
    ],
    "choice in prose": [
        ("It cannot be A or C, so B.", "B", True),
        ("It cannot be A or C, so B.", "A", False),
        ("It cannot be A or C, so B.", "C", False),
        ("A and C are wrong because the slope is negative, so the answer must be B.", "B", True),
        ("Options A and D contradict the data, hence D is out; the remaining choice is C.", "C", True),
        ("Options A and D contradict the data; the remaining choice is C.", "D", False),
        ("A、C 都不对，所以选 B。", "B", True),
        ("A、C 都不对，所以选 B。", "A", False),
        ("排除 A 和 C，故选 B", "B", True),
        ("排除 A 和 C，故选 B", "C", False),
        ("选项 D 正确。", "D", True),
        ("Not A, not B; the correct choice is D.", "D", True),
        ("Not A, not B; the correct choice is D.", "A", False),
        ("A careful count shows the answer is C.", "C", True),
        ("A careful count shows the answer is C.", "A", False),
    ],
}


@pytest.mark.parametrize("kind,completion,gold,expected",
                         [(kind, *row) for kind, rows in FORMAT_CASES.items() for row in rows])
def test_formats_models_write(kind, completion, gold, expected):
    assert verify.reward(completion, gold) == (1.0 if expected else 0.0)


def test_format_cases_are_many_and_go_both_ways():
    assert sum(len(rows) for rows in FORMAT_CASES.values()) >= 100
    for kind, rows in FORMAT_CASES.items():
        assert {expected for _, _, expected in rows} == {True, False}, kind


# --- the comparison rules on their own, both ways round where the rule is symmetric

EQUIV_FORMATS = [
    ("A, C", "AC", True), ("C、A", "AC", True), ("\\text{A} and \\text{C}", "AC", True), ("A, C", "ACD", False),
    ("A, B", "AC", False), ("B (12)", "B", True), ("B (12)", "12", True), ("B (12)", "C", False),
    ("2 3/4", "\\frac{11}{4}", True), ("-2 3/4", "-2.75", True), ("2 3/4", "1.5", False),
    ("2:30:00", "2:30", True), ("14:30:00", "2:30 p.m.", True), ("2:30:15", "2:30", False), ("4:51", "4:51:06", False),
    ("12kg", "12", True), ("45mph", "45", True), ("12kg", "13", False), ("12x", "12", False), ("12ab", "12", False),
    ("12 元", "12", True), ("15 千克", "15", True), ("20 dólares", "20", True), ("3,50 €", "3.5", True),
    ("€15", "15", True), ("3,50 €", "350", False), ("12 m²", "12", True),
    ("7/3 * π", "\\frac{7\\pi}{3}", True), ("7π/3", "\\frac{7\\pi}{3}", True), ("2√3", "2\\sqrt{3}", True),
    ("√12", "2\\sqrt3", True), ("7/3 times π", "\\frac{7\\pi}{3}", True), ("2√3", "3\\sqrt2", False),
    ("a = 2 且 b = 3", "2, 3", True), ("a = 2 \\quad b = 3", "a=2, b=3", True), ("a = 3 \\quad b = 2", "2, 3", False),
    ("-2, 3", "3 \\text{ and } -2", True), ("-2, 4", "3 \\text{ and } -2", False),
    ("x = \\frac{\\pi}{4} + n\\pi, n \\in \\mathbb{Z}", "\\frac{\\pi}{4} + k\\pi", True),
    ("x = \\frac{\\pi}{4} + 2n\\pi, n \\in \\mathbb{Z}", "\\frac{\\pi}{4} + k\\pi", False),
    ("y \\ne 5", "y != 5", True), ("y \\ne 5", "y != 6", False),
]


@pytest.mark.parametrize("pred,gold,expected", EQUIV_FORMATS)
def test_new_comparison_rules_both_ways(pred, gold, expected):
    assert verify.is_equiv(pred, gold) is expected
    assert verify.is_equiv(gold, pred) is expected


def test_an_equation_equals_its_numeric_right_side_only_against_a_number():
    assert verify.is_equiv("y^2 = 49", "49") and verify.is_equiv("x + y = 10", "10")
    assert not verify.is_equiv("49", "y^2 = 49")          # a bare number never matches an equation reference
    assert not verify.is_equiv("y^2 = 49", "7") and not verify.is_equiv("y^2 = x", "49")


# --- unfinished reasoning: never rewarded

FINISHED = "<think>6 * 7 = 42.</think>\nThe answer is \\boxed{42}."


@pytest.mark.parametrize("completion", [
    "<think>20 + 21 = 41. So it is 41 ... wait, no",
    "<think>6 * 7 = 42, so the answer is \\boxed{42}. Hmm, let me double check",
    "<think>first</think>The answer is 42.<think>hmm, but",
    "<think>so \\boxed{42}<|im_end|>",
    "<|channel|>analysis<|message|>6*7=42, \\boxed{42}<|end|>",
])
def test_unfinished_reasoning_has_no_answer_and_scores_zero(completion):
    assert verify.extract_answer(completion) is None
    assert verify.grade(completion, "42") == verify.Verdict(0.0, None, "unfinished")


def test_a_trace_cut_at_the_token_limit_scores_zero_whatever_it_holds():
    assert verify.reward(FINISHED, "42") == 1.0
    assert verify.reward(FINISHED, "42", truncated=True) == 0.0
    assert verify.grade(FINISHED, "42", truncated=True).status == "unfinished"
    completions, golds = [FINISHED, FINISHED, "\\boxed{5}"], ["42", "42", "5"]
    assert verify.rewards(completions, golds, truncated=[False, True, False]) == [1.0, 0.0, 1.0]
    assert verify.rewards(completions, golds) == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="truncated"):
        verify.rewards(completions, golds, truncated=[True])


# --- verdicts and the audit

def test_verdicts_say_why():
    assert verify.grade("so \\boxed{42}", "42") == verify.Verdict(1.0, "42", "correct")
    assert verify.grade("so \\boxed{41}", "42") == verify.Verdict(0.0, "41", "wrong")
    assert verify.grade("I could not solve it.", "42") == verify.Verdict(0.0, None, "no_answer")
    assert verify.grade(None, "42").status == "no_answer"
    assert verify.grade("It cannot be A or C, so B.", "B") == verify.Verdict(1.0, "B", "correct")
    assert verify.grade("It cannot be A or C, so B.", "C") == verify.Verdict(0.0, "B", "wrong")
    assert verify.grade("I am not sure.", "C").status == "no_answer"


def test_an_internal_failure_is_a_zero_never_an_exception(monkeypatch):
    """Nothing in verify.py raises: should a rule fail inside (a bug, sympy's internals), the answer is not
    found, not equal, and the verdict a zero with no answer."""
    def broken(*args, **kwargs):
        raise RuntimeError("a rule failed")
    assert verify.is_equiv("1", "1.0") and verify.grade("\\boxed{1}", "1").reward == 1.0
    with monkeypatch.context() as m:
        m.setattr(verify, "reference_answer", broken)
        assert verify.grade("\\boxed{1}", "1") == verify.Verdict(0.0, None, "no_answer")
    with monkeypatch.context() as m:
        m.setattr(verify, "_strip_turn", broken)
        assert verify.extract_answer("\\boxed{1}") is None
    with monkeypatch.context() as m:
        m.setattr(verify, "_last_boxed", broken)
        assert verify._extract("\\boxed{1}") is None
    with monkeypatch.context() as m:
        m.setattr(verify, "_special_forms", broken)
        assert verify.is_equiv("1", "1.0") is False
    with monkeypatch.context() as m:
        m.setattr(verify, "_structure", broken)
        assert verify._compare_normalized("1", "1", False) is False


def test_the_comparison_parses_answers_of_at_most_max_answer_chars():
    longest = "1" + "+0" * ((verify.MAX_ANSWER_CHARS - 1) // 2)           # 999 characters, equal to 1
    assert len(longest) == verify.MAX_ANSWER_CHARS - 1
    assert verify._compare_normalized(longest, "1", False) and verify._compare_normalized("1", longest, False)
    assert verify._compare_normalized(longest + "+0", "1", False) is False          # 1001: never parsed
    assert verify._compare_normalized("1", longest + "+0", False) is False
    exactly = longest + " "                                                        # 1000 characters: still parsed
    assert len(exactly) == verify.MAX_ANSWER_CHARS and verify._compare_normalized(exactly, "1", False)


def test_boxes_one_per_blank_are_read_together_only_for_a_reference_of_several_answers():
    assert verify.grade("So $\\boxed{2}$ and $\\boxed{3}$.", "2, 3") == verify.Verdict(1.0, "2, 3", "correct")
    assert verify.grade("$\\boxed{1}$, $\\boxed{2}$ and $\\boxed{3}$", "2, 3") == verify.Verdict(1.0, "2, 3", "correct")
    assert verify.grade("So $\\boxed{2}$ and $\\boxed{5}$.", "2, 3") == verify.Verdict(0.0, "5", "wrong")
    assert verify.grade("So $\\boxed{2}$ and $\\boxed{3, 4}$.", "2, 3").reward == 0.0   # a box with two answers
    # a one-answer reference: the last box alone, and a choice letter is still read from its sentence
    assert verify.grade("First \\boxed{10}. Then the answer is option C: \\boxed{12}.", "C") == \
        verify.Verdict(1.0, "C", "correct")


@pytest.mark.parametrize("reference,parts", [
    ("2, 3", 2), ("\\{2, 3\\}", 2), ("x = 1 \\text{ or } x = 2", 2), ("1; 2, 3", 2), ("(1, 2)", 1),
    ("[10, 20] \\cup \\{5\\}", 1), ("\\{5\\}", 1), ("7", 1)])
def test_a_reference_lists_its_top_level_answers(reference, parts):
    assert verify._top_level_parts(reference) == parts


def test_a_set_reference_takes_one_box_per_member():
    assert verify.grade("So $\\boxed{2}$ and $\\boxed{3}$.", "\\{2, 3\\}") == verify.Verdict(1.0, "2, 3", "correct")


MATRIX = "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}"


@pytest.mark.parametrize("rows", ["[[1, 2], [3, 4]]", "[1, 2], [3, 4]", "((1, 2), (3, 4))", "1, 2; 3, 4"])
def test_a_matrix_written_as_rows_in_brackets_equals_the_matrix(rows):
    assert verify.is_equiv(rows, MATRIX) and verify.is_equiv(MATRIX, rows)


def test_only_a_one_row_or_one_column_matrix_is_a_tuple():
    assert verify.is_equiv("(1, 2)", "\\begin{pmatrix}1&2\\end{pmatrix}")
    assert verify.is_equiv("(1, 3)", "\\begin{pmatrix}1\\\\3\\end{pmatrix}")
    assert not verify.is_equiv("(1, 2, 3, 4)", MATRIX) and not verify.is_equiv(MATRIX, "(1, 2, 3, 4)")


def test_sets_of_different_sizes_differ():
    assert not verify.is_equiv("\\{1, 2\\}", "\\{1, 2, 3\\}") and not verify.is_equiv("\\{1, 2, 3\\}", "\\{1, 2\\}")


def test_reward_is_the_verdicts_reward_on_every_format_case():
    rows = [row for rows in FORMAT_CASES.values() for row in rows]
    verdicts = verify.grades([c for c, _, _ in rows], [g for _, g, _ in rows])
    assert [v.reward for v in verdicts] == [verify.reward(c, g) for c, g, _ in rows]
    assert all(v.status == ("correct" if v.reward else v.status) for v in verdicts)
    assert all((v.answer is None) == (v.status in ("no_answer", "unfinished")) for v in verdicts)


def test_audit_rates_by_hand():
    verdicts = [verify.Verdict(1.0, "4", "correct"), verify.Verdict(0.0, "5", "wrong"),
                verify.Verdict(0.0, None, "no_answer"), verify.Verdict(0.0, None, "unfinished"),
                verify.Verdict(0.0, "x", "wrong"), verify.Verdict(0.0, "3", "wrong"),
                verify.Verdict(1.0, "2", "correct"), verify.Verdict(0.0, None, "no_answer")]
    assert verify.audit(verdicts).metrics == {"no_answer_rate": 3 / 8, "wrong_answer_rate": 3 / 8}
    assert verify.audit(verdicts).disagreements == []
    assert verify.audit([]).metrics == {"no_answer_rate": 0.0, "wrong_answer_rate": 0.0}


def test_second_opinion_is_none_without_math_verify(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)  # import math_verify now raises ImportError
    verdicts = verify.grades(["\\boxed{4}"], ["4"])
    assert verify.second_opinion(["\\boxed{4}"], ["4"], verdicts) is None
    assert "math_verify_agreement" not in verify.audit(verdicts, ["\\boxed{4}"], ["4"]).metrics


def test_second_opinion_agrees_on_plain_answers_and_returns_the_disagreements():
    pytest.importorskip("math_verify")
    completions = ["so \\boxed{4}", "so \\boxed{\\frac{1}{2}}", "so \\boxed{7}", "\\boxed{1,22}"]
    golds = ["4", "0.5", "8", "1.22"]
    verdicts = verify.grades(completions, golds)
    assert [v.reward for v in verdicts] == [1.0, 1.0, 0.0, 1.0]
    agreement, disagreements = verify.second_opinion(completions[:3], golds[:3], verdicts[:3], sample=3)
    assert agreement == 1.0 and disagreements == []
    # a decimal comma: verify.py reads 1,22 as 1.22, math-verify does not
    agreement, disagreements = verify.second_opinion(completions, golds, verdicts, sample=4)
    assert agreement == 3 / 4
    assert disagreements == [{"completion": "\\boxed{1,22}", "gold": "1.22", "answer": "1,22", "verify": 1.0,
                              "math_verify": 0.0}]
    audited = verify.audit(verdicts, completions, golds, sample=4)
    assert audited.metrics["math_verify_agreement"] == 3 / 4 and audited.disagreements == disagreements
    # a trace cut at the token limit scores 0 by rule; math-verify would read its answer: never sampled
    cut = verify.grades(["so \\boxed{4}"] * 3, ["4"] * 3, truncated=[True, True, False])
    assert verify.second_opinion(["so \\boxed{4}"] * 3, ["4"] * 3, cut, sample=3) == (1.0, [])


def test_second_opinion_is_time_bounded(monkeypatch, tmp_path):
    """A math-verify that hangs (a stand-in module first on the path of a new fork server) costs the
    time bound, and the sample counts as not graded."""
    pytest.importorskip("math_verify")
    (tmp_path / "math_verify.py").write_text("import time\n\ndef parse(text, **kwargs):\n    return text\n\n"
                                             "def verify(gold, answer, **kwargs):\n    time.sleep(60)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(verify, "_server", None)        # a new fork server, which imports the stand-in
    monkeypatch.setattr(verify, "_idle_workers", [])
    try:
        start = time.perf_counter()
        result = verify.second_opinion(["\\boxed{4}", "\\boxed{5}"], ["4", "5"],
                                       verify.grades(["\\boxed{4}", "\\boxed{5}"], ["4", "5"]), timeout=0.5)
        assert result == (None, []) and time.perf_counter() - start < 8
    finally:
        for process, _ in verify._idle_workers:
            process.kill()
        if verify._server is not None:
            verify._server[0].kill()


# --- hostile inputs in the new formats stay bounded and never raise

@pytest.mark.parametrize("completion", [
    "1 + " * 100_000, "\\sqrt" * 100_000, "π" * 500_000, "2 3/4 " * 100_000, "**1** " * 100_000,
    "<think>" * 100_000, "</think>" * 100_000 + "7", "(A) " * 100_000, "It cannot be A or C, so B. " * 40_000,
    "<|channel|>final" * 50_000, "√" * 500_000 + "7", "\\boxed{" + " " * 3900 + "k integer}",
    "\\boxed{1" + "\\," * 1995 + "k \\in \\mathbb{Z}}", "\\boxed{" + "," * 3990 + "k}",
])
def test_hostile_new_formats_are_bounded(completion):
    for gold in ("7", "B", "AC"):
        start = time.perf_counter()
        assert verify.reward(completion, gold) in (0.0, 1.0)
        assert verify.grade(completion, gold).status in ("correct", "wrong", "no_answer", "unfinished")
        assert time.perf_counter() - start < 2.0, (completion[:30], gold)


# ---------------------------------------------------------------------------
# Extraction rules, case by case: answer phrases, bold, spans joined by "and", prose around a value, ...

@pytest.mark.parametrize("completion,expected", [
    ("Answer: Tom is 12 years old.", "12"),                                     # a sentence around the value: its number
    ("Answer: 12 apples are left in the basket.", "12 apples are left in the basket"),  # the value first: the sentence
    ("Final answer: vitamin B12", "vitamin B12"),                               # a sentence with no plain number stays whole
    ("The answer is the Treaty of Versailles.", "the Treaty of Versailles"),    # four words and no number: an answer
    ("The answer is XIX.", "XIX"),                                              # only the full stop is dropped
    ("The answer is 42...", "42"),
    ("The answer is \\text{A} and \\text{C}.", "\\text{A} and \\text{C}"),     # \text{...} is no word of prose
    ("**The answer is 2*3 = 6**", "2*3 = 6"),                                   # a bold holding `*` still loses its `**`
    ("Ответ = 12", "12"),                                                       # `=` after the phrase is dropped
    ("The answer is, as we found above, 12 apples.\nShe gives 3 to each of her 4 friends.", "12"),  # `, as` first
    ("Answer: Not 12. Recounting, the total is 14.", "14"),                     # `Not` after the phrase: look further
])
def test_the_text_after_an_answer_phrase_gives_the_answer(completion, expected):
    """After an answer phrase: a value, a short text, or the last number of a sentence around it."""
    assert verify.extract_answer(completion) == expected


def test_an_answer_phrase_followed_by_prose_without_a_number_is_skipped():
    """`Answer: Let's think step by step.` (five words, no number) is no answer: the later value is."""
    completion = "Answer: Let's think step by step.\nShe has 3 bags of 4 apples, so 3 * 4 = 12."
    assert verify.reward(completion, "12") == 1.0


@pytest.mark.parametrize("completion,expected", [
    ("The answer is $2$ and $3$.", "2, 3"),
    ("The answer is $1$, $2$ and $3$.", "1, 2, 3"),
    ("The answer is $x = 2$ or $x = -3$.", "x = 2 \\text{ or } x = -3"),
    ("The answer is: the two real roots of the quadratic, $x = \\frac{-3 + \\sqrt{33}}{4}$ or "
     "$x = \\frac{-3 - \\sqrt{33}}{4}$.", "x = \\frac{-3 + \\sqrt{33}}{4} \\text{ or } x = \\frac{-3 - \\sqrt{33}}{4}"),
    ("The roots are $x=2$ and $x=3$.", "x=2, x=3"),
    ("Subtracting, $2x = 4$ and $x = 2$.", "x = 2"),                 # steps, not values of one unknown
    ("Solving for $t$, $t = 4$ hours.", "t = 4"),                    # the unknown named, then its value
])
def test_math_spans_joined_by_and_or_or_commas_are_read_together(completion, expected):
    """`$2$ and $3$` are both answers, in order; `$x = 2$ or $x = -3$` keeps its `or`; steps are not joined."""
    assert verify.extract_answer(completion) == expected


def test_math_is_right_after_the_phrase_when_it_starts_within_60_characters():
    """Math starting within 60 characters of the phrase is read with the spans joined to it; farther, the last span."""
    near = "the two real roots of the quadratic equation above, namely "
    far = "the two real roots of the quadratic equations above, namely "
    assert (len(near), len(far)) == (59, 60)
    assert verify.extract_answer(f"The answer is {near}$2$ and $3$.") == "2, 3"
    assert verify.extract_answer(f"The answer is {far}$2$ and $3$.") == "3"
    assert verify.extract_answer(f"The answer is {far}$2$.") == "2"


@pytest.mark.parametrize("completion,expected", [
    ("2 and 3", "2 and 3"),
    ("x = 2 und x = 3", "x = 2 und x = 3"),
    ("x=2\\text{ or }x=3", "x=2\\text{ or }x=3"),
    ("Tom has 5 + 7 = 12 marbles.\nTOTAL = 12", "12"),               # a word in capitals is still a word
])
def test_a_short_answer_with_no_prose_but_and_is_taken_whole(completion, expected):
    """A one-line answer is taken whole when its only words are `and`/`und` and \\text{...}; a last line with a word is not."""
    assert verify.extract_answer(completion) == expected


@pytest.mark.parametrize("completion,expected", [
    ("So the number of apples Mary has left **is 14**.", "14"),     # `is` inside the bold is dropped
    ("No integer $n$ satisfies $n^2 = 2$.", None),                   # a denial in the very first words counts
    ("So $x = 35$, and $x = 36$ does not work", "x = 35"),           # a denial with no full stop after it counts
    ("The mean of $Y$ is $7$, since $X$ has mean $4$.", "7"),        # a value after `since` only explains
])
def test_the_last_value_skips_what_is_denied_or_explains(completion, expected):
    """Without a phrase or a box: the bold value, else the last value not in a denying or explaining clause."""
    assert verify.extract_answer(completion) == expected


def test_a_clause_is_read_at_most_300_characters_either_side_of_the_value():
    """A denial counts when it starts at most 300 characters before the value or ends at most 300 after it."""
    assert verify._sentence_denies(" " * 100 + "not" + " " * 297 + "5", 400)
    assert not verify._sentence_denies(" " * 99 + "not" + " " * 298 + "5", 400)
    assert verify._sentence_denies("5" + " " * 294 + "never", 0)
    assert not verify._sentence_denies("5" + " " * 295 + "never", 0)
    assert not verify._sentence_denies("5" + " " * 300 + "never.", 0)   # the full stop is out of reach too


def test_a_checking_clause_is_found_also_right_after_the_first_character():
    """A clause that starts after a comma at the very start of the text is read from there."""
    assert verify._justifies(", since $7 > 5$", 8) and verify._justifies("Since $7 > 5$", 6)


@pytest.mark.parametrize("completion,expected", [
    ("$x \\neq 3$", "x \\neq 3"),                          # one span, the whole text: its content
    ("$x \\neq 3$.", "x \\neq 3"),
    ("East.", "East"),                                       # a word answer loses its full stop
    ("XIX.", "XIX"),
    ("2x = 4\nx = 2", "x = 2"),                               # two lines are never one answer
    ("$x = 2$ or $x = 3$", "x = 2 \\text{ or } x = 3"),        # several spans: read as spans, never whole
    ("\\(x = 2\\) or \\(x = 3\\)", "x = 2 \\text{ or } x = 3"),
    ("\\[x = 2\\] or \\[x = 3\\]", "x = 2 \\text{ or } x = 3"),
])
def test_a_short_one_line_completion_is_its_own_answer(completion, expected):
    """A one-line completion of one math span, a formula or a word or two is the answer; math spans are read as spans."""
    assert verify.extract_answer(completion) == expected


@pytest.mark.parametrize("completion,expected", [
    ("Factoring the difference of squares:\n(x-2)(x+2)", "(x-2)(x+2)"),
    ("We factor it.\nBoth factors are linear:\n(x-2)(x+2)\n", "(x-2)(x+2)"),
    ("Factoring the difference of squares:\n= (x-2)(x+2).", "(x-2)(x+2)"),        # a leading `=` and the full stop dropped
    ("Factoring the difference of squares:\n\\therefore (x-2)(x+2)", "(x-2)(x+2)"),
    ("The regression line through the points is\nY = 2X", "Y = 2X"),
    ("Simplifying the fraction:\n$\\frac{10}{9}$", "\\frac{10}{9}"),               # math on the last line: its span
    ("Simplifying the fraction:\n\\(\\frac{10}{9}\\)", "\\frac{10}{9}"),
])
def test_the_last_line_is_the_answer_when_it_is_a_short_formula(completion, expected):
    """After the reasoning, a last line that is a formula with no prose (and no math delimiters) is the answer."""
    assert verify.extract_answer(completion) == expected


def test_a_formula_is_taken_whole_up_to_100_characters_from_a_last_line_of_up_to_200():
    """A one-line answer or a last line is read whole up to 100 characters; a last line over 200 is not looked at."""
    line = "y = " + " + ".join(f"x^{{{k}}}" for k in range(12, 1, -1)) + " + x + 1"
    longer = line.replace("+ x + 1", "+ 2x + 1")
    assert (len(line), len(longer)) == (100, 101)
    assert verify.extract_answer(line) == line and verify.extract_answer(longer) != longer
    assert verify.extract_answer("Adding the terms:\n" + line) == line
    assert verify.extract_answer("Adding the terms:\n" + longer) != longer
    assert verify.extract_answer("Expanding the product:\n" + " " * 193 + "x^2 + 1") == "x^2 + 1"   # 200 characters
    assert verify.extract_answer("Expanding the product:\n" + " " * 194 + "x^2 + 1") == "1"         # 201: the last value


@pytest.mark.parametrize("completion,expected", [
    ("The express route takes **27 minutes** in all: 9 + 8 + 10. That is the fastest way!", "27 minutes"),
    ("The express route takes **27 minutes** in all: 9 + 8 + 10. That is Route X.", "27 minutes"),
    ("The trips add up.\n**27 minutes** in all: 9 + 8 + 10", "27 minutes"),
    ("She goes out twice. On Monday she picks **12** apples. On Tuesday she picks 5 more, so 17 in all.", "17"),
    ("On Monday she picks **12** apples! On Tuesday she picks 5 more, so 17 in all.", "17"),
    ("Were there **12** apples at first? Then 5 more make 17 in all.", "17"),
    ("She picks **12** apples on Monday.\nOn Tuesday she picks 5 more, so 17 in all.", "17"),
    ("On Monday she picks **12** apples and 9 pears. On Tuesday she picks 9 more apples, so 21 in all.", "21"),
    ("她周一摘了 **12** 个苹果。周二又摘了 $5$ 个，一共 $17$ 个。", "17"),
    ("**Step 2**: add the two parts, 5 + 7 = 12", "5 + 7 = 12"),     # a bold heading is no answer
    ("**第 2 步：** $5 + 7 = 12$", "5 + 7 = 12"),
])
def test_a_bold_value_counts_only_in_the_last_sentence_with_a_number(completion, expected):
    """The bold value of the sentence holding the last number is the answer; a bold in an earlier sentence is not."""
    assert verify.extract_answer(completion) == expected


def test_a_bold_value_is_looked_for_in_the_last_20000_characters():
    """Only the last 20000 characters are searched for a bold value (bounded work on hostile text)."""
    completion = "**27 minutes** in all: 9 + 8 + 10"
    assert verify.extract_answer(completion.ljust(20_000)) == "27 minutes"
    assert verify.extract_answer(completion.ljust(20_001)) == "9 + 8 + 10"


@pytest.mark.parametrize("completion,gold,expected", [
    ("Two options remain. We first guessed option B. The side length is \\boxed{12}, which is option (C).", "C", 1.0),
    ("Two options remain. We first guessed option B. The side length is \\boxed{12}, which is option (C).", "B", 0.0),
    ("We first guessed option B! The side length is \\boxed{12}, which is option (C).", "C", 1.0),
    ("Was it option B? The side length is \\boxed{12}, which is option (C).", "C", 1.0),
    ("我们先猜了选项 B。边长是 \\boxed{12}，即选项 (C)。", "C", 1.0),
    ("We first guessed option B\nThe side length is \\boxed{12}, which is option (C).", "C", 1.0),
    ("Hence the answer is option C: \\boxed{\n12\n}.", "C", 1.0),                 # a line break inside the box
    ("Each option was checked above.\n(C) \\boxed{12}", "C", 1.0),
    ("The side length is \\boxed{12}, which is option (C). Our first guess was option B. It was off by one.", "C", 1.0),
    ("The side length is \\boxed{12}, which is option (C)! Our first guess, option B, was off by one.", "C", 1.0),
    ("The side length is \\boxed{12}, so is it option (C)? Our first guess, option B, was off by one.", "C", 1.0),
    ("边长是 \\boxed{12}，即选项 (C)。我们最初猜的是选项 B", "C", 1.0),
    ("The side length is \\boxed{12}, which is option (C)\nOur first guess was option B", "C", 1.0),
    ("The side length is \\boxed{12}, which is option (C)\nOur first guess was option B", "B", 0.0),
])
def test_the_letter_chosen_is_read_in_the_sentence_of_the_last_box(completion, gold, expected):
    """With a box, only the letter in the box's own sentence (ended by . ! ? 。 or a new line) is the choice."""
    assert verify.reward(completion, gold) == expected


@pytest.mark.parametrize("completion,gold,expected", [
    ("(B) because the slope is negative.", "B", 1.0),                         # a letter in brackets needs no cue
    ("The slope is negative, so C fits the graph.", "C", 1.0),
    ("The slope is negative, so A is correct.", "A", 1.0),
    ("A quick check shows the slope is negative, so C.", "C", 1.0),          # the article `A` is no option
    ("Option C is right: A quick check with x = 1 confirms it.", "C", 1.0),
    ("Option C is right: A quick check with x = 1 confirms it.", "A", 0.0),
    ("B looked right at first, but (C) fits the graph.", "C", 1.0),          # a cue after the letter does not count
    ("Two candidates remain. We pick by value. D gives 14, while (C) gives 12.", "C", 1.0),
    ("We pick by value. D gives 14, while (C) gives 12.", "C", 1.0),          # a cue in an earlier sentence does not count
    ("Let us pick by value! D gives 14, while (C) gives 12.", "C", 1.0),
    ("Which one do we pick? D gives 14, while (C) gives 12.", "C", 1.0),
    ("We pick by value:\nD gives 14, while (C) gives 12.", "C", 1.0),
    ("按数值来选。D 得 14，而 (C) 得 12。", "C", 1.0),
    ("We pick by value. D gives 14, while (C) gives 12.", "D", 0.0),
    ("Both (A) and (C) fit the data.", "A", 0.0),                            # two letters chosen: none is
])
def test_a_letter_chosen_in_prose_is_cued_in_its_own_sentence(completion, gold, expected):
    """A letter counts when it is in brackets or a cue word comes before it in its own sentence; exactly one must count."""
    assert verify.reward(completion, gold) == expected


def test_a_letter_reference_against_a_completion_that_names_no_letter_is_wrong_with_its_own_answer():
    """No letter chosen: the verdict keeps the completion's own answer."""
    assert verify.grade("The side length is 12.", "C") == verify.Verdict(0.0, "12", "wrong")


def test_a_letter_is_looked_for_within_bounds():
    """The last 2000 characters hold the box; without a box, the last 300 the letter; a cue is at most 40 characters before it."""
    boxed = "\\boxed{12}, which is option (C)."
    assert verify.reward(boxed.ljust(2000), "C") == 1.0 and verify.reward(boxed.ljust(2001), "C") == 0.0
    prose = "It cannot be A or C, so B"
    assert verify.reward(prose + " " * 299, "B") == 1.0 and verify.reward(prose + " " * 300, "B") == 0.0
    near, far = "So, after we compared the three values, C", "So, after we compared all of the values, C"
    assert (near.index(" C") + 1, far.index(" C") + 1) == (40, 41)                   # where the letter stands
    assert verify.reward(near, "C") == 1.0 and verify.reward(far, "C") == 0.0


@pytest.mark.parametrize("completion,expected", [
    ("The answer is 12\nShe checks it: 5 + 7 = 12.", "12"),                  # only the phrase's own line is read
    ("The answer is\n42\nThat is 6 packs of 7.", "42"),                       # or the next line when the phrase ends its line
    ("So 5 + 7 = 12.\nFinal answer:", "5 + 7 = 12"),                          # a phrase with nothing after it: look further
    ("She sells 72 clips.\n#### 72 clips.", "72 clips"),                      # the `####` line read like a phrase's text
    ("I tried.\n#### I could not find the count", "I could not find the count"),  # else taken as it stands
])
def test_an_answer_line_is_read_on_its_own(completion, expected):
    """The text after an answer phrase or `####` is read up to the end of its line."""
    assert verify.extract_answer(completion) == expected


@pytest.mark.parametrize("completion,expected", [
    ("<think>6 * 7 = 42.</think>Let me check once more.<think>Yes, 42.</think>\nThe answer is \\boxed{42}.", "42"),
    ("</think>x^2 + 1", "x^2 + 1"),                                            # an empty reasoning closed at the start
    ("<think>So the answer is 41? No, 6 * 7 = 42.</think>\nThe product is 42.", "42"),
    ("<think>A bearing of 90 degrees points east.</think>\nEast", "East"),
    ("<|channel|>analysis<|message|>6*7=42<|end|><|start|>assistant<|channel|>final<|message|>42", "42"),
    ("<|channel|>final<|message|>The answer is 41.<|end|><|start|>assistant<|channel|>final<|message|>The answer is 42.",
     "42"),                                                                     # the last final channel counts
])
def test_only_the_text_after_the_last_closed_reasoning_is_read(completion, expected):
    """The answer is read after the last `</think>` (or gpt-oss's last final channel), never inside the reasoning."""
    assert verify.extract_answer(completion) == expected


@pytest.mark.parametrize("completion,expected", [
    ("12 apples", "12"),                 # a number with a word is no word answer
    ("Mount Everest", "Mount Everest"),  # two words are
])
def test_a_word_answer_is_one_or_two_words_without_digits(completion, expected):
    """A short completion of one or two words with no digit is itself the answer."""
    assert verify.extract_answer(completion) == expected


@pytest.mark.parametrize("completion,expected", [
    ("The total cost is $\\$12$.", "\\$12"),                                   # `\$` inside math is a dollar, not its end
    ("The total is $\\$12$ and the tax is $\\$1$.", "\\$1"),
    ("She paid $5 and $6 more, so $11 in all.", "11"),                        # `$` signs, not math
    ("She pays $7.00 for shirts and $3 for socks, $10.00 in all.", "10.00"),
    ("I paid $5.\n\nSo $x = 2$.", "x = 2"),                                   # math never spans a blank line
    ("The cost is $5\\$$.", "5\\$"),                                          # `\$` right before the closing `$`
    ("All prices are in $ $p = 12$.", "p = 12"),                              # `$ $` holds nothing: a dollar sign
    ("The two prices are $\\$12$ and $\\$15$.", "\\$12, \\$15"),
    ("The answer is $5 and $6.", "$5 and $6"),                                # no math: the amounts as written
])
def test_a_dollar_sign_is_math_only_around_math(completion, expected):
    """`$...$` is math unless it holds prose, spans a paragraph or runs up to a digit; `\\$` inside it is a dollar."""
    assert verify.extract_answer(completion) == expected


def test_a_last_answer_line_a_is_read_up_to_400_characters():
    """A last line `A: ...` is the answer when it is at most 400 characters long."""
    assert verify.extract_answer("A:" + " " * 391 + "x^2 + 1") == "x^2 + 1"    # 400 characters
    assert verify.extract_answer("A:" + " " * 392 + "x^2 + 1") == "1"          # 401: the last value


def test_the_text_after_an_answer_phrase_or_a_gsm8k_line_is_read_for_at_most_400_characters():
    """An answer line runs on for at most 400 characters (bounded work on hostile text)."""
    for completion in ("#### " + "1 + " * 120, "Answer:" + "1 + " * 120, "#### " + "word " * 100):
        assert 300 < len(verify.extract_answer(completion)) <= 400, completion[:20]


# ---------------------------------------------------------------------------
# Normalisation rules, case by case: math delimiters, LaTeX and Unicode spellings, brackets, congruences,
# `\approx`, lcm/gcd, spaces and units, thousands spaces, trailing punctuation, general solutions

@pytest.mark.parametrize("pred,gold,expected", [
    ("\\(\\frac{1}{2}\\)", "0.5", True),
    ("0.5", "\\(\\frac{1}{2}\\)", True),
    ("\\[\\frac{1}{2}\\]", "0.5", True),
    ("\\(\\frac{1}{3}\\)", "0.5", False),
    ("$x = \\frac{\\pi}{4} + n\\pi, n \\in \\mathbb{Z}$", "x = \\frac{\\pi}{4} + k\\pi", True),
    ("x = \\frac{\\pi}{4} + k\\pi", "$x = \\frac{\\pi}{4} + n\\pi, n \\in \\mathbb{Z}$", True),
    ("$x = \\frac{\\pi}{4} + n\\pi, n \\in \\mathbb{Z}$", "x = \\frac{\\pi}{2} + k\\pi", False),
])
def test_math_delimiters_around_a_whole_answer_are_dropped(pred, gold, expected):
    """`\\(...\\)`, `\\[...\\]` and `$...$` around the whole answer are unwrapped before any other rule."""
    assert verify.is_equiv(pred, gold) is expected


@pytest.mark.parametrize("pred,gold,expected", [
    ("\\cfrac{1}{2}", "0.5", True),
    ("\\cfrac{1}{2}", "0.25", False),
    ("\\\\frac{1}{2}", "0.5", True),                 # a backslash doubled, as in an escaped JSON string
    ("2**10", "1024", True),
    ("x**2 - 1", "(x-1)(x+1)", True),
    ("x**2 - 1", "(x-1)^2", False),
    ("√x", "\\sqrt{x}", True),
    ("2√x", "2\\sqrt{x}", True),
    ("√N", "\\sqrt{N}", True),
    ("√(x+1)", "\\sqrt{x+1}", True),
    ("√(x+1)", "\\sqrt{x-1}", False),
    ("2√{3}", "2\\sqrt{3}", True),
    ("2\\sqrt{3}", "2√{3}", True),
])
def test_fraction_power_and_root_spellings_are_read_alike(pred, gold, expected):
    """`\\cfrac`, an escaped `\\\\frac`, Python's `**` and the `√` sign (before a letter, brackets or braces)."""
    assert verify.is_equiv(pred, gold) is expected


@pytest.mark.parametrize("pred,gold,expected", [
    ("−5", "-5", True),                              # U+2212 MINUS SIGN
    ("-5", "−5", True),
    ("−5", "5", False),
    ("x − 1", "x-1", True),
    ("3 × 4", "12", True),
    ("2 × 10^3", "2000", True),
    ("3 × 4", "7", False),
    ("3 · 4", "12", True),                           # U+00B7 MIDDLE DOT
    ("3 · 4", "34", False),
    ("x ≈ 2.5", "2.5", True),
    ("\\sqrt{2} ≈ 1.414", "\\sqrt{2}", True),
    ("12\u200b", "12", True),                        # a zero-width space pasted after the number
    ("1\u00ad2", "12", True),                        # a soft hyphen inside it
])
def test_unicode_minus_times_dot_and_approx_signs_are_read_as_latex(pred, gold, expected):
    """`−`, `×`, `·` and `≈` mean `-`, `\\times`, `\\cdot` and `\\approx`; invisible characters are dropped."""
    assert verify.is_equiv(pred, gold) is expected


@pytest.mark.parametrize("pred,gold,expected", [
    ("\\langle 3, -1 \\rangle", "(3, -1)", True),
    ("(3, -1)", "\\langle 3, -1 \\rangle", True),
    ("\\langle 3, -1 \\rangle", "(-1, 3)", False),
    ("\\lbrace 2, 3 \\rbrace", "\\{3, 2\\}", True),
    ("\\lbrace 2, 3 \\rbrace", "\\{2, 4\\}", False),
    ("\\mathbb{R}", "(-\\infty, \\infty)", True),
    ("x \\in \\mathbb{R}", "(-\\infty,\\infty)", True),
    ("\\mathbb{R}", "(0, \\infty)", False),
])
def test_angle_brackets_brace_commands_and_the_reals_are_rewritten(pred, gold, expected):
    """`\\langle a, b \\rangle` is the tuple, `\\lbrace ... \\rbrace` the set, `\\mathbb{R}` the interval (-inf, inf)."""
    assert verify.is_equiv(pred, gold) is expected


@pytest.mark.parametrize("pred,gold,expected", [
    ("n \\equiv 3 \\bmod{5}", "3", True),
    ("x \\equiv 3 \\mod 5", "3", True),
    ("x \\equiv 3 (\\bmod 5)", "3", True),
    ("x \\equiv 3 ( \\bmod 5 )", "3", True),
    ("y \\equiv 2X(\\bmod 7)", "2X", True),
    ("x \\equiv 3 \\mod 5", "8", False),
    ("2^{10} \\mod 7 = 2", "2", True),               # a modulus inside the chain is no trailing modulus
    ("2^{10} \\bmod 7 = 2", "1024", False),
    ("5^{3} \\mod 7 \\equiv 6 \\mod 7", "6", True),  # only the last modulus is dropped
    ("5^{3} \\bmod 7 \\equiv 6 \\bmod 7", "6", True),
    ("5^{3} \\bmod 7 \\equiv 6 \\bmod 7", "5", False),
])
def test_a_trailing_modulus_is_dropped_in_all_its_spellings(pred, gold, expected):
    """A residue ends in `\\pmod`, `\\bmod` or `\\mod` (with or without brackets): the last one is dropped."""
    assert verify.is_equiv(pred, gold) is expected


def test_a_modulus_alone_is_no_answer():
    """`\\pmod{5}` with nothing before it leaves no residue: it equals nothing, not even itself."""
    assert not verify.is_equiv("\\pmod{5}", "\\pmod{5}") and not verify.is_equiv("\\pmod{5}", "5")


@pytest.mark.parametrize("pred,gold,expected", [
    ("\\sqrt{2} \\approx 1.414 \\approx 1.41", "\\sqrt{2}", True),   # the value before the first `\approx`
    ("\\frac{1}{3} \\approx 0.33", "\\frac{1}{3}", True),             # an exact value, never its rounding
    ("\\frac{1}{3} \\approx 0.33", "0.33", False),
    ("x \\approx 3.46", "3.46", True),                                 # a variable: its value
    ("A \\approx 12.57", "12.57", True),
    ("x \\approx 3.46", "3.47", False),
])
def test_approx_compares_the_exact_value_or_the_value_of_a_variable(pred, gold, expected):
    """`a \\approx b`: b when a is one letter (lower or upper case), else a; a chain of `\\approx` keeps its first side."""
    assert verify.is_equiv(pred, gold) is expected


@pytest.mark.parametrize("pred,gold,expected", [
    ("\\operatorname{lcm}(4, 6)", "12", True),
    ("\\text{gcd}(12, 18)", "6", True),
    ("\\mathrm{lcm}(4,6)", "24", False),
])
def test_lcm_and_gcd_written_as_text_are_the_functions(pred, gold, expected):
    """`\\operatorname{lcm}`, `\\text{gcd}`, `\\mathrm{lcm}` are evaluated like `\\lcm` and `\\gcd`."""
    assert verify.is_equiv(pred, gold) is expected


@pytest.mark.parametrize("pred,gold,expected", [
    ("5\\ \\text{cm}", "5", True),                     # `\ ` before the unit
    ("5\\ cm", "5", True),
    ("5\\ cm", "6", False),
    ("\\frac{1}{2}\\text{ cm}", "0.5", True),          # a unit after a brace, not after a digit
    ("2\\sqrt{3}\\text{ cm}^2", "2\\sqrt{3}", True),
    ("2\\sqrt{3}\\text{ cm}^2", "3\\sqrt{2}", False),
    ("x = 1 \\, 000", "1000", True),                  # a thin space between digit groups
    ("x = 10 000", "10000", True),
    ("10 \\, 000 \\text{ and } 2", "10000, 2", True),
    ("10 000 \\text{ and } 2", "10000, 2", True),
    ("10 000 \\text{ and } 2", "10, 2", False),
])
def test_units_after_spaces_and_braces_and_spaced_thousands_are_read(pred, gold, expected):
    """A unit after `\\ ` or after a closing brace is dropped; digit groups split by spaces or `\\,` are one number."""
    assert verify.is_equiv(pred, gold) is expected


@pytest.mark.parametrize("pred,gold,expected", [
    ("12.", "12", True),
    ("12.", "1", False),
    ("x.", "x", True),
    ("\\frac{1}{2}.", "0.5", True),
    ("C.", "C", True),
    ("C.", "D", False),
    ("x = 5 \\\\", "5", True),                         # a matrix/aligned row break left at the end
    ("12\\\\", "12", True),
    ("3 1/2 .", "3.5", True),                          # a full stop after a space, then a mixed number
    ("12kg.", "12", True),                             # a glued unit before the full stop
    ("45mph.", "45", True),
    ("12kg.", "13", False),
])
def test_a_trailing_full_stop_or_row_break_is_dropped_before_the_last_rules(pred, gold, expected):
    """Trailing `.` and `\\\\` are dropped one at a time (with the space before them), then mixed numbers and glued units."""
    assert verify.is_equiv(pred, gold) is expected


@pytest.mark.parametrize("pred,gold,expected", [
    ("x = 2n\\pi, n  \\in \\mathbb{Z}", "x = 2k\\pi", True),          # two spaces before the declaration
    ("x = 2n\\pi, n  is an integer", "x = 2k\\pi", True),
    ("x = 2n\\pi, n  \\in \\mathbb{Z}", "x = k\\pi", False),
    ("x = \\arctan 2 + n\\pi, n \\in \\mathbb{Z}", "x = \\arctan 2 + k\\pi", True),  # the `n` of \arctan stays
    ("x = \\arctan 2 + n\\pi, n \\in \\mathbb{Z}", "x = \\arctan 2 + 2k\\pi", False),
    ("x = 2X\\pi, X \\in \\mathbb{Z}", "x = 2k\\pi", True),            # a capital parameter
    ("x = 2n\\pi + X, n \\in \\mathbb{Z}", "x = 2k\\pi + X", True),     # a capital letter ending the solution stays
    ("x = 2n\\pi + X, n \\in \\mathbb{Z}", "x = k\\pi + X", False),
])
def test_an_integer_parameter_is_renamed_only_where_it_stands_alone(pred, gold, expected):
    """The declared parameter is renamed k wherever it is a letter of its own, never inside a command like \\arctan."""
    assert verify.is_equiv(pred, gold) is expected


def test_an_answer_is_read_only_up_to_four_times_max_answer_chars():
    """Whatever comes after the first 4 * MAX_ANSWER_CHARS characters of an answer is never looked at."""
    limit = 4 * verify.MAX_ANSWER_CHARS
    assert verify.is_equiv("5" + " " * (limit - 1) + "0", "5")        # the `0` is character limit + 1: cut off
    assert not verify.is_equiv("5" + " " * (limit - 2) + "0", "5")    # character limit: read, `5 0` is not 5


@pytest.mark.parametrize("pred,gold,expected", [
    ("S \\in [0, 1]", "[0, 1]", True),
    ("T \\in (2, 5)", "(2, 5)", True),
    ("T \\in (2, 5)", "[2, 5]", False),
])
def test_a_capital_letter_in_an_interval_is_the_interval(pred, gold, expected):
    """`S \\in [0, 1]` is the interval, as `x \\in [0, 1]` is: the one letter before `\\in` may be upper case."""
    assert verify.is_equiv(pred, gold) is expected


def test_dropping_trailing_punctuation_never_empties_an_answer():
    """A lone `.` or `\\\\` is kept (so it equals itself); only what follows a first character is dropped."""
    assert verify.is_equiv(".", ".") and verify.is_equiv("\\\\", "\\\\") and verify.is_equiv("..", ".")


@pytest.mark.parametrize("completion,gold,expected", [
    ("The slope is negative, so C fits the graph.", "\\left( C \\right)", 1.0),
    ("The slope is negative, so C fits the graph.", "( C )", 1.0),
    ("The slope is negative, so C fits the graph.", "\\left( B \\right)", 0.0),
])
def test_a_letter_reference_with_spaced_or_sized_brackets_is_a_letter(completion, gold, expected):
    """`( C )` and `\\left( C \\right)` are the letter C, so a letter chosen in prose is read against them."""
    assert verify.reward(completion, gold) == expected


# ---------------------------------------------------------------------------
# Details that decide a reward: the half of the day, emphasis stars, a power, two unknowns named
# after an answer phrase, prose in scripts without Latin letters, spacing before a set or a parameter

@pytest.mark.parametrize("pred,gold,expected", [
    ("2:30 PM", "2:30 AM", False),          # 12 hours apart, however the half is spelled
    ("2:30 pm", "2:30 am", False),
    ("9 PM", "9 AM", False),
    ("2:30 PM", "2:30 p.m.", True),
    ("2:30 PM", "14:30", True),
])
def test_am_and_pm_without_dots_are_the_half_of_the_day_not_a_unit(pred, gold, expected):
    """`PM` after a time is read as the afternoon, never dropped like a unit word (`45 min`)."""
    assert verify.is_equiv(pred, gold) is expected


@pytest.mark.parametrize("completion,gold,expected", [
    ("The answer is *42*.", "42", 1.0),                    # italic
    ("Answer: ***42***", "42", 1.0),                       # bold italic
    ("The answer is **42** apples.", "42", 1.0),
    ("The answer is 2**10.", "1024", 1.0),                 # Python's power, not emphasis
    ("The answer is 2**10.", "210", 0.0),
    ("The answer is 2 * 3 = 6.", "6", 1.0),                # a product, not emphasis
])
def test_emphasis_stars_around_a_value_are_dropped_and_a_power_is_kept(completion, gold, expected):
    """Stars that open or close a word are Markdown; stars between two characters are arithmetic."""
    assert verify.reward(completion, gold) == expected


@pytest.mark.parametrize("completion,gold,expected", [
    ("The solution is $x = 2$ and $y = 3$.", "(2, 3)", 1.0),     # two unknowns: both values
    ("The solution is $x = 2$ and $y = 3$.", "(3, 2)", 0.0),
    ("The answer is $2x = 4$ and $x = 2$.", "2", 1.0),           # a step, then the value: the value alone
    ("The answer is $x = 2$ or $y = 3$.", "3", 1.0),             # `or` between two unknowns joins nothing
    ("The answer is $A = 2$ and $B = 3$.", "(2, 3)", 1.0),       # capital unknowns alike
])
def test_values_of_two_unknowns_after_an_answer_phrase_are_read_together(completion, gold, expected):
    assert verify.reward(completion, gold) == expected


@pytest.mark.parametrize("completion", [
    "她有 5 个苹果，又买了 7 个，一共 12 个。",
    "У Маши 5 яблок, она купила ещё 7, всего 12.",
])
def test_a_short_sentence_in_a_script_without_latin_letters_is_prose_not_an_answer(completion):
    """A one-line completion in Chinese or Russian is read like an English sentence: its last value."""
    assert verify.extract_answer(completion) == "12"
    assert verify.reward(completion, "12") == 1.0


def test_greek_letters_and_a_single_unit_character_still_make_a_whole_answer():
    """θ and π are math, and `12 元` is a value with its unit: both are read whole."""
    assert verify.extract_answer("θ = π/3") == "θ = π/3"
    assert verify.reward("12 元", "12") == 1.0


@pytest.mark.parametrize("pred,gold", [
    ("\\displaystyle \\{x \\mid x > 2\\}", "x > 2"),
    ("x = \\frac{\\pi}{4} + n\\pi,\\ n \\in \\mathbb{Z}", "x = \\frac{\\pi}{4} + k\\pi"),
    ("x = \\frac{\\pi}{4} + n\\pi,\\ \\text{where } n \\text{ is an integer}", "x = \\frac{\\pi}{4} + k\\pi"),
])
def test_a_latex_space_or_display_style_before_a_set_or_a_parameter_changes_nothing(pred, gold):
    """`\\displaystyle` before a set-builder set, or `,\\ ` before the integer parameter's declaration."""
    assert verify.is_equiv(pred, gold)


@pytest.mark.parametrize("pred,gold,expected", [
    ("n \\equiv 1 \\pmod{4} \\text{ or } n \\equiv 3 \\pmod{8}", "n \\equiv 1 \\pmod{4} \\text{ or } n \\equiv 3 \\pmod{4}", False),
    ("n \\equiv 1 \\pmod{4} \\text{ or } n \\equiv 3 \\pmod{8}", "n \\equiv 1 \\pmod{4} \\text{ or } n \\equiv 3 \\pmod{8}", True),
    ("x \\equiv 3 \\pmod{5}", "3", True),
])
def test_a_modulus_is_dropped_only_when_it_is_the_answers_only_one(pred, gold, expected):
    """With two congruences the last modulus is part of the answer: 3 mod 8 is not 3 mod 4."""
    assert verify.is_equiv(pred, gold) is expected
