"""stage: grpo: with the completions fixed (injected), two optimizer steps' loss and gradient norm equal an
independent PyTorch reference (the advantages recomputed from the rewards, each loss_type's formula written here)
at every split (1 process, accumulation, DDP, ZeRO-3) with num_iterations 1 and 2; LoRA's reference is the base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import read_metrics, run_sft
from transformers import AutoModelForCausalLM

PROMPTS = 16
LENGTH = 6  # max_completion_length
GROUP = 4  # num_generations
TEMPERATURE = 0.7
WEIGHTS = (1.0, 0.5)

# Deterministic completions of every prompt, some ending at the stop token, some truncated at LENGTH; each
# process's generation batches are written where the test reads them.
INJECT = """
import json, os
import llmhalluc.train.rollout as rollout

def fake(run, prompt_ids, generation):
    stop, length = run.facts.stop_ids[0], run.config.rl.max_completion_length
    group = run.config.rl.num_generations
    completions = []
    for index, ids in enumerate(prompt_ids):
        h = sum(ids) * 31 + (index % group) * 17 + generation * 5
        n = 1 + h % length
        tokens = [(h * (k + 3) * 7919) % 680 + 20 for k in range(length if h % 3 == 0 else n)]
        completions.append(tokens if h % 3 == 0 else tokens[: n - 1] + [stop, 0, 0])
    path = os.path.join(os.environ["GRPO_DUMP"], f"gen-{generation}-{run.accelerator.process_index}.json")
    with open(path, "w") as file:
        json.dump({"prompt_ids": prompt_ids, "completions": completions, "stop": stop}, file)
    return completions

rollout.generate_completions = fake
"""

REWARDS = """
def ids_mod(prompts, completions, completion_ids, **columns):
    return [(sum(ids) % 7) / 7 for ids in completion_ids]

def short(prompts, completions, completion_ids, **columns):
    return [len(ids) / 10 for ids in completion_ids]
