"""
bench.py -- how fast prerl runs on this machine, measured side by side with its peers in one run.

    pip install trl                          # the peer (optional; the table says why if it is missing)
    python bench.py                          # embedded SmolLM2-135M-Instruct, CPU or GPU
    python bench.py --model-config qwen2.5-1.5b --device cuda   # random weights of a named shape (GPU)
    python bench.py --model-config qwen2.5-1.5b --tokenizer FOLDER   # ... where the embedded model is absent
    python bench.py --only sampling,training,memory,verify       # a subset

Sections, printed as one table with ratios at the end:
  matmul    plain fp32 (CPU) / bf16 (CUDA) matmul FLOP/s: the machine's practical peak
  precision fp32 vs bf16 weights, interleaved: sampling, forward+backward, optimizer step, RL step
  sampling  response tokens/s: prerl.generate vs transformers' model.generate, same settings, both
            warmed up, then --repeat interleaved pairs (median; every pair is printed)
  training  one optimizer step (forward, backward, AdamW): tokens/s and model FLOPs utilisation,
            counting FLOPs as 6 x matmul parameters x tokens + attention 12 x layers x width x seq^2;
            --repeat steps, each against the matmul rate measured just before and after it
  e2e       seconds per RL step (grpo, nsr-prerl) vs TRL's GRPOTrainer: same starting weights, prompts,
            G, max new tokens, temperature, one optimizer step per batch, no KL, no vLLM
  memory    peak resident memory of training steps vs weights + gradients + AdamW state (16 B/param)
  verify    verify.rewards() calls per second on a realistic batch
"""

import argparse
import dataclasses
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import machinery
import prerl
import verify

MODEL_SHAPES = {  # --model-config: named shapes built with random weights (no download); prerl's plan reads them too
    **machinery.MODEL_SHAPES,
    "tiny-qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,   # --dry-run
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=10240, tie_word_embeddings=True),
}


CARD_BF16_PEAK = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L4": 121e12}  # dense bf16, datasheet


