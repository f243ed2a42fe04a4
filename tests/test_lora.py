"""LoRA with PEFT on every distributed path: the exact loss at any split against a plain PEFT reference, ZeRO-3
saving the trained adapter, new-token rows trained and saved, a merge that is exactly base + adapter (loadable
without peft), exact resume after a kill, and bad input named."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, read_metrics, run_sft, sft_command, write_chats
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


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(LORA_SPLITS))
def test_lora_step_matches_the_peft_reference_at_every_split(lora_eight, name):
    launch, args = LORA_SPLITS[name]
    out = lora_eight["root"] / name
    run_sft([*lora_eight["base"], *args, f"output_dir={out}"], accelerate_config=launch)
    (row,) = [r for r in read_metrics(out) if "loss" in r]
    assert row["loss"] == pytest.approx(lora_eight["loss"], rel=1e-5)
    assert row["grad_norm"] == pytest.approx(lora_eight["grad_norm"], rel=1e-5)
    parameters = json.loads((out / "run_summary.json").read_text())["parameters"]
    assert 0 < parameters["trainable"] < parameters["total"] / 10  # only the adapter trains


TEN_STEPS = ["max_steps=10", "per_device_train_batch_size=2", "save_steps=5", "learning_rate=5e-3"]


@pytest.fixture(scope="module")
def lora_ten(lora_eight):
    """10 LoRA steps in 1 process and in 2-process ZeRO-3 (same global batch), checkpointing at 5."""
    runs = {}
    for name, launch, extra in (("one", None, []), ("zero3", "cpu_zero3.yaml", ["per_device_train_batch_size=1"])):
        out = lora_eight["root"] / f"ten-{name}"
        run_sft([*lora_eight["base"], *TEN_STEPS, *extra, f"output_dir={out}"], accelerate_config=launch)
        runs[name] = out
    return runs


@pytest.mark.slow
def test_zero3_saves_the_trained_adapter_equal_to_one_process(lora_ten):
    one = load_file(lora_ten["one"] / "adapter_model.safetensors")
    zero3 = load_file(lora_ten["zero3"] / "adapter_model.safetensors")
    assert one.keys() == zero3.keys() and len(one) == 56  # A and B of 7 linear layers x 4 blocks
    for key in one:
        assert zero3[key].numel() > 0, key  # gathered whole, never an empty shard
        torch.testing.assert_close(zero3[key], one[key], atol=1e-5, rtol=0, msg=key)
    assert any(v.abs().sum() > 0 for k, v in one.items() if "lora_B" in k)  # B starts at zero: it trained
    config = json.loads((lora_ten["zero3"] / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] and config["r"] == 4
    checkpoint = lora_ten["one"] / "checkpoint-5" / "model.safetensors"
    assert set(load_file(checkpoint)) and all("lora_" in k for k in load_file(checkpoint))  # adapter only


@pytest.mark.slow
def test_kill_and_resume_mid_run_is_exact_for_lora(tmp_path, lora_eight, lora_ten):
    out = tmp_path / "killed"
    args = [*lora_eight["base"], *TEN_STEPS, f"output_dir={out}"]
    process = subprocess.Popen(sft_command(args), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "checkpoint-5" / "COMPLETE").exists() or len(read_metrics(out)) < 7:
        assert time.time() < deadline and process.poll() is None
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert not (out / "adapter_model.safetensors").exists()
    run_sft([*args, "resume_from_checkpoint=latest"])
    reference = read_metrics(lora_ten["one"])
    assert [(r["step"], r.get("loss"), r.get("grad_norm")) for r in read_metrics(out)] == [
        (r["step"], r.get("loss"), r.get("grad_norm")) for r in reference
    ]
    a = load_file(lora_ten["one"] / "adapter_model.safetensors")
    b = load_file(out / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def lora_tokens(lora_eight, tiny_model_dir):
    """LoRA with 2 new special tokens in every answer, merged at the end (1 process, untied embeddings)."""
    root = lora_eight["root"]
    chats = eight_chats()
    for chat in chats:
        chat[-1]["content"] = "<A> " + chat[-1]["content"] + " <B>"
    write_chats(root / "tokdata", "marked", chats)
    out = root / "tokens"
    args = [*lora_eight["base"], "dataset=marked", f"dataset_dir={root / 'tokdata'}", "add_special_tokens=[<A>,<B>]"]
    run_sft([*args, "max_steps=6", "per_device_train_batch_size=4", "merge=true", f"output_dir={out}"])
    return out


CHECK_MERGED_WITHOUT_PEFT = """
import sys, json, torch
sys.modules["peft"] = None  # an import of peft fails: the merged model must not need it
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
ids = json.loads(sys.argv[2])
with torch.no_grad():
    logits = model(input_ids=torch.tensor([ids])).logits[0]
