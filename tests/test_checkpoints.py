"""What a run saves loads back exactly, on every path: kill -9 after a mid-run checkpoint, then resume, equals an
uninterrupted run for {full, LoRA, LoRA + 2 new tokens} x {1 process, DDP, ZeRO-2, ZeRO-3} (LoRA with new tokens
under ZeRO-3 is refused on CPU); every checkpoint and final model loads in a fresh process with the documented
loader and gives the eval loss the live model logged at that step; save_only_model and merge; the printed load
lines run as printed; resume refuses a changed LoRA key or a damaged checkpoint, naming it."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import (
    REPO,
    fork_server,
    read_metrics,
    run_in_process,
    run_sft,
    run_sft_many,
    sft_command,
    start_forked,
    write_chats,
)
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

LAUNCHES = {"1proc": None, "ddp": "cpu_ddp.yaml", "zero2": "cpu_zero2.yaml", "zero3": "cpu_zero3.yaml"}
KINDS = {
    "full": [],
    "lora": ["finetuning_type=lora", "lora_rank=4", "lora_alpha=8", "lora_target=all"],
    "tokens": ["finetuning_type=lora", "lora_rank=4", "lora_alpha=8", "add_special_tokens=[<A>,<B>]", "dataset=marked"],
}
# LoRA with new tokens under ZeRO-3 needs CUDA (PEFT gathers the rows with a CUDA-only routine): refused on CPU.
CELLS = [(kind, launch) for kind in KINDS for launch in LAUNCHES if (kind, launch) != ("tokens", "zero3")]
DOUBLE_KILL = {("full", "1proc"), ("full", "zero3")}  # killed mid-save, resumed, killed mid-step, resumed
COMPARED = ("step", "epoch", "loss", "grad_norm", "lr", "eval_loss", "tokens", "trained_tokens")


def chats(path: str, count: int) -> list[list[dict]]:
    lines = (REPO / "data" / path).read_text().splitlines()[:count]
    return [json.loads(line)["messages"] for line in lines]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir) -> dict:
    """12 training chats (3 optimizer steps of 4 per epoch), the same with two new tokens in every answer, 4 eval
    chats; the base arguments of a 10-step run that checkpoints and evaluates at steps 4 and 8."""
    root = tmp_path_factory.mktemp("checkpoints")
    train = chats("demo_train.jsonl", 12)
    write_chats(root / "data", "chats", train)
    marked = [[*c[:-1], {**c[-1], "content": "<A> " + c[-1]["content"] + " <B>"}] for c in train]
    write_chats(root / "data", "marked", marked)
    write_chats(root / "data", "held_out", chats("demo_eval.jsonl", 4))
    base = [
        "configs/demo.yaml",
        f"model_name_or_path={tiny_model_dir}",
        "dataset=chats",
        f"dataset_dir={root / 'data'}",
        "eval_dataset=held_out",
        "per_device_eval_batch_size=2",
        "max_length=512",
        "max_steps=10",
        "save_steps=4",
        "eval_steps=4",
        "save_total_limit=3",
        "learning_rate=1e-3",
        "lr_scheduler_type=cosine",
        "warmup_steps=2",
        "warmup_ratio=0",
        "logging_steps=1",
        "seed=7",
    ]
    return {"root": root, "base": base, "eval_chats": chats("demo_eval.jsonl", 4)}


def cell_args(setup: dict, kind: str, launch: str, out: Path, *extra: str) -> list[str]:
    """A cell's arguments: the same global batch of 4 in every launch."""
    batch = ["per_device_train_batch_size=2", "gradient_accumulation_steps=2" if launch == "1proc" else ""]
    return [*setup["base"], *KINDS[kind], *[b for b in batch if b], f"output_dir={out}", *extra]


def run_cells(setup: dict, plan: dict[tuple[str, ...], tuple[str, ...]]) -> dict[tuple[str, ...], Path]:
    """Run each (name, kind, launch) of the plan with its extra arguments to completion: one-process runs in this
    process, the 2-process ones in one launch; returns each output_dir, with its stdout kept beside it as .log."""
    outputs, launched = {}, []
    for (name, kind, launch), extra in plan.items():
        out = setup["root"] / f"{name}-{kind}-{launch}"
        outputs[name, kind, launch] = out
        args = cell_args(setup, kind, launch, out, *extra)
        if LAUNCHES[launch] is None:
            out.with_suffix(".log").write_text(run_sft(args).stdout)
        else:
            launched.append((args, LAUNCHES[launch], out))
    if launched:
        results = run_sft_many(
            [(a, c) for a, c, _ in launched], setup["root"] / f"logs-{len(list(setup['root'].glob('logs-*')))}"
        )
        for (_, _, out), result in zip(launched, results):
            out.with_suffix(".log").write_text(result.stdout)
    return outputs