def card_bf16_peak(device):
    """The datasheet's dense bf16 FLOP/s of this GPU, or None (CPU, or a card not in the table)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return next((peak for card, peak in CARD_BF16_PEAK.items() if card in name), None)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeat=1):
    """Median seconds of fn() over repeat runs (after one warm-up run when repeat > 1)."""
    if repeat > 1:
        fn()
    times = []
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


MATMUL_SIZE = {"cpu": 2048, "cuda": 8192}   # --gpu-suite --dry-run shrinks the CPU one


def matmul_flops(device, size=None, repeat=10, dtype=None):
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    size = size or MATMUL_SIZE[device.type]
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    seconds, _ = timed(lambda: [a @ b for _ in range(repeat)], device, repeat=3)
    return 2 * size ** 3 * repeat / seconds


def matmul_peak(device, repeat=10):
    """(the faster rate, {precision: rate}): fp32 and bf16 matmuls, both measured now. The machine's peak
    is the faster of the two -- bf16 on GPUs and AMX CPUs, fp32 where bf16 is emulated."""
    rates = {name: matmul_flops(device, repeat=repeat, dtype=dtype)
             for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    return max(rates.values()), rates


def matmul_parameters(model):
    """Parameters that take part in a matmul per token: every 2-D weight, the input embedding excluded
    unless it is tied to the output projection (then it is the LM head)."""
    total = sum(p.numel() for p in model.parameters() if p.dim() == 2)
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    return total if embedding is head else total - embedding.numel()


def model_from_shape(name):
    """A causal LM of a named shape (MODEL_SHAPES) with random weights: no download."""
    from transformers import AutoConfig, AutoModelForCausalLM
    shape = dict(MODEL_SHAPES[name])
    config = AutoConfig.for_model(shape.pop("model_type"), **shape)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def build_model(args, device):
    if args.model_config:
        from transformers import AutoTokenizer
        torch.manual_seed(0)
        model = model_from_shape(args.model_config).to(device)
        # A shape without its tokenizer: use the embedded one (ids stay inside any of these vocabularies),
        # or --tokenizer FOLDER on a machine without the embedded model.
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or prerl.embedded_model_folder())
        tokenizer.padding_side = "left"
        return model, tokenizer, args.model_config + " (random weights)"
    model, tokenizer = prerl.load_model(args.model, device)
    return model, tokenizer, "SmolLM2-135M-Instruct (embedded)" if args.model == prerl.EMBEDDED_MODEL else args.model


def bench_sampling(model, tokenizer, cfg, problems, new_tokens, rows, repeat):
    device = next(model.parameters()).device
    encoded = prerl.encode_prompts(tokenizer, problems, device)
    eos = prerl.eos_token_ids(model, tokenizer)
    model.eval()

    def ours(n):
        uniforms = prerl.sampling_uniforms(range(len(problems)), cfg.group_size, n).to(device)
        return prerl.generate(model, encoded["input_ids"], encoded["attention_mask"], cfg.group_size, n,
                              cfg.temperature, cfg.top_p, eos, tokenizer.pad_token_id, uniforms)

    @torch.no_grad()
    def plain(n):  # the baseline: one plain transformers call with the same settings
        with prerl.autocast(device):
            out = model.generate(**encoded, do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0,
                                 max_new_tokens=n, num_return_sequences=cfg.group_size,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)
        return out[:, encoded["input_ids"].shape[1]:]

    ours(8), plain(8)  # warm-up: the first calls pay for lazy initialisation and allocator growth
    for n in new_tokens:
        rates = {ours: [], plain: []}
        for r in range(repeat):  # interleaved, so a slow spell of a shared machine hits both
            for fn in (ours, plain):
                torch.manual_seed(r)
                seconds, out = timed(lambda: fn(n), device)
                rates[fn].append(int(prerl.response_mask_from_positions(out, eos).sum()) / seconds)
        ratios = sorted(a / b for a, b in zip(rates[ours], rates[plain]))
        what = f"sampling {len(problems)}x{cfg.group_size}, {n} new tokens"
        rows.append((f"{what}: prerl.generate", f"{statistics.median(rates[ours]):,.0f} tok/s",
                     f"median of {repeat}: " + ", ".join(f"{x:,.0f}" for x in rates[ours])))
        rows.append((f"{what}: model.generate", f"{statistics.median(rates[plain]):,.0f} tok/s",
                     f"median of {repeat}: " + ", ".join(f"{x:,.0f}" for x in rates[plain])))
        rows.append((f"{what}: ratio prerl / model.generate", f"{statistics.median(ratios):.2f}x",
                     "median of the paired runs: " + ", ".join(f"{x:.2f}" for x in ratios) + "; target >= 1.5x"))


def synthetic_batch(tokenizer, problems, cfg, response_tokens, device, seed=0):
    """A batch shaped like a real step: chat prompts, G responses of response_tokens random tokens."""
    encoded = prerl.encode_prompts(tokenizer, problems, device)
    gen = torch.Generator().manual_seed(seed)
    rows = len(problems) * cfg.group_size
    response_ids = torch.randint(100, 10000, (rows, response_tokens), generator=gen).to(device)
    return {"prompt_ids": encoded["input_ids"].repeat_interleave(cfg.group_size, 0),
            "prompt_mask": encoded["attention_mask"].repeat_interleave(cfg.group_size, 0),
            "response_ids": response_ids, "response_mask": torch.ones_like(response_ids)}


def step_flops(model, batch, rows, space):
    """Model FLOPs of forward + backward over the scored rows: 6 N tokens + 12 L d seq^2 per sequence."""
    config = model.config
    n = matmul_parameters(model)
    lengths = batch["response_mask"][rows].sum(1)
    if space == "conditional":
        lengths = lengths + batch["prompt_mask"][rows].sum(1)
    else:
        lengths = lengths + 1  # the start token
    tokens = int(lengths.sum())
    attention = 12 * config.num_hidden_layers * config.hidden_size * float((lengths.float() ** 2).sum())
    return 6 * n * tokens + attention, tokens


def bench_training(model, tokenizer, cfg, problems, peak, rows, response_tokens, repeat):
    device = next(model.parameters()).device
    precision = "bf16" if next(model.parameters()).dtype == torch.bfloat16 else "fp32"
    batch = synthetic_batch(tokenizer, problems, cfg, response_tokens, device)
    rewards = torch.tensor([[1.0, 0.0] * (cfg.group_size // 2)] * len(problems))  # every group mixed
    optimizer = prerl.make_optimizer(model, cfg)
    start_id, _ = prerl.start_token_id(tokenizer)
    card = card_bf16_peak(device)
    for stage in ("grpo", "nsr-prerl"):
        advantages, space, _ = prerl.advantages_for(stage, rewards, cfg)
        scored = (advantages.reshape(-1) != 0).nonzero().squeeze(1).to(device)
        flops, tokens = step_flops(model, batch, scored, space)

        def step():
            prerl.accumulate_gradients(model, batch, rewards, stage, cfg, start_id)
            prerl.optimizer_step(model, optimizer, cfg)
        step()  # warm-up: the first step allocates the gradients and the AdamW state
        seconds, shares = [], []
        for _ in range(repeat):  # each step between two matmul bursts, so a slow spell of a shared machine hits both
            before = matmul_peak(device, repeat=5)[0]
            seconds.append(timed(step, device)[0])
            after = matmul_peak(device, repeat=5)[0]
            shares.append(flops / seconds[-1] / ((before + after) / 2))
        median = statistics.median(seconds)
        rows.append((f"training step, {precision}, {stage} ({len(scored)} responses, {tokens} tokens)",
                     f"{tokens / median:,.0f} tok/s", f"median {median:.2f} s, {flops / median / 1e9:,.1f} GFLOP/s"))
        rows.append((f"training step, {precision}, {stage}: model FLOPs utilisation", f"{100 * statistics.median(shares):.0f}%",
                     "of the faster of the fp32 and bf16 matmul rates measured around each step, median of: "
                     + ", ".join(f"{100 * s:.0f}%" for s in sorted(shares))
                     + f"; {100 * flops / median / peak:.0f}% of this run's matmul peak"
                     + (f", {100 * flops / median / card:.0f}% of the card's dense bf16 spec" if card else "")
                     + "; target >= 50%"))


def bench_precision(model, tokenizer, problems, rows, repeat):
    """fp32 against bf16 weights on one model, in rounds that alternate the two (a busy spell of a shared
    machine slows both), the fastest of `repeat` rounds after a warm-up round: sampling 4 prompts x 4
    responses of 16 new tokens, forward+backward of that batch (every group mixed, so every row is scored),
    one optimizer step (fused torch AdamW in fp32; StochasticRoundingAdamW in bf16, and its op-by-op
    reference), and a whole RL step (sample, verify, update) at the default 8 prompts x 4 and 48 tokens."""
    import copy
    cfg = prerl.Config(prompts_per_step=4, group_size=4, max_new_tokens=16)
    problems = problems[:4]
    models = {"fp32": model.float(), "bf16": copy.deepcopy(model).to(torch.bfloat16)}
    optimizers = {precision: prerl.make_optimizer(m, cfg) for precision, m in models.items()}
    reference = machinery.StochasticRoundingAdamW([p for p in models["bf16"].parameters()], lr=cfg.lr, fused=False)
    kernel = "one-pass C++ kernel" if machinery.adamw_bf16_kernel() else "op by op: the C++ kernel did not build"
    start_id, _ = prerl.start_token_id(tokenizer)
    rewards = torch.tensor([[1.0, 0.0] * (cfg.group_size // 2)] * len(problems))
    rl_cfg = prerl.Config(mode="grpo")
    rl_problems = prerl.make_problems(rl_cfg.prompts_per_step, rl_cfg.tasks, rl_cfg.difficulty, seed=1, held_out=False)
    parts = ("sample", "forward+backward", "optimizer step", "optimizer step, op by op", "RL step")
    best = {precision: dict.fromkeys(parts, float("inf")) for precision in models}
    for round in range(repeat + 1):
        for precision, m in models.items():
            seconds = {}
            cfg = dataclasses.replace(cfg, precision=precision)  # the micro-batch budget follows it (2048 tokens in bf16)
            start = time.perf_counter()
            batch = prerl.sample(m, tokenizer, problems, cfg, cfg.group_size, [f"bench-{round}-{i}" for i in range(len(problems))])
            seconds["sample"] = time.perf_counter() - start
            for name, optimizer in (("optimizer step", optimizers[precision]),     # the reference: last round only
                                    ("optimizer step, op by op", reference if precision == "bf16" and round == repeat else None)):
                if optimizer is None:
                    continue
                start = time.perf_counter()
                prerl.accumulate_gradients(m, batch, rewards, "grpo", cfg, start_id)
                seconds["forward+backward"] = time.perf_counter() - start
                start = time.perf_counter()
                optimizer.step()
                seconds[name] = time.perf_counter() - start
                optimizer.zero_grad(set_to_none=True)
            start = time.perf_counter()
            prerl.rl_step(m, tokenizer, optimizers[precision], rl_problems, round, dataclasses.replace(rl_cfg, precision=precision),
                          start_id)
            seconds["RL step"] = time.perf_counter() - start
            if round:
                best[precision] = {k: min(v, seconds.get(k, v)) for k, v in best[precision].items()}
    fp32, bf16 = best["fp32"], best["bf16"]
    note = f"fp32 / bf16 weights, fastest of {repeat} interleaved rounds"
    rows.append(("precision: sample 4 prompts x 4, 16 new tokens", f"{fp32['sample']:.2f} / {bf16['sample']:.2f} s",
                 f"{note}; bf16 {fp32['sample'] / bf16['sample']:.2f}x faster; target >= 1.5x"))
    rows.append(("precision: forward+backward of that batch", f"{fp32['forward+backward']:.2f} / {bf16['forward+backward']:.2f} s",
                 f"{note}; bf16 {fp32['forward+backward'] / bf16['forward+backward']:.2f}x faster"))
    rows.append(("precision: optimizer step", f"{fp32['optimizer step']:.3f} / {bf16['optimizer step']:.3f} s",
                 f"{note}; fused torch AdamW vs StochasticRoundingAdamW ({kernel}): bf16 at "
                 f"{bf16['optimizer step'] / fp32['optimizer step']:.2f}x the fp32 time, target <= 1.5x; "
                 f"its op-by-op reference {bf16['optimizer step, op by op']:.2f} s"))
    three = {p: best[p]["sample"] + best[p]["forward+backward"] + best[p]["optimizer step"] for p in best}
    rows.append(("precision: the three together", f"{three['fp32']:.2f} / {three['bf16']:.2f} s",
                 f"sums of the rows above; bf16 {three['fp32'] / three['bf16']:.2f}x faster"))
    rows.append((f"precision: RL step, grpo, {rl_cfg.prompts_per_step} x {rl_cfg.group_size}, {rl_cfg.max_new_tokens} tokens",
                 f"{fp32['RL step']:.2f} / {bf16['RL step']:.2f} s",
                 f"{note} (sample, verify, update; each precision's own responses); bf16 "
                 f"{fp32['RL step'] / bf16['RL step']:.2f}x faster; target >= 1.8x"))
    del models["bf16"], optimizers, reference


def bench_e2e(model, tokenizer, cfg, problems, rows, initial_weights, steps=3):
    start_id, _ = prerl.start_token_id(tokenizer)
    seconds_per_step = {}
    for mode in ("grpo", "nsr-prerl"):
        # Each mode starts from the weights TRL loads, seeded as TRL is: the training section has
        # already changed the model, and what it samples (how long, how often it stops) sets the step time.
        model.load_state_dict(initial_weights)
        torch.manual_seed(0)
        precision = "bf16" if next(model.parameters()).dtype == torch.bfloat16 else "fp32"
        run_cfg = prerl.Config(**{**vars(cfg), "mode": mode, "precision": precision})  # as prerl.py decides it
        optimizer = prerl.make_optimizer(model, run_cfg)
        times = []
        for step in range(steps):
            start = time.perf_counter()
            record = prerl.rl_step(model, tokenizer, optimizer, problems, step, run_cfg, start_id)
            times.append(time.perf_counter() - start)
        mean = seconds_per_step[mode] = statistics.mean(times[1:])
        rows.append((f"RL step, prerl {mode}, {precision} ({len(problems)}x{cfg.group_size}, {cfg.max_new_tokens} new tokens)",
                     f"{mean:.1f} s/step", f"mean of steps 2-{steps}; last: sample {record['sample_s']} s, "
                     f"score {record['score_s']} s, train {record['train_s']} s"))
    return seconds_per_step


def bench_trl(model_folder, tokenizer, cfg, problems, rows, bf16, steps=3):
    """TRL's GRPOTrainer on the same work, timed per optimizer step by a callback."""
    try:
        import trl
        from datasets import Dataset
        from transformers import TrainerCallback
    except ImportError as e:
        rows.append(("RL step, TRL GRPOTrainer", "not run", f"TRL is not installed ({e}); `pip install trl`"))
        return None

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.start = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.start)

    def reward_fn(completions, answer, **kwargs):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return verify.rewards(texts, answer)

    dataset = Dataset.from_list([{"prompt": [{"role": "system", "content": prerl.SYSTEM_PROMPT},
                                             {"role": "user", "content": p["problem"]}], "answer": p["answer"]}
                                 for p in problems] * steps)
    args = trl.GRPOConfig(
        output_dir="/tmp/prerl-bench-trl", per_device_train_batch_size=len(problems) * cfg.group_size,
        gradient_accumulation_steps=1, num_generations=cfg.group_size, max_completion_length=cfg.max_new_tokens,
        temperature=cfg.temperature, top_p=cfg.top_p, beta=0.0, num_iterations=1, use_vllm=False,
        learning_rate=cfg.lr, max_steps=steps, logging_steps=1000, save_strategy="no", report_to="none",
        gradient_checkpointing=False, use_cpu=not torch.cuda.is_available(), bf16=bf16,
        shuffle_dataset=False, seed=0)
    timer = StepTimer()
    try:
        trainer = trl.GRPOTrainer(model=model_folder, reward_funcs=reward_fn, args=args, train_dataset=dataset,
                                  processing_class=tokenizer, callbacks=[timer])
        trainer.train()
    except Exception as e:  # report, never hide, why the peer could not run
        rows.append((f"RL step, TRL {trl.__version__} GRPOTrainer", "failed", f"{type(e).__name__}: {e}"[:200]))
        return None
    mean = statistics.mean(timer.times[1:])
    rows.append((f"RL step, TRL {trl.__version__} GRPOTrainer (same work, bf16={bf16})", f"{mean:.1f} s/step",
                 f"mean of steps 2-{steps}; gradient checkpointing off, as in prerl"))
    return mean


