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


# ---------------------------------------------------------------------------
# Equivalence rules, case by case: structured answers (tuples, sets, intervals, equations),
# expressions, numbers, repeating decimals

LABELLED_ANSWERS = [
    # one labelled value against another: the same label compares the values, another label compares
    # the two as equations (the same line solved for another variable is the same answer)
    ("x = 3", "y = 3", False),
    ("y = 2x + 3", "x = \\frac{y - 3}{2}", True),
    ("y = 2x + 3", "x = \\frac{y + 3}{2}", False),
    ("(p, q) = (1/2, 3)", "(p, q) = (0.5, 3)", True),
    ("(p, q) = (1/2, 3)", "(p, q) = (3, 0.5)", False),
    ("x = 10\\%", "x = 0.1", True),
    ("r = 0.1", "10\\%", True),
    ("x = \\frac{1}{3}", "0.333", True),
    ("x = \\frac{1}{3}", "0.33", False),
    # labelled values in a set match by label in any order, also when a label is not algebra
    ("\\{\\angle B = 60, a = 5\\}", "\\{a = 5, \\angle B = 60\\}", True),
    ("\\{\\angle B = 60, a = 5\\}", "\\{a = 60, \\angle B = 5\\}", False),
    # several labelled values: by label when both sides name the same labels, else by value
    ("x_1 = 2, x_2 = 3", "x = 2 \\text{ or } x = 3", True),
    ("x_1 = 2, x_2 = 4", "x = 2 \\text{ or } x = 3", False),
    ("r = 5\\%, n = 10", "n = 10, r = 0.05", True),
    ("r = 5\\%, n = 10", "0.05, 10", True),
    ("r = 5\\%, n = 10", "10, 0.05", False),
]


@pytest.mark.parametrize("pred,gold,expected", LABELLED_ANSWERS)
def test_labelled_answers_compare_by_label_then_as_equations(pred, gold, expected):
    """`x = 3` is its value against a value, and against another label an equation."""
    assert verify.is_equiv(pred, gold) is expected
    assert verify.is_equiv(gold, pred) is expected


NONLINEAR_RELATIONS = [
    ("x^2 < 4", "4 > x^2", True),
    ("x^2 < 4", "2x^2 < 8", True),                    # both sides scaled by a positive number
    ("x^2 < 4", "x^2 > 4", False),                    # scaled by a negative one: the other region
    ("x^2 \\le 4", "-x^2 \\ge -4", True),
    ("x^2 \\le 4", "x^2 < 4", False),
    ("x^2 + y^2 < 1", "2x^2 + 2y^2 < 2", True),
    ("x^2 + y^2 < 1", "x^2 + y^2 > 1", False),
    ("x \\neq 3", "3 \\neq x", True),                 # `!=` has no direction
    ("x \\neq 3", "x \\neq 4", False),
    ("2^{10} > 10^3", "1024 > 1000", True),           # no variable: the two differences must be equal
    ("2^{10} > 10^3", "2^{10} < 10^3", False),
]


@pytest.mark.parametrize("pred,gold,expected", NONLINEAR_RELATIONS)
def test_relations_that_are_not_intervals_compare_as_inequalities(pred, gold, expected):
    """`x^2 < 4` == `2x^2 < 8`: the same relation up to a positive factor (any factor for `\\neq`)."""
    assert verify.is_equiv(pred, gold) is expected
    assert verify.is_equiv(gold, pred) is expected


MIXED_UNORDERED = [
    ("x \\le -1 \\text{ or } x = 3", "x = 3 \\text{ or } x \\le -1", True),
    ("x \\le -1 \\text{ or } x = 3", "x = 4 \\text{ or } x \\le -1", False),
    ("xyz = 6 \\text{ and } x + y = 5", "x + y = 5 \\text{ and } xyz = 6", True),      # a word as a side
    ("xyz = 6 \\text{ and } x + y = 5", "x + y = 5 \\text{ and } xyz = 7", False),
    ("a + b = \\text{even} \\text{ and } x + y = 5", "x + y = 5 \\text{ and } a + b = \\text{even}", True),
    ("a + b = \\text{even} \\text{ and } x + y = 5", "x + y = 5 \\text{ and } a + b = \\text{odd}", False),
]


