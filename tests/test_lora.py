"""LoRA with PEFT on every distributed path: the exact loss at any split against a plain PEFT reference, ZeRO-3
saving the trained adapter, and bad input named (saving, loading, merging and resume: tests/test_checkpoints.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import read_metrics, run_sft, run_sft_many, write_chats
from safetensors.torch import load_file
from test_train import eight_chats
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmhalluc.config import build_config
from llmhalluc.data import IGNORE_INDEX, tokenize_chat
from llmhalluc.errors import UserError
from llmhalluc.models.lora import check_adapter_base, lora_targets, wrap_lora
from llmhalluc.models.tokens import NewTokens

LORA = ["finetuning_type=lora", "lora_rank=4", "lora_alpha=16", "lora_target=all", "seed=3"]


def lora_model_config(tiny_model_dir, **keys):
    values = {"model_name_or_path": str(tiny_model_dir), "dataset": ["x"], "output_dir": "x", "finetuning_type": "lora"}
    return build_config({**values, "lora_rank": 4, "lora_alpha": 16, **keys}).model


@pytest.fixture(scope="module")
def lora_eight(tmp_path_factory, tiny_model_dir) -> dict:
    """The 8 chats, a 1-step LoRA run's arguments, and the reference: a plain PEFT model with the same LoRA
    (drawn from the same seed) over the whole batch, full logits."""
    root = tmp_path_factory.mktemp("lora")
    chats = eight_chats()
    write_chats(root / "data", "eight", chats)
    base = [
        "configs/demo.yaml",
        f"model_name_or_path={tiny_model_dir}",
        "dataset=eight",
        f"dataset_dir={root / 'data'}",
        "eval_dataset=[]",
        "eval_steps=",
        "save_steps=",
        "max_length=1024",
        "max_steps=1",
        "learning_rate=1e-2",
        "adam_epsilon=1e-3",  # see test_zero3_saves_the_trained_adapter_equal_to_one_process
        "lr_scheduler_type=constant",
        "warmup_ratio=0",
        "logging_steps=1",
        *LORA,
    ]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = wrap_lora(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora_model_config(tiny_model_dir), NewTokens(), 3
    )
    loss, count = 0.0, 0
    for chat in chats:
        example = tokenize_chat(tokenizer, chat)
        logits = model(input_ids=torch.tensor([example["input_ids"]])).logits[0, :-1]
        targets = torch.tensor(example["labels"][1:])
        loss = loss + torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
        count += int((targets != IGNORE_INDEX).sum())
    (loss / count).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    grad_norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
    return {"root": root, "base": base, "loss": (loss / count).item(), "grad_norm": grad_norm}


LORA_SPLITS = {
    "1proc-mbs8": (None, ["per_device_train_batch_size=8"]),
    "1proc-mbs2-ga4": (None, ["per_device_train_batch_size=2", "gradient_accumulation_steps=4"]),
    "1proc-packed-checkpointing": (
        None,
        ["packing=true", "per_device_train_batch_size=1", "gradient_checkpointing=true"],
    ),
    "ddp-mbs4": ("cpu_ddp.yaml", ["per_device_train_batch_size=4"]),
    "zero2-mbs2-ga2": ("cpu_zero2.yaml", ["per_device_train_batch_size=2", "gradient_accumulation_steps=2"]),
    "zero3-mbs1-ga4": ("cpu_zero3.yaml", ["per_device_train_batch_size=1", "gradient_accumulation_steps=4"]),
}


@pytest.fixture(scope="module")
def lora_splits(lora_eight) -> dict[str, Path]:
    """One LoRA step at every split: one-process runs here, the 2-process ones in one launch."""
    outputs = {name: lora_eight["root"] / name for name in LORA_SPLITS}
    launched = []
    for name, (launch, args) in LORA_SPLITS.items():
        full_args = [*lora_eight["base"], *args, f"output_dir={outputs[name]}"]
        if launch is None:
            run_sft(full_args)
        else:
            launched.append((full_args, launch))
    run_sft_many(launched, lora_eight["root"] / "launch-logs")
    return outputs


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(LORA_SPLITS))
def test_lora_step_matches_the_peft_reference_at_every_split(lora_eight, lora_splits, name):
    out = lora_splits[name]
    (row,) = [r for r in read_metrics(out) if "loss" in r]
    assert row["loss"] == pytest.approx(lora_eight["loss"], rel=1e-5)
    assert row["grad_norm"] == pytest.approx(lora_eight["grad_norm"], rel=1e-5)
    parameters = json.loads((out / "run_summary.json").read_text())["parameters"]
    assert 0 < parameters["trainable"] < parameters["total"] / 10  # only the adapter trains


@pytest.mark.slow
def test_zero3_saves_the_trained_adapter_equal_to_one_process(lora_eight, lora_splits):
    """After the one step of the split runs (same global batch), the saved adapters agree. A is unchanged by the
    first step (its gradient is zero while B is); B moved by AdamW's first update, -lr * g / (|g| + eps) per element,
    whose change under a gradient error d is at most lr * d / eps. Gradients differ across launches only by float32
    reduction order, d <= 1e-7 for gradients of magnitude <= 1 (2^-23 relative); with lr 1e-2 and eps 1e-3 (set for
    this: at the default 1e-8 an element whose gradient is itself ~1e-9 may move by up to lr) the adapters must
    agree to 1e-6, while every element that trained moved by ~lr * |g| / (|g| + eps)."""
    one = load_file(lora_splits["1proc-mbs8"] / "adapter_model.safetensors")
    zero3 = load_file(lora_splits["zero3-mbs1-ga4"] / "adapter_model.safetensors")
    assert one.keys() == zero3.keys() and len(one) == 56  # A and B of 7 linear layers x 4 blocks
    for key in one:
        assert zero3[key].numel() > 0, key  # gathered whole, never an empty shard
        torch.testing.assert_close(zero3[key], one[key], atol=1e-6, rtol=0, msg=key)
    assert all(v.abs().max() > 1e-3 for k, v in one.items() if "lora_B" in k)  # B starts at zero: it trained
    config = json.loads((lora_splits["zero3-mbs1-ga4"] / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]).is_absolute() and config["r"] == 4


def test_lora_targets_and_bad_input_name_the_culprit(tmp_path, tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert lora_targets(model, ["all"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    with pytest.raises(UserError, match=r"lora_target: 'qkv_proj' is not a linear layer of this model; its linear "):
        lora_targets(model, ["q_proj", "qkv_proj"])
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "other/model"}))
    with pytest.raises(UserError, match="is an adapter of 'other/model', but model_name_or_path is"):
        check_adapter_base(tmp_path, str(tiny_model_dir))
    from llmhalluc.errors import ConfigError

    for keys, message in (
        ({"lora_rank": 0}, "lora_rank: must be at least 1, got 0"),
        ({"finetuning_type": "qlora"}, "finetuning_type: 'qlora' is not one of full, lora"),
        ({"finetuning_type": "full", "merge": True}, "merge is set but finetuning_type is full"),
    ):
        with pytest.raises(ConfigError, match=message):
            lora_model_config(tiny_model_dir, **keys)


@pytest.mark.slow
def test_unknown_lora_target_exits_2_listing_the_layers(tmp_path, tiny_model_dir):
    result = run_sft(
        [
            "configs/demo.yaml",
            f"model_name_or_path={tiny_model_dir}",
            f"output_dir={tmp_path / 'out'}",
            "finetuning_type=lora",
            "lora_target=[q_proj,attn]",
        ],
        expect_code=2,
    )
    assert "lora_target: 'attn' is not a linear layer of this model; its linear layers are: down_proj" in result.stderr
    assert not (tmp_path / "out").exists()
