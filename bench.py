"""
bench.py -- how fast prerl runs on this machine, measured side by side with its peers in one run.

    pip install trl                          # the peer (optional; the table says why if it is missing)
    python bench.py                          # embedded SmolLM2-135M-Instruct, CPU or GPU
    python bench.py --model-config qwen2.5-1.5b --device cuda   # random weights of a named shape (GPU)
    python bench.py --model-config qwen2.5-1.5b --tokenizer FOLDER   # ... where the embedded model is absent
    python bench.py --only sampling,training,memory,verify       # a subset

Sections, printed as one table with ratios at the end:
  matmul    plain fp32 (CPU) / bf16 (CUDA) matmul FLOP/s: the machine's practical peak
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

MODEL_SHAPES = {  # --model-config: named shapes built with random weights (no download)
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
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


def matmul_flops(device, size=2048, repeat=10):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    size = 8192 if device.type == "cuda" else size
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    seconds, _ = timed(lambda: [a @ b for _ in range(repeat)], device, repeat=3)
    return 2 * size ** 3 * repeat / seconds


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
            before = matmul_flops(device, repeat=5)
            seconds.append(timed(step, device)[0])
            after = matmul_flops(device, repeat=5)
            shares.append(flops / seconds[-1] / ((before + after) / 2))
        median = statistics.median(seconds)
        rows.append((f"training step, {stage} ({len(scored)} responses, {tokens} tokens)",
                     f"{tokens / median:,.0f} tok/s", f"median {median:.2f} s, {flops / median / 1e9:,.1f} GFLOP/s"))
        rows.append((f"training step, {stage}: model FLOPs utilisation", f"{100 * statistics.median(shares):.0f}%",
                     "of the matmul rate measured around each step, median of: "
                     + ", ".join(f"{100 * s:.0f}%" for s in sorted(shares))
                     + f"; {100 * flops / median / peak:.0f}% of this run's matmul peak"
                     + (f", {100 * flops / median / card:.0f}% of the card's dense bf16 spec" if card else "")
                     + "; target >= 50%"))


def bench_e2e(model, tokenizer, cfg, problems, rows, initial_weights, steps=3):
    start_id, _ = prerl.start_token_id(tokenizer)
    seconds_per_step = {}
    for mode in ("grpo", "nsr-prerl"):
        # Each mode starts from the weights TRL loads, seeded as TRL is: the training section has
        # already changed the model, and what it samples (how long, how often it stops) sets the step time.
        model.load_state_dict(initial_weights)
        torch.manual_seed(0)
        run_cfg = prerl.Config(**{**vars(cfg), "mode": mode})
        optimizer = prerl.make_optimizer(model, run_cfg)
        times = []
        for step in range(steps):
            start = time.perf_counter()
            record = prerl.rl_step(model, tokenizer, optimizer, problems, step, run_cfg, start_id)
            times.append(time.perf_counter() - start)
        mean = seconds_per_step[mode] = statistics.mean(times[1:])
        rows.append((f"RL step, prerl {mode} ({len(problems)}x{cfg.group_size}, {cfg.max_new_tokens} new tokens)",
                     f"{mean:.1f} s/step", f"mean of steps 2-{steps}; last: sample {record['sample_s']} s, "
                     f"score {record['score_s']} s, train {record['train_s']} s"))
    return seconds_per_step


def bench_trl(model_folder, tokenizer, cfg, problems, rows, steps=3):
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
        gradient_checkpointing=False, use_cpu=not torch.cuda.is_available(), bf16=torch.cuda.is_available(),
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
    rows.append((f"RL step, TRL {trl.__version__} GRPOTrainer (same work)", f"{mean:.1f} s/step",
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
    rows.append((f"peak memory, training {model_config} (32 x 104 tokens, micro-batches of {budget} tokens{checkpointing})",
                 f"{used / 2**30:.2f} GiB", f"{used / state:.2f}x weights+grads+AdamW ({state / 2**30:.2f} GiB); {where}"))


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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=prerl.EMBEDDED_MODEL)
    parser.add_argument("--model-config", choices=sorted(MODEL_SHAPES), help="random weights of a named shape")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tokenizer", help="tokenizer folder for --model-config (default: the embedded model's)")
    parser.add_argument("--only", default="matmul,sampling,training,e2e,memory,verify")
    parser.add_argument("--new-tokens", default="64,256", help="sampling lengths to measure")
    parser.add_argument("--repeat", type=int, default=3, help="paired runs per sampling length and training stage (median reported)")
    parser.add_argument("--micro-batch-tokens", type=int, default=prerl.Config.micro_batch_tokens)
    parser.add_argument("--gradient-checkpointing", action="store_true", help="as in prerl.py, for training and memory")
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_probe:
        return memory_probe(args.memory_probe, args.micro_batch_tokens, args.gradient_checkpointing, args.device)
    sections = set(args.only.split(","))
    device = prerl.pick_device(prerl.Config(device=args.device))
    machinery.reuse_freed_memory(device)  # as prerl.train does; TRL runs in this process too
    cfg = prerl.Config(max_new_tokens=64, micro_batch_tokens=args.micro_batch_tokens)
    problems = prerl.make_problems(cfg.prompts_per_step, cfg.tasks, cfg.difficulty, seed=0, held_out=False)
    rows = []
    peak = matmul_flops(device)
    rows.append((f"matmul peak ({'bf16' if device.type == 'cuda' else 'fp32'}, {device.type}, "
                 f"{torch.get_num_threads()} threads)", f"{peak / 1e9:,.1f} GFLOP/s", "plain torch matmul, this run"))
    need_model = sections & {"sampling", "training", "e2e"}
    if need_model:
        model, tokenizer, name = build_model(args, device)
        rows.append(("model", name, f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, "
                                     f"{matmul_parameters(model) / 1e6:.0f}M in matmuls, {device}"))
    if need_model and args.gradient_checkpointing:
        prerl.enable_gradient_checkpointing(model)
    if "e2e" in sections:  # the weights as loaded, for the RL steps (TRL loads them from the folder)
        initial_weights = {name: tensor.to("cpu", copy=True) for name, tensor in model.state_dict().items()}
    if "sampling" in sections:
        bench_sampling(model, tokenizer, cfg, problems, [int(n) for n in args.new_tokens.split(",")], rows, args.repeat)
    if "training" in sections:
        bench_training(model, tokenizer, cfg, problems, peak, rows, response_tokens=64, repeat=args.repeat)
    if "e2e" in sections:
        ours = bench_e2e(model, tokenizer, cfg, problems, rows, initial_weights)
        with tempfile.TemporaryDirectory(prefix="prerl-bench-") as scratch:  # removed afterwards (GBs of weights)
            if args.model_config:  # TRL loads from a folder: save the random weights (skipped when TRL is missing)
                folder = scratch
                if importlib.util.find_spec("trl"):
                    model.load_state_dict(initial_weights)  # the same start as prerl's RL steps
                    model.save_pretrained(folder)
                    tokenizer.save_pretrained(folder)
                rows.append(("RL steps on random weights", "note", "every reward is 0, so no group is mixed: prerl "
                             "skips the backward (all-equal groups carry no signal), TRL runs it"))
            else:  # never looks for the embedded model when --model-config is given
                folder = prerl.embedded_model_folder() if args.model == prerl.EMBEDDED_MODEL else args.model
            theirs = bench_trl(folder, tokenizer, cfg, problems, rows)
        if theirs:
            for mode, seconds in ours.items():
                rows.append((f"RL step ratio, prerl {mode} / TRL GRPOTrainer", f"{seconds / theirs:.2f}x",
                             "target <= 0.6x"))
    if "memory" in sections:
        bench_memory(args.model_config or "smollm2-135m", args.micro_batch_tokens, args.gradient_checkpointing, device, rows)
    if "verify" in sections:
        bench_verify(rows)
    width = max(len(r[0]) for r in rows)
    print(f"\n{'what':<{width}} | {'figure':>16} | notes")
    print(f"{'-' * width}-|-{'-' * 16}-|------")
    for what, figure, notes in rows:
        print(f"{what:<{width}} | {figure:>16} | {notes}")


if __name__ == "__main__":
    main()