print(json.dumps({"logits": logits.tolist(), "new": tokenizer.convert_tokens_to_ids(["<A>", "<B>"]),
                  "template": bool(tokenizer.chat_template)}))
"""


@pytest.mark.slow
def test_new_token_rows_train_save_with_the_adapter_and_merge_exactly(lora_tokens, tiny_model_dir):
    from llmhalluc.models.lora import load_adapter_model

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    adapted = load_adapter_model(lora_tokens)  # base + adapter, in this (fresh) process
    tokenizer = AutoTokenizer.from_pretrained(lora_tokens)
    new = tokenizer.convert_tokens_to_ids(["<A>", "<B>"])
    assert new == [761, 762]
    merged = adapted.merge_and_unload()
    for matrix in ("get_input_embeddings", "get_output_embeddings"):
        trained = getattr(merged, matrix)().weight.detach()
        original = getattr(base, matrix)().weight.detach()
        assert trained.shape[0] == 763 and original.shape[0] == 761
        assert torch.equal(trained[:761], original)  # every other row, bit for bit
    summary = json.loads((lora_tokens / "run_summary.json").read_text())["new_tokens"]
    # The rows as initialised (noise_init, seed 3) are not the rows the adapter now gives: they trained.
    from llmhalluc.config import load_config
    from llmhalluc.models.tokens import add_tokens, embed_new_tokens

    config = load_config(lora_tokens / "config.yaml")
    fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    fresh_tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    embed_new_tokens(fresh, fresh_tokenizer, add_tokens(fresh_tokenizer, config), seed=config.training.seed)
    initial = fresh.get_input_embeddings().weight.detach()
    for index in new:
        assert not torch.allclose(merged.get_input_embeddings().weight[index], initial[index])
    # The trained rows the run wrote (PEFT keeps the rows' values, not differences) are what the fresh load gives.
    saved = load_file(lora_tokens / "adapter_model.safetensors")
    for matrix, key in (("get_input_embeddings", "model.embed_tokens"), ("get_output_embeddings", "lm_head")):
        trained_rows = saved[f"base_model.model.{key}.token_adapter.trainable_tokens_delta"]
        assert torch.equal(getattr(merged, matrix)().weight[new].detach(), trained_rows), matrix
    assert summary["embedding_rows"] == {"before": 761, "after": 763}
    # The merged model (written by merge: true) equals base + adapter, and loads with no peft at all.
    held_out = tokenize_chat(
        tokenizer, [{"role": "user", "content": "Mei has 4 <A> cards."}, {"role": "assistant", "content": "<A> 4 <B>"}]
    )
    with torch.no_grad():
        expected = load_adapter_model(lora_tokens)(input_ids=torch.tensor([held_out["input_ids"]])).logits[0]
    check = subprocess.run(
        [
            sys.executable,
            "-c",
            CHECK_MERGED_WITHOUT_PEFT,
            str(lora_tokens / "merged"),
            json.dumps(held_out["input_ids"]),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(check.stdout.strip().splitlines()[-1])
    torch.testing.assert_close(torch.tensor(result["logits"]), expected, atol=1e-5, rtol=0)
    assert result["new"] == [761, 762] and result["template"]


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
