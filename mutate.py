"""
Mutation testing of the method, the verifier and the study bookkeeping (development only; not in CI).

    pip install mutmut                  # 3.x, into the development venv; not in requirements.txt
    python mutate.py                    # mutate, run the covering tests of each mutant, print the score
    python mutate.py --children 1       # fewer parallel workers on a busy machine
    python mutate.py --files verify.py,analyze.py --children 1    # just these files, against just their tests
    mutmut show prerl.x_trim__mutmut_3  # what one mutant changed

mutmut (configured in pyproject.toml) mutates whole files; the functions below are the ones scored:
the method (advantages, masks, losses, scoring in both spaces, the DSRL switch, sampling, checkpoints), the
data split, the prompts and the sampling keys' random numbers, two run-safety rules (what --resume may
change, the non-finite guard); verify.py's extraction, normalisation and comparison core and grade();
analyze.py's study bookkeeping (curves, steps to a threshold, t-intervals, per-mode rows, the lr choice).
Each mutant runs only the tests that reach its function, the quickest first (conftest.py). A surviving mutant is either a missing test (write it) or equivalent to the original
(list it in EQUIVALENT with the reason). The score counts killed mutants among the non-equivalent ones; the target is 95%.
In machinery.py: the precision code (rounding bits and rounding, the AdamW update, the optimizer's bookkeeping,
the precision decision), LoRA and the model export, the memory plan, and the distribution helpers that run in
one process; not what needs CUDA or torchrun (the static decoder's graphs, FSDP, collectives, sharded
checkpoints) or times the probe.
Not scored in verify.py: the expression parser (_tokenize, _parse_expression: ~500 mutants of their own,
reached through every algebraic case; a pass of its own), the answer-structure parser (_structure,
_relation, _scalar, _split_top_level; likewise), the worker processes and the time bound (replaced by
in-process calls under mutmut, see conftest.py), batches (grades, rewards), the audit and a caller's
own reward function. In analyze.py: the commands, model loading, training runs and plots (their
tests train models: minutes per mutant).
Not mutated: generate() (mutmut 3 leaves decorated functions alone: @torch.no_grad()). Not scored: train() and rl_step(), whose many
print, timing and run-safety lines would drown the method; their rules are tested end to end.
"""

import argparse
import json
import os
import re
import subprocess
import sys

SCORED = {
    "prerl.py": [
        # sampling and its masks
        "start_token_id", "eos_token_ids", "response_mask_from_positions", "pick_next_token", "sample",
        # scoring in both spaces
        "token_logprobs", "conditional_logprobs", "pretrain_logprobs", "trim", "scored_logprobs",
        # advantages, the DSRL switch, losses
        "grpo_advantages", "batch_std", "centered_advantages", "overlong_penalties", "shaped_rewards", "stage_for_step",
        "advantages_for", "clipped_surrogate", "log_ratio", "aggregation", "global_count", "k3_kl", "policy_loss",
        "clipped_tokens", "rows_that_count", "loss_plan", "accumulate_gradients", "sampling_policy_logprobs",
        "policy_updates", "mixed_groups", "draw_mixed_groups", "optimizer_step",
        # data: the train / held-out split, the held-out set, the data order
        "is_held_out", "make_problems", "eval_problems", "batch_for_step",
        # prompts and the sampling keys' random numbers
        "format_prompt", "encode_prompts", "sampling_uniforms",
        # checkpoints, evaluation, run safety (what --resume may change, the non-finite guard)
        "save_checkpoint", "load_checkpoint", "evaluate", "resume_problem", "count_nonfinite_steps",
    ],
    "verify.py": [
        # extraction: the end of the turn and of the reasoning (`</think>`), boxes, `####`, answer phrases,
        # a last line or the whole of a short completion, a bold value, the last number or math span
        "_match_brace", "_boxes", "_last_boxed", "_final_part", "_strip_turn", "_math_spans", "_answer_in_segment",
        "_after_phrase", "_sentence_denies", "_set_aside", "_is_prose_free", "_whole_answer", "_last_line_math",
        "_justifies", "_joined_spans", "_text_values", "_last_value", "_last_bold", "extract_answer", "_extract",
        "_chosen_letter", "_last_line_a", "reference_answer",
        # normalisation: percent, signs, fractions, decimals, bases, times, letters, decimal commas
        "_repeating_to_fraction", "_general_solution", "_normalize", "_fast_number", "_decimal_places",
        "_rounds_rational", "_letters", "_special_forms",
        # the equivalence checks, grade() and its Verdict
        "_close", "_numbers_equal", "_expressions_equal", "_as_equation", "_values", "_sequence", "_as_matrix",
        "_unordered_equal", "_structures_equal", "_compare_normalized", "is_equiv", "_top_level_parts", "grade", "reward",
    ],
    "machinery.py": [
        # precision: the rounding bits and the rounding, the AdamW update's reference, the optimizer's bookkeeping,
        # the precision decision from the step probe's figures (not the timing itself) and on --resume
        "hash32", "rounding_key", "element_bits", "stochastic_round_to_bf16", "adamw_update",
        "StochasticRoundingAdamW.__init__", "StochasticRoundingAdamW.step", "StochasticRoundingAdamW.load_state_dict",
        "probe_step_seconds", "decide_precision", "run_precision",
        # LoRA (adapters, the merge with alpha / rank, the merged export) and the model export helpers
        "lora_targets", "add_lora", "prepare_model", "has_lora", "adapter_state", "load_adapter_state",
        "merged_state_dict", "states_to_save", "full_state", "whole_model",
        # the memory plan: its arithmetic, its lines, the refusal on CUDA
        "model_config", "memory_plan", "size", "plan_line", "plan_table", "refuse_if_it_cannot_fit",
        # distribution helpers that run in one process (their torchrun halves with a stand-in for the collectives)
        "rank_share", "sum_over_ranks", "before_optimizer_step", "global_denominator", "match_passes", "step_totals",
        "sharded_folder", "agree_on_stop", "decoder_layers",
    ],
    # the study's bookkeeping: curves at their steps, steps to a threshold, t-intervals, per-mode rows, lr choice
    "analyze.py": ["pass_at_k", "t_quantile_975", "mean_ci", "steps_to_threshold", "held_out_curve", "mean_step_seconds",
                   "choose_lr", "summarize", "format_ci", "paired_differences", "format_differences", "format_table",
                   "diagnostics_table", "curve_band", "is_validation", "run_folder"],
}

# The test files that reach each file's scored functions: `--files verify.py,analyze.py` runs mutmut on just
# those files, against just these tests (its first pass runs the whole selection under call recording).
TESTS_OF = {
    "prerl.py": ["test_prerl.py", "test_losses.py", "test_data_and_rewards.py", "test_run_safety.py"],
    "verify.py": ["test_verify.py", "test_verify_formats.py"],
    "machinery.py": ["test_machinery.py", "test_precision.py",
                     "test_distributed.py::test_rank_shares_are_contiguous_whole_and_refuse_an_empty_rank"],
    "analyze.py": ["test_analyze.py"],
}
# Tests left out of a --files run: the studies train several models per test (minutes per mutant); the study
# bookkeeping they reach has direct tests of its own in the same file.
LEFT_OUT = {
    "analyze.py": ["test_analyze.py::test_study_resumes_per_mode_and_seed_to_the_same_table",
                   "test_analyze.py::test_a_studys_held_out_curve_puts_each_evaluation_at_the_steps_trained_before_it",
                   "test_analyze.py::test_lr_sweep_study_in_two_processes_matches_one_and_shares_the_first_seed"],
}

