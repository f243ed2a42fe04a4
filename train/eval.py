"""Generation evaluation: `[accelerate launch ...] train/eval.py CONFIG.yaml [key=value ...] [--debug]`.

Evaluates the trained model in output_dir (or model_name_or_path when output_dir holds none) on eval_dataset and
writes output_dir/eval/<eval_tag>/<dataset>/predictions.jsonl and output_dir/eval/<eval_tag>/results.json
(eval_tag defaults to the UTC start time: an earlier evaluation is never overwritten).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

if not torch.cuda.is_available():  # DeepSpeed would warn on every rank that it picked the CPU
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from llmhalluc.config import load_config
from llmhalluc.errors import UserError, report_and_exit_code


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, load the config, evaluate."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="experiment YAML")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, values parsed as YAML")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for input errors")
    args = parser.parse_intermixed_args(argv)
    try:
        from llmhalluc.eval.standalone import evaluate_model

        evaluate_model(load_config(args.config, args.overrides, purpose="eval"))
    except UserError as err:
        if args.debug:
            raise
        return report_and_exit_code(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
