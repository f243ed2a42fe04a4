"""The training loop: train() runs a stage of an experiment; train_step() is one exact optimizer step of its
objective; evaluate() is its eval rows. Setup is llmhalluc.train.setup's, the objective the stage's.

The loss of an optimizer step is the objective's sum over the global batch (all micro-batches of the accumulation
window, on every rank) divided by its global count. The count of the whole window is all-reduced before any
backward pass, and each micro-batch backpropagates `loss_sum * GA * processes / count`: accelerate (1/GA, or
DeepSpeed's own 1/GA) and data-parallel averaging (1/processes) then leave exactly `sum(loss) / count` in the
gradients, whatever the split. The micro-step never reads a device value on the host; one value per optimizer step
is read (whether the step was finite, and whether any rank was told to stop).
"""

from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from llmhalluc.config import Config
from llmhalluc.data.batching import eval_batches
from llmhalluc.errors import Diverged
from llmhalluc.eval.runner import evaluate_generations, metric_rows
from llmhalluc.models.export import merge_adapter, save_model
from llmhalluc.plot import LossPlot
from llmhalluc.runtime.dist import zero3_init_disabled
from llmhalluc.runtime.tracking import MetricsLogger
from llmhalluc.train.best import BestModel, load_best_model
from llmhalluc.train.checkpoint import TrainerState, load_checkpoint, save_checkpoint
from llmhalluc.train.feed import to_device
from llmhalluc.train.grpo import GRPO_STAGE
from llmhalluc.train.meter import StepResult, WindowMeter
from llmhalluc.train.objective import Objective
from llmhalluc.train.preemption import PREEMPTED_MARKER, Preempted, PreemptionWatch
from llmhalluc.train.preference import DPO_STAGE
from llmhalluc.train.report import RunRecord
from llmhalluc.train.setup import Run, setup
from llmhalluc.train.stage import SFT_STAGE, Stage

STAGES = {"sft": SFT_STAGE, "dpo": DPO_STAGE, "grpo": GRPO_STAGE}  # the config's `stage` -> what it trains


def train(config: Config, stage: Stage | None = None, keep_process_group: bool = False) -> Path:
    """Run the experiment described by `config` with its stage's objective (or `stage`); returns the output_dir
    holding the final model. `keep_process_group` (a study's steps) leaves the process group for the next run."""
    stage = stage or STAGES[config.training.stage]
    run = setup(config, stage)
    state = load_checkpoint(run) if run.resume_from is not None else TrainerState.start(run)
    stage.start(run)
    record = RunRecord(run)  # config.yaml, run_summary.json (status running), the start-up summary
    logger = MetricsLogger(config, run.output_dir, record.is_main, run.total_steps, state.step, record.summary)
    logger.log_html_table("mask_audit/examples", ["dataset", "example"], run.data.audit_panel)
    windows = stage.windows(run, state.step)
    meter = WindowMeter(run.accelerator, stage.objective, config.data.dataset, run.flops)
    cadence, watch, status = Cadence.of(config, run.total_steps), PreemptionWatch(), "failed"
    best, plot = BestModel(config, state, record.is_main), LossPlot(run.output_dir)
    try:
        run.model.train()
        while state.step < run.total_steps and not best.stop:
            state.epoch, micro_batches = next(windows)
            lr = run.schedule.current_lr()  # the rate this step uses
            meter.start_step()
            result = train_step(run, stage.objective, micro_batches, watch.flag())
            meter.add(result, lr)
            run.schedule.step(result.applied)
            state.advance(result.applied, meter.last_step_seconds, run.data.sampler.global_batch)
            step = state.step
            saving, stopping = cadence.saves(step), result.preempt and step < run.total_steps
            diverged = state.nonfinite_steps >= config.training.max_nonfinite_steps
            # A row at every checkpoint too, so a resumed run's rows cover the same steps as an uninterrupted run's.
            if cadence.logs(step) or saving or stopping or diverged:
                logger.log(state.count_row(meter.row(step, state.steps_per_epoch)))
            if diverged:
                status = "diverged"
                raise Diverged(
                    f"{state.nonfinite_steps} optimizer steps in a row had a non-finite loss or gradient norm (up to "
                    f"step {step}) and were skipped; stopping. Weights were not updated by them; the newest "
                    f"checkpoint in {run.output_dir} is intact. Lower learning_rate or check the data and model."
                )
            if cadence.evaluates(step) and run.eval_data is not None:
                best.observe(logger.log({"step": step, **timed(evaluate, run, stage.objective, key="eval_time")}))
            if cadence.generates(step) and run.generation_sets:
                best.observe(logger.log({"step": step, **timed(generation_rows, run, key="gen_time")}))
            if saving or stopping:
                save_checkpoint(run, state)
                if run.accelerator.is_main_process:
                    plot.refresh()
            if stopping:
                status = "preempted"
                stop_for_preemption(run.accelerator, run.output_dir, state, watch)
            logger.advance()
        state.final_model_step = load_best_model(run, state)
        save_final_model(run)
        status = "finished"
    except BaseException as err:
        if status == "failed":
            record.finish(
                "failed", state, error=f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            )
        raise
    finally:
        watch.restore()
        logger.close()
        if status != "failed":
            record.finish(status, state)
        # The DeepSpeed engine is torn down while the process group still exists, on every path out: left to the
        # garbage collector at interpreter exit, its cleanup can run after the group is gone (a ZeRO-3 rank once
        # aborted there). DeepSpeed's own order: engine, then group. Without DeepSpeed there is nothing to order,
        # and free_memory's full garbage collection would only cost time.
        if run.accelerator.distributed_type == DistributedType.DEEPSPEED:
            run.accelerator.free_memory()
        if not keep_process_group:  # accelerate's end_training destroys the process group
            run.accelerator.end_training()
    return run.output_dir


