"""Measuring training: what one optimizer step measured, the window of steps between two metric rows (reduced
across ranks once per row), and model FLOPs utilisation. Throughput counts only the seconds spent in training steps,
never evaluation or saving between them."""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator

from llmhalluc.runtime.zero import full_numel
from llmhalluc.train.objective import Objective

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
    total = sum(full_numel(p) for p in model.parameters())  # parameters() yields a tied matrix once
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    body = total - full_numel(embedding) - (0 if head is embedding else full_numel(head))
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return FlopsModel(body, full_numel(head), config.num_hidden_layers, config.num_attention_heads * head_dim)


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
    """What one optimizer step measured. Device values stay on the device until a metrics row needs them."""

    sums: dict[str, torch.Tensor]  # this rank's additive sums of the objective's values (device)
    host: dict[str, list[float]]  # this rank's additive counts known on the host (tokens, per-source targets, ...)
    count: torch.Tensor  # the global normaliser of the step (all ranks, all micro-batches)
    grad_norm: torch.Tensor | float
    applied: bool  # False when the step was skipped for a non-finite gradient
    preempt: bool = False  # a preemption signal reached some rank before this step


@dataclass
class WindowMeter:
    """Accumulates step results between metric rows and reduces them across ranks once per row."""

    accelerator: Accelerator
    objective: Objective
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
        """The metrics row for the steps since the last row: the objective's values over the window's global
        count, and throughput; one reduction across ranks."""
        results, device = self.results, self.accelerator.device
        keys = sorted(results[0].sums)
        hosts = sorted(results[0].host)
        local = [sum(r.sums[k] for r in results).reshape(-1) for k in keys]
        host = [torch.tensor([sum(v) for v in zip(*(r.host[k] for r in results))], device=device) for k in hosts]
        reduced = self.accelerator.reduce(torch.cat([*local, *host]), "sum").tolist()
        totals, start = {}, 0
        for key, part in zip([*keys, *hosts], [*local, *host]):
            totals[key], start = reduced[start : start + part.numel()], start + part.numel()
        totals["count"] = [float(sum(r.count for r in results))]
        tokens, trained, squares = totals["tokens"][0], totals["trained_tokens"][0], totals["squares"][0]
        grad_norms = [float(r.grad_norm) for r in results]
        seconds = self.seconds
        row = {
            "step": step,
            "epoch": round(step / steps_per_epoch, 4),
            **self.objective.row(totals, self.sources),
            "grad_norm": sum(grad_norms) / len(grad_norms),
            "lr": self.lrs[-1],
            "tokens": int(tokens),
            "trained_tokens": int(trained),
            "tokens_per_second": tokens / seconds,
            "trained_tokens_per_second": trained / seconds,
            "step_time": seconds / len(results),
            "skipped_steps": sum(not r.applied for r in results),
        }
        if torch.cuda.is_available():
            row |= self.device_row(tokens, trained, squares, seconds)
        self.results, self.lrs, self.seconds = [], [], 0.0
        return row

    def device_row(self, tokens: float, trained: float, squares: float, seconds: float) -> dict[str, float]:
        """Peak memory of the fullest rank since the last row, and MFU."""
        peak = torch.tensor(torch.cuda.max_memory_allocated() / 2**30, device=self.accelerator.device)
        row = {"peak_memory_gb": self.accelerator.reduce(peak, "max").item()}
        torch.cuda.reset_peak_memory_stats()
        if self.flops is not None:
            total = training_flops(self.flops, int(tokens), int(trained), int(squares))
            utilization = mfu(
                total, seconds, self.accelerator.num_processes, peak_flops_for(torch.cuda.get_device_name())
            )
            if utilization is not None:
                row["mfu"] = utilization
        return row
