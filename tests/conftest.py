"""Shared fixtures: an isolated HF cache, the offline tiny model, and launchers for 1- and 2-process runs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

# Before anything imports datasets/transformers: no network, a private datasets cache, quiet tools.
_CACHE = Path(tempfile.mkdtemp(prefix="llmhalluc-test-cache-"))
os.environ["HF_DATASETS_CACHE"] = str(_CACHE / "datasets")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default (chatml) tiny model, built once per test session."""
    from llmhalluc.models.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir: Path):
    """The tiny model's tokenizer (chatml template with generation markers)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sft_command(args: list[str], accelerate_config: str | None = None) -> list[str]:
    """The command line of train/sft.py, under `accelerate launch` (on a free port) when a config is named."""
    if accelerate_config is None:
        return [sys.executable, str(REPO / "train" / "sft.py"), *args]
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "accelerate_configs" / accelerate_config),
        "--main_process_port",
        str(free_port()),
        str(REPO / "train" / "sft.py"),
        *args,
    ]


def run_sft(
    args: list[str],
    accelerate_config: str | None = None,
    expect_code: int = 0,
    timeout: int = 600,
    env: dict[str, str] | None = None,
    fresh_process: bool = False,
) -> subprocess.CompletedProcess:
    """Run train/sft.py (with `env` added to the environment): under `accelerate launch` when a config is named, in
    a fresh python when asked (code injected at start-up, compiled graphs), else in this process (the same main(),
    without paying ~4 s of imports again); on an unexpected exit code, fail showing every rank's output, so a
    flaky launch is diagnosable."""
    command = sft_command(args, accelerate_config)
    if accelerate_config is None and not fresh_process:
        saved = dict(os.environ)
        os.environ.update(env or {})
        try:
            result = run_in_process(args)
        finally:
            os.environ.clear()
            os.environ.update(saved)
    else:
        result = subprocess.run(
            command, cwd=REPO, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
        )
    if result.returncode != expect_code:
        pytest.fail(
            f"exit code {result.returncode}, expected {expect_code}: {' '.join(command)}\n"
            f"--- stdout ---\n{result.stdout[-20000:]}\n--- stderr ---\n{result.stderr[-20000:]}"
        )
    return result


def run_in_process(args: list[str], script: str = "sft.py", cwd: Path = REPO) -> subprocess.CompletedProcess:
    """train/<script>'s main() in this process from `cwd` (the repository root), its output captured; accelerate's
    process-wide state is reset first, as a new process would have it."""
    import contextlib
    import importlib.util
    import io
    import traceback

    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    spec = importlib.util.spec_from_file_location(f"llmhalluc_{script[:-3]}_main", REPO / "train" / script)
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    out, err = io.StringIO(), io.StringIO()
    before = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = entry.main(args)
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else 1
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(before)
    return subprocess.CompletedProcess([sys.executable, f"train/{script}", *args], code, out.getvalue(), err.getvalue())


def run_sft_many(
    runs: list[tuple[list[str], str]], log_root: Path, timeout: int = 1800
) -> list[subprocess.CompletedProcess]:
    """Several 2-process train/sft.py runs, each (args, accelerate config of accelerate_configs/), in one launch of
    tests/launch_many.py, in order; one CompletedProcess per run with rank 0's stdout and every rank's stderr. A run
    that fails fails the test, showing its output."""
    log_root.mkdir(parents=True, exist_ok=True)
    plan = [
        {"args": args, "accelerate_config": launch, "log": str(log_root / f"run{i}")}
        for i, (args, launch) in enumerate(runs)
    ]
    plan_file = log_root / "plan.json"
    plan_file.write_text(json.dumps(plan, indent=1))
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "accelerate_configs" / "cpu_ddp.yaml"),
        "--main_process_port",
        str(free_port()),
        str(REPO / "tests" / "launch_many.py"),
        str(plan_file),
    ]
    launched = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)

    def output(entry: dict, name: str) -> str:
        path = Path(entry["log"]) / name
        return path.read_text() if path.exists() else ""

    results = [
        subprocess.CompletedProcess(
            entry["args"], 0, output(entry, "rank0.out"), output(entry, "rank0.err") + output(entry, "rank1.err")
        )
        for entry in plan
    ]
    if launched.returncode != 0:
        failed = next((i for i, r in enumerate(results) if not (Path(plan[i]["log"]) / "rank0.out").exists()), None)
        shown = "\n".join(
            f"--- run {i}: {' '.join(r.args)}\n{r.stdout[-6000:]}\n{r.stderr[-6000:]}" for i, r in enumerate(results)
        )
        pytest.fail(
            f"launch of {len(runs)} runs failed (exit {launched.returncode}; first run without output: {failed})\n"
            f"{launched.stderr[-6000:]}\n{shown}"
        )
    return results


def read_metrics(output_dir: Path) -> list[dict]:
    """The rows of output_dir/metrics.jsonl."""
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def write_chats(folder: Path, name: str, chats: list[list[dict]], formatting: str = "openai") -> Path:
    """A dataset_dir holding `chats` as name.jsonl and a dataset_info.json entry for it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    info_path = folder / "dataset_info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    info[name] = {"file_name": f"{name}.jsonl", "formatting": formatting}
    info_path.write_text(json.dumps(info, indent=1))
    return folder
