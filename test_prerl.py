"""
Tests of the method in prerl.py: scoring in both spaces, sampling, advantages, every loss's gradient
against an independently written formula, the DSRL switch, the training loop, checkpoints, bad input.
Offline, CPU, a tiny model built from a config (conftest.py): minutes.

    python -m pytest -q test_prerl.py            # the method
    python -m pytest -q                          # every test file (README: Tests)
"""

import json
import math
import random

import pytest
import torch

import machinery
import prerl
import verify
from conftest import (flat_grad, hand_loss, real_prompt, reference_logprobs, run_args, state_of, tiny_model,
                      tiny_tokenizer, toy_batch, write_sums)

# ---------------------------------------------------------------------------
# Scoring in both spaces, sampling

def test_pretrain_logprobs_equal_hand_computation_and_differ_from_conditional(path):
    """Both spaces against one plain forward per token, through the plain log_softmax and machinery's chunked LM head."""
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


def test_log_probs_come_back_in_fp32_from_bf16_weights(path):
    """A bf16 model's log-probs are computed from fp32 logits (a bf16 log-softmax keeps ~3 digits)."""
    model = tiny_model(torch.bfloat16)
    ids = torch.tensor([[10, 11, 12, 13, 2]])
    with torch.no_grad():
        got = prerl.pretrain_logprobs(model, 1, ids, torch.ones_like(ids))
        logits = model(input_ids=torch.tensor([[1, 10, 11, 12, 13]])).logits.float()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got[0], logits[0].log_softmax(-1).gather(-1, ids[0, :, None]).squeeze(-1), rtol=0, atol=1e-5)


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


# ---------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------
# Guards: each test below fails on a bug that once passed the whole suite (checked by applying the bug by hand)

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
    monkeypatch.setattr(verify, "grades", lambda texts, golds, **k: [verify.Verdict(float(g == "right"), None, "wrong") for g in golds])
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


def test_evaluation_counts_right_answers_alone_and_keys_each_problem_by_its_index(monkeypatch):
    """Held-out accuracy is the share of right answers: the format bonus of training (--format-reward) is
    not added. Each problem's sampling key is its index in the held-out set, so the chunk size changes
    no draw; `ended` collects whether each response stopped on its own."""
    problems = [{"problem": f"what is {i}+0?", "answer": str(i)} for i in range(5)]
    keys_seen = []

    def fake_sample(model, tokenizer, chunk, cfg, group_size, keys, temperature=None):
        keys_seen.append(keys)
        right = [int(p["answer"]) % 2 == 0 for p in chunk]      # problems 0, 2 and 4 answered right
        return {"texts": [f"so \\boxed{{{p['answer'] if r else 99}}}" for p, r in zip(chunk, right)],
                "ended": torch.tensor(right)}
    monkeypatch.setattr(prerl, "sample", fake_sample)
    ended = []
    cfg = prerl.Config(seed=3, format_reward=0.5)
    assert prerl.evaluate(None, None, problems, cfg, batch_size=2, ended=ended) == 3 / 5
    assert keys_seen == [["3-eval-0", "3-eval-1"], ["3-eval-2", "3-eval-3"], ["3-eval-4"]]
    assert ended == [True, False, True, False, True]
    assert prerl.score_responses(["so \\boxed{99}"], problems[:1], cfg)[0].item() == 0.5   # the bonus training pays


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


# ---------------------------------------------------------------------------
# Prompts, the data split, the data order and the sampling keys: bugs that ruin a study without a crash
# (each test below fails with its bug applied by hand)

