"""
Tests for prerl.py and verify.py. Offline, CPU, a tiny model built from a config: minutes.

    python -m pytest -q test_prerl.py
"""

import json
import math
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


# ---------------------------------------------------------------------------
# prerl.py: a tiny model and tokenizer built here, from a config (no download)

import torch  # noqa: E402

import prerl  # noqa: E402

CHARS = list("0123456789+-=?., abcdefghijklmnopqrstuvwxyzWQ\\{}")


def tiny_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, **{c: i + 4 for i, c in enumerate(CHARS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>", padding_side="left")


def rms_norm_full_precision(self, x):
    """LlamaRMSNorm upcasts to float32 inside; this keeps float64 so gradient checks can be tight."""
    return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)


def tiny_model(dtype=torch.float64, seed=0, tied=False):
    import types
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(CHARS) + 4, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=tied)
    model = LlamaForCausalLM(config).to(dtype)
    if dtype == torch.float64:
        for module in model.modules():
            if type(module).__name__ == "LlamaRMSNorm":
                module.forward = types.MethodType(rms_norm_full_precision, module)
    return model


def reference_logprobs(model, context, response):
    """Independent log P(y_t | context, y_<t): one plain forward per token, full log-softmax."""
    values = []
    for t in range(len(response)):
        ids = torch.tensor([context + response[:t]])
        logits = model(input_ids=ids).logits[0, -1]
        values.append(torch.log_softmax(logits, -1)[response[t]])
    return torch.stack(values)


def test_pretrain_logprobs_equal_hand_computation_and_differ_from_conditional():
    model = tiny_model()
    response, prompt = [10, 11, 12, 13, 2], [20, 21, 22]
    ids, mask = torch.tensor([response]), torch.ones(1, len(response), dtype=torch.long)
    with torch.no_grad():
        got = prerl.pretrain_logprobs(model, 1, ids, mask)[0]
        expected = reference_logprobs(model, [1], response)
        conditional = prerl.conditional_logprobs(model, torch.tensor([prompt]), torch.ones(1, 3, dtype=torch.long), ids, mask)[0]
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(conditional, reference_logprobs(model, prompt, response), rtol=1e-10, atol=1e-10)
    assert (got - conditional).abs().max() > 1e-3


def test_padding_invariance():
    model = tiny_model(torch.float32)
    prompt_a, prompt_b = [20, 21], [20, 21, 22, 23, 24]
    resp_a, resp_b = [10, 11, 2], [12, 13, 14, 15, 2]
    with torch.no_grad():
        alone = prerl.conditional_logprobs(model, torch.tensor([prompt_a]), torch.ones(1, 2, dtype=torch.long),
                                           torch.tensor([resp_a]), torch.ones(1, 3, dtype=torch.long))[0]
        prompts = torch.tensor([[3, 3, 3] + prompt_a, prompt_b])
        prompt_mask = torch.tensor([[0, 0, 0, 1, 1], [1, 1, 1, 1, 1]])
        responses = torch.tensor([resp_a + [3, 3], resp_b])
        response_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
        batched = prerl.conditional_logprobs(model, prompts, prompt_mask, responses, response_mask)
        pre_alone = prerl.pretrain_logprobs(model, 1, torch.tensor([resp_a]), torch.ones(1, 3, dtype=torch.long))[0]
        pre_batched = prerl.pretrain_logprobs(model, 1, responses, response_mask)
    torch.testing.assert_close(batched[0, :3], alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pre_batched[0, :3], pre_alone, rtol=1e-5, atol=1e-5)


def test_response_mask_keeps_first_eos_even_when_pad_is_eos():
    ids = torch.tensor([[5, 6, 2, 2, 2], [5, 2, 7, 2, 2], [5, 6, 7, 8, 9]])
    mask = prerl.response_mask_from_positions(ids, [2])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]


def test_generate_greedy_matches_transformers_generate():
    model = tiny_model(torch.float32)
    prompt_ids = torch.tensor([[3, 3, 20, 21], [22, 23, 24, 25]])
    prompt_mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    eos_ids = list(range(4, 40, 3))  # many "end" tokens: rows stop at different steps and leave the batch
    ours = prerl.generate(model, prompt_ids, prompt_mask, 2, 12, 0.0, 1.0, eos_ids, pad_id=3)
    reference = model.generate(input_ids=prompt_ids.repeat_interleave(2, 0), attention_mask=prompt_mask.repeat_interleave(2, 0),
                               do_sample=False, max_new_tokens=12, eos_token_id=eos_ids, pad_token_id=3)[:, 4:]
    mask = prerl.response_mask_from_positions(ours, eos_ids)
    assert 1 < mask.sum(1).min() and mask.sum(1).min() < 12  # some rows really ended early
    assert torch.equal(mask, prerl.response_mask_from_positions(reference, eos_ids))
    assert torch.equal(ours * mask, reference * mask)


def test_preallocated_cache_decodes_like_a_full_forward():
    """The sampler's in-place KV buffers: swapped in for every layer, and each decoded token's logits
    (after a row drop too) equal a plain forward over the whole sequence."""
    model = tiny_model(torch.float64)
    ids = torch.tensor([[20, 21, 22, 23], [24, 25, 26, 27], [28, 29, 30, 31]])
    with torch.no_grad():
        cache_name = prerl.cache_keyword(model)
        cache = getattr(model(input_ids=ids, use_cache=True), cache_name)
        prerl.preallocate(cache, room=3)
        assert all(type(layer) is prerl.PreallocatedLayer for layer in cache.layers)
        for token, keep in [(32, [0, 1, 2]), (33, [0, 2]), (34, [0, 2])]:
            if len(keep) < len(ids):
                cache.batch_select_indices(torch.tensor(keep))
                ids = ids[keep]
            ids = torch.cat([ids, torch.full((len(ids), 1), token)], 1)
            logits = model(input_ids=ids[:, -1:], use_cache=True, **{cache_name: cache}).logits[:, -1]
            torch.testing.assert_close(logits, model(input_ids=ids).logits[:, -1])
        assert cache.layers[0].keys.shape[-2] == ids.shape[1]


