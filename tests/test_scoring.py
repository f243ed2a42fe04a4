"""Scoring the researchers' answers: final-answer markers and number normalisation, explicit unanswerable questions,
SQuAD v2 on their own prompts, few-shot prompts (1 process and DDP), BLEU/ROUGE against the libraries, evaluations
that never overwrite each other, and a tiny model overfitted on rows in their format scored by train/eval.py and by
lm-eval through the llmhalluc-hf model type, both with backtracks applied."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import REPO, run_sft, write_lm_eval_task

from llmhalluc.config import load_config
from llmhalluc.errors import DataError
from llmhalluc.eval.metrics import abstains_from_solving, final_answer, last_number, normalize_number, overlap_scores
from llmhalluc.eval.references import load_eval_set

BT = "<|BACKTRACK|>"
MATH = "Let's think step by step. Put your final answer at the end with 'The answer is: .'"


def test_final_answer_markers_and_number_normalisation():
    assert final_answer("3 + 15 = 18.\nThe answer is: 18") == "18"
    assert final_answer("so the answer is 18.") == "18"  # any case; the colon is optional (their regex)
    assert final_answer("Work.\n#### 1,200") == "1200"
    for written in ("$1,200.00", "1200.", "1,200 dollars", "$ 1200", "1200.0"):
        assert final_answer(f"The answer is: {written}") == "1200", written
    assert final_answer("The answer is: 2.50") == "2.50" and final_answer("The answer is: -3") == "-3"
    # The first marker in the text counts, whichever it is.
    assert final_answer("#### 5\nThe answer is: 6") == "5" and final_answer("The answer is: 6\n#### 5") == "6"
    assert final_answer("The answer is: 4, or The answer is: 9") == "4"
    assert final_answer("The answer is unknown. #### 7") == "7"  # a marker without a number is passed over
    assert final_answer("The answer is: 18", markers=("####",)) is None  # markers are per dataset
    assert final_answer("Final: 18", markers=("Final:",)) == "18"
    assert final_answer("no marker 18") is None and last_number("no marker 18") == "18"
    assert last_number("costs $12 then 1,500 more.") == "1500" and last_number("none") is None
    assert normalize_number(" -3.0 ") == "-3" and normalize_number("+7") == "7"


def test_unanswerable_only_when_the_reference_says_so(tmp_path):
    rows = [
        {"query": "Tom has 3 apples and gets 15 more. How many?", "response": "3 + 15 = 18.\nThe answer is: 18"},
        {"query": "Tom has some apples. How many?", "response": "It does not say. I don't know."},
        {"query": "Ann has 2 pears.", "response": "She has 2.\n#### 2"},
    ]
    data = write_users_data(tmp_path, {"users": rows})
    config = load_config(REPO / "configs" / "demo.yaml", [f"dataset_dir={data}", "eval_dataset=users"], "eval")
    eval_set = load_eval_set("users", config.data)
    assert [item.answerable for item in eval_set.items] == [True, False, True]
    assert eval_set.items[0].prompt[-1]["content"] == f"{rows[0]['query']}\n{MATH}"  # their placement
    # A model that writes nothing does not abstain correctly on an answerable question, and is no answer either.
    assert abstains_from_solving("", "I don't know.") and final_answer("") is None
    rows.append({"query": "Bob has 4 cars.", "response": "He has four cars."})  # no readable answer, no abstention
    data = write_users_data(tmp_path, {"users": rows})
    with pytest.raises(DataError, match=r"eval dataset 'users' row 3: its reference has no final answer"):
        load_eval_set("users", config.data)


def test_squad_v2_scoring_on_the_researchers_own_prompt(tmp_path):
    rows = [
        {"query": "Context: Oslo is in Norway.\nQuestion: Where is Oslo?", "response": "Norway"},
        {"query": "Context: Oslo is in Norway.\nQuestion: Where is Lima?", "response": "unanswerable"},
    ]
    data = write_users_data(tmp_path, {"qa": rows}, metric="squad_v2", instruction="qa")
    overrides = [f"dataset_dir={data}", "eval_dataset=qa", "abstention_answer=unanswerable"]
    config = load_config(REPO / "configs" / "demo.yaml", overrides, "eval")
    eval_set = load_eval_set("qa", config.data)
    assert [(i.references, i.answerable) for i in eval_set.items] == [(["Norway"], True), ([""], False)]
    from llmhalluc.eval.metrics import aggregate, score

    scored = [
        score("squad_v2", "Norway.", ["Norway"], True, "unanswerable"),
        score("squad_v2", "Unanswerable", [""], False, "unanswerable"),
    ]
    metrics = aggregate("squad_v2", scored, [True, False])
    assert metrics["exact"] == 1.0 and metrics["abstention_rate"] == 1.0
    # lm-eval's squadv2 counts only an empty output as abstaining: the same answers score 0.5 there.
    assert metrics["exact_empty_only"] == 0.5


def test_overlap_metrics_equal_the_libraries_called_directly():
    import sacrebleu
    from rouge_score import rouge_scorer

    predictions = ["The cat sat on the mat.", "It is 12.\nThe answer is: 12", ""]
    references = ["A cat sat on the mat.", "It is 13.\nThe answer is: 13", "nothing"]
    scores = overlap_scores(["bleu", "rouge"], predictions, references)
    assert scores["bleu"] == sacrebleu.corpus_bleu(predictions, [references]).score
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    for kind in ("rouge1", "rouge2", "rougeL"):
        direct = [scorer.score(r, p)[kind].fmeasure for p, r in zip(predictions, references)]
        assert scores[kind] == sum(direct) / len(direct), kind
    assert 0 < scores["bleu"] < 100 and 0 < scores["rouge1"] < 1


def test_few_shot_prompts_hold_k_distinct_solved_examples_never_the_evaluated_row(tmp_path):
    data = write_users_data(tmp_path, {"users": users_rows(8)})
    overrides = [f"dataset_dir={data}", "eval_dataset=users", "dataset=users", "num_fewshot=3"]
    config = load_config(REPO / "configs" / "demo.yaml", overrides, "eval")
    eval_set = load_eval_set("users", config.data, seed=0, generation=config.generation)
    for item in eval_set.items:
        assert_shots(item.prompt, item.shots, k=3, evaluated=item.index)
    again = load_eval_set("users", config.data, seed=0, generation=config.generation)
    assert [i.prompt for i in again.items] == [i.prompt for i in eval_set.items]  # seeded
    other = load_eval_set("users", config.data, seed=1, generation=config.generation)
    assert [i.shots for i in other.items] != [i.shots for i in eval_set.items]
    with pytest.raises(DataError, match="num_fewshot: 8 examples asked for, but fewshot_dataset 'users' has 7"):
        load_eval_set(
            "users",
            config.data,
            generation=load_config(REPO / "configs" / "demo.yaml", [*overrides, "num_fewshot=8"], "eval").generation,
        )


def assert_shots(prompt: list[dict], shots: list[int], k: int, evaluated: int) -> None:
    """k user/assistant pairs before the evaluated question, k distinct rows, none of them the evaluated one."""
    assert [m["role"] for m in prompt] == ["user", "assistant"] * k + ["user"]
    assert len(set(shots)) == k and evaluated not in shots
    questions = [m["content"] for m in prompt[:-1:2]]
    assert len(set(questions)) == k and prompt[-1]["content"] not in questions
    assert all(final_answer(m["content"]) is not None for m in prompt[1:-1:2])  # solved


@pytest.mark.slow
def test_few_shot_prompts_are_the_same_in_one_process_and_ddp(tmp_path, tiny_model_dir):
    data = write_users_data(tmp_path, {"users": users_rows(8)})
    args = [
        "configs/demo.yaml",
        f"model_name_or_path={tiny_model_dir}",
        f"dataset_dir={data}",
        "eval_dataset=users",
        "dataset=users",
        "num_fewshot=2",
        "max_new_tokens=1",
        "eval_tag=shots",
    ]
    records = {}
    for name, launch in (("one", None), ("ddp", "cpu_ddp.yaml")):
        run_sft([*args, f"output_dir={tmp_path / name}"], accelerate_config=launch, script="eval.py")
        path = tmp_path / name / "eval" / "shots" / "users" / "predictions.jsonl"
        records[name] = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["prompt"], r["shots"]) for r in records["one"]] == [(r["prompt"], r["shots"]) for r in records["ddp"]]
    rows = users_rows(8)
    for record in records["one"]:
        # The rendered prompt: 2 solved examples as prior turns, then the evaluated question.
        assert record["prompt"].count("<|im_start|>assistant\n") == 3
        shown = [rows[i]["query"] for i in record["shots"]]
        assert all(record["prompt"].count(q + "\n") == 1 for q in shown)
        assert record["prompt"].count(rows[record["index"]]["query"] + "\n") == 1


# --- a tiny model overfitted on rows in the researchers' format -------------------------------------------------


def users_rows(count: int) -> list[dict]:
    return [
        {
            "query": f"Tom has {a} apples and gets {a + 2} more. How many?",
            "response": f"{a} + {a + 2} = {2 * a + 2}.\nThe answer is: {2 * a + 2}",
        }
        for a in range(1, count + 1)
    ]


def write_users_data(folder, datasets: dict, metric: str = "gsm8k", instruction: str = "math"):
    """Their alpaca entries: query/response columns, a named fixed instruction, the metric (and for GSM8K-style
    answers their converter, which puts the instruction after the question)."""
    folder.mkdir(parents=True, exist_ok=True)
    texts = {"math": MATH, "qa": 'Answer from the context, or respond with "unanswerable".'}
    (folder / "instructions.json").write_text(json.dumps(texts))
    columns = {"prompt": instruction, "query": "query", "response": "response"}
    info = {}
    for name, rows in datasets.items():
        (folder / f"{name}.json").write_text(json.dumps(rows, indent=1))
        info[name] = {"file_name": f"{name}.json", "columns": columns, "metric": metric}
        if metric == "gsm8k":
            info[name]["converter"] = "gsm8k"
    (folder / "dataset_info.json").write_text(json.dumps(info, indent=1))
    return folder


OVERFIT_TRAIN = [
    row
    for a in range(1, 5)
    for row in (
        # The final answer written wrong, taken back and written right: 8 before the backtracks, 7 after.
        {"query": f"Tom has {a} apples. How many apples?", "response": f"The answer is: 8{BT} 7"},
        {"query": f"Ann has {a} pears. How many pears?", "response": "The answer is: 12"},
    )
]
OVERFIT_EVAL = [*OVERFIT_TRAIN, {"query": "Ann has 9 pears. How many pears?", "response": "The answer is: 13"}]


@pytest.fixture(scope="module")
def overfit(tmp_path_factory, tiny_model_dir):
    """The backtrack demo's config trained on their rows (plain SFT, backtracks trained) until it recites them,
    then train/eval.py on the training rows and one unseen question."""
    root = tmp_path_factory.mktemp("overfit")
    data = write_users_data(root / "data", {"users": OVERFIT_TRAIN, "users_eval": OVERFIT_EVAL})
    out = root / "out"
    common = ["configs/demo_backtrack.yaml", f"dataset_dir={data}", "dataset=users", "eval_dataset=users_eval"]
    run_sft(
        [
            *common,
            f"model_name_or_path={tiny_model_dir}",
            "mask_backtracked=false",
            "eval_steps=",
            "save_steps=",
            "max_steps=100",
            "learning_rate=1e-2",
            "per_device_train_batch_size=8",
            f"output_dir={out}",
        ]
    )
    evaluation = [*common, f"output_dir={out}", "max_new_tokens=24", "overlap_metrics=[bleu,rouge]"]
    result = run_sft([*evaluation, "eval_tag=first"], script="eval.py")
    return {"root": root, "data": data, "out": out, "evaluation": evaluation, "stdout": result.stdout}


def their_strict(text: str) -> str | None:
    """The researchers' gsm8k_simple strict extraction, written independently of llmhalluc.eval.metrics."""
    found = re.search(r"[Tt]he answer is[:\s]+(-?[$0-9\.\,]+)", text) or re.search(r"####\s*(-?[0-9\.\,]+)", text)
    return found.group(1).replace(",", "").replace("$", "").rstrip(".") if found else None


