"""The benchmark's launcher and metrics parsing, run on CPU with the tiny model (the GPU suite uses the same code)."""

from __future__ import annotations

import json

import pytest

from bench.run import gsm8k_chats, launch_throughput, write_chats

pytestmark = pytest.mark.slow


def test_launch_throughput_parses_a_real_two_process_zero3_run(tmp_path, tiny_model_dir):
    write_chats(tmp_path / "data", gsm8k_chats(64))
    out = tmp_path / "run"
    result = launch_throughput(
        tiny_model_dir,
        tmp_path / "data",
        out,
        "cpu_zero3.yaml",
        2,
        ["max_length=1024", "per_device_train_batch_size=1", "max_steps=6", "logging_steps=2", "bf16=false"],
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert [r["step"] for r in rows] == [2, 4, 6]
    # The last row only: 2 steps after the warm-up rows, both ranks' tokens over its measured seconds.
    seconds = rows[2]["step_time"] * 2
    assert result["steps"] == 2
    assert result["tokens_per_second_per_gpu"] == pytest.approx(rows[2]["tokens"] / seconds / 2)
    assert result["trained_tokens_per_second_per_gpu"] == pytest.approx(rows[2]["trained_tokens"] / seconds / 2)
    assert result["mfu"] is None and result["peak_memory_gb"] is None  # GPU-only metrics
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["zero_stage"] == 3 and summary["batch_layout"] == "packed"
