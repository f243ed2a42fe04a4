"""Generation evaluation: the metrics against hand-computed cases, identical predictions in 1 process, DDP and
ZeRO-3, generation evaluation during training that leaves training untouched, the demo's evaluation, stopping at
the turn end after reload, and bad input named."""

from __future__ import annotations

import copy
import json
import re

import pytest
from conftest import REPO, read_metrics, run_sft, write_chats

from llmhalluc.data.facts import token_facts
from llmhalluc.eval.generation import decode
from llmhalluc.eval.metrics import abstains, aggregate, final_answer, normalize_answer, score, squad_f1
from llmhalluc.models.tiny import build_tokenizer


def test_squad_v2_normalisation_several_golds_and_abstention():
    assert normalize_answer("The  Cat, sat!") == "cat sat"  # lower, punctuation, articles, spaces (official)
    assert normalize_answer("an apple a day") == "apple day"
    assert squad_f1("the blue box", "a blue box in Oslo") == pytest.approx(2 * (2 / 2) * (2 / 4) / (2 / 2 + 2 / 4))
    assert squad_f1("", "") == 1.0 and squad_f1("x", "") == 0.0
    golds = ["Oslo", "the city of Oslo"]
    assert score("squad_v2", "city of oslo", golds, True, "I don't know.").exact == 1.0  # max over every gold
    partial = score("squad_v2", "in Oslo", golds, True, "I don't know.")
    assert partial.exact == 0.0 and partial.f1 == pytest.approx(max(squad_f1("in Oslo", g) for g in golds))
    for abstention in ("I don't know.", "i don't know", "  I DON'T KNOW!  ", ""):
        assert abstains(abstention, "I don't know.")
    assert not abstains("Unknown", "I don't know.") and not abstains("Oslo", "I don't know.")
    # Unanswerable: an abstention is the right (empty) answer; content is a hallucination.
    right = score("squad_v2", "I don't know.", [""], False, "I don't know.")
    wrong = score("squad_v2", "Lima", [""], False, "I don't know.")
    assert (right.exact, right.abstained, wrong.exact, wrong.abstained) == (1.0, True, 0.0, False)
    over = score("squad_v2", "I don't know", ["Oslo"], True, "I don't know.")
    metrics = aggregate("squad_v2", [right, wrong, over, partial], [False, False, True, True])
    assert metrics["abstention_rate"] == 0.5 and metrics["hallucination_rate"] == 0.5
    assert metrics["over_abstention_rate"] == 0.5 and metrics["no_ans_exact"] == 0.5
    assert metrics["has_ans_exact"] == 0.0 and metrics["has_ans_f1"] == pytest.approx(partial.f1 / 2)
    assert metrics["exact"] == 0.25 and (metrics["answerable"], metrics["unanswerable"]) == (2, 2)


def test_exact_match_and_gsm8k_with_unanswerable_questions():
    assert score("exact_match", "The Answer.", ["answer"], None, "").correct
    abstain = "The problem does not say how many. I don't know."
    refs_answerable, refs_not = ["Work.\n#### 9"], ["It cannot be known. I don't know."]
    results = [
        score("gsm8k", "#### 9", refs_answerable, True, "I don't know."),
        score("gsm8k", abstain, refs_answerable, True, "I don't know."),  # over-abstention
        score("gsm8k", abstain, refs_not, False, "I don't know."),  # the right answer
        score("gsm8k", "#### 4", refs_not, False, "I don't know."),  # a hallucinated answer
    ]
    metrics = aggregate("gsm8k", results, [True, True, False, False])
    assert metrics["accuracy_strict"] == 0.5 and metrics["abstention_rate"] == 0.5
    assert metrics["hallucination_rate"] == 0.5 and metrics["over_abstention_rate"] == 0.5


def test_generations_are_scored_after_their_backtracks():
    tokenizer = build_tokenizer("chatml")
    tokenizer.add_special_tokens({"extra_special_tokens": ["<|BACKTRACK|>"]}, replace_extra_special_tokens=False)
    bt, end = tokenizer.convert_tokens_to_ids("<|BACKTRACK|>"), tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = tokenizer("#### 12", add_special_tokens=False)["input_ids"]
    generated = [*ids, bt, *tokenizer(" 13", add_special_tokens=False)["input_ids"], end, 5, 6]
    assert tokenizer.convert_ids_to_tokens(ids) == ["####", "Ġ12"]
    out = decode(tokenizer, generated, token_facts(tokenizer, "<|BACKTRACK|>"))
    assert out.backtracks == 1 and out.raw == "#### 12<|BACKTRACK|> 13"  # cut at the stop token
    assert out.prediction == "#### 13"  # what the model meant
    assert final_answer(out.prediction) == "13" and final_answer(out.unapplied) == "12"
    # A token the data writes as an alias is shown as that alias in the raw text.
    aliased = decode(tokenizer, generated, token_facts(tokenizer, "<|BACKTRACK|>", aliases={"<BT>": "<|BACKTRACK|>"}))
    assert aliased.raw == "#### 12<BT> 13" and aliased.prediction == "#### 13"


