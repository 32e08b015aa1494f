"""
Tests for prerl.py and verify.py. Offline, CPU, a tiny model built from a config: minutes.

    python -m pytest -q test_prerl.py
"""

import json
import math
import os
import threading
import time

import pytest

import verify

# ---------------------------------------------------------------------------
# verify.py: equivalence, hand-written cases (pred, gold, expected)

EQUIV_CASES = [
    # integers, decimals, separators, scientific notation
    ("5", "5", True), ("5.0", "5", True), ("5", "5.001", False), ("-3", "-3", True), ("3", "-3", False),
    ("7425000", "7,425,000", True), ("1000", "1\\,000", True), ("14916", "14{,}916", True),
    ("0.1", ".1", True), ("1.5e3", "1500", True), ("1.5\\times10^{3}", "1500", True),
    ("1.5 \\cdot 10^3", "1500", True), ("5", "500", False), ("0.0000001", "0.0000002", False),
    ("1/2^{99}", "1/2^{98}", False), ("2^{-99}", "\\frac{1}{2^{99}}", True),
    # fractions and mixed numbers
    ("\\frac{1}{2}", "0.5", True), ("\\dfrac{3}{4}", "\\tfrac34", True), ("\\frac12", "1/2", True),
    ("3/4", "0.75", True), ("2/3", "0.67", False), ("918\\frac{1}{2}", "918.5", True),
    ("2\\frac{1}{3}", "\\frac{7}{3}", True), ("\\frac{1}{3}", "\\frac{2}{6}", True), ("\\frac{1}{3}", "\\frac{1}{4}", False),
    # percentages
    ("10\\%", "10", True), ("10%", "0.1", True), ("10\\%", "1", False),
    # roots, powers, constants
    ("\\sqrt{8}", "2\\sqrt{2}", True), ("\\sqrt[3]{27}", "3", True), ("\\sqrt{2}", "1.414", True),
    ("\\sqrt{2}", "1.5", False), ("2^{10}", "1024", True), ("\\pi", "3.14", True), ("2\\pi", "\\pi", False),
    ("e^2", "e \\cdot e", True), ("\\infty", "\\infty", True), ("-\\infty", "\\infty", False),
    # degrees, text, units, spacing
    ("45^\\circ", "45", True), ("45^{\\circ}", "\\frac{\\pi}{4}", False), ("10\\text{ cm}", "10", True),
    ("\\$10", "10", True), ("10 dollars", "10", True), ("\\left(x+1\\right)", "(x+1)", True),
    ("\\!3\\,", "3", True), ("\\text{odd}", "odd", True), ("\\text{odd}", "even", False),
    # algebra
    ("x^2-1", "(x-1)(x+1)", True), ("x^2+1", "(x-1)(x+1)", False), ("(x+1)^2", "x^2+2x+1", True),
    ("\\frac{x}{2}", "0.5x", True), ("\\sqrt{x^2}", "x", True), ("2ab", "2ba", True),
    # equations vs values
    ("x=3", "3", True), ("y = 2x+1", "2x+1", True), ("x=3", "4", False), ("2x+2y=2", "x+y=1", True),
    ("x+y=1", "x-y=1", False),
    # sets, tuples, lists, intervals, unions
    ("1, 2, 3", "1,2,3", True), ("3, 2, 1", "1, 2, 3", False), ("\\{3, 1, 2\\}", "\\{1,2,3\\}", True),
    ("(1, 2)", "(1,2)", True), ("(2, 1)", "(1, 2)", False), ("[0, 1)", "[0,1)", True), ("[0, 1]", "[0, 1)", False),
    ("(-\\infty, 0) \\cup (1, \\infty)", "(1,\\infty)\\cup(-\\infty,0)", True),
    ("(-\\infty, 0] \\cup (1, \\infty)", "(-\\infty,0)\\cup(1,\\infty)", False), ("1 \\text{ or } 2", "1, 2", True),
    # multiple choice
    ("(C)", "C", True), ("\\text{C}", "C", True), ("\\textbf{(B)}", "B", True), ("C", "D", False),
    # matrices
    ("\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", "\\begin{bmatrix}1 & 2 \\\\ 3 & 4\\end{bmatrix}", True),
    ("\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", "\\begin{pmatrix}1&2\\\\4&3\\end{pmatrix}", False),
    ("\\begin{pmatrix}\\frac12\\\\1\\end{pmatrix}", "\\begin{pmatrix}0.5\\\\1\\end{pmatrix}", True),
    # complex numbers
    ("3+4i", "4i+3", True), ("\\frac34i", "\\frac{3}{4}i", True), ("3-4i", "3+4i", False), ("i^2", "-1", True),
    # trig / logs
    ("\\sin^2 x + \\cos^2 x", "1", True), ("\\log_2 8", "3", True), ("\\ln(e^3)", "3", True),
]


