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


# ---------------------------------------------------------------------------
# prerl.py: a tiny model and tokenizer built here, from a config (no download)

import torch  # noqa: E402

import machinery  # noqa: E402
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


def test_generate_greedy_matches_transformers_generate(path):
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
        machinery.preallocate(cache, room=3)
        assert all(type(layer) is machinery.PreallocatedLayer for layer in cache.layers)
        for token, keep in [(32, [0, 1, 2]), (33, [0, 2]), (34, [0, 2])]:
            if len(keep) < len(ids):
                cache.batch_select_indices(torch.tensor(keep))
                ids = ids[keep]
            ids = torch.cat([ids, torch.full((len(ids), 1), token)], 1)
            logits = model(input_ids=ids[:, -1:], use_cache=True, **{cache_name: cache}).logits[:, -1]
            torch.testing.assert_close(logits, model(input_ids=ids).logits[:, -1])
        assert cache.layers[0].keys.shape[-2] == ids.shape[1]


def test_sampled_first_token_follows_softmax_over_temperature(path):
    torch.manual_seed(0)
    model = tiny_model(torch.float32)
    prompt = torch.tensor([[20, 21, 22]])
    with torch.no_grad():
        expected = torch.softmax(model(input_ids=prompt).logits[0, -1] / 0.5, -1)
    uniforms = torch.rand(20000, 1, dtype=torch.float64)
    first = prerl.generate(model, prompt, torch.ones_like(prompt), 20000, 1, 0.5, 1.0, [2], pad_id=3, uniforms=uniforms)[:, 0]
    observed = torch.bincount(first, minlength=expected.numel()).float() / first.numel()
    assert (observed - expected).abs().max() < 0.015


def test_top_p_keeps_the_smallest_nucleus():
    torch.manual_seed(0)
    logits = torch.log(torch.tensor([[0.05, 0.5, 0.15, 0.3]])).repeat(20000, 1)
    picks = prerl.pick_next_token(logits, 1.0, 0.7, torch.rand(20000, dtype=torch.float64))  # nucleus {0.5, 0.3}, renormalised to 0.625 / 0.375
    counts = torch.bincount(picks, minlength=4).float() / len(picks)
    assert counts[0] == 0 and counts[2] == 0
    assert abs(counts[1] - 0.625) < 0.015 and abs(counts[3] - 0.375) < 0.015
    assert prerl.pick_next_token(logits[:1], 0.0, 1.0).item() == 1  # temperature 0 = greedy


def test_a_response_depends_only_on_its_own_key_not_on_the_batch(path):
    """Sampling at a temperature: each prompt's random numbers come from its key, so its G responses
    are the same whether it is sampled alone or beside other prompts (whose rows end at other steps),
    and the plain path and the machinery draw the same tokens."""
    model = tiny_model(torch.float32)
    prompts = torch.tensor([[3, 20, 21], [22, 23, 24]])
    eos_ids = list(range(4, 40, 5))
    uniforms = prerl.sampling_uniforms(["s-0", "s-1"], 4, 10)
    both = prerl.generate(model, prompts, (prompts != 3).long(), 4, 10, 1.0, 1.0, eos_ids, 3, uniforms)
    alone = prerl.generate(model, prompts[1:], torch.ones_like(prompts[1:]), 4, 10, 1.0, 1.0, eos_ids, 3,
                           prerl.sampling_uniforms(["s-1"], 4, 10))
    mask = prerl.response_mask_from_positions(both, eos_ids)
    assert len(set(mask.sum(1).tolist())) > 1                      # rows really ended at different steps
    assert torch.equal((both * mask)[4:, :alone.shape[1]], alone * mask[4:, :alone.shape[1]])
    assert torch.equal(prerl.sampling_uniforms(["s-1"], 4, 10), uniforms[4:])      # keyed, not stateful
    assert not torch.equal(prerl.sampling_uniforms(["s-2"], 4, 10), uniforms[4:])
    with pytest.raises(ValueError, match="uniforms"):
        prerl.generate(model, prompts, torch.ones_like(prompts), 4, 10, 1.0, 1.0, eos_ids, 3)


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
    got_value = machinery.LinearLogprobs.apply(hidden, weight, bias, targets)
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
        got_value = machinery.LinearLogprobs.apply(hidden, weight, None, targets)
    got = torch.autograd.grad(got_value.sum(), (hidden, weight))
    expected_value = plain_linear_logprobs(hidden, weight, None, targets)
    expected = torch.autograd.grad(expected_value.sum(), (hidden, weight))
    assert got_value.dtype == torch.float32 and got[0].dtype == got[1].dtype == torch.float32
    torch.testing.assert_close(got_value, expected_value, rtol=0.05, atol=0.05)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0.05, atol=0.02)


