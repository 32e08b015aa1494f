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


def _alive(pid):
    """True while pid runs (a zombie waiting for its reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc to see processes")
def test_verifier_workers_exit_when_their_parent_is_killed():
    # issue 16, no orphans: a process starts verifier workers (from a thread too, as rewards() does)
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
    write_sums(folder / "toy.jsonl", 4)
    return folder


def write_sums(path, n):
    """A JSONL file of the n x n problems 'what is a+b?' for a, b < n, with their answers."""
    path.write_text("".join(json.dumps({"problem": f"what is {a}+{b}?", "answer": str(a + b)}) + "\n"
                            for a in range(n) for b in range(n)))


def run_args(folder, out, *extra):
    return ["--model", str(folder), "--data", str(folder / "toy.jsonl"), "--eval-data", str(folder / "toy.jsonl"),
            "--out-dir", str(out), "--prompts-per-step", "16", "--group-size", "8", "--max-new-tokens", "6",
            "--eval-size", "4", "--eval-every", "0", "--lr", "1e-3", "--precision", "fp32", *extra]


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


# --- verify.py: what real models write (issue 14)
# Hand-written (completion, reference, expected reward) cases in the formats models produce, one
# table per category of issue 14, true and false in each. bench_verify.py prints the per-category
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
# Issue 16: run safety -- every bad flag refused up front, one run per out-dir, Ctrl-C and kill -9 leave
# a resumable run, non-finite steps skipped, an exported model folder, plots and trackers.

import signal  # noqa: E402
import types  # noqa: E402

# (flags, the flag the error must name): each alone makes a run that would crash, or run silently wrong
INVALID_FLAGS = [
    (["--prompts-per-step", "0"], "--prompts-per-step"), (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--lr", "-1"], "--lr"), (["--lr", "0"], "--lr"), (["--lr", "nan"], "--lr"), (["--lr", "inf"], "--lr"),
    (["--device", "tpu"], "--device"), (["--group-size", "1"], "--group-size"),
    (["--group-size", "1", "--mode", "nsr-prerl"], "--group-size"), (["--group-size", "0", "--mode", "nsr"], "--group-size"),
    (["--temperature", "-1"], "--temperature"), (["--temperature", "0"], "--temperature"),
    (["--top-p", "0"], "--top-p"), (["--top-p", "1.5"], "--top-p"), (["--switch-step", "-3"], "--switch-step"),
    (["--eval-size", "-1"], "--eval-size"), (["--eval-every", "-1"], "--eval-every"), (["--save-every", "-2"], "--save-every"),
    (["--micro-batch-tokens", "-1"], "--micro-batch-tokens"), (["--micro-batch-tokens", "48"], "--micro-batch-tokens"),
    (["--kl-coef", "-0.1"], "--kl-coef"), (["--w-reinforce-lambda", "-1"], "--w-reinforce-lambda"),
    (["--clip-eps-low", "1"], "--clip-eps-low"), (["--clip-eps-low", "-0.1"], "--clip-eps-low"),
    (["--clip-eps-high", "-0.1"], "--clip-eps-high"), (["--steps", "-1"], "--steps"), (["--mode", "ppo"], "--mode"),
    (["--tasks", "add,foo"], "--tasks"), (["--difficulty", "0"], "--difficulty"), (["--prerl-coef", "-1"], "--prerl-coef"),
    (["--weight-decay", "-1"], "--weight-decay"), (["--grad-clip", "0"], "--grad-clip"),
    (["--eval-temperature", "-1"], "--eval-temperature"), (["--report-to", "mlflow"], "--report-to"),
    (["--data", "no/such.jsonl"], "--data"), (["--eval-data", "no/such.jsonl"], "--eval-data"),
    (["--model", "./no/such/model"], "--model"),
]


def refused_line(argv, capsys):
    """Run parse_config on argv; it must refuse with exit code 2 and exactly one stderr line, 'error: ...'."""
    with pytest.raises(SystemExit) as refusal:
        prerl.parse_config(argv)
    assert refusal.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 1 and err.endswith("\n") and err.count("\n") == 1, err
    return err.strip()


@pytest.mark.parametrize("flags,flag", INVALID_FLAGS)
def test_every_invalid_flag_is_refused_in_one_line_before_anything_is_written(flags, flag, tmp_path, capsys):
    out = tmp_path / "out"
    line = refused_line(["--out-dir", str(out), *flags], capsys)
    assert line.startswith(f"error: {flag} "), line
    assert not out.exists()


def test_cuda_without_a_gpu_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = refused_line(["--device", "cuda", "--out-dir", str(tmp_path / "out")], capsys)
    assert line.startswith("error: --device cuda: this machine has no usable CUDA GPU") and not (tmp_path / "out").exists()


def test_missing_tracker_package_is_named(tmp_path, capsys, monkeypatch):
    find_spec = prerl.importlib.util.find_spec
    monkeypatch.setattr(prerl.importlib.util, "find_spec", lambda name: None if name == "wandb" else find_spec(name))
    line = refused_line(["--report-to", "wandb", "--out-dir", str(tmp_path / "out")], capsys)
    assert line == "error: --report-to wandb: the wandb package is not installed: pip install wandb, or use --report-to none"


@pytest.mark.parametrize("flags", [
    ["--group-size", "1", "--mode", "nsr"], ["--group-size", "1", "--mode", "w-reinforce"], ["--micro-batch-tokens", "49"],
    ["--eval-size", "0"], ["--top-p", "1"], ["--switch-step", "0"], ["--clip-eps-low", "0"], ["--clip-eps-high", "0"],
    ["--kl-coef", "0"], ["--w-reinforce-lambda", "0"], ["--steps", "0"], ["--eval-every", "0"], ["--save-every", "0"],
    ["--eval-temperature", "0"], ["--device", "cpu"], ["--micro-batch-tokens", "0"],
])
def test_boundary_values_are_accepted(flags, tmp_path):
    prerl.parse_config(["--out-dir", str(tmp_path / "out"), *flags])
    assert not (tmp_path / "out").exists()  # parsing only looks


def test_out_dir_that_is_a_file_or_not_writable_is_refused(tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("x")
    assert refused_line(["--out-dir", str(tmp_path / "file")], capsys).endswith("is a file, not a folder; choose another --out-dir")
    assert "is a file" in refused_line(["--out-dir", str(tmp_path / "file" / "run")], capsys)
    monkeypatch.setattr(prerl.os, "access", lambda path, mode: False)  # as root, permission bits never refuse
    line = refused_line(["--out-dir", str(tmp_path / "new" / "run")], capsys)
    assert line == f"error: --out-dir {tmp_path / 'new' / 'run'}: {tmp_path} is not writable by this user; choose another --out-dir"
    assert (tmp_path / "file").read_text() == "x" and not (tmp_path / "new").exists()


def test_a_bad_flag_from_the_command_line_exits_2_with_one_line(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "prerl.py", "--lr", "-1", "--out-dir", str(out)], capture_output=True,
                          text=True, timeout=120, cwd=os.path.dirname(os.path.abspath(prerl.__file__)))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == ["error: --lr -1.0: AdamW needs a positive learning rate, e.g. 2e-5"]
    assert not out.exists()


def test_metrics_are_cut_back_to_the_checkpoint_and_a_half_line_is_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": s / 10}) + "\n" for s in range(5)]
    path.write_text("".join(lines) + '{"step": 5, "lo')
    assert [m["step"] for m in prerl.read_metrics(path)] == [0, 1, 2, 3, 4]
    with prerl.open_metrics(str(path), 3) as log:
        log.write(json.dumps({"step": 3}) + "\n")
    assert path.read_text() == "".join(lines[:3]) + json.dumps({"step": 3}) + "\n"  # the kept lines byte for byte
    prerl.open_metrics(str(path), 0).close()  # a fresh run starts an empty log
    assert path.read_text() == "" and not list(tmp_path.glob("*.tmp*"))


def test_resume_command_rebuilds_the_run(tmp_path):
    cfg = prerl.parse_config(["--out-dir", str(tmp_path / "o u t"), "--mode", "grpo", "--lr", "1e-3", "--plain", "--steps", "7"])
    words = prerl.resume_command(cfg).split(" ")
    assert words[:2] == ["python", "prerl.py"] and words[-1] == "--resume"
    import shlex
    assert prerl.parse_config(shlex.split(prerl.resume_command(cfg))[2:]) == dataclasses_replace(cfg, resume=True)


def dataclasses_replace(cfg, **changes):
    import dataclasses
    return dataclasses.replace(cfg, **changes)


def test_resume_with_other_settings_names_the_fields_and_steps_may_only_grow(tiny_model_folder, tmp_path, capsys):
    out = tmp_path / "run"
    prerl.train(prerl.parse_config(run_args(tiny_model_folder, out, "--steps", "2", "--eval-size", "0")))
    capsys.readouterr()
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    line = refused_line(run_args(tiny_model_folder, out, "--steps", "3", "--resume", "--mode", "grpo", "--group-size", "4"), capsys)
    assert line.startswith(f"error: --resume: the checkpoint in {out} was trained with ") and "--mode dsrl (now grpo)" in line
    assert "--group-size 8 (now 4)" in line and "--steps" not in line
    line = refused_line(run_args(tiny_model_folder, out, "--steps", "1", "--resume"), capsys)
    assert line == f"error: --steps 1: the checkpoint in {out} is already at step 2; use --steps 2 or more"
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # refusals write nothing
    prerl.parse_config(run_args(tiny_model_folder, out, "--steps", "5", "--resume", "--eval-every", "2"))  # allowed


def test_a_held_lock_refuses_and_a_dead_holders_lock_is_taken_over(tmp_path, capsys):
    """A child process holds run.lock as a live run does (lockf + its PID); while it lives, a run into the
    folder is refused naming it; once it is killed with -9 the lock is free and taken over."""
    (tmp_path / "run.lock").touch()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, json, os, socket, sys, time\n"
                               f"fd = os.open({str(tmp_path / 'run.lock')!r}, os.O_RDWR)\n"
                               "fcntl.lockf(fd, fcntl.LOCK_EX)\n"
                               "os.write(fd, json.dumps({'pid': os.getpid(), 'host': socket.gethostname(), 'started': 'now'}).encode())\n"
                               "print('held', flush=True)\ntime.sleep(120)\n"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        line = refused_line(["--out-dir", str(tmp_path)], capsys)
        assert line.startswith(f"error: --out-dir {tmp_path}: another run is using it (pid {holder.pid} on host ")
        with pytest.raises(SystemExit) as refusal, prerl.claim_out_dir(str(tmp_path)):
            pass
        assert refusal.value.code == 2
    finally:
        holder.kill()
        holder.wait(timeout=30)
    prerl.parse_config(["--out-dir", str(tmp_path)])
    with prerl.claim_out_dir(str(tmp_path)):
        assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
        assert f"from pid {holder.pid} on host" in capsys.readouterr().out  # the take-over is said
    assert (tmp_path / "run.lock").read_text() == ""  # released: empty, free


def nan_loss(monkeypatch):
    policy_loss = prerl.policy_loss
    monkeypatch.setattr(prerl, "policy_loss", lambda *args, **kwargs: policy_loss(*args, **kwargs) * float("nan"))


def test_a_non_finite_loss_skips_the_update_and_leaves_the_weights(monkeypatch):
    model, batch = tiny_model(torch.float32), toy_batch()
    rewards = torch.tensor([[1., 0., 0., 1.], [0., 1., 1., 1.]])
    cfg = prerl.Config(lr=1e-2)
    optimizer = prerl.make_optimizer(model, cfg)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with monkeypatch.context() as patch:
        nan_loss(patch)
        loss, kept = prerl.accumulate_gradients(model, batch, rewards, "grpo", cfg, start_id=1)
    assert math.isnan(loss) and kept > 0 and not torch.isfinite(flat_grad(model)).all()  # the grads are poisoned
    grad_norm = prerl.optimizer_step(model, optimizer, cfg, loss)
    assert prerl.nonfinite_reason(loss, grad_norm).startswith("non-finite loss nan")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    assert all(p.grad is None for p in model.parameters()) and not optimizer.state  # dropped, no Adam step
    loss, _ = prerl.accumulate_gradients(model, batch, rewards, "grpo", cfg, start_id=1)  # a good step still trains
    prerl.optimizer_step(model, optimizer, cfg, loss)
    assert math.isfinite(loss) and not all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())


def test_non_finite_steps_are_logged_and_three_in_a_row_stop_the_run(tiny_model_folder, tmp_path, monkeypatch, capsys):
    accumulate = prerl.accumulate_gradients
    monkeypatch.setattr(prerl, "accumulate_gradients", lambda *a, **k: (float("nan"), accumulate(*a, **k)[1]))
    with pytest.raises(SystemExit, match=r"steps 0\.\.2 all had a non-finite loss or gradient norm"):
        prerl.train(prerl.parse_config(run_args(tiny_model_folder, tmp_path, "--steps", "6", "--eval-size", "0")))
    metrics = prerl.read_metrics(tmp_path / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [0, 1, 2] and all(m["skipped"].startswith("non-finite loss nan") for m in metrics)
    assert "not measured (--eval-size 0)" in capsys.readouterr().out  # no evaluation is said, not 0.000
    assert not (tmp_path / "checkpoint.pt").exists() and (tmp_path / "run.lock").read_text() == ""


def test_exported_model_loads_anywhere_with_the_checkpoints_log_probs(tiny_model_folder, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import analyze
    result = prerl.train(prerl.parse_config(run_args(tiny_model_folder, tmp_path, "--steps", "2", "--save-every", "1",
                                                     "--eval-size", "0", "--lr", "1e-2", "--temperature", "1.5")))
    assert result == {"before": None, "after": None}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "metrics.jsonl", "model", "run.lock"]
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32)
    assert (tmp_path / "model" / "generation_config.json").exists()
    assert AutoTokenizer.from_pretrained(tmp_path / "model")("1+2").input_ids == tiny_tokenizer()("1+2").input_ids
    checkpointed, _ = prerl.load_model(str(tiny_model_folder), torch.device("cpu"))
    start, _ = prerl.load_model(str(tiny_model_folder), torch.device("cpu"))
    prerl.load_checkpoint(str(tmp_path / "checkpoint.pt"), checkpointed)
    batch = toy_batch()
    with torch.no_grad():
        lps = [prerl.conditional_logprobs(m.eval(), batch["prompt_ids"], batch["prompt_mask"], batch["response_ids"],
                                          batch["response_mask"]) for m in (exported, checkpointed, start)]
    assert torch.equal(lps[0], lps[1]) and not torch.equal(lps[0], lps[2])  # the trained weights, exactly
    out = analyze.main(["eval", "--model", str(tmp_path / "model"), "--eval-data", str(tiny_model_folder / "toy.jsonl"),
                        "--eval-size", "2", "--n", "2", "--max-new-tokens", "4", "--json", str(tmp_path / "eval.json")])
    assert list(out) == [str(tmp_path / "model")] and out[str(tmp_path / "model")]["problems"] == 2


def fake_tracker(name, calls):
    """A stand-in for the wandb / trackio package: records what the run sends."""
    import importlib.machinery
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    run = types.SimpleNamespace(log=lambda values, step: calls.append((step, values)), finish=lambda: calls.append("finish"))
    module.init = lambda **kwargs: calls.append(("init", kwargs)) or run
    module.log, module.finish = run.log, run.finish
    return module


@pytest.mark.parametrize("tracker", ["wandb", "trackio"])
def test_report_to_sends_every_metrics_record(tracker, tiny_model_folder, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, tracker, fake_tracker(tracker, calls))
    prerl.train(prerl.parse_config(run_args(tiny_model_folder, tmp_path, "--steps", "3", "--switch-step", "2",
                                            "--eval-every", "2", "--report-to", tracker)))
    assert calls[0][0] == "init" and calls[0][1]["config"]["steps"] == 3 and calls[-1] == "finish"
    if tracker == "wandb":
        assert calls[0][1]["mode"] == os.environ.get("WANDB_MODE", "offline")
    sent = calls[1:-1]
    metrics = prerl.read_metrics(tmp_path / "metrics.jsonl")
    assert sent[0][0] == 0 and set(sent[0][1]) == {"eval_accuracy"} and sent[-1][0] == 3  # before and after
    for record, (step, values) in zip(metrics, sent[1:-1]):
        assert step == record["step"] and values["grad_norm"] == record["grad_norm"]
        assert values["pretrain_space"] == (1.0 if record["stage"] == "nsr-prerl" else 0.0)
    assert len(sent) == len(metrics) + 2 and "eval_accuracy" in sent[2][1]


def test_report_to_tensorboard_writes_the_scalars(tiny_model_folder, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    prerl.train(prerl.parse_config(run_args(tiny_model_folder, tmp_path, "--steps", "2", "--eval-size", "0",
                                            "--report-to", "tensorboard")))
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    metrics = prerl.read_metrics(tmp_path / "metrics.jsonl")
    assert [(e.step, e.value) for e in events.Scalars("reward_mean")] == [(m["step"], pytest.approx(m["reward_mean"])) for m in metrics]


def test_plot_draws_a_png_or_says_matplotlib_is_missing(tmp_path, monkeypatch):
    import analyze
    stages = ["nsr-prerl"] * 3 + ["grpo"] * 3
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(
        {"step": s, "stage": st, "reward_mean": s / 10, "response_length": 5 + s, "grad_norm": 1.0, **({"eval_accuracy": 0.5} if s % 2 else {})})
        + "\n" for s, st in enumerate(stages)) + '{"step": 6, "sta')
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "matplotlib", None)  # as if not installed
        with pytest.raises(SystemExit, match="needs matplotlib, which is not installed: pip install matplotlib"):
            analyze.main(["plot", str(tmp_path)])
    with pytest.raises(SystemExit, match="no metrics.jsonl"):
        analyze.main(["plot", str(tmp_path / "nothing")])
    pytest.importorskip("matplotlib")
    assert analyze.main(["plot", str(tmp_path)]) == str(tmp_path / "metrics.png")
    assert (tmp_path / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_first_signal_asks_to_stop_second_interrupts_at_once():
    previous = signal.getsignal(signal.SIGINT)
    with prerl.stop_signals() as stop:
        assert stop.signal is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signal == signal.SIGTERM  # asked to stop after the step: nothing raised
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # (the handler runs between bytecodes; never reached)
    assert signal.getsignal(signal.SIGINT) is previous  # restored


# --- real processes: kill -9, a second run, Ctrl-C (the tiny model; each start imports torch)

REPO = os.path.dirname(os.path.abspath(prerl.__file__))
CRASH_ARGS = ("--save-every", "2", "--eval-size", "0", "--lr", "1e-2", "--temperature", "1.5")


def launch(folder, out, *extra):
    """prerl.py in its own process, its output in a file (a pipe could fill and block it)."""
    out.mkdir(parents=True, exist_ok=True)
    log = open(out.parent / f"{out.name}.log", "w")
    return subprocess.Popen([sys.executable, "prerl.py", *run_args(folder, out, *extra)], cwd=REPO, stdout=log, stderr=log)


def wait_for(condition, process, timeout=240):
    start = time.monotonic()
    while not condition():
        assert process.poll() is None, f"the run ended early with code {process.returncode}"
        assert time.monotonic() - start < timeout, "timed out waiting for the run"
        time.sleep(0.05)


def children_of(pid):
    kids = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry))
        except (OSError, IndexError, ValueError):
            pass
    return kids


def kill_all(process, kids):
    for pid in [process.pid, *kids]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(timeout=60)


def lines_of(path):
    return len(open(path).readlines()) if os.path.exists(path) else 0


def test_kill_9_then_resume_equals_an_uninterrupted_run_and_the_lock_is_taken_over(tiny_model_folder, tmp_path, capsys):
    out, straight = tmp_path / "killed", tmp_path / "straight"
    first = launch(tiny_model_folder, out, "--steps", "500", *CRASH_ARGS)
    kids = []
    try:
        wait_for(lambda: lines_of(out / "metrics.jsonl") >= 3 and (out / "checkpoint.pt").exists(), first)
        first.send_signal(signal.SIGSTOP)  # frozen but alive: the out-dir of a live run
        kids = children_of(first.pid)      # its verifier workers (their exit on the parent's death is verify.py's)
        files = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
        line = refused_line(run_args(tiny_model_folder, out, "--steps", "500", *CRASH_ARGS, "--resume"), capsys)
        assert line.startswith(f"error: --out-dir {out}: another run is using it (pid {first.pid} on host ")
        assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == files  # the second run wrote nothing
    finally:
        kill_all(first, kids)                # kill -9, as the OOM killer would
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 499, "rew')         # and a half-written last line
    steps = int(state_of(out / "checkpoint.pt")["step"]) + 1
    assert steps - 1 < lines_of(out / "metrics.jsonl")  # lines past the checkpoint, to be cut
    prerl.train(prerl.parse_config(run_args(tiny_model_folder, out, "--steps", str(steps), *CRASH_ARGS, "--resume")))
    assert f"from pid {first.pid} on host" in capsys.readouterr().out  # the dead run's lock, taken over
    prerl.train(prerl.parse_config(run_args(tiny_model_folder, straight, "--steps", str(steps), *CRASH_ARGS)))
    resumed, reference = state_of(out / "checkpoint.pt"), state_of(straight / "checkpoint.pt")
    assert all(torch.equal(tensor, resumed["model"][name]) for name, tensor in reference["model"].items())
    assert [m["step"] for m in prerl.read_metrics(out / "metrics.jsonl")] == list(range(steps))
    assert open(out / "metrics.jsonl").read().endswith("}\n")  # the half line is gone
    assert any(m["kept_tokens"] > 0 for m in prerl.read_metrics(straight / "metrics.jsonl"))  # weights did move


def test_ctrl_c_stops_after_the_step_with_a_checkpoint_and_the_run_resumes(tiny_model_folder, tmp_path):
    out = tmp_path / "stopped"
    run = launch(tiny_model_folder, out, "--steps", "500", *CRASH_ARGS)
    try:
        wait_for(lambda: lines_of(out / "metrics.jsonl") >= 1, run)
        run.send_signal(signal.SIGINT)
        assert run.wait(timeout=120) == 130
    finally:
        if run.poll() is None:
            kill_all(run, children_of(run.pid))
    printed = open(tmp_path / "stopped.log").read()
    assert "SIGINT: stopping after the current step" in printed and "Traceback" not in printed
    step = int(state_of(out / "checkpoint.pt")["step"])
    assert f"stopped by SIGINT with a checkpoint at step {step} in {out}; continue with:" in printed
    command = printed.split("continue with:\n")[1].splitlines()[0]
    assert command.startswith("    python prerl.py --model ") and command.endswith(" --resume") and "--steps 500" in command
    assert lines_of(out / "metrics.jsonl") == step and (out / "run.lock").read_text() == ""  # log = checkpoint
    model, _ = prerl.load_model(str(out / "model"), torch.device("cpu"))  # the export loads too
    assert prerl.load_checkpoint(str(out / "checkpoint.pt"), model) == step
    prerl.train(prerl.parse_config(run_args(tiny_model_folder, out, "--steps", str(step + 1), *CRASH_ARGS, "--resume")))
    assert [m["step"] for m in prerl.read_metrics(out / "metrics.jsonl")] == list(range(step + 1))


# ---------------------------------------------------------------------------
# Issue 11: GPU decode -- a static KV cache and a fixed-shape decode step (machinery.static_generate).
# On CPU the step runs eagerly (capture=False): the same Python function that CUDA records as a graph.

EOS_MANY = list(range(4, 40, 3))  # many "end" tokens: rows stop at different steps


@pytest.fixture
def static_path(monkeypatch):
    """prerl.generate forced onto the static path, and a way back to today's loop or the plain path."""
    def use(path):
        monkeypatch.setattr(machinery, "STATIC_DECODE", "on" if path == "static" else "off")
        monkeypatch.setattr(prerl, "PLAIN", path == "plain")
    return use


