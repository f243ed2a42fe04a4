"""train/run.py: a study in one command. SFT with LoRA (merged) -> DPO on the merged model -> generation evaluation
runs as one plan; killed during DPO and rerun, it skips the finished step, resumes DPO from its checkpoint and ends
with the results of an uninterrupted study; the dry run lists exactly what is left; the results table's models
load; bad plans exit 2 naming the step."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, read_metrics, run_sft, write_lm_eval_task
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

pytestmark = pytest.mark.slow

KILL_IN_DPO = """
import os, signal, llmhalluc.train.loop as loop
save = loop.save_checkpoint
def saving(run, state):
    path = save(run, state)
    if run.output_dir.name == "dpo" and state.step == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return path
loop.save_checkpoint = saving
"""


def demo_task(root: Path) -> Path:
    """A local lm-eval generate_until task over demo_eval's questions (the researchers write theirs this way)."""
    chats = [json.loads(line)["messages"] for line in (REPO / "data" / "demo_eval.jsonl").read_text().splitlines()]
    rows = [{"question": c[-2]["content"], "answer": c[-1]["content"]} for c in chats[:6]]
    return write_lm_eval_task(root / "task", "llmhalluc_demo", rows, 16)


def plan(root: Path, model: Path, processes: int = 1) -> Path:
    """SFT (LoRA, merged) -> DPO (from the merged model) -> evaluation of the DPO model, on a few demo rows; the
    same global batches (8 chats, 4 pairs) on any number of processes."""
    common = {"max_steps": 4, "logging_steps": 1, "eval_steps": None, "lr_scheduler_type": "constant"}
    steps = [
        {
            "name": "sft",
            "overrides": {
                **common,
                "model_name_or_path": str(model),
                "finetuning_type": "lora",
                "lora_rank": 4,
                "lora_alpha": 8,
                "lora_target": "all",
                "max_samples": 32,
                "eval_dataset": [],
                "save_steps": None,
                "per_device_train_batch_size": 8 // processes,
            },
            "do_merge": True,
        },
        {
            "name": "dpo",
            "config": "configs/demo_dpo.yaml",
            "overrides": {
                **common,
                "max_samples": 16,
                "eval_dataset": [],
                "save_steps": 2,
                "per_device_train_batch_size": 4 // processes,
            },
        },
        {
            "name": "eval",
            "model": "dpo",
            "do_train": False,
            "do_eval": True,
            "overrides": {"eval_dataset": ["demo_eval"], "max_samples": 6, "max_new_tokens": 16},
            "lm_eval_tasks": ["llmhalluc_demo"],
            "lm_eval_include_path": str(demo_task(root)),
            "lm_eval_args": {"limit": 3, "batch_size": 3},
        },
    ]
    path = root / "plan.yaml"
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"output_dir": str(root / "study"), "base": "configs/demo.yaml", "steps": steps}))
    return path


def results(root: Path) -> list[tuple]:
    rows = json.loads((root / "study" / "results.json").read_text())["rows"]
    return [(r["step"], r["stage"], r["dataset"], r["metric"], r["value"]) for r in rows]


