"""New special tokens: added, initialised, trained and saved correctly, on tied and untied tiny models with and
without spare embedding rows, in one process and under 2-process ZeRO-3."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, read_metrics, run_sft, write_chats
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from llmhalluc.config import build_config
from llmhalluc.data import apply_backtracks, tokenize_chat
from llmhalluc.data.converters import apply_aliases
from llmhalluc.data.facts import token_facts
from llmhalluc.errors import UserError
from llmhalluc.eval.generation import decode
from llmhalluc.models.tiny import build_tokenizer
from llmhalluc.models.tokens import add_tokens, embed_new_tokens

DESCRIPTIONS = {"<|BACKTRACK|>": "take back the previous word", "<ABSTAIN>": "I do not know the answer"}


def tiny(tokenizer, tied: bool, spare_rows: int = 0, seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer Llama for the tokenizer, with `spare_rows` embedding rows beyond it (as Qwen's padded vocabulary)."""
    config = LlamaConfig(
        vocab_size=len(tokenizer) + spare_rows,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def config_for(tmp_path: Path, **model_keys) -> object:
    values = {"model_name_or_path": "unused", "dataset": ["demo"], "output_dir": str(tmp_path), **model_keys}
    return build_config(values)


def descriptions_file(tmp_path: Path, mapping: dict) -> str:
    path = tmp_path / "tokens.yaml"
    path.write_text("".join(f"{json.dumps(k)}: {json.dumps(v)}\n" for k, v in mapping.items()))
    return str(path)


@pytest.mark.parametrize(("tied", "spare"), [(True, 5), (False, 0)], ids=["tied-spare-rows", "untied-resized"])
def test_desc_init_rows_are_the_mean_of_their_description_rows(tmp_path, tied, spare):
    tokenizer = build_tokenizer("chatml")
    model = tiny(tokenizer, tied, spare)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = config_for(
        tmp_path, new_special_tokens_config=descriptions_file(tmp_path, DESCRIPTIONS), init_special_tokens="desc_init"
    )
    new = add_tokens(tokenizer, config)
    assert list(new.ids) == list(DESCRIPTIONS) and min(new.ids.values()) == new.original_size  # ids after adding
    embed_new_tokens(model, tokenizer, new, seed=0)
    matrices = {"model.embed_tokens.weight": model.get_input_embeddings().weight}
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight  # one tensor
        assert new.rows_after == new.rows_before == len(tokenizer) - 2 + spare  # the new ids fit the spare rows
    else:
        matrices["lm_head.weight"] = model.lm_head.weight
        assert new.rows_after == len(tokenizer)  # grown by exactly what was needed (the tiny model pads to 1)
    for name, weight in matrices.items():
        for token, description in DESCRIPTIONS.items():
            ids = tokenizer(description, add_special_tokens=False)["input_ids"]
            torch.testing.assert_close(weight[new.ids[token]], before[name][ids].mean(dim=0), atol=1e-6, rtol=0)
        untouched = [i for i in range(before[name].shape[0]) if i not in new.ids.values()]
        assert torch.equal(weight[untouched], before[name][untouched]), name  # every other row, bit for bit


def test_noise_init_is_seeded_and_centred_on_the_original_vocabulary(tmp_path):
    many = [f"<T{i}>" for i in range(3000)]
    rows = {}
    for seed in (1, 1, 2):
        tokenizer = build_tokenizer("chatml")
        model = tiny(tokenizer, tied=False, spare_rows=2)
        original_mean = model.get_input_embeddings().weight[: len(tokenizer)].mean(dim=0).clone()
        new = add_tokens(tokenizer, config_for(tmp_path, add_special_tokens=many))
        embed_new_tokens(model, tokenizer, new, seed=seed)
        ids = list(new.ids.values())
        rows.setdefault(seed, []).append(model.get_input_embeddings().weight[ids].detach().clone())
        # Noise N(0, 1/sqrt(64)) per entry: the mean over 3000 rows is within ~4 standard errors of the vocab mean.
        deviation = (rows[seed][-1].mean(dim=0) - original_mean).abs().max().item()
        assert deviation < 4 * (1 / 8) / 3000**0.5
        assert rows[seed][-1].std().item() == pytest.approx(1 / 8, rel=0.05)
        assert (
            model.get_output_embeddings()
            .weight[ids]
            .mean(dim=0)
            .sub(model.get_output_embeddings().weight[: len(tokenizer) - len(many)].mean(dim=0))
            .abs()
            .max()
            < 4 * (1 / 8) / 3000**0.5
        )  # the output matrix from its own rows
    assert torch.equal(rows[1][0], rows[1][1]) and not torch.equal(rows[1][0], rows[2][0])


def test_existing_tokens_are_left_alone_and_resizing_follows_the_multiple(tmp_path):
    tokenizer = build_tokenizer("chatml")
    model = tiny(tokenizer, tied=False)
    before = model.get_input_embeddings().weight.clone()
    new = add_tokens(tokenizer, config_for(tmp_path, add_special_tokens=["<|im_end|>", "<A>"], add_tokens=["<B>"]))
    assert new.existing == {"<|im_end|>": tokenizer.convert_tokens_to_ids("<|im_end|>")}
    assert list(new.ids) == ["<A>", "<B>"] and new.special == {"<A>"}
    embed_new_tokens(model, tokenizer, new, seed=0, resize_to_multiple_of=64)
    assert new.rows_after == 768 and model.config.vocab_size == 768  # 763 ids, rounded up to a multiple of 64
    assert torch.equal(model.get_input_embeddings().weight[: before.shape[0]], before)
    assert "<A>" in tokenizer("x<A>y", add_special_tokens=False).tokens()  # one token, never split


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"add_special_tokens": ["<A>", "<A>"]}, "'<A>' is listed twice"),
        ({"add_special_tokens": ["<A>"], "add_tokens": ["<A>"]}, "'<A>' is listed twice"),
        ({"add_special_tokens": ["<A>"], "init_special_tokens": "desc_init"}, "desc_init needs new_special_tokens_"),
        (
            {
                "add_special_tokens": ["<B>"],
                "init_special_tokens": "desc_init",
                "new_special_tokens_config": {"<A>": "a"},
            },
            "'<B>' has none",
        ),
        ({"new_special_tokens_config": {"<A>": "  "}}, "token '<A>' in"),
    ],
    ids=["twice", "special-and-ordinary", "desc-init-without-config", "desc-init-without-description", "empty"],
)
def test_bad_token_settings_name_the_token(tmp_path, keys, message):
    if isinstance(keys.get("new_special_tokens_config"), dict):
        keys = {**keys, "new_special_tokens_config": descriptions_file(tmp_path, keys["new_special_tokens_config"])}
    with pytest.raises(UserError, match=message):
        add_tokens(build_tokenizer("chatml"), config_for(tmp_path, **keys))


