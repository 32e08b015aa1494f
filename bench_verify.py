"""
bench_verify.py -- accuracy and latency of verify.py on the development data in ../shared/data,
side by side with Hugging Face's math-verify when it is installed (`pip install math-verify`).

    python bench_verify.py                  # uses ../shared/data when it is there
    python bench_verify.py --data DIR       # or a folder with the same files

First, per category of what real models write, the accuracy of reward(completion, reference) on the hand-written
cases of what real models write (REAL_CASES in test_verify.py, FORMAT_CASES in test_verify_formats.py), with per-call
latency and the number of calls that raised. Then, with the data folder: accuracy on verify_dev_cases.jsonl (misses listed), the rate at which
reward("... \\boxed{a}", a) is 1.0 over the MATH answers, the rate at which two different MATH answers
are judged equal (each listed, for review), per-call latency median / p99 / max; and for verify.py
the batch throughput of rewards().
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


def math_verify_peer():
    """math-verify's documented use: verify(parse(gold), parse(answer)); None when not installed."""
    try:
        from math_verify import parse, verify as mv_verify
    except ImportError:
        return None

    def is_equiv(pred, gold):
        return mv_verify(parse(f"${gold}$"), parse(f"${pred}$"))

    def reward(completion, gold):
        return 1.0 if mv_verify(parse(f"${gold}$"), parse(completion)) else 0.0
    return is_equiv, reward


def measure(name, is_equiv, reward, cases, answers, pairs):
    latencies, out = [], {"name": name}

    def timed(fn, *args):
        start = time.perf_counter()
        try:
            result = fn(*args)
        except Exception:  # a peer that raises scores as a wrong answer
            result = None
        latencies.append(time.perf_counter() - start)
        return result

    out["dev_misses"] = [c for c in cases if bool(timed(is_equiv, c["pred"], c["gold"])) != c["expected"]]
    out["self_misses"] = [a for a in answers if timed(reward, f"Some reasoning... so the result is \\boxed{{{a}}}.", a) != 1.0]
    out["false_positives"] = [(a, b) for a, b in pairs if timed(reward, f"\\boxed{{{a}}}", b) == 1.0]
    latencies.sort()
    out["median_ms"] = 1000 * statistics.median(latencies)
    out["p99_ms"] = 1000 * latencies[int(0.99 * (len(latencies) - 1))]
    out["max_ms"] = 1000 * latencies[-1]
    out["calls"] = len(latencies)
    return out


def real_cases_table(verifiers):
    """Per-category accuracy of reward() on REAL_CASES, misses listed, latency and raised calls."""
    from test_verify import REAL_CASES
    try:
        from test_verify_formats import FORMAT_CASES   # the newer formats' cases, by kind
        REAL_CASES = {**REAL_CASES, **FORMAT_CASES}
    except ImportError:
        pass
    rows, misses = {}, {}
    for name, _, reward in verifiers:
        latencies, raised = [], 0
        for category, cases in REAL_CASES.items():
            correct = 0
            for completion, gold, expected in cases:
                start = time.perf_counter()
                try:
                    got = reward(completion, gold) == 1.0
                except Exception:
                    got, raised = None, raised + 1
                latencies.append(time.perf_counter() - start)
                correct += got == expected
                if got != expected:
                    misses.setdefault(name, []).append((category, completion, gold, expected))
            rows.setdefault(category, {})[name] = (correct, len(cases))
        latencies.sort()
        rows.setdefault("(speed)", {})[name] = (1000 * statistics.median(latencies),
                                                1000 * latencies[int(0.99 * (len(latencies) - 1))], raised)
    names = [name for name, _, _ in verifiers]
    print("| category | cases | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    total = {name: 0 for name in names}
    for category, by_name in rows.items():
        if category == "(speed)":
            continue
        n = next(iter(by_name.values()))[1]
        print(f"| {category} | {n} | " + " | ".join(f"{100 * by_name[x][0] / n:.1f}%" for x in names) + " |")
        for x in names:
            total[x] += by_name[x][0]
    n = sum(len(cases) for cases in REAL_CASES.values())
    print(f"| all | {n} | " + " | ".join(f"{100 * total[x] / n:.1f}%" for x in names) + " |")
    print("| median / p99 ms, raised | | " + " | ".join(
        f"{rows['(speed)'][x][0]:.3f} / {rows['(speed)'][x][1]:.2f}, {rows['(speed)'][x][2]}" for x in names) + " |")
    for name in names:
        print(f"\n{name}: misses on the real-model cases")
        for category, completion, gold, expected in misses.get(name, []):
            print(f"  [{category}] gold={gold!r} expected={expected} completion={completion[:100]!r}")
    print()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "data"))
    parser.add_argument("--pairs", type=int, default=5000, help="random pairs of different answers")
    args = parser.parse_args()
    verify.warmup()
    verifiers = [("verify.py", verify.is_equiv, verify.reward)]
    peer = math_verify_peer()
    if peer:
        verifiers.append(("math-verify", *peer))
    else:
        print("math-verify is not installed (pip install math-verify): only verify.py is measured\n")
    real_cases_table(verifiers)
    if not os.path.isdir(args.data):
        sys.exit(f"bench_verify.py: no data folder at {args.data} (pass --data DIR) for the rest")
    cases = load_jsonl(os.path.join(args.data, "verify_dev_cases.jsonl"))
    answers = [row["answer"] for row in load_jsonl(os.path.join(args.data, "math_train.jsonl"))]
    rng, distinct = random.Random(0), sorted(set(answers))
    pairs = [tuple(rng.sample(distinct, 2)) for _ in range(args.pairs)]
    results = [measure(name, eq, rw, cases, answers, pairs) for name, eq, rw in verifiers]

    print(f"| verifier | dev cases correct ({len(cases)}) | MATH self-match ({len(answers)}) | "
          f"different answers judged equal ({len(pairs)}) | median ms | p99 ms | max ms |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['name']} | {100 * (1 - len(r['dev_misses']) / len(cases)):.1f}% | "
              f"{100 * (1 - len(r['self_misses']) / len(answers)):.2f}% | "
              f"{100 * len(r['false_positives']) / len(pairs):.2f}% | {r['median_ms']:.3f} | {r['p99_ms']:.2f} | {r['max_ms']:.0f} |")
    print("targets for verify.py: dev >= 95%, self-match >= 99.5%, different-equal <= 0.2%, median <= 1 ms, p99 <= 20 ms")

    for r in results:
        print(f"\n{r['name']}: dev-case misses")
        for case in r["dev_misses"]:
            print(f"  gold={case['gold']!r} pred={case['pred']!r} expected={case['expected']}  ({case.get('note', '')[:60]})")
        print(f"{r['name']}: MATH answers not matching themselves ({len(r['self_misses'])}, first 15)")
        for answer in r["self_misses"][:15]:
            print(f"  {answer!r}")
        print(f"{r['name']}: different answers judged equal")
        for a, b in r["false_positives"][:30]:
            print(f"  {a!r} vs {b!r}")

    completions = [f"We compute step by step and get \\boxed{{{a}}}." for a in answers]
    golds = answers[1:] + answers[:1]
    start = time.perf_counter()
    verify.rewards(completions, golds)
    seconds = time.perf_counter() - start
    print(f"\nverify.rewards() batch: {len(completions)} calls in {seconds:.2f} s = {len(completions) / seconds:,.0f} calls/s")


if __name__ == "__main__":
    main()
