"""stage: dpo: one optimizer step equals an independent PyTorch reference (log-prob sums over the SFT masks, each
pref_loss's formula written here from its paper) at every split, full and LoRA; cached reference log-probs equal
live ones (under LoRA, the base model's); pairs load from LLaMA-Factory ranking entries; bad input is named."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, read_metrics, run_sft, run_sft_many
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmhalluc.data import tokenize_chat

PAIRS = 8
ROWS = [json.loads(line) for line in (REPO / "data" / "demo_dpo.jsonl").read_text().splitlines()[:PAIRS]]
BASE = [
    "configs/demo_dpo.yaml",
    "dataset=demo_dpo",
    f"max_samples={PAIRS}",
    "eval_dataset=[]",
    "eval_steps=",
    "save_steps=",
    "max_steps=1",
    "logging_steps=1",
    "lr_scheduler_type=constant",
    "warmup_ratio=0",
]
LORA = ["finetuning_type=lora", "lora_rank=4", "lora_alpha=16", "lora_target=all", "seed=3"]


def side_logps(model, tokenizer, row: dict, side: str) -> tuple[torch.Tensor, int]:
    """(log-prob of the prompt + `side` answer's trained tokens under `model`, how many there are)."""
    example = tokenize_chat(tokenizer, [*row["messages"], row[side]])
    logits = model(input_ids=torch.tensor([example["input_ids"]])).logits[0, :-1].float()
    targets = torch.tensor(example["labels"][1:])
    keep = targets != -100
    return torch.log_softmax(logits[keep], -1).gather(1, targets[keep][:, None]).sum(), int(keep.sum())


def pair_loss(kind: str, c, r, c0, r0, n_c, n_r, beta=0.1, smoothing=0.0, gamma=0.5, ftx=0.0) -> torch.Tensor:
    """One pair's loss, from the papers (DPO, cDPO/robust DPO, IPO with TRL's per-token form, SLiC hinge, SimPO,
    ORPO)."""
    if kind in ("sigmoid", "robust", "hinge", "ipo"):
        margin = (c - c0) - (r - r0)
    if kind == "sigmoid":
        loss = -(1 - smoothing) * F.logsigmoid(beta * margin) - smoothing * F.logsigmoid(-beta * margin)
    elif kind == "robust":
        loss = (-(1 - smoothing) * F.logsigmoid(beta * margin) + smoothing * F.logsigmoid(-beta * margin)) / (
            1 - 2 * smoothing
        )
    elif kind == "hinge":
        loss = torch.clamp(1 - beta * margin, min=0)
    elif kind == "ipo":
        loss = ((c - c0) / n_c - (r - r0) / n_r - 1 / (2 * beta)) ** 2
    elif kind == "simpo":
        loss = -F.logsigmoid(beta * (c / n_c) - beta * (r / n_r) - gamma)
    else:  # orpo: odds(p) = p / (1 - p) of the per-token mean probability
        mean_c, mean_r = c / n_c, r / n_r
        log_odds = (mean_c - torch.log(1 - torch.exp(mean_c))) - (mean_r - torch.log(1 - torch.exp(mean_r)))
        loss = -mean_c - beta * F.logsigmoid(log_odds)
    return loss + ftx * (-c / n_c)


def reference_step(policy, reference, tokenizer, kind: str, **settings) -> tuple[float, float, dict]:
    """(mean loss over the pairs, gradient norm, mean rewards/accuracies) of one step over all the pairs."""
    losses, margins = [], []
    for row in ROWS:
        c, n_c = side_logps(policy, tokenizer, row, "chosen")
        r, n_r = side_logps(policy, tokenizer, row, "rejected")
        with torch.no_grad():
            c0 = side_logps(reference, tokenizer, row, "chosen")[0] if reference is not None else None
            r0 = side_logps(reference, tokenizer, row, "rejected")[0] if reference is not None else None
        losses.append(pair_loss(kind, c, r, c0, r0, n_c, n_r, **settings))
        margin = (c - c0) - (r - r0) if reference is not None else c / n_c - r / n_r
        margins.append(float(margin.detach()))
    loss = torch.stack(losses).mean()
    loss.backward()
    grads = [p.grad for p in policy.parameters() if p.grad is not None]
    norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
    return loss.item(), norm, {"accuracy": sum(m > 0 for m in margins) / len(margins)}


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_model_dir):
    """The starting model, and a named reference model: the same with every weight nudged (so the reference
    log-probs differ from the policy's at the first step)."""
    root = tmp_path_factory.mktemp("dpo")
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
    reference.save_pretrained(root / "reference")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(root / "reference")
    return {"root": root, "start": tiny_model_dir, "reference": root / "reference"}