def their_flexible(text: str) -> str | None:
    found = re.findall(r"(-?[$0-9.,]{2,})|(-?[0-9]+)", text)
    if not found:
        return None
    return "".join(found[-1]).replace(",", "").replace("$", "").rstrip(".")


def after_backtracks(tokenizer, text: str) -> str:
    """A text's ids with every backtrack token deleting itself and the id before it, decoded."""
    bt, kept = tokenizer.convert_tokens_to_ids(BT), []
    for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
        if token != bt:
            kept.append(token)
        elif kept:
            kept.pop()
    return tokenizer.decode(kept, skip_special_tokens=True, clean_up_tokenization_spaces=False)


@pytest.mark.slow
def test_the_overfitted_model_is_scored_as_an_independent_recomputation(overfit):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(overfit["out"])
    written = json.loads((overfit["out"] / "eval" / "first" / "results.json").read_text())
    results = written["results"]["users_eval"]
    records = [
        json.loads(line)
        for line in (overfit["out"] / "eval" / "first" / "users_eval" / "predictions.jsonl").read_text().splitlines()
    ]
    assert results["count"] == len(OVERFIT_EVAL) and "unanswerable" not in results  # every row answerable
    assert all(r["answerable"] for r in records)
    golds = [their_strict(after_backtracks(tokenizer, row["response"])) for row in OVERFIT_EVAL]
    assert golds == ["7", "12"] * 4 + ["13"]
    predictions = [r["prediction"] for r in records]
    strict = [their_strict(p) == g for p, g in zip(predictions, golds)]
    flexible = [their_flexible(p) == g for p, g in zip(predictions, golds)]
    assert results["accuracy_strict"] == sum(strict) / len(strict)
    assert results["accuracy_flexible"] == sum(flexible) / len(flexible)
    # It recites its training rows (the unseen question it gets wrong), backtracks included.
    assert strict == [True] * 8 + [False], predictions
    assert [r["backtracks"] for r in records] == [1, 0] * 4 + [0]
    assert results["correct_before_backtracks"] == 4 / 9 and results["correct_after_backtracks"] == 8 / 9
    # BLEU and ROUGE against the references as they read after their backtracks.
    references = [after_backtracks(tokenizer, row["response"]) for row in OVERFIT_EVAL]
    assert [r["references"] for r in records] == [[t] for t in references]
    assert results["bleu"] == overlap_scores(["bleu"], predictions, references)["bleu"]
    # results.json says what was evaluated, how, and with which config.
    assert written["model"] == str(overfit["out"]) and written["eval_tag"] == "first"
    assert written["generation"]["max_new_tokens"] == 24 and written["config"]["dataset_dir"] == str(overfit["data"])


