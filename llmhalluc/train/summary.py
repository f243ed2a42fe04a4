"""What a run says about itself: run_summary.json (written at start, completed at the end) and the final report."""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from llmhalluc.config import Config
from llmhalluc.runtime.dist import deepspeed_config_of, zero_stage
from llmhalluc.train.feed import TrainData
from llmhalluc.train.metrics import METRICS_FILE

SUMMARY_FILE = "run_summary.json"


def run_summary(accelerator: Accelerator, config: Config, train_data: TrainData, total_steps: int) -> dict[str, Any]:
    """What kind of run this is: machines, processes, distribution, precision, batch layout, global batch, steps."""
    ds_config = deepspeed_config_of(accelerator) or {}
    zero = ds_config.get("zero_optimization", {})
    sampler = train_data.sampler
    stats = train_data.stats
    packed = train_data.layout == "packed"
    rows = train_data.summary.get("packing", {}).get("rows", 1)
    examples_per_item = stats.examples / rows if packed else 1.0
    processes_per_machine = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    summary = {
        "machines": accelerator.num_processes // processes_per_machine,
        "processes": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type).split(".")[-1],
        "zero_stage": zero_stage(accelerator),
        "offload_optimizer": zero.get("offload_optimizer", {}).get("device", "none") if ds_config else "none",
        "offload_param": zero.get("offload_param", {}).get("device", "none") if ds_config else "none",
        "mixed_precision": str(accelerator.mixed_precision),
        "global_batch_sequences": round(sampler.global_batch * examples_per_item),
        "global_batch_packed_rows": sampler.global_batch if packed else None,
        "global_batch_tokens": round(sampler.global_batch * examples_per_item * stats.tokens / max(stats.examples, 1)),
        "steps_per_epoch": sampler.steps_per_epoch,
        "total_steps": total_steps,
        **train_data.summary,
    }
    if ds_config:
        summary["deepspeed_config"] = ds_config  # as DeepSpeed received it, every "auto" filled in
    return summary


class RunRecord:
    """output_dir/run_summary.json on the main process: the run summary with `status` running at the start, and
    finished | preempted | diverged | failed, the end time and the final metrics at the end."""

    def __init__(self, output_dir: Path, summary: dict[str, Any], is_main: bool):
        self.path = output_dir / SUMMARY_FILE
        self.summary = summary
        self.is_main = is_main
        self.started = time.time()

    def start(self) -> None:
        """Write the summary with status running."""
        self._write({"status": "running", "started": _now()})

    def finish(self, status: str, final: dict[str, Any] | None = None, error: str | None = None) -> None:
        """Complete the summary: status, end time, wall time, final metrics, the error line of a failed run."""
        fields = {"status": status, "ended": _now(), "wall_seconds": round(time.time() - self.started, 1)}
        if final:
            fields["final"] = final
        if error:
            fields["error"] = error
        self._write(fields)

    def _write(self, fields: dict[str, Any]) -> None:
        if not self.is_main:
            return
        self.summary = {**self.summary, **fields}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps(self.summary, indent=1) + "\n")
        temporary.replace(self.path)  # never half-written


def final_metrics(output_dir: Path, train_seconds: float, trained_tokens: int, steps: int) -> dict[str, Any]:
    """The numbers of a finished run, from its metrics.jsonl: last train loss, last and best eval loss."""
    path = output_dir / METRICS_FILE
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    final: dict[str, Any] = {"steps": steps, "train_seconds": round(train_seconds, 1)}
    if train:
        final["train_loss"] = train[-1]["loss"]
    if evals:
        best = min(evals, key=lambda r: r["eval_loss"])
        final |= {
            "eval_loss": evals[-1]["eval_loss"],
            "best_eval_loss": best["eval_loss"],
            "best_eval_step": best["step"],
        }
    if train_seconds > 0:
        final["trained_tokens_per_second"] = round(trained_tokens / train_seconds, 1)
    for key, value in (evals[-1] if evals else {}).items():
        if key.startswith("gen/"):
            final[key] = value
    return final


def report(status: str, record: RunRecord, final: dict[str, Any], output_dir: Path, load: list[str] | None) -> str:
    """The block printed when a run ends: what it achieved and where the model is."""
    lines = [f"run {status}: {final.get('steps', 0)} steps in {time.time() - record.started:.0f} s wall time"]
    if "train_loss" in final:
        lines.append(f"  final train loss  {final['train_loss']:.4f}")
    if "eval_loss" in final:
        lines.append(
            f"  final eval loss   {final['eval_loss']:.4f} (best {final['best_eval_loss']:.4f} at step "
            f"{final['best_eval_step']})"
        )
    if "trained_tokens_per_second" in final:
        lines.append(f"  trained tokens/s  {final['trained_tokens_per_second']:,.0f}")
    for key in sorted(k for k in final if k.startswith("gen/")):
        lines.append(f"  {key}  {final[key]:.4f}")
    if load is not None:
        lines.append(f"  model             {output_dir.resolve()}")
        lines.append(f"  load it with      {load[0]}")
        lines += [f"  or                {line}" for line in load[1:]]
    lines.append(f"  metrics           {output_dir / METRICS_FILE}, plot {output_dir / 'loss.png'}")
    return "\n".join(lines)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
