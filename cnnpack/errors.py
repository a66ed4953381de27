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


class RunReplaced(StageFailed):
    """The run was replaced (`train --force`) while a command ran on the old one: nothing of it is recorded."""


def count(n: int, noun: str) -> str:
    """`1 file`, `2 files`: a count in the one-line messages and the report."""
    return f"{n} {noun}" + ("" if n == 1 else "s")


def ratio(x: float, mark: str = "x") -> str:
    """A ratio as the CLI and the report give it: two decimals (1.73x), two significant figures below 0.1 (0.0048x:
    a TorchScript at a 200th of the fastest runtime read 0.00x)."""
    return f"{x:.2f}{mark}" if x >= 0.1 or x == 0 else f"{x:.2g}{mark}"


def first_few(names: list[str], n: int = 5) -> str:
    """`a, b, c and 4 more`: a list in a one-line message, however long it is."""
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def reraise_interrupt(e: BaseException) -> None:
    """Raises KeyboardInterrupt where one is in `e`'s chain (its causes and contexts): a Ctrl-C that landed inside a
    library's lazy import came out as that import's AttributeError ("module 'torch._dynamo' has no attribute 'exc'"),
    which a broad `except Exception` around the library call reported as the export failing, exit 1."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            raise KeyboardInterrupt from None
        seen.add(id(e))
        e = e.__cause__ or e.__context__


def one_line(e: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (a library's may span several), at most `limit` characters; its class
    name where it says nothing."""
    return " ".join(str(e).split())[:limit] or type(e).__name__


def shell(path: object) -> str:
    """A path as one word of a command printed for a person to paste (quoted only when the shell needs it)."""
    import shlex

    return shlex.quote(str(path))


def file_error(e: OSError) -> str:
    """`PATH: reason` for an OSError, naming the path the user gave rather than cnnpack's temporary sibling of it
    (`.model.onnx.x1y2.tmp`, `.deploy.new-x1y2`: outputs are written beside their place, then moved in)."""
    import errno
    import os
    import re
    from pathlib import Path

    path = Path(*(m.group(1) if (m := re.fullmatch(r"\.(.+)\.(?:new-\w+|old-\w+|\w+\.tmp)", part)) else part
                  for part in Path(os.fsdecode(e.filename)).parts))
    if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.EEXIST):
        for folder in (path, *path.parents):
            if folder.exists():
                if not folder.is_dir():
                    return f"{folder} is a file, not a folder" + (f": cannot make {path}" if folder != path else "")
                break
    return f"{path}: {e.strerror or e}"
