"""dataset_info.json: LLaMA-Factory files read as they are, and every bad entry or file named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmhalluc.data.converters import ConvertOptions, to_chat
from llmhalluc.data.registry import check_columns, load_raw_dataset, resolve_dataset
from llmhalluc.errors import DataError

# An excerpt in LLaMA-Factory's own style: alpaca entries without formatting, sharegpt with columns and tags.
LLAMA_FACTORY_INFO = {
    "identity": {"file_name": "identity.json"},
    "alpaca_en_demo": {"file_name": "alpaca_en_demo.json"},
    "glaive_toolcall_en_demo": {
        "file_name": "glaive_toolcall_en_demo.json",
        "formatting": "sharegpt",
        "columns": {"messages": "conversations", "tools": "tools"},
    },
    "mllm_demo": {
        "file_name": "mllm_demo.json",
        "formatting": "sharegpt",
        "columns": {"messages": "messages", "images": "images"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
    },
    "openai_style": {
        "file_name": "openai_style.jsonl",
        "formatting": "sharegpt",
        "columns": {"messages": "messages"},
        "tags": {
            "role_tag": "role",
            "content_tag": "content",
            "user_tag": "user",
            "assistant_tag": "assistant",
            "system_tag": "system",
        },
    },
    "alpaca_zh": {"hf_hub_url": "llamafactory/alpaca_zh", "ms_hub_url": "llamafactory/alpaca_zh"},
    "belle_multiturn": {"script_url": "belle_multiturn", "formatting": "sharegpt"},
    "dpo_en_demo": {
        "file_name": "dpo_en_demo.json",
        "ranking": True,
        "formatting": "sharegpt",
        "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"},
    },
    "alpaca_sampled": {"file_name": "alpaca_en_demo.json", "num_samples": 5},
}


@pytest.fixture
def lf_dir(tmp_path: Path) -> Path:
    """A dataset_dir laid out like LLaMA-Factory's data/ folder."""
    (tmp_path / "dataset_info.json").write_text(json.dumps(LLAMA_FACTORY_INFO, indent=2))
    alpaca = [
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Name a colour.", "input": "", "output": "Blue.", "system": "Be brief."},
        {"instruction": "And then?", "input": "", "output": "Red.", "history": [["Name a colour.", "Blue."]]},
    ]
    (tmp_path / "alpaca_en_demo.json").write_text(json.dumps(alpaca))
    (tmp_path / "identity.json").write_text(json.dumps([{"instruction": "hi", "input": "", "output": "Hello!"}]))
    glaive = [
        {
            "conversations": [
                {"from": "human", "value": "Weather in Oslo?"},
                {"from": "function_call", "value": '{"name": "weather", "arguments": {"city": "Oslo"}}'},
                {"from": "observation", "value": '{"temp": 3}'},
                {"from": "gpt", "value": "It is 3 degrees."},
            ],
            "tools": "[]",
        }
    ]
    (tmp_path / "glaive_toolcall_en_demo.json").write_text(json.dumps(glaive))
    openai_rows = [
        {
            "messages": [
                {"role": "system", "content": "Be kind."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."},
            ]
        },
    ]
    (tmp_path / "openai_style.jsonl").write_text("".join(json.dumps(r) + "\n" for r in openai_rows))
    return tmp_path


def chats(name: str, dataset_dir: Path) -> list:
    spec = resolve_dataset(name, dataset_dir)
    rows = load_raw_dataset(spec)
    check_columns(spec, rows)
    return [to_chat(row, spec, ConvertOptions()) for row in rows]


def test_llama_factory_alpaca_entry_reads_as_is(lf_dir):
    spec = resolve_dataset("alpaca_en_demo", lf_dir)
    assert spec.converter == "alpaca"
    assert spec.columns == {"prompt": "instruction", "query": "input", "response": "output"}
    first, second, third = chats("alpaca_en_demo", lf_dir)
    assert first == [{"role": "user", "content": "Add the numbers.\n2 and 3"}, {"role": "assistant", "content": "5"}]
    # Without a `columns` entry LLaMA-Factory reads no system or history column, and neither do we.
    assert second == [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]
    assert third[0] == {"role": "user", "content": "And then?"}


def test_alpaca_with_system_and_history_columns(tmp_path):
    (tmp_path / "dataset_info.json").write_text(
        json.dumps(
            {
                "a": {
                    "file_name": "a.json",
                    "columns": {
                        "prompt": "instruction",
                        "query": "input",
                        "response": "output",
                        "system": "system",
                        "history": "history",
                    },
                }
            }
        )
    )
    rows = [
        {
            "instruction": "And then?",
            "input": "",
            "output": "Red.",
            "system": "Be brief.",
            "history": [["Name a colour.", "Blue."]],
        }
    ]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    assert chats("a", tmp_path)[0] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "And then?"},
        {"role": "assistant", "content": "Red."},
    ]


def test_llama_factory_sharegpt_entries_read_as_is(lf_dir):
    (chat,) = chats("glaive_toolcall_en_demo", lf_dir)
    assert [m["role"] for m in chat] == ["user", "assistant", "tool", "assistant"]
    (chat,) = chats("openai_style", lf_dir)
    assert chat == [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
    ]