# --- launched: training with new tokens, ZeRO-3, saving, resume -----------------------------------------------

DUMP_INITIAL_ROWS = """
import os, torch
import llmhalluc.train.setup as setup
real = setup.embed_new_tokens
def embed_new_tokens(model, tokenizer, new, *args, **kwargs):
    real(model, tokenizer, new, *args, **kwargs)
    weight = model.get_input_embeddings().weight
    if hasattr(weight, "ds_id"):
        import deepspeed
        with deepspeed.zero.GatheredParameters([weight]):
            rows = weight.data.clone()
    else:
        rows = weight.data.clone()
    if os.environ.get("RANK", "0") == "0":
        torch.save({"rows": rows, "ids": new.ids}, os.environ["DUMP_ROWS"])
setup.embed_new_tokens = embed_new_tokens
"""


@pytest.fixture(scope="module")
def token_runs(tmp_path_factory):
    """A tied tiny model with 3 spare rows; 4 new tokens (so it grows); chats whose answers start with <A>. One
    process trains 12 steps saving at 6; 2-process ZeRO-3 the same; a third run resumes the first at step 6."""
    root = tmp_path_factory.mktemp("tokens")
    tokenizer = build_tokenizer("chatml")
    model_dir = root / "tied"
    tiny(tokenizer, tied=True, spare_rows=3).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    lines = (REPO / "data" / "demo_train.jsonl").read_text().splitlines()[:24]
    chats = []
    for line in lines:
        messages = json.loads(line)["messages"]
        messages[-1]["content"] = "<A> " + messages[-1]["content"]
        chats.append(messages)
    write_chats(root / "data", "marked", chats)
    args = [
        "configs/demo.yaml",
        f"model_name_or_path={model_dir}",
        "dataset=marked",
        f"dataset_dir={root / 'data'}",
        "eval_dataset=[]",
        "eval_steps=",
        "add_special_tokens=[<A>, <|BACKTRACK|>]",
        "add_tokens=[<B>, <C>]",
        "max_steps=12",
        "per_device_train_batch_size=2",
        "learning_rate=5e-3",
        "lr_scheduler_type=constant",
        "warmup_ratio=0",
        "logging_steps=1",
        "save_steps=6",
    ]
    runs = {}
    zero3 = ["per_device_train_batch_size=1", "max_steps=1"]  # its rows as initialised are what is compared
    for name, launch, extra in (("one", None, []), ("zero3", "cpu_zero3.yaml", zero3)):
        env = {"DUMP_ROWS": str(root / f"{name}.pt")}
        run_sft(
            [*args, *extra, f"output_dir={root / name}"], accelerate_config=launch, env=env, inject=DUMP_INITIAL_ROWS
        )
        runs[name] = root / name
    resumed = root / "resumed"
    resumed.mkdir()
    shutil.copytree(runs["one"] / "checkpoint-6", resumed / "checkpoint-6")
    run_sft([*args, f"output_dir={resumed}", "resume_from_checkpoint=latest"])
    return {"root": root, "runs": runs, "resumed": resumed, "model_dir": model_dir}


