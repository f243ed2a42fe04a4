"""Export: the one owner of what a run writes as a model and of reading it back.

A model folder (the final model in output_dir, and the model part of every checkpoint) is either

- a full model: config.json and model.safetensors (sharded for large models), or
- a LoRA adapter: adapter_config.json (naming the base model by absolute path or hub id) and
  adapter_model.safetensors (LoRA weights, `additional_target` modules, and the new tokens' rows as values),

and in both cases the tokenizer with its chat template and added tokens, a generation_config.json that stops at the
template's end of turn, and llmhalluc_model.json: what loading needs beyond the Hugging Face files (the base model
and the embedding rows it is resized to when tokens were added). What is written is read back and checked against
the model before the folder counts as written. `load_pretrained` loads any model folder; `merge_adapter` turns an
adapter into a full model that loads without peft.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import Accelerator
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from llmhalluc.config import ModelConfig
from llmhalluc.data.facts import TokenFacts
from llmhalluc.errors import UserError
from llmhalluc.models.tokens import NewTokens
from llmhalluc.runtime.zero import any_partitioned, full_shape, gathered

MODEL_FILE = "llmhalluc_model.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
FULL_WEIGHTS = "model.safetensors"
FULL_INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class ModelExport:
    """What the model folders of a run hold, decided once after new tokens and LoRA are set up."""

    kind: Literal["full", "lora"]
    base_model: str  # the model trained from: an absolute local path, or a hub id
    base_rows: int  # embedding rows of the base model as loaded
    embedding_rows: int  # embedding rows after new tokens were given theirs
    new_token_ids: dict[str, int] = field(default_factory=dict)
    stop_ids: tuple[int, ...] = ()
    merge: bool = False

    def record(self) -> dict[str, Any]:
        """llmhalluc_model.json's content."""
        record = asdict(self)
        record["stop_ids"] = list(self.stop_ids)
        del record["merge"]
        return record


def base_reference(name: str) -> str:
    """A model name that resolves from any working directory: a local folder made absolute, a hub id as given."""
    path = Path(name)
    return str(path.resolve()) if path.exists() else name


def plan_export(model: ModelConfig, new_tokens: NewTokens, facts: TokenFacts) -> ModelExport:
    """The ModelExport of a run: its fine-tuning type, base, the embedding rows and new tokens, the stop ids."""
    return ModelExport(
        kind=model.finetuning_type,
        base_model=base_reference(model.model_name_or_path),
        base_rows=new_tokens.rows_before,
        embedding_rows=new_tokens.rows_after,
        new_token_ids=dict(new_tokens.ids),
        stop_ids=tuple(facts.stop_ids),
        merge=model.merge,
    )


def generation_config_for(model: PreTrainedModel, stop_ids: tuple[int, ...], pad_id: int | None) -> GenerationConfig:
    """The model's own generation config with the template's stop tokens added to eos_token_id (a Llama-3 base
    trained on the llama3 template must stop at <|eot_id|>, not only at <|end_of_text|>), and no sampling or length
    defaults it did not have."""
    config = GenerationConfig.from_dict(model.generation_config.to_dict())
    given = config.eos_token_id
    ids = [] if given is None else [given] if isinstance(given, int) else list(given)
    ids += [i for i in stop_ids if i not in ids]
    config.eos_token_id = ids[0] if len(ids) == 1 else ids
    if config.pad_token_id is None and pad_id is not None:
        config.pad_token_id = pad_id
    return config


def save_model(
    accelerator: Accelerator,
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    export: ModelExport,
    folder: Path,
) -> None:
    """Write the model folder; every rank calls it (under ZeRO-3 gathering the weights is a collective), only the
    main process materialises and writes them, then reads back what it wrote and checks it against the model."""
    network = accelerator.unwrap_model(model, keep_torch_compile=False)
    tensors: dict[str, torch.Tensor] = {}
    if export.kind == "lora":
        # The adapter's tensors: what trains, and new-token rows kept frozen (freeze_new_token_rows), never the base.
        adapter = [(n, p) for n, p in network.named_parameters() if p.requires_grad or "token_adapter" in n]
        with gathered([p for _, p in adapter]):
            tensors = {n: p.detach().cpu().clone() for n, p in adapter} if accelerator.is_main_process else {}
    elif any_partitioned(network) or accelerator.is_main_process:
        tensors = accelerator.get_state_dict(model)  # a collective under ZeRO-3; the others only build it on rank 0
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        if export.kind == "lora":
            network.peft_config["default"].base_model_name_or_path = export.base_model
            # New tokens' rows are saved whole (PEFT's trainable_tokens delta holds the rows' values, copied over the
            # base's rows when loaded), so the full embedding matrices need not travel with the adapter.
            network.save_pretrained(folder, state_dict=tensors, save_embedding_layers=False)
            lm = network.get_base_model()
        else:
            # torch.compile's wrapper prefixes every key; the saved model must load into the plain architecture.
            tensors = {key.removeprefix("_orig_mod."): value for key, value in tensors.items()}
            lm = network
            with _cache_on(lm), _no_progress_bar():  # a loaded model generates with its cache
                lm.save_pretrained(folder, state_dict=tensors, safe_serialization=True)
        generation_config_for(lm, export.stop_ids, tokenizer.pad_token_id).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        (folder / MODEL_FILE).write_text(json.dumps(export.record(), indent=1) + "\n")
        check_model_folder(folder, network, export)
    accelerator.wait_for_everyone()