@pytest.mark.parametrize("pred,gold,expected", EQUIV_CASES)
def test_is_equiv_cases(pred, gold, expected):
    assert verify.is_equiv(pred, gold) is expected
    assert verify.is_equiv(gold, pred) is expected  # equivalence is symmetric


def test_enough_hand_written_cases():
    assert len(EQUIV_CASES) >= 60
    assert sum(expected for _, _, expected in EQUIV_CASES) < len(EQUIV_CASES)  # false cases too


@pytest.mark.parametrize("completion,expected", [
    ("so we get \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("first \\boxed{1} then \\boxed{2}", "2"),
    ("\\boxed{\\frac{a}{\\sqrt{b}}}", "\\frac{a}{\\sqrt{b}}"),
    ("answer \\boxed 5 done", "5"),
    ("\\fbox{7}", "7"),
    ("The final answer is 42.", "42"),
    ("blah. The answer is $x^2$.\nMore text", "x^2"),
    ("Answer: 17", "17"),
    ("We have $a=1$ and so $b = 3$", "b = 3"),
    ("result \\(7\\) ok", "7"),
    ("there are 12 apples and 3,400 pears", "3,400"),
    ("no numbers here", None),
    ("", None),
])
def test_extract_answer(completion, expected):
    assert verify.extract_answer(completion) == expected


@pytest.mark.parametrize("gold", ["\\frac{1}{2}", "$\\frac{1}{2}$", "We get $x = \\boxed{\\frac{1}{2}}$.", "0.5"])
def test_reward_gold_forms(gold):
    assert verify.reward("so \\boxed{0.5}", gold) == 1.0
    assert verify.reward("so \\boxed{0.6}", gold) == 0.0


def test_rewards_batch_matches_single_calls():
    completions = ["\\boxed{3}", "the answer is 4", "\\boxed{x^2-1}", "nothing", "\\boxed{(1,2)}"] * 3
    golds = ["3", "5", "(x-1)(x+1)", "1", "(1,2)"] * 3
    assert verify.rewards(completions, golds) == [verify.reward(c, g) for c, g in zip(completions, golds)]
    with pytest.raises(ValueError, match="completions"):
        verify.rewards(["a"], [])


HOSTILE = [
    "\\boxed{__import__('os').system('touch PWNED_FILE')}",
    "\\boxed{eval(\"open('PWNED_FILE','w')\")}",
    "\\boxed{9^{9^{9^9}}}",
    "\\boxed{(x+1)^{100000}}",
    "\\boxed{" + "(" * 5000 + "1" + ")" * 5000 + "}",
    "\\boxed{" + "{" * 3000 + "1",
    "\\boxed{1}}}}}}",
    "x" * 1_000_000 + " \\boxed{7}",
    "1" * 1_000_000,
    "\x00\x01\x02\x1b[31m\\boxed{\x07 5}",
    "",
    "\\boxed{}",
    "\\boxed{\\frac{1}{0}}",
    "\\boxed{100000!}",
    "\\boxed{10^{10^{10}}}",
    "\\boxed{\\binom{1000000}{500000}}",
    "\\boxed{\\sin(10^{5000}) + \\binom{x}{3}}",
]


@pytest.mark.parametrize("completion", HOSTILE)
def test_hostile_input_is_bounded_and_harmless(completion, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    verify.warmup(1)
    start = time.perf_counter()
    score = verify.reward(completion, "7", timeout=1.0)
    elapsed = time.perf_counter() - start
    assert score in (0.0, 1.0)
    assert elapsed < 2.0, f"took {elapsed:.2f}s"
    assert list(tmp_path.iterdir()) == []  # nothing was executed


def test_injection_scores_zero():
    assert verify.reward("\\boxed{__import__('os').system('echo hi')}", "0") == 0.0


def test_time_bound_holds_from_a_thread():
    # This comparison takes over 20 s inside sympy; the worker must be killed at the bound.
    results = []
    slow = "\\boxed{(x+1)^{100000} - (x+2)^{99999}}"
    worker = threading.Thread(target=lambda: results.append(verify.reward(slow, "(x+1)^{100000}", timeout=0.5)))
    start = time.perf_counter()
    worker.start()
    worker.join(10)
    assert results == [0.0] and time.perf_counter() - start < 3.0


def test_non_string_inputs_never_raise():
    assert verify.reward(None, "1") == 0.0
    assert verify.is_equiv(None, "1") is False
    assert verify.reward("\\boxed{1}", 1) == 1.0