# A ChatML template like SmolLM2's and Qwen's: the assistant's header is written only when asked for.
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_prompts_are_left_padded_whatever_side_the_tokenizer_was_saved_with(tmp_path):
    """Generation appends to the right end of every prompt, so prompts must be padded on the left: with
    right padding a shorter prompt's response would follow its padding. Many tokenizers are saved with
    padding_side 'right'; load_model's tokenizer pads prompts on the left anyway."""
    saved = tiny_tokenizer()
    saved.padding_side = "right"
    tiny_model(torch.float32).save_pretrained(tmp_path)
    saved.save_pretrained(tmp_path)
    model, tokenizer = prerl.load_model(str(tmp_path), torch.device("cpu"))
    problems = [{"problem": "what is 1+1?", "answer": "2"}, {"problem": "what is 12+34, and then 5 more?", "answer": "51"}]
    both = prerl.encode_prompts(tokenizer, problems, torch.device("cpu"))
    alone = prerl.encode_prompts(tokenizer, problems[:1], torch.device("cpu"))
    n = alone["input_ids"].shape[1]
    assert both["input_ids"].shape[1] > n and both["attention_mask"][:, -1].all()      # every prompt ends in the last column
    assert torch.equal(both["input_ids"][0, -n:], alone["input_ids"][0])                # the short one's tokens at the right end
    assert (both["input_ids"][0, :-n] == tokenizer.pad_token_id).all() and not both["attention_mask"][0, :-n].any()
    # what it is for: a prompt's greedy response is the same beside a longer prompt as alone
    cfg = prerl.Config(max_new_tokens=8)
    beside = prerl.sample(model, tokenizer, problems, cfg, 1, ["a", "b"], temperature=0)
    single = prerl.sample(model, tokenizer, problems[:1], cfg, 1, ["a"], temperature=0)
    assert beside["texts"][0] == single["texts"][0]


