"""The error hierarchy. Library code raises these; the CLI maps them to exit codes."""


class CnnpackError(Exception):
    """Base of every error cnnpack reports to a user as one line."""

    exit_code = 2


class UserInputError(CnnpackError):
    """Bad usage or bad input: a wrong flag, a missing file, an unreadable dataset."""


class MissingStageError(UserInputError):
    """A stage needs the output of an earlier stage that is not in the run directory."""


class RuntimeUnavailable(CnnpackError):
    """A runtime (or provider) cannot be used on this machine; the message says why."""


class ParityError(CnnpackError):
    """A check failed: exported outputs differ from eager, or an accuracy gate was missed."""

    exit_code = 1


class StageFailed(CnnpackError):
    """A stage ran but failed (a served model did not load, a pipeline stage broke)."""

    exit_code = 1


def count(n: int, noun: str) -> str:
    """`1 file`, `2 files`: a count in the one-line messages and the report."""
    return f"{n} {noun}" + ("" if n == 1 else "s")


def shell(path: object) -> str:
    """A path as one word of a command printed for a person to paste (quoted only when the shell needs it)."""
    import shlex

    return shlex.quote(str(path))
