"""
verify.py -- a safe, time-bounded, sympy-based answer verifier for RL with verifiable rewards.

    from verify import reward, rewards, extract_answer, is_equiv
    reward("... so the answer is \\boxed{\\frac{1}{2}}", "0.5")        # -> 1.0
    rewards(completions, golds)                                         # batch form, uses every core

Standalone: needs only sympy and the standard library, so any trainer can import it.

Extraction order (extract_answer), first rule that finds something wins:
  1. the last \\boxed{...} or \\fbox{...} (brace-balanced, nested braces; `\\boxed 5` without braces),
  2. the last phrase "final answer is" / "the answer is" / "answer:" -- the rest of that line,
  3. the last $...$, \\(...\\) or \\[...\\] math span,
  4. the last number in the text.

Conventions of is_equiv(pred, gold):
  - Numbers compare exactly when both are rational (0.5 == 1/2, 1/2^99 != 1/2^98, 5 != 5.001);
    otherwise with a relative tolerance of 1e-8. A decimal with at least 3 significant digits also
    matches an irrational value it rounds (0.577 == sqrt(3)/3, 3.14 == pi); never 5 == 500.
  - Thousands separators `7,425,000`, `1\\,000`, `14{,}916`; scientific `1.5e3`, `1.5\\times10^3`;
    mixed numbers `918\\frac12` == 918.5 (an integer written right before an integer \\frac).
  - Percent: `10\\%` equals both `10` and `0.1` (graders disagree; we accept both readings).
  - Units: `\\text{...}`, `\\mbox{...}` and trailing words after a number are dropped (`10\\text{ cm}` == 10),
    `^\\circ` is dropped (degrees), `\\$` is dropped, a trailing `\\` or `.` is dropped.
  - `x = 3` equals `3` when the left side is a single variable; two equations are equal when
    (lhs - rhs) of one is a nonzero constant multiple of the other (`2x+2y=2` == `x+y=1`).
  - Lists and tuples are ORDERED (`10, 4, -2` != `4, 10, -2`); sets `\\{...\\}` and the pieces of a
    union `A \\cup B` are unordered; intervals compare bracket kinds and end points.
  - Algebraic expressions are compared by evaluating pred - gold at random points where every
    variable is a positive real (so sqrt(x^2) == x); `i` is the imaginary unit, `e` is Euler's number,
    single capitals A-E alone are multiple-choice letters (`(C)` == `\\text{C}` == `C`).
  - Matrices (pmatrix, bmatrix, ...) compare element by element.
  - Words (three letters or more, outside LaTeX commands) compare as case-folded text.

Safety: nothing from a completion reaches eval/exec. Strings are turned into sympy objects by a
small recursive-descent parser in this file (no sympify, no parse_expr, no lambdify). All sympy work
runs in a pool of worker processes; a call that passes its time bound (default 1 s) kills its worker
and scores 0.0, so the bound holds from any thread. Nothing here raises on any input.
"""

import math
import multiprocessing
import os
import random
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction

DEFAULT_TIMEOUT = 1.0      # seconds per comparison, hard bound
MAX_ANSWER_CHARS = 1000    # longer answers are compared as plain strings, never parsed
MAX_POWER_BITS = 20_000    # refuse to build integers larger than this (power towers)

# ---------------------------------------------------------------------------
# Extraction


