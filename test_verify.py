"""
Tests of verify.py: answer extraction, equivalence, rewards, what real models write, hostile input.

    python -m pytest -q test_verify.py
"""

import os
import random
import subprocess
import sys
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
    assert score == (1.0 if completion.endswith("\\boxed{7}") else 0.0)  # the one with a real answer 7 still scores
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


def _alive(pid):
    """True while pid runs (a zombie waiting for its reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


@pytest.mark.parametrize("answer", ["|x-2|", "\\sqrt{(x-2)^2}"])
def test_an_expression_verdict_does_not_depend_on_earlier_comparisons(answer):
    """Expressions are compared at sample points drawn afresh from the same seed for every comparison, so
    a pair gets the same verdict however many comparisons its worker ran before. |x-2| and x-2 differ
    only below x = 2: never equal (with points carried over from earlier comparisons, about 1 call in 4
    said equal)."""
    for other in ["x^2", "2x+1", "x^3-x", "\\sin x", "x/3"]:
        assert verify.is_equiv(answer, "x-2") is False
        verify.is_equiv(other, other + "+0*x")
    assert verify.is_equiv("|x-2|", "|2-x|") is True


def test_starting_a_worker_leaves_the_callers_memory_unshared():
    """Workers are forked by the fork server, never from the caller: after a worker starts, rewriting the
    200 MB the caller holds costs no copy-on-write page faults (after a fork of the caller: one per 4 KiB
    page, ~51k here, and in a trainer ~20 s of system time in the next step)."""
    import resource
    import torch
    held = torch.ones(50 * 2**20)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    process, conn = verify._start_worker()
    try:
        held.add_(1)
        assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before < 5_000
        conn.send(("x^2-1", "(x-1)(x+1)", False))         # and the worker works
        assert conn.poll(10) and conn.recv() is True
    finally:
        process.kill()


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc to see processes")
def test_verifier_workers_exit_when_their_parent_is_killed():
    # No orphans: a process starts verifier workers (from a thread too, as rewards() does)
    # and dies by SIGKILL; within a few seconds none of its workers may be left.
    script = (
        "import threading, time, verify\n"
        "verify.warmup(2)\n"
        "t = threading.Thread(target=verify.is_equiv, args=('x^2-1', '(x-1)(x+1)')); t.start(); t.join()\n"
        "verify.warmup(1)\n"
        "print(' '.join(str(p.pid) for p, _ in verify._idle_workers), flush=True)\n"
        "time.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
    try:
        pids = [int(p) for p in child.stdout.readline().split()]
        assert len(pids) >= 3 and all(_alive(p) for p in pids)
    finally:
        child.kill()
        child.wait(10)
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [p for p in pids if _alive(p)]
    for pid in left:  # clean up before failing, so a failure does not leak processes either
        os.kill(pid, 9)
    assert not left, f"verifier workers {left} outlived their parent"


# ---------------------------------------------------------------------------
# What real models write
# Hand-written (completion, reference, expected reward) cases in the formats models produce, one
# table per category of what models get wrong, true and false in each. bench_verify.py prints the per-category
# accuracy of verify.py next to math-verify's on these same tables.

COT_GSM8K = (
    "Natalia sold 48 clips in April.\nIn May she sold half as many: 48 / 2 = 24 clips.\n"
    "Altogether she sold 48 + 24 = 72 clips.\n#### 72")
COT_LONG_NO_BOX = (
    "Let's think step by step. Weng earns $12 an hour for babysitting. Yesterday she did 50 minutes, "
    "which is 50/60 = 5/6 of an hour.\nSo she earned 12 * 5/6 = $10.\nTherefore Weng earned $10.")

REAL_CASES = {
    "extraction": [  # a completion that is itself the answer, vs a long one that is not
        ("The ratio of the two areas is the square of the ratio of the sides.\n\n\\frac{10}{9}", "\\frac{10}{9}", True),
        ("The ratio of the two areas is the square of the ratio of the sides.\n\n\\frac{10}{9}", "9", False),
        ("\\frac{10}{9}", "\\frac{10}{9}", True),
        ("\\frac{10}{9}", "\\frac{9}{10}", False),
        ("[2,5)", "[2, 5)", True),
        ("[2,5)", "[2, 5]", False),
        ("(1, 2)", "(1,2)", True),
        ("(x-2)(x+2)", "x^2-4", True),
        ("(x-2)(x+2)", "x^2+4", False),
        ("$\\dfrac{3}{4}$", "\\frac34", True),
        ("east", "\\text{east}", True),
        ("West", "\\text{east}", False),
        ("\\sqrt{3}.", "\\sqrt3", True),
        ("x^2 + 2x + 1\n", "(x+1)^2", True),
        ("The ball travels 3 meters before it stops bouncing, so 18 is wrong and 20 is too big.", "20", False),
        ("We need the area first. The area is 25, and the perimeter is 20.", "25", False),
        ("After simplifying, the expression equals 2x+1 for all x, and at x = 3 it is 7.", "7", True),
        ("3 apples", "3", True),
        ("-\\infty, 0", "(-\\infty,0]", False),
        ("12", "12.0", True),
        ("I think it's 5", "5", True),
        ("I think it's 5", "6", False),
    ],
    "templates": [  # $$..$$, several boxes, Minerva, chat tokens, other languages
        ("Therefore the answer is 4.\n\nQuestion: What is 3 + 3?\nAnswer: 6", "4", True),
        ("Therefore the answer is 4.\n\nQuestion: What is 3 + 3?\nAnswer: 6", "6", False),
        ("**Final Answer**: 128", "128", True),
        ("We solve the system.\n$$x = \\frac{7}{2}$$", "\\frac72", True),
        ("We solve the system.\n$$x = \\frac{7}{2}$$", "\\frac27", False),
        ("The roots are $\\boxed{2}$ and $\\boxed{3}$.", "2, 3", True),
        ("The roots are $\\boxed{2}$ and $\\boxed{5}$.", "2, 3", False),
        ("First I guessed \\boxed{4}. Checking again, the correct value is \\boxed{6}.", "4", False),
        ("First I guessed \\boxed{4}. Checking again, the correct value is \\boxed{6}.", "6", True),
        ("\\boxed{1, 2, 3}", "1,2,3", True),
        ("Final Answer: The final answer is $\\frac{1}{3}$. I hope it is correct.", "\\frac13", True),
        ("Final Answer: The final answer is $\\frac{1}{3}$. I hope it is correct.", "\\frac23", False),
        ("Final Answer: The final answer is 4. I hope it is correct.", "4", True),
        ("Final Answer: The final answer is (2,-1). I hope it is correct.", "(2,-1)", True),
        ("So the answer is 15.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4", "15", True),
        ("So the answer is 15.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4", "4", False),
        ("The total is \\boxed{36}.<|eot_id|>", "36", True),
        ("<think>Maybe 7? No, recount: 8.</think>\nThe answer is 8.", "8", True),
        ("<think>Maybe 7? No, recount: 8.</think>\nThe answer is 8.", "7", False),
        ("所以，答案是 $12$。", "12", True),
        ("计算得 x=3，所以答案是 5。", "3", False),
        ("Réponse : $\\frac{5}{2}$", "2.5", True),
        ("Die Antwort ist 42.", "42", True),
        ("Respuesta: 17", "17", True),
        ("Ответ: 9", "9", True),
        ("Ответ: 9", "8", False),
        ("答案：$\\sqrt{2}$", "\\sqrt{2}", True),
    ],
    "relations": [
        ("\\boxed{\\{x \\mid x > 2\\}}", "(2, \\infty)", True),
        ("\\boxed{\\{x \\mid x \\geq 2\\}}", "(2, \\infty)", False),
        ("\\boxed{x \\geq 5}", "x >= 5", True),
        ("\\boxed{x \\geq 5}", "5 \\le x", True),
        ("\\boxed{x \\geq 5}", "x > 5", False),
        ("\\boxed{x \\gt 3}", "x > 3", True),
        ("\\boxed{x \\lt 3}", "x > 3", False),
        ("\\boxed{-2 \\le x \\le 7}", "x \\in [-2,7]", True),
        ("\\boxed{-2 < x \\le 7}", "[-2,7]", False),
        ("\\boxed{-x > -1}", "x < 1", True),
        ("\\boxed{-x > -1}", "x > 1", False),
        ("\\boxed{2x + 1 \\le 7}", "(-\\infty, 3]", True),
        ("\\boxed{-793 < a < 10}", "(-793, 10)", True),
        ("\\boxed{-793 < a < 10}", "(-793, 11)", False),
        ("\\boxed{x < -1 \\text{ or } x > 2}", "(-\\infty,-1)\\cup(2,\\infty)", True),
        ("\\boxed{x < -1 \\text{ or } x > 3}", "(-\\infty,-1)\\cup(2,\\infty)", False),
        ("\\boxed{x \\neq 2}", "x != 2", True),
        ("\\boxed{x \\neq 2}", "x \\ne 3", False),
        ("\\boxed{\\approx 3.46}", "3.46", True),
        ("\\boxed{2\\sqrt{3} \\approx 3.46}", "2\\sqrt3", True),
        ("\\boxed{x \\ge \\frac{1}{2}}", "[\\frac12, \\infty)", True),
        ("\\boxed{x \\ge \\frac{1}{2}}", "(\\frac12, \\infty)", False),
    ],
    "labelled": [
        ("So $f(2) = 7$.", "7", True),
        ("So $f(2) = 7$.", "2", False),
        ("The roots are $x = 2$ and $x = 3$.", "2, 3", True),
        ("The roots are $x = 2$ and $x = 4$.", "2, 3", False),
        ("\\boxed{AB = 5}", "5", True),
        ("\\boxed{(p,q)=(3,2)}", "(3,2)", True),
        ("\\boxed{(p,q)=(2,3)}", "(3,2)", False),
        ("\\boxed{a_3 = 2, a_{37} = 19}", "a_{37} = 19, a_3 = 2", True),
        ("\\boxed{a_3 = 2, a_{37} = 19}", "a_{37} = 2, a_3 = 19", False),
        ("\\boxed{k = 45 \\text{ and } n = 2}", "k=45, n=2", True),
        ("\\boxed{k = 45 \\text{ and } n = 2}", "45, 2", True),
        ("\\boxed{k = 45 \\text{ and } n = 3}", "k=45, n=2", False),
        ("\\boxed{\\pm 2021}", "\\{-2021, 2021\\}", True),
        ("\\boxed{\\pm 2021}", "2021", False),
        ("\\boxed{x = \\pm 3}", "-3, 3", True),
        ("\\boxed{\\{1; 2; 3\\}}", "\\{3, 2, 1\\}", True),
        ("\\boxed{\\{1; 2; 4\\}}", "\\{3, 2, 1\\}", False),
        ("\\boxed{x = 1 \\text{ or } x = -4}", "-4, 1", True),
        ("\\boxed{x = 1 \\text{ or } x = -4}", "-4, 2", False),
        ("\\boxed{1 \\text{ or } 2}", "\\{1, 2\\}", True),
        ("The solutions are $x=5$ and $y=-1$, so \\boxed{x=5, y=-1}.", "(5,-1)", True),
        ("\\boxed{x=5, y=-1}", "(-1,5)", False),
        ("\\boxed{f(x) = 3x - 2}", "3x-2", True),
        ("\\boxed{y = 2x + 3}", "2x - y + 3 = 0", True),
        ("\\boxed{y = 2x + 3}", "2x + y + 3 = 0", False),
    ],
    "numbers": [
        ("\\boxed{0.1\\overline{6}}", "\\frac16", True),
        ("\\boxed{0.\\overline{6}}", "\\frac16", False),
        ("\\boxed{3:2}", "\\frac32", True),
        ("\\boxed{2:3}", "\\frac32", False),
        ("The probability is 0.25 or 25%.", "0.25", True),
        ("\\boxed{0.3333}", "\\frac13", True),
        ("\\boxed{0.3334}", "\\frac13", False),
        ("\\boxed{0.333}", "\\frac13", True),
        ("\\boxed{0.33}", "\\frac13", False),
        ("\\boxed{1.13}", "\\frac98", False),
        ("\\boxed{[2.6667, 5)}", "[\\frac83, 5)", True),
        ("\\boxed{[2.6, 5)}", "[\\frac83, 5)", False),
        ("\\boxed{11,\\! 111}", "11111", True),
        ("\\boxed{11,\\! 112}", "11111", False),
        ("\\boxed{10 000}", "10000", True),
        ("\\boxed{1.5 \\times 10^{3}}", "1500", True),
        ("\\boxed{1.5e3}", "1500", True),
        ("\\boxed{10^4}", "10000", True),
        ("\\boxed{1.07e16}", "1.07 \\times 10^{16}", True),
        ("\\boxed{1.07e16}", "1.07 \\times 10^{15}", False),
        ("\\boxed{1.0700000000000001e16}", "1.07 \\times 10^{16}", False),
        ("\\boxed{10110_2}", "10110_2", True),
        ("\\boxed{10110}", "10110_2", True),
        ("\\boxed{22_{10}}", "10110_2", True),
        ("\\boxed{10111_2}", "10110_2", False),
        ("\\boxed{2:30}", "2:30 \\text{ p.m.}", True),
        ("\\boxed{14:30}", "2:30 p.m.", True),
        ("\\boxed{2:45}", "2:30", False),
        ("\\boxed{1,22}", "1.22", True),
        ("\\boxed{0,111}", "0.111", True),
        ("\\boxed{1,222}", "1.222", False),
        ("\\boxed{5}", "500", False),
        ("\\boxed{1/2^{99}}", "\\frac{1}{2^{98}}", False),
        ("\\boxed{\\pi^2}", "9.9", False),
        ("\\boxed{\\sqrt{2}}", "1.42", False),
        ("\\boxed{e}", "2.7", False),
        ("\\boxed{\\sqrt{2}}", "1.414", True),
    ],
    "expressions": [
        ("\\boxed{sqrt(2)/2}", "\\frac{\\sqrt2}{2}", True),
        ("\\boxed{2*pi}", "\\pi", False),
        ("\\boxed{\\sin 30^\\circ}", "\\frac12", True),
        ("\\boxed{\\log 1000}", "3", True),
        ("\\boxed{\\lfloor 7.9 \\rfloor}", "7", True),
        ("\\boxed{\\gcd(12, 18)}", "6", True),
        ("\\boxed{\\gcd(12, 18)}", "3", False),
        ("\\boxed{2^6 3^5 5^4}", "2^6\\cdot3^5\\cdot5^4", True),
        ("\\boxed{2^6 3^5 5^4}", "2^5\\cdot3^6\\cdot5^4", False),
        ("\\boxed{3 \\times 4 \\cdot 5}", "60", True),
        ("\\boxed{2\\sin x \\cos x}", "\\sin(2x)", True),
        ("\\boxed{\\sin 2x}", "2\\sin(x)\\cos(x)", True),
        ("\\boxed{\\sin 2x}", "2\\sin x", False),
        ("\\boxed{\\tan\\frac{\\pi}{4}}", "1", True),
        ("\\boxed{\\log_3 81}", "4", True),
        ("\\boxed{\\ln 8}", "3\\ln 2", True),
        ("\\boxed{\\ln 8}", "2\\ln 3", False),
        ("\\boxed{\\sqrt[3]{16}}", "2\\sqrt[3]{2}", True),
        ("\\boxed{\\sqrt[4]{16}}", "4", False),
        ("\\boxed{\\sqrt{2+\\sqrt{3}}}", "\\frac{\\sqrt6+\\sqrt2}{2}", True),
        ("\\boxed{3+4i}", "4i+3", True),
        ("\\boxed{(1+i)^2}", "2i", True),
        ("\\boxed{3-4i}", "3+4i", False),
        ("\\boxed{(2x+1)(x-3)}", "(x-3)(2x+1)", True),
        ("\\boxed{(2x-1)(x+3)}", "(x-3)(2x+1)", False),
        ("\\boxed{y = -\\frac{1}{2}x + 4}", "x + 2y = 8", True),
        ("\\boxed{y = -\\frac{1}{2}x + 4}", "x + 2y = 4", False),
        ("\\boxed{\\frac{x+1}{x^2-1}}", "\\frac{1}{x-1}", True),
        ("\\boxed{\\pi r^2 h}", "h\\pi r^2", True),
    ],
    "text": [
        ("So she has twelve apples left. The answer is twelve.", "12", True),
        ("So she has eleven apples left. The answer is eleven.", "12", False),
        ("Looking at the graphs, the correct option is (B).", "B", True),
        ("Looking at the graphs, the correct option is (B).", "A", False),
        ("\\boxed{\\varnothing}", "\\emptyset", True),
        ("\\boxed{\\text{east}}", "east", True),
        ("\\boxed{\\text{East}}", "east", True),
        ("\\boxed{\\text{west}}", "east", False),
        ("\\boxed{12\\text{ cm}^2}", "12", True),
        ("\\boxed{13\\text{ cm}^2}", "12", False),
        ("\\boxed{\\textbf{Tuesday}}", "\\text{Tuesday}", True),
        ("\\boxed{\\textnormal{6 weeks}}", "6", True),
        ("\\boxed{6 \\mbox{ weeks}}", "6", True),
        ("\\boxed{150 meters}", "150", True),
        ("\\boxed{15 meters}", "150", False),
        ("\\boxed{A. because the slope is positive}", "A", True),
        ("\\boxed{B. because the slope is positive}", "A", False),
        ("\\boxed{(B) 12}", "B", True),
        ("\\boxed{(B) 12}", "12", True),
        ("\\boxed{(B) 12}", "C", False),
        ("Comparing the options, the answer is C.", "C", True),
        ("Comparing the options, the answer is C.", "D", False),
        ("\\boxed{\\text{(D)}}", "D", True),
        ("\\boxed{\\$7.50}", "7.5", True),
        ("\\boxed{45^\\circ}", "45", True),
    ],
    "cot": [  # long chain-of-thought without a box
        ("Since $\\sin^2\\theta + \\cos^2\\theta = 1$, $\\cos\\theta = \\pm\\frac{4}{5}$. As $\\theta$ is in the second "
         "quadrant, $\\cos\\theta = -\\frac{4}{5}$.", "-\\frac45", True),
        ("Let $n$ be the number. Then $3n + 5 = 20$, so $3n = 15$ and $n = 5$.", "5", True),
        ("Let $n$ be the number. Then $3n + 5 = 20$, so $3n = 15$ and $n = 5$.", "15", False),
        ("By Fermat's little theorem, $2^{100} \\equiv 2 \\pmod 7$.", "2", True),
        ("By Fermat's little theorem, $2^{100} \\equiv 2 \\pmod 7$.", "7", False),
        ("We get $n = 7$. Since $7 > 5$, this satisfies the condition.", "7", True),
        ("We get $n = 7$. Since $7 > 5$, this satisfies the condition.", "5", False),
        ("So the perimeter is 24 cm, and the area is 36 cm^2.", "36", True),
        ("So the perimeter is 24 cm, and the area is 36 cm^2.", "2", False),
        ("The answer is not 5; it is 6.", "6", True),
        ("The answer is not 5; it is 6.", "5", False),
        (COT_GSM8K, "72", True),
        (COT_GSM8K, "24", False),
        ("Janet's ducks lay 16 eggs. She eats 3 and bakes with 4, leaving 16 - 3 - 4 = 9.\n"
         "She sells them at $2 each: 9 * 2 = 18.\nA: 18", "18", True),
        ("Janet's ducks lay 16 eggs. She eats 3 and bakes with 4, leaving 9.\nA: 18", "9", False),
        ("First, 3 * 4 = 12. Then 12 + 6 = 18.\n\n**Answer:** Janet makes $18 every day at the market.", "18", True),
        ("First, 3 * 4 = 12. Then 12 + 6 = 18.\n\n**Answer:** Janet makes $18 every day at the market.", "12", False),
        ("The shirt costs $7.00 and the pants cost $12.00, so the total is $19.00.", "19", True),
        ("The shirt costs $7.00 and the pants cost $12.00, so the total is $19.00.", "7", False),
        ("He saved 48+18=$66 in total.", "66", True),
        (COT_LONG_NO_BOX, "10", True),
        (COT_LONG_NO_BOX, "12", False),
        ("His height is 5 feet 9 inches, that is 5 * 12 = 60 inches plus 9.\nSo 60 + 9 + 3 = 72 inches.", "72", True),
        ("Substituting back, x = 2 + 3 = 5.", "5", True),
        ("Substituting back, x = 2 + 3 = 5.", "3", False),
        ("We need n with n divisible by 4 and 9. The smallest is n = 36.\nCheck: 36 is not divisible by 5.", "36", True),
        ("We need n with n divisible by 4 and 9. The smallest is n = 36.\nCheck: 36 is not divisible by 5.", "5", False),
        ("Trying n = 12: 12 is divisible by 6. Trying n = 14: 14 is not divisible by 6.", "14", False),
        ("So the number of apples Tom has, $a$, satisfies $a + 5 = 12$, and therefore Tom has 7 apples.", "7", True),
        ("Thus, the smallest positive integer $n$ for which $n^2 + 1$ is prime and $n > 3$ is $n = 4$.", "4", True),
        ("Thus, the smallest positive integer $n$ for which $n^2 + 1$ is prime and $n > 3$ is $n = 4$.", "3", False),
        ("So the answer is 3 + 4 = 7 cookies.", "7", True),
    ],
    "matrices": [
        ("\\boxed{[[1, 2], [3, 4]]}", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", True),
        ("\\boxed{[[1, 2], [4, 3]]}", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", False),
        ("\\boxed{\\left[\\begin{array}{cc} 1 & 2 \\\\ 3 & 4 \\end{array}\\right]}",
         "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", True),
        ("\\boxed{\\left[\\begin{array}{cc} 1 & 2 \\\\ 3 & 5 \\end{array}\\right]}",
         "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", False),
        ("\\boxed{\\begin{matrix} 1 & 0 \\\\ 0 & 1 \\end{matrix}}", "\\begin{bmatrix}1&0\\\\0&1\\end{bmatrix}", True),
        ("\\boxed{\\begin{vmatrix} 2 & 1 \\\\ 1 & 2 \\end{vmatrix}}", "\\begin{pmatrix}2&1\\\\1&2\\end{pmatrix}", True),
        ("\\boxed{\\begin{vmatrix} 2 & 1 \\\\ 1 & 2 \\end{vmatrix}}", "\\begin{pmatrix}1&2\\\\2&1\\end{pmatrix}", False),
        ("\\boxed{\\begin{pmatrix} 0.5 \\\\ 0.3333 \\end{pmatrix}}", "\\begin{pmatrix} \\frac12 \\\\ \\frac13 \\end{pmatrix}", True),
        ("\\boxed{\\begin{pmatrix} 0.5 \\\\ 0.3 \\end{pmatrix}}", "\\begin{pmatrix} \\frac12 \\\\ \\frac13 \\end{pmatrix}", False),
        ("\\boxed{\\begin{pmatrix} 3 \\\\ -1 \\end{pmatrix}}", "(3, -1)", True),
        ("\\boxed{\\begin{pmatrix} 3 \\\\ -1 \\end{pmatrix}}", "(-1, 3)", False),
        ("\\boxed{\\begin{pmatrix} 1 & 2 \\end{pmatrix}}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", False),
        ("\\boxed{\\begin{bmatrix} \\frac{1}{2} & -\\frac{\\sqrt3}{2} \\\\ \\frac{\\sqrt3}{2} & \\frac12 \\end{bmatrix}}",
         "\\begin{pmatrix} 1/2 & -\\sqrt{3}/2 \\\\ \\sqrt{3}/2 & 1/2 \\end{pmatrix}", True),
    ],
    "lists": [  # a bare list against a tuple; scientific notation parsed exactly
        ("\\boxed{(1, 2, 3)}", "1,2,3", True),
        ("\\boxed{(1, 3, 2)}", "1,2,3", False),
        ("\\boxed{1, 2, 3}", "(1,2,3)", True),
        ("\\boxed{2.5e-3}", "\\frac{1}{400}", True),
        ("\\boxed{2.5e-3}", "\\frac{1}{40}", False),
    ],
}


@pytest.mark.parametrize("category,completion,gold,expected",
                         [(cat, *row) for cat, rows in REAL_CASES.items() for row in rows])
def test_what_real_models_write(category, completion, gold, expected):
    assert verify.reward(completion, gold) == (1.0 if expected else 0.0)


def test_real_cases_cover_every_category_both_ways():
    assert sum(len(rows) for rows in REAL_CASES.values()) >= 150
    for category, rows in REAL_CASES.items():
        assert {expected for _, _, expected in rows} == {True, False}, category


@pytest.mark.parametrize("seed", range(3))
def test_decimal_rounding_a_rational_agrees_with_decimal_module(seed):
    # The rule "a decimal with >= 3 significant digits that rounds p/q to the digits shown" against
    # Python's decimal module: the rounded value matches, one unit in the last place off does not.
    import decimal
    rng = random.Random(seed)
    for _ in range(40):
        q = rng.choice([3, 7, 9, 11, 12, 13, 15, 21, 24, 60])
        p = rng.randint(1, 5 * q)
        places = rng.randint(3, 6)
        exact = decimal.Decimal(p) / decimal.Decimal(q)
        shown = exact.quantize(decimal.Decimal(1).scaleb(-places), rounding=decimal.ROUND_HALF_EVEN)
        if len(str(shown).replace(".", "").lstrip("0")) < 3:
            continue
        unit = decimal.Decimal(1).scaleb(-places)
        assert verify.is_equiv(str(shown), f"\\frac{{{p}}}{{{q}}}"), (shown, p, q)
        assert not verify.is_equiv(str(shown + unit), f"\\frac{{{p}}}{{{q}}}"), (shown + unit, p, q)
        assert not verify.is_equiv(str(shown - unit), f"{p}/{q}"), (shown - unit, p, q)


def test_scientific_notation_is_exact_decimal():
    from fractions import Fraction
    rng = random.Random(5)
    for _ in range(30):
        mantissa = f"{rng.randint(1, 9)}.{rng.randint(0, 999):03d}"
        exponent = rng.randint(-30, 30)
        exact = Fraction(mantissa) * Fraction(10) ** exponent  # the value written, no binary float
        text = f"{exact.numerator}/{exact.denominator}" if exact.denominator > 1 else str(exact.numerator)
        assert verify.is_equiv(f"{mantissa}e{exponent}", f"{mantissa} \\times 10^{{{exponent}}}")
        assert verify.is_equiv(f"{mantissa}e{exponent}", text)
        assert not verify.is_equiv(f"{mantissa}e{exponent}", f"{mantissa} \\times 10^{{{exponent + 1}}}")


def test_numbers_in_a_base_agree_with_int():
    rng = random.Random(7)
    digits = "0123456789ABCDEF"

    def write(n, base):  # independent of verify's int(s, base)
        out = ""
        while n:
            n, r = divmod(n, base)
            out = digits[r] + out
        return out or "0"
    for _ in range(30):
        n, base = rng.randint(1, 5000), rng.choice([2, 3, 5, 8, 12, 16])
        assert verify.is_equiv(f"{write(n, base)}_{{{base}}}", f"{write(n, 10)}_{{10}}")
        assert verify.is_equiv(write(n, base), f"{write(n, base)}_{base}")
        assert not verify.is_equiv(f"{write(n + 1, base)}_{base}", f"{write(n, base)}_{base}")


@pytest.mark.parametrize("completion,expected", [
    ("\\frac{10}{9}", "\\frac{10}{9}"),
    ("$$x = 2$$", "x = 2"),
    ("Final Answer: The final answer is $7$. I hope it is correct.", "7"),
    ("Final Answer: The final answer is 3.5. I hope it is correct.", "3.5"),
    ("so the total is 3.<|im_end|><|im_start|>user\n12", "3"),
    ("bla\n#### 1,234", "1,234"),
    ("steps\nA: 72", "72"),
    ("She pays $7.00 for shirts and $3 for socks, $10.00 in all.", "10.00"),
    ("Then 12 is the count. Check: 12 is not divisible by 5.", "12"),
    ("所以答案是 $\\frac{1}{2}$", "\\frac{1}{2}"),
    ("no numbers here", None),
])
def test_extract_answer_real_formats(completion, expected):
    assert verify.extract_answer(completion) == expected


def test_hostile_long_completions_stay_fast():
    # the new extraction rules (math spans, phrases, denial scan) on long hostile text stay linear
    for completion in ["$" * 200_000, "$a" * 100_000, "answer: " * 50_000, "not 5. " * 50_000,
                       "\\boxed{" * 50_000, "<|im_end|>" * 50_000 + "7", "#### " * 50_000, "\n" * 1_000_000,
                       "A: " + " " * 900_000 + "x", "the answer is " + " " * 900_000 + "x", "\\boxed{a" + " " * 3998 + "=}",
                       "\\boxed{1" + "\\ " * 1999 + "}", "\\boxed{x" + " " * 3990 + "\\pmod 7}"]:
        start = time.perf_counter()
        assert verify.reward(completion, "7") in (0.0, 1.0)
        assert time.perf_counter() - start < 2.0, repr(completion[:30])


# ---------------------------------------------------------------------------
# --- 6. the verifier's tolerance: near misses are not equal

NEAR_MISSES = [
    ("\\pi^2", "9.9"), ("\\sqrt{2}", "1.42"), ("e", "2.7"),               # a digit or two off
    ("\\pi", "3.1415929"), ("\\sqrt{2}+10^{-7}", "\\sqrt{2}"),           # 1e-7 relative: only a 1e-8 tolerance sees it
    ("x+10^{-7}", "x"),                                                  # the same with a free symbol (sampled points)
]


@pytest.mark.parametrize("pred,gold", NEAR_MISSES)
def test_near_misses_are_not_equivalent(pred, gold):
    assert verify.is_equiv(pred, gold) is False
    assert verify.is_equiv(gold, pred) is False


@pytest.mark.parametrize("pred,gold", [("\\pi", "3.1415927"), ("e", "2.718"), ("\\pi^2", "9.8696"),
                                       ("\\sqrt{2}", "\\frac{2}{\\sqrt{2}}"), ("x+10^{-7}", "x+\\frac{1}{10^{7}}")])
def test_correct_roundings_and_equal_forms_are_equivalent(pred, gold):
    assert verify.is_equiv(pred, gold) is True


def test_tolerance_loosened_a_hundredfold_admits_a_near_miss(monkeypatch):
    """The guard above in reverse: with the tolerance 100x looser the 1e-7 near misses pass as equal,
    so the near-miss test is what pins the constant."""
    monkeypatch.setattr(verify, "_run_in_worker", lambda job, timeout: verify._compare_normalized(*job))
    monkeypatch.setattr(verify, "_REL_TOL", verify._REL_TOL * 100)
    assert verify.is_equiv("\\pi", "3.1415929") and verify.is_equiv("x+10^{-7}", "x")


# --- the verifier's comparison core, case by case (each case pins one rule that a mutant changed)

CORE_CASES = [
    # the tolerance is relative above magnitude 1 and absolute (1e-8) below it
    ("10^{6}\\pi", "3141592.66", True), ("\\pi\\cdot 10^{-10}", "3.1416\\cdot 10^{-10}", True),
    ("\\sqrt{2}-0.414213547", "1", False),                       # 1.5e-8 off at magnitude 1
    ("\\sin^{2}(1)+\\cos^{2}(1)", "1", True),                     # equal only numerically, no symbols
    # answers over 1000 characters are never parsed; 1000 exactly still is
    ("1" + "+0" * 600, "1", False), ("10" + "+0" * 499, "10", True),
    # percent: either side may carry the %, and only the side without it is scaled
    ("10\\%", "\\frac{1}{2}\\cdot\\frac{1}{5}", True), ("2\\cdot 5", "1000", False), ("2 \\cdot 5", "0.1", False),
    ("\\{10\\%, 20\\%\\}", "\\{0.2, 0.1\\}", True), ("10\\%, 20\\%", "0.1, 0.2", True),
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix}100\\\\200\\end{pmatrix}", False),  # no percent in cells
    # equations: proportional sides, statements without symbols, tautologies, text sides
    ("x+y=0", "0.1x+0.1y=0", True), ("1+1=3", "2=2", False), ("x+y=1", "(x+1)^2-x^2-2x-1=0", False),
    ("x+y=\\text{Yes}", "x+y=yes", True), ("\\text{Yes}=x+y", "yes=x+y", True),
    ("x+y=\\text{Yes}", "x+y=no", False), ("\\text{Yes}=x+y", "no=x+y", False),
    # text compares case-insensitively; undefined expressions are not equal to defined ones
    ("\\text{Even}", "even", True), ("\\frac{x}{0}", "x", False),
    # lists of different lengths
    ("1, 2", "1, 2, 3", False),
]


@pytest.mark.parametrize("pred,gold,expected", CORE_CASES)
def test_verifier_core_cases(pred, gold, expected):
    assert verify.is_equiv(pred, gold) is expected
    assert verify.is_equiv(gold, pred) is expected


# --- silent wrong rewards: each case below once judged a wrong answer right (or a right one wrong)
# with no crash. A reward that says "right" for the wrong sign trains the model toward wrong answers.

SIGNED_FRACTIONS = ["-\\frac{3}{4}", "-3/4", "-\\frac34", "-\\dfrac{3}{4}", "-\\tfrac{3}{4}"]


@pytest.mark.parametrize("negative", SIGNED_FRACTIONS)
def test_a_fraction_keeps_its_sign(negative):
    """A negative fraction is never its positive counterpart, either way round; the same sign is."""
    positive = negative[1:]
    assert verify.is_equiv(negative, positive) is False
    assert verify.is_equiv(positive, negative) is False
    assert verify.is_equiv(negative, "-0.75") is True and verify.is_equiv(positive, "0.75") is True
    assert verify.is_equiv(negative, "-\\frac{6}{8}") is True
    assert verify.reward(f"So the slope is $\\boxed{{{negative}}}$.", "\\frac{3}{4}") == 0.0
    assert verify.reward(f"So the slope is $\\boxed{{{negative}}}$.", "-\\frac{3}{4}") == 1.0


@pytest.mark.parametrize("completion", [
    "It starts at 3 and drops 15 degrees, ending at -12",
    "The balance goes 8, then 8 - 20, so it ends at -12",
    "Subtracting: 5 - 17 = -12",
])
def test_the_last_number_of_an_unboxed_completion_keeps_its_minus_sign(completion):
    assert verify.extract_answer(completion) == "-12"
    assert verify.reward(completion, "-12") == 1.0
    assert verify.reward(completion, "12") == 0.0


@pytest.mark.parametrize("pred,gold,expected", [
    ("10\\%", "1000\\%", False), ("1000\\%", "10\\%", False), ("10%", "1000%", False), ("50\\%", "0.5\\%", False),
    ("10\\%", "10\\%", True), ("10\\%", "10%", True),                         # both carry it: compared as they stand
    ("10\\%", "0.1", True), ("0.1", "10\\%", True), ("10\\%", "10", True),      # one side carries it: either reading
    ("\\frac{1}{4}\\%", "25\\%", False),                                        # both sides, not a fast number
])
def test_percent_is_scaled_only_when_one_side_carries_it(pred, gold, expected):
    assert verify.is_equiv(pred, gold) is expected


def test_a_gsm8k_completion_is_read_at_its_last_answer_line():
    """A completion that corrects itself: the last `####` line is its answer, not the first."""
    completion = "3 + 4 = 8\n#### 8\nWait, that is wrong: 3 + 4 = 7.\n#### 7"
    assert verify.extract_answer(completion) == "7"
    assert verify.reward(completion, "7") == 1.0 and verify.reward(completion, "8") == 0.0
    assert verify.extract_answer("#### 1\n#### 2\n#### 3") == "3"


@pytest.mark.parametrize("end", ["", "\n", "  \n\n", "<|im_end|>"])
def test_a_completion_that_ends_right_after_its_reasoning_is_read_inside_it(end):
    """A model that stops right after </think> has its answer only inside the reasoning: that answer
    counts (nothing follows the reasoning to take its place)."""
    completion = "<think>Add them: 3 + 4 = 7, so the answer is \\boxed{7}</think>" + end
    assert verify.extract_answer(completion) == "7"
    assert verify.reward(completion, "7") == 1.0 and verify.reward(completion, "8") == 0.0
    # text after the reasoning still wins over a guess inside it
    assert verify.extract_answer("<think>maybe \\boxed{5}</think>\nSo the answer is \\boxed{7}." + end) == "7"


# --- bounds and tie-breaks of the last-value rule, and which roundings count

def test_the_last_value_is_searched_in_the_last_20000_characters_and_50_math_spans():
    assert verify._last_value("5" + " " * 19_999) == "5" and verify._last_value("5" + " " * 20_000) is None
    # only the last 50 spans are read: behind 50 denied ones, an earlier undenied span is out of reach
    assert verify._last_value("$1$. " + "It is not $2$. " * 49) == "1"
    assert verify._last_value("$1$. " + "It is not $2$. " * 50) is None


def test_at_equal_ends_the_formula_beats_the_number_inside_it():
    assert verify._last_value("Each one gets 2/5") == "2/5"
    assert verify._last_value("It takes 2 3/4") == "2 3/4"


def test_a_rounded_decimal_never_matches_a_fraction_with_an_exact_decimal():
    from fractions import Fraction
    assert not verify.is_equiv("1.602", "\\frac{1001}{625}")            # 1001/625 = 1.6016 exactly (5^4)
    assert verify.is_equiv("1.667", "\\frac{5}{3}")                     # 5/3 has none: the rounding counts
    # exact decimals are found in integer arithmetic, also for a long one (1/5^30 has 30 digits)
    assert not verify._rounds_rational("0.00000000000000000000107", Fraction(107, 10 ** 23), Fraction(1, 5 ** 30))


def test_the_last_value_skips_denied_and_checking_clauses_in_order():
    assert verify._last_value("So $1$, hence $2$. It is not $3$.") == "2"        # the last span not set aside
    assert verify._last_value("So $z$. It is not $x, y$.") == "z"                # a span's clause is where it starts
    assert verify._last_value("So \\(x\\)5") == "5"                              # a value right after the math ends later
    assert verify._last_value("1. " + "It is not 2. " * 49) == "1"               # 50 values are read, no more
    assert verify._last_value("1. " + "It is not 2. " * 50) is None


def test_when_every_value_only_checks_the_last_math_still_counts_unless_denied():
    assert verify._last_value("Check: $1$. It is not $2$. Check: $3$.") == "3"
    assert verify._last_value("Check: $1$. It is not $3$.") is None
    assert verify._last_value("It is not $x, y$") is None


def test_significant_digits_ignore_the_sign_and_the_spaces():
    assert verify.is_equiv("-0.577", "-\\frac{\\sqrt{3}}{3}") and verify.is_equiv("- 0.3333", "-\\frac{1}{3}")
    assert not verify.is_equiv("-0.58", "-\\frac{\\sqrt{3}}{3}")          # two digits prove too little, signed or not
    assert verify._decimal_places("- 0.0123") == (4, 3)


def test_a_reference_in_an_fbox_or_in_math_delimiters_is_its_content():
    assert verify.reference_answer("so \\fbox{5}") == "5"
    for wrapped in ("$$\\frac12$$", "$\\frac12$", "\\(\\frac12\\)", "\\[\\frac12\\]", " $ \\frac12 $ "):
        assert verify.reference_answer(wrapped) == "\\frac12", wrapped
    assert verify.reference_answer("$$") == "$$" and verify.reference_answer(7) == "7"
    assert verify.reference_answer("$5") == "$5"                              # a dollar sign, not math


def test_reward_hands_its_time_bound_to_the_worker(monkeypatch):
    seen = []
    monkeypatch.setattr(verify, "_run_in_worker", lambda job, timeout: seen.append(timeout) or verify._compare_normalized(*job))
    assert verify.reward("\\boxed{x+1}", "1+x", timeout=0.25) == 1.0 and seen == [0.25]


def test_boxes_skip_spaces_before_their_brace_and_a_box_at_the_very_end_is_none():
    assert verify._boxes("so \\boxed  {5} and \\fbox{6}") == [(3, 14, "5"), (19, 27, "6")]
    assert verify._boxes("so \\boxed 7.") == [(3, 12, "7.")] and verify._boxes("\\boxed{ }") == []
    assert verify._boxes("\\boxed " + "7" * 300)[0][2] == "7" * 200          # a brace-less box reads 200 characters
    assert verify.extract_answer("#### 5\n\\boxed") == "5" and verify.extract_answer("#### 5\n\\boxed  ") == "5"
