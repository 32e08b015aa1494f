"""
Mutation testing of the method and of the verifier's comparison core (development only; not in CI).

    pip install mutmut                  # 3.x, into the development venv; not in requirements.txt
    python mutate.py                    # mutate, run the covering tests of each mutant, print the score
    python mutate.py --children 1       # fewer parallel workers on a busy machine
    mutmut show prerl.x_trim__mutmut_3  # what one mutant changed

mutmut (configured in pyproject.toml) mutates whole files; the functions below are the ones scored:
the method (advantages, masks, losses, scoring in both spaces, the DSRL switch, sampling, checkpoints), the
data split, the prompts and the sampling keys' random numbers, two run-safety rules (what --resume may
change, the non-finite guard) and verify.py's comparison core. Each mutant runs only the tests that
reach its function. A surviving mutant is either a missing test (write it) or equivalent to the original
(list it in EQUIVALENT with the reason). The score counts killed mutants among the non-equivalent ones; the target is 95%.
In machinery.py: the precision code (rounding bits and rounding, the AdamW update, the optimizer's bookkeeping,
the precision decision), LoRA and the model export, the memory plan, and the distribution helpers that run in
one process; not what needs CUDA or torchrun (the static decoder's graphs, FSDP, collectives, sharded
checkpoints) or times the probe. Not mutated: generate() (mutmut 3 leaves decorated functions alone:
@torch.no_grad()). Not scored: train() and rl_step(), whose many
print, timing and run-safety lines would drown the method; their rules are tested end to end.
"""

import argparse
import json
import os
import re
import subprocess
import sys

SCORED = {
    "prerl.py": [
        # sampling and its masks
        "start_token_id", "eos_token_ids", "response_mask_from_positions", "pick_next_token", "sample",
        # scoring in both spaces
        "token_logprobs", "conditional_logprobs", "pretrain_logprobs", "trim", "scored_logprobs",
        # advantages, the DSRL switch, losses
        "grpo_advantages", "batch_std", "centered_advantages", "overlong_penalties", "shaped_rewards", "stage_for_step",
        "advantages_for", "clipped_surrogate", "log_ratio", "aggregation", "global_count", "k3_kl", "policy_loss",
        "clipped_tokens", "rows_that_count", "loss_plan", "accumulate_gradients", "sampling_policy_logprobs",
        "policy_updates", "mixed_groups", "draw_mixed_groups", "optimizer_step",
        # data: the train / held-out split, the held-out set, the data order
        "is_held_out", "make_problems", "eval_problems", "batch_for_step",
        # prompts and the sampling keys' random numbers
        "format_prompt", "encode_prompts", "sampling_uniforms",
        # checkpoints, evaluation, run safety (what --resume may change, the non-finite guard)
        "save_checkpoint", "load_checkpoint", "evaluate", "resume_problem", "count_nonfinite_steps",
    ],
    "verify.py": ["_close", "_numbers_equal", "_expressions_equal", "_structures_equal", "_compare_normalized"],
    "machinery.py": [
        # precision: the rounding bits and the rounding, the AdamW update's reference, the optimizer's bookkeeping,
        # the precision decision from the step probe's figures (not the timing itself) and on --resume
        "mix64", "rounding_key", "element_bits", "stochastic_round_to_bf16", "adamw_update",
        "StochasticRoundingAdamW.__init__", "StochasticRoundingAdamW.step", "StochasticRoundingAdamW.load_state_dict",
        "probe_step_seconds", "decide_precision", "run_precision",
        # LoRA (adapters, the merge with alpha / rank, the merged export) and the model export helpers
        "lora_targets", "add_lora", "prepare_model", "has_lora", "adapter_state", "load_adapter_state",
        "merged_state_dict", "states_to_save", "full_state", "whole_model",
        # the memory plan: its arithmetic, its lines, the refusal on CUDA
        "model_config", "memory_plan", "size", "plan_line", "plan_table", "refuse_if_it_cannot_fit",
        # distribution helpers that run in one process (their torchrun halves with a stand-in for the collectives)
        "rank_share", "sum_over_ranks", "before_optimizer_step", "global_denominator", "match_passes", "step_totals",
        "sharded_folder", "agree_on_stop", "decoder_layers",
    ],
    "analyze.py": [],
}

