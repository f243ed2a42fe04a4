"""A study in one command: `[accelerate launch ...] train/run.py PLAN.yaml [--dry-run] [--debug]`.

Runs the plan's steps in order (train, merge, evaluate; SFT -> DPO -> GRPO chained through their models), skipping
finished steps and resuming a killed one from its last checkpoint, then writes results.md and results.json at the
plan's output_dir. `--dry-run` lists every step, its input model, its output and what is left of it. An experiment
config without `steps:` is a plan of one step (do_train, do_merge, do_eval). See docs/pipeline.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():  # DeepSpeed would warn on every rank that it picked the CPU
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from llmhalluc.errors import Diverged, UserError, report_and_exit_code
from llmhalluc.train.preemption import PREEMPTED_MARKER, Preempted


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, read the plan, then run it (or describe it with --dry-run)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("plan", help="plan YAML (steps:), or an experiment config with do_train/do_merge/do_eval")
    parser.add_argument("--dry-run", action="store_true", help="list the steps and what is left, run nothing")
    parser.add_argument("--output-dir", action="store_true", help="print the study's root (the plan is checked)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for input errors")
    args = parser.parse_args(argv)
    try:
        from llmhalluc.cli.pipeline import describe, read_plan
        from llmhalluc.cli.study import is_main_process, run_plan

        steps, root = read_plan(Path(args.plan))
        if args.output_dir:
            print(root)
            return 0
        marker = root / PREEMPTED_MARKER
        main_process = is_main_process()
        if main_process:
            marker.unlink(missing_ok=True)
            print(describe(steps), flush=True)
        if args.dry_run:
            if main_process:
                print("dry run: nothing was trained or written")
            return 0
        rows = run_plan(steps, root)
        if main_process:
            print(f"study finished: {len(rows)} results in {root / 'results.md'}")
    except Preempted as stop:
        if main_process:  # scripts/slurm/pipeline.sbatch requeues the study
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(f"{stop}\n")
        return report_and_exit_code(stop)
    except Diverged as stop:
        return report_and_exit_code(stop)
    except UserError as err:
        if args.debug:
            raise
        return report_and_exit_code(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