def test_static_decode_greedy_matches_todays_sampler_and_transformers_generate(static_path):
    model = tiny_model(torch.float32)
    prompt_ids = torch.tensor([[3, 3, 20, 21], [22, 23, 24, 25], [3, 26, 27, 28]])
    prompt_mask = (prompt_ids != 3).long()                    # left-padded prompts of three lengths
    out = {}
    for path in ("static", "loop", "plain"):
        static_path(path)
        steps = machinery.DECODE_STATS["eager_steps"]
        out[path] = prerl.generate(model, prompt_ids, prompt_mask, 2, 12, 0.0, 1.0, EOS_MANY, pad_id=3)
        if path == "static":                                  # all rows ended by token 6: stopped at the next check
            assert machinery.DECODE_STATS["eager_steps"] - steps == machinery.CHECK_EVERY - 1
    reference = model.generate(input_ids=prompt_ids.repeat_interleave(2, 0), attention_mask=prompt_mask.repeat_interleave(2, 0),
                               do_sample=False, max_new_tokens=12, eos_token_id=EOS_MANY, pad_token_id=3)[:, 4:]
    mask = prerl.response_mask_from_positions(out["static"], EOS_MANY)
    lengths = mask.sum(1)
    assert ((1 < lengths) & (lengths < 12)).any() and lengths.min() < lengths.max()  # rows ended in the static steps
    assert torch.equal(out["static"], out["loop"]) and torch.equal(out["static"], out["plain"])  # pads and width too
    assert torch.equal(mask, prerl.response_mask_from_positions(reference, EOS_MANY))
    assert torch.equal(out["static"] * mask, reference[:, :out["static"].shape[1]] * mask)
    assert machinery.StaticDecoder in {type(d) for d in machinery._DECODERS[model].values()}  # really the static path


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_static_decode_samples_the_same_tokens_as_prerl_generate(static_path, monkeypatch, top_p):
    """Same uniforms u[row, t], same pick_next_token: token-identical to the loop and the plain path, for a
    second rollout on the same buffers too (stale KV slots from the first must never be read)."""
    monkeypatch.setattr(machinery, "ROOM_MULTIPLE", 32)
    model = tiny_model(torch.float32)
    batches = [torch.tensor([[3, 20, 21], [22, 23, 24]]), torch.tensor([[25, 26, 27, 28], [3, 3, 29, 30]])]
    reuses = machinery.DECODE_STATS["graph_reuses"]
    for i, prompts in enumerate(batches):                     # 3 + 10 and 4 + 10 tokens: one room of 32
        uniforms = prerl.sampling_uniforms([f"k-{i}-0", f"k-{i}-1"], 4, 10)
        out = {}
        for path in ("static", "loop", "plain"):
            static_path(path)
            out[path] = prerl.generate(model, prompts, (prompts != 3).long(), 4, 10, 1.0, top_p, EOS_MANY, 3, uniforms)
        lengths = prerl.response_mask_from_positions(out["plain"], EOS_MANY).sum(1)
        assert lengths.min() < lengths.max()
        assert torch.equal(out["static"], out["loop"]) and torch.equal(out["static"], out["plain"])
    assert machinery.DECODE_STATS["graph_reuses"] == reuses + 1   # the second rollout reused the first's buffers


