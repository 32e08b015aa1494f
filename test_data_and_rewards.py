"""
Tests of your own data and reward, what the model wrote, and a run that says why it is not learning:
every data format read from a small file written here (bad rows refused with file, row and field), a
user's reward function in the verifier's workers (timeout, exception, non-number), samples.jsonl across
kill -9 and --resume, the preflight, the stall lines, and the run-safety leftovers.

    python -m pytest -q test_data_and_rewards.py
"""

import json
import os
import sys

import pytest
import torch

import analyze
import machinery
import prerl
from conftest import refused_line, run_args, state_of, tiny_model, tiny_tokenizer

# ---------------------------------------------------------------------------
# Data formats: JSONL (MATH, GSM8K, verl), verl Parquet, a datasets folder; --problem-key / --answer-key


def verl_row(i, answer):
    return {"data_source": "toy", "prompt": [{"role": "system", "content": "sys"}, {"role": "user", "content": f"what is {i}+1?"}],
            "ability": "MATH", "reward_model": {"ground_truth": answer, "style": "rule"}, "extra_info": {"index": i}}


VERL_ROWS = [verl_row(i, str(i + 1)) for i in range(3)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def write_parquet(path, rows):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow
    pq.write_table(pyarrow.Table.from_pylist(rows), path)
    return str(path)


def write_dataset_folder(path, rows, split=None):
    datasets = pytest.importorskip("datasets")
    dataset = datasets.Dataset.from_list(rows)
    (datasets.DatasetDict({split: dataset}) if split else dataset).save_to_disk(str(path))
    return str(path)


def check_verl_problems(problems, source):
    assert [p["answer"] for p in problems] == ["1", "2", "3"]
    assert problems[1]["messages"] == VERL_ROWS[1]["prompt"] and problems[1]["problem"] == "what is 1+1?"
    assert problems[2]["row"]["extra_info"] == {"index": 2} and problems[0]["row"]["data_source"] == "toy"
    assert {p["source"] for p in problems} == {source}


def test_verl_rows_from_jsonl_parquet_and_a_datasets_folder(tmp_path):
    check_verl_problems(prerl.load_problems(write_jsonl(tmp_path / "v.jsonl", VERL_ROWS)), "JSONL (verl)")
    check_verl_problems(prerl.load_problems(write_parquet(tmp_path / "v.parquet", VERL_ROWS)), "Parquet (verl)")
    check_verl_problems(prerl.load_problems(write_dataset_folder(tmp_path / "folder", VERL_ROWS)), "datasets folder (verl)")
    dict_folder = write_dataset_folder(tmp_path / "splits", VERL_ROWS, split="train")
    check_verl_problems(prerl.load_problems(dict_folder), "datasets folder, split train (verl)")   # the only split
    check_verl_problems(prerl.load_problems(dict_folder, split="train"), "datasets folder, split train (verl)")
    with pytest.raises(SystemExit, match=r"choose a split with --data-split / --eval-split: train"):
        prerl.load_problems(dict_folder, split="test")


def test_held_out_problems_come_from_their_split_and_columns(tmp_path):
    """--eval-data read with --eval-split and the --problem-key / --answer-key columns, cut at --eval-size."""
    datasets = pytest.importorskip("datasets")
    rows = lambda n: [{"q": f"what is {i}+{n}?", "a": str(i + n)} for i in range(3)]
    folder = str(tmp_path / "splits")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows(10)), "test": datasets.Dataset.from_list(rows(20))}).save_to_disk(folder)
    cfg = prerl.parse_config(["--eval-data", folder, "--eval-split", "test", "--problem-key", "q", "--answer-key", "a",
                              "--eval-size", "2", "--out-dir", str(tmp_path / "out")])
    assert [(p["problem"], p["answer"]) for p in prerl.eval_problems(cfg)] == [("what is 0+20?", "20"), ("what is 1+20?", "21")]


