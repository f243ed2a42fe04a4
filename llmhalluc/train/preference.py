"""Preference optimisation (`stage: dpo`): DPO and its variants as a second objective on the one run core.

A micro-batch holds whole pairs: its chosen sequences, then its rejected ones, laid out padding-free or padded by the
SFT collators, each sequence its own "source" so the targets come out grouped by sequence. A sequence's log-prob is
the sum over its trained tokens (the SFT masks). The objective's count is pairs, so the loop's exact normalisation
makes the loss the mean over the pairs of the global batch at any split, and a pair is never split across
micro-batches or ranks.

Reference log-probs (sigmoid, ipo, hinge, robust) are computed once before training, with the model training starts
from (under LoRA the base with its adapters disabled) or a named ref_model, and cached in output_dir keyed by the
model and the data: training holds one model, and a resumed run reads the cache instead of the trained weights.
Per pair, with c/r the policy's chosen/rejected log-probs, c0/r0 the reference's, n the trained tokens, beta
pref_beta and ls dpo_label_smoothing (TRL's and LLaMA-Factory's formulas):

- sigmoid: d = (c - c0) - (r - r0); -(1 - ls) log s(beta d) - ls log s(-beta d)
- ipo: ((c - c0)/n_c - (r - r0)/n_r - 1/(2 beta))^2
- hinge: relu(1 - beta d)
- robust: (-(1 - ls) log s(beta d) + ls log s(-beta d)) / (1 - 2 ls)
- simpo: -log s(beta (c/n_c - r/n_r) - simpo_gamma)
- orpo: -c/n_c - beta log s(log odds(c/n_c) - log odds(r/n_r)), log odds(p) = p - log(1 - exp(p))

plus pref_ftx * (-c/n_c) when pref_ftx > 0. Rewards are beta (c - c0) and beta (r - r0), or beta c/n_c and
beta r/n_r without a reference.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import gather_object

from llmhalluc.config import Config, TrainingConfig
from llmhalluc.data.audit import audit_lines, check_backtracks
from llmhalluc.data.batching import PaddedCollator, PaddingFreeCollator, eval_batches
from llmhalluc.data.pairs import SIDES, prepare_pairs
from llmhalluc.errors import UserError
from llmhalluc.models.loading import load_model, resolve_attention
from llmhalluc.runtime.dist import data_preparation_turns, zero3_init_disabled
from llmhalluc.train.feed import EvalData, TrainData, seeded_loader, to_device
from llmhalluc.train.loss import per_token_cross_entropy
from llmhalluc.train.objective import Batch, Objective, Sums
from llmhalluc.train.stage import Stage, sft_windows

REFERENCE_FILE = "reference_logps.pt"
REFERENCE_FREE = ("simpo", "orpo")


def needs_reference(training: TrainingConfig) -> bool:
    """Whether the preference loss compares with a reference model."""
    return training.pref_loss not in REFERENCE_FREE


class PairCollator:
    """Whole pairs as one micro-batch: chosen sequences then rejected ones, padding-free or padded, each sequence its
    own source (so `sequence_counts` are its trained tokens, targets grouped by sequence); with the reference
    log-probs of each pair once they are computed."""

    def __init__(self, pad_token_id: int, layout: str, pad_to_multiple_of: int | None = None):
        self.pad_token_id, self.layout, self.pad_to_multiple_of = pad_token_id, layout, pad_to_multiple_of
        self.reference: dict[str, torch.Tensor] | None = None  # side -> log-prob of every pair, by pair index

    def __call__(self, pairs: list[dict[str, Any]]) -> dict[str, Any]:
        """The micro-batch of `pairs` (a list of pair rows)."""
        count = len(pairs)
        sequences = []
        for side_index, side in enumerate(SIDES):
            for index, pair in enumerate(pairs):
                sequence = {
                    "input_ids": pair[f"{side}_input_ids"],
                    "labels": pair[f"{side}_labels"],
                    "source": side_index * count + index,
                }
                if pair.get(f"{side}_position_ids"):
                    sequence["position_ids"] = pair[f"{side}_position_ids"]
                sequences.append(sequence)
        if self.layout == "padding_free":
            batch = PaddingFreeCollator(self.pad_token_id, 2 * count)(sequences)
        else:
            batch = PaddedCollator(self.pad_token_id, self.pad_to_multiple_of, 2 * count)(sequences)
        batch["sequence_counts"] = batch.pop("source_counts")  # host ints
        trained = torch.tensor(batch["sequence_counts"], dtype=torch.float32)
        batch["chosen_tokens"], batch["rejected_tokens"] = trained[:count], trained[count:]
        batch["pairs"] = torch.tensor([pair["pair"] for pair in pairs])
        if self.reference is not None:
            batch["ref_chosen"] = self.reference["chosen"][batch["pairs"]]
            batch["ref_rejected"] = self.reference["rejected"][batch["pairs"]]
        return batch


def sequence_logps(model: Any, batch: Batch, chunk_tokens: int | None = None) -> torch.Tensor:
    """Each sequence's log-probability: the sum over its trained tokens (chosen sequences first)."""
    per_token = per_token_cross_entropy(model, batch, chunk_tokens)
    return -torch.stack([part.sum() for part in per_token.split(batch["sequence_counts"])])


