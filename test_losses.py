"""
Tests of the loss variants (prerl.py "Advantages" and "Losses": --loss-agg, --scale-rewards, --ratio,
--ppo-epochs / --mini-batches, --mask-truncated, --overlong-buffer, --dynamic-sampling, --preset): each
variant's gradient against an independently written float64 formula, invariance to micro-batching and
padding (world size 2 is in test_distributed.py's one torchrun launch), equality with TRL's GRPOTrainer
loss where trl is installed, the default reproducing the one-update step exactly, several updates per
batch, and dynamic sampling's bound. Offline, CPU, the tiny model of conftest.py.

    python -m pytest -q test_losses.py
"""

import itertools
import math

import pytest
import torch

import prerl
import verify
from conftest import (flat_grad, hand_advantages, real_prompt, reference_logprobs, run_args, state_of, tiny_model,
                      toy_batch)

AGGREGATIONS = prerl.LOSS_AGGREGATIONS
SCALES = ("group", "batch", "none")
RATIOS = ("token", "sequence")
REWARDS = [[1., 0., 0., 1.], [0., 1., 1., 1.]]
MAX_NEW_TOKENS = 6   # toy_batch's responses are 2..6 tokens: a 6-token one reached the limit


def batch_with_truncation(n_groups=2, seed=1):
    """toy_batch, plus which responses were cut at MAX_NEW_TOKENS (here: those that fill every column)."""
    batch = toy_batch(n_groups=n_groups, seed=seed)
    batch["ended"] = batch["response_mask"].sum(1) < MAX_NEW_TOKENS
    return batch


def variant_cfg(**flags):
    """seq clip range widened so that, with the perturbed pi_old below, some responses clip and some do not."""
    return prerl.Config(max_new_tokens=MAX_NEW_TOKENS, seq_clip_eps_low=0.1, seq_clip_eps_high=0.1, **flags)


def perturbed_old_logprobs(model, batch, space, seed=3, spread=0.2):
    """A stand-in pi_old for the whole batch: the model's own log-probs plus fixed noise, so rho != 1."""
    with torch.no_grad():
        if space == "pretrain":
            lp = prerl.pretrain_logprobs(model, 1, batch["response_ids"], batch["response_mask"])
        else:
            lp = prerl.conditional_logprobs(model, batch["prompt_ids"], batch["prompt_mask"], batch["response_ids"],
                                            batch["response_mask"])
    noise = torch.randn(lp.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return lp + spread * noise.to(lp.dtype)


# ---------------------------------------------------------------------------
# The hand formula: Python loops over responses and tokens; each response scored alone, unpadded

def row_logprobs(model, context, response):
    """log P(y_t | context, y_<t) of one response: one forward of context + response, no padding, full
    log-softmax (conftest.reference_logprobs does one forward per token; this is the same, faster)."""
    logits = model(input_ids=torch.tensor([context + response])).logits[0, len(context) - 1:-1]
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None]).squeeze(-1)


def hand_variant_advantages(stage, rewards, lengths, cfg):
    """Advantages written out by hand, overlong penalty and reward scaling included."""
    shaped = []
    for group, group_lengths in zip(rewards.tolist(), lengths):
        row = []
        for r, n in zip(group, group_lengths):
            start = cfg.max_new_tokens - cfg.overlong_buffer
            if cfg.overlong_buffer and n > start:      # DAPO eq. 13 (n <= max_new_tokens always)
                r = r + cfg.overlong_penalty * (start - n) / cfg.overlong_buffer
            row.append(r)
        shaped.append(row)
    if stage != "grpo":
        return hand_advantages(stage, torch.tensor(shaped, dtype=torch.float64))
    flat = [r for group in shaped for r in group]
    batch_mean = sum(flat) / len(flat)
    batch_std = math.sqrt(sum((r - batch_mean) ** 2 for r in flat) / (len(flat) - 1))
    out = []
    for group in shaped:
        mean = sum(group) / len(group)
        group_std = math.sqrt(sum((r - mean) ** 2 for r in group) / (len(group) - 1))
        for r in group:
            out.append({"group": (r - mean) / (group_std + 1e-6), "batch": (r - mean) / (batch_std + 1e-6),
                        "none": r - mean}[cfg.scale_rewards])
    return out


def hand_variant_loss(model, batch, rewards, stage, cfg, old=None, reference=None):
    """coef * aggregation of -min(rho A, clip(rho) A) (+ beta k3), every piece a loop written here."""
    pretrain = stage.endswith("prerl")
    coef = cfg.prerl_coef if pretrain else 1.0
    lengths = [int(n) for n in batch["response_mask"].sum(1)]
    advantages = hand_variant_advantages(stage, rewards, [lengths[i:i + rewards.shape[1]] for i in range(0, len(lengths), rewards.shape[1])], cfg)
    present = [i for i in range(len(advantages)) if not (cfg.mask_truncated and not bool(batch["ended"][i]))]
    counted = [i for i in present if not (pretrain and advantages[i] == 0)]    # the rows of the denominators
    with_kl = reference is not None and cfg.kl_coef > 0                        # the KL term covers every response
    low, high = (cfg.seq_clip_eps_low, cfg.seq_clip_eps_high) if cfg.ratio == "sequence" else (cfg.clip_eps_low, cfg.clip_eps_high)
    row_sums = {}
    for i in present if with_kl else counted:
        n, a = lengths[i], advantages[i]
        context = [1] if pretrain else real_prompt(batch, i)
        response = batch["response_ids"][i, :n].tolist()
        lp = row_logprobs(model, context, response)
        pi_old = lp.detach() if old is None else old[i, :n]
        if cfg.ratio == "sequence":     # GSPO: one ratio for the response, the geometric mean of the token ratios
            rho = torch.exp(sum(lp[t] - pi_old[t] for t in range(n)) / n)
            terms = [-torch.min(rho * a, rho.clamp(1 - low, 1 + high) * a)] * n
        else:
            terms = []
            for t in range(n):
                rho = torch.exp(lp[t] - pi_old[t])
                terms.append(-torch.min(rho * a, rho.clamp(1 - low, 1 + high) * a))
        if with_kl:
            with torch.no_grad():
                ref = row_logprobs(reference, context, response)
            terms = [term + cfg.kl_coef * (torch.exp(ref[t] - lp[t]) - (ref[t] - lp[t]) - 1) for t, term in enumerate(terms)]
        row_sums[i] = sum(terms)
    tokens, rows = sum(lengths[i] for i in counted), len(counted)
    if cfg.loss_agg == "token-mean":
        total = sum(row_sums.values()) / tokens
    elif cfg.loss_agg == "seq-mean-token-mean":
        total = sum(row_sums[i] / lengths[i] for i in row_sums) / rows
    elif cfg.loss_agg == "seq-mean-token-sum":
        total = sum(row_sums.values()) / rows
    else:
        total = sum(row_sums.values()) / (rows * cfg.max_new_tokens)
    return coef * total


