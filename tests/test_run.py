"""A run as a user lives it: a default config on a small dataset, batches of sequences, the final report,
run_summary.json completed (or marked failed), loss plots, and throughput that excludes evaluation and saving."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO, read_metrics, run_sft, write_chats

import llmhalluc.plot as plot_module
from llmhalluc.plot import LossPlot, plot_runs

pytestmark = pytest.mark.slow

# Evaluation and checkpointing made slow on purpose: a training row's throughput must not see them.
SLOW_EVAL_AND_SAVE = """
import time
import llmhalluc.train.loop as loop
real_evaluate, real_save = loop.evaluate, loop.save_checkpoint
def slow_evaluate(*args, **kwargs):
    time.sleep(1.0)
    return real_evaluate(*args, **kwargs)
def slow_save(*args, **kwargs):
    time.sleep(1.0)
    return real_save(*args, **kwargs)
loop.evaluate, loop.save_checkpoint = slow_evaluate, slow_save
"""
CRASH_AT_STEP_3 = """
import llmhalluc.train.loop as loop
real_step = loop.train_step
calls = {"n": 0}
def failing_step(*args, **kwargs):
    calls["n"] += 1
    if calls["n"] == 3:
        raise RuntimeError("injected failure in step 3")
    return real_step(*args, **kwargs)
loop.train_step = failing_step
"""


def demo_chats(count: int) -> list[list[dict]]:
    lines = (REPO / "data" / "demo_train.jsonl").read_text().splitlines()[:count]
    return [json.loads(line)["messages"] for line in lines]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, tiny_model_dir):
    """A config with nothing but the essentials on a 10-example dataset, batch 4, 2 epochs, evaluated every step
    and saved every 2 steps, with evaluation and saving slowed down by a second each."""
    root = tmp_path_factory.mktemp("small")
    write_chats(root / "data", "ten", demo_chats(10))
    config = root / "minimal.yaml"
    config.write_text(
        f"model_name_or_path: {tiny_model_dir}\ndataset: ten\ndataset_dir: {root / 'data'}\neval_dataset: ten\n"
        f"output_dir: {root / 'out'}\nper_device_train_batch_size: 4\nnum_train_epochs: 2\nlearning_rate: 1.0e-3\n"
        "logging_steps: 1\neval_steps: 1\nsave_steps: 2\n"
    )
    result = run_sft([str(config)], inject=SLOW_EVAL_AND_SAVE)
    return root / "out", result


def test_a_batch_counts_sequences_and_an_epoch_is_floor_examples_over_the_global_batch(small_run):
    out, _ = small_run
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["batch_layout"] == "padding_free"  # sequences concatenated, no padding (sdpa on CPU)
    assert summary["steps_per_epoch"] == 2 and summary["total_steps"] == 4  # floor(10 / 4) per epoch
    assert summary["global_batch_sequences"] == 4 and summary["global_batch_packed_rows"] is None
    rows = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["epoch"] for r in rows] == [0.5, 1.0, 1.5, 2.0]


def test_throughput_excludes_evaluation_and_saving(small_run):
    out, _ = small_run
    rows = read_metrics(out)
    training = [r for r in rows if "loss" in r]
    evaluations = [r for r in rows if "eval_loss" in r]
    assert len(evaluations) == 4 and all(r["eval_time"] >= 1.0 for r in evaluations)
    # Every row follows an evaluation and half follow a checkpoint, each slowed by a whole second: a step time that
    # counted either would be over a second (a bound on the logic, not on this machine's speed).
    assert all(r["step_time"] < 1.0 for r in training), [r["step_time"] for r in training]
    for r in training:
        assert r["tokens_per_second"] == pytest.approx(r["tokens"] / r["step_time"], rel=1e-6)


def test_checkpoints_redraw_the_plot_at_most_once_per_interval(monkeypatch, tmp_path):
    drawn, clock = [], [100.0]
    monkeypatch.setattr(plot_module, "write_loss_plot", drawn.append)
    monkeypatch.setattr(plot_module, "time", type("Clock", (), {"monotonic": staticmethod(lambda: clock[0])}))
    plot = LossPlot(tmp_path, interval_seconds=60)
    for now in (101.0, 159.9, 160.0, 200.0, 220.1):  # started at 100: draws at 160 and 220.1 only
        clock[0] = now
        plot.refresh()
    assert drawn == [tmp_path, tmp_path]


def test_the_run_ends_with_a_report_a_completed_summary_and_a_plot(small_run):
    out, result = small_run
    report = result.stdout[result.stdout.index("run finished:") :]
    assert "run finished: 4 steps" in report
    final_eval = [r for r in read_metrics(out) if "eval_loss" in r][-1]["eval_loss"]
    assert f"final eval loss   {final_eval:.4f}" in report
    assert f"model             {out.resolve()}" in report and "from_pretrained" in report
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["status"] == "finished" and summary["ended"] and summary["wall_seconds"] > 0
    assert summary["final"]["steps"] == 4 and summary["final"]["eval_loss"] == final_eval
    assert (out / "loss.png").stat().st_size > 10_000


def test_a_crashed_run_is_marked_failed_with_its_error(tmp_path, tiny_model_dir, small_run):
    write_chats(tmp_path / "data", "ten", demo_chats(10))
    out = tmp_path / "out"
    args = [
        "configs/demo.yaml",
        f"model_name_or_path={tiny_model_dir}",
        "dataset=ten",
        f"dataset_dir={tmp_path / 'data'}",
        "eval_dataset=[]",
        "eval_steps=",
        "save_steps=",
        "per_device_train_batch_size=2",
        "logging_steps=1",
        f"output_dir={out}",
    ]
    result = run_sft(args, expect_code=1, inject=CRASH_AT_STEP_3)
    assert "injected failure in step 3" in result.stderr
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["status"] == "failed"
    assert summary["error"] == "RuntimeError: injected failure in step 3"
    # Two runs on one figure: the data each curve was drawn from.
    drawn = plot_runs([small_run[0], out], tmp_path / "compare.png")
    assert [len(series["loss"][0]) for series in drawn.values()] == [4, 2]
    assert [len(series["eval_loss"][0]) for series in drawn.values()] == [4, 0]
    assert (tmp_path / "compare.png").stat().st_size > 10_000
    command = [sys.executable, "-m", "llmhalluc.plot", str(small_run[0]), str(out), "-o", str(tmp_path / "cli.png")]
    printed = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    assert "4 train rows" in printed and "2 train rows" in printed and (tmp_path / "cli.png").exists()
