"""Several train/sft.py runs in one 2-process `accelerate launch` (a test helper, never used by the toolkit).

On a 2-core machine a launch costs ~10 s of start-up and imports per run before its first step, while a test run of
a few steps takes ~5 s. This driver keeps the process group and the imports between runs: before each run it
resets accelerate's state and sets the environment that run's accelerate config would have given it (DDP, or
DeepSpeed with its json), exactly as `accelerate launch --config_file` does. The numbers equal a launch per run
(tests/test_checkpoints.py compares them). Each run's output goes to its own files per rank; an exit code other
than the one expected ends the whole launch at once (the other rank would wait in a collective forever).

`python -m accelerate.commands.launch --config_file accelerate_configs/cpu_ddp.yaml tests/launch_many.py PLAN.json`
with PLAN.json a list of {"args": [...], "accelerate_config": "cpu_zero3.yaml", "log": "folder", "expect": 0}.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
DEEPSPEED_ENV = (
    "ACCELERATE_USE_DEEPSPEED",
    "ACCELERATE_DEEPSPEED_CONFIG_FILE",
    "ACCELERATE_DEEPSPEED_ZERO3_INIT",
    "ACCELERATE_CONFIG_DS_FIELDS",
)


def accelerate_env(config_name: str) -> dict[str, str]:
    """The ACCELERATE_* variables `accelerate launch` sets for a 2-process CPU config of accelerate_configs/."""
    config = yaml.safe_load((REPO / "accelerate_configs" / config_name).read_text())
    assert config["num_processes"] == 2, f"{config_name}: one launch holds 2-process runs only"
    if config["distributed_type"] != "DEEPSPEED":
        return {}
    deepspeed = config["deepspeed_config"]
    return {
        "ACCELERATE_USE_DEEPSPEED": "true",
        "ACCELERATE_DEEPSPEED_CONFIG_FILE": deepspeed["deepspeed_config_file"],
        "ACCELERATE_DEEPSPEED_ZERO3_INIT": str(deepspeed["zero3_init_flag"]).lower(),
        "ACCELERATE_CONFIG_DS_FIELDS": "deepspeed_config_file,zero3_init_flag",
    }


def main(plan_file: str) -> int:
    """Run every entry of the plan in order; write the exit codes next to the plan (rank 0)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    sys.path.insert(0, str(REPO / "train"))
    import sft
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    # The process group outlives each run; trackers still finish.
    Accelerator.end_training = lambda self: [tracker.finish() for tracker in self.trackers]
    rank = os.environ["RANK"]
    codes = []
    for entry in json.loads(Path(plan_file).read_text()):
        for key in DEEPSPEED_ENV:
            os.environ.pop(key, None)
        os.environ.update(accelerate_env(entry["accelerate_config"]))
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        log = Path(entry["log"])
        log.mkdir(parents=True, exist_ok=True)
        with (
            (log / f"rank{rank}.out").open("w") as out,
            (log / f"rank{rank}.err").open("w") as err,
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
        ):
            try:
                code = sft.main(entry["args"])
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else 1
            except Exception:
                import traceback

                traceback.print_exc()
                code = 1
        codes.append(code)
        if code != entry.get("expect", 0):
            print(f"rank {rank}: run {len(codes) - 1} exited {code}; see {log}", file=sys.stderr, flush=True)
            os._exit(1)  # the launcher then ends the other rank
    if rank == "0":
        Path(plan_file).with_suffix(".codes.json").write_text(json.dumps(codes))
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