@contextlib.contextmanager
def _no_progress_bar() -> Iterator[None]:
    """transformers' progress bars off for the block (a bar per checkpoint write would interleave the metric rows)."""
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()


class _cache_on:
    """A block in which model.config.use_cache is True (saved configs generate with their cache)."""

    def __init__(self, model: PreTrainedModel):
        self.config = model.config

    def __enter__(self) -> None:
        self.before, self.config.use_cache = self.config.use_cache, True

    def __exit__(self, *exc: object) -> None:
        self.config.use_cache = self.before


def expected_tensors(network: Any, export: ModelExport) -> dict[str, tuple[int, ...]]:
    """Name -> full shape of every tensor the model folder of `network` (unwrapped: a CausalLM or a PeftModel)
    holds, without materialising any (ZeRO-3 shards count whole)."""
    if export.kind == "lora":
        from peft import get_peft_model_state_dict

        # PEFT picks the adapter's tensors out of the whole state dict, as when it saves (meta tensors: no data).
        every = {
            name: torch.empty(full_shape(t), device="meta") for name, t in network.state_dict(keep_vars=True).items()
        }
        saved = get_peft_model_state_dict(network, state_dict=every, save_embedding_layers=False)
        return {name: tuple(tensor.shape) for name, tensor in saved.items()}
    return {name: tuple(full_shape(t)) for name, t in network.state_dict(keep_vars=True).items()}


def saved_tensors(folder: Path, kind: str) -> dict[str, tuple[int, ...]]:
    """Name -> shape of the tensors in a model folder's weight file(s), read from the headers only."""
    if kind == "lora":
        files = [folder / ADAPTER_WEIGHTS]
    elif (folder / FULL_INDEX).is_file():
        index = json.loads((folder / FULL_INDEX).read_text())
        files = [folder / name for name in sorted(set(index["weight_map"].values()))]
    else:
        files = [folder / FULL_WEIGHTS]
    shapes = {}
    for file in files:
        if not file.is_file():
            raise UserError(f"{file} is missing: the model folder is incomplete")
        with safe_open(str(file), framework="pt") as weights:
            for name in weights.keys():  # noqa: SIM118 (safe_open is not a mapping)
                shapes[name] = tuple(weights.get_slice(name).get_shape())
    return shapes


def check_model_folder(folder: Path, network: Any, export: ModelExport) -> None:
    """The model folder holds exactly the tensors `network` would write, in their shapes (a tied matrix may be
    stored once); otherwise a UserError naming the first tensors that differ."""
    record_file = folder / MODEL_FILE
    if not record_file.is_file():
        raise UserError(f"{record_file} is missing: {folder} is not a model folder written by llmhalluc")
    record = json.loads(record_file.read_text())
    for key in ("kind", "embedding_rows", "new_token_ids"):
        if record.get(key) != export.record()[key]:
            raise UserError(
                f"{record_file}: {key} is {record.get(key)!r}, but this run's model has {export.record()[key]!r}"
            )
    expected, saved = expected_tensors(network, export), saved_tensors(folder, export.kind)
    tied = set()
    if export.kind == "full":
        tied = {name for name in expected if name not in saved and _is_tied(network, name)}
    missing = sorted(set(expected) - set(saved) - tied)
    extra = sorted(set(saved) - set(expected))
    reshaped = sorted(name for name in set(expected) & set(saved) if expected[name] != saved[name])
    where = folder / (ADAPTER_WEIGHTS if export.kind == "lora" else FULL_WEIGHTS)
    if missing:
        raise UserError(f"{where} lacks {len(missing)} tensor(s) the model has, e.g. {missing[0]}")
    if extra:
        raise UserError(f"{where} holds {len(extra)} tensor(s) the model lacks, e.g. {extra[0]}")
    if reshaped:
        name = reshaped[0]
        raise UserError(f"{where}: {name} has shape {list(saved[name])}, the model's is {list(expected[name])}")


def _is_tied(network: Any, name: str) -> bool:
    """Whether the parameter `name` shares its tensor with another parameter (saved once)."""
    tensors = network.state_dict(keep_vars=True)
    return any(other != name and tensors[other] is tensors[name] for other in tensors)