def gradient(model, fn):
    model.zero_grad()
    fn()
    return flat_grad(model).clone()


def check_against_hand(stage, cfg, rewards=REWARDS, with_old=True, reference=None):
    model, batch = tiny_model(), batch_with_truncation()
    rewards = torch.tensor(rewards, dtype=torch.float64)
    space = "pretrain" if stage.endswith("prerl") else "conditional"
    old = perturbed_old_logprobs(model, batch, space) if with_old else None
    got = gradient(model, lambda: prerl.accumulate_gradients(model, batch, rewards, stage, cfg, 1, reference, old_lp=old,
                                                             counts={}))
    expected = gradient(model, lambda: hand_variant_loss(model, batch, rewards, stage, cfg, old, reference).backward())
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    assert expected.abs().sum() > 0
    return got


# ---------------------------------------------------------------------------
# Every variant's gradient against the hand formula (float64)

# every aggregation with both ratios; the scalings take turns (each meets several aggregations and both ratios)
@pytest.mark.parametrize("agg,scale,ratio", [(agg, SCALES[i % 3], ratio) for i, (agg, ratio) in
                                             enumerate(itertools.product(AGGREGATIONS, RATIOS))])
def test_grpo_variant_gradient_equals_hand_formula(agg, scale, ratio):
    check_against_hand("grpo", variant_cfg(loss_agg=agg, scale_rewards=scale, ratio=ratio, micro_batch_tokens=25))


@pytest.mark.parametrize("stage,agg,ratio", [(stage, agg, RATIOS[i % 2]) for i, (stage, agg) in
                                             enumerate(itertools.product(("nsr-prerl", "prerl"), AGGREGATIONS))])
def test_pretrain_space_variant_gradient_equals_hand_formula(stage, agg, ratio):
    """PreRL's centred advantages with every aggregation: only kept rows (A != 0) count in D."""
    check_against_hand(stage, variant_cfg(loss_agg=agg, ratio=ratio, micro_batch_tokens=25))


@pytest.mark.parametrize("stage,agg", [(["grpo", "nsr-prerl"][i % 2], agg) for i, agg in enumerate(AGGREGATIONS)])
def test_masked_truncation_and_overlong_penalty_equal_hand_formula(stage, agg):
    check_against_hand(stage, variant_cfg(loss_agg=agg, mask_truncated=True))
    check_against_hand(stage, variant_cfg(loss_agg=agg, overlong_buffer=3, overlong_penalty=0.5))


@pytest.mark.parametrize("stage,agg", [("grpo", "seq-mean-token-mean"), ("nsr-prerl", "token-mean"), ("prerl", "seq-mean-token-mean")])
def test_kl_term_with_a_variant_equals_hand_formula(stage, agg):
    """grpo-original's combination (per-response mean of the surrogate plus beta k3, rho != 1), and the KL
    term in the pre-train space: it covers every response, while only kept ones count in the denominator."""
    check_against_hand(stage, variant_cfg(loss_agg=agg, kl_coef=0.04, clip_eps_high=0.2, mask_truncated=stage == "prerl"),
                       reference=tiny_model(seed=1))


def test_negative_control_a_per_micro_batch_mean_fails_the_hand_formula(monkeypatch):
    """Dividing each micro-batch by its own row count (the accumulation bug) must not pass the check above."""
    monkeypatch.setattr(prerl, "policy_loss", lambda token_lp, mask, advantages, denominator, *rest:
                        real_policy_loss(token_lp, mask, advantages, len(advantages), *rest))
    with pytest.raises(AssertionError):
        check_against_hand("grpo", variant_cfg(loss_agg="seq-mean-token-sum", micro_batch_tokens=25))


real_policy_loss = prerl.policy_loss


def test_without_old_logprobs_the_sequence_ratio_gives_the_token_gradient():
    """At rho = 1 (one update per batch) GSPO's gradient is the token-level one, for any aggregation:
    d exp(mean_t log rho) = mean_t d log pi, and the response's n tokens each carry it."""
    for agg in ("token-mean", "seq-mean-token-mean"):
        token = check_against_hand("grpo", variant_cfg(loss_agg=agg), with_old=False)
        sequence = check_against_hand("grpo", variant_cfg(loss_agg=agg, ratio="sequence"), with_old=False)
        torch.testing.assert_close(token, sequence, rtol=1e-9, atol=1e-12)


def test_one_forward_scoring_equals_per_token_scoring():
    model, context, response = tiny_model(), [20, 21, 22], [10, 11, 12, 13, 2]
    with torch.no_grad():
        torch.testing.assert_close(row_logprobs(model, context, response), reference_logprobs(model, context, response),
                                   rtol=1e-12, atol=1e-12)


def test_scaling_rows_hand_worked():
    rewards = torch.tensor([[1., 0., 0., 0.], [1., 1., 0., 0.]], dtype=torch.float64)
    centred = [[0.75, -0.25, -0.25, -0.25], [0.5, 0.5, -0.5, -0.5]]
    batch_std = math.sqrt((3 * 0.625 ** 2 + 5 * 0.375 ** 2) / 7)       # mean 3/8 over the 8 rewards
    torch.testing.assert_close(prerl.grpo_advantages(rewards, scale="none"), torch.tensor(centred, dtype=torch.float64))
    torch.testing.assert_close(prerl.grpo_advantages(rewards, scale="batch"),
                               torch.tensor(centred, dtype=torch.float64) / (batch_std + 1e-6))
    torch.testing.assert_close(prerl.overlong_penalties(torch.tensor([3, 4, 5, 6]), variant_cfg(overlong_buffer=3)),
                               torch.tensor([0.0, -1 / 3, -2 / 3, -1.0], dtype=torch.float64))


# ---------------------------------------------------------------------------
# Invariance: the gradient does not depend on the micro-batch size or the padding (world size: test_distributed.py)

def padded(batch, left=2, right=3):
    """The same batch with extra padding columns: prompts on the left, responses on the right."""
    pad = torch.nn.functional.pad
    return {"prompt_ids": pad(batch["prompt_ids"], (left, 0), value=3), "prompt_mask": pad(batch["prompt_mask"], (left, 0)),
            "response_ids": pad(batch["response_ids"], (0, right), value=3),
            "response_mask": pad(batch["response_mask"], (0, right)), "ended": batch["ended"]}