"""

CELLS = {  # name: (accelerate config, processes, per-device batch, accumulation, settings)
    "1proc-it1-dapo": (None, 8, 1, {"loss_type": "dapo", "scale_rewards": "group", "num_iterations": 1}),
    "1proc-it2-grpo-beta": (
        None,
        8,
        1,
        {"loss_type": "grpo", "scale_rewards": "batch", "num_iterations": 2, "beta": 0.05},
    ),
    "ga-it1-drgrpo-masked": (
        None,
        2,
        4,
        {"loss_type": "dr_grpo", "scale_rewards": "none", "num_iterations": 1, "mask_truncated_completions": True},
    ),
    "ga-it2-dapo-high": (None, 4, 2, {"loss_type": "dapo", "num_iterations": 2, "epsilon_high": 0.28}),
    "ddp-it1-grpo-beta": ("cpu_ddp.yaml", 4, 1, {"loss_type": "grpo", "num_iterations": 1, "beta": 0.05}),
    "ddp-it2-drgrpo-batch": (
        "cpu_ddp.yaml",
        2,
        2,
        {"loss_type": "dr_grpo", "scale_rewards": "batch", "num_iterations": 2},
    ),
    "zero3-it1-dapo-masked": (
        "cpu_zero3.yaml",
        4,
        1,
        {"loss_type": "dapo", "scale_rewards": "batch", "num_iterations": 1, "mask_truncated_completions": True},
    ),
    "zero3-it2-grpo-beta": ("cpu_zero3.yaml", 2, 2, {"loss_type": "grpo", "num_iterations": 2, "beta": 0.05}),
    "lora-it1-dapo-beta": (None, 8, 1, {"loss_type": "dapo", "num_iterations": 1, "beta": 0.1, "lora": True}),
}


def rewards_of(ids: list[int]) -> float:
    """The two test reward functions, weighted."""
    return WEIGHTS[0] * (sum(ids) % 7) / 7 + WEIGHTS[1] * len(ids) / 10


def advantages_of(rewards: list[float], scale: str) -> list[float]:
    """Group-relative advantages: minus the group mean, over the group's (or batch's) unbiased std + 1e-4."""
    values = torch.tensor(rewards, dtype=torch.float64)
    grouped = values.view(-1, GROUP)
    centred = grouped - grouped.mean(1, keepdim=True)
    if scale == "group":
        centred = centred / (grouped.std(1, keepdim=True) + 1e-4)
    elif scale == "batch":
        centred = centred / (values.std() + 1e-4)
    return centred.reshape(-1).tolist()


def token_logps(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """log p(completion token | everything before) at the sampling temperature, by a plain forward."""
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float() / TEMPERATURE
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(completion)[:, None]).squeeze(1)


def reference_step(policy, old, reference, generations: list[dict], settings: dict) -> tuple[float, float]:
    """(loss, gradient norm) of one optimizer step over every process's completions of a generation batch."""
    sequences, rewards = [], []
    for dump in generations:  # one per process; a group never spans two
        for prompt, raw in zip(dump["prompt_ids"], dump["completions"]):
            cut = raw[: raw.index(dump["stop"]) + 1] if dump["stop"] in raw[:LENGTH] else raw[:LENGTH]
            truncated = dump["stop"] not in cut
            sequences.append((prompt, cut, truncated))
            rewards.append(rewards_of([t for t in cut if t != dump["stop"]]))
    advantage = advantages_of(rewards, settings.get("scale_rewards", "group"))
    epsilon, high = 0.2, settings.get("epsilon_high", 0.2)
    beta, kind = settings.get("beta", 0.0), settings["loss_type"]
    per_sequence, tokens = [], 0
    for (prompt, cut, truncated), a in zip(sequences, advantage):
        logp = token_logps(policy, prompt, cut)
        with torch.no_grad():
            before = token_logps(old, prompt, cut) if old is not None else logp.detach()
        ratio = torch.exp(logp - before)
        loss = -torch.min(ratio * a, torch.clamp(ratio, 1 - epsilon, 1 + high) * a)
        if beta:
            with torch.no_grad():
                ref = token_logps(reference, prompt, cut)
            loss = loss + beta * (torch.exp(ref - logp) - (ref - logp) - 1)
        trained = not (truncated and settings.get("mask_truncated_completions"))
        tokens += len(cut) if trained else 0
        per_sequence.append(loss * trained)
    if kind == "grpo":  # a completion that trains no token counts with 0
        loss = torch.stack([loss.sum() / len(loss) for loss in per_sequence]).mean()
    elif kind == "dr_grpo":
        loss = torch.cat(per_sequence).sum() / (len(sequences) * LENGTH)
    else:
        loss = torch.cat(per_sequence).sum() / tokens
    loss.backward()
    # The logged norm is clip_grad_norm_'s: per-tensor float32 norms, then their norm. On this CPU a float32 norm of
    # a [672, 256] gradient is off by up to 2.4e-5 relative (measured against float64), beyond the test's 1e-5, so
    # the reference reduces the same way; the gradients themselves are the reference's own.
    grads = [p.grad for p in policy.parameters() if p.grad is not None]
    norm = float(torch.stack([torch.linalg.vector_norm(g) for g in grads]).norm())
    return loss.item(), norm


@pytest.fixture(scope="module")
def grpo_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("grpo")
    (root / "rewards.py").write_text(REWARDS)
    (root / "base.yaml").write_text("stage: grpo\n")
    return root


