"""
Shared test helpers: a tiny Llama model and character tokenizer built from a config (no download), a toy
batch of groups, the hand-written loss the gradient tests compare with, and the tiny run folder.

Test files import what they need from here (`from conftest import tiny_model, ...`); pytest loads it first.
"""

import json
import math
import os

import pytest
import torch

import prerl
import verify

# ---------------------------------------------------------------------------
# A tiny model and tokenizer built here, from a config (no download)

CHARS = list("0123456789+-=?., abcdefghijklmnopqrstuvwxyzWQ\\{}")


def tiny_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, **{c: i + 4 for i, c in enumerate(CHARS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>", padding_side="left")


def rms_norm_full_precision(self, x):
    """LlamaRMSNorm upcasts to float32 inside; this keeps float64 so gradient checks can be tight."""
    return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)


def tiny_model(dtype=torch.float64, seed=0, tied=False):
    import types
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(CHARS) + 4, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=tied)
    model = LlamaForCausalLM(config).to(dtype)
    if dtype == torch.float64:
        for module in model.modules():
            if type(module).__name__ == "LlamaRMSNorm":
                module.forward = types.MethodType(rms_norm_full_precision, module)
    return model


def reference_logprobs(model, context, response):
    """Independent log P(y_t | context, y_<t): one plain forward per token, full log-softmax."""
    values = []
    for t in range(len(response)):
        ids = torch.tensor([context + response[:t]])
        logits = model(input_ids=ids).logits[0, -1]
        values.append(torch.log_softmax(logits, -1)[response[t]])
    return torch.stack(values)


# ---------------------------------------------------------------------------
# A toy batch of groups and the loss written out by hand, for the gradient tests

def toy_batch(n_groups=2, group=4, seed=1):
    gen = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(4, 40, (n_groups, 4), generator=gen).repeat_interleave(group, 0)
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_mask[:group, :1] = 0  # the first group's prompt is left-padded
    prompt_ids[:group, :1] = 3
    response_ids = torch.randint(4, 40, (n_groups * group, 6), generator=gen)
    lengths = torch.randint(2, 7, (n_groups * group,), generator=gen)
    response_mask = (torch.arange(6)[None, :] < lengths[:, None]).long()
    response_ids = torch.where(response_mask.bool(), response_ids, torch.full_like(response_ids, 3))
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "response_ids": response_ids, "response_mask": response_mask}


def hand_advantages(stage, rewards, lam=0.1):
    """Advantages written out with Python loops, independently of prerl.advantages_for."""
    out = []
    for group in rewards.tolist():
        mean = sum(group) / len(group)
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (len(group) - 1))
        for r in group:
            out.append({"grpo": (r - mean) / (std + 1e-6), "psr": 1.0 if r == 1 else 0.0, "nsr": -1.0 if r == 0 else 0.0,
                        "w-reinforce": lam if r == 1 else -1.0, "prerl": r - mean, "psr-prerl": max(r - mean, 0.0),
                        "nsr-prerl": min(r - mean, 0.0)}[stage])
    return out


def real_prompt(batch, i):
    """Row i's prompt tokens without its left padding."""
    return [t for t, m in zip(batch["prompt_ids"][i].tolist(), batch["prompt_mask"][i].tolist()) if m]


def hand_loss(model, batch, rewards, stage, coef):
    """coef * token-mean of -A_i log pi(y_t | context): plain per-token forward passes, Python sums."""
    advantages = hand_advantages(stage, rewards)
    pretrain = stage.endswith("prerl")
    total, tokens = 0.0, 0
    for i, a in enumerate(advantages):
        n = int(batch["response_mask"][i].sum())
        if pretrain and a == 0:
            continue  # PreRL: zero-advantage responses leave the denominator too
        tokens += n
        prompt = real_prompt(batch, i)
        context = [1] if pretrain else prompt
        total = total + (-a) * reference_logprobs(model, context, batch["response_ids"][i, :n].tolist()).sum()
    return coef * total / tokens


def flat_grad(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])

# ---------------------------------------------------------------------------
# bf16: the two neighbours a stochastic rounding may land on

def bf16_neighbours(x):
    """The two bf16 values around a positive float x, computed from its binade: 8 significant bits."""
    ulp = 2.0 ** (math.floor(math.log2(x)) - 7)
    below = math.floor(x / ulp) * ulp
    return below, below + ulp



# ---------------------------------------------------------------------------
# Fixtures: both code paths, the tiny model saved as a run folder, the flag-refusal check

@pytest.fixture(params=["machinery", "plain"])
def path(request, monkeypatch):
    """Run a test once through machinery.py and once through prerl.py's plain path."""
    monkeypatch.setattr(prerl, "PLAIN", request.param == "plain")
    return request.param


@pytest.fixture(scope="module")
def tiny_model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    tiny_model(torch.float32).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    write_sums(folder / "toy.jsonl", 4)
    return folder


def write_sums(path, n):
    """A JSONL file of the n x n problems 'what is a+b?' for a, b < n, with their answers."""
    path.write_text("".join(json.dumps({"problem": f"what is {a}+{b}?", "answer": str(a + b)}) + "\n"
                            for a in range(n) for b in range(n)))


def run_args(folder, out, *extra):
    return ["--model", str(folder), "--data", str(folder / "toy.jsonl"), "--eval-data", str(folder / "toy.jsonl"),
            "--out-dir", str(out), "--prompts-per-step", "16", "--group-size", "8", "--max-new-tokens", "6",
            "--eval-size", "4", "--eval-every", "0", "--lr", "1e-3", "--precision", "fp32", *extra]


def state_of(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def refused_line(argv, capsys):
    """Run parse_config on argv; it must refuse with exit code 2 and exactly one stderr line, 'error: ...'."""
    with pytest.raises(SystemExit) as refusal:
        prerl.parse_config(argv)
    assert refusal.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 1 and err.endswith("\n") and err.count("\n") == 1, err
    return err.strip()

# ---------------------------------------------------------------------------
# Mutation runs: `python mutate.py` runs mutmut over the method and the verifier against these files

def under_mutmut():
    """mutmut sets MUTANT_UNDER_TEST in the process that runs the tests (stats, clean run, every mutant)."""
    return "MUTANT_UNDER_TEST" in os.environ


@pytest.fixture(autouse=True)
def verifier_in_process_under_mutmut(request, monkeypatch):
    """verify.py compares in forked workers, where mutmut cannot see which tests reach the comparison
    core; under mutmut the comparison runs in the test's process instead. The tests of the time bound
    need the workers and are skipped there (the bound is not what the mutants change)."""
    if not under_mutmut():
        return
    if request.node.name.startswith(("test_hostile_input", "test_time_bound", "test_second_opinion_is_time_bounded",
                                  "test_a_user_reward_that_times_out")):
        pytest.skip("needs the verifier's worker processes; not run under mutmut")
    monkeypatch.setattr(verify, "_run_in_worker", lambda job, timeout: verify._do_job(job))
    monkeypatch.setattr(verify, "warmup", lambda workers=None: None)   # no idle workers left behind per mutant


def pytest_collection_modifyitems(config, items):
    """Under mutmut, the quickest tests first (their times from its first, recording pass): a mutant's run
    stops at its first failing test (-x), so a killed mutant costs its quickest killing test, not a study."""
    if not under_mutmut() or not os.path.exists("mutmut-stats.json"):
        return
    with open("mutmut-stats.json") as f:
        seconds = json.load(f)["duration_by_test"]
    items.sort(key=lambda item: seconds.get(item.nodeid, 0.0))