SAVE_ONLY = [("full", "1proc"), ("lora", "1proc"), ("tokens", "1proc"), ("lora", "zero3")]


@pytest.fixture(scope="module")
def runs(setup) -> dict[tuple[str, ...], Path]:
    """Every cell run to completion, and save_only_model runs (merge: true for the adapters) in one process and
    LoRA under ZeRO-3: one-process runs in this process, all 2-process ones in one launch."""
    only = {
        ("only", *cell): ("save_only_model=true", *(["merge=true"] if cell[0] != "full" else [])) for cell in SAVE_ONLY
    }
    plan = {("whole", *cell): () for cell in CELLS} | only
    return run_cells(setup, plan)


@pytest.fixture(scope="module")
def uninterrupted(runs) -> dict[tuple[str, str], Path]:
    return {key[1:]: out for key, out in runs.items() if key[0] == "whole"}


@pytest.fixture(scope="module")
def save_only(runs) -> dict[tuple[str, str], Path]:
    return {key[1:]: out for key, out in runs.items() if key[0] == "only"}


def alive(pid: int) -> bool:
    """Whether a process runs (an ended rank stays a zombie of the fork server until it is reaped)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def start_and_kill(args: list[str], launch: str | None, log: Path, ready) -> None:
    """Start a run (its ranks forked, their output in log/rank0.out), SIGKILL every rank at once the moment
    `ready(rank 0's output)` holds, like a node failure."""
    pids = start_forked(args, launch, log)
    output = log / "rank0.out"
    deadline = time.time() + 300
    while not (output.exists() and ready(output)):
        assert all(alive(pid) for pid in pids), (
            f"the run ended before it could be killed:\n{output.read_text()[-4000:]}"
        )
        assert time.time() < deadline, output.read_text()[-4000:]
        time.sleep(0.002)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    assert all(code == -signal.SIGKILL for code in fork_server().wait(pids))


@pytest.fixture(scope="module")
def resumed(setup, uninterrupted) -> dict[tuple[str, str], Path]:
    """Each cell killed (SIGKILL, every process) while it saves checkpoint-8 or just after, then resumed to the
    end; the DOUBLE_KILL cells are killed again mid-step after their first resume."""
    for kind, launch in CELLS:
        out = setup["root"] / f"resumed-{kind}-{launch}"
        args = cell_args(setup, kind, launch, out)
        start_and_kill(args, LAUNCHES[launch], out.with_suffix(".kill1"), lambda _, o=out: saving_checkpoint_8(o))
        final = out / ("adapter_model.safetensors" if kind != "full" else "model.safetensors")
        assert not final.exists(), "the kill landed before the run ended"
        if (kind, launch) in DOUBLE_KILL:
            assert (out / "tmp-checkpoint-8").exists(), "the first kill landed during the save"
            log = out.with_suffix(".kill2")
            start_and_kill(
                [*args, "resume_from_checkpoint=latest"],
                LAUNCHES[launch],
                log,
                lambda path: "resumed from" in path.read_text() and "step 6/" in path.read_text(),
            )
            text = (log / "rank0.out").read_text()
            assert "checkpoint-4 at step 4" in text and "skipping incomplete checkpoint" in text
    resumes = run_cells(setup, {("resumed", *cell): ("resume_from_checkpoint=latest",) for cell in CELLS})
    return {key[1:]: out for key, out in resumes.items()}


def saving_checkpoint_8(out: Path) -> bool:
    return (out / "tmp-checkpoint-8").exists() or (out / "checkpoint-8").exists()


@pytest.mark.parametrize(("kind", "launch"), CELLS, ids=[f"{k}-{launch}" for k, launch in CELLS])
def test_kill_then_resume_equals_the_uninterrupted_run(setup, uninterrupted, resumed, kind, launch):
    whole, again = uninterrupted[kind, launch], resumed[kind, launch]
    assert "resumed from" in again.with_suffix(".log").read_text()
    rows, rows_again = read_metrics(whole), read_metrics(again)
    assert [r["step"] for r in rows_again] == [r["step"] for r in rows]
    for a, b in zip(rows, rows_again):
        for key in COMPARED:
            if isinstance(a.get(key), float):
                assert abs(a[key] - b[key]) <= 1e-6, (a["step"], key, a[key], b[key])
            else:
                assert a.get(key) == b.get(key), (a["step"], key)
    name = "model.safetensors" if kind == "full" else "adapter_model.safetensors"
    expected, got = load_file(whole / name), load_file(again / name)
    assert expected.keys() == got.keys() and expected
    for key in expected:
        assert (expected[key] - got[key]).abs().max().item() <= 1e-6, key


def test_zero3_saves_the_fp32_weights_it_trains(uninterrupted):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    checkpoint = uninterrupted["full", "zero3"] / "checkpoint-8"
    gathered = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint / "training_state"))
    saved = load_file(checkpoint / "model.safetensors")
    assert set(saved) == set(gathered)
    for key, value in gathered.items():
        assert torch.equal(saved[key], value), key


EVAL_LOSSES = """
import json, sys, torch
from llmhalluc import load_pretrained
from llmhalluc.data import IGNORE_INDEX, tokenize_chat
chats, folders = json.loads(sys.argv[1]), json.loads(sys.argv[2])
losses = {}
for folder in folders:
    model, tokenizer = load_pretrained(folder)
    ce, count = 0.0, 0
    with torch.no_grad():
        for chat in chats:
            example = tokenize_chat(tokenizer, chat, max_length=512)
            logits = model(input_ids=torch.tensor([example["input_ids"]])).logits[0, :-1].double()
            targets = torch.tensor(example["labels"][1:])
            ce += torch.nn.functional.cross_entropy(logits, targets, reduction="sum", ignore_index=IGNORE_INDEX).item()
            count += int((targets != IGNORE_INDEX).sum())
    losses[folder] = ce / count