@pytest.mark.parametrize("agg,scale,ratio", list(itertools.product(AGGREGATIONS, SCALES, RATIOS)))
def test_gradient_is_the_same_for_any_micro_batch_size_and_padding(agg, scale, ratio):
    rewards = torch.tensor(REWARDS, dtype=torch.float64)
    grads = []
    for stage in ("grpo", "nsr-prerl") if scale == "group" else ("grpo",):   # scaling is GRPO's alone
        model, batch = tiny_model(), batch_with_truncation()
        space = "pretrain" if stage == "nsr-prerl" else "conditional"
        old = perturbed_old_logprobs(model, batch, space)
        results = []
        for tokens, pad in ((25, False), (1, False), (10_000, True)):   # rows in 3-4 passes, one by one, all at once padded
            cfg = variant_cfg(loss_agg=agg, scale_rewards=scale, ratio=ratio, micro_batch_tokens=tokens)
            b, o = (padded(batch), torch.nn.functional.pad(old, (0, 3))) if pad else (batch, old)
            results.append(gradient(model, lambda: prerl.accumulate_gradients(model, b, rewards, stage, cfg, 1, old_lp=o, counts={})))
        for other in results[1:]:
            torch.testing.assert_close(other, results[0], rtol=1e-10, atol=1e-14)
        grads.append(results[0])
    assert all(g.abs().sum() > 0 for g in grads)


def variant_step(flags, stage, dist=None):
    """One RL update of a fresh fp32 tiny model on a fixed batch of 4 groups with a perturbed pi_old; under
    torchrun each rank takes its groups and rank 0 gets the results. Returns (loss, grad norm, weights)."""
    import machinery
    model, batch = tiny_model(torch.float32), batch_with_truncation(n_groups=4)
    rewards = torch.tensor([[1., 0., 0., 1.], [0., 1., 1., 1.], [0., 0., 1., 0.], [1., 1., 1., 0.]])
    old = perturbed_old_logprobs(model, batch, "pretrain" if stage.endswith("prerl") else "conditional")
    cfg = variant_cfg(micro_batch_tokens=25, lr=1e-2, **flags)
    if dist is not None:
        machinery.shard_model(model, dist)
    optimizer = prerl.make_optimizer(model, cfg)
    if dist is not None:
        groups, _ = machinery.rank_share(list(range(len(rewards))), dist)
        rows = [g * 4 + j for g in groups for j in range(4)]
        batch, rewards, old = {name: value[rows] for name, value in batch.items()}, rewards[groups], old[rows]
        machinery.gather_weights(model)    # as rl_step leaves the model after a rollout
        machinery.shard_layers(model)
    loss, kept = prerl.accumulate_gradients(model, batch, rewards, stage, cfg, start_id=1, old_lp=old, counts={})
    grad_norm = prerl.optimizer_step(model, optimizer, cfg)
    if dist is None:
        return loss, grad_norm, model.state_dict()
    _, _, loss, _ = machinery.step_totals(rewards, torch.zeros(1), loss, kept, dist)
    return loss, grad_norm, machinery.full_state(model, optimizer)[0]


# every aggregation x scaling x ratio for GRPO, every aggregation x ratio for NSR-PreRL (scaling is GRPO's only)
WORLD_SIZE_VARIANTS = ([(dict(loss_agg=a, scale_rewards=s, ratio=r), "grpo") for a, s, r in itertools.product(AGGREGATIONS, SCALES, RATIOS)] +
                       [(dict(loss_agg=a, ratio=r), "nsr-prerl") for a, r in itertools.product(AGGREGATIONS, RATIOS)])


def variant_name(flags, stage):
    return stage + " " + " ".join(f"{k}={v}" for k, v in flags.items())


def world_size_variant_steps(dist):
    """Run by test_distributed.py's torchrun worker on each rank: every variant's step."""
    return {variant_name(flags, stage): variant_step(flags, stage, dist) for flags, stage in WORLD_SIZE_VARIANTS}


# ---------------------------------------------------------------------------
# Against TRL's GRPOTrainer loss (development only: skipped without trl)

TRL_PRESETS = {   # our preset -> the GRPOConfig options that TRL's documentation gives for the same method
    "grpo-original": dict(loss_type="grpo", beta=0.04, epsilon=0.2, epsilon_high=0.2, importance_sampling_level="token"),
    "dapo":          dict(loss_type="dapo", beta=0.0, epsilon=0.2, epsilon_high=0.28, importance_sampling_level="token"),
    "dr-grpo":       dict(loss_type="dr_grpo", beta=0.0, epsilon=0.2, epsilon_high=0.2, importance_sampling_level="token"),
    "gspo":          dict(loss_type="grpo", beta=0.0, epsilon=3e-4, epsilon_high=4e-4, importance_sampling_level="sequence"),
}


def trl_loss(options, token_lp, old_lp, ref_lp, advantages, mask, max_completion_length):
    """GRPOTrainer._compute_loss itself, on given log-probs: the model call is replaced by one that returns them."""
    import collections
    import types
    from trl import GRPOTrainer
    trainer = types.SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: (token_lp, torch.zeros_like(token_lp), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, use_vllm=False, vllm_importance_sampling_correction=False,
        epsilon_low=options["epsilon"], epsilon_high=options["epsilon_high"], beta=options["beta"],
        loss_type=options["loss_type"], importance_sampling_level=options["importance_sampling_level"],
        max_completion_length=max_completion_length, current_gradient_accumulation_steps=1,
        args=types.SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1),
        model=types.SimpleNamespace(training=True), _entropy_bonus_enabled=False, aux_loss_enabled=False,
        accelerator=types.SimpleNamespace(num_processes=1, gather=lambda x: x, gather_for_metrics=lambda x: x,
                                          reduce=lambda x, reduction="sum": x),
        _metrics={"train": collections.defaultdict(list), "eval": collections.defaultdict(list)})
    rows = len(mask)
    inputs = {"prompt_ids": torch.ones(rows, 1, dtype=torch.long), "prompt_mask": torch.ones(rows, 1, dtype=torch.long),
              "completion_ids": torch.ones_like(mask, dtype=torch.long), "completion_mask": mask,
              "advantages": advantages, "old_per_token_logps": old_lp, "ref_per_token_logps": ref_lp,
              "num_items_in_batch": mask.sum()}
    return GRPOTrainer._compute_loss(trainer, None, inputs)