# Mutants that behave exactly like the original (one line each: why no test can tell them apart).
# mutmut numbers the mutants of each function in order, so a change to a function renumbers its mutants:
# re-triage that function's entries then (`mutmut show NAME` prints what a mutant changed).
EQUIVALENT = {
    # verify.py: _close
    "verify.x__close__mutmut_3": "< for <=: differs only when the difference equals the tolerance exactly",
    "verify.x__close__mutmut_9": "max(1, |b|) for max(1, |a|, |b|): within 1e-8 of each other |a| and |b| give the same bound",
    "verify.x__close__mutmut_10": "max(1, |a|) for max(1, |a|, |b|): as above, with a and b swapped",
    # prerl.py: the sampler gets 2-D logits [rows, vocabulary], where dim 1 is dim -1
    # prerl.py: rewards are 0 or 1 (verify.rewards), never exactly 0.5
    "prerl.x_advantages_for__mutmut_3": ">= 0.5 for > 0.5 as 'correct': differs only for a reward of exactly 0.5",
    # prerl.py: optimizer_step's loss is only tested for being finite
    "prerl.x_optimizer_step__mutmut_1": "default loss 1.0 for 0.0: both finite, so no step is skipped either way",
    # prerl.py: trim(left=None) takes the same branch as left=False
    "prerl.x_scored_logprobs__mutmut_4": "trim(..., left=None) for left=False on responses: None is falsy, the same branch",
    "prerl.x_pick_next_token__mutmut_4": "argmax(+1) for argmax(-1): the same dimension of 2-D logits",
    "prerl.x_pick_next_token__mutmut_12": "softmax over dim +1 for -1: the same dimension of 2-D logits",
    "prerl.x_pick_next_token__mutmut_14": "nucleus filter also at top_p 1.0: keeps every token (a skipped no-op, not a rule)",
    "prerl.x_pick_next_token__mutmut_15": "nucleus filter for top_p < 2: as above",
    "prerl.x_pick_next_token__mutmut_19": "sort() without dim: sorts the last dimension, as sort(-1)",
    "prerl.x_pick_next_token__mutmut_21": "sort over dim +1 for -1: the same dimension of 2-D logits",
    "prerl.x_pick_next_token__mutmut_27": "cumsum over dim +1 for -1: the same dimension of 2-D logits",
    "prerl.x_pick_next_token__mutmut_29": ">= for > top_p: differs only when a nucleus' float mass equals top_p exactly",
    "prerl.x_pick_next_token__mutmut_37": "scatter over dim +1 for -1: the same dimension of 2-D logits",
    "prerl.x_pick_next_token__mutmut_46": "cumsum over dim +1 for -1: as above",
    "prerl.x_pick_next_token__mutmut_50": "u moved to device None: the CPU, where the tests run",
    "prerl.x_pick_next_token__mutmut_51": "u cast to dtype None: u * cdf promotes to float64 either way",
    "prerl.x_pick_next_token__mutmut_52": "u moved without a device: stays on the CPU, where the tests run",
    "prerl.x_pick_next_token__mutmut_53": "u not cast: u * cdf promotes to float64 either way",
    "prerl.x_pick_next_token__mutmut_66": "clamp at V + 1 for V - 1: u < 1 keeps every draw below the total mass, the clamp never acts",
    "prerl.x_pick_next_token__mutmut_67": "probs.shape[+1] for [-1]: the same dimension of 2-D logits",
    "prerl.x_policy_loss__mutmut_14": "KL term at kl_coef >= 0: adds 0 * k3, and ref_lp is passed only when kl_coef > 0",
    # trim only saves compute: the scores ignore padded columns (test_padding_invariance)
    "prerl.x_trim__mutmut_6": "ids[:, :1] when no column is real: unreachable, every scored row has a token",
    "prerl.x_trim__mutmut_7": "mask[:, :1] when no column is real: as above",
    "prerl.x_trim__mutmut_9": "no left trim of prompts: the extra columns are padding, masked out",
    "prerl.x_trim__mutmut_10": "left trim of responses: their first column is always real, nothing is cut",
    "prerl.x_trim__mutmut_17": "one more padded column kept: masked out",
    # device= arguments: the tests run on a CPU, where device None is the response's device
    "prerl.x_response_mask_from_positions__mutmut_7": "EOS ids made with device None: the CPU, the responses' device in the tests",
    "prerl.x_response_mask_from_positions__mutmut_9": "EOS ids made without device: as above",
    "prerl.x_response_mask_from_positions__mutmut_32": "positions made with device None: as above",
    "prerl.x_response_mask_from_positions__mutmut_34": "positions made without device: as above",
    # prerl.py: the train / held-out split is a fixed quarter by hash; which quarter is no rule of the method
    "prerl.x_is_held_out__mutmut_7": "hash read in base 17: another fixed quarter (24.6% of 10k problems), disjoint and deterministic alike",
    "prerl.x_is_held_out__mutmut_10": "remainder 1 for 0: another fixed quarter of the problems, disjoint and deterministic alike",
    "prerl.x_make_problems__mutmut_8": "201 * n draws for 200 * n: a bound on attempts; differs only when that side holds fewer than n problems and one shows up in the extra draws",
    "prerl.x_encode_prompts__mutmut_8": "prompts moved to device None: they stay on the CPU, where the tests run",
    "prerl.x_format_prompt__mutmut_15": "apply_chat_template(tokenize=None) for False: transformers reads None as no, the same text",
    "prerl.x_resume_problem__mutmut_14": "map_location None for 'cpu': the same on a machine without a GPU, where the tests run",
    "prerl.x_resume_problem__mutmut_15": "mmap=None: the checkpoint read whole instead of memory-mapped, the same config and step (memory only)",
    "prerl.x_resume_problem__mutmut_16": "weights_only=None (torch's default, True): the checkpoint holds only allowed types, as for load_checkpoint",
    "prerl.x_resume_problem__mutmut_18": "no map_location: as mutmut_14",
    "prerl.x_resume_problem__mutmut_19": "no mmap: as mutmut_15",
    "prerl.x_resume_problem__mutmut_20": "no weights_only: as mutmut_16",
    "prerl.x_resume_problem__mutmut_23": "mmap=False: as mutmut_15",
    "prerl.x_resume_problem__mutmut_24": "weights_only=True: as mutmut_16",
    "prerl.x_eval_problems__mutmut_12": "seed - 1 for seed + 1: another draw from the held-out side, still disjoint from training and the same on every call",
    # prerl.py: checkpoints (CPU-only test machine)
    "prerl.x_load_checkpoint__mutmut_3": "map_location None for 'cpu': the same on a machine without a GPU, where the tests run",
    "prerl.x_load_checkpoint__mutmut_6": "no map_location: as above",
    "prerl.x_load_checkpoint__mutmut_10": "weights_only=True: the checkpoint holds only tensors, dicts, tuples, numbers and strings, all allowed",
    "prerl.x_load_checkpoint__mutmut_35": "`or` for `and` before restoring the CUDA RNG: without a GPU both branches skip it",
    # machinery.py: the tests run on a CPU, where device None (or no device) is the CPU, and torch's defaults are these dtypes
    "machinery.x_element_bits__mutmut_8": "arange(dtype=None): an integer arange is int64 anyway",
    "machinery.x_element_bits__mutmut_9": "arange on device None: the CPU, where the tests run",
    "machinery.x_element_bits__mutmut_11": "arange without dtype: int64 anyway",
    "machinery.x_element_bits__mutmut_12": "arange without device: the CPU, where the tests run",
    "machinery.x_stochastic_round_to_bf16__mutmut_5": "randint(dtype=None): int64 draws of the same values (a test compares), cast to int32 before use",
    "machinery.x_stochastic_round_to_bf16__mutmut_6": "randint on device None: the CPU, where the tests run",
    "machinery.x_stochastic_round_to_bf16__mutmut_11": "randint without dtype: as mutmut_5",
    "machinery.x_stochastic_round_to_bf16__mutmut_12": "randint without device: the CPU, where the tests run",
    "machinery.x_adamw_update__mutmut_29": "element_bits on device None: the CPU, where the tests run",
    "machinery.x_adamw_update__mutmut_33": "element_bits without device: its default, the CPU",
    "machinery.xǁStochasticRoundingAdamWǁstep__mutmut_105": "scalar tensors with dtype None: a Python float becomes float32 anyway",
    "machinery.xǁStochasticRoundingAdamWǁstep__mutmut_106": "scalar tensors on device None: the CPU, where the tests run",
    "machinery.xǁStochasticRoundingAdamWǁstep__mutmut_108": "scalar tensors without dtype: float32 anyway",
    "machinery.xǁStochasticRoundingAdamWǁstep__mutmut_109": "scalar tensors without device: the CPU, where the tests run",
    "machinery.xǁStochasticRoundingAdamWǁ__init____mutmut_3": "default rounding seed 1 for 0: every caller (prerl, the probe's timing) passes a seed or needs none in particular",
    # machinery.py: torch's Optimizer.load_state_dict reads only "state" and "param_groups"
    "machinery.xǁStochasticRoundingAdamWǁload_state_dict__mutmut_3": "old checkpoints' rounding_rng not popped: torch's load_state_dict ignores keys besides state and param_groups",
    "machinery.xǁStochasticRoundingAdamWǁload_state_dict__mutmut_6": "pop of another key: as mutmut_3",
    "machinery.xǁStochasticRoundingAdamWǁload_state_dict__mutmut_7": "pop of another key: as mutmut_3",
    # machinery.py: run_precision reads a checkpoint as prerl's resume_problem does (see the prerl entries above)
    "machinery.x_run_precision__mutmut_11": "map_location None for 'cpu': the same on a machine without a GPU, where the tests run",
    "machinery.x_run_precision__mutmut_12": "mmap=None: read whole instead of memory-mapped, the same config and weights (memory only)",
    "machinery.x_run_precision__mutmut_13": "weights_only=None (torch's default, True): a checkpoint holds only allowed types",
    "machinery.x_run_precision__mutmut_15": "no map_location: as mutmut_11",
    "machinery.x_run_precision__mutmut_16": "no mmap: as mutmut_12",
    "machinery.x_run_precision__mutmut_17": "no weights_only: as mutmut_13",
    "machinery.x_run_precision__mutmut_20": "mmap=False: as mutmut_12",
    "machinery.x_run_precision__mutmut_21": "weights_only=True: as mutmut_13",
    "machinery.x_run_precision__mutmut_37": "a recorded fp32 read from the weights instead: an fp32 run's weights and adapters are fp32, the same answer",
    "machinery.x_run_precision__mutmut_38": "as mutmut_37",
    # machinery.py: memory_plan of a text-only model, whose get_text_config() is the config itself
    "machinery.x_memory_plan__mutmut_27": "the config instead of its text config: the same object for a text-only causal LM",
    "machinery.x_memory_plan__mutmut_28": "get_text_config() always called: every transformers 5 config has it",
    "machinery.x_memory_plan__mutmut_29": "as mutmut_27",
    "machinery.x_memory_plan__mutmut_33": "as mutmut_27",
    "machinery.x_memory_plan__mutmut_34": "as mutmut_27",
    # machinery.py: add_lora's arguments that restate peft's defaults
    "machinery.x_add_lora__mutmut_13": "no lora_dropout: peft's default is 0.0, the value given",
    "machinery.x_add_lora__mutmut_14": "no bias: peft's default is 'none', the value given",
    "machinery.x_add_lora__mutmut_26": "fork_rng(devices=None): the adapters are drawn on the CPU generator, which is forked either way",
    "machinery.x_add_lora__mutmut_39": "no autocast_adapter_dtype: peft's default is True, the value given",
    # machinery.py: in one process the state dicts are whole and on the CPU already; these options act under torchrun only
    "machinery.x_full_state__mutmut_2": "torchrun only: full_state_dict=None gathers nothing in one process, where nothing is sharded",
    "machinery.x_full_state__mutmut_3": "torchrun only: cpu_offload=None moves nothing in one process, where the tensors are on the CPU",
    "machinery.x_full_state__mutmut_4": "torchrun only: as mutmut_2",
    "machinery.x_full_state__mutmut_5": "torchrun only: as mutmut_3",
    "machinery.x_full_state__mutmut_6": "torchrun only: as mutmut_2",
    "machinery.x_full_state__mutmut_7": "torchrun only: as mutmut_3",
    "machinery.x_full_state__mutmut_1": "torchrun only: options=None, torch's defaults, differ from whole-on-the-CPU only for sharded models",
    "machinery.x_full_state__mutmut_11": "torchrun only: as mutmut_1",
    "machinery.x_full_state__mutmut_14": "torchrun only: as mutmut_1",
    "machinery.x_whole_model__mutmut_6": "torchrun only: as full_state's mutmut_2",
    "machinery.x_whole_model__mutmut_7": "torchrun only: as full_state's mutmut_3",
    "machinery.x_whole_model__mutmut_8": "torchrun only: as full_state's mutmut_2",
    "machinery.x_whole_model__mutmut_9": "torchrun only: as full_state's mutmut_3",
    "machinery.x_whole_model__mutmut_10": "torchrun only: as full_state's mutmut_2",
    "machinery.x_whole_model__mutmut_11": "torchrun only: as full_state's mutmut_3",
    "machinery.x_whole_model__mutmut_3": "torchrun only: options=None, torch's defaults, differ from whole-on-the-CPU only for sharded models",
    "machinery.x_whole_model__mutmut_5": "torchrun only: as mutmut_3",
    "machinery.x_load_adapter_state__mutmut_3": "strict=None: torch reads it as false, the same non-strict load",
    # machinery.py: match_passes' one start token
    "machinery.x_match_passes__mutmut_16": "torch.full(dtype=None) with an integer fill: int64 anyway",
    "machinery.x_match_passes__mutmut_17": "the token on device None: the CPU, where the tests run",
    "machinery.x_match_passes__mutmut_20": "torch.full without dtype: as mutmut_16",
    "machinery.x_match_passes__mutmut_21": "the token without device: the CPU, where the tests run",
    "machinery.x_stochastic_round_to_bf16__mutmut_8": "randint(2^16, shape) for randint(0, 2^16, shape): torch's low defaults to 0, the same draws",
    "machinery.x_model_config__mutmut_5": "for_model(**shape) with model_type left in: passed by keyword, the same config",
    "machinery.x_match_passes__mutmut_31": "minus a zero for plus a zero: every gradient is still zero",
    "machinery.x_size__mutmut_4": "> for >= GIB / 10: a byte count is an integer and GIB / 10 is not",
}

