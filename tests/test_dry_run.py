"""train/sft.py --dry-run: shows what will be trained, writes nothing, loads no weights."""

from __future__ import annotations

from conftest import run_sft


def test_dry_run_marks_trained_tokens_and_writes_nothing(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    result = run_sft(
        ["configs/demo.yaml", "--dry-run", f"model_name_or_path={tiny_model_dir}", f"output_dir={out}", "packing=true"]
    )
    text = result.stdout
    assert "train: 480 examples from 480 rows; dropped: none" in text
    assert "eval: 48 examples from 48 rows" in text
    assert "train: packing 480 examples into" in text
    assert "--- train example 0" in text
    # Not a terminal: trained tokens are bracketed; the assistant's answer and its <|im_end|> are inside.
    assert "<|im_start|>assistant\n[[" in text and "<|im_end|>]]" in text
    assert "<|im_start|>user\n[[" not in text
    assert "dry run: nothing was trained or written" in text
    assert not out.exists()
    assert "Loading weights" not in result.stderr


def test_dry_run_shows_new_tokens_backtrack_statistics_and_masked_errors(tmp_path, tiny_model_dir):
    result = run_sft(
        [
            "configs/demo_backtrack.yaml",
            "--dry-run",
            f"model_name_or_path={tiny_model_dir}",
            f"output_dir={tmp_path / 'out'}",
        ]
    )
    text = result.stdout
    assert "new tokens: <|BACKTRACK|> -> 761 (initialised with noise_init)" in text
    assert "train: backtracks examples_with_backtracks=359, runs=481, tokens=822, masked=822, clamped=0" in text
    # An error is shown apart from both the prompt and the trained tokens; its backtracks are trained.
    assert "=]]{{ " in text and "}}[[<|BACKTRACK|>" in text
    assert not (tmp_path / "out").exists()