def test_math_and_gsm8k_jsonl_and_other_column_names(tmp_path):
    path = write_jsonl(tmp_path / "g.jsonl", [{"question": "q", "answer": "so... #### 1,234"}, {"problem": "p", "solution": "$\\boxed{7}$"}])
    assert [(p["problem"], p["answer"], p["source"]) for p in prerl.load_problems(path)] == [
        ("q", "1234", "JSONL (GSM8K)"), ("p", "7", "JSONL (GSM8K)")]     # the header names the first row's schema
    assert prerl.load_problems(write_jsonl(tmp_path / "m.jsonl", [{"problem": "p", "answer": 5}]))[0]["source"] == "JSONL (MATH)"
    path = write_jsonl(tmp_path / "own.jsonl", [{"input": {"text": "1+1?"}, "target": {"value": 2}, "id": 7}])
    cfg = prerl.Config(problem_key="input.text", answer_key="target.value")
    [problem] = prerl.load_problems(path, cfg)
    assert (problem["problem"], problem["answer"], problem["row"]["id"]) == ("1+1?", "2", 7)
    cfg = prerl.Config(problem_key="prompt", answer_key="extra_info.index")   # a verl prompt under a named key
    assert [p["answer"] for p in prerl.load_problems(write_jsonl(tmp_path / "v.jsonl", VERL_ROWS), cfg)] == ["0", "1", "2"]


# (a change to the second row, the message; whether a Parquet / datasets column can hold it: a column has one type)
BAD_VERL = [
    ({"prompt": 5}, "field 'prompt' missing or empty", False),
    ({"prompt": []}, "field 'prompt' must be a non-empty list of chat messages", True),
    ({"prompt": [{"role": "user"}]}, "field 'prompt' must be a non-empty list of chat messages", True),
    ({"reward_model": {"style": "rule"}}, "field 'reward_model.ground_truth' missing", True),
    ({"reward_model": {"ground_truth": ["2", "3"]}}, "field 'reward_model.ground_truth' missing, empty or not a string", False),
]


@pytest.mark.parametrize("change,message,tabular", BAD_VERL)
@pytest.mark.parametrize("kind", ["jsonl", "parquet", "folder"])
def test_a_bad_verl_row_is_refused_with_its_file_row_and_field(kind, change, message, tabular, tmp_path):
    rows = [verl_row(0, "1"), {**verl_row(1, "2"), **change}]
    if kind != "jsonl" and not tabular:
        pytest.skip("a Parquet or datasets column has one type: this row cannot be written there")
    if kind == "jsonl":
        path, where = write_jsonl(tmp_path / "bad.jsonl", rows), "bad.jsonl:2"
    elif kind == "parquet":
        path, where = write_parquet(tmp_path / "bad.parquet", rows), "bad.parquet row 1"
    else:
        path, where = write_dataset_folder(tmp_path / "bad", rows), "bad row 1"
    with pytest.raises(SystemExit, match=f"error: .*{where}: {message}"):
        prerl.load_problems(path)


def test_a_missing_column_and_missing_packages_are_named(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "own.jsonl", [{"input": "1+1?", "target": "2"}, {"input": "2+2?"}])
    with pytest.raises(SystemExit, match=r"own\.jsonl:2: field 'target' missing"):
        prerl.load_problems(path, prerl.Config(problem_key="input", answer_key="target"))
    with pytest.raises(SystemExit, match=r"own\.jsonl:1: field 'question' missing"):
        prerl.load_problems(path, prerl.Config(problem_key="question", answer_key="target"))
    (tmp_path / "t.parquet").write_bytes(b"not parquet")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)     # as if pyarrow were not installed
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(SystemExit, match=r"^error: reading .*t\.parquet \(Parquet\) needs the optional pyarrow package: pip install pyarrow$"):
        prerl.load_problems(str(tmp_path / "t.parquet"))
    monkeypatch.setitem(sys.modules, "datasets", None)
    (tmp_path / "folder").mkdir()
    with pytest.raises(SystemExit, match=r"needs the optional datasets package: pip install datasets"):
        prerl.load_problems(str(tmp_path / "folder"))