def cell_args(root: Path, name: str, tiny_model_dir: Path) -> tuple[list[str], str | None, Path]:
    launch, per_device, accumulation, settings = CELLS[name]
    out = root / name
    args = [
        str(root / "base.yaml"),
        f"model_name_or_path={tiny_model_dir}",
        "stage=grpo",
        "dataset=demo",
        f"max_samples={PROMPTS}",
        f"output_dir={out}",
        "max_length=512",
        f"per_device_train_batch_size={per_device}",
        f"gradient_accumulation_steps={accumulation}",
        f"num_generations={GROUP}",
        f"max_completion_length={LENGTH}",
        f"rollout_temperature={TEMPERATURE}",
        f"reward_funcs=[{root / 'rewards.py'}:ids_mod,{root / 'rewards.py'}:short]",
        f"reward_weights=[{WEIGHTS[0]},{WEIGHTS[1]}]",
        "learning_rate=0.01",
        "lr_scheduler_type=constant",
        "max_steps=2",
        "save_steps=1",
        "logging_steps=1",
        "seed=3",
    ]
    args += [f"{key}={value}" for key, value in settings.items() if key != "lora"]
    if settings.get("lora"):
        args += ["finetuning_type=lora", "lora_rank=4", "lora_alpha=16", "lora_target=all"]
    return args, launch, out


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CELLS))
def test_two_steps_equal_the_reference(grpo_root, tiny_model_dir, name):
    args, launch, out = cell_args(grpo_root, name, tiny_model_dir)
    dump = out.parent / f"{name}-generations"
    dump.mkdir()
    run_sft(args, launch, inject=INJECT, env={"GRPO_DUMP": str(dump)})
    settings = CELLS[name][3]
    rows = {row["step"]: row for row in read_metrics(out) if "loss" in row}
    iterations = settings["num_iterations"]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for step in (1, 2):
        generation = (step - 1) // iterations
        generations = [json.loads(p.read_text()) for p in sorted(dump.glob(f"gen-{generation}-*.json"))]
        if settings.get("lora"):
            from peft import PeftModel

            policy = PeftModel.from_pretrained(
                AutoModelForCausalLM.from_pretrained(tiny_model_dir), out / "checkpoint-1", is_trainable=True
            )
            if step == 1:  # the adapter as it started: B = 0, and A unchanged by a step whose A-gradient was 0
                with torch.no_grad():
                    for key, parameter in policy.named_parameters():
                        if "lora_B" in key:
                            parameter.zero_()
        elif step == 1:
            policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        else:
            policy = AutoModelForCausalLM.from_pretrained(out / "checkpoint-1")
        old = base if iterations > 1 and step == 2 else None
        loss, norm = reference_step(policy, old, base, generations, settings)
        assert rows[step]["loss"] == pytest.approx(loss, rel=1e-5, abs=1e-7), (step, rows[step])
        assert rows[step]["grad_norm"] == pytest.approx(norm, rel=1e-5), (step, rows[step])
        if step == 2 and iterations > 1:
            assert rows[2].get("reward") is None  # the rollout's metrics count once, at its first step
    # The ratio moved at the second step of a generation batch: the clipped path was exercised.
    if iterations > 1:
        assert rows[2]["clip_ratio/region_mean"] > 0


@pytest.mark.slow
def test_the_toy_task_is_learned(tmp_path, tiny_model_dir):
    """configs/demo_grpo.yaml: the untrained model learns to answer with digits; the mean reward rises from about
    0.2 to above 0.7 within 14 steps (docs/grpo.md has the full 60-step curve), and the plot shows it."""
    out = tmp_path / "toy"
    run_sft(
        [
            "configs/demo_grpo.yaml",
            f"model_name_or_path={tiny_model_dir}",
            f"output_dir={out}",
            "max_steps=14",
            "save_steps=",
        ]
    )
    rewards = [row["reward"] for row in read_metrics(out) if "reward" in row]
    assert len(rewards) == 7 and rewards[0] < 0.3 and rewards[-1] > 0.7, rewards
    assert (out / "loss.png").stat().st_size > 0
    logged = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert len(logged) == 14 * 64 and set(logged[0]["rewards"]) == {"digits_only"}


def test_dry_run_shows_prompts_and_rewards_and_names_a_bad_function(tiny_model_dir):
    args = ["configs/demo_grpo.yaml", f"model_name_or_path={tiny_model_dir}", "--dry-run", "1"]
    shown = run_sft(args).stdout
    assert "rewards: 1 x digits_only" in shown and "each step 8 prompts x 8 completions = 64" in shown
    assert "--- prompt of demo row 0" in shown and "reference: " in shown
    failed = run_sft([*args, "reward_funcs=[configs/demo_rewards.py:nothing]"], expect_code=2)
    assert "reward_funcs: 'configs/demo_rewards.py:nothing': 'nothing' is not a function" in failed.stderr


@pytest.mark.slow
def test_real_sampling_is_the_same_under_ddp_and_zero3(grpo_root, tiny_model_dir):
    """transformers' generate samples the rollouts under ZeRO-3 too (every process generating in step); with the
    sampling RNG seeded per generation batch and process, the first step's completions equal DDP's."""
    logged = {}
    for launch in ("cpu_ddp.yaml", "cpu_zero3.yaml"):
        args, _, out = cell_args(grpo_root, "ddp-it1-grpo-beta", tiny_model_dir)
        out = grpo_root / f"sampled-{launch}"
        args = [a for a in args if not a.startswith(("output_dir=", "max_steps="))]
        run_sft([*args, f"output_dir={out}", "max_steps=1", "save_steps="], launch)
        logged[launch] = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    ddp, zero3 = logged.values()
    assert {r["process"] for r in zero3} == {0, 1} and len(zero3) == 2 * 4
    assert [(r["row"], r["completion"]) for r in zero3] == [(r["row"], r["completion"]) for r in ddp]