# --- launched ---------------------------------------------------------------------------------------------


def eval_args(tiny_model_dir, out, *extra):
    return [
        "configs/demo.yaml",
        f"model_name_or_path={tiny_model_dir}",
        f"output_dir={out}",
        "max_samples=11",  # 11 prompts over 2 ranks: uneven shards
        "max_new_tokens=24",
        "generation_batch_size=4",
        "eval_tag=t",
        *extra,
    ]


def run_eval(args, launch=None, expect_code=0):
    """train/eval.py: its ranks forked for a 2-process config, else its main() in this process."""
    return run_sft(args, accelerate_config=launch, expect_code=expect_code, script="eval.py")


@pytest.mark.slow
def test_one_process_ddp_and_zero3_evaluations_are_identical(tmp_path, tiny_model_dir):
    outputs = {}
    for name, launch in (("one", None), ("ddp", "cpu_ddp.yaml"), ("zero3", "cpu_zero3.yaml")):
        out = tmp_path / name
        run_eval(eval_args(tiny_model_dir, out), launch)
        outputs[name] = out / "eval" / "t"
    reference = (outputs["one"] / "demo_eval" / "predictions.jsonl").read_text()
    rows = [json.loads(line) for line in reference.splitlines()]
    assert [r["index"] for r in rows] == list(range(11))  # every example once, in dataset order
    assert set(rows[0]) == {
        "index",
        "prompt",
        "prediction",
        "raw_prediction",
        "references",
        "answerable",
        "correct",
        "abstained",
        "backtracks",
    }
    for name in ("ddp", "zero3"):
        assert (outputs[name] / "demo_eval" / "predictions.jsonl").read_text() == reference, name
        written = [json.loads((outputs[n] / "results.json").read_text()) for n in (name, "one")]
        assert written[0]["results"] == written[1]["results"] and written[0]["generation"] == written[1]["generation"]
    results = json.loads((outputs["one"] / "results.json").read_text())["results"]["demo_eval"]
    assert results["count"] == 11 and {"accuracy_strict", "accuracy_flexible"} <= set(results)


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory, tiny_model_dir):
    """A short demo training with generation evaluation every 3 steps, and the same without it."""
    root = tmp_path_factory.mktemp("demo")
    args = [
        "configs/demo.yaml",
        f"model_name_or_path={tiny_model_dir}",
        "max_steps=6",
        "logging_steps=1",
        "eval_steps=",
        "save_steps=",
        "max_new_tokens=32",
    ]
    run_sft([*args, f"output_dir={root / 'plain'}"])
    run_sft([*args, f"output_dir={root / 'gen'}", "generation_eval_steps=3", "generation_eval_samples=6"])
    return root


@pytest.mark.slow
def test_generation_eval_during_training_logs_rows_and_leaves_training_untouched(demo_runs):
    gen = read_metrics(demo_runs / "gen")
    rows = [r for r in gen if "gen/demo_eval/count" in r]
    assert [r["step"] for r in rows] == [3, 6] and all(r["gen/demo_eval/count"] == 6 for r in rows)
    assert all("gen/demo_eval/accuracy_strict" in r and "gen/demo_eval/abstention_rate" in r for r in rows)
    losses = [(r["step"], r["loss"], r["grad_norm"]) for r in gen if "loss" in r]
    assert losses == [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(demo_runs / "plain") if "loss" in r]


@pytest.mark.slow
def test_the_demo_evaluation_reports_accuracy_and_abstention(demo_runs):
    out = demo_runs / "gen"
    result = run_eval(["configs/demo.yaml", f"output_dir={out}", "max_new_tokens=32", "eval_tag=demo"])
    assert f"evaluating {out} on demo_eval" in result.stdout  # the trained model in output_dir
    results = json.loads((out / "eval" / "demo" / "results.json").read_text())["results"]["demo_eval"]
    assert results["count"] == 48 and results["unanswerable"] == 3 and results["answerable"] == 45
    for key in (
        "accuracy_strict",
        "accuracy_flexible",
        "abstention_rate",
        "hallucination_rate",
        "over_abstention_rate",
    ):
        assert 0.0 <= results[key] <= 1.0, key
    predictions = out / "eval" / "demo" / "demo_eval" / "predictions.jsonl"
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert len(rows) == 48 and sum(r["answerable"] is False for r in rows) == 3
    assert "| demo_eval | abstention_rate |" in result.stdout