def test_data_flags_a_hub_id_needs_a_split(tmp_path, capsys):
    line = refused_line(["--data", "some/dataset", "--out-dir", str(tmp_path / "out")], capsys)
    assert line.startswith("error: --data some/dataset: no such file or folder") and "--data-split" in line
    prerl.parse_config(["--data", "some/dataset", "--data-split", "train", "--out-dir", str(tmp_path / "out")])
    assert refused_line(["--eval-data", "x/y", "--out-dir", str(tmp_path / "o")], capsys).startswith("error: --eval-data x/y")


def test_a_verl_prompt_goes_through_the_chat_template_as_given():
    tokenizer = tiny_tokenizer()
    problem = prerl.problem_from_row(VERL_ROWS[0], "row 0")
    assert prerl.format_prompt(tokenizer, problem) == "sys\n\nProblem: what is 0+1?\nSolution:"   # no template: plain
    tokenizer.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    assert prerl.format_prompt(tokenizer, problem) == "<system>sys<user>what is 0+1?<assistant>"     # no system prompt added
    problem = prerl.problem_from_row({"problem": "2+2?", "answer": "4"}, "row 0")
    assert prerl.format_prompt(tokenizer, problem) == f"<system>{prerl.SYSTEM_PROMPT}<user>2+2?<assistant>"
    tokenizer.chat_template = None                   # plain text: every message but the last, then the problem
    alone = {"problem": "q", "answer": "1", "messages": [{"role": "user", "content": "what is 2+3?"}]}
    assert prerl.format_prompt(tokenizer, alone) == "Problem: what is 2+3?\nSolution:"
    shot = {"problem": "q", "answer": "1", "messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "1+1?"},
                                                        {"role": "assistant", "content": "2"}, {"role": "user", "content": "2+3?"}]}
    assert prerl.format_prompt(tokenizer, shot) == "sys\n\n1+1?\n\n2\n\nProblem: 2+3?\nSolution:"


# ---------------------------------------------------------------------------
# Your own reward: function(completion, answer, row) -> float, in the verifier's workers


REWARDS = '''
import math, time
def length(completion, answer, row):
    return len(completion) / 10 + (row.get("bonus", 0) if isinstance(row, dict) else 0)
def exact(completion, answer, row):
    return completion.strip() == answer
def slow(completion, answer, row):
    if completion == "slow":
        time.sleep(60)
    return 1.0
def broken(completion, answer, row):
    return 1 / 0
def text(completion, answer, row):
    return "1.0"
def nan(completion, answer, row):
    return math.nan
'''


@pytest.fixture
def reward_file(tmp_path):
    path = tmp_path / "my_reward.py"
    path.write_text(REWARDS)
    return str(path)


def test_a_user_reward_gets_completion_answer_and_row(reward_file):
    problems = [{"problem": "p", "answer": "3", "row": {"bonus": 1}}, {"problem": "q", "answer": "4"}]
    cfg = prerl.Config(reward=f"{reward_file}:length")
    rewards, scored = prerl.score_responses(["ab", "abcd", "x", "\\boxed{4}"], problems, cfg, group_size=2)
    assert rewards.reshape(-1).tolist() == pytest.approx([1.2, 1.4, 0.1, 0.9])  # the row as read; a built-in problem is its own row
    assert scored == {"answers": ["ab", "abcd", "x", "4"], "timeouts": 0, "audit": {}, "disagreements": []}
    cfg = prerl.Config(reward=f"{reward_file}:exact", format_reward=0.25)   # True -> 1.0, plus the format term
    rewards, _ = prerl.score_responses(["3", "so \\boxed{5}"], problems[:1], cfg, group_size=2)
    assert rewards.tolist() == [[1.25, 0.25]]
    rewards, _ = prerl.score_responses(["3", "so \\boxed{5}"], problems[:1], cfg, group_size=2, with_format=False)
    assert rewards.tolist() == [[1.0, 0.0]]


def test_a_user_reward_that_times_out_scores_0_and_is_counted(reward_file):
    cfg = prerl.Config(reward=f"{reward_file}:slow")
    rewards, scored = prerl.score_responses(["slow", "fast"], [{"problem": "p", "answer": "1"}], cfg, group_size=2)
    assert rewards.tolist() == [[0.0, 1.0]] and scored["timeouts"] == 1


