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


def sft_command(args: list[str], accelerate_config: str | None = None, script: str = "sft.py") -> list[str]:
    """The command line of train/<script>, under `accelerate launch` (on a free port) when a config is named."""
    if accelerate_config is None:
        return [sys.executable, str(REPO / "train" / script), *args]
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "accelerate_configs" / accelerate_config),
        "--main_process_port",
        str(free_port()),
        str(REPO / "train" / script),
        *args,
    ]


FORKED_CONFIGS = {"cpu_ddp.yaml", "cpu_zero2.yaml", "cpu_zero3.yaml", "cpu_zero3_offload.yaml"}


def run_sft(
    args: list[str],
    accelerate_config: str | None = None,
    expect_code: int = 0,
    timeout: int = 600,
    env: dict[str, str] | None = None,
    fresh_process: bool = False,
    inject: str | None = None,
    real_launch: bool = False,
    script: str = "sft.py",
) -> subprocess.CompletedProcess:
    """Run train/<script> (with `env` added to the environment): ranks forked from the fork server for a 2-process
    CPU config of accelerate_configs/ (or one fresh process when asked: code injected at start-up, compiled graphs),
    under a real `accelerate launch` for any other config or when the launcher itself is tested, else in this
    process (the same main(), without paying ~4 s of imports again). On an unexpected exit code, fail showing every
    rank's output, so a flaky run is diagnosable."""
    command = sft_command(args, accelerate_config, script)
    if accelerate_config is None and not fresh_process and inject is None:
        saved = dict(os.environ)
        os.environ.update(env or {})
        try:
            result = run_in_process(args, script)
        finally:
            os.environ.clear()
            os.environ.update(saved)
    elif not real_launch and (accelerate_config is None or accelerate_config in FORKED_CONFIGS):
        result = run_forked(args, accelerate_config, env=env, inject=inject, timeout=timeout, script=script)
    else:
        environment = {**os.environ, **(env or {})}
        if inject is not None:  # a sitecustomize runs it in every process at start-up
            folder = Path(tempfile.mkdtemp(prefix="llmhalluc-inject-"))
            (folder / "sitecustomize.py").write_text(inject)
            environment["PYTHONPATH"] = f"{folder}:{environment.get('PYTHONPATH', '')}"
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=environment)
    if result.returncode != expect_code:
        pytest.fail(
            f"exit code {result.returncode}, expected {expect_code}: {' '.join(command)}\n"
            f"--- stdout ---\n{result.stdout[-20000:]}\n--- stderr ---\n{result.stderr[-20000:]}"
        )
    return result


class ForkServer:
    """The client of tests/forkserver.py: a process that imported the toolkit once and forks each run's ranks."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "forkserver.py")],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert json.loads(self.process.stdout.readline()) == {"ready": True}

    def request(self, **request: object) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def start(self, runs: list[dict], processes: int) -> list[int]:
        """Fork the ranks of `runs` (run one after another); their pids, at once."""
        return self.request(op="start", processes=processes, runs=runs)["pids"]

    def wait(self, pids: list[int], timeout: float = 900) -> list[int]:
        """The ranks' exit codes, once all have ended."""
        return self.request(op="wait", pids=pids, timeout=timeout)["codes"]

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


_FORK_SERVER: list[ForkServer] = []


def fork_server() -> ForkServer:
    """The session's fork server, started on first use."""
    if not _FORK_SERVER:
        _FORK_SERVER.append(ForkServer())
    return _FORK_SERVER[0]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    for server in _FORK_SERVER:
        server.close()


def forked_run(
    args: list[str],
    accelerate_config: str | None,
    log: Path | None = None,
    env: dict[str, str] | None = None,
    inject: str | None = None,
    script: str = "sft.py",
    expect: int = 0,
) -> dict:
    """One run as the fork server takes it."""
    log = log or Path(tempfile.mkdtemp(prefix="llmhalluc-run-"))
    run = {"args": args, "accelerate_config": accelerate_config, "log": str(log), "script": script, "expect": expect}
    return run | {"env": env or {}, "inject": inject}


def start_forked(args: list[str], accelerate_config: str | None, log: Path, **options: object) -> list[int]:
    """Fork a run's ranks (2 for an accelerate config, else 1) and return their pids (a test may kill them)."""
    processes = 2 if accelerate_config else 1
    return fork_server().start([forked_run(args, accelerate_config, log, **options)], processes)


def run_forked(
    args: list[str], accelerate_config: str | None, timeout: int = 600, script: str = "sft.py", **options: object
) -> subprocess.CompletedProcess:
    """A run whose ranks the fork server forks; rank 0's output, every rank's errors, the first non-zero code."""
    run = forked_run(args, accelerate_config, script=script, **options)
    codes = fork_server().wait(
        start_forked(args, accelerate_config, Path(run["log"]), script=script, **options), timeout
    )
    return completed(run, next((c for c in codes if c != 0), 0))


def completed(run: dict, code: int) -> subprocess.CompletedProcess:
    """A finished forked run as a CompletedProcess: rank 0's stdout, every rank's stderr."""

    def output(name: str) -> str:
        path = Path(run["log"]) / name
        return path.read_text() if path.exists() else ""

    return subprocess.CompletedProcess(
        run["args"], code, output("rank0.out"), output("rank0.err") + output("rank1.err")
    )


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
    """Several 2-process train/sft.py runs, each (args, accelerate config of accelerate_configs/), their ranks
    forked from the fork server one run after another; one CompletedProcess per run. A run that fails fails the
    test, showing its output."""
    results = []
    for index, (args, launch) in enumerate(runs):
        run = forked_run(args, launch, log_root / f"run{index}")
        codes = fork_server().wait(fork_server().start([run], 2), timeout)
        result = completed(run, next((c for c in codes if c != 0), 0))
        if result.returncode != 0:
            pytest.fail(
                f"run {index} failed (exit {result.returncode}): {' '.join(args)}\n"
                f"{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
            )
        results.append(result)
    return results


def read_metrics(output_dir: Path) -> list[dict]:
    """The rows of output_dir/metrics.jsonl."""
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def write_lm_eval_task(folder: Path, task: str, rows: list[dict], max_tokens: int) -> Path:
    """A local lm-eval generate_until task (question -> answer rows, greedy, exact match), as researchers write
    theirs for --include_path; returns its folder."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{task}.yaml").write_text(
        f"task: {task}\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'rows.jsonl'}\n"
        "test_split: test\noutput_type: generate_until\n"
        'doc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
        f"generation_kwargs:\n  until: []\n  do_sample: false\n  max_gen_toks: {max_tokens}\n"
        "metric_list:\n  - metric: exact_match\n"
    )
    return folder


def write_chats(folder: Path, name: str, chats: list[list[dict]], formatting: str = "openai") -> Path:
    """A dataset_dir holding `chats` as name.jsonl and a dataset_info.json entry for it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    info_path = folder / "dataset_info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    info[name] = {"file_name": f"{name}.jsonl", "formatting": formatting}
    info_path.write_text(json.dumps(info, indent=1))
    return folder