@pytest.mark.parametrize("pred,gold,expected", MIXED_UNORDERED)
def test_unordered_answers_of_different_kinds_match_in_any_order(pred, gold, expected):
    """An interval and a point, or equations with and without a word, pair up whatever their order."""
    assert verify.is_equiv(pred, gold) is expected
    assert verify.is_equiv(gold, pred) is expected


PERCENT_IN_STRUCTURES = [
    ("(10\\%, 25\\%)", "0.1, 0.25", True),
    ("(10\\%, 25\\%)", "0.25, 0.1", False),
    ("[0, 10\\%) \\cup (90\\%, 100\\%]", "[0, 0.1) \\cup (0.9, 1]", True),
    ("[0, 10\\%) \\cup (90\\%, 100\\%]", "[0, 0.1) \\cup (0.8, 1]", False),
]


@pytest.mark.parametrize("pred,gold,expected", PERCENT_IN_STRUCTURES)
def test_a_percent_answer_keeps_both_readings_inside_tuples_and_unions(pred, gold, expected):
    """`10\\%` is 10 or 0.1 in every item of a tuple or a union, as it is alone."""
    assert verify.is_equiv(pred, gold) is expected
    assert verify.is_equiv(gold, pred) is expected


def test_an_equation_with_a_percent_right_side_equals_that_number_as_a_reference():
    """`(1+r)^2 = 121\\%` against 1.21 is its right side, one way only."""
    assert verify.is_equiv("(1+r)^2 = 121\\%", "1.21") is True
    assert verify.is_equiv("(1+r)^2 = 121\\%", "1.1") is False
    assert verify.is_equiv("1.21", "(1+r)^2 = 121\\%") is False


ROUNDED_ITEMS = [
    ("(0.333, 0.5)", "(\\frac{1}{3}, \\frac{1}{2})", True),
    ("(0.333, 0.5)", "(\\frac{1}{3}, \\frac{1}{4})", False),
    ("0.667, 0.25", "\\left(\\frac{2}{3}, \\frac{1}{4}\\right)", True),
    ("0.67, 0.25", "\\left(\\frac{2}{3}, \\frac{1}{4}\\right)", False),   # two digits prove too little
]


@pytest.mark.parametrize("pred,gold,expected", ROUNDED_ITEMS)
def test_a_rounded_decimal_item_matches_its_fraction_either_way_round(pred, gold, expected):
    """0.333 == 1/3 inside a tuple too, whichever side holds the decimal."""
    assert verify.is_equiv(pred, gold) is expected
    assert verify.is_equiv(gold, pred) is expected


REPEATING_DECIMALS = [
    (".\\overline{3}", "\\frac{1}{3}", True),          # no whole part written
    ("0.\\overline{3}", "\\frac{1}{3}", True),         # no digits before the period
    ("1.\\overline{3}", "\\frac{4}{3}", True),
    ("1.\\overline{3}", "\\frac{1}{3}", False),
    ("0.\\overline{36}", "\\frac{4}{11}", True),       # a two-digit period: 36/99
    ("0.\\overline{36}", "\\frac{9}{25}", False),      # not 0.36
    ("0.12\\overline{3}", "\\frac{37}{300}", True),    # two fixed digits: 0.12 + 3/900
    ("0.12\\overline{3}", "\\frac{41}{333}", False),   # not 0.\overline{123}
    ("0.\\overline{142857}", "\\frac{1}{7}", True),
]


@pytest.mark.parametrize("pred,gold,expected", REPEATING_DECIMALS)
def test_repeating_decimals_are_exact_fractions(pred, gold, expected):
    """`0.12\\overline{3}` is 0.1233... = 37/300 exactly."""
    assert verify.is_equiv(pred, gold) is expected
    assert verify.is_equiv(gold, pred) is expected