def preference_losses(
    chosen: torch.Tensor, rejected: torch.Tensor, batch: Batch, training: TrainingConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the loss of every pair, the chosen rewards, the rejected rewards) of the pairs' log-probs."""
    beta, smoothing, kind = training.pref_beta, training.dpo_label_smoothing, training.pref_loss
    chosen_mean, rejected_mean = chosen / batch["chosen_tokens"], rejected / batch["rejected_tokens"]
    if kind in REFERENCE_FREE:
        chosen_rewards, rejected_rewards = beta * chosen_mean.detach(), beta * rejected_mean.detach()
        if kind == "simpo":
            losses = -F.logsigmoid(beta * (chosen_mean - rejected_mean) - training.simpo_gamma)
        else:
            log_odds = (chosen_mean - rejected_mean) - (
                torch.log1p(-torch.exp(chosen_mean)) - torch.log1p(-torch.exp(rejected_mean))
            )
            losses = -chosen_mean - beta * F.logsigmoid(log_odds)
    else:
        chosen_ratio, rejected_ratio = chosen - batch["ref_chosen"], rejected - batch["ref_rejected"]
        chosen_rewards, rejected_rewards = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
        delta = chosen_ratio - rejected_ratio
        if kind == "sigmoid":
            losses = -(1 - smoothing) * F.logsigmoid(beta * delta) - smoothing * F.logsigmoid(-beta * delta)
        elif kind == "ipo":
            per_token = chosen_ratio / batch["chosen_tokens"] - rejected_ratio / batch["rejected_tokens"]
            losses = (per_token - 1 / (2 * beta)) ** 2
        elif kind == "hinge":
            losses = torch.relu(1 - beta * delta)
        else:  # robust
            losses = (-(1 - smoothing) * F.logsigmoid(beta * delta) + smoothing * F.logsigmoid(-beta * delta)) / (
                1 - 2 * smoothing
            )
    if training.pref_ftx > 0:
        losses = losses + training.pref_ftx * -chosen_mean
    return losses, chosen_rewards, rejected_rewards


def dpo_count(batch: Batch) -> int:
    """Pairs in a micro-batch."""
    return len(batch["pairs"])


def dpo_loss(model: Any, batch: Batch, options: dict[str, Any]) -> tuple[torch.Tensor, Sums]:
    """The summed preference loss of the micro-batch's pairs, and sums of TRL's metrics."""
    count = len(batch["pairs"])
    logps = sequence_logps(model, batch, options["chunk_tokens"])
    chosen, rejected = logps[:count], logps[count:]
    losses, chosen_rewards, rejected_rewards = preference_losses(chosen, rejected, batch, options["training"])
    sums = {
        "pref_loss": losses.detach().sum(),
        "rewards_chosen": chosen_rewards.sum(),
        "rewards_rejected": rejected_rewards.sum(),
        "rewards_accuracies": (chosen_rewards > rejected_rewards).float().sum(),
        "logps_chosen": chosen.detach().sum(),
        "logps_rejected": rejected.detach().sum(),
    }
    return losses.sum(), sums


