"""
analyze.py -- the paper's measurements on your own model: pass@k and reasoning behaviours, gradient
alignment between P(y) and P(y|x), and a side-by-side comparison of training modes.

    python analyze.py eval                                   # embedded default, built-in held-out set
    python analyze.py eval --checkpoint runs/prerl/checkpoint.pt --base embedded --n 8
    python analyze.py eval --model Qwen/Qwen2.5-Math-1.5B --data amc23.jsonl --n 32 --max-new-tokens 2048
    python analyze.py align --problems 8 --samples 4         # <grad log P(y), grad log P(y|x)>
    python analyze.py compare --modes grpo,nsr,nsr-prerl,dsrl --steps 10 --plot compare.png
    python analyze.py eval --model runs/prerl/model              # the folder a run exports (any tool loads it)
    python analyze.py plot runs/prerl                            # a run's curves -> runs/prerl/metrics.png

Every command also takes the model and data options of prerl.py that make sense for it (--model,
--data, --eval-size, --tasks, --difficulty, --max-new-tokens, --seed, ...); --help lists them.
"""

import argparse
import json
import math
import os
import re
import statistics
import time

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


# -----------------------------------------------------------------------------
# Evaluation


def load_for_analysis(model_name, checkpoint_path, device):
    """A model by hub id / folder / 'embedded', optionally with the weights of one of our checkpoints."""
    model, tokenizer = prerl.load_model(model_name, device)
    if checkpoint_path:
        prerl.load_checkpoint(checkpoint_path, model)
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
# Mode comparison


def command_compare(args, cfg):
    modes = args.modes.split(",")
    for mode in modes:
        if mode not in prerl.MODES:
            raise SystemExit(f"error: --modes: unknown mode {mode!r}; choose from {', '.join(prerl.MODES)}")
    device = prerl.pick_device(cfg)
    problems = prerl.eval_problems(cfg)
    model, tokenizer = load_for_analysis(cfg.model, None, device)
    results = {"base": {"eval": evaluate_samples(model, tokenizer, problems, cfg, args.n), "seconds": 0.0}}
    del model
    for mode in modes:
        run_cfg = prerl.Config(**{**vars(cfg), "mode": mode, "out_dir": os.path.join(args.out_dir, mode), "resume": False})
        start = time.perf_counter()
        prerl.train(run_cfg)
        seconds = time.perf_counter() - start
        model, tokenizer = load_for_analysis(cfg.model, os.path.join(run_cfg.out_dir, "checkpoint.pt"), device)
        metrics = prerl.read_metrics(os.path.join(run_cfg.out_dir, "metrics.jsonl"))
        results[mode] = {"eval": evaluate_samples(model, tokenizer, problems, cfg, args.n), "seconds": seconds,
                         "curve": [(m["step"] + 1, m["eval_accuracy"]) for m in metrics if "eval_accuracy" in m]}
        del model
    k_max = max(results["base"]["eval"]["pass_at_k"])
    print(f"\n{cfg.steps} steps x {cfg.prompts_per_step} prompts x G={cfg.group_size}, seed {cfg.seed}; "
          f"eval: {len(problems)} held-out problems, n={args.n}, T={cfg.temperature}\n")
    print(f"| run | pass@1 | pass@{k_max} | mean tokens | transitions / resp | reflections / resp | wall time |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        e = r["eval"]
        print(f"| {name} | {e['pass_at_k'][1]:.3f} | {e['pass_at_k'][k_max]:.3f} | {e['mean_response_tokens']:.1f} | "
              f"{e['transitions_per_response']:.3f} | {e['reflections_per_response']:.3f} | {r['seconds']:.0f} s |")
    with open(args.json, "w") as f:
        json.dump(results, f, indent=2)
    print(f"\nwritten: {args.json}")
    if args.plot:
        plot_curves(results, args.plot)
    return results


def plot_curves(results, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot: matplotlib is not installed (pip install matplotlib); no plot written")
        return
    for name, r in results.items():
        if r.get("curve"):
            steps, accuracy = zip(*r["curve"])
            plt.plot(steps, accuracy, marker="o", label=name)
    plt.xlabel("step")
    plt.ylabel("held-out accuracy (greedy)")
    plt.legend()
    plt.savefig(path, dpi=120)
    print(f"plot: {path}")


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
    parser.add_argument("command", choices=["eval", "align", "compare", "plot"])
    parser.add_argument("run_dir", nargs="?", default="", help="plot: a run's --out-dir (holds metrics.jsonl)")
    parser.add_argument("--checkpoint", default="", help="weights from one of our checkpoint.pt files")
    parser.add_argument("--base", default="", help="eval: a second model to compare against (e.g. embedded)")
    parser.add_argument("--base-checkpoint", default="", help="eval: weights for --base")
    parser.add_argument("--n", type=int, default=8, help="samples per problem (eval, compare)")
    parser.add_argument("--greedy", action="store_true", help="eval: greedy decoding (forces --n 1)")
    parser.add_argument("--problems", type=int, default=8, help="align: problems")
    parser.add_argument("--samples", type=int, default=4, help="align: responses per problem")
    parser.add_argument("--modes", default="grpo,nsr,nsr-prerl,dsrl", help="compare: modes to train")
    parser.add_argument("--plot", default="", help="compare, plot: the PNG to write (needs matplotlib)")
    parser.add_argument("--out-dir", default="runs/compare", help="compare: one sub-folder per mode")
    parser.add_argument("--json", default="", help="where the results go (default: <command>.json)")
    # prerl.py's options that matter here; NSR paper's evaluation sampling by default
    shared = {"model": prerl.EMBEDDED_MODEL, "device": "auto", "data": "", "eval_data": "", "tasks": "add,mul",
              "difficulty": 1, "eval_size": 32, "max_new_tokens": 48, "temperature": 0.6, "top_p": 0.95, "seed": 0,
              "steps": 10, "switch_step": 5, "lr": 2e-5, "prompts_per_step": 8, "group_size": 4, "eval_every": 5}
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
    commands = {"eval": command_eval, "align": command_align, "compare": command_compare, "plot": command_plot}
    return commands[args.command](args, cfg)


if __name__ == "__main__":
    main()