@dataclass(frozen=True)
class Cadence:
    """Which optimizer steps write a metrics row, evaluate, generate and save: every N steps, and the last step."""

    total_steps: int
    logging_steps: int
    eval_steps: int | None
    generation_steps: int | None
    save_steps: int | None

    @classmethod
    def of(cls, config: Config, total_steps: int) -> Cadence:
        """The cadence a config asks for."""
        run = config.run
        return cls(
            total_steps, run.logging_steps, run.eval_steps, config.generation.generation_eval_steps, run.save_steps
        )

    def logs(self, step: int) -> bool:
        """A metrics row every logging_steps and at the end."""
        return step % self.logging_steps == 0 or step == self.total_steps

    def evaluates(self, step: int) -> bool:
        """Eval loss every eval_steps and at the end (when there is an eval set)."""
        return bool(self.eval_steps and step % self.eval_steps == 0) or step == self.total_steps

    def generates(self, step: int) -> bool:
        """Generation metrics every generation_eval_steps and at the end (when asked for)."""
        return self.generation_steps is not None and (step % self.generation_steps == 0 or step == self.total_steps)

    def saves(self, step: int) -> bool:
        """A checkpoint every save_steps."""
        return self.save_steps is not None and step % self.save_steps == 0


def timed(function: Any, *args: Any, key: str) -> dict[str, Any]:
    """function(*args)'s row, with its wall time under `key`."""
    started = time.perf_counter()
    row = function(*args)
    return {**row, key: time.perf_counter() - started}


def stop_for_preemption(accelerator: Accelerator, output_dir: Path, state: TrainerState, watch: Any) -> None:
    """Mark the run as preempted (the SLURM script requeues it) and stop every rank."""
    signal_name = signal.Signals(watch.received).name if watch.received else "a signal on another rank"
    message = f"stopped by {signal_name} after step {state.step}; checkpoint-{state.step} saved, resume with latest"
    if accelerator.is_main_process:
        (output_dir / PREEMPTED_MARKER).write_text(json.dumps({"step": state.step, "signal": signal_name}) + "\n")
    accelerator.wait_for_everyone()
    raise Preempted(message)


def save_final_model(run: Run) -> None:
    """The trained model in output_dir and, with merge, base + adapter merged into output_dir/merged (once)."""
    save_model(run.accelerator, run.model, run.tokenizer, run.export, run.output_dir)
    if run.export.merge:
        if run.accelerator.is_main_process:
            with zero3_init_disabled(run.accelerator):  # the base loads whole on this rank alone
                merge_adapter(run.output_dir, run.output_dir / "merged")
        run.accelerator.wait_for_everyone()