def test_expressions_too_large_to_evaluate_are_compared_symbolically():
    """`2^{1000n}` overflows at every sample point; sympy then decides (1024^{100n} is the same)."""
    assert verify.is_equiv("1024^{100n}", "2^{1000n}") is True
    assert verify.is_equiv("2^{1000n}", "1024^{100n}") is True
    assert verify.is_equiv("1024^{100n}", "2^{1001n}") is False


@pytest.mark.parametrize("pred,gold", [
    ("- 0.5", "-\\frac{1}{2}"),                          # a space inside the number
    ("1.5\\times10^{3}", "1500"),                        # scientific notation
    ("\\frac{12}{1}", "12"),                             # an integer fraction over 1
    ("0." + "3" * 38, "\\frac{1}{3}"),                   # 40 characters: the longest plain number
])
def test_plain_numbers_up_to_40_characters_are_decided_without_a_worker(pred, gold, monkeypatch):
    """Plain numbers, integer fractions and a \\times 10^k compare exactly in the calling process."""
    jobs = []
    monkeypatch.setattr(verify, "_run_in_worker", lambda job, timeout: jobs.append(job) or False)
    assert verify.is_equiv(pred, gold) is True and verify.is_equiv(gold, pred) is True
    assert jobs == []


def test_a_number_over_40_characters_is_compared_in_a_worker(monkeypatch):
    """A longer numeral goes to the worker, under its time bound, like any other answer."""
    jobs = []
    monkeypatch.setattr(verify, "_run_in_worker", lambda job, timeout: jobs.append(job) or verify._compare_normalized(*job))
    assert verify.is_equiv("0." + "3" * 39, "\\frac{1}{3}") is True and len(jobs) == 1


@pytest.mark.parametrize("pred,gold,expected", [
    ("1Z_{36}", "1Z", True), ("1Z", "1Z_{36}", True), ("1Z_{36}", "1Y", False), ("1Z_{36}", "71_{10}", True),
])
def test_base_36_is_the_largest_base(pred, gold, expected):
    """Digits 0-9 then A-Z: `1Z_{36}` is 71, and a bare `1Z` against it is read in base 36."""
    assert verify.is_equiv(pred, gold) is expected


def test_only_the_last_k_boxes_need_one_answer_each():
    """Boxes of earlier parts may hold lists; the last two boxes answer a two-answer reference."""
    completion = ("Part (a): \\boxed{5}. Part (b): \\boxed{7}. Part (c): the roots are \\boxed{1, 4}. "
                  "Part (d): \\boxed{2} and \\boxed{3}.")
    assert verify.grade(completion, "2, 3") == verify.Verdict(1.0, "2, 3", "correct")
    assert verify.grade(completion, "2, 4") == verify.Verdict(0.0, "3", "wrong")


def test_a_choice_letter_in_bold_is_read():
    """`option **C**` names C: markdown bold is unwrapped before the letter is looked for."""
    completion = "The side length is 12, so it is option **C**: \\boxed{12}"
    assert verify.grade(completion, "C") == verify.Verdict(1.0, "C", "correct")
    assert verify.grade(completion, "B") == verify.Verdict(0.0, "C", "wrong")


def test_against_a_value_reference_a_letter_named_in_prose_is_not_the_answer():
    """Only a one-letter reference looks for a chosen letter: otherwise the verdict keeps the box."""
    assert verify.grade("So the answer is option C: \\boxed{13}", "12") == verify.Verdict(0.0, "13", "wrong")
    assert verify.grade("It cannot be A, so C.", "12") == verify.Verdict(0.0, None, "no_answer")