print(json.dumps(losses))
"""


def test_every_checkpoint_loads_in_a_fresh_process_with_the_live_eval_loss(setup, uninterrupted, save_only):
    runs = {**{("whole", *k): v for k, v in uninterrupted.items()}, **{("only", *k): v for k, v in save_only.items()}}
    expected = {}
    for out in runs.values():
        logged = {r["step"]: r["eval_loss"] for r in read_metrics(out) if "eval_loss" in r}
        expected |= {str(out / f"checkpoint-{step}"): logged[step] for step in (4, 8)}
        expected[str(out)] = logged[10]
    checked = subprocess.run(
        [sys.executable, "-c", EVAL_LOSSES, json.dumps(setup["eval_chats"]), json.dumps(sorted(expected))],
        cwd=setup["root"],  # another working directory: adapters name their base by absolute path
        capture_output=True,
        text=True,
    )
    assert checked.returncode == 0, checked.stderr[-4000:]
    losses = json.loads(checked.stdout.strip().splitlines()[-1])
    for folder, loss in losses.items():
        # The live loss is computed in chunks in float32; this one in one float64 pass over float32 logits.
        assert loss == pytest.approx(expected[folder], rel=1e-6), folder


def test_save_only_model_checkpoints_are_model_folders_and_merge_runs_once(setup, save_only):
    for (kind, _), out in save_only.items():
        checkpoint = out / "checkpoint-8"
        assert not (checkpoint / "training_state").exists() and (checkpoint / "llmhalluc_model.json").is_file()
        assert not (checkpoint / "merged").exists()
        assert (out / "merged" / "model.safetensors").is_file() == (kind != "full")
    record = json.loads((save_only["tokens", "1proc"] / "checkpoint-4" / "llmhalluc_model.json").read_text())
    assert record["new_token_ids"] == {"<A>": 761, "<B>": 762} and record["embedding_rows"] == 763
    args = cell_args(setup, "lora", "1proc", save_only["lora", "1proc"], "save_only_model=true", "merge=true")
    result = run_sft([*args, "resume_from_checkpoint=latest", "max_steps=12"], expect_code=2)
    assert "was saved with save_only_model: true" in result.stderr


MERGED_WITHOUT_PEFT = """
import sys, json, torch
sys.modules["peft"] = None  # an import of peft fails: the merged model must not need it
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
ids = tokenizer("<A> Tom has 3 apples. <B>", add_special_tokens=False)["input_ids"]
with torch.no_grad():
    logits = model(input_ids=torch.tensor([ids])).logits[0]
