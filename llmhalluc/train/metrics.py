"""Live metrics from the main process: output_dir/metrics.jsonl, wandb, and a tqdm progress bar."""

from __future__ import annotations

import json
import math
import os
import sys
import uuid
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from llmhalluc.config import Config

METRICS_FILE = "metrics.jsonl"

# Dense bf16 tensor-core peak FLOP/s per device (vendor datasheets, without sparsity).
PEAK_BF16_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "A6000": 155e12,
    "L4": 121e12,
}


class MetricsLogger:
    """Writes metric rows to metrics.jsonl and wandb and drives the progress bar; a no-op off the main process."""

    def __init__(
        self,
        config: Config,
        output_dir: Path,
        is_main: bool,
        total_steps: int,
        start_step: int,
        run_summary: dict[str, Any],
    ):
        self.is_main = is_main
        self.wandb_run = None
        self.bar = None
        if not is_main:
            return
        self.path = output_dir / METRICS_FILE
        _drop_rows_after(self.path, start_step)  # a resumed run rewrites what came after its checkpoint
        self.file = self.path.open("a", encoding="utf-8")
        if "wandb" in config.run.report_to:
            self.wandb_run = _start_wandb(config, output_dir, run_summary)
        self.bar = tqdm(
            total=total_steps,
            initial=start_step,
            desc="train",
            dynamic_ncols=True,
            disable=not sys.stderr.isatty() and os.environ.get("LLMHALLUC_PROGRESS") != "1",
        )

    def log(self, row: dict[str, Any]) -> None:
        """Record one row (a training or evaluation step)."""
        if not self.is_main:
            return
        row = {k: (round(v, 8) if isinstance(v, float) else v) for k, v in row.items()}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])
        shown = {k: row[k] for k in ("loss", "eval_loss", "lr", "grad_norm") if k in row}
        text = " ".join(f"{k}={v:.4g}" for k, v in shown.items())
        if self.bar is not None and not self.bar.disable:
            self.bar.set_postfix_str(text)
        tqdm.write(f"step {row['step']}: {text}", file=sys.stdout)

    def advance(self, steps: int = 1) -> None:
        """Move the progress bar."""
        if self.bar is not None:
            self.bar.update(steps)

    def close(self) -> None:
        """Flush and close everything."""
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.close()
        self.file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _drop_rows_after(path: Path, step: int) -> None:
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def _start_wandb(config: Config, output_dir: Path, run_summary: dict[str, Any]) -> Any:
    """A wandb run that resumes across restarts of the same output_dir; never blocks training on the network."""
    import wandb

    id_file = output_dir / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
    id_file.write_text(run_id)
    init = {
        "project": config.run.wandb_project,
        "name": config.run.run_name or output_dir.name,
        "id": run_id,
        "resume": "allow",
        "dir": str(output_dir),
        "config": {**config.to_flat_dict(), **run_summary},
        "settings": wandb.Settings(init_timeout=60, silent=True),
    }
    try:
        return wandb.init(**init)
    except Exception as err:  # no network or no login: keep training, keep the run on disk
        print(f"warning: wandb could not start online ({err}); logging offline to {output_dir}/wandb", flush=True)
        return wandb.init(**init, mode="offline")


def peak_flops_per_device() -> float | None:
    """The dense bf16 peak of this process's GPU, or None when unknown or on CPU."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in name:
            return flops
    return None


def training_flops(
    model_config: Any, num_params: int, lm_head_params: int, tokens: int, trained_tokens: int, sum_squared_lengths: int
) -> float:
    """Model FLOPs of one pass over a batch: 6N per token (the LM head only on trained tokens) + attention."""
    body = num_params - lm_head_params - model_config.vocab_size * model_config.hidden_size  # no input embedding
    dense = 6 * body * tokens + 6 * lm_head_params * trained_tokens
    # Causal attention: QK^T and AV over n^2/2 pairs, 2 FLOPs per multiply-add, x3 for backward.
    attention = 6 * model_config.num_hidden_layers * model_config.hidden_size * sum_squared_lengths
    return float(dense + attention)


def mfu(flops: float, seconds: float, num_processes: int) -> float | None:
    """Model FLOPs utilization: achieved FLOP/s per device over the device's dense bf16 peak."""
    peak = peak_flops_per_device()
    if peak is None or seconds <= 0 or not math.isfinite(flops):
        return None
    return flops / seconds / num_processes / peak
