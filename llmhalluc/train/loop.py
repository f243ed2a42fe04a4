"""The training loop: train() runs an experiment; train_step() is one exact optimizer step; evaluate() is eval loss.

The loss of an optimizer step is the mean cross-entropy over every trained token of the global batch (all
micro-batches of the accumulation window, on every rank). The trained-token count of the whole window is
all-reduced before any backward pass, and each micro-batch backpropagates `ce_sum * GA * processes / count`:
accelerate (1/GA, or DeepSpeed's own 1/GA) and data-parallel averaging (1/processes) then leave exactly
`sum(ce) / count` in the gradients, whatever the split. The micro-step never reads a device value on the host;
one value per optimizer step is read (whether the step was finite, and whether any rank was told to stop).
"""

from __future__ import annotations

import json
import math
import signal
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed

from llmhalluc.config import Config
from llmhalluc.data.batching import PaddedCollator, eval_batches
from llmhalluc.data.facts import token_facts
from llmhalluc.errors import Diverged
from llmhalluc.eval.runner import evaluate_generations, load_eval_sets, metric_rows
from llmhalluc.models.attention import use_packed_sdpa
from llmhalluc.models.export import load_hint, merge_adapter, plan_export, save_model
from llmhalluc.models.loading import load_dtype, load_model, load_tokenizer, resolve_attention
from llmhalluc.models.lora import parameter_counts, wrap_lora
from llmhalluc.models.tokens import add_tokens, embed_new_tokens
from llmhalluc.plot import write_loss_plot
from llmhalluc.runtime.dist import build_accelerator, deepspeed_config_of, quiet_other_ranks, zero3_init_disabled
from llmhalluc.train.checkpoint import (
    TrainerState,
    check_output_dir,
    check_resumable,
    check_same_run,
    load_checkpoint,
    save_checkpoint,
)
from llmhalluc.train.feed import accumulation_windows, batch_layout, build_train_loader, prepare_eval_set
from llmhalluc.train.loss import causal_lm_of, cross_entropy_sum
from llmhalluc.train.metrics import MetricsLogger, StepResult, WindowMeter, flops_model_of
from llmhalluc.train.optim import build_optimizer
from llmhalluc.train.preemption import PREEMPTED_MARKER, Preempted, PreemptionWatch
from llmhalluc.train.summary import RunRecord, final_metrics, report, run_summary