print(json.dumps({"ids": ids, "logits": logits.tolist()}))
"""


def test_the_merged_model_is_base_plus_adapter_and_loads_without_peft(setup, save_only, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from llmhalluc import load_pretrained

    adapter = save_only["tokens", "1proc"]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    merged = load_file(adapter / "merged" / "model.safetensors")
    saved = load_file(adapter / "adapter_model.safetensors")
    scale = 8 / 4  # lora_alpha / lora_rank
    lora_weights = {k.removesuffix(".lora_A.weight"): k for k in saved if k.endswith("lora_A.weight")}
    assert len(lora_weights) == 28  # 7 linear layers x 4 blocks
    for prefix, key_a in lora_weights.items():
        name = prefix.removeprefix("base_model.model.") + ".weight"
        a, b = saved[key_a].double(), saved[prefix + ".lora_B.weight"].double()
        expected = base[name].double() + scale * b @ a
        # float32 rounding, bounded: the product B @ A over rank r (r + 1 roundings of each term, |B| @ |A|), the
        # scaling, and the addition to W (each at most eps relative).
        eps = torch.finfo(torch.float32).eps
        product_error = (4 + 2) * eps * scale * (b.abs() @ a.abs())
        bound = eps * (expected.abs() + base[name].double().abs()) + product_error
        assert ((merged[name].double() - expected).abs() <= bound).all(), name
    trained_rows = saved["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
    embedding = merged["model.embed_tokens.weight"]
    assert torch.equal(embedding[761:763], trained_rows)  # the trained rows, as trained
    assert torch.equal(embedding[:761], base["model.embed_tokens.weight"])  # every other row, bit for bit
    # From another directory, with peft unimportable: the same logits as the merged model loaded here.
    checked = subprocess.run(
        [sys.executable, "-c", MERGED_WITHOUT_PEFT, str(adapter / "merged")],
        cwd=setup["root"],
        capture_output=True,
        text=True,
    )
    assert checked.returncode == 0, checked.stderr[-3000:]
    result = json.loads(checked.stdout.strip().splitlines()[-1])
    here, _ = load_pretrained(adapter / "merged")
    with torch.no_grad():
        expected_logits = here(input_ids=torch.tensor([result["ids"]])).logits[0]
    assert torch.equal(torch.tensor(result["logits"]), expected_logits)
    assert result["ids"][0] == 761 and result["ids"][-1] == 762  # each new token one id


RUN_PRINTED = """
import sys, json, torch
ids = torch.tensor([[5, 17, 42, 9]])
out = []
for line in json.loads(sys.argv[1]):
    scope = {}
    exec(line, scope)  # each line on its own, as a user pastes it
    with torch.no_grad():
        out.append(scope["model"](input_ids=ids).logits[0].tolist())