@pytest.fixture(scope="module")
def studies(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("study")
    whole, killed = root / "whole", root / "killed"
    run_sft([str(plan(whole, tiny_model_dir))], script="run.py")
    run_sft([str(plan(killed, tiny_model_dir))], script="run.py", inject=KILL_IN_DPO, expect_code=-9)
    remaining = run_sft([str(plan(killed, tiny_model_dir)), "--dry-run"], script="run.py").stdout
    rerun = run_sft([str(plan(killed, tiny_model_dir))], script="run.py").stdout
    return {"whole": whole, "killed": killed, "remaining": remaining, "rerun": rerun}


def test_a_killed_study_skips_finished_steps_and_ends_as_an_uninterrupted_one(studies):
    assert "=== step sft: done, skipped" in studies["rerun"]
    assert "=== step dpo: train (resume from checkpoint-2), evaluate" not in studies["rerun"]
    assert "=== step dpo: train (resume from checkpoint-2)" in studies["rerun"]
    whole, killed = results(studies["whole"]), results(studies["killed"])
    assert killed == whole
    metrics = {(step, metric) for step, _, _, metric, _ in whole}
    assert {("sft", "loss"), ("dpo", "loss"), ("eval", "accuracy_strict"), ("eval", "exact_match,none")} <= metrics


def test_the_dry_run_of_a_half_finished_study_lists_exactly_what_is_left(studies):
    lines = [line for line in studies["remaining"].splitlines() if line.startswith(("sft:", "dpo:", "eval:"))]
    assert [line.rsplit("; ", 1)[-1] for line in lines] == [
        "done, skipped",
        "to run: train (resume from checkpoint-2)",
        "to run: evaluate, lm-eval llmhalluc_demo",
    ]
    assert "dry run: nothing was trained or written" in studies["remaining"]


def test_the_results_table_names_models_that_load(studies):
    root = studies["whole"] / "study"
    rows = json.loads((root / "results.json").read_text())["rows"]
    models = {r["step"]: r["model"] for r in rows}
    assert models["sft"] == str((root / "sft" / "merged").resolve())
    assert models["dpo"] == models["eval"] == str((root / "dpo").resolve())
    for path in set(models.values()):
        AutoModelForCausalLM.from_pretrained(path)
    assert all(r["config_hash"] and r["commit"] for r in rows)
    table = (root / "results.md").read_text()
    assert table.startswith("| step | stage | dataset | metric | value | model | config_hash | commit |")


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda s: s[1]["overrides"].update(stage="ppo"), "step 2 'dpo': overrides: stage: 'ppo' is not one of"),
        (lambda s: s[2].update(model="nowhere"), "step 3 'eval': model 'nowhere' is neither a step"),
        (lambda s: (s[0].update(model="dpo"), s[1].update(model="sft")), "cycle: sft -> dpo -> sft"),
        (lambda s: s[0].update(model="dpo"), "step 1 'sft': it trains from step 'dpo', which runs after it"),
        (lambda s: s[0].update(do_merge=False), "trains from step 'sft''s LoRA adapter: set do_merge: true"),
        (lambda s: s[2].update(typo=1), "step 3 'eval': unknown step keys typo"),
    ],
)
def test_bad_plans_exit_2_naming_the_step(tmp_path, tiny_model_dir, change, named):
    path = plan(tmp_path, tiny_model_dir)
    data = yaml.safe_load(path.read_text())
    change(data["steps"])
    path.write_text(yaml.safe_dump(data))
    failed = run_sft([str(path), "--dry-run"], script="run.py", expect_code=2)
    assert named in failed.stderr


def test_early_stopping_stops_where_the_logged_metric_says_and_keeps_the_best_model(tmp_path, tiny_model_dir):
    """eval_loss every 2 steps, patience 2, load_best_model_at_end with save_total_limit 1: the run stops at the step
    this test finds from the logged eval_loss, and the final weights are the best checkpoint's (kept by rotation)."""
    out = tmp_path / "early"
    run_sft(
        [
            "configs/demo.yaml",
            f"model_name_or_path={tiny_model_dir}",
            f"output_dir={out}",
            "max_samples=32",
            "per_device_eval_batch_size=8",
            "max_steps=40",
            "eval_steps=2",
            "save_steps=2",
            "save_total_limit=1",
            "logging_steps=2",
            "learning_rate=0.03",
            "lr_scheduler_type=constant",
            "warmup_ratio=0",
            "metric_for_best_model=eval_loss",
            "early_stopping_patience=2",
            "load_best_model_at_end=true",
        ]
    )
    evaluations = [(row["step"], row["eval_loss"]) for row in read_metrics(out) if "eval_loss" in row]
    best, best_step, since, stop = math.inf, None, 0, None
    for step, value in evaluations:
        best, best_step, since = (value, step, 0) if value < best else (best, best_step, since + 1)
        if since == 2:
            stop = step
            break
    assert stop is not None and stop < 40 and evaluations[-1][0] == stop, evaluations
    final = json.loads((out / "run_summary.json").read_text())["final"]
    assert final["best_step"] == final["final_model_step"] == best_step and final["steps"] == stop
    kept = load_file(out / f"checkpoint-{best_step}" / "model.safetensors")
    saved = load_file(out / "model.safetensors")
    assert kept.keys() == saved.keys() and all(torch.equal(kept[k], saved[k]) for k in kept)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == sorted({f"checkpoint-{best_step}", f"checkpoint-{stop}"})


