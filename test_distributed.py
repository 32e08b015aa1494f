"""
Tests of torchrun + FSDP2 (machinery.py "Distribution"): two CPU ranks on gloo give what one process gives.
One torchrun launch runs this file as its script (distributed_worker) for the in-process checks.

    python -m pytest -q test_distributed.py
"""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

import machinery
import prerl
import test_losses
import verify
from conftest import (CHARS, run_args, tiny_model, toy_batch)

# ---------------------------------------------------------------------------
# torchrun + FSDP2 (machinery.py "Distribution"), two CPU ranks on gloo, equal to one process.
# One torchrun launch runs this file as its script (distributed_worker below) for the in-process checks
# and a run that is killed at step 2; a second launch resumes it through prerl.py's command line.

import torch.distributed  # noqa: E402

# the runs below: both DSRL stages, the KL term (a reference model on every rank), gradient checkpointing
RUN = ("--steps", "3", "--switch-step", "2", "--kl-coef", "0.05", "--gradient-checkpointing")
# 4 groups of 4 with uneven response lengths (toy_batch); each rank takes 2 whole groups
FIXED_REWARDS = {"grpo": [[1., 0., 0., 1.], [0., 1., 1., 1.], [0., 0., 1., 0.], [1., 0., 1., 0.]],
                 # rank 1's groups are all-equal: it has no pass of its own and joins rank 0's collectives
                 "nsr-prerl": [[1., 0., 0., 1.], [0., 1., 1., 1.], [1., 1., 1., 1.], [0., 0., 0., 0.]]}


def fixed_batch_step(stage):
    """One RL update of a fresh tiny model on a fixed batch; under torchrun each rank takes its groups
    and rank 0 gets the results. Returns (loss, grad norm, weights after the step, passes per rank)."""
    dist, group = prerl.DIST, 4
    model, batch = tiny_model(torch.float32), toy_batch(n_groups=4, group=group)
    rewards = torch.tensor(FIXED_REWARDS[stage])
    cfg = prerl.Config(micro_batch_tokens=25, lr=1e-2)
    if dist is not None:
        machinery.shard_model(model, dist)
    optimizer = prerl.make_optimizer(model, cfg)
    passes = []
    if dist is not None:
        groups, _ = machinery.rank_share(list(range(len(rewards))), dist)
        rows = [g * group + j for g in groups for j in range(group)]
        batch, rewards = {name: value[rows] for name, value in batch.items()}, rewards[groups]
        machinery.gather_weights(model)    # as rl_step leaves the model after a rollout
        machinery.shard_layers(model)
        match_passes = machinery.match_passes
        machinery.match_passes = lambda model, n, *rest: (passes.append(n), match_passes(model, n, *rest))[1]
    try:
        loss, kept = prerl.accumulate_gradients(model, batch, rewards, stage, cfg, start_id=1)
    finally:
        if dist is not None:
            machinery.match_passes = match_passes
    grad_norm = prerl.optimizer_step(model, optimizer, cfg)
    if dist is None:
        return loss, grad_norm, model.state_dict(), passes
    _, _, loss, _ = machinery.step_totals(rewards, torch.zeros(1), loss, kept, dist)
    return loss, grad_norm, machinery.full_state(model, optimizer)[0], machinery.gather_objects(passes[0])


def distributed_worker(folder, out):
    """Runs on each of two ranks (torchrun); rank 0 saves what the tests below compare."""
    prerl.DIST = dist = machinery.init_distributed(torch.device("cpu"))
    results = {stage: fixed_batch_step(stage) for stage in FIXED_REWARDS}
    real_denominator = machinery.global_denominator          # the common mistake: a per-rank token-mean
    machinery.global_denominator = lambda tokens, dist: tokens.clamp(min=1)
    results["per-rank mean"] = fixed_batch_step("grpo")
    machinery.global_denominator = real_denominator
    results["loss variants"] = test_losses.world_size_variant_steps(dist)   # every aggregation x scaling x ratio
    # Ranks that end decoding at different steps: rank 0's first token ends its responses (every token
    # is an end token), rank 1 decodes all 12; then both meet at the next collectives.
    model = machinery.shard_model(tiny_model(torch.float32), dist)
    machinery.gather_weights(model)
    eos_ids = list(range(len(CHARS) + 4)) if dist.rank == 0 else [-1]
    decoded = prerl.generate(model, torch.tensor([[20, 21, 22]]), torch.ones(1, 3, dtype=torch.long), 2, 12,
                             0.0, 1.0, eos_ids, pad_id=3)
    machinery.shard_layers(model)
    machinery.release_root(model)
    results["decode lengths"] = machinery.gather_objects(decoded.shape[1])
    if dist.rank == 0:
        torch.save(results, out / "worker.pt")
    # A whole run through prerl.train, killed (os._exit, no clean-up) at the start of step 2 after
    # step 2's checkpoint; the fixture resumes it with `torchrun prerl.py ... --resume`.
    real_rl_step = prerl.rl_step

    def rl_step_killed_at_step_2(*args):
        if args[4] == 2:
            for process, _ in verify._idle_workers:  # forked verifier workers would outlive os._exit
                process.kill()
            sys.stdout.flush()
            os._exit(0)
        return real_rl_step(*args)
    prerl.train(prerl.parse_config(run_args(folder, out / "uninterrupted", *RUN)))
    prerl.rl_step = rl_step_killed_at_step_2
    prerl.train(prerl.parse_config(run_args(folder, out / "killed", *RUN, "--save-every", "1")))