def memory_probe(model_config, micro_batch_tokens, gradient_checkpointing, device):
    """Run in a subprocess: build a model, do training steps, report the peak resident memory (CPU) or
    the peak of allocated GPU memory (CUDA). Prints one JSON line."""
    from transformers import AutoConfig, AutoModelForCausalLM  # noqa: F401  (before the baseline, as always)
    device = torch.device(device)
    machinery.reuse_freed_memory(device)
    rss_before = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    model = model_from_shape(model_config).to(device)
    if gradient_checkpointing:
        prerl.enable_gradient_checkpointing(model)
    cfg = prerl.Config(micro_batch_tokens=micro_batch_tokens)
    rows, prompt_len, response_len = cfg.prompts_per_step * cfg.group_size, 40, 64
    gen = torch.Generator().manual_seed(0)
    batch = {"prompt_ids": torch.randint(100, 10000, (rows, prompt_len), generator=gen),
             "prompt_mask": torch.ones(rows, prompt_len, dtype=torch.long),
             "response_ids": torch.randint(100, 10000, (rows, response_len), generator=gen),
             "response_mask": torch.ones(rows, response_len, dtype=torch.long)}
    batch = {k: v.to(device) for k, v in batch.items()}
    rewards = torch.tensor([[1.0, 0.0] * (cfg.group_size // 2)] * cfg.prompts_per_step)
    optimizer = prerl.make_optimizer(model, cfg)
    for _ in range(2):
        prerl.accumulate_gradients(model, batch, rewards, "grpo", cfg, start_id=1)
        prerl.optimizer_step(model, optimizer, cfg)
    params = sum(p.numel() for p in model.parameters())
    if device.type == "cuda":  # everything on the GPU was allocated by this process after it started
        print(json.dumps({"peak": torch.cuda.max_memory_allocated(device), "before": 0, "params": params}))
        return
    # VmHWM, not getrusage's ru_maxrss: on Linux ru_maxrss survives fork + exec, so a child of a large
    # process (this benchmark, after TRL) would report its parent's peak.
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    peak = int(status["VmHWM"].split()[0]) * 1024
    print(json.dumps({"peak": peak, "before": rss_before, "params": params}))


def bench_memory(model_config, micro_batch_tokens, gradient_checkpointing, device, rows):
    out = subprocess.run([sys.executable, __file__, "--memory-probe", model_config, "--micro-batch-tokens",
                          str(micro_batch_tokens), "--device", str(device)]
                         + (["--gradient-checkpointing"] if gradient_checkpointing else []), capture_output=True, text=True)
    if out.returncode != 0:
        rows.append(("peak memory", "failed", out.stderr.strip().splitlines()[-1][:200]))
        return
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    state = 16 * probe["params"]  # fp32 weights + gradients + AdamW exp_avg + exp_avg_sq
    used = probe["peak"] - probe["before"]
    checkpointing = ", gradient checkpointing" if gradient_checkpointing else ""
    where = ("GPU, torch.cuda.max_memory_allocated" if device.type == "cuda" else
             f"resident; process total {probe['peak'] / 2**30:.2f} GiB incl. {probe['before'] / 2**30:.2f} GiB of runtime")
    budget = prerl.micro_batch_budget(prerl.Config(micro_batch_tokens=micro_batch_tokens), device)
    from transformers import AutoConfig
    shape = dict(MODEL_SHAPES[model_config])
    plan = machinery.memory_plan(AutoConfig.for_model(shape.pop("model_type"), **shape), "fp32", device.type, 32, 64, budget,
                                 gradient_checkpointing, prompt_tokens=40)["training"]   # the probe's batch
    rows.append((f"peak memory, training {model_config} (32 x 104 tokens, micro-batches of {budget} tokens{checkpointing})",
                 f"{used / 2**30:.2f} GiB", f"{used / state:.2f}x weights+grads+AdamW ({state / 2**30:.2f} GiB); {where}; "
                 f"prerl's memory plan {plan / 2**30:.2f} GiB ({used / plan:.2f}x)"))


def bench_verify(rows, n=2000):
    problems = prerl.make_problems(n, ",".join(prerl.TASK_FAMILIES), 2, seed=0, held_out=False)
    completions, golds = [], []
    for i, p in enumerate(problems):
        answer = p["answer"] if i % 3 else "17"  # a third wrong
        style = i % 4
        completions.append(["Let me work it out. First we compute the parts, then combine them. "
                            f"So the final answer is \\boxed{{{answer}}}.",
                            f"We get {answer}.", f"The answer is ${answer}$.",
                            f"Step 1: 3 + 4 = 7. Step 2: therefore {answer}"][style])
        golds.append(p["answer"])
    verify.warmup()
    seconds, _ = timed(lambda: verify.rewards(completions, golds), torch.device("cpu"), repeat=3)
    rows.append((f"verify.rewards, {n} realistic completions (7 families)", f"{n / seconds:,.0f} calls/s",
                 f"{1000 * seconds / n:.3f} ms per call"))


# -----------------------------------------------------------------------------
# --gpu-suite: every GPU figure the project needs, in one call of a few minutes on a lent GPU (issue 11).
# It carries everything it needs: random weights of a named shape built on the device and a tokenizer
# built in code (nothing downloaded, nothing read from a cache folder). --dry-run runs the same code on
# the CPU with a tiny shape and tiny sizes, so the script itself is tested here (test_machinery.py).

SUITE = {
    "gpu": dict(shape="qwen2.5-1.5b", prompts=4, group=8, new_tokens=256, wide_prompts=32,
                rl_prompts=8, rl_group=8, rl_tokens=1024, rl_steps=3, train_tokens=256, repeat=3),
    "dry": dict(shape="tiny-qwen2", prompts=2, group=2, new_tokens=8, wide_prompts=4,
                rl_prompts=2, rl_group=2, rl_tokens=8, rl_steps=2, train_tokens=8, repeat=1),
}


def synthetic_tokenizer(vocab_size):
    """A character-level tokenizer over the whole vocabulary: printable ASCII, then fillers <t1234>. Built
    in code, so the suite needs no tokenizer folder; random weights make any tokenizer as good as another."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    vocab.update({chr(c): len(vocab) + i for i, c in enumerate([10] + list(range(32, 127)))})
    vocab.update({f"<t{i}>": i for i in range(len(vocab), vocab_size)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", padding_side="left")


def copy_bandwidth(device, gigabytes=2.0, repeat=10):
    """Bytes read + written per second by a large device-to-device copy: the practical memory ceiling."""
    n = int(gigabytes * 2**30 / 4) if device.type == "cuda" else 2**22
    a = torch.randn(n, device=device)
    b = torch.empty_like(a)
    seconds, _ = timed(lambda: [b.copy_(a) for _ in range(repeat)], device, repeat=3)
    return 2 * a.numel() * a.element_size() * repeat / seconds


def rollout(model, encoded, group, new_tokens, cfg, eos, pad_id, how, keys=None):
    """One rollout of `how`: 'static' (machinery's static cache, a CUDA graph on CUDA), 'loop' (prerl.generate's
    loop), 'plain' (prerl.py alone) or 'hf' (transformers' model.generate, same settings)."""
    device = encoded["input_ids"].device
    if how == "hf":
        with torch.no_grad(), prerl.autocast(device):
            out = model.generate(**encoded, do_sample=cfg.temperature > 0, temperature=cfg.temperature or None,
                                 top_p=cfg.top_p, top_k=0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 num_return_sequences=group, pad_token_id=pad_id, eos_token_id=eos)
        return out[:, encoded["input_ids"].shape[1]:]
    keys = range(len(encoded["input_ids"])) if keys is None else keys
    uniforms = prerl.sampling_uniforms(keys, group, new_tokens).to(device) if cfg.temperature > 0 else None
    saved = machinery.STATIC_DECODE, prerl.PLAIN
    machinery.STATIC_DECODE, prerl.PLAIN = ("on" if how == "static" else "off"), how == "plain"
    try:
        return prerl.generate(model, encoded["input_ids"], encoded["attention_mask"], group, new_tokens, cfg.temperature,
                              cfg.top_p, eos, pad_id, uniforms)
    finally:
        machinery.STATIC_DECODE, prerl.PLAIN = saved


def suite_agreement(model, tokenizer, problems, s, device, rows):
    """Before timing anything: the static path against the loop and the plain path, greedy and sampled,
    and the captured graph against the same static step run eagerly (that one must be identical)."""
    encoded = prerl.encode_prompts(tokenizer, problems[:2], device)
    eos = prerl.eos_token_ids(model, tokenizer)
    n = min(s["new_tokens"], 64)
    for temperature in (0.0, 1.0):
        cfg = prerl.Config(temperature=temperature)
        out = {how: rollout(model, encoded, 4, n, cfg, eos, tokenizer.pad_token_id, how) for how in ("static", "loop", "plain")}
        for other in ("loop", "plain"):
            same = out["static"].shape == out[other].shape and bool((out["static"] == out[other]).all())
            agree = float((out["static"][:, :out[other].shape[1]] == out[other][:, :out["static"].shape[1]]).float().mean())
            rows.append((f"agreement, static vs {other}, T={temperature} (8 rows x {n} tokens)",
                         "identical" if same else f"{100 * agree:.1f}% tokens", "in fp32 identical (tests); under bf16 autocast "
                         "another batch shape may round a near-tie the other way, and that row then diverges"))
    if device.type == "cuda":  # graph replay vs the same step eagerly: the same kernels on the same buffers
        uniforms = prerl.sampling_uniforms(range(2), 4, n).to(device)
        outs = [machinery.static_generate(model, encoded["input_ids"], encoded["attention_mask"], 4, n, 1.0, 1.0, eos,
                                          tokenizer.pad_token_id, uniforms, prerl.pick_next_token, prerl.autocast(device),
                                          prerl.cache_keyword(model), capture=capture) for capture in (False, True)]
        same = outs[0].shape == outs[1].shape and bool((outs[0] == outs[1]).all())
        rows.append(("agreement, CUDA graph vs the same static step eagerly", "identical" if same else "DIFFERENT",
                     "must be identical"))


def suite_decode(model, tokenizer, problems, s, device, bandwidth, rows):
    """ms per decode step at 32 rows for the static path, prerl's loop and model.generate; then 256 rows
    of the static path against the bandwidth floor."""
    cfg = prerl.Config(temperature=1.0)     # sampling; random weights rarely pick EOS, so every row runs to the end
    eos = prerl.eos_token_ids(model, tokenizer)
    n, group = s["new_tokens"], s["group"]
    encoded = prerl.encode_prompts(tokenizer, problems[:s["prompts"]], device)
    rows_n = len(encoded["input_ids"]) * group

    def seconds(how, tokens):
        return timed(lambda: rollout(model, encoded, group, tokens, cfg, eos, tokenizer.pad_token_id, how), device)

    captures_before, capture_s_before = machinery.DECODE_STATS["captures"], machinery.DECODE_STATS["capture_s"]
    first, _ = seconds("static", n)                    # builds the buffers and captures the graph
    for how in ("loop", "hf"):                          # the others' warm-up
        for k in (1, n):
            seconds(how, k)
    per_step, totals, produced = {}, {}, {}
    for how in ("static", "loop", "hf"):
        per_step[how], totals[how] = [], []
    for _ in range(s["repeat"]):                        # interleaved, so a slow spell hits every path alike
        for how in ("static", "loop", "hf"):
            one, _ = seconds(how, 1)                    # prefill and the first pick
            full, out = seconds(how, n)
            produced[how] = out.shape[1]
            per_step[how].append((full - one) / max(out.shape[1] - 1, 1))
            totals[how].append(full)
    ms = {how: 1000 * statistics.median(v) for how, v in per_step.items()}
    what = f"decode {rows_n} rows x {n} new tokens"
    for how, label in (("static", "static cache + CUDA graph" if device.type == "cuda" else "static cache (eager: CPU)"),
                       ("loop", "prerl loop (today)"), ("hf", "model.generate")):
        rows.append((f"{what}: {label}", f"{ms[how]:.2f} ms/step",
                     f"median of {s['repeat']}: " + ", ".join(f"{1000 * x:.2f}" for x in per_step[how])
                     + f"; whole rollout {statistics.median(totals[how]):.2f} s, {produced[how]} tokens per row"
                     + ("; target <= 4 ms" if how == "static" else "")))
    rows.append((f"{what}: loop / static", f"{ms['loop'] / ms['static']:.1f}x", "target >= 7x"))
    rows.append((f"{what}: model.generate / static", f"{ms['hf'] / ms['static']:.1f}x", "target >= 3x"))
    steady = statistics.median(totals["static"])
    rows.append((f"{what}: warm-up of the static path", f"{first - steady:.2f} s",
                 f"first rollout {first:.2f} s vs steady {steady:.2f} s; graph capture "
                 f"{machinery.DECODE_STATS['capture_s'] - capture_s_before:.2f} s, "
                 f"{machinery.DECODE_STATS['captures'] - captures_before} capture(s) for {1 + 2 * s['repeat']} rollouts"))

    # 256 rows: the static path against the floor of streaming the weights and the KV cache once per step
    wide = prerl.encode_prompts(tokenizer, problems[:s["wide_prompts"]], device)
    wide_rows, prompt_length = len(wide["input_ids"]) * group, wide["input_ids"].shape[1]
    go = lambda tokens: rollout(model, wide, group, tokens, cfg, eos, tokenizer.pad_token_id, "static")  # noqa: E731
    go(n)                                               # this shape's capture
    one, _ = timed(lambda: go(1), device)
    full, out = timed(lambda: go(n), device)
    step_s = (full - one) / max(out.shape[1] - 1, 1)
    decoder = [d for d in machinery._DECODERS[model].values() if len(d.token) == wide_rows][-1]
    kv_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in decoder.cache.layers)  # as allocated
    room = decoder.mask.shape[1]
    weight_bytes = 2 * matmul_parameters(model)         # bf16 copies of the matmul weights
    static_bytes = weight_bytes + kv_bytes              # what the static step reads
    ideal_bytes = weight_bytes + kv_bytes * (prompt_length + n / 2) / room   # the average filled cache
    floor_s = ideal_bytes / bandwidth
    rows.append((f"decode {wide_rows} rows x {n} new tokens: static path", f"{wide_rows / step_s:,.0f} tok/s",
                 f"{1000 * step_s:.2f} ms/step; floor {1000 * floor_s:.2f} ms/step ({ideal_bytes / 1e9:.2f} GB: bf16 weights "
                 f"+ the average filled KV cache, at the measured copy rate) = {100 * floor_s / step_s:.0f}% of the floor; "
                 f"the step reads the whole room of {room} slots: {static_bytes / 1e9:.2f} GB"))


def suite_rl_step(model, tokenizer, s, device, rows):
    """The RL step on that shape, split into sample / score (verify) / train seconds. Random weights never
    answer right, so every group would be all-wrong and carry no gradient (prerl then skips the backward):
    the rewards are verified for real, then forced to alternate 1, 0 so that every group is mixed."""
    cfg = prerl.Config(mode="grpo", prompts_per_step=s["rl_prompts"], group_size=s["rl_group"],
                       max_new_tokens=s["rl_tokens"])
    problems = prerl.make_problems(cfg.prompts_per_step * s["rl_steps"], cfg.tasks, cfg.difficulty, seed=1, held_out=False)
    start_id, _ = prerl.start_token_id(tokenizer)
    optimizer = prerl.make_optimizer(model, cfg)
    real_rewards = verify.rewards
    verify.rewards = lambda texts, golds: [float(i % 2) for i, _ in enumerate(real_rewards(texts, golds))]
    records = []
    try:
        for step in range(s["rl_steps"]):
            batch = problems[step * cfg.prompts_per_step:(step + 1) * cfg.prompts_per_step]
            sync(device)
            start = time.perf_counter()
            record = prerl.rl_step(model, tokenizer, optimizer, batch, step, cfg, start_id)
            sync(device)
            record["total_s"] = time.perf_counter() - start
            records.append(record)
    finally:
        verify.rewards = real_rewards
    what = f"RL step grpo ({cfg.prompts_per_step}x{cfg.group_size}, {cfg.max_new_tokens} new tokens)"
    for i, r in enumerate(records):
        rows.append((f"{what}, step {i + 1}", f"{r['total_s']:.2f} s", f"sample {r['sample_s']} s, score {r['score_s']} s, "
                     f"train {r['train_s']} s; {r['response_length']:.0f} tokens per response, {r['kept_tokens']} trained tokens"
                     + ("; includes this shape's capture" if i == 0 else "")))
    del optimizer


def suite_memory(shape, device, rows):
    """Peak GPU memory of training steps of the shape, in a fresh process; against a 24 GB card."""
    before = len(rows)
    if device.type == "cuda":
        torch.cuda.empty_cache()                        # this process's cached blocks, for the probe's process
    bench_memory(shape, 0, False, device, rows)
    if len(rows) > before and rows[-1][1] != "failed":
        used = float(rows[-1][1].split()[0])
        rows.append(("fits a 24 GB card (training, fp32 master weights + AdamW)", "yes" if used * 2**30 < 24e9 else "no",
                     f"{used:.2f} GiB peak; --precision (issue 15) is what brings it under"))


def gpu_suite(args):
    dry = args.dry_run
    s = SUITE["dry" if dry else "gpu"]
    device = torch.device("cpu") if dry else torch.device("cuda")
    if not dry and not torch.cuda.is_available():
        raise SystemExit("error: --gpu-suite needs a CUDA GPU (--dry-run runs it on the CPU with a tiny shape)")
    if dry:  # the CPU under bf16 autocast, as prerl runs on CUDA: the same dtypes go through the same code
        MATMUL_SIZE["cpu"] = 256
        prerl.autocast = lambda device: torch.autocast(device.type, dtype=torch.bfloat16)
    start = time.perf_counter()
    rows = []
    import transformers
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run: tiny shape and sizes, bf16 autocast)"
    rows.append(("machine", name, f"torch {torch.__version__}, transformers {transformers.__version__}"))
    peak, bandwidth = matmul_flops(device), copy_bandwidth(device)
    rows.append((f"matmul peak ({'bf16' if device.type == 'cuda' else 'fp32'})", f"{peak / 1e12:,.1f} TFLOP/s", "this run"))
    rows.append(("device memory copy rate", f"{bandwidth / 1e12:,.2f} TB/s", "bytes read + written by a 2 GiB copy"))
    torch.manual_seed(0)
    with torch.device(device):                      # built on the device: no minute of CPU initialisation
        model = model_from_shape(s["shape"])
    tokenizer = synthetic_tokenizer(model.config.vocab_size)
    rows.append(("model", f"{s['shape']} (random)", f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, "
                 "fp32 weights, bf16 autocast on CUDA (as prerl.load_model); character-level tokenizer built in code"))
    problems = prerl.make_problems(max(s["wide_prompts"], s["prompts"]), "add,mul", 1, seed=0, held_out=False)
    model.eval()
    sections = [("agreement", lambda: suite_agreement(model, tokenizer, problems, s, device, rows)),
                ("decode", lambda: suite_decode(model, tokenizer, problems, s, device, bandwidth, rows)),
                ("rl-step", lambda: suite_rl_step(model, tokenizer, s, device, rows)),
                ("training", lambda: bench_training(model, tokenizer, prerl.Config(group_size=s["rl_group"]),
                                                    problems[:s["rl_prompts"]], peak, rows, s["train_tokens"], s["repeat"])),
                ("memory", lambda: suite_memory(s["shape"], device, rows))]
    for section, run in sections:
        t0 = time.perf_counter()
        try:
            run()
        except Exception as e:   # one broken section must not cost the others' figures on a lent GPU
            rows.append((f"section {section}", "FAILED", f"{type(e).__name__}: {e}"[:300]))
        print(f"[gpu-suite] {section}: {time.perf_counter() - t0:.1f} s", flush=True)
    stats = machinery.DECODE_STATS
    rows.append(("static decode: graph captures / reuses / rebuilds / failures",
                 f"{stats['captures']} / {stats['graph_reuses']} / {stats['rebuilds_after_weight_change']} / {stats['capture_failures']}",
                 f"{stats['capture_s']:.2f} s capturing in all, {stats['replays']} replays, {stats['eager_steps']} eager steps; "
                 "one capture per rollout shape, none per step"))
    rows.append(("gpu suite wall time", f"{time.perf_counter() - start:.0f} s", "target < 8 min"))
    text = table(rows)
    print(text)
    if args.suite_out:
        with open(args.suite_out, "w") as f:
            f.write(f"python bench.py --gpu-suite{' --dry-run' if dry else ''}\n{text}\n")
    return rows


def table(rows):
    width = max(len(r[0]) for r in rows)
    lines = [f"\n{'what':<{width}} | {'figure':>16} | notes", f"{'-' * width}-|-{'-' * 16}-|------"]
    return "\n".join(lines + [f"{what:<{width}} | {figure:>16} | {notes}" for what, figure, notes in rows])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=prerl.EMBEDDED_MODEL)
    parser.add_argument("--model-config", choices=sorted(MODEL_SHAPES), help="random weights of a named shape")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tokenizer", help="tokenizer folder for --model-config (default: the embedded model's)")
    parser.add_argument("--only", default="matmul,precision,sampling,training,e2e,memory,verify")
    parser.add_argument("--precisions", default="fp32,bf16", help="training section: the weight precisions to measure")
    parser.add_argument("--new-tokens", default="64,256", help="sampling lengths to measure")
    parser.add_argument("--repeat", type=int, default=3, help="paired runs per sampling length and training stage (median reported)")
    parser.add_argument("--micro-batch-tokens", type=int, default=prerl.Config.micro_batch_tokens)
    parser.add_argument("--gradient-checkpointing", action="store_true", help="as in prerl.py, for training and memory")
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)
    parser.add_argument("--gpu-suite", action="store_true", help="every GPU figure the project needs, in one call (< 8 min)")
    parser.add_argument("--dry-run", action="store_true", help="with --gpu-suite: the same code on the CPU, tiny shape")
    parser.add_argument("--suite-out", help="with --gpu-suite: also write the table to this file")
    args = parser.parse_args()
    if args.gpu_suite:
        return gpu_suite(args)
    if args.memory_probe:
        return memory_probe(args.memory_probe, args.micro_batch_tokens, args.gradient_checkpointing, args.device)
    sections = set(args.only.split(","))
    device = prerl.pick_device(prerl.Config(device=args.device))
    machinery.reuse_freed_memory(device)  # as prerl.train does; TRL runs in this process too
    cfg = prerl.Config(max_new_tokens=64, micro_batch_tokens=args.micro_batch_tokens)
    problems = prerl.make_problems(cfg.prompts_per_step, cfg.tasks, cfg.difficulty, seed=0, held_out=False)
    rows = []
    peak, rates = matmul_peak(device)
    for precision, rate in rates.items():
        rows.append((f"matmul {precision} ({device.type}, {torch.get_num_threads()} threads)", f"{rate / 1e9:,.1f} GFLOP/s",
                     "plain torch matmul, this run" + ("; the peak (the faster)" if rate == peak else "")))
    shape = args.model_config or (prerl.embedded_model_folder() if args.model == prerl.EMBEDDED_MODEL else args.model)
    chosen, why = machinery.choose_precision("auto", device.type, shape=shape)
    rows.append(("prerl --precision auto", chosen, why))
    print(f"precision {chosen}: {why}", flush=True)
    need_model = sections & {"sampling", "training", "e2e", "precision"}
    if need_model:
        model, tokenizer, name = build_model(args, device)
        rows.append(("model", name, f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, "
                                     f"{matmul_parameters(model) / 1e6:.0f}M in matmuls, {device}"))
    if need_model and args.gradient_checkpointing:
        prerl.enable_gradient_checkpointing(model)
    if "e2e" in sections:  # the weights as loaded, for the RL steps (TRL loads them from the folder)
        initial_weights = {name: tensor.to("cpu", copy=True) for name, tensor in model.state_dict().items()}
    if "precision" in sections:
        bench_precision(model, tokenizer, problems, rows, args.repeat)
    if "sampling" in sections:
        bench_sampling(model, tokenizer, cfg, problems, [int(n) for n in args.new_tokens.split(",")], rows, args.repeat)
    if "training" in sections:  # in both precisions: fp32 as loaded, then the same model in bf16 weights
        for precision in args.precisions.split(","):
            model.to(torch.bfloat16 if precision == "bf16" else torch.float32)
            bench_training(model, tokenizer, cfg, problems, peak, rows, response_tokens=64, repeat=args.repeat)
        model.float()              # the RL steps below start from the fp32 weights as loaded (initial_weights)
    if "e2e" in sections:
        model.to(torch.bfloat16 if chosen == "bf16" else torch.float32)   # prerl as `python prerl.py` would run
        ours = bench_e2e(model, tokenizer, cfg, problems, rows, initial_weights)
        with tempfile.TemporaryDirectory(prefix="prerl-bench-") as scratch:  # removed afterwards (GBs of weights)
            if args.model_config:  # TRL loads from a folder: save the random weights (skipped when TRL is missing)
                folder = scratch
                if importlib.util.find_spec("trl"):
                    model.float().load_state_dict(initial_weights)  # the same start as prerl's RL steps
                    model.save_pretrained(folder)
                    tokenizer.save_pretrained(folder)
                rows.append(("RL steps on random weights", "note", "every reward is 0, so no group is mixed: prerl "
                             "skips the backward (all-equal groups carry no signal), TRL runs it"))
            else:  # never looks for the embedded model when --model-config is given
                folder = prerl.embedded_model_folder() if args.model == prerl.EMBEDDED_MODEL else args.model
            trl_runs = [bench_trl(folder, tokenizer, cfg, problems, rows, bf16=bf16) for bf16 in (False, True)]
            theirs = min((t for t in trl_runs if t), default=None)          # TRL at its best precision here
        if theirs:
            for mode, seconds in ours.items():
                rows.append((f"RL step ratio, prerl {mode} ({chosen}, auto) / TRL GRPOTrainer (its faster of bf16 "
                             f"off and on)", f"{seconds / theirs:.2f}x", "target <= 0.4x"))
    if "memory" in sections:
        bench_memory(args.model_config or "smollm2-135m", args.micro_batch_tokens, args.gradient_checkpointing, device, rows)
    if "verify" in sections:
        bench_verify(rows)
    print(table(rows))


if __name__ == "__main__":
    main()