def dpo_host_sums(batch: Batch) -> dict[str, list[float]]:
    """Pairs of the micro-batch (the eval row's normaliser)."""
    return {"pair_count": [float(len(batch["pairs"]))]}


def dpo_metrics(totals: dict[str, list[float]], pairs: float, prefix: str = "") -> dict[str, Any]:
    """TRL's names: rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins, logps/chosen,
    logps/rejected, each a mean over pairs."""
    mean = {key: totals[key][0] / pairs for key in totals if key not in ("count", "pair_count") and totals[key]}
    return {
        f"{prefix}rewards/chosen": mean["rewards_chosen"],
        f"{prefix}rewards/rejected": mean["rewards_rejected"],
        f"{prefix}rewards/accuracies": mean["rewards_accuracies"],
        f"{prefix}rewards/margins": mean["rewards_chosen"] - mean["rewards_rejected"],
        f"{prefix}logps/chosen": mean["logps_chosen"],
        f"{prefix}logps/rejected": mean["logps_rejected"],
    }


def dpo_row(totals: dict[str, list[float]], names: list[str]) -> dict[str, Any]:
    """`loss`: the mean preference loss over the window's pairs, and TRL's reward and log-prob metrics."""
    pairs = totals["count"][0]
    return {"loss": totals["pref_loss"][0] / pairs, **dpo_metrics(totals, pairs), "pairs": int(pairs)}


def dpo_eval_row(totals: dict[str, list[float]], names: list[str]) -> dict[str, Any]:
    """The same over the whole eval set, as TRL names eval metrics (eval_loss, eval_rewards/...)."""
    pairs = totals["pair_count"][0]
    return {
        "eval_loss": totals["pref_loss"][0] / pairs,
        **dpo_metrics(totals, pairs, "eval_"),
        "eval_pairs": int(pairs),
    }


DPO = Objective("dpo", dpo_count, dpo_loss, dpo_host_sums, dpo_row, dpo_eval_row)


def build_pair_loader(config: Config, tokenizer: Any, accelerator: Accelerator, layout: str) -> TrainData:
    """Tokenized training pairs as whole-pair micro-batches in seeded global batches for this rank."""
    data, training = config.data, config.training
    pairs, stats = prepare_pairs(
        data.dataset, data, tokenizer, training.seed, partial(data_preparation_turns, accelerator)
    )
    accelerator.print(stats.summary("train"))
    for side, side_stats in stats.sides.items():
        if side == "chosen":
            check_backtracks(side_stats, data)
        for line in audit_lines(side_stats, data, f"train/{side}"):
            accelerator.print(line)
    collate = PairCollator(tokenizer.pad_token_id, layout, data.pad_to_multiple_of)
    loader, sampler = seeded_loader(pairs, collate, training, accelerator, workers=0, what="pairs")
    audited = {"datasets": {side: s.to_dict() for side, s in stats.sides.items()}, "warnings": []}
    return TrainData(loader, sampler, layout, stats, audited)


def prepare_eval_pairs(config: Config, tokenizer: Any, accelerator: Accelerator) -> EvalData | None:
    """The tokenized eval pairs, padded whole-pair batches of them, and their stats; None without eval datasets."""
    if not config.data.eval_dataset:
        return None
    pairs, stats = prepare_pairs(
        config.data.eval_dataset,
        config.data,
        tokenizer,
        config.training.seed,
        partial(data_preparation_turns, accelerator),
        mix=False,
    )
    return EvalData(pairs, PairCollator(tokenizer.pad_token_id, "padded", config.data.pad_to_multiple_of), stats)


def reference_key(run: Any) -> str:
    """What the cached reference log-probs depend on: the reference model (and the tokens added to it), the
    preference loss family and the data."""
    config = run.config
    model = config.model
    described = {
        "reference": config.training.ref_model or model.model_name_or_path,
        "adapter": model.adapter_name_or_path,
        "tokens": [model.add_special_tokens, model.add_tokens, dataclasses.asdict(run.new_tokens)],
        "seed": config.training.seed,
        "train": run.data.loader.dataset._fingerprint,
        "eval": run.eval_data.dataset._fingerprint if run.eval_data is not None else None,
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:32]


