"""Running a study's plan (llmhalluc/cli/pipeline.py reads it): every step's training, evaluation and lm-eval in
order, what is finished skipped, a preemption signal acted on between steps, then the results table. Under a
multi-process launch every process runs the plan with one process group for the whole study."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from llmhalluc.cli.harness import lm_eval_done, run_lm_eval
from llmhalluc.cli.pipeline import EVAL_TAG, Step, log_results_table, results_rows, with_values, write_results
from llmhalluc.train.preemption import Preempted, PreemptionWatch


def run_plan(steps: list[Step], root: Path) -> list[dict[str, Any]]:
    """Run what is left of every step, in order; then write the study's results table at `root`. Under a
    multi-process launch every process runs the plan: training, evaluation and lm-eval are collective. A preemption
    signal stops training at a checkpoint, or the study before its next training or evaluation (Preempted)."""
    import torch.distributed

    from llmhalluc.runtime.dist import start_process_group

    start_process_group()  # one group, with our timeout, for the whole study: each step keeps it for the next
    watch, main = PreemptionWatch(), is_main_process()
    try:
        for step in steps:
            stop_if_signalled(watch, f"step {step.name}")  # also where every process meets before deciding
            left = step.todo()
            if main:
                print(f"=== step {step.name}: {', '.join(left) if left else 'done, skipped'}", flush=True)
            run_step(step, watch, main)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
    finally:
        watch.restore()
        if torch.distributed.is_initialized():  # on every way out: the steps kept it for each other
            torch.distributed.destroy_process_group()
    rows = results_rows(steps)
    if main:
        write_results(root, rows)
        log_results_table(steps, rows, root)
    return rows


def run_step(step: Step, watch: PreemptionWatch, main: bool) -> None:
    """What is left of one step: train (resuming), evaluate, lm-eval; decided before any of it runs."""
    from llmhalluc.eval.standalone import evaluate_model
    from llmhalluc.train.loop import train

    training, evaluating = step.do_train and not step.trained(), step.do_eval and not step.evaluated()
    scoring = step.lm_eval is not None and not lm_eval_done(step.output_dir)
    if training:
        # auto: resume from the newest complete checkpoint, or start again when the step died before its first
        config = with_values(step.config, "run", resume_from_checkpoint="auto")
        fresh_launch_state()
        train(config, keep_process_group=True)
    if evaluating:
        stop_if_signalled(watch, f"step {step.name}'s evaluation")
        fresh_launch_state()
        evaluate_model(with_values(step.config, "generation", eval_tag=EVAL_TAG), keep_process_group=True)
    if scoring:
        stop_if_signalled(watch, f"step {step.name}'s lm-eval")
        fresh_launch_state()  # lm-eval builds its own Accelerator
        run_lm_eval(step.lm_eval, step.evaluated_model, step.config.data.backtrack_target(), step.output_dir, main)


def fresh_launch_state() -> None:
    """Forget accelerate's process-wide state (not the process group) so the next run builds its own, as a launch of
    that run alone would."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def stop_if_signalled(watch: PreemptionWatch, before: str) -> None:
    """Raise Preempted on every process when any of them was signalled (a collective: all call it at one point)."""
    import torch
    import torch.distributed

    flag = torch.tensor([watch.flag()])
    if torch.distributed.is_initialized():
        if torch.cuda.is_available():  # NCCL reduces on the process's GPU
            flag = flag.to(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
        torch.distributed.all_reduce(flag)
    if flag.item() > 0:
        raise Preempted(f"preempted: the study stopped before {before}; run it again to go on from there")


def is_main_process() -> bool:
    """Whether this is the launch's first process (or the only one)."""
    return int(os.environ.get("RANK", "0")) == 0
