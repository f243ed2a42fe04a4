"""Errors that mean "the user's input is wrong": reported as one line each, exit code 2, never a traceback."""


class UserError(Exception):
    """Bad input (config, data, template, launch); `str()` is the message shown to the user."""

    exit_code = 2


class ConfigError(UserError):
    """The experiment config is invalid; holds every problem found, one per line."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class DataError(UserError):
    """A dataset, its registry entry or one of its rows cannot be used."""


class TemplateError(UserError):
    """A chat template cannot produce an exact assistant mask for a conversation."""


class Diverged(Exception):
    """Training stopped after too many non-finite steps in a row; exit code 3."""

    exit_code = 3


def report_and_exit_code(err: BaseException) -> int:
    """What an entry point does with an error it expects: print its line, return its exit code. Every rank prints
    (others with their rank): the launcher stops the remaining ranks as soon as one exits, so a line left to rank 0
    alone is lost whenever another rank fails first."""
    import os
    import sys

    prefix = {"Diverged": "error", "Preempted": "preempted"}.get(type(err).__name__, "error")
    rank = int(os.environ.get("RANK", "0"))
    where = "" if rank == 0 else f" (rank {rank})"
    print(f"{prefix}{where}: {err}", file=sys.stderr, flush=True)
    return err.exit_code