def test_sampled_first_token_follows_softmax_over_temperature():
    torch.manual_seed(0)
    model = tiny_model(torch.float32)
    prompt = torch.tensor([[20, 21, 22]])
    with torch.no_grad():
        expected = torch.softmax(model(input_ids=prompt).logits[0, -1] / 0.5, -1)
    first = prerl.generate(model, prompt, torch.ones_like(prompt), 20000, 1, 0.5, 1.0, [2], pad_id=3)[:, 0]
    observed = torch.bincount(first, minlength=expected.numel()).float() / first.numel()
    assert (observed - expected).abs().max() < 0.015


def test_top_p_keeps_the_smallest_nucleus():
    torch.manual_seed(0)
    logits = torch.log(torch.tensor([[0.05, 0.5, 0.15, 0.3]])).repeat(20000, 1)
    picks = prerl.pick_next_token(logits, 1.0, 0.7)  # nucleus {0.5, 0.3}, renormalised to 0.625 / 0.375
    counts = torch.bincount(picks, minlength=4).float() / len(picks)
    assert counts[0] == 0 and counts[2] == 0
    assert abs(counts[1] - 0.625) < 0.015 and abs(counts[3] - 0.375) < 0.015
    assert prerl.pick_next_token(logits[:1], 0.0, 1.0).item() == 1  # temperature 0 = greedy


# --- advantages on hand-worked groups

REWARDS = torch.tensor([[0., 0., 0., 0.], [1., 0., 0., 0.], [1., 1., 1., 1.], [1., 1., 0., 0.]], dtype=torch.float64)


def test_grpo_advantages_hand_worked():
    adv = prerl.grpo_advantages(REWARDS, eps=1e-6)
    # group [1,0,0,0]: mean 0.25, unbiased std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5
    expected = torch.tensor([[0, 0, 0, 0], [0.75 / 0.500001, -0.25 / 0.500001, -0.25 / 0.500001, -0.25 / 0.500001],
                             [0, 0, 0, 0], [0.5 / (1 / math.sqrt(3) + 1e-6)] * 2 + [-0.5 / (1 / math.sqrt(3) + 1e-6)] * 2],
                            dtype=torch.float64)
    torch.testing.assert_close(adv, expected)


def test_prerl_advantage_tables_hand_worked():
    cfg = prerl.Config(w_reinforce_lambda=0.1, prerl_coef=0.01)
    table = {stage: prerl.advantages_for(stage, REWARDS, cfg) for stage in prerl.MODES if stage != "dsrl"}
    centered = [[0, 0, 0, 0], [0.75, -0.25, -0.25, -0.25], [0, 0, 0, 0], [0.5, 0.5, -0.5, -0.5]]
    assert table["prerl"][0].tolist() == centered
    assert table["nsr-prerl"][0].tolist() == [[0, 0, 0, 0], [0, -0.25, -0.25, -0.25], [0, 0, 0, 0], [0, 0, -0.5, -0.5]]
    assert table["psr-prerl"][0].tolist() == [[0, 0, 0, 0], [0.75, 0, 0, 0], [0, 0, 0, 0], [0.5, 0.5, 0, 0]]
    assert table["nsr"][0].tolist() == [[-1, -1, -1, -1], [0, -1, -1, -1], [0, 0, 0, 0], [0, 0, -1, -1]]
    assert table["psr"][0].tolist() == [[0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]]
    torch.testing.assert_close(table["w-reinforce"][0], torch.tensor(
        [[-1, -1, -1, -1], [0.1, -1, -1, -1], [0.1] * 4, [0.1, 0.1, -1, -1]], dtype=torch.float64))
    assert {stage: (space, coef) for stage, (_, space, coef) in table.items()} == {
        "grpo": ("conditional", 1.0), "psr": ("conditional", 1.0), "nsr": ("conditional", 1.0),
        "w-reinforce": ("conditional", 1.0), "prerl": ("pretrain", 0.01), "psr-prerl": ("pretrain", 0.01),
        "nsr-prerl": ("pretrain", 0.01)}


def test_clipped_surrogate_and_k3_hand_worked():
    lp = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5]))
    old = torch.zeros(4)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    loss = prerl.clipped_surrogate(lp, old, adv, 0.2, 0.28)
    # rho 1.5, A>0: min(1.5, 1.28) -> -1.28 ; A<0: min(-1.5, -1.28) = -1.5 -> 1.5
    # rho 0.5, A>0: min(0.5, 0.8) -> -0.5  ; A<0: min(-0.5, -0.8) = -0.8 -> 0.8
    torch.testing.assert_close(loss, torch.tensor([-1.28, 1.5, -0.5, 0.8]))
    lp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    torch.testing.assert_close(prerl.k3_kl(lp, ref), torch.tensor([math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1 - 1]))


# --- gradients of every loss against an independently written formula


def toy_batch(n_groups=2, group=4, seed=1):
    gen = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(4, 40, (n_groups, 4), generator=gen).repeat_interleave(group, 0)
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_mask[:group, :1] = 0  # the first group's prompt is left-padded
    prompt_ids[:group, :1] = 3
    response_ids = torch.randint(4, 40, (n_groups * group, 6), generator=gen)
    lengths = torch.randint(2, 7, (n_groups * group,), generator=gen)
    response_mask = (torch.arange(6)[None, :] < lengths[:, None]).long()
    response_ids = torch.where(response_mask.bool(), response_ids, torch.full_like(response_ids, 3))
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "response_ids": response_ids, "response_mask": response_mask}


def hand_advantages(stage, rewards, lam=0.1):
    """Advantages written out with Python loops, independently of prerl.advantages_for."""
    out = []
    for group in rewards.tolist():
        mean = sum(group) / len(group)
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (len(group) - 1))
        for r in group:
            out.append({"grpo": (r - mean) / (std + 1e-6), "psr": 1.0 if r == 1 else 0.0, "nsr": -1.0 if r == 0 else 0.0,
                        "w-reinforce": lam if r == 1 else -1.0, "prerl": r - mean, "psr-prerl": max(r - mean, 0.0),
                        "nsr-prerl": min(r - mean, 0.0)}[stage])
    return out


def real_prompt(batch, i):
    """Row i's prompt tokens without its left padding."""
    return [t for t, m in zip(batch["prompt_ids"][i].tolist(), batch["prompt_mask"][i].tolist()) if m]