def test_rank_shares_are_contiguous_whole_and_refuse_an_empty_rank():
    """Each rank's prompts: contiguous, in order, sizes within one, every prompt once, and the index of
    its first one (which keys its random numbers); too few prompts for the ranks is a one-line error."""
    for n, world in [(16, 2), (7, 3), (5, 4), (8, 8)]:
        shares = [machinery.rank_share(list(range(n)), machinery.Distributed(r, world, "gloo", None, None))
                  for r in range(world)]
        assert sum((items for items, _ in shares), []) == list(range(n))
        assert all(items[0] == first for items, first in shares)
        assert max(len(i) for i, _ in shares) - min(len(i) for i, _ in shares) <= 1
    with pytest.raises(SystemExit, match="--prompts-per-step 4 or more"):
        machinery.rank_share([0, 1, 2], machinery.Distributed(3, 4, "gloo", None, None))
    assert machinery.rank_share([0, 1, 2], machinery.Distributed(3, 4, "gloo", None, None), may_be_empty=True) == ([], 3)


def torchrun(*args, timeout=300):
    """Two CPU ranks (gloo) on a free port; one thread each; ends on its own or fails the test."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def two_ranks(tiny_model_folder, tmp_path_factory):
    if not torch.distributed.is_available():
        pytest.skip("this torch build has no torch.distributed")
    import resource
    out = tmp_path_factory.mktemp("two_ranks")
    start, cpu_start = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    worker = torchrun(os.path.abspath(__file__), "--distributed-worker", tiny_model_folder, out)
    assert worker.returncode == 0, worker.stdout[-3000:] + worker.stderr[-3000:]
    assert not (out / "killed" / "checkpoint.dcp.tmp").exists()
    assert torch.load(out / "killed" / "checkpoint.pt", weights_only=False)["step"] == 2   # killed after step 2's save
    resumed = torchrun(os.path.dirname(os.path.abspath(__file__)) + "/prerl.py",
                       *run_args(tiny_model_folder, out / "killed", *RUN, "--save-every", "1", "--resume"))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f"two-rank launches: {time.perf_counter() - start:.1f} s wall, "
          f"{cpu.ru_utime + cpu.ru_stime - cpu_start.ru_utime - cpu_start.ru_stime:.1f} s CPU")
    one = tmp_path_factory.mktemp("one_rank")                 # the same run in this one process
    prerl.train(prerl.parse_config(run_args(tiny_model_folder, one, *RUN)))
    return {"worker": torch.load(out / "worker.pt", weights_only=False), "resumed": resumed, "out": out, "one": one}


def max_difference(a, b):
    assert a.keys() == b.keys()
    return max((a[name] - b[name]).abs().max().item() for name in a)


@pytest.mark.parametrize("stage", list(FIXED_REWARDS))
def test_two_ranks_one_step_equals_one_process(two_ranks, stage):
    """Loss, gradient norm and weights after AdamW: 2 ranks == 1 process (fp32, atol 1e-5), with ranks
    running different numbers of forward/backward passes (one rank none at all for nsr-prerl)."""
    loss, grad_norm, weights, passes = two_ranks["worker"][stage]
    prerl.DIST = None
    one_loss, one_grad_norm, one_weights, _ = fixed_batch_step(stage)
    assert passes[0] != passes[1] and (stage != "nsr-prerl" or passes[1] == 0), passes
    assert loss == pytest.approx(one_loss, abs=1e-5) and loss != 0
    assert grad_norm == pytest.approx(one_grad_norm, abs=1e-5)
    assert max_difference(weights, one_weights) < 1e-5
    assert max_difference(weights, tiny_model(torch.float32).state_dict()) > 1e-3   # the step moved the weights


def test_per_rank_token_mean_fails_the_same_check(two_ranks):
    """Negative control: dividing by each rank's own token count (then FSDP's average) is not the
    single-process token-mean; the check above catches it."""
    loss, grad_norm, weights, _ = two_ranks["worker"]["per-rank mean"]
    prerl.DIST = None
    one_loss, one_grad_norm, one_weights, _ = fixed_batch_step("grpo")
    assert abs(grad_norm - one_grad_norm) > 1e-5 or abs(loss - one_loss) > 1e-5
    assert max_difference(weights, one_weights) > 1e-5


@pytest.mark.parametrize("flags,stage", test_losses.WORLD_SIZE_VARIANTS,
                         ids=[test_losses.variant_name(*v).replace(" ", ",") for v in test_losses.WORLD_SIZE_VARIANTS])
def test_two_ranks_equal_one_process_for_every_loss_variant(two_ranks, flags, stage):
    """Each aggregation x reward scaling x ratio level, with pi_old != pi so the clip acts: loss, gradient
    norm and weights after AdamW on 2 ranks == 1 process (the denominators and the batch std are global)."""
    loss, grad_norm, weights = two_ranks["worker"]["loss variants"][test_losses.variant_name(flags, stage)]
    prerl.DIST = None
    one_loss, one_grad_norm, one_weights = test_losses.variant_step(flags, stage)
    assert loss == pytest.approx(one_loss, abs=1e-5) and loss != 0
    assert grad_norm == pytest.approx(one_grad_norm, rel=1e-5)
    # AdamW's first step is lr * g / |g| per element: where a gradient is near 0, the two summation orders'
    # float32 rounding moves a weight by up to ~1e-5 (seen: 1.14e-5 on the plain path); a wrong denominator
    # moves every weight by far more (the negative control above)
    assert max_difference(weights, one_weights) < 5e-5


def test_ranks_that_end_decoding_at_different_steps_do_not_hang(two_ranks):
    assert two_ranks["worker"]["decode lengths"] == [1, 12]   # and the launch ended (fixture timeout)


def test_torchrun_run_killed_and_resumed_equals_one_process(two_ranks):
    """`torchrun prerl.py`, killed at step 2 and resumed, ends with the weights of the uninterrupted
    2-rank run (bit for bit) and with the metrics and final weights of the same run in one process; its
    first line names the world size; its whole-weights exports load in one process: checkpoint.pt with the
    optimizer, and model/ with from_pretrained."""
    out, one = two_ranks["out"] / "killed", two_ranks["one"]
    assert two_ranks["resumed"].stdout.splitlines()[0] == "world size 2, gloo"
    uninterrupted = torch.load(two_ranks["out"] / "uninterrupted" / "checkpoint.pt", weights_only=False)
    assert max_difference(torch.load(out / "checkpoint.pt", weights_only=False)["model"], uninterrupted["model"]) == 0
    metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
    one_metrics = [json.loads(line) for line in open(one / "metrics.jsonl")]
    assert [m["step"] for m in metrics] == [0, 1, 2]
    assert [m["stage"] for m in metrics] == ["nsr-prerl", "nsr-prerl", "grpo"]
    assert all(m["kept_tokens"] > 0 for m in metrics)
    for m, o in zip(metrics, one_metrics):
        for name in ("stage", "reward_mean", "accuracy", "mixed_groups", "response_length", "kept_tokens"):
            assert m[name] == o[name], (name, m, o)
        assert m["loss"] == pytest.approx(o["loss"], abs=1e-6) and m["grad_norm"] == pytest.approx(o["grad_norm"], abs=1e-6)
    exported, one_state = torch.load(out / "checkpoint.pt", weights_only=False), torch.load(one / "checkpoint.pt", weights_only=False)
    assert exported["step"] == 3
    assert max_difference(exported["model"], one_state["model"]) < 1e-5
    assert exported["optimizer"]["param_groups"] == one_state["optimizer"]["param_groups"]   # the one-process format
    for index, state in one_state["optimizer"]["state"].items():
        mine = exported["optimizer"]["state"][index]
        assert mine["step"] == state["step"]
        torch.testing.assert_close(mine["exp_avg"], state["exp_avg"], rtol=1e-4, atol=1e-8)
        torch.testing.assert_close(mine["exp_avg_sq"], state["exp_avg_sq"], rtol=1e-4, atol=1e-12)
    prerl.DIST = None
    model = tiny_model(torch.float32)
    optimizer = prerl.make_optimizer(model, prerl.Config())
    assert prerl.load_checkpoint(str(out / "checkpoint.pt"), model, optimizer) == 3   # one process, with its optimizer
    assert max_difference(model.state_dict(), exported["model"]) == 0
    from transformers import AutoModelForCausalLM                         # and model/ (save_pretrained)
    assert max_difference(AutoModelForCausalLM.from_pretrained(out / "model").state_dict(), exported["model"]) == 0


if __name__ == "__main__" and sys.argv[1:2] == ["--distributed-worker"]:
    from pathlib import Path
    distributed_worker(Path(sys.argv[2]), Path(sys.argv[3]))