def test_a_2_process_zero3_launch_runs_the_study_as_one_process_does(studies, tmp_path, tiny_model_dir):
    """Under `accelerate launch` (2 processes, ZeRO-3) every process runs the plan: the steps keep the process group
    for each other, the merge and evaluations run as on one process, lm-eval loads whole models (not ZeRO-3's
    shards). The rows equal the one-process study's, the values within float tolerance (a different reduction
    order), and the merged and trained models load."""
    launched = run_sft([str(plan(tmp_path, tiny_model_dir, 2))], accelerate_config="cpu_zero3.yaml", script="run.py")
    assert launched.stdout.count("=== step dpo: train") == 1  # the main process speaks for the study
    rows, alone = results(tmp_path), results(studies["whole"])
    assert [row[:4] for row in rows] == [row[:4] for row in alone]
    assert [row[4] for row in rows] == pytest.approx([row[4] for row in alone], rel=1e-4, abs=1e-6)
    for step in ("sft/merged", "dpo"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "study" / step)


def test_a_signal_at_a_steps_last_training_step_stops_the_study_before_the_next(tmp_path, tiny_model_dir, monkeypatch):
    """A preemption signal the training loop did not act on (it came at the run's last step, so the run finished)
    passes to the study's watch, which stops the study before its next step: Preempted, for which train/run.py writes
    PREEMPTED and pipeline.sbatch requeues; the signal handlers are put back."""
    import llmhalluc.train.loop as loop
    from llmhalluc.cli.pipeline import read_plan
    from llmhalluc.cli.study import run_plan
    from llmhalluc.train.preemption import Preempted, PreemptionWatch

    trained = []

    def train(config, keep_process_group=False):
        watch = PreemptionWatch()  # the loop's own, inside the study's
        os.kill(os.getpid(), signal.SIGUSR1)
        watch.restore()
        trained.append(config)

    monkeypatch.setattr(loop, "train", train)
    before = signal.getsignal(signal.SIGUSR1)
    steps, root = read_plan(plan(tmp_path, tiny_model_dir))
    with pytest.raises(Preempted, match="the study stopped before step dpo"):
        run_plan(steps, root)
    assert len(trained) == 1 and signal.getsignal(signal.SIGUSR1) == before


def test_sft_then_grpo_and_the_results_table_goes_to_wandb(tmp_path, tiny_model_dir):
    """GRPO chains like any stage (it trains from the SFT step's model); a step that reports to wandb gets the
    study's table there too (offline here)."""
    overrides = {"model_name_or_path": str(tiny_model_dir), "max_steps": 1, "max_samples": 8, "eval_dataset": []}
    overrides |= {"eval_steps": None, "save_steps": None, "report_to": ["wandb"]}
    grpo = {"stage": "grpo", "reward_funcs": ["configs/demo_rewards.py:digits_only"], "num_generations": 4}
    grpo |= {"max_completion_length": 8, "per_device_train_batch_size": 8, "max_steps": 1, "max_samples": 8}
    grpo |= {"eval_dataset": [], "eval_steps": None, "save_steps": None}
    study = {"output_dir": str(tmp_path / "study"), "base": "configs/demo.yaml"}
    steps = [{"name": "sft", "overrides": overrides}, {"name": "grpo", "overrides": grpo}]
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(study | {"steps": steps}))
    run_sft([str(path)], script="run.py")  # wandb offline (conftest)
    config = yaml.safe_load((tmp_path / "study" / "grpo" / "config.yaml").read_text())
    assert config["model_name_or_path"] == str((tmp_path / "study" / "sft").resolve())
    (table,) = (tmp_path / "study" / "wandb").glob("offline-run-*/files/media/table/study/results_*.table.json")
    logged = json.loads(table.read_text())
    assert logged["columns"][:5] == ["step", "stage", "dataset", "metric", "value"]
    assert [row[:4] for row in logged["data"]] == [
        ["sft", "sft", "train", "loss"],
        ["grpo", "grpo", "train", "loss"],
        ["grpo", "grpo", "train", "reward"],
    ]