def train(config: Config) -> Path:
    """Run the experiment described by `config`; returns the output_dir holding the final model."""
    accelerator = build_accelerator(config)
    quiet_other_ranks(accelerator)
    model_config, training, run = config.model, config.training, config.run
    output_dir = Path(run.output_dir)
    set_seed(training.seed)
    resume_dir = check_output_dir(output_dir, run.resume_from_checkpoint)  # before the (long) data preparation
    if resume_dir is not None:
        check_resumable(resume_dir)
    tokenizer = load_tokenizer(model_config)
    new_tokens = add_tokens(tokenizer, config)  # before the data: a new token is one token wherever it appears
    facts = token_facts(tokenizer, config.data.backtrack_token, new_tokens.ids)
    on_gpu = accelerator.device.type == "cuda"
    attention = resolve_attention(model_config)
    layout = batch_layout(config.data, attention, on_gpu, model_config.torch_compile)
    train_data = build_train_loader(config, tokenizer, accelerator, layout)
    sampler = train_data.sampler
    eval_data = prepare_eval_set(config, tokenizer, accelerator)
    if eval_data is not None:
        train_data.summary["eval_data"] = eval_data[1].to_dict()
    generation = config.generation
    prompts = load_eval_sets(config, generation.generation_eval_samples) if generation.generation_eval_steps else []
    total_steps = training.max_steps or math.ceil(training.num_train_epochs * sampler.steps_per_epoch)
    if resume_dir is not None:
        check_same_run(resume_dir, config, sampler, accelerator.num_processes)

    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    model = load_model(model_config, attention, load_dtype(accelerator.mixed_precision == "bf16", deepspeed))
    embed_new_tokens(model, tokenizer, new_tokens, training.seed, model_config.resize_vocab_to_multiple_of)
    export = plan_export(model_config, new_tokens, facts)
    train_data.summary["new_tokens"] = new_tokens.summary()
    if model_config.finetuning_type == "lora":
        model = wrap_lora(model, model_config, new_tokens, training.seed)
    train_data.summary["parameters"] = parameter_counts(model)
    if layout != "padded" and attention == "sdpa" and not on_gpu and not model_config.torch_compile:
        use_packed_sdpa(model)  # per-example causal sdpa: 2.6x faster on CPU than a block mask over the row
    attention = model.config._attn_implementation
    train_data.summary["attention"] = attention
    train_data.summary["loaded_sharded"] = any(hasattr(p, "ds_id") for p in model.parameters())  # ZeRO-3 init
    flops = flops_model_of(model) if on_gpu else None
    setup = build_optimizer(model, training, total_steps, deepspeed_config_of(accelerator))
    if setup.loop_steps_scheduler:
        # Not prepared: DeepSpeed would step a prepared scheduler itself, on top of the loop's own step.
        model, optimizer = accelerator.prepare(model, setup.optimizer)
        scheduler = setup.scheduler
        accelerator.register_for_checkpointing(scheduler)
    else:
        model, optimizer, scheduler = accelerator.prepare(model, setup.optimizer, setup.scheduler)
    loss_options = {"chunk_tokens": training.loss_chunk_tokens, "liger": model_config.use_liger_kernel}
    record = RunRecord(
        output_dir, run_summary(accelerator, config, train_data, total_steps), accelerator.is_main_process
    )
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(config.to_yaml())
        (output_dir / PREEMPTED_MARKER).unlink(missing_ok=True)
        record.start()
        print(f"config:\n{config.to_yaml()}\nrun: {json.dumps(record.summary, indent=1)}", flush=True)

    state = TrainerState(
        data_seed=training.seed,
        global_batch_size=sampler.global_batch,
        steps_per_epoch=sampler.steps_per_epoch,
        num_processes=accelerator.num_processes,
    )
    if resume_dir is not None:
        state = load_checkpoint(accelerator, model, resume_dir, export)
        accelerator.print(f"resumed from {resume_dir} at step {state.step}")
    logger = MetricsLogger(config, output_dir, accelerator.is_main_process, total_steps, state.step, record.summary)
    logger.log_html_table("mask_audit/examples", ["dataset", "example"], train_data.audit_panel)
    windows = accumulation_windows(train_data.loader, sampler, state.step, training.gradient_accumulation_steps)
    meter = WindowMeter(accelerator, config.data.dataset, flops)
    watch = PreemptionWatch()
    status = "failed"
    try:
        model.train()
        while state.step < total_steps:
            state.epoch, micro_batches = next(windows)
            lr = optimizer.param_groups[0]["lr"]  # the rate this step uses
            meter.start_step()
            result = train_step(
                model, optimizer, micro_batches, accelerator, training.max_grad_norm, loss_options, watch.flag()
            )
            meter.add(result, lr)
            state.train_seconds += meter.last_step_seconds
            if setup.loop_steps_scheduler and result.applied:
                scheduler.step()
            state.step += 1
            state.nonfinite_steps = 0 if result.applied else state.nonfinite_steps + 1
            diverged = state.nonfinite_steps >= training.max_nonfinite_steps
            state.samples_seen += sampler.global_batch
            last = state.step == total_steps
            saving = run.save_steps is not None and state.step % run.save_steps == 0
            stopping = result.preempt and not last
            # A row at every checkpoint too, so a resumed run's rows cover the same steps as an uninterrupted run's.
            if state.step % run.logging_steps == 0 or last or saving or stopping or diverged:
                row = meter.row(state.step, state.steps_per_epoch)
                state.tokens_seen += row["tokens"]
                state.trained_tokens_seen += row["trained_tokens"]
                logger.log({**row, "tokens_seen": state.tokens_seen})
            if diverged:
                status = "diverged"
                raise Diverged(
                    f"{state.nonfinite_steps} optimizer steps in a row had a non-finite loss or gradient norm (up to "
                    f"step {state.step}) and were skipped; stopping. Weights were not updated by them; the newest "
                    f"checkpoint in {output_dir} is intact. Lower learning_rate or check the data and model."
                )
            if eval_data is not None and ((run.eval_steps and state.step % run.eval_steps == 0) or last):
                started = time.perf_counter()
                evaluation = evaluate(model, eval_data[0], tokenizer, accelerator, config, loss_options)
                logger.log({"step": state.step, **evaluation, "eval_time": time.perf_counter() - started})
            if prompts and (state.step % generation.generation_eval_steps == 0 or last):
                started = time.perf_counter()
                results = evaluate_generations(model, tokenizer, facts, config, accelerator, prompts, progress=False)
                logger.log({"step": state.step, **metric_rows(results), "gen_time": time.perf_counter() - started})
            if saving or stopping:
                save_checkpoint(accelerator, output_dir, state, config, model, tokenizer, export)
                if accelerator.is_main_process:
                    write_loss_plot(output_dir)
            if stopping:
                status = "preempted"
                stop_for_preemption(accelerator, output_dir, state, watch)
            logger.advance()
        save_model(accelerator, model, tokenizer, export, output_dir)
        if export.merge:  # once, at the end: base + adapter as a model that loads without peft
            if accelerator.is_main_process:
                with zero3_init_disabled(accelerator):
                    merge_adapter(output_dir, output_dir / "merged")
            accelerator.wait_for_everyone()
        status = "finished"
    except BaseException as err:
        if status == "failed":
            record.finish("failed", error=f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
        raise
    finally:
        watch.restore()
        logger.close()
        if status != "failed" and accelerator.is_main_process:
            final = final_metrics(output_dir, state.train_seconds, state.trained_tokens_seen, state.step)
            record.finish(status, final)
            write_loss_plot(output_dir)
            load = load_hint(output_dir, export) if status == "finished" else None
            print(report(status, record, final, output_dir, load), flush=True)
        # The DeepSpeed engine is torn down while the process group still exists, on every path out: left to the
        # garbage collector at interpreter exit, its cleanup can run after the group is gone (a ZeRO-3 rank once
        # aborted there). DeepSpeed's own order: engine, then group.
        accelerator.free_memory()
        accelerator.end_training()
    return output_dir


def stop_for_preemption(accelerator: Accelerator, output_dir: Path, state: TrainerState, watch: Any) -> None:
    """Mark the run as preempted (the SLURM script requeues it) and stop every rank."""
    signal_name = signal.Signals(watch.received).name if watch.received else "a signal on another rank"
    message = f"stopped by {signal_name} after step {state.step}; checkpoint-{state.step} saved, resume with latest"
    if accelerator.is_main_process:
        (output_dir / PREEMPTED_MARKER).write_text(json.dumps({"step": state.step, "signal": signal_name}) + "\n")
    accelerator.wait_for_everyone()
    raise Preempted(message)


def train_step(
    model: Any,
    optimizer: Any,
    micro_batches: list[dict[str, Any]],
    accelerator: Accelerator,
    max_grad_norm: float,
    loss_options: dict[str, Any] | None = None,
    preempt_flag: float = 0.0,
) -> StepResult:
    """Forward and backward over the accumulation window, then one optimizer step on the exact global mean."""
    device = accelerator.device
    on_device = [to_device(mb, device) for mb in micro_batches]
    # Counted by the collator on the host, reduced on the device with this rank's preemption flag: the exact
    # normalisation and the stop agreement in one collective, without waiting for the device.
    local = torch.tensor([float(sum(mb["targets"].numel() for mb in micro_batches)), preempt_flag])
    global_count, stop_votes = accelerator.reduce(local.to(device, non_blocking=True), "sum").unbind()
    scale = accelerator.gradient_accumulation_steps * accelerator.num_processes / global_count
    ce_total = torch.zeros((), device=device)
    ce_by_source = None
    for micro_batch in on_device:
        with accelerator.accumulate(model):
            ce_sum, by_source = cross_entropy_sum(model, micro_batch, **(loss_options or {}))
            accelerator.backward(ce_sum * scale)
        ce_total += ce_sum.detach()
        ce_by_source = by_source if ce_by_source is None else ce_by_source + by_source
    # Under DeepSpeed the step already ran inside backward and this returns its (pre-clipping) norm; DeepSpeed
    # skips a step with non-finite gradients itself. Otherwise the norm is global (gradients are all-reduced),
    # so every rank takes the same decision here, before the optimizer step.
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm or math.inf)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        applied = model.was_step_applied()
        preempt = bool(stop_votes.item())  # the step's one host read
    else:
        finite = torch.isfinite(torch.as_tensor(grad_norm, device=device)).float()
        applied, preempt = (bool(v) for v in torch.stack([finite, stop_votes]).tolist())  # the step's one host read
        if applied:
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    tokens = sum(int(mb["lengths"].sum()) for mb in micro_batches)
    squares = sum(int((mb["lengths"] ** 2).sum()) for mb in micro_batches)
    counts = [sum(c) for c in zip(*(mb["source_counts"] for mb in micro_batches))]
    return StepResult(ce_total, global_count, tokens, squares, grad_norm, applied, preempt, ce_by_source, counts)