@pytest.mark.parametrize("name,message", [
    ("broken", r"(?s)--reward .*:broken raised an exception .* on the row \{\"bonus\": 7\} and the completion \"abc\":\n"
               r"Traceback .*ZeroDivisionError"),
    ("text", r"--reward .*:text returned str '1\.0', not a finite number, on the row \{\"bonus\": 7\}"),
    ("nan", r"--reward .*:nan returned float nan, not a finite number"),
])
def test_a_user_reward_that_raises_or_returns_a_non_number_stops_the_run_with_the_row(reward_file, name, message):
    with pytest.raises(SystemExit, match=message):
        prerl.score_responses(["abc"], [{"problem": "p", "answer": "1", "row": {"bonus": 7}}], prerl.Config(reward=f"{reward_file}:{name}"))


def test_reward_flags_are_checked_before_the_run(reward_file, tmp_path, capsys, monkeypatch):
    out = ["--out-dir", str(tmp_path / "out")]
    assert refused_line(["--reward", f"{reward_file}:missing", *out], capsys) == f"error: --reward {reward_file}:missing: {reward_file} has no function missing"
    assert refused_line(["--reward", "nofile.py:f", *out], capsys) == "error: --reward nofile.py:f: no such file nofile.py"
    assert refused_line(["--reward", "no_such_module_xyz:f", *out], capsys).startswith("error: --reward no_such_module_xyz:f: ModuleNotFoundError")
    assert refused_line(["--format-reward", "0.5", *out], capsys).startswith("error: --format-reward 0.5: use 0 <= W < 0.5")
    assert refused_line(["--log-samples", "-1", *out], capsys).startswith("error: --log-samples -1")
    (tmp_path / "mod").mkdir()
    (tmp_path / "mod" / "my_module_reward.py").write_text(REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path / "mod"))
    prerl.parse_config(["--reward", "my_module_reward:exact", *out])          # module:function
    rewards, _ = prerl.score_responses(["1", "2"], [{"problem": "p", "answer": "1"}], prerl.Config(reward="my_module_reward:exact"), 2)
    assert rewards.tolist() == [[1.0, 0.0]]


# ---------------------------------------------------------------------------
# A run on verl Parquet data with a user reward: the header names the format, samples.jsonl, analyze.py samples


def test_a_run_on_verl_parquet_with_a_user_reward_logs_its_samples(tiny_model_folder, tmp_path, reward_file, capsys):
    data = write_parquet(tmp_path / "train.parquet", [verl_row(i, str(i + 1)) for i in range(4)])
    out = tmp_path / "run"
    prerl.train(prerl.parse_config(run_args(tiny_model_folder, out, "--data", data, "--eval-data", data, "--steps", "2",
                                            "--prompts-per-step", "3", "--group-size", "2", "--log-samples", "2",
                                            "--reward", f"{reward_file}:length", "--eval-size", "2")))
    printed = capsys.readouterr().out
    assert "4 train / 2 eval problems, Parquet (verl) / Parquet (verl)" in printed
    metrics = prerl.read_metrics(out / "metrics.jsonl")
    assert [m["reward_timeouts"] for m in metrics] == [0, 0] and all(m["reward_mean"] > 0 for m in metrics)
    groups = prerl.read_metrics(out / "samples.jsonl")
    assert [g["step"] for g in groups] == [0, 0, 1, 1] and all(len(g["responses"]) == 2 and g["audit"] == [] for g in groups)
    for g in groups:
        assert g["problem"].startswith("what is ") and g["gold"] == str(int(g["problem"].split()[2].split("+")[0]) + 1)
        for r in g["responses"]:
            assert r["reward"] == pytest.approx(len(r["text"]) / 10) and r["cut"] == (r["length"] == 6) and 1 <= r["length"] <= 6
    shown = analyze.main(["samples", str(out), "--step", "1"])
    text = capsys.readouterr().out
    assert shown == groups[2:] and text.count("=== step 1 | gold ") == 2 and text.count("--- response ") == 4
    with pytest.raises(SystemExit, match=r"--step 7: .* holds steps 0\.\.1"):
        analyze.main(["samples", str(out), "--step", "7"])