TARGET = 0.95


def mangled(name):
    """mutmut's name of a scored function: x_f for a function f, xǁClassǁmethod for "Class.method"."""
    return "xǁ" + name.replace(".", "ǁ") if "." in name else "x_" + name


def function_of(mutant):
    """The SCORED name of a mutant: "f" from prerl.x_f__mutmut_3, "Class.method" from machinery.xǁClassǁmethod__mutmut_3."""
    name = mutant.split(".", 1)[1].split("__mutmut_")[0]
    return name[2:] if name.startswith("x_") else name[1:].strip("ǁ").replace("ǁ", ".")


def mutant_globs():
    return [f"{file[:-3]}.{mangled(name)}__mutmut_*" for file, names in SCORED.items() for name in names]


def scored_results():
    """{mutant name: status} for the scored functions, from mutmut's per-file result files."""
    pattern = re.compile(r"^[a-z]+\.(%s)__mutmut_\d+$" % "|".join(re.escape(mangled(n)) for names in SCORED.values() for n in names))
    status = {}
    for file in SCORED:
        with open(os.path.join("mutants", file + ".meta")) as f:
            codes = json.load(f)["exit_code_by_key"]
        for name, code in codes.items():
            if pattern.match(name):
                status[name] = {1: "killed", 3: "killed", 0: "survived", None: "not checked", 33: "no tests",
                                36: "timeout", 24: "timeout", -24: "timeout", 152: "timeout"}.get(code, f"exit {code}")
    return status


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--children", type=int, default=2, help="parallel mutant workers (default 2)")
    parser.add_argument("--only", default="", help="comma-separated function names (Class.method for a method): mutate just these")
    parser.add_argument("--survivors", action="store_true", help="rerun only the last run's unkilled, unlisted mutants")
    parser.add_argument("--report-only", action="store_true", help="score the last run without running mutmut")
    args = parser.parse_args()
    only = set(filter(None, args.only.split(",")))
    if not args.report_only:
        names = [g for g in mutant_globs() if not only or function_of(g) in only]
        if args.survivors:
            names = [m for m, s in scored_results().items() if s not in ("killed", "timeout") and m not in EQUIVALENT
                     and (not only or function_of(m) in only)]
        # one thread per worker: torch's thread pool would otherwise oversubscribe the cores (and deadlock after fork)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        if names:
            subprocess.run(["mutmut", "run", "--max-children", str(args.children), *names], env=env)
    status = scored_results()
    stale = sorted(set(EQUIVALENT) - set(status))
    equivalent = {m: s for m, s in status.items() if m in EQUIVALENT}
    unchecked = sorted(m for m, s in status.items() if s == "not checked")
    counted = {m: s for m, s in status.items() if m not in EQUIVALENT and s != "not checked"}
    killed = sum(s in ("killed", "timeout") for s in counted.values())
    survivors = sorted(m for m, s in counted.items() if s not in ("killed", "timeout"))
    killed_equivalent = sorted(m for m, s in equivalent.items() if s in ("killed", "timeout"))
    print(f"\n{len(status)} mutants in the scored functions, {len(equivalent)} listed as equivalent, "
          f"{len(unchecked)} not run yet (--only, or an interrupted run)")
    for m in survivors:
        print(f"  {counted[m]:>11}  {m}")
    for m in killed_equivalent:
        print(f"  listed as equivalent but killed (remove it from EQUIVALENT): {m}")
    for m in stale if not unchecked else []:
        print(f"  listed as equivalent but no longer generated (remove it from EQUIVALENT): {m}")
    score = killed / max(1, len(counted))
    print(f"mutation score: {killed}/{len(counted)} = {100 * score:.1f}% of non-equivalent mutants killed "
          f"(target {100 * TARGET:.0f}%)")
    return 0 if score >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