def test_static_decode_chosen_tokens_logprobs_match_teacher_forced_forward():
    """Each logit row the static step picks from, against a plain forward over prompt + response (fp32)."""
    model = tiny_model(torch.float32)
    prompts = torch.tensor([[3, 3, 20, 21], [22, 23, 24, 25]])
    prompt_mask = (prompts != 3).long()
    seen = []

    def recording_pick(logits, temperature, top_p, u=None):
        seen.append(torch.log_softmax(logits.float(), -1))
        return prerl.pick_next_token(logits, temperature, top_p, u)
    uniforms = prerl.sampling_uniforms(["a", "b"], 3, 9)
    responses = machinery.static_generate(model, prompts, prompt_mask, 3, 9, 1.0, 1.0, EOS_MANY, 3, uniforms, recording_pick,
                                          torch.autocast("cpu", enabled=False), prerl.cache_keyword(model), capture=False)
    response_mask = prerl.response_mask_from_positions(responses, EOS_MANY)
    assert response_mask.sum() > len(responses)               # several tokens per row were decoded
    chosen = torch.stack([lp[torch.arange(len(lp)), responses[:, t]] for t, lp in enumerate(seen[:responses.shape[1]])], 1)
    with torch.no_grad():
        forward = prerl.conditional_logprobs(model, prompts.repeat_interleave(3, 0), prompt_mask.repeat_interleave(3, 0),
                                             responses, response_mask)
    keep = response_mask.bool()
    torch.testing.assert_close(chosen[keep], forward[keep], rtol=0, atol=1e-5)


