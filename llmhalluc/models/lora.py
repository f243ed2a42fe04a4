"""LoRA with PEFT: wrapping the model, trainable rows for new tokens, saving the adapter, merging it.

`finetuning_type: lora` wraps the model before `accelerator.prepare`: LoRA on the `lora_target` linear layers
(`all` = every linear layer but the output head), `additional_target` modules trained in full and saved, and the
rows of newly added tokens trainable through PEFT's `trainable_token_indices` (input embeddings, and the output
embeddings when they are not tied) without making the whole matrix trainable. The adapter folder holds
adapter_model.safetensors, adapter_config.json (naming the base model), the tokenizer and llmhalluc_adapter.json
(the embedding rows the base needs, for merging and evaluation).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from llmhalluc.config import ModelConfig
from llmhalluc.errors import UserError
from llmhalluc.models.tokens import NewTokens

ADAPTER_FILE = "llmhalluc_adapter.json"


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
    zero3 = any(hasattr(p, "ds_id") for p in model.parameters())
    if new_tokens.ids and zero3 and not torch.cuda.is_available():
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
    return get_peft_model(model, lora_config)


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

    def numel(p: torch.nn.Parameter) -> int:
        return p.ds_numel if hasattr(p, "ds_numel") else p.numel()

    return {
        "trainable": sum(numel(p) for p in model.parameters() if p.requires_grad),
        "total": sum(numel(p) for p in model.parameters()),
    }


def write_adapter_metadata(folder: Path, base: str, rows: int | None, new_tokens: NewTokens) -> None:
    """What loading the adapter on its base needs beyond PEFT's own files: the embedding rows the base is resized
    to (new tokens), and the new token ids."""
    record = {"base_model_name_or_path": base, "embedding_rows": rows, "new_tokens": new_tokens.ids}
    (folder / ADAPTER_FILE).write_text(json.dumps(record, indent=1) + "\n")


def load_base_for_adapter(adapter: Path | str, dtype: Any = "auto") -> PreTrainedModel:
    """The adapter's base model, in its own dtype, with its embeddings resized as they were in training."""
    adapter = Path(adapter)
    record = json.loads((adapter / ADAPTER_FILE).read_text()) if (adapter / ADAPTER_FILE).is_file() else {}
    base = record.get("base_model_name_or_path") or json.loads((adapter / "adapter_config.json").read_text()).get(
        "base_model_name_or_path"
    )
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    rows = record.get("embedding_rows")
    if rows and rows != model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(rows, mean_resizing=False)
    return model


def load_adapter_model(adapter: Path | str, dtype: Any = "auto") -> Any:
    """Base + adapter (PeftModel), for evaluation."""
    from peft import PeftModel

    return PeftModel.from_pretrained(load_base_for_adapter(adapter, dtype), str(adapter))


def merge_adapter(adapter: Path, out: Path, tokenizer: PreTrainedTokenizerBase | None = None) -> Path:
    """A standalone Hugging Face model: base + adapter merged in the base's dtype, the trained new-token rows,
    tokenizer with its chat template, generation config with the template's stop tokens. Loads without peft."""
    from transformers import AutoTokenizer

    from llmhalluc.models.saving import save_pretrained_model

    merged = load_adapter_model(adapter).merge_and_unload()
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(adapter)
    save_pretrained_model(merged, tokenizer, out)
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m llmhalluc.merge ADAPTER_DIR OUTPUT_DIR`."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description="Merge a LoRA adapter into its base model (a standalone model).")
    parser.add_argument("adapter_dir", type=Path)
    parser.add_argument("output_dir", type=Path)
    args = parser.parse_args(argv)
    if not (args.adapter_dir / "adapter_config.json").is_file():
        print(f"error: {args.adapter_dir} holds no adapter_config.json", file=sys.stderr)
        return 2
    print(f"merged model written to {merge_adapter(args.adapter_dir, args.output_dir)}")
    return 0
