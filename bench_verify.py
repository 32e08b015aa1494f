"""
bench_verify.py -- accuracy and latency of verify.py on the development data in ../shared/data.

    python bench_verify.py                  # needs ../shared/data (not shipped with the repo)
    python bench_verify.py --data DIR       # or point it at a folder with the same files

Prints: accuracy on verify_dev_cases.jsonl (misses listed), on the MATH answers the rate at which
reward("... \\boxed{a}", a) is 1.0, the false-positive rate on pairs of different answers, per-call
latency median / p99, and batch throughput of rewards().
"""

import argparse
import json
import os
import random
import statistics
import sys
import time

import verify


def load_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "data"))
    parser.add_argument("--pairs", type=int, default=5000, help="random pairs for the false-positive rate")
    args = parser.parse_args()
    if not os.path.isdir(args.data):
        sys.exit(f"bench_verify.py: no data folder at {args.data} (pass --data DIR)")
    verify.warmup()
    latencies = []

    # 1. labelled development cases
    cases = load_jsonl(os.path.join(args.data, "verify_dev_cases.jsonl"))
    misses = []
    for case in cases:
        got, seconds = timed(verify.is_equiv, case["pred"], case["gold"])
        latencies.append(seconds)
        if got != case["expected"]:
            misses.append(case)
    print(f"dev cases: {len(cases) - len(misses)}/{len(cases)} = {100 * (1 - len(misses) / len(cases)):.1f}% correct")
    for case in misses:
        print(f"  miss: gold={case['gold']!r} pred={case['pred']!r} expected={case['expected']}")

    # 2. MATH answers against themselves, inside a boxed completion
    answers = [row["answer"] for row in load_jsonl(os.path.join(args.data, "math_train.jsonl"))]
    self_misses = []
    for answer in answers:
        got, seconds = timed(verify.reward, f"Some reasoning... so the result is \\boxed{{{answer}}}.", answer)
        latencies.append(seconds)
        if got != 1.0:
            self_misses.append(answer)
    rate = 1 - len(self_misses) / len(answers)
    print(f"MATH self-match: {100 * rate:.2f}% of {len(answers)} (target >= 99.5%)")
    for answer in self_misses[:20]:
        print(f"  not matched: {answer!r}")

    # 3. false positives: random pairs of answers whose strings differ
    rng = random.Random(0)
    distinct = sorted(set(answers))
    false_positives, pairs = [], 0
    while pairs < args.pairs:
        a, b = rng.sample(distinct, 2)
        pairs += 1
        got, seconds = timed(verify.reward, f"\\boxed{{{a}}}", b)
        latencies.append(seconds)
        if got == 1.0:
            false_positives.append((a, b))
    print(f"different-answer pairs judged equal: {len(false_positives)}/{pairs} = "
          f"{100 * len(false_positives) / pairs:.2f}% (target <= 0.2%; each listed for review)")
    for a, b in false_positives:
        print(f"  equal? {a!r} vs {b!r}")

    # 4. latency and batch throughput
    latencies.sort()
    p99 = latencies[int(0.99 * (len(latencies) - 1))]
    print(f"per-call latency over {len(latencies)} calls: median {1000 * statistics.median(latencies):.3f} ms, "
          f"p99 {1000 * p99:.2f} ms, max {1000 * latencies[-1]:.1f} ms (targets <= 1 ms, <= 20 ms)")
    completions = [f"We compute step by step and get \\boxed{{{a}}}." for a in answers]
    golds = answers[1:] + answers[:1]
    _, seconds = timed(verify.rewards, completions, golds)
    print(f"batch rewards(): {len(completions)} calls in {seconds:.2f} s = {len(completions) / seconds:.0f} calls/s")


if __name__ == "__main__":
    main()