def test_linear_logprobs_refuses_a_second_backward():
    hidden, weight = torch.randn(2, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    loss = machinery.LinearLogprobs.apply(hidden, weight, None, torch.tensor([1, 2])).sum()
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
    code = """import resource, sys, torch, machinery
if sys.argv[1] == "reuse" and not machinery.reuse_freed_memory(torch.device("cpu")):
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
    assert not machinery.reuse_freed_memory(torch.device("cuda"))  # GPUs: malloc left alone


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


# --- machinery.py: the plain path (prerl.py alone) and the machinery agree


@pytest.fixture(params=["machinery", "plain"])
def path(request, monkeypatch):
    """Run a test once through machinery.py and once through prerl.py's plain path."""
    monkeypatch.setattr(prerl, "PLAIN", request.param == "plain")
    return request.param


def test_kv_cache_plain_and_machinery_decode_the_same_tokens(monkeypatch):
    """Greedy decoding with left-padded prompts and rows that end early: DynamicLayer (plain) and the
    preallocated buffers (machinery) give token-identical responses."""
    model = tiny_model(torch.float32)
    prompt_ids = torch.tensor([[3, 3, 20, 21], [22, 23, 24, 25], [3, 26, 27, 28]])
    prompt_mask = (prompt_ids != 3).long()
    eos_ids = list(range(4, 40, 3))
    outputs = {}
    for plain in (True, False):
        monkeypatch.setattr(prerl, "PLAIN", plain)
        outputs[plain] = prerl.generate(model, prompt_ids, prompt_mask, 2, 12, 0.0, 1.0, eos_ids, pad_id=3)
    lengths = prerl.response_mask_from_positions(outputs[True], eos_ids).sum(1)
    assert lengths.min() < lengths.max()  # rows really ended at different steps
    assert torch.equal(outputs[True], outputs[False])


@pytest.mark.parametrize("head", ["untied", "tied", "bias"])
def test_lm_head_logprobs_plain_and_machinery_agree_in_value_and_gradient(head, monkeypatch):
    """token_logprobs through the plain log_softmax and through machinery.lm_head_logprobs (chunks of
    256 positions, hand-written backward): same values and the same gradient for every parameter."""
    model = tiny_model(tied=(head == "tied"))
    if head == "bias":
        old = model.lm_head
        model.lm_head = torch.nn.Linear(old.in_features, old.out_features, bias=True, dtype=torch.float64)
        torch.nn.init.normal_(model.lm_head.bias)
    torch.manual_seed(1)
    input_ids = torch.randint(4, 40, (3, 150))  # 3 x 140 targets: more than one 256-position chunk
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :7] = 0
    targets, weights = input_ids[:, 10:], torch.randn(3, 140, dtype=torch.float64)
    results = {}
    for plain in (True, False):
        monkeypatch.setattr(prerl, "PLAIN", plain)
        model.zero_grad()
        lp = prerl.token_logprobs(model, input_ids, attention_mask, targets, 10)
        (lp * weights).sum().backward()
        results[plain] = (lp.detach(), flat_grad(model))
        with torch.no_grad():  # the no-gradient path (evaluation, the KL reference) too
            torch.testing.assert_close(prerl.token_logprobs(model, input_ids, attention_mask, targets, 10),
                                       lp.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(results[True][1], results[False][1], rtol=1e-9, atol=1e-12)


def test_plain_run_never_reaches_the_machinery(tiny_model_folder, tmp_path, monkeypatch):
    """Every machinery entry point is counted: a default run reaches each one, a --plain run none."""
    calls = {}

    def counted(name, function):
        def wrapper(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return function(*args, **kwargs)
        return wrapper
    entry_points = ("preallocate", "lm_head_logprobs", "reuse_freed_memory")
    for name in entry_points:
        monkeypatch.setattr(machinery, name, counted(name, getattr(machinery, name)))
    monkeypatch.setattr(prerl, "PLAIN", False)
    prerl.train(prerl.parse_config(run_args(tiny_model_folder, tmp_path / "fast", "--steps", "2")))
    assert all(calls.get(name, 0) > 0 for name in entry_points), calls
    calls.clear()
    result = prerl.train(prerl.parse_config(run_args(tiny_model_folder, tmp_path / "plain", "--steps", "2", "--plain")))
    assert calls == {} and prerl.PLAIN
    assert 0 <= result["after"] <= 1 and len(open(tmp_path / "plain" / "metrics.jsonl").readlines()) == 2
    metrics = [json.loads(line) for line in open(tmp_path / "plain" / "metrics.jsonl")]
    assert any(m["kept_tokens"] > 0 for m in metrics)  # the plain path really trained


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


def test_evaluate_samples_on_tiny_model(tiny_model_folder):
    model, tokenizer = prerl.load_model(str(tiny_model_folder), torch.device("cpu"))
    problems = prerl.load_problems(str(tiny_model_folder / "toy.jsonl"))[:3]
    cfg = prerl.Config(max_new_tokens=5, temperature=1.0)
    result = analyze.evaluate_samples(model, tokenizer, problems, cfg, n=4)
    assert sorted(result["pass_at_k"]) == [1, 2, 4]
    assert result["pass_at_k"][1] <= result["pass_at_k"][2] <= result["pass_at_k"][4]
    assert result["pass_at_k"][1] == pytest.approx(result["avg_at_n"])
    assert 0 <= result["parseable_share"] <= 1 and result["mean_response_tokens"] <= 5


# ---------------------------------------------------------------------------
# Issue 13: multi-seed studies (t-intervals, steps to a threshold, resume per run), lr sweep on a
# validation split, per-step diagnostics, the two-step word-problem family


def test_t_interval_hand_worked():
    # [0.5, 0.6, 0.7]: mean 0.6, s = 0.1, s / sqrt(3) = 0.0577350, t(0.975, 2) = 4.302653 -> half-width 0.248414
    mean, low, high = analyze.mean_ci([0.5, 0.6, 0.7])
    assert (mean, low, high) == pytest.approx((0.6, 0.6 - 0.248414, 0.6 + 0.248414), abs=1e-6)
    # [1..5]: mean 3, s = sqrt(2.5), s / sqrt(5) = 0.707107, t(0.975, 4) = 2.776445 -> half-width 1.963243
    assert analyze.mean_ci([1, 2, 3, 4, 5]) == pytest.approx((3.0, 3 - 1.963243, 3 + 1.963243), abs=1e-6)
    assert analyze.mean_ci([0.4]) == (0.4, None, None)            # one seed: no interval
    with pytest.raises(ValueError):
        analyze.t_quantile_975(0)


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


def test_two_step_word_problems_answer_what_they_ask():
    import re
    for p in prerl.make_problems(60, "twostep", 1, seed=3, held_out=False):
        a, b, c = map(int, re.findall(r"\d+", p["problem"]))
        if "bags" in p["problem"]:
            expected = a + b * c                      # has a, buys b bags of c
        elif "gives away" in p["problem"]:
            expected = a * b - c                      # a boxes of b, gives away c
        else:
            expected = (a + b) * c                    # has a, finds b, multiplied by c
        assert p["answer"] == str(expected) and expected >= 0, p


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
    result = json.load(open(tmp_path / "parts" / "nsr-prerl" / "seed0" / "result.json"))
    assert [m["step"] for m in result["metrics"]] == [0, 1] and result["seed"] == 0
    assert {"entropy", "logp_y_wrong", "eos_share", "reflections"} <= set(result["metrics"][0])
    with pytest.raises(SystemExit, match="other options .*steps"):
        analyze.main(study_argv(tiny_model_folder, tmp_path / "parts", "--steps", "3"))


def test_lr_sweep_chooses_on_the_validation_split_never_the_held_out(tiny_model_folder, tmp_path, monkeypatch):
    args, cfg = analyze.parse_args(study_argv(tiny_model_folder, tmp_path, "--data", str(tmp_path / "big.jsonl"),
                                              "--eval-size", "8"))
    (tmp_path / "big.jsonl").write_text("".join(json.dumps({"problem": f"what is {a}+{b}?", "answer": str(a + b)}) + "\n"
                                                         for a in range(12) for b in range(12)))
    data = analyze.study_data(cfg, args.out_dir)
    sets = {name: {p["problem"] for p in prerl.load_problems(path)} for name, path in data.items()}
    assert sets["validation"] and sets["heldout"] and sets["train"]
    assert not (sets["train"] & sets["validation"]) and not (sets["train"] & sets["heldout"])
    assert not (sets["validation"] & sets["heldout"])
    seen = []
    final = {1e-3: 0.5, 1e-2: 0.75, 1e-1: 0.75}          # a tie at the end, broken by the mean over the curve
    mean_part = {1e-3: 0.9, 1e-2: 0.1, 1e-1: 0.5}

    def fake_run(cfg, args, mode, lr, seed, train_path, eval_path, out_dir, n_samples):
        seen.append((eval_path, train_path, n_samples))
        return {"curve": [(0, mean_part[lr]), (2, final[lr])]}
    monkeypatch.setattr(analyze, "study_run", fake_run)
    lr, scores = analyze.choose_lr(cfg, args, "grpo", [1e-3, 1e-2, 1e-1], data)
    assert lr == 1e-1 and scores == {"0.001": 0.5, "0.01": 0.75, "0.1": 0.75}
    assert {s[0] for s in seen} == {data["validation"]} and {s[1] for s in seen} == {data["train"]}