def test_static_decode_sampled_distribution_follows_temperature_and_top_p(monkeypatch):
    """The second token (the first one the static step picks): every row shares the first token (one u),
    then its frequencies follow softmax(logits / T) restricted to the top-p nucleus."""
    monkeypatch.setattr(machinery, "ROOM_MULTIPLE", 1)
    model = tiny_model(torch.float32)
    prompt, rows = torch.tensor([[20, 21, 22]]), 6000
    uniforms = torch.rand(rows, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    uniforms[:, 0] = 0.5
    for temperature, top_p in ((0.7, 1.0), (0.5, 0.6)):
        out = machinery.static_generate(model, prompt, torch.ones_like(prompt), rows, 2, temperature, top_p, [0], 3, uniforms,
                                        prerl.pick_next_token, torch.autocast("cpu", enabled=False), prerl.cache_keyword(model),
                                        capture=False)
        assert (out[:, 0] == out[0, 0]).all()
        with torch.no_grad():
            logits = model(input_ids=torch.cat([prompt, out[:1, :1]], 1)).logits[0, -1]
        p = torch.softmax(logits / temperature, -1)
        sorted_p, order = p.sort(descending=True)
        kept = order[(sorted_p.cumsum(0) - sorted_p) <= top_p]    # the smallest set reaching top_p
        expected = torch.zeros_like(p)
        expected[kept] = p[kept] / p[kept].sum()
        observed = torch.bincount(out[:, 1], minlength=p.numel()).float() / rows
        assert observed[expected == 0].sum() == 0
        assert (observed - expected).abs().max() < 0.03
        if top_p < 1:
            assert 1 < len(kept) < p.numel()                    # the nucleus really cut


@pytest.mark.parametrize("tied", [False, True])
def test_static_decode_bf16_weight_copies_equal_autocast_casts(static_path, monkeypatch, tied):
    """Under low-precision autocast the step reads copies of the matmul weights made once per rollout;
    they are autocast's own casts (the embedding, tied or not, stays fp32), so the tokens are identical
    to the same step letting autocast cast every weight itself."""
    monkeypatch.setattr(prerl, "autocast", lambda device: torch.autocast("cpu", dtype=torch.bfloat16))
    model = tiny_model(torch.float32, tied=tied)
    prompts = torch.tensor([[3, 20, 21], [22, 23, 24]])
    uniforms = prerl.sampling_uniforms(["x", "y"], 3, 8)
    static_path("static")
    out = {}
    for copies in (True, False):
        machinery._DECODERS.pop(model, None)
        if not copies:
            monkeypatch.setattr(machinery.StaticDecoder, "load", without_weight_copies(machinery.StaticDecoder.load))
        out[copies] = prerl.generate(model, prompts, (prompts != 3).long(), 3, 8, 1.0, 1.0, EOS_MANY, 3, uniforms)
        decoder = next(iter(machinery._DECODERS[model].values()))
        assert bool(decoder.shadow) == copies
    assert torch.equal(out[True], out[False])
    assert model.get_input_embeddings().weight.dtype == torch.float32


def without_weight_copies(load):
    def wrapped(self, *args, **kwargs):
        self.shadow = {}
        return load(self, *args, **kwargs)
    return wrapped


def test_static_decoder_survives_in_place_updates_and_is_rebuilt_for_new_storage(static_path):
    model = tiny_model(torch.float32)
    prompts = torch.tensor([[3, 20, 21], [22, 23, 24]])
    mask = (prompts != 3).long()

    def both():
        out = {}
        for path in ("static", "plain"):
            static_path(path)
            out[path] = prerl.generate(model, prompts, mask, 2, 8, 0.0, 1.0, EOS_MANY, 3)
        assert torch.equal(out["static"], out["plain"])
        return out["static"]
    before = both()
    stats = dict(machinery.DECODE_STATS)
    with torch.no_grad():                                       # as the optimizer does: in place
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    after = both()
    assert not torch.equal(before, after)                       # the new weights were really read
    assert machinery.DECODE_STATS["graph_reuses"] == stats["graph_reuses"] + 1
    assert machinery.DECODE_STATS["rebuilds_after_weight_change"] == stats["rebuilds_after_weight_change"]
    model.load_state_dict({k: v.clone() * 1.1 for k, v in model.state_dict().items()}, assign=True)  # new storage
    both()
    assert machinery.DECODE_STATS["rebuilds_after_weight_change"] == stats["rebuilds_after_weight_change"] + 1


def test_static_decode_is_taken_only_where_it_fits(monkeypatch):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    model, cpu = tiny_model(torch.float32), torch.device("cpu")
    monkeypatch.setattr(machinery, "STATIC_DECODE", "auto")
    assert not machinery.static_decode_fits(model, cpu)                       # today's loop stays on CPU
    assert machinery.static_decode_fits(model, torch.device("cuda"))          # (nothing is allocated)
    monkeypatch.setattr(machinery, "STATIC_DECODE", "on")
    assert machinery.static_decode_fits(model, cpu)
    sliding = Qwen2ForCausalLM(Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                           num_key_value_heads=2, vocab_size=60, use_sliding_window=True, sliding_window=16,
                                           max_window_layers=0))
    assert not machinery.static_decode_fits(sliding, cpu)                     # sliding windows keep the loop
    monkeypatch.setattr(machinery, "STATIC_DECODE", "off")
    assert not machinery.static_decode_fits(model, torch.device("cuda"))


HOST_ROUND_TRIPS = ("aten._local_scalar_dense", "aten.item", "aten.lift_fresh", "aten.nonzero", "aten._unique",
                    "aten.unique", "aten.masked_select", "aten._assert_async")


def test_static_decode_step_never_waits_for_the_device():
    """What a CUDA graph cannot hold, seen on CPU: the recorded step must not read a value back to the
    host (item, bool, nonzero, unique, boolean masks) nor copy host data in (torch.tensor, .to(device))."""
    from torch.utils._python_dispatch import TorchDispatchMode
    model = tiny_model(torch.float32)
    prompts = torch.tensor([[3, 20, 21], [22, 23, 24]])
    uniforms = prerl.sampling_uniforms(["a", "b"], 2, 6)
    machinery.static_generate(model, prompts, (prompts != 3).long(), 2, 6, 1.0, 0.9, [5, 6], 3, uniforms,
                              prerl.pick_next_token, torch.autocast("cpu", enabled=False), prerl.cache_keyword(model),
                              capture=False)
    decoder = next(iter(machinery._DECODERS[model].values()))

    class Watch(TorchDispatchMode):
        ops, transfers = set(), []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.add(str(func).rsplit(".", 1)[0])
            if "device" in (kwargs or {}) and str(func).startswith("aten._to_copy"):
                self.transfers.append(str(func))
            return func(*args, **(kwargs or {}))
    decoder.t.fill_(1)
    with torch.no_grad(), Watch() as watch:
        decoder.step(model)
    assert "aten.mm" in watch.ops and "aten.searchsorted" in watch.ops   # the watch saw the forward and the pick
    assert not watch.ops & set(HOST_ROUND_TRIPS) and not watch.transfers, watch.ops & set(HOST_ROUND_TRIPS)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a GPU")
def test_cuda_graph_decodes_like_the_same_step_eagerly():
    model = tiny_model(torch.float32).cuda()
    prompts = torch.tensor([[3, 20, 21], [22, 23, 24]], device="cuda")
    uniforms = prerl.sampling_uniforms(["g0", "g1"], 4, 24).cuda()
    captures = machinery.DECODE_STATS["captures"]
    outs = [machinery.static_generate(model, prompts, (prompts != 3).long(), 4, 24, 1.0, 0.9, EOS_MANY, 3, uniforms,
                                      prerl.pick_next_token, prerl.autocast(prompts.device), prerl.cache_keyword(model),
                                      capture=capture) for capture in (False, True, True)]
    assert machinery.DECODE_STATS["captures"] == captures + 1 and machinery.DECODE_STATS["capture_failures"] == 0
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[1], outs[2])


