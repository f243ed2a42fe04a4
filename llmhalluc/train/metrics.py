"""Live metrics from the main process: output_dir/metrics.jsonl, wandb, and a tqdm progress bar."""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from llmhalluc.config import Config

METRICS_FILE = "metrics.jsonl"
# Generation metrics shown on the console (every one goes to metrics.jsonl and wandb).
HEADLINE_METRICS = ("accuracy_strict", "/f1", "exact_match", "abstention_rate", "hallucination_rate")

# Dense bf16 tensor-core peak FLOP/s per device (vendor datasheets, without sparsity), matched against the CUDA
# device name in this order (a name like "NVIDIA H100 PCIe" must not match the SXM entry, "L40S" not "L4").
PEAK_BF16_FLOPS = (
    (r"H100.*PCIe", 756e12),
    (r"H100.*NVL", 835e12),
    (r"GH200|H200|H100", 989e12),  # H100 SXM ("NVIDIA H100 80GB HBM3"), H200, GH200
    (r"B200", 2250e12),
    (r"A100|A800", 312e12),
    (r"L40S", 362e12),
    (r"L40\b", 181e12),
    (r"L4\b", 121e12),
    (r"A6000", 155e12),
    (r"A10G", 70e12),
    (r"A10\b", 125e12),
)


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
            self.wandb_run = start_wandb(config, output_dir, run_summary)
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
        shown |= {
            k: v for k, v in row.items() if k.startswith("gen/") and k.endswith(HEADLINE_METRICS) and v is not None
        }
        text = " ".join(f"{k}={v:.4g}" for k, v in shown.items())
        if self.bar is not None and not self.bar.disable:
            self.bar.set_postfix_str(text)
        tqdm.write(f"step {row['step']}: {text}", file=sys.stdout)

    def log_html_table(self, name: str, columns: list[str], rows: list[list[str]]) -> None:
        """A wandb table whose last column is HTML (e.g. examples with their trained tokens marked)."""
        if self.wandb_run is None or not rows:
            return
        import wandb

        table = wandb.Table(columns=columns, data=[[*row[:-1], wandb.Html(row[-1])] for row in rows])
        self.wandb_run.log({name: table})

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


def start_wandb(config: Config, output_dir: Path, run_summary: dict[str, Any]) -> Any:
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
        # WANDB_DIR, when set, decides (users point it at local disk when output_dir is on a network filesystem).
        "dir": os.environ.get("WANDB_DIR") or str(output_dir),
        "config": {**config.to_flat_dict(), **run_summary},
        "settings": wandb.Settings(init_timeout=60, silent=True),
    }
    try:
        return wandb.init(**init)
    except Exception as err:  # no network or no login: keep training, keep the run on disk
        print(f"warning: wandb could not start online ({err}); logging offline to {init['dir']}/wandb", flush=True)
        return wandb.init(**init, mode="offline")


def peak_flops_for(device_name: str) -> float | None:
    """The dense bf16 peak of a CUDA device by its name, or None when unknown."""
    for pattern, flops in PEAK_BF16_FLOPS:
        if re.search(pattern, device_name):
            return flops
    return None


@dataclass(frozen=True)
class FlopsModel:
    """What the MFU estimate needs from a model: parameters outside the embeddings, the LM head's, and the
    attention width (heads x head_dim, which is not hidden_size for Gemma or Qwen3) per layer."""

    body_params: int
    head_params: int
    layers: int
    attention_width: int


def flops_model_of(model: Any) -> FlopsModel:
    """The FlopsModel of a transformers CausalLM (ZeRO-3 shards counted whole; a tied matrix counted once)."""

    def numel(p: torch.nn.Parameter) -> int:
        return p.ds_numel if hasattr(p, "ds_numel") else p.numel()

    total = sum(numel(p) for p in model.parameters())  # parameters() yields a tied matrix once
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    body = total - numel(embedding) - (0 if head is embedding else numel(head))
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return FlopsModel(body, numel(head), config.num_hidden_layers, config.num_attention_heads * head_dim)


def training_flops(flops: FlopsModel, tokens: int, trained_tokens: int, sum_squared_lengths: int) -> float:
    """Model FLOPs of one forward and backward pass over a batch: 6 x parameters per token outside the embeddings,
    the LM head only on trained tokens, plus causal attention."""
    dense = 6 * flops.body_params * tokens + 6 * flops.head_params * trained_tokens
    # Causal attention: QK^T and AV over n^2/2 pairs, 2 FLOPs per multiply-add each, x3 for backward.
    attention = 6 * flops.layers * flops.attention_width * sum_squared_lengths
    return float(dense + attention)


