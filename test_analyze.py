"""
Tests of analyze.py and the diagnostics: pass@k, behaviour counts, gradient alignment, t-intervals,
steps to a threshold, multi-seed studies and their resume, the lr sweep on a validation split.

    python -m pytest -q test_analyze.py
"""

import json
import math

import pytest
import torch

import prerl
import verify
from conftest import (real_prompt, reference_logprobs, refused_line,
                      tiny_model, tiny_tokenizer, toy_batch, write_sums)

# ---------------------------------------------------------------------------
# analyze.py: pass@k, behaviours, gradient alignment

import itertools  # noqa: E402

import analyze  # noqa: E402


def brute_force_pass_at_k(n, c, k):
    """Share of all size-k subsets of n samples (c of them correct) that hold a correct one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 6])
def test_pass_at_k_matches_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert analyze.pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_edges():
    assert analyze.pass_at_k(8, 0, 4) == 0.0        # nothing correct
    assert analyze.pass_at_k(8, 8, 1) == 1.0        # all correct
    assert analyze.pass_at_k(8, 5, 4) == 1.0        # k > n - c: every subset holds a correct one
    assert analyze.pass_at_k(4, 1, 1) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="pass@5 needs at least 5 samples, got 4"):
        analyze.pass_at_k(4, 1, 5)


@pytest.mark.parametrize("text,transitions,reflections", [
    ("Wait, let me check. Hmm... However, alternatively we could await it.", 2, 3),
    ("We are waiting; the awaited result is nowhere; Otherwise-fine.", 1, 0),
    ("WAIT. Let me verify this. Double-check: on the other hand, instead of that...", 2, 3),
    ("No behaviour here: 3 + 4 = 7.", 0, 0),
    ("verify verified verifying", 0, 1),
])
def test_behaviour_counts_use_word_boundaries(text, transitions, reflections):
    assert analyze.count_behaviours(text) == (transitions, reflections)


def test_alignment_equals_hand_dot_product_of_flattened_gradients():
    model = tiny_model()
    prompt, prompt_mask = torch.tensor([[20, 21, 22]]), torch.ones(1, 3, dtype=torch.long)
    response, mask = torch.tensor([[10, 11, 12, 13, 2]]), torch.ones(1, 5, dtype=torch.long)
    got = analyze.gradient_alignment(model, prompt, prompt_mask, response, mask, start_id=1)
    params = list(model.parameters())
    cond = torch.autograd.grad(reference_logprobs(model, [20, 21, 22], [10, 11, 12, 13, 2]).sum(), params, allow_unused=True)
    pre = torch.autograd.grad(reference_logprobs(model, [1], [10, 11, 12, 13, 2]).sum(), params, allow_unused=True)
    flat = lambda grads: torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])
    g_cond, g_pre = flat(cond), flat(pre)
    assert got["inner_product"] == pytest.approx(float(g_cond @ g_pre), rel=1e-9)
    assert got["cosine"] == pytest.approx(float(g_cond @ g_pre / (g_cond.norm() * g_pre.norm())), rel=1e-9)
    assert all(p.grad is None for p in params)  # nothing left behind


def test_evaluate_samples_on_tiny_model(tiny_model_folder, monkeypatch):
    model, tokenizer = prerl.load_model(str(tiny_model_folder), torch.device("cpu"))
    problems = prerl.load_problems(str(tiny_model_folder / "toy.jsonl"))[:3]   # answers "0", "1", "2"
    cfg = prerl.Config(max_new_tokens=5, temperature=1.0)

    def first_c_of_each_group_correct(texts, golds):   # problem with answer c: c of its 4 samples correct
        return [float(golds[:i].count(g) < int(g)) for i, g in enumerate(golds)]
    monkeypatch.setattr(verify, "rewards", first_c_of_each_group_correct)
    result = analyze.evaluate_samples(model, tokenizer, problems, cfg, n=4)
    assert sorted(result["pass_at_k"]) == [1, 2, 4]
    for k in (1, 2, 4):
        assert result["pass_at_k"][k] == pytest.approx(sum(brute_force_pass_at_k(4, c, k) for c in (0, 1, 2)) / 3)
    assert result["avg_at_n"] == pytest.approx((0 + 1 / 4 + 2 / 4) / 3)
    assert 0 <= result["parseable_share"] <= 1 and result["mean_response_tokens"] <= 5


# ---------------------------------------------------------------------------
# Multi-seed studies (t-intervals, steps to a threshold, resume per run), lr sweep on a
# validation split, per-step diagnostics, the two-step word-problem family


def test_t_interval_hand_worked():
    # [0.5, 0.6, 0.7]: mean 0.6, s = 0.1, s / sqrt(3) = 0.0577350, t(0.975, 2) = 4.302653 -> half-width 0.248414
    mean, low, high = analyze.mean_ci([0.5, 0.6, 0.7])
    assert (mean, low, high) == pytest.approx((0.6, 0.6 - 0.248414, 0.6 + 0.248414), abs=1e-6)
    # [1..5]: mean 3, s = sqrt(2.5), s / sqrt(5) = 0.707107, t(0.975, 4) = 2.776445 -> half-width 1.963243
    assert analyze.mean_ci([1, 2, 3, 4, 5]) == pytest.approx((3.0, 3 - 1.963243, 3 + 1.963243), abs=1e-6)
    assert analyze.mean_ci([0.4]) == (0.4, None, None)            # one seed: no interval
    with pytest.raises(ValueError, match="at least 1 degree of freedom"):
        analyze.t_quantile_975(0)


def test_intervals_are_cut_to_the_range_the_quantity_can_take():
    assert analyze.format_ci((0.9, 0.7, 1.1)) == "0.900 [0.700, 1.000]"          # accuracy: at most 1
    assert analyze.format_ci((0.1, -0.2, 0.4)) == "0.100 [0.000, 0.400]"
    assert analyze.format_ci((6.7, -0.5, 13.8), 0, 20, digits=1) == "6.7 [0.0, 13.8]"   # steps: 0 to the budget
    assert analyze.format_ci((0.05, -0.2, 0.3), -1, 1, sign="+") == "+0.050 [-0.200, +0.300]"
    assert analyze.format_ci((0.4, None, None)) == "0.400"


def test_paired_differences_by_seed_hand_worked():
    def run(seed, pass1, greedy):
        return {"seed": seed, "eval": {"pass_at_k": {"1": pass1}}, "curve": [(0, 0.3), (10, 0.99), (20, greedy)]}
    runs = {"grpo": [run(0, 0.5, 0.50), run(1, 0.6, 0.40), run(2, 0.7, 0.90)],
            "dsrl": [run(2, 1.0, 0.85), run(0, 0.6, 0.60), run(1, 0.8, 0.50), run(7, 0.0, 0.0)]}   # seed 7: unpaired
    d = analyze.paired_differences(runs, "grpo")
    assert set(d) == {"dsrl"} and d["dsrl"]["seeds"] == 3
    # pass@1: differences 0.1, 0.2, 0.3 -> mean 0.2, s = 0.1, half-width t(0.975, 2) * 0.1 / sqrt(3) = 0.248414
    assert d["dsrl"]["pass@1"] == pytest.approx((0.2, 0.2 - 0.248414, 0.2 + 0.248414), abs=1e-6)
    # greedy: differences 0.1, 0.1, -0.05 -> mean 0.05, s = 0.0866025, s / sqrt(3) = 0.05, half-width 0.2151326
    assert d["dsrl"]["greedy"] == pytest.approx((0.05, 0.05 - 0.2151326, 0.05 + 0.2151326), abs=1e-6)
    assert "| dsrl - grpo (3 seeds) | +0.200 [-0.048, +0.448] |" in analyze.format_differences(d, "grpo")


def student_t_cdf(x, df, intervals=4000):
    """P(T <= x) for x >= 0 by Simpson's rule on the t density: independent of the table."""
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    density = lambda t: math.exp(log_norm - (df + 1) / 2 * math.log1p(t * t / df))
    h = x / intervals
    total = density(0) + density(x) + sum((4 if i % 2 else 2) * density(i * h) for i in range(1, intervals))
    return 0.5 + total * h / 3