@pytest.mark.parametrize("preset", list(TRL_PRESETS))
def test_each_preset_equals_trl_grpo_trainer_loss_and_gradient(preset):
    pytest.importorskip("trl")
    cfg = prerl.parse_config(["--preset", preset, "--max-new-tokens", "7"])
    gen = torch.Generator().manual_seed(0)
    rows, width = 8, 7
    lengths = torch.tensor([2, 7, 5, 3, 7, 6, 1, 4])
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    rewards = torch.tensor([[1., 0., 0., 1.], [0., 1., 1., 1.]], dtype=torch.float64)
    advantages = prerl.advantages_for("grpo", rewards, cfg)[0].reshape(-1)
    old = -2 - torch.rand(rows, width, generator=gen, dtype=torch.float64)
    spread = 1e-3 if preset == "gspo" else 0.4        # GSPO's range is 1e-4 wide: ratios near it, some clipped
    token_lp = (old + spread * torch.randn(rows, width, generator=gen, dtype=torch.float64)).requires_grad_()
    ref = old + 0.2 * torch.randn(rows, width, generator=gen, dtype=torch.float64)
    ours_lp = token_lp.detach().clone().requires_grad_()
    scale, denominator = prerl.aggregation(cfg.loss_agg, lengths, torch.ones(rows, dtype=torch.bool), cfg.max_new_tokens)
    ours = prerl.policy_loss(ours_lp, mask.double(), advantages, denominator, cfg, 1.0, ref if cfg.kl_coef else None, old, scale)
    ours.backward()
    theirs = trl_loss(TRL_PRESETS[preset], token_lp, old, ref, advantages, mask, cfg.max_new_tokens)
    theirs.backward()
    assert abs(ours.item() - theirs.item()) < 1e-6 and ours.item() != 0
    torch.testing.assert_close(ours_lp.grad, token_lp.grad, rtol=0, atol=1e-6)
    clipped = prerl.clipped_tokens(ours_lp.detach(), old, advantages, mask, cfg)
    assert 0 < clipped < mask.sum()                    # the clip acts on some tokens, not all


def test_trl_soft_overlong_punishment_and_group_scaling_equal_ours():
    pytest.importorskip("trl")
    from trl.rewards import get_soft_overlong_punishment
    from trl.trainer.utils import nanstd
    cfg = prerl.parse_config(["--preset", "dapo", "--max-new-tokens", "20"])
    assert cfg.overlong_buffer == 4
    lengths = list(range(1, 21))
    theirs = get_soft_overlong_punishment(max_completion_len=20, soft_punish_cache=4)([[5] * n for n in lengths])
    torch.testing.assert_close(prerl.overlong_penalties(torch.tensor(lengths), cfg), torch.tensor(theirs, dtype=torch.float64))
    rewards = torch.tensor([[1., 0., 0., 1.], [0., 1., 1., 1.]], dtype=torch.float64)
    centred = rewards - rewards.mean(1, keepdim=True)
    torch.testing.assert_close(prerl.grpo_advantages(rewards, 1e-4), centred / (nanstd(rewards, dim=1, keepdim=True) + 1e-4))
    torch.testing.assert_close(prerl.grpo_advantages(rewards, 1e-4, "batch"), centred / (nanstd(rewards) + 1e-4))


def test_an_update_scores_only_its_rows_in_micro_batches_sized_by_what_each_space_reads():
    """loss_plan: a mini-batch's rows (less, with --mask-truncated, those cut at the limit) are the only ones
    that count and are scored; a micro-batch's size counts prompt + response tokens in the conditional space
    and start token + response in the pre-train space (lengths written out by hand below)."""
    batch = batch_with_truncation()                          # responses [3, 6, 4, 5, 3, 6, 6, 5]; prompts 3 and 4
    rewards = torch.tensor(REWARDS)
    responses = batch["response_mask"].sum(1).tolist()
    prompts = [len(real_prompt(batch, i)) for i in range(8)]
    for stage, budget, lengths in [("grpo", 16, [r + p for r, p in zip(responses, prompts)]),
                                   ("nsr-prerl", 10, [r + 1 for r in responses])]:
        cfg = variant_cfg(micro_batch_tokens=budget)
        advantages = prerl.advantages_for(stage, rewards, cfg)[0].reshape(-1)
        for rows, mask_truncated in [(None, False), ([4, 5, 6, 7], False), ([1, 2, 3, 4], True)]:
            cfg.mask_truncated = mask_truncated
            present = [(rows is None or i in rows) and (not mask_truncated or bool(batch["ended"][i])) for i in range(8)]
            counted = [p and (stage == "grpo" or advantages[i] != 0) for i, p in enumerate(present)]
            scored = [i for i in range(8) if counted[i] and advantages[i] != 0]
            _, _, _, got_counted, chunks = prerl.loss_plan(batch, rewards, stage, cfg, False, rows)
            assert got_counted.tolist() == counted, (stage, rows)
            assert chunks == prerl.micro_batches(scored, lengths, budget), (stage, rows)
            if rows is None:
                assert len(chunks) > 1 and any(len(chunk) > 1 for chunk in chunks)   # the budget cuts, and packs


