"""Supervised fine-tuning: `[accelerate launch ...] train/sft.py CONFIG.yaml [key=value ...] [--dry-run] [--debug]`."""

from __future__ import annotations

import argparse
import os
import sys

import torch

if not torch.cuda.is_available():  # DeepSpeed would warn on every rank that it picked the CPU
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from llmhalluc.config import load_config
from llmhalluc.errors import Diverged, UserError
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
    except Diverged as stop:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {stop}", file=sys.stderr, flush=True)
        return stop.exit_code
    except Preempted as stop:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"preempted: {stop}", file=sys.stderr, flush=True)
        return stop.exit_code
    except UserError as err:
        if args.debug:
            raise
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {err}", file=sys.stderr, flush=True)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
