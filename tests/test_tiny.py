"""The offline tiny model: loads with Auto classes, has a chat template and a distinct pad, is deterministic."""

from __future__ import annotations

import hashlib
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmhalluc.models.tiny import TEMPLATE_TOKENS, build_tokenizer, write_tiny_model


def digest(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_round_trip(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model, info = AutoModelForCausalLM.from_pretrained(tiny_model_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.model_type == "llama"
    assert 1e6 < sum(p.numel() for p in model.parameters()) < 10e6
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.chat_template and "generation" in tokenizer.chat_template
    assert model.config.vocab_size == len(tokenizer)
    chat = [{"role": "user", "content": "Tom has 3 apples."}]
    inputs = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 5
    text = "Tom has 12 apples.\n#### 12"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path):
    first = write_tiny_model(tmp_path / "a", seed=3, hidden_size=64, num_layers=2)
    second = write_tiny_model(tmp_path / "b", seed=3, hidden_size=64, num_layers=2)
    third = write_tiny_model(tmp_path / "c", seed=4, hidden_size=64, num_layers=2)
    assert digest(first) == digest(second)
    a = AutoModelForCausalLM.from_pretrained(first)
    c = AutoModelForCausalLM.from_pretrained(third)
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)


def test_every_family_tokenizer_has_its_special_tokens():
    for family, tokens in TEMPLATE_TOKENS.items():
        tokenizer = build_tokenizer(family)
        for token in (tokens.eos, *tokens.extra, *([tokens.bos] if tokens.bos else [])):
            assert len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1, (family, token)


def test_command_line(tmp_path, capsys, monkeypatch):
    from llmhalluc.models.tiny import main

    monkeypatch.setattr(sys, "argv", ["tiny", str(tmp_path / "m"), "--template", "llama3"])
    main()
    assert "llama3 tiny model" in capsys.readouterr().out
    assert "<|eot_id|>" in AutoTokenizer.from_pretrained(tmp_path / "m").chat_template