LOSSES = {
    "sigmoid": [],
    "sigmoid-smoothed-ftx": ["pref_loss=sigmoid", "dpo_label_smoothing=0.1", "pref_ftx=0.5"],
    "ipo": ["pref_loss=ipo"],
    "hinge": ["pref_loss=hinge"],
    "robust": ["pref_loss=robust", "dpo_label_smoothing=0.2"],
    "simpo": ["pref_loss=simpo", "simpo_gamma=0.3"],
    "orpo": ["pref_loss=orpo"],
}


def settings_of(args: list[str]) -> tuple[str, dict]:
    values = dict(a.split("=") for a in args)
    settings = {
        "smoothing": float(values.get("dpo_label_smoothing", 0)),
        "gamma": float(values.get("simpo_gamma", 0.5)),
        "ftx": float(values.get("pref_ftx", 0)),
    }
    return values.get("pref_loss", "sigmoid"), settings


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_pref_loss_equals_the_reference_formula(models, name):
    kind, settings = settings_of(LOSSES[name])
    reference_free = kind in ("simpo", "orpo")
    out = models["root"] / f"loss-{name}"
    named = [] if reference_free else [f"ref_model={models['reference']}"]
    run_sft(
        [*BASE, f"model_name_or_path={models['start']}", f"per_device_train_batch_size={PAIRS}", f"output_dir={out}"]
        + named
        + LOSSES[name]
    )
    (row,) = [r for r in read_metrics(out) if "loss" in r]
    tokenizer = AutoTokenizer.from_pretrained(models["start"])
    policy = AutoModelForCausalLM.from_pretrained(models["start"])
    reference = None if reference_free else AutoModelForCausalLM.from_pretrained(models["reference"])
    loss, norm, rewards = reference_step(policy, reference, tokenizer, kind, **settings)
    assert row["loss"] == pytest.approx(loss, rel=1e-5)
    assert row["grad_norm"] == pytest.approx(norm, rel=1e-5)
    assert row["rewards/accuracies"] == rewards["accuracy"] and row["pairs"] == PAIRS


SPLITS = {
    "1proc-ga4": (None, ["per_device_train_batch_size=2", "gradient_accumulation_steps=4"]),
    "1proc-padded": (None, ["per_device_train_batch_size=8", "padding_free=false"]),
    "ddp": ("cpu_ddp.yaml", ["per_device_train_batch_size=4"]),
    "zero2-ga2": ("cpu_zero2.yaml", ["per_device_train_batch_size=2", "gradient_accumulation_steps=2"]),
    "zero3-ga4": ("cpu_zero3.yaml", ["per_device_train_batch_size=1", "gradient_accumulation_steps=4"]),
}


@pytest.fixture(scope="module")
def splits(models):
    """One DPO step at every split, full fine-tuning against the named reference and LoRA against its base."""
    outputs, launched = {}, []
    for kind, extra in (("full", [f"ref_model={models['reference']}"]), ("lora", LORA)):
        for name, (launch, args) in SPLITS.items():
            out = models["root"] / f"{kind}-{name}"
            outputs[kind, name] = out
            full = [*BASE, f"model_name_or_path={models['start']}", *extra, *args, f"output_dir={out}"]
            if launch is None:
                run_sft(full)
            else:
                launched.append((full, launch))
    run_sft_many(launched, models["root"] / "launch-logs")
    return outputs


