"""
analyze.py -- the paper's measurements on your own model: pass@k and reasoning behaviours, gradient
alignment between P(y) and P(y|x), and a side-by-side comparison of training modes.

    python analyze.py eval                                   # embedded default, built-in held-out set
    python analyze.py eval --checkpoint runs/prerl/checkpoint.pt --base embedded --n 8
    python analyze.py eval --model Qwen/Qwen2.5-Math-1.5B --data amc23.jsonl --n 32 --max-new-tokens 2048
    python analyze.py align --problems 8 --samples 4         # <grad log P(y), grad log P(y|x)>
    python analyze.py compare --modes grpo,nsr,nsr-prerl,dsrl --steps 10 --plot compare.png
    python analyze.py compare --modes grpo,nsr-prerl,dsrl --seeds 3 --lr-sweep 5e-6,2e-5,5e-5 --jobs 2   # means, 95% CIs
    python analyze.py eval --model runs/prerl/model              # the folder a run exports (any tool loads it)
    python analyze.py plot runs/prerl                            # a run's curves -> runs/prerl/metrics.png
    python analyze.py samples runs/prerl --step 12               # what the model wrote at step 12, and its rewards

Every command also takes the model and data options of prerl.py that make sense for it (--model,
--data, --eval-size, --tasks, --difficulty, --max-new-tokens, --seed, ...); --help lists them.
"""

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import statistics
import sys
import time

import machinery
import prerl
import verify

# -----------------------------------------------------------------------------
# pass@k and reasoning behaviours