# ---------------------------------------------------------------------------
# Preflight: the reward on each training gold, the prompt format, the first evaluation, the GPU decoder check


def test_preflight_lists_golds_the_reward_cannot_score_and_a_prompt_without_chat_template(tiny_model_folder, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"problem": "a", "answer": "5"}, {"problem": "b", "answer": "x^{"},
                                              {"problem": "c", "answer": "1/2"}, {"problem": "d", "answer": "0.5"}])
    failures = prerl.gold_failures(prerl.load_problems(data), prerl.Config())
    assert failures == ["problem 1 (gold 'x^{'): its own gold scores 0",      # unparseable: trains nothing
                        "problem 3 (gold '0.5'): another problem's gold '1/2' scores 1"]   # (sorted golds: next after 0.5)
    out = tmp_path / "out"
    prerl.run_preflight(prerl.parse_config(run_args(tiny_model_folder, out, "--data", data, "--preflight", "--eval-size", "3")))
    printed = capsys.readouterr().out.splitlines()
    lines = [line for line in printed if line.startswith("preflight | ")]
    assert lines[0] == ("preflight | reward (verify.py): 2 of 4 training problems cannot be scored, so they train nothing "
                        "(fix their answers, or pass --answer-key or --reward):")
    assert lines[1:3] == ["preflight |     " + f for f in failures]
    assert lines[3].startswith("preflight | prompt: plain text, the tokenizer has no chat template: 'Please reason")
    assert lines[4].startswith("preflight | first evaluation: ") and "of 3 responses ended before --max-new-tokens 6" in lines[4]
    assert "held-out accuracy at step 0: " in "\n".join(printed) and not out.exists()     # --preflight writes nothing


def test_the_evaluation_preflight_predicts_groups_without_signal():
    cfg = prerl.Config(group_size=4, max_new_tokens=48)
    line = prerl.evaluation_preflight(0.5, [True, True, True, False], cfg)
    assert line == ("first evaluation: 75% of 4 responses ended before --max-new-tokens 48; base pass rate 0.500 -> at "
                    "--group-size 4, at least 12% of groups predicted all right or all wrong (no signal)")   # 2 x 0.5^4
    line = prerl.evaluation_preflight(0.05, [False, False, True], cfg)
    assert "at least 81% of groups" in line and "33% of 3 responses ended before" in line
    assert "try a larger --group-size, a higher --temperature, or easier data" in line
    assert "none (--eval-size 0)" in prerl.evaluation_preflight(None, [], cfg)


def test_the_static_decoder_check_falls_back_to_the_loop_on_a_mismatch_or_an_exception(monkeypatch):
    if prerl.PLAIN:
        pytest.skip("the static decoder is machinery: the plain path always decodes with the loop")
    model, tokenizer = tiny_model(torch.float32), tiny_tokenizer()
    cfg = prerl.Config(max_new_tokens=5)
    problems = [{"problem": f"what is {i}+1?", "answer": str(i + 1)} for i in range(3)]
    assert prerl.static_decoder_check(model, tokenizer, problems, cfg) is None          # CPU: the loop, nothing to check
    monkeypatch.setattr(machinery, "STATIC_DECODE", "on")                               # as on a GPU
    assert prerl.static_decoder_check(model, tokenizer, problems, cfg) == \
        "decoder: the static KV cache decoder agrees with the plain loop on 3 greedy prompts"
    assert machinery.static_decode_fits(model, torch.device("cpu"))                     # kept
    static_generate = machinery.static_generate

    def one_token_off(*args, **kwargs):
        out = static_generate(*args, **kwargs).clone()
        out[1, 0] = (out[1, 0] + 1) % 50 + 4
        return out
    monkeypatch.setattr(machinery, "static_generate", one_token_off)
    line = prerl.static_decoder_check(model, tokenizer, problems, cfg)
    assert line.startswith("decoder: the static KV cache decoder disagrees with the plain loop on 1 of 3 greedy prompts; "
                           "this run decodes with the plain loop")
    assert not machinery.static_decode_fits(model, torch.device("cpu"))                 # the rest of the run: the loop
    prerl.generate(model, *[torch.ones(1, 2, dtype=torch.long)] * 2, 1, 2, 0.0, 1.0, [2], 3)   # and it runs
    machinery.decode_with_loop(model, False)
    monkeypatch.setattr(machinery, "static_generate", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("CUDA graph capture")))
    line = prerl.static_decoder_check(model, tokenizer, problems, cfg)
    assert line.startswith("decoder: the static KV cache decoder failed (RuntimeError: CUDA graph capture); this run decodes")
    assert not machinery.static_decode_fits(model, torch.device("cpu"))