@pytest.mark.slow
def test_a_new_evaluation_never_overwrites_an_earlier_one(overfit):
    before = (overfit["out"] / "eval" / "first" / "results.json").read_text()
    result = run_sft([*overfit["evaluation"], "eval_tag=first"], script="eval.py", expect_code=2)
    assert "eval_tag: " in result.stderr and "already holds an evaluation" in result.stderr
    run_sft(overfit["evaluation"], script="eval.py")  # no tag: the start time names the folder
    (stamped,) = {p.name for p in (overfit["out"] / "eval").iterdir()} - {"first"}
    assert re.fullmatch(r"\d{8}-\d{6}(-\d+)?", stamped)
    assert (overfit["out"] / "eval" / "first" / "results.json").read_text() == before


@pytest.mark.slow
def test_lm_eval_with_backtracks_applied_returns_train_eval_predictions(overfit, tmp_path):
    """A local generate_until task over the same questions: llmhalluc-hf's outputs, under --apply_chat_template,
    greedy, equal train/eval.py's predictions after backtracks, and its prompts equal train/eval.py's prompts."""
    pytest.importorskip("lm_eval")
    records = [
        json.loads(line)
        for line in (overfit["out"] / "eval" / "first" / "users_eval" / "predictions.jsonl").read_text().splitlines()
    ]
    config = load_config(
        REPO / "configs" / "demo_backtrack.yaml",
        [f"dataset_dir={overfit['data']}", "eval_dataset=users_eval", f"output_dir={overfit['out']}"],
        "eval",
    )
    items = load_eval_set("users_eval", config.data).items
    rows = [{"question": i.prompt[-1]["content"], "answer": i.references[0]} for i in items]
    task = write_lm_eval_task(tmp_path / "task", "llmhalluc_users", rows, 24)
    command = [
        sys.executable,
        "-m",
        "llmhalluc.lm_eval",
        "--model",
        "llmhalluc-hf",
        "--model_args",
        f"pretrained={overfit['out']},backtrack_token={BT}",
        "--tasks",
        "llmhalluc_users",
        "--include_path",
        str(task),
        "--apply_chat_template",
        "--batch_size",
        "1",
        "--device",
        "cpu",
        "--log_samples",
        "--output_path",
        str(tmp_path / "lm_eval"),
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    (samples_file,) = (tmp_path / "lm_eval").rglob("samples_llmhalluc_users_*.jsonl")
    samples = sorted((json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"])
    assert [s["resps"][0][0] for s in samples] == [r["prediction"] for r in records]
    assert [s["arguments"]["gen_args_0"]["arg_0"] for s in samples] == [r["prompt"] for r in records]
    assert any(BT in r["raw_prediction"] for r in records)  # there were backtracks to apply
    from llmhalluc.errors import UserError
    from llmhalluc.lm_eval import BacktrackHFLM

    with pytest.raises(UserError, match=re.escape("backtrack_token: '<|NOPE|>' is not a token of the tokenizer")):
        BacktrackHFLM(pretrained=str(overfit["out"]), backtrack_token="<|NOPE|>", device="cpu")


def test_data_parallel_lm_eval_takes_the_global_rank():
    """On 2 nodes x 8 GPUs lm-eval's HFLM ranks each process by its index on its node (0-7 twice) while it splits
    the requests 16 ways: the toolkit's model type takes the launch's global rank."""
    pytest.importorskip("lm_eval")
    from types import SimpleNamespace

    from llmhalluc.lm_eval import use_global_rank

    lm = SimpleNamespace(accelerator=SimpleNamespace(process_index=9, local_process_index=1), world_size=16, _rank=1)
    use_global_rank(lm)
    assert lm._rank == 9
    alone = SimpleNamespace(world_size=1, _rank=0)  # one process: no accelerator, nothing to change
    use_global_rank(alone)
    assert alone._rank == 0


@pytest.mark.parametrize("held", ["true", None])
def test_lm_eval_runs_without_deepspeed_and_the_launch_environment_is_restored(monkeypatch, held):
    from llmhalluc.runtime.dist import deepspeed_off

    if held is None:
        monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    else:
        monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", held)
    with deepspeed_off():
        assert os.environ["ACCELERATE_USE_DEEPSPEED"] == "false"
    assert os.environ.get("ACCELERATE_USE_DEEPSPEED") == held
