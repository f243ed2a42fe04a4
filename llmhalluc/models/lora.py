"""LoRA with PEFT: wrapping the model (LoRA layers, trainable rows for new tokens) before it is prepared.

`finetuning_type: lora` wraps the model before `accelerator.prepare`: LoRA on the `lora_target` linear layers
(`all` = every linear layer but the output head), `additional_target` modules trained in full and saved, and the
rows of newly added tokens trainable through PEFT's `trainable_token_indices` (input embeddings, and the output
embeddings when they are not tied) without making the whole matrix trainable. Saving, loading and merging adapters is
llmhalluc.models.export's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from llmhalluc.config import ModelConfig
from llmhalluc.errors import UserError
from llmhalluc.models.tokens import NewTokens
from llmhalluc.runtime.zero import any_partitioned, full_numel


def linear_module_names(model: PreTrainedModel) -> list[str]:
    """The distinct names (last part) of the model's linear layers, the output head excluded."""
    head = model.get_output_embeddings()
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not head
    }
    return sorted(names)


def lora_targets(model: PreTrainedModel, requested: list[str]) -> list[str]:
    """The module names LoRA wraps: every linear layer for `all`, else the names asked for, each checked."""
    available = linear_module_names(model)
    if requested == ["all"]:
        return available
    unknown = [name for name in requested if name not in available]
    if unknown:
        raise UserError(
            f"lora_target: {', '.join(map(repr, unknown))} is not a linear layer of this model; its linear layers "
            f"are: {', '.join(available)} (or all)"
        )
    return list(requested)


def wrap_lora(model: PreTrainedModel, config: ModelConfig, new_tokens: NewTokens, seed: int) -> Any:
    """The model wrapped for LoRA training (or an existing adapter, to train further); the new LoRA weights are
    drawn from `seed`, the same on every rank and in every launch."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if config.gradient_checkpointing:
        model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need grads at their input
    if config.adapter_name_or_path:
        check_adapter_base(Path(config.adapter_name_or_path), config.model_name_or_path)
        return PeftModel.from_pretrained(model, config.adapter_name_or_path, is_trainable=True)
    token_rows = None
    if new_tokens.ids and any_partitioned(model) and not torch.cuda.is_available():
        raise UserError(
            "finetuning_type: lora with new tokens under ZeRO-3 needs CUDA: PEFT gathers the new rows with a "
            "CUDA-only routine (peft 0.21); train on GPU, or use ZeRO-2, DDP or one process on CPU"
        )
    if new_tokens.ids:
        ids = sorted(new_tokens.ids.values())
        token_rows = {_module_name(model, model.get_input_embeddings()): ids}
        head = model.get_output_embeddings()
        if head is not None and head.weight is not model.get_input_embeddings().weight:
            token_rows[_module_name(model, head)] = ids  # untied: the output rows train too
    lora_config = LoraConfig(
        task_type="CAUSAL_LM",
        r=config.lora_rank,
        lora_alpha=config.lora_alpha if config.lora_alpha is not None else 2 * config.lora_rank,
        lora_dropout=config.lora_dropout,
        target_modules=lora_targets(model, config.lora_target),
        modules_to_save=list(config.additional_target) or None,
        use_rslora=config.use_rslora,
        use_dora=config.use_dora,
        trainable_token_indices=token_rows,
    )
    torch.manual_seed(seed)
    wrapped = get_peft_model(model, lora_config)
    if config.freeze_new_token_rows:  # kept as initialised; PEFT still saves them with the adapter
        for name, parameter in wrapped.named_parameters():
            if "token_adapter" in name:
                parameter.requires_grad_(False)
    return wrapped


def _module_name(model: PreTrainedModel, module: torch.nn.Module) -> str:
    return next(name for name, candidate in model.named_modules() if candidate is module).rsplit(".", 1)[-1]


def check_adapter_base(adapter: Path, base: str) -> None:
    """adapter_name_or_path must be an adapter of the model being trained."""
    config_file = adapter / "adapter_config.json"
    if not config_file.is_file():
        raise UserError(f"adapter_name_or_path: {adapter} holds no adapter_config.json")
    trained_on = json.loads(config_file.read_text()).get("base_model_name_or_path")
    if trained_on and Path(trained_on).resolve() != Path(base).resolve() and trained_on != base:
        raise UserError(
            f"adapter_name_or_path: {adapter} is an adapter of {trained_on!r}, but model_name_or_path is {base!r}"
        )


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """Trainable and total parameters (ZeRO-3 shards counted whole)."""

    return {
        "trainable": sum(full_numel(p) for p in model.parameters() if p.requires_grad),
        "total": sum(full_numel(p) for p in model.parameters()),
    }