def load_model_weights(network: Any, folder: Path, export: ModelExport) -> None:
    """Put the weights of a model folder into `network` (unwrapped, not ZeRO-3 sharded), after checking that the
    folder holds exactly its tensors."""
    check_model_folder(folder, network, export)
    if export.kind == "lora":
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(network, load_file(folder / ADAPTER_WEIGHTS))
        unexpected = list(result.unexpected_keys)
    else:
        unexpected = []
        for name in sorted(set(saved_file_names(folder))):
            unexpected += network.load_state_dict(load_file(folder / name), strict=False).unexpected_keys
    if unexpected:
        raise UserError(f"{folder}: tensors the model does not have, e.g. {unexpected[0]}")


def saved_file_names(folder: Path) -> list[str]:
    """The weight file names of a full model folder."""
    if (folder / FULL_INDEX).is_file():
        return list(json.loads((folder / FULL_INDEX).read_text())["weight_map"].values())
    return [FULL_WEIGHTS]


def is_adapter(folder: Path | str) -> bool:
    """Whether a folder holds a PEFT adapter."""
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def read_record(folder: Path) -> dict[str, Any]:
    """llmhalluc_model.json of a model folder, or {} for one written elsewhere."""
    path = Path(folder) / MODEL_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def load_pretrained(folder: Path | str, dtype: Any = "auto") -> tuple[Any, PreTrainedTokenizerBase]:
    """(model, tokenizer) of any model folder llmhalluc writes (a final model, a checkpoint, a merged model): a full
    model with AutoModelForCausalLM; an adapter on its base, resized to the rows it was trained with, as a
    PeftModel. The model generates with the folder's generation config (stopping at the end of turn)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if not is_adapter(folder):
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype), tokenizer
    from peft import PeftModel

    record = read_record(folder)
    base_name = record.get("base_model") or json.loads((folder / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
    try:
        base = AutoModelForCausalLM.from_pretrained(base_name, dtype=dtype)
    except OSError as err:
        raise UserError(f"{folder}: cannot load its base model {base_name!r}: {str(err).splitlines()[0]}") from None
    rows = record.get("embedding_rows")
    if rows and rows != base.get_input_embeddings().weight.shape[0]:
        base.resize_token_embeddings(rows, mean_resizing=False)  # the new rows come from the adapter
    if (folder / "generation_config.json").is_file():
        base.generation_config = GenerationConfig.from_pretrained(folder)
    return PeftModel.from_pretrained(base, str(folder)), tokenizer


def merge_adapter(adapter: Path | str, out: Path | str) -> Path:
    """A standalone Hugging Face model in `out`: base + adapter merged in the base's dtype, with the trained
    new-token rows, the tokenizer and its chat template, and the generation config. Loads without peft."""
    adapter, out = Path(adapter), Path(out)
    model, tokenizer = load_pretrained(adapter)
    merged = model.merge_and_unload()
    merged.generation_config = model.base_model.model.generation_config
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    record = {**read_record(adapter), "kind": "full", "merged_from": str(adapter.resolve())}
    (out / MODEL_FILE).write_text(json.dumps(record, indent=1) + "\n")
    return out


def load_hint(folder: Path, export: ModelExport) -> list[str]:
    """Python lines that load a run's final model folder, as the report prints them (a test runs each)."""
    path = str(folder.resolve())
    if export.kind == "full":
        return [
            "from transformers import AutoModelForCausalLM, AutoTokenizer; "
            f"model = AutoModelForCausalLM.from_pretrained({path!r}); "
            f"tokenizer = AutoTokenizer.from_pretrained({path!r})"
        ]
    resize = ""
    if export.embedding_rows != export.base_rows:
        resize = f"base.resize_token_embeddings({export.embedding_rows}, mean_resizing=False); "
    return [
        f"from llmhalluc import load_pretrained; model, tokenizer = load_pretrained({path!r})",
        "from peft import PeftModel; from transformers import AutoModelForCausalLM; "
        f"base = AutoModelForCausalLM.from_pretrained({export.base_model!r}); {resize}"
        f"model = PeftModel.from_pretrained(base, {path!r})",
    ]


def main(argv: list[str] | None = None) -> int:
    """`python -m llmhalluc.merge ADAPTER_DIR OUTPUT_DIR`."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description="Merge a LoRA adapter into its base model (a standalone model).")
    parser.add_argument("adapter_dir", type=Path)
    parser.add_argument("output_dir", type=Path)
    args = parser.parse_args(argv)
    if not is_adapter(args.adapter_dir):
        print(f"error: {args.adapter_dir} holds no {ADAPTER_CONFIG}", file=sys.stderr)
        return 2
    try:
        print(f"merged model written to {merge_adapter(args.adapter_dir, args.output_dir)}")
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