@pytest.fixture(scope="module")
def lora_reference(models):
    """The reference step of the LoRA runs: a PEFT model with the same LoRA (same seed), its base as reference."""
    from llmhalluc.config import build_config
    from llmhalluc.models.lora import wrap_lora
    from llmhalluc.models.tokens import NewTokens

    values = {
        "model_name_or_path": str(models["start"]),
        "dataset": ["x"],
        "output_dir": "x",
        "finetuning_type": "lora",
    }
    config = build_config({**values, "lora_rank": 4, "lora_alpha": 16, "lora_target": ["all"]}).model
    policy = wrap_lora(AutoModelForCausalLM.from_pretrained(models["start"]), config, NewTokens(), 3)
    base = AutoModelForCausalLM.from_pretrained(models["start"])
    tokenizer = AutoTokenizer.from_pretrained(models["start"])
    loss, norm, _ = reference_step(policy, base, tokenizer, "sigmoid")
    return {"loss": loss, "grad_norm": norm, "base": base, "tokenizer": tokenizer}


@pytest.mark.slow
@pytest.mark.parametrize("split", sorted(SPLITS))
@pytest.mark.parametrize("kind", ["full", "lora"])
def test_one_step_equals_the_reference_at_every_split(models, splits, lora_reference, kind, split):
    (row,) = [r for r in read_metrics(splits[kind, split]) if "loss" in r]
    if kind == "full":
        tokenizer = AutoTokenizer.from_pretrained(models["start"])
        policy = AutoModelForCausalLM.from_pretrained(models["start"])
        reference = AutoModelForCausalLM.from_pretrained(models["reference"])
        loss, norm, _ = reference_step(policy, reference, tokenizer, "sigmoid")
    else:
        loss, norm = lora_reference["loss"], lora_reference["grad_norm"]
    assert row["loss"] == pytest.approx(loss, rel=1e-5)
    assert row["grad_norm"] == pytest.approx(norm, rel=1e-5)


@pytest.mark.slow
def test_cached_reference_logps_equal_live_ones_and_lora_reads_the_base(models, splits, lora_reference):
    from llmhalluc.train.preference import read_reference

    tokenizer = lora_reference["tokenizer"]
    named = AutoModelForCausalLM.from_pretrained(models["reference"])
    for (kind, split), out in splits.items():
        cached = read_reference(out)["train"]
        model = named if kind == "full" else lora_reference["base"]  # LoRA: the base, adapters disabled
        # The pairs in the cache are in dataset order (one dataset, concatenated: row i is pair i).
        with torch.no_grad():
            for index, row in enumerate(ROWS):
                for side in ("chosen", "rejected"):
                    live = side_logps(model, tokenizer, row, side)[0].item()
                    assert cached[side][index].item() == pytest.approx(live, rel=1e-5, abs=1e-4), (kind, split)