def _match_brace(text, open_pos):
    """Index of the brace closing text[open_pos] == '{', or -1 if unbalanced."""
    depth = 0
    for i in range(open_pos, len(text)):
        c = text[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
    return -1


def _last_boxed(text):
    pos = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if pos < 0:
        return None
    i = pos + (6 if text.startswith("\\boxed", pos) else 5)
    while i < len(text) and text[i] == " ":
        i += 1
    if i < len(text) and text[i] == "{":
        end = _match_brace(text, i)
        return text[i + 1:end] if end > 0 else None
    m = re.match(r"[^\s$]+", text[i:i + 200])  # `\boxed 5`
    return m.group(0) if m and i > pos + 5 else None


_PHRASES = ("final answer is", "the answer is", "answer:")
_NUMBER_RE = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?|-?\.\d+")


def _after_phrase(text):
    lower = text.lower()
    best = max(((lower.rfind(p), p) for p in _PHRASES), key=lambda t: t[0])
    if best[0] < 0:
        return None
    rest = text[best[0] + len(best[1]):best[0] + len(best[1]) + 300].split("\n")[0]
    math_span = _last_math(rest)
    answer = math_span if math_span is not None else rest
    answer = answer.strip().lstrip(":").strip().rstrip(".").strip()
    return answer or None


def _last_math(text):
    candidates = []
    for opener, closer in (("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        end = text.rfind(closer)
        if end < 0:
            continue
        start = text.rfind(opener, 0, end)
        if start < 0:
            continue
        inner = text[start + len(opener):end].strip()
        if inner:
            candidates.append((end, inner))
    return max(candidates)[1] if candidates else None


def extract_answer(completion):
    """The final answer of a completion, or None. Order: boxed, phrase, math span, last number."""
    try:
        if not isinstance(completion, str) or not completion:
            return None
        for rule in (_last_boxed, _after_phrase, _last_math):
            answer = rule(completion)
            if answer is not None and answer.strip():
                return answer.strip()
        numbers = _NUMBER_RE.findall(completion)
        return numbers[-1] if numbers else None
    except Exception:  # hostile input must never raise
        return None


def reference_answer(gold):
    """The answer inside a reference: bare, `$`-delimited, or the last \\boxed{} of a solution."""
    if not isinstance(gold, str):
        gold = str(gold)
    if "\\boxed" in gold or "\\fbox" in gold:
        boxed = _last_boxed(gold)
        if boxed is not None:
            return boxed.strip()
    gold = gold.strip()
    for opener, closer in (("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if gold.startswith(opener) and gold.endswith(closer) and len(gold) > len(opener) + len(closer):
            return gold[len(opener):-len(closer)].strip()
    return gold


# ---------------------------------------------------------------------------
# Normalisation (pure string work, linear time, runs in the calling process)

_REMOVE = ["\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\quad", "\\qquad", "\\displaystyle",
           "\\bigl", "\\bigr", "\\Bigl", "\\Bigr", "\\big", "\\Big", "{,}", "\\$", "$", "~"]
_TEXT_CMD_RE = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mathit|mbox|operatorname)\s*\{([^{}]*)\}")
_DEGREE_RE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ|\\degree|°")
_THOUSANDS_RE = re.compile(r"(?<![\d.])\d{1,3}(?:,\d{3})+(?![\d,])|(?<![\d.])\d{1,3}(?:\\ \d{3})+(?!\d)")
_UNIT_TAIL_RE = re.compile(r"^(.*?\d)\s*(?:\\text\{[^{}]*\}|\\mbox\{[^{}]*\}|(?:\s+[a-zA-Z]{2,}\.?)+)\s*$")


def _normalize(s):
    """Canonical text of an answer string and whether it carried a percent sign."""
    s = "".join(c for c in s if c.isprintable() or c == " ")[:MAX_ANSWER_CHARS * 4].strip()
    s = reference_answer(s) if s.startswith(("$", "\\(", "\\[")) else s
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\cfrac", "\\frac")
    s = s.replace("\\\\frac", "\\frac")
    for token in _REMOVE:
        s = s.replace(token, "")
    s = _DEGREE_RE.sub("", s)
    if "\\approx" in s:  # `a \approx 0.58` means a; a bare `\approx 8.24` means 8.24
        before, after = s.split("\\approx", 1)
        s = before if before.strip() else after
    percent = "%" in s
    s = s.replace("\\%", "").replace("%", "")
    s = _UNIT_TAIL_RE.sub(r"\1", s)
    for _ in range(3):  # \text{\textbf{A}} unwraps in a few rounds
        s = _TEXT_CMD_RE.sub(r"\1", s)
    s = _THOUSANDS_RE.sub(lambda m: m.group(0).replace(",", "").replace("\\ ", ""), s)
    s = re.sub(r"(?<!\\)\\ ", " ", s).strip()  # `\ ` is a space, `\\` (matrix row) stays
    while s.endswith(("\\", ".")) and len(s) > 1:
        s = s[:-1].rstrip()
    s = re.sub(r"\s+", " ", s)
    choice = re.fullmatch(r"\(?([A-E])\)?", s.replace(" ", ""))
    if choice:
        s = choice.group(1)
    return s, percent


_FAST_NUMBER_RE = re.compile(r"-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d{1,4})?")
_FAST_FRAC_RE = re.compile(r"(-?)\\frac\{(\d+)\}\{(\d+)\}|(-?)(\d+)/(\d+)|(-?)\\frac(\d)(\d)")


def _fast_number(s):
    """Fraction for plain numbers and integer fractions, else None (no sympy needed)."""
    t = s.replace(" ", "")
    if len(t) > 40:
        return None
    if _FAST_NUMBER_RE.fullmatch(t):
        return Fraction(t)
    m = _FAST_FRAC_RE.fullmatch(t)
    if m:
        g = [x for x in m.groups() if x is not None]
        if int(g[2]) == 0:
            return None
        value = Fraction(int(g[1]), int(g[2]))
        return -value if g[0] == "-" else value
    return None


def _decimal_places(s):
    t = s.replace(" ", "")
    if re.fullmatch(r"-?\d*\.\d+", t):
        digits = t.lstrip("-").replace(".", "").lstrip("0")
        return len(t.split(".")[1]), len(digits)
    return None


# ---------------------------------------------------------------------------
# Parser: LaTeX-ish math -> sympy objects, without eval (runs inside a worker process)

_TOKEN_RE = re.compile(r"\s*(\d+\.\d*|\.\d+|\d+|\\[a-zA-Z]+|\\[{}|]|[a-zA-Z]|[-+*/^_()\[\]{}=,!|&'<>])")
_FUNCTIONS = {"sin", "cos", "tan", "sec", "csc", "cot", "arcsin", "arccos", "arctan", "sinh", "cosh",
              "tanh", "ln", "log", "exp"}
_IGNORED_COMMANDS = {"\\limits", "\\nolimits", "\\mathrm", "\\mathbf", "\\rm", "\\bf", "\\boldsymbol"}


class _ParseError(Exception):
    pass


def _tokenize(s):
    tokens, pos = [], 0
    s = s.strip()
    while pos < len(s):
        m = _TOKEN_RE.match(s, pos)
        if not m:
            raise _ParseError(f"unexpected character {s[pos]!r}")
        tokens.append(m.group(1))
        pos = m.end()
        while pos < len(s) and s[pos].isspace():
            pos += 1
    return [t for t in tokens if t not in _IGNORED_COMMANDS]


def _parse_expression(s):
    """sympy expression for one scalar answer; raises _ParseError when it is not math."""
    import sympy
    tokens = _tokenize(s)
    pos = [0]

    def peek(k=0):
        return tokens[pos[0] + k] if pos[0] + k < len(tokens) else None

    def take(expected=None):
        tok = peek()
        if tok is None or (expected is not None and tok != expected):
            raise _ParseError(f"expected {expected!r}, got {tok!r}")
        pos[0] += 1
        return tok

    def checked_pow(base, exponent):
        if base.is_number and exponent.is_number and exponent.is_Integer and base.is_Rational:
            b = max(abs(base.p), abs(base.q))
            if b > 1 and abs(int(exponent)) * math.log2(b) > MAX_POWER_BITS:
                raise _ParseError("power too large")
        if base.is_number and exponent.is_number and abs(complex(exponent.evalf(15))) > 1e6 \
                and not base.is_Integer:
            raise _ParseError("power too large")
        return sympy.Pow(base, exponent)

    def argument():
        """A LaTeX argument: {group}, or a single character (`\\frac12`, `\\sqrt3`)."""
        tok = peek()
        if tok == "{":
            take()
            value = expression()
            take("}")
            return value
        if tok is not None and tok[0].isdigit() and len(tok) > 1:
            tokens[pos[0]] = tok[1:]  # `\frac12`: the argument is the first digit only
            return sympy.Integer(int(tok[0]))
        return atom()

    def atom():
        tok = take()
        if tok[0].isdigit() or tok[0] == ".":
            return sympy.Rational(tok) if "." in tok else sympy.Integer(int(tok))
        if tok in ("(", "[", "{", "\\{"):
            closer = {"(": ")", "[": "]", "{": "}", "\\{": "\\}"}[tok]
            value = expression()
            take(closer)
            return value
        if tok in ("|", "\\|"):
            value = expression()
            take(tok)
            return sympy.Abs(value)
        if tok.isalpha() and len(tok) == 1:
            name = tok
            if peek() == "_":
                take()
                sub = take()
                if sub == "{":
                    sub = "".join(iter(take, "}"))
                name = f"{tok}_{sub}"
            if name == "i":
                return sympy.I
            if name == "e":
                return sympy.E
            return sympy.Symbol(name, positive=True)
        if tok == "\\frac" or tok == "\\over":
            numerator = argument()
            denominator = argument()
            return numerator / denominator
        if tok == "\\sqrt":
            index = None
            if peek() == "[":
                take()
                index = expression()
                take("]")
            radicand = argument()
            return sympy.sqrt(radicand) if index is None else sympy.root(radicand, index)
        if tok == "\\pi":
            return sympy.pi
        if tok == "\\infty":
            return sympy.oo
        if tok == "\\binom":
            n, k = argument(), argument()
            if n.is_number and abs(complex(n.evalf(15))) > 10_000:
                raise _ParseError("binomial too large")
            return sympy.binomial(n, k)
        if tok[1:] in _FUNCTIONS:
            base = None
            if tok == "\\log" and peek() == "_":
                take()
                base = argument()
            power = None
            if peek() == "^":
                take()
                power = argument()
            arg = argument() if peek() in ("{", "(") else power_term()
            fn = {"ln": sympy.log, "log": sympy.log, "exp": sympy.exp}.get(tok[1:]) or getattr(sympy, tok[1:])
            value = fn(arg) if base is None else sympy.log(arg, base)
            return value if power is None else checked_pow(value, power)
        raise _ParseError(f"unknown token {tok!r}")

    def postfix():
        value = atom()
        while peek() in ("!", "'"):
            if take() == "'":
                raise _ParseError("prime")
            if not (value.is_Integer and 0 <= value <= 1000):
                raise _ParseError("factorial out of range")
            value = sympy.factorial(value)
        return value

    def power_term():
        base = postfix()
        if peek() == "^":
            take()
            sign = -1 if peek() == "-" and take() else 1
            exponent = argument() if peek() == "{" else power_term()
            return checked_pow(base, sign * exponent)
        return base

    def unary():
        if peek() in ("-", "+"):
            sign = -1 if take() == "-" else 1
            return sign * unary()
        return power_term()

    starts_atom = lambda tok: tok is not None and (
        tok[0].isdigit() or tok[0] == "." or (tok.isalpha() and len(tok) == 1) or tok in ("(", "\\{")
        or (tok.startswith("\\") and (tok[1:] in _FUNCTIONS or tok in ("\\frac", "\\sqrt", "\\pi", "\\infty", "\\binom"))))

    def term():
        start, first_tok = pos[0], peek()
        value = unary()
        single_integer = first_tok is not None and first_tok.isdigit() and pos[0] == start + 1
        while True:
            tok = peek()
            if tok in ("*", "\\cdot", "\\times"):
                take()
                value = value * unary()
            elif tok in ("/", "\\div"):
                take()
                value = value / unary()
            elif tok == "\\frac" and single_integer:
                fraction = unary()  # mixed number: 918\frac{1}{2} == 918 + 1/2
                value = value + fraction if fraction.is_Rational and value >= 0 else value * fraction
            elif starts_atom(tok):
                value = value * power_term()  # implicit product: 2x, (x-1)(x+1), 2\pi
            else:
                return value
            single_integer = False

    def expression():
        value = term()
        while peek() in ("+", "-", "\\pm"):
            tok = take()
            if tok == "\\pm":
                raise _ParseError("plus-minus")
            value = value + term() if tok == "+" else value - term()
        return value

    result = expression()
    if pos[0] != len(tokens):
        raise _ParseError(f"trailing {tokens[pos[0]]!r}")
    if not isinstance(result, sympy.Basic):
        result = sympy.sympify(int(result)) if isinstance(result, int) else result
    return result


# ---------------------------------------------------------------------------
# Structure: lists, sets, intervals, unions, equations, matrices


def _split_top_level(s, separator):
    """Split on a separator that is not inside (), [], {}."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(s):
        c = s[i]
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0 and s.startswith(separator, i):
            parts.append(s[start:i])
            start = i + len(separator)
            i = start
            continue
        i += 1
    parts.append(s[start:])
    return [p.strip() for p in parts]


def _structure(s):
    """A comparable description of an answer: ('kind', payload)."""
    s = s.strip()
    matrix = re.fullmatch(r"\\begin\{([pbvB]?matrix|array)\}(?:\{[^{}]*\})?(.*)\\end\{\1\}", s, re.S)
    if matrix:
        rows = [r for r in matrix.group(2).split("\\\\") if r.strip()]
        return ("matrix", [[_structure(cell) for cell in row.split("&")] for row in rows])
    if "\\cup" in s:
        return ("union", [_structure(p) for p in _split_top_level(s, "\\cup")])
    if s.startswith("\\{") and s.endswith("\\}"):
        return ("set", [_structure(p) for p in _split_top_level(s[2:-2], ",")])
    s = re.sub(r"\s*(?:\\text\{\s*(?:or|and)\s*\}|\bor\b|\band\b)\s*", ",", s)
    parts = _split_top_level(s, ",")
    if len(parts) > 1:
        return ("list", [_structure(p) for p in parts])
    if len(s) >= 2 and s[0] in "([" and s[-1] in ")]" and _split_top_level(s[1:-1], ",")[1:]:
        return ("interval" + s[0] + s[-1], [_structure(p) for p in _split_top_level(s[1:-1], ",")])
    if "=" in s and s.count("=") == 1:
        lhs, rhs = s.split("=")
        if re.fullmatch(r"\s*[a-zA-Z](?:_\{?\w+\}?)?(?:\([a-zA-Z]\))?\s*", lhs):
            return _structure(rhs)  # `x = 3` is the value 3
        return ("equation", (_scalar(lhs), _scalar(rhs)))
    return _scalar(s)


def _scalar(s):
    s = s.strip()
    if re.fullmatch(r"[A-E]", s):
        return ("choice", s)
    words = re.sub(r"\\[a-zA-Z]+", " ", s)
    if re.search(r"[a-zA-Z]{3,}", words) or not s:
        return ("text", re.sub(r"[\s{}]+", " ", s).strip().lower())
    try:
        return ("expr", _parse_expression(s), s)
    except (_ParseError, RecursionError, ValueError, TypeError, ZeroDivisionError, AttributeError):
        return ("text", re.sub(r"\s+", " ", s).strip().lower())


# ---------------------------------------------------------------------------
# Comparison (inside the worker)

_RNG = random.Random(1234)
_REL_TOL = 1e-8


def _close(a, b):
    return abs(a - b) <= _REL_TOL * max(1.0, abs(a), abs(b))


def _numbers_equal(a, b, a_text, b_text, percent):
    candidates = [b] + ([b / 100, b * 100] if percent else [])
    for target in candidates:
        if a.is_Rational and target.is_Rational:
            if a == target:
                return True
            continue
        if a == target:
            return True
        try:
            x, y = complex(a.evalf(30)), complex(target.evalf(30))
        except (TypeError, ValueError, OverflowError):
            continue
        if not all(map(math.isfinite, (x.real, x.imag, y.real, y.imag))):
            if a == target:
                return True
            continue
        if _close(x, y):
            return True
        for text, value, other in ((a_text, x, y), (b_text, y, x)):  # 0.577 == sqrt(3)/3
            places = _decimal_places(text)
            if places and places[1] >= 3 and other.imag == 0 and round(other.real, places[0]) == value.real:
                return True
    return False


def _expressions_equal(a, b, a_text, b_text, percent=False, proportional=False):
    import sympy
    symbols = sorted(a.free_symbols | b.free_symbols, key=str)
    if not symbols:
        if proportional:
            return a == b
        return _numbers_equal(a, b, a_text, b_text, percent)
    if a == b:
        return True
    ratios, checked = [], 0
    for _ in range(6):
        point = {s: sympy.Float(_RNG.uniform(1.1, 3.9), 30) for s in symbols}
        try:
            x = complex(a.evalf(30, subs=point))
            y = complex(b.evalf(30, subs=point))
        except (TypeError, ValueError, OverflowError, ZeroDivisionError):
            continue
        if not all(map(math.isfinite, (x.real, x.imag, y.real, y.imag))):
            continue
        checked += 1
        if proportional:
            if abs(y) < 1e-12:
                return False
            ratios.append(x / y)
        elif not _close(x, y):
            return False
        if checked >= 3:
            break
    if checked == 0:
        return sympy.simplify(a - b) == 0
    if proportional:
        return all(_close(r, ratios[0]) for r in ratios) and abs(ratios[0]) > 1e-12
    return True


def _structures_equal(p, g, percent):
    kind_p, kind_g = p[0], g[0]
    if kind_p == "text" or kind_g == "text" or kind_p == "choice" or kind_g == "choice":
        return kind_p == kind_g and p[1] == g[1]
    if kind_p == "expr" and kind_g == "expr":
        return _expressions_equal(p[1], g[1], p[2], g[2], percent)
    if kind_p != kind_g:
        return False
    if kind_p == "equation":
        (pl, pr), (gl, gr) = p[1], g[1]
        if "text" in (pl[0], pr[0], gl[0], gr[0]):
            return pl == gl and pr == gr
        return _expressions_equal(pl[1] - pr[1], gl[1] - gr[1], "", "", proportional=True)
    if kind_p == "matrix":
        return len(p[1]) == len(g[1]) and all(
            len(rp) == len(rg) and all(_structures_equal(a, b, False) for a, b in zip(rp, rg))
            for rp, rg in zip(p[1], g[1]))
    if len(p[1]) != len(g[1]):
        return False
    if kind_p in ("set", "union"):  # unordered: greedy matching
        remaining = list(g[1])
        for item in p[1]:
            match = next((k for k, other in enumerate(remaining) if _structures_equal(item, other, percent)), None)
            if match is None:
                return False
            remaining.pop(match)
        return True
    return all(_structures_equal(a, b, percent) for a, b in zip(p[1], g[1]))


def _compare_normalized(pred, gold, percent):
    """Full comparison of two normalised strings (sympy; runs in a worker)."""
    if len(pred) > MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS:
        return False
    try:
        return bool(_structures_equal(_structure(pred), _structure(gold), percent))
    except Exception:  # RecursionError, sympy internals: any failure is "not equal"
        return False


# ---------------------------------------------------------------------------
# Worker processes: the hard time bound


def _serve(conn):
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        conn.send(_compare_normalized(*job))


_idle_workers = []
_workers_lock = threading.Lock()


def _start_worker():
    # fork, not spawn or forkserver: the child starts in milliseconds with sympy already imported and
    # never re-runs the caller's main script. It only runs pure Python and sympy (no torch, no CUDA),
    # which is what makes forking a multi-threaded trainer safe, as torch's own DataLoader does.
    import sympy  # noqa: F401  (imported once here, inherited by every worker)
    context = multiprocessing.get_context("fork")
    parent_end, child_end = context.Pipe()
    process = context.Process(target=_serve, args=(child_end,), daemon=True)
    process.start()
    child_end.close()
    return process, parent_end


def _run_in_worker(job, timeout):
    with _workers_lock:
        worker = _idle_workers.pop() if _idle_workers else None
    if worker is None:
        worker = _start_worker()
    process, conn = worker
    try:
        conn.send(job)
        if conn.poll(timeout):
            result = conn.recv()
            with _workers_lock:
                if len(_idle_workers) < max(2, os.cpu_count() or 2):
                    _idle_workers.append(worker)
                    worker = None
            return result
        return False  # too slow: the worker is killed below
    except (EOFError, OSError, BrokenPipeError):
        return False
    finally:
        if worker is not None:
            process.kill()
            process.join(timeout=1)
            conn.close()


def warmup(workers=None):
    """Start the worker pool now (the first start takes about a second: sympy import)."""
    workers = workers or max(2, os.cpu_count() or 2)
    started = [_start_worker() for _ in range(workers)]
    with _workers_lock:
        _idle_workers.extend(started)


# ---------------------------------------------------------------------------
# Public API


def is_equiv(pred, gold, timeout=DEFAULT_TIMEOUT):
    """True when two answer strings are mathematically equivalent (conventions: module docstring)."""
    try:
        if not isinstance(pred, str) or not isinstance(gold, str):
            return False
        (p, p_percent), (g, g_percent) = _normalize(pred), _normalize(gold)
        if not p or not g:
            return False
        if p.replace(" ", "") == g.replace(" ", ""):
            return True
        percent = p_percent != g_percent
        fp, fg = _fast_number(p), _fast_number(g)
        if fp is not None and fg is not None:
            if fp == fg or (percent and (fp == fg / 100 or fp == fg * 100)):
                return True
            return False
        return bool(_run_in_worker((p, g, percent), timeout))
    except Exception:
        return False


def reward(completion, gold, timeout=DEFAULT_TIMEOUT):
    """1.0 when the completion's extracted answer is equivalent to the reference answer, else 0.0."""
    try:
        pred = extract_answer(completion)
        if pred is None:
            return 0.0
        return 1.0 if is_equiv(pred, reference_answer(gold), timeout) else 0.0
    except Exception:
        return 0.0


def rewards(completions, golds, timeout=DEFAULT_TIMEOUT, workers=None):
    """reward() for a batch, spread over one worker process per core."""
    if len(completions) != len(golds):
        raise ValueError(f"rewards: {len(completions)} completions but {len(golds)} reference answers")
    workers = workers or max(2, os.cpu_count() or 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda pair: reward(pair[0], pair[1], timeout), zip(completions, golds)))
