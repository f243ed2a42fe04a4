"""Supervised fine-tuning: `[accelerate launch ...] train/sft.py CONFIG.yaml [key=value ...] [--dry-run] [--debug]`."""

from __future__ import annotations

import argparse
import os
import sys

import torch

if not torch.cuda.is_available():  # DeepSpeed would warn on every rank that it picked the CPU
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from llmhalluc.config import load_config
from llmhalluc.errors import Diverged, UserError, report_and_exit_code
from llmhalluc.train.preemption import Preempted


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, load the config, then train (or show the data with --dry-run)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("config", help="experiment YAML")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, values parsed as YAML")
    parser.add_argument("--dry-run", action="store_true", help="resolve config and data, show examples, exit")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for input errors")
    args = parser.parse_intermixed_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        if args.dry_run:
            from llmhalluc.data.preview import dry_run

            dry_run(config)
            return 0
        from llmhalluc.train.loop import train

        train(config)
    except (Diverged, Preempted) as stop:
        return report_and_exit_code(stop)
    except UserError as err:
        if args.debug:
            raise
        return report_and_exit_code(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