def test_gpu_suite_dry_run_runs_every_section():
    """bench.py --gpu-suite, on the CPU with a tiny shape under bf16 autocast: the script a lent GPU will run,
    end to end (token equality itself is the other tests' business)."""
    out = subprocess.run([sys.executable, "bench.py", "--gpu-suite", "--dry-run"], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.abspath(__file__)), timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "FAILED" not in out.stdout and "| failed" not in out.stdout, out.stdout[-3000:]
    for row in ("agreement, static vs plain, T=1.0", "ms/step", "loop / static", "warm-up of the static path",
                "RL step grpo", "model FLOPs utilisation", "peak memory", "graph captures", "gpu suite wall time"):
        assert row in out.stdout, row
    assert len([line for line in out.stdout.splitlines() if line.startswith("agreement, static vs")]) == 4


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
    monkeypatch.setattr(verify, "warmup", lambda workers=None: None)   # no idle workers left behind per mutant


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
    picks = prerl.pick_next_token(logits, temperature, top_p, torch.rand(n, dtype=torch.float64))
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
    picks = prerl.pick_next_token(logits, 0.7, 1.0, torch.rand(len(logits), dtype=torch.float64))
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
        uniforms = prerl.sampling_uniforms(range(len(prompt_ids)), 4, 40)
        out = prerl.generate(model, prompt_ids, prompt_mask, 4, 40, temperature, 1.0, MANY_EOS, pad_id=3, uniforms=uniforms)
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
    out = prerl.sample(model, tokenizer, problems, prerl.Config(max_new_tokens=12, temperature=1.0), 4, range(3))
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

    def sample_spy(model, tokenizer, chunk, cfg, group_size, keys, temperature=None):
        calls.append((len(chunk), group_size, temperature))
        out = real_sample(model, tokenizer, chunk, cfg, group_size, keys, temperature)
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
    timing = ("sample_s", "score_s", "train_s", "diagnose_s")
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
# ---------------------------------------------------------------------------
# Issue 12: torchrun + FSDP2 (machinery.py "Distribution"), two CPU ranks on gloo, equal to one process.
# One torchrun launch runs this file as its script (distributed_worker below) for the in-process checks
# and a run that is killed at step 2; a second launch resumes it through prerl.py's command line.

import torch.distributed  # noqa: E402

# the runs below: both DSRL stages, the KL term (a reference model on every rank), gradient checkpointing
RUN = ("--steps", "3", "--switch-step", "2", "--kl-coef", "0.05", "--gradient-checkpointing")
# 4 groups of 4 with uneven response lengths (toy_batch); each rank takes 2 whole groups
FIXED_REWARDS = {"grpo": [[1., 0., 0., 1.], [0., 1., 1., 1.], [0., 0., 1., 0.], [1., 0., 1., 0.]],
                 # rank 1's groups are all-equal: it has no pass of its own and joins rank 0's collectives
                 "nsr-prerl": [[1., 0., 0., 1.], [0., 1., 1., 1.], [1., 1., 1., 1.], [0., 0., 0., 0.]]}


def fixed_batch_step(stage):
    """One RL update of a fresh tiny model on a fixed batch; under torchrun each rank takes its groups
    and rank 0 gets the results. Returns (loss, grad norm, weights after the step, passes per rank)."""
    dist, group = prerl.DIST, 4
    model, batch = tiny_model(torch.float32), toy_batch(n_groups=4, group=group)
    rewards = torch.tensor(FIXED_REWARDS[stage])
    cfg = prerl.Config(micro_batch_tokens=25, lr=1e-2)
    if dist is not None:
        machinery.shard_model(model, dist)
    optimizer = prerl.make_optimizer(model, cfg)
    passes = []
    if dist is not None:
        groups, _ = machinery.rank_share(list(range(len(rewards))), dist)
        rows = [g * group + j for g in groups for j in range(group)]
        batch, rewards = {name: value[rows] for name, value in batch.items()}, rewards[groups]
        machinery.gather_weights(model)    # as rl_step leaves the model after a rollout
        machinery.shard_layers(model)
        match_passes = machinery.match_passes
        machinery.match_passes = lambda model, n, *rest: (passes.append(n), match_passes(model, n, *rest))[1]
    try:
        loss, kept = prerl.accumulate_gradients(model, batch, rewards, stage, cfg, start_id=1)
    finally:
        if dist is not None:
            machinery.match_passes = match_passes
    grad_norm = prerl.optimizer_step(model, optimizer, cfg)
    if dist is None:
        return loss, grad_norm, model.state_dict(), passes
    _, _, loss, _ = machinery.step_totals(rewards, torch.zeros(1), loss, kept)
    return loss, grad_norm, machinery.full_state(model, optimizer)[0], machinery.gather_objects(passes[0])


def distributed_worker(folder, out):
    """Runs on each of two ranks (torchrun); rank 0 saves what the tests below compare."""
    prerl.DIST = dist = machinery.init_distributed(torch.device("cpu"))
    results = {stage: fixed_batch_step(stage) for stage in FIXED_REWARDS}
    real_denominator = machinery.global_denominator          # the common mistake: a per-rank token-mean
    machinery.global_denominator = lambda tokens, dist: tokens.clamp(min=1)
    results["per-rank mean"] = fixed_batch_step("grpo")
    machinery.global_denominator = real_denominator
    # Ranks that end decoding at different steps: rank 0's first token ends its responses (every token
    # is an end token), rank 1 decodes all 12; then both meet at the next collectives.
    model = machinery.shard_model(tiny_model(torch.float32), dist)
    machinery.gather_weights(model)
    eos_ids = list(range(len(CHARS) + 4)) if dist.rank == 0 else [-1]
    decoded = prerl.generate(model, torch.tensor([[20, 21, 22]]), torch.ones(1, 3, dtype=torch.long), 2, 12,
                             0.0, 1.0, eos_ids, pad_id=3)
    machinery.shard_layers(model)
    machinery.release_root(model)
    results["decode lengths"] = machinery.gather_objects(decoded.shape[1])
    if dist.rank == 0:
        torch.save(results, out / "worker.pt")
    # A whole run through prerl.train, killed (os._exit, no clean-up) at the start of step 2 after
    # step 2's checkpoint; the fixture resumes it with `torchrun prerl.py ... --resume`.
    real_rl_step = prerl.rl_step

    def rl_step_killed_at_step_2(*args):
        if args[4] == 2:
            for process, _ in verify._idle_workers:  # forked verifier workers would outlive os._exit
                process.kill()
            sys.stdout.flush()
            os._exit(0)
        return real_rl_step(*args)
    prerl.train(prerl.parse_config(run_args(folder, out / "uninterrupted", *RUN)))
    prerl.rl_step = rl_step_killed_at_step_2
    prerl.train(prerl.parse_config(run_args(folder, out / "killed", *RUN, "--save-every", "1")))


def test_rank_shares_are_contiguous_whole_and_refuse_an_empty_rank():
    """Each rank's prompts: contiguous, in order, sizes within one, every prompt once, and the index of
    its first one (which keys its random numbers); too few prompts for the ranks is a one-line error."""
    for n, world in [(16, 2), (7, 3), (5, 4), (8, 8)]:
        shares = [machinery.rank_share(list(range(n)), machinery.Distributed(r, world, "gloo", None, None))
                  for r in range(world)]
        assert sum((items for items, _ in shares), []) == list(range(n))
        assert all(items[0] == first for items, first in shares)
        assert max(len(i) for i, _ in shares) - min(len(i) for i, _ in shares) <= 1
    with pytest.raises(SystemExit, match="--prompts-per-step 4 or more"):
        machinery.rank_share([0, 1, 2], machinery.Distributed(3, 4, "gloo", None, None))
    assert machinery.rank_share([0, 1, 2], machinery.Distributed(3, 4, "gloo", None, None), may_be_empty=True) == ([], 3)


