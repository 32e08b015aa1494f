"""
verify.py -- a safe, time-bounded, sympy-based answer verifier for RL with verifiable rewards.

    from verify import reward, rewards, extract_answer, is_equiv
    reward("... so the answer is \\boxed{\\frac{1}{2}}", "0.5")        # -> 1.0
    rewards(completions, golds)                                         # batch form, uses every core
    grade(completion, gold)     # -> Verdict(reward, answer, status): correct / wrong / no_answer / unfinished
    rewards(completions, golds, truncated=[...])     # True: cut at the token limit, scores 0

Standalone: needs only sympy and the standard library, so any trainer can import it.

Extraction (extract_answer). The completion is first cut at the first end-of-turn chat token
(`<|im_end|>`, `<|eot_id|>`, `</s>`, ...: a model that goes on writes a made-up next turn) and at a
made-up next few-shot question (`\n\nQuestion:`), reasoning inside `<think>...</think>` is skipped
(also `<thinking>`, `<|begin_of_thought|>`, `◁think▷`, gpt-oss's analysis channel), markdown bold is
unwrapped. Reasoning that never ends has no answer: a `<think>` never closed, or closed with nothing
after it, extracts None and scores 0, as does any completion the caller marks truncated (it hit the
token limit): an answer written mid-thought (`so it is 41 ... wait`) must never earn the reward.
Then the first rule that finds something wins:
  1. the last \\boxed{...} / \\fbox{...} (brace-balanced; `\\boxed 5` without braces). A wrong last
     box is wrong even when an earlier box was right. Only when the reference lists k answers
     (`2, 3`) and the last k boxes hold one answer each are they read together (`\\boxed{2} and
     \\boxed{3}`), in reward().
  2. a GSM8K answer line `#### 72`;
  3. the last answer phrase: `final answer is`, `the answer is`, `answer:` (also `**Answer:**`),
     `the correct option is`, and in other languages (答案/所以/因此/故/综上, Réponse, Antwort, Respuesta,
     Resposta, Ответ, 答え, 정답, ...). From the text after it: math right after the phrase (with
     `$2$ and $3$` read as both), else the text up to the end of the sentence, `I hope it is
     correct` (Minerva), `because`, `since`, `;`; when that is a sentence around a number (`Natalia
     sold 48 + 24 = 72 clips`), its last number. A phrase followed by prose and no number (`Answer:
     Let's think step by step`) or by `not` is skipped.
  4. a last line `A: 72`;
  5. the whole completion when it is short (<= 100 characters, one line) and is itself an answer:
     math with no prose (`\\frac{10}{9}`, `[2,5)`, `(x-2)(x+2)`, `$x=3$`) or one or two words
     (`east`). Longer text is never taken whole, but its last line is when that line is a short
     formula with no prose and no `$` (`\\frac{10}{9}` after the reasoning; a leading `=` dropped).
  6. a bold value in the last sentence that holds a number (`takes **27 minutes**, less than 30`),
     never a bold heading (`**Step 2:**`);
  7. the last math span ($...$, $$...$$, \\(...\\), \\[...\\]), number or formula written in running
     text (`7/3 * π`, `2√3`, `\\sqrt[3]{16}/2`, `2 3/4`, `2/5`), whichever ends later, skipping any
     inside a clause that denies (`36 is not divisible by 5`: not, no, never, cannot, wrong, ...),
     only compares (`3 fewer than the bus`) or only checks or explains (`Since $7 > 5$, ...`, `Let
     me double check: ...`), unless nothing else is left.
     Math spans joined by `and`/`or`/`,` are read together (`$x = 2$ and $x = 3$`). A `$` whose span
     would hold prose, run up to a digit (`$5 and $6`) or never close is a dollar sign, not math
     (`48+18=$66`); a number right after `^` or `_` (`cm^2`) is not a candidate.

Conventions of is_equiv(pred, gold) (where graders disagree, the choice and why):
  - Numbers compare exactly when both are rational (0.5 == 1/2, 1/2^99 != 1/2^98, 5 != 5.001);
    otherwise with a relative tolerance of 1e-8. A decimal with at least 3 significant digits also
    matches a value it rounds to the digits shown: an irrational one (0.577 == sqrt(3)/3, 3.14 ==
    pi) or a rational one with no exact decimal (0.3333 == 0.333 == 1/3, 2.6667 == 8/3). Never with
    fewer digits (`\\pi^2` != 9.9, `e` != 2.7, 2/3 != 0.67: two digits prove too little), never a
    rounding off by more than half a unit (`\\sqrt2` != 1.42), and never against a rational that HAS
    an exact decimal (1.13 != 9/8 = 1.125: a model that means 9/8 can write it exactly).
  - Scientific notation is an exact decimal: `1.07e16` == `1.07 \\times 10^{16}` (never a binary
    float, which would make it 10700000000000000 +- 2); `10^4`, `1.5\\cdot10^3` likewise.
  - Separators: `7,425,000`, `1\\,000`, `14{,}916`, `11,\\! 111`, `10 000` (groups of exactly three
    digits, first group not starting with 0). A comma that cannot be a thousands separator is a
    decimal comma when compared with a plain number: `1,22` == 1.22, `0,111` == 0.111 (a group of
    two digits, or a leading 0); `1,222` stays 1222. Against a list `1, 22` it stays a list.
  - Repeating decimals `0.1\\overline{6}` == 1/6. Ratios `3:2` == 3/2 against a number; times `2:30`
    compare as clock times, `14:30` == `2:30 p.m.`, and `2:30` == `2:30 p.m.` (a bare time is read
    on a 12-hour clock, as questions that ask "what time" mean); `2:30 PM` != `2:30 AM`.
  - Bases: `10110_2` == `22_{10}` (values); a bare `10110` against `10110_2` is read in the
    reference's base (models often drop the subscript the question asked for).
  - Mixed numbers `918\\frac12` == 918.5 (an integer written right before an integer \\frac).
  - Percent: `10\\%` equals both `10` and `0.1` (graders disagree; we accept both readings).
  - Units: `\\text{...}`, `\\textnormal`, `\\mbox`, `\\mathrm` and trailing words after a number are
    dropped (`10\\text{ cm}^2` == 10, `150 meters`, `5 m/s`), `^\\circ` is dropped (degrees) except
    inside a trig function, where it converts (`\\sin 30^\\circ` == 1/2), `\\$` is dropped, a
    trailing `\\` or `.` is dropped. Degrees are not radians (`45^\\circ` != `\\pi/4`).
  - Labels: `x = 3`, `f(2) = 7`, `AB = 5`, `(p,q) = (3,2)` equal their value. Several labelled
    values compare by label in any order when both sides are labelled (`a_3 = 2, a_{37} = 19`),
    else by value in order (`k = 45 \\text{ and } n = 2` == `45, 2`). An equality chain is its last
    side (`48 + 18 = 66`, `x = 2 + 3 = 5`); `\\equiv` is `=` and a trailing `\\pmod{n}` is
    dropped. Two equations are equal when (lhs - rhs) of one is a nonzero constant multiple of the
    other, and `y = 2x+3` is also the line `2x - y + 3 = 0`.
  - Relations: `\\geq`, `\\ge`, `>=`, `≥`, `\\lt`, `\\gt`, `\\neq`, `!=`; a linear relation in one
    variable is the interval it describes (`x \\geq 5` == `[5, \\infty)` == `5 \\le x`, `-x > -1`
    == `x < 1`, `-2 \\le x \\le 7` == `x \\in [-2,7]`, `x < -1 \\text{ or } x > 2` == the union);
    `\\{x \\mid x > 2\\}` is the relation. `a \\approx 3.46` compares `a` unless `a` is a single
    variable; a bare `\\approx 3.46` compares 3.46.
  - Lists and tuples are ORDERED (`10, 4, -2` != `4, 10, -2`: the hendrycks MATH convention, and
    MATH lists ordered answers), and a bare list equals a tuple (`1,2,3` == `(1, 2, 3)`). Sets
    `\\{...\\}` (with `,` or `;`), `{1, 2}`, answers joined by `or`, `\\pm` (`\\pm 2021` ==
    `\\{-2021, 2021\\}`) and the pieces of a union are unordered, and a set on either side makes the
    comparison unordered. Intervals compare bracket kinds and end points. A one-column or one-row
    matrix equals the tuple of its entries.
  - Algebraic expressions are compared by evaluating pred - gold at random points where every
    variable is a positive real (so sqrt(x^2) == x); `i` is the imaginary unit, `e` is Euler's
    number, `\\log` is base 10 (as in contest problems; `\\ln` is natural), `\\sin 2x` is sin(2x),
    `2**3` is a power; single capitals A-E alone are multiple-choice letters (`(C)` == `\\text{C}`
    == `C`); `A. because ...`, `(B) 12`, `B: 12` are the letter against a letter reference and the
    value after it otherwise.
  - Matrices (pmatrix, bmatrix, vmatrix, array inside \\left[ \\right], ...) compare element by
    element (a vmatrix answer is read as its entries, as models write it for a matrix).
  - Words (three letters or more, outside LaTeX commands) compare as case-folded text.
  - Multiple select: option letters as a set, however joined (`A, C` == `AC` == `C、A` == `\\text{A}
    and \\text{C}`); a letter with its value or a remark in brackets (`B (12)`, `\\text{B}(12)`) is
    the letter against a letter, the value otherwise. Against a one-letter reference, reward() also
    takes the one letter a completion chooses in prose when its answer is not a letter: named in
    the sentence of its box (`option C: \\boxed{12}`) or cued near its end (`it cannot be A or C,
    so B`, `排除 A 和 C，故选 B`); rejected letters (not, wrong, out, 不, 排除, ...) never count.
  - Several parts: `且`, `和`, `与`, `或` join like `and`/`or`; `a = 2 \\quad b = 3` is two answers;
    values joined by `and` are solutions in any order (`-2, 3` == `3 \\text{ and } -2`), labelled
    values still compare by label. An integer parameter's declaration (`, k \\in \\mathbb{Z}`, `(n
    \\in \\mathbb Z)`, `where k is an integer`) is dropped and the parameter renamed k.
  - An equation whose right side is a number, `y^2 = 49`, equals that number when the REFERENCE
    is a number (one way only: an equation reference is never matched by a bare number).
  - Prose forms: `π`, `√3`, `²`, full-width `（），：`, `7/3 times π`; mixed numbers `2 3/4` == 11/4;
    clock times with seconds (`2:30:00` == `2:30`, `2:30:15` != `2:30`); a number glued to a unit
    abbreviation (`12kg`, `45mph`; never a single letter: `12x` stays algebra); unit words in any
    script and currency after or before the number (`12 元`, `15 千克`, `20 dólares`, `3,50 €`).

Safety: nothing from a completion reaches eval/exec. Strings are turned into sympy objects by a
small recursive-descent parser in this file (no sympify, no parse_expr, no lambdify). All sympy work
runs in a pool of worker processes; a call that passes its time bound (default 1 s) kills its worker
and scores 0.0, so the bound holds from any thread. Nothing here raises on any input.

Audit: audit(verdicts) gives the shares of responses with no final answer and with a wrong one (is
the format failing, or the math?); given the completions and references, and with math-verify
installed (optional), it also grades a sample of them with math-verify, in the same worker processes
under the same kind of hard time bound, and returns the agreement rate and the disagreeing cases.
"""

