"""The GPU check (scripts/gpu_check.sh -> bench/gpu_check.py) runs its CPU-runnable sections for real: attention on
packed and padding-free rows, one-step loss without DeepSpeed / ZeRO-2 / ZeRO-3, host reads in the micro-step, and
the throughput launcher and metrics parser the GPU suite uses (ZeRO-3 in one CPU process, tiny model)."""

from __future__ import annotations

import json

import pytest

from bench.gpu_check import main as gpu_check

pytestmark = pytest.mark.slow


def test_gpu_check_cpu_sections(tmp_path, capsys):
    assert gpu_check(["--cpu-smoke", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*-cpu.json")
    results = json.loads(path.read_text())
    assert {(r["attention"], r["layout"]) for r in results["attention"]} == {
        (attention, layout) for attention in ("sdpa", "eager") for layout in ("packed", "padding_free")
    }
    assert all(r["max_abs_logit_difference"] < 1e-4 for r in results["attention"])
    losses = results["precision"]["loss"]
    assert set(losses) == {"single", "zero3"} and results["precision"]["max_relative_loss_difference"] < 1e-5
    assert results["host_syncs"] == {"micro_steps": 30, "found": {"padding_free": [], "padded": []}, "ok": True}
    for stage in ("zero3",):  # on CPU the launcher and parser run once
        run = results["throughput"][stage]
        assert run["steps"] == 1 and run["tokens_per_second_per_gpu"] > 0  # rows at 2, 4, 5: the first two warm up
        assert run["mfu"] is None and run["peak_memory_gb"] is None  # GPU-only metrics
    assert "| one-step loss" in capsys.readouterr().out