def test_ranking_entries_load_as_llama_factory_writes_them(tmp_path, tiny_model_dir):
    """alpaca (instruction/input + chosen/rejected strings) and sharegpt (a conversation + chosen/rejected
    messages); a pair with identical sides or a side with nothing to train is dropped with its reason."""
    from llmhalluc.config import load_config
    from llmhalluc.data.pairs import prepare_pairs

    alpaca = [
        {"instruction": "Add.", "input": "2 + 2?", "chosen": "4", "rejected": "5"},
        {"instruction": "Add.", "input": "3 + 3?", "chosen": "6", "rejected": "6"},
    ]
    sharegpt = [
        {
            "conversations": [{"from": "human", "value": "Capital of France?"}],
            "chosen": {"from": "gpt", "value": "Paris"},
            "rejected": {"from": "gpt", "value": "Lyon"},
        }
    ]
    (tmp_path / "a.json").write_text(json.dumps(alpaca))
    (tmp_path / "s.json").write_text(json.dumps(sharegpt))
    info = {
        "a": {
            "file_name": "a.json",
            "ranking": True,
            "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected"},
        },
        "s": {
            "file_name": "s.json",
            "formatting": "sharegpt",
            "ranking": True,
            "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"},
        },
    }
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    config = load_config(
        REPO / "configs" / "demo_dpo.yaml", [f"model_name_or_path={tiny_model_dir}", f"dataset_dir={tmp_path}"]
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    pairs, stats = prepare_pairs(["a", "s"], config.data, tokenizer)
    assert stats.pairs == 2 and stats.dropped == {"identical_chosen_rejected": 1}
    for pair, (messages, chosen, rejected) in zip(
        pairs,
        [
            ([{"role": "user", "content": "Add.\n2 + 2?"}], "4", "5"),
            ([{"role": "user", "content": "Capital of France?"}], "Paris", "Lyon"),
        ],
    ):
        for side, answer in (("chosen", chosen), ("rejected", rejected)):
            expected = tokenize_chat(tokenizer, [*messages, {"role": "assistant", "content": answer}])
            assert pair[f"{side}_input_ids"] == expected["input_ids"] and pair[f"{side}_labels"] == expected["labels"]


def test_bad_preference_input_is_named(tmp_path, tiny_model_dir):
    info = json.loads((REPO / "data" / "dataset_info.json").read_text())
    info["no_rejected"] = {
        **info["demo_dpo"],
        "file_name": str(REPO / "data" / "demo_dpo.jsonl"),
        "columns": {"messages": "messages", "chosen": "chosen"},
    }
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    base = ["configs/demo_dpo.yaml", f"model_name_or_path={tiny_model_dir}", f"output_dir={tmp_path / 'out'}"]
    cases = {
        "a ranking dataset needs a 'rejected' column": [f"dataset_dir={tmp_path}", "dataset=no_rejected"],
        "pref_loss: 'dpop' is not one of sigmoid": ["pref_loss=dpop"],
        "dataset 'demo' is not a ranking dataset: stage: dpo trains on pairs": ["dataset=demo"],
        "dataset 'demo_dpo' is a ranking (preference) dataset: train it with stage: dpo": ["stage=sft"],
    }
    for message, extra in cases.items():
        result = run_sft([*base, *extra, "eval_dataset=[]", "eval_steps="], expect_code=2)
        assert re.search(re.escape(message), result.stderr), (message, result.stderr)
        assert result.stderr.strip().splitlines()[-1].startswith("error: "), result.stderr  # after progress bars


@pytest.mark.slow
def test_resume_reads_the_cached_reference_and_continues_exactly(models, tmp_path):
    import shutil

    from safetensors.torch import load_file

    args = [
        *BASE,
        f"model_name_or_path={models['start']}",
        "max_steps=4",
        "save_steps=2",
        "per_device_train_batch_size=2",
        "learning_rate=1e-3",
    ]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    first = run_sft([*args, f"output_dir={whole}"])
    assert "reference log-probs of 8 pairs cached in" in first.stdout
    resumed.mkdir()  # a run that stopped after its step-2 checkpoint: the checkpoint and the reference cache
    shutil.copytree(whole / "checkpoint-2", resumed / "checkpoint-2")
    shutil.copy(whole / "reference_logps.pt", resumed / "reference_logps.pt")
    second = run_sft([*args, f"output_dir={resumed}", "resume_from_checkpoint=latest"])
    assert "cached in" not in second.stdout  # read, not recomputed from the trained weights
    rows = {r["step"]: r for r in read_metrics(whole) if "loss" in r}
    again = {r["step"]: r for r in read_metrics(resumed) if "loss" in r}
    for step in (3, 4):
        assert (again[step]["loss"], again[step]["grad_norm"]) == (rows[step]["loss"], rows[step]["grad_norm"])
    final, final_again = load_file(whole / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(final[k], final_again[k]) for k in final)
    (resumed / "reference_logps.pt").unlink()
    shutil.rmtree(resumed / "checkpoint-4", ignore_errors=True)
    missing = run_sft([*args, f"output_dir={resumed}", "resume_from_checkpoint=latest"], expect_code=2)
    assert "the reference log-probs of this run are missing" in missing.stderr


def test_dry_run_shows_pairs_with_their_trained_tokens(tiny_model_dir):
    result = run_sft(["configs/demo_dpo.yaml", f"model_name_or_path={tiny_model_dir}", "--dry-run", "1"])
    assert "train: 480 pairs from 480 rows; dropped: none" in result.stdout
    assert "--- train pair 0 of demo_dpo, chosen (" in result.stdout
    assert "--- train pair 0 of demo_dpo, rejected (" in result.stdout
    assert "[[The pencils cost 2 * 3 = $6. The change is 10 - 6 = $3." in result.stdout  # the rejected answer, trained