def test_grade_hands_its_time_bound_to_the_boxes_read_together(monkeypatch):
    seen = []
    monkeypatch.setattr(verify, "_run_in_worker", lambda job, timeout: seen.append(timeout) or verify._compare_normalized(*job))
    verdict = verify.grade("So $\\boxed{\\frac{4}{2}}$ and $\\boxed{3}$.", "2, 3", timeout=0.25)
    assert verdict == verify.Verdict(1.0, "\\frac{4}{2}, 3", "correct") and seen and set(seen) == {0.25}


def test_a_completion_marked_truncated_is_unfinished_whatever_it_is():
    """truncated=True wins over everything, even a completion that is not a string."""
    for completion in (None, 42, "\\boxed{42}"):
        assert verify.grade(completion, "42", truncated=True) == verify.Verdict(0.0, None, "unfinished")


GENERAL_SOLUTIONS = [
    ("x = \\frac{\\pi}{4} + n\\pi,\\ (n \\in \\mathbb{Z})", True),
    ("x = \\frac{\\pi}{4} + n\\pi,\\, n \\in \\mathbb{Z}", True),
    ("x = \\frac{\\pi}{4} + n\\pi,\\; n \\in \\mathbb{Z}", True),
    ("x = \\frac{\\pi}{4} + n\\pi,\\: n \\in \\mathbb{Z}", True),
    ("x = \\frac{\\pi}{4} + n\\pi,\\! n \\in \\mathbb{Z}", True),
    ("x = \\frac{\\pi}{4} + n\\pi,\\quad n \\in \\mathbb{Z}", True),
    ("x = \\frac{\\pi}{4} + n\\pi,\\qquad n \\in \\mathbb{Z}", True),
    ("x = \\frac{\\pi}{4} + n\\pi, n  \\in \\mathbb{Z}", True),           # a double space inside the declaration
    ("x = \\frac{\\pi}{2} + n\\pi,\\quad n \\in \\mathbb{Z}", False),
]


@pytest.mark.parametrize("pred,expected", GENERAL_SOLUTIONS)
def test_the_declaration_of_an_integer_parameter_is_dropped_after_any_latex_space(pred, expected):
    """`, \\quad n \\in \\mathbb{Z}` goes, whatever space comes before it; n is renamed k."""
    assert verify.is_equiv(pred, "x = \\frac{\\pi}{4} + k\\pi") is expected
    assert verify.is_equiv("x = \\frac{\\pi}{4} + k\\pi", pred) is expected


def test_renaming_the_integer_parameter_leaves_function_names_alone():
    """n becomes k, but the n of `\\arctan` stays."""
    assert verify.is_equiv("x = \\arctan 2 + n\\pi, n \\in \\mathbb{Z}", "x = \\arctan 2 + k\\pi")
    assert not verify.is_equiv("x = \\arctan 3 + n\\pi, n \\in \\mathbb{Z}", "x = \\arctan 2 + k\\pi")


@pytest.mark.parametrize("pred,gold,expected", [
    ("0101_2", "101_2", True), ("010_{36}", "10_{36}", True), ("0110_2", "101_2", False),   # leading zeros
    ("1a", "1A_{16}", True), ("1b", "1A_{16}", False),                                     # lowercase digits
])
def test_numbers_in_the_same_base_compare_by_value(pred, gold, expected):
    """`0101_2` is `101_2`; a bare `1a` against `1A_{16}` is read in base 16."""
    assert verify.is_equiv(pred, gold) is expected
    assert verify.is_equiv(gold, pred) is expected


CLOCK_TIMES = [
    ("2:30 p.m.", "2:30 a.m.", False),        # twelve hours apart
    ("11:30 a.m.", "12:30 p.m.", False),
    ("2:30 p.m.", "2:30 P.M.", True),
    ("2:30 p.m.", "14:30", True),
    ("2:30", "2:30 p.m.", True),              # a bare time is read on a 12-hour clock
    ("9:15 a.m.", "9:15", True),
    ("9:15 a.m.", "9:45", False),
    ("10:15", "\\frac{2}{3}", True),          # not a time against a number: the ratio 10:15
]