def test_micro_batching_changes_neither_an_updates_loss_nor_its_kept_or_clipped_tokens():
    """accumulate_gradients on a mini-batch's rows, in one micro-batch and in many: the same total loss,
    gradient, kept tokens (those rows' tokens) and clipped tokens (summed over the micro-batches)."""
    model, batch, rewards = tiny_model(), batch_with_truncation(), torch.tensor(REWARDS)
    old = perturbed_old_logprobs(model, batch, "conditional")
    rows = [0, 1, 2, 3, 5]                                   # every grpo advantage here is non-zero
    results = {}
    for budget in (10_000, 12):
        cfg = variant_cfg(micro_batch_tokens=budget)
        chunks = prerl.loss_plan(batch, rewards, "grpo", cfg, False, rows)[4]
        model.zero_grad()
        counts = {"clipped": 0}
        loss, kept = prerl.accumulate_gradients(model, batch, rewards, "grpo", cfg, 1, rows=rows, old_lp=old, counts=counts)
        results[budget] = (len(chunks), loss, kept, counts["clipped"], flat_grad(model))
    (one, *whole), (many, *cut) = results[10_000], results[12]
    assert one == 1 and many == len(rows)
    cfg = variant_cfg()                                      # the loss of the rows in one call of policy_loss
    advantages, space, coef, counted, _ = prerl.loss_plan(batch, rewards, "grpo", cfg, False, rows)
    denominator = prerl.aggregation(cfg.loss_agg, batch["response_mask"].sum(1), counted, cfg.max_new_tokens)[1]
    token_lp, mask = prerl.scored_logprobs(model, space, batch, rows, 1)
    expected = prerl.policy_loss(token_lp, mask.float(), advantages[rows], denominator, cfg, coef, None, old[rows, :mask.shape[1]])
    torch.testing.assert_close(whole[0], expected.item(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(cut[0], whole[0], rtol=1e-10, atol=1e-12)
    assert cut[1] == whole[1] == int(batch["response_mask"][rows].sum())
    assert cut[2] == whole[2] > 0
    torch.testing.assert_close(cut[3], whole[3], rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------
# Several updates per batch; K = M = 1 is the one-update step exactly

def one_update_as_before(model, optimizer, batch, rewards, stage, cfg, start_id, ref_model=None):
    """The step before the loss variants, written out: token-mean, rho = 1 (old = detached log-probs), one update."""
    advantages, space, coef = prerl.advantages_for(stage, rewards, cfg)
    advantages = advantages.reshape(-1)
    mask_all = batch["response_mask"]
    tokens = (mask_all * (advantages != 0)[:, None]).sum() if space == "pretrain" else mask_all.sum()
    denominator = tokens.clamp(min=1)
    rows = (advantages != 0).nonzero().squeeze(1).tolist()
    lengths = (mask_all.sum(1) + (batch["prompt_mask"].sum(1) if space == "conditional" else 1)).tolist()
    total, kept = 0.0, 0
    model.train()
    for chunk in prerl.micro_batches(rows, lengths, prerl.micro_batch_budget(cfg, batch["response_ids"].device)):
        token_lp, mask = prerl.scored_logprobs(model, space, batch, chunk, start_id)
        per_token = prerl.clipped_surrogate(token_lp, token_lp.detach(), advantages[chunk][:, None], cfg.clip_eps_low,
                                            cfg.clip_eps_high)
        loss = coef * (per_token * mask.float()).sum() / denominator
        loss.backward()
        total, kept = total + loss.item(), kept + int(mask.sum())
    return total, prerl.optimizer_step(model, optimizer, cfg, total), kept, 0.0


def test_one_epoch_one_mini_batch_reproduces_the_one_update_step_bit_for_bit(tiny_model_folder, tmp_path, monkeypatch):
    args = ("--steps", "2", "--switch-step", "1", "--diagnose-every", "0", "--eval-size", "0")   # both DSRL stages
    prerl.train(prerl.parse_config(run_args(tiny_model_folder, tmp_path / "new", *args, "--ppo-epochs", "1", "--mini-batches", "1")))
    with monkeypatch.context() as patch:
        patch.setattr(prerl, "policy_updates", one_update_as_before)
        prerl.train(prerl.parse_config(run_args(tiny_model_folder, tmp_path / "before", *args)))
    new, before = state_of(tmp_path / "new" / "checkpoint.pt")["model"], state_of(tmp_path / "before" / "checkpoint.pt")["model"]
    assert all(torch.equal(new[name], before[name]) for name in new)
    assert any(not torch.equal(new[name], tiny_model(torch.float32).state_dict()[name]) for name in new)  # it trained
    prerl.train(prerl.parse_config(run_args(tiny_model_folder, tmp_path / "two", *args, "--ppo-epochs", "2")))
    two = state_of(tmp_path / "two" / "checkpoint.pt")["model"]
    assert not all(torch.equal(two[name], before[name]) for name in two)   # negative control: 2 updates differ


@pytest.mark.parametrize("epochs,shares,ratio", [(3, 1, "token"), (2, 2, "token"), (3, 1, "sequence")])
def test_several_updates_clip_and_the_first_update_has_ratio_one(epochs, shares, ratio, monkeypatch):
    model, batch = tiny_model(torch.float32), batch_with_truncation()
    cfg = prerl.Config(lr=3e-2, ppo_epochs=epochs, mini_batches=shares, ratio=ratio, micro_batch_tokens=25,
                       prompts_per_step=2, seq_clip_eps_low=0.01, seq_clip_eps_high=0.01)
    events, real_ratio, real_step = [], prerl.log_ratio, prerl.optimizer_step

    def ratio_spy(level, logprobs, old_logprobs, mask, cfg):
        out = real_ratio(level, logprobs, old_logprobs, mask, cfg)
        if logprobs.requires_grad:     # the loss's ratios, not clipped_tokens' count
            events.append(out[0].detach() * (mask if level == "token" else mask.any(1, keepdim=True)))
        return out
    monkeypatch.setattr(prerl, "log_ratio", ratio_spy)
    monkeypatch.setattr(prerl, "optimizer_step", lambda *args: (events.append("update"), real_step(*args))[1])
    optimizer = prerl.make_optimizer(model, cfg)
    loss, grad_norm, kept, clip_fraction = prerl.policy_updates(model, optimizer, batch, torch.tensor(REWARDS), "grpo", cfg, 1)
    first = events[:events.index("update")]
    later = [e for e in events[events.index("update"):] if not isinstance(e, str)]
    assert first and all(torch.equal(r, torch.zeros_like(r)) for r in first)   # rho exactly 1 before any update
    assert later and max(r.abs().max() for r in later) > 1e-3
    assert events.count("update") == epochs * shares and kept > 0
    assert optimizer.state[next(iter(model.parameters()))]["step"] == epochs * shares   # K x M AdamW updates
    assert 0 < clip_fraction < 1, clip_fraction


def stand_in_updates(monkeypatch, losses, grad_norms, kept, clipped):
    """policy_updates with its parts stood in: update i returns losses[i], grad_norms[i], kept[i] and adds
    clipped[i] to the clip count. Returns the calls each part saw."""
    calls = {"old": [], "accumulate": [], "step": []}
    old_lp = torch.zeros(1)

    def sampling_policy_logprobs(model, batch, rewards, stage, cfg, start_id, shares, has_reference):
        calls["old"].append((shares, has_reference))
        return old_lp

    def accumulate_gradients(model, batch, rewards, stage, cfg, start_id, ref_model, rows, old, counts):
        i = len(calls["accumulate"])
        calls["accumulate"].append((ref_model, rows, old is old_lp))
        counts["clipped"] += clipped[i]
        return losses[i], kept[i]

    def optimizer_step(model, optimizer, cfg, loss):
        calls["step"].append(loss)
        return grad_norms[len(calls["step"]) - 1]
    monkeypatch.setattr(prerl, "sampling_policy_logprobs", sampling_policy_logprobs)
    monkeypatch.setattr(prerl, "accumulate_gradients", accumulate_gradients)
    monkeypatch.setattr(prerl, "optimizer_step", optimizer_step)
    return calls


def test_updates_cover_whole_groups_and_report_the_first_update_or_the_non_finite_one(monkeypatch):
    """The bookkeeping of K epochs x M mini-batches, its parts stood in: each mini-batch is whole groups and
    together they are every row once; pi_old is scored once, only when there is more than one update, and
    with the KL rows when a reference model is on; each update's own loss decides its skip; the returned
    loss and grad norm are the first update's, or the first non-finite one's; the clip fraction is every
    update's clipped tokens over every update's scored tokens."""
    rewards, reference = torch.zeros(3, 2), object()           # 3 groups of 2: rows 0-5
    cfg = prerl.Config(ppo_epochs=2, mini_batches=2, group_size=2, prompts_per_step=3)
    calls = stand_in_updates(monkeypatch, [1.0, 2.0, 3.0, 4.0], [0.1, 0.2, 0.3, 0.4], [5, 3, 5, 3], [0, 1, 2, 1])
    got = prerl.policy_updates(None, None, None, rewards, "grpo", cfg, 1, reference)
    shares = [[0, 1, 2, 3], [4, 5]]                            # group g goes to mini-batch g * M // groups
    assert calls["old"] == [(shares, True)]
    assert calls["accumulate"] == [(reference, rows, True) for rows in shares * 2]
    assert calls["step"] == [1.0, 2.0, 3.0, 4.0]
    assert got == (1.0, 0.1, 5, 4 / 16)

    calls = stand_in_updates(monkeypatch, [1.0, 2.0, math.nan, 4.0], [0.1, 0.2, 0.3, 0.4], [5, 3, 5, 3], [0] * 4)
    loss, grad_norm, kept, _ = prerl.policy_updates(None, None, None, rewards, "grpo", cfg, 1)
    assert calls["old"] == [(shares, False)] and math.isnan(loss) and (grad_norm, kept) == (0.3, 5)
    stand_in_updates(monkeypatch, [1.0, 2.0, 3.0, 4.0], [0.1, math.inf, 0.3, 0.4], [5, 3, 5, 3], [0] * 4)
    assert prerl.policy_updates(None, None, None, rewards, "grpo", cfg, 1)[:3] == (2.0, math.inf, 5)

    for epochs, mini_batches, old_passes in [(1, 1, 0), (2, 1, 1), (1, 2, 1)]:
        calls = stand_in_updates(monkeypatch, [1.0] * 2, [0.1] * 2, [0, 1], [0, 1])
        cfg = prerl.Config(ppo_epochs=epochs, mini_batches=mini_batches, group_size=2, prompts_per_step=3)
        got = prerl.policy_updates(None, None, None, rewards, "grpo", cfg, 1)
        assert len(calls["old"]) == old_passes                 # K = M = 1: rho = 1, no pi_old pass
        assert all(old is (old_passes == 1) for _, _, old in calls["accumulate"])
        assert got[3] == (0.0 if old_passes == 0 else 1.0)     # one scored token, clipped: all of them


# ---------------------------------------------------------------------------
# Dynamic sampling: bounded, and exactly --prompts-per-step mixed groups when it finds them

def fake_rollout(reward_rows, widths):
    """rollout() stand-in: draw d gets reward_rows[d] and response width widths[d] (joined batches pad)."""
    draws = []

    def rollout(model, tokenizer, problems, cfg, keys):
        d = len(draws)
        draws.append([p["problem"] for p in problems])
        batch = toy_batch(n_groups=len(problems), seed=d + 1)
        width = widths[d]
        batch["response_ids"], batch["response_mask"] = batch["response_ids"][:, :width], batch["response_mask"][:, :width]
        batch["ended"] = torch.ones(len(batch["response_ids"]), dtype=torch.bool)
        batch["texts"] = [f"draw {d} row {i}" for i in range(len(batch["response_ids"]))]
        return batch, torch.tensor(reward_rows[d][:len(problems)])
    return rollout, draws


class Tokenizer:
    pad_token_id = 3


def test_dynamic_sampling_keeps_mixed_groups_and_stops_at_the_bound(monkeypatch, capsys):
    cfg = prerl.Config(prompts_per_step=2, group_size=4, dynamic_sampling=True, dynamic_sampling_draws=3)
    pool = [{"problem": f"p{i}", "answer": "1"} for i in range(20)]
    mixed, right, wrong = [1., 0., 0., 0.], [1.] * 4, [0.] * 4
    rollout, draws = fake_rollout([[right, mixed], [wrong, wrong], [mixed, mixed]], [6, 3, 5])
    monkeypatch.setattr(prerl, "rollout", rollout)
    first, first_rewards = rollout(None, None, pool[:2], cfg, None)
    batch, rewards, n = prerl.draw_mixed_groups(None, Tokenizer(), pool, first, first_rewards, step=0, cfg=cfg)
    assert n == 3 and len(draws) == 3 and rewards.tolist() == [mixed, mixed]
    assert batch["texts"] == [f"draw 0 row {i}" for i in range(4, 8)] + [f"draw 2 row {i}" for i in range(4)]
    assert batch["response_ids"].shape == (8, 6) and (batch["response_ids"][4:, 5:] == 3).all()   # draw 2 padded
    assert torch.equal(batch["response_mask"][4:, :5], toy_batch(seed=3)["response_mask"][:4, :5])
    assert capsys.readouterr().out == ""                        # enough mixed groups: nothing to say


def test_dynamic_sampling_draws_the_steps_further_batches_and_stops_once_it_has_enough(monkeypatch, capsys):
    """A further draw d of step s is batch_for_step(pool, s, cfg, draw=d), not the step's first batch nor
    another step's; a first draw with exactly --prompts-per-step mixed groups draws nothing more; too few
    after the bound: it says so and trains on the ones it has."""
    cfg = prerl.Config(prompts_per_step=2, group_size=4, dynamic_sampling=True, dynamic_sampling_draws=3)
    pool = [{"problem": f"p{i}", "answer": "1"} for i in range(20)]
    mixed, right = [1., 0., 0., 0.], [1.] * 4
    rollout, draws = fake_rollout([[right, right], [right, mixed], [right, right]], [6, 6, 6])
    monkeypatch.setattr(prerl, "rollout", rollout)
    first, first_rewards = rollout(None, None, prerl.batch_for_step(pool, 5, cfg), cfg, None)
    batch, rewards, n = prerl.draw_mixed_groups(None, Tokenizer(), pool, first, first_rewards, step=5, cfg=cfg)
    expected = [[p["problem"] for p in prerl.batch_for_step(pool, 5, cfg, draw=d)] for d in range(3)]
    assert draws == expected and len({tuple(d) for d in draws}) == 3
    assert n == 3 and rewards.tolist() == [mixed] and batch["texts"] == [f"draw 1 row {i}" for i in range(4, 8)]
    assert capsys.readouterr().out.strip() == ("dynamic sampling, step 5: 1 of 2 groups with mixed rewards after 3 draws "
                                               "(--dynamic-sampling-draws); training on those")

    rollout, draws = fake_rollout([[mixed, mixed]], [6])
    monkeypatch.setattr(prerl, "rollout", rollout)
    first, first_rewards = rollout(None, None, pool[:2], cfg, None)
    batch, rewards, n = prerl.draw_mixed_groups(None, Tokenizer(), pool, first, first_rewards, step=5, cfg=cfg)
    assert n == 1 and len(draws) == 1 and batch["texts"] == first["texts"]


def test_dynamic_sampling_with_a_model_that_always_answers_right_is_bounded(tiny_model_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(verify, "grades", lambda texts, golds, **k: [verify.Verdict(1.0, "1", "correct")] * len(texts))
    prerl.train(prerl.parse_config(run_args(tiny_model_folder, tmp_path / "run", "--steps", "2", "--mode", "grpo",
                                            "--dynamic-sampling", "--dynamic-sampling-draws", "3", "--diagnose-every", "0",
                                            "--eval-size", "0")))
    out = capsys.readouterr().out
    assert out.count("dynamic sampling, step") == 2
    assert ("dynamic sampling, step 0: 0 of 16 groups with mixed rewards after 3 draws (--dynamic-sampling-draws); "
            "training on the first draw as it is (no group carries a gradient)") in out
    import json
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["draws"] for r in records] == [3, 3] and [r["kept_tokens"] for r in records] == [0, 0]


# ---------------------------------------------------------------------------
# Presets and refusals

def test_presets_set_the_published_combination_and_explicit_flags_win():
    dapo = prerl.parse_config(["--preset", "dapo"])
    assert (dapo.loss_agg, dapo.clip_eps_high, dapo.dynamic_sampling, dapo.overlong_buffer) == ("token-mean", 0.28, True, 48 // 5)
    dr = prerl.parse_config(["--preset", "dr-grpo"])
    assert (dr.loss_agg, dr.scale_rewards, dr.clip_eps_high) == ("seq-mean-token-sum-norm", "none", 0.2)
    gspo = prerl.parse_config(["--preset", "gspo", "--mini-batches", "2", "--no-dynamic-sampling"])
    assert (gspo.ratio, gspo.seq_clip_eps_low, gspo.seq_clip_eps_high, gspo.mini_batches) == ("sequence", 3e-4, 4e-4, 2)
    original = prerl.parse_config(["--preset", "grpo-original", "--kl-coef", "0"])
    assert (original.loss_agg, original.kl_coef, original.clip_eps_high) == ("seq-mean-token-mean", 0.0, 0.2)
    assert prerl.parse_config(["--preset", "dapo", "--max-new-tokens", "100"]).overlong_buffer == 20
    assert prerl.parse_config([]) == prerl.Config()              # no preset: the defaults, today's method
    assert prerl.loss_line(dapo).startswith("loss: preset dapo | token-mean | GRPO advantage / group std | token ratio")


@pytest.mark.parametrize("flags,flag", [
    (["--preset", "ppo"], "--preset"), (["--loss-agg", "mean"], "--loss-agg"), (["--scale-rewards", "rank"], "--scale-rewards"),
    (["--ratio", "tokens"], "--ratio"), (["--ppo-epochs", "0"], "--ppo-epochs"), (["--mini-batches", "0"], "--mini-batches"),
    (["--mini-batches", "9"], "--mini-batches"), (["--overlong-buffer", "49"], "--overlong-buffer"),
    (["--overlong-buffer", "-1"], "--overlong-buffer"), (["--overlong-penalty", "-1"], "--overlong-penalty"),
    (["--seq-clip-eps-low", "1"], "--seq-clip-eps-low"), (["--seq-clip-eps-high", "-1"], "--seq-clip-eps-high"),
    (["--dynamic-sampling-draws", "0"], "--dynamic-sampling-draws"),
    (["--dynamic-sampling", "--mode", "nsr"], "--dynamic-sampling"), (["--preset", "dapo", "--mode", "psr"], "--overlong-buffer"),
    (["--overlong-buffer", "4", "--mode", "w-reinforce"], "--overlong-buffer"),
])
def test_bad_variant_flags_are_refused_in_one_line(flags, flag, tmp_path, capsys):
    from conftest import refused_line
    line = refused_line(["--out-dir", str(tmp_path / "out"), *flags], capsys)
    assert line.startswith(f"error: {flag} "), line
    assert not (tmp_path / "out").exists()


def test_variants_not_yet_tried_under_torchrun_are_refused(tmp_path, capsys, monkeypatch):
    from conftest import refused_line
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert "not yet tried under torchrun" in refused_line(["--ppo-epochs", "2", "--out-dir", str(tmp_path)], capsys)
    assert "not yet tried under torchrun" in refused_line(["--mini-batches", "2", "--out-dir", str(tmp_path)], capsys)
    assert "not yet tried under torchrun" in refused_line(["--dynamic-sampling", "--out-dir", str(tmp_path)], capsys)
    prerl.parse_config(["--loss-agg", "seq-mean-token-mean", "--scale-rewards", "batch", "--ratio", "sequence",
                        "--out-dir", str(tmp_path)])   # these are exact under torchrun (test_distributed.py)


def test_sample_marks_responses_that_ended_and_the_rest_were_cut_at_max_new_tokens(tiny_model_folder):
    model, tokenizer = prerl.load_model(str(tiny_model_folder), torch.device("cpu"))
    problems = [{"problem": "what is 1+2?", "answer": "3"}]
    out = prerl.sample(model, tokenizer, problems, prerl.Config(max_new_tokens=5, temperature=1.0), 8, [0])
    eos = torch.tensor(prerl.eos_token_ids(model, tokenizer))
    ended = torch.isin(out["response_ids"], eos).any(1)
    assert torch.equal(out["ended"], ended)                  # --mask-truncated drops the others
    assert (out["response_mask"][~out["ended"]].sum(1) == 5).all()


def test_batch_std_under_torchrun_pools_every_ranks_count_sum_and_squares(monkeypatch):
    """--scale-rewards batch under torchrun: each rank sends (count, sum, sum of squares) and the unbiased
    std of all ranks' rewards comes back, equal to the std of the rewards put together (collectives stood in)."""
    import machinery
    mine = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0]])
    theirs = torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])   # another rank, 12 rewards
    sent = []

    def all_reduce(sums):
        sent.append(sums.clone())
        return sums + torch.tensor([theirs.numel(), theirs.sum(), (theirs ** 2).sum()], dtype=sums.dtype)
    monkeypatch.setattr(prerl, "DIST", machinery.Distributed(0, 2, "gloo", None, None))
    monkeypatch.setattr(machinery, "all_reduce", all_reduce)
    got = prerl.batch_std(mine)
    assert sent[0].dtype == torch.float64 and sent[0].tolist() == [8.0, 4.0, 4.0]
    assert got.shape == (1, 1) and got.dtype == mine.dtype
    torch.testing.assert_close(got, torch.cat([mine.flatten(), theirs.flatten()]).std().reshape(1, 1))
    monkeypatch.setattr(machinery, "all_reduce", lambda sums: sums)       # one rank alone: its own std
    torch.testing.assert_close(prerl.batch_std(mine), mine.std().reshape(1, 1))
    same = torch.ones(1, 4)                                              # all equal: 0, never the root of a negative
    assert prerl.batch_std(same).item() == 0.0
    shaped = torch.tensor([[0.25]], dtype=torch.float64)                # shaped rewards, two in all, float64
    monkeypatch.setattr(machinery, "all_reduce", lambda sums: sums + torch.tensor([1.0, -0.5, 0.25], dtype=sums.dtype))
    got = prerl.batch_std(shaped)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, torch.tensor([[0.25, -0.5]], dtype=torch.float64).std().reshape(1, 1))
    monkeypatch.setattr(prerl, "DIST", None)                             # one process: torch's std
    torch.testing.assert_close(prerl.batch_std(mine), mine.std().reshape(1, 1))


