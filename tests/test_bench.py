"""The GPU check (scripts/gpu_check.sh -> bench/gpu_check.py) runs its CPU-runnable sections for real: attention on
packed and padding-free rows, one-step loss without DeepSpeed / ZeRO-2 / ZeRO-3, host reads in the micro-step, and
the throughput launcher and metrics parser the GPU suite uses (ZeRO-3 in one CPU process, tiny model)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

import bench.gpu_check as gpu_check_module
from bench.gpu_check import main as gpu_check

SECTIONS = ("attention", "precision", "host_syncs", "throughput")


@pytest.mark.slow
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
    assert results["host_syncs"] == {"micro_steps": 4, "found": {"padding_free": [], "padded": []}, "ok": True}
    for stage in ("zero3",):  # on CPU the launcher and parser run once
        run = results["throughput"][stage]
        assert run["steps"] == 1 and run["tokens_per_second_per_gpu"] > 0  # rows at 2, 4, 5: the first two warm up
        assert run["mfu"] is None and run["peak_memory_gb"] is None  # GPU-only metrics
    assert "| one-step loss" in capsys.readouterr().out
    assert results["complete"] and results["ok"] and set(results["seconds"]) == set(SECTIONS)


def test_a_failing_section_is_recorded_and_the_others_still_run(tmp_path, capsys, monkeypatch):
    # GPU time is scarce: one section that raises (a launch failing) must not cost the rest of the check.
    def fail(*args):
        raise RuntimeError("the launch failed")

    row = {"attention": "sdpa", "layout": "packed", "max_abs_logit_difference": 0.0, "tolerance": 1e-4, "ok": True}
    monkeypatch.setattr(gpu_check_module, "check_attention", lambda *args: [row])
    monkeypatch.setattr(gpu_check_module, "check_precision", fail)
    monkeypatch.setattr(
        gpu_check_module, "check_host_syncs", lambda *args: {"micro_steps": 30, "found": {}, "ok": True}
    )
    monkeypatch.setattr(gpu_check_module, "check_throughput", fail)
    assert gpu_check(["--cpu-smoke", "--out", str(tmp_path)]) == 1
    (path,) = tmp_path.glob("*-cpu.json")
    results = json.loads(path.read_text())
    assert results["precision"] == results["throughput"] == {"error": "RuntimeError: the launch failed", "ok": False}
    assert results["attention"] == [row] and results["host_syncs"]["ok"]
    assert results["complete"] and not results["ok"]
    assert "| precision | failed: RuntimeError: the launch failed | | False |" in capsys.readouterr().out


def test_device_scripts_parse_and_every_carried_wheel_is_pinned():
    # device_wheels.sh takes each version from constraints.txt: a package dropped from the pins would stop it there.
    repo = Path(__file__).resolve().parents[1]
    for script in ("gpu_check.sh", "device_wheels.sh"):
        assert subprocess.run(["bash", "-n", str(repo / "scripts" / script)]).returncode == 0
    text = (repo / "scripts" / "device_wheels.sh").read_text()
    carried = re.search(r"WHEELS=\(([^)]*)\)", text).group(1).split()
    pinned = {
        re.sub(r"[-_]", "-", line.split("==")[0].lower())
        for line in (repo / "constraints.txt").read_text().splitlines()
        if "==" in line
    }
    assert {"transformers", "datasets", "deepspeed", "trl"} <= set(carried)
    assert not [name for name in carried if re.sub(r"[-_]", "-", name.lower()) not in pinned]