def test_entries_we_cannot_use_load_with_the_file_and_fail_only_when_used(lf_dir):
    assert resolve_dataset("identity", lf_dir).location.endswith("identity.json")
    (lf_dir / "dpo_en_demo.json").write_text("[]")
    ranking = resolve_dataset("dpo_en_demo", lf_dir)  # a preference dataset: stage dpo reads it, sft refuses it
    assert ranking.ranking and ranking.columns["chosen"] == "chosen" and ranking.columns["rejected"] == "rejected"
    with pytest.raises(DataError, match="script_url is not supported"):
        resolve_dataset("belle_multiturn", lf_dir)
    with pytest.raises(DataError, match="column 'images' is not supported"):
        resolve_dataset("mllm_demo", lf_dir)
    assert resolve_dataset("alpaca_zh", lf_dir).source == "hf_hub"  # hf_hub_url wins over ms_hub_url


def test_num_samples_draws_that_many_rows(lf_dir):
    rows = load_raw_dataset(resolve_dataset("alpaca_sampled", lf_dir), seed=0)
    assert len(rows) == 5  # 3 rows repeated once, then 2 drawn at random
    assert sorted(r["output"] for r in rows).count("5") >= 1


def test_unknown_dataset_lists_the_known_ones(lf_dir):
    with pytest.raises(DataError) as caught:
        resolve_dataset("alpaca_en", lf_dir)
    assert "unknown dataset 'alpaca_en'" in str(caught.value)
    assert "known datasets: alpaca_en_demo, alpaca_sampled, alpaca_zh" in str(caught.value)


def test_unknown_entry_column_and_tag_keys_are_named(lf_dir):
    info = {
        "typo": {"file_name": "identity.json", "colums": {}},
        "badcol": {"file_name": "identity.json", "columns": {"promt": "instruction"}},
        "badtag": {"file_name": "identity.json", "formatting": "sharegpt", "tags": {"role": "from"}},
    }
    (lf_dir / "dataset_info.json").write_text(json.dumps(info))
    with pytest.raises(DataError, match=r"unknown key 'colums' \(closest: 'columns'\)"):
        resolve_dataset("typo", lf_dir)
    with pytest.raises(DataError, match=r"unknown column key 'promt' \(closest: 'prompt'\)"):
        resolve_dataset("badcol", lf_dir)
    with pytest.raises(DataError, match=r"unknown tag 'role' \(closest: 'role_tag'\)"):
        resolve_dataset("badtag", lf_dir)


def test_missing_data_file_is_named(lf_dir):
    (lf_dir / "identity.json").unlink()
    with pytest.raises(DataError, match=r"data file not found: .*identity.json"):
        resolve_dataset("identity", lf_dir)


def test_missing_registry_is_named(tmp_path):
    with pytest.raises(DataError, match=r"dataset registry not found: .*dataset_info.json"):
        resolve_dataset("x", tmp_path)


def test_malformed_registry_names_line(tmp_path):
    (tmp_path / "dataset_info.json").write_text('{\n  "a": {"file_name": "a.json",}\n}\n')
    with pytest.raises(DataError, match=r"dataset_info.json:2:\d+: malformed JSON"):
        resolve_dataset("a", tmp_path)


def test_malformed_jsonl_names_file_line_and_column(tmp_path, capfd):
    (tmp_path / "dataset_info.json").write_text(json.dumps({"d": {"file_name": "d.jsonl", "formatting": "openai"}}))
    good = json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    (tmp_path / "d.jsonl").write_text(f'{good}\n{good}\n{{"messages": [}}\n')
    with pytest.raises(DataError, match=r"d.jsonl:3:15: malformed JSON line: Expecting value$"):
        load_raw_dataset(resolve_dataset("d", tmp_path))
    assert "row 2" not in capfd.readouterr().err  # datasets' own message counts rows from 0: not shown


def test_malformed_json_array_names_file_and_line(tmp_path):
    (tmp_path / "dataset_info.json").write_text(json.dumps({"d": {"file_name": "d.json"}}))
    (tmp_path / "d.json").write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}\n]')
    with pytest.raises(DataError, match=r"d.json:3:22: malformed JSON: Expecting ','"):
        load_raw_dataset(resolve_dataset("d", tmp_path))


def test_column_the_data_lacks_is_named(lf_dir):
    info = {"x": {"file_name": "identity.json", "columns": {"prompt": "question", "response": "output"}}}
    (lf_dir / "dataset_info.json").write_text(json.dumps(info))
    spec = resolve_dataset("x", lf_dir)
    with pytest.raises(DataError) as caught:
        check_columns(spec, load_raw_dataset(spec))
    assert "columns.prompt names column 'question', which the data lacks" in str(caught.value)
    assert "instruction" in str(caught.value)


def test_folder_of_files_and_other_formats(tmp_path):
    (tmp_path / "parts").mkdir()
    for i in range(2):
        row = {"question": f"q{i}", "answer": f"a{i}\n#### {i}"}
        (tmp_path / "parts" / f"p{i}.jsonl").write_text(json.dumps(row) + "\n")
    (tmp_path / "g.csv").write_text('question,answer\n"1+1?","2\n#### 2"\n')
    info = {"folder": {"file_name": "parts", "converter": "gsm8k"}, "csv": {"file_name": "g.csv", "converter": "gsm8k"}}
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    assert len(chats("folder", tmp_path)) == 2
    assert chats("csv", tmp_path)[0][1]["content"] == "2\n#### 2"


def test_shipped_registry_entries_resolve():
    shipped = Path(__file__).resolve().parent.parent / "data"
    info = json.loads((shipped / "dataset_info.json").read_text())
    for name in info:
        spec = resolve_dataset(name, shipped)
        if spec.source == "file":
            assert len(chats(name, shipped)) > 10