@pytest.mark.parametrize("df", [1, 2, 3, 5, 10, 29, 30, 31, 45, 200])
def test_t_quantile_is_the_975_quantile(df):
    assert student_t_cdf(analyze.t_quantile_975(df), df) == pytest.approx(0.975, abs=2e-6)


def test_steps_to_threshold_on_a_synthetic_curve():
    curve = [(10, 0.55), (0, 0.2), (5, 0.4), (15, 0.5), (20, 0.7)]   # order does not matter; a dip after 10
    assert analyze.steps_to_threshold(curve, 0.5) == 10
    assert analyze.steps_to_threshold(curve, 0.7) == 20
    assert analyze.steps_to_threshold(curve, 0.2) == 0               # the start model already there
    assert analyze.steps_to_threshold(curve, 0.71) is None           # never reached
    runs = {"m": [{"seed": s, "lr": 1e-5, "curve": c, "step_seconds": 1.0, "eval": {"pass_at_k": {"1": 0.5, "2": 0.6}}}
                  for s, c in enumerate([curve, [(0, 0.2), (10, 0.75), (20, 0.8)]])]}
    row = analyze.summarize(runs, 0.7, budget=20)["m"]
    assert row["steps"] == (15.0, pytest.approx(15 - 12.706205 * 5), pytest.approx(15 + 12.706205 * 5))
    row = analyze.summarize(runs, 0.78, budget=20)["m"]                # one seed never gets there
    assert (row["steps"], row["steps_reached"], row["steps_lower_bound"]) == (None, 1, 20.0)
    assert ">= 20.0 (1/2 reached)" in analyze.format_table({"m": row}, 0.78)