print(json.dumps(out))
"""


def test_the_printed_load_lines_run_as_printed(setup, uninterrupted):
    from llmhalluc import load_pretrained

    lines, expected = [], []
    for kind in KINDS:
        out = uninterrupted[kind, "1proc"]
        report = out.with_suffix(".log").read_text()
        printed = [line.split("load it with", 1)[1].strip() for line in report.splitlines() if "load it with" in line]
        printed += [line.split(" or ", 1)[1].strip() for line in report.splitlines() if line.startswith("  or ")]
        assert len(printed) == (1 if kind == "full" else 2), report[-2000:]
        model, _ = load_pretrained(out)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([[5, 17, 42, 9]])).logits[0]
        lines += printed
        expected += [logits] * len(printed)
    # From another working directory, in a fresh process.
    ran = subprocess.run(
        [sys.executable, "-c", RUN_PRINTED, json.dumps(lines)], cwd=setup["root"], capture_output=True, text=True
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    for line, logits, want in zip(lines, json.loads(ran.stdout.strip().splitlines()[-1]), expected):
        torch.testing.assert_close(torch.tensor(logits), want, rtol=0, atol=0, msg=line)


LORA_CHANGES = {
    "lora_rank": "lora_rank=8",
    "lora_alpha": "lora_alpha=16",
    "lora_dropout": "lora_dropout=0.1",
    "lora_target": "lora_target=[q_proj,v_proj]",
    "additional_target": "additional_target=[lm_head]",
    "use_rslora": "use_rslora=true",
    "use_dora": "use_dora=true",
    "adapter_name_or_path": "adapter_name_or_path={adapter}",
}


def test_a_lora_resume_with_any_lora_key_changed_is_refused_naming_it(setup, uninterrupted, tmp_path):
    whole = uninterrupted["lora", "1proc"]
    out = tmp_path / "out"
    out.mkdir()
    shutil.copytree(whole / "checkpoint-8", out / "checkpoint-8")
    args = cell_args(setup, "lora", "1proc", out, "resume_from_checkpoint=latest")
    for key, change in LORA_CHANGES.items():
        result = run_sft([*args, change.format(adapter=whole)], expect_code=2)
        assert f"belongs to a different run: {key}: checkpoint has" in result.stderr, (key, result.stderr[-2000:])
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-8"]  # nothing written


def test_a_damaged_checkpoint_is_refused_naming_the_file_or_tensor(setup, uninterrupted, tmp_path):
    from llmhalluc.errors import UserError
    from llmhalluc.models.export import ModelExport, check_model_folder

    whole = uninterrupted["tokens", "1proc"]
    out = tmp_path / "out"
    out.mkdir()
    shutil.copytree(whole / "checkpoint-8", out / "checkpoint-8")
    (out / "checkpoint-8" / "adapter_model.safetensors").unlink()
    args = cell_args(setup, "tokens", "1proc", out, "resume_from_checkpoint=latest")
    result = run_sft(args, expect_code=2)
    assert f"{out / 'checkpoint-8' / 'adapter_model.safetensors'} is missing" in result.stderr
    # An adapter without the new tokens' rows, against the model that has them: the tensor is named.
    from safetensors.torch import save_file

    from llmhalluc.models.export import load_pretrained

    folder = tmp_path / "rowless"
    shutil.copytree(whole, folder, ignore=shutil.ignore_patterns("checkpoint-*", "merged"))
    tensors = load_file(folder / "adapter_model.safetensors")
    save_file({k: v for k, v in tensors.items() if "token_adapter" not in k}, folder / "adapter_model.safetensors")
    model, _ = load_pretrained(whole)
    record = json.loads((whole / "llmhalluc_model.json").read_text())
    export = ModelExport(
        "lora", record["base_model"], record["base_rows"], record["embedding_rows"], record["new_token_ids"]
    )
    with pytest.raises(UserError, match=r"adapter_model.safetensors lacks 2 tensor\(s\) the model has, e\.g\. .*"):
        check_model_folder(folder, model, export)


def test_an_evaluation_only_config_evaluates_the_model_it_names(setup, uninterrupted, tmp_path):
    (tmp_path / "data").mkdir()
    shutil.copy(setup["root"] / "data" / "held_out.jsonl", tmp_path / "data")
    (tmp_path / "data" / "dataset_info.json").write_text(
        json.dumps({"held_out": {"file_name": "held_out.jsonl", "formatting": "openai"}})
    )
    model = uninterrupted["full", "1proc"]
    (tmp_path / "eval.yaml").write_text(f"model_name_or_path: {model}\neval_dataset: held_out\n")
    result = run_in_process(["eval.yaml", "max_new_tokens=8"], script="eval.py", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (written,) = (tmp_path / "outputs" / "eval" / model.name).glob("*/results.json")  # eval_tag: the start time
    results = json.loads(written.read_text())
    assert results["results"]["held_out"]["count"] == 4 and results["model"] == str(model)


# --- preemption, and a checkpoint of another run -------------------------------------------------------------


def assert_same_training(reference: Path, resumed: Path) -> None:
    """Same per-step losses, grad norms and learning rates, same final weights, bit for bit."""
    rows, rows_again = read_metrics(reference), read_metrics(resumed)
    assert [r["step"] for r in rows_again] == [r["step"] for r in rows]
    for a, b in zip(rows, rows_again):
        assert [a.get(k) for k in COMPARED] == [b.get(k) for k in COMPARED], a["step"]
    expected, got = load_file(reference / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def ranks_of(process: subprocess.Popen) -> list[psutil.Process]:
    """The training processes under a launcher (not the launcher itself)."""
    found = []
    for child in psutil.Process(process.pid).children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            line = " ".join(child.cmdline())
            if "train/sft.py" in line and "accelerate" not in line:
                found.append(child)
    return found


def test_sigusr1_to_one_rank_stops_all_at_one_step_then_auto_resume_is_exact(setup, uninterrupted, tmp_path):
    from llmhalluc.train.preemption import PREEMPTED_MARKER

    out = tmp_path / "out"
    args = cell_args(setup, "full", "zero3", out)
    with (tmp_path / "preempted.log").open("w") as sink:
        process = subprocess.Popen(sft_command(args, "cpu_zero3.yaml"), cwd=REPO, stdout=sink, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while not ((out / "metrics.jsonl").exists() and len(read_metrics(out)) >= 2):
        assert time.time() < deadline and process.poll() is None
        time.sleep(0.01)
    rank1 = next(p for p in ranks_of(process) if p.environ().get("RANK") == "1")
    rank1.send_signal(signal.SIGUSR1)  # only one rank hears it
    assert process.wait(timeout=300) != 0  # the launcher reports its children's exit code 85 as a failure
    log = (tmp_path / "preempted.log").read_text()
    assert "stopped by a signal on another rank" in log or "stopped by SIGUSR1" in log
    step = json.loads((out / PREEMPTED_MARKER).read_text())["step"]
    assert (out / f"checkpoint-{step}" / "COMPLETE").exists() and read_metrics(out)[-1]["step"] == step
    run_sft([*args, "resume_from_checkpoint=auto"], accelerate_config="cpu_zero3.yaml")
    assert not (out / PREEMPTED_MARKER).exists()
    assert_same_training(uninterrupted["full", "zero3"], out)


def test_sigterm_single_process_exits_with_the_requeue_code(setup, uninterrupted, tmp_path):
    from llmhalluc.train.preemption import PREEMPTED_EXIT_CODE, PREEMPTED_MARKER

    out = tmp_path / "out"
    args = cell_args(setup, "full", "1proc", out)
    process = subprocess.Popen(sft_command(args), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not ((out / "metrics.jsonl").exists() and len(read_metrics(out)) >= 2):
        assert time.time() < deadline and process.poll() is None
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == PREEMPTED_EXIT_CODE
    step = json.loads((out / PREEMPTED_MARKER).read_text())["step"]
    assert (out / f"checkpoint-{step}" / "COMPLETE").exists()
    run_sft([*args, "resume_from_checkpoint=auto"])
    assert_same_training(uninterrupted["full", "1proc"], out)


def test_checkpoint_of_another_run_is_refused_naming_the_keys(setup, uninterrupted, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    shutil.copytree(uninterrupted["full", "1proc"] / "checkpoint-8", out / "checkpoint-8")
    args = cell_args(setup, "full", "1proc", out, "resume_from_checkpoint=latest")
    result = run_sft([*args, "seed=12", "max_length=256"], expect_code=2)
    assert "belongs to a different run" in result.stderr
    assert "max_length: checkpoint has 512, this run has 256" in result.stderr
    assert "seed: checkpoint has 7, this run has 12" in result.stderr
    result = run_sft([*args, "per_device_train_batch_size=1"], expect_code=2)
    assert (
        "global batch: checkpoint has 4, this run has 2 (gradient_accumulation_steps=4 gives it with "
        "per_device_train_batch_size 1 on 1 processes)" in result.stderr
    )
    # The same dataset name with more rows: the epoch would be cut differently.
    grown = tmp_path / "grown"
    write_chats(grown, "chats", chats("demo_train.jsonl", 16))
    write_chats(grown, "held_out", setup["eval_chats"])
    result = run_sft([*args, f"dataset_dir={grown}"], expect_code=2)
    assert "steps per epoch: checkpoint has 3, this run has 4 (the data changed" in result.stderr
    # Another process count at the same global batch: named, with what to do, by every rank.
    result = run_sft([*args, "gradient_accumulation_steps=1"], accelerate_config="cpu_ddp.yaml", expect_code=2)
    assert "processes: the checkpoint was written by 1, this run has 2" in result.stderr
    assert "resume with 1 processes" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-8"]  # nothing written