@pytest.mark.parametrize("pred,gold,expected", CLOCK_TIMES)
def test_clock_times_compare_with_and_without_am_pm(pred, gold, expected):
    """a.m./p.m. on both sides compare exactly; a bare time matches either half of the day."""
    assert verify.is_equiv(pred, gold) is expected
    assert verify.is_equiv(gold, pred) is expected


def test_a_choice_letter_before_an_equation_keeps_the_equation_the_answer():
    """`(C) 2x = 14` against 14 is the equation `2x = 14`, which a number reference matches, one way only."""
    assert verify.is_equiv("(C) 2x = 14", "14") is True
    assert verify.is_equiv("2x = 14", "(C) 14") is True
    assert verify.is_equiv("14", "(C) 2x = 14") is False
    assert verify.is_equiv("(C) 14", "2x = 14") is False


@pytest.mark.parametrize("pred,gold", [("A = 12", "12"), ("C = 10\\pi", "10\\pi"), ("E = 5", "5")])
def test_a_capital_label_is_not_a_choice_letter(pred, gold):
    """`A = 12` is the value 12 labelled A, not option A followed by `= 12`."""
    assert verify.is_equiv(pred, gold) is True and verify.is_equiv(gold, pred) is True


@pytest.mark.parametrize("pred,gold,expected", [
    ("-0,125", "-0.125", True), ("-0,125", "-125", False),       # a leading -0 is a decimal comma
    ("3,1416", "3.1416", True), ("3,1416", "31416", False),      # a group of four digits is no thousands group
])
def test_a_decimal_comma_is_read_when_it_cannot_separate_thousands(pred, gold, expected):
    assert verify.is_equiv(pred, gold) is expected
    assert verify.is_equiv(gold, pred) is expected


@pytest.mark.parametrize("pred,gold", [
    ("\\frac{a}{b} + c", "\\frac{a}{b}+c"),
    ("(B) x + 1", "x+1"),                              # the same once the choice letter is dropped
    ("(B) x + 1", "(B) x+1"),
    ("\\varnothing", "\\emptyset"),                    # every empty-set sign is \emptyset
])
def test_answers_equal_up_to_spaces_need_no_worker(pred, gold, monkeypatch):
    jobs = []
    monkeypatch.setattr(verify, "_run_in_worker", lambda job, timeout: jobs.append(job) or False)
    assert verify.is_equiv(pred, gold) is True and verify.is_equiv(gold, pred) is True
    assert jobs == []


@pytest.mark.parametrize("fraction,decimal,expected", [
    ("\\frac{1}{3}", "0.333", True), ("\\frac{2}{3}", "0.667", True), ("\\frac{2}{3}", "0.666", False),
])
def test_a_rounded_decimal_reference_matches_the_fraction_it_rounds(fraction, decimal, expected):
    """The rounding rule holds whichever side, answer or reference, is the decimal."""
    assert verify.is_equiv(fraction, decimal) is expected
    assert verify.is_equiv(decimal, fraction) is expected


def test_empty_and_non_string_answers_equal_nothing():
    assert verify.is_equiv("", "0") is False and verify.is_equiv("0", "") is False
    assert verify.is_equiv("\\text{}", "0") is False
    assert verify.is_equiv(["5"], "5") is False and verify.is_equiv("5", ["5"]) is False


@pytest.mark.parametrize("pred,gold", [
    ("$5$", "5"), ("$\\boxed{5}$", "5"), ("\\(\\frac{1}{2}\\)", "0.5"), ("\\[x^2\\]", "x^2"),
    ("12\u200b", "12"), ("\u200b12", "12"),            # a zero-width space, as tokenizers leave them
])
def test_math_delimiters_and_invisible_characters_around_an_answer_are_dropped(pred, gold):
    assert verify.is_equiv(pred, gold) is True and verify.is_equiv(gold, pred) is True