@pytest.mark.slow
def test_a_turn_end_that_is_not_eos_stops_generation_after_reload(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmhalluc.models.tiny import write_tiny_model

    base = write_tiny_model(tmp_path / "phi3", template="phi3")  # eos <|endoftext|>, turn end <|end|>
    chats = [[{"role": "user", "content": f"Say ok {i}."}, {"role": "assistant", "content": "ok"}] for i in range(16)]
    write_chats(tmp_path / "data", "ok", chats)
    out = tmp_path / "out"
    run_sft(
        [
            "configs/demo.yaml",
            f"model_name_or_path={base}",
            "dataset=ok",
            "eval_dataset=ok",
            f"dataset_dir={tmp_path / 'data'}",
            "eval_steps=",
            "save_steps=",
            "max_steps=40",
            "learning_rate=1e-2",
            "per_device_train_batch_size=4",
            f"output_dir={out}",
        ]
    )
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    assert end != tokenizer.eos_token_id and end in model.generation_config.eos_token_id
    assert "max_new_tokens" not in json.loads((out / "generation_config.json").read_text())
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Say ok 3."}], add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    generated = model.generate(**chat, max_new_tokens=20, do_sample=False)[0, chat["input_ids"].shape[1] :].tolist()
    assert end in generated and generated.index(end) == len(generated) - 1 < 19  # stopped at the turn end
    data = f"dataset_dir={tmp_path / 'data'}"
    result = run_eval(["configs/demo.yaml", f"output_dir={out}", "eval_dataset=ok", data, "eval_tag=ok"])
    rows = [json.loads(line) for line in (out / "eval" / "ok" / "ok" / "predictions.jsonl").read_text().splitlines()]
    assert all(r["raw_prediction"] == "ok" and r["correct"] for r in rows), rows[:2]
    assert "exact_match | 1.0000" in result.stdout


def test_bad_evaluation_input_is_named_before_any_model_loads(tmp_path, tiny_model_dir):
    from llmhalluc.config import load_config
    from llmhalluc.errors import UserError
    from llmhalluc.eval.standalone import evaluate_model

    info = json.loads((REPO / "data" / "dataset_info.json").read_text())
    info["scored_oddly"] = {**info["demo_eval"], "metric": "bleu", "file_name": str(REPO / "data" / "demo_eval.jsonl")}
    info["no_answers"] = {"file_name": "no_answers.jsonl", "formatting": "openai"}
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    (tmp_path / "no_answers.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    base = [f"model_name_or_path={tiny_model_dir}", f"output_dir={tmp_path / 'out'}", f"dataset_dir={tmp_path}"]
    cases = {
        "unknown metric 'bleu'": ["eval_dataset=scored_oddly"],
        "has no examples with references to score (first reason: no_assistant_turn)": ["eval_dataset=no_answers"],
        "engine: vllm needs a CUDA GPU": ["engine=vllm"],
    }
    for message, extra in cases.items():
        with pytest.raises(UserError, match=re.escape(message)):
            evaluate_model(load_config(REPO / "configs" / "demo.yaml", [*base, *extra]))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_bad_evaluation_input_exits_2_with_one_line(tmp_path, tiny_model_dir):
    result = run_eval(
        ["configs/demo.yaml", f"model_name_or_path={tiny_model_dir}", f"output_dir={tmp_path}", "engine=vllm"],
        expect_code=2,
    )
    assert result.stderr.strip() == "error: engine: vllm needs a CUDA GPU; use engine: hf on this machine"


def test_generation_settings_that_cannot_work_are_refused_with_the_config(monkeypatch, tiny_model_dir):
    from llmhalluc.config import load_config
    from llmhalluc.errors import ConfigError

    base = [f"model_name_or_path={tiny_model_dir}", "output_dir=x"]
    with pytest.raises(ConfigError, match="engine: vllm with generation_eval_steps: evaluation during training"):
        load_config(REPO / "configs" / "demo.yaml", [*base, "engine=vllm", "generation_eval_steps=10"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="engine: vllm runs in one process, but 2 were launched"):
        load_config(REPO / "configs" / "demo.yaml", [*base, "engine=vllm"], purpose="eval")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ConfigError, match="missing required key eval_dataset"):
        load_config(REPO / "configs" / "demo.yaml", [*base, "eval_dataset=[]"], purpose="eval")
    with pytest.raises(ConfigError, match="missing required key dataset"):
        load_config(REPO / "configs" / "demo.yaml", [*base, "dataset=[]"])
    load_config(REPO / "configs" / "demo.yaml", [*base, "dataset=[]"], purpose="eval")  # evaluating needs none


def test_a_template_without_an_end_of_turn_token_is_named(tokenizer):
    from llmhalluc.data.facts import token_facts
    from llmhalluc.errors import TemplateError

    plain = copy.deepcopy(tokenizer)
    plain.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(TemplateError, match="does not end an assistant turn with a special token"):
        token_facts(plain)
    facts = token_facts(tokenizer)
    assert facts.stop_ids == [tokenizer.convert_tokens_to_ids("<|im_end|>")]