import math
import os
import random
import re
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from typing import NamedTuple, Optional

DEFAULT_TIMEOUT = 1.0      # seconds per comparison, hard bound
MAX_ANSWER_CHARS = 1000    # longer answers are compared as plain strings, never parsed
MAX_POWER_BITS = 20_000    # refuse to build integers larger than this (power towers)

# ---------------------------------------------------------------------------
# Extraction

MAX_COMPLETION_CHARS = 100_000   # only the tail of a longer completion is searched for its answer
MAX_BOXES = 20                   # only the last boxes of a completion are read
SHORT_ANSWER_CHARS = 100         # a one-line completion this short, with no prose, is taken whole


def _match_brace(text, open_pos, limit=MAX_ANSWER_CHARS * 4):
    """Index of the brace closing text[open_pos] == '{', or -1 if unbalanced within limit chars."""
    depth = 0
    for i in range(open_pos, min(len(text), open_pos + limit)):
        c = text[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
    return -1


_BOXED_RE = re.compile(r"\\(?:boxed|fbox)")


def _boxes(text):
    """Every \\boxed{...} / \\fbox{...} in order, as (start, end, content); `\\boxed 5` too."""
    found = []
    starts = list(_BOXED_RE.finditer(text))[-MAX_BOXES:]  # bounded work on hostile text
    for m in starts:
        i = m.end()
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            end = _match_brace(text, i)
            if end > 0 and text[i + 1:end].strip():
                found.append((m.start(), end + 1, text[i + 1:end].strip()))
        elif i > m.end():
            word = re.match(r"[^\s$]+", text[i:i + 200])
            if word:
                found.append((m.start(), i + word.end(), word.group(0)))
    return found


def _last_boxed(text):
    boxes = _boxes(text)
    return boxes[-1][2] if boxes else None


# Chat-template tokens: the answer ends at the first end-of-turn token (models often go on to write
# a made-up next turn after it); `<think>...</think>` reasoning is skipped when text follows it.
_END_OF_TURN_RE = re.compile(r"<\|(?:im_end|endoftext|eot_id|eom_id|end|end_of_text|im_start|user|assistant)\|>"
                             r"|</s>|<end_of_turn>|<eos>|<\|end▁of▁sentence\|>|<｜end▁of▁sentence｜>")
_CHAT_TOKEN_RE = re.compile(r"<\|[A-Za-z_▁]{1,30}\|>|<｜[^｜>]{1,30}｜>|</?(?:s|bos|start_of_turn)>")


# Reasoning that the model opens and must close before it answers: `<think>...</think>` (DeepSeek-R1,
# Qwen3, ...), `<thinking>`, `<|begin_of_thought|>` (Sky-T1, OpenThoughts), `◁think▷` (Kimi), and
# gpt-oss's analysis channel, closed by its final channel.
_THINKING = [("<think>", "</think>"), ("<thinking>", "</thinking>"), ("<reasoning>", "</reasoning>"),
             ("<|begin_of_thought|>", "<|end_of_thought|>"), ("◁think▷", "◁/think▷"),
             ("<|channel|>analysis", "<|channel|>final")]


def _final_part(text):
    """The text after the model's reasoning, or None when its reasoning never ended: an opened
    `<think>` never closed (nor re-closed after a later `<think>`). A trace cut inside its thinking has
    no final answer, whatever numbers the thinking holds. A model that stops right after closing its
    reasoning wrote its answer only inside it: then the whole text is read."""
    start = 0
    for opener, closer in _THINKING:
        opened, closed = text.rfind(opener), text.rfind(closer)
        if opened > closed:
            return None  # still thinking: `... so it is 41 ... wait, no`
        if closed >= 0:
            start = max(start, closed + len(closer))
    return text[start:] if start == 0 or text[start:].strip() else text


def _strip_turn(text):
    """The completion's final text up to the end of its turn (bold kept), or None when unfinished."""
    final = text.rfind("<|channel|>final")  # gpt-oss: its analysis channel ends with an end-of-turn token
    if final >= 0:
        text = text[final:]
    end = _END_OF_TURN_RE.search(text)
    if end and text[:end.start()].strip():
        text = text[:end.start()]
    text = _final_part(text)
    if text is None:
        return None
    question = _NEXT_QUESTION_RE.search(text)  # a base model writing the next few-shot question
    if question and re.search(r"\d", text[:question.start()]):
        text = text[:question.start()]
    return _CHAT_TOKEN_RE.sub(" ", text[-MAX_COMPLETION_CHARS:])


_BOLD_RE = re.compile(r"(?<![\w*])\*\*(?=\S)([^*\n]{1,200}?)(?<=\S)\*\*(?![\w*])")
# Markdown emphasis around a value (`*42*`, `**42**`, `***42***`): stars that open a word or close one,
# never those between two characters (`2**10` is a power, `2 * 3` a product)
_EMPHASIS_RE = re.compile(r"(?:(?<=\s)|^)\*+(?=\S)|(?<=\S)\*+(?=[\s.,;:!?)]|$)")
# A word in a script without Latin letters (Chinese, Cyrillic, Arabic, ...): prose, never a formula.
# Greek stays out: θ and π are math.
_NON_LATIN_WORD_RE = re.compile(r"[^\W\d_a-zA-Z\u00c0-\u024f\u0370-\u03ff]{2,}")
_MATH_OPEN_RE = re.compile(r"\$\$|(?<!\\)\$|\\\[|\\\(")
_PROSE_RE = re.compile(r"(?<![\\a-zA-Z])[a-zA-Z]{3,}[,.]?\s+[a-zA-Z]{2,}\s+[a-zA-Z]{2,}")
_TEXT_ARG_RE = re.compile(r"\\(?:text\w*|mbox|mathrm|operatorname)\s*\{[^{}]*\}")


def _math_spans(text):
    """(start, end, inner) of each $...$, $$...$$, \\(...\\), \\[...\\] in order. A `$` whose
    would-be span is prose, runs to a digit (`$5 and $6`) or never closes is a dollar sign."""
    spans, i, next_closer = [], 0, {}
    while True:
        m = _MATH_OPEN_RE.search(text, i)
        if not m:
            return spans
        opener = m.group(0)
        closer = {"$$": "$$", "$": "$", "\\[": "\\]", "\\(": "\\)"}[opener]
        j = next_closer.get(closer, 0)
        if j >= 0 and j < m.end():  # remembered, so that unclosed openers cost linear time in all
            j = next_closer[closer] = text.find(closer, m.end())
        while opener == "$" and j > 0 and text[j - 1] == "\\":  # `\$` inside math is a dollar
            j = text.find(closer, j + 1)
        if j < 0:
            i = m.end()
            continue
        inner = text[m.end():j]
        if opener == "$" and (not inner.strip() or "\n\n" in inner or text[j + 1:j + 2].isdigit()
                              or _PROSE_RE.search(_TEXT_ARG_RE.sub(" ", inner))):
            i = m.end()  # a currency sign, not math
            continue
        if inner.strip():
            spans.append((m.start(), j + len(closer), inner.strip()))
        i = j + len(closer)


def _last_math(text):
    spans = _math_spans(text)
    return spans[-1][2] if spans else None


# Answer phrases, English first, then other languages models answer in. The last one wins.
_PHRASE_RE = re.compile(
    r"final\s+answer\**\s*(?:is|[:：])|the\s+answer\s+is|\banswer\**\s*(?:is)?\s*[:：]|\bans\s*[:：]"
    r"|the\s+(?:final\s+)?result\s+is|the\s+solution\s+is|(?:correct|right|best)\s+(?:answer|option|choice)\s+is"
    r"|the\s+(?:option|choice)\s+is"
    r"|答案\s*(?:是|为|為|[:：])|最终答案|所以|因此|综上(?:所述)?|(?<![事缘变典何])故(?![事意障乡])"
    r"|答え\s*(?:は|[:：])|정답\s*(?:은|[:：])|답\s*[:：]"
    r"|r[ée]ponse\s*(?:finale)?\s*(?:est|[:：])|antwort\s*(?:ist|lautet|[:：])|endergebnis\s*[:：]"
    r"|respuesta\s*(?:final)?\s*(?:es|[:：])|resposta\s*(?:final)?\s*(?:é|[:：])|risposta\s*(?:è|[:：])"
    r"|ответ\s*[:：]?|odpowied[źz]\s*[:：]|cevap\s*[:：]",
    re.IGNORECASE)
_GSM8K_RE = re.compile(r"####\s*([^\n]+)")
_LAST_LINE_A_RE = re.compile(r"^\s*\**A\**\s*[:：]\s*(.+?)\s*$")
_PHRASE_STOP_RE = re.compile(r"\bI hope it is correct|\.\s+(?=[A-Z])|\.\s*$|,?\s+(?:because|since|as|which|so that|where)\b"
                             r"|[;；。]|\s+\((?:[a-z]{3,}\s)", re.IGNORECASE)
_NUMBER_RE = re.compile(r"(?<![\^_a-zA-Z\d.])(?:-?\d+(?:,\d{3})*(?:\.\d+)?|-?\.\d+)(?:\\?%)?")  # not `cm^2`
_DENIAL_RE = re.compile(r"\bnot\b|n't\b|\bnever\b|\bno\b|\bcannot\b|\bneither\b|\bnor\b|\\neq\b|≠|\bwrong\b|\bincorrect\b",
                        re.IGNORECASE)
_JUSTIFY_RE = re.compile(r"\s*(?:since|because|as|check|checking|verify|verifying|verification|note|indeed|"
                         r"let me|let's (?:check|verify|double)|double[- ]check|to (?:check|verify))\b", re.IGNORECASE)
_NEXT_QUESTION_RE = re.compile(r"\n[ \t]*(?:Question|Q|Problem|Human|User|Instruction)\s*\d*\s*[:：]")
_COMPARISON_RE = re.compile(r"\bthan\b|\bcompared\b", re.IGNORECASE)
# A formula written in running text, outside `$`: `7/3 * π`, `2√3`, `\sqrt[3]{16}/2`, `2 3/4`, `48 + 24 = 72`.
_BRACED = r"\{(?:[^{}\n]|\{[^{}\n]*\})*\}"
_FORMULA_ATOM = (r"(?:\d+ \d+/\d+(?![\d/])|\d{1,3}(?:,\d{3})+(?![\d,])|\d+(?:\.\d+)?|π|√\s*\(?\d+(?:\.\d+)?\)?"
                 r"|\\(?:pi|sqrt|frac|dfrac|tfrac)(?![a-zA-Z])(?:\[\d+\])?(?:" + _BRACED + r")*)(?:\^\{?-?\d+\}?|[²³])?")
_FORMULA_OP = r"(?:\s*(?:[+*/×·÷=]|\\cdot|\\times|\\div)\s*|\s+[-−]\s+|\s+times\s+)"
_FORMULA_RE = re.compile(r"(?<![\w.^_/\\])-?(?:" + _FORMULA_ATOM + r")+(?:" + _FORMULA_OP + r"(?:" + _FORMULA_ATOM + r")+)*")
_CLAUSE_RE = re.compile(r"[.!?。](?:\s|$)|[\n,;，；]|\b(?:so|hence|thus|therefore|but)\b|所以|因此|故(?![事意障乡])",
                        re.IGNORECASE)


def _answer_in_segment(segment):
    """The answer inside the text right after an answer phrase."""
    segment = _EMPHASIS_RE.sub("", segment).strip()
    segment = re.sub(r"^(?:is|es|est|ist|[:：=])\s*", "", segment).strip()
    if re.match(r"not\b", segment, re.IGNORECASE):
        return None  # `the answer is not 5; ...`: look further
    spans = _math_spans(segment)
    if spans and spans[0][0] < 60:  # math right after the phrase: `the answer is $2$ and $3$.`
        k = 0
        while k + 1 < len(spans) and re.fullmatch(r"\s*(,|,?\s*and|,?\s*or)\s*", segment[spans[k][1]:spans[k + 1][0]]):
            k += 1
        return _joined_spans(segment, spans, k)
    stop = _PHRASE_STOP_RE.search(segment)
    if stop and stop.start() > 0:
        segment = segment[:stop.start()]
    segment = segment.strip().rstrip(".").strip()
    if spans:
        return spans[-1][2]
    words = _TEXT_ARG_RE.sub(" ", segment)
    first_digit = re.search(r"\d", words)
    if first_digit and re.search(r"[a-zA-Z]{3,}\s|[^\x00-\x7f]", words[:first_digit.start()]):
        # a sentence around the value: `Natalia sold 48 + 24 = 72 clips` -> the last number
        numbers = _NUMBER_RE.findall(segment)
        return numbers[-1] if numbers else segment
    if not first_digit and len(words.split()) > 4:
        return None  # prose, not an answer (`Answer: Let's think step by step.`): look further
    return segment or None


def _after_phrase(text):
    match = None
    for match in _PHRASE_RE.finditer(text):
        pass
    if match is None:
        return None
    rest = text[match.end():match.end() + 400].lstrip(" \t\r\n*:：")
    rest = rest.split("\n")[0] if rest.strip() else ""
    return _answer_in_segment(rest) if rest.strip() else None


def _sentence_denies(text, pos, pattern=_DENIAL_RE):
    """True when the clause around text[pos] says `not`, `no`, `never`, ... (`12 is not divisible
    by 5`); a clause ends at . , ; ! ? a new line, or `so`, `hence`, `thus`, `therefore`, `but`."""
    window = max(0, pos - 300)
    start = window
    for start_match in _CLAUSE_RE.finditer(text, window, pos):
        start = start_match.end()
    end_match = _CLAUSE_RE.search(text, pos, pos + 300)
    end = end_match.start() if end_match else min(len(text), pos + 300)
    return bool(pattern.search(text, start, end))


def _set_aside(text, pos):
    """A value in a clause that denies, checks or only compares (`3 fewer than the bus`) is not the answer."""
    return _sentence_denies(text, pos) or _justifies(text, pos) or _sentence_denies(text, pos, _COMPARISON_RE)


def _is_prose_free(text):
    words = re.findall(r"(?<![\\a-zA-Z])[a-zA-Z]{3,}", _TEXT_ARG_RE.sub(" ", text))
    return all(w.lower() in ("and", "or", "und", "et", "y") for w in words) and not _NON_LATIN_WORD_RE.search(text)


def _whole_answer(text):
    """A short one-line completion that is itself an answer: `\\frac{10}{9}`, `[2,5)`, `east`."""
    t = text.strip()
    if not t or len(t) > SHORT_ANSWER_CHARS or "\n" in t:
        return None
    spans = _math_spans(t)
    if len(spans) == 1 and spans[0][0] == 0 and spans[0][1] >= len(t.rstrip(". ")):
        return spans[0][2]
    t = t.rstrip(".").strip()
    if "$" in t or "\\(" in t or "\\[" in t:
        return None
    if _is_prose_free(t) and re.search(r"[\w\\]", t):
        return t
    if not re.search(r"\d", t) and len(t.split()) <= 2 and re.fullmatch(r"[\w\s\-'{}\\]+", t):
        return t  # a word answer
    return None


def _last_line_math(text):
    """The last line of a long completion when it is a short formula with no prose (`\\frac{10}{9}`)."""
    lines = text.rstrip().rsplit("\n", 1)
    if len(lines[-1]) > 2 * SHORT_ANSWER_CHARS:
        return None
    line = re.sub(r"^\s*(?:=|\\Rightarrow|\\implies|\\therefore|→)\s*", "", lines[-1]).strip().rstrip(".").strip()
    if len(lines) < 2 or not line or len(line) > SHORT_ANSWER_CHARS or "$" in line or "\\(" in line:
        return None
    return line if _is_prose_free(line) and re.search(r"[\d\\]", line) else None


def _justifies(text, pos):
    """True inside a clause that checks or explains rather than concludes: `Since $7 > 5$, ...`,
    `Let me double check: 17 = 2*7 + 3` (but not the main clause of `As x > 0, $y = 2$`)."""
    start = max(text.rfind(c, max(0, pos - 300), pos) for c in ".!?\n,;")
    return bool(_JUSTIFY_RE.match(text, start + 1, pos))


def _joined_spans(text, spans, k):
    """spans[k] with the spans before it that only `,`, `and` or `or` separate from it, so that
    `$x = 2$ and $x = 3$` gives both roots."""
    inner, joiner = [spans[k][2]], None
    while k > 0:
        between = text[spans[k - 1][1]:spans[k][0]]
        m = re.fullmatch(r"\s*(,|,?\s*and|,?\s*or)\s*", between)
        left, right = spans[k - 1][2].split("=")[0].strip(), spans[k][2].split("=")[0].strip()
        unknowns = re.fullmatch(r"[a-zA-Z]", left) and re.fullmatch(r"[a-zA-Z]", right)
        if not m or ("=" in spans[k - 1][2]) != ("=" in spans[k][2]) or ("=" in spans[k][2] and left != right
                                                                         and not (unknowns and "and" in between)):
            break  # values, values of one unknown (`$x = 2$ or $x = 3$`), of two (`$x = 2$ and $y = 3$`), never steps
        joiner = joiner or (" \\text{ or } " if m.group(1).endswith("or") else ", ")
        inner.insert(0, spans[k - 1][2])
        k -= 1
    return inner[0] if len(inner) == 1 else joiner.join(inner)


def _text_values(text):
    """Numbers and formulas written in running text, last first; at equal ends the formula."""
    found = [(m.end(), m.end() - m.start(), m.start(), m.group(0)) for m in _NUMBER_RE.finditer(text)]
    found += [(m.end(), m.end() - m.start(), m.start(), m.group(0).strip()) for m in _FORMULA_RE.finditer(text)
              if not _NUMBER_RE.fullmatch(m.group(0).strip())]
    return [(start, value) for _, _, start, value in sorted(found, reverse=True)]


def _last_value(text):
    """The last math span, number or formula not in a denying, checking or comparing clause,
    whichever ends later."""
    text = text[-20_000:]  # the answer is near the end; bounded work on hostile text
    best, spans = None, _math_spans(text)[-50:]
    for k in range(len(spans) - 1, -1, -1):
        if not _set_aside(text, spans[k][0]):
            best = (spans[k][1], _joined_spans(text, spans, k))
            break
    for k, (start, value) in enumerate(_text_values(text)):
        if (best is not None and start < best[0]) or k >= 50:
            break
        if not _set_aside(text, start):
            return value
    if best is None and spans and not _sentence_denies(text, spans[-1][0]):
        return spans[-1][2]  # everything sits in checking clauses: the last math still beats nothing
    return best[1] if best else None


def _last_bold(text):
    """A bold value in the last sentence that holds a number (`... takes **27 minutes**, which is
    less than the 30 we allowed`): the model marked it as its answer. Never a heading (`**Step 2:**`)."""
    text = text[-20_000:]
    last_digit = max(text.rfind(d) for d in "0123456789")
    if last_digit < 0:
        return None
    sentence = max(text.rfind(c, 0, last_digit) for c in (". ", "! ", "? ", "。", "\n"))
    answer = None
    for m in _BOLD_RE.finditer(text, sentence + 1):
        if re.search(r"\d", m.group(1)) and not re.match(r"\s*[:：]", text[m.end():m.end() + 3]) \
                and not m.group(1).rstrip().endswith((":", "：")):
            answer = _answer_in_segment(m.group(1))
    return answer


def extract_answer(completion):
    """The final answer of a completion, or None. Order: boxed, `####`, answer phrase, a last line
    `A: ...`, the whole completion when it is a short answer, a bold value in the last sentence,
    then the last math span, number or formula. None when the reasoning never ended."""
    try:
        if not isinstance(completion, str) or not completion:
            return None
        return _extract(_strip_turn(completion))
    except Exception:  # hostile input must never raise
        return None


def _extract(with_bold):
    """extract_answer() on the completion's final text (from _strip_turn; None: unfinished)."""
    try:
        if with_bold is None:
            return None  # the reasoning never ended: no final answer
        text = _BOLD_RE.sub(r"\1", with_bold)
        boxed = _last_boxed(text)
        if boxed:
            return boxed
        gsm8k = None
        for gsm8k in _GSM8K_RE.finditer(text):
            pass
        if gsm8k:
            return _answer_in_segment(gsm8k.group(1)[:400]) or gsm8k.group(1)[:400].strip()
        for rule in (_after_phrase, _last_line_a, _whole_answer, _last_line_math, lambda _: _last_bold(with_bold),
                     _last_value):
            answer = rule(text)
            if answer is not None and answer.strip():
                return answer.strip()
        return None
    except Exception:  # hostile input must never raise
        return None


_LETTER_MENTION_RE = re.compile(r"(?<![A-Za-z\\{])\(?([A-E])\)?(?![A-Za-z'’}])")
_CHOICE_CUE_RE = re.compile(r"\b(?:so|thus|hence|therefore|answer|option|choice|choose|select|pick|correct|right"
                            r"|must be|remaining)\b|选|故|所以|答案|正确|因此", re.IGNORECASE)
_CHOICE_DENIAL_RE = re.compile(_DENIAL_RE.pattern + r"|\bout\b|\beliminat\w*|\brule[sd]?\s+out|\bcontradict\w*"
                               r"|\bfalse\b|\bfails?\b|不|错|排除|否", re.IGNORECASE)


def _chosen_letter(text):
    """The one option letter a completion chooses in prose, for a multiple-choice reference: in the
    sentence of its last box (`the answer is option C: \\boxed{12}`), else near its end (`it cannot
    be A or C, so B`; `A、C 都不对，所以选 B`). A letter counts when a cue (so, answer, option, 选, 故,
    ...) comes shortly before it, or it stands in brackets, and its clause does not reject it.
    None unless exactly one letter is chosen."""
    text = text[-2000:]
    boxes = _boxes(text)
    if boxes:
        begin = max(text.rfind(c, 0, boxes[-1][0]) for c in (". ", "! ", "? ", "。", "\n")) + 1
        ends = [i for i in (text.find(c, boxes[-1][1]) for c in (". ", "! ", "? ", "。", "\n")) if i >= 0]
        begin, end = begin, min(ends + [len(text)])
    else:
        begin, end = max(0, len(text) - 300), len(text)
    chosen = set()
    for m in _LETTER_MENTION_RE.finditer(text, begin, end):
        if m.group(1) == "A" and re.match(r"\s+[a-z]+", text[m.end():]) and not re.match(
                r"\s+(?:and|or|nor|is|are|was|were|cannot|can|must|gives?|seems?)\b", text[m.end():]):
            continue  # the article `A`, not the option
        sentence = max(text.rfind(c, 0, m.start()) for c in (". ", "! ", "? ", "。", "\n")) + 1
        cued = m.group(0).startswith("(") or _CHOICE_CUE_RE.search(text, max(sentence, m.start() - 40), m.start())
        if cued and not _sentence_denies(text, m.start(), _CHOICE_DENIAL_RE) and not _justifies(text, m.start()):
            chosen.add(m.group(1))
    return chosen.pop() if len(chosen) == 1 else None


def _last_line_a(text):
    lines = [line for line in text.strip().split("\n") if line.strip()]
    m = _LAST_LINE_A_RE.match(lines[-1]) if lines and len(lines[-1]) <= 400 else None
    return _answer_in_segment(m.group(1)) if m else None


def reference_answer(gold):
    """The answer inside a reference: bare, `$`-delimited, or the last \\boxed{} of a solution."""
    if not isinstance(gold, str):
        gold = str(gold)
    if "\\boxed" in gold or "\\fbox" in gold:
        boxed = _last_boxed(gold)
        if boxed is not None:
            return boxed.strip()
    gold = gold.strip()
    for opener, closer in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if gold.startswith(opener) and gold.endswith(closer) and len(gold) > len(opener) + len(closer):
            return gold[len(opener):-len(closer)].strip()
    return gold


# ---------------------------------------------------------------------------
# Normalisation (pure string work, linear time, runs in the calling process)

_REMOVE = ["\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\quad", "\\qquad", "\\displaystyle",
           "\\bigl", "\\bigr", "\\Bigl", "\\Bigr", "\\big", "\\Big", "{,}", "\\$", "$", "~", "\\limits"]
_BARE_FUNCTION_RE = re.compile(r"(?<![\\a-zA-Z])(sqrt|sin|cos|tan|cot|sec|csc|log|ln|exp|pi|arcsin|arccos|arctan)(?![a-zA-Z])")
_RELATIONS = [(re.compile(r"\\(?:geqslant|geq|ge)(?![a-zA-Z])|≥|=>"), ">="),
              (re.compile(r"\\(?:leqslant|leq|le)(?![a-zA-Z])|≤|=<"), "<="),
              (re.compile(r"\\(?:neq|ne)(?![a-zA-Z])|\\not\s*=|≠"), "!="),
              (re.compile(r"\\gt(?![a-zA-Z])"), ">"), (re.compile(r"\\lt(?![a-zA-Z])"), "<")]
_TEXT_CMD_RE = re.compile(r"\\(?:text|textbf|textit|textrm|textnormal|textup|textsf|texttt|mathrm|mathbf|mathit|"
                          r"mathsf|mathtt|mbox|hbox|operatorname|emph|num)\s*\{([^{}]*)\}")
_DEGREE_RE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ|\\degree|°")
_THOUSANDS_RE = re.compile(r"(?<![\d.,])[1-9]\d{0,2}(?:,\d{3})+(?![\d,])|(?<![\d.])[1-9]\d{0,2}(?:\\? \d{3})+(?![\d.])")
_UNIT_WORD = (r"(?:\\(?:text\w*|mbox|mathrm)\s*\{[^{}]*\}|\s+(?![AaPp][Mm]\b)[^\W\d_]{2,}\.?|\s+[a-zA-Z]+/[a-zA-Z]+"
              r"|\s*[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]+|\s+m(?=\s*\^)|\s*[€£¥₹₩]"  # `12 元`, `3,50 €`
              r"|\s*(?:kg|mg|km|cm|mm|ml|mL|min|mins|hrs?|secs?|mph|kph|km/h|m/s|ft|yd|lbs?|oz|kcal|kW|kWh)(?![a-zA-Z]))"
              r"(?:\s*\^\s*\{?\d\}?)?")
_UNIT_TAIL_RE = re.compile(r"^(.*?\d)\s*(?:" + _UNIT_WORD + r")+\s*$")
_TEXT_TAIL_RE = re.compile(r"^(.+?[\d})])\s*\\(?:text\w*|mbox|mathrm)\s*\{\s*[a-zA-Z][^{}]*\}(?:\s*\^\s*\{?\d\}?)?\s*$")
_MOD_RE = re.compile(r"\\[pb]?mod ?\{? ?\w+ ?\}? ?\)? ?")
_MODULUS_RE = re.compile(r"\\[pb]?mod ?\{? ?(\w+)")
_EMPTY_SET_RE = re.compile(r"\\varnothing|\\\{\s*\\\}|∅")
_TRIG_DEGREES_RE = re.compile(r"(\\(?:sin|cos|tan|sec|csc|cot))\s*(\(?)\s*(\d+(?:\.\d+)?)\s*\^\s*\{?\s*\\circ\s*\}?")
_REPEATING_RE = re.compile(r"(\d*)\.(\d*)\\(?:overline|bar|dot)\{(\d+)\}")
_SET_BUILDER_RE = re.compile(r"^\s*\\\{\s*[a-zA-Z]\s*(?:\\mid|\||:)\s*(.+?)\s*\\\}$")


def _repeating_to_fraction(m):
    whole, fixed, period = m.group(1) or "0", m.group(2), m.group(3)
    value = int(whole) + Fraction(int(fixed or "0"), 10 ** len(fixed)) \
        + Fraction(int(period), 10 ** len(fixed) * (10 ** len(period) - 1))
    return f"\\frac{{{value.numerator}}}{{{value.denominator}}}"


_SCIENTIFIC_RE = re.compile(r"(?<![a-zA-Z\\\d.])(\d+(?:\.\d+)?)[eE]([-+]?\d{1,4})(?![\d.])")


_FULL_WIDTH = str.maketrans({"（": "(", "）": ")", "：": ":", "；": ";", "，": ", ", "、": ", ", "＝": "=",
                             "²": "^2", "³": "^3", "π": "\\pi ", "∞": "\\infty ", "∈": "\\in ", "ℤ": "\\mathbb{Z}",
                             "÷": "\\div ", "⋅": "\\cdot ", "€": " €"})
_INTEGER_PARAMETER_RE = re.compile(  # `, k \in \mathbb{Z}`, `(n \in \mathbb Z)`, `where k is an integer`
    r"\(?(?:(?<!\\)\s)?(?:(?:\\text\{\s?)?(?:where|for|with)\b\s?\}?\s?)?(?<![a-zA-Z\\])([a-zA-Z])\s?"
    r"(?:\\in\s?(?:\\mathbb|\\Bbb|\\mathbf)?\s?\{?\s?Z\s?\}?|(?:\\text\{\s?)?(?:is\s)?(?:an?\s|any\s)?integers?\s?\}?)"
    r"\s?\)?\s?\.?\s?$")
_GLUED_UNIT_RE = re.compile(r"(-?\d[\d,]*(?:\.\d+)?)(?:kg|mg|km|cm|mm|ml|mL|min|hrs?|secs?|mph|kph|ft|lbs?|oz)"
                            r"(?:\^\{?[23]\}?)?")
_MIXED_NUMBER_RE = re.compile(r"(-?)(\d+) (\d+)/(\d+)")


def _general_solution(s):
    """`x = \\frac{\\pi}{4} + n\\pi, n \\in \\mathbb{Z}` is `x = \\frac{\\pi}{4} + k\\pi`: the declaration of
    the integer parameter is dropped and the parameter renamed k, so that both sides name it alike."""
    m = _INTEGER_PARAMETER_RE.search(s) if "Z" in s or "integer" in s else None
    if not m or m.group(1) in "ie":
        return s
    rest = s[:m.start()]
    while True:  # the separators before the declaration (a loop: a regex would be quadratic here)
        stripped = rest
        for separator in ("\\ ", "\\,", "\\;", "\\:", "\\!", "\\quad", "\\qquad"):
            stripped = stripped[:-len(separator)] if stripped.endswith(separator) else stripped
        stripped = stripped.rstrip(" ,;~")
        if stripped == rest:
            break
        rest = stripped
    if not rest.strip():
        return s
    return re.sub(r"(?<![a-zA-Z\\])" + m.group(1) + r"(?![a-zA-Z])", "k", rest)


def _normalize(s):
    """Canonical text of an answer string and whether it carried a percent sign."""
    s = "".join(c for c in s if c.isprintable() or c == " ")[:MAX_ANSWER_CHARS * 4].strip()
    s = re.sub(r"\s+", " ", s)  # single spaces: no pattern below can then backtrack over a long run
    s = reference_answer(s) if s.startswith(("$", "\\(", "\\[")) else s
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\cfrac", "\\frac")
    s = s.replace("\\\\frac", "\\frac")
    s = s.replace("**", "^")  # Python's power, as code-minded models write it
    s = s.translate(_FULL_WIDTH)  # full-width punctuation, π, ², √ as models write them in prose
    s = re.sub(r"√\s*(\d+(?:\.\d+)?|[a-zA-Z])", r"\\sqrt{\1}", s).replace("√", "\\sqrt")
    s = re.sub(r"(?<=[\w})])\s+times\s+(?=[-\d\\(])", r" \\cdot ", s)  # `7/3 times π`
    s = _general_solution(s)
    if s.count("=") >= 2:  # `a = 2 \quad b = 3`: the space separates two answers
        s = re.sub(r"\s*,?\s*\\q?quad\s*", ", ", s)
    s = _BARE_FUNCTION_RE.sub(r"\\\1", s)  # sqrt(2), pi, sin(x) written without a backslash
    s = re.sub(r"(\d),\s*\\!\s*(?=\d{3}(?!\d))", r"\1,", s)  # `11,\! 111`: a thousands separator
    for token in _REMOVE:
        s = s.replace(token, "")
    s = s.replace("\\langle", "(").replace("\\rangle", ")").replace("\\lbrace", "\\{").replace("\\rbrace", "\\}")
    s = s.replace("\\mathbb{R}", "(-\\infty,\\infty)").replace("−", "-").replace("×", "\\times")
    s = s.replace("·", "\\cdot").replace("≈", "\\approx")
    for pattern, replacement in _RELATIONS:
        s = pattern.sub(replacement, s)
    s = _EMPTY_SET_RE.sub(r"\\emptyset", s)
    mod = max(s.rfind("\\pmod"), s.rfind("\\bmod"), s.rfind("\\mod"))
    if mod >= 0 and _MOD_RE.fullmatch(s, mod) and len(set(_MODULUS_RE.findall(s))) == 1:
        # `x \equiv 3 \pmod{5}` is the residue 3; with two moduli (`n \equiv 1 \pmod{4} \text{ or } n \equiv 3
        # \pmod{8}`) the last is part of the answer
        s = s[:mod].rstrip().rstrip("(").rstrip()
    s = s.replace("\\equiv", "=")
    s = _REPEATING_RE.sub(_repeating_to_fraction, s)  # 0.1\overline{6} == 1/6
    s = _SET_BUILDER_RE.sub(r"\1", s)  # `\{x \mid x > 2\}` is the relation x > 2
    s = re.sub(r"\\(?:operatorname|text|mathrm)\{(lcm|gcd)\}", r"\\\1", s)
    s = _TRIG_DEGREES_RE.sub(r"\1\2{\3\\pi/180}", s)  # `\sin 30^\circ` is sin(pi/6)
    s = _DEGREE_RE.sub("", s)
    if "\\approx" in s:  # `a \approx 0.58` means a; a bare `\approx 8.24` means 8.24
        before, after = s.split("\\approx", 1)
        s = after if not before.strip() or re.fullmatch(r"\s*[a-zA-Z]\s*=?\s*", before) else before
    percent = "%" in s
    s = s.replace("\\%", "").replace("%", "")
    s = re.sub(r"\s+", " ", re.sub(r"(?<!\\)\\ ", " ", s))  # `\ ` is a space, `\\` (matrix row) stays
    s = _UNIT_TAIL_RE.sub(r"\1", s)
    s = _TEXT_TAIL_RE.sub(r"\1", s)
    for _ in range(3):  # \text{\textbf{A}} unwraps in a few rounds
        s = _TEXT_CMD_RE.sub(r"\1", s)
    s = _UNIT_TAIL_RE.sub(r"\1", s)  # `\textnormal{6 weeks}` unwrapped
    s = _THOUSANDS_RE.sub(lambda m: m.group(0).replace(",", "").replace("\\ ", "").replace(" ", ""), s)
    s = _SCIENTIFIC_RE.sub(r"\1\\times10^{\2}", s)  # 1.07e16: exact, never a binary float
    s = re.sub(r"(?<!\\)\\ ", " ", s).strip()  # `\ ` is a space, `\\` (matrix row) stays
    s = re.sub(r"^[a-zA-Z]\s*\\in\s*", "", s)  # `x \in [2, 5)` is the interval
    while s.endswith(("\\", ".")) and len(s) > 1:
        s = s[:-1].rstrip()
    s = re.sub(r"\s+", " ", s)
    glued = _GLUED_UNIT_RE.fullmatch(s)
    s = glued.group(1) if glued else s  # `12kg` is 12 kg, never 12 k g
    s = re.sub(r"^[€£¥₹₩]\s*(?=[-\d.])", "", s)  # `€15`
    mixed = _MIXED_NUMBER_RE.fullmatch(s)
    if mixed and int(mixed.group(3)) < int(mixed.group(4)):  # `2 3/4` is 11/4
        value = int(mixed.group(2)) + Fraction(int(mixed.group(3)), int(mixed.group(4)))
        s = f"{mixed.group(1)}\\frac{{{value.numerator}}}{{{value.denominator}}}"
    choice = re.fullmatch(r"\(?([A-E])\)?", s.replace(" ", ""))
    if choice:
        s = choice.group(1)
    return s, percent


_FAST_NUMBER_RE = re.compile(r"-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d{1,4})?")
_FAST_FRAC_RE = re.compile(r"(-?)\\frac\{(\d+)\}\{(\d+)\}|(-?)(\d+)/(\d+)|(-?)\\frac(\d)(\d)")
_FAST_SCIENTIFIC_RE = re.compile(r"(-?\d+(?:\.\d+)?)(?:\\times|\\cdot|\*)10\^\{?([-+]?\d{1,3})\}?")


def _fast_number(s):
    """Fraction for plain numbers, integer fractions and a \\times 10^k, else None (no sympy needed)."""
    t = s.replace(" ", "")
    if len(t) > 40:
        return None
    if _FAST_NUMBER_RE.fullmatch(t):
        return Fraction(t)
    m = _FAST_SCIENTIFIC_RE.fullmatch(t)
    if m:
        return Fraction(m.group(1)) * Fraction(10) ** int(m.group(2))
    m = _FAST_FRAC_RE.fullmatch(t)
    if m:
        g = [x for x in m.groups() if x is not None]
        if int(g[2]) == 0:
            return None
        value = Fraction(int(g[1]), int(g[2]))
        return -value if g[0] == "-" else value
    return None


def _decimal_places(s):
    """(digits after the point, significant digits) of a plain decimal, else None."""
    t = s.replace(" ", "")
    if re.fullmatch(r"-?\d*\.\d+", t):
        digits = t.lstrip("-").replace(".", "").lstrip("0")
        return len(t.split(".")[1]), len(digits)
    return None


def _rounds_rational(text, value, other):
    """True when the decimal `text` (== value) is `other` rounded to the digits shown, with at least
    3 significant digits, and `other` has no exact decimal of that length (0.3333 == 1/3, never
    1.13 == 1.125). value and other are Fractions."""
    places = _decimal_places(text)
    if not places or places[1] < 3 or other.denominator == 1:
        return False
    denominator = other.denominator
    for prime in (2, 5):
        while denominator % prime == 0:
            denominator //= prime
    if denominator == 1:
        return False  # `other` has an exact decimal (9/8 = 1.125), so a rounded one is a mistake
    return abs(value - other) * 2 * 10 ** places[0] <= 1


_BASE_RE = re.compile(r"\(?([0-9A-Za-z]+)\)?_\{?\(?(\d{1,2})\)?\}?")
_TIME_RE = re.compile(r"(\d{1,2}):(\d{2})(?::(\d{2}))?(?:\s*([ap])\.?\s*m\.?)?", re.IGNORECASE)
_CHOICE_PREFIX_RE = re.compile(r"\(?([A-E])\)?(?:[.:)]\s*|\s+)(.+)")
_CHOICE_REMARK_RE = re.compile(r"([A-E])\s*\((.+)\)")  # the letter with its value or a remark in brackets


def _letters(s):
    """The option letters an answer names, as a set (`A, C`, `A C`, `AC`, `A and C`), else None."""
    t = re.sub(r"\band\b|[,;\s()]", "", s)
    return frozenset(t) if re.fullmatch(r"[A-E]{1,5}", t) and len(set(t)) == len(t) else None
_DECIMAL_COMMA_RE = re.compile(r"(-?\d+),(\d+)")
_NUMBER_WORDS = {w: k for k, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty".split())}
_NUMBER_WORDS.update({w: 10 * k for k, w in enumerate("thirty forty fifty sixty seventy eighty ninety".split(), 3)})
_NUMBER_WORDS.update({"hundred": 100, "a hundred": 100, "one hundred": 100, "a thousand": 1000, "one thousand": 1000})
_RATIO_RE = re.compile(r"(\d+)\s*:\s*(\d+)")


def _special_forms(p, g):
    """Numbers in a base, clock times, choice letters with text, decimal commas. Returns True/False
    when the pair is decided here, else the (p, g) pair to compare, possibly rewritten."""
    for a, b in ((p, g), (g, p)):
        m = _BASE_RE.fullmatch(a)
        if m and 2 <= int(m.group(2)) <= 36:
            try:
                value = int(m.group(1), int(m.group(2)))
                n = _BASE_RE.fullmatch(b)
                if n and 2 <= int(n.group(2)) <= 36:
                    return value == int(n.group(1), int(n.group(2)))
                if re.fullmatch(r"[0-9A-Za-z]+", b):  # the same digits, the base left implicit
                    return value == int(b, int(m.group(2)))
            except ValueError:
                pass
    for a, b, swap in ((p, g, False), (g, p, True)):
        if a.lower() in _NUMBER_WORDS and _fast_number(b) is not None:
            a = str(_NUMBER_WORDS[a.lower()])  # `twelve` against 12
            p, g = (b, a) if swap else (a, b)
    tp, tg = _TIME_RE.fullmatch(p), _TIME_RE.fullmatch(g)
    if tp and tg:  # clock times; seconds left out are :00
        def seconds(m):
            hours = int(m.group(1)) % 12 + (12 if (m.group(4) or "").lower() == "p" else 0)
            return ((hours if m.group(4) else int(m.group(1))) * 60 + int(m.group(2))) * 60 + int(m.group(3) or 0)
        if tp.group(4) and tg.group(4):
            return seconds(tp) == seconds(tg)
        return seconds(tp) % 43200 == seconds(tg) % 43200
    letters_p, letters_g = _letters(p), _letters(g)
    if letters_p and letters_g:  # multiple select: `A, C` == `AC` == `C、A`
        return letters_p == letters_g
    for a, b, swap in ((p, g, False), (g, p, True)):
        m = _CHOICE_PREFIX_RE.fullmatch(a)
        remark = _CHOICE_REMARK_RE.fullmatch(a)
        if (m or remark) and len(b) > 0:
            if re.fullmatch(r"[A-E]", b):
                a = (m or remark).group(1)   # `A. because ...`, `B (12)` against the letter
            elif remark and not re.fullmatch(r"[A-E]", a):
                a = remark.group(2)  # `B (12)` against 12
            elif not re.fullmatch(r"[A-E]", a) and re.match(r"\(?[A-E](?:\)|[.:]\s)", a):
                a = m.group(2)   # `(B) 12` against 12
            p, g = (b, a) if swap else (a, b)
    for a, b, swap in ((p, g, False), (g, p, True)):
        m = _DECIMAL_COMMA_RE.fullmatch(a)
        if m and _fast_number(b) is not None and (m.group(1).lstrip("-") == "0" or len(m.group(2)) != 3):
            a = f"{m.group(1)}.{m.group(2)}"  # `1,22` and `0,111` cannot be thousands: decimal comma
            p, g = (b, a) if swap else (a, b)
    for a, b, swap in ((p, g, False), (g, p, True)):
        m = _RATIO_RE.fullmatch(a)
        if m and not _RATIO_RE.fullmatch(b) and not _TIME_RE.fullmatch(b) and _fast_number(b) is not None:
            a = f"{m.group(1)}/{m.group(2)}"  # the ratio 3:2 against a number is 3/2
            p, g = (b, a) if swap else (a, b)
    return p, g


# ---------------------------------------------------------------------------
# Parser: LaTeX-ish math -> sympy objects, without eval (runs inside a worker process)

_TOKEN_RE = re.compile(r"\s*(\d+\.\d*|\.\d+|\d+|\\[a-zA-Z]+|\\[{}|]|[a-zA-Z]|[-+*/^_()\[\]{}=,!|&'<>])")
_FUNCTIONS = {"sin", "cos", "tan", "sec", "csc", "cot", "arcsin", "arccos", "arctan", "sinh", "cosh", "tanh", "ln", "log", "exp"}
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
        if tok in ("\\lfloor", "\\lceil"):
            value = expression()
            take("\\rfloor" if tok == "\\lfloor" else "\\rceil")
            return sympy.floor(value) if tok == "\\lfloor" else sympy.ceiling(value)
        if tok in ("\\max", "\\min", "\\gcd", "\\lcm"):
            take("(")
            args = [expression()]
            while peek() == ",":
                take()
                args.append(expression())
            take(")")
            if tok in ("\\gcd", "\\lcm"):
                if not all(a.is_Integer for a in args):
                    raise _ParseError("gcd of non-integers")
                return (sympy.gcd if tok == "\\gcd" else sympy.lcm)(list(args))
            return (sympy.Max if tok == "\\max" else sympy.Min)(*args)
        if tok[1:] in _FUNCTIONS:
            base = None
            if tok == "\\log" and peek() == "_":
                take()
                base = argument()
            power = None
            if peek() == "^":
                take()
                power = argument()
            if peek() in ("{", "("):
                arg = argument()
            else:  # `\sin 2x` is sin(2x): the argument runs over a product of numbers and letters
                arg = power_term()
                while peek() is not None and (peek()[0].isdigit() or (peek().isalpha() and len(peek()) == 1)):
                    arg = arg * power_term()
            fn = {"ln": sympy.log, "log": lambda v: sympy.log(v, 10), "exp": sympy.exp, "arcsin": sympy.asin,
                  "arccos": sympy.acos, "arctan": sympy.atan}.get(tok[1:]) or getattr(sympy, tok[1:])
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


_LABEL = (r"(?:[a-zA-Z](?:_\{?\w+\}?)?'?(?:\^\{?-1\}?)?(?:\([^()=,]{1,12}\))?|\\[a-zA-Z]+(?:_\{?\w+\}?)?"
          r"|[A-Z]{2,3}|\\overline\{[A-Z]{1,3}\}|m?\s*\\angle\s*[A-Z]{1,3})")
_LABEL_RE = re.compile(r"\s*(" + _LABEL + r"|\(\s*" + _LABEL + r"(?:\s*,\s*" + _LABEL + r")+\s*\))\s*")
_RELATION_SPLIT_RE = re.compile(r"(<=|>=|!=|<|>)")
_CONNECTIVE_RE = re.compile(r"\\text\{ ?(?:or|and|且|或|和|与) ?\}|\bor\b|\band\b|且|或|和|与")
_OR_RE = re.compile(r"\\text\{\s*or\s*\}|\bor\b|或")
_AND_RE = re.compile(r"\\text\{\s*and\s*\}|\band\b|和|与")


def _structure(s):
    """A comparable description of an answer: ('kind', payload, ...)."""
    s = s.strip()
    matrix = re.fullmatch(r"[\[(]?\s*\\begin\{([pbvBV]?matrix|smallmatrix|array)\}(?:\{[^{}]*\})?(.*)"
                          r"\\end\{\1\}\s*[\])]?", s, re.S)
    if matrix:
        rows = [r for r in matrix.group(2).split("\\\\") if r.strip() and r.strip() != "\\hline"]
        return ("matrix", [[_structure(cell) for cell in row.split("&")] for row in rows])
    if "\\cup" in s:
        return ("union", [_structure(p) for p in _split_top_level(s, "\\cup")])
    if s.startswith("\\{") and s.endswith("\\}"):
        inner = s[2:-2]
        parts = _split_top_level(inner, ";" if ";" in inner else ",")
        return ("set", [_structure(p) for p in parts if p])
    if s.startswith("{") and _match_brace(s, 0) == len(s) - 1 and _split_top_level(s[1:-1], ",")[1:]:
        return ("set", [_structure(p) for p in _split_top_level(s[1:-1], ",") if p])  # `{1, 2}`
    has_or = bool(_OR_RE.search(s))
    joined = _CONNECTIVE_RE.sub(",", s)
    parts = [p for p in _split_top_level(joined, ";" if ";" in joined else ",") if p]
    if len(parts) > 1:
        items = [_structure(p) for p in parts]
        if has_or and all(item[0].startswith("interval") for item in items):
            return ("union", items)  # `x < -1 or x > 2`
        if all(item[0] == "labelled" for item in items):
            keys = [item[1] for item in items]
            return ("labels", items, has_or or len(set(keys)) < len(keys))
        return ("set" if has_or or _AND_RE.search(s) else "list", items)  # `3 and -2`: solutions, any order
    if s.count("\\pm") == 1 and "\\mp" not in s:  # `\pm 2021` is the set {-2021, 2021}
        return ("set", [_structure(s.replace("\\pm", "+")), _structure(s.replace("\\pm", "-"))])
    if _RELATION_SPLIT_RE.search(s):
        return _relation(s)
    if "=" in s:
        sides = [side.strip() for side in s.split("=")]
        if not all(sides):
            return ("text", s.lower())
        label = _LABEL_RE.fullmatch(sides[0])
        if label:  # `x = 3`, `(p, q) = (3, 2)`, `x = 2 + 3 = 5`: the value, with its label
            return ("labelled", re.sub(r"[\s{}]", "", label.group(1)), _structure(sides[-1]), sides[0])
        label = _LABEL_RE.fullmatch(sides[-1])
        if label and len(sides) == 2 and not re.search(r"[a-zA-Z]", re.sub(r"\\[a-zA-Z]+", "", sides[0])):
            return ("labelled", re.sub(r"[\s{}]", "", label.group(1)), _structure(sides[0]), sides[-1])  # `5 = x`
        if len(sides) > 2 or not re.search(r"[a-zA-Z]", re.sub(r"\\[a-zA-Z]+", "", sides[0])):
            return _structure(sides[-1])  # an equality chain `48 + 18 = 66`: its last side
        return ("equation", (_scalar(sides[0]), _scalar(sides[1])))
    if len(s) >= 2 and s[0] in "([" and s[-1] in ")]" and _split_top_level(s[1:-1], ",")[1:]:
        return ("interval" + s[0] + s[-1], [_structure(p) for p in _split_top_level(s[1:-1], ",")])
    return _scalar(s)


def _relation(s):
    """`x >= 5`, `5 \\le x`, `-x > -1`, `-2 <= x <= 7` -> the interval they describe; other
    relations -> ('relation', op, lhs - rhs) with op `<`, `<=` or `!=`."""
    import sympy
    pieces = _RELATION_SPLIT_RE.split(s)
    sides, ops = [p.strip() for p in pieces[0::2]], pieces[1::2]
    if not all(sides):
        return ("text", s.lower())
    if len(ops) == 2 and _LABEL_RE.fullmatch(sides[1]) and "!=" not in ops and ops[0][0] == ops[1][0]:
        if ops[0][0] == ">":
            sides, ops = sides[::-1], [ops[1].replace(">", "<"), ops[0].replace(">", "<")]
        brackets = ("[" if ops[0] == "<=" else "(") + ("]" if ops[1] == "<=" else ")")
        return ("interval" + brackets, [_structure(sides[0]), _structure(sides[2])])
    if len(ops) != 1:
        return ("text", s.lower())
    op, (lhs, rhs) = ops[0], sides
    if op in (">", ">="):
        lhs, rhs, op = rhs, lhs, "<" + op[1:]
    infinity = ("expr", sympy.oo, "")
    if op != "!=" and _LABEL_RE.fullmatch(lhs) and not _LABEL_RE.fullmatch(rhs):  # x < 3
        return ("interval(" + ("]" if op == "<=" else ")"), [("expr", -sympy.oo, ""), _structure(rhs)])
    if op != "!=" and _LABEL_RE.fullmatch(rhs) and not _LABEL_RE.fullmatch(lhs):  # 3 < x
        return ("interval" + ("[" if op == "<=" else "(") + ")", [_structure(lhs), infinity])
    left, right = _scalar(lhs), _scalar(rhs)
    if left[0] != "expr" or right[0] != "expr":
        return ("text", s.lower())
    diff = left[1] - right[1]  # the relation is `diff op 0`
    symbols = diff.free_symbols
    if op != "!=" and len(symbols) == 1:
        x = next(iter(symbols))
        slope = sympy.diff(diff, x)
        if slope.is_number and slope != 0 and sympy.diff(slope, x) == 0:  # linear: x < root or x > root
            root = ("expr", sympy.nsimplify(-diff.subs(x, 0) / slope), "")
            if slope > 0:
                return ("interval(" + ("]" if op == "<=" else ")"), [("expr", -sympy.oo, ""), root])
            return ("interval" + ("[" if op == "<=" else "(") + ")", [root, infinity])
    return ("relation", op, diff)


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

_SEED = 1234
_RNG = random.Random(_SEED)   # sample points of _expressions_equal; reseeded before each comparison (_serve)
_REL_TOL = 1e-8


def _close(a, b):
    return abs(a - b) <= _REL_TOL * max(1.0, abs(a), abs(b))


def _numbers_equal(a, b, a_text, b_text, percent):
    candidates = [b] + ([b / 100, b * 100] if percent else [])
    for index, target in enumerate(candidates):
        if a.is_Rational and target.is_Rational:
            if a == target:
                return True
            fa, ft = Fraction(int(a.p), int(a.q)), Fraction(int(target.p), int(target.q))
            if index == 0 and (_rounds_rational(a_text, fa, ft) or _rounds_rational(b_text, ft, fa)):
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


def _expressions_equal(a, b, a_text, b_text, percent=False, proportional=False, positive=False):
    """a == b; with proportional, a == c * b for a nonzero constant c (c > 0 with positive)."""
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
        same = all(_close(r, ratios[0]) for r in ratios) and abs(ratios[0]) > 1e-12
        return same and (not positive or ratios[0].real > 0)
    return True


def _as_equation(labelled):
    """`y = 2x + 1` as the equation y - (2x + 1) = 0, for comparing with `2x - y + 1 = 0`."""
    label, value = _scalar(labelled[3]), labelled[2]
    if label[0] == "expr" and value[0] == "expr":
        return ("equation", (label, value))
    return None


def _values(p):
    """The values of several labelled answers, without their labels (one labelled answer never gets here:
    _structures_equal compares it by its value first)."""
    if p[0] == "labels":
        return ("set" if p[2] else "list", [item[2] for item in p[1]])
    return p


def _sequence(p):
    """The items of an ordered answer: a list, a tuple, a one-row or one-column matrix."""
    if p[0] in ("list", "interval()"):
        return p[1]
    if p[0] == "matrix" and (len(p[1]) == 1 or all(len(row) == 1 for row in p[1])):
        return [cell for row in p[1] for cell in row]
    return None


def _as_matrix(p, other):
    """`[[1, 2], [3, 4]]` (rows as brackets, as Python prints them) as a matrix, against a matrix."""
    if other[0] == "matrix" and p[0] in ("list", "interval[]", "interval()") and all(
            isinstance(row, tuple) and row[0] in ("interval[]", "interval()", "list") for row in p[1]):
        return ("matrix", [list(row[1]) for row in p[1]])
    return p


def _unordered_equal(items_p, items_g, percent):
    if len(items_p) != len(items_g):
        return False
    remaining = list(items_g)
    for item in items_p:  # greedy matching
        match = next((k for k, other in enumerate(remaining) if _structures_equal(item, other, percent)), None)
        if match is None:
            return False
        remaining.pop(match)
    return True


def _structures_equal(p, g, percent):
    kind_p, kind_g = p[0], g[0]
    if kind_p == "labelled" and kind_g == "labelled":
        if p[1] == g[1]:
            return _structures_equal(p[2], g[2], percent)
        ep, eg = _as_equation(p), _as_equation(g)
        return bool(ep and eg) and _structures_equal(ep, eg, percent)
    if "labelled" in (kind_p, kind_g):
        labelled, other = (p, g) if kind_p == "labelled" else (g, p)
        if other[0] == "equation":
            equation = _as_equation(labelled)
            return equation is not None and _structures_equal(equation, other, percent)
        return _structures_equal(labelled[2], other, percent)
    if kind_p == "labels" and kind_g == "labels":
        keys_p, keys_g = [item[1] for item in p[1]], [item[1] for item in g[1]]
        if not p[2] and not g[2] and sorted(keys_p) == sorted(keys_g):  # `a_3 = 2, a_{37} = 19`, any order
            by_key = {item[1]: item[2] for item in g[1]}
            return all(_structures_equal(item[2], by_key[item[1]], percent) for item in p[1])
    if "labels" in (kind_p, kind_g):
        return _structures_equal(_values(p), _values(g), percent)
    if kind_p == "equation" and kind_g == "expr" and not g[1].free_symbols:  # `y^2 = 49` against 49
        lhs, rhs = p[1]
        return lhs[0] == rhs[0] == "expr" and bool(lhs[1].free_symbols) and not rhs[1].free_symbols \
            and _structures_equal(rhs, g, percent)
    if kind_p == "text" or kind_g == "text" or kind_p == "choice" or kind_g == "choice":
        return kind_p == kind_g and p[1] == g[1]
    if kind_p == "expr" and kind_g == "expr":
        return _expressions_equal(p[1], g[1], p[2], g[2], percent)
    if "set" in (kind_p, kind_g) and {kind_p, kind_g} <= {"set", "list"}:
        return _unordered_equal(p[1], g[1], percent)  # a set on either side: order does not matter
    p, g = _as_matrix(p, g), _as_matrix(g, p)
    kind_p, kind_g = p[0], g[0]
    seq_p, seq_g = _sequence(p), _sequence(g)
    if kind_p != kind_g and seq_p is not None and seq_g is not None:  # `1,2,3` == `(1, 2, 3)`
        return len(seq_p) == len(seq_g) and all(_structures_equal(a, b, percent) for a, b in zip(seq_p, seq_g))
    if kind_p != kind_g:
        return False
    if kind_p == "equation":
        (pl, pr), (gl, gr) = p[1], g[1]
        if "text" in (pl[0], pr[0], gl[0], gr[0]):
            return pl == gl and pr == gr
        return _expressions_equal(pl[1] - pr[1], gl[1] - gr[1], "", "", proportional=True)
    if kind_p == "relation":
        return p[1] == g[1] and _expressions_equal(p[2], g[2], "", "", proportional=True, positive=p[1] != "!=")
    if kind_p == "matrix":
        return len(p[1]) == len(g[1]) and all(
            len(rp) == len(rg) and all(_structures_equal(a, b, False) for a, b in zip(rp, rg))
            for rp, rg in zip(p[1], g[1]))
    if kind_p in ("set", "union"):
        return _unordered_equal(p[1], g[1], percent)
    return len(p[1]) == len(g[1]) and all(_structures_equal(a, b, percent) for a, b in zip(p[1], g[1]))


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


def _serve(conn, parent_pid):
    # No orphans: a worker exits when its pipe closes (the caller died, even by kill -9) and, in case
    # some other path keeps the pipe open, when the process that forked it (the fork server) is gone.
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        conn.send(_do_job(job))


def _do_job(job):
    """What a worker does with one job (conftest.py runs the same in the test's process under mutmut)."""
    if callable(job):                         # call_in_worker: a user's --reward
        return job()
    if job[0] is None:                        # (None, completion, gold): math-verify's second opinion
        return _math_verify_reward(*job[1:])
    _RNG.seed(_SEED)                          # (pred, gold, percent): a comparison, at the same sample points
    return _compare_normalized(*job)          # every time, whatever this worker compared before


def _math_verify_reward(completion, gold):
    """math-verify's reward (its documented use), inside a worker: its own signal-based timeouts are
    off, the worker's kill is the bound. None when it raises."""
    try:
        import logging
        logging.getLogger("math_verify").setLevel(logging.ERROR)  # its "timeout is disabled" warnings: we bound it
        from math_verify import parse, verify as math_verify
        return 1.0 if math_verify(parse(f"${gold}$", parsing_timeout=None), parse(completion, parsing_timeout=None),
                                  timeout_seconds=None) else 0.0
    except Exception:
        return None


def _watch_parent(parent_pid):
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os._exit(0)  # reparented: the process that started us is gone


# Workers are forked from a small fork server, not from the caller. Forking a trainer that holds
# gigabytes of weights, activations and optimizer state would share all of its memory copy-on-write:
# each page the trainer then writes costs a page fault and a copy (measured: ~780k faults and ~20 s of
# system time in the next training step of the 135M model, per fork). The fork server is a fresh
# interpreter (started with exec, which shares nothing), imports this module and sympy once, warms
# sympy up, and forks each worker in milliseconds with all of that already loaded.


def _fork_server(control_fd):
    """The fork server's loop: one byte in on the control socket, one worker out (its pid, and our end of
    its pipe sent over as a file descriptor). Exits when the caller's end closes (the caller died)."""
    import signal
    import socket
    from multiprocessing.connection import Connection
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # a Ctrl-C reaches the whole process group: the caller decides
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)   # workers are reaped by the kernel
    import sympy  # noqa: F401  (imported once here, inherited by every worker)
    try:
        import math_verify  # noqa: F401  (the optional second opinion: likewise)
    except ImportError:
        pass
    for pred, gold in (("(x-2)(x+2)", "x^2-4"), ("-x>-1", "x<1"), ("y=2x+3", "2x-y+3=0"), ("\\sin 2x", "1.5")):
        _compare_normalized(pred, gold, False)     # sympy's first evalf and solve: ~0.7 s of lazy set-up, paid once
    control = socket.socket(fileno=control_fd)
    while control.recv(1):
        ours, theirs = socket.socketpair()
        pid = os.fork()
        if pid == 0:                                # the worker: it keeps only its own end of its own pipe
            control.close()
            ours.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            try:
                _serve(Connection(theirs.detach()), os.getppid())
            finally:
                os._exit(0)
        theirs.close()
        socket.send_fds(control, [pid.to_bytes(8, "little")], [ours.fileno()])
        ours.close()
    os._exit(0)


class _Worker:
    """A worker forked by the fork server (not our child: the fork server reaps it)."""

    def __init__(self, pid):
        self.pid = pid

    def kill(self):
        try:
            os.kill(self.pid, 9)
        except ProcessLookupError:
            pass


_idle_workers = []
_workers_lock = threading.Lock()
_server = None                      # (Popen, our end of its control socket), started on first use
_server_lock = threading.Lock()


def _start_server():
    import socket
    import subprocess
    ours, theirs = socket.socketpair()
    module_dir = os.path.dirname(os.path.abspath(__file__))   # the caller's path: the server and its workers
    code = (f"import sys; sys.path[:] = sys.argv[2:] + [{module_dir!r}]; import {__name__} as verify; "   # import
            f"verify._fork_server(int(sys.argv[1]))")                                                    # as it does
    process = subprocess.Popen([sys.executable, "-c", code, str(theirs.fileno()), *sys.path],
                               pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
    theirs.close()
    return process, ours


def _start_worker():
    """A new worker: (its _Worker, our end of its pipe), forked by the fork server (started now if need be)."""
    import socket
    from multiprocessing.connection import Connection
    global _server
    with _server_lock:
        for attempt in range(2):                    # a fork server that died is started again, once
            if _server is None or _server[0].poll() is not None:
                _server = _start_server()
            try:
                _server[1].sendall(b"w")
                message, fds, _, _ = socket.recv_fds(_server[1], 8, 1)
                if message and fds:
                    return _Worker(int.from_bytes(message, "little")), Connection(fds[0])
            except OSError:
                pass
            _server[0].kill()
            _server = None
        raise RuntimeError("verify.py: the verifier's fork server could not start a worker")


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
            conn.close()


def warmup(workers=None):
    """Start the worker pool now (the fork server's first start takes a second or two: sympy's import
    and set-up; each worker after it, milliseconds)."""
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
        special = _special_forms(p, g)
        if isinstance(special, bool):
            return special
        p, g = special
        if p.replace(" ", "") == g.replace(" ", ""):
            return True
        percent = p_percent != g_percent
        fp, fg = _fast_number(p), _fast_number(g)
        if fp is not None and fg is not None:
            if fp == fg or (percent and (fp == fg / 100 or fp == fg * 100)):
                return True
            return _rounds_rational(p, fp, fg) or _rounds_rational(g, fg, fp)
        return bool(_run_in_worker((p, g, percent), timeout))
    except Exception:
        return False


def _top_level_parts(answer):
    """How many answers a reference lists: `1, 2` and `x = 1 \\text{ or } x = 2` list two."""
    s = _CONNECTIVE_RE.sub(",", _normalize(answer)[0])
    if s.startswith("\\{") and s.endswith("\\}"):
        s = s[2:-2]
    return len([p for p in _split_top_level(s, ";" if ";" in s else ",") if p])


class Verdict(NamedTuple):
    """What grade() found: the reward, the final answer it read (None when there was none) and why:
    `correct`, `wrong` (an answer, not equivalent), `no_answer` (none found) or `unfinished` (the
    reasoning never ended, or the trace was cut at the token limit: never rewarded)."""
    reward: float
    answer: Optional[str]
    status: str


def grade(completion, gold, timeout=DEFAULT_TIMEOUT, truncated=False):
    """reward() with its reasons, as a Verdict. truncated=True says the completion hit the token limit
    before its end-of-sequence token: it scores 0, whatever answer it holds mid-thought."""
    try:
        final = _strip_turn(completion) if isinstance(completion, str) else ""
        if truncated or final is None:
            return Verdict(0.0, None, "unfinished")
        pred = _extract(final) if final else None
        gold = reference_answer(gold)
        if pred is not None and is_equiv(pred, gold, timeout):
            return Verdict(1.0, pred, "correct")
        text = _BOLD_RE.sub(r"\1", final)
        boxes = [b[2] for b in _boxes(text)]
        parts = _top_level_parts(gold) if len(boxes) > 1 else 1
        if 1 < parts <= len(boxes) and all(_top_level_parts(b) == 1 for b in boxes[-parts:]):
            joined = ", ".join(boxes[-parts:])  # one box per blank: `\\boxed{2} and \\boxed{3}` for `2, 3`
            return Verdict(1.0, joined, "correct") if is_equiv(joined, gold, timeout) else Verdict(0.0, pred, "wrong")
        if re.fullmatch(r"\(?[A-E]\)?", _normalize(gold)[0]) and (pred is None or not _letters(_normalize(pred)[0])):
            letter = _chosen_letter(text)  # a choice named in prose
            if letter:
                return Verdict(1.0 if is_equiv(letter, gold, timeout) else 0.0, letter,
                               "correct" if is_equiv(letter, gold, timeout) else "wrong")
        return Verdict(0.0, pred, "no_answer" if pred is None else "wrong")
    except Exception:
        return Verdict(0.0, None, "no_answer")


def reward(completion, gold, timeout=DEFAULT_TIMEOUT, truncated=False):
    """1.0 when the completion's extracted answer is equivalent to the reference answer, else 0.0.
    A reference listing k answers also matches the last k boxes of a completion that boxes each
    answer separately (`\\boxed{2} and \\boxed{3}` for `2, 3`); a multiple-choice reference also
    matches the one letter the completion chooses in prose. Unfinished reasoning (an unclosed
    `<think>`, or truncated=True: cut at the token limit) scores 0."""
    return grade(completion, gold, timeout, truncated).reward


def grades(completions, golds, timeout=DEFAULT_TIMEOUT, workers=None, truncated=None):
    """grade() for a batch, spread over one worker process per core; truncated: one bool per
    completion (True: it hit the token limit without its end-of-sequence token), or None."""
    if len(completions) != len(golds):
        raise ValueError(f"rewards: {len(completions)} completions but {len(golds)} reference answers")
    truncated = [False] * len(completions) if truncated is None else list(truncated)
    if len(truncated) != len(completions):
        raise ValueError(f"rewards: {len(completions)} completions but {len(truncated)} truncated flags")
    workers = workers or max(2, os.cpu_count() or 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda job: grade(job[0], job[1], timeout, job[2]), zip(completions, golds, truncated)))


def rewards(completions, golds, timeout=DEFAULT_TIMEOUT, workers=None, truncated=None):
    """reward() for a batch, spread over one worker process per core."""
    return [v.reward for v in grades(completions, golds, timeout, workers, truncated)]


# ---------------------------------------------------------------------------
# Audit: is the model's format failing, or its math? And a second opinion on the reward.


class Audit(NamedTuple):
    metrics: dict        # no_answer_rate, wrong_answer_rate; math_verify_agreement with math-verify installed
    disagreements: list  # the sampled cases where math-verify and verify.py disagree (second_opinion)


def audit(verdicts, completions=None, golds=None, sample=16, seed=0):
    """A step's verifier audit. The share of responses with no final answer (none found, or
    unfinished) and the share whose answer was found and wrong: a rising no_answer_rate says the
    format fails, not the math. With completions, golds and math-verify installed, also
    math-verify's agreement on a sample of them (second_opinion) and the cases it disagrees on."""
    n = max(1, len(verdicts))
    metrics = {"no_answer_rate": sum(v.status in ("no_answer", "unfinished") for v in verdicts) / n,
               "wrong_answer_rate": sum(v.status == "wrong" for v in verdicts) / n}
    opinion = second_opinion(completions, golds, verdicts, sample, seed=seed) if completions is not None else None
    if opinion and opinion[0] is not None:
        metrics["math_verify_agreement"] = opinion[0]
    return Audit(metrics, opinion[1] if opinion else [])


def second_opinion(completions, golds, verdicts, sample=16, timeout=5.0, seed=0):
    """Grade a random sample of the responses with math-verify as well (when it is installed), each
    call in a verifier worker under a hard time bound (math-verify can be slow or hang). Returns None
    without math-verify, else (agreement rate over the sample, or None when math-verify gave no
    verdict on any; the disagreeing cases as dicts: completion, gold, answer, verify, math_verify).
    Unfinished traces are not sampled (verify.py scores them 0 by rule, not by grading), and cases
    math-verify could not grade in time are left out of the rate."""
    try:
        import math_verify  # noqa: F401  (is it installed? The fork server imports it for the workers)
    except ImportError:
        return None
    finished = [i for i, v in enumerate(verdicts) if v.status != "unfinished"]  # math-verify cannot see a cut trace
    picked = random.Random(seed).sample(finished, min(sample, len(finished)))

    def check(i):
        return _run_in_worker((None, str(completions[i]), str(reference_answer(golds[i]))), timeout)
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        theirs = list(pool.map(check, picked))
    graded = [(i, r) for i, r in zip(picked, theirs) if type(r) is float]  # False: the time bound passed
    disagreements = [{"completion": completions[i], "gold": golds[i], "answer": verdicts[i].answer,
                      "verify": verdicts[i].reward, "math_verify": r} for i, r in graded if r != verdicts[i].reward]
    return (1 - len(disagreements) / len(graded) if graded else None), disagreements



# ---------------------------------------------------------------------------
# A caller's own reward function, run in the same worker processes under the same time bound


_loaded_functions = {}   # per process: each worker loads a function once


def load_function(spec):
    """The function named by 'FILE.py:function' or 'module:function' (loaded once per process).
    Raises ValueError with a one-line reason when it cannot be found."""
    if spec in _loaded_functions:
        return _loaded_functions[spec]
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise ValueError("expected FILE.py:function or module:function")
    import importlib
    import importlib.util
    if where.endswith(".py"):
        if not os.path.isfile(where):
            raise ValueError(f"no such file {where}")
        module_spec = importlib.util.spec_from_file_location(f"_reward_{abs(hash(os.path.abspath(where)))}", where)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    function = getattr(module, name, None)
    if not callable(function):
        raise ValueError(f"{where} has no function {name}")
    _loaded_functions[spec] = function
    return function


class _Call:
    """A job for a worker: call the named function; the outcome travels back as a plain tuple."""

    def __init__(self, spec, args):
        self.spec, self.args = spec, args
        self.path = list(sys.path)   # a worker started before the caller's sys.path grew finds module:function too

    def __call__(self):
        import traceback
        try:
            if self.spec not in _loaded_functions:
                sys.path[:] = self.path
            value = load_function(self.spec)(*self.args)
        except BaseException:
            return ("raised", traceback.format_exc())
        import numbers
        if isinstance(value, numbers.Real) and math.isfinite(float(value)):   # also bool (True -> 1.0), numpy
            return ("ok", float(value))
        return ("not a number", f"{type(value).__name__} {value!r}"[:300])


def call_in_worker(spec, args, timeout=DEFAULT_TIMEOUT):
    """Call function(*args) of spec in a worker process under the time bound. Returns ("ok", float),
    ("raised", its traceback), ("not a number", what it returned) or ("timeout", None) (worker killed)."""
    outcome = _run_in_worker(_Call(spec, args), timeout)
    return outcome if isinstance(outcome, tuple) else ("timeout", None)