def test_an_answer_is_read_up_to_its_first_4000_characters():
    """A bound on hostile input: what comes after 4000 characters is never read."""
    assert verify.is_equiv("5" + " " * 3998 + "6", "5") is False      # 4000 characters: the 6 counts
    assert verify.is_equiv("5" + " " * 3999 + "6", "5") is True       # 4001: the 6 is cut off


WRITTEN_FORMS = [
    # fraction commands, Python's power, root signs
    ("\\cfrac{1}{2}", "0.5", True), ("\\\\frac{1}{2}", "0.5", True), ("\\cfrac{1}{3}", "0.5", False),
    ("2**10", "1024", True), ("x**2", "x^2", True), ("2**10", "2^{11}", False),
    ("√x", "\\sqrt{x}", True), ("√N", "\\sqrt{N}", True), ("√(x+1)", "\\sqrt{x+1}", True),
    # brackets, the real line, unicode operators
    ("\\langle 1, 2 \\rangle", "(1, 2)", True), ("\\lbrace 1, 2 \\rbrace", "\\{2, 1\\}", True),
    ("\\mathbb{R}", "(-\\infty, \\infty)", True), ("\\mathbb{R}", "(0, \\infty)", False),
    ("−3", "-3", True), ("3×4", "12", True), ("3·4", "12", True), ("\\varnothing", "\\emptyset", True),
    # congruences: the residue; `\bmod` inside an equality chain is an operator
    ("x \\equiv 3 \\bmod 5", "3", True), ("x \\equiv 3 \\mod 5", "3", True), ("x \\equiv 3 \\bmod 5", "5", False),
    ("x \\equiv 3 (\\bmod 5)", "3", True), ("x \\equiv 3 ( \\bmod 5)", "3", True), ("2^{10} \\bmod 7 = 2", "2", True),
    ("\\operatorname{lcm}(4, 6)", "12", True), ("\\text{gcd}(12, 18)", "6", True),
    # approximations: the exact value before `\approx` counts, a bare variable's approximation after it
    ("≈ 3.46", "3.46", True), ("x \\approx 3.46", "3.46", True), ("V \\approx 33.5", "33.5", True),
    ("2\\sqrt{3} \\approx 3.5", "2\\sqrt{3}", True), ("\\sqrt{2} \\approx 1.414 \\approx 1.41", "\\sqrt{2}", True),
    # units and spaces
    ("5\\ \\text{cm}", "5", True), ("\\frac{1}{2}\\text{ m}^2", "0.5", True), ("12kg", "12", True), ("12kg", "13", False),
    ("12kg.", "12", True),                                       # a glued unit before the full stop
    ("\\text{10\\ 000}", "10000", True), ("10 000, 20 000", "10000, 20000", True), ("\\text{A\\ and\\ C}", "A, C", True),
    ("\\{10 000, 20 000\\}", "\\{20000, 10000\\}", True),        # thousands groups inside a set
    ("X \\in \\{0, 1, 2\\}", "\\{0, 1, 2\\}", True), ("x \\in [2, 5)", "[2, 5)", True),   # `X \in S` is S
    # a trailing period or LaTeX line break
    ("12.", "12", True), ("B.", "B", True), ("12 \\\\", "12", True), ("2 3/4 \\\\", "\\frac{11}{4}", True),
    # a choice letter in brackets, with spaces, against the letter with its value
    ("B (12)", "(B)", True), ("B (12)", "\\left( B \\right)", True), ("B (12)", "C", False),
]


@pytest.mark.parametrize("pred,gold,expected", WRITTEN_FORMS)
def test_written_forms_normalise_to_the_same_answer(pred, gold, expected):
    """One row per normalisation rule: the form on the left means the answer on the right."""
    assert verify.is_equiv(pred, gold) is expected
    assert verify.is_equiv(gold, pred) is expected


class _Points:
    """A stand-in for verify._RNG that draws the given sample points, in turn."""

    def __init__(self, *points):
        self.points = list(points)

    def uniform(self, low, high):
        return self.points.pop(0) if len(self.points) > 1 else self.points[0]   # the last one repeats