# Mutants that behave exactly like the original (one line each: why no test can tell them apart).
# mutmut numbers the mutants of each function in order, so a change to a function renumbers its mutants:
# re-triage that function's entries then (`mutmut show NAME` prints what a mutant changed).
EQUIVALENT = {
    # verify.py: _close
    "verify.x__close__mutmut_3": "< for <=: differs only when the difference equals the tolerance exactly",
    "verify.x__close__mutmut_9": "max(1, |b|) for max(1, |a|, |b|): within 1e-8 of each other |a| and |b| give the same bound",
    "verify.x__close__mutmut_10": "max(1, |a|) for max(1, |a|, |b|): as above, with a and b swapped",
    # verify.py: extraction and comparison helpers
    "verify.x_extract_answer__mutmut_1": "`and` for `or` in the guard: an empty or non-string completion extracts None by the later rules (nothing found, or the except)",
    "verify.x__top_level_parts__mutmut_6": "`XX,XX` for `,` as what and/or become: it holds one comma, so the count of parts is the same",
    "verify.x__as_equation__mutmut_5": "`or` for `and`: an equation with a text side equals only one with the same text sides, never the equation or labelled value it meets here",
    "verify.x__unordered_equal__mutmut_8": "next() without a default: StopIteration when nothing matches, which the comparison turns into not equal, as the None does",
    "verify.x__boxes__mutmut_24": "end >= 0 for end > 0: _match_brace gives -1 or the closing brace's index, past `\\boxed`, never 0",
    "verify.x__boxes__mutmut_25": "end > 1 for end > 0: as above, never 1",
    "verify.x__match_brace__mutmut_25": "+1 for -1 (unbalanced): _boxes then reads text[i + 1:1], empty, and _structure's `== len - 1` needs len 2, whose inner part is empty",
    "verify.x__match_brace__mutmut_26": "-2 for -1 (unbalanced): callers test end > 0 and end == len - 1, which -2 fails as -1 does",
    "verify.x__rounds_rational__mutmut_10": "early False for denominator 2 instead of 1: the exact-decimal check below returns False for both",
    "verify.x__rounds_rational__mutmut_31": "< for <= 1: a difference of exactly half a unit makes `other` an exact decimal, refused before",
    "verify.x__text_values__mutmut_8": "end + start for a formula's length: still above any number's length at the same end, so the formula still comes first",
    "verify.x__decimal_places__mutmut_22": "lstrip(\"XX-XX\") for lstrip(\"-\"): lstrip takes a set of characters, and a decimal holds no X",
    "verify.x__decimal_places__mutmut_25": "lstrip(\"XX0XX\") for lstrip(\"0\"): as above",
    # verify.py: extraction (answer phrases, spans, bold, letters, last lines), triaged 2026-12-04
    "verify.x__after_phrase__mutmut_12": "splitting a blank rest too: after the lstrip a blank rest is \"\" or other whitespace, its first line is still blank, and the final rest.strip() check returns None either way",
    "verify.x__after_phrase__mutmut_18": "calling _answer_in_segment on a blank rest too: it strips the segment and returns `segment or None`, i.e. None, the same as the skipped call",
    "verify.x__answer_in_segment__mutmut_24": "r\"NOT\\b\" for r\"not\\b\": the match is re.IGNORECASE, so both patterns match the same strings",
    "verify.x__chosen_letter__mutmut_10": "rfind(c, None, box_start) for rfind(c, 0, box_start): a start of None is 0",
    "verify.x__chosen_letter__mutmut_16": "rfind from 1 instead of 0: it only misses a separator at index 0, and then the letter scan starts at index 0, where the separator stands and no letter mention can start",
    "verify.x__chosen_letter__mutmut_40": "i > 0 for i >= 0: text.find(c, box_end) is at least box_end >= 1 when found, so 0 never occurs",
    "verify.x__chosen_letter__mutmut_41": "i >= 1 for i >= 0: text.find(c, box_end) is at least box_end >= 1 when found, so 0 never occurs",
    "verify.x__chosen_letter__mutmut_85": "rfind(c, None, m.start()) for rfind(c, 0, m.start()): a start of None is 0",
    "verify.x__chosen_letter__mutmut_91": "rfind from 1 instead of 0: it only misses a separator at index 0, and then the cue search starts at that separator character, where no cue word can start",
    "verify.x__extract__mutmut_10": "gsm8k = \"\" for None before the loop: both are falsy, and the loop overwrites it with a match when there is one",
    "verify.x__final_part__mutmut_21": "start == 1 for start == 0: start is 0 or the end of a closer (at least 8 characters in), never 1, and at start 0 text[0:] and text are the same string",
    "verify.x__is_prose_free__mutmut_20": "\"XXorXX\" for \"or\" in the allowed words: the words found are runs of 3+ letters, so \"or\" is never one of them",
    "verify.x__is_prose_free__mutmut_21": "\"OR\" for \"or\" in the allowed words: the words found are runs of 3+ letters, so \"or\" is never one of them",
    "verify.x__is_prose_free__mutmut_24": "\"XXetXX\" for \"et\" in the allowed words: the words found are runs of 3+ letters, so \"et\" is never one of them",
    "verify.x__is_prose_free__mutmut_25": "\"ET\" for \"et\" in the allowed words: the words found are runs of 3+ letters, so \"et\" is never one of them",
    "verify.x__is_prose_free__mutmut_26": "\"XXyXX\" for \"y\" in the allowed words: the words found are runs of 3+ letters, so \"y\" is never one of them",
    "verify.x__is_prose_free__mutmut_27": "\"Y\" for \"y\" in the allowed words: the words found are runs of 3+ letters, so \"y\" is never one of them",
    "verify.x__joined_spans__mutmut_3": "k >= 0 for k > 0: at k = 0 the text between spans[-1] and spans[0] is empty (spans are in order), which the joiner pattern never matches, so the loop breaks",
    "verify.x__justifies__mutmut_24": "no endpos at pos: a keyword match could only differ by running past pos, but text[pos] starts a value ($, \\, digit, -, π, √, ( or a letter A-E after a non-letter), never a keyword letter, so \\b holds at pos either way",
    "verify.x__last_bold__mutmut_9": "last_digit <= 0 for < 0: when the only digit is at index 0, no bold can hold a digit (a bold starts with ** so its digits come later), so the answer is None either way",
    "verify.x__last_bold__mutmut_10": "last_digit < 1 for < 0: when the only digit is at index 0, no bold can hold a digit (a bold starts with ** so its digits come later), so the answer is None either way",
    "verify.x__last_bold__mutmut_14": "rfind(c, None, last_digit) for rfind(c, 0, last_digit): a start of None is 0",
    "verify.x__last_bold__mutmut_20": "rfind from 1 instead of 0: it only misses a separator at index 0, and then the bold search starts at 0 instead of 1, where the separator stands and no ** can start",
    "verify.x__last_bold__mutmut_26": "answer = \"\" for None when no bold qualifies: _extract skips a rule's answer that is None or blank alike",
    "verify.x__last_bold__mutmut_31": "bold search from sentence - 1 for sentence + 1: no ** can start at the separator or the character before it (the separator follows), and a negative pos is 0",
    "verify.x__last_bold__mutmut_52": "lstrip() for rstrip() before endswith(':'): the bold pattern ends with (?<=\\S), so the content has no trailing space and endswith sees the same last character",
    "verify.x__last_line_math__mutmut_5": "rsplit(\"\\n\") for rsplit(\"\\n\", 1): only lines[-1] and whether there are 2+ pieces are used, the same either way",
    "verify.x__last_line_math__mutmut_9": "rsplit(\"\\n\", 2) for rsplit(\"\\n\", 1): only lines[-1] and whether there are 2+ pieces are used, the same either way",
    "verify.x__math_spans__mutmut_23": "speed only: without the remembered closer each opener searches again and finds the same closer; callers pass at most 20000 characters (_last_value), so the worst case is ~0.4 s instead of ~0.01 s, under the 1 s bound, same spans",
    "verify.x__math_spans__mutmut_28": "speed only: `or` makes every opener search again and find the same closer; callers pass at most 20000 characters (_last_value), so the worst case stays well under a second, same spans",
    "verify.x__math_spans__mutmut_31": "j <= m.end() for j < m.end(): at j == m.end() the new search from m.end() finds the same closer j again",
    "verify.x__math_spans__mutmut_42": "j >= 0 for j > 0: a found closer lies at or after m.end() >= 1, so j is never 0",
    "verify.x__math_spans__mutmut_43": "j > 1 for j > 0: j == 1 needs a `$` opener at 0 with its closer at 1, but `$$` at 0 is read as the $$ opener",
    "verify.x__math_spans__mutmut_56": "j <= 0 for j < 0: a remembered or found closer is -1 or at least m.end() >= 1, so j is never 0",
    "verify.x__math_spans__mutmut_57": "j < 1 for j < 0: a remembered or found closer is -1 or at least m.end() >= 1, so j is never 0",
    "verify.x__strip_turn__mutmut_6": "final > 0 for final >= 0: at final == 0, text[final:] is the whole text, so skipping the slice changes nothing",
    "verify.x__strip_turn__mutmut_7": "final >= 1 for final >= 0: at final == 0, text[final:] is the whole text, so skipping the slice changes nothing",
    # verify.py: comparison (structures, expressions, numbers, special forms, grade), triaged 2026-12-04
    "verify.x__expressions_equal__mutmut_1": "Every caller that leaves percent at its default passes proportional=True, a path that never reads percent.",
    "verify.x__expressions_equal__mutmut_30": "The sample point is a Python float, stored exactly by Float at 15 digits (dps=None) or at 30, and evalf re-reads substituted Floats at its own working precision.",
    "verify.x__expressions_equal__mutmut_32": "Float(u) holds the 53-bit float u exactly, as Float(u, 30) does, and evalf re-reads substituted Floats at its own precision, so the values computed are the same.",
    "verify.x__expressions_equal__mutmut_39": "Float(u, 31) and Float(u, 30) both hold the Python float u exactly, and evalf works at its own requested precision, so nothing computed changes.",
    "verify.x__general_solution__mutmut_3": "_INTEGER_PARAMETER_RE can only match text holding `Z` (\\in ... Z) or `integer`, so searching without the pre-check finds nothing more.",
    "verify.x__normalize__mutmut_6": "' '.isprintable() is True, so a space is always kept by the first test and the `or` clause never decides anything.",
    "verify.x__numbers_equal__mutmut_61": "The `a == target` test in the non-finite branch repeats the identical test a few lines above, which already returned True, so this return is never reached.",
    "verify.x__special_forms__mutmut_10": "For base 37 the mutant enters the try, where int(digits, 37) raises ValueError at once and `except ValueError: pass` skips on, as the original's range test does.",
    "verify.x__special_forms__mutmut_30": "For an n in base 37 the mutant enters the branch, where int(digits, 37) raises ValueError, caught by `except ValueError: pass`; the original skips it and its bare-digits test fails on the `_`, with the same outcome.",
    "verify.x__special_forms__mutmut_56": "After a number word is replaced both sides are plain numbers, whose comparison (fast path, percent, rounding) is symmetric, so swapping p and g changes nothing.",
    "verify.x__special_forms__mutmut_57": "Same as mutant 56: once the number word is a numeral both sides are plain numbers and their order does not matter.",
    "verify.x__special_forms__mutmut_67": "Only the order of two plain numbers changes (the word's numeral and a fast number), and every later comparison of two numbers is symmetric.",
    "verify.x__special_forms__mutmut_68": "Same as mutant 67: swapping two plain numbers changes no verdict.",
    "verify.x__special_forms__mutmut_74": "Moving p.m. times back 12 h instead of forward: with a suffix on both sides both shift alike (a.m. against p.m. can never match either way), and against a bare time the comparison is mod 12 h.",
    "verify.x__special_forms__mutmut_87": "With no a.m./p.m. the suffix is compared to 'p' as '' or as 'xxxx': neither equals 'p', so no hours are added either way.",
    "verify.x__special_forms__mutmut_88": "Adding 12 h to a.m. instead of p.m.: same-suffix pairs shift alike, an a.m. time can never equal a p.m. one under either rule (h%12 < 12), and bare comparisons are mod 12 h.",
    "verify.x__special_forms__mutmut_97": "Bare times differ from their `hours` only by multiples of 12 h, and a pair with a bare time is compared mod 12 h (43200 s).",
    "verify.x__special_forms__mutmut_141": "b is never empty here: is_equiv returns before _special_forms when a side is empty, and the earlier rewrites produce non-empty strings.",
    "verify.x__special_forms__mutmut_159": "A string matched by _CHOICE_REMARK_RE has a bracketed part, so it is never a single letter: the `not re.fullmatch` test is always True either way.",
    "verify.x__special_forms__mutmut_160": "A remark match is always longer than one character, so it never fully matches [a-e] nor [A-E]: the test is True in both.",
    "verify.x__special_forms__mutmut_170": "a matched _CHOICE_PREFIX_RE, which needs text after the letter, so it is never a single letter; the `not re.fullmatch` is True either way.",
    "verify.x__special_forms__mutmut_171": "a matched the choice prefix pattern (a letter plus more text), so it never fully matches one letter of [a-e] or [A-E].",
    "verify.x__special_forms__mutmut_184": "After a decimal comma is rewritten both sides are plain numbers (b was checked with _fast_number), so their order does not matter.",
    "verify.x__special_forms__mutmut_185": "Same as mutant 184: swapping two plain numbers changes no later verdict.",
    "verify.x__special_forms__mutmut_197": "group(1) is `-?\\d+`, so lstrip('XX-XX') and lstrip('-') strip the same characters.",
    "verify.x__special_forms__mutmut_208": "Both sides are plain numbers after the decimal-comma rewrite, and every comparison of two numbers is symmetric.",
    "verify.x__special_forms__mutmut_209": "Same as mutant 208: the swap only reorders two plain numbers.",
    "verify.x__special_forms__mutmut_210": "After a ratio is rewritten as a/b, both sides are fast numbers and compare symmetrically.",
    "verify.x__special_forms__mutmut_211": "Same as mutant 210: the order of two plain numbers does not matter.",
    "verify.x__special_forms__mutmut_229": "The ratio rewrite leaves two plain numbers, whose comparison is symmetric, so not swapping back changes nothing.",
    "verify.x__special_forms__mutmut_230": "Same as mutant 229: swapping two plain numbers changes no verdict.",
    "verify.x__structures_equal__mutmut_30": "Both arguments are equations here, and the equation branch never reads percent, so None and the real flag give the same verdict.",
    "verify.x__structures_equal__mutmut_53": "The call compares two equations, whose branch never reads percent, so passing None changes nothing.",
    "verify.x__structures_equal__mutmut_141": "When exactly one side is a choice and neither is text, every later branch needs equal kinds or list/set/matrix kinds and ends at `kind_p != kind_g` -> False, the same verdict.",
    "verify.x__structures_equal__mutmut_142": "When only kind_g is text (kind_p neither text nor choice), the later branches all end at `kind_p != kind_g` -> False, as `kind_p == kind_g and ...` does.",
    "verify.x__structures_equal__mutmut_143": "When exactly one side is text, no later branch accepts a text kind and the function returns False at `kind_p != kind_g`, as the original does.",
    "verify.x__structures_equal__mutmut_145": "Text on the p side alone falls through to `kind_p != kind_g` -> False (no later branch takes text); text on both sides is still caught by the kind_g test.",
    "verify.x__structures_equal__mutmut_146": "Same as mutant 145: a text p against a non-text g ends at `kind_p != kind_g` -> False; both text is caught by the kind_g test.",
    "verify.x__structures_equal__mutmut_148": "Text on the g side alone falls through to `kind_p != kind_g` -> False; both text is caught by the kind_p test.",
    "verify.x__structures_equal__mutmut_149": "Same as mutant 148: a text g against a non-text p ends at `kind_p != kind_g` -> False.",
    "verify.x__structures_equal__mutmut_151": "A choice p against a non-choice, non-text g ends at `kind_p != kind_g` -> False (no later branch takes a choice); both choices are caught by the kind_g test.",
    "verify.x__structures_equal__mutmut_152": "Same as mutant 151: a lone choice on the p side ends at `kind_p != kind_g` -> False.",
    "verify.x__structures_equal__mutmut_154": "A choice g against a non-choice, non-text p ends at `kind_p != kind_g` -> False; both choices are caught by the kind_p test.",
    "verify.x__structures_equal__mutmut_155": "Same as mutant 154: a lone choice on the g side ends at `kind_p != kind_g` -> False.",
    "verify.x__structures_equal__mutmut_252": "With proportional=True, _expressions_equal never reads a_text (only _numbers_equal does, on the non-proportional path).",
    "verify.x__structures_equal__mutmut_253": "With proportional=True, _expressions_equal never reads b_text.",
    "verify.x__structures_equal__mutmut_266": "With proportional=True, _expressions_equal never reads a_text, so 'XXXX' and '' behave alike.",
    "verify.x__structures_equal__mutmut_267": "With proportional=True, _expressions_equal never reads b_text, so 'XXXX' and '' behave alike.",
    "verify.x__structures_equal__mutmut_278": "Relations are compared with proportional=True, where a_text is never read.",
    "verify.x__structures_equal__mutmut_279": "Relations are compared with proportional=True, where b_text is never read.",
    "verify.x__structures_equal__mutmut_290": "Relations are compared with proportional=True, where a_text is never read.",
    "verify.x__structures_equal__mutmut_291": "Relations are compared with proportional=True, where b_text is never read.",
    "verify.x__structures_equal__mutmut_307": "percent is only ever tested for truth (`if percent`), and None is falsy like False.",
    "verify.x__structures_equal__mutmut_323": "Two sets never get this far: the earlier `\"set\" in (kind_p, kind_g)` branch returns for them, so only `union` reaches this test.",
    "verify.x__structures_equal__mutmut_324": "Same as mutant 323: set against set returns earlier, so dropping \"set\" from the tuple changes nothing.",
    "verify.x_grade__mutmut_19": "final is falsy only when it is the empty string, and _extract('') returns None, the value of the else branch.",
    "verify.x_grade__mutmut_51": "With fewer than two boxes `1 < parts <= len(boxes)` is false whatever parts is, and _top_level_parts never raises on a string reference.",
    "verify.x_grade__mutmut_53": "With exactly one box `1 < parts <= len(boxes)` is false whatever parts is, so computing parts for it changes nothing.",
    "verify.x_grade__mutmut_55": "parts = 2 only when there are at most one box, and then `1 < parts <= len(boxes)` is false as it is for parts = 1.",
    "verify.x_grade__mutmut_123": "The chosen letter and the one-letter reference are always decided in the calling process (string equality or _special_forms' letter rule), so the timeout is never used.",
    "verify.x_grade__mutmut_126": "The letter-against-letter comparison never reaches the worker (decided by string equality or the letter rule), so the default timeout is never used.",
    "verify.x_grade__mutmut_134": "Same call as mutant 123: a letter against a one-letter reference is decided before any worker, so the timeout argument is never read.",
    "verify.x_grade__mutmut_137": "Same call as mutant 126: a letter against a one-letter reference is decided before any worker, so the timeout argument is never read.",
    "verify.x_is_equiv__mutmut_8": "An empty normalised side reaches the worker as ('text', ''), and no non-empty answer has a structure (or labelled value) equal to it, so the verdict stays False.",
    "verify.x__expressions_equal__mutmut_42": "evalf at 15 (None) digits instead of 30: values are compared with a relative tolerance of 1e-8 (_close), so digits past the fifteenth never decide (a's value at a sample point)",
    "verify.x__expressions_equal__mutmut_44": "evalf at 15 (the default) digits instead of 30: values are compared with a relative tolerance of 1e-8 (_close), so digits past the fifteenth never decide (a's value at a sample point)",
    "verify.x__expressions_equal__mutmut_46": "evalf at 31 digits instead of 30: values are compared with a relative tolerance of 1e-8 (_close), so digits past the fifteenth never decide (a's value at a sample point)",
    "verify.x__expressions_equal__mutmut_49": "evalf at 15 (None) digits instead of 30: values are compared with a relative tolerance of 1e-8 (_close), so digits past the fifteenth never decide (b's value at a sample point)",
    "verify.x__expressions_equal__mutmut_51": "evalf at 15 (the default) digits instead of 30: values are compared with a relative tolerance of 1e-8 (_close), so digits past the fifteenth never decide (b's value at a sample point)",
    "verify.x__expressions_equal__mutmut_53": "evalf at 31 digits instead of 30: values are compared with a relative tolerance of 1e-8 (_close), so digits past the fifteenth never decide (b's value at a sample point)",
    "verify.x__numbers_equal__mutmut_48": "evalf at 15 (None) digits instead of 30: values are compared with a relative tolerance of 1e-8 (_close), so digits past the fifteenth never decide",
    "verify.x__numbers_equal__mutmut_49": "evalf at 31 digits instead of 30: values are compared with a relative tolerance of 1e-8 (_close), so digits past the fifteenth never decide",
    "verify.x__numbers_equal__mutmut_51": "evalf at 15 (None) digits instead of 30: values are compared with a relative tolerance of 1e-8 (_close), so digits past the fifteenth never decide",
    "verify.x__numbers_equal__mutmut_52": "evalf at 31 digits instead of 30: values are compared with a relative tolerance of 1e-8 (_close), so digits past the fifteenth never decide",
    "verify.x__expressions_equal__mutmut_66": "abs(y) <= 1e-12 for < 1e-12: differs only when a value at a random point is exactly 1e-12",
    "verify.x__expressions_equal__mutmut_96": "abs(ratio) >= 1e-12 for > 1e-12: differs only when the ratio at a random point is exactly 1e-12",
    "verify.x__numbers_equal__mutmut_53": "break for continue after an evaluation error: the candidates are b, b/100 and b*100, so when one cannot be evaluated neither can the others (and a is the same in each)",
    "verify.x__sentence_denies__mutmut_25": "a window end of pos + 301: it differs only when a clause separator ends exactly at pos + 301, which ends the clause at its start instead of at pos + 300; the characters between are that separator's own prefix (`s` of so, `bu` of but, `henc` of hence, ...), which no denial word is",
    "verify.x__special_forms__mutmut_92": "seconds subtracted instead of added: 60 * (60 h + m) - s is still one-to-one for seconds 0-59 and keeps 12-hour differences, so two clock readings compare alike (only seconds past 59 could tell)",
    "verify.x__special_forms__mutmut_94": "minutes subtracted instead of added: 3600 h - 60 m + s is still one-to-one for minutes and seconds 0-59 and keeps 12-hour differences, so two clock readings compare alike (only minutes past 59 could tell)",
    "verify.x__normalize__mutmut_245": "lstrip for the last rstrip after a modulus is removed: the trailing space it leaves goes with the .strip() a few lines on, and no rule between reads it; only an answer that is nothing but `\\ ` and a modulus (`\\ (\\mod 5)`) ends differently (`\\` against an empty answer), and no answer is that",
    "verify.x__normalize__mutmut_397": "`XX\\ XX` for the `\\ ` removed inside a thousands group: the line before the unit rules makes every lone `\\ ` a space; a new one between digit groups comes only from unwrapping a text command after a stray backslash (`10\\\\text{ 000}`, a LaTeX row break then the word text) or one whose argument ends in `\\}` (`\\text{10\\} 000`), broken LaTeX that no answer writes",
    "verify.x__normalize__mutmut_398": "`XXXX` for the `\\ ` removed inside a thousands group: as mutant 394, a lone `\\ ` between digit groups comes only from unwrapping broken LaTeX (`10\\\\text{ 000}`, `\\text{10\\} 000`)",
    "verify.x__normalize__mutmut_415": "a pattern that never matches in the second `\\ ` to space: every lone `\\ ` became a space before the text commands were unwrapped, and unwrapping makes a new one only after a stray backslash (`a\\\\text{ b}`, a LaTeX row break then the word text) or from an argument ending in `\\}` (`\\text{a\\} b`), broken LaTeX that no answer writes",
    "verify.x__normalize__mutmut_416": "`XX XX` as the replacement in the second `\\ ` to space: as mutant 412, a lone `\\ ` reaches it only from unwrapping broken LaTeX (`a\\\\text{ b}`, `\\text{a\\} b`)",
    "verify.x__normalize__mutmut_362": "four rounds of unwrapping text commands instead of three: differs only for text commands nested four deep (`\\text{\\textbf{\\textit{\\emph{A}}}}`); the rounds bound the work, and no answer nests that deep",
    # analyze.py
    "analyze.x_format_differences__mutmut_14": "pass@1's upper bound left to format_ci's default: that default is 1, the bound given",
    "analyze.x_format_differences__mutmut_28": "the greedy difference's upper bound left to the default: as above",
    "analyze.x_pass_at_k__mutmut_3": "n + c < k for n - c < k: the early 1.0 is a shortcut, math.comb(n - c, k) is 0 when k > n - c",
    # the validation split is a fixed fifth by a salted hash; which fifth is no rule of the study
    "analyze.x_is_validation__mutmut_8": "salt `XXvalidation:XX`: another fixed fifth, as independent of the held-out quarter",
    "analyze.x_is_validation__mutmut_9": "salt `VALIDATION:`: as above",
    "analyze.x_is_validation__mutmut_10": "hash read in base 17: another fixed fifth",
    "analyze.x_is_validation__mutmut_13": "remainder 1 for 0: another fixed fifth",
    # prerl.py: the sampler gets 2-D logits [rows, vocabulary], where dim 1 is dim -1
    # prerl.py: rewards are 0 or 1 (verify.rewards), never exactly 0.5
    "prerl.x_advantages_for__mutmut_3": ">= 0.5 for > 0.5 as 'correct': differs only for a reward of exactly 0.5",
    # prerl.py: optimizer_step's loss is only tested for being finite
    "prerl.x_optimizer_step__mutmut_1": "default loss 1.0 for 0.0: both finite, so no step is skipped either way",
    # prerl.py: trim(left=None) takes the same branch as left=False
    "prerl.x_scored_logprobs__mutmut_4": "trim(..., left=None) for left=False on responses: None is falsy, the same branch",
    "prerl.x_pick_next_token__mutmut_4": "argmax(+1) for argmax(-1): the same dimension of 2-D logits",
    "prerl.x_pick_next_token__mutmut_12": "softmax over dim +1 for -1: the same dimension of 2-D logits",
    "prerl.x_pick_next_token__mutmut_14": "nucleus filter also at top_p 1.0: keeps every token (a skipped no-op, not a rule)",
    "prerl.x_pick_next_token__mutmut_15": "nucleus filter for top_p < 2: as above",
    "prerl.x_pick_next_token__mutmut_19": "sort() without dim: sorts the last dimension, as sort(-1)",
    "prerl.x_pick_next_token__mutmut_21": "sort over dim +1 for -1: the same dimension of 2-D logits",
    "prerl.x_pick_next_token__mutmut_27": "cumsum over dim +1 for -1: the same dimension of 2-D logits",
    "prerl.x_pick_next_token__mutmut_29": ">= for > top_p: differs only when a nucleus' float mass equals top_p exactly",
    "prerl.x_pick_next_token__mutmut_37": "scatter over dim +1 for -1: the same dimension of 2-D logits",
    "prerl.x_pick_next_token__mutmut_46": "cumsum over dim +1 for -1: as above",
    "prerl.x_pick_next_token__mutmut_50": "u moved to device None: the CPU, where the tests run",
    "prerl.x_pick_next_token__mutmut_51": "u cast to dtype None: u * cdf promotes to float64 either way",
    "prerl.x_pick_next_token__mutmut_52": "u moved without a device: stays on the CPU, where the tests run",
    "prerl.x_pick_next_token__mutmut_53": "u not cast: u * cdf promotes to float64 either way",
    "prerl.x_pick_next_token__mutmut_66": "clamp at V + 1 for V - 1: u < 1 keeps every draw below the total mass, the clamp never acts",
    "prerl.x_pick_next_token__mutmut_67": "probs.shape[+1] for [-1]: the same dimension of 2-D logits",
    # trim only saves compute: the scores ignore padded columns (test_padding_invariance)
    "prerl.x_trim__mutmut_6": "ids[:, :1] when no column is real: unreachable, every scored row has a token",
    "prerl.x_trim__mutmut_7": "mask[:, :1] when no column is real: as above",
    "prerl.x_trim__mutmut_9": "no left trim of prompts: the extra columns are padding, masked out",
    "prerl.x_trim__mutmut_10": "left trim of responses: their first column is always real, nothing is cut",
    "prerl.x_trim__mutmut_17": "one more padded column kept: masked out",
    # device= arguments: the tests run on a CPU, where device None is the response's device
    "prerl.x_response_mask_from_positions__mutmut_7": "EOS ids made with device None: the CPU, the responses' device in the tests",
    "prerl.x_response_mask_from_positions__mutmut_9": "EOS ids made without device: as above",
    "prerl.x_response_mask_from_positions__mutmut_32": "positions made with device None: as above",
    "prerl.x_response_mask_from_positions__mutmut_34": "positions made without device: as above",
    # prerl.py: the train / held-out split is a fixed quarter by hash; which quarter is no rule of the method
    "prerl.x_is_held_out__mutmut_7": "hash read in base 17: another fixed quarter (24.6% of 10k problems), disjoint and deterministic alike",
    "prerl.x_is_held_out__mutmut_10": "remainder 1 for 0: another fixed quarter of the problems, disjoint and deterministic alike",
    "prerl.x_make_problems__mutmut_8": "201 * n draws for 200 * n: a bound on attempts; differs only when that side holds fewer than n problems and one shows up in the extra draws",
    # prerl.py: checkpoints and evaluation. In one process DIST is None: the sharded (torchrun) branches never run,
    # and rollout_share yields (items, 0), sum_over_ranks the value; test_distributed.py runs them under torchrun
    "prerl.x_load_checkpoint__mutmut_3": "torchrun only: load_sharded's path, in the branch one process never takes",
    "prerl.x_load_checkpoint__mutmut_4": "torchrun only: load_sharded's model, as mutmut_3",
    "prerl.x_load_checkpoint__mutmut_5": "torchrun only: load_sharded's optimizer, as mutmut_3",
    "prerl.x_load_checkpoint__mutmut_6": "torchrun only: load_sharded's dist, as mutmut_3",
    "prerl.x_load_checkpoint__mutmut_7": "torchrun only: load_sharded without path, as mutmut_3",
    "prerl.x_load_checkpoint__mutmut_8": "torchrun only: load_sharded without model, as mutmut_3",
    "prerl.x_load_checkpoint__mutmut_9": "torchrun only: load_sharded without optimizer, as mutmut_3",
    "prerl.x_load_checkpoint__mutmut_10": "torchrun only: load_sharded without dist, as mutmut_3",
    "prerl.x_save_checkpoint__mutmut_11": "torchrun only: states_to_save uses path (the shards' folder) only under torchrun",
    "prerl.x_save_checkpoint__mutmut_14": "torchrun only: states_to_save writes the step into the shards only under torchrun",
    "prerl.x_save_checkpoint__mutmut_15": "torchrun only: states_to_save writes the RNG into the shards only under torchrun",
    "prerl.x_save_checkpoint__mutmut_17": "torchrun only: dist None is what one process passes",
    "prerl.x_evaluate__mutmut_1": "chunk size 33 for 32: each problem's key is its index, so the chunk size changes no draw, only memory",
    "prerl.x_evaluate__mutmut_5": "torchrun only: rollout_share gathers and frees the model's layers only under torchrun",
    "prerl.x_evaluate__mutmut_7": "torchrun only: dist None is what one process passes",
    "prerl.x_evaluate__mutmut_8": "torchrun only: may_be_empty is read by rank_share, under torchrun",
    "prerl.x_evaluate__mutmut_9": "torchrun only: release frees the root's weights, under torchrun",
    "prerl.x_evaluate__mutmut_13": "torchrun only: as mutmut_8",
    "prerl.x_evaluate__mutmut_14": "torchrun only: as mutmut_9",
    "prerl.x_evaluate__mutmut_15": "torchrun only: as mutmut_8",
    "prerl.x_evaluate__mutmut_16": "torchrun only: as mutmut_9",
    "prerl.x_evaluate__mutmut_51": "with_format=None for False: both falsy, no format bonus either way",
    "prerl.x_evaluate__mutmut_67": "torchrun only: sum_over_ranks(value, None) is the value, as in one process",
    # prerl.py: sample's device, on a machine without a GPU (where the tests run) None means the CPU
    "prerl.x_sample__mutmut_1": "device None for the model's: tensors made on the default device, the CPU, where the model is",
    "prerl.x_sample__mutmut_10": "the prompts encoded onto device None: the CPU, as above",
    "prerl.x_sample__mutmut_20": "the uniforms moved to None: .to(None) keeps them where they are, on the CPU",
    "prerl.x_sample__mutmut_104": "the EOS ids on device None: the CPU, as above",
    "prerl.x_sample__mutmut_106": "the EOS ids without device: as mutmut_104",
    "prerl.x_sample__mutmut_27": "bf16 weights packed on the plain path too: the plain path trains fp32, which is never packed (test_machinery.py's plain-run test, outside a --files prerl.py run, counts the call)",
    "prerl.x_conditional_logprobs__mutmut_1": "shared prompts on the plain path and the plain forward on the machinery's: the same log-probs and gradients either way (test_machinery.py's agreement and plain-run tests, outside a --files prerl.py run, tell them apart)",
    "prerl.x_conditional_logprobs__mutmut_7": "torchrun only: dist None is what one process passes",
    "prerl.x_sample__mutmut_28": "weights never packed: the packed product is bit-equal to F.linear, so the same tokens (the point of it; test_machinery.py checks both)",
    # prerl.py: a reference model exists only with --kl-coef > 0 (train loads it then, and only then)
    "prerl.x_accumulate_gradients__mutmut_2": "`or` for `and` in use_kl: the reference model is loaded exactly when kl_coef > 0, so both are true or both false",
    "prerl.x_accumulate_gradients__mutmut_4": "kl_coef >= 0 for > 0 in use_kl: as mutmut_2, a reference model means kl_coef > 0",
    "prerl.x_policy_loss__mutmut_30": "KL term at kl_coef >= 0: ref_lp is passed only when kl_coef > 0 (accumulate_gradients' use_kl)",
    "prerl.x_accumulate_gradients__mutmut_80": "counts.get's default 1 for 0: every caller passes counts with 'clipped' already set (policy_updates: 0)",
    # prerl.py: torchrun-only arguments, in one process (test_distributed.py's launch runs them, outside a --files run)
    "prerl.x_accumulate_gradients__mutmut_35": "torchrun only: match_passes(None, ...) returns at once with dist None, as in one process",
    "prerl.x_accumulate_gradients__mutmut_36": "torchrun only: match_passes' pass count is read only under torchrun",
    "prerl.x_accumulate_gradients__mutmut_37": "torchrun only: match_passes' start token is read only under torchrun",
    "prerl.x_accumulate_gradients__mutmut_38": "torchrun only: dist None is what one process passes",
    "prerl.x_optimizer_step__mutmut_3": "torchrun only: before_optimizer_step reads the model only under torchrun (release_root)",
    "prerl.x_optimizer_step__mutmut_5": "torchrun only: dist None is what one process passes",
    # prerl.py: data and prompts
    "prerl.x_eval_problems__mutmut_17": "seed - 1 for seed + 1: another draw from the held-out side, still disjoint from training and the same on every call",
    "prerl.x_eval_problems__mutmut_18": "seed + 2 for seed + 1: as mutmut_17",
    "prerl.x_resume_problem__mutmut_14": "mmap=None: the checkpoint read whole instead of memory-mapped, the same config and step (memory only)",
    "prerl.x_resume_problem__mutmut_16": "no mmap: as mutmut_14",
    "prerl.x_encode_prompts__mutmut_6": "prompts moved to device None: they stay on the CPU, where the tests run",
    "prerl.x_format_prompt__mutmut_21": "apply_chat_template(tokenize=None) for False: transformers reads None as no, the same text",
    "prerl.x_resume_problem__mutmut_17": "mmap=False: the checkpoint read whole instead of memory-mapped, the same config and step (memory only)",
    # prerl.py's loss side: the devices of one process on a CPU, and a clamp the lengths never reach
    "prerl.x_loss_plan__mutmut_15": "advantages moved to None: .to(None) keeps them on the CPU, the batch's device in the tests",
    "prerl.x_rows_that_count__mutmut_8": "the ended flags moved to None: they stay on the CPU, where the rows are",
    "prerl.x_rows_that_count__mutmut_19": "the row numbers made on device None: the CPU, where the rows are",
    "prerl.x_rows_that_count__mutmut_21": "the row numbers made without device: the CPU, as mutmut_19",
    "prerl.x_rows_that_count__mutmut_23": "the mini-batch's rows made on device None: the CPU, as mutmut_19",
    "prerl.x_rows_that_count__mutmut_25": "the mini-batch's rows made without device: the CPU, as mutmut_19",
    "prerl.x_overlong_penalties__mutmut_4": "no lower clamp for -1: a response is at most --max-new-tokens long, so (L_max - L - buffer) / buffer >= -1 already",
    "prerl.x_overlong_penalties__mutmut_17": "clamp at -2 for -1: as mutmut_4, the value never goes below -1",
    # machinery.py: the tests run on a CPU, where device None (or no device) is the CPU, and torch's defaults are these dtypes
    "machinery.x_element_bits__mutmut_6": "arange(dtype=None): an integer arange is int64 anyway",
    "machinery.x_element_bits__mutmut_7": "arange on device None: the CPU, where the tests run",
    "machinery.x_element_bits__mutmut_9": "arange without dtype: int64 anyway",
    "machinery.x_element_bits__mutmut_10": "arange without device: the CPU, where the tests run",
    "machinery.x_stochastic_round_to_bf16__mutmut_5": "randint(dtype=None): int64 draws of the same values (a test compares), cast to int32 before use",
    "machinery.x_stochastic_round_to_bf16__mutmut_6": "randint on device None: the CPU, where the tests run",
    "machinery.x_stochastic_round_to_bf16__mutmut_11": "randint without dtype: as mutmut_5",
    "machinery.x_stochastic_round_to_bf16__mutmut_12": "randint without device: the CPU, where the tests run",
    "machinery.x_adamw_update__mutmut_29": "element_bits on device None: the CPU, where the tests run",
    "machinery.x_adamw_update__mutmut_33": "element_bits without device: its default, the CPU",
    "machinery.xǁStochasticRoundingAdamWǁstep__mutmut_105": "scalar tensors with dtype None: a Python float becomes float32 anyway",
    "machinery.xǁStochasticRoundingAdamWǁstep__mutmut_106": "scalar tensors on device None: the CPU, where the tests run",
    "machinery.xǁStochasticRoundingAdamWǁstep__mutmut_108": "scalar tensors without dtype: float32 anyway",
    "machinery.xǁStochasticRoundingAdamWǁstep__mutmut_109": "scalar tensors without device: the CPU, where the tests run",
    "machinery.xǁStochasticRoundingAdamWǁ__init____mutmut_3": "default rounding seed 1 for 0: every caller (prerl, the probe's timing) passes a seed or needs none in particular",
    # machinery.py: torch's Optimizer.load_state_dict reads only "state" and "param_groups"
    "machinery.xǁStochasticRoundingAdamWǁload_state_dict__mutmut_3": "old checkpoints' rounding_rng not popped: torch's load_state_dict ignores keys besides state and param_groups",
    "machinery.xǁStochasticRoundingAdamWǁload_state_dict__mutmut_6": "pop of another key: as mutmut_3",
    "machinery.xǁStochasticRoundingAdamWǁload_state_dict__mutmut_7": "pop of another key: as mutmut_3",
    # machinery.py: run_precision reads a checkpoint as prerl's resume_problem does (see the prerl entries above)
    "machinery.x_run_precision__mutmut_11": "map_location None for 'cpu': the same on a machine without a GPU, where the tests run",
    "machinery.x_run_precision__mutmut_12": "mmap=None: read whole instead of memory-mapped, the same config and weights (memory only)",
    "machinery.x_run_precision__mutmut_13": "weights_only=None (torch's default, True): a checkpoint holds only allowed types",
    "machinery.x_run_precision__mutmut_15": "no map_location: as mutmut_11",
    "machinery.x_run_precision__mutmut_16": "no mmap: as mutmut_12",
    "machinery.x_run_precision__mutmut_17": "no weights_only: as mutmut_13",
    "machinery.x_run_precision__mutmut_20": "mmap=False: as mutmut_12",
    "machinery.x_run_precision__mutmut_21": "weights_only=True: as mutmut_13",
    "machinery.x_run_precision__mutmut_37": "a recorded fp32 read from the weights instead: an fp32 run's weights and adapters are fp32, the same answer",
    "machinery.x_run_precision__mutmut_38": "as mutmut_37",
    # machinery.py: memory_plan of a text-only model, whose get_text_config() is the config itself
    "machinery.x_memory_plan__mutmut_27": "the config instead of its text config: the same object for a text-only causal LM",
    "machinery.x_memory_plan__mutmut_28": "get_text_config() always called: every transformers 5 config has it",
    "machinery.x_memory_plan__mutmut_29": "as mutmut_27",
    "machinery.x_memory_plan__mutmut_33": "as mutmut_27",
    "machinery.x_memory_plan__mutmut_34": "as mutmut_27",
    # machinery.py: add_lora's arguments that restate peft's defaults
    "machinery.x_add_lora__mutmut_13": "no lora_dropout: peft's default is 0.0, the value given",
    "machinery.x_add_lora__mutmut_14": "no bias: peft's default is 'none', the value given",
    "machinery.x_add_lora__mutmut_26": "fork_rng(devices=None): the adapters are drawn on the CPU generator, which is forked either way",
    "machinery.x_add_lora__mutmut_39": "no autocast_adapter_dtype: peft's default is True, the value given",
    # machinery.py: in one process the state dicts are whole and on the CPU already; these options act under torchrun only
    "machinery.x_full_state__mutmut_2": "torchrun only: full_state_dict=None gathers nothing in one process, where nothing is sharded",
    "machinery.x_full_state__mutmut_3": "torchrun only: cpu_offload=None moves nothing in one process, where the tensors are on the CPU",
    "machinery.x_full_state__mutmut_4": "torchrun only: as mutmut_2",
    "machinery.x_full_state__mutmut_5": "torchrun only: as mutmut_3",
    "machinery.x_full_state__mutmut_6": "torchrun only: as mutmut_2",
    "machinery.x_full_state__mutmut_7": "torchrun only: as mutmut_3",
    "machinery.x_full_state__mutmut_1": "torchrun only: options=None, torch's defaults, differ from whole-on-the-CPU only for sharded models",
    "machinery.x_full_state__mutmut_11": "torchrun only: as mutmut_1",
    "machinery.x_full_state__mutmut_14": "torchrun only: as mutmut_1",
    "machinery.x_whole_model__mutmut_6": "torchrun only: as full_state's mutmut_2",
    "machinery.x_whole_model__mutmut_7": "torchrun only: as full_state's mutmut_3",
    "machinery.x_whole_model__mutmut_8": "torchrun only: as full_state's mutmut_2",
    "machinery.x_whole_model__mutmut_9": "torchrun only: as full_state's mutmut_3",
    "machinery.x_whole_model__mutmut_10": "torchrun only: as full_state's mutmut_2",
    "machinery.x_whole_model__mutmut_11": "torchrun only: as full_state's mutmut_3",
    "machinery.x_whole_model__mutmut_3": "torchrun only: options=None, torch's defaults, differ from whole-on-the-CPU only for sharded models",
    "machinery.x_whole_model__mutmut_5": "torchrun only: as mutmut_3",
    "machinery.x_load_adapter_state__mutmut_3": "strict=None: torch reads it as false, the same non-strict load",
    # machinery.py: match_passes' one start token
    "machinery.x_match_passes__mutmut_16": "torch.full(dtype=None) with an integer fill: int64 anyway",
    "machinery.x_match_passes__mutmut_17": "the token on device None: the CPU, where the tests run",
    "machinery.x_match_passes__mutmut_20": "torch.full without dtype: as mutmut_16",
    "machinery.x_match_passes__mutmut_21": "the token without device: the CPU, where the tests run",
    "machinery.x_stochastic_round_to_bf16__mutmut_8": "randint(2^16, shape) for randint(0, 2^16, shape): torch's low defaults to 0, the same draws",
    "machinery.x_model_config__mutmut_5": "for_model(**shape) with model_type left in: passed by keyword, the same config",
    "machinery.x_match_passes__mutmut_31": "minus a zero for plus a zero: every gradient is still zero",
    "machinery.x_size__mutmut_4": "> for >= GIB / 10: a byte count is an integer and GIB / 10 is not",
}