def test_clipped_tokens_counts_rho_past_the_range_on_the_side_its_advantage_pushes():
    """The clip-fraction metric, counted by hand: rho below 1 - eps_low counts for a negative advantage, above
    1 + eps_high for a positive one, never at the bounds themselves, never for A = 0 or a masked token."""
    cfg = prerl.Config(clip_eps_low=0.2, clip_eps_high=0.28)
    rho = torch.tensor([[0.7, 0.8, 1.5, 0.1],      # A = -1: 0.7 counts; 0.8 is the bound; 1.5 is the other side;
                        [1.5, 1.28, 0.5, 1.0],     # A = +1: 1.5 counts; 1.28 is the bound; 0.5 the other side  0.1 masked
                        [0.5, 1.5, 1.0, 1.0],      # A = 0: nothing counts
                        [0.5, 1.5, 1.0, 1.0]],     # A = +0.5: 1.5 counts, 0.5 does not
                       dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.float64)
    advantages = torch.tensor([-1.0, 1.0, 0.0, 0.5], dtype=torch.float64)
    old = torch.zeros_like(rho)
    assert prerl.clipped_tokens(rho.log(), old, advantages, mask, cfg) == 3
    assert prerl.clipped_tokens(old, old, advantages, mask, cfg) == 0          # rho = 1 everywhere


