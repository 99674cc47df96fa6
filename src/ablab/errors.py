"""Error types and the one message form every validation error uses.

Exit codes (documented in the README, relied upon by scripts):

* 0 -- success
* 1 -- the run failed for a reason that is not the input's fault
* 2 -- bad input: study file, data, model or option (nothing was written)
* 130 -- interrupted (Ctrl-C); finished cells are stored
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


def with_fix(message: str, fix: str | None) -> str:
    """The one "how to fix" form: ``message`` and, on its own line, what to do about it."""
    return message if not fix else f"{message}\n  how to fix: {fix}"


class AblabError(Exception):
    """Base class of every error ablab raises on purpose; ``fix`` says what to do about it."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str = "", *, fix: str | None = None) -> None:
        super().__init__(with_fix(message, fix))


class BadInput(AblabError):
    """Bad input of any kind (exit code 2)."""

    exit_code = EXIT_BAD_INPUT


class InputError(BadInput):
    """Bad input, in the one message form: where (file), which key (or column / option),
    what was expected, what was got, and how to fix it."""

    def __init__(
        self,
        *,
        where: str,
        key: str,
        expected: str,
        got: str,
        fix: str,
    ) -> None:
        self.where = where
        self.key = key
        self.expected = expected
        self.got = got
        self.fix = fix
        super().__init__(f"{where}: [{key}] expected {expected}; got {got}.", fix=fix)


class StudyError(InputError):
    """Bad input: the study, its data, its model or an option (the message form of
    :class:`InputError`)."""


class RunInterrupted(AblabError):
    """The run was interrupted; the cells that had finished are stored."""

    exit_code = EXIT_INTERRUPTED

    def __init__(self, run_dir: str, cells_done: int, cells_total: int) -> None:
        self.run_dir = run_dir
        self.cells_done = cells_done
        self.cells_total = cells_total
        msg = (
            f"interrupted: {cells_done} of {cells_total} cells had finished and are "
            f"stored in {run_dir} (readable with `ablab show` / `ablab query`)"
        )
        super().__init__(msg)


def short_repr(value: object, limit: int = 80) -> str:
    """``repr`` cut to ``limit`` characters, for the 'got' part of a message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