def torchrun(*args, timeout=300):
    """Two CPU ranks (gloo) on a free port; one thread each; ends on its own or fails the test."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def two_ranks(tiny_model_folder, tmp_path_factory):
    if not torch.distributed.is_available():
        pytest.skip("this torch build has no torch.distributed")
    import resource
    out = tmp_path_factory.mktemp("two_ranks")
    start, cpu_start = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    worker = torchrun(os.path.abspath(__file__), "--distributed-worker", tiny_model_folder, out)
    assert worker.returncode == 0, worker.stdout[-3000:] + worker.stderr[-3000:]
    assert not (out / "killed" / "checkpoint.dcp.tmp").exists()
    assert torch.load(out / "killed" / "checkpoint.pt", weights_only=False)["step"] == 2   # killed after step 2's save
    resumed = torchrun(os.path.dirname(os.path.abspath(__file__)) + "/prerl.py",
                       *run_args(tiny_model_folder, out / "killed", *RUN, "--save-every", "1", "--resume"))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f"two-rank launches: {time.perf_counter() - start:.1f} s wall, "
          f"{cpu.ru_utime + cpu.ru_stime - cpu_start.ru_utime - cpu_start.ru_stime:.1f} s CPU")
    one = tmp_path_factory.mktemp("one_rank")                 # the same run in this one process
    prerl.train(prerl.parse_config(run_args(tiny_model_folder, one, *RUN)))
    return {"worker": torch.load(out / "worker.pt", weights_only=False), "resumed": resumed, "out": out, "one": one}


def max_difference(a, b):
    assert a.keys() == b.keys()
    return max((a[name] - b[name]).abs().max().item() for name in a)


@pytest.mark.parametrize("stage", list(FIXED_REWARDS))
def test_two_ranks_one_step_equals_one_process(two_ranks, stage):
    """Loss, gradient norm and weights after AdamW: 2 ranks == 1 process (fp32, atol 1e-5), with ranks
    running different numbers of forward/backward passes (one rank none at all for nsr-prerl)."""
    loss, grad_norm, weights, passes = two_ranks["worker"][stage]
    prerl.DIST = None
    one_loss, one_grad_norm, one_weights, _ = fixed_batch_step(stage)
    assert passes[0] != passes[1] and (stage != "nsr-prerl" or passes[1] == 0), passes
    assert loss == pytest.approx(one_loss, abs=1e-5) and loss != 0
    assert grad_norm == pytest.approx(one_grad_norm, abs=1e-5)
    assert max_difference(weights, one_weights) < 1e-5
    assert max_difference(weights, tiny_model(torch.float32).state_dict()) > 1e-3   # the step moved the weights


def test_per_rank_token_mean_fails_the_same_check(two_ranks):
    """Negative control: dividing by each rank's own token count (then FSDP's average) is not the
    single-process token-mean; the check above catches it."""
    loss, grad_norm, weights, _ = two_ranks["worker"]["per-rank mean"]
    prerl.DIST = None
    one_loss, one_grad_norm, one_weights, _ = fixed_batch_step("grpo")
    assert abs(grad_norm - one_grad_norm) > 1e-5 or abs(loss - one_loss) > 1e-5
    assert max_difference(weights, one_weights) > 1e-5


def test_ranks_that_end_decoding_at_different_steps_do_not_hang(two_ranks):
    assert two_ranks["worker"]["decode lengths"] == [1, 12]   # and the launch ended (fixture timeout)


def test_torchrun_run_killed_and_resumed_equals_one_process(two_ranks):
    """`torchrun prerl.py`, killed at step 2 and resumed, ends with the weights of the uninterrupted
    2-rank run (bit for bit) and with the metrics and final weights of the same run in one process; its
    first line names the world size; its whole-weights exports load in one process: checkpoint.pt with the
    optimizer, and model/ with from_pretrained."""
    out, one = two_ranks["out"] / "killed", two_ranks["one"]
    assert two_ranks["resumed"].stdout.splitlines()[0] == "world size 2, gloo"
    uninterrupted = torch.load(two_ranks["out"] / "uninterrupted" / "checkpoint.pt", weights_only=False)
    assert max_difference(torch.load(out / "checkpoint.pt", weights_only=False)["model"], uninterrupted["model"]) == 0
    metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
    one_metrics = [json.loads(line) for line in open(one / "metrics.jsonl")]
    assert [m["step"] for m in metrics] == [0, 1, 2]
    assert [m["stage"] for m in metrics] == ["nsr-prerl", "nsr-prerl", "grpo"]
    assert all(m["kept_tokens"] > 0 for m in metrics)
    for m, o in zip(metrics, one_metrics):
        for name in ("stage", "reward_mean", "accuracy", "mixed_groups", "response_length", "kept_tokens"):
            assert m[name] == o[name], (name, m, o)
        assert m["loss"] == pytest.approx(o["loss"], abs=1e-6) and m["grad_norm"] == pytest.approx(o["grad_norm"], abs=1e-6)
    exported, one_state = torch.load(out / "checkpoint.pt", weights_only=False), torch.load(one / "checkpoint.pt", weights_only=False)
    assert exported["step"] == 3
    assert max_difference(exported["model"], one_state["model"]) < 1e-5
    assert exported["optimizer"]["param_groups"] == one_state["optimizer"]["param_groups"]   # the one-process format
    for index, state in one_state["optimizer"]["state"].items():
        mine = exported["optimizer"]["state"][index]
        assert mine["step"] == state["step"]
        torch.testing.assert_close(mine["exp_avg"], state["exp_avg"], rtol=1e-4, atol=1e-8)
        torch.testing.assert_close(mine["exp_avg_sq"], state["exp_avg_sq"], rtol=1e-4, atol=1e-12)
    prerl.DIST = None
    model = tiny_model(torch.float32)
    optimizer = prerl.make_optimizer(model, prerl.Config())
    assert prerl.load_checkpoint(str(out / "checkpoint.pt"), model, optimizer) == 3   # one process, with its optimizer
    assert max_difference(model.state_dict(), exported["model"]) == 0
    from transformers import AutoModelForCausalLM                         # and model/ (save_pretrained)
    assert max_difference(AutoModelForCausalLM.from_pretrained(out / "model").state_dict(), exported["model"]) == 0


if __name__ == "__main__" and sys.argv[1:2] == ["--distributed-worker"]:
    from pathlib import Path
    distributed_worker(Path(sys.argv[2]), Path(sys.argv[3]))




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


def test_intervals_are_cut_to_the_range_the_quantity_can_take():
    assert analyze.format_ci((0.9, 0.7, 1.1)) == "0.900 [0.700, 1.000]"          # accuracy: at most 1
    assert analyze.format_ci((0.1, -0.2, 0.4)) == "0.100 [0.000, 0.400]"
    assert analyze.format_ci((6.7, -0.5, 13.8), 0, 20, digits=1) == "6.7 [0.0, 13.8]"   # steps: 0 to the budget
    assert analyze.format_ci((0.05, -0.2, 0.3), -1, 1, sign="+") == "+0.050 [-0.200, +0.300]"
    assert analyze.format_ci((0.4, None, None)) == "0.400"


def test_paired_differences_by_seed_hand_worked():
    def run(seed, pass1, greedy):
        return {"seed": seed, "eval": {"pass_at_k": {"1": pass1}}, "curve": [(0, 0.3), (20, greedy)]}
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
    result = json.load(open(tmp_path / "parts" / "nsr-prerl" / "lr0.001" / "seed0" / "result.json"))
    assert [m["step"] for m in result["metrics"]] == [0, 1] and result["seed"] == 0
    assert {"entropy", "logp_y_wrong", "eos_share", "reflections"} <= set(result["metrics"][0])
    with pytest.raises(SystemExit, match="other options .*steps"):
        analyze.main(study_argv(tiny_model_folder, tmp_path / "parts", "--steps", "3"))
    calls.clear()                                  # a speed-only option may change: the study is read back
    assert analyze.main(study_argv(tiny_model_folder, tmp_path / "parts", "--save-every", "2"))["table"] == whole["table"]
    assert calls == []


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


def test_scored_logprobs_scores_the_rows_trimmed_of_shared_padding(monkeypatch):
    """The scorer sees only the columns the chosen rows use: left padding that every prompt of the rows
    has, and right padding past their longest response, are cut (the result would not change, the cost would)."""
    batch = toy_batch(n_groups=2, group=4)          # group 0's prompts all start with a pad column
    batch["response_mask"][:4, 4:] = 0              # group 0's responses end by column 4, row 0 exactly there
    batch["response_mask"][0, :4] = 1
    batch["response_ids"][:4] = torch.where(batch["response_mask"][:4].bool(), batch["response_ids"][:4], 3)
    seen = {}

    def spy(name, original):
        def wrapped(model, *args):
            seen[name] = [a for a in args if torch.is_tensor(a)]
            return original(model, *args)
        return wrapped
    monkeypatch.setattr(prerl, "conditional_logprobs", spy("conditional", prerl.conditional_logprobs))
    monkeypatch.setattr(prerl, "pretrain_logprobs", spy("pretrain", prerl.pretrain_logprobs))
    model, rows = tiny_model(), [0, 1, 2, 3]
    _, mask = prerl.scored_logprobs(model, "conditional", batch, rows, 1)
    prompt_ids, prompt_mask, response_ids, response_mask = seen["conditional"]
    assert torch.equal(prompt_ids, batch["prompt_ids"][:4, 1:]) and torch.equal(prompt_mask, batch["prompt_mask"][:4, 1:])
    assert torch.equal(response_ids, batch["response_ids"][:4, :4]) and torch.equal(mask, batch["response_mask"][:4, :4])
    _, mask = prerl.scored_logprobs(model, "pretrain", batch, rows, 1)
    assert torch.equal(seen["pretrain"][0], batch["response_ids"][:4, :4]) and torch.equal(mask, batch["response_mask"][:4, :4])


def test_gradient_checkpointing_is_on_and_changes_no_gradient():
    batch, rewards = toy_batch(n_groups=2, group=4), torch.tensor([[1., 0., 0., 1.], [0., 1., 1., 0.]])
    grads = []
    for checkpointing in (False, True):
        model = tiny_model()
        if checkpointing:
            prerl.enable_gradient_checkpointing(model)
        assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules()) == checkpointing
        prerl.accumulate_gradients(model, batch, rewards, "grpo", prerl.Config(), start_id=1)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=1e-14)


def test_diagnose_every_is_a_checked_flag(capsys):
    assert refused_line(["--diagnose-every", "-1"], capsys).startswith("error: --diagnose-every -1:")
    assert "diagnose_every" in prerl.RESUME_MAY_CHANGE        # diagnostics never change what is trained


# ---------------------------------------------------------------------------
# issue 15: bf16 weights with stochastic rounding, --precision auto, the memory plan, LoRA


def bf16_neighbours(x):
    """The two bf16 values around a positive float x, computed from its binade: 8 significant bits."""
    ulp = 2.0 ** (math.floor(math.log2(x)) - 7)
    below = math.floor(x / ulp) * ulp
    return below, below + ulp


@pytest.mark.parametrize("value", [0.0123456789, 1.0 + 3 * 2 ** -10, 3.3e-5, 0.75])
def test_stochastic_rounding_is_unbiased_and_lands_on_a_neighbour(value):
    n = 40000
    generator = torch.Generator().manual_seed(0)
    for sign in (1, -1):
        x = torch.full((n,), sign * value, dtype=torch.float32)
        exact = float(x[0])                                     # the fp32 value being rounded
        rounded = machinery.stochastic_round_to_bf16(x, generator).double()
        below, above = bf16_neighbours(abs(exact))
        assert set(rounded.abs().unique().tolist()) <= {below, above}
        fraction = (abs(exact) - below) / (above - below)     # probability of rounding the magnitude up
        sigma = (above - below) * math.sqrt(fraction * (1 - fraction) / n)
        assert abs(rounded.mean().item() - exact) <= 4 * sigma + 1e-12 * abs(exact)
        if fraction == 0:                                       # a bf16 value stays exactly itself
            assert (rounded == exact).all()
        else:
            assert 0 < (rounded.abs() == above).double().mean().item() < 1


def test_stochastic_rounding_adamw_on_fp32_parameters_is_torch_adamw():
    """The optimizer's arithmetic is torch.optim.AdamW's: on fp32 parameters (no rounding) they agree."""
    torch.manual_seed(0)
    ours, theirs = torch.nn.Parameter(torch.randn(1000)), torch.nn.Parameter(torch.randn(1000))
    with torch.no_grad():
        theirs.copy_(ours)
    a = machinery.StochasticRoundingAdamW([ours], lr=1e-2, weight_decay=0.1, chunk=300)
    b = torch.optim.AdamW([theirs], lr=1e-2, weight_decay=0.1)
    for step in range(5):
        ours.grad = torch.randn(1000, generator=torch.Generator().manual_seed(step))
        theirs.grad = ours.grad.clone()
        a.step(), b.step()
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


def assert_moves_like_fp32(delta, reference, tolerance=0.1):
    """Mean drift of the weights along the fp32 reference's direction, within tolerance of the reference's."""
    direction = reference.sign()
    drift, expected = (delta * direction).mean().item(), (reference * direction).mean().item()
    assert abs(drift / expected - 1) < tolerance, f"mean drift {drift:.3e} vs fp32 AdamW {expected:.3e}"


def test_bf16_training_at_lr_1e6_moves_like_fp32_and_round_to_nearest_does_not():
    """100 AdamW steps at lr 1e-6 on fixed gradients: updates ~60x below half a bf16 step at 0.02.
    Stochastic rounding moves the weights as fp32 AdamW does; the round-to-nearest control does not."""
    steps, lr = 100, 1e-6
    start = tiny_model(torch.float32).to(torch.bfloat16)
    generator = torch.Generator().manual_seed(1)
    grads = {name: torch.randn(p.shape, generator=generator).to(torch.bfloat16) for name, p in start.named_parameters()}
    moved = {}
    for kind in ("fp32", "stochastic", "nearest"):
        model = tiny_model(torch.float32).to(torch.bfloat16)
        if kind == "fp32":
            model = model.float()                          # the same bf16 start values, held in fp32
            optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
        else:
            optimizer = machinery.StochasticRoundingAdamW(model.parameters(), lr=lr, weight_decay=0.01, rounding=kind)
        for _ in range(steps):
            for name, p in model.named_parameters():
                p.grad = grads[name].to(p.dtype)
            optimizer.step()
        # matrices only: norm weights sit at 1.0, where a bf16 step (2^-7) is 80x larger than the drift
        moved[kind] = torch.cat([(p.double() - start.get_parameter(name).double()).reshape(-1)
                                 for name, p in model.named_parameters() if p.dim() == 2])
    assert moved["fp32"].abs().mean() > 0.5 * steps * lr      # AdamW moves each weight ~lr per step
    assert_moves_like_fp32(moved["stochastic"], moved["fp32"])
    with pytest.raises(AssertionError, match="mean drift"):
        assert_moves_like_fp32(moved["nearest"], moved["fp32"])


def test_bf16_resume_is_exact_weights_optimizer_and_rounding_rng(tiny_model_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(prerl, "PLAIN", False)                  # bf16 weights are machinery
    bf16 = ("--precision", "bf16", "--prompts-per-step", "8", "--switch-step", "1")
    prerl.train(prerl.parse_config(run_args(tiny_model_folder, tmp_path / "full", "--steps", "3", *bf16)))
    prerl.train(prerl.parse_config(run_args(tiny_model_folder, tmp_path / "part", "--steps", "2", *bf16)))
    prerl.train(prerl.parse_config(run_args(tiny_model_folder, tmp_path / "part", "--steps", "3", "--resume", *bf16)))
    full, part = state_of(tmp_path / "full" / "checkpoint.pt"), state_of(tmp_path / "part" / "checkpoint.pt")
    assert full["config"]["precision"] == "bf16"
    for name, tensor in full["model"].items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, part["model"][name]), name
    assert full["optimizer"]["state"], "no step had a gradient: the test would compare untouched weights"
    for index, slot in full["optimizer"]["state"].items():
        for key, tensor in slot.items():
            assert torch.equal(tensor, part["optimizer"]["state"][index][key]), (index, key)
    # a fp32 resume is refused
    with pytest.raises(SystemExit, match="bfloat16 weights.*--precision"):
        prerl.train(prerl.parse_config(run_args(tiny_model_folder, tmp_path / "part", "--steps", "4", "--resume",
                                                "--prompts-per-step", "8", "--switch-step", "1")))  # fp32, else the same


def test_bf16_scoring_stays_fp32_and_close_to_the_fp32_model():
    model = tiny_model(torch.float32)
    batch = toy_batch()
    lp32 = prerl.pretrain_logprobs(model, 1, batch["response_ids"], batch["response_mask"])
    lp16 = prerl.pretrain_logprobs(model.to(torch.bfloat16), 1, batch["response_ids"], batch["response_mask"])
    assert lp16.dtype == torch.float32
    torch.testing.assert_close(lp16, lp32, rtol=0, atol=0.05)   # bf16 weights and activations, fp32 log-softmax


def test_run_first_line_names_the_precision_and_plain_refuses_bf16(tiny_model_folder, tmp_path, capsys):
    prerl.train(prerl.parse_config(run_args(tiny_model_folder, tmp_path, "--steps", "1", "--prompts-per-step", "2")))
    assert capsys.readouterr().out.splitlines()[0].startswith("precision fp32: ")
    with pytest.raises(SystemExit):
        prerl.parse_config(["--plain", "--precision", "bf16"])
    with pytest.raises(SystemExit):
        prerl.parse_config(["--plain", "--lora", "8"])


# --- the memory plan


def test_memory_plan_targets_and_command(capsys):
    """The issue's targets, planned offline from named shapes (no weights)."""
    shape = machinery.MODEL_SHAPES["qwen3-4b"]
    config = machinery.model_config("qwen3-4b")
    assert (config.num_hidden_layers, config.hidden_size, config.head_dim, shape["vocab_size"]) == (36, 2560, 128, 151936)
    batch = ["--prompts-per-step", "8", "--group-size", "8", "--max-new-tokens", "1024", "--precision", "bf16",
             "--gradient-checkpointing", "--device", "cuda"]
    if prerl.PLAIN:
        pytest.skip("--plan-memory with --precision bf16 is machinery")
    full = prerl.print_memory_plan(prerl.parse_config(["--plan-memory", "--model-config", "qwen2.5-1.5b", *batch]))
    lora = prerl.print_memory_plan(prerl.parse_config(["--plan-memory", "--model-config", "qwen3-4b", "--lora", "64", *batch]))
    assert full["peak"] <= 20 * 2 ** 30 and lora["peak"] <= 22 * 2 ** 30
    assert 1.5e9 < full["parameters"] < 1.6e9 and 3.9e9 < lora["parameters"] < 4.1e9
    # hand count of rank-64 adapters on every Linear of a Qwen3-4B layer but the LM head: r (in + out)
    per_layer = 64 * ((2560 + 4096) * 2 + (2560 + 1024) * 2 + (2560 + 9728) * 3)
    assert lora["trainable"] == 36 * per_layer
    out = capsys.readouterr().out
    assert "KV cache" in out and "memory plan (bf16): peak" in out
    fp32 = prerl.print_memory_plan(prerl.parse_config(["--plan-memory", "--model-config", "qwen2.5-1.5b", *batch,
                                                       "--precision", "fp32"]))
    bf16 = dict(full["parts"])
    assert dict(fp32["parts"])["weights"] == 2 * bf16["weights"]     # 4 vs 2 bytes per parameter
    # weights + gradients + optimizer state: 16 bytes/param in fp32, 8 in bf16
    assert bf16["weights"] + bf16["gradients"] + bf16["optimizer state"] == 8 * full["parameters"]