def test_a_sample_point_where_an_answer_overflows_is_skipped(monkeypatch):
    """x^{600} is past the float range at x = 3.8: that point is skipped and the next three decide
    (arctan x + arctan(1/x) = pi/2 for x > 0, which sympy does not simplify)."""
    monkeypatch.setattr(verify, "_RNG", _Points(3.8, 1.5, 1.6, 1.7))
    assert verify._compare_normalized("x^{600}(\\arctan x + \\arctan \\frac{1}{x})", "\\frac{\\pi}{2} x^{600}", False) is True


def test_equations_and_relations_need_one_finite_sample_point_to_be_proportional(monkeypatch):
    """`x^{600} = 1` is `2x^{600} = 2`, told from the only point where both are finite."""
    monkeypatch.setattr(verify, "_RNG", _Points(1.5, 3.8))
    assert verify._compare_normalized("x^{600} = 1", "2x^{600} = 2", False) is True
    monkeypatch.setattr(verify, "_RNG", _Points(1.5, 3.8))
    assert verify._compare_normalized("x^{600} < 1", "2x^{600} < 2", False) is True      # a positive factor


def test_each_of_three_sample_points_must_agree(monkeypatch):
    """`|x - 2|` and `x - 2` agree at 2.5 and 3 but not at 1.5: not equal."""
    monkeypatch.setattr(verify, "_RNG", _Points(2.5, 3.0, 1.5))
    assert verify._compare_normalized("|x-2|", "x-2", False) is False


def test_three_sample_points_between_1_1_and_3_9_decide_an_equality(monkeypatch):
    """Each variable is drawn from [1.1, 3.9] (positive, away from 0 and 1); three agreeing points decide."""
    draws = []

    class Recording(_Points):
        def uniform(self, low, high):
            draws.append((low, high))
            return super().uniform(low, high)
    monkeypatch.setattr(verify, "_RNG", Recording(1.5, 2.5, 3.5))
    assert verify._compare_normalized("(x+1)^2", "x^2+2x+1", False) is True
    assert draws == [(1.1, 3.9)] * 3


# ---------------------------------------------------------------------------
# Windows and small rules of extraction and normalisation: how far back a clause starts, when a bold
# is a heading, what follows an answer colon, which letters an integer parameter may be
def test_a_clause_start_is_looked_for_at_most_300_characters_back():
    """A separator 300 characters before a value starts its clause; one 301 back is out of reach, and
    then the check reads from the start of the text (here a checking `Since`)."""
    head = "Since it is odd, "                              # its comma at index 15
    far = head + "x" * (15 + 301 - len(head)) + "5"         # the value 301 characters after the comma
    near = head + "x" * (15 + 300 - len(head)) + "5"        # 300 after it
    assert far[15 + 301] == "5" and near[15 + 300] == "5"
    assert verify._justifies(far, 15 + 301)
    assert not verify._justifies(near, 15 + 300)


def test_a_bold_followed_by_a_colon_within_two_spaces_is_a_heading():
    """`**Step 2**  :` is a heading (up to two spaces before the colon); with three the bold is a value."""
    assert verify._last_bold("Then **Step 2**  : add them") is None
    assert verify._last_bold("Then **Step 2**   : add them") == "2"


def test_an_integer_parameter_named_e_or_i_is_left_alone():
    """e and i name Euler's number and the imaginary unit, never the integer parameter to rename."""
    for s in (r"x = e^{2} + e, e \in \mathbb{Z}", r"x = 2i\pi, i \in \mathbb{Z}"):
        assert verify._general_solution(s) == s