def test_a_chat_prompt_ends_with_the_assistants_header():
    """With a chat template the prompt must open the assistant's turn; without its header the model
    would go on writing the user's message instead of answering it."""
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHATML
    text = prerl.format_prompt(tokenizer, {"problem": "what is 1+1?", "answer": "2"})
    assert text == (f"<|im_start|>system\n{prerl.SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\nwhat is 1+1?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    tokenizer.chat_template = None                     # a base model: the plain completion prompt
    assert prerl.format_prompt(tokenizer, {"problem": "what is 1+1?", "answer": "2"}) == f"{prerl.SYSTEM_PROMPT}\n\nProblem: what is 1+1?\nSolution:"


@pytest.mark.parametrize("tasks,difficulty", [("add,mul", 1), (",".join(prerl.TASK_FAMILIES), 2)])
def test_built_in_held_out_problems_come_from_the_held_out_side_of_the_split(tasks, difficulty):
    """Without --eval-data the held-out set is built-in problems from the held-out quarter, never a problem
    the run trains on (train() draws its training problems from the other side with the same seed)."""
    cfg = prerl.Config(tasks=tasks, difficulty=difficulty, eval_size=24, seed=0)  # add,mul at 1 digit: 31 held out
    held = prerl.eval_problems(cfg)
    train = prerl.make_problems(4096, cfg.tasks, cfg.difficulty, cfg.seed, held_out=False)
    assert len(held) == 24 and len({p["problem"] for p in held}) == 24
    assert all(prerl.is_held_out(p["problem"]) for p in held)
    assert not any(prerl.is_held_out(p["problem"]) for p in train)
    assert not {p["problem"] for p in held} & {p["problem"] for p in train}
    # the split is a fixed quarter of all problems, whichever side asks
    texts = [f"What is {a} + {b}?" for a in range(100) for b in range(100)]
    assert 0.23 < sum(map(prerl.is_held_out, texts)) / len(texts) < 0.27
    # the same problems on every call (a resumed run and every mode of a study see the same sets); a seed's own
    assert prerl.eval_problems(cfg) == held and prerl.make_problems(4096, cfg.tasks, cfg.difficulty, 0, held_out=False) == train
    assert prerl.make_problems(4096, cfg.tasks, cfg.difficulty, 1, held_out=False) != train


def test_held_out_problems_from_a_file_are_its_first_eval_size(tmp_path):
    write_sums(tmp_path / "eval.jsonl", 4)
    cfg = prerl.Config(eval_data=str(tmp_path / "eval.jsonl"), eval_size=5)
    assert prerl.eval_problems(cfg) == prerl.load_problems(str(tmp_path / "eval.jsonl"))[:5]
    assert [p["problem"] for p in prerl.eval_problems(cfg)] == [f"what is 0+{b}?" for b in range(4)] + ["what is 1+0?"]


def test_prompts_are_encoded_without_added_special_tokens():
    """The prompt is exactly format_prompt's text: a chat template writes its own start tokens, and a
    tokenizer that adds BOS on its own (Llama's) would add a second one."""
    from tokenizers import processors
    tokenizer = tiny_tokenizer()
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    assert tokenizer("1+1")["input_ids"] == [1, 5, 4 + prerl_chars_index("+"), 5]      # this tokenizer adds BOS
    problems = [{"problem": "what is 1+1?", "answer": "2"}]
    ids = prerl.encode_prompts(tokenizer, problems, torch.device("cpu"))["input_ids"][0].tolist()
    text = prerl.format_prompt(tokenizer, {"problem": "what is 1+1?", "answer": "2"})
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"] and ids[0] != tokenizer.bos_token_id   # none added


def prerl_chars_index(char):
    from conftest import CHARS
    return CHARS.index(char)


def test_sampling_uniforms_are_float64_rows_per_key():
    """G rows per key, T columns, in [0, 1), float64: a float32 draw could not reach tokens whose
    probability is below 2**-24 in a 150k-token vocabulary."""
    uniforms = prerl.sampling_uniforms(["a", "b", "c"], 4, 9)
    assert uniforms.shape == (12, 9) and uniforms.dtype == torch.float64
    assert 0 <= uniforms.min() and uniforms.max() < 1 and len(set(uniforms.flatten().tolist())) == 12 * 9
    assert torch.equal(prerl.sampling_uniforms(["b"], 4, 9), uniforms[4:8])


def test_data_order_differs_for_every_seed_and_step():
    """Each (seed, step) draws its own batch: no seed replays another seed's batches one step shifted
    (seed 1 at step 0 is not seed 0 at step 1), so a study's seeds are independent runs."""
    problems = [{"problem": f"p{i}", "answer": str(i)} for i in range(200)]
    batches = {(seed, step): tuple(p["problem"] for p in prerl.batch_for_step(problems, step, prerl.Config(seed=seed, prompts_per_step=8)))
               for seed in range(4) for step in range(4)}
    assert batches[(0, 1)] != batches[(1, 0)] and batches[(1, 2)] != batches[(2, 1)]
    assert len(set(batches.values())) == len(batches)
    assert all(len(set(b)) == 8 for b in batches.values())
    assert batches[(0, 1)] == tuple(p["problem"] for p in prerl.batch_for_step(problems, 1, prerl.Config(seed=0, prompts_per_step=8)))


def test_every_step_samples_with_new_random_numbers(tiny_model_folder, tmp_path, monkeypatch):
    """The same batch index gets other random numbers at step 1 than at step 0 (and in another seed's
    run): keys that left out the step would replay step 0's draws at every step."""
    sampling_uniforms, drawn = prerl.sampling_uniforms, []

    def recording(keys, group_size, max_new_tokens):
        uniforms = sampling_uniforms(keys, group_size, max_new_tokens)
        drawn.append(uniforms)
        return uniforms
    monkeypatch.setattr(prerl, "sampling_uniforms", recording)
    for seed in ("0", "1"):
        prerl.train(prerl.parse_config(run_args(tiny_model_folder, tmp_path / seed, "--steps", "2", "--eval-size", "0",
                                                "--seed", seed)))
    assert len(drawn) == 4 and all(u.shape == drawn[0].shape for u in drawn)   # seed 0: steps 0, 1; seed 1: steps 0, 1
    group = 8
    for i in range(drawn[0].shape[0] // group):    # each batch index: its group's numbers at each (seed, step)
        rows = slice(i * group, (i + 1) * group)
        numbers = [u[rows] for u in drawn]
        assert all(not torch.equal(numbers[a], numbers[b]) for a in range(4) for b in range(a)), i