TARGET = 0.95


def mangled(name):
    """mutmut's name of a scored function: x_f for a function f, xǁClassǁmethod for "Class.method"."""
    return "xǁ" + name.replace(".", "ǁ") if "." in name else "x_" + name


def function_of(mutant):
    """The SCORED name of a mutant: "f" from prerl.x_f__mutmut_3, "Class.method" from machinery.xǁClassǁmethod__mutmut_3."""
    name = mutant.split(".", 1)[1].split("__mutmut_")[0]
    return name[2:] if name.startswith("x_") else name[1:].strip("ǁ").replace("ǁ", ".")


def mutant_globs(files):
    return [f"{file[:-3]}.{mangled(name)}__mutmut_*" for file in files for name in SCORED[file]]


def scored_results(files, root="."):
    """{mutant name: status} for the scored functions of files, from mutmut's per-file result files."""
    status = {}
    for file in files:
        pattern = re.compile(r"^%s\.(%s)__mutmut_\d+$" % (file[:-3], "|".join(re.escape(mangled(n)) for n in SCORED[file])))
        path = os.path.join(root, "mutants", file + ".meta")
        if not SCORED[file] or not os.path.exists(path):
            continue
        with open(path) as f:
            codes = json.load(f)["exit_code_by_key"]
        for name, code in codes.items():
            if pattern.match(name):
                status[name] = {1: "killed", 3: "killed", 0: "survived", None: "not checked", 33: "no tests",
                                36: "timeout", 24: "timeout", -24: "timeout", 152: "timeout"}.get(code, f"exit {code}")
    return status