def test_the_parameter_is_never_a_letter_inside_a_word():
    """Neither a capital nor a small letter on either side: `\\text{Ln}`, `\\text{nA}`, `\\text{nm}` stay whole."""
    assert verify._general_solution(r"x = \text{Ln}\,2 + 2n\pi, n \in \mathbb{Z}") == r"x = \text{Ln}\,2 + 2k\pi"
    assert verify._general_solution(r"I = 2n\,\text{nA}, n \in \mathbb{Z}") == r"I = 2k\,\text{nA}"
    assert verify._general_solution(r"d = 500n\,\text{nm}, n \in \mathbb{Z}") == r"d = 500k\,\text{nm}"


def test_a_bold_value_right_after_an_answer_colon():
    """`Answer:**5**`: the stars right after the colon are bold, not part of the answer."""
    assert verify.extract_answer("Answer:**5**") == "5"
    assert verify.extract_answer("The final answer is:*12*") == "12"


# ---------------------------------------------------------------------------
# Sample points that cannot be evaluated, a relation's positive factor, a percent past the float range,
# text commands beside a formula or a mixed number, a p.m. on a 24-hour hour
def test_a_sample_point_where_an_answer_cannot_be_evaluated_is_skipped(monkeypatch):
    """max(sqrt(x - 2), 1) has no value at x = 1.5 (sympy cannot order a non-real number): that point is
    skipped and the next three decide; sympy cannot simplify the difference to 0 itself."""
    monkeypatch.setattr(verify, "_RNG", _Points(1.5, 2.5, 3.0, 3.5))
    assert verify._compare_normalized("\\max(\\sqrt{x-2}, 1)^2", "\\max(x-2, 1)", False) is True


def test_at_most_six_sample_points_are_drawn_then_sympy_decides(monkeypatch):
    """When none of six points can be evaluated, no seventh is drawn: sympy's simplify decides."""
    draws = []

    class Recording(_Points):
        def uniform(self, low, high):
            draws.append((low, high))
            return super().uniform(low, high)
    monkeypatch.setattr(verify, "_RNG", Recording(1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 2.5))
    assert verify._compare_normalized("\\max(\\sqrt{x-2}, 1)^2", "\\max(x-2, 1) + 1", False) is False
    assert draws == [(1.1, 3.9)] * 6


def test_an_inequality_times_i_is_not_the_same_inequality():
    """Two inequalities agree only up to a positive factor; i is not positive (complex numbers have no order)."""
    assert verify.is_equiv("ix + iy - i < 0", "x + y - 1 < 0") is False
    assert verify.is_equiv("2x + 2y - 2 < 0", "x + y - 1 < 0") is True


def test_a_percent_reading_is_tried_when_the_plain_value_is_past_the_float_range():
    """10^{309} pi is past the float range, but as a percent it is 10^{307} pi, which is within it."""
    assert verify.is_equiv("10^{309}\\pi\\%", "10^{307}\\pi") is True


def test_a_formula_with_text_commands_beside_its_letters_is_math_not_prose():
    """A `\\text{}` argument is read as a gap, never as words: `mx\\text{ where } m\\text{ is the slope}` is math."""
    text = "so $y = mx\\text{ where } m\\text{ is the slope}$"
    assert verify._math_spans(text) == [(3, len(text), "y = mx\\text{ where } m\\text{ is the slope}")]


def test_a_mixed_number_with_a_text_space_between_its_parts():
    """`2\\text{ } 3/4` is the mixed number 2 3/4: the spaces the unwrapped text command leaves collapse."""
    assert verify._normalize("2\\text{ } 3/4") == ("\\frac{11}{4}", False)
    assert verify.is_equiv("2\\text{ } 3/4", "\\frac{11}{4}") is True


def test_a_24_hour_time_with_a_redundant_pm_is_that_time():
    """`13:30 p.m.` (a 24-hour hour with p.m.) is 13:30, i.e. 1:30 p.m., never 12:30 p.m."""
    assert verify.is_equiv("13:30 p.m.", "1:30 p.m.") is True
    assert verify.is_equiv("13:30 p.m.", "13:30") is True
    assert verify.is_equiv("13:30 p.m.", "12:30 p.m.") is False