@pytest.mark.slow
def test_zero3_initialises_exactly_the_one_process_rows(token_runs):
    one = torch.load(token_runs["root"] / "one.pt")
    zero3 = torch.load(token_runs["root"] / "zero3.pt")
    assert one["ids"] == zero3["ids"] == {"<A>": 761, "<|BACKTRACK|>": 762, "<B>": 763, "<C>": 764}
    # 761 ids + 3 spare rows do not fit 4 new ids: grown to 765, rounded to the model's own padding (764 = 4 x 191)
    assert one["rows"].shape[0] == 768
    assert torch.equal(one["rows"], zero3["rows"])


@pytest.mark.slow
def test_new_rows_train_save_reload_and_generate(token_runs):
    out = token_runs["runs"]["one"]
    initial = torch.load(token_runs["root"] / "one.pt")["rows"]
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer.convert_tokens_to_ids(["<A>", "<|BACKTRACK|>", "<B>", "<C>"])
    assert ids == [761, 762, 763, 764]
    assert tokenizer("<A> x<|BACKTRACK|>", add_special_tokens=False)["input_ids"][0] == 761
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()) and model.config.vocab_size == 768
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    trained = model.get_input_embeddings().weight.detach()
    assert not torch.allclose(trained[761], initial[761])  # <A> appears in every answer: its row was trained
    summary = json.loads((out / "run_summary.json").read_text())["new_tokens"]
    assert summary["embedding_rows"] == {"before": 764, "after": 768} and summary["init"] == "noise_init"
    assert [t["token"] for t in summary["added"]] == ["<A>", "<|BACKTRACK|>", "<B>", "<C>"]
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Tom has 3 apples. How many?"}],
        add_generation_prompt=True,
        return_dict=True,
        return_tensors="pt",
    )
    generated = model.generate(**chat, max_new_tokens=3, do_sample=False)[0, chat["input_ids"].shape[1] :]
    assert generated[0].item() == 761  # it learned to open every answer with the new token


@pytest.mark.slow
def test_resume_with_new_tokens_is_exact(token_runs):
    full, resumed = token_runs["runs"]["one"], token_runs["resumed"]
    rows = [r for r in read_metrics(full) if r["step"] > 6]
    assert [(r["step"], r.get("loss")) for r in read_metrics(resumed)] == [(r["step"], r.get("loss")) for r in rows]
    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_token_listed_twice_exits_2_naming_it(tmp_path, tiny_model_dir):
    result = run_sft(
        [
            "configs/demo.yaml",
            f"model_name_or_path={tiny_model_dir}",
            f"output_dir={tmp_path / 'out'}",
            "add_special_tokens=[<X>]",
            "add_tokens=[<X>]",
        ],
        expect_code=2,
    )
    assert "'<X>' is listed twice" in result.stderr and not (tmp_path / "out").exists()


# --- the researchers' own setups: combined init, a reused reserved token, aliases ------------------------------