def test_a_group_is_mixed_only_with_a_reward_below_one_half_and_one_above():
    """A reward of exactly 0.5 (partial credit) is on neither side: it makes no group mixed by itself."""
    rewards = torch.tensor([[0.0, 1.0], [0.5, 1.0], [0.0, 0.5], [0.5, 0.5], [0.4, 0.6]])
    assert prerl.mixed_groups(rewards).tolist() == [True, False, False, False, True]


def test_a_one_token_overlong_buffer_still_penalises_the_last_token():
    """--overlong-buffer 1: a response of exactly --max-new-tokens pays the whole penalty, one token shorter
    pays nothing; the shaped rewards keep the rewards' dtype."""
    cfg = prerl.Config(max_new_tokens=8, overlong_buffer=1, overlong_penalty=1.0)
    batch = {"response_mask": torch.tensor([[1] * 8, [1] * 7 + [0]])}
    rewards = torch.tensor([[1.0, 1.0]])
    shaped = prerl.shaped_rewards(rewards, batch, cfg)
    assert shaped.dtype == rewards.dtype and shaped.tolist() == [[0.0, 1.0]]


def test_a_count_as_a_denominator_is_at_least_one_and_under_torchrun_every_ranks_over_the_world_size(monkeypatch):
    """global_count: one process, the count itself (0 becomes 1, 1 stays 1); under torchrun the sum over ranks
    divided by the world size, FSDP averaging the ranks' gradients (collective stood in: another rank has 10)."""
    import machinery
    assert prerl.global_count(torch.tensor(0.0)).item() == 1.0 and prerl.global_count(torch.tensor(1.0)).item() == 1.0
    assert prerl.global_count(torch.tensor(7.0)).item() == 7.0
    monkeypatch.setattr(prerl, "DIST", machinery.Distributed(0, 2, "gloo", None, None))
    monkeypatch.setattr(machinery, "all_reduce", lambda count: count + 10)
    assert prerl.global_count(torch.tensor(6.0)).item() == 8.0


