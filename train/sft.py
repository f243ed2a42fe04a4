"""Training: `[accelerate launch ...] train/sft.py CONFIG.yaml [key=value ...] [--dry-run [N]] [--debug]`.

Runs the config's `stage` (supervised fine-tuning by default). `--dry-run` resolves the config and data and shows N
examples of each dataset (default 3) with what will be trained, without loading weights or writing anything.
"""

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

USAGE = "train/sft.py CONFIG.yaml [key=value ...] [--dry-run [N]] [--debug]"


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, load the config, then train (or show the data with --dry-run)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], usage=USAGE)
    parser.add_argument("config", nargs="?", help="experiment YAML")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, values parsed as YAML")
    parser.add_argument("--dry-run", type=int, metavar="N", help="show N examples per dataset (3), train nothing")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for input errors")
    args = parser.parse_intermixed_args(with_dry_run_count(sys.argv[1:] if argv is None else argv))
    if args.config is None:
        print(f"error: the experiment config is required: {USAGE}", file=sys.stderr)
        return 2
    try:
        config = load_config(args.config, args.overrides)
        if args.dry_run is not None:
            from llmhalluc.cli.preview import dry_run

            dry_run(config, examples=args.dry_run)
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


def with_dry_run_count(argv: list[str]) -> list[str]:
    """`--dry-run` alone means 3 examples per dataset; `--dry-run N` (a number right after it) N."""
    out, index = [], 0
    while index < len(argv):
        if argv[index] == "--dry-run":
            given = index + 1 < len(argv) and argv[index + 1].isdigit()
            out.append(f"--dry-run={argv[index + 1] if given else 3}")
            index += 2 if given else 1
        else:
            out.append(argv[index])
            index += 1
    return out


if __name__ == "__main__":
    sys.exit(main())