# ---------------------------------------------------------------------------
# Stall lines: a pure function over recent metrics records


def normal_records(n=20):
    return [{"step": s, "accuracy": 0.3 + s % 3 / 100, "mixed_groups": 3 + s % 2, "grad_norm": 0.5, "eos_share": 0.9,
             "response_length": 30 + s % 3, "entropy": (1.2 - s / 100) if s % 5 == 0 else None} for s in range(n)]


def forced(change, from_step=10, n=20):
    records = normal_records(n)
    for r in records[from_step:]:
        r.update(change(r))
    return records


STALLS = [
    ("no mixed groups", lambda r: {"mixed_groups": 0, "grad_norm": 0.0, "accuracy": 0.0},
     "no group had both right and wrong responses for 5 steps (accuracy 0.00)", "try a larger --group-size (now 4)"),
    ("gradient norm 0", lambda r: {"grad_norm": 0.0}, "the gradient norm was 0 for 5 steps although groups were mixed", "--prerl-coef"),
    ("cut at the length limit", lambda r: {"eos_share": 0.2}, "most responses ran into --max-new-tokens 48 for 5 steps (only 20%",
     "raise --max-new-tokens"),
    ("entropy collapse", lambda r: {"entropy": 0.01 if r["entropy"] is not None else None}, "entropy collapsed from 1.200 to 0.010",
     "a lower --lr"),
    ("length exploding", lambda r: {"response_length": 200}, "responses grew from 31 to 200 tokens", "a lower --lr"),
    ("length collapsing", lambda r: {"response_length": 5}, "responses shrank from 31 to 5 tokens", "samples.jsonl"),
]


@pytest.mark.parametrize("sign,change,says,flag", STALLS)
def test_each_stall_line_fires_when_its_sign_persists(sign, change, says, flag):
    cfg = prerl.Config()
    records = forced(change)
    signs = prerl.stall_signs(records, cfg)
    assert list(signs) == [sign] and says in signs[sign] and flag in signs[sign]
    if sign != "entropy collapse":   # measured every --diagnose-every steps: its own persistence rule
        assert prerl.stall_signs(forced(change, from_step=16), cfg) == {}     # 4 steps in a row: not yet
    if sign not in ("no mixed groups", "gradient norm 0"):                    # while the accuracy rises: normal
        assert prerl.stall_signs(forced(lambda r: {**change(r), "accuracy": 0.5}), cfg) == {}
        pretrain = forced(change)                                             # and in a pre-train-space stage
        assert prerl.stall_signs([{**r, "stage": "nsr-prerl"} for r in pretrain], cfg) == {}


def recorded_runs():
    """The metrics of real runs kept in results/ (the study: grpo, nsr-prerl and dsrl, 3 + 5 seeds, 20 steps)."""
    runs = []
    for name in ("study.json", "study_5seeds.json"):
        with open(os.path.join(os.path.dirname(os.path.abspath(prerl.__file__)), "results", name)) as f:
            runs += [run["metrics"] for mode in json.load(f)["runs"].values() for run in mode]
    return runs