@torch.no_grad()
def evaluate(
    model: Any,
    eval_set: Any,
    tokenizer: Any,
    accelerator: Accelerator,
    config: Config,
    loss_options: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Token-weighted eval loss over the whole eval set across ranks, and its perplexity; with several eval
    datasets also eval/<name>/loss for each."""
    model.eval()
    names = config.data.eval_dataset
    collate = PaddedCollator(tokenizer.pad_token_id, config.data.pad_to_multiple_of, len(names))
    ce = torch.zeros(len(names), device=accelerator.device)
    count = torch.zeros(len(names), device=accelerator.device)
    batches = eval_batches(
        len(eval_set), config.training.per_device_eval_batch_size, accelerator.num_processes, accelerator.process_index
    )
    for indices in batches:
        # A rank with no rows left still runs a (discarded) forward so ZeRO-3's collectives stay in step.
        batch = to_device(collate([eval_set[i] for i in (indices or [0])]), accelerator.device)
        weight = 1.0 if indices else 0.0
        ce += cross_entropy_sum(model, batch, **(loss_options or {}))[1] * weight
        count += torch.tensor(batch["source_counts"], device=accelerator.device, dtype=torch.float32) * weight
    totals = accelerator.reduce(torch.cat([ce, count]), "sum").tolist()
    model.train()
    ce_by, count_by = totals[: len(names)], totals[len(names) :]
    eval_loss = sum(ce_by) / sum(count_by)
    result = {
        "eval_loss": eval_loss,
        "eval_perplexity": math.exp(min(eval_loss, 50.0)),
        "eval_tokens": int(sum(count_by)),
    }
    if len(names) > 1:
        for name, part, tokens in zip(names, ce_by, count_by):
            result[f"eval/{name}/loss"] = part / tokens if tokens else None
    return result


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Move every tensor of a batch to the device (non-blocking from pinned memory); plain values stay."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


__all__ = ["causal_lm_of", "evaluate", "to_device", "train", "train_step"]
