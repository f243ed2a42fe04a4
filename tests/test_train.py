"""The training loop end to end, on the tiny model, in 1 and 2 processes (DDP, ZeRO-2, ZeRO-3 on gloo).

Exactness is checked against an independent reference computed here with a plain forward/backward (resume:
tests/test_checkpoints.py).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import read_metrics, run_sft, run_sft_many, write_chats
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmhalluc.data import IGNORE_INDEX, tokenize_chat
from llmhalluc.data.templates import read_builtin_template
from llmhalluc.models.attention import PACKED_SDPA

pytestmark = pytest.mark.slow
DATA = Path(__file__).resolve().parent.parent / "data"


def demo_chats() -> list[list[dict]]:
    return [json.loads(line)["messages"] for line in (DATA / "demo_train.jsonl").read_text().splitlines()]


def eight_chats() -> list[list[dict]]:
    """Eight chats of clearly different lengths, some multi-turn, some with a system prompt."""
    chats = sorted(demo_chats(), key=lambda m: sum(len(t["content"]) for t in m))
    return [chats[i] for i in (0, 60, 120, 200, 280, 360, 440, 479)]


@pytest.fixture(scope="module")
def eight(tmp_path_factory, tiny_model_dir) -> dict:
    """A dataset of the 8 chats, the base args of a 1-step run on them, and the reference loss and grad norm."""
    root = tmp_path_factory.mktemp("eight")
    chats = eight_chats()
    write_chats(root / "data", "eight", chats)
    base = [
        "configs/demo.yaml",
        f"model_name_or_path={tiny_model_dir}",
        "dataset=eight",
        f"dataset_dir={root / 'data'}",
        "eval_dataset=eight",
        "per_device_eval_batch_size=3",
        "eval_steps=",
        "save_steps=",
        "max_length=1024",
        "packing=false",
        "max_steps=1",
        "learning_rate=1e-3",
        "lr_scheduler_type=constant",
        "warmup_ratio=0",
        "logging_steps=1",
        "seed=1",
    ]
    # The reference: the textbook computation over the whole batch at once, full logits, HF's label shift.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    examples = [tokenize_chat(tokenizer, chat) for chat in chats]
    longest = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((8, longest), tokenizer.pad_token_id)
    labels = torch.full((8, longest), IGNORE_INDEX)
    mask = torch.zeros((8, longest), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        ids[row, :n], labels[row, :n], mask[row, :n] = (
            torch.tensor(example["input_ids"]),
            torch.tensor(example["labels"]),
            1,
        )
    logits = model(input_ids=ids, attention_mask=mask).logits
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
    )
    loss.backward()
    grad_norm = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in model.parameters()))
    return {"root": root, "base": base, "loss": loss.item(), "grad_norm": grad_norm}


# Padding-free micro-batches are the default on CPU (sdpa); padding_free=false asks for padded ones.
SPLITS = {
    "1proc-mbs8": (None, ["per_device_train_batch_size=8"]),
    "1proc-mbs8-padded": (None, ["per_device_train_batch_size=8", "padding_free=false"]),
    "1proc-packed": (None, ["per_device_train_batch_size=1", "packing=true"]),
    "ddp-mbs4": ("cpu_ddp.yaml", ["per_device_train_batch_size=4"]),
    "zero2-mbs2-ga2-padded": (
        "cpu_zero2.yaml",
        ["per_device_train_batch_size=2", "gradient_accumulation_steps=2", "padding_free=false"],
    ),
    "zero3-mbs1-ga4": ("cpu_zero3.yaml", ["per_device_train_batch_size=1", "gradient_accumulation_steps=4"]),
    "zero3-mbs2-ga2-padded": (
        "cpu_zero3.yaml",
        ["per_device_train_batch_size=2", "gradient_accumulation_steps=2", "padding_free=false"],
    ),
    "zero3-offload-mbs4": ("cpu_zero3_offload.yaml", ["per_device_train_batch_size=4"]),
}


@pytest.fixture(scope="module")
def split_runs(eight) -> dict[str, Path]:
    """One step at every split: one-process runs here, the 2-process ones in one launch."""
    outputs = {name: eight["root"] / name for name in SPLITS}
    launched = []
    for name, (launch, args) in SPLITS.items():
        full_args = [*eight["base"], f"output_dir={outputs[name]}", *args]
        if launch is None:
            run_sft(full_args)
        else:
            launched.append((full_args, launch))
    run_sft_many(launched, eight["root"] / "launch-logs")
    return outputs


@pytest.mark.parametrize("name", sorted(SPLITS))
def test_one_step_matches_the_reference_at_every_split(eight, split_runs, name):
    (row,) = [r for r in read_metrics(split_runs[name]) if "loss" in r]
    assert row["loss"] == pytest.approx(eight["loss"], rel=1e-5)
    assert row["grad_norm"] == pytest.approx(eight["grad_norm"], rel=1e-5)
    summary = json.loads((split_runs[name] / "run_summary.json").read_text())
    assert summary["processes"] == (1 if SPLITS[name][0] is None else 2)
    expected_type = {None: "NO", "cpu_ddp.yaml": "MULTI_CPU"}.get(SPLITS[name][0], "DEEPSPEED")
    assert summary["distributed_type"] == expected_type
    assert summary["batch_layout"] == (
        "packed" if "packed" in name else "padded" if "padded" in name else "padding_free"
    )
    assert summary["attention"] == ("sdpa" if "padded" in name else PACKED_SDPA)  # per-example attention on CPU


def test_eval_loss_is_token_weighted_across_ranks(split_runs, tiny_model_dir):
    # Reference: the 1-process model after its step, evaluated here over the 8 chats in one textbook pass.
    out = split_runs["1proc-mbs8"]
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ce, count = 0.0, 0
    with torch.no_grad():
        for chat in eight_chats():
            example = tokenize_chat(tokenizer, chat)
            logits = model(input_ids=torch.tensor([example["input_ids"]])).logits[0, :-1]
            targets = torch.tensor(example["labels"][1:])
            ce += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
            count += int((targets != IGNORE_INDEX).sum())
    (evaluation,) = [r for r in read_metrics(out) if "eval_loss" in r]
    assert evaluation["eval_loss"] == pytest.approx(ce / count, rel=1e-5)
    assert evaluation["eval_tokens"] == count
    assert evaluation["eval_perplexity"] == pytest.approx(math.exp(ce / count), rel=1e-5)
    for name in SPLITS:  # 8 rows over 2 ranks in batches of 3: uneven batches, the same token-weighted mean
        (other,) = [r for r in read_metrics(split_runs[name]) if "eval_loss" in r]
        assert other["eval_loss"] == pytest.approx(evaluation["eval_loss"], rel=1e-4), name
        assert other["eval_tokens"] == count


def test_deepspeed_got_the_experiments_numbers_and_zero3_loaded_sharded(split_runs):
    zero3 = json.loads((split_runs["zero3-mbs1-ga4"] / "run_summary.json").read_text())
    given = zero3["deepspeed_config"]
    assert given["train_micro_batch_size_per_gpu"] == 1
    assert given["gradient_accumulation_steps"] == 4
    assert given["train_batch_size"] == 8
    assert given["gradient_clipping"] == 1.0
    assert given["zero_optimization"]["stage"] == 3
    assert zero3["loaded_sharded"] is True
    offload = json.loads((split_runs["zero3-offload-mbs4"] / "run_summary.json").read_text())
    assert offload["offload_optimizer"] == offload["offload_param"] == "cpu"
    assert offload["deepspeed_config"]["optimizer"]["params"] == {
        "lr": 1e-3,
        "betas": [0.9, 0.999],
        "eps": 1e-8,
        "weight_decay": 0.0,
    }
    assert offload["deepspeed_config"]["train_micro_batch_size_per_gpu"] == 4
    zero2 = json.loads((split_runs["zero2-mbs2-ga2-padded"] / "run_summary.json").read_text())
    assert zero2["deepspeed_config"]["train_micro_batch_size_per_gpu"] == 2
    assert zero2["loaded_sharded"] is False


def test_updated_weights_agree_across_splits(split_runs):
    # After one AdamW step (lr 1e-3) every weight moved by ~1e-3; splits agree to float noise that Adam's
    # normalisation amplifies on near-zero gradients (a few 1e-6 to 1e-5), far below one update.
    reference = load_file(split_runs["1proc-mbs8"] / "model.safetensors")
    for name in SPLITS:
        weights = load_file(split_runs[name] / "model.safetensors")
        assert weights.keys() == reference.keys()
        worst = max((weights[k] - reference[k]).abs().max().item() for k in reference)
        assert worst < 5e-5, (name, worst)


def test_same_config_twice_gives_the_same_metrics_and_wandb_offline_records_them(tmp_path, eight):
    args = [*eight["base"], "max_steps=4", "per_device_train_batch_size=2", "report_to=wandb"]
    first, second = tmp_path / "first", tmp_path / "second"
    run_sft([*args, f"output_dir={first}"], env={"WANDB_MODE": "offline"})
    # The saved config reproduces the run (into another folder: the first one is never overwritten); WANDB_DIR,
    # when set, is where wandb writes.
    wandb_dir = tmp_path / "local-disk"
    wandb_dir.mkdir()
    run_sft(
        [str(first / "config.yaml"), f"output_dir={second}"], env={"WANDB_MODE": "offline", "WANDB_DIR": str(wandb_dir)}
    )
    assert list((wandb_dir / "wandb").glob("offline-run-*/run-*.wandb")) and not (second / "wandb").exists()
    timing = {"tokens_per_second", "trained_tokens_per_second", "step_time", "eval_time"}
    strip = [{k: v for k, v in row.items() if k not in timing} for row in read_metrics(first)]
    assert strip == [{k: v for k, v in row.items() if k not in timing} for row in read_metrics(second)]
    (run_file,) = (first / "wandb").glob("offline-run-*/run-*.wandb")
    recorded = run_file.read_bytes()
    for row in read_metrics(first):  # wandb stores each logged value as its JSON text
        for key in ("loss", "grad_norm", "lr", "trained_tokens", "eval_loss"):
            if key in row:
                assert json.dumps(row[key]).encode() in recorded, key
    assert b"per_device_train_batch_size" in recorded  # the resolved config is attached


def test_metrics_rows_and_final_model(tmp_path, eight):
    out = tmp_path / "out"
    run_sft(
        [
            *eight["base"],
            "max_steps=6",
            "per_device_train_batch_size=2",
            "logging_steps=2",
            "template=qwen",
            "save_steps=2",
            "save_total_limit=2",
            f"output_dir={out}",
        ]
    )
    rows = read_metrics(out)
    assert [r["step"] for r in rows if "loss" in r] == [2, 4, 6]
    assert sorted(p.name for p in out.glob("*checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    assert AutoTokenizer.from_pretrained(out).chat_template == read_builtin_template("qwen")
    rows = [r for r in rows if "loss" in r]
    for row in rows:
        for key in (
            "epoch",
            "loss",
            "grad_norm",
            "lr",
            "tokens",
            "trained_tokens",
            "tokens_per_second",
            "trained_tokens_per_second",
            "step_time",
            "tokens_seen",
        ):
            assert key in row
        assert row["trained_tokens"] < row["tokens"]
    assert rows[-1]["loss"] < rows[0]["loss"]
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.use_cache is True
    saved = yaml_safe_load(out / "config.yaml")
    assert saved["max_steps"] == 6 and saved["logging_steps"] == 2
    # A checkpoint of a one-process run also loads as a model: config, generation config and tokenizer beside it.
    checkpoint = AutoModelForCausalLM.from_pretrained(out / "checkpoint-6")
    assert AutoTokenizer.from_pretrained(out / "checkpoint-6").chat_template == read_builtin_template("qwen")
    for name, value in checkpoint.state_dict().items():
        assert torch.equal(value, model.state_dict()[name]), name


def test_existing_run_in_output_dir_is_not_overwritten(tmp_path, eight, split_runs):
    out = tmp_path / "out"
    shutil.copytree(split_runs["1proc-mbs8"], out)
    before = (out / "metrics.jsonl").read_text()
    result = run_sft([*eight["base"], "per_device_train_batch_size=8", f"output_dir={out}"], expect_code=2)
    assert "already holds a run: set resume_from_checkpoint: latest" in result.stderr
    assert (out / "metrics.jsonl").read_text() == before


def yaml_safe_load(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def test_deepspeed_json_value_that_contradicts_the_experiment_is_rejected(tmp_path, eight):
    ds_json = json.loads((Path(__file__).resolve().parent.parent / "ds_configs" / "zero2.json").read_text())
    ds_json["train_micro_batch_size_per_gpu"] = 4
    (tmp_path / "fixed.json").write_text(json.dumps(ds_json))
    launch = (Path(__file__).resolve().parent.parent / "accelerate_configs" / "cpu_zero2.yaml").read_text()
    (tmp_path / "fixed.yaml").write_text(launch.replace("ds_configs/zero2.json", str(tmp_path / "fixed.json")))
    out = tmp_path / "out"
    result = run_sft(
        [*eight["base"], "per_device_train_batch_size=2", "gradient_accumulation_steps=2", f"output_dir={out}"],
        accelerate_config=str(tmp_path / "fixed.yaml"),
        expect_code=1,
    )
    assert "train_micro_batch_size_per_gpu is 4 but the experiment's per_device_train_batch_size is 2" in (
        result.stderr
    )
    assert not out.exists()


def test_torch_compile_trains_the_same_numbers_and_saves_a_plain_model(tmp_path, eight, split_runs):
    out = tmp_path / "compiled"
    # A fresh process: compiled graphs and dynamo's caches stay out of the other tests' runs. No evaluation: its
    # batches would compile graphs of their own, which this test does not read.
    args = ["per_device_train_batch_size=8", "torch_compile=true", "eval_dataset=[]", f"output_dir={out}"]
    run_sft([*eight["base"], *args], fresh_process=True)
    (row,) = [r for r in read_metrics(out) if "loss" in r]
    assert row["loss"] == pytest.approx(eight["loss"], rel=1e-5)
    assert row["grad_norm"] == pytest.approx(eight["grad_norm"], rel=1e-4)
    _, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    reference = load_file(split_runs["1proc-mbs8"] / "model.safetensors")
    compiled = load_file(out / "model.safetensors")
    assert max((compiled[k] - reference[k]).abs().max().item() for k in reference) < 5e-5


def test_liger_kernels_are_refused_clearly_without_cuda(tmp_path, eight):
    out = tmp_path / "out"
    result = run_sft([*eight["base"], "use_liger_kernel=true", f"output_dir={out}"], expect_code=2)
    assert "use_liger_kernel: Liger's kernels are Triton kernels and need a CUDA GPU" in result.stderr
    assert not out.exists()