def attach_reference(run: Any) -> None:
    """Give the collators every pair's reference log-probs: read from output_dir's cache when it holds this run's,
    else computed (once, before training) and cached. A resumed run must find its cache."""
    if not needs_reference(run.config.training):
        return
    accelerator, path = run.accelerator, run.output_dir / REFERENCE_FILE
    key = reference_key(run)
    cached = torch.load(path, weights_only=True) if path.is_file() else None
    if cached is not None and cached["key"] != key:
        cached = None
    if cached is None and run.resume_from is not None:
        raise UserError(
            f"{path}: the reference log-probs of this run are missing (or belong to other data or another model), "
            "and a resumed model can no longer give them; start the run again"
        )
    if cached is None:
        cached = {"key": key, **compute_reference(run)}
        if accelerator.is_main_process:
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_suffix(".tmp")
            torch.save(cached, temporary)
            temporary.replace(path)
        accelerator.wait_for_everyone()
        accelerator.print(f"reference log-probs of {len(cached['train']['chosen'])} pairs cached in {path}")
    run.data.loader.collate_fn.reference = cached["train"]
    if run.eval_data is not None:
        run.eval_data.collate.reference = cached["eval"]


def compute_reference(run: Any) -> dict[str, dict[str, torch.Tensor]]:
    """Every pair's reference log-probs, train and eval: each rank a share of the pairs, gathered to every rank."""
    config = run.config
    named = config.training.ref_model
    if named:
        reference = dataclasses.replace(config.model, model_name_or_path=named)
        with zero3_init_disabled(run.accelerator):  # the reference loads whole on each rank, beside the policy
            model = load_model(reference, resolve_attention(reference))
        model.to(run.accelerator.device)
        context = contextlib.nullcontext()
    else:
        model = run.model
        network = run.accelerator.unwrap_model(model, keep_torch_compile=False)
        context = network.disable_adapter() if hasattr(network, "disable_adapter") else contextlib.nullcontext()
    sets = {"train": run.data.loader.dataset}
    if run.eval_data is not None:
        sets["eval"] = run.eval_data.dataset
    model.eval()
    try:
        with torch.no_grad(), context:
            return {name: pair_logps(run, model, dataset) for name, dataset in sets.items()}
    finally:
        run.model.train()
        if named:
            del model


def pair_logps(run: Any, model: Any, dataset: Any) -> dict[str, torch.Tensor]:
    """{"chosen": ..., "rejected": ...}: the log-prob of each side of every pair of `dataset` under `model`."""
    accelerator, config = run.accelerator, run.config
    layout = "padding_free" if run.data.layout == "padding_free" else "padded"  # as training lays pairs out
    collate = PairCollator(run.tokenizer.pad_token_id, layout, config.data.pad_to_multiple_of)
    batches = eval_batches(
        len(dataset), config.training.per_device_eval_batch_size, accelerator.num_processes, accelerator.process_index
    )
    found: list[tuple[int, float, float]] = []
    for indices in batches:
        # A rank with no pairs left still runs a (discarded) forward so ZeRO-3's collectives stay in step.
        batch = to_device(collate([dataset[i] for i in (indices or [0])]), accelerator.device)
        logps = sequence_logps(model, batch, config.training.loss_chunk_tokens).float().cpu()
        count = len(batch["pairs"])
        if indices:
            found += [(i, float(c), float(r)) for i, c, r in zip(indices, logps[:count], logps[count:])]
    if accelerator.num_processes > 1:
        found = gather_object(found)
    chosen, rejected = torch.zeros(len(dataset)), torch.zeros(len(dataset))
    for index, c, r in found:
        chosen[index], rejected[index] = c, r
    return {"chosen": chosen, "rejected": rejected}


DPO_STAGE = Stage("dpo", DPO, build_pair_loader, prepare_eval_pairs, sft_windows, attach_reference)


def read_reference(output_dir: Path) -> dict[str, Any]:
    """A run's cached reference log-probs (for tests and analysis)."""
    return torch.load(Path(output_dir) / REFERENCE_FILE, weights_only=True)
