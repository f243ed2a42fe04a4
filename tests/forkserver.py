"""A fork server for the tests: one process imports the toolkit once, then forks every training run's ranks from
itself (a test helper, never used by the toolkit).

On a 2-core machine starting a run costs ~10 s (`accelerate launch` itself, then each rank importing torch,
transformers, DeepSpeed and PEFT) while a test run of a few steps takes ~3-5 s. Forked ranks start with everything
imported and nothing run: each is a fresh process, with the environment `accelerate launch --config_file` gives its
ranks (RANK, WORLD_SIZE, MASTER_ADDR/PORT, the DeepSpeed variables of the config). The numbers equal a launch's
(tests/test_checkpoints.py compares them). Tests of the launcher itself (signals reaching it, a failing rank, two
machines) still use `accelerate launch`.

Protocol, one JSON object per line on stdin, one reply per line on stdout:
    {"op": "start", "processes": 2, "runs": [{"args": [...], "accelerate_config": "cpu_zero3.yaml",
                                              "log": "folder", "script": "sft.py", "expect": 0}]}
        -> {"pids": [...]}: the ranks run the runs one after another (a run's output in log/rank<r>.out/.err)
    {"op": "wait", "pids": [...], "timeout": 600} -> {"codes": [...]}: when a rank fails, the others are killed
The server is single-threaded and never runs a tensor operation itself, so forking it is safe.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
DEEPSPEED_ENV = (
    "ACCELERATE_USE_DEEPSPEED",
    "ACCELERATE_DEEPSPEED_CONFIG_FILE",
    "ACCELERATE_DEEPSPEED_ZERO3_INIT",
    "ACCELERATE_CONFIG_DS_FIELDS",
)


def accelerate_env(config_name: str | None) -> dict[str, str]:
    """The ACCELERATE_* variables `accelerate launch` sets for a CPU config of accelerate_configs/."""
    if config_name is None:
        return {}
    config = yaml.safe_load((REPO / "accelerate_configs" / config_name).read_text())
    if config["distributed_type"] != "DEEPSPEED":
        return {"ACCELERATE_MIXED_PRECISION": "no"}
    deepspeed = config["deepspeed_config"]
    return {
        "ACCELERATE_MIXED_PRECISION": "no",
        "ACCELERATE_USE_DEEPSPEED": "true",
        "ACCELERATE_DEEPSPEED_CONFIG_FILE": deepspeed["deepspeed_config_file"],
        "ACCELERATE_DEEPSPEED_ZERO3_INIT": str(deepspeed["zero3_init_flag"]).lower(),
        "ACCELERATE_CONFIG_DS_FIELDS": "deepspeed_config_file,zero3_init_flag",
    }


def preload() -> dict:
    """Import what a run imports (the entry points, models, PEFT, DeepSpeed, matplotlib), running nothing."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    sys.path.insert(0, str(REPO / "train"))
    import deepspeed
    import deepspeed.runtime.engine
    import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: F401  (torch.compile at import: ~3 s per ZeRO run)
    import eval as eval_entry
    import matplotlib.backends.backend_agg
    import matplotlib.figure  # noqa: F401  (loss.png at every checkpoint: ~1 s of imports per run otherwise)
    import peft  # noqa: F401
    import run as run_entry
    import sft
    import transformers.models.llama.modeling_llama  # noqa: F401

    import llmhalluc.cli.pipeline
    import llmhalluc.cli.study
    import llmhalluc.eval.standalone
    import llmhalluc.train.loop  # noqa: F401

    return {"sft.py": sft, "eval.py": eval_entry, "run.py": run_entry}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank_main(rank: int, processes: int, port: int, runs: list[dict], entries: dict) -> int:
    """What a forked rank does: the runs in order, each with its launch environment and output files."""
    os.setpgid(0, 0)  # its own process group: a test kills a run's ranks without touching this server
    if processes > 1:
        os.environ.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(processes),
            LOCAL_WORLD_SIZE=str(processes),
            GROUP_RANK="0",
            ROLE_RANK=str(rank),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
        )
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    torch.set_num_threads(1 if processes > 1 else torch.get_num_threads())
    group_kept = len(runs) > 1
    if group_kept:  # several runs in one process group: it outlives each run; trackers still finish
        Accelerator.end_training = lambda self: [tracker.finish() for tracker in self.trackers]
    code = 0
    for run in runs:
        for key in DEEPSPEED_ENV:
            os.environ.pop(key, None)
        os.environ.update(accelerate_env(run.get("accelerate_config")))
        os.environ.update(run.get("env", {}))
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        log = Path(run["log"])
        log.mkdir(parents=True, exist_ok=True)
        out = os.open(log / f"rank{rank}.out", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        err = os.open(log / f"rank{rank}.err", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(out, 1)
        os.dup2(err, 2)
        try:
            if run.get("inject"):
                exec(run["inject"], {"__name__": "inject"})  # what a sitecustomize would do at start-up
            code = entries[run.get("script", "sft.py")].main(run["args"])
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        if code != run.get("expect", 0):
            return code or 1
    if group_kept and processes > 1:
        with contextlib.suppress(Exception):
            torch.distributed.destroy_process_group()
    return code


def wait(pids: list[int], timeout: float) -> list[int]:
    """Exit codes of the ranks; when one fails the others are killed (as torchrun does), so none hangs."""
    codes: dict[int, int] = {}
    deadline = time.time() + timeout
    while len(codes) < len(pids):
        for pid in pids:
            if pid in codes:
                continue
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                codes[pid] = os.waitstatus_to_exitcode(status)
                if codes[pid] != 0:
                    for other in pids:
                        if other not in codes:
                            with contextlib.suppress(ProcessLookupError):
                                os.killpg(other, signal.SIGKILL)
        if time.time() > deadline:
            for pid in pids:
                if pid not in codes:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(pid, signal.SIGKILL)
        time.sleep(0.02)
    return [codes[pid] for pid in pids]


def serve() -> None:
    """Answer start and wait requests until stdin closes."""
    entries = preload()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "start":
            processes, port = request["processes"], free_port()
            pids = []
            for rank in range(processes):
                pid = os.fork()
                if pid == 0:
                    os._exit(rank_main(rank, processes, port, request["runs"], entries))
                pids.append(pid)
            reply = {"pids": pids}
        else:
            reply = {"codes": wait(request["pids"], request.get("timeout", 900))}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    serve()