def pass_at_k(n, c, k):
    """Unbiased pass@k (Chen et al. 2021; NSR paper): 1 - C(n-c, k) / C(n, k), n samples, c correct."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


# The behaviour phrases and their counter live in prerl.py, whose training steps log them too (diagnostics).
count_behaviours = prerl.count_behaviours
TRANSITION_PHRASES, REFLECTION_PHRASES = prerl.TRANSITION_PHRASES, prerl.REFLECTION_PHRASES


# -----------------------------------------------------------------------------
# Evaluation


def load_for_analysis(model_name, checkpoint_path, device):
    """A model by hub id / folder / 'embedded', optionally with the weights of one of our checkpoints."""
    model, tokenizer = prerl.load_model(model_name, device)
    if checkpoint_path:
        lora = {}
        try:  # a run with --precision bf16 saved bf16 weights: evaluate them as it trained them, in bf16
            state = prerl.load_saved(checkpoint_path, mmap=True)
            model.to(next(iter(state["model"].values())).dtype)
            lora = {k: state["config"][k] for k in ("lora", "lora_alpha", "lora_targets", "seed")} if state["config"].get("lora") else {}
        except Exception:
            pass  # an unreadable file: load_checkpoint says so in one line
        if lora:  # a LoRA run saved its adapter only: the same adapters on the start model, then its weights
            model = prerl.machinery.add_lora(model, lora["lora"], lora["lora_alpha"], lora["lora_targets"], lora["seed"])
        prerl.load_checkpoint(checkpoint_path, model, adapter_only=bool(lora))
    return model, tokenizer


def evaluate_samples(model, tokenizer, problems, cfg, n, batch_prompts=8):
    """n samples per problem; returns pass@k for k = 1, 2, 4, ... n, avg@n and behaviour statistics."""
    correct, lengths, parseable, transitions, reflections = [], [], 0, [], []
    for i in range(0, len(problems), batch_prompts):
        chunk = problems[i:i + batch_prompts]
        out = prerl.sample(model, tokenizer, chunk, cfg, n, [f"{cfg.seed}-analyze-{i + j}" for j in range(len(chunk))])
        golds = [p["answer"] for p in chunk for _ in range(n)]
        rewards = verify.rewards(out["texts"], golds)
        for j in range(len(chunk)):
            correct.append(int(sum(rewards[j * n:(j + 1) * n])))
        lengths += out["response_mask"].sum(1).tolist()
        for text in out["texts"]:
            parseable += verify.extract_answer(text) is not None
            t, r = count_behaviours(text)
            transitions.append(t)
            reflections.append(r)
    ks = [2 ** i for i in range(int(math.log2(n)) + 1)] + ([n] if n & (n - 1) else [])
    tokens = max(1, sum(lengths))
    return {
        "problems": len(problems), "samples_per_problem": n,
        "pass_at_k": {k: statistics.mean(pass_at_k(n, c, k) for c in correct) for k in ks},
        "avg_at_n": statistics.mean(c / n for c in correct),
        "mean_response_tokens": statistics.mean(lengths),
        "parseable_share": parseable / len(lengths),
        "transitions_per_response": statistics.mean(transitions),
        "reflections_per_response": statistics.mean(reflections),
        "transitions_per_1k_tokens": 1000 * sum(transitions) / tokens,
        "reflections_per_1k_tokens": 1000 * sum(reflections) / tokens,
    }


def print_eval_table(results):
    names = list(results)
    keys = [("avg@n", lambda r: r["avg_at_n"])] + [(f"pass@{k}", lambda r, k=k: r["pass_at_k"][k])
                                                   for k in results[names[0]]["pass_at_k"]]
    keys += [("mean response tokens", lambda r: r["mean_response_tokens"]),
             ("parseable answer share", lambda r: r["parseable_share"]),
             ("transitions / response", lambda r: r["transitions_per_response"]),
             ("reflections / response", lambda r: r["reflections_per_response"]),
             ("transitions / 1k tokens", lambda r: r["transitions_per_1k_tokens"]),
             ("reflections / 1k tokens", lambda r: r["reflections_per_1k_tokens"])]
    print("| metric | " + " | ".join(names) + (" | ratio |" if len(names) == 2 else " |"))
    print("|---" * (len(names) + 1 + (len(names) == 2)) + "|")
    for label, get in keys:
        values = [get(results[name]) for name in names]
        ratio = ""
        if len(names) == 2:
            ratio = f" {values[0] / values[1]:.2f}x |" if values[1] else " n/a |"
        print(f"| {label} | " + " | ".join(f"{v:.3f}" for v in values) + f" |{ratio}")


def command_eval(args, cfg):
    device = prerl.pick_device(cfg)
    problems = prerl.eval_problems(cfg)
    results = {}
    model, tokenizer = load_for_analysis(cfg.model, args.checkpoint, device)
    name = args.checkpoint or cfg.model
    results[name] = evaluate_samples(model, tokenizer, problems, cfg, args.n)
    if args.base:
        del model
        base_model, base_tokenizer = load_for_analysis(args.base, args.base_checkpoint, device)
        results[f"base: {args.base_checkpoint or args.base}"] = evaluate_samples(base_model, base_tokenizer, problems, cfg, args.n)
    sampling = "greedy" if cfg.temperature == 0 else f"T={cfg.temperature}, top-p={cfg.top_p}"
    print(f"\n{len(problems)} problems, n={args.n} samples each, {sampling}, max {cfg.max_new_tokens} new tokens\n")
    print_eval_table(results)
    if len(results) == 2:
        print("\n(the paper reports 14.89x transitions and 6.54x reflections after NSR-PreRL vs the base model)")
    with open(args.json, "w") as f:
        json.dump(results, f, indent=2)
    print(f"\nwritten: {args.json}")
    return results


# -----------------------------------------------------------------------------
# Gradient alignment: <grad log P(y), grad log P(y|x)>


def gradient_alignment(model, prompt_ids, prompt_mask, response_ids, response_mask, start_id):
    """Inner product and cosine of grad log P(y) and grad log P(y|x) for one response (batch of 1),
    and the mean per-token log-prob gap log P(y_t|x,.) - log P(y_t|s,.). Holds one gradient copy:
    the second backward's gradients are folded into the dot products parameter by parameter, as
    they are produced, and freed at once."""
    params = [p for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    conditional = prerl.conditional_logprobs(model, prompt_ids, prompt_mask, response_ids, response_mask)
    (conditional * response_mask).sum().backward()
    stored = {p: p.grad for p in params}
    for p in params:
        p.grad = None
    sums = {"dot": 0.0, "pre_sq": 0.0}

    def fold(p):
        g, c = p.grad, stored[p]
        if c is not None:
            sums["dot"] += float((g.double() * c.double()).sum())
        sums["pre_sq"] += float(g.double().pow(2).sum())
        p.grad = None

    hooks = [p.register_post_accumulate_grad_hook(fold) for p in params]
    try:
        pretrain = prerl.pretrain_logprobs(model, start_id, response_ids, response_mask)
        (pretrain * response_mask).sum().backward()
    finally:
        for h in hooks:
            h.remove()
    cond_sq = sum(float(g.double().pow(2).sum()) for g in stored.values() if g is not None)
    tokens = response_mask.sum()
    gap = float(((conditional - pretrain).detach() * response_mask).sum() / tokens)
    cosine = sums["dot"] / math.sqrt(max(sums["pre_sq"] * cond_sq, 1e-300))
    return {"inner_product": sums["dot"], "cosine": cosine, "logprob_gap_per_token": gap}


def command_align(args, cfg):
    device = prerl.pick_device(cfg)
    model, tokenizer = load_for_analysis(cfg.model, args.checkpoint, device)
    start_id, start_desc = prerl.start_token_id(tokenizer)
    problems = prerl.eval_problems(cfg)[:args.problems]
    batch = prerl.sample(model, tokenizer, problems, cfg, args.samples, [f"{cfg.seed}-align-{i}" for i in range(len(problems))])
    model.train()
    rows = []
    for i in range(len(batch["texts"])):
        resp, mask = prerl.trim(batch["response_ids"][i:i + 1], batch["response_mask"][i:i + 1], left=False)
        prompt, prompt_mask = prerl.trim(batch["prompt_ids"][i:i + 1], batch["prompt_mask"][i:i + 1], left=True)
        rows.append(gradient_alignment(model, prompt, prompt_mask, resp, mask, start_id))
    inner = [r["inner_product"] for r in rows]
    cosine = [r["cosine"] for r in rows]
    gap = [r["logprob_gap_per_token"] for r in rows]
    print(f"\n{len(rows)} responses ({len(problems)} problems x {args.samples}), start token {start_desc}\n")
    print("| quantity | mean | min | max | negative share | paper (Qwen3-4B, AMC23; secondary) |")
    print("|---|---|---|---|---|---|")
    print(f"| <grad log P(y), grad log P(y|x)> | {statistics.mean(inner):.4g} | {min(inner):.4g} | {max(inner):.4g} | "
          f"{sum(v < 0 for v in inner) / len(inner):.0%} | mean +9.23, min +0.94, 0% negative |")
    print(f"| cosine similarity | {statistics.mean(cosine):.3f} | {min(cosine):.3f} | {max(cosine):.3f} | "
          f"{sum(v < 0 for v in cosine) / len(cosine):.0%} | mean 0.44 |")
    print(f"| log P(y_t|x) - log P(y_t) per token | {statistics.mean(gap):.3f} | {min(gap):.3f} | {max(gap):.3f} | | |")
    with open(args.json, "w") as f:
        json.dump(rows, f, indent=2)
    print(f"\nwritten: {args.json}")
    return rows


# -----------------------------------------------------------------------------
# Statistics for multi-seed studies: Student t-intervals and steps to a threshold

# The 0.975 quantile of Student's t (two-sided 95%) for 1-30 degrees of freedom; beyond, the
# Cornish-Fisher expansion around the normal quantile (error < 1e-5 from 30 on).
T_975 = (12.706204736, 4.302652730, 3.182446305, 2.776445105, 2.570581836, 2.446911851, 2.364624252, 2.306004135,
         2.262157163, 2.228138852, 2.200985160, 2.178812830, 2.160368656, 2.144786688, 2.131449546, 2.119905299,
         2.109815578, 2.100922040, 2.093024054, 2.085963447, 2.079613845, 2.073873068, 2.068657610, 2.063898562,
         2.059538553, 2.055529439, 2.051830516, 2.048407142, 2.045229642, 2.042272456)


def t_quantile_975(df):
    if df < 1:
        raise ValueError(f"a t-interval needs at least 1 degree of freedom (2 values), got {df}")
    if df <= len(T_975):
        return T_975[df - 1]
    z = statistics.NormalDist().inv_cdf(0.975)
    return (z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3))


def mean_ci(values):
    """(mean, low, high): the Student t 95% interval mean +- t(0.975, n-1) * s / sqrt(n), s the sample
    standard deviation; it treats the seeds' results as normal draws. (mean, None, None) for one value."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, None, None
    half = t_quantile_975(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def steps_to_threshold(curve, threshold):
    """The first evaluated step at which held-out accuracy reaches threshold (0 when the start model
    already does); None when the run never reaches it. curve: [(step, accuracy)]; resolution: eval_every."""
    for step, accuracy in sorted(curve):
        if accuracy >= threshold:
            return step
    return None


# -----------------------------------------------------------------------------
# Mode comparison: K seeds per mode, each (mode, seed) a run in its own folder that resumes


def write_atomically(path, text):
    """Write a study file whole or not at all (temp file, then rename): an interrupted study never leaves
    a half-written result that a resume would trust."""
    temporary = f"{path}.tmp{os.getpid()}"
    with open(temporary, "w") as f:
        f.write(text)
    os.replace(temporary, path)


def study_data(cfg, out_dir):
    """The study's three problem sets, written once to out_dir/data so every run and every seed trains and
    evaluates on the same problems: train, validation (20% of the training side, by hash: chooses
    learning rates) and held-out (never trained on, never used to choose anything)."""
    folder = os.path.join(out_dir, "data")
    paths = {name: os.path.join(folder, f"{name}.jsonl") for name in ("train", "validation", "heldout")}
    if all(os.path.exists(p) for p in paths.values()):
        return paths
    heldout = prerl.eval_problems(cfg)
    if cfg.data:  # a held-out problem that is also in the training file is dropped from training
        pool = [p for p in prerl.load_problems(cfg.data) if p["problem"] not in {q["problem"] for q in heldout}]
    else:
        pool = prerl.make_problems(4096, cfg.tasks, cfg.difficulty, cfg.seed, held_out=False)
    sets = {"train": [p for p in pool if not is_validation(p["problem"])],
            "validation": [p for p in pool if is_validation(p["problem"])][:cfg.eval_size], "heldout": heldout}
    if not sets["train"]:
        raise SystemExit("error: compare: no training problems left once the held-out and validation sets are out")
    os.makedirs(folder, exist_ok=True)
    for name, problems in sets.items():
        write_atomically(paths[name], "".join(json.dumps(p) + "\n" for p in problems))
    return paths


# Options that change how fast runs go or where they report, never their results; a field that the
# saved study does not know (added to prerl.Config since) is not compared either.
NOT_IN_THE_RESULT = {"device", "plain", "micro_batch_tokens", "gradient_checkpointing", "save_every", "report_to"}


def study_precision(args, cfg):
    """cfg with --precision decided once for every run of the study (runs deciding for themselves could
    train in different precisions when the machine is busier for some): a study under way keeps the one
    in its study.json; a new one takes prerl's choice for this machine and model, said in one line."""
    path = os.path.join(args.out_dir, "study.json")
    saved = json.load(open(path)).get("precision") if os.path.exists(path) else None
    if cfg.precision != "auto" or saved == "auto":    # given, or a study begun when each run decided
        return cfg
    if saved in ("fp32", "bf16"):
        return dataclasses.replace(cfg, precision=saved)
    if prerl.PLAIN:
        return dataclasses.replace(cfg, precision="fp32")
    precision, why = machinery.choose_precision("auto", prerl.pick_device(cfg).type, shape=prerl.model_shape(cfg))
    print(f"precision {precision} for every run of the study: {why}", flush=True)
    return dataclasses.replace(cfg, precision=precision)


def check_study_options(args, cfg):
    """A study folder holds the runs of one set of options: resuming it with others (more seeds or modes
    aside) would mix runs that are not comparable, so that is refused."""
    options = {**vars(cfg), "train_temperature": args.train_temperature, "train_top_p": args.train_top_p, "n": args.n,
               "lr_sweep": args.lr_sweep}
    path = os.path.join(args.out_dir, "study.json")
    if os.path.exists(path):
        saved = json.load(open(path))
        changed = sorted(k for k in set(saved) & set(options) - NOT_IN_THE_RESULT if saved[k] != options[k])
        if changed:
            raise SystemExit(f"error: {args.out_dir} holds a study with other options ({', '.join(changed)}); "
                             f"use another --out-dir, or the same options to resume it")
        return
    os.makedirs(args.out_dir, exist_ok=True)
    write_atomically(path, json.dumps(options, indent=2))


def is_validation(problem_text):
    """A fixed fifth of the training side, by a hash salted differently from prerl.is_held_out."""
    return int(hashlib.sha256(("validation:" + problem_text).encode()).hexdigest(), 16) % 5 == 0


def run_cfg_for(cfg, args, mode, lr, seed, train_path, eval_path, out_dir):
    return prerl.Config(**{**vars(cfg), "mode": mode, "lr": lr, "seed": seed, "data": train_path, "eval_data": eval_path,
                           "out_dir": out_dir, "resume": True,
                           "temperature": args.train_temperature, "top_p": args.train_top_p})


def run_folder(out_dir, mode, lr, seed):
    return os.path.join(out_dir, mode, f"lr{lr:g}", f"seed{seed}")


def study_run(cfg, args, mode, lr, seed, data, validate, n_samples):
    """One (mode, lr, seed) run in its folder: trains on data["train"] with the greedy held-out curve, then
    scores what is asked and missing: greedy accuracy on data["validation"] (validate: the lr sweep
    chooses on it) and pass@k from n_samples per held-out problem. A finished run (result.json) is read,
    not redone; an interrupted one resumes from its last checkpoint (every --save-every steps)."""
    out_dir = run_folder(args.out_dir, mode, lr, seed)
    result_path = os.path.join(out_dir, "result.json")
    run_cfg = run_cfg_for(cfg, args, mode, lr, seed, data["train"], data["heldout"], out_dir)
    if os.path.exists(result_path):
        result = json.load(open(result_path))
    else:
        start = time.perf_counter()
        accuracy = prerl.train(run_cfg)
        metrics = prerl.read_metrics(os.path.join(out_dir, "metrics.jsonl"))
        curve = held_out_curve(start_accuracy(cfg, data["heldout"]), metrics, cfg.steps, accuracy["after"])
        result = {"mode": mode, "lr": lr, "seed": seed, "curve": curve, "metrics": metrics,
                  "step_seconds": mean_step_seconds(metrics), "train_seconds": time.perf_counter() - start}
    wanted = {"validation": validate, "eval": bool(n_samples)}
    missing = [key for key, asked in wanted.items() if asked and key not in result]
    if missing:
        checkpoint = os.path.join(out_dir, "checkpoint.pt")
        if not os.path.exists(checkpoint):
            raise SystemExit(f"error: {out_dir}: needs its {' and '.join(missing)} scores but its weights were removed "
                             f"(a learning rate the sweep did not choose); use the same --lr-sweep, or another --out-dir")
        model, tokenizer = load_for_analysis(cfg.model, checkpoint, prerl.pick_device(cfg))
        if "validation" in missing:
            result["validation"] = prerl.evaluate(model, tokenizer, prerl.load_problems(data["validation"]), run_cfg)
        if "eval" in missing:   # sampled as for the base model (cfg's T and top-p), not at the training T
            eval_cfg = dataclasses.replace(run_cfg, temperature=cfg.temperature, top_p=cfg.top_p)
            result["eval"] = evaluate_samples(model, tokenizer, prerl.load_problems(data["heldout"]), eval_cfg, n_samples)
        del model
    if missing or not os.path.exists(result_path):
        write_atomically(result_path, json.dumps(result))
    return json.load(open(result_path))   # read back: a resumed study sees exactly what a fresh one sees


def held_out_curve(start, metrics, steps, final):
    """A run's greedy held-out accuracy as (step, accuracy) points, each at the number of optimizer steps
    the weights it measured had taken: the start model at 0, the evaluation logged by record step s (made
    after that step's update) at s + 1, the final one at --steps."""
    return [(0, start)] + [(m["step"] + 1, m["eval_accuracy"]) for m in metrics if "eval_accuracy" in m] + [(steps, final)]


def mean_step_seconds(metrics):
    """Wall seconds of a step, averaged over a run's records: sampling, scoring, diagnostics and the update."""
    return statistics.mean(m["sample_s"] + m["score_s"] + m["diagnose_s"] + m["train_s"] for m in metrics)


def start_accuracy(cfg, eval_path, loaded=None):
    """Greedy accuracy of the start model on an eval set: step 0 of every run's curve (the same for every
    mode and seed, so computed once and kept beside the set; a resumed run never saw its own step 0).
    loaded: the start model's (model, tokenizer) when the caller has it already."""
    path = eval_path + ".start_accuracy.json"
    if not os.path.exists(path):
        model, tokenizer = loaded or load_for_analysis(cfg.model, None, prerl.pick_device(cfg))
        write_atomically(path, json.dumps(prerl.evaluate(model, tokenizer, prerl.load_problems(eval_path), cfg)))
    return json.load(open(path))


def choose_lr(results):
    """results: {lr: the first seed's run at lr}. The lr whose run scores best on the validation split
    (greedy accuracy after training), ties to the better mean training accuracy over the last quarter of
    its steps (its own samples), then to the smaller lr. The held-out curve is never looked at."""
    def score(lr):
        metrics = results[lr]["metrics"]
        late = [m["accuracy"] for m in metrics[len(metrics) * 3 // 4:]]
        return results[lr]["validation"], statistics.mean(late), -lr
    return max(results, key=score)


# -----------------------------------------------------------------------------
# Running a study's runs: in this process, or --jobs N at once in worker processes


def worker_init(threads):
    import torch
    torch.set_num_threads(threads)


def study_run_logged(job):
    """study_run in a worker process, its printout (progress bars included) to log.txt in the run's folder."""
    args, mode, lr, seed = job[1:5]
    out_dir = run_folder(args.out_dir, mode, lr, seed)
    os.makedirs(out_dir, exist_ok=True)
    sys.stdout.flush(), sys.stderr.flush()
    with open(os.path.join(out_dir, "log.txt"), "a") as log:
        os.dup2(log.fileno(), 1), os.dup2(log.fileno(), 2)
        return study_run(*job)


def execute(first_jobs, follow_up, workers):
    """Run first_jobs, and as each finishes the jobs follow_up(job, result) returns. workers > 1: that many
    worker processes, each with its share of this process's torch threads (small models decode faster
    as two 1-thread processes than as one 2-thread process); a run's numbers can then differ from a
    --jobs 1 run's in the last bits (another thread count, another summation order)."""
    if workers == 1:
        queue = list(first_jobs)
        while queue:
            job = queue.pop(0)
            queue[:0] = follow_up(job, study_run(*job))   # a mode's runs together
        return
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    threads = max(1, prerl.torch.get_num_threads() // workers)
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=worker_init,
                               initargs=(threads,))
    try:
        pending = {pool.submit(study_run_logged, job): job for job in first_jobs}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                job = pending.pop(future)
                pending.update({pool.submit(study_run_logged, j): j for j in follow_up(job, future.result())})
    finally:   # a failed run stops the study: queued runs are dropped, running ones finish first
        pool.shutdown(wait=True, cancel_futures=True)


def summarize(runs, threshold, budget):
    """Per mode: mean and 95% t-interval over seeds of pass@1, pass@k, the final greedy accuracy and the
    steps to the threshold; steps_reached counts the seeds that got there at all."""
    rows = {}
    for mode, results in runs.items():
        k_max = max(results[0]["eval"]["pass_at_k"], key=int)
        steps = [steps_to_threshold(r["curve"], threshold) for r in results]
        reached = [s for s in steps if s is not None]
        rows[mode] = {"lr": results[0]["lr"], "seeds": [r["seed"] for r in results], "k": int(k_max),
                      "pass@1": mean_ci([r["eval"]["pass_at_k"]["1"] for r in results]),
                      "pass@k": mean_ci([r["eval"]["pass_at_k"][k_max] for r in results]),
                      "greedy": mean_ci([r["curve"][-1][1] for r in results]),
                      "steps": mean_ci(reached) if len(reached) == len(steps) else None,
                      "steps_lower_bound": statistics.mean(budget if s is None else s for s in steps),
                      "steps_reached": len(reached), "budget": budget,
                      "step_seconds": statistics.mean(r["step_seconds"] for r in results)}
    return rows


def format_ci(value, lowest=0.0, highest=1.0, digits=3, sign=""):
    """mean [low, high], the interval cut to the range the quantity can take (an accuracy to [0, 1]): a
    t-interval of 3 seeds near the top can leave it. The study's JSON keeps the uncut interval."""
    mean, low, high = value
    text = f"{mean:{sign}.{digits}f}"
    if low is None:
        return text
    return text + f" [{max(low, lowest):{sign}.{digits}f}, {min(high, highest):{sign}.{digits}f}]"


def paired_differences(runs, reference):
    """Per mode but reference: mean and 95% t-interval over seeds of the per-seed difference (mode minus
    reference) in pass@1 and in the final greedy accuracy, over the seeds both ran. A seed fixes the
    batches, their order and the first step's samples for every mode, so pairing by seed removes that
    share of the spread."""
    by_seed = {r["seed"]: r for r in runs[reference]}
    differences = {}
    for mode, results in runs.items():
        pairs = [(r, by_seed[r["seed"]]) for r in results if r["seed"] in by_seed]
        if mode == reference or not pairs:
            continue
        differences[mode] = {"seeds": len(pairs),
                             "pass@1": mean_ci([a["eval"]["pass_at_k"]["1"] - b["eval"]["pass_at_k"]["1"] for a, b in pairs]),
                             "greedy": mean_ci([a["curve"][-1][1] - b["curve"][-1][1] for a, b in pairs])}
    return differences


def format_differences(differences, reference):
    lines = ["| paired by seed | pass@1 difference | greedy held-out acc. difference |", "|---|---|---|"]
    for mode, d in differences.items():
        lines.append(f"| {mode} - {reference} ({d['seeds']} seeds) | {format_ci(d['pass@1'], -1, 1, sign='+')} | "
                     f"{format_ci(d['greedy'], -1, 1, sign='+')} |")
    return "\n".join(lines)


def format_table(rows, threshold, base=None):
    """The study's markdown table: mean [95% t-interval, cut to the possible range] over seeds."""
    k = next(iter(rows.values()))["k"]
    lines = [f"| mode | lr | seeds | pass@1 | pass@{k} | greedy held-out acc. | steps to {threshold:g} |",
             "|---|---|---|---|---|---|---|"]
    if base:
        lines.append(f"| base model | - | - | {base['pass_at_k']['1']:.3f} | {base['pass_at_k'][str(k)]:.3f} | "
                     f"{base['greedy']:.3f} | - |")
    for mode, r in rows.items():
        if r["steps"] is not None:
            steps = format_ci(r["steps"], 0, r["budget"], digits=1)
        else:
            steps = f">= {r['steps_lower_bound']:.1f} ({r['steps_reached']}/{len(r['seeds'])} reached)"
        lines.append(f"| {mode} | {r['lr']:g} | {len(r['seeds'])} | {format_ci(r['pass@1'])} | {format_ci(r['pass@k'])} | "
                     f"{format_ci(r['greedy'])} | {steps} |")
    return "\n".join(lines)


DIAGNOSTICS = ("entropy", "logp_y_right", "logp_y_wrong", "logp_y_given_x_right", "logp_y_given_x_wrong",
               "eos_share", "response_length", "reflections", "transitions")


def diagnostics_table(runs):
    """Per mode and diagnostic: the seed mean at the first and at the last step that logged it."""
    lines = ["| mode | " + " | ".join(DIAGNOSTICS) + " |", "|---" * (len(DIAGNOSTICS) + 1) + "|"]
    for mode, results in runs.items():
        cells = []
        for key in DIAGNOSTICS:
            ends = []
            for pick in (0, -1):
                values = []
                for r in results:
                    logged = [m[key] for m in r["metrics"] if m.get(key) is not None]
                    if logged:
                        values.append(logged[pick])
                ends.append(f"{statistics.mean(values):.3g}" if values else "-")
            cells.append(" -> ".join(ends))
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def command_compare(args, cfg):
    modes = args.modes.split(",")
    for mode in modes:
        if mode not in prerl.MODES:
            raise SystemExit(f"error: --modes: unknown mode {mode!r}; choose from {', '.join(prerl.MODES)}")
    if args.seeds < 1:
        raise SystemExit(f"error: --seeds {args.seeds}: give at least 1")
    if args.jobs < 1:
        raise SystemExit(f"error: --jobs {args.jobs}: give at least 1 (runs at once)")
    try:
        grid = [float(v) for v in args.lr_sweep.split(",")] if args.lr_sweep else []
    except ValueError:
        raise SystemExit(f"error: --lr-sweep {args.lr_sweep!r}: give learning rates separated by commas, e.g. 1e-5,2e-5,5e-5") from None
    if grid and (len(set(grid)) != len(grid) or min(grid) <= 0):
        raise SystemExit(f"error: --lr-sweep {args.lr_sweep!r}: give distinct positive learning rates")
    start = time.perf_counter()
    cfg = study_precision(args, cfg)
    check_study_options(args, cfg)
    data = study_data(cfg, args.out_dir)
    if grid and os.path.getsize(data["validation"]) == 0:
        raise SystemExit("error: --lr-sweep: the validation split is empty; give more training problems")
    # the start model, loaded once: its pass@k, and its greedy accuracy (step 0 of every run's curve,
    # computed before any run starts)
    base_path = os.path.join(args.out_dir, "base.json")
    if not os.path.exists(base_path):
        model, tokenizer = load_for_analysis(cfg.model, None, prerl.pick_device(cfg))
        base = evaluate_samples(model, tokenizer, prerl.load_problems(data["heldout"]), cfg, args.n)
        base["greedy"] = start_accuracy(cfg, data["heldout"], (model, tokenizer))
        del model
        write_atomically(base_path, json.dumps(base))
    base = json.load(open(base_path))

    # Each mode: first seed at every lr of the grid (without a sweep, the grid is --lr alone), then the
    # chosen lr's first-seed run (already trained) gets its pass@k and the other seeds train at that lr.
    seeds, lrs = [cfg.seed + i for i in range(args.seeds)], grid or [cfg.lr]
    results, chosen, total = {}, {}, len(modes) * (len(lrs) + len(seeds) - 1)

    def job(mode, lr, seed, validate, n_samples):
        return (cfg, args, mode, lr, seed, data, validate, n_samples)

    def follow_up(finished, result):
        mode, lr, seed = finished[2:5]
        new = (mode, lr, seed) not in results
        results[(mode, lr, seed)] = result
        if new:
            end = f", validation {result['validation']:.3f}" if "validation" in result else ""
            print(f"[{len(results)}/{total}] {mode} lr {lr:g} seed {seed}: held-out {result['curve'][0][1]:.3f} -> "
                  f"{result['curve'][-1][1]:.3f}{end} ({result.get('train_seconds', 0) / 60:.1f} min)", flush=True)
        if mode in chosen or any((mode, other, seeds[0]) not in results for other in lrs):
            return []
        chosen[mode] = choose_lr({other: results[(mode, other, seeds[0])] for other in lrs}) if grid else cfg.lr
        for other in lrs:  # the runs the sweep did not choose are done with: free their weights (1-2 GB each)
            if other != chosen[mode]:
                folder = run_folder(args.out_dir, mode, other, seeds[0])
                shutil.rmtree(os.path.join(folder, "model"), ignore_errors=True)
                if os.path.exists(os.path.join(folder, "checkpoint.pt")):
                    os.remove(os.path.join(folder, "checkpoint.pt"))
        first = results[(mode, chosen[mode], seeds[0])]   # trained already; scored for pass@k unless it was
        return [job(mode, chosen[mode], seed, bool(grid) and seed == seeds[0], args.n)
                for seed in seeds if seed != seeds[0] or "eval" not in first]

    execute([job(mode, lr, seeds[0], bool(grid), 0 if grid else args.n) for mode in modes for lr in lrs],
            follow_up, args.jobs)
    runs = {mode: [results[(mode, chosen[mode], seed)] for seed in seeds] for mode in modes}
    sweep = {mode: {f"{lr:g}": results[(mode, lr, seeds[0])]["validation"] for lr in grid} for mode in modes} if grid else {}
    rows = summarize(runs, args.threshold, cfg.steps)
    wall = time.perf_counter() - start
    print(f"\n{len(modes)} modes x {len(seeds)} seeds ({', '.join(map(str, seeds))}), {cfg.steps} steps x "
          f"{cfg.prompts_per_step} prompts x G={cfg.group_size}, T={args.train_temperature}; held-out: "
          f"{len(prerl.load_problems(data['heldout']))} problems, pass@k from n={args.n} at T={cfg.temperature}, "
          f"top-p {cfg.top_p}; mean [95% Student t-interval over seeds, cut to the possible range]")
    if sweep:
        print("lr chosen on the validation split (greedy accuracy after training, first seed): " +
              "; ".join(f"{mode} {chosen[mode]:g} of {sweep[mode]}" for mode in modes))
    table = format_table(rows, args.threshold, base)
    reference = "grpo" if "grpo" in runs else modes[0]
    differences = paired_differences(runs, reference)
    print("\n" + table + "\n\n" + (format_differences(differences, reference) + "\n\n" if differences else "") +
          diagnostics_table(runs) + "\n")
    print("mean seconds per step: " + ", ".join(f"{mode} {r['step_seconds']:.1f}" for mode, r in rows.items()) +
          f"; study wall time this invocation: {wall:.0f} s ({wall / 60:.1f} min, --jobs {args.jobs})")
    summary = {"rows": rows, "table": table, "differences": differences, "lr": chosen, "sweep": sweep, "base": base,
               "wall_seconds": wall, "threshold": args.threshold, "jobs": args.jobs,
               "runs": runs}   # every chosen run: its held-out curve, pass@k and per-step metrics
    write_atomically(args.json, json.dumps(summary, indent=1))
    print(f"written: {args.json}")
    if args.plot:
        plot_curves(runs, args.plot, cfg.switch_step if "dsrl" in runs else None)
    return summary


def curve_band(results):
    """Steps, and the mean and 95% t-interval of the seeds' greedy held-out accuracy at each step."""
    steps = sorted({step for r in results for step, _ in r["curve"]})
    at = [[a for r in results for s, a in r["curve"] if s == step] for step in steps]
    return steps, [mean_ci(values) for values in at]


def plot_curves(runs, path, switch_step=None):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot: matplotlib is not installed (pip install matplotlib); no plot written")
        return
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for mode, results in runs.items():
        steps, cis = curve_band(results)
        line, = axes.plot(steps, [c[0] for c in cis], marker="o", label=f"{mode} ({len(results)} seeds)")
        if all(c[1] is not None for c in cis):
            axes.fill_between(steps, [c[1] for c in cis], [c[2] for c in cis], color=line.get_color(), alpha=0.2)
    if switch_step is not None:
        axes.axvline(switch_step, color="gray", linestyle="--", linewidth=1, label=f"DSRL's switch (step {switch_step})")
    axes.set_ylim(-0.02, 1.02)           # a t-band of few seeds can leave [0, 1]; accuracy cannot
    axes.set_xlabel("step")
    axes.set_ylabel("held-out accuracy (greedy), mean and 95% CI")
    axes.legend()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    print(f"plot: {path}")


# -----------------------------------------------------------------------------
# What the model wrote: python analyze.py samples OUT_DIR --step S (from OUT_DIR/samples.jsonl)


def format_samples(groups, width=400):
    """samples.jsonl groups as text: the problem and gold, then each response with its extracted
    answer, reward, length and whether it was cut at --max-new-tokens (long responses shortened)."""
    lines = []
    for group in groups:
        lines.append(f"=== step {group['step']} | gold {group['gold']!r} | {group['problem']}")
        for k, r in enumerate(group["responses"]):
            text = r["text"] if len(r["text"]) <= width else r["text"][:width // 2] + " [...] " + r["text"][-width // 2:]
            lines.append(f"--- response {k}: reward {r['reward']:g} | answer {r['answer']!r} | {r['length']} tokens"
                         + (" | cut at --max-new-tokens" if r["cut"] else ""))
            lines.append(text)
        for case in group.get("audit") or []:
            lines.append(f"--- audit: {case}")
    return "\n".join(lines)


def command_samples(args, cfg):
    path = os.path.join(args.run_dir, "samples.jsonl")
    if not args.run_dir or not os.path.isfile(path):
        raise SystemExit(f"error: analyze.py samples OUT_DIR: no samples.jsonl in {args.run_dir!r}")
    groups = prerl.read_metrics(path)
    steps = sorted({g["step"] for g in groups})
    if not steps:
        raise SystemExit(f"error: {path} holds no samples (was the run's --log-samples 0?)")
    step = steps[-1] if args.step < 0 else args.step
    if step not in steps:
        raise SystemExit(f"error: --step {step}: {path} holds steps {steps[0]}..{steps[-1]}")
    chosen = [g for g in groups if g["step"] == step]
    print(format_samples(chosen))
    return chosen


# -----------------------------------------------------------------------------
# One run's curves: python analyze.py plot OUT_DIR


PLOT_PANELS = [("reward_mean", "reward (train samples)"), ("eval_accuracy", "held-out accuracy"),
               ("response_length", "response length (tokens)"), ("grad_norm", "gradient norm (before clipping)")]


def command_plot(args, cfg):
    """Reward, held-out accuracy, response length and gradient norm per step, with DSRL's switch (the
    step where the stage changes) and skipped non-finite steps marked, from OUT_DIR/metrics.jsonl."""
    path = os.path.join(args.run_dir, "metrics.jsonl")
    if not args.run_dir or not os.path.isfile(path):
        raise SystemExit(f"error: analyze.py plot OUT_DIR: no metrics.jsonl in {args.run_dir!r}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("error: analyze.py plot needs matplotlib, which is not installed: pip install matplotlib") from None
    metrics = prerl.read_metrics(path)
    switches = [m["step"] for prev, m in zip(metrics, metrics[1:]) if m.get("stage") != prev.get("stage")]
    figure, axes = plt.subplots(len(PLOT_PANELS), 1, figsize=(7, 2.2 * len(PLOT_PANELS)), sharex=True)
    for ax, (key, label) in zip(axes, PLOT_PANELS):
        # eval_accuracy is measured after step s's update: drawn at s + 1, like the run's printout
        points = [(m["step"] + (key == "eval_accuracy"), m[key]) for m in metrics if m.get(key) is not None]
        if points:
            ax.plot(*zip(*points), marker="o" if key == "eval_accuracy" else None, markersize=3)
        else:
            ax.text(0.5, 0.5, "not in this run's metrics", ha="center", va="center", transform=ax.transAxes)
        for step in switches:
            ax.axvline(step, color="gray", linestyle="--", linewidth=1)
        for m in metrics:
            if m.get("skipped"):
                ax.axvline(m["step"], color="red", alpha=0.3)
        ax.set_ylabel(label, fontsize=8)
    axes[0].set_title(f"{args.run_dir}" + (f" (dashed: stage switch at step {', '.join(map(str, switches))})" if switches else ""),
                      fontsize=9)
    axes[-1].set_xlabel("step")
    figure.tight_layout()
    out = args.plot or os.path.join(args.run_dir, "metrics.png")
    figure.savefig(out, dpi=110)
    plt.close(figure)
    print(f"plot: {out} ({len(metrics)} steps)")
    return out


# -----------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["eval", "align", "compare", "plot", "samples"])
    parser.add_argument("run_dir", nargs="?", default="", help="plot, samples: a run's --out-dir (holds metrics.jsonl)")
    parser.add_argument("--step", type=int, default=-1, help="samples: the step to show (default: the last)")
    parser.add_argument("--checkpoint", default="", help="weights from one of our checkpoint.pt files")
    parser.add_argument("--base", default="", help="eval: a second model to compare against (e.g. embedded)")
    parser.add_argument("--base-checkpoint", default="", help="eval: weights for --base")
    parser.add_argument("--n", type=int, default=8, help="samples per problem (eval, compare)")
    parser.add_argument("--greedy", action="store_true", help="eval: greedy decoding (forces --n 1)")
    parser.add_argument("--problems", type=int, default=8, help="align: problems")
    parser.add_argument("--samples", type=int, default=4, help="align: responses per problem")
    parser.add_argument("--modes", default="grpo,nsr,nsr-prerl,dsrl", help="compare: modes to train")
    parser.add_argument("--plot", default="", help="compare, plot: the PNG to write (needs matplotlib)")
    parser.add_argument("--out-dir", default="runs/compare", help="compare: one sub-folder per mode and seed")
    parser.add_argument("--seeds", type=int, default=1, help="compare: runs per mode, seeds --seed, --seed + 1, ...")
    parser.add_argument("--threshold", type=float, default=0.5, help="compare: held-out accuracy for steps-to-threshold")
    parser.add_argument("--lr-sweep", default="", help="compare: learning rates, e.g. 5e-6,2e-5,5e-5; each mode "
                        "trains at the one with the best validation accuracy (its first seed once per lr)")
    parser.add_argument("--train-temperature", type=float, default=0.7, help="compare: sampling during training")
    parser.add_argument("--train-top-p", type=float, default=1.0, help="compare: nucleus during training")
    parser.add_argument("--jobs", type=int, default=1, help="compare: runs at once, each in its own process with "
                        "its share of the CPU threads (2 on a 2-core CPU: ~1.3x the throughput of one run)")
    parser.add_argument("--json", default="", help="where the results go (default: <command>.json)")
    # prerl.py's options that matter here; NSR paper's evaluation sampling by default
    shared = {"model": prerl.EMBEDDED_MODEL, "device": "auto", "data": "", "eval_data": "", "tasks": "add,mul",
              "difficulty": 1, "eval_size": 32, "max_new_tokens": 48, "temperature": 0.6, "top_p": 0.95, "seed": 0,
              "steps": 10, "switch_step": 5, "lr": 2e-5, "prompts_per_step": 8, "group_size": 4, "eval_every": 5,
              "diagnose_every": 5, "save_every": 5, "precision": "auto"}
    for name, default in shared.items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(default), default=default,
                            help=f"as in prerl.py (default: {default!r})")
    args = parser.parse_args(argv)
    args.json = args.json or f"{args.command}.json"
    if args.greedy:
        args.temperature, args.n = 0.0, 1
    cfg = prerl.Config(**{name: getattr(args, name) for name in shared})
    if cfg.eval_data == "" and args.data and args.command != "compare":
        cfg.eval_data = args.data  # eval/align: --data is the set to measure on
    return args, cfg


def main(argv=None):
    args, cfg = parse_args(argv)
    commands = {"eval": command_eval, "align": command_align, "compare": command_compare, "plot": command_plot,
                "samples": command_samples}
    return commands[args.command](args, cfg)


if __name__ == "__main__":
    main()