def test_curve_band_is_the_per_step_interval():
    runs = [{"curve": [(0, 0.2), (5, 0.5)]}, {"curve": [(0, 0.2), (5, 0.7)]}]
    steps, cis = analyze.curve_band(runs)
    assert steps == [0, 5]
    assert cis[0] == (0.2, pytest.approx(0.2), pytest.approx(0.2))
    assert cis[1] == pytest.approx((0.6, 0.6 - 12.706205 * 0.1, 0.6 + 12.706205 * 0.1))


def test_t_quantile_reads_its_table_to_30_degrees_of_freedom_and_the_expansion_beyond():
    assert [analyze.t_quantile_975(df) for df in range(1, 31)] == list(analyze.T_975)
    # beyond 30: Cornish-Fisher (Abramowitz & Stegun 26.7.5) up to its 1/df^3 term, written out here
    z = 1.959963984540054
    g1, g2 = (z ** 3 + z) / 4, (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96
    g3 = (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384
    for df in (31, 50, 1000):
        assert analyze.t_quantile_975(df) == pytest.approx(z + g1 / df + g2 / df ** 2 + g3 / df ** 3, abs=1e-12)


def test_held_out_curve_puts_each_evaluation_after_the_steps_it_saw():
    metrics = [{"step": 0}, {"step": 1, "eval_accuracy": 0.3}, {"step": 2}, {"step": 3, "eval_accuracy": 0.5}]
    assert analyze.held_out_curve(0.1, metrics, 6, 0.7) == [(0, 0.1), (2, 0.3), (4, 0.5), (6, 0.7)]
    assert analyze.held_out_curve(0.1, [], 2, 0.2) == [(0, 0.1), (2, 0.2)]


def test_mean_step_seconds_adds_the_four_phases_of_each_step():
    metrics = [{"sample_s": 1, "score_s": 2, "diagnose_s": 4, "train_s": 8, "eval_s": 1000},
               {"sample_s": 16, "score_s": 32, "diagnose_s": 64, "train_s": 128}]
    assert analyze.mean_step_seconds(metrics) == (15 + 240) / 2


def study_result(seed, pass_at_k, curve, step_seconds, lr=2e-5):
    return {"seed": seed, "lr": lr, "eval": {"pass_at_k": pass_at_k}, "curve": curve, "step_seconds": step_seconds}


def test_summarize_gives_each_modes_seed_means_and_intervals_hand_worked():
    # pass@k keys are strings after JSON: k is the largest by value (16), not by spelling ("8")
    runs = {"grpo": [study_result(5, {"1": 0.2, "8": 0.9, "16": 0.5}, [(0, 0.1), (4, 0.5), (8, 0.4)], 1.0),
                     study_result(6, {"1": 0.3, "8": 0.9, "16": 0.6}, [(0, 0.1), (4, 0.2), (8, 0.6)], 2.0),
                     study_result(7, {"1": 0.4, "8": 0.9, "16": 1.0}, [(0, 0.9), (4, 0.2), (8, 0.8)], 6.0)],
            "dsrl": [study_result(5, {"1": 0.5, "16": 0.5}, [(0, 0.1), (8, 0.2)], 3.0, lr=5e-5),
                     study_result(6, {"1": 0.7, "16": 0.5}, [(0, 0.1), (4, 0.6), (8, 0.7)], 5.0, lr=5e-5)],
            "nsr": [study_result(0, {"1": 0.25, "2": 0.5}, [(0, 0.5), (8, 0.75)], 2.0, lr=1e-6)]}    # one seed
    rows = analyze.summarize(runs, 0.5, budget=8)
    grpo, dsrl = rows["grpo"], rows["dsrl"]
    assert (grpo["lr"], grpo["seeds"], grpo["k"], grpo["budget"]) == (2e-5, [5, 6, 7], 16, 8)
    assert grpo["pass@1"] == pytest.approx(analyze.mean_ci([0.2, 0.3, 0.4]))
    assert grpo["pass@k"] == pytest.approx(analyze.mean_ci([0.5, 0.6, 1.0]))
    assert grpo["greedy"] == pytest.approx(analyze.mean_ci([0.4, 0.6, 0.8]))             # each curve's last point
    assert grpo["steps"] == pytest.approx(analyze.mean_ci([4, 8, 0]))                     # every seed got there
    assert (grpo["steps_reached"], grpo["steps_lower_bound"], grpo["step_seconds"]) == (3, 4.0, 3.0)
    assert (dsrl["lr"], dsrl["seeds"], dsrl["k"], dsrl["steps"], dsrl["steps_reached"]) == (5e-5, [5, 6], 16, None, 1)
    assert (dsrl["steps_lower_bound"], dsrl["step_seconds"]) == ((8 + 4) / 2, 4.0)      # the budget for seed 5
    assert rows["nsr"] == {"lr": 1e-6, "seeds": [0], "k": 2, "pass@1": (0.25, None, None), "pass@k": (0.5, None, None),
                           "greedy": (0.75, None, None), "steps": (0, None, None), "steps_lower_bound": 0,
                           "steps_reached": 1, "budget": 8, "step_seconds": 2.0}


def test_format_table_hand_worked():
    rows = {"grpo": {"lr": 2e-5, "seeds": [0, 1], "k": 8, "pass@1": (0.5, 0.4, 0.6), "pass@k": (0.7, 0.5, 1.2),
                     "greedy": (0.25, None, None), "steps": (3.0, -1.0, 7.5), "steps_reached": 2,
                     "steps_lower_bound": 3.0, "budget": 6},
            "dsrl": {"lr": 5e-5, "seeds": [0, 1], "k": 8, "pass@1": (0.125, None, None), "pass@k": (0.5, None, None),
                     "greedy": (0.75, None, None), "steps": None, "steps_reached": 1, "steps_lower_bound": 4.5, "budget": 6}}
    base = {"pass_at_k": {"1": 0.125, "8": 0.5, "16": 0.9}, "greedy": 0.25}
    header = ["| mode | lr | seeds | pass@1 | pass@8 | greedy held-out acc. | steps to 0.5 |", "|---|---|---|---|---|---|---|"]
    lines = ["| grpo | 2e-05 | 2 | 0.500 [0.400, 0.600] | 0.700 [0.500, 1.000] | 0.250 | 3.0 [0.0, 6.0] |",
             "| dsrl | 5e-05 | 2 | 0.125 | 0.500 | 0.750 | >= 4.5 (1/2 reached) |"]
    assert analyze.format_table(rows, 0.5, base) == "\n".join(header + ["| base model | - | - | 0.125 | 0.500 | 0.250 | - |"] + lines)
    assert analyze.format_table(rows, 0.5) == "\n".join(header + lines)


def test_format_differences_cuts_each_interval_to_minus_one_to_one():
    differences = {"dsrl": {"seeds": 3, "pass@1": (0.2, -1.25, 1.5), "greedy": (-0.1, -1.5, 1.2)},
                   "nsr": {"seeds": 2, "pass@1": (0.0, None, None), "greedy": (0.5, 0.25, 0.75)}}
    assert analyze.format_differences(differences, "grpo") == "\n".join([
        "| paired by seed | pass@1 difference | greedy held-out acc. difference |", "|---|---|---|",
        "| dsrl - grpo (3 seeds) | +0.200 [-1.000, +1.000] | -0.100 [-1.000, +1.000] |",
        "| nsr - grpo (2 seeds) | +0.000 | +0.500 [+0.250, +0.750] |"])


def test_diagnostics_table_gives_the_seed_mean_at_the_first_and_last_logged_step():
    first = {"metrics": [{"entropy": None, "eos_share": 0.25}, {"entropy": 1.0}, {"entropy": 3.0}]}
    second = {"metrics": [{"entropy": 2.0}, {}, {"entropy": 5.12345, "eos_share": 0.5}]}
    table = analyze.diagnostics_table({"grpo": [first, second], "nsr": [{"metrics": []}]}).split("\n")
    assert table[0] == "| mode | " + " | ".join(analyze.DIAGNOSTICS) + " |"
    assert table[1] == "|---" * 10 + "|"
    cells = {key: "- -> -" for key in analyze.DIAGNOSTICS}
    cells.update(entropy="1.5 -> 4.06", eos_share="0.375 -> 0.375")   # (1 + 2) / 2 -> (3 + 5.12345) / 2
    assert table[2] == "| grpo | " + " | ".join(cells[key] for key in analyze.DIAGNOSTICS) + " |"
    assert table[3] == "| nsr | " + " | ".join(["- -> -"] * 9) + " |" and len(table) == 4


def test_run_folders_are_mode_then_lr_then_seed(tmp_path):
    assert analyze.run_folder(str(tmp_path), "dsrl", 2e-5, 3) == str(tmp_path / "dsrl" / "lr2e-05" / "seed3")


def test_validation_is_a_fixed_fifth_of_the_problems_independent_of_the_held_out_quarter():
    problems = [f"what is {i} + {i % 7}?" for i in range(4000)]
    chosen = [p for p in problems if analyze.is_validation(p)]
    assert 0.18 < len(chosen) / len(problems) < 0.22
    assert chosen == [p for p in problems if analyze.is_validation(p)]                  # the same on every call
    assert 0.21 < sum(map(prerl.is_held_out, chosen)) / len(chosen) < 0.29             # salted apart from the split


def hand_scores(model, context, response, temperature):
    """Sum of log P(y_t | context, y_<t) and sum of the entropies of softmax(logits / T) before each response
    token, from one plain forward of the unpadded sequence (no masks, no micro-batches)."""
    logits = model(input_ids=torch.tensor([context + response])).logits[0, len(context) - 1:-1]
    logprob = sum(float(torch.log_softmax(logits[t], -1)[token]) for t, token in enumerate(response))
    p = torch.softmax(logits / temperature, -1)
    return logprob, float(-(p * p.log()).sum())


def test_likelihood_diagnostics_equal_hand_computation():
    model, batch = tiny_model(), toy_batch()
    rewards = torch.tensor([[1., 0., 0., 1.], [0., 1., 1., 1.]])
    cfg = prerl.Config(temperature=0.7, micro_batch_tokens=20)   # several micro-batches
    with torch.no_grad():
        got = prerl.likelihood_diagnostics(model, batch, rewards, 1, cfg)
        cond, pre, entropy, tokens = [], [], 0.0, 0
        for i in range(8):
            response = batch["response_ids"][i, :int(batch["response_mask"][i].sum())].tolist()
            logprob, entropy_sum = hand_scores(model, real_prompt(batch, i), response, 0.7)
            cond.append(logprob)
            pre.append(hand_scores(model, [1], response, 0.7)[0])
            entropy += entropy_sum
            tokens += len(response)
    right = [r == 1 for r in rewards.reshape(-1).tolist()]
    mean = lambda values, keep: sum(v for v, k in zip(values, keep) if k) / sum(keep)
    wrong = [not r for r in right]
    assert got["entropy"] == pytest.approx(entropy / tokens, rel=1e-6)
    assert got["logp_y_given_x_right"] == pytest.approx(mean(cond, right), rel=1e-6)
    assert got["logp_y_given_x_wrong"] == pytest.approx(mean(cond, wrong), rel=1e-6)
    assert got["logp_y_right"] == pytest.approx(mean(pre, right), rel=1e-6)
    assert got["logp_y_wrong"] == pytest.approx(mean(pre, wrong), rel=1e-6)
    assert got["logp_y_wrong"] != pytest.approx(got["logp_y_given_x_wrong"], rel=1e-3)   # two different spaces
    none_right = prerl.likelihood_diagnostics(model, batch, torch.zeros(2, 4), 1, cfg)
    assert none_right["logp_y_right"] is None and none_right["logp_y_wrong"] == pytest.approx(sum(pre) / 8, rel=1e-6)


def test_step_diagnostics_eos_share_and_behaviours():
    model, tokenizer = tiny_model(torch.float32), tiny_tokenizer()
    batch = toy_batch(n_groups=1, group=4)
    batch["response_ids"][0, 2] = 2              # rows 0 and 2 end with EOS (id 2), rows 1 and 3 hit the limit
    batch["response_ids"][2, 0] = 2
    batch["response_ids"][[1, 3]] = torch.where(batch["response_ids"][[1, 3]] == 2, 5, batch["response_ids"][[1, 3]])
    batch["texts"] = ["Wait, hmm. However", "no phrases", "let me check: instead, alternatively", "wait"]
    cfg = prerl.Config(diagnose_every=3)
    quiet = prerl.step_diagnostics(model, tokenizer, batch, torch.zeros(1, 4), 1, cfg, 1)
    assert quiet["eos_share"] == 0.5
    assert (quiet["transitions"], quiet["reflections"]) == ((1 + 0 + 2 + 0) / 4, (2 + 0 + 1 + 1) / 4)
    assert "entropy" not in quiet                                 # step 1: not a diagnosed step
    assert {"entropy", "logp_y_wrong"} <= set(prerl.step_diagnostics(model, tokenizer, batch, torch.zeros(1, 4), 3, cfg, 1))


def study_argv(folder, out, *extra):
    return ["compare", "--model", str(folder), "--data", str(folder / "toy.jsonl"), "--eval-data", str(folder / "toy.jsonl"),
            "--modes", "grpo,nsr-prerl", "--seeds", "2", "--steps", "2", "--eval-every", "1", "--save-every", "1",
            "--diagnose-every", "1", "--n", "2", "--eval-size", "4", "--max-new-tokens", "6", "--prompts-per-step", "4",
            "--group-size", "4", "--lr", "1e-3", "--switch-step", "1", "--out-dir", str(out), "--json", str(out / "study.out.json"),
            *extra]


def test_study_resumes_per_mode_and_seed_to_the_same_table(tiny_model_folder, tmp_path, monkeypatch):
    whole = analyze.main(study_argv(tiny_model_folder, tmp_path / "whole"))
    rl_step, calls = prerl.rl_step, []

    def interrupted_at_the_sixth_step(*args, **kwargs):   # grpo seeds 0, 1 done; nsr-prerl seed 0 half done
        calls.append(args[4])
        if len(calls) == 6:
            raise KeyboardInterrupt
        return rl_step(*args, **kwargs)
    monkeypatch.setattr(prerl, "rl_step", interrupted_at_the_sixth_step)
    with pytest.raises(KeyboardInterrupt):
        analyze.main(study_argv(tiny_model_folder, tmp_path / "parts"))
    calls.clear()
    evaluate_samples, temperatures = analyze.evaluate_samples, []

    def recording_evaluate_samples(model, tokenizer, problems, cfg, n):
        temperatures.append((cfg.temperature, cfg.top_p))
        return evaluate_samples(model, tokenizer, problems, cfg, n)
    monkeypatch.setattr(analyze, "evaluate_samples", recording_evaluate_samples)
    resumed = analyze.main(study_argv(tiny_model_folder, tmp_path / "parts"))
    assert temperatures == [(0.6, 0.95)] * 2        # pass@k as for the base model, not at the training T 0.7
    assert calls == [1, 0, 1]          # finished runs are read back; nsr-prerl seed 0 goes on from step 1, then seed 1
    assert resumed["table"] == whole["table"]
    without_time = lambda rows: {m: {k: v for k, v in r.items() if k != "step_seconds"} for m, r in rows.items()}
    assert without_time(resumed["rows"]) == without_time(whole["rows"])
    result = json.load(open(tmp_path / "parts" / "nsr-prerl" / "lr0.001" / "seed0" / "result.json"))
    assert [m["step"] for m in result["metrics"]] == [0, 1] and result["seed"] == 0
    assert {"entropy", "logp_y_wrong", "eos_share", "reflections"} <= set(result["metrics"][0])
    with pytest.raises(SystemExit, match="other options .*steps"):
        analyze.main(study_argv(tiny_model_folder, tmp_path / "parts", "--steps", "3"))
    calls.clear()                                  # a speed-only option may change: the study is read back
    assert analyze.main(study_argv(tiny_model_folder, tmp_path / "parts", "--save-every", "2"))["table"] == whole["table"]
    assert calls == []


def test_a_studys_held_out_curve_puts_each_evaluation_at_the_steps_trained_before_it(tiny_model_folder, tmp_path, monkeypatch):
    """A curve point (s, accuracy) is an evaluation of the model after s optimizer steps: the start model
    at 0, the evaluation after record step s (0-based) at s + 1, the final one at --steps. Here every step
    trains (mixed rewards) and the evaluation returns how many steps the weights it sees were trained
    (/ 100), so every point must read (s, s / 100)."""
    from transformers import AutoModelForCausalLM
    args, cfg = analyze.parse_args(study_argv(tiny_model_folder, tmp_path, "--steps", "3", "--eval-every", "1",
                                                         "--precision", "fp32"))
    data = analyze.study_data(cfg, args.out_dir)
    weights = lambda model: tuple(round(p.double().sum().item(), 9) for p in model.parameters())  # noqa: E731
    steps_of = {weights(AutoModelForCausalLM.from_pretrained(tiny_model_folder)): 0}
    rl_step = prerl.rl_step

    def counting_rl_step(model, *a, **k):
        record = rl_step(model, *a, **k)
        steps_of[weights(model)] = len(steps_of)
        return record
    monkeypatch.setattr(prerl, "rl_step", counting_rl_step)
    monkeypatch.setattr(prerl.verify, "grades", lambda texts, golds, **k: [prerl.verify.Verdict(float(i % 2), None, "wrong") for i in range(len(texts))])
    monkeypatch.setattr(prerl, "evaluate", lambda model, *a, **k: steps_of[weights(model)] / 100)
    result = analyze.study_run(cfg, args, "grpo", cfg.lr, 0, data, False, 0)
    assert sorted(steps_of.values()) == [0, 1, 2, 3]                       # each step changed the weights
    assert [tuple(point) for point in result["curve"]] == [(s, s / 100) for s in range(4)]
    assert analyze.steps_to_threshold(result["curve"], 0.02) == 2

def test_study_splits_train_validation_and_held_out_apart(tiny_model_folder, tmp_path):
    args, cfg = analyze.parse_args(study_argv(tiny_model_folder, tmp_path, "--data", str(tmp_path / "big.jsonl"),
                                              "--eval-size", "8"))
    write_sums(tmp_path / "big.jsonl", 12)
    data = analyze.study_data(cfg, args.out_dir)
    sets = {name: {p["problem"] for p in prerl.load_problems(path)} for name, path in data.items()}
    assert sets["validation"] and sets["heldout"] and sets["train"]
    assert not (sets["train"] & sets["validation"]) and not (sets["train"] & sets["heldout"])
    assert not (sets["validation"] & sets["heldout"])


def sweep_result(validation, late_accuracy, heldout):
    """A finished first-seed run as choose_lr sees it: 8 steps whose last quarter sampled late_accuracy."""
    metrics = [{"step": s, "accuracy": 0.0 if s < 6 else late_accuracy} for s in range(8)]
    return {"validation": validation, "metrics": metrics, "curve": [(0, 0.2), (8, heldout)]}


def test_choose_lr_ranks_validation_then_late_training_accuracy_then_the_smaller_lr():
    # the held-out curve would pick 1e-3; validation ties 1e-2 and 1e-1, training accuracy breaks it
    assert analyze.choose_lr({1e-3: sweep_result(0.50, 0.9, 0.99), 1e-2: sweep_result(0.75, 0.3, 0.1),
                              1e-1: sweep_result(0.75, 0.6, 0.1)}) == 1e-1
    # steps 0-5 (before the last quarter) do not count: only the tie-break on lr is left
    assert analyze.choose_lr({2e-5: sweep_result(0.5, 0.5, 0.0), 1e-5: sweep_result(0.5, 0.5, 0.0)}) == 1e-5
    assert analyze.choose_lr({1e-5: sweep_result(0.25, 0.5, 0.0), 2e-5: sweep_result(0.5, 0.0, 0.0)}) == 2e-5


def test_choose_lr_reads_training_accuracy_over_exactly_the_last_quarter_of_the_steps():
    # steps 4-5 (before the last quarter) were good for 1e-3 only; steps 6-7 favour 1e-2
    early_good = {"validation": 0.5, "metrics": [{"accuracy": 1.0 if s in (4, 5) else 0.0} for s in range(8)]}
    steady = {"validation": 0.5, "metrics": [{"accuracy": 0.25} for s in range(8)]}
    assert analyze.choose_lr({1e-3: early_good, 1e-2: steady}) == 1e-2


def test_lr_sweep_study_in_two_processes_matches_one_and_shares_the_first_seed(tiny_model_folder, tmp_path, monkeypatch):
    write_sums(tmp_path / "big.jsonl", 12)
    argv = lambda out, jobs: study_argv(tiny_model_folder, out, "--data", str(tmp_path / "big.jsonl"), "--precision", "fp32",
                                        "--lr-sweep", "1e-3,3e-2", "--jobs", jobs)
    evaluate, evaluated = prerl.evaluate, []

    def recording_evaluate(model, tokenizer, problems, cfg, **kwargs):
        evaluated.append(cfg.lr if problems == validation else "held-out" if problems == heldout else "other")
        return evaluate(model, tokenizer, problems, cfg, **kwargs)
    monkeypatch.setattr(prerl, "evaluate", recording_evaluate)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        args, cfg = analyze.parse_args(argv(tmp_path / "one", "1"))
        data = analyze.study_data(cfg, args.out_dir)
        validation, heldout = prerl.load_problems(data["validation"]), prerl.load_problems(data["heldout"])
        one = analyze.main(argv(tmp_path / "one", "1"))
        monkeypatch.undo()
        torch.set_num_threads(2)                 # two workers of 1 thread each: the same arithmetic as above
        two = analyze.main(argv(tmp_path / "two", "2"))
    finally:
        torch.set_num_threads(threads)
    # each sweep run scored once on the validation split; everything else evaluated the held-out set
    assert sorted(x for x in evaluated if x != "held-out") == [1e-3, 1e-3, 3e-2, 3e-2] and "held-out" in evaluated
    assert two["table"] == one["table"] and two["lr"] == one["lr"] and two["sweep"] == one["sweep"]
    for mode, lr in one["lr"].items():
        other = 3e-2 if lr == 1e-3 else 1e-3
        for out in ("one", "two"):
            unchosen = tmp_path / out / mode / f"lr{other:g}" / "seed0"
            assert "eval" not in json.load(open(unchosen / "result.json"))    # trained and validated, never scored
            assert not (unchosen / "checkpoint.pt").exists() and not (unchosen / "model").exists()
            for seed in (0, 1):   # the chosen lr's first-seed run is the sweep's run, scored once chosen
                result = json.load(open(tmp_path / out / mode / f"lr{lr:g}" / f"seed{seed}" / "result.json"))
                assert "eval" in result and ("validation" in result) == (seed == 0) and result["seed"] == seed
        assert (tmp_path / "two" / mode / f"lr{lr:g}" / "seed1" / "log.txt").read_text().count("held-out accuracy")
    with pytest.raises(SystemExit, match="other options .*lr_sweep"):
        analyze.main(study_argv(tiny_model_folder, tmp_path / "one", "--data", str(tmp_path / "big.jsonl"),
                                "--precision", "fp32", "--lr-sweep", "1e-3"))


def test_study_refuses_bad_jobs_and_grids(tiny_model_folder, tmp_path):
    for extra, message in ((("--jobs", "0"), "--jobs 0"), (("--lr-sweep", "1e-3,1e-3"), "distinct positive"),
                           (("--lr-sweep", "1e-3,-1"), "distinct positive")):
        with pytest.raises(SystemExit, match=message):
            analyze.main(study_argv(tiny_model_folder, tmp_path / "x", *extra))
    assert not (tmp_path / "x").exists()       # refused before anything was written


def test_diagnose_every_is_a_checked_flag(capsys):
    assert refused_line(["--diagnose-every", "-1"], capsys).startswith("error: --diagnose-every -1:")
    assert "diagnose_every" in prerl.RESUME_MAY_CHANGE        # diagnostics never change what is trained