def test_memory_plan_refuses_on_cuda_naming_the_flags(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 * 2 ** 30, 24 * 2 ** 30))
    plan = {"peak": 3 * 2 ** 30}
    with pytest.raises(SystemExit, match="--gradient-checkpointing.*--lora"):
        machinery.refuse_if_it_cannot_fit(plan, torch.device("cuda"))
    machinery.refuse_if_it_cannot_fit(plan, torch.device("cpu"))  # CPU: the plan is printed, never enforced


MEMORY_STEP = """
import json, os, sys, torch
import machinery, prerl
from transformers import AutoConfig, AutoModelForCausalLM
precision = sys.argv[1]
config = AutoConfig.for_model("llama", hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                              num_key_value_heads=2, vocab_size=32000, tie_word_embeddings=False)
rows, prompt, response, budget = 8, 40, 88, 256
plan = machinery.memory_plan(config, precision, "cpu", rows, response, budget, False, prompt_tokens=prompt)
machinery.reuse_freed_memory(torch.device("cpu"))
before = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
dtype = torch.bfloat16 if precision == "bf16" else torch.float32
model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
cfg = prerl.Config(micro_batch_tokens=budget, prompts_per_step=rows // 2, group_size=2)
gen = torch.Generator().manual_seed(0)
batch = {"prompt_ids": torch.randint(4, 30000, (rows, prompt), generator=gen), "prompt_mask": torch.ones(rows, prompt, dtype=torch.long),
         "response_ids": torch.randint(4, 30000, (rows, response), generator=gen), "response_mask": torch.ones(rows, response, dtype=torch.long)}
optimizer = prerl.make_optimizer(model, cfg)
for _ in range(2):
    prerl.accumulate_gradients(model, batch, torch.tensor([[1.0, 0.0]] * (rows // 2)), "grpo", cfg, start_id=1)
    prerl.optimizer_step(model, optimizer, cfg)
peak = int(dict(line.split(":", 1) for line in open("/proc/self/status"))["VmHWM"].split()[0]) * 1024
print(json.dumps({"measured": peak - before, "planned": plan["training"]}))
"""


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_memory_plan_matches_a_measured_training_step(precision):
    """Peak resident memory of two training steps (a fresh process, a 33M-parameter model) against the
    plan's training peak: within 20% (the issue's 15% is for the real shapes, where the fixed costs of
    the allocator and the runtime weigh less)."""
    out = subprocess.run([sys.executable, "-c", MEMORY_STEP, precision], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.abspath(__file__)), timeout=300,
                         env={**os.environ, "PRERL_PLAIN": "0"})  # the plan is the machinery's (chunked LM head)
    assert out.returncode == 0, out.stderr[-2000:]
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert abs(figures["measured"] / figures["planned"] - 1) < 0.2, figures