def test_the_sequence_ratio_of_a_one_token_response_is_that_tokens_ratio():
    """GSPO's per-response ratio is the mean log ratio over the response's own tokens: one token, its own."""
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, 0.0, 0.0]])
    old = torch.tensor([[-1.5, -1.0, -3.5], [-1.25, -9.0, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    got, low, high = prerl.log_ratio("sequence", logprobs, old, mask, prerl.Config(seq_clip_eps_low=3e-4, seq_clip_eps_high=4e-4))
    assert got.tolist() == [[(0.5 - 1.0 + 0.5) / 3], [0.75]] and (low, high) == (3e-4, 4e-4)


def test_a_per_response_scale_leaves_the_loss_in_the_log_probs_dtype():
    """seq-mean-token-mean's 1/|y_i| comes in float64; an fp32 model's loss stays fp32 (its value by hand:
    rho = 1, so each token gives -A_i, weighted 1/3, over D = 6)."""
    token_lp = torch.randn(2, 3, requires_grad=True)
    scale = torch.tensor([1 / 3, 1 / 3], dtype=torch.float64)
    loss = prerl.policy_loss(token_lp, torch.ones(2, 3), torch.tensor([1.0, 0.5]), torch.tensor(6.0), prerl.Config(), 1.0,
                             row_scale=scale)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, torch.tensor(-(3 * 1.0 / 3 + 3 * 0.5 / 3) / 6))