def hand_loss(model, batch, rewards, stage, coef):
    """coef * token-mean of -A_i log pi(y_t | context): plain per-token forward passes, Python sums."""
    advantages = hand_advantages(stage, rewards)
    pretrain = stage.endswith("prerl")
    total, tokens = 0.0, 0
    for i, a in enumerate(advantages):
        n = int(batch["response_mask"][i].sum())
        if pretrain and a == 0:
            continue  # PreRL: zero-advantage responses leave the denominator too
        tokens += n
        prompt = real_prompt(batch, i)
        context = [1] if pretrain else prompt
        total = total + (-a) * reference_logprobs(model, context, batch["response_ids"][i, :n].tolist()).sum()
    return coef * total / tokens


def flat_grad(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("stage", ["grpo", "psr", "nsr", "w-reinforce", "prerl", "psr-prerl", "nsr-prerl"])
def test_loss_gradient_equals_hand_formula(stage):
    model = tiny_model()
    batch, rewards = toy_batch(), torch.tensor([[1., 0., 0., 1.], [0., 1., 1., 1.]], dtype=torch.float64)
    cfg = prerl.Config(micro_batch_tokens=25)
    prerl.accumulate_gradients(model, batch, rewards, stage, cfg, start_id=1)
    got = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
    model.zero_grad()
    coef = cfg.prerl_coef if stage.endswith("prerl") else 1.0
    hand_loss(model, batch, rewards, stage, coef).backward()
    for g, p in zip(got, model.parameters()):
        expected = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(g, expected, rtol=1e-9, atol=1e-12)


def test_kl_term_gradient_equals_hand_formula():
    """GRPO + beta * k3(pi || pi_ref): the hand loss adds beta * token-mean of exp(r - l) - (r - l) - 1."""
    model, reference = tiny_model(seed=0), tiny_model(seed=1)
    batch, rewards = toy_batch(), torch.tensor([[1., 0., 0., 1.], [0., 1., 1., 1.]], dtype=torch.float64)
    rewards[1] = 1.0  # an all-correct group: A = 0, yet its KL term still has a gradient
    cfg = prerl.Config(kl_coef=0.3)
    prerl.accumulate_gradients(model, batch, rewards, "grpo", cfg, start_id=1, ref_model=reference)
    got = flat_grad(model)
    model.zero_grad()
    kl, tokens = 0.0, int(batch["response_mask"].sum())
    for i in range(len(rewards.reshape(-1))):  # the KL covers every response, A = 0 or not
        n = int(batch["response_mask"][i].sum())
        prompt = real_prompt(batch, i)
        lp = reference_logprobs(model, prompt, batch["response_ids"][i, :n].tolist())
        with torch.no_grad():
            ref = reference_logprobs(reference, prompt, batch["response_ids"][i, :n].tolist())
        kl = kl + (torch.exp(ref - lp) - (ref - lp) - 1).sum()
    (hand_loss(model, batch, rewards, "grpo", 1.0) + 0.3 * kl / tokens).backward()
    torch.testing.assert_close(got, flat_grad(model), rtol=1e-9, atol=1e-12)


def test_loss_matches_finite_difference():
    model = tiny_model()
    batch, rewards = toy_batch(), torch.tensor([[1., 0., 0., 1.], [0., 1., 1., 1.]], dtype=torch.float64)
    cfg = prerl.Config()
    prerl.accumulate_gradients(model, batch, rewards, "nsr-prerl", cfg, start_id=1)
    weight = model.model.layers[0].mlp.up_proj.weight
    analytic = weight.grad[3, 5].item()
    h = 1e-6
    with torch.no_grad():
        weight[3, 5] += h
        plus = hand_loss(model, batch, rewards, "nsr-prerl", cfg.prerl_coef).item()
        weight[3, 5] -= 2 * h
        minus = hand_loss(model, batch, rewards, "nsr-prerl", cfg.prerl_coef).item()
    assert abs((plus - minus) / (2 * h) - analytic) < 1e-7 * max(1.0, abs(analytic))
    assert abs(analytic) > 1e-8


@pytest.mark.parametrize("stage", ["nsr-prerl", "nsr"])
def test_negative_modes_ignore_correct_responses_and_all_equal_groups(stage):
    rewards = torch.tensor([[1., 0., 0., 1.], [1., 1., 1., 1.]], dtype=torch.float64)
    cfg = prerl.Config()
    grads = []
    for scramble in (False, True):
        model, batch = tiny_model(), toy_batch()
        if scramble:  # change every token of every correct response (and the all-correct group)
            correct = rewards.reshape(-1) == 1
            batch["response_ids"][correct] = torch.randint(4, 40, batch["response_ids"][correct].shape)
        prerl.accumulate_gradients(model, batch, rewards, stage, cfg, start_id=1)
        grads.append(flat_grad(model))
    assert torch.equal(grads[0], grads[1])
    assert grads[0].abs().sum() > 0


def test_positive_modes_ignore_wrong_responses():
    rewards = torch.tensor([[1., 0., 0., 1.], [0., 0., 0., 0.]], dtype=torch.float64)
    grads = []
    for scramble in (False, True):
        model, batch = tiny_model(), toy_batch()
        if scramble:
            wrong = rewards.reshape(-1) == 0
            batch["response_ids"][wrong] = torch.randint(4, 40, batch["response_ids"][wrong].shape)
        prerl.accumulate_gradients(model, batch, rewards, "psr-prerl", prerl.Config(), start_id=1)
        grads.append(flat_grad(model))
    assert torch.equal(grads[0], grads[1]) and grads[0].abs().sum() > 0


def test_all_equal_groups_give_no_gradient():
    rewards = torch.tensor([[1., 1., 1., 1.], [0., 0., 0., 0.]], dtype=torch.float64)
    for stage in ("grpo", "prerl", "nsr-prerl", "psr-prerl"):
        model = tiny_model()
        loss, kept = prerl.accumulate_gradients(model, toy_batch(), rewards, stage, prerl.Config(), start_id=1)
        assert kept == 0 and all(p.grad is None for p in model.parameters())


def test_gradient_accumulation_equals_full_batch():
    rewards = torch.tensor([[1., 0., 0., 1.], [0., 1., 1., 1.]], dtype=torch.float64)
    for stage in ("grpo", "nsr-prerl"):
        grads = []
        for tokens in (1, 25, 10_000):  # one row at a time, a few rows, everything at once
            model = tiny_model()
            prerl.accumulate_gradients(model, toy_batch(), rewards, stage, prerl.Config(micro_batch_tokens=tokens), start_id=1)
            grads.append(flat_grad(model))
        torch.testing.assert_close(grads[0], grads[2], rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(grads[1], grads[2], rtol=1e-10, atol=1e-14)


def plain_linear_logprobs(hidden, weight, bias, targets):
    """The textbook form autograd differentiates by itself: full log-softmax, then pick the targets."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    return torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)


@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_logprobs_backward_equals_autograd_and_finite_differences(with_bias):
    torch.manual_seed(0)
    hidden = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(11, dtype=torch.float64, requires_grad=True) if with_bias else None
    targets = torch.tensor([3, 3, 0, 10, 7, 3])  # repeated and edge ids
    upstream = torch.randn(6, dtype=torch.float64)
    inputs = [hidden, weight] + ([bias] if with_bias else [])
    got_value = prerl.LinearLogprobs.apply(hidden, weight, bias, targets)
    got = torch.autograd.grad((got_value * upstream).sum(), inputs)
    expected_value = plain_linear_logprobs(hidden, weight, bias, targets)
    expected = torch.autograd.grad((expected_value * upstream).sum(), inputs)
    torch.testing.assert_close(got_value, expected_value, rtol=1e-12, atol=1e-12)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    with torch.no_grad():  # central differences of sum(upstream * lp) for a few entries of each input
        for tensor, grad in zip(inputs, got):
            for index in [(0,) * tensor.dim(), tuple(s - 1 for s in tensor.shape), (3,) + (1,) * (tensor.dim() - 1)]:
                h, original = 1e-6, tensor[index].item()
                tensor[index] = original + h
                plus = (plain_linear_logprobs(hidden, weight, bias, targets) * upstream).sum()
                tensor[index] = original - h
                minus = (plain_linear_logprobs(hidden, weight, bias, targets) * upstream).sum()
                tensor[index] = original
                assert abs((plus - minus) / (2 * h) - grad[index]) < 1e-7


def test_linear_logprobs_under_bf16_autocast_matches_fp32():
    """The CUDA path, exercised on CPU: matmuls in bf16, log-softmax in fp32, gradients in the parameters' dtype."""
    torch.manual_seed(0)
    hidden = torch.randn(8, 16, requires_grad=True)
    weight = (0.3 * torch.randn(50, 16)).requires_grad_()
    targets = torch.randint(0, 50, (8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_value = prerl.LinearLogprobs.apply(hidden, weight, None, targets)
    got = torch.autograd.grad(got_value.sum(), (hidden, weight))
    expected_value = plain_linear_logprobs(hidden, weight, None, targets)
    expected = torch.autograd.grad(expected_value.sum(), (hidden, weight))
    assert got_value.dtype == torch.float32 and got[0].dtype == got[1].dtype == torch.float32
    torch.testing.assert_close(got_value, expected_value, rtol=0.05, atol=0.05)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0.05, atol=0.02)


def test_linear_logprobs_refuses_a_second_backward():
    hidden, weight = torch.randn(2, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    loss = prerl.LinearLogprobs.apply(hidden, weight, None, torch.tensor([1, 2])).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="runs only once"):
        loss.backward()


@pytest.mark.parametrize("stage", ["grpo", "nsr-prerl"])
def test_tied_embeddings_gradient_equals_hand_formula(stage):
    """Input lookup and LinearLogprobs share one weight: their two gradients must add up, over micro-batches."""
    model = tiny_model(tied=True)
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    batch, rewards = toy_batch(), torch.tensor([[1., 0., 0., 1.], [0., 1., 1., 1.]], dtype=torch.float64)
    cfg = prerl.Config(micro_batch_tokens=25)
    prerl.accumulate_gradients(model, batch, rewards, stage, cfg, start_id=1)
    got = flat_grad(model)
    model.zero_grad()
    hand_loss(model, batch, rewards, stage, cfg.prerl_coef if stage.endswith("prerl") else 1.0).backward()
    torch.testing.assert_close(got, flat_grad(model), rtol=1e-9, atol=1e-12)


def test_reuse_freed_memory_stops_page_faults_when_a_large_block_comes_back():
    """A 64 MiB tensor made again and again: malloc's defaults map it afresh each time (16,384 page
    faults of 4 KiB); after reuse_freed_memory a freed block is taken again. Fresh processes, so the
    setting does not leak into other tests."""
    code = """import resource, sys, torch, prerl
if sys.argv[1] == "reuse" and not prerl.reuse_freed_memory(torch.device("cpu")):
    print(-1); sys.exit()
def faults_of_a_fresh_block():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 * 2**20)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(min(faults_of_a_fresh_block() for _ in range(4)))"""
    faults = {mode: int(subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True,
                                       check=True, cwd=os.path.dirname(os.path.abspath(__file__))).stdout.split()[-1])
              for mode in ("default", "reuse")}
    if faults["reuse"] == -1:
        pytest.skip("not Linux with glibc")
    if faults["default"] < 4000:
        pytest.skip(f"huge pages make malloc's default cheap here ({faults})")
    assert faults["reuse"] < 1000, faults
    assert not prerl.reuse_freed_memory(torch.device("cuda"))  # GPUs: malloc left alone


def test_micro_batches_respect_the_token_budget():
    lengths = {0: 5, 1: 9, 2: 3, 3: 9, 4: 30}
    batches = prerl.micro_batches(list(lengths), lengths, 20)
    assert sorted(i for b in batches for i in b) == [0, 1, 2, 3, 4]
    assert batches == [[2, 0], [1, 3], [4]]  # sorted by length; 3 rows of 9 would pad to 27 > 20
    assert all(len(b) * max(lengths[i] for i in b) <= 20 or len(b) == 1 for b in batches)


def test_dsrl_stage_switch():
    stages = [prerl.stage_for_step("dsrl", step, 5) for step in range(8)]
    assert stages == ["nsr-prerl"] * 5 + ["grpo"] * 3
    assert prerl.stage_for_step("grpo", 0, 5) == "grpo"


# --- end to end on the tiny model


def test_nsr_prerl_lowers_probability_of_penalised_responses():
    torch.manual_seed(0)
    model, batch = tiny_model(torch.float32), toy_batch()
    rewards = torch.tensor([[1., 0., 0., 1.], [0., 1., 1., 1.]])
    wrong = (rewards.reshape(-1) == 0)
    cfg = prerl.Config(lr=1e-2, prerl_coef=1.0)
    optimizer = prerl.make_optimizer(model, cfg)

    def logp():
        with torch.no_grad():
            lp = prerl.pretrain_logprobs(model, 1, batch["response_ids"], batch["response_mask"])
            return (lp * batch["response_mask"]).sum(1)

    before = logp()
    for _ in range(5):
        prerl.accumulate_gradients(model, batch, rewards, "nsr-prerl", cfg, start_id=1)
        prerl.optimizer_step(model, optimizer, cfg)
    after = logp()
    assert (after[wrong] < before[wrong] - 0.5).all(), (before, after)


@pytest.fixture(scope="module")
def tiny_model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    tiny_model(torch.float32).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    data = folder / "toy.jsonl"
    data.write_text("".join(json.dumps({"problem": f"what is {a}+{b}?", "answer": str(a + b)}) + "\n"
                            for a in range(4) for b in range(4)))
    return folder


def run_args(folder, out, *extra):
    return ["--model", str(folder), "--data", str(folder / "toy.jsonl"), "--eval-data", str(folder / "toy.jsonl"),
            "--out-dir", str(out), "--prompts-per-step", "16", "--group-size", "8", "--max-new-tokens", "6",
            "--eval-size", "4", "--eval-every", "0", "--lr", "1e-3", *extra]


def state_of(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def test_train_checkpoint_resume_is_exact_and_optimizer_carries_over(tiny_model_folder, tmp_path):
    prerl.train(prerl.parse_config(run_args(tiny_model_folder, tmp_path / "full", "--steps", "3", "--switch-step", "2")))
    prerl.train(prerl.parse_config(run_args(tiny_model_folder, tmp_path / "part", "--steps", "2", "--switch-step", "2")))
    prerl.train(prerl.parse_config(run_args(tiny_model_folder, tmp_path / "part", "--steps", "3", "--switch-step", "2", "--resume")))
    full, part = state_of(tmp_path / "full" / "checkpoint.pt"), state_of(tmp_path / "part" / "checkpoint.pt")
    for name, tensor in full["model"].items():
        assert torch.equal(tensor, part["model"][name]), name
    metrics = [json.loads(line) for line in open(tmp_path / "full" / "metrics.jsonl")]
    assert [m["stage"] for m in metrics] == ["nsr-prerl", "nsr-prerl", "grpo"]
    # one optimizer across the DSRL switch: Adam counts every step that had a gradient, before and
    # after the switch (a step with no mixed group has no gradient, and AdamW skips it)
    updates = [m["stage"] for m in metrics if m["kept_tokens"] > 0]
    assert "nsr-prerl" in updates and "grpo" in updates
    assert {int(s["step"]) for s in full["optimizer"]["state"].values()} == {len(updates)}
    resumed = [json.loads(line) for line in open(tmp_path / "part" / "metrics.jsonl")]
    assert [m["step"] for m in resumed] == [0, 1, 2]
    assert not list((tmp_path / "full").glob("*.tmp*"))  # atomic writes leave no temporary files


def test_run_does_not_depend_on_random_numbers_drawn_while_loading(tiny_model_folder, tmp_path, monkeypatch):
    """The first run with the embedded model converts it, building a randomly initialised model on the
    way; the seed must be applied after loading, or that one run would sample differently."""
    prerl.train(prerl.parse_config(run_args(tiny_model_folder, tmp_path / "plain", "--steps", "2")))
    load_model = prerl.load_model

    def load_model_drawing_random_numbers(*args, **kwargs):
        torch.rand(1000), random.random()  # what a conversion's random init would consume
        return load_model(*args, **kwargs)
    monkeypatch.setattr(prerl, "load_model", load_model_drawing_random_numbers)
    prerl.train(prerl.parse_config(run_args(tiny_model_folder, tmp_path / "drawing", "--steps", "2")))
    runs = [[json.loads(line) for line in open(tmp_path / run / "metrics.jsonl")] for run in ("plain", "drawing")]
    assert [m["loss"] for m in runs[0]] == [m["loss"] for m in runs[1]]
    assert any(m["kept_tokens"] > 0 for m in runs[0])  # some step really trained


def test_broken_checkpoint_gives_clear_error(tiny_model_folder, tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="checkpoint .* unreadable"):
        prerl.train(prerl.parse_config(run_args(tiny_model_folder, tmp_path, "--steps", "1", "--resume")))


# --- bad input


@pytest.mark.parametrize("content,message", [
    ('{"problem": "1+1", "answer": "2"}\n{not json\n', r"bad\.jsonl:2: not valid JSON"),
    ('{"problem": "1+1"}\n', r"bad\.jsonl:1: field 'answer'"),
    ('{"answer": "2"}\n', r"bad\.jsonl:1: field 'problem'"),
    ('[1, 2]\n', r"bad\.jsonl:1: expected a JSON object"),
    ('\n\n', r"bad\.jsonl: no problems"),
])
def test_bad_data_files_fail_with_file_line_field(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(SystemExit, match=message):
        prerl.load_problems(str(path))


def test_data_formats(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in [
        {"problem": "p1", "answer": "\\frac12"},
        {"problem": "p2", "solution": "so $\\boxed{7}$."},
        {"question": "q3", "answer": "work...\n#### 1,234"},
        {"problem": "p4", "answer": 5},
    ]))
    assert [p["answer"] for p in prerl.load_problems(str(path))] == ["\\frac12", "7", "1234", "5"]


def test_missing_data_file_and_unknown_model(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        prerl.load_problems(str(tmp_path / "nope.jsonl"))
    with pytest.raises(SystemExit, match="no such folder"):
        prerl.load_model(str(tmp_path / "no_model"), torch.device("cpu"))
    (tmp_path / "empty_model").mkdir()
    with pytest.raises(SystemExit, match="could not be loaded"):
        prerl.load_model(str(tmp_path / "empty_model"), torch.device("cpu"))


def test_builtin_problems_are_disjoint_and_correct():
    train = prerl.make_problems(200, ",".join(prerl.TASK_FAMILIES), 2, seed=0, held_out=False)
    held = prerl.make_problems(50, ",".join(prerl.TASK_FAMILIES), 2, seed=1, held_out=True)
    assert not {p["problem"] for p in train} & {p["problem"] for p in held}
    for p in train[:60]:  # each built-in answer is its own gold under the verifier
        assert verify.reward(f"\\boxed{{{p['answer']}}}", p["answer"]) == 1.0
    assert len({p["problem"].split()[0] for p in train}) > 3


def test_config_flags_and_errors():
    cfg = prerl.parse_config(["--mode", "nsr-prerl", "--switch-step", "3", "--no-resume"])
    assert (cfg.mode, cfg.switch_step, cfg.resume) == ("nsr-prerl", 3, False)
    with pytest.raises(SystemExit):
        prerl.parse_config(["--mode", "ppo"])


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
    with pytest.raises(ValueError):
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
# --- Mutation guards (issue 17)
# Each test below fails on a bug that once passed the whole suite (checked by applying the bug by hand).
# `python mutate.py` runs mutmut over the method and the verifier's core against this file.

def under_mutmut():
    """mutmut sets MUTANT_UNDER_TEST in the process that runs the tests (stats, clean run, every mutant)."""
    return "MUTANT_UNDER_TEST" in os.environ


@pytest.fixture(autouse=True)
def verifier_in_process_under_mutmut(request, monkeypatch):
    """verify.py compares in forked workers, where mutmut cannot see which tests reach the comparison
    core; under mutmut the comparison runs in the test's process instead. The tests of the time bound
    need the workers and are skipped there (the bound is not what the mutants change)."""
    if not under_mutmut():
        return
    if request.node.name.startswith(("test_hostile_input", "test_time_bound")):
        pytest.skip("needs the verifier's worker processes; not run under mutmut")
    monkeypatch.setattr(verify, "_run_in_worker", lambda job, timeout: verify._compare_normalized(*job))


# --- 1. the pre-train-space start token

def word_tokenizer(tokens, bos=None, unk="<unk>"):
    """A tokenizer with the given vocabulary (ids in list order), '</s>' as EOS, optionally a BOS and no unk."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {t: i for i, t in enumerate(([unk] if unk else []) + tokens + ["</s>", "a", "b"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    special = {"eos_token": "</s>", **({"bos_token": bos} if bos else {}), **({"unk_token": unk} if unk else {})}
    return PreTrainedTokenizerFast(tokenizer_object=backend, **special)


@pytest.mark.parametrize("tokens,bos,unk,expected,kind", [
    (["<s>", "<|im_start|>", "<bos>"], "<bos>", "<unk>", "<bos>", "BOS"),     # BOS beats every fallback
    (["<bos>", "<s>"], "<bos>", None, "<bos>", "BOS"),                         # a BOS with id 0 is still a BOS
    (["<s>", "<|begin_of_text|>", "<|im_start|>"], None, "<unk>", "<|im_start|>", "turn-start"),  # preference, not id order
    (["<s>", "<|begin_of_text|>"], None, "<unk>", "<|begin_of_text|>", "turn-start"),
    (["<s>"], None, "<unk>", "<s>", "turn-start"),
    (["<s>"], None, None, "<s>", "turn-start"),                                # id 0, no unk token
    ([], None, "<unk>", "</s>", "EOS"),                                        # unknown tokens map to unk: not a match
    ([], None, None, "</s>", "EOS"),                                           # unknown tokens map to None
])
def test_start_token_id_prefers_bos_then_documented_fallbacks(tokens, bos, unk, expected, kind):
    tokenizer = word_tokenizer(tokens, bos, unk)
    token_id, description = prerl.start_token_id(tokenizer)
    assert token_id == tokenizer.get_vocab()[expected] and isinstance(token_id, int)
    assert description.startswith(kind) and repr(expected) in description


def test_train_scores_the_pretrain_space_with_the_start_token_id(tiny_model_folder, tmp_path, monkeypatch):
    """train() passes start_token_id(tokenizer) to every pre-train-space scoring: a different id from the
    chooser (17, not the tiny tokenizer's BOS 1) must reach pretrain_logprobs, and only it."""
    chosen, seen = [], []
    real_start, real_pretrain = prerl.start_token_id, prerl.pretrain_logprobs

    def start_spy(tokenizer):
        chosen.append(real_start(tokenizer))
        return 17, "spy"

    def pretrain_spy(model, start_id, *args, **kwargs):
        seen.append(start_id)
        return real_pretrain(model, start_id, *args, **kwargs)
    monkeypatch.setattr(prerl, "start_token_id", start_spy)
    monkeypatch.setattr(prerl, "pretrain_logprobs", pretrain_spy)
    prerl.train(prerl.parse_config(run_args(tiny_model_folder, tmp_path, "--steps", "2", "--mode", "nsr-prerl")))
    assert chosen == [(1, "BOS '<s>'")]     # the tiny tokenizer's BOS
    assert seen and set(seen) == {17}


# --- 2. the next-token sampler against exact probabilities

def assert_draws_follow(picks, probs, sigmas=5.0):
    """Every class's share within `sigmas` binomial standard deviations of its exact probability
    (fixed seed: deterministic; 5 sigma over a handful of classes: not flaky under a new torch)."""
    n = len(picks)
    counts = torch.bincount(picks, minlength=len(probs)).double() / n
    for k, p in enumerate(probs):
        tolerance = sigmas * math.sqrt(p * (1 - p) / n) + 1e-12
        assert abs(counts[k].item() - p) <= tolerance, (k, counts[k].item(), p, tolerance)


PEAKED = [3.0, 1.0, 0.0, -1.0, 2.0, -3.0]


def exact_probs(logits, temperature, top_p=1.0):
    """softmax(logits / T) restricted to the smallest top-p nucleus, written with math and loops."""
    weights = [math.exp(l / temperature) for l in logits]
    probs = [w / sum(weights) for w in weights]
    kept, mass = set(), 0.0
    for k in sorted(range(len(probs)), key=lambda k: -probs[k]):
        if mass >= top_p:
            break
        kept.add(k)
        mass += probs[k]
    return [p / mass if k in kept else 0.0 for k, p in enumerate(probs)]


@pytest.mark.parametrize("temperature,top_p", [(0.5, 1.0), (0.8, 1.0), (1.0, 1.0), (1.7, 1.0), (0.6, 0.9), (1.5, 0.75)])
def test_pick_next_token_matches_exact_probabilities(temperature, top_p):
    torch.manual_seed(0)
    n = 40_000
    logits = torch.tensor([PEAKED], dtype=torch.float32).repeat(n, 1)
    probs = exact_probs(PEAKED, temperature, top_p)
    picks = prerl.pick_next_token(logits, temperature, top_p)
    assert picks.shape == (n,) and picks.dtype == torch.long
    assert_draws_follow(picks, probs)
    # the same tolerance rejects a temperature 10% off: the test is sharp enough to see a wrong T
    wrong = exact_probs(PEAKED, temperature * 1.1, top_p)
    with pytest.raises(AssertionError):
        assert_draws_follow(picks, wrong)


def test_pick_next_token_rows_are_independent_and_greedy_at_zero():
    torch.manual_seed(0)
    n = 20_000
    logits = torch.tensor([PEAKED, PEAKED[::-1]], dtype=torch.float64).repeat(n, 1)   # two different rows, interleaved
    picks = prerl.pick_next_token(logits, 0.7, 1.0)
    assert_draws_follow(picks[0::2], exact_probs(PEAKED, 0.7))
    assert_draws_follow(picks[1::2], exact_probs(PEAKED[::-1], 0.7))
    assert prerl.pick_next_token(logits[:2], 0.0, 1.0).tolist() == [0, 5]
    assert prerl.pick_next_token(logits[:2], 0.0, 0.5).tolist() == [0, 5]   # greedy ignores top-p


# --- 3./4. EOS: where decoding stops and what the response mask keeps

MANY_EOS = list(range(4, 40, 3))   # many "end" tokens, so that rows of the random tiny model end early


def first_eos(row, eos_ids):
    return next((t for t, token in enumerate(row) if token in eos_ids), None)


def test_generate_stops_at_the_longest_responses_first_eos():
    torch.manual_seed(0)
    model = tiny_model(torch.float32)
    prompt_ids = torch.tensor([[3, 3, 20, 21], [22, 23, 24, 25], [26, 27, 28, 29]])
    prompt_mask = (prompt_ids != 3).long()
    for temperature in (0.0, 1.0):
        out = prerl.generate(model, prompt_ids, prompt_mask, 4, 40, temperature, 1.0, MANY_EOS, pad_id=3)
        ends = [first_eos(row, MANY_EOS) for row in out.tolist()]
        assert all(e is not None for e in ends), ends            # every row ended within 40 tokens
        assert out.shape == (12, max(ends) + 1)                  # no column past the longest row's EOS
        assert min(ends) < max(ends)                             # rows really ended at different steps
        for row, end in zip(out.tolist(), ends):
            assert row[end + 1:] == [3] * (len(row) - end - 1)   # nothing decoded after a row's EOS


def test_sample_masks_everything_after_each_rows_first_eos(tiny_model_folder):
    torch.manual_seed(0)
    model, tokenizer = prerl.load_model(str(tiny_model_folder), torch.device("cpu"))
    model.generation_config.eos_token_id = MANY_EOS
    problems = prerl.load_problems(str(tiny_model_folder / "toy.jsonl"))[:3]
    out = prerl.sample(model, tokenizer, problems, prerl.Config(max_new_tokens=12, temperature=1.0), group_size=4)
    eos_ids = set(MANY_EOS) | {tokenizer.eos_token_id}
    ends = [first_eos(row, eos_ids) for row in out["response_ids"].tolist()]
    assert any(e is not None and e + 1 < out["response_ids"].shape[1] for e in ends)   # some row ended early
    width = out["response_ids"].shape[1]
    expected = [[int(e is None or t <= e) for t in range(width)] for e in ends]
    assert out["response_mask"].tolist() == expected
    kept = [[t for t, m in zip(row, mask) if m] for row, mask in zip(out["response_ids"].tolist(), expected)]
    assert out["texts"] == tokenizer.batch_decode(kept, skip_special_tokens=True)
    assert out["prompt_ids"].shape[0] == 12 and torch.equal(out["prompt_ids"][4], out["prompt_ids"][7])


def test_evaluation_is_greedy_by_default_and_averages_over_batches(tiny_model_folder, monkeypatch):
    model, tokenizer = prerl.load_model(str(tiny_model_folder), torch.device("cpu"))
    problems = [{"problem": f"what is {a}+1?", "answer": ["right", "wrong"][a % 3 == 0]} for a in range(5)]
    calls = []
    real_sample = prerl.sample

    def sample_spy(model, tokenizer, chunk, cfg, group_size, temperature=None):
        calls.append((len(chunk), group_size, temperature))
        out = real_sample(model, tokenizer, chunk, cfg, group_size, temperature)
        calls[-1] += (out["texts"],)
        return out
    monkeypatch.setattr(prerl, "sample", sample_spy)
    monkeypatch.setattr(verify, "rewards", lambda texts, golds: [float(g == "right") for g in golds])
    assert prerl.Config().eval_temperature == 0.0
    for seed in (0, 1):   # greedy: the texts do not depend on the random state
        torch.manual_seed(seed)
        assert prerl.evaluate(model, tokenizer, problems, prerl.Config(max_new_tokens=8), batch_size=2) == 3 / 5
    assert [c[:3] for c in calls] == [(2, 1, 0.0), (2, 1, 0.0), (1, 1, 0.0)] * 2
    assert [c[3] for c in calls[:3]] == [c[3] for c in calls[3:]]
    greedy = prerl.generate(model, *prerl.encode_prompts(tokenizer, problems[:2], torch.device("cpu")).values(),
                            1, 8, 0.0, 1.0, prerl.eos_token_ids(model, tokenizer), tokenizer.pad_token_id)
    assert calls[0][3] == tokenizer.batch_decode(greedy * prerl.response_mask_from_positions(
        greedy, prerl.eos_token_ids(model, tokenizer)), skip_special_tokens=True)
    calls.clear()
    prerl.evaluate(model, tokenizer, problems[:1], prerl.Config(max_new_tokens=8, eval_temperature=0.9))
    assert calls[0][2] == 0.9


# --- 5. periodic checkpoints: the step they record, and a resume from one

def test_periodic_checkpoint_records_its_step_and_resumes_like_an_uninterrupted_run(tiny_model_folder, tmp_path, monkeypatch):
    """--save-every 2 over 4 steps, the run killed during step 3: the checkpoint on disk is the one saved
    after 2 steps and says so; resuming from it ends with the same weights, optimizer state and metrics
    as a run that was never interrupted."""
    args = ("--steps", "4", "--save-every", "2", "--switch-step", "1")
    prerl.train(prerl.parse_config(run_args(tiny_model_folder, tmp_path / "full", *args)))
    rl_step = prerl.rl_step

    def rl_step_dying_at_step_3(model, tokenizer, optimizer, problems, step, *rest):
        if step == 3:
            raise KeyboardInterrupt("killed during step 3")
        return rl_step(model, tokenizer, optimizer, problems, step, *rest)
    monkeypatch.setattr(prerl, "rl_step", rl_step_dying_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        prerl.train(prerl.parse_config(run_args(tiny_model_folder, tmp_path / "cut", *args)))
    periodic = state_of(tmp_path / "cut" / "checkpoint.pt")
    assert periodic["step"] == 2
    assert {int(s["step"]) for s in periodic["optimizer"]["state"].values()} <= {1, 2}   # Adam: at most 2 updates
    monkeypatch.setattr(prerl, "rl_step", rl_step)
    prerl.train(prerl.parse_config(run_args(tiny_model_folder, tmp_path / "cut", *args, "--resume")))
    full, resumed = state_of(tmp_path / "full" / "checkpoint.pt"), state_of(tmp_path / "cut" / "checkpoint.pt")
    assert full["step"] == resumed["step"] == 4
    for name, tensor in full["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    for key, state in full["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, resumed["optimizer"]["state"][key][name]), (key, name)
    records = {}
    for line in open(tmp_path / "cut" / "metrics.jsonl"):   # step 2 ran twice (before the kill, after resume)
        record = json.loads(line)
        records[record["step"]] = record                    # the resumed run's record is the later one
    timing = ("sample_s", "score_s", "train_s")
    uninterrupted = [json.loads(line) for line in open(tmp_path / "full" / "metrics.jsonl")]
    assert [m["stage"] for m in uninterrupted] == ["nsr-prerl", "grpo", "grpo", "grpo"]
    assert any(m["kept_tokens"] > 0 for m in uninterrupted[2:])   # the resumed steps really trained
    assert [{k: v for k, v in records[s].items() if k not in timing} for s in range(4)] == \
           [{k: v for k, v in m.items() if k not in timing} for m in uninterrupted]


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


# --- laws of the advantages, property-based (hypothesis is development-only: skipped without it)

def reward_groups():
    from hypothesis import strategies as st
    return st.integers(1, 4).flatmap(lambda groups: st.integers(2, 8).flatmap(lambda g: st.lists(
        st.lists(st.sampled_from([0.0, 1.0]), min_size=g, max_size=g), min_size=groups, max_size=groups)))


def test_advantage_laws_hold_for_any_groups():
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import strategies as st

    @hypothesis.settings(max_examples=150, deadline=None, derandomize=True)
    @hypothesis.given(reward_groups(), st.randoms(use_true_random=False))
    def check(groups, rng):
        rewards = torch.tensor(groups, dtype=torch.float64)
        cfg = prerl.Config()
        table = {stage: prerl.advantages_for(stage, rewards, cfg)[0] for stage in prerl.MODES if stage != "dsrl"}
        # centred advantages sum to zero in every group; GRPO's too
        torch.testing.assert_close(table["prerl"].sum(1), torch.zeros(len(groups), dtype=torch.float64), atol=1e-12, rtol=0)
        torch.testing.assert_close(table["grpo"].sum(1), torch.zeros(len(groups), dtype=torch.float64), atol=1e-9, rtol=0)
        # negative-only stages never push a response up, positive-only ones never down
        assert (table["nsr-prerl"] <= 0).all() and (table["nsr"] <= 0).all()
        assert (table["psr-prerl"] >= 0).all() and (table["psr"] >= 0).all()
        # NSR-PreRL and PSR-PreRL split PreRL's advantages between them
        torch.testing.assert_close(table["nsr-prerl"] + table["psr-prerl"], table["prerl"], atol=0, rtol=0)
        # a group whose responses all agree carries no signal in the centred and GRPO advantages
        for i, group in enumerate(groups):
            if len(set(group)) == 1:
                assert (table["prerl"][i] == 0).all() and (table["grpo"][i] == 0).all()
        # permuting the responses of a group permutes their advantages, in every stage
        order = list(range(rewards.shape[1]))
        rng.shuffle(order)
        permuted = {stage: prerl.advantages_for(stage, rewards[:, order], cfg)[0] for stage in table}
        for stage in table:
            torch.testing.assert_close(permuted[stage], table[stage][:, order], atol=1e-12, rtol=0)
    check()


def test_grpo_advantages_ignore_reward_shift_and_scale():
    """Where they should: GRPO divides by the group's std, so A(a r + b) = A(r) for a > 0 (eps = 0);
    centred advantages move with the scale (A(a r + b) = a A(r)) but not with the shift."""
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import strategies as st

    @hypothesis.settings(max_examples=150, deadline=None, derandomize=True)
    @hypothesis.given(reward_groups(), st.floats(0.1, 10.0), st.floats(-5.0, 5.0))
    def check(groups, scale, shift):
        rewards = torch.tensor(groups, dtype=torch.float64)
        moved = scale * rewards + shift
        mixed = rewards.std(1) > 0
        torch.testing.assert_close(prerl.grpo_advantages(moved, eps=0.0)[mixed], prerl.grpo_advantages(rewards, eps=0.0)[mixed],
                                   atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(prerl.centered_advantages(moved), scale * prerl.centered_advantages(rewards),
                                   atol=1e-9, rtol=1e-9)
    check()


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