WORDS = ["delete", "remove", "undo", "erase", "back"]


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_combined_init_equals_its_reference(tmp_path, tied):
    tokenizer = build_tokenizer("chatml")
    model = tiny(tokenizer, tied)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    entry = {"description": "take back the previous word", "words": WORDS, "description_weight": 0.7}
    path = tmp_path / "tokens.yaml"
    path.write_text(yaml.safe_dump({"<|BACKTRACK|>": entry}))
    config = config_for(tmp_path, new_special_tokens_config=str(path), init_special_tokens="combined")
    new = add_tokens(tokenizer, config)
    embed_new_tokens(model, tokenizer, new, seed=5)
    (index,) = new.ids.values()
    # The reference, from the rows before: 0.7 x the description's mean + 0.3 x the words' mean + N(0, 1/64) noise
    # (the first draw of a generator seeded 5; untied output rows: the same value with the next, independent draw).
    embed = before["model.embed_tokens.weight"]
    description = embed[tokenizer(entry["description"], add_special_tokens=False)["input_ids"]].mean(dim=0)
    word_ids = list(dict.fromkeys(i for w in WORDS for i in tokenizer(w, add_special_tokens=False)["input_ids"]))
    value = 0.7 * description + 0.3 * embed[word_ids].mean(dim=0)
    generator = torch.Generator().manual_seed(5)
    first, second = (torch.randn(1, 64, generator=generator)[0] / 8 for _ in range(2))
    torch.testing.assert_close(model.get_input_embeddings().weight[index], value + first, atol=1e-6, rtol=0)
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    else:
        torch.testing.assert_close(model.lm_head.weight[index], value + second, atol=1e-6, rtol=0)


def test_a_reserved_token_is_reused_initialised_and_an_alias_stands_for_it(tmp_path):
    tokenizer = build_tokenizer("chatml")
    tokenizer.add_special_tokens({"extra_special_tokens": ["<|reserved_0|>"]}, replace_extra_special_tokens=False)
    tokenizer.extra_special_tokens = []  # like Llama-3's reserved tokens: added, special, not named by the tokenizer
    reserved = tokenizer.convert_tokens_to_ids("<|reserved_0|>")
    model = tiny(tokenizer, tied=False)
    before = model.get_input_embeddings().weight.detach().clone()
    config = config_for(
        tmp_path,
        backtrack_token="<|BACKTRACK|>",
        token_aliases={"<|BACKTRACK|>": "<|reserved_0|>"},
        add_special_tokens=["<|im_end|>"],  # the tokenizer's own (eos, in the template): left alone
    )
    new = add_tokens(tokenizer, config)
    assert new.ids == new.reused == {"<|reserved_0|>": reserved} and new.existing == {
        "<|im_end|>": tokenizer.eos_token_id
    }
    assert len(tokenizer) == reserved + 1  # nothing added
    embed_new_tokens(model, tokenizer, new, seed=0)
    assert not torch.equal(model.get_input_embeddings().weight[reserved], before[reserved])  # initialised
    others = [i for i in range(before.shape[0]) if i != reserved]
    assert torch.equal(model.get_input_embeddings().weight[others], before[others])
    # The noise_init mean leaves out the row it replaces.
    expected = before[others].mean(dim=0)
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 64, generator=generator)[0] / 8
    torch.testing.assert_close(model.get_input_embeddings().weight[reserved], expected + noise, atol=1e-6, rtol=0)
    # The alias in data becomes the token (training_detail offsets follow); a generation shows the alias again.
    messages = [
        {"role": "user", "content": "2 + 3?"},
        {
            "role": "assistant",
            "content": "2 + 3 = 6<|BACKTRACK|>5",
            "training_detail": [{"begin_offset": 8, "end_offset": 8, "train": False}],
        },
    ]
    aliased = apply_aliases(messages, tuple(config.data.token_aliases.items()))
    content = aliased[1]["content"]
    assert content == "2 + 3 = 6<|reserved_0|>5" and aliased[1]["training_detail"][0]["begin_offset"] == 8
    out = tokenize_chat(tokenizer, aliased, backtrack_token="<|reserved_0|>", mask_backtracked=True)
    assert reserved in out["input_ids"] and out["labels"][out["input_ids"].index(reserved)] == reserved  # trained
    facts = token_facts(tokenizer, "<|reserved_0|>", aliases=config.data.token_aliases)
    six, five = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("= 6", " 5"))
    generated = [*six, reserved, *five]
    decoded = decode(tokenizer, generated, facts)
    assert decoded.raw == "= 6<|BACKTRACK|> 5" and decoded.prediction == "= 5"
    assert apply_backtracks(generated, reserved) == [*six[:-1], *five]
