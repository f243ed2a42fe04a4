"""GRPO's rewards and advantages against values computed by hand; the backtrack rewards read the reference after its
own backtracks (the researchers' code compared with the un-applied reference); user functions load by import path
and a bad one is named; stage grpo's config mistakes exit 2 naming the key; a killed run resumes exactly."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import read_metrics, run_sft

from llmhalluc.config import build_config
from llmhalluc.data.facts import token_facts
from llmhalluc.errors import ConfigError, UserError
from llmhalluc.eval.generation import decode
from llmhalluc.eval.rewards import Scoring, backtrack_efficiency, build_rewards, load_function
from llmhalluc.train.rollout import reference_ids
from llmhalluc.train.rollout_batch import advantages

ABSTAIN = "I don't know."
BT = 99


def scoring(meant: list[str], references: list[list[str]], answerable: list, **extra) -> Scoring:
    n = len(meant)
    values = {
        "prompts": [[{"role": "user", "content": "q"}]] * n,
        "meant": meant,
        "raw": meant,
        "ids": [[1, 2]] * n,
        "references": references,
        "reference_ids": [[1, 2]] * n,
        "answerable": answerable,
        "metrics": ["gsm8k"] * n,
        "markers": [("####", "The answer is")] * n,
        "columns": [{"question": "q"}] * n,
    }
    return Scoring(**(values | extra))


def rewards(names: list[str], batch: Scoring, backtrack_id: int | None = None) -> dict[str, list]:
    built = build_rewards(names, ABSTAIN, r"(?i)(####|the answer is)[\s:]*-?\$?\d", backtrack_id, 20)
    return {reward.name: reward.function(batch) for reward in built}


def test_gsm8k_squad_and_format_rewards_equal_hand_values():
    batch = scoring(
        ["3 + 5 = 8.\n#### 8", "#### 9", "The answer is: $1,200.00", ABSTAIN, "#### 3", "no marker 8"],
        [["#### 8"], ["#### 8"], ["#### 1200"], [ABSTAIN], [ABSTAIN], ["#### 8"]],
        [True, True, True, False, False, True],
    )
    found = rewards(["gsm8k", "format"], batch)
    assert found["gsm8k"] == [1.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    assert found["format"] == [1.0, 1.0, 1.0, 0.0, 1.0, 0.0]
    squad = scoring(
        ["the Broncos", "Denver Broncos", "unanswerable", ABSTAIN, "Denver"],
        [["Denver Broncos"], ["Denver Broncos"], ["Denver Broncos"], [""], [""]],
        [True, True, True, False, False],
    )
    # "the Broncos" vs "Denver Broncos": precision 1, recall 1/2, F1 2/3; an abstention on an answerable question
    # scores 0; on an unanswerable one +1, and an answer there (a hallucination) -1.
    values = rewards(["squad_v2"], squad)["squad_v2"]
    assert values == pytest.approx([2 / 3, 1.0, 0.0, 1.0, -1.0])


@pytest.mark.parametrize(
    ("ids", "expected"),
    [
        ([1, 2, 3, 4], 0.0),  # no backtrack, already the gold
        ([1, 2, 5, 4], -0.1),  # no backtrack, wrong: it should have taken one back
        ([1, 2, 3, 7, BT, 4], 0.4 * 0.25 + 0.25),  # draft 3/4 right -> final 4/4: improvement 0.25, one backtrack
        ([1, 2, 7, 7, BT, BT, 3, 4], 0.4 * 0.5 + 0.25 / math.sqrt(2)),  # improvement 0.5 with two backtracks
        ([1, 9, BT, 2, 3, 4], -0.2),  # an improvement from a draft of half the gold or less: stuttering
        ([1, 2, 3, 4, BT, 4], -0.2),  # the draft was already the gold: an unnecessary backtrack
        ([1, 2, 3, 7, BT, 8], -0.3),  # took one back, still wrong: a failed correction
        ([1, *([BT] * 21), 2, 3, 4], -1.0),  # more than max_backtracks (20)
    ],
)
def test_backtrack_efficiency_equals_hand_values(ids, expected):
    assert backtrack_efficiency(ids, [1, 2, 3, 4], BT, 20) == pytest.approx(expected)


def test_the_gold_trace_scores_as_a_correct_answer(tokenizer):
    """The reference itself, with an error taken back, scores 1 on gsm8k and a positive backtrack reward: its
    backtracks are applied to both sides (the researchers' code left the reference un-applied, so the gold trace
    lost reward)."""
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|BACKTRACK|>"]})
    facts = token_facts(tokenizer, "<|BACKTRACK|>")
    gold_trace = "3 + 5 = 9<|BACKTRACK|>8.\n#### 8"
    ids = tokenizer(gold_trace, add_special_tokens=False)["input_ids"]
    assert ids.count(facts.backtrack_id) == 1
    generation = decode(tokenizer, [*ids, facts.stop_ids[0]], facts)
    gold = reference_ids(tokenizer, gold_trace, facts)
    assert generation.prediction == tokenizer.decode(gold)
    batch = scoring([generation.prediction], [[generation.prediction]], [True], ids=[ids], reference_ids=[gold])
    found = rewards(["gsm8k", "backtrack"], batch, facts.backtrack_id)
    assert found["gsm8k"] == [1.0]
    draft = ids[: ids.index(facts.backtrack_id)]
    matched = sum(a == b for a, b in zip(draft, gold)) / len(gold)
    assert found["backtrack"] == [pytest.approx(0.4 * (1 - matched) + 0.25)]
    assert found["backtrack"][0] > 0
    # Scored against the un-applied reference, as the researchers' code did, the same trace is not the gold.
    unapplied = tokenizer(gold_trace.replace("<|BACKTRACK|>", ""), add_special_tokens=False)["input_ids"]
    assert backtrack_efficiency(ids, unapplied, facts.backtrack_id, 20) < found["backtrack"][0]


def test_user_functions_load_by_path_and_bad_ones_are_named(tmp_path):
    (tmp_path / "mine.py").write_text(
        "def exclaims(prompts, completions, answer, **kw):\n"
        "    return [float(c[0]['content'].endswith('!')) + (a == 'x') for c, a in zip(completions, answer)]\n"
        "def short(prompts, completions, **kw):\n    return [1.0]\n"
        "def text(prompts, completions, **kw):\n    return ['high' for _ in completions]\n"
    )
    batch = scoring(["yes!", "no"], [["a"], ["b"]], [True, True], columns=[{"answer": "x"}, {"answer": "y"}])
    assert rewards([f"{tmp_path}/mine.py:exclaims"], batch) == {"exclaims": [2.0, 0.0]}
    assert callable(load_function("llmhalluc.eval.metrics.normalize_number"))
    for entry, named in [
        ("gsm8kk", "neither a built-in"),
        (f"{tmp_path}/none.py:f", "no file"),
        ("no_such_module.f", "cannot import"),
        (f"{tmp_path}/mine.py:missing", "'missing' is not a function"),
    ]:
        with pytest.raises(UserError, match=named):
            rewards([entry], batch)
    for entry, named in [("short", "of length 1; expected a list of 2"), ("text", "returned 'high'")]:
        with pytest.raises(UserError, match=named):
            rewards([f"{tmp_path}/mine.py:{entry}"], batch)
    with pytest.raises(UserError, match="backtrack needs backtrack_token"):
        rewards(["backtrack"], batch)


def test_advantages_equal_hand_values():
    local = SimpleNamespace(device=torch.device("cpu"), reduce=lambda tensor, _: tensor)
    rewards_ = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 2.0, math.nan, 0.0, 1.0], dtype=torch.float64)
    group, group_std = advantages(rewards_, 4, "group", local)
    # Group 1: mean 1/4, unbiased std sqrt((0.75^2 + 3 x 0.25^2) / 3) = 0.5. Group 2: std 0, advantages 0.
    # Group 3: NaN left out of its mean (1) and std (1); its own advantage 0.
    assert group[:4].tolist() == pytest.approx([0.75 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001])
    assert group[4:8].tolist() == [0.0] * 4
    assert group[8:].tolist() == pytest.approx([1 / 1.0001, 0.0, -1 / 1.0001, 0.0])
    assert group_std.tolist() == pytest.approx([0.5, 0.0, 1.0])
    none, _ = advantages(rewards_, 4, "none", local)
    assert none[:4].tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25])
    batch, _ = advantages(rewards_, 4, "batch", local)
    valid = rewards_[~torch.isnan(rewards_)]
    std = float(valid.std())  # the global batch's unbiased std, every process's completions
    assert batch[:4].tolist() == pytest.approx([0.75 / (std + 1e-4), *([-0.25 / (std + 1e-4)] * 3)])


GRPO = {"model_name_or_path": "m", "output_dir": "o", "dataset": ["demo"], "stage": "grpo"}


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"per_device_train_batch_size": 8}, "needs reward_funcs"),
        ({"reward_funcs": ["gsm8k"], "per_device_train_batch_size": 6}, "must be a multiple of num_generations"),
        ({"reward_funcs": ["gsm8k"], "reward_weights": [1, 2], "per_device_train_batch_size": 8}, "2 values for 1"),
        ({"reward_funcs": ["gsm8k"], "per_device_train_batch_size": 8, "rollout_engine": "vllm"}, "not built yet"),
        ({"reward_funcs": ["gsm8k"], "per_device_train_batch_size": 8, "eval_steps": 5}, "no eval loss"),
        ({"reward_funcs": ["gsm8k"], "per_device_train_batch_size": 8, "num_generations": 1}, "num_generations"),
    ],
)
def test_bad_grpo_configs_name_the_key(values, named):
    with pytest.raises(ConfigError, match=named):
        build_config(GRPO | {"eval_dataset": ["demo_eval"]} | values)


@pytest.mark.slow
def test_a_killed_run_resumes_exactly(tmp_path, tiny_model_dir):
    """Real sampling, num_iterations 2, killed (SIGKILL) just after checkpoint-3, in the middle of a generation
    batch: the resumed run trains on the same rollout and then samples the same completions as an uninterrupted
    run, with the same losses and rewards."""
    base = tmp_path / "base.yaml"
    base.write_text("stage: grpo\n")
    (tmp_path / "digits.py").write_text(
        "def digits(prompts, completions, **columns):\n"
        "    return [sum(ch.isdigit() for ch in c[0]['content']) / max(len(c[0]['content']), 1) for c in completions]\n"
    )
    args = [
        str(base),
        f"model_name_or_path={tiny_model_dir}",
        "dataset=demo",
        "max_samples=16",
        "max_length=512",
        "per_device_train_batch_size=4",
        "gradient_accumulation_steps=2",
        "num_generations=4",
        "max_completion_length=8",
        f"reward_funcs=[format,{tmp_path}/digits.py:digits]",
        "num_iterations=2",
        "beta=0.05",
        "learning_rate=0.01",
        "max_steps=5",
        "save_steps=1",
        "logging_steps=1",
    ]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    run_sft([*args, f"output_dir={whole}"], inject=None, fresh_process=True)
    kill = (
        "import os, signal, llmhalluc.train.loop as loop\n"
        "save = loop.save_checkpoint\n"
        "def saving(run, state):\n"
        "    path = save(run, state)\n"
        "    if state.step == 3:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return path\n"
        "loop.save_checkpoint = saving\n"
    )
    run_sft([*args, f"output_dir={killed}"], inject=kill, expect_code=-9)
    assert not (killed / "model.safetensors").exists()
    run_sft([*args, f"output_dir={killed}", "resume_from_checkpoint=latest"], fresh_process=True)
    assert (killed / "completions.jsonl").read_text() == (whole / "completions.jsonl").read_text()
    keys = ("loss", "grad_norm", "reward", "kl", "clip_ratio/region_mean", "completions/mean_length")
    rows = {m["step"]: {k: m.get(k) for k in keys} for m in read_metrics(whole) if "loss" in m}
    resumed = {m["step"]: {k: m.get(k) for k in keys} for m in read_metrics(killed) if "loss" in m}
    assert resumed == rows
    assert sorted(rows) == [1, 2, 3, 4, 5]
    logged = [json.loads(line) for line in (whole / "completions.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in logged}) == [1, 3, 5]  # one generation batch per num_iterations steps