def mfu(flops: float, seconds: float, num_processes: int, peak: float | None) -> float | None:
    """Model FLOPs utilization: achieved FLOP/s per device over the device's dense bf16 peak."""
    if peak is None or seconds <= 0 or not math.isfinite(flops):
        return None
    return flops / seconds / num_processes / peak


@dataclass
class StepResult:
    """What one optimizer step measured, kept on the device until a log row needs it."""

    ce_sum: torch.Tensor  # this rank's summed cross-entropy
    trained_tokens: torch.Tensor  # global trained-token count of the step
    tokens: int  # this rank's non-pad tokens
    sum_squared_lengths: int  # this rank's sum of example length^2 (attention FLOPs)
    grad_norm: torch.Tensor | float
    applied: bool  # False when the step was skipped for a non-finite gradient
    preempt: bool = False  # a preemption signal reached some rank before this step
    ce_by_source: torch.Tensor | None = None  # this rank's summed cross-entropy per training dataset
    count_by_source: list[int] = field(default_factory=list)  # this rank's trained tokens per training dataset


@dataclass
class WindowMeter:
    """Accumulates step results between log rows and reduces them across ranks once per row. Throughput counts
    only the seconds spent in training steps, never evaluation or saving between them."""

    accelerator: Accelerator
    sources: list[str]
    flops: FlopsModel | None = None
    results: list[StepResult] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    seconds: float = 0.0
    started: float = 0.0
    last_step_seconds: float = 0.0

    def start_step(self) -> None:
        """Start the clock of one optimizer step."""
        self.started = time.perf_counter()

    def add(self, result: StepResult, lr: float) -> None:
        """Remember one optimizer step and the learning rate it used; stop its clock."""
        self.last_step_seconds = time.perf_counter() - self.started
        self.seconds += self.last_step_seconds
        self.results.append(result)
        self.lrs.append(lr)

    def row(self, step: int, steps_per_epoch: int) -> dict[str, Any]:
        """The metrics row for the steps since the last row (the window's one reduction across ranks)."""
        device = self.accelerator.device
        results = self.results
        many = len(self.sources) > 1
        host = [float(sum(r.tokens for r in results)), float(sum(r.sum_squared_lengths for r in results))]
        local = [sum(r.ce_sum for r in results), torch.tensor(host, device=device)]
        if many:
            local += [sum(r.ce_by_source for r in results)]
            local += [torch.tensor([float(sum(c)) for c in zip(*(r.count_by_source for r in results))], device=device)]
        reduced = self.accelerator.reduce(torch.cat([t.reshape(-1) for t in local]), "sum").tolist()
        ce_sum, tokens, squares = reduced[:3]
        trained = float(sum(r.trained_tokens for r in results))
        grad_norms = [float(r.grad_norm) for r in results]
        seconds = self.seconds
        row = {
            "step": step,
            "epoch": round(step / steps_per_epoch, 4),
            "loss": ce_sum / trained,
            "grad_norm": sum(grad_norms) / len(grad_norms),
            "lr": self.lrs[-1],
            "tokens": int(tokens),
            "trained_tokens": int(trained),
            "tokens_per_second": tokens / seconds,
            "trained_tokens_per_second": trained / seconds,
            "step_time": seconds / len(results),
            "skipped_steps": sum(not r.applied for r in results),
        }
        if many:
            count = len(self.sources)
            for name, ce, n in zip(self.sources, reduced[3 : 3 + count], reduced[3 + count :]):
                row[f"loss/{name}"] = ce / n if n else None
                row[f"trained_tokens/{name}"] = int(n)
        if torch.cuda.is_available():
            peak = torch.tensor(torch.cuda.max_memory_allocated() / 2**30, device=device)
            row["peak_memory_gb"] = self.accelerator.reduce(peak, "max").item()  # the fullest rank
            torch.cuda.reset_peak_memory_stats()
            if self.flops is not None:
                total = training_flops(self.flops, int(tokens), int(trained), int(squares))
                peak_flops = peak_flops_for(torch.cuda.get_device_name())
                utilization = mfu(total, seconds, self.accelerator.num_processes, peak_flops)
                if utilization is not None:
                    row["mfu"] = utilization
        self.results, self.lrs, self.seconds = [], [], 0.0
        return row