# --- LoRA through peft (optional)


def lora_model(dtype=torch.float64, rank=4):
    pytest.importorskip("peft")
    model = machinery.add_lora(tiny_model(dtype), rank, 8.0, "all-linear", seed=0)
    return model


def test_lora_one_step_changes_only_the_adapters():
    model = lora_model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = prerl.make_optimizer(model, prerl.Config(lr=1e-2))
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == \
        {id(p) for name, p in model.named_parameters() if "lora_" in name}
    rewards = torch.tensor([[1., 0., 0., 1.], [0., 1., 1., 1.]], dtype=torch.float64)
    prerl.accumulate_gradients(model, toy_batch(), rewards, "grpo", prerl.Config(), start_id=1)
    prerl.optimizer_step(model, optimizer, prerl.Config())
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all("lora_" in name for name in changed)
    assert any("lora_B" in name for name in changed)          # B starts at zero and now moved
    assert all(p.grad is None for name, p in model.named_parameters() if "lora_" not in name)


def test_lora_gradient_matches_finite_difference():
    model = lora_model()
    torch.manual_seed(3)
    with torch.no_grad():                                      # nonzero B, so A has a gradient too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    batch, rewards = toy_batch(), torch.tensor([[1., 0., 0., 1.], [0., 1., 1., 1.]], dtype=torch.float64)
    prerl.accumulate_gradients(model, batch, rewards, "grpo", prerl.Config(), start_id=1)
    for name in ("model.layers.0.self_attn.q_proj.lora_A.default.weight", "model.layers.1.mlp.down_proj.lora_B.default.weight"):
        weight = model.get_parameter(name)
        analytic, h = weight.grad[1, 2].item(), 1e-6
        with torch.no_grad():
            weight[1, 2] += h
            plus = hand_loss(model, batch, rewards, "grpo", 1.0).item()
            weight[1, 2] -= 2 * h
            minus = hand_loss(model, batch, rewards, "grpo", 1.0).item()
            weight[1, 2] += h
        assert abs(analytic) > 1e-8
        assert abs((plus - minus) / (2 * h) - analytic) < 1e-6 * max(1.0, abs(analytic)), name


def test_lora_merged_export_scores_like_the_adapted_model(tmp_path):
    from transformers import AutoModelForCausalLM
    model = lora_model()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    batch = toy_batch()
    with torch.no_grad():
        adapted = prerl.conditional_logprobs(model, batch["prompt_ids"], batch["prompt_mask"],
                                             batch["response_ids"], batch["response_mask"])
        prerl.export_model(str(tmp_path), model, tiny_tokenizer())    # the run's OUT_DIR/model/ export
        exported = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float64)
        assert not any("lora" in name for name, _ in exported.named_parameters())
        merged = prerl.conditional_logprobs(exported, batch["prompt_ids"], batch["prompt_mask"],
                                            batch["response_ids"], batch["response_mask"])
        base = prerl.conditional_logprobs(tiny_model(), batch["prompt_ids"], batch["prompt_mask"],
                                          batch["response_ids"], batch["response_mask"])
    torch.testing.assert_close(merged, adapted, rtol=1e-6, atol=1e-6)
    assert (adapted - base).abs().max() > 1e-3                    # the adapter really changed the scores


def test_lora_run_checkpoints_only_the_adapter_and_resumes(tiny_model_folder, tmp_path, monkeypatch):
    pytest.importorskip("peft")
    monkeypatch.setattr(prerl, "PLAIN", False)                  # --lora is machinery
    lora = ("--lora", "4", "--prompts-per-step", "8", "--switch-step", "1")
    prerl.train(prerl.parse_config(run_args(tiny_model_folder, tmp_path / "full", "--steps", "2", *lora)))
    prerl.train(prerl.parse_config(run_args(tiny_model_folder, tmp_path / "part", "--steps", "1", *lora)))
    prerl.train(prerl.parse_config(run_args(tiny_model_folder, tmp_path / "part", "--steps", "2", "--resume", *lora)))
    full, part = state_of(tmp_path / "full" / "checkpoint.pt"), state_of(tmp_path / "part" / "checkpoint.pt")
    assert full["model"] and all("lora_" in name for name in full["model"])
    for name, tensor in full["model"].items():
        assert torch.equal(tensor, part["model"][name]), name




def test_response_mask_of_one_token_responses():
    """A batch whose every row ended at its first token (or --max-new-tokens 1) is one column wide."""
    ids = torch.tensor([[2], [5], [9]])
    assert prerl.response_mask_from_positions(ids, [2, 9]).tolist() == [[1], [1], [1]]


def test_sampler_never_draws_a_token_outside_the_nucleus_even_at_u_zero():
    """Inverse CDF with right=True: u = 0 (torch.rand can return it) picks the first token with mass,
    never a zero-probability one that sorts before it."""
    logits = torch.log(torch.tensor([[0.05, 0.5, 0.15, 0.3]]))
    assert prerl.pick_next_token(logits, 1.0, 0.7, torch.zeros(1, dtype=torch.float64)).item() == 1
    assert prerl.pick_next_token(logits, 1.0, 0.7, torch.full((1,), 0.999, dtype=torch.float64)).item() == 3


def test_policy_loss_has_no_kl_term_without_a_reference():
    token_lp, mask = torch.tensor([[-1.0, -2.0]]), torch.ones(1, 2)
    cfg = prerl.Config(kl_coef=0.5)
    plain = prerl.policy_loss(token_lp, mask, torch.tensor([1.0]), 2, prerl.Config(), 1.0)
    assert prerl.policy_loss(token_lp, mask, torch.tensor([1.0]), 2, cfg, 1.0, ref_lp=None) == plain


def test_trim_keeps_a_single_real_column():
    ids, mask = torch.tensor([[5, 3, 3], [7, 3, 3]]), torch.tensor([[1, 0, 0], [1, 0, 0]])
    got_ids, got_mask = prerl.trim(ids, mask, left=False)
    assert got_ids.tolist() == [[5], [7]] and got_mask.tolist() == [[1], [1]]
    got_ids, got_mask = prerl.trim(torch.tensor([[3, 3, 9]]), torch.tensor([[0, 0, 1]]), left=True)
    assert got_ids.tolist() == [[9]] and got_mask.tolist() == [[1]]
