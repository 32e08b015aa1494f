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
