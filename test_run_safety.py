"""
Tests of run safety: every bad flag refused up front, one run per out-dir, Ctrl-C and kill -9 leave a
resumable run, non-finite steps skipped, an exported model folder, plots and trackers.

    python -m pytest -q test_run_safety.py
"""

import dataclasses
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
import types

import pytest
import torch

import prerl
from conftest import (flat_grad, refused_line,
                      run_args, state_of, tiny_model, tiny_tokenizer, toy_batch)

# ---------------------------------------------------------------------------
# Run safety -- every bad flag refused up front, one run per out-dir, Ctrl-C and kill -9 leave
# a resumable run, non-finite steps skipped, an exported model folder, plots and trackers.


# (flags, the flag the error must name): each alone makes a run that would crash, or run silently wrong
INVALID_FLAGS = [
    (["--prompts-per-step", "0"], "--prompts-per-step"), (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--lr", "-1"], "--lr"), (["--lr", "0"], "--lr"), (["--lr", "nan"], "--lr"), (["--lr", "inf"], "--lr"),
    (["--device", "tpu"], "--device"), (["--group-size", "1"], "--group-size"),
    (["--group-size", "1", "--mode", "nsr-prerl"], "--group-size"), (["--group-size", "0", "--mode", "nsr"], "--group-size"),
    (["--temperature", "-1"], "--temperature"), (["--temperature", "0"], "--temperature"),
    (["--top-p", "0"], "--top-p"), (["--top-p", "1.5"], "--top-p"), (["--switch-step", "-3"], "--switch-step"),
    (["--eval-size", "-1"], "--eval-size"), (["--eval-every", "-1"], "--eval-every"), (["--save-every", "-2"], "--save-every"),
    (["--micro-batch-tokens", "-1"], "--micro-batch-tokens"), (["--micro-batch-tokens", "48"], "--micro-batch-tokens"),
    (["--kl-coef", "-0.1"], "--kl-coef"), (["--w-reinforce-lambda", "-1"], "--w-reinforce-lambda"),
    (["--clip-eps-low", "1"], "--clip-eps-low"), (["--clip-eps-low", "-0.1"], "--clip-eps-low"),
    (["--clip-eps-high", "-0.1"], "--clip-eps-high"), (["--steps", "-1"], "--steps"), (["--mode", "ppo"], "--mode"),
    (["--tasks", "add,foo"], "--tasks"), (["--difficulty", "0"], "--difficulty"), (["--prerl-coef", "-1"], "--prerl-coef"),
    (["--weight-decay", "-1"], "--weight-decay"), (["--grad-clip", "0"], "--grad-clip"),
    (["--eval-temperature", "-1"], "--eval-temperature"), (["--report-to", "mlflow"], "--report-to"),
    (["--data", "no/such.jsonl"], "--data"), (["--eval-data", "no/such.jsonl"], "--eval-data"),
    (["--model", "./no/such/model"], "--model"),
]


@pytest.mark.parametrize("flags,flag", INVALID_FLAGS)
def test_every_invalid_flag_is_refused_in_one_line_before_anything_is_written(flags, flag, tmp_path, capsys):
    out = tmp_path / "out"
    line = refused_line(["--out-dir", str(out), *flags], capsys)
    assert line.startswith(f"error: {flag} "), line
    assert not out.exists()


def test_cuda_without_a_gpu_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = refused_line(["--device", "cuda", "--out-dir", str(tmp_path / "out")], capsys)
    assert line.startswith("error: --device cuda: this machine has no usable CUDA GPU") and not (tmp_path / "out").exists()


def test_missing_tracker_package_is_named(tmp_path, capsys, monkeypatch):
    find_spec = prerl.importlib.util.find_spec
    monkeypatch.setattr(prerl.importlib.util, "find_spec", lambda name: None if name == "wandb" else find_spec(name))
    line = refused_line(["--report-to", "wandb", "--out-dir", str(tmp_path / "out")], capsys)
    assert line == "error: --report-to wandb: the wandb package is not installed: pip install wandb, or use --report-to none"


@pytest.mark.parametrize("flags", [
    ["--group-size", "1", "--mode", "nsr"], ["--group-size", "1", "--mode", "w-reinforce"], ["--micro-batch-tokens", "49"],
    ["--eval-size", "0"], ["--top-p", "1"], ["--switch-step", "0"], ["--clip-eps-low", "0"], ["--clip-eps-high", "0"],
    ["--kl-coef", "0"], ["--w-reinforce-lambda", "0"], ["--steps", "0"], ["--eval-every", "0"], ["--save-every", "0"],
    ["--eval-temperature", "0"], ["--device", "cpu"], ["--micro-batch-tokens", "0"],
])
def test_boundary_values_are_accepted(flags, tmp_path):
    prerl.parse_config(["--out-dir", str(tmp_path / "out"), *flags])
    assert not (tmp_path / "out").exists()  # parsing only looks


def test_out_dir_that_is_a_file_or_not_writable_is_refused(tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("x")
    assert refused_line(["--out-dir", str(tmp_path / "file")], capsys).endswith("is a file, not a folder; choose another --out-dir")
    assert "is a file" in refused_line(["--out-dir", str(tmp_path / "file" / "run")], capsys)
    monkeypatch.setattr(prerl.os, "access", lambda path, mode: False)  # as root, permission bits never refuse
    line = refused_line(["--out-dir", str(tmp_path / "new" / "run")], capsys)
    assert line == f"error: --out-dir {tmp_path / 'new' / 'run'}: {tmp_path} is not writable by this user; choose another --out-dir"
    assert (tmp_path / "file").read_text() == "x" and not (tmp_path / "new").exists()


def test_a_bad_flag_from_the_command_line_exits_2_with_one_line(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "prerl.py", "--lr", "-1", "--out-dir", str(out)], capture_output=True,
                          text=True, timeout=120, cwd=os.path.dirname(os.path.abspath(prerl.__file__)))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == ["error: --lr -1.0: AdamW needs a positive learning rate, e.g. 2e-5"]
    assert not out.exists()


def test_metrics_are_cut_back_to_the_checkpoint_and_a_half_line_is_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": s / 10}) + "\n" for s in range(5)]
    path.write_text("".join(lines) + '{"step": 5, "lo')
    assert [m["step"] for m in prerl.read_metrics(path)] == [0, 1, 2, 3, 4]
    with prerl.open_metrics(str(path), 3) as log:
        log.write(json.dumps({"step": 3}) + "\n")
    assert path.read_text() == "".join(lines[:3]) + json.dumps({"step": 3}) + "\n"  # the kept lines byte for byte
    prerl.open_metrics(str(path), 0).close()  # a fresh run starts an empty log
    assert path.read_text() == "" and not list(tmp_path.glob("*.tmp*"))


def test_resume_command_rebuilds_the_run(tmp_path):
    cfg = prerl.parse_config(["--out-dir", str(tmp_path / "o u t"), "--mode", "grpo", "--lr", "1e-3", "--plain", "--steps", "7"])
    words = prerl.resume_command(cfg).split(" ")
    assert words[:2] == ["python", "prerl.py"] and words[-1] == "--resume"
    import shlex
    assert prerl.parse_config(shlex.split(prerl.resume_command(cfg))[2:]) == dataclasses_replace(cfg, resume=True)


def dataclasses_replace(cfg, **changes):
    import dataclasses
    return dataclasses.replace(cfg, **changes)


def test_resume_with_other_settings_names_the_fields_and_steps_may_only_grow(tiny_model_folder, tmp_path, capsys):
    out = tmp_path / "run"
    prerl.train(prerl.parse_config(run_args(tiny_model_folder, out, "--steps", "2", "--eval-size", "0")))
    capsys.readouterr()
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    line = refused_line(run_args(tiny_model_folder, out, "--steps", "3", "--resume", "--mode", "grpo", "--group-size", "4"), capsys)
    assert line.startswith(f"error: --resume: the checkpoint in {out} was trained with ") and "--mode dsrl (now grpo)" in line
    assert "--group-size 8 (now 4)" in line and "--steps" not in line
    line = refused_line(run_args(tiny_model_folder, out, "--steps", "1", "--resume"), capsys)
    assert line == f"error: --steps 1: the checkpoint in {out} is already at step 2; use --steps 2 or more"
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # refusals write nothing
    prerl.parse_config(run_args(tiny_model_folder, out, "--steps", "5", "--resume", "--eval-every", "2"))  # allowed


# A changed value for each setting that changes what a run trains: its model, data, method, sampling or
# optimisation. A resumed run continuing with any of them would mix two runs under one name.
CHANGES_WHAT_IS_TRAINED = {
    "model": "other/model", "data": "other.jsonl", "tasks": "add", "difficulty": 2, "seed": 1,
    "mode": "grpo", "switch_step": 3, "prerl_coef": 0.02, "w_reinforce_lambda": 0.2, "clip_eps_low": 0.1,
    "clip_eps_high": 0.3, "kl_coef": 0.1,
    "prompts_per_step": 4, "group_size": 8, "max_new_tokens": 7, "temperature": 0.9, "top_p": 0.9,
    "lr": 1e-4, "weight_decay": 0.0, "grad_clip": 0.5, "lora": 4, "lora_alpha": 8.0, "lora_targets": "q_proj",
}


@pytest.mark.parametrize("field,value", CHANGES_WHAT_IS_TRAINED.items(), ids=list(CHANGES_WHAT_IS_TRAINED))
def test_resume_refuses_every_setting_that_changes_what_is_trained(field, value, tmp_path):
    """--resume with another sampling temperature (or any setting in the table) is refused, naming the
    checkpoint's value and the new one; the same settings resume."""
    cfg = prerl.Config(out_dir=str(tmp_path), resume=True, steps=4)
    model = tiny_model(torch.float32)
    prerl.save_checkpoint(str(tmp_path / "checkpoint.pt"), model, prerl.make_optimizer(model, cfg), 2, cfg)
    assert prerl.resume_problem(cfg) is None
    assert getattr(cfg, field) != value
    problem = prerl.resume_problem(dataclasses_replace(cfg, **{field: value}))
    assert problem is not None and f"--{field.replace('_', '-')} {getattr(cfg, field)} (now {value})" in problem, problem

def test_resume_checks_only_a_resumed_run_and_steps_may_equal_the_checkpoints(tmp_path):
    """Without --resume, or with no checkpoint yet, there is nothing to compare; --steps may equal the
    checkpoint's step (nothing left to train) but not fall below it."""
    cfg = prerl.Config(out_dir=str(tmp_path), resume=True, steps=2, temperature=0.9)
    assert prerl.resume_problem(cfg) is None                                  # no checkpoint yet
    model = tiny_model(torch.float32)
    prerl.save_checkpoint(str(tmp_path / "checkpoint.pt"), model, prerl.make_optimizer(model, cfg), 2, cfg)
    assert prerl.resume_problem(cfg) is None                                  # --steps 2 at step 2
    assert prerl.resume_problem(dataclasses_replace(cfg, resume=False, temperature=0.5)) is None
    assert prerl.resume_problem(dataclasses_replace(cfg, steps=1)).startswith("--steps 1: ")
    assert prerl.resume_problem(dataclasses_replace(cfg, temperature=0.5, top_p=0.9)) == (
        f"--resume: the checkpoint in {tmp_path} was trained with --temperature 0.9 (now 0.5), --top-p 1.0 (now 0.9); "
        "pass the checkpoint's values, or choose a new --out-dir for a new run")   # every changed field, in one line
    (tmp_path / "checkpoint.pt").write_bytes(b"garbage")
    unreadable = prerl.resume_problem(cfg)        # names the error torch raised (mmap's, or pickle's without mmap)
    assert unreadable.startswith(f"--resume: checkpoint {tmp_path / 'checkpoint.pt'} is unreadable (")
    assert unreadable.split(" is unreadable (")[1].split(":")[0] in ("RuntimeError", "UnpicklingError"), unreadable

# --- Checkpoints in one process: what save_checkpoint writes and load_checkpoint puts back (the resume
# tests above and below run prerl as a command; these call the two functions directly).

def updated_once(dtype=torch.float32, seed=0, lora=0):
    """A tiny model (LoRA's adapters on it with lora > 0), its optimizer and config after one update, so
    that the AdamW moments and step count are not their initial values."""
    import machinery
    cfg = prerl.Config(lora=lora, lr=1e-2)
    model = tiny_model(dtype, seed=seed)
    if lora:
        model = machinery.add_lora(model, lora, 8.0, "all-linear", seed=seed)
    optimizer = prerl.make_optimizer(model, cfg)
    batch = toy_batch(seed=seed)
    prerl.conditional_logprobs(model, batch["prompt_ids"], batch["prompt_mask"], batch["response_ids"],
                               batch["response_mask"]).sum().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model, optimizer, cfg


def same(a, b):
    """Equal nested states: tensors bit for bit (and dtype), everything else by ==."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def draws():
    """The next numbers of Python's and torch's random streams (what a resumed run draws next)."""
    return random.random(), torch.rand(3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_checkpoint_restores_the_weights_optimizer_step_and_random_streams(dtype, tmp_path):
    """save_checkpoint at step 5, then load_checkpoint into another model and optimizer: the same weights,
    AdamW moments and step count, step 5 returned, and both random streams continue where the save left
    them; nothing but checkpoint.pt is left in the folder (written to a temporary, then renamed)."""
    model, optimizer, cfg = updated_once(dtype)
    path = str(tmp_path / "checkpoint.pt")
    random.seed(7)
    torch.manual_seed(7)
    prerl.save_checkpoint(path, model, optimizer, 5, cfg)
    after_save = draws()
    assert os.listdir(tmp_path) == ["checkpoint.pt"]
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert state["step"] == 5 and state["config"] == dataclasses.asdict(cfg) and state["rng"]["cuda"] is None
    other, other_optimizer, _ = updated_once(dtype, seed=1)          # other weights, other moments
    assert not same(other.state_dict(), model.state_dict())
    random.seed(99)
    torch.manual_seed(99)
    assert prerl.load_checkpoint(path, other, other_optimizer) == 5
    assert same(draws(), after_save)
    assert same(other.state_dict(), model.state_dict())
    assert same(other_optimizer.state_dict(), optimizer.state_dict())
    assert other_optimizer.state_dict()["state"][0]["exp_avg"].abs().sum() > 0     # moments, not zeros


def test_loading_weights_alone_leaves_the_random_streams_and_returns_the_step(tmp_path):
    """Without an optimizer (evaluation, export) only the weights load: the caller's random streams go on
    as they were, and the step is still returned."""
    model, optimizer, cfg = updated_once()
    path = str(tmp_path / "checkpoint.pt")
    prerl.save_checkpoint(path, model, optimizer, 3, cfg)
    other = tiny_model(torch.float32, seed=2)          # (seeds torch itself: built before the streams are set)
    random.seed(11)
    torch.manual_seed(11)
    expected = draws()
    random.seed(11)
    torch.manual_seed(11)
    assert prerl.load_checkpoint(path, other) == 3
    assert same(draws(), expected) and same(other.state_dict(), model.state_dict())


def test_a_checkpoint_carries_the_cuda_generators_where_cuda_is_present(tmp_path, monkeypatch):
    """On a GPU machine the checkpoint also holds every CUDA generator's state and a resume puts it back
    (CUDA stubbed here: its generator states are a stand-in list, their restores recorded). A checkpoint
    saved without CUDA restores none, and one loaded without CUDA leaves the saved states alone."""
    model, optimizer, cfg = updated_once()
    cuda_states, restored = [torch.arange(8, dtype=torch.uint8)], []
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: cuda_states)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    for cuda, name in [(True, "gpu.pt"), (False, "cpu.pt")]:
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        prerl.save_checkpoint(str(tmp_path / name), model, optimizer, 1, cfg)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert same(torch.load(tmp_path / "gpu.pt", weights_only=True)["rng"]["cuda"], cuda_states)
    assert prerl.load_checkpoint(str(tmp_path / "gpu.pt"), model, optimizer) == 1       # CUDA present
    assert len(restored) == 1 and same(restored[0], cuda_states)
    prerl.load_checkpoint(str(tmp_path / "cpu.pt"), model, optimizer)                  # saved without CUDA
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    prerl.load_checkpoint(str(tmp_path / "gpu.pt"), model, optimizer)                  # loaded without CUDA
    assert len(restored) == 1


def test_a_checkpoint_that_does_not_fit_is_refused_in_one_line(tmp_path):
    """Weights of the other precision name the --precision to resume with; another model's weights, or a
    file that is not a checkpoint, name the file; the model is left as it was."""
    path = str(tmp_path / "checkpoint.pt")
    for saved, loaded, flag in ((torch.bfloat16, torch.float32, "--precision bf16"), (torch.float32, torch.bfloat16, "--precision fp32")):
        model, optimizer, cfg = updated_once(saved)
        prerl.save_checkpoint(path, model, optimizer, 1, cfg)
        other = tiny_model(loaded, seed=1)
        before = {k: v.clone() for k, v in other.state_dict().items()}
        with pytest.raises(SystemExit, match=f"error: checkpoint {path} holds {saved} weights, this run {loaded}: resume with {flag}$"):
            prerl.load_checkpoint(path, other, prerl.make_optimizer(other, cfg))
        assert same(other.state_dict(), before)
    model, optimizer, cfg = updated_once()
    prerl.save_checkpoint(path, model, optimizer, 1, cfg)
    from transformers import LlamaConfig, LlamaForCausalLM
    bigger = LlamaForCausalLM(LlamaConfig(vocab_size=model.config.vocab_size, hidden_size=48, intermediate_size=64,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(SystemExit, match=f"error: checkpoint {path} is unreadable or does not fit this model: RuntimeError: "):
        prerl.load_checkpoint(path, bigger, prerl.make_optimizer(bigger, cfg))
    state = torch.load(path, weights_only=True)
    del state["model"]["lm_head.weight"]                    # a checkpoint missing one of the model's weights
    torch.save(state, path)
    with pytest.raises(SystemExit, match=f"error: checkpoint {path} is unreadable or does not fit this model: RuntimeError: "
                       ".*Missing key.*lm_head.weight") as refusal:
        prerl.load_checkpoint(path, tiny_model(torch.float32))
    assert "\n" not in str(refusal.value)
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match=f"error: checkpoint {path} is unreadable or does not fit this model: "):
        prerl.load_checkpoint(path, tiny_model(torch.float32))


@pytest.mark.parametrize("rank", [1, 4])
def test_a_lora_checkpoint_holds_the_adapter_alone_and_loads_into_the_base_model(rank, tmp_path):
    """With --lora the checkpoint holds only the adapter's tensors (and their moments); adapter_only loads
    them into a LoRA model whose base weights stay as loaded, and refuses a model without adapters."""
    pytest.importorskip("peft")
    model, optimizer, cfg = updated_once(lora=rank)
    path = str(tmp_path / "checkpoint.pt")
    prerl.save_checkpoint(path, model, optimizer, 2, cfg)
    saved = torch.load(path, map_location="cpu", weights_only=True)["model"]
    adapter = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert saved.keys() == adapter.keys() and same(saved, adapter)
    other, other_optimizer, _ = updated_once(lora=rank, seed=1)
    base = {k: v.clone() for k, v in other.state_dict().items() if "lora_" not in k}
    assert prerl.load_checkpoint(path, other, other_optimizer, adapter_only=True) == 2
    state = other.state_dict()
    assert same({k: v for k, v in state.items() if "lora_" in k}, adapter)
    assert same({k: v for k, v in state.items() if "lora_" not in k}, base)
    assert same(other_optimizer.state_dict(), optimizer.state_dict())
    with pytest.raises(SystemExit, match=f"error: checkpoint {path} is unreadable or does not fit this model: KeyError: .*lora_A"):
        prerl.load_checkpoint(path, tiny_model(torch.float32), adapter_only=True)


def test_a_held_lock_refuses_and_a_dead_holders_lock_is_taken_over(tmp_path, capsys):
    """A child process holds run.lock as a live run does (lockf + its PID); while it lives, a run into the
    folder is refused naming it; once it is killed with -9 the lock is free and taken over."""
    (tmp_path / "run.lock").touch()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, json, os, socket, sys, time\n"
                               f"fd = os.open({str(tmp_path / 'run.lock')!r}, os.O_RDWR)\n"
                               "fcntl.lockf(fd, fcntl.LOCK_EX)\n"
                               "os.write(fd, json.dumps({'pid': os.getpid(), 'host': socket.gethostname(), 'started': 'now'}).encode())\n"
                               "print('held', flush=True)\ntime.sleep(120)\n"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        line = refused_line(["--out-dir", str(tmp_path)], capsys)
        assert line.startswith(f"error: --out-dir {tmp_path}: another run is using it (pid {holder.pid} on host ")
        with pytest.raises(SystemExit) as refusal, prerl.claim_out_dir(str(tmp_path)):
            pass
        assert refusal.value.code == 2
    finally:
        holder.kill()
        holder.wait(timeout=30)
    prerl.parse_config(["--out-dir", str(tmp_path)])
    with prerl.claim_out_dir(str(tmp_path)):
        assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
        assert f"from pid {holder.pid} on host" in capsys.readouterr().out  # the take-over is said
    assert (tmp_path / "run.lock").read_text() == ""  # released: empty, free


def nan_loss(monkeypatch):
    policy_loss = prerl.policy_loss
    monkeypatch.setattr(prerl, "policy_loss", lambda *args, **kwargs: policy_loss(*args, **kwargs) * float("nan"))


def test_a_non_finite_loss_skips_the_update_and_leaves_the_weights(monkeypatch):
    model, batch = tiny_model(torch.float32), toy_batch()
    rewards = torch.tensor([[1., 0., 0., 1.], [0., 1., 1., 1.]])
    cfg = prerl.Config(lr=1e-2)
    optimizer = prerl.make_optimizer(model, cfg)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with monkeypatch.context() as patch:
        nan_loss(patch)
        loss, kept = prerl.accumulate_gradients(model, batch, rewards, "grpo", cfg, start_id=1)
    assert math.isnan(loss) and kept > 0 and not torch.isfinite(flat_grad(model)).all()  # the grads are poisoned
    grad_norm = prerl.optimizer_step(model, optimizer, cfg, loss)
    assert prerl.nonfinite_reason(loss, grad_norm).startswith("non-finite loss nan")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    assert all(p.grad is None for p in model.parameters()) and not optimizer.state  # dropped, no Adam step
    loss, _ = prerl.accumulate_gradients(model, batch, rewards, "grpo", cfg, start_id=1)  # a good step still trains
    prerl.optimizer_step(model, optimizer, cfg, loss)
    assert math.isfinite(loss) and not all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())


def test_non_finite_steps_are_logged_and_three_in_a_row_stop_the_run(tiny_model_folder, tmp_path, monkeypatch, capsys):
    accumulate = prerl.accumulate_gradients
    monkeypatch.setattr(prerl, "accumulate_gradients", lambda *a, **k: (float("nan"), accumulate(*a, **k)[1]))
    with pytest.raises(SystemExit, match=r"steps 0\.\.2 all had a non-finite loss or gradient norm"):
        prerl.train(prerl.parse_config(run_args(tiny_model_folder, tmp_path, "--steps", "6", "--eval-size", "0")))
    metrics = prerl.read_metrics(tmp_path / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [0, 1, 2] and all(m["skipped"].startswith("non-finite loss nan") for m in metrics)
    assert "not measured (--eval-size 0)" in capsys.readouterr().out  # no evaluation is said, not 0.000
    assert not (tmp_path / "checkpoint.pt").exists() and (tmp_path / "run.lock").read_text() == ""


def test_the_non_finite_guard_stops_only_at_skipped_steps_in_a_row():
    """Skipped steps scattered through a run never stop it; NONFINITE_LIMIT of them in a row do, and the
    error names the first and last of them. A good step starts the count again."""
    cfg, limit = prerl.Config(out_dir="runs/x"), prerl.NONFINITE_LIMIT
    skipped = {"skipped": "non-finite loss nan"}
    pattern = ([True] * (limit - 1) + [False]) * 4            # 4 * (limit - 1) skipped steps, never limit in a row
    in_a_row, counts = 0, []
    for step, skip in enumerate(pattern):
        in_a_row = prerl.count_nonfinite_steps({"step": step, **(skipped if skip else {})}, in_a_row, cfg)
        counts.append(in_a_row)
    assert counts == ([*range(1, limit), 0]) * 4
    first = len(pattern)
    for step in range(first, first + limit - 1):
        in_a_row = prerl.count_nonfinite_steps({"step": step, **skipped}, in_a_row, cfg)
    with pytest.raises(SystemExit, match=rf"steps {first}\.\.{first + limit - 1} all had a non-finite"):
        prerl.count_nonfinite_steps({"step": first + limit - 1, **skipped}, in_a_row, cfg)

def test_exported_model_loads_anywhere_with_the_checkpoints_log_probs(tiny_model_folder, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import analyze
    result = prerl.train(prerl.parse_config(run_args(tiny_model_folder, tmp_path, "--steps", "2", "--save-every", "1",
                                                     "--eval-size", "0", "--lr", "1e-2", "--temperature", "1.5")))
    assert result == {"before": None, "after": None}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "metrics.jsonl", "model", "run.lock", "samples.jsonl"]
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32)
    assert (tmp_path / "model" / "generation_config.json").exists()
    assert AutoTokenizer.from_pretrained(tmp_path / "model")("1+2").input_ids == tiny_tokenizer()("1+2").input_ids
    checkpointed, _ = prerl.load_model(str(tiny_model_folder), torch.device("cpu"))
    start, _ = prerl.load_model(str(tiny_model_folder), torch.device("cpu"))
    prerl.load_checkpoint(str(tmp_path / "checkpoint.pt"), checkpointed)
    batch = toy_batch()
    with torch.no_grad():
        lps = [prerl.conditional_logprobs(m.eval(), batch["prompt_ids"], batch["prompt_mask"], batch["response_ids"],
                                          batch["response_mask"]) for m in (exported, checkpointed, start)]
    assert torch.equal(lps[0], lps[1]) and not torch.equal(lps[0], lps[2])  # the trained weights, exactly
    out = analyze.main(["eval", "--model", str(tmp_path / "model"), "--eval-data", str(tiny_model_folder / "toy.jsonl"),
                        "--eval-size", "2", "--n", "2", "--max-new-tokens", "4", "--json", str(tmp_path / "eval.json")])
    assert list(out) == [str(tmp_path / "model")] and out[str(tmp_path / "model")]["problems"] == 2


def fake_tracker(name, calls):
    """A stand-in for the wandb / trackio package: records what the run sends."""
    import importlib.machinery
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    run = types.SimpleNamespace(log=lambda values, step: calls.append((step, values)), finish=lambda: calls.append("finish"))
    module.init = lambda **kwargs: calls.append(("init", kwargs)) or run
    module.log, module.finish = run.log, run.finish
    return module


@pytest.mark.parametrize("tracker", ["wandb", "trackio"])
def test_report_to_sends_every_metrics_record(tracker, tiny_model_folder, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, tracker, fake_tracker(tracker, calls))
    prerl.train(prerl.parse_config(run_args(tiny_model_folder, tmp_path, "--steps", "3", "--switch-step", "2",
                                            "--eval-every", "2", "--report-to", tracker)))
    assert calls[0][0] == "init" and calls[0][1]["config"]["steps"] == 3 and calls[-1] == "finish"
    if tracker == "wandb":
        assert calls[0][1]["mode"] == os.environ.get("WANDB_MODE", "offline")
    sent = calls[1:-1]
    metrics = prerl.read_metrics(tmp_path / "metrics.jsonl")
    assert sent[0][0] == 0 and set(sent[0][1]) == {"eval_accuracy"} and sent[-1][0] == 3  # before and after
    for record, (step, values) in zip(metrics, sent[1:-1]):
        assert step == record["step"] and values["grad_norm"] == record["grad_norm"]
        assert values["pretrain_space"] == (1.0 if record["stage"] == "nsr-prerl" else 0.0)
    assert len(sent) == len(metrics) + 2 and "eval_accuracy" in sent[2][1]


def test_report_to_tensorboard_writes_the_scalars(tiny_model_folder, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    prerl.train(prerl.parse_config(run_args(tiny_model_folder, tmp_path, "--steps", "2", "--eval-size", "0",
                                            "--report-to", "tensorboard")))
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    metrics = prerl.read_metrics(tmp_path / "metrics.jsonl")
    assert [(e.step, e.value) for e in events.Scalars("reward_mean")] == [(m["step"], pytest.approx(m["reward_mean"])) for m in metrics]


def test_plot_draws_a_png_or_says_matplotlib_is_missing(tmp_path, monkeypatch):
    import analyze
    stages = ["nsr-prerl"] * 3 + ["grpo"] * 3
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(
        {"step": s, "stage": st, "reward_mean": s / 10, "response_length": 5 + s, "grad_norm": 1.0, **({"eval_accuracy": 0.5} if s % 2 else {})})
        + "\n" for s, st in enumerate(stages)) + '{"step": 6, "sta')
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "matplotlib", None)  # as if not installed
        with pytest.raises(SystemExit, match="needs matplotlib, which is not installed: pip install matplotlib"):
            analyze.main(["plot", str(tmp_path)])
    with pytest.raises(SystemExit, match="no metrics.jsonl"):
        analyze.main(["plot", str(tmp_path / "nothing")])
    pytest.importorskip("matplotlib")
    assert analyze.main(["plot", str(tmp_path)]) == str(tmp_path / "metrics.png")
    assert (tmp_path / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_first_signal_asks_to_stop_second_interrupts_at_once():
    previous = signal.getsignal(signal.SIGINT)
    with prerl.stop_signals() as stop:
        assert stop.signal is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signal == signal.SIGTERM  # asked to stop after the step: nothing raised
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # (the handler runs between bytecodes; never reached)
    assert signal.getsignal(signal.SIGINT) is previous  # restored


# --- real processes: kill -9, a second run, Ctrl-C (the tiny model; each start imports torch)

REPO = os.path.dirname(os.path.abspath(prerl.__file__))
CRASH_ARGS = ("--save-every", "2", "--eval-size", "0", "--lr", "1e-2", "--temperature", "1.5")


def launch(folder, out, *extra):
    """prerl.py in its own process, its output in a file (a pipe could fill and block it)."""
    out.mkdir(parents=True, exist_ok=True)
    log = open(out.parent / f"{out.name}.log", "w")
    return subprocess.Popen([sys.executable, "prerl.py", *run_args(folder, out, *extra)], cwd=REPO, stdout=log, stderr=log)


def wait_for(condition, process, timeout=240):
    start = time.monotonic()
    while not condition():
        assert process.poll() is None, f"the run ended early with code {process.returncode}"
        assert time.monotonic() - start < timeout, "timed out waiting for the run"
        time.sleep(0.05)


def children_of(pid):
    kids = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry))
        except (OSError, IndexError, ValueError):
            pass
    return kids


def kill_all(process, kids):
    for pid in [process.pid, *kids]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(timeout=60)


def lines_of(path):
    return len(open(path).readlines()) if os.path.exists(path) else 0


def test_kill_9_then_resume_equals_an_uninterrupted_run_and_the_lock_is_taken_over(tiny_model_folder, tmp_path, capsys):
    out, straight = tmp_path / "killed", tmp_path / "straight"
    first = launch(tiny_model_folder, out, "--steps", "500", *CRASH_ARGS)
    kids = []
    try:
        wait_for(lambda: lines_of(out / "metrics.jsonl") >= 3 and (out / "checkpoint.pt").exists(), first)
        first.send_signal(signal.SIGSTOP)  # frozen but alive: the out-dir of a live run
        kids = children_of(first.pid)      # its verifier workers (their exit on the parent's death is verify.py's)
        files = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
        line = refused_line(run_args(tiny_model_folder, out, "--steps", "500", *CRASH_ARGS, "--resume"), capsys)
        assert line.startswith(f"error: --out-dir {out}: another run is using it (pid {first.pid} on host ")
        assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == files  # the second run wrote nothing
    finally:
        kill_all(first, kids)                # kill -9, as the OOM killer would
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 499, "rew')         # and a half-written last line
    steps = int(state_of(out / "checkpoint.pt")["step"]) + 1
    assert steps - 1 < lines_of(out / "metrics.jsonl")  # lines past the checkpoint, to be cut
    prerl.train(prerl.parse_config(run_args(tiny_model_folder, out, "--steps", str(steps), *CRASH_ARGS, "--resume")))
    assert f"from pid {first.pid} on host" in capsys.readouterr().out  # the dead run's lock, taken over
    prerl.train(prerl.parse_config(run_args(tiny_model_folder, straight, "--steps", str(steps), *CRASH_ARGS)))
    resumed, reference = state_of(out / "checkpoint.pt"), state_of(straight / "checkpoint.pt")
    assert all(torch.equal(tensor, resumed["model"][name]) for name, tensor in reference["model"].items())
    assert [m["step"] for m in prerl.read_metrics(out / "metrics.jsonl")] == list(range(steps))
    assert open(out / "metrics.jsonl").read().endswith("}\n")  # the half line is gone
    assert any(m["kept_tokens"] > 0 for m in prerl.read_metrics(straight / "metrics.jsonl"))  # weights did move


def test_ctrl_c_stops_after_the_step_with_a_checkpoint_and_the_run_resumes(tiny_model_folder, tmp_path):
    out = tmp_path / "stopped"
    run = launch(tiny_model_folder, out, "--steps", "500", *CRASH_ARGS)
    try:
        wait_for(lambda: lines_of(out / "metrics.jsonl") >= 1, run)
        run.send_signal(signal.SIGINT)
        assert run.wait(timeout=120) == 130
    finally:
        if run.poll() is None:
            kill_all(run, children_of(run.pid))
    printed = open(tmp_path / "stopped.log").read()
    assert "SIGINT: stopping after the current step" in printed and "Traceback" not in printed
    step = int(state_of(out / "checkpoint.pt")["step"])
    assert f"stopped by SIGINT with a checkpoint at step {step} in {out}; continue with:" in printed
    command = printed.split("continue with:\n")[1].splitlines()[0]
    assert command.startswith("    python prerl.py --") and command.endswith(" --resume") and "--steps 500" in command
    assert f" --model {tiny_model_folder} " in command
    assert lines_of(out / "metrics.jsonl") == step and (out / "run.lock").read_text() == ""  # log = checkpoint
    model, _ = prerl.load_model(str(out / "model"), torch.device("cpu"))  # the export loads too
    assert prerl.load_checkpoint(str(out / "checkpoint.pt"), model) == step
    prerl.train(prerl.parse_config(run_args(tiny_model_folder, out, "--steps", str(step + 1), *CRASH_ARGS, "--resume")))
    assert [m["step"] for m in prerl.read_metrics(out / "metrics.jsonl")] == list(range(step + 1))