def test_stall_lines_stay_silent_on_normal_runs_and_each_is_said_once(capsys):
    cfg = prerl.Config()
    records = normal_records(40)
    assert all(prerl.stall_signs(records[:k], cfg) == {} for k in range(1, 41))
    runs = recorded_runs()       # real runs that learn: responses cut at first, then 44 -> 10 tokens, entropy falling
    assert len(runs) == 24 and all(prerl.stall_signs(run[:k], cfg) == {} for run in runs for k in range(1, len(run) + 1))
    records = forced(lambda r: {"eos_share": 0.1}, from_step=10, n=20)
    said = set()
    for k in range(1, 21):
        said = prerl.print_stall_lines(records[:k], said, cfg)
    printed = capsys.readouterr().out
    assert printed.count("stall at step ") == 1 and "stall at step 14: most responses ran into --max-new-tokens" in printed


# ---------------------------------------------------------------------------
# samples.jsonl across kill -9 and --resume; a fresh run into an earlier run's folder; checkpoints


def test_samples_hold_each_step_once_after_kill_9_and_resume(tiny_model_folder, tmp_path):
    from test_run_safety import CRASH_ARGS, children_of, kill_all, launch, lines_of, wait_for
    out = tmp_path / "killed"
    run = launch(tiny_model_folder, out, "--steps", "500", "--log-samples", "2", *CRASH_ARGS)
    try:
        wait_for(lambda: lines_of(out / "metrics.jsonl") >= 3 and (out / "checkpoint.pt").exists(), run)
    finally:
        kill_all(run, children_of(run.pid))
    with open(out / "samples.jsonl", "a") as f:
        f.write('{"step": 499, "prob')           # a half-written last line
    step = int(state_of(out / "checkpoint.pt")["step"])
    assert lines_of(out / "samples.jsonl") > 2 * step     # lines past the checkpoint, to be cut
    prerl.train(prerl.parse_config(run_args(tiny_model_folder, out, "--steps", str(step + 2), "--log-samples", "2",
                                            *CRASH_ARGS, "--resume")))
    steps = [g["step"] for g in prerl.read_metrics(out / "samples.jsonl")]
    assert steps == [s for s in range(step + 2) for _ in range(2)] and open(out / "samples.jsonl").read().endswith("}\n")


def test_a_fresh_run_into_an_earlier_runs_folder_is_refused_unless_overwrite(tiny_model_folder, tmp_path, capsys):
    out = tmp_path / "run"
    prerl.train(prerl.parse_config(run_args(tiny_model_folder, out, "--steps", "1", "--eval-size", "0")))
    capsys.readouterr()
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    line = refused_line(run_args(tiny_model_folder, out, "--steps", "1"), capsys)
    assert line == (f"error: --out-dir {out} holds the checkpoint of an earlier run: continue it with --resume, "
                    f"replace it with --overwrite, or choose another --out-dir")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    prerl.parse_config(run_args(tiny_model_folder, out, "--steps", "1", "--overwrite"))
    prerl.parse_config(run_args(tiny_model_folder, out, "--steps", "1", "--preflight"))   # writes nothing: allowed
    state = torch.load(out / "checkpoint.pt", weights_only=True)     # our checkpoints hold tensors and plain values
    assert state["step"] == 1 and prerl.load_saved(str(out / "checkpoint.pt"))["config"]["steps"] == 1


def test_analyze_reads_a_lora_adapter_only_checkpoint(tiny_model_folder, tmp_path):
    pytest.importorskip("peft")
    if prerl.PLAIN:
        pytest.skip("LoRA needs the machinery")
    out = tmp_path / "lora"
    prerl.train(prerl.parse_config(run_args(tiny_model_folder, out, "--steps", "1", "--eval-size", "0", "--lora", "4",
                                            "--lr", "5e-2", "--temperature", "1.5")))
    saved = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    assert saved and all("lora" in name for name in saved)                              # the adapter only
    model, _ = analyze.load_for_analysis(str(tiny_model_folder), str(out / "checkpoint.pt"), torch.device("cpu"))
    weights = dict(model.named_parameters())
    assert all(torch.equal(weights[name].detach(), tensor) for name, tensor in saved.items() if name in weights)
    assert any(name in weights for name in saved)