DATA_FOLDERS = ["results"]   # read by tests; copied beside the code of a --files run


def prepared_copy(files):
    """.mutate/<files>/: this checkout's top-level Python files and a pyproject.toml whose [tool.mutmut] is
    this one's, but mutates only files and selects only their tests (TESTS_OF). mutmut reads its
    configuration from the folder it runs in, so a narrower run runs there; its results stay there."""
    import shutil
    import tomllib
    root = os.path.join(".mutate", "+".join(file[:-3] for file in files))
    os.makedirs(root, exist_ok=True)
    with open("pyproject.toml", "rb") as f:
        config = tomllib.load(f)["tool"]["mutmut"]
    others = sorted(name for name in os.listdir(".") if name.endswith(".py") and name not in files)
    for name in [*files, *others]:
        shutil.copy2(name, os.path.join(root, name))   # mtimes kept: mutmut regenerates only what changed
    folders = [name for name in DATA_FOLDERS if os.path.isdir(name)]
    for name in folders:                               # data the tests read (a recorded study's results)
        shutil.copytree(name, os.path.join(root, name), dirs_exist_ok=True)
    config.update(source_paths=list(files), also_copy=[name for name in others if not name.startswith("test_")] + folders,
                  pytest_add_cli_args_test_selection=[test for file in files for test in TESTS_OF[file]],
                  pytest_add_cli_args=config.get("pytest_add_cli_args", []) + [
                      arg for file in files for test in LEFT_OUT.get(file, []) for arg in ("--deselect", test)],
                  use_git_change_detection=False)   # the copy is no git checkout of its own
    text = "[tool.mutmut]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in config.items())
    path = os.path.join(root, "pyproject.toml")
    old = None
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
    if old != text:
        with open(path, "w") as f:
            f.write(text)
    return root


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--children", type=int, default=2, help="parallel mutant workers (default 2)")
    parser.add_argument("--files", default="", help="comma-separated files, e.g. verify.py,analyze.py: mutate only "
                        "these, against only their tests, in .mutate/<files>/ (default: every file, here)")
    parser.add_argument("--only", default="", help="comma-separated function names (Class.method for a method): mutate just these")
    parser.add_argument("--survivors", action="store_true", help="rerun only the last run's unkilled, unlisted mutants")
    parser.add_argument("--report-only", action="store_true", help="score the last run without running mutmut")
    args = parser.parse_args()
    files = list(filter(None, args.files.split(","))) or list(SCORED)
    unknown = [file for file in files if file not in SCORED]
    if unknown:
        parser.error(f"--files: {', '.join(unknown)} not among {', '.join(SCORED)}")
    root = prepared_copy(files) if args.files else "."
    only = set(filter(None, args.only.split(",")))
    if not args.report_only:
        names = [g for g in mutant_globs(files) if not only or function_of(g) in only]
        if args.survivors:
            names = [m for m, s in scored_results(files, root).items() if s not in ("killed", "timeout")
                     and m not in EQUIVALENT and (not only or function_of(m) in only)]
        # one thread per worker: torch's thread pool would otherwise oversubscribe the cores (and deadlock after fork)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        if names:
            subprocess.run(["mutmut", "run", "--max-children", str(args.children), *names], env=env, cwd=root)
    status = scored_results(files, root)
    run_files = {m.split(".")[0] for m in status}
    stale = sorted(m for m in set(EQUIVALENT) - set(status) if m.split(".")[0] in run_files)
    unchecked = sorted(m for m, s in status.items() if s == "not checked")
    print(f"\n{len(status)} mutants in the scored functions, {len(unchecked)} not run yet (--only, or an interrupted run)"
          + (f"; what one changed: (cd {root} && mutmut show NAME)" if root != "." else ""))
    scores = []
    for file in files:
        mine = {m: s for m, s in status.items() if m.startswith(file[:-3] + ".")}
        equivalent = {m: s for m, s in mine.items() if m in EQUIVALENT}
        counted = {m: s for m, s in mine.items() if m not in EQUIVALENT and s != "not checked"}
        killed = sum(s in ("killed", "timeout") for s in counted.values())
        survivors = sorted(m for m, s in counted.items() if s not in ("killed", "timeout"))
        for m in survivors:
            print(f"  {counted[m]:>11}  {m}")
        for m in sorted(m for m, s in equivalent.items() if s in ("killed", "timeout")):
            print(f"  listed as equivalent but killed (remove it from EQUIVALENT): {m}")
        if mine:
            scores.append(killed / max(1, len(counted)))
            print(f"{file}: {len(mine)} mutants, {killed} killed, {len(equivalent)} equivalent, {len(survivors)} surviving, "
                  f"{len(mine) - len(counted) - len(equivalent)} not run: {killed}/{len(counted)} = "
                  f"{100 * scores[-1]:.1f}% of non-equivalent mutants killed (target {100 * TARGET:.0f}%)")
    for m in stale if not unchecked else []:
        print(f"  listed as equivalent but no longer generated (remove it from EQUIVALENT): {m}")
    return 0 if scores and min(scores) >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