def train_step(
    run: Run, objective: Objective, micro_batches: list[dict[str, Any]], preempt_flag: float = 0.0
) -> StepResult:
    """Forward and backward over the accumulation window, then one optimizer step on the exact global mean."""
    accelerator, model = run.accelerator, run.model
    device = accelerator.device
    on_device = [to_device(mb, device) for mb in micro_batches]
    # Counted by the collator on the host, reduced on the device with this rank's preemption flag: the exact
    # normalisation and the stop agreement in one collective, without waiting for the device.
    local = torch.tensor([float(sum(objective.count(mb) for mb in micro_batches)), preempt_flag])
    global_count, stop_votes = accelerator.reduce(local.to(device, non_blocking=True), "sum").unbind()
    scale = accelerator.gradient_accumulation_steps * accelerator.num_processes / global_count
    sums: dict[str, torch.Tensor] = {}
    for micro_batch in on_device:
        with accelerator.accumulate(model):
            loss_sum, parts = objective.loss(model, micro_batch, run.loss_options)
            accelerator.backward(loss_sum * scale)
        sums = {k: sums[k] + v if k in sums else v for k, v in parts.items()}
    # Under DeepSpeed the step already ran inside backward and this returns its (pre-clipping) norm; DeepSpeed
    # skips a step with non-finite gradients itself. Otherwise the norm is global (gradients are all-reduced),
    # so every rank takes the same decision here, before the optimizer step.
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), run.config.training.max_grad_norm or math.inf)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        applied = model.was_step_applied()
        preempt = bool(stop_votes.item())  # the step's one host read
    else:
        finite = torch.isfinite(torch.as_tensor(grad_norm, device=device)).float()
        applied, preempt = (bool(v) for v in torch.stack([finite, stop_votes]).tolist())  # the step's one host read
        if applied:
            run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return StepResult(sums, host_sums(objective, micro_batches), global_count, grad_norm, applied, preempt)


def host_sums(objective: Objective, micro_batches: list[dict[str, Any]]) -> dict[str, list[float]]:
    """This rank's counts known on the host, summed over the window: tokens, trained tokens, squared example
    lengths (attention FLOPs), and the objective's own."""
    parts = [
        {
            "tokens": [float(mb["lengths"].sum())],
            "trained_tokens": [float(mb["targets"].numel())],
            "squares": [float((mb["lengths"] ** 2).sum())],
            **objective.host_sums(mb),
        }
        for mb in micro_batches
    ]
    return {key: [sum(values) for values in zip(*(p[key] for p in parts))] for key in parts[0]}


@torch.no_grad()
def evaluate(run: Run, objective: Objective) -> dict[str, Any]:
    """The objective's eval row over the whole eval set, every rank a share of it, reduced once."""
    accelerator, eval_data = run.accelerator, run.eval_data
    run.model.eval()
    config = run.config
    batches = eval_batches(
        len(eval_data.dataset),
        config.training.per_device_eval_batch_size,
        accelerator.num_processes,
        accelerator.process_index,
    )
    sums: dict[str, torch.Tensor] = {}
    for indices in batches:
        # A rank with no rows left still runs a (discarded) forward so ZeRO-3's collectives stay in step.
        batch = to_device(eval_data.collate([eval_data.dataset[i] for i in (indices or [0])]), accelerator.device)
        weight = 1.0 if indices else 0.0
        _, parts = objective.loss(run.model, batch, run.loss_options)
        host = {
            k: torch.tensor(v, device=accelerator.device, dtype=torch.float32)
            for k, v in objective.host_sums(batch).items()
        }
        for key, value in {**parts, **host}.items():
            sums[key] = sums.get(key, 0) + value * weight
    keys = sorted(sums)
    reduced = accelerator.reduce(torch.cat([sums[k].reshape(-1) for k in keys]), "sum").tolist()
    totals, start = {}, 0
    for key in keys:
        totals[key], start = reduced[start : start + sums[key].numel()], start + sums[key].numel()
    run.model.train()
    return objective.eval_row(totals, config.data.eval_dataset)


def generation_rows(run: Run) -> dict[str, Any]:
    """gen/<dataset>/<metric> of the model as it is, on the fixed generation-eval subsets."""
    results = evaluate_generations(
        run.model, run.tokenizer, run.facts, run.config, run.accelerator, run.generation_sets, progress=False
    )
    return metric_rows(results)
